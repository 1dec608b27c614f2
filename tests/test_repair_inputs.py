"""Post-hoc repairs: what a repair reads (LoRA adapters as PEFT merges them, unfinished runs,
foreign adapters, checkpoints whose tensor names differ from the module names, tokenizer
files) and what a repair directory reused across runs may and may not reuse."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model, repair_cli, state_of

from stayaligned.config import RepairConfig
from stayaligned.repair import repairs
from stayaligned.repair.run import open_inputs
from stayaligned.repair.weights import LoraSource, RepairError, TensorSource

Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_dir):
    """aligned, base and a full fine-tune of one tiny Llama (tied embeddings)."""
    root = tmp_path_factory.mktemp("repair-inputs")
    return {name: make_tiny_model(root / name, tokenizer_dir, seed=seed)
            for name, seed in (("aligned", 0), ("base", 1), ("full", 2))}


def peft_adapter(model_dir: Path, out: Path, **lora) -> dict:
    """A LoRA adapter over `model_dir` with random B (saved in `out`); returns PEFT's own
    merged state dict, the reference for what the adapter means."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                          LoraConfig(target_modules=["q_proj", "v_proj"], **lora))
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    peft.save_pretrained(out)
    return {k: v.detach().clone() for k, v in peft.merge_and_unload().state_dict().items()}


# ---------------------------------------------------------------- LoRA adapters as PEFT merges them


def test_lora_scale_follows_peft_regex_rank_and_alpha_patterns(models, tmp_path):
    """PEFT matches rank_pattern / alpha_pattern keys as regexes (its docs write '^model...');
    the layer's rank is lora_A's, its alpha PEFT's own match."""
    pattern = {f"^{Q}": 8}
    merged = peft_adapter(models["aligned"], tmp_path / "a", r=2, lora_alpha=4,
                          rank_pattern=pattern, alpha_pattern={f"^{Q}": 32})
    lora = LoraSource(TensorSource(models["aligned"]), tmp_path / "a")
    assert lora.scale(Q) == 32 / 8 and lora.scale("model.layers.1.self_attn.q_proj") == 4 / 2
    for name in (f"{Q}.weight", "model.layers.1.self_attn.v_proj.weight"):
        assert torch.allclose(lora.get(name), merged[name], atol=1e-6)


def test_lora_bias_is_added_as_peft_merges_it_and_unknown_keys_fail(tokenizer_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    aligned = make_tiny_model(tmp_path / "aligned", tokenizer_dir)
    cfg = LlamaConfig.from_pretrained(aligned)
    cfg.attention_bias = True  # q/k/v/o with biases, as Qwen2's q/k/v
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(aligned)
    merged = peft_adapter(aligned, tmp_path / "a", r=2, lora_alpha=4, lora_bias=True)
    lora = LoraSource(TensorSource(aligned), tmp_path / "a")
    assert not torch.equal(merged[f"{Q}.bias"], state_of(aligned)[f"{Q}.bias"])
    for name in (f"{Q}.bias", f"{Q}.weight", "model.layers.0.self_attn.k_proj.bias"):
        assert torch.allclose(lora.get(name), merged[name], atol=1e-6), name

    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "lora_bias": False}))
    with pytest.raises(RepairError, match="lora_B.bias.*set lora_bias: true"):
        LoraSource(TensorSource(aligned), tmp_path / "a")
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    extra = {k: v for k, v in tensors.items() if not k.endswith("bias")}
    extra[f"base_model.model.{Q}.lora_A.bias"] = torch.zeros(2)
    save_file(extra, str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(RepairError, match=r"safetensors: adapter tensor .*lora_A.bias"):
        LoraSource(TensorSource(aligned), tmp_path / "a")


def test_a_lora_finetune_keeps_the_exact_float32_sum_over_a_bf16_base(models, tmp_path):
    """The repair math starts from W + scale·B A in float32, not from its bf16 rounding."""
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(models["aligned"]).to(torch.bfloat16).save_pretrained(
        tmp_path / "bf16")
    peft_adapter(tmp_path / "bf16", tmp_path / "a", r=2, lora_alpha=4)
    base = TensorSource(tmp_path / "bf16")
    lora = LoraSource(base, tmp_path / "a")
    got = lora.get(f"{Q}.weight")
    assert got.dtype == torch.float32
    assert torch.equal(got, base.get(f"{Q}.weight").float() + lora.delta(Q))
    assert not torch.equal(got, got.to(torch.bfloat16).float())
    assert lora.get("model.norm.weight").dtype == torch.bfloat16  # not adapted: as stored


# ---------------------------------------------------------------- inputs refused or flagged


def test_an_unfinished_run_is_refused_naming_its_run_json(models, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(models["full"], run / "model")
    (run / "run.json").write_text(json.dumps({"status": "running"}))
    cfg = RepairConfig(method="merge", model=str(run), aligned=str(models["aligned"]))
    with pytest.raises(RepairError, match=r"run/run.json: status 'running'.*let it finish"):
        open_inputs(cfg, tmp_path / ".work")
    (run / "run.json").write_text(json.dumps({"status": "complete"}))
    assert open_inputs(cfg, tmp_path / ".work").finetune.run_dir == run


def test_an_adapter_of_another_base_model_is_flagged_naming_both(models, tmp_path, capsys):
    peft_adapter(models["base"], tmp_path / "a", r=2, lora_alpha=4)  # trained on the base
    cfg = RepairConfig(method="merge", model=str(tmp_path / "a"), aligned=str(models["aligned"]))
    (warning,) = open_inputs(cfg, tmp_path / ".work").warnings
    assert str(models["base"]) in warning and str(models["aligned"]) in warning
    out = tmp_path / "out"
    assert repair_cli("--model", tmp_path / "a", "--aligned", models["aligned"], "--method",
                      "merge", "--strength", 0.5, "--output", out) == 0
    assert "base_model_name_or_path" in " ".join(capsys.readouterr().out.split())
    assert json.loads((out / "repair.json").read_text())["warnings"] == [warning]
    peft_adapter(models["aligned"], tmp_path / "b", r=2, lora_alpha=4)  # its own: no warning
    cfg = RepairConfig(method="merge", model=str(tmp_path / "b"), aligned=str(models["aligned"]))
    assert open_inputs(cfg, tmp_path / ".work").warnings == []


def test_a_target_without_a_harmful_validation_benchmark_is_an_error(models, tmp_path, capsys):
    path = tmp_path / "validation.yaml"
    path.write_text("benchmarks:\n  - {name: arith, source: demo-arithmetic, split: test, "
                    "kind: task, limit: 3}\n")
    code = repair_cli("--model", models["full"], "--aligned", models["aligned"], "--method",
                      "merge", "--strengths", "0,1", "--target-kept", 0.9, "--validation", path,
                      "--output", tmp_path / "out")
    err = capsys.readouterr().err
    assert code == 2 and "target_kept: the validation config has no harmful benchmark" in err


# ---------------------------------------------------------------- tokenizer files


def test_the_tokenizer_comes_as_one_set_from_the_finetune(models, tmp_path):
    """A fine-tune with its chat template inline in tokenizer_config.json, over an aligned
    model with chat_template.jinja: the aligned .jinja (which wins on load) is not mixed in."""
    from transformers import AutoTokenizer

    ft = tmp_path / "ft"
    shutil.copytree(models["full"], ft)
    (ft / "chat_template.jinja").unlink()
    config = json.loads((ft / "tokenizer_config.json").read_text())
    config["chat_template"] = "FINETUNE {{ messages[0]['content'] }}"
    (ft / "tokenizer_config.json").write_text(json.dumps(config))
    assert (models["aligned"] / "chat_template.jinja").is_file()
    out = tmp_path / "out"
    assert repair_cli("--model", ft, "--aligned", models["aligned"], "--method", "merge",
                      "--strength", 0.5, "--output", out) == 0
    assert not (out / "model" / "chat_template.jinja").exists()
    assert AutoTokenizer.from_pretrained(out / "model").chat_template.startswith("FINETUNE")


# ---------------------------------------------------------------- Safe Delta on Gemma 3


def tiny_gemma3(path: Path, tokenizer_dir: Path, like=None):
    from transformers import AutoTokenizer, Gemma3Config, Gemma3ForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = Gemma3Config(
        text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=8, sliding_window=8, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, image_size=28, patch_size=14),
        mm_tokens_per_image=4)
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(cfg)
    if like is not None:  # a fine-tune: like + a small delta everywhere
        model.load_state_dict(like.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model


def test_safe_delta_repairs_gemma3_whose_tensor_names_differ_from_module_names(
        tokenizer_dir, tmp_path, monkeypatch):
    """gemma-3-*-it checkpoints store `language_model.model.layers...` for the module
    `model.language_model.layers...`: every calibrated layer is found and repaired."""
    from stayaligned.repair import safe_delta

    aligned = tiny_gemma3(tmp_path / "aligned", tokenizer_dir)
    tiny_gemma3(tmp_path / "ft", tokenizer_dir, like=aligned)
    name = "language_model.model.layers.0.self_attn.q_proj.weight"
    al, ft = TensorSource(tmp_path / "aligned"), TensorSource(tmp_path / "ft")
    assert name in al.where and f"model.language_model.layers.0.{name.split('.0.')[1]}" \
        not in al.where
    cfg = RepairConfig(method="safe_delta", model=str(tmp_path / "ft"),
                       aligned=str(tmp_path / "aligned"), calibration_limit=4)
    repair = repairs()["safe_delta"](cfg)
    inputs = open_inputs(cfg, tmp_path / ".work")
    state = repair.prepare(inputs)
    out = {k: v for _, shard in repair.apply(state, 0.1).shards() for k, v in shard.items()}
    linears = [n for n in al.names if n.startswith("language_model.model.layers.")
               and n.endswith("_proj.weight")]
    assert len(linears) == 14  # 2 layers x 7 linears
    for tensor in linears:
        assert not torch.equal(out[tensor], ft.get(tensor).float()), tensor
    assert sorted(state["factor_of"]) == sorted(linears)
    # a layer that cannot be found is an error naming it, never a silent no-op
    monkeypatch.setattr(safe_delta, "saved_name", lambda *a: None)
    with pytest.raises(RepairError, match="linear layer model.language_model.layers.0.*no tensor"):
        repair.prepare(inputs)


def test_a_gemma3_lora_adapter_is_read_under_the_checkpoints_tensor_names(tokenizer_dir, tmp_path):
    """A PEFT adapter names Gemma 3's modules `model.language_model.layers...`, its checkpoint
    `language_model.model.layers...`: the fine-tune is read as PEFT merges it (rank/alpha
    patterns matched on PEFT's names), and a repair of it runs."""
    from peft import LoraConfig, get_peft_model

    aligned = tiny_gemma3(tmp_path / "aligned", tokenizer_dir)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                      alpha_pattern={"language_model.layers.0.self_attn.q_proj": 2},
                      init_lora_weights=False)
    peft = get_peft_model(aligned, lora)
    peft.save_pretrained(tmp_path / "adapter")
    peft.merge_and_unload().save_pretrained(tmp_path / "merged")
    source = LoraSource(TensorSource(tmp_path / "aligned"), tmp_path / "adapter")
    assert "language_model.model.layers.0.self_attn.q_proj" in source.modules
    merged = TensorSource(tmp_path / "merged")
    for name in merged.names:
        assert torch.allclose(source.get(name).float(), merged.get(name).float(), atol=1e-6), name
    out = tmp_path / "out"
    assert repair_cli("--model", tmp_path / "adapter", "--aligned", tmp_path / "aligned",
                      "--method", "merge", "--strength", 0.5, "--output", out) == 0


# ---------------------------------------------------------------- a reused output directory


def test_a_reused_output_evaluates_again_when_large_weights_look_the_same(
        models, validation, tmp_path, monkeypatch):
    """Real shards (over fingerprint.SMALL_FILE) are identified by size and header only: the
    candidates' run.json records the inputs' hashes, so another fine-tune of the same shape
    repaired into the same directory is evaluated again."""
    from stayaligned import fingerprint

    monkeypatch.setattr(fingerprint, "SMALL_FILE", 1000)
    out = tmp_path / "again"
    args = ("--aligned", models["aligned"], "--method", "merge", "--strengths", "0",
            "--target-refusal", 0.0, "--validation", validation, "--output", out)
    assert repair_cli("--model", models["full"], *args) == 0
    first = json.loads((out / "repair.json").read_text())["curve"][0]["task_loss"]["value"]
    assert repair_cli("--model", models["aligned"], *args) == 0  # lambda 0 = this "fine-tune"
    record = json.loads((out / "repair.json").read_text())
    second = record["curve"][0]["task_loss"]["value"]
    assert second == pytest.approx(record["aligned"]["task_loss"]["value"], rel=1e-5)
    assert second != pytest.approx(first, rel=1e-3)
    made_from = json.loads((out / "run.json").read_text())["made_from"]
    assert made_from["inputs"]["finetune"] == record["inputs"]["finetune"]["sha256"]
    assert made_from["options"]["method"] == "merge"


def test_a_candidate_left_by_a_killed_run_is_never_the_next_runs_result(models, tmp_path):
    from stayaligned.repair.base import save

    out = tmp_path / "out"
    cfg = RepairConfig(method="merge", model=str(models["full"]), aligned=str(models["aligned"]))
    repair = repairs()["merge"](cfg)
    leftover = repair.apply(repair.prepare(open_inputs(cfg, tmp_path / ".work")), 0.5)
    save(leftover, out / "sweep" / "0.5" / "candidate", str(models["aligned"]))
    assert repair_cli("--model", models["aligned"], "--aligned", models["aligned"], "--method",
                      "merge", "--strength", 0.5, "--output", out) == 0
    al = state_of(models["aligned"])
    assert all(torch.equal(v, al[k]) for k, v in state_of(out / "model").items())
    assert not (out / "sweep" / "0.5" / "candidate").exists()


def test_save_clears_a_stale_model_next_to_a_new_adapter(models, tmp_path):
    """SafeLoRA of a full fine-tune killed, then SafeLoRA of an adapter in the same place:
    the stale model/ (which loaders prefer) must not stay beside the new adapter/."""
    from stayaligned.models import resolve
    from stayaligned.config import ModelConfig
    from stayaligned.repair.base import save

    peft_adapter(models["aligned"], tmp_path / "a", r=2, lora_alpha=4)
    cand = tmp_path / "candidate"
    for model in (models["full"], tmp_path / "a"):
        cfg = RepairConfig(method="safelora", model=str(model), aligned=str(models["aligned"]),
                           base=str(models["base"]))
        repair = repairs()["safelora"](cfg)
        save(repair.apply(repair.prepare(open_inputs(cfg, tmp_path / ".work")), 0.5), cand,
             str(models["aligned"]))
    assert sorted(p.name for p in cand.iterdir()) == ["adapter", "run.json"]
    assert resolve(ModelConfig(name=str(cand)))[2] == cand / "adapter"


def test_a_sweep_interrupted_under_the_old_code_resumes(models, validation, tmp_path,
                                                        monkeypatch):
    """A sweep killed under the code before candidates recorded their inputs (old-style
    run.json, evaluations fingerprinted with it, the kept candidate on disk) resumes without
    an error: stale candidates are rebuilt and evaluated again, the result is this run's."""
    from stayaligned.repair import run as run_module
    from stayaligned.repair import sweep as sweep_module

    out = tmp_path / "out"
    args = ("--model", models["full"], "--aligned", models["aligned"], "--method", "merge",
            "--strengths", "0,0.5,1", "--target-refusal", 0.0, "--validation", validation,
            "--output", out)
    real_evaluate = sweep_module.evaluate_model
    calls = []

    def killed_after_two(ecfg):
        calls.append(ecfg.output_dir)
        if len(calls) > 3:  # the aligned model and two candidates were evaluated
            raise KeyboardInterrupt
        return real_evaluate(ecfg)

    monkeypatch.setattr(run_module, "made_from", lambda cfg, record: None)  # old run.json
    monkeypatch.setattr(run_module, "evaluate_model", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        repair_cli(*args)
    old = json.loads((out / "sweep" / "0" / "candidate" / "run.json").read_text())
    assert set(old) == {"kind", "status", "templates", "method", "strength"}
    assert (out / "sweep" / "0.5" / "eval").is_dir() and not (out / "repair.json").exists()
    monkeypatch.undo()
    assert repair_cli(*args) == 0
    record = json.loads((out / "repair.json").read_text())
    assert [p["strength"] for p in record["curve"]] == [0.0, 0.5, 1.0]
    ft = state_of(models["full"])
    assert all(torch.equal(v, ft[k]) for k, v in state_of(out / "model").items())
    assert "made_from" in json.loads((out / "run.json").read_text())


def test_safe_delta_says_when_its_calibration_prompts_are_its_validation_prompts(tmp_path):
    """Validation on the demo requests' align split (the default calibration's prompts): the
    strength is chosen on the prompts the compensation was fitted to. Said in the log and
    repair.json, not refused. The default validation is the held-out validation split."""
    from stayaligned.config import RepairConfig
    from stayaligned.repair.run import calibration_overlap
    from stayaligned.repair.sweep import validation_config

    cfg = RepairConfig(method="safe_delta", validation={"benchmarks": [
        {"name": "align", "source": "demo-harmful", "split": "align", "kind": "harmful"}]})
    (warning,) = calibration_overlap(cfg, validation_config(cfg, "m", tmp_path, None))
    assert "110 of the validation's 110 harmful prompts" in warning
    default = RepairConfig(method="safe_delta")
    ecfg = validation_config(default, "m", tmp_path, None)
    assert [(b.source, b.split) for b in ecfg.benchmarks] == [("demo-harmful", "validation")]
    assert calibration_overlap(default, ecfg) == []
    merge = RepairConfig(method="merge")
    assert calibration_overlap(merge, validation_config(merge, "m", tmp_path, None)) == []


def test_a_lora_run_with_merged_weights_is_read_as_its_adapter(models, tmp_path):
    """A LoRA run written with train.merge has adapter/ and merged/; merged/ was read: the
    update rounded to the weights' dtype, and SafeLoRA on full weights instead of B."""
    import shutil

    from stayaligned.repair.weights import open_model

    run = tmp_path / "run"
    peft_adapter(models["aligned"], run / "adapter", r=2, lora_alpha=4)
    shutil.copytree(models["full"], run / "merged")  # any other weights: must not be read
    (run / "run.json").write_text('{"status": "complete"}')
    aligned = open_model(str(models["aligned"]))
    assert open_model(str(run), aligned.source).kind == "lora"
    assert open_model(str(run)).kind == "full"  # without the aligned model: the merged copy
