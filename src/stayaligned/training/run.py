"""`train(cfg) -> output dir`: data -> method transforms -> rendering -> Trainer -> weights.

Output directory layout:
  run.json            manifest: resolved config, versions, data hashes, rendered examples with
                      their loss masks, the train and eval prompt of the first example, status
  train_log.jsonl     the trainer's log history (loss terms by name, learning rate)
  adapter/            LoRA adapter (safetensors) + tokenizer, loadable with PEFT
  model/              full fine-tuning weights (safetensors) + tokenizer
  merged/             base + adapter merged (with merge=true), loadable with from_pretrained
  checkpoints/        checkpoint-N every save_steps steps, for --resume (deleted once the run
                      is complete with keep_checkpoints: false)
  README.md           model card: base model, methods, data, budget, evaluations (modelcard.py)
  checkpoints/runs/   tensorboard logs with report_to: tensorboard (TENSORBOARD_LOGGING_DIR
                      moves them)
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from stayaligned.config import ConfigError, TrainConfig, to_dict
from stayaligned.data.sources import load_source
from stayaligned.data.types import DataError, Example
from stayaligned.data.transforms import split_turns
from stayaligned.methods import METHODS
from stayaligned.methods.base import Method, build_methods
from stayaligned.models import Device, add_lora, load_model, pick_device
from stayaligned.precision import hold_for_autocast, warn_pure
from stayaligned.precision import resolve as resolve_precision
from stayaligned.templates.library import get_template
from stayaligned.templates.render import prompt_text, render_dataset, show_mask, template_date
from stayaligned.training.collate import PadCollator, RenderedDataset
from stayaligned.runlock import clear_dir, run_lock
from stayaligned.runfiles import (
    checkpoint_step,
    data_fingerprint,
    has_weights,
    machine_info,
    recovery_fingerprint,
    package_versions,
    provenance,
    read_json,
    write_json,
    write_jsonl,
)

N_PREVIEW = 3


def load_task_examples(cfg: TrainConfig) -> list[Example]:
    """All configured sources, concatenated, before any method transform. A record without an
    answer is an error: rendering would drop it with one printed line, and a run that mixes in
    other data (safety_mix) would go on training on that data alone."""
    examples: list[Example] = []
    for index, source in enumerate(cfg.data):
        loaded = load_source(
            source.source, split=source.split, limit=source.limit, seed=source.seed,
            fields=source.fields, data_dir=cfg.data_dir,
        )
        unanswered = next((ex for ex in loaded
                           if not any(m["role"] == "assistant" for m in ex.messages)), None)
        if unanswered is not None:
            raise DataError(
                f"{unanswered.id}: data[{index}] ({source.source}) has no answer to train on: "
                "the record was read as a prompt only (TRL's 'prompt' without 'completion', or "
                f"no fields.assistant); map its answer field with data[{index}].fields, e.g. "
                "{user: prompt, assistant: response}, or name it 'completion'")
        examples += loaded
    return examples


def load_recovery_examples(cfg: TrainConfig, tokenizer) -> list[Example]:
    """`align` with `deep: true`: safety-recovery examples from cfg.recovery's triplets (Qi et
    al. 2024, data.transforms.safety_recovery); none otherwise."""
    if not getattr(cfg, "deep", False):
        return []
    from stayaligned.data.loading import SUFFIXES, local_path
    from stayaligned.data.pairs import load_pairs
    from stayaligned.data.transforms import safety_recovery, token_pieces

    rec = cfg.recovery
    if not rec.source:
        raise ConfigError("deep: true needs recovery.source, a file of (prompt, refusal, harmful "
                          "answer) triplets, e.g. from `stayaligned pairs --prefill \"Sure, here is\"`")
    if local_path(rec.source, cfg.data_dir) is None and Path(rec.source).suffix.lower() in SUFFIXES:
        # load_examples' "file not found" says nothing of where a generated triplets file
        # comes from (a fresh checkout has none)
        searched = f" (nor {Path(cfg.data_dir) / rec.source})" if cfg.data_dir else ""
        raise ConfigError(f"recovery.source: {rec.source} not found{searched}; make it with "
                          "`stayaligned pairs --model MODEL --harmful SOURCE --prefill \"Sure, "
                          f"here is\" --output {rec.source}` (the command is in the align "
                          "config's header when it came with stayaligned)")
    triplets = load_pairs(rec.source, fields=rec.fields, data_dir=cfg.data_dir,
                          limit=rec.limit, seed=rec.seed)
    return safety_recovery(triplets, token_pieces(tokenizer), seed=cfg.seed,
                           probability=rec.probability, max_prefix_tokens=rec.max_prefix_tokens)


def apply_transforms(examples: list[Example], methods: list[Method]) -> list[Example]:
    """Each method's data transform, in list order (training data only)."""
    for method in methods:
        examples = method.transform_dataset(examples)
    return examples


def templates_for(cfg: TrainConfig, methods: list[Method]) -> tuple[str, str]:
    train = next((m.train_template() for m in methods if m.train_template()), cfg.template)
    evaluate = next((m.eval_template() for m in methods if m.eval_template()), cfg.eval_template)
    return train, evaluate


def prepare(cfg: TrainConfig, tokenizer) -> dict:
    """Methods, examples and rendered training items, without touching a model."""
    methods = build_methods(cfg.methods, cfg.options, cfg.seed, METHODS)
    for method in methods:
        method.attach(tokenizer, cfg)
    task_examples = load_task_examples(cfg) + load_recovery_examples(cfg, tokenizer)
    if cfg.loss_on == "each_turn":  # one example per answer, before any method's transform
        task_examples = split_turns(task_examples)
    examples = apply_transforms(task_examples, methods)
    if not examples:
        raise DataError("the training data is empty: check data.*.source and limits")
    train_name, eval_name = templates_for(cfg, methods)
    template = get_template(train_name)
    items, report = render_dataset(tokenizer, examples, template, cfg.max_length, cfg.overlong,
                                   cfg.loss_on)
    if not items:
        raise DataError("no training example is left after rendering: " + "; ".join(report.summary()))
    return {
        "methods": methods, "examples": examples, "items": items, "report": report,
        "task_examples": task_examples,
        "train_template": train_name, "eval_template": eval_name,
    }


def _manifest(cfg: TrainConfig, prep: dict, tokenizer) -> dict:
    # what the model is trained on (transformed) and what it is asked at test time (the raw
    # task example: evaluation data never goes through the method transforms)
    trained = {ex.id: ex for ex in prep["examples"]}[prep["items"][0].example_id]
    first = prep["task_examples"][0]
    eval_template = get_template(prep["eval_template"])
    return {
        "status": "running",
        "config": to_dict(cfg),
        "versions": package_versions(),
        "machine": machine_info(),
        "provenance": provenance(),
        "device": pick_device(cfg.model.dtype, cfg.model.precision).type,
        "precision": resolve_precision(cfg.model.precision, cfg.model.dtype).to_dict(),
        "data": [data_fingerprint(s, cfg.data_dir) for s in cfg.data],
        **({"recovery": recovery} if (recovery := recovery_fingerprint(cfg)) else {}),
        "n_examples": len(prep["examples"]),
        "render_report": prep["report"].to_dict(),
        "templates": {"train": prep["train_template"], "eval": prep["eval_template"],
                      **({"chat_template_kwargs": kwargs}
                         if (kwargs := getattr(tokenizer, "stayaligned_chat_kwargs", None))
                         else {}),
                      **({"date": day} if (day := template_date(tokenizer)) else {})},
        "train_prompt_example": prompt_text(
            tokenizer, Example(trained.id, trained.prompt_messages),
            get_template(prep["train_template"])),
        "eval_prompt_example": prompt_text(tokenizer, Example(first.id, first.prompt_messages),
                                           eval_template),
        "rendered_examples": [
            {"id": it.example_id, "masked": show_mask(tokenizer, it),
             "n_tokens": len(it.input_ids), "n_loss_tokens": it.n_loss_tokens}
            for it in prep["items"][:N_PREVIEW]
        ],
    }


def _training_args(cfg: TrainConfig, out: Path):
    from transformers import TrainingArguments

    from stayaligned.training.hf_args import trainer_arg_overrides

    device = pick_device(cfg.model.dtype, cfg.model.precision)
    o = cfg.optim
    kwargs = dict(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=o.batch_size,
        gradient_accumulation_steps=o.grad_accum,
        num_train_epochs=o.epochs,
        max_steps=o.max_steps,
        learning_rate=o.lr,
        lr_scheduler_type=o.scheduler,
        warmup_steps=o.warmup_steps or o.warmup_ratio,  # a float < 1 is a ratio
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        max_grad_norm=o.max_grad_norm,
        seed=cfg.seed,
        data_seed=cfg.seed,
        save_strategy="steps" if cfg.save_steps > 0 else "no",
        save_steps=max(cfg.save_steps, 1),
        save_total_limit=cfg.save_total_limit,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        report_to=list(cfg.report_to),
        run_name=cfg.run_name,
        torch_compile=cfg.torch_compile,
        remove_unused_columns=False,
        use_cpu=device.type == "cpu",
        bf16=False,  # autocast is the trainer's own (precision.autocast), weights as loaded
        dataloader_num_workers=0,
        **_checkpointing_args(cfg),
    )
    # trainer_args may change the defaults above that no config key owns (data loader workers,
    # logging_first_step); the ones a config key owns are refused by trainer_arg_overrides
    return TrainingArguments(**{**kwargs, **trainer_arg_overrides(cfg)})


def _checkpointing_args(cfg: TrainConfig) -> dict:
    """Gradient checkpointing for the Trainer to switch on. Non-reentrant checkpointing: the
    reentrant kind needs an input that requires grad (absent when only LoRA adapters train)
    and breaks methods that run extra forward passes inside one step."""
    from transformers import TrainingArguments

    if not cfg.gradient_checkpointing:
        return {}
    # transformers 5 renamed the arguments (the old names are deprecated aliases)
    name = ("activation_checkpointing" if "activation_checkpointing"
            in TrainingArguments.__dataclass_fields__ else "gradient_checkpointing")
    return {name: True, f"{name}_kwargs": {"use_reentrant": False}}


def last_complete_checkpoint(ckpt_dir: Path) -> str | None:
    """The newest checkpoint-N whose write finished (trainer_state.json is written last);
    incomplete ones, and a staging folder left by a kill during a write, are skipped with a
    message."""
    from stayaligned.training.trainer import STAGING

    if not ckpt_dir.is_dir():
        return None
    if (ckpt_dir / STAGING).exists() and _main_process():  # one process deletes
        print(f"--resume: removing {ckpt_dir / STAGING}, a checkpoint write that was interrupted")
        shutil.rmtree(ckpt_dir / STAGING, ignore_errors=True)
    steps = sorted((int(p.name.split("-")[1]), p) for p in ckpt_dir.glob("checkpoint-*")
                   if p.is_dir() and p.name.split("-")[1].isdigit())
    for _, path in reversed(steps):
        if (path / "trainer_state.json").is_file():
            return str(path)
        print(f"--resume: skipping {path}: incomplete (no trainer_state.json)")
    return None


# TrainConfig keys that do not change what a run computes: a moved run, or one whose
# checkpoints are kept or not, is the same run
NOT_FINGERPRINTED = ("output_dir", "keep_checkpoints")


def check_same_run(cfg: TrainConfig, fix: str, model: bool = True) -> None:
    """A run directory holds one configuration and one base model: a stored run.json made
    with other settings (output_dir aside: a moved run is the same run) is a `StaleError`, and
    so is a base that is a stayaligned run remade since (another run.json: a large weights
    file's identity is its size and header only; runs from before `model_record` pass).
    `model=False` checks the configuration alone (a run whose base's weights are absent)."""
    from stayaligned.fingerprint import ADDED_LATER, check_same, run_record

    out = Path(cfg.output_dir)
    manifest = read_json(out / "run.json")
    if not manifest:
        return
    old = {k: v for k, v in manifest.get("config", {}).items() if k not in NOT_FINGERPRINTED}
    new = {k: v for k, v in to_dict(cfg).items() if k not in NOT_FINGERPRINTED}
    defaults = to_dict(type(cfg)())
    check_same(f"{out}/run.json", {"config": old}, {"config": new}, {"config": defaults}, fix)
    stored = manifest.get("fingerprint") or {}
    if stored.get("model") is not None and model:
        check_same(f"{out}/run.json",
                   {"model": stored["model"], "model_record": stored.get("model_record")},
                   {"model": _model_identity(cfg), "model_record": run_record(cfg.model.name)},
                   {"model_record": ADDED_LATER}, fix=fix)


RESUME_FIX = ("so its checkpoint cannot be resumed on it; restore the data files the run "
              "started on, or run without --resume and with --overwrite to start over on the "
              "new data")


def check_same_data(cfg: TrainConfig, fix: str = RESUME_FIX) -> None:
    """--resume: the data files are the ones the run started on (run.json's `data` and
    `recovery` fingerprints); a file edited after the kill would otherwise be resumed with the
    old optimiser state and the old count of batches to skip (a study checks its finished runs
    too). A `StaleError` names the source and what changed, then `fix`. Files compare by name
    and digest, so a moved checkout is the same data."""
    from stayaligned.fingerprint import StaleError, differences

    out = Path(cfg.output_dir)
    manifest = read_json(out / "run.json")
    if not manifest or manifest.get("data") is None:
        return
    old = {"data": manifest["data"], "recovery": manifest.get("recovery")}
    new = {"data": [data_fingerprint(s, cfg.data_dir) for s in cfg.data],
           "recovery": recovery_fingerprint(cfg)}
    changed = differences(_data_identity(old), _data_identity(new))
    if changed:
        shown = ", ".join(changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
        sources = [s.source for s in cfg.data] + ([cfg.recovery.source] if new["recovery"] else [])
        raise StaleError(
            f"{out}/run.json: the training data changed since this run started (changed: "
            f"{shown}; sources: {', '.join(sources)}), {fix}")


def _data_identity(fingerprints: dict) -> dict:
    """Data fingerprints keyed for `differences`: sources by index, files by name."""
    def entry(fp):
        if not isinstance(fp, dict):
            return fp
        files = {Path(k).name: v for k, v in (fp.get("files_sha256") or {}).items()}
        return {**{k: v for k, v in fp.items() if k != "files_sha256"}, "files_sha256": files}

    return {"data": {str(i): entry(fp) for i, fp in enumerate(fingerprints["data"] or [])},
            "recovery": entry(fingerprints["recovery"])}


def _model_identity(cfg: TrainConfig) -> dict:
    from stayaligned.fingerprint import model_identity

    m = cfg.model
    return model_identity(m.name, m.revision, m.gguf_file)


def _check_output_dir(out: Path, resume: bool, overwrite: bool, cfg: TrainConfig | None = None) -> str | None:
    """The checkpoint to resume from (or None); refuses to mix a new run into an old one."""
    ckpt_dir = out / "checkpoints"
    if resume:
        if cfg is not None:
            check_same_run(cfg, "run without --resume and with --overwrite to start over, or "
                                "restore the run's config")
            check_same_data(cfg)
        last = last_complete_checkpoint(ckpt_dir)
        if last is None:
            print(f"--resume: no checkpoint in {ckpt_dir}; starting from step 0")
        return last
    if overwrite and out.exists():
        if _main_process():  # the others wait for it once the trainer is built (_train)
            clear_dir(out)
    elif (out / "run.json").exists():
        raise ConfigError(
            f"{out} already holds a run; pass --resume to continue it, --overwrite to replace "
            "it, or choose another output_dir"
        )
    return None


def _main_process() -> bool:
    """The data-parallel main process (RANK 0, or no launcher), before any process group."""
    return int(os.environ.get("RANK", "0")) == 0


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Fine-tune as configured (the config checked first, the output directory locked);
    returns the output directory."""
    from stayaligned.training.hf_args import check_training_options
    from stayaligned.validate import check_train

    check_train(cfg)
    check_training_options(cfg)  # trackers, trainer_args, push_to_hub: before anything is written
    if not _main_process():  # one lock per run: the main process holds it
        return _train(cfg, resume, overwrite)
    with run_lock(Path(cfg.output_dir)):
        return _train(cfg, resume, overwrite)


def bind_local_device(device: str) -> None:
    """A data-parallel process on GPUs makes its own GPU (LOCAL_RANK) the current CUDA device
    before the model is loaded: load_model's ``.to("cuda")`` means the current device, and the
    Trainer's arguments, which set it, come later; without this every rank's copy lands on
    GPU 0 first."""
    import torch

    local = os.environ.get("LOCAL_RANK")
    if device != "cuda" or local is None or not torch.cuda.is_available():
        return
    torch.cuda.set_device(int(local))


def _train(cfg: TrainConfig, resume: bool, overwrite: bool) -> Path:
    from transformers import set_seed

    from stayaligned.fingerprint import run_record
    from stayaligned.training.hf_args import quantization_config
    from stayaligned.training.trainer import StayTrainer, check_finite

    out = Path(cfg.output_dir)
    checkpoint = _check_output_dir(out, resume, overwrite, cfg)
    complete = resume and is_complete(out)
    missing = _missing_outputs(out, cfg) if complete else []
    if missing:
        print(f"--resume: {out}/run.json says complete but {', '.join(missing)} is missing; "
              "training it again" + (f" from {checkpoint}" if checkpoint else ""))
    elif complete:  # same config and data (checked above): nothing to train
        print(f"--resume: {out} holds a complete run ({read_json(out / 'run.json').get('global_step')}"
              " steps); nothing to resume (--overwrite trains it again)")
        if _main_process():  # what a kill after run.json was written may have left undone
            _after_complete(cfg, out, card=not (out / "README.md").exists())
        return out
    set_seed(cfg.seed)
    precision = resolve_precision(cfg.model.precision, cfg.model.dtype)
    warn_pure(precision, full_fine_tuning=not cfg.lora.enabled)
    bind_local_device(precision.device)
    args = _training_args(cfg, out)
    quantization = quantization_config(cfg.lora, precision)
    # loaded on the CPU and moved below, once LoRA is added and the frozen base held
    model, tokenizer = load_model(cfg.model, quantization=quantization, place=False)
    prep = prepare(cfg, tokenizer)
    for line in prep["report"].summary():
        print(f"[data] {line}")
    if cfg.lora.enabled:
        model = add_lora(model, cfg.lora)
    held = _hold_frozen_base(cfg, model, args, precision, prep["methods"])
    if quantization is None:  # (QLoRA's 4-bit base is already on its GPU)
        model.to(precision.device)
    trainer = StayTrainer(
        model=model, args=args, train_dataset=RenderedDataset(prep["items"]),
        data_collator=PadCollator(tokenizer.pad_token_id), methods=prep["methods"],
        precision=precision,
    )
    if held and (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):
        raise RuntimeError(  # _sharded read the engines wrongly: never train a held base there
            "the frozen base was held in bf16 but the Trainer runs FSDP or DeepSpeed; report "
            "this, and set lora.quantize or model.precision: pure_bf16 meanwhile")
    trainer.accelerator.wait_for_everyone()  # the main process has cleared the output dir
    main = trainer.is_world_process_zero()
    manifest = _manifest(cfg, prep, tokenizer)
    if held:
        manifest["frozen_base"] = {"dtype": "bfloat16", "bytes_saved": held}
    manifest["world_size"] = trainer.args.world_size
    manifest["fingerprint"] = {"model": _model_identity(cfg),
                               "model_record": run_record(cfg.model.name)}
    for method in prep["methods"]:
        method.setup({"model": model, "tokenizer": tokenizer, "config": cfg, "output_dir": out,
                      "train_examples": prep["examples"], "trainer": trainer})
    if main:
        write_json(out / "run.json", manifest)
    started = time.time()
    start_step = _checkpoint_step(checkpoint)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    if main:
        try:
            check_finite(trainer.model, trainer.state.global_step, "final model")
        except RuntimeError as err:
            write_json(out / "run.json", {**manifest, "status": "failed", "error": str(err)})
            raise
        _save_outputs(trainer, tokenizer, cfg, out, held_base=bool(held))
        write_jsonl(out / "train_log.jsonl", trainer.state.log_history)
        manifest.update(status="complete", train_seconds=round(time.time() - started, 1),
                        train_metrics=result.metrics, global_step=trainer.state.global_step,
                        resumed_from=checkpoint,
                        # the steps train_seconds timed (a resumed run: those after checkpoint)
                        timed_steps=trainer.state.global_step - start_step)
        write_json(out / "run.json", manifest)
        _after_complete(cfg, out, card=True, push=cfg.push_to_hub)
    trainer.accelerator.wait_for_everyone()
    return out


def _checkpoint_step(checkpoint: str | None) -> int:
    """The global step a resumed run starts from (0 for a fresh run)."""
    if not checkpoint:
        return 0
    state = read_json(Path(checkpoint) / "trainer_state.json") or {}
    step = state.get("global_step")
    return step if isinstance(step, int) else checkpoint_step(checkpoint) or 0


def _hold_frozen_base(cfg: TrainConfig, model, args, precision, methods) -> int:
    """A LoRA run under bf16 autocast holds its frozen base Linear weights in bf16: autocast
    casts them to bf16 for every product anyway, so forward, backward and the trained adapter
    are the same bits at about half the base's memory (an 8B model: ~16 GB instead of 32;
    `precision.hold_for_autocast`). It happens on the CPU, after LoRA is added and before the
    model moves to its device, so the device never holds the float32 base (the host loads it
    in float32 first). PEFT initialises the adapters on the CPU either way: their init is the
    same bits. Not with QLoRA (already 4-bit), FSDP or DeepSpeed (their engines hold the
    parameters; read from the TrainingArguments and accelerate's environment, see `_sharded`),
    or a method that runs the model outside autocast (`needs_float32_base`: SAP, STR). Returns
    the bytes saved (0: not held)."""
    if (not cfg.lora.enabled or cfg.lora.quantize is not None or _sharded(args)
            or any(m.needs_float32_base for m in methods)):
        return 0
    return hold_for_autocast(model, precision, frozen_only=True)


def _sharded(args) -> bool:
    """Whether the Trainer built from `args` will run FSDP or DeepSpeed, decided before it
    exists: the `fsdp` / `deepspeed` training arguments (config `trainer_args`), or `accelerate
    launch`'s ACCELERATE_USE_FSDP / ACCELERATE_USE_DEEPSPEED. `_train` checks the Trainer's own
    answer afterwards (accelerate's own reader of those variables, `parse_flag_from_env`)."""
    from accelerate.utils import parse_flag_from_env

    return (bool(getattr(args, "fsdp", None)) or getattr(args, "deepspeed", None) is not None
            or getattr(args, "deepspeed_plugin", None) is not None
            or parse_flag_from_env("ACCELERATE_USE_FSDP")
            or parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"))


def _save_outputs(trainer, tokenizer, cfg: TrainConfig, out: Path,
                  held_base: bool = False) -> None:
    model = trainer.accelerator.unwrap_model(trainer.model)
    target = out / ("adapter" if cfg.lora.enabled else "model")
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    if cfg.lora.enabled and cfg.merge:
        if held_base:  # merge into the float32 base, not the bf16 copy training held
            import torch
            from peft import PeftModel

            base, _ = load_model(cfg.model, device=Device("cpu", torch.float32))
            model = PeftModel.from_pretrained(base, str(target))
        merged = model.merge_and_unload()
        merged.save_pretrained(out / "merged", safe_serialization=True)
        tokenizer.save_pretrained(out / "merged")


def _missing_outputs(out: Path, cfg: TrainConfig) -> list[str]:
    """The final weights a complete run writes (_save_outputs) that are not in `out`: a run
    whose run.json says complete but whose weights were deleted is not finished."""
    wanted = [out / ("adapter" if cfg.lora.enabled else "model")]
    if cfg.lora.enabled and cfg.merge:
        wanted.append(out / "merged")
    return [f"{path.name}/ (its weights)" for path in wanted if not has_weights(path)]


def _after_complete(cfg: TrainConfig, out: Path, card: bool, push: bool = False) -> None:
    """Once run.json says complete: the model card, the upload when push_to_hub is set, and
    the checkpoints deleted with keep_checkpoints false."""
    from stayaligned.modelcard import record_base, write_card

    if card:
        record_base(out / "adapter", cfg.model.name)
        print(f"[train] model card: {write_card(out)}")
    if push:
        from stayaligned.training.hf_args import push as upload

        print(f"[train] pushed to {upload(out, cfg)}")
    if not cfg.keep_checkpoints:
        prune_checkpoints(out)


def prune_checkpoints(out: Path) -> list[Path]:
    """Delete a complete run's checkpoints (checkpoint-N and an interrupted write's staging
    folder); the tensorboard logs under checkpoints/runs stay. Returns what was deleted; a
    run that is not complete keeps everything (its checkpoints are what --resume needs)."""
    from stayaligned.training.trainer import STAGING

    if not is_complete(out):
        return []
    ckpt_dir = out / "checkpoints"
    gone = sorted(ckpt_dir.glob("checkpoint-*")) + [p for p in [ckpt_dir / STAGING] if p.exists()]
    for path in gone:
        shutil.rmtree(path)
    if gone:
        print(f"[train] keep_checkpoints false: deleted {len(gone)} checkpoint folder(s) under {ckpt_dir}")
    return gone


def is_complete(out: Path) -> bool:
    """True when `out` holds a finished training run."""
    manifest = read_json(out / "run.json")
    return bool(manifest) and manifest.get("status") == "complete"
