"""Numerical precision: which dtype the weights are held in, and which dtype the matrix products
run in. One config key, `model.precision`:

  fp32       float32 weights, float32 compute.
  bf16       float32 weights (the optimiser's master copy) with bfloat16 autocast: matrix
             products run in bf16, the weights, the optimiser state and every update stay
             float32 (what HF `bf16=True` on float32 weights and DeepSpeed's bf16 mode do).
  pure_bf16  bfloat16 weights and compute: half the weight memory, but an AdamW step below half
             a bf16 ulp of a weight rounds away (lr 2e-5 on |w| > ~0.008), so full fine-tuning
             is silently under-trained; opt-in only, with a warning.
  auto       CUDA: bf16 where the GPU computes in bf16 natively (Ampere and later: compute
             capability 8.0+, and ROCm), else fp32 (a T4 or V100 only emulates bf16: slow,
             and bitsandbytes' bf16 compute with it).
             CPU: bf16 where the CPU has native bf16 matrix instructions
             (avx512_bf16 or AMX) and CPU_AUTO_BF16 is True, else fp32. CPU_AUTO_BF16 records the
             measured decision (bench/overhead.py --precision; README "Overhead").

On a CPU without native bf16 (AVX2 only: AMD EPYC before Zen 4, older Xeons) torch's own bf16
matrix products are 8.5-9x slower than float32 per layer, 16x per training step
(bench/results/cpu_bf16_kernels.json). There a bf16 run computes each bf16 matrix product as a
float32 GEMM of the bf16 operands, rounded to bf16 (`Fp32Gemms`, recorded as `"gemm": "fp32"` in
run.json and metrics.json): the product of two bf16 numbers is exact in float32 and the native
kernels (avx512_bf16, AMX, oneDNN) also sum in float32 and round once, so this is their
arithmetic in another summation order, the same kind of difference as between two machines'
kernels. Everything else stays in torch's bf16 kernels, except CPU flash attention, which
likewise runs its float32 kernel on the bf16 q, k, v (`Fp32Gemms` says where that departs).
Large operands are converted into float32 buffers kept for the block (`Scratch`), not into fresh
tensors: the same bits, without an allocation of the model's size per decoding step.
Measured on an AVX2 AMD EPYC (bench/cpu_bf16_kernels.py): a SmolLM2 training step takes 1.15x
the float32 time, against 15.9x with torch's bf16 kernels, and its gradient is 2.6% (relative
norm) from torch's bf16 gradient, against 23% from fp32's.

`model.dtype` (older key) still works: left at `auto` it follows the precision; set to
bfloat16 / float16 with `precision: auto` it means pure low-precision weights as before
(pure_bf16), float32 means fp32. Setting both to disagreeing values is an error.

Autocast reaches the model in two ways: the trainer enters `autocast(precision)` around every
loss computation, and `load_model` tags the model with its autocast dtype, which generation
and held-out task loss read through `autocast_for(model)`.

Evaluation under `bf16` holds the weights of every `nn.Linear` in bf16 (`hold_for_autocast`,
from `load_model(..., inference=True)`): autocast casts them to bf16 for each product anyway,
so the outputs are the same bits at about half the weight memory (a 7B model: ~15 GB instead
of 28); embeddings, norms and a Linear weight tied to an embedding stay float32. Training,
depth and pair building keep float32 weights (SAP and depth compute in float32 on purpose), except
a LoRA run's frozen base, held the same way (`training.run._hold_frozen_base`).
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from torch.utils._python_dispatch import TorchDispatchMode

from stayaligned.config import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "pure_bf16")
# The measured decision for `auto` on a CPU with native bf16 (bench/results/overhead.json,
# "precision"): False keeps fp32 until the measurement meets the targets.
CPU_AUTO_BF16 = False
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
MODEL_ATTR = "_stayaligned_autocast"  # set on a loaded model: its autocast dtype or None
GEMM_ATTR = "_stayaligned_fp32_gemm"  # set on a loaded model: Precision.fp32_gemm


@dataclass(frozen=True)
class Precision:
    name: str  # fp32 | bf16 | pure_bf16 (| pure_float16 from an old model.dtype)
    device: str  # cuda | cpu
    weights: torch.dtype  # the dtype the model (and its master weights) is held in
    autocast: torch.dtype | None  # compute dtype under autocast, None: no autocast
    fp32_gemm: bool = False  # bf16 products as float32 GEMMs (a CPU without native bf16)

    def to_dict(self) -> dict:
        return {"precision": self.name, "device": self.device,
                "weights": str(self.weights).removeprefix("torch."),
                "autocast": str(self.autocast).removeprefix("torch.") if self.autocast else None,
                **({"gemm": "fp32"} if self.fp32_gemm else {})}


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU has native bf16 matrix instructions (Linux /proc/cpuinfo flags)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.is_file() else ""
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def cuda_has_bf16() -> bool:
    """True when the current CUDA or ROCm device computes in bf16 natively; torch's emulation
    on pre-Ampere GPUs (T4, V100) does not count."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def resolve(precision: str = "auto", dtype: str = "auto", device: str | None = None,
            cpu_bf16: bool | None = None, cuda_bf16: bool | None = None) -> Precision:
    """The precision that `model.precision` and `model.dtype` ask for on `device` (default:
    cuda when present, else cpu); `cpu_bf16` / `cuda_bf16` stand for the device's native bf16
    (default: asked of the machine)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if precision not in PRECISIONS:
        raise ConfigError(f"model.precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    name = _from_dtype(precision, dtype)
    cuda_native = device == "cuda" and (cuda_has_bf16() if cuda_bf16 is None else cuda_bf16)
    emulated = False
    if name == "auto":
        if device == "cuda":
            name = "bf16" if cuda_native else "fp32"
        else:
            native = cpu_has_bf16() if cpu_bf16 is None else cpu_bf16
            name = "bf16" if native and CPU_AUTO_BF16 else "fp32"
    elif name in ("bf16", "pure_bf16") and device == "cpu" and not (
            cpu_has_bf16() if cpu_bf16 is None else cpu_bf16):
        emulated = True
        warnings.warn(f"model.precision {name}: this CPU has no native bf16 matrix instructions "
                      f"({' or '.join(CPU_BF16_FLAGS)}); bf16 matrix products run as float32 "
                      "GEMMs of the bf16 operands (the native kernels' arithmetic; torch's own "
                      "bf16 kernels are 9-16x slower than fp32 here), about 1.15x the fp32 time "
                      "(bench/results/cpu_bf16_kernels.json). "
                      "Use model.precision fp32 (or auto, which picks it here) unless the run "
                      "must be bf16.")  # stacklevel 1: one warning a process, not one a caller
    elif name in ("bf16", "pure_bf16") and device == "cuda" and not cuda_native:
        warnings.warn(f"model.precision {name}: this GPU has no native bf16 (compute capability "
                      "below 8.0, e.g. T4 or V100); torch emulates it, slowly. Use "
                      "model.precision fp32 (or auto, which picks it here).")  # (as above)
    if name == "fp32":
        return Precision("fp32", device, torch.float32, None)
    if name == "bf16":
        return Precision("bf16", device, torch.float32, torch.bfloat16, emulated)
    low = torch.bfloat16 if name == "pure_bf16" else torch.float16
    return Precision(name, device, low, None, emulated and low == torch.bfloat16)


def compute_dtype(prec: Precision) -> torch.dtype:
    """The dtype low-precision kernels (QLoRA's 4-bit matmul) should compute in: bf16 where the
    precision computes in bf16, else float32."""
    return torch.bfloat16 if torch.bfloat16 in (prec.autocast, prec.weights) else torch.float32


def _from_dtype(precision: str, dtype: str) -> str:
    """Fold the older `model.dtype` key into a precision name."""
    if dtype == "auto":
        return precision
    implied = {"float32": "fp32", "bfloat16": "pure_bf16", "float16": "pure_float16"}.get(dtype)
    if implied is None:
        raise ConfigError(f"model.dtype {dtype!r}: use auto, float32 or bfloat16, or set "
                          f"model.precision ({', '.join(PRECISIONS)}) instead")
    if precision not in ("auto", implied):
        raise ConfigError(f"model.dtype {dtype!r} and model.precision {precision!r} disagree: "
                          "leave model.dtype at auto and set only model.precision")
    return implied


def warn_pure(prec: Precision, full_fine_tuning: bool) -> None:
    """Full fine-tuning in pure low precision loses small updates: say so. Pure float16 (the
    older `model.dtype: float16`) also trains without loss scaling, LoRA included: say that."""
    if prec.weights == torch.float16:
        warnings.warn(
            "model.dtype float16: the model trains in pure float16 with no loss scaling, so "
            "gradients below float16's range (~6e-8) flush to zero and large activations "
            "overflow to inf (the run then stops at its finiteness check). Use model.precision "
            "fp32 (what auto picks on a GPU without native bf16, such as a T4 or V100), bf16 on "
            "a GPU that has it, or lora.quantize=4bit for memory.", stacklevel=2)
    if prec.weights != torch.float32 and full_fine_tuning:
        warnings.warn(
            f"model.precision {prec.name}: full fine-tuning without float32 master weights; "
            "AdamW updates smaller than half a weight's ulp round away (lr 2e-5 moves almost "
            "no weight with |w| > 0.008). Use model.precision bf16 (float32 weights + bf16 "
            "autocast) unless memory forces this.", stacklevel=2)


@contextlib.contextmanager
def autocast(prec: Precision | None):
    """The autocast context for `prec` (a no-op context without autocast), with its bf16
    products as float32 GEMMs where `prec.fp32_gemm`."""
    if prec is None:
        yield
        return
    with _mixed(prec.fp32_gemm, prec.autocast, lambda: prec.device):
        yield


def tag(model, prec: Precision) -> None:
    """Record `prec`'s autocast dtype and GEMM path on a loaded model, for `autocast_for`."""
    setattr(model, MODEL_ATTR, prec.autocast)
    setattr(model, GEMM_ATTR, prec.fp32_gemm)


@contextlib.contextmanager
def autocast_for(model):
    """Inference under the autocast its loader tagged the model with (none for an untagged
    model). Parameters are float32 leaves, so autocast casts each weight once per context."""
    with _mixed(getattr(model, GEMM_ATTR, False), getattr(model, MODEL_ATTR, None),
                lambda: next(model.parameters()).device.type):
        yield


@contextlib.contextmanager
def _mixed(fp32_gemm: bool, dtype, device):
    """Float32 GEMMs where `fp32_gemm`, inside autocast to `dtype` on `device()` (a callable:
    read only when there is an autocast) where `dtype` is set."""
    with fp32_gemms(fp32_gemm):
        if dtype is None:
            yield
        else:
            with torch.autocast(device_type=device(), dtype=dtype):
                yield


_aten = torch.ops.aten
GEMMS = frozenset(getattr(_aten, name).default for name in (
    "mm", "addmm", "bmm", "baddbmm", "addbmm", "mv", "addmv", "dot", "vdot", "addr"))
# CPU flash attention and its backward: (op, how many leading arguments are bf16 tensors)
ATTENTION = {_aten._scaled_dot_product_flash_attention_for_cpu.default: 3,
             _aten._scaled_dot_product_flash_attention_for_cpu_backward.default: 5}
_active = threading.local()


def _bf16_cpu(tensors) -> bool:
    return bool(tensors) and all(isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16
                                 and t.device.type == "cpu" for t in tensors)


def _up(value):
    """A bf16 tensor as float32 (exact); anything else as it is."""
    if isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16:
        return value.float()
    return value


# A GEMM operand of at least this many elements is converted into a kept float32 buffer
# (`Scratch`) instead of a fresh tensor; the buffers of one `fp32_gemms` block hold at most
# SCRATCH_BYTES (least recently used dropped first).
SCRATCH_MIN_NUMEL = 1 << 20
SCRATCH_BYTES = 2 << 30


class Scratch:
    """Float32 buffers for the bf16 -> float32 conversions of large GEMM operands, reused
    across the products of one `fp32_gemms` block. A fresh float32 copy of each weight at each
    product is an allocation the size of the model per decoding step: glibc maps and unmaps
    every such block, so the kernel faults in and zeroes every page again (on the AVX2 EPYC,
    Qwen2.5-Coder-1.5B decoding a batch of 32 took 6.09 s per token step with fresh copies and
    3.18 s with kept buffers: `python bench/qwen_estimate.py --reuse-training`, before and
    after, bench/results/qwen_coder_estimate.json). The values are the same
    (an exact copy into a buffer of the same layout), so the products are the same bits. A
    buffer is keyed by the operand's position in the call and its contiguous shape, so two
    operands of one call never share one; it is free again once the product returns (the
    product's output is a new tensor, and autograd saves the bf16 operands, not these)."""

    def __init__(self, limit: int = SCRATCH_BYTES, min_numel: int = SCRATCH_MIN_NUMEL):
        self.limit, self.min_numel = limit, min_numel
        self.buffers: OrderedDict = OrderedDict()
        self.bytes = 0

    def up(self, value, slot: int):
        """`_up(value)`, through a kept buffer where `value` is a large bf16 tensor that is
        contiguous or a transposed contiguous matrix (a Linear weight as F.linear passes it)."""
        if not (isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16
                and value.numel() >= self.min_numel and value.numel() * 4 <= self.limit):
            return _up(value)
        if value.is_contiguous():
            base, flip = value, False
        elif value.dim() == 2 and value.t().is_contiguous():
            base, flip = value.t(), True
        else:
            return _up(value)
        key = (slot, tuple(base.shape))
        buffer = self.buffers.pop(key, None)
        if buffer is None:
            size = base.numel() * 4
            while self.buffers and self.bytes + size > self.limit:
                self.bytes -= self.buffers.popitem(last=False)[1].numel() * 4
            buffer = torch.empty(base.shape, dtype=torch.float32)
            self.bytes += size
        self.buffers[key] = buffer  # the most recently used last
        buffer.copy_(base)
        return buffer.t() if flip else buffer


class Fp32Gemms(TorchDispatchMode):
    """bf16 matrix products on the CPU as float32 GEMMs of the same bf16 operands, the result
    rounded to bf16 (module docstring). CPU flash attention with bf16 q, k, v likewise runs its
    float32 kernel on them: its output and gradients are rounded to bf16 as the bf16 kernel's
    are, its log-sum-exp stays float32 as the bf16 kernel's does; inside, the attention
    probabilities stay float32 where the bf16 kernel rounds them to bf16 before the product with
    v (a small departure, towards float32). Every other op, and any product with a non-bf16 or
    non-CPU operand, runs as it would. Below autograd, so the backward takes it too. Large
    operands are converted into kept buffers (`Scratch`), freed with the mode."""

    def __init__(self, scratch: Scratch | None = None):
        super().__init__()
        self.scratch = scratch if scratch is not None else Scratch()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in GEMMS:
            if _bf16_cpu([a for a in args if isinstance(a, torch.Tensor)]):
                up = self.scratch.up
                return func(*(up(a, i) for i, a in enumerate(args)), **kwargs).to(torch.bfloat16)
        elif func in ATTENTION and _bf16_cpu(args[:ATTENTION[func]]):
            out = func(*map(_up, args), **{k: _up(v) for k, v in kwargs.items()})
            if ATTENTION[func] == 3:  # forward: (output, logsumexp)
                return out[0].to(torch.bfloat16), out[1]
            return tuple(grad.to(torch.bfloat16) for grad in out)
        return func(*args, **kwargs)


@contextlib.contextmanager
def fp32_gemms(enabled: bool = True):
    """`Fp32Gemms` for the block where `enabled` (once per thread: nested blocks reuse it)."""
    if not enabled or getattr(_active, "on", False):
        yield
        return
    _active.on = True
    try:
        with Fp32Gemms():
            yield
    finally:
        _active.on = False


def hold_for_autocast(model, prec: Precision, frozen_only: bool = False) -> int:
    """Hold each float32 `nn.Linear` weight and bias of an inference model in `prec`'s autocast
    dtype; returns the bytes saved (0 without autocast or with low-precision weights).

    F.linear is on autocast's lower-precision list: under `autocast_for(model)` a float32 weight
    is cast (rounded to nearest) to bf16 for every product, exactly what the conversion does
    once, so every output is bit-identical at half the memory. Left in float32: everything that
    is not an nn.Linear (embeddings, norms: they feed the float32 residual stream), a weight an
    nn.Linear shares with another module (a head tied to the input embedding), and quantised
    layers (not float32). The model must then run under `autocast_for(model)`: a pass without it
    fails on mixed dtypes instead of computing in another precision. `frozen_only`: only the
    weights that do not train (a LoRA run's base layers; its adapters stay float32 for AdamW).
    """
    if prec.autocast is None or prec.weights != torch.float32:
        return 0
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    shared = {id(p) for m in model.modules() if not isinstance(m, torch.nn.Linear)
              for p in m.parameters(recurse=False)}
    saved = 0
    for module in linear:
        for name in ("weight", "bias"):
            param = getattr(module, name, None)
            if (param is None or param.dtype != torch.float32 or id(param) in shared
                    or (frozen_only and param.requires_grad)):
                continue
            param.data = param.data.to(prec.autocast)
            saved += param.numel() * (4 - param.element_size())
    return saved


def full_precision():
    """Leave any enclosing autocast: the block computes in the tensors' own dtypes."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.autocast(device_type=device, enabled=False)
