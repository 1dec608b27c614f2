"""The GPU half of issue 12: fp32 master weights and SAP's probe signal on a tiny model in bf16.

    .venv/bin/python bench/gpu_precision_check.py [--device cuda] [--out FILE.json]

Not run yet: no GPU was available when it was written (`--device cpu` runs the same checks on
the CPU, where bf16 rounding is the same arithmetic). On a tiny Llama with weights of a real
model's magnitude (std 0.02), with random tokens:

1. One AdamW step at lr 2e-5 in three precisions: fp32, bf16 autocast on fp32 master weights
   (stayaligned's `model.precision: bf16`, the CUDA default) and pure bf16 weights
   (`pure_bf16`). Reported: the share of the linear layers' weights the step changed. Expected:
   ~100% for fp32 and bf16 autocast, well under half for pure bf16.
2. SAP's probe signal b − a (a = ∇v L(θ + δ), b = ∇v L(θ), δ = ρ‖θ‖ĝ, ρ = 2e-5,
   with stayaligned's Probe / ascent_step / perturbed) against an fp32 reference: the chosen path
   (fp32 weights, signal passes without autocast), the same passes under bf16 autocast, and
   pure bf16 weights. Reported: cosine and sign agreement with the reference.
3. Training-step time (forward + backward) of fp32 against bf16 autocast, same process,
   interleaved.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from stayaligned.methods.sap_probe import Probe, ascent_step, perturbed

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama(device: str, hidden: int, layers: int, vocab: int = 2048):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=max(hidden // 64, 2),
                         num_key_value_heads=max(hidden // 128, 1), initializer_range=0.02,
                         max_position_embeddings=512)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device)


def autocast(device: str, on: bool):
    return torch.autocast(device_type=device, dtype=torch.bfloat16) if on else nullcontext()


def loss_of(model, batch, device, amp: bool):
    with autocast(device, amp):
        return model(input_ids=batch, labels=batch).loss


def adamw_moves(base, batch, device: str) -> dict:
    """Share of linear weights one AdamW step (lr 2e-5) changes, per precision."""
    out = {}
    for name, dtype, amp in (("fp32", torch.float32, False), ("bf16_autocast", torch.float32, True),
                             ("pure_bf16", torch.bfloat16, False)):
        model = copy.deepcopy(base).to(dtype)
        before = {k: v.detach().clone() for k, v in model.named_parameters()}
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.0)
        loss_of(model, batch, device, amp).backward()
        optimizer.step()
        keys = [k for k in before if any(f"{m}.weight" in k for m in LINEAR)]
        params = dict(model.named_parameters())
        moved = sum(int((params[k].detach() != before[k]).sum()) for k in keys)
        out[name] = round(moved / sum(before[k].numel() for k in keys), 4)
    return out


def probe_signal(model, batch, direction_batch, device: str, amp: bool) -> torch.Tensor:
    """b − a of SAP with the probe at layers 0 and 1 (v = 0), flattened."""
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(loss_of(model, direction_batch, device, amp), params)
    deltas, _ = ascent_step(params, list(grads), 2e-5)
    probe = Probe(model, (0, 1))
    probe.active = True

    def grad_v():
        return torch.autograd.grad(loss_of(model, batch, device, amp), probe.vectors)

    with perturbed(params, deltas, exact=True):
        a = grad_v()
    b = grad_v()
    probe.remove()
    return torch.cat([(bi - ai).float().reshape(-1) for ai, bi in zip(a, b)])


def compare(x: torch.Tensor, ref: torch.Tensor) -> dict:
    return {"cosine": round(float(torch.nn.functional.cosine_similarity(x, ref, dim=0)), 4),
            "sign_agreement": round(float((torch.sign(x) == torch.sign(ref)).float().mean()), 4)}


def sap_signal(base, batch, direction_batch, device: str) -> dict:
    ref = probe_signal(copy.deepcopy(base), batch, direction_batch, device, amp=False)
    chosen = ref  # stayaligned's path under bf16 precision: fp32 weights, no autocast in SAP
    under_amp = probe_signal(copy.deepcopy(base), batch, direction_batch, device, amp=True)
    pure = probe_signal(copy.deepcopy(base).to(torch.bfloat16), batch, direction_batch, device,
                        amp=False)
    return {"reference_norm": float(ref.norm()), "chosen_fp32_signal": compare(chosen, ref),
            "signal_under_bf16_autocast": compare(under_amp, ref),
            "pure_bf16": compare(pure, ref)}


def step_times(model, batch, device: str, repeats: int) -> dict:
    times = {"fp32": [], "bf16_autocast": []}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for rep in range(repeats + 1):
        for name, amp in (("fp32", False), ("bf16_autocast", True)):
            sync()
            start = time.perf_counter()
            loss_of(model, batch, device, amp).backward()
            model.zero_grad(set_to_none=True)
            sync()
            if rep:  # the first round is warm-up
                times[name].append(time.perf_counter() - start)
    fp32, amp = statistics.median(times["fp32"]), statistics.median(times["bf16_autocast"])
    return {"step_s_fp32": round(fp32, 4), "step_s_bf16_autocast": round(amp, 4),
            "speedup": round(fp32 / amp, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench/results/gpu_precision.json",
                        help="default: bench/results/gpu_precision.json")
    args = parser.parse_args()
    device = args.device
    base = tiny_llama(device, args.hidden, args.layers)
    gen = torch.Generator().manual_seed(1)
    batch = torch.randint(0, base.config.vocab_size, (8, 128), generator=gen).to(device)
    direction = torch.randint(0, base.config.vocab_size, (8, 128), generator=gen).to(device)
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({device})",
        "model": f"tiny Llama, hidden {args.hidden}, {args.layers} layers, init std 0.02",
        "adamw_lr2e-5_moved_share": adamw_moves(base, batch, device),
        "sap_probe_signal_vs_fp32": sap_signal(base, batch, direction, device),
        "train_step": step_times(base, batch, device, args.repeats),
        "command": "python bench/gpu_precision_check.py --device " + device,
    }
    print(json.dumps(result, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
