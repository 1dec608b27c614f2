"""Speed and memory of each post-hoc repair on the embedded model (SmolLM2-135M-Instruct).

    .venv/bin/python bench/repair.py [--work runs/bench-repair] [--output bench/results/repair.json]

Inputs, built once into --work (their training quality does not matter here, only their shapes):
an aligned model (a short full-weight `stayaligned align` of the embedded seed, so that every
linear layer differs from the base), a LoRA fine-tune of it on all seven linear projections
(a short `stayaligned train` sft), and that fine-tune merged into full weights. The base is the
embedded seed itself.

Each repair is one `stayaligned repair` run at a fixed strength (no sweep: a sweep adds one
evaluation per strength, which `bench/repair_effect.py` measures) in its own subprocess, so its
peak resident memory (ru_maxrss of that process) is not inherited from another. Reported per
repair: seconds (whole command: load, prepare, apply, save) and peak RSS, also relative to the
size of one model's weights file and net of a process that only imports the same libraries.
Targets (issue 13): merge/RESTA/SafeLoRA under 30 s and Safe Delta under 5 min on 2 CPU cores;
peak RSS at most 2.2x one model for merge and RESTA.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = [  # (name, method, fine-tune input, strength, extra args)
    ("merge (LoRA fine-tune)", "merge", "sft", 0.5, []),
    ("merge (full fine-tune)", "merge", "sft-full", 0.5, []),
    ("resta (LoRA fine-tune)", "resta", "sft", 1.0, []),
    ("resta + DARE p=0.3 (full fine-tune)", "resta", "sft-full", 1.0, ["--dare-p", "0.3"]),
    ("safelora (LoRA adapter out)", "safelora", "sft", 0.5, []),
    ("safe_delta (LoRA fine-tune)", "safe_delta", "sft", 0.1, []),
]
TARGETS = {"merge": 30, "resta": 30, "safelora": 30, "safe_delta": 300}
PROBE = ("import resource, sys, time; t0 = time.time(); import torch, transformers, peft; "
         "import stayaligned.repair.run; from stayaligned.cli import main; t1 = time.time(); "
         "code = main(sys.argv[1:]); t2 = time.time(); u = resource.getrusage(resource.RUSAGE_SELF); "
         "print('MAXRSS_KB', u.ru_maxrss); print('IMPORT_S', t1 - t0); print('RUN_S', t2 - t1); "
         "print('CPU_S', u.ru_utime + u.ru_stime); sys.exit(code)")
BASELINE = ("import resource, torch, transformers, peft, safetensors, stayaligned.repair.run; "
            "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")


def run(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return done


def probe(out: str, key: str) -> float:
    line = next(row for row in out.splitlines() if row.startswith(key + " "))
    return float(line.split()[1])


def maxrss_mb(out: str) -> float:
    return probe(out, "MAXRSS_KB") / 1024


def build_inputs(work: Path, env: dict) -> dict:
    """The aligned model, the LoRA sft and its merged copy (cached in `work`)."""
    py = [sys.executable, "-m", "stayaligned"]
    aligned, sft, full = work / "aligned", work / "sft", work / "sft-full"
    if not (aligned / "run.json").is_file() or "complete" not in (aligned / "run.json").read_text():
        run(py + ["align", "model.name=embedded", f"output_dir={aligned}", "lora.enabled=false",
                  "data=[{source: demo-safety, limit: 16}]", "optim.max_steps=2",
                  "optim.batch_size=4", "max_length=128", "--overwrite"], env)
    if not (sft / "run.json").is_file() or "complete" not in (sft / "run.json").read_text():
        run(py + ["train", f"model.name={aligned}", f"output_dir={sft}",
                  "data=[{source: demo-arithmetic, limit: 16}]", "optim.max_steps=2",
                  "optim.batch_size=4", "lora.r=16", "lora.alpha=32",
                  "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
                  "max_length=128", "--overwrite"], env)
    if not (full / "config.json").is_file():
        code = ("import sys; from stayaligned.config import ModelConfig; "
                "from stayaligned.models import load_model; "
                "m, t = load_model(ModelConfig(name=sys.argv[1])); "
                "m.save_pretrained(sys.argv[2]); t.save_pretrained(sys.argv[2])")
        run([sys.executable, "-c", code, str(sft), str(full)], env)
    return {"aligned": aligned, "sft": sft, "sft-full": full}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="runs/bench-repair")
    parser.add_argument("--output", default="bench/results/repair.json")
    parser.add_argument("--only", help="comma-separated methods")
    args = parser.parse_args(argv)
    work = Path(args.work).resolve()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    paths = build_inputs(work, env)
    weights = next(p for p in (work / "aligned" / d / "model.safetensors" for d in ("merged", "model"))
                   if p.is_file())
    model_mb = weights.stat().st_size / 2**20
    baseline = maxrss_mb(run([sys.executable, "-c", BASELINE], env).stdout)
    rows = []
    for name, method, ft, strength, extra in CASES:
        if args.only and method not in args.only.split(","):
            continue
        out = work / "out" / name.split(" ")[0] / ft
        cmd = [sys.executable, "-c", PROBE, "repair", "--model", str(paths[ft]), "--aligned",
               str(work / "aligned"), "--base", "embedded", "--method", method,
               "--strength", str(strength), "--output", str(out), *extra]
        started = time.time()
        done = run(cmd, env)
        seconds = time.time() - started
        rss = maxrss_mb(done.stdout)
        row = {"case": name, "method": method, "finetune": ft, "strength": strength,
               "seconds": round(seconds, 1),
               "import_seconds": round(probe(done.stdout, "IMPORT_S"), 1),
               "repair_seconds": round(probe(done.stdout, "RUN_S"), 1),
               "cpu_seconds": round(probe(done.stdout, "CPU_S"), 1),
               "peak_rss_mb": round(rss, 1),
               "peak_rss_x_model": round(rss / model_mb, 2),
               "peak_rss_above_imports_x_model": round((rss - baseline) / model_mb, 2),
               "target_seconds": TARGETS[method],
               "seconds_ok": seconds < TARGETS[method],
               "repair_seconds_ok": probe(done.stdout, "RUN_S") < TARGETS[method]}
        if method in ("merge", "resta"):
            row["rss_ok"] = rss / model_mb <= 2.2
        rows.append(row)
        print(json.dumps(row))
    if args.only:  # keep the other methods' rows of an earlier run
        from stayaligned.runfiles import read_json

        earlier = (read_json(Path(args.output)) or {}).get("rows", [])
        done = {r["case"] for r in rows}
        rows = [r for r in earlier if r["case"] not in done and r["method"] not in args.only] + rows
        rows.sort(key=lambda r: [c[0] for c in CASES].index(r["case"]))
    result = {
        "rows": rows,
        "meta": {"command": f"python bench/repair.py --work {args.work}",
                 "model": "embedded (SmolLM2-135M-Instruct, float32)",
                 "model_file_mb": round(model_mb, 1), "imports_only_rss_mb": round(baseline, 1),
                 "device": f"cpu ({os.cpu_count()} cores visible)",
                 "inputs": {k: str(v) for k, v in paths.items()},
                 "load_average_at_start": os.getloadavg(),
                 "notes": "seconds: the whole `stayaligned repair` command at one strength (no "
                          "validation sweep), wall clock, with Python start-up; import_seconds: "
                          "importing torch/transformers/peft/stayaligned; repair_seconds: the "
                          "command after imports (resolve + sha256 of the inputs, prepare, apply, "
                          "save); cpu_seconds: user + system CPU time of the process. Wall clock "
                          "is inflated when other jobs share the cores (load_average_at_start "
                          "against the core count); cpu_seconds is the less contended "
                          "measure. safe_delta includes its calibration pass over the 110 "
                          "demo-safety examples on the aligned model."},
    }
    from stayaligned.runfiles import write_json

    write_json(Path(args.output), result)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
