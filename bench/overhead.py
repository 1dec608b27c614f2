"""Training-speed and memory overhead of each method relative to plain sft.

    .venv/bin/python bench/overhead.py [--steps 8] [--warmup 2] [--out bench/results/overhead.json]
    .venv/bin/python bench/overhead.py --precision   # the fp32 vs CPU bf16 autocast entry
    .venv/bin/python bench/overhead.py --study configs/study/embedded_gsm8k_v2.yaml \
        --out bench/results/overhead_embedded_gsm8k_v2.json   # a study's own cells and regime

With --precision only the `precision` entry is measured and merged into the file (see
bench/overhead_precision.py); the per-method entries are kept as they are.

For each method alone (and a three-method stack) a real `stayaligned train` run on the embedded
model with LoRA is started in its own subprocess (so peak memory is not inherited from another
method); inside that process a Trainer callback times every optimiser step, counts the tokens
of its batch, and samples the resident memory (CUDA: max allocated) during the timed steps.
Reported per method: median tokens/s over the timed steps (after warm-up), time per token
relative to sft, peak memory during the timed steps and its ratio to sft's. One-off setup work
(STR's token mining, constrained SFT's reference pass, SAP's pair generation) is not timed: it
is reported separately as `setup_s`.

With --study CONFIG the cells are that study's training cells (repair cells have no training
steps), each trained exactly as the study trains it (its budget: full fine-tuning or LoRA,
precision, batch, max_length; the cell's methods, options and overrides; from the study's
aligned seed when it exists, else its seed model), entries keyed by cell name and the meta
naming the study, so that the study's report matches cells by name only in that case.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CELLS = {
    "sft": ["methods=[sft]"],
    "lookahead": ["methods=[lookahead]"],
    "ptst": ["methods=[ptst]"],
    "safety_mix": ["methods=[safety_mix]", "options={safety_mix: {n: 40}}"],
    "constrained_sft": ["methods=[constrained_sft]"],
    "str": ["methods=[str]", "options={str: {n_prompts: 32}}"],
    "sap": ["methods=[sap]", "options={sap: {pairs_limit: 16}}"],
    "stack": ["methods=[lookahead, ptst, str]", "options={str: {n_prompts: 32}}"],
}
COMMON = [
    "model.name=embedded", "data=[{source: demo-arithmetic, split: train, limit: 400}]",
    "lora.r=16", "lora.alpha=32", "lora.target_modules=[q_proj,v_proj]",
    "optim.batch_size=8", "optim.lr=1e-4", "max_length=256", "logging_steps=1000", "seed=0",
]


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _Probe:
    """Trainer callback + collator wrapper: step times, batch tokens, peak memory."""

    def __init__(self, warmup: int):
        self.warmup, self.tokens, self.times, self.peak = warmup, [], [], 0.0
        self._start = None
        self._sampling = False

    def wrap(self, collator):
        def collate(features):
            batch = collator(features)
            self.tokens.append(int(batch["attention_mask"].sum()))
            return batch
        return collate

    def callback(self):
        from transformers import TrainerCallback

        probe = self

        class Timer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                probe._start = time.perf_counter()
                if state.global_step == probe.warmup and not probe._sampling:
                    probe._sampling = True
                    threading.Thread(target=probe._sample, daemon=True).start()

            def on_step_end(self, args, state, control, **kwargs):
                probe.times.append(time.perf_counter() - probe._start)

            def on_train_end(self, args, state, control, **kwargs):
                probe._sampling = False

        return Timer()

    def _sample(self):
        while self._sampling:
            self.peak = max(self.peak, _rss_mb())
            time.sleep(0.02)


def study_configs(config: str, work: Path) -> dict[str, Path]:
    """Each training cell of the study at `config`, its TrainConfig written as JSON under
    `work` (seed 0, checkpoints off): cell name -> file."""
    from stayaligned.config import StudyConfig, load, to_dict
    from stayaligned.study import cell_train_config

    cfg = load(StudyConfig, config)
    out = Path(cfg.output_dir)
    files = {}
    for cell in cfg.cells:
        if cell.repair is not None:
            continue
        tcfg = to_dict(cell_train_config(cfg, out, cell.name, cell, 0))
        if not (Path(tcfg["model"]["name"]) / "run.json").is_file():
            tcfg["model"]["name"] = cfg.model.name  # the aligned seed is not here: same shapes
        tcfg.update(save_steps=10**6, logging_steps=10**6, report_to=["none"])
        files[cell.name] = work / f"{cell.name}.json"
        files[cell.name].write_text(json.dumps(tcfg))
    return files


def run_one(name: str, steps: int, warmup: int, out_dir: Path, config: Path | None = None) -> dict:
    """In this process: train `name` (from `config`, a TrainConfig file, when given) for
    warmup + steps steps and measure."""
    import torch

    from stayaligned.config import TrainConfig, load
    from stayaligned.training import run as run_mod
    from stayaligned.training.trainer import StayTrainer

    probe = _Probe(warmup)
    original_init = StayTrainer.__init__

    def patched_init(self, *args, **kwargs):
        kwargs["data_collator"] = probe.wrap(kwargs["data_collator"])
        original_init(self, *args, **kwargs)
        self.add_callback(probe.callback())

    StayTrainer.__init__ = patched_init
    overrides = [f"optim.max_steps={warmup + steps}", f"output_dir={out_dir / name}"]
    cfg = (load(TrainConfig, str(config), overrides) if config is not None
           else load(TrainConfig, None, [*COMMON, *CELLS[name], *overrides]))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    run_mod.train(cfg, overwrite=True)
    total = time.perf_counter() - started
    timed = list(zip(probe.tokens, probe.times))[warmup:]
    rates = [tokens / seconds for tokens, seconds in timed]
    peak = (torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else probe.peak)
    return {
        "tokens_per_s": round(statistics.median(rates), 1),
        "step_s_median": round(statistics.median(s for _, s in timed), 3),
        "tokens_per_step_mean": round(statistics.mean(t for t, _ in timed), 1),
        "peak_mem_mb": round(peak, 1),
        "setup_s": round(total - sum(probe.times), 1),
        "timed_steps": len(timed),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--methods", nargs="*", default=list(CELLS))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "overhead.json"))
    parser.add_argument("--precision", action="store_true",
                        help="only the fp32 vs CPU bf16 entry (bench/overhead_precision.py)")
    parser.add_argument("--repeats", type=int, default=6, help="--precision: interleaved repeats")
    parser.add_argument("--precision-work", default=str(ROOT / "runs" / "bench-precision"),
                        help="--precision: where the two quickstart fine-tunes are kept")
    parser.add_argument("--fp32-run", default=str(ROOT / "runs" / "quickstart"),
                        help="--precision: a finished `stayaligned quickstart` (fp32 on CPU)")
    parser.add_argument("--bf16-run", default=None,
                        help="--precision: a finished quickstart with model.precision=bf16 "
                             "(default: run one in --precision-work/bf16)")
    parser.add_argument("--precision-stage", choices=["throughput", "bf16"],
                        help="--precision: run (and cache) only this stage")
    parser.add_argument("--gen-tokens", type=int, default=80,
                        help="--precision: new tokens per generation in the throughput part")
    parser.add_argument("--gen-batch", type=int, default=16,
                        help="--precision: prompts per generation batch in the throughput part")
    parser.add_argument("--collect", action="store_true",
                        help="--precision: write the entry from finished stages only")
    parser.add_argument("--study", help="measure this study config's training cells, as it "
                        "trains them (keyed by cell name)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args.steps, args.warmup, Path(args.work),
                                             args.config and Path(args.config))))
        return
    if args.precision:
        sys.path.insert(0, str(Path(__file__).parent))
        import overhead_precision

        work = Path(args.precision_work)
        command = "python bench/overhead.py " + " ".join(sys.argv[1:])
        if args.precision_stage == "throughput":
            print(json.dumps(overhead_precision.cached_throughput(
                args.repeats, work, args.gen_tokens, args.gen_batch)))
            return
        if args.precision_stage:
            overhead_precision.results(Path(args.fp32_run), work,
                                       bf16_run=args.bf16_run and Path(args.bf16_run))
            return
        value = overhead_precision.entry(args.repeats, work, Path(args.fp32_run), command,
                                         args.gen_tokens, compute=not args.collect,
                                         gen_batch=args.gen_batch,
                                         bf16_run=args.bf16_run and Path(args.bf16_run))
        overhead_precision.merge_into(Path(args.out), value)
        shown = {k: v for k, v in value.items() if k != "sft_loss_curves"}
        print(f"[overhead] precision: {json.dumps(shown)}")
        return
    results = {}
    with tempfile.TemporaryDirectory() as work:
        configs = study_configs(args.study, Path(work)) if args.study else {}
        for name in configs or args.methods:
            print(f"[overhead] {name}", flush=True)
            config = ["--config", str(configs[name])] if configs else []
            proc = subprocess.run(
                [sys.executable, __file__, "--one", name, "--steps", str(args.steps),
                 "--warmup", str(args.warmup), "--work", work, *config],
                capture_output=True, text=True)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"{name} failed (exit {proc.returncode})")
            results[name] = json.loads(lines[-1][len("RESULT "):])
            print(f"[overhead] {name}: {results[name]}", flush=True)
    write(results, args)


def study_meta(config: str) -> dict:
    """The meta of a --study measurement: the study's name (what the report matches cells by)
    and its training regime in words."""
    from stayaligned.config import StudyConfig, load

    cfg = load(StudyConfig, config)
    train = cfg.train or {}
    lora, optim = train.get("lora") or {}, train.get("optim") or {}
    return {"study": cfg.name, "study_config": config,
            "model": f"{cfg.model.name} ({cfg.model.precision}), "
                     + ("full fine-tuning" if lora.get("enabled") is False else "LoRA"),
            "data": f"the study's training data, batch {optim.get('batch_size', 8)}, max_length "
                    f"{train.get('max_length', 'default')}", "stack": None}


def write(results: dict, args) -> None:
    import torch

    base = results.get("sft")
    for entry in results.values():
        if base:
            entry["time_ratio"] = round(base["tokens_per_s"] / entry["tokens_per_s"], 3)
            # per optimiser step (a method that adds or drops tokens costs that too): what a
            # study with the same number of steps pays
            entry["step_ratio"] = round(entry["step_s_median"] / base["step_s_median"], 3)
            entry["mem_ratio"] = round(entry["peak_mem_mb"] / base["peak_mem_mb"], 3)
    results["meta"] = {
        "command": "python bench/overhead.py " + " ".join(sys.argv[1:]),
        "model": "embedded SmolLM2-135M-Instruct, LoRA r16 on q_proj/v_proj",
        "data": "demo-arithmetic train (400), batch 8, max_length 256",
        "device": "cuda" if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
        "steps": {"warmup": args.warmup, "timed": args.steps},
        "memory": "peak resident set size during the timed steps (CPU) / max allocated (CUDA)",
        "stack": CELLS["stack"][0],
        **(study_meta(args.study) if args.study else {}),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.is_file() and "precision" in json.loads(out.read_text()):
        results["precision"] = json.loads(out.read_text())["precision"]  # --precision's entry
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"[overhead] wrote {out}")


if __name__ == "__main__":
    main()
