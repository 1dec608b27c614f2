"""Precision (stayaligned/precision.py): resolving `model.precision` / `model.dtype`, the bug
class of pure bf16 (AdamW steps of lr 2e-5 round away on weights of realistic magnitude while
fp32 master weights under bf16 autocast keep them), SAP's probe signal (b − a) under bf16
autocast against an fp32 run, and autocast reaching training, generation and the records."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from stayaligned.config import ConfigError, ModelConfig, TrainConfig, load
from torch.utils._python_dispatch import TorchDispatchMode

from stayaligned.precision import ATTENTION, GEMMS, cpu_has_bf16, fp32_gemms, resolve

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_resolve_names_devices_and_the_older_dtype_key():
    assert resolve("fp32", device="cpu").to_dict() == {
        "precision": "fp32", "device": "cpu", "weights": "float32", "autocast": None}
    bf16 = resolve("bf16", device="cpu")
    assert (bf16.weights, bf16.autocast) == (torch.float32, torch.bfloat16)
    # fp32 master weights + bf16 autocast on a CUDA GPU with native bf16
    cuda = resolve("auto", device="cuda", cuda_bf16=True)
    assert (cuda.name, cuda.weights, cuda.autocast) == ("bf16", torch.float32, torch.bfloat16)
    assert resolve("pure_bf16", device="cuda", cuda_bf16=True).weights == torch.bfloat16
    assert resolve("auto", device="cpu", cpu_bf16=False).name == "fp32"
    # the older key: dtype bfloat16 meant bf16 weights and compute
    assert resolve("auto", "bfloat16", device="cpu").name == "pure_bf16"
    assert resolve("fp32", "float32", device="cpu").name == "fp32"
    with pytest.raises(ConfigError, match="model.dtype 'bfloat16' and model.precision 'fp32'"):
        resolve("fp32", "bfloat16", device="cpu")
    with pytest.raises(ConfigError, match="model.precision 'half': choose one of"):
        resolve("half", device="cpu")


def test_cpu_bf16_flags_and_the_measured_cpu_default(monkeypatch):
    import stayaligned.precision as precision

    assert cpu_has_bf16("flags\t\t: fpu sse avx512f avx512_bf16 amx_tile\n")
    assert cpu_has_bf16("flags : fpu amx_bf16\n")
    assert not cpu_has_bf16("flags : fpu sse avx2 avx512f\n")
    monkeypatch.setattr(precision, "CPU_AUTO_BF16", True)
    assert resolve("auto", device="cpu", cpu_bf16=True).name == "bf16"
    assert resolve("auto", device="cpu", cpu_bf16=False).name == "fp32"
    monkeypatch.setattr(precision, "CPU_AUTO_BF16", False)
    assert resolve("auto", device="cpu", cpu_bf16=True).name == "fp32"


def test_bf16_asked_for_on_a_cpu_that_emulates_it_is_kept_with_a_warning(monkeypatch):
    """Without avx512_bf16 / AMX torch emulates bf16 products, 8.5-16x slower than fp32 (measured
    on a 2026-12 AVX2 machine): an explicit bf16 is honoured (a study must not change precision
    between machines) but says so, and names the fix; a CPU with the flags stays quiet."""
    import stayaligned.precision as precision

    for name in ("bf16", "pure_bf16"):
        with pytest.warns(UserWarning, match="no native bf16 matrix instructions.*"
                                             "model.precision fp32"):
            assert resolve(name, device="cpu", cpu_bf16=False).name == name
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda cpuinfo=None: False)
    with pytest.warns(UserWarning, match="avx512_bf16 or amx_bf16"):
        resolve("bf16", device="cpu")  # asked of the machine when not given
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve("fp32", device="cpu")
        resolve("auto", device="cpu")
        monkeypatch.setattr(precision, "cpu_has_bf16", lambda cpuinfo=None: True)
        resolve("bf16", device="cpu")


def test_pure_float16_training_warns_that_it_has_no_loss_scaling_lora_included():
    """The older model.dtype float16 trains in pure fp16 without a loss scaler: a LoRA run is
    warned too (its base's activations and their gradients are fp16), and pure bf16 LoRA is
    not (bf16 has float32's range)."""
    from stayaligned.precision import warn_pure

    fp16 = resolve("auto", "float16", device="cuda", cuda_bf16=False)
    for full in (True, False):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*master weights")  # full FT's own
            with pytest.warns(UserWarning, match="float16.*no loss scaling.*precision fp32"):
                warn_pure(fp16, full_fine_tuning=full)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_pure(resolve("pure_bf16", device="cuda", cuda_bf16=True), full_fine_tuning=False)


def test_the_emulation_warning_is_printed_once_a_process():
    """Training, its data check and its evaluation each resolve the precision: under Python's
    default filter the warning must print once a process, not once a calling line."""
    def from_another_caller():
        return resolve("bf16", device="cpu", cpu_bf16=False)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        resolve("bf16", device="cpu", cpu_bf16=False)
        from_another_caller()
        resolve("pure_bf16", device="cpu", cpu_bf16=False)  # another model.precision: its own
    assert [str(w.message).split(":")[0] for w in caught
            if "no native bf16" in str(w.message)] == ["model.precision bf16",
                                                      "model.precision pure_bf16"]


def test_bf16_products_take_float32_gemms_only_on_a_cpu_that_emulates_bf16():
    """Where torch would emulate bf16 (no avx512_bf16 / AMX), bf16 and pure_bf16 compute their
    products as float32 GEMMs (`Fp32Gemms`) and record it; a native CPU, a GPU, fp32 and auto
    keep torch's kernels and the record they had."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        emulated = [resolve(name, device="cpu", cpu_bf16=False) for name in ("bf16", "pure_bf16")]
        native = [resolve("bf16", device="cpu", cpu_bf16=True),
                  resolve("pure_bf16", device="cpu", cpu_bf16=True),
                  resolve("fp32", device="cpu", cpu_bf16=False),
                  resolve("auto", device="cpu", cpu_bf16=False),
                  resolve("bf16", device="cuda", cuda_bf16=True)]
    assert [p.fp32_gemm for p in emulated] == [True, True]
    assert [p.to_dict()["gemm"] for p in emulated] == ["fp32", "fp32"]
    assert not any(p.fp32_gemm or "gemm" in p.to_dict() for p in native)


class GemmLog(TorchDispatchMode):
    """Records the dtypes of every matrix product that reaches it (entered outside
    `Fp32Gemms`, it sees the products that mode lets through or makes)."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in GEMMS or func in ATTENTION:
            self.dtypes.append(next(a for a in args if isinstance(a, torch.Tensor)).dtype)
        return func(*args, **(kwargs or {}))


def test_fp32_gemms_compute_the_bf16_product_rounded_once():
    """Each bf16 product under `fp32_gemms` runs as a float32 GEMM (the log behind it sees only
    float32) and returns bf16: the exact product, summed in float32 and rounded once, which
    the correctly rounded float64 result matches in all but rare near-ties (float32 sums);
    float32 products are untouched, bit for bit; nesting does not convert twice."""
    torch.manual_seed(0)
    bf = torch.bfloat16
    a, b, c = (torch.randn(64, 300).to(bf), torch.randn(300, 48).to(bf), torch.randn(48).to(bf))
    a3, b3, c3 = a.view(4, 16, 300), torch.randn(4, 300, 48).to(bf), torch.randn(4, 16, 48).to(bf)
    v = torch.randn(300).to(bf)
    cases = {
        "mm": (lambda: a @ b, lambda: a.double() @ b.double()),
        "addmm": (lambda: torch.addmm(c, a, b, beta=0.5, alpha=2.0),
                  lambda: 0.5 * c.double() + 2.0 * (a.double() @ b.double())),
        "bmm": (lambda: torch.bmm(a3, b3), lambda: a3.double() @ b3.double()),
        "baddbmm": (lambda: torch.baddbmm(c3, a3, b3), lambda: c3.double() + a3.double() @ b3.double()),
        "mv": (lambda: a @ v, lambda: a.double() @ v.double()),
        "linear": (lambda: torch.nn.functional.linear(a, b.T, c),
                   lambda: a.double() @ b.double() + c.double()),
    }
    for name, (op, exact) in cases.items():
        with GemmLog() as log, fp32_gemms(), fp32_gemms():
            out = op()
        assert out.dtype == bf, name
        assert log.dtypes and set(log.dtypes) == {torch.float32}, (name, log.dtypes)
        assert len(log.dtypes) == 1, name  # nested: one conversion, not two
        rounded = exact().to(bf)
        assert (out != rounded).float().mean() < 1e-3, name
        ulp = rounded.double().abs() * 2.0 ** -7 + 1e-30
        assert ((out.double() - rounded.double()).abs() <= ulp).all(), name
    with GemmLog() as log:
        plain = a @ b
    assert log.dtypes == [bf]  # outside the mode torch's own bf16 kernel runs
    x, y = torch.randn(64, 300), torch.randn(300, 48)
    with fp32_gemms():
        inside = x @ y
    assert torch.equal(inside, x @ y) and plain.dtype == bf
    with GemmLog() as log, fp32_gemms(False):
        a @ b
    assert log.dtypes == [bf]


def test_fp32_gemms_reuse_kept_buffers_for_large_operands_with_the_same_bits():
    """Large bf16 operands are converted into kept float32 buffers (`Scratch`): a small model's
    forward and backward under `fp32_gemms` give the same bits with every operand through a
    buffer as with none (weights passed transposed by F.linear, activations, a square product
    whose two operands have one shape: each takes its own buffer), a buffer is reused by the
    next product of its shape, and the buffers stay under their byte limit, the least
    recently used dropped first."""
    from stayaligned.precision import Fp32Gemms, Scratch

    torch.manual_seed(0)
    bf = torch.bfloat16
    model = torch.nn.Sequential(torch.nn.Linear(48, 96), torch.nn.GELU(), torch.nn.Linear(96, 48),
                                torch.nn.Linear(48, 48, bias=False)).to(bf)
    x = torch.randn(5, 7, 48).to(bf)
    square = torch.randn(48, 48).to(bf), torch.randn(48, 48).to(bf)

    def run(scratch):
        model.zero_grad()
        with Fp32Gemms(scratch):
            out = model(x)
            out.float().square().sum().backward()
            prod = square[0] @ square[1]
        return [out, prod] + [p.grad for p in model.parameters()]

    fresh = run(Scratch(min_numel=10 ** 12))  # nothing kept: the plain conversions
    kept = Scratch(min_numel=1)
    for got, want in zip(run(kept), fresh, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert torch.equal(fresh[1], (square[0].float() @ square[1].float()).to(bf))
    assert kept.buffers and kept.bytes == sum(b.numel() * 4 for b in kept.buffers.values())
    # a buffer serves the next product of its shape (the same storage, the new values)
    weight = torch.randn(96, 48).to(bf)
    first = kept.up(weight.t(), 1)
    again = kept.up((2 * weight).t(), 1)
    assert first.data_ptr() == again.data_ptr() and again.stride() == weight.t().stride()
    assert torch.equal(again, (2 * weight).t().float())
    # the byte limit: three 4 KB operands in a 10 KB budget keep the two most recent
    small = Scratch(limit=10_000, min_numel=1)
    a, b, c = (torch.randn(32, 32).to(bf) for _ in range(3))
    for slot, t in enumerate((a, b, c)):
        small.up(t, slot)
    assert list(small.buffers) == [(1, (32, 32)), (2, (32, 32))] and small.bytes == 8192
    assert small.up(torch.randn(64, 64).to(bf), 0).dtype == torch.float32  # over the limit
    assert small.bytes <= 10_000


def test_fp32_gemms_run_cpu_flash_attention_in_float32_and_round_its_outputs():
    """bf16 attention under `fp32_gemms`: the float32 flash kernel forward and backward (the log
    behind sees no bf16 call), bf16 output and gradients, and values as close to a float64
    reference as torch's bf16 kernel gets (it also rounds the probabilities to bf16)."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 40, 16).to(torch.bfloat16) for _ in range(3))
    grad = torch.randn(2, 4, 40, 16).to(torch.bfloat16)

    def run(emulate):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        with GemmLog() as log, fp32_gemms(emulate):
            out = F.scaled_dot_product_attention(*leaves, is_causal=True)
            out.backward(grad)
        return log.dtypes, [out.detach()] + [t.grad for t in leaves]

    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*leaves, is_causal=True)
    out.backward(grad.double())
    exact = [out.detach()] + [t.grad for t in leaves]
    log, emulated = run(True)
    assert log and set(log) == {torch.float32}
    torch_log, native = run(False)
    assert set(torch_log) == {torch.bfloat16}
    for name, e, n, x in zip(("out", "dq", "dk", "dv"), emulated, native, exact):
        assert e.dtype == torch.bfloat16, name
        err = lambda t: float((t.double() - x).norm() / x.norm())  # noqa: E731
        assert err(e) <= max(err(n), 2.0 ** -8), (name, err(e), err(n))


def test_training_and_evaluation_under_emulated_bf16_take_float32_gemms(
        tmp_path, real_scale_dir, monkeypatch):
    """On a CPU without native bf16, a bf16 run's forward and backward products and its
    evaluation's all run as float32 GEMMs (none reaches torch's bf16 kernel), the record says
    so, and the run trains as torch's bf16 kernels would (loss and weights within bf16 noise)."""
    import stayaligned.precision as precision
    from stayaligned.evaluation.task_loss import reference_nll
    from stayaligned.data.types import Example
    from stayaligned.models import load_model
    from stayaligned.templates.library import get_template
    from stayaligned.training.run import train

    outs = {}
    for native in (False, True):
        monkeypatch.setattr(precision, "cpu_has_bf16", lambda cpuinfo=None, n=native: n)
        cfg = full_ft_config(tmp_path, real_scale_dir, "bf16", "optim.max_steps=3",
                             f"output_dir={tmp_path / str(native)}")
        with warnings.catch_warnings(), GemmLog() as log:
            warnings.simplefilter("ignore")
            outs[native] = train(cfg)
        if not native:
            assert log.dtypes and set(log.dtypes) == {torch.float32}
            # forward and backward: each Linear's backward adds two products to its forward's one
            assert len(log.dtypes) >= 3 * 3 * 2 * len(LINEAR)
            assert json.loads((outs[native] / "run.json").read_text())["precision"]["gemm"] == "fp32"
    losses = {n: [json.loads(line)["loss"] for line in (out / "train_log.jsonl").open()
                  if '"loss"' in line] for n, out in outs.items()}
    assert len(losses[False]) == 3
    assert losses[False] == pytest.approx(losses[True], rel=1e-2)
    weights = {n: load_file(str(out / "model" / "model.safetensors")) for n, out in outs.items()}
    for key in weights[True]:
        assert torch.allclose(weights[False][key], weights[True][key], atol=1e-4), key

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda cpuinfo=None: False)
    example = Example("x", ({"role": "user", "content": "Add 2 and 3."},
                            {"role": "assistant", "content": "5"}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, tok = load_model(ModelConfig(name=str(outs[False] / "model"), precision="bf16"),
                                inference=True)
    with GemmLog() as log:
        emulated = reference_nll(model, tok, [example], get_template("native"))
    assert log.dtypes and set(log.dtypes) == {torch.float32}
    setattr(model, precision.GEMM_ATTR, False)
    with GemmLog() as log:
        torch_bf16 = reference_nll(model, tok, [example], get_template("native"))
    assert set(log.dtypes) == {torch.bfloat16}
    assert emulated["loss"] == pytest.approx(torch_bf16["loss"], rel=1e-2)


# ---------------------------------------------------------------- the bug class


def realistic_model(target, tokenizer_dir, hidden=64):
    """A tiny Llama whose weights have a real model's magnitude (std 0.02, as Llama and SmolLM2
    initialise; most |w| > 0.008, where half a bf16 ulp exceeds 2e-5)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, tie_word_embeddings=True, initializer_range=0.02,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def real_scale_dir(tmp_path_factory, tokenizer_dir):
    return realistic_model(tmp_path_factory.mktemp("real-scale"), tokenizer_dir)


def full_ft_config(tmp_path, model_dir, precision, *extra):
    data = tmp_path / "task.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Add {i} and {i + 1}.",
                                        "output": f"{i} + {i + 1} = {2 * i + 1}."}) + "\n"
                            for i in range(8)))
    return load(TrainConfig, None, [
        f"model.name={model_dir}", f"model.precision={precision}", f"data=[{{source: {data}}}]",
        "lora.enabled=false", "optim.lr=2e-5", "optim.max_steps=1", "optim.batch_size=8",
        "optim.scheduler=constant", "max_length=64", "logging_steps=1",
        f"output_dir={tmp_path / precision}", *extra])


def moved_share(before: dict, after: dict, dtype) -> float:
    """Share of the linear layers' weights that one optimiser step changed."""
    keys = [k for k in after if any(f"{name}.weight" in k for name in LINEAR)]
    changed = sum(int((after[k] != before[k].to(dtype)).sum()) for k in keys)
    return changed / sum(after[k].numel() for k in keys)


def test_pure_bf16_adamw_rounds_updates_away_and_autocast_keeps_them(tmp_path, real_scale_dir):
    from stayaligned.training.run import train

    before = load_file(str(real_scale_dir / "model.safetensors"))
    big = [(v.abs() > 0.008).float().mean() for k, v in before.items() if "proj" in k]
    assert min(big) > 0.6  # realistic magnitudes: most weights above the rounding threshold
    with pytest.warns(UserWarning, match="full fine-tuning without float32 master weights"):
        pure = train(full_ft_config(tmp_path, real_scale_dir, "pure_bf16"))
    mixed = train(full_ft_config(tmp_path, real_scale_dir, "bf16"))
    pure_after = load_file(str(pure / "model" / "model.safetensors"))
    mixed_after = load_file(str(mixed / "model" / "model.safetensors"))
    assert next(iter(pure_after.values())).dtype == torch.bfloat16
    assert next(iter(mixed_after.values())).dtype == torch.float32  # master weights kept
    assert moved_share(before, pure_after, torch.bfloat16) < 0.4  # most updates rounded away
    assert moved_share(before, mixed_after, torch.float32) > 0.99
    manifest = json.loads((mixed / "run.json").read_text())
    assert manifest["precision"] == {"precision": "bf16", "device": "cpu",
                                     "weights": "float32", "autocast": "bfloat16",
                                     **({} if cpu_has_bf16() else {"gemm": "fp32"})}
    assert json.loads((pure / "run.json").read_text())["precision"]["weights"] == "bfloat16"


def test_training_runs_its_loss_under_the_configured_autocast(tmp_path, real_scale_dir,
                                                              monkeypatch):
    from stayaligned.training.run import train
    from stayaligned.training.trainer import StayTrainer

    seen = []
    original = StayTrainer.compute_loss

    def spy(self, model, inputs, *args, **kwargs):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu")
                    else None)
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(StayTrainer, "compute_loss", spy)
    train(full_ft_config(tmp_path, real_scale_dir, "bf16"))
    train(full_ft_config(tmp_path, real_scale_dir, "fp32"))
    assert seen == [torch.bfloat16, None]


# ---------------------------------------------------------------- SAP's probe signal


def sap_built(tmp_path, model_dir, precision):
    """(trainer, method, model, batch) for full fine-tuning with SAP under `precision`."""
    from test_sap import built

    return built(tmp_path, model_dir, "paper", 2e-5, "lora.enabled=false",
                 f"model.precision={precision}")


def probe_signal(tmp_path, model_dir, precision, monkeypatch=None) -> torch.Tensor:
    """b − a of SAP's first step (flattened) under `precision`."""
    trainer, method, model, batch = sap_built(tmp_path, model_dir, precision)
    captured = []
    update = method.update_probe
    method.update_probe = lambda tr, b, a: (
        captured.append(torch.cat([(bi - ai).reshape(-1) for ai, bi in zip(a, b)])),
        update(tr, b, a))
    trainer.training_step(model, dict(batch))
    return captured[0]


def sign_agreement(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((torch.sign(x) == torch.sign(ref)).float().mean())


def test_sap_probe_signal_under_bf16_autocast_agrees_with_fp32(tmp_path, real_scale_dir,
                                                                monkeypatch):
    import stayaligned.methods.sap as sap

    reference = probe_signal(tmp_path / "fp32", real_scale_dir, "fp32")
    assert float(reference.abs().max()) > 0  # an fp32 finite difference resolves ρ = 2e-5
    chosen = probe_signal(tmp_path / "bf16", real_scale_dir, "bf16")
    assert sign_agreement(chosen, reference) > 0.95
    assert float(torch.nn.functional.cosine_similarity(chosen, reference, dim=0)) > 0.99
    # the bug class: the old pure-bf16 path, where θ + δ rounds back to (nearly) θ
    monkeypatch.setattr(sap, "require_float32", lambda model, rho: None)
    broken = probe_signal(tmp_path / "pure", real_scale_dir, "pure_bf16")
    print("sign agreement with fp32: bf16 autocast path", sign_agreement(chosen, reference),
          "pure bf16", sign_agreement(broken, reference))
    assert sign_agreement(broken, reference) < 0.7


def test_sap_refuses_pure_bf16_weights(tmp_path, real_scale_dir):
    with pytest.raises(ConfigError, match="sap needs float32 weights.*not pure_bf16"):
        sap_built(tmp_path, real_scale_dir, "pure_bf16")


# ---------------------------------------------------------------- inference


def test_generation_and_task_loss_follow_the_loaded_precision(tmp_path, tiny_model_dir,
                                                              tokenizer):
    from stayaligned.config import GenerationConfig
    from stayaligned.data.types import Example
    from stayaligned.evaluation.generation import generate
    from stayaligned.evaluation.task_loss import reference_nll
    from stayaligned.models import load_model
    from stayaligned.templates.library import get_template

    native = get_template("native")
    example = Example("x", ({"role": "user", "content": "Add 2 and 3."},
                            {"role": "assistant", "content": "5"}))
    for precision, expected in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        model, tok = load_model(ModelConfig(name=str(tiny_model_dir), precision=precision))
        assert next(model.parameters()).dtype == torch.float32
        dtypes = []
        model.lm_head.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
        generate(model, tok, ["Hello"], native, GenerationConfig(max_new_tokens=2))
        reference_nll(model, tok, [example], native)
        assert dtypes and set(dtypes) == {expected}


def test_auto_on_a_gpu_without_native_bf16_is_fp32(monkeypatch):
    """`auto` picked bf16 autocast on every CUDA GPU: on a T4 or V100 (compute capability 7.x)
    torch only emulates bf16, slowly, and QLoRA computed in bf16 there too."""

    import stayaligned.precision as precision
    from stayaligned.config import LoraConfig
    from stayaligned.training.hf_args import quantization_config

    assert resolve("auto", device="cuda", cuda_bf16=False).name == "fp32"
    asked = []

    def is_bf16_supported(including_emulation=True):
        asked.append(including_emulation)
        return including_emulation  # a T4: emulated only

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert resolve("auto", device="cuda").name == "fp32" and asked == [False]
    with pytest.warns(UserWarning, match="no native bf16.*model.precision fp32"):
        assert resolve("bf16", device="cuda").name == "bf16"  # asked for: kept, with a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve("bf16", device="cuda", cuda_bf16=True)
        resolve("bf16", device="cpu", cpu_bf16=True)
    lora = LoraConfig(quantize="4bit")
    assert precision.compute_dtype(resolve("auto", device="cuda")) == torch.float32
    assert precision.compute_dtype(resolve("bf16", device="cuda", cuda_bf16=True)) == torch.bfloat16
    assert quantization_config(lora, resolve("auto", device="cuda")).bnb_4bit_compute_dtype \
        == torch.float32
    native = resolve("auto", device="cuda", cuda_bf16=True)
    assert quantization_config(lora, native).bnb_4bit_compute_dtype == torch.bfloat16


# ---------------------------------------------------------------- inference weights in bf16


def tiny_qwen2(target, tokenizer_dir):
    """A tiny random Qwen2: biases on q/k/v and an untied head (SmolLM2's tokenizer)."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
        tie_word_embeddings=False, initializer_range=0.2, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(1)
    Qwen2ForCausalLM(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def test_inference_holds_linear_weights_in_bf16_with_bit_identical_outputs(
        tmp_path, tiny_model_dir, tokenizer_dir):
    from stayaligned.config import GenerationConfig
    from stayaligned.data.types import Example
    from stayaligned.evaluation.generation import generate
    from stayaligned.evaluation.task_loss import reference_nll
    from stayaligned.models import load_model
    from stayaligned.precision import autocast_for
    from stayaligned.templates.library import get_template

    native = get_template("native")
    prompts = ["Hello there, how are you?", "Write a haiku about the sea."]
    examples = [Example(f"x{i}", ({"role": "user", "content": f"Add {i} and 3."},
                                  {"role": "assistant", "content": f"{i + 3}"})) for i in range(3)]
    ids = torch.tensor([[1, 5, 9, 200, 31, 7]])
    for model_dir, tied in ((tiny_model_dir, True), (tiny_qwen2(tmp_path / "q", tokenizer_dir),
                                                      False)):
        cfg = ModelConfig(name=str(model_dir), precision="bf16")
        plain, tok = load_model(cfg)
        held, _ = load_model(cfg, inference=True)
        attn = held.model.layers[0].self_attn
        assert attn.q_proj.weight.dtype == torch.bfloat16
        assert (attn.q_proj.bias is None) == tied  # Qwen2 has q/k/v biases: held too
        if attn.q_proj.bias is not None:
            assert attn.q_proj.bias.dtype == torch.bfloat16
        assert held.model.embed_tokens.weight.dtype == torch.float32
        assert held.model.norm.weight.dtype == torch.float32
        # a head tied to the embedding stays float32 (the embedding feeds the residual stream)
        assert held.lm_head.weight.dtype == (torch.float32 if tied else torch.bfloat16)
        size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
        assert size(held) < size(plain)
        with torch.no_grad(), autocast_for(plain):
            a = plain(input_ids=ids).logits
        with torch.no_grad(), autocast_for(held):
            b = held(input_ids=ids).logits
        assert torch.equal(a, b)
        gen = GenerationConfig(max_new_tokens=8, batch_size=2)
        assert generate(plain, tok, prompts, native, gen) == generate(held, tok, prompts,
                                                                      native, gen)
        assert reference_nll(plain, tok, examples, native) == reference_nll(held, tok, examples,
                                                                            native)
        with pytest.raises(RuntimeError):  # outside autocast: a loud dtype error, never fp32
            held(input_ids=ids)
    fp32, _ = load_model(ModelConfig(name=str(tiny_model_dir), precision="fp32"), inference=True)
    assert {p.dtype for p in fp32.parameters()} == {torch.float32}


def test_evaluation_under_bf16_holds_its_model_in_bf16_and_writes_the_same_rows(
        tmp_path, tiny_model_dir, monkeypatch):
    import stayaligned.models as models
    from test_evaluation import eval_config

    from stayaligned.evaluation.run import evaluate

    def rows(out):
        return [{k: r[k] for k in ("benchmark", "id", "response")} for r in
                map(json.loads, (out / "generations.jsonl").read_text().splitlines())]

    held = []
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    real = models.hold_for_autocast
    monkeypatch.setattr(models, "hold_for_autocast",
                        lambda model, prec: held.append(real(model, prec)) or held[-1])
    cfg = replace_model(eval_config(tmp_path / "a", tiny_model_dir), "bf16")
    new = evaluate(cfg)
    assert held and held[0] > 0
    monkeypatch.setattr(models, "hold_for_autocast", lambda model, prec: 0)  # float32 weights
    old = evaluate(replace_model(eval_config(tmp_path / "b", tiny_model_dir), "bf16"))
    assert rows(tmp_path / "a" / "eval") == rows(tmp_path / "b" / "eval")
    assert new["benchmarks"]["arith"]["task_loss"] == old["benchmarks"]["arith"]["task_loss"]


def replace_model(cfg, precision):
    from dataclasses import replace

    return replace(cfg, model=replace(cfg.model, precision=precision))


def test_lora_under_pure_bf16_trains_a_float32_adapter(tmp_path, real_scale_dir):
    """The README's advice for a 7B LoRA run on a 24 GB card: bf16 base weights, while PEFT keeps
    the trained adapter in float32, so its AdamW updates do not round away."""
    import warnings

    from stayaligned.training.run import train

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no full-fine-tuning warning for LoRA
        warnings.filterwarnings("ignore", message=".*no native bf16")  # this CPU's, if it emulates
        out = train(full_ft_config(tmp_path, real_scale_dir, "pure_bf16", "lora.enabled=true",
                                   "lora.r=4", "optim.lr=1e-3"))
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert {v.dtype for v in adapter.values()} == {torch.float32}
    assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if "lora_B" in k)
    assert json.loads((out / "run.json").read_text())["precision"]["weights"] == "bfloat16"


@pytest.mark.parametrize("method", ["sft", "constrained_sft", "constrained_sft-per-step", "str"])
def test_lora_under_bf16_holds_its_frozen_base_in_bf16_with_the_same_bits(
        tmp_path, real_scale_dir, monkeypatch, method):
    """A LoRA run under bf16 autocast holds its frozen base Linear weights in bf16 (autocast
    rounds them to bf16 for each product anyway): the adapter and the merged model are the same
    bits as with a float32 base, and run.json says how much memory it saved. The hold comes
    before the model first moves to its device, so a GPU never holds the float32 base. STR runs
    its reference model outside autocast, so its run keeps the float32 base (and still trains)."""
    from stayaligned.training import run as run_module

    options = {"sft": [], "constrained_sft": [],
               "constrained_sft-per-step": ["options={constrained_sft: {precompute: false}}"],
               "str": ["options={str: {n_prompts: 4, max_new_tokens: 8, k_tokens: 8, lam: 1.0, "
                       "min_refusal_share: 0}}"]}[method]
    extra = ["lora.enabled=true", "lora.r=4", "optim.lr=1e-3", "optim.max_steps=2", "merge=true",
             f"methods=[{method.removesuffix('-per-step')}]", *options]
    seen = {}
    real_hold = run_module._hold_frozen_base
    real_to = torch.nn.Module.to

    def spy(cfg, model, args, precision, methods):
        saved = real_hold(cfg, model, args, precision, methods)
        seen["dtypes"] = {p.dtype for n, p in model.named_parameters() if "base_layer" in n}
        return saved

    def move(module, *args, **kwargs):  # the base's dtypes each time the LoRA model moves
        base = {p.dtype for n, p in module.named_parameters() if "base_layer" in n}
        if base:
            seen.setdefault("moves", []).append(base)
        return real_to(module, *args, **kwargs)

    outs = {}
    for held in (True, False):
        monkeypatch.setattr(run_module, "_hold_frozen_base",
                            spy if held else (lambda *args: 0))
        monkeypatch.setattr(torch.nn.Module, "to", move if held else real_to)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outs[held] = run_module.train(full_ft_config(
                tmp_path, real_scale_dir, "bf16", *extra, f"output_dir={tmp_path / str(held)}"))
    record = json.loads((outs[True] / "run.json").read_text())
    if method == "str":
        assert "frozen_base" not in record and seen["dtypes"] == {torch.float32}
    else:
        assert seen["dtypes"] == {torch.bfloat16}
        assert seen["moves"][0] == {torch.bfloat16}  # its first move already carries bf16
        assert record["frozen_base"]["dtype"] == "bfloat16"
        assert record["frozen_base"]["bytes_saved"] > 0
    for folder, name in (("adapter", "adapter_model.safetensors"),
                         ("merged", "model.safetensors")):
        a, b = (load_file(str(outs[h] / folder / name)) for h in (True, False))
        assert a.keys() == b.keys()
        assert {v.dtype for v in a.values()} == {torch.float32}, folder
        for key in a:
            assert torch.equal(a[key], b[key]), (folder, key)
    adapter = load_file(str(outs[True] / "adapter" / "adapter_model.safetensors"))
    assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if "lora_B" in k)


def test_the_sharded_engines_are_read_before_the_trainer_exists(tmp_path, monkeypatch):
    """The frozen-base hold is decided before the Trainer exists, so FSDP and DeepSpeed must be
    read from the training arguments and accelerate's environment: a plain run is not sharded,
    each of the four ways to ask for an engine is."""
    from types import SimpleNamespace

    from transformers import TrainingArguments

    from stayaligned.training.run import _sharded

    for key in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(key, raising=False)
    assert not _sharded(TrainingArguments(output_dir=str(tmp_path), use_cpu=True))
    assert not _sharded(SimpleNamespace(fsdp=None, deepspeed=None))
    assert _sharded(SimpleNamespace(fsdp=True, deepspeed=None))
    assert _sharded(SimpleNamespace(fsdp=None, deepspeed="ds_config.json"))
    for key in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.setenv(key, "true")
        assert _sharded(SimpleNamespace(fsdp=None, deepspeed=None)), key
        monkeypatch.setenv(key, "false")
