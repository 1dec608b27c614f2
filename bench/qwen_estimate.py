"""Machine time of the Qwen2.5-Coder-1.5B study, from a few measured steps on the real model.

    .venv/bin/python bench/qwen_estimate.py [--config configs/study/qwen_coder_gsm8k.yaml]
        [--steps 3] [--out bench/results/qwen_coder_estimate.json]

Measured (in this process, on the study's own settings):
- seconds per LoRA training step of the sft cell (its train block: batch 8, gradient
  checkpointing), the first step dropped as warm-up when several run, and the peak resident
  memory;
- seconds per generated batch: AdvBench prompts with the study's batch size and answer length,
  and GSM8K test prompts (timed for `--gsm8k-tokens` new tokens, scaled to the benchmark's
  length, a worst case: greedy answers often stop earlier);
- seconds per batch of the teacher-forced passes (task loss; depth, two passes per batch).

The per-stage estimate multiplies these by the study's sizes: the seed's evaluation, each cell's
training (sft's step time times the method's time ratio measured on the embedded model,
bench/results/overhead.json, plus its setup), evaluation and depth. Nothing is read from the
evaluation sets beyond prompt lengths.
"""

from __future__ import annotations

import argparse
import gc
import os
import json
import math
import resource
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from stayaligned.config import GenerationConfig, StudyConfig, load  # noqa: E402
from stayaligned.runfiles import read_json, write_json  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from models import wait_for_memory  # noqa: E402

OVERHEAD = ROOT / "bench" / "results" / "overhead.json"


def cpu_clock() -> float:
    """Seconds the work would take on this machine's cores alone: the process's CPU time
    divided by torch's thread count. The machine is shared while this runs (load average far
    above the 2 cores), so wall-clock time would measure the other jobs; this assumes the
    threads scale perfectly (a slight underestimate)."""
    import torch

    return time.process_time() / torch.get_num_threads()


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ---------------------------------------------------------------- measurements


def time_training(cfg: StudyConfig, steps: int) -> dict:
    """Seconds per optimiser step of the sft cell (the first dropped as warm-up when there are
    several), tokens per step, peak memory."""
    from stayaligned.study import cell_ids, cell_train_config
    from stayaligned.training import trainer as trainer_module
    from stayaligned.training.run import train

    run_id, cell, seed = next(c for c in cell_ids(cfg) if c[1].name == "sft")
    times, tokens = [], []
    original = trainer_module.StayTrainer.training_step

    def timed(self, model, inputs, num_items_in_batch=None):
        start = cpu_clock()
        loss = original(self, model, inputs, num_items_in_batch)
        times.append(cpu_clock() - start)
        tokens.append(int(inputs["attention_mask"].sum()))
        return loss

    trainer_module.StayTrainer.training_step = timed
    try:
        with tempfile.TemporaryDirectory() as tmp:
            base = cell_train_config(cfg, Path(tmp), run_id, cell, seed)
            train(replace(base, optim=replace(base.optim, max_steps=steps), save_steps=0,
                          output_dir=str(Path(tmp) / "run")))
    finally:
        trainer_module.StayTrainer.training_step = original
    timed_steps = times[1:] or times
    return {"step_s": round(sum(timed_steps) / len(timed_steps), 2),
            "step_s_all": [round(t, 2) for t in times],
            "tokens_per_step": tokens, "batch_size": base.optim.batch_size,
            "gradient_checkpointing": base.gradient_checkpointing,
            "peak_rss_gb": round(peak_rss_gb(), 2)}


def _prompts(cfg: StudyConfig, bench_name: str, n: int, tokenizer) -> list[str]:
    from stayaligned.config import BenchmarkConfig, EvalConfig, build
    from stayaligned.evaluation.run import benchmark_examples
    from stayaligned.templates.library import get_template
    from stayaligned.templates.render import prompt_text

    ecfg = build(EvalConfig, cfg.eval)
    bench = next(b for b in ecfg.benchmarks if b.name == bench_name)
    assert isinstance(bench, BenchmarkConfig)
    examples = benchmark_examples(bench, cfg.data_dir)[:n]
    return [prompt_text(tokenizer, ex, get_template("native")) for ex in examples]


def time_inference(cfg: StudyConfig, gsm8k_tokens: int, save) -> dict:
    """Seconds per generated batch (AdvBench, GSM8K) and per teacher-forced batch."""
    import torch

    from stayaligned.config import EvalConfig, build
    from stayaligned.evaluation.generation import generate
    from stayaligned.models import load_model
    from stayaligned.precision import autocast_for
    from stayaligned.templates.library import get_template

    ecfg = build(EvalConfig, cfg.eval)
    gen = ecfg.generation
    start = cpu_clock()
    model, tokenizer = load_model(cfg.model, inference=True)  # the study's precision, as eval
    native = get_template("native")
    out = {"batch_size": gen.batch_size, "load_s": round(cpu_clock() - start, 1)}
    for name, tokens, label in (("advbench", gen.max_new_tokens, "advbench"),
                                ("gsm8k", gsm8k_tokens, "gsm8k")):
        prompts = _prompts(cfg, name, gen.batch_size, tokenizer)
        start = cpu_clock()  # the prompt pass alone: the same batch with one new token
        generate(model, tokenizer, prompts, native,
                 GenerationConfig(max_new_tokens=1, batch_size=gen.batch_size))
        out[f"{label}_prefill_s"] = round(cpu_clock() - start, 1)
        start = cpu_clock()
        texts = generate(model, tokenizer, prompts, native,
                         GenerationConfig(max_new_tokens=tokens, batch_size=gen.batch_size))
        out[f"{label}_batch_s"] = round(cpu_clock() - start, 1)
        out[f"{label}_new_tokens"] = tokens
        out[f"{label}_example"] = texts[0][:160]
        save(out)
    prompts = _prompts(cfg, "gsm8k", 8, tokenizer)
    ids = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    width = 300  # a GSM8K prompt with its reference solution
    batch = torch.cat([ids["input_ids"], ids["input_ids"]], 1)[:, :width]
    start = cpu_clock()
    with torch.no_grad(), autocast_for(model):  # the study's precision, as task_loss.py
        model(input_ids=batch).logits.float().log_softmax(-1)
    out["forward_batch8_s"] = round(cpu_clock() - start, 1)
    out["forward_width"] = int(batch.shape[1])
    out["peak_rss_gb"] = round(peak_rss_gb(), 2)
    del model
    gc.collect()
    return out


# ---------------------------------------------------------------- the estimate


def _method_ratio(methods: tuple[str, ...], overhead: dict) -> tuple[float, float]:
    """(time per step relative to sft, setup seconds on the embedded model) for a cell."""
    key = methods[0] if len(methods) == 1 else "stack"
    entry = overhead.get(key) or {}
    return entry.get("time_ratio", 1.0), entry.get("setup_s", 0.0)


def batch_seconds(inf: dict, label: str, tokens: int) -> float:
    """One generated batch of `tokens` new tokens: the prompt pass (the batch timed with one new
    token) plus the timed batch's per-token rest, scaled (a worst case: every answer runs to
    the limit). Without a prompt-pass time (measurements before it was taken) the timed batch
    is scaled linearly, which over-estimates: it scales the prompt pass too."""
    timed, n = inf[f"{label}_batch_s"], inf[f"{label}_new_tokens"]
    prefill = inf.get(f"{label}_prefill_s")
    if prefill is None or n <= 1:
        return timed * tokens / n
    return prefill + (timed - prefill) / (n - 1) * (tokens - 1)


def eval_seconds(cfg: StudyConfig, inf: dict) -> dict:
    """One model's evaluation under one template: generation batches per benchmark, plus task
    loss."""
    from stayaligned.config import EvalConfig, build

    ecfg = build(EvalConfig, cfg.eval)
    size = inf["batch_size"]
    parts = {}
    for bench in ecfg.benchmarks:
        n = bench.limit or 100
        variants = max(len(bench.prefill_k), 1)
        batches = variants * math.ceil(n / size)
        tokens = bench.max_new_tokens or ecfg.generation.max_new_tokens
        if bench.kind == "task":
            per = batch_seconds(inf, "gsm8k", tokens)
            loss = math.ceil(n / size) * inf["forward_batch8_s"] * size / 8 if bench.task_loss else 0
        else:
            per, loss = batch_seconds(inf, "advbench", tokens), 0
        parts[bench.name] = round(batches * per + loss)
    parts["total"] = sum(parts.values())
    return parts


def repair_seconds(cfg: StudyConfig, cell, inf: dict, load_s: float) -> int:
    """A repair cell's sweep: the aligned model and each strength evaluated on the validation
    set (the default validation's harmful requests, 48 tokens, plus the task hold-out: 8 tokens
    and its task loss), each a model load, each strength's weights also written once (counted
    as another load)."""
    from stayaligned.data.sources import load_source
    from stayaligned.repair import repairs
    from stayaligned.repair.sweep import DEFAULT_VALIDATION

    size = inf["batch_size"]
    harmful = DEFAULT_VALIDATION["benchmarks"][0]
    n = len(load_source(harmful["source"], split=harmful["split"], data_dir=cfg.data_dir))
    holdout = cell.repair.task_holdout
    per_eval = (math.ceil(n / size) * inf["advbench_batch_s"]
                + math.ceil(holdout / size) * batch_seconds(inf, "gsm8k", 8)
                + math.ceil(holdout / size) * inf["forward_batch8_s"] * size / 8 + load_s)
    strengths = len(cell.repair.strengths or repairs()[cell.repair.method].defaults)
    return round((strengths + 1) * per_eval + strengths * load_s)


def estimate(cfg: StudyConfig, train_t: dict, inf: dict, load_s: float) -> dict:
    """Seconds per stage; each model is evaluated under its own templates (the study's
    eval_templates, narrowed per cell by cells[].eval_templates), a stage (and a model load)
    per template; a repair cell sweeps instead of training (`repair_seconds`)."""
    from stayaligned.grid import cell_views, eval_views
    from stayaligned.study import cell_ids, cell_train_config

    overhead = read_json(OVERHEAD) or {}
    # this model's step time over the embedded model's (bench/results/overhead.json)
    scale = train_t["step_s"] / (overhead.get("sft", {}).get("step_s_median") or train_t["step_s"])
    one_eval = eval_seconds(cfg, inf)
    stages = {f"seed/{folder}": one_eval["total"] + load_s
              for _, folder in eval_views(cfg.eval_templates)}
    for run_id, cell, seed in cell_ids(cfg):
        if cell.model_of is not None:  # a reading of another cell's model: no stages
            continue
        if cell.repair is not None:
            stages[f"cells/{run_id}/repair"] = repair_seconds(cfg, cell, inf, load_s)
        else:
            tcfg = cell_train_config(cfg, Path(tempfile.gettempdir()), run_id, cell, seed)
            steps = tcfg.optim.max_steps
            ratio, setup = _method_ratio(tuple(cell.methods), overhead)
            setup_s = setup * scale  # STR's mining etc., scaled like a training step
            stages[f"cells/{run_id}/train"] = round(steps * train_t["step_s"] * ratio + setup_s
                                                    + load_s)
        for _, folder in cell_views(cfg, cell):
            stages[f"cells/{run_id}/{folder}"] = one_eval["total"] + load_s
        if cfg.depth.enabled:
            batches = math.ceil(cfg.depth.limit / 8)
            stages[f"cells/{run_id}/depth"] = round(2 * batches * inf["forward_batch8_s"] + load_s)
    total = sum(stages.values())
    return {"stages_s": stages, "eval_per_model_s": one_eval, "total_s": round(total),
            "total_h": round(total / 3600, 2)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs/study/qwen_coder_gsm8k.yaml"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--gsm8k-tokens", type=int, default=64)
    parser.add_argument("--out", default=str(ROOT / "bench/results/qwen_coder_estimate.json"))
    parser.add_argument("--min-free-gb", type=float, default=16.0)
    parser.add_argument("--wait-s", type=float, default=1800.0)
    parser.add_argument("--reuse-training", action="store_true",
                        help="keep --out's training measurement; measure inference only")
    parser.add_argument("--project", action="store_true",
                        help="measure nothing: redo the estimate from --out's measurements for "
                             "the config as it is now (cells edited since they were measured)")
    args = parser.parse_args(argv)
    cfg = load(StudyConfig, args.config)
    out = Path(args.out)
    if args.project:
        result = read_json(out) or {}
        if not {"training", "inference"} <= set(result):
            raise SystemExit(f"{out}: no measurements to project from; run without --project")
        result["estimate"] = estimate(cfg, result["training"], result["inference"],
                                      result["inference"]["load_s"])
        result["meta"]["projected_again"] = (f"python bench/qwen_estimate.py --project (config "
                                             f"{Path(args.config).relative_to(ROOT)})")
        write_json(out, result)
        print(json.dumps(result["estimate"], indent=2))
        return
    # the training step holds the 7 GB of weights, activations and logits: ~14 GB; on a shared
    # machine with less free, the kernel kills this process (or a neighbour)
    wait_for_memory(args.min_free_gb, args.wait_s, "a LoRA step of the 1.5B model")
    result = {"model": cfg.model.name, "meta": {
            "command": f"python bench/qwen_estimate.py --steps {args.steps} "
                       f"--gsm8k-tokens {args.gsm8k_tokens}"
                       + (" --reuse-training" if args.reuse_training else ""),
            "study": f"stayaligned study {Path(args.config).relative_to(ROOT)}",
            "device": f"cpu ({os.cpu_count()} cores; the clock below discounts other jobs)",
            "clock": "process CPU seconds / torch threads (see cpu_clock): the time on 2 "
                     "dedicated cores, not the wall time of a shared machine",
            "torch_threads": torch_threads(),
            "notes": "train stage = max_steps x sft step time x the method's time ratio on the "
                     "embedded model (bench/results/overhead.json) + setup + model load; eval = "
                     "generation batches x (the batch's prompt pass, timed apart, + its "
                     "per-token time x the benchmark's max_new_tokens: a worst case, every "
                     "answer running to the limit) + task loss passes, per "
                     "eval template of the model (the config's eval_templates, narrowed per "
                     "cell); depth = 2 passes per batch of 8",
    }}
    # each measurement is written as soon as it is done (a shared machine may not finish)
    earlier = (read_json(out) or {}).get("training") if args.reuse_training else None
    result["training"] = earlier or time_training(cfg, args.steps)
    if earlier:
        result["meta"]["training_from"] = "an earlier run of this script (--reuse-training)"
    write_json(out, result)
    result["inference"] = time_inference(cfg, args.gsm8k_tokens, lambda inf: write_json(
        out, {**result, "inference": inf}))
    result["estimate"] = estimate(cfg, result["training"], result["inference"],
                                  result["inference"]["load_s"])
    write_json(out, result)
    print(json.dumps(result["estimate"], indent=2))


if __name__ == "__main__":
    main()
