"""The `precision` entry of bench/results/overhead.json: CPU bf16 autocast against fp32.

    .venv/bin/stayaligned quickstart                       # the fp32 arm (auto = fp32 on CPU)
    .venv/bin/python bench/overhead.py --precision [--fp32-run runs/quickstart] [--repeats 6]

Two parts, both on the embedded SmolLM2-135M-Instruct:

1. Throughput, in one process, fp32 and bf16 interleaved (the order alternating every repeat)
   so that both see the same machine load: tokens/s of a LoRA training step (forward and
   backward; the AdamW step on the adapters is negligible) on the quickstart's sft batches,
   and of greedy generation (--gen-tokens new tokens, default 80; batch 16) on the held-out
   harmful prompts. Speedups are medians of the per-repeat ratios. The machine's load average
   and this process's CPU share (CPU time / wall time) are recorded.
2. Results: the whole quickstart study under each precision. The fp32 arm is a finished
   `stayaligned quickstart` (--fp32-run; its stages must have resolved to fp32, which
   `precision: auto` does on CPU while CPU_AUTO_BF16 is False); the bf16 arm is the same study
   with model.precision=bf16 (alignment, both fine-tunes and every evaluation under bf16
   autocast) in --precision-work/bf16. Compared per trained row (aligned, sft, recipe): held-out
   task loss, refusal (plain and prefilled), over-refusal, each bf16 rate against fp32's Wilson
   95% interval; and per stage, its seconds (end-to-end speedups of training and evaluation).
   Finished stages are reused on a rerun.

Targets (issue 12): >= 1.5x training and generation throughput, task loss within 2%, bf16
rates inside fp32's intervals; `meets_targets` says whether all hold, which is what
`precision.CPU_AUTO_BF16` follows.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

PRECISIONS = ("fp32", "bf16")
HARMFUL = "harmful (held-out)"
TASK = "arithmetic"


def _clock():
    return time.perf_counter(), time.process_time()


def _timed(fn):
    wall, cpu = _clock()
    out = fn()
    wall2, cpu2 = _clock()
    return out, wall2 - wall, cpu2 - cpu


def _setup():
    """The quickstart's sft cell config (started from the embedded model: throughput only)."""
    from stayaligned.config import ModelConfig
    from stayaligned.models import add_lora, load_model
    from stayaligned.quickstart import study_config
    from stayaligned.study import cell_train_config
    from stayaligned.training.collate import PadCollator
    from stayaligned.training.run import prepare

    study = study_config(Path("runs/bench-precision-unused"), ["model.precision=fp32"])
    sft = next(c for c in study.cells if c.name == "sft")
    cfg = cell_train_config(study, Path("runs/bench-precision-unused"), "sft", sft, 0)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name="embedded"))
    model, tokenizer = load_model(ModelConfig(name="embedded", precision="fp32"))
    items = prepare(cfg, tokenizer)["items"]
    model = add_lora(model, cfg.lora)
    collate = PadCollator(tokenizer.pad_token_id)
    size = cfg.optim.batch_size
    batches = [collate([{"input_ids": it.input_ids, "labels": it.labels}
                        for it in items[i:i + size]]) for i in range(0, len(items), size)]
    return model, tokenizer, batches, None


def _train_step(model, optimizer, batch, prec) -> int:
    from stayaligned.precision import autocast

    model.train()
    with autocast(prec):
        loss = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss
    loss.backward()
    model.zero_grad(set_to_none=True)  # timing only: the weights stay as loaded
    return int(batch["attention_mask"].sum())


def _prompts(tokenizer, n: int) -> list[str]:
    from stayaligned.data.sources import load_source
    from stayaligned.templates.library import get_template
    from stayaligned.templates.render import prompt_text

    native = get_template("native")
    examples = load_source("demo-harmful", split="eval")[:n]
    return [prompt_text(tokenizer, ex, native) for ex in examples]


def _gen_step(model, tokenizer, prompts, prec, new_tokens: int) -> int:
    import torch

    from stayaligned.evaluation.generation import _left_pad
    from stayaligned.precision import autocast

    model.eval()
    rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    ids, mask = _left_pad(rows, tokenizer.pad_token_id, "cpu")
    with torch.no_grad(), autocast(prec):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return (out.shape[1] - ids.shape[1]) * len(rows)  # decoding steps x batch


def throughput(repeats: int, new_tokens: int = 80, gen_batch: int = 16) -> dict:
    """Interleaved fp32 / bf16 tokens/s of training steps (the LoRA-wrapped model) and of
    generation (a plain model, as evaluation uses: it merges adapters before generating)."""
    from stayaligned.config import ModelConfig
    from stayaligned.models import load_model
    from stayaligned.precision import resolve

    model, tokenizer, batches, optimizer = _setup()
    plain = load_model(ModelConfig(name="embedded", precision="fp32"))[0]
    prompts = _prompts(tokenizer, gen_batch)
    precs = {name: resolve(name, device="cpu") for name in PRECISIONS}
    for name in PRECISIONS:  # warm-up: first-call allocations, oneDNN kernels
        _train_step(model, optimizer, batches[0], precs[name])
    rates = {f"{kind}_{name}": [] for kind in ("train", "gen") for name in PRECISIONS}
    cpu_share = []
    load_before = os.getloadavg()
    for rep in range(repeats):
        order = PRECISIONS if rep % 2 == 0 else PRECISIONS[::-1]
        batch = batches[1 + rep % (len(batches) - 1)]
        for name in order:
            tokens, wall, cpu = _timed(lambda: _train_step(model, optimizer, batch, precs[name]))
            rates[f"train_{name}"].append(tokens / wall)
            cpu_share.append(cpu / wall)
            tokens, wall, cpu = _timed(
                lambda: _gen_step(plain, tokenizer, prompts, precs[name], new_tokens))
            rates[f"gen_{name}"].append(tokens / wall)
            cpu_share.append(cpu / wall)
        print(f"[precision] repeat {rep + 1}/{repeats}: "
              + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items()), flush=True)
    ratios = {kind: [b / f for f, b in zip(rates[f"{kind}_fp32"], rates[f"{kind}_bf16"])]
              for kind in ("train", "gen")}
    return {
        "train_speedup": round(statistics.median(ratios["train"]), 3),
        "generation_speedup": round(statistics.median(ratios["gen"]), 3),
        "speedup_range": {k: [round(min(v), 3), round(max(v), 3)] for k, v in ratios.items()},
        "tokens_per_s_median": {k: round(statistics.median(v), 1) for k, v in rates.items()},
        "contention": {"loadavg_before": [round(x, 2) for x in load_before],
                       "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                       "cpu_share_median": round(statistics.median(cpu_share), 3),
                       "cores": os.cpu_count()},
        "repeats": repeats, "new_tokens": new_tokens, "generation_batch": gen_batch,
    }


ROWS = ("aligned", "sft", "recipe")  # the rows a precision can change (seed: no training)
TRAIN_STAGES = ("aligned/train", "cells/sft/train", "cells/recipe/train")
EVAL_STAGES = ("seed/eval", "aligned/eval", "cells/sft/eval", "cells/recipe/eval")


def _resolved(run: Path) -> str | None:
    """The precision a finished quickstart's training stages resolved to (their run.json)."""
    from stayaligned.runfiles import read_json

    info = read_json(run / "aligned" / "train" / "run.json") or {}
    return (info.get("precision") or {}).get("precision")


def results(fp32_run: Path, work: Path, compute: bool = True,
            bf16_run: Path | None = None) -> dict:
    """The quickstart under each precision: `fp32_run` is a finished `stayaligned quickstart`
    whose stages resolved to fp32 (the default on CPU), the bf16 arm is the same study with
    model.precision=bf16 in work/bf16 (every stage, the alignment included, under bf16).
    Per row: refusal (plain, prefilled), over-refusal, task accuracy and loss; per stage: its
    seconds from progress.json."""
    from stayaligned.quickstart import run_quickstart
    from stayaligned.runfiles import read_json

    bf16_run = bf16_run or work / "bf16"
    if compute and not (bf16_run / "summary.json").is_file():
        run_quickstart(bf16_run, overrides=["model.precision=bf16"])
    out = {}
    for name, run in (("fp32", fp32_run), ("bf16", bf16_run)):
        summary = read_json(run / "summary.json")
        if not summary:
            out[name] = None
            continue
        found = _resolved(run)
        if found != name:
            raise SystemExit(f"{run}: its stages ran in {found}, not {name}")
        out[name] = {"run": str(run), "rows": summary["rows"],
                     "stage_seconds": summary["stage_seconds"],
                     "curve": [(r["step"], r["loss"]) for r in
                               _log(run / "cells" / "sft" / "train") if "loss" in r]}
    return out


def _log(run: Path) -> list[dict]:
    from stayaligned.runfiles import read_jsonl

    return read_jsonl(run / "train_log.jsonl") if (run / "train_log.jsonl").is_file() else []


def _rel(new, old):
    return None if new is None or old is None else round((new - old) / old, 4)


def _inside(b16: dict | None, f32: dict | None) -> bool | None:
    if not b16 or not f32 or b16.get("value") is None or f32.get("low") is None:
        return None
    return f32["low"] <= b16["value"] <= f32["high"]


def compare(res: dict) -> dict:
    """Row by row and stage by stage, bf16 against fp32."""
    f32, b16 = res["fp32"], res["bf16"]
    if not f32 or not b16:
        return {}
    rows = {}
    for row in ROWS:
        a, b = f32["rows"][row], b16["rows"][row]
        la, lb = ((r.get("task_loss") or {}).get("loss") for r in (a, b))
        rows[row] = {
            "task_loss_fp32": la, "task_loss_bf16": lb, "task_loss_rel_diff": _rel(lb, la),
            **{f"{key}_{p}": r[key] for key in ("refusal_rate", "prefill_refusal_rate",
                                                 "over_refusal_rate", "task_accuracy")
               for p, r in (("fp32", a), ("bf16", b))},
            **{f"{key}_bf16_inside_fp32_interval": _inside(b[key], a[key])
               for key in ("refusal_rate", "prefill_refusal_rate", "over_refusal_rate")},
        }
    secs = {k: (f32["stage_seconds"].get(k), b16["stage_seconds"].get(k))
            for k in TRAIN_STAGES + EVAL_STAGES}
    by_step = dict(f32["curve"])
    diff = [abs(loss - by_step[s]) / by_step[s] for s, loss in b16["curve"] if s in by_step]
    total = {p: sum(v[i] or 0 for v in secs.values()) for i, p in enumerate(("fp32", "bf16"))}
    return {
        "rows": rows,
        "stage_seconds": {k: {"fp32": a, "bf16": b} for k, (a, b) in secs.items()},
        "finetune_speedup": _ratio(sum(secs[k][0] or 0 for k in TRAIN_STAGES),
                                   sum(secs[k][1] or 0 for k in TRAIN_STAGES)),
        "evaluation_speedup": _ratio(sum(secs[k][0] or 0 for k in EVAL_STAGES),
                                     sum(secs[k][1] or 0 for k in EVAL_STAGES)),
        "quickstart_seconds": total,
        "sft_loss_curve_max_rel_diff": round(max(diff), 4) if diff else None,
        "sft_loss_curves": {"fp32": f32["curve"], "bf16": b16["curve"]},
    }


def _ratio(a, b):
    return round(a / b, 3) if a and b else None


def cached_throughput(repeats: int, work: Path, new_tokens: int = 80,
                      gen_batch: int = 16) -> dict:
    """throughput(repeats, new_tokens), kept in work/throughput.json, reused on a rerun."""
    path = work / "throughput.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if (cached.get("repeats"), cached.get("new_tokens"),
                cached.get("generation_batch")) == (repeats, new_tokens, gen_batch):
            return cached
    value = throughput(repeats, new_tokens, gen_batch)
    work.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n")
    return value


def entry(repeats: int, work: Path, fp32_run: Path, command: str, new_tokens: int = 80,
          compute: bool = True, gen_batch: int = 16, bf16_run: Path | None = None) -> dict:
    """The whole `precision` entry (`compute=False`: only what has finished; the rest None)."""
    import torch

    path = work / "throughput.json"
    speed = (cached_throughput(repeats, work, new_tokens, gen_batch) if compute
             else json.loads(path.read_text()) if path.is_file()
             else {"train_speedup": None, "generation_speedup": None})
    bf16_run = bf16_run or work / "bf16"
    cmp = compare(results(fp32_run, work, compute, bf16_run))
    rows = cmp.get("rows", {})
    sft, recipe = rows.get("sft", {}), rows.get("recipe", {})
    rel = [r.get("task_loss_rel_diff") for r in rows.values()]
    inside = [r.get(f"{k}_bf16_inside_fp32_interval") for r in rows.values()
              for k in ("refusal_rate", "prefill_refusal_rate", "over_refusal_rate")]
    checks = {
        "train_speedup >= 1.5": (speed.get("train_speedup") or 0) >= 1.5,
        "generation_speedup >= 1.5": (speed.get("generation_speedup") or 0) >= 1.5,
        "task loss within 2% (every trained row)": bool(rel) and all(
            x is not None and abs(x) <= 0.02 for x in rel),
        "refusal rates inside fp32's intervals (every trained row)": bool(inside) and all(
            x is True for x in inside),
    }
    return {
        **speed,
        # the named fields, for the sft fine-tune (the quickstart's plain cell)
        "task_loss_fp32": sft.get("task_loss_fp32"), "task_loss_bf16": sft.get("task_loss_bf16"),
        "refusal_fp32": sft.get("refusal_rate_fp32"), "refusal_bf16": sft.get("refusal_rate_bf16"),
        "recipe_refusal_fp32": recipe.get("refusal_rate_fp32"),
        "recipe_refusal_bf16": recipe.get("refusal_rate_bf16"),
        **cmp,
        "checks": checks,
        "meets_targets": all(checks.values()),
        "meta": {
            "command": command,
            "model": "embedded SmolLM2-135M-Instruct",
            "throughput": "one process, fp32 and bf16 interleaved; train: forward + backward "
                          "of the quickstart's sft batches (LoRA r16, all linear layers, 8 x "
                          f"demo-arithmetic); generation: a plain (merged) model, greedy, {new_tokens} "
                          f"new tokens, batch {gen_batch} of held-out harmful prompts",
            "results": "the whole quickstart study under each precision: fp32 = "
                       f"{fp32_run} (model.precision auto, resolved to fp32 on this CPU), "
                       f"bf16 = {bf16_run} (model.precision=bf16: every stage, the "
                       "alignment included); keyword judge; task loss = held-out NLL of the "
                       "reference answers; intervals: Wilson 95%",
            "targets": "train and generation speedup >= 1.5, task loss within 2%, bf16 "
                       "rates inside fp32's 95% intervals (issue 12)",
            "torch_threads": torch.get_num_threads(),
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        },
    }


def merge_into(path: Path, value: dict) -> None:
    """Write `value` as the `precision` entry of the JSON file at `path`, keeping the rest."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    data["precision"] = value
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
