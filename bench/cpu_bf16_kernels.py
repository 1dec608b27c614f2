"""bf16 autocast against fp32 for the embedded model's linear layers on this CPU, one thread.

    .venv/bin/python bench/cpu_bf16_kernels.py [--repeats 20] [--step-repeats 3]

Whether `model.precision: bf16` pays on a CPU depends on the CPU: with native bf16 matrix
instructions (avx512_bf16 or AMX) oneDNN multiplies in bf16 (bench/results/overhead.json's
`precision` entry: ~2x training throughput on such a machine); without them torch emulates bf16
products, slowly. This bench times `F.linear` on SmolLM2-135M's three weight shapes (a 512-token
batch) in fp32 and under bf16 autocast, interleaved so that both see the same load, and adds
its row, keyed by the CPU's model name and bf16 flags, to bench/results/cpu_bf16_kernels.json
(rows from other machines are kept). `precision.resolve` warns when bf16 is asked for on a CPU
without those flags, citing these figures.

Each shape is also timed through `precision.fp32_gemms` (the bf16 product as a float32 GEMM of
the bf16 operands, what stayaligned does on a CPU without native bf16), and `--step-repeats`
times whole SmolLM2 training steps (forward and backward, 2 x 256 tokens) in fp32, under torch's
bf16 autocast, and under bf16 autocast with `fp32_gemms`, recording each arm's loss and the
relative distance between the arms' gradients (whether the float32-GEMM path computes what
torch's bf16 kernels compute, or something nearer fp32).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from stayaligned.precision import fp32_gemms

SHAPES = {"q/o_proj 576x576": (576, 576), "gate/up_proj 576->1536": (576, 1536),
          "down_proj 1536->576": (1536, 576)}
TOKENS = 512


def _time(fn, repeats: int) -> list[float]:
    fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def measure(repeats: int) -> dict:
    torch.manual_seed(0)
    rows = {}
    for name, (fan_in, fan_out) in SHAPES.items():
        x, w = torch.randn(TOKENS, fan_in), torch.randn(fan_out, fan_in)
        times = {"fp32": [], "bf16": [], "fp32_gemm": []}
        for i in range(repeats):  # interleaved, the order alternating
            for arm in list(times)[:: 1 if i % 2 == 0 else -1]:
                with fp32_gemms(arm == "fp32_gemm"), \
                        torch.autocast("cpu", dtype=torch.bfloat16, enabled=arm != "fp32"):
                    times[arm] += _time(lambda: F.linear(x, w), 1)
        fp32, bf16, emulated = (statistics.median(times[arm]) for arm in times)
        rows[name] = {"fp32_ms": round(fp32 * 1e3, 3), "bf16_autocast_ms": round(bf16 * 1e3, 3),
                      "bf16_over_fp32": round(bf16 / fp32, 2),
                      "bf16_fp32_gemm_ms": round(emulated * 1e3, 3),
                      "bf16_fp32_gemm_over_fp32": round(emulated / fp32, 2)}
    return rows


def measure_steps(repeats: int) -> dict:
    """Whole training steps of the embedded model in the three arms, interleaved."""
    from stayaligned.config import ModelConfig
    from stayaligned.models import load_model

    model, _ = load_model(ModelConfig(name="embedded", precision="fp32"))
    model.train()
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 256))
    times, losses, grads = {"fp32": [], "bf16": [], "fp32_gemm": []}, {}, {}

    def step(arm):
        model.zero_grad()
        with fp32_gemms(arm == "fp32_gemm"), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=arm != "fp32"):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        losses[arm] = round(float(loss.detach()), 5)
        grads[arm] = torch.cat([p.grad.flatten() for p in model.parameters()])

    for i in range(repeats):
        for arm in list(times)[:: 1 if i % 2 == 0 else -1]:
            times[arm] += _time(lambda: step(arm), 1)
            print(f"step {i} {arm}: {times[arm][-1]:.1f} s", flush=True)

    def apart(a, b):
        return round(float((grads[a] - grads[b]).norm() / grads[b].norm()), 5)

    fp32 = statistics.median(times["fp32"])
    return {"tokens": list(ids.shape), "repeats": repeats,
            "seconds": {arm: round(statistics.median(t), 2) for arm, t in times.items()},
            "over_fp32": {arm: round(statistics.median(t) / fp32, 2) for arm, t in times.items()},
            "loss": losses,
            "gradient_relative_distance": {"bf16 vs fp32": apart("bf16", "fp32"),
                                           "fp32_gemm vs fp32": apart("fp32_gemm", "fp32"),
                                           "fp32_gemm vs bf16": apart("fp32_gemm", "bf16")}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--step-repeats", type=int, default=3,
                        help="whole training steps per arm (0: skip; torch's bf16 step on a "
                             "CPU without native bf16 takes about two minutes)")
    parser.add_argument("--output", default="bench/results/cpu_bf16_kernels.json")
    args = parser.parse_args(argv)

    from stayaligned.precision import CPU_BF16_FLAGS, cpu_has_bf16

    torch.set_num_threads(1)
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown")
    flags = sorted({f for f in cpuinfo.split() if f.startswith(("avx512", "amx", "avx2"))})
    rows = measure(args.repeats)
    steps = measure_steps(args.step_repeats) if args.step_repeats else None
    ratios = [row["bf16_over_fp32"] for row in rows.values()]
    key = f"{model} | native bf16: {cpu_has_bf16()}"
    entry = {"cpu": model, "native_bf16": cpu_has_bf16(), "bf16_flags_checked": list(CPU_BF16_FLAGS),
             "vector_flags": flags, "threads": 1, "tokens": TOKENS, "repeats": args.repeats,
             "load_average": [round(x, 2) for x in os.getloadavg()],
             "torch": torch.__version__, "oneDNN_bf16": torch.ops.mkldnn._is_mkldnn_bf16_supported(),
             "shapes": rows, "bf16_over_fp32_median": statistics.median(ratios),
             "bf16_fp32_gemm_over_fp32_median": statistics.median(
                 row["bf16_fp32_gemm_over_fp32"] for row in rows.values()),
             **({"training_step": steps} if steps else {}),
             "date": time.strftime("%Y-%m-%d"),
             "command": "python bench/cpu_bf16_kernels.py " + " ".join(argv or sys.argv[1:])}
    path = Path(args.output)
    results = json.loads(path.read_text()) if path.is_file() else {}
    results[key] = entry
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(entry, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
