"""The `precision` entry of bench/results/overhead.json: CPU bf16 autocast against fp32.

    .venv/bin/python bench/overhead.py --precision [--repeats 6] [--work runs/bench-precision]

Two parts, both on the embedded SmolLM2-135M-Instruct with the quickstart's own recipe
(stayaligned.quickstart FINETUNE and EVAL, started from the embedded model rather than from
the aligned seed, so that no align stage is needed):

1. Throughput, in one process, fp32 and bf16 interleaved (the order alternating every repeat)
   so that both see the same machine load: tokens/s of a LoRA training step (forward and
   backward; the AdamW step on the adapters is negligible) on the quickstart's batches, and
   of greedy generation (--gen-tokens new tokens, default 80; batch 16) on the held-out
   harmful prompts. Speedups are medians of the per-repeat ratios. The machine's load average
   and this process's CPU share (CPU time / wall time) are recorded: other jobs on a shared
   machine slow both modes alike, but widen the spread.
2. Results: the quickstart fine-tune run twice (model.precision fp32, then bf16), each
   evaluated under its own precision: the training-loss curves, the held-out task loss
   (mean NLL of the reference answers) and the refusal rate on the held-out harmful requests
   with Wilson 95% intervals. Finished stages in --work are reused on a rerun.

Targets (issue 12): >= 1.5x training and generation throughput, final task loss within 2%,
refusal rate of bf16 inside fp32's interval; `meets_targets` says whether all hold, which is
what `precision.CPU_AUTO_BF16` follows.
"""

from __future__ import annotations

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
    from stayaligned.config import ModelConfig, TrainConfig, load
    from stayaligned.models import add_lora, load_model
    from stayaligned.quickstart import FINETUNE
    from stayaligned.training.collate import PadCollator
    from stayaligned.training.run import prepare

    cfg = load(TrainConfig, None, [*FINETUNE, "model.name=embedded", "model.precision=fp32"])
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


def throughput(repeats: int, new_tokens: int = 80) -> dict:
    """Interleaved fp32 / bf16 tokens/s of training steps and of generation."""
    from stayaligned.precision import resolve

    model, tokenizer, batches, optimizer = _setup()
    prompts = _prompts(tokenizer, 16)
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
                lambda: _gen_step(model, tokenizer, prompts, precs[name], new_tokens))
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
        "repeats": repeats, "new_tokens": new_tokens,
    }


def _finetune_and_eval(work: Path, name: str, steps: int,
                       compute: bool = True) -> tuple[dict | None, list[dict]]:
    from stayaligned.config import EvalConfig, TrainConfig, load
    from stayaligned.evaluation.run import evaluate
    from stayaligned.quickstart import EVAL, FINETUNE
    from stayaligned.runfiles import read_json, read_jsonl
    from stayaligned.training.run import is_complete, train

    run, out = work / name / "finetune", work / name / "eval"
    if not compute:  # collect only what the stages have finished
        log = read_jsonl(run / "train_log.jsonl") if is_complete(run) else []
        return read_json(out / "metrics.json"), log
    if not is_complete(run):
        short = [f"optim.max_steps={steps}", "logging_steps=2", "save_steps=4"] if steps else []
        train(load(TrainConfig, None, [*FINETUNE, "model.name=embedded", *short,
                                       f"model.precision={name}", f"output_dir={run}"]),
              resume=(run / "run.json").exists())
    metrics = read_json(out / "metrics.json")
    if not metrics:
        fewer = ["benchmarks.1.limit=20"] if steps else []  # short mode: 20 task problems
        metrics = evaluate(load(EvalConfig, None, [*EVAL, *fewer, f"model.name={run}",
                                                  f"model.precision={name}",
                                                  f"output_dir={out}"]))
    return metrics, read_jsonl(run / "train_log.jsonl")


def results(work: Path, steps: int = 0, names=PRECISIONS, compute: bool = True) -> dict:
    """Both fine-tunes and evaluations: losses and refusal rates (`steps` > 0, a short run for
    a busy machine: only the first `steps` optimiser steps of the quickstart fine-tune, and 20
    of its 50 arithmetic problems; all 66 held-out harmful requests either way)."""
    from stayaligned.runfiles import read_json

    out = {}
    for name in names:
        metrics, log = _finetune_and_eval(work, name, steps, compute)
        curve = [(row["step"], row["loss"]) for row in log if "loss" in row]
        bench = (metrics or {}).get("benchmarks", {})
        harmful, task = bench.get(HARMFUL, {}), bench.get(TASK, {})
        out[name] = {"curve": curve, "final_train_loss": curve[-1][1] if curve else None,
                     "task_loss": (task.get("task_loss") or {}).get("loss"),
                     "refusal_rate": harmful.get("refusal_rate"),
                     "task_accuracy": task.get("accuracy"),
                     "train_seconds": (read_json(work / name / "finetune" / "run.json") or {})
                     .get("train_seconds")}
    return out


def _rel(new, old):
    return None if new is None or old is None else round((new - old) / old, 4)


def cached_throughput(repeats: int, work: Path, new_tokens: int = 80) -> dict:
    """throughput(repeats, new_tokens), kept in work/throughput.json, reused on a rerun."""
    path = work / "throughput.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if (cached.get("repeats"), cached.get("new_tokens")) == (repeats, new_tokens):
            return cached
    value = throughput(repeats, new_tokens)
    work.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n")
    return value


def entry(repeats: int, work: Path, command: str, steps: int = 0,
          new_tokens: int = 80, compute: bool = True) -> dict:
    """The whole `precision` entry (`compute=False`: only what the stages finished; the rest
    is None)."""
    import torch

    path = work / "throughput.json"
    speed = (cached_throughput(repeats, work, new_tokens) if compute
             else json.loads(path.read_text()) if path.is_file()
             else {"train_speedup": None, "generation_speedup": None})
    res = results(work, steps, compute=compute)
    f32, b16 = res["fp32"], res["bf16"]
    by_step = dict(f32["curve"])
    curve_diff = [abs(loss - by_step[s]) / by_step[s] for s, loss in b16["curve"] if s in by_step]
    rel_task = _rel(b16["task_loss"], f32["task_loss"])
    rel_train = _rel(b16["final_train_loss"], f32["final_train_loss"])
    inside = None
    if f32["refusal_rate"] and b16["refusal_rate"]:
        inside = f32["refusal_rate"]["low"] <= b16["refusal_rate"]["value"] \
            <= f32["refusal_rate"]["high"]
    checks = [(speed["train_speedup"] or 0) >= 1.5, (speed["generation_speedup"] or 0) >= 1.5,
              rel_task is not None and abs(rel_task) <= 0.02,
              rel_train is not None and abs(rel_train) <= 0.02, bool(inside)]
    seconds = (f32["train_seconds"], b16["train_seconds"])
    return {
        **speed,
        "task_loss_fp32": f32["task_loss"], "task_loss_bf16": b16["task_loss"],
        "task_loss_rel_diff": rel_task,
        "final_train_loss_fp32": f32["final_train_loss"],
        "final_train_loss_bf16": b16["final_train_loss"],
        "final_train_loss_rel_diff": rel_train,
        "loss_curve_max_rel_diff": round(max(curve_diff), 4) if curve_diff else None,
        "loss_curves": {"fp32": f32["curve"], "bf16": b16["curve"]},
        "refusal_fp32": f32["refusal_rate"], "refusal_bf16": b16["refusal_rate"],
        "refusal_bf16_inside_fp32_interval": inside,
        "task_accuracy_fp32": f32["task_accuracy"], "task_accuracy_bf16": b16["task_accuracy"],
        "finetune_seconds": {"fp32": f32["train_seconds"], "bf16": b16["train_seconds"]},
        # the two fine-tunes may run at the same time (--precision-stage), under the same load
        "finetune_speedup": round(seconds[0] / seconds[1], 3) if all(seconds) else None,
        "meets_targets": all(checks),
        "meta": {
            "command": command,
            "model": "embedded SmolLM2-135M-Instruct; LoRA r16 on all linear layers "
                     "(quickstart FINETUNE), started from the embedded model",
            "throughput": "one process, fp32 and bf16 interleaved; train: forward + backward "
                          "of quickstart batches (8 x demo-arithmetic); generation: greedy, "
                          f"{new_tokens} new tokens, 16 held-out harmful prompts",
            "results": "quickstart FINETUNE then EVAL (keyword judge), each under its own "
                       "model.precision; task loss = held-out NLL of reference answers",
            "targets": "train and generation speedup >= 1.5, task loss within 2%, bf16 "
                       "refusal rate inside fp32's 95% Wilson interval",
            "work_dir": str(work),
            "finetune_steps": steps or "all (quickstart recipe: 40)",
            "task_problems": 20 if steps else 50,
            "torch_threads": torch.get_num_threads(),
            "stages": "each stage is cached in work_dir (throughput.json, <precision>/finetune, "
                      "<precision>/eval) and reused by a rerun; they may run as separate "
                      "processes (--precision-stage)",
        },
    }


def merge_into(path: Path, value: dict) -> None:
    """Write `value` as the `precision` entry of the JSON file at `path`, keeping the rest."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    data["precision"] = value
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
