"""The strength sweep: evaluate each candidate on a validation config (harmful and task items
that are not evaluation benchmarks), draw the curve, and pick the weakest strength whose
refusal rate meets the target.

Refusal is pooled over the validation's harmful benchmarks (Wilson interval on the pooled
counts); task loss is the token-weighted held-out NLL of the task benchmarks' reference answers
(interval: ± 1.96 per-example standard errors). The target is met on the point estimate.

The default validation is the demo harmful requests' `validation` split (44 requests, 4 per
category, written for choosing a knob): disjoint from the `align` split that the demo safety
data trains aligned models on and that Safe Delta calibrates on by default (a strength chosen
on its own calibration prompts is chosen optimistically). Until v0.x studies it was the `align`
split (110 requests); configs that ran with it pin it (configs/study/embedded_gsm8k.yaml).
"""

from __future__ import annotations

from pathlib import Path

from stayaligned.config import BenchmarkConfig, EvalConfig, RepairConfig, build, load, to_dict
from stayaligned.evaluation.metrics import wilson_interval
from stayaligned.runfiles import write_jsonl

DEFAULT_VALIDATION = {
    "benchmarks": [{"name": "demo-harmful-validation", "source": "demo-harmful",
                    "split": "validation", "kind": "harmful"}],
    "generation": {"max_new_tokens": 48, "batch_size": 16},
    "judge": "keyword",
}


class TargetNotMet(RuntimeError):
    """No strength met the safety target; the message says the best one found."""


def validation_config(cfg: RepairConfig, model: str, out: Path, holdout: dict | None,
                      template: str | None = None,
                      chat_kwargs: dict | None = None) -> EvalConfig:
    """The EvalConfig each candidate (and the aligned model) is evaluated with
    (`validation: {config: PATH, ...}` starts from an eval YAML), plus the task hold-out
    benchmark if any; `template` (the fine-tune's eval template) unless the validation sets one,
    and `chat_kwargs` (the fine-tune's chat_template_kwargs, when it has any), so that every
    model of the curve is asked the same way."""
    block = dict(cfg.validation or {})
    path = block.pop("config", None)
    layers = [to_dict(load(EvalConfig, path))] if path else [DEFAULT_VALIDATION]
    layers.append(block)
    if template and not any(layer.get("template") for layer in layers):
        layers.append({"template": template})
    kwargs = {"chat_template_kwargs": dict(chat_kwargs)} if chat_kwargs else {}
    ecfg = build(EvalConfig, *layers, {"model": {"name": model, **kwargs}, "output_dir": str(out),
                                       "data_dir": cfg.data_dir}, where="validation")
    if holdout:
        ecfg = build(EvalConfig, to_dict(ecfg),
                     {"benchmarks": [*to_dict(ecfg)["benchmarks"], holdout]}, where="validation")
    return ecfg


def task_holdout(train_config: dict, n: int, out: Path, data_dir: str | None) -> dict | None:
    """A task benchmark of `n` items of the fine-tune's first training source that were not in
    its training subset (written to `out`/task_holdout.jsonl)."""
    from stayaligned.data.sources import load_source

    if n <= 0:
        return None
    sources = train_config.get("data") or []
    if not sources:
        raise ValueError("task_holdout: the fine-tune's run.json names no training data; "
                         "give a task benchmark in the validation config instead")
    src = sources[0]
    kw = {"split": src.get("split", "train"), "fields": src.get("fields"), "data_dir": data_dir}
    used = {ex.id for ex in load_source(src["source"], limit=src.get("limit"),
                                        seed=src.get("seed", 0), **kw)}
    rest = [ex for ex in load_source(src["source"], **kw) if ex.id not in used]
    from stayaligned.data.loading import subset

    chosen = subset(rest, n, seed=1)
    if not chosen:
        raise ValueError(f"task_holdout: no item of {src['source']} is left outside the "
                         "training subset")
    path = out / "task_holdout.jsonl"
    write_jsonl(path, [{"id": ex.id, "question": ex.content("user"),
                        "answer": ex.meta.get("answer") or ex.content("assistant")} for ex in chosen])
    return to_dict(BenchmarkConfig(
        name="task-holdout", source=str(path), kind="task", split="train",
        fields={"user": "question", "assistant": "answer", "meta": ["answer"]},
        metric="gsm8k_exact_match" if "gsm8k" in src["source"].lower() else "exact_match",
        max_new_tokens=8, task_loss=True))


def point(metrics: dict) -> dict:
    """Pooled refusal rate and mean task loss (with intervals) from a metrics.json dict."""
    k = n = 0
    loss_num = loss_den = 0.0
    sem2 = 0.0
    benches = metrics["benchmarks"]
    for m in benches.values():
        if m.get("kind") == "harmful" and "refusal_rate" in m:
            r = m["refusal_rate"]
            n_b = r.get("n", m.get("n", 0))
            k += r.get("k", round(r["value"] * n_b))
            n += n_b
        loss = m.get("task_loss") or {}
        if loss.get("loss") is not None and loss.get("tokens"):
            loss_num += loss["loss"] * loss["tokens"]
            loss_den += loss["tokens"]
            sem2 += (loss.get("per_example_sem") or 0.0) ** 2
    low, high = wilson_interval(k, n) if n else (0.0, 1.0)
    out = {"refusal_rate": {"value": k / n if n else None, "low": low, "high": high, "n": n}}
    if loss_den:
        value, half = loss_num / loss_den, 1.96 * sem2 ** 0.5
        out["task_loss"] = {"value": value, "low": value - half, "high": value + half}
    else:
        out["task_loss"] = None
    return out


def pick(curve: list[dict], target: float | None) -> dict | None:
    """The first point (the curve runs weakest to strongest) whose refusal meets `target`."""
    if target is None:
        return None
    return next((p for p in curve if (p["refusal_rate"]["value"] or 0) >= target), None)


def best(curve: list[dict]) -> dict | None:
    """The point with the highest refusal (ties: the weakest)."""
    return max(curve, key=lambda p: (p["refusal_rate"]["value"] or 0), default=None)


def plot_curve(curve: list[dict], path: Path, knob: str, method: str, target: float | None,
               chosen: float | None, aligned: dict | None) -> None:
    """Refusal rate (left axis) and task loss (right axis) against the knob, with intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [p["strength"] for p in curve]
    fig, ax = plt.subplots(figsize=(6, 4))
    r = [p["refusal_rate"] for p in curve]
    ax.errorbar(xs, [100 * (v["value"] or 0) for v in r],
                yerr=[[100 * ((v["value"] or 0) - v["low"]) for v in r],
                      [100 * (v["high"] - (v["value"] or 0)) for v in r]],
                marker="o", color="tab:blue", capsize=3, label="refusal (validation)")
    if target is not None:
        ax.axhline(100 * target, color="tab:blue", linestyle="--", linewidth=1, label="target")
    if aligned and aligned["refusal_rate"]["value"] is not None:
        ax.axhline(100 * aligned["refusal_rate"]["value"], color="grey", linestyle=":",
                   linewidth=1, label="aligned model")
    if chosen is not None:
        ax.axvline(chosen, color="tab:green", linewidth=1, label="chosen")
    ax.set_xlabel(knob)
    ax.set_ylabel("refusal rate (%)")
    losses = [(p["strength"], p["task_loss"]) for p in curve if p.get("task_loss")]
    if losses:
        ax2 = ax.twinx()
        ax2.errorbar([x for x, _ in losses], [v["value"] for _, v in losses],
                     yerr=[[v["value"] - v["low"] for _, v in losses],
                           [v["high"] - v["value"] for _, v in losses]],
                     marker="s", color="tab:orange", capsize=3, label="task loss")
        ax2.set_ylabel("held-out task loss (nats/token)", color="tab:orange")
    ax.set_title(f"{method}: validation curve")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def evaluate_model(ecfg: EvalConfig) -> dict:
    """Evaluate one model on the validation config, reusing the generations of an earlier run
    only when their fingerprint matches: it holds the model's identity and the sha256 of its
    run.json, where a candidate records its inputs' hashes and the method's options
    (`made_from`), so a candidate rebuilt from other inputs in the same directory (a
    retrained fine-tune, a changed method option) is evaluated again, never read from the old
    files, even where large weight files are identified by size and header only."""
    from stayaligned.evaluation.run import evaluate
    from stayaligned.fingerprint import StaleError

    try:
        return evaluate(ecfg)
    except StaleError:
        return evaluate(ecfg, overwrite=True)
