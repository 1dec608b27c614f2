"""What a Hugging Face user expects of a run: a TRL `messages` file trains as is, trackers get
the named loss terms (tensorboard writes an events file), `trainer_args` pass through (checked),
every run writes a model card that evaluations update, push_to_hub fails clearly offline,
metrics.json carries versions, git hash and date, and benign sets get no ASR."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from stayaligned.config import ConfigError, EvalConfig, TrainConfig, load
from stayaligned.training.run import train

SYSTEM = {"role": "system", "content": "You answer briefly."}


def messages_file(path: Path, n: int = 8) -> Path:
    rows = [{"messages": [SYSTEM,
                          {"role": "user", "content": f"What is {i} + 1?"},
                          {"role": "assistant", "content": f"{i + 1}."},
                          {"role": "user", "content": "And double that?"},
                          {"role": "assistant", "content": f"{2 * (i + 1)}."}]}
            for i in range(n)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(tmp_path: Path, model_dir: Path, *extra: str) -> TrainConfig:
    data = messages_file(tmp_path / "chat.jsonl")
    return load(TrainConfig, None, [
        f"model.name={model_dir}", f"data=[{{source: {data}}}]", "optim.batch_size=4",
        "optim.max_steps=2", "logging_steps=1", "max_length=96",
        f"output_dir={tmp_path / 'run'}", *extra])


def test_messages_file_trains_with_tensorboard_and_writes_a_model_card(tmp_path, tiny_model_dir):
    pytest.importorskip("tensorboard", reason="pip install 'stayaligned[trackers]' "
                                              "(or pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = train(config(tmp_path, tiny_model_dir, "report_to=tensorboard", "run_name=chat-sft",
                       "optim.warmup_ratio=0.5", "trainer_args={dataloader_drop_last: true}"))
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "complete" and manifest["global_step"] == 2
    first = manifest["rendered_examples"][0]["masked"]
    assert "⟦1.<|im_end|>\n⟧" in first and "⟦2.<|im_end|>\n⟧" in first  # both turns trained
    assert len(manifest["provenance"]["date"]) >= 19
    events = list(out.rglob("events.out.tfevents.*"))
    assert events, "tensorboard wrote no events file"
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    tags = accumulator.Tags()["scalars"]
    assert "train/loss/ce" in tags and "train/loss" in tags
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model: ") and "library_name: peft" in card
    assert "- `sft`: defaults" in card and "chat.jsonl" in card
    assert "2 optimiser steps" in card and "None yet" in card


def test_trainer_args_are_checked_against_training_arguments(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="trainer_args.dataloader_nm_workers: not a field of "
                                          "transformers TrainingArguments"):
        train(config(tmp_path, tiny_model_dir, "trainer_args={dataloader_nm_workers: 2}"))
    with pytest.raises(ConfigError, match="trainer_args.learning_rate: .* set optim.lr instead"):
        train(config(tmp_path, tiny_model_dir, "trainer_args={learning_rate: 0.1}"))
    # the Trainer's own mixed precision would run on top of model.precision, unrecorded
    with pytest.raises(ConfigError, match="label_smoothing_factor: method constrained_sft "
                                          "computes its own task loss"):
        train(config(tmp_path, tiny_model_dir, "methods=[constrained_sft]",
                     "trainer_args={label_smoothing_factor: 0.1}"))
    with pytest.raises(ConfigError, match="auto_find_batch_size: .* set optim.batch_size"):
        train(config(tmp_path, tiny_model_dir, "trainer_args={auto_find_batch_size: true}"))
    for name in ("fp16", "bf16"):
        with pytest.raises(ConfigError, match=f"trainer_args.{name}: .* set model.precision"):
            train(config(tmp_path, tiny_model_dir, f"trainer_args={{{name}: true}}"))
    with pytest.raises(ConfigError, match="report_to: 'tensorbord' is not a tracker"):
        train(config(tmp_path, tiny_model_dir, "report_to=tensorbord"))
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_push_to_hub_offline_is_a_clear_error_before_training(tmp_path, tiny_model_dir,
                                                             monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="push_to_hub=true needs hub_model_id"):
        train(config(tmp_path, tiny_model_dir, "push_to_hub=true"))
    with pytest.raises(ConfigError, match="push_to_hub=true but HF_HUB_OFFLINE is set"):
        train(config(tmp_path, tiny_model_dir, "push_to_hub=true", "hub_model_id=me/model"))
    assert not (tmp_path / "run").exists()


def test_qlora_on_cpu_is_a_clear_error(tmp_path, tiny_model_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; QLoRA is checked by the GPU check")
    with pytest.raises(ConfigError, match="lora.quantize=4bit \\(QLoRA\\) needs a CUDA GPU"):
        train(config(tmp_path, tiny_model_dir, "lora.quantize=4bit"))
    with pytest.raises(ConfigError, match="merge=true: an adapter cannot be merged"):
        train(config(tmp_path, tiny_model_dir, "lora.quantize=4bit", "merge=true"))


def test_adapter_base_is_the_hub_id_when_from_the_hub(tmp_path):
    from stayaligned.modelcard import record_base

    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": "/root/.cache/huggingface/hub/models--org--m/snapshots/1"}))
    record_base(tmp_path, "org/m")
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "org/m"
    record_base(tmp_path, str(tmp_path))  # a local base is left as recorded
    assert json.loads((tmp_path / "adapter_config.json").read_text()) == saved


def test_evaluation_updates_the_card_and_metrics_carry_provenance(tmp_path, tiny_model_dir):
    from stayaligned.evaluation.run import evaluate

    out = train(config(tmp_path, tiny_model_dir))
    prompts = tmp_path / "benign.txt"
    prompts.write_text("How do I kill a Python process?\nWhere can I shoot a photo?\n")
    fields = "fields: {user: prompt, assistant: null}"
    cfg = load(EvalConfig, None, [
        f"model.name={out}", f"output_dir={tmp_path / 'eval'}",
        f"benchmarks=[{{name: harm, source: {prompts}, kind: harmful, {fields}}}, "
        f"{{name: over, source: {prompts}, kind: benign, {fields}}}]",
        "generation={max_new_tokens: 4, batch_size: 2}"])
    # an older card keyed its evaluations by absolute path: converted, not duplicated
    (out / "evaluations.json").write_text(json.dumps(
        {str((tmp_path / "eval").resolve()): {"date": "old", "benchmarks": {}}}))
    metrics = evaluate(cfg)
    assert "attack_success_rate" in metrics["benchmarks"]["harm"]
    assert "attack_success_rate" not in metrics["benchmarks"]["over"]
    assert "refusal_rate" in metrics["benchmarks"]["over"]
    assert metrics["versions"]["transformers"] and len(metrics["date"]) >= 19
    assert metrics["machine"]["cpu_count"] >= 1
    assert "git" in metrics
    card = (out / "README.md").read_text()
    # named relative to the run, so that a committed or moved run reads the same anywhere
    where = os.path.relpath(tmp_path / "eval", out)
    assert list(json.loads((out / "evaluations.json").read_text())) == [where]
    assert "None yet" not in card and f"`{where}` (relative to this directory;" in card
    assert "| harm | harmful | 2 | refusal rate |" in card
    assert "| over | benign | 2 | over-refusal |" in card


def test_card_of_an_embedded_run_says_the_weights_were_dequantised(tmp_path):
    from stayaligned.modelcard import write_card

    manifest = {"config": {"model": {"name": "embedded"}, "methods": ["sft", "str"],
                           "options": {"str": {"lam": 0.1}}, "lora": {"enabled": True, "r": 8},
                           "optim": {"lr": 1e-4}, "loss_on": "each_turn"},
                "templates": {"train": "native", "eval": "native",
                              "chat_template_kwargs": {"enable_thinking": False}},
                "global_step": 5}
    (tmp_path / "run.json").write_text(json.dumps(manifest))
    card = write_card(tmp_path).read_text()
    assert 'chat template variables `{"enable_thinking": false}` (pass them' in card
    assert "loss on each answer, as the last turn of its own example." in card
    assert 'base_model: "HuggingFaceTB/SmolLM2-135M-Instruct"' in card
    assert "de-quantised to float32 from the Q4_1 GGUF" in card
    assert '- `str`: {"lam": 0.1}' in card and "- stayaligned" in card


def test_card_of_a_run_on_a_hub_model_names_the_commit_it_trained_from(tmp_path):
    from stayaligned.modelcard import write_card

    base = {"hub": "org/chat", "revision": "main", "gguf_file": None, "commit": "a" * 40}
    (tmp_path / "run.json").write_text(json.dumps({
        "config": {"model": {"name": "org/chat", "revision": "main"}, "methods": ["sft"]},
        "fingerprint": {"model": {"name": "org/chat", "base": base}}}))
    card = write_card(tmp_path).read_text()
    assert f"`org/chat` (from the Hugging Face Hub, revision main, commit {'a' * 40})" in card


def test_card_of_a_run_on_an_aligned_seed_names_the_seed_run(tmp_path):
    from stayaligned.modelcard import write_card

    seed = tmp_path / "align"
    seed.mkdir()
    (seed / "run.json").write_text(json.dumps({"config": {"model": {"name": "embedded"},
                                                          "methods": ["sft"]}}))
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"config": {"model": {"name": str(seed)},
                                                         "methods": ["ptst"]}}))
    card = write_card(run).read_text()
    assert f"`{seed}` (from a stayaligned run: sft on `embedded`; see its README.md)" in card


def test_an_accelerate_mixed_precision_that_contradicts_model_precision_is_an_error(
        tmp_path, tiny_model_dir, monkeypatch):
    """`accelerate launch` with mixed_precision bf16 (configs/accelerate/*.yaml) made the Trainer
    autocast to bf16 whatever model.precision said: an fp32 run (auto on a T4, or asked for)
    computed in bf16 while run.json and the model card said fp32."""
    from stayaligned.training.hf_args import check_launcher_precision

    fp32 = config(tmp_path, tiny_model_dir, "model.precision=fp32")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(ConfigError, match="mixed_precision bf16 .*model.precision resolves to "
                                          "fp32.*set model.precision=bf16"):
        train(fp32)
    assert not (tmp_path / "run" / "run.json").exists()  # refused before anything was written
    check_launcher_precision(config(tmp_path, tiny_model_dir, "model.precision=bf16"))
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(ConfigError, match="not fp16; set mixed_precision: no"):
        check_launcher_precision(config(tmp_path, tiny_model_dir, "model.precision=bf16"))
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    check_launcher_precision(fp32)


def test_trainer_args_may_change_the_defaults_no_config_key_owns(tmp_path, tiny_model_dir):
    """trainer_args that stayaligned also passes (adam_beta1, dataloader_num_workers, ...) ended
    in "TypeError: got multiple values for keyword argument"; the ones a config key owns are now
    a ConfigError naming the key, the others override stayaligned's default."""
    from stayaligned.training.run import _training_args

    args = _training_args(config(tmp_path, tiny_model_dir, "trainer_args={dataloader_num_workers"
                                 ": 2, logging_first_step: false}"), tmp_path / "run")
    assert args.dataloader_num_workers == 2 and args.logging_first_step is False
    for name, key in (("adam_beta1", "optim.adam_beta1"), ("adam_beta2", "optim.adam_beta2"),
                      ("gradient_checkpointing", "gradient_checkpointing")):
        with pytest.raises(ConfigError, match=f"trainer_args.{name}: .* set {key} instead"):
            _training_args(config(tmp_path, tiny_model_dir, f"trainer_args={{{name}: 0.5}}"),
                           tmp_path / "run")
