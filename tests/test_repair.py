"""Post-hoc repairs on tiny models: exact endpoints, hand-computed cases, loadable outputs,
target selection and one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model, repair_cli, state_of

from stayaligned.config import RepairConfig
from stayaligned.repair import repairs
from stayaligned.repair.run import open_inputs
from stayaligned.repair.weights import RepairError


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_dir):
    """aligned, base and a full fine-tune (same architecture), a LoRA adapter over aligned,
    and a model of another shape."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("repair-models")
    paths = {name: make_tiny_model(root / name, tokenizer_dir, seed=seed)
             for name, seed in (("aligned", 0), ("base", 1), ("full", 2))}
    model = AutoModelForCausalLM.from_pretrained(paths["aligned"])
    lora = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(3)
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    lora.save_pretrained(root / "adapter")
    cfg = LlamaConfig.from_pretrained(paths["aligned"])
    cfg.intermediate_size = 24
    LlamaForCausalLM(cfg).save_pretrained(root / "other")
    return {**paths, "adapter": root / "adapter", "other": root / "other"}


def tensors(weights) -> dict:
    return {k: v for _, shard in weights.shards() for k, v in shard.items()}


def prepared(method: str, models, tmp_path, model="full", **kw):
    cfg = RepairConfig(method=method, model=str(models[model]), aligned=str(models["aligned"]),
                       base=str(models["base"]), output_dir=str(tmp_path), **kw)
    repair = repairs()[method](cfg)
    return repair, repair.prepare(open_inputs(cfg, tmp_path / ".work"))


# ---------------------------------------------------------------- merge and RESTA


def test_merge_endpoints_are_exact(models, tmp_path):
    repair, state = prepared("merge", models, tmp_path)
    ft, al = state_of(models["full"]), state_of(models["aligned"])
    zero, one = tensors(repair.apply(state, 0.0)), tensors(repair.apply(state, 1.0))
    half = tensors(repair.apply(state, 0.5))
    for name in al:
        assert torch.equal(zero[name], ft[name]) and torch.equal(one[name], al[name])
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(half[name], (ft[name] + al[name]) / 2)


def test_resta_beta_zero_is_identity_and_dare_p0_is_the_plain_formula(models, tmp_path):
    from stayaligned.repair.resta import dare

    repair, state = prepared("resta", models, tmp_path)
    ft, al, base = (state_of(models[k]) for k in ("full", "aligned", "base"))
    identity = tensors(repair.apply(state, 0.0))
    assert all(torch.equal(identity[n], ft[n]) for n in al)
    plain = tensors(repair.apply(state, 0.7))
    name = "model.layers.1.self_attn.o_proj.weight"
    assert torch.allclose(plain[name], ft[name] + 0.7 * (al[name] - base[name]), atol=1e-6)
    delta = torch.randn(50, 40)
    assert dare(delta, 0.0) is delta
    dropped = dare(delta, 0.5, torch.Generator().manual_seed(0))
    kept = dropped != 0
    assert 0.4 < kept.float().mean() < 0.6
    assert torch.allclose(dropped[kept], 2 * delta[kept])


def test_resta_dare_path_matches_the_formula_with_its_mask(models, tmp_path):
    repair, state = prepared("resta", models, tmp_path, dare_p=0.3)
    ft, al, base = (state_of(models[k]) for k in ("full", "aligned", "base"))
    out = tensors(repair.apply(state, 1.0))
    name = "model.layers.0.self_attn.q_proj.weight"
    rest = out[name] - al[name] - (al[name] - base[name])  # = DARE(ft - al)
    delta = ft[name] - al[name]
    kept = rest.abs() > 1e-6
    assert 0.55 < kept.float().mean() < 0.85
    assert torch.allclose(rest[kept], delta[kept] / 0.7, atol=1e-5)


# ---------------------------------------------------------------- SafeLoRA


def test_safelora_projection_equals_a_hand_computed_4x4_case():
    from stayaligned.repair.safelora import chosen_layers, project, similarity

    v = torch.tensor([[1.0, 0, 0, 0], [0, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    b = torch.tensor([[1.0], [1.0], [1.0], [1.0]])
    a = torch.tensor([[1.0, 0, 0, 0]])
    # C = V Vᵀ / ‖V‖_F = diag(1, 4, 0, 0) / √5
    c = torch.diag(torch.tensor([1.0, 4.0, 0, 0])) / 5 ** 0.5
    assert torch.allclose(project(v, b), c @ b)
    delta = b @ a
    projected = project(v, delta)
    # ⟨ΔW, CΔW⟩ = (1 + 4)/√5, ‖ΔW‖ = 2, ‖CΔW‖ = √17/√5
    assert similarity(delta, projected) == pytest.approx(5 / (2 * 17 ** 0.5), abs=1e-6)
    from stayaligned.repair.safelora import lora_similarity

    a2, b2 = torch.randn(2, 4), torch.randn(4, 2)
    assert lora_similarity(a2, b2, project(v, b2)) == pytest.approx(
        similarity(b2 @ a2, project(v, b2 @ a2)), abs=1e-5)
    sims = {"a": 0.9, "b": 0.2, "c": 0.5}
    assert chosen_layers(sims, "threshold", 0.5) == ["b"]
    assert chosen_layers(sims, "number", 2) == ["b", "c"]


def test_safelora_projects_below_tau_and_leaves_the_others(models, tmp_path):
    from stayaligned.repair.safelora import project

    repair, state = prepared("safelora", models, tmp_path, model="adapter")
    sims = state["similarity"]
    assert len(sims) == 4 and all(0 < s <= 1 for s in sims.values())
    lora = state["inputs"].finetune.source
    tau = sorted(sims.values())[2]  # the two lowest below tau
    out = tensors(repair.apply(state, tau))
    al, base = state_of(models["aligned"]), state_of(models["base"])
    for module, (a_key, b_key) in lora.modules.items():
        original = lora.lora[b_key]
        assert torch.equal(out[a_key], lora.lora[a_key])
        if sims[module] < tau:
            v = al[f"{module}.weight"] - base[f"{module}.weight"]
            assert torch.allclose(out[b_key], project(v, original))
        else:
            assert torch.equal(out[b_key], original)


def test_safelora_needs_the_base(models, tmp_path):
    cfg = RepairConfig(method="safelora", model=str(models["adapter"]),
                       aligned=str(models["aligned"]), output_dir=str(tmp_path))
    with pytest.raises(RepairError, match="--base"):
        repairs()["safelora"](cfg).prepare(open_inputs(cfg, tmp_path))


# ---------------------------------------------------------------- Safe Delta


def test_safe_delta_compensation_equals_a_hand_computed_3_column_case():
    from stayaligned.repair.safe_delta import compensate, inverse_cholesky

    h = torch.tensor([[4.0, 1.0, 0.5], [1.0, 3.0, 0.8], [0.5, 0.8, 2.0]])
    u = inverse_cholesky(h, damp=0.0)
    w_a = torch.tensor([[1.0, 2.0, 3.0]])
    delta = torch.tensor([[0.5, -0.3, 0.2]])
    # keep column 0 only: the others minimise e H eᵀ given e_0 = δ_0
    out = compensate(w_a, delta, u, torch.tensor([[True, False, False]]))
    e_free = -torch.linalg.solve(h[1:, 1:], h[1:, :1]).squeeze(1) * 0.5
    assert torch.allclose(out - w_a, torch.tensor([[0.5, *e_free.tolist()]]), atol=1e-5)
    # keep column 1 only: column 0 (before it) stays, column 2 compensates
    out = compensate(w_a, delta, u, torch.tensor([[False, True, False]]))
    e2 = -h[2, 1] / h[2, 2] * -0.3
    assert torch.allclose(out - w_a, torch.tensor([[0.0, -0.3, float(e2)]]), atol=1e-5)
    # the compensation lowers the safety loss of the kept change
    e = out - w_a
    plain = torch.tensor([[0.0, -0.3, 0.0]])
    assert float(e @ h @ e.t()) < float(plain @ h @ plain.t())


def test_safe_delta_selection_respects_the_budget():
    from stayaligned.repair.safe_delta import inverse_cholesky, select

    torch.manual_seed(0)
    x = torch.randn(5, 40)
    u = inverse_cholesky(2 * x @ x.t() / 40)
    delta = torch.randn(3, 5)
    cost = delta ** 2 / torch.diag(u) ** 2
    for s in (0.1, 0.4, 0.8):
        mask = select(delta, u, s)
        assert float(cost[mask].sum()) <= s * float(cost.sum()) + 1e-6
    assert not select(delta, u, 0.0).any() and select(delta, u, 1.0).all()
    assert select(delta, u, 0.2).sum() <= select(delta, u, 0.6).sum()


def reference_compensate(w_a, delta, u, mask, blocksize=128):
    """The first implementation (GPTQ lazy batch on θ itself, one column at a time), kept as
    the reference of the fast one."""
    w = w_a.float().clone()
    target = w_a.float() + delta.float()
    n = w.shape[1]
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        block, err = w[:, i1:i2].clone(), torch.zeros(w.shape[0], i2 - i1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = block[:, i]
            q = torch.where(mask[:, i1 + i], target[:, i1 + i], col)
            e = (col - q) / u1[i, i]
            block[:, i:] -= e.unsqueeze(1) @ u1[i, i:].unsqueeze(0)
            block[:, i] = q
            err[:, i] = e
        w[:, i1:i2] = block
        w[:, i2:] -= err @ u[i1:i2, i2:]
    return w


def reference_select(delta, u, s):
    """The first implementation (two sorts of every entry), kept as the reference."""
    if s >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    if s <= 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    d2 = torch.diag(u).float() ** 2
    cost = (delta.float() ** 2 / d2).flatten()
    ratio = d2.expand_as(delta).flatten()
    by_cost = torch.argsort(cost, stable=True)
    order = by_cost[torch.argsort(-ratio[by_cost], stable=True)]
    keep_sorted = torch.cumsum(cost[order], 0) <= s * cost.sum()
    mask = torch.zeros_like(cost, dtype=torch.bool)
    mask[order[keep_sorted]] = True
    return mask.view_as(delta)


def random_factor(n, seed, dead=0):
    from stayaligned.repair.safe_delta import inverse_cholesky

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3 * n, generator=g)
    x[:dead] = 0  # dead inputs: equal diagonals of U, so tied utility per cost
    return inverse_cholesky(2 * x @ x.t() / x.shape[1])


@pytest.mark.parametrize("rows,n,blocksize", [(7, 5, 128), (24, 70, 128), (40, 300, 64)])
def test_safe_delta_compensation_matches_the_reference(rows, n, blocksize):
    from stayaligned.repair.safe_delta import compensate

    u = random_factor(n, seed=n)
    g = torch.Generator().manual_seed(rows)
    w_a = 0.05 * torch.randn(rows, n, generator=g)
    delta = 1e-3 * torch.randn(rows, n, generator=g)
    masks = [torch.ones(rows, n, dtype=torch.bool), torch.zeros(rows, n, dtype=torch.bool)]
    masks += [torch.rand(rows, n, generator=g) < p for p in (0.05, 0.5, 0.9)]
    for mask in masks:
        ref = reference_compensate(w_a, delta, u, mask, blocksize)
        for size in (1, 7, 32, blocksize):
            out = compensate(w_a, delta, u, mask, blocksize=size)
            assert out.dtype == torch.float32
            tol = 1e-4 * float(delta.abs().max())
            assert torch.allclose(out - w_a, ref - w_a, rtol=0, atol=tol)
            assert torch.equal(out[mask], (w_a + delta)[mask])
    assert torch.equal(compensate(w_a, delta, u, masks[0]), w_a + delta)
    assert torch.equal(compensate(w_a, delta, u, masks[1]), w_a)


def test_safe_delta_selection_matches_the_reference():
    from stayaligned.repair.safe_delta import select

    for seed, (rows, n, dead) in enumerate([(3, 5, 0), (20, 64, 0), (20, 64, 9), (50, 200, 30)]):
        u = random_factor(n, seed, dead)
        g = torch.Generator().manual_seed(seed)
        delta = torch.randn(rows, n, generator=g)
        delta[:, : n // 4] *= torch.rand(rows, n // 4, generator=g) < 0.5  # zero-cost entries
        delta[0, :] = delta[1, :]  # equal costs within a column
        for s in (0.0, 1e-4, 0.05, 0.1, 0.3, 0.5, 0.9, 0.999, 1.0):
            assert torch.equal(select(delta, u, s), reference_select(delta, u, s)), (seed, s)


def test_safe_delta_calibration_batches_match_one_sequence_at_a_time(models, tmp_path, monkeypatch):
    from stayaligned.config import ModelConfig
    from stayaligned.data.sources import load_source
    from stayaligned.models import load_model
    from stayaligned.repair import safe_delta
    from stayaligned.templates.library import get_template
    from stayaligned.templates.render import render_for_training

    cfg = RepairConfig(method="safe_delta", model=str(models["full"]),
                       aligned=str(models["aligned"]), output_dir=str(tmp_path),
                       calibration_limit=6)
    inputs = open_inputs(cfg, tmp_path / ".work")
    model, tokenizer = load_model(ModelConfig(name=str(inputs.aligned.config_dir), dtype="float32"))
    rows = [render_for_training(tokenizer, ex, get_template("native")).input_ids
            for ex in load_source(cfg.calibration, split=cfg.calibration_split,
                                  limit=cfg.calibration_limit, seed=cfg.seed)]
    assert len({len(r) for r in rows}) > 1  # padding is used
    inputs_of: dict[str, list] = {}
    handles = [m.register_forward_pre_hook(
        lambda _m, args, name=name: inputs_of.setdefault(name, []).append(args[0][0]))
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and "lm_head" not in name]
    with torch.no_grad():
        for ids in rows:
            model(input_ids=torch.tensor([ids]))
    for h in handles:
        h.remove()
    for tokens in (safe_delta.CALIBRATION_BATCH_TOKENS, 2 * max(map(len, rows))):
        monkeypatch.setattr(safe_delta, "CALIBRATION_BATCH_TOKENS", tokens)
        hessians, group = safe_delta.calibration_hessians(inputs, cfg)
        assert set(group) == set(inputs_of) and len(hessians) < len(group)  # q, k, v share
        for name, xs in inputs_of.items():
            x = torch.cat(xs)
            ref = 2 * x.t() @ x / len(x)
            tol = 1e-5 * float(ref.abs().max())
            assert torch.allclose(hessians[group[name]], ref, rtol=0, atol=tol)


def test_safe_delta_ends_are_the_aligned_model_and_the_finetune(models, tmp_path):
    repair, state = prepared("safe_delta", models, tmp_path, model="adapter", calibration_limit=4)
    lora = state["inputs"].finetune.source
    al = state_of(models["aligned"])
    reverted, kept = tensors(repair.apply(state, 0.0)), tensors(repair.apply(state, 1.0))
    middle = tensors(repair.apply(state, 0.3))
    for name in al:
        assert torch.equal(reverted[name], al[name])
        assert torch.equal(kept[name], lora.get(name).float())
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(middle[name], al[name]) and not torch.allclose(middle[name], kept[name])


# ---------------------------------------------------------------- outputs, sweep, CLI


def test_full_weight_and_adapter_repairs_load_with_from_pretrained(models, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from stayaligned.config import ModelConfig
    from stayaligned.models import load_model

    out = tmp_path / "merged"
    assert repair_cli("--model", models["adapter"], "--aligned", models["aligned"], "--method",
                      "merge", "--strength", 0.5, "--output", out) == 0
    merged = AutoModelForCausalLM.from_pretrained(out / "model")
    lora_ft, _ = load_model(ModelConfig(name=str(models["adapter"])))
    aligned = AutoModelForCausalLM.from_pretrained(models["aligned"])
    name = "model.layers.0.self_attn.q_proj.weight"
    expected = (lora_ft.state_dict()[name] + aligned.state_dict()[name]) / 2
    assert torch.allclose(merged.state_dict()[name], expected, atol=1e-6)
    record = json.loads((out / "repair.json").read_text())
    assert record["strength"] == 0.5 and record["inputs"]["finetune"]["kind"] == "lora"
    assert all(len(h) == 64 for h in record["inputs"]["aligned"]["sha256"].values())

    out = tmp_path / "safelora"
    assert repair_cli("--model", models["adapter"], "--aligned", models["aligned"], "--base",
                      models["base"], "--method", "safelora", "--strength", 1.0,
                      "--output", out) == 0
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models["aligned"]),
                                     str(out / "adapter"))
    assert any("lora_B" in n for n, _ in peft.named_parameters())
    model, _ = load_model(ModelConfig(name=str(out)))  # usable as model.name
    assert not torch.allclose(model.state_dict()[name], lora_ft.state_dict()[name])

    out = tmp_path / "full"
    assert repair_cli("--model", models["full"], "--aligned", models["aligned"], "--base",
                      models["base"], "--method", "resta", "--strength", 1.0, "--output", out) == 0
    resta = AutoModelForCausalLM.from_pretrained(out / "model")
    ft, al, base = (state_of(models[k]) for k in ("full", "aligned", "base"))
    assert torch.allclose(resta.state_dict()[name], ft[name] + al[name] - base[name], atol=1e-6)


def test_target_selection_picks_the_weakest_passing_strength():
    from stayaligned.repair.sweep import best, pick

    def p(s, r):
        return {"strength": s, "refusal_rate": {"value": r, "low": 0, "high": 1}}

    curve = [p(0.0, 0.2), p(0.25, 0.6), p(0.5, 0.85), p(0.75, 0.8), p(1.0, 0.95)]
    assert pick(curve, 0.8)["strength"] == 0.5
    assert pick(curve, 0.9)["strength"] == 1.0
    assert pick(curve, 0.99) is None and best(curve)["strength"] == 1.0
    merge = repairs()["merge"](RepairConfig())
    delta = repairs()["safe_delta"](RepairConfig(method="safe_delta"))
    assert merge.order([1, 0, 0.5]) == [0.0, 0.5, 1.0]
    assert delta.order([0, 1, 0.1]) == [1.0, 0.1, 0.0]  # safe_delta: smaller s is stronger


def test_sweep_keeps_the_weakest_strength_meeting_the_target(models, validation, tmp_path):
    out = tmp_path / "swept"
    assert repair_cli("--model", models["full"], "--aligned", models["aligned"], "--method",
                      "merge", "--strengths", "1,0,0.5", "--target-refusal", 0.0,
                      "--validation", validation, "--output", out) == 0
    record = json.loads((out / "repair.json").read_text())
    assert [p["strength"] for p in record["curve"]] == [0.0, 0.5, 1.0]
    assert record["choice"]["strength"] == 0.0 and record["strength"] == 0.0
    assert record["reverted"] is False
    assert all(p["task_loss"]["value"] > 0 for p in record["curve"])
    assert record["curve"][-1]["task_loss"]["value"] == pytest.approx(
        record["aligned"]["task_loss"]["value"], rel=1e-5)  # lambda = 1 is the aligned model
    assert (out / "curve.png").stat().st_size > 0
    assert state_of(out / "model").keys() == state_of(models["full"]).keys()
    ft = state_of(models["full"])
    assert all(torch.equal(v, ft[k]) for k, v in state_of(out / "model").items())
    assert not any((out / "sweep" / s / "candidate").exists() for s in ("0", "0.5", "1"))


def test_a_repair_that_gives_back_the_aligned_model_says_so(models, tmp_path, capsys):
    """merge at lambda = 1 (safe_delta at s = 0) is the aligned model itself: the record and
    the log say so, since a sweep can pick it when no weaker strength meets the target."""
    out = tmp_path / "reverted"
    assert repair_cli("--model", models["full"], "--aligned", models["aligned"], "--method",
                      "merge", "--strength", 1, "--output", out) == 0
    assert json.loads((out / "repair.json").read_text())["reverted"] is True
    assert "lambda=1 is the aligned model itself" in " ".join(capsys.readouterr().out.split())
    assert {name: cls.reverts_at for name, cls in repairs().items()} == {
        "merge": 1.0, "resta": None, "safelora": None, "safe_delta": 0.0}


def test_a_target_no_strength_meets_exits_1_with_the_best(models, validation, tmp_path, capsys):
    out = tmp_path / "unmet"
    code = repair_cli("--model", models["full"], "--aligned", models["aligned"], "--method",
                      "merge", "--strengths", "0,1", "--target-refusal", 1.01,
                      "--validation", validation, "--output", out)
    text = " ".join(capsys.readouterr().out.split())
    assert code == 1
    assert "no lambda in 0, 1 met the target refusal 101.0%" in text and "the best was lambda=" in text
    assert (out / "repair.json").is_file() and not (out / "model").exists()
    assert json.loads((out / "repair.json").read_text())["target_met"] is False
    # --on-miss best: the best strength is saved (a study can evaluate it), marked, still exit 1
    best = tmp_path / "best"
    code = repair_cli("--model", models["full"], "--aligned", models["aligned"], "--method",
                      "merge", "--strengths", "0,1", "--target-refusal", 1.01, "--on-miss",
                      "best", "--validation", validation, "--output", best)
    record = json.loads((best / "repair.json").read_text())
    assert code == 1 and record["target_met"] is False
    assert record["strength"] == record["best"]["strength"] and (best / "model").is_dir()
    assert "saved the best" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("args, message", [
    (("--model", "other", "--method", "merge"), "tensor model.layers.0.mlp.down_proj.weight: shape [16, 24]"),
    (("--model", "adapter", "--method", "safelora"), "pass --base"),
    (("--model", "full", "--method", "resta", "--reference", "harmful_finetune"), "--unaligned"),
    (("--model", "missing", "--method", "merge"), "no such directory"),
    (("--model", "full", "--method", "nope"), "method='nope'"),
])
def test_bad_inputs_give_one_line_errors(models, tmp_path, capsys, args, message):
    args = [models.get(a, tmp_path / a) if a in ("other", "adapter", "full", "missing") else a
            for a in args]
    code = repair_cli(*args, "--aligned", models["aligned"], "--output", tmp_path / "out")
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1


def test_a_sweep_in_a_reused_directory_evaluates_a_changed_candidate_again(models, validation,
                                                                           tmp_path):
    """The same output directory, repaired again from another fine-tune: the candidates'
    validation numbers are recomputed, not read from the first run's files."""
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


def test_validation_asks_every_model_of_the_curve_with_the_finetunes_chat_kwargs(tmp_path):
    """The aligned model and each candidate are evaluated with the fine-tune's recorded eval
    template and chat_template_kwargs (Qwen3's enable_thinking: false), not each its own."""
    from stayaligned.repair.sweep import validation_config

    cfg = RepairConfig(method="merge", model="ft", aligned="al")
    ecfg = validation_config(cfg, "al", tmp_path, None, "native:safe", {"enable_thinking": False})
    assert ecfg.template == "native:safe"
    assert ecfg.model.name == "al" and ecfg.model.chat_template_kwargs == {"enable_thinking": False}
    assert validation_config(cfg, "al", tmp_path, None).model.chat_template_kwargs is None


def test_a_resumed_repair_records_a_total_that_does_not_shrink(models, validation, tmp_path):
    """A repair resumed after a kill reuses its finished validation evaluations (their
    `seconds` are this call's, about 0): repair.json's `seconds` is this attempt, and its
    `seconds_total` adds what the reused evaluations took before. Timing only: the curve and
    the choice are the same."""
    out = tmp_path / "resumed"
    args = ("--model", models["full"], "--aligned", models["aligned"], "--method", "merge",
            "--strengths", "0,1", "--target-refusal", 0.0, "--validation", validation,
            "--output", out)
    assert repair_cli(*args) == 0
    first = json.loads((out / "repair.json").read_text())
    assert set(first["evaluation_seconds"]) == {"aligned", "0", "1"}
    assert first["seconds_total"] >= first["seconds"]
    for name in ("aligned", "0", "1"):  # as if an earlier attempt spent 100 s on each
        path = out / "sweep" / name / "eval" / "metrics.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "seconds_total": 100.0}))
    assert repair_cli(*args) == 0
    again = json.loads((out / "repair.json").read_text())
    def kept(point):
        return {k: v for k, v in point.items() if k != "apply_seconds"}

    assert [kept(p) for p in again["curve"]] == [kept(p) for p in first["curve"]]
    assert again["strength"] == first["strength"] and kept(again["choice"]) == kept(first["choice"])
    assert all(t["seconds_total"] >= 100.0 for t in again["evaluation_seconds"].values())
    assert again["seconds_total"] == pytest.approx(again["seconds"] + 300.0, abs=0.5)
