"""What each CLI subcommand does, as plain functions (also the Python API's backend)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from stayaligned.config import EvalConfig, TrainConfig

console = Console()


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False) -> Path:
    from stayaligned.training.run import train as run_train

    return run_train(cfg, resume=resume, overwrite=overwrite)


def evaluate(cfg: EvalConfig, *, overwrite: bool = False) -> dict:
    from stayaligned.evaluation.run import evaluate as run_eval

    metrics = run_eval(cfg, overwrite=overwrite)
    console.print(metrics_table(metrics["benchmarks"], title=f"{cfg.model.name}"))
    console.print(f"stage files in [bold]{cfg.output_dir}[/bold]")
    return metrics


def fmt_rate(rate: dict) -> str:
    """'81.8% [70.8, 89.3]' from a Rate dict; 'n/a (nothing scored)' over n = 0."""
    if rate.get("value") is None:
        return "n/a (nothing scored)"
    return f"{100 * rate['value']:.1f}% [{100 * rate['low']:.1f}, {100 * rate['high']:.1f}]"


def fmt_mean(mean: dict | None, scale: float = 1.0, digits: int = 2) -> str:
    """'2.31 [2.05, 2.60]' from a mean_interval dict (values times `scale`); '-' if empty."""
    if not mean or mean.get("value") is None:
        return "-"
    v, lo, hi = (scale * mean[k] for k in ("value", "low", "high"))
    return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def metric_rows(m: dict) -> list[tuple[str, str]]:
    """(metric label, formatted value) for every metric a benchmark's metrics.json entry has:
    refusal rate (over-refusal on benign sets), attack success rate (share of 5s for the
    rubric judge, of "unsafe" for the guard judge), harmfulness, accuracy, ROUGE, task loss."""
    benign = m.get("kind") == "benign"
    rows = []
    if "refusal_rate" in m:
        rows.append(("over-refusal" if benign else "refusal rate", fmt_rate(m["refusal_rate"])))
    if "attack_success_rate" in m and not benign:
        label = "ASR (score 5)" if "scores" in m else \
            "ASR" if "refusal_rate" in m else "ASR (unsafe)"
        rows.append((label, fmt_rate(m["attack_success_rate"])))
    if "harmfulness" in m:
        rows.append(("harmfulness (1-5)", fmt_mean(m["harmfulness"])))
    elif m.get("mean_score") is not None:
        rows.append(("harmfulness (1-5)", f"{m['mean_score']:.2f}"))
    if "accuracy" in m:
        label = "exact match" if m.get("metric") == "exact_match" else "accuracy"
        rows.append((label, fmt_rate(m["accuracy"])))
    for key in ("rouge1", "rouge2", "rougeL"):
        if key in m:
            rows.append((f"ROUGE-{key[5:]} F1 (x100)", fmt_mean(m[key], scale=100, digits=1)))
    loss = m.get("task_loss") or {}
    if loss.get("loss") is not None:
        rows.append(("task loss (nats/token)", f"{loss['loss']:.3f}"))
    return rows or [("-", "see metrics.json")]


def metrics_table(benchmarks: dict, title: str = "") -> Table:
    """One row per (benchmark, metric it has); never fails on an unfamiliar entry."""
    table = Table(title=title)
    for column in ("benchmark", "kind", "n", "metric", "value [95% CI]"):
        table.add_column(column)
    for name, m in benchmarks.items():
        n = str(m.get("n", "-"))
        if m.get("unscored"):
            n += f" (+{m['unscored']} unscored)"
        for i, (label, value) in enumerate(metric_rows(m)):
            first = i == 0
            table.add_row(name if first else "", str(m.get("kind", "-")) if first else "",
                          n if first else "", label, value)
    return table


# ---------------------------------------------------------------- data inspection


def data_preview(cfg: TrainConfig, n: int = 2) -> None:
    """Show the first `n` training examples rendered with the loss mask, and the generation
    prompt of the same examples under the eval template."""
    from stayaligned.data.types import Example
    from stayaligned.models import load_tokenizer
    from stayaligned.templates.library import get_template
    from stayaligned.templates.render import prompt_text, show_mask
    from stayaligned.training.run import prepare

    tokenizer = load_tokenizer(cfg.model)
    prep = prepare(cfg, tokenizer)
    eval_template = get_template(prep["eval_template"])
    console.print(f"train template [bold]{prep['train_template']}[/bold], eval template "
                  f"[bold]{prep['eval_template']}[/bold]; ⟦...⟧ marks tokens that get loss")
    for line in prep["report"].summary():
        console.print(f"[yellow]{line}[/yellow]")
    by_id = {ex.id: ex for ex in prep["examples"]}
    # evaluation never applies the methods' transforms (e.g. LookAhead's preview): the
    # generation prompt is the task example as loaded
    task = {ex.id: ex for ex in prep["task_examples"]}
    for item in prep["items"][:n]:
        ex = task.get(item.example_id) or by_id[item.example_id]
        console.rule(f"{item.example_id}: {len(item.input_ids)} tokens, "
                     f"{item.n_loss_tokens} with loss")
        console.print("[bold]training[/bold]", markup=True)
        console.print(show_mask(tokenizer, item), markup=False, highlight=False)
        console.print("[bold]generation prompt[/bold] (as evaluation renders it: no method "
                      "transform)", markup=True)
        prompt = prompt_text(tokenizer, Example(ex.id, ex.prompt_messages), eval_template)
        console.print(prompt, markup=False, highlight=False)


def data_list() -> None:
    from stayaligned.data.registry import DATASETS
    from stayaligned.data.sources import DEMO_NAMES

    table = Table(title="datasets (local copy in data_dir first, else the Hub)")
    for column in ("name", "kind", "hub id", "local files", "licence"):
        table.add_column(column)
    for name in DEMO_NAMES:
        table.add_row(name, "demo", "-", "bundled", "Apache-2.0 (this project)")
    for spec in DATASETS.values():
        local = [*spec.local_files.values(), *([f"{spec.local_dir}/"] if spec.local_dir else [])]
        table.add_row(spec.name, spec.kind, spec.hub_id or "-", ", ".join(local), spec.license)
    console.print(table)


def data_templates() -> None:
    from stayaligned.templates.library import IN_USER, TEMPLATES

    table = Table(title="templates")
    for column in ("name", "kind", "description"):
        table.add_column(column)
    for t in TEMPLATES.values():
        table.add_row(t.name, t.kind, t.description)
    console.print(table)
    console.print(f"A native template's name + {IN_USER} (e.g. native:safe{IN_USER}) writes its "
                  "system prompt into the first user turn, for chat templates without a system "
                  "role (Gemma 2, Mistral v0.1/v0.2) or that move it (Mistral v0.3).")


def quickstart(output: str, fresh: bool = False, overrides: list[str] | tuple = ()) -> dict:
    from stayaligned.quickstart import run_quickstart

    return run_quickstart(Path(output), fresh=fresh, console=console, overrides=overrides)


def check(args, eval_cfg: EvalConfig) -> int:
    """The safety gate; returns the exit code (0 pass, 1 fail)."""
    from stayaligned.evaluation.check import run_check, write_junit

    if args.junit:  # an error below must not leave an earlier run's report to be read
        Path(args.junit).unlink(missing_ok=True)
    report = run_check(args.model, args.baseline, eval_cfg, Path(args.output),
                       args.max_refusal_drop, args.max_asr_rise,
                       overwrite=args.overwrite)
    table = Table(title=f"stayaligned check: {args.model} vs {args.baseline} "
                        f"({report['template']} template, {eval_cfg.judge} judge)")
    for column in ("benchmark", "metric", "model", "baseline", "change [95% CI]", "limit", "result"):
        table.add_column(column)
    for r in report["rows"]:
        if r.get("error"):
            table.add_row(r["benchmark"], r["metric"], "-", "-", r["error"],
                          f"{r['limit_points']:g} pts", "[red]FAIL[/red]")
            continue
        low, high = r["difference_ci"]
        table.add_row(r["benchmark"], r["metric"], f"{100 * r['model']:.1f}%",
                      f"{100 * r['baseline']:.1f}%",
                      f"{100 * r['difference']:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]",
                      f"{r['limit_points']:g} pts", "pass" if r["passed"] else "[red]FAIL[/red]")
    console.print(table)
    if args.junit:
        write_junit(Path(args.junit), report)
    console.print(f"{'PASSED' if report['passed'] else 'FAILED'}; report in "
                  f"{Path(args.output) / 'check.json'}" + (f" and {args.junit}" if args.junit else ""))
    return 0 if report["passed"] else 1


def depth(args) -> dict:
    """Per-token KL over the first response tokens, written as JSON and plotted."""
    from stayaligned.config import ModelConfig
    from stayaligned.data.sources import load_source
    from stayaligned.evaluation.depth import depth_kl, plot_depth, with_continuation, write_depth
    from stayaligned.models import load_pair

    if args.pairs_field:
        from stayaligned.data.pairs import load_pairs

        examples = with_continuation(load_pairs(args.source, data_dir=args.data_dir,
                                                limit=args.limit), args.pairs_field)
    else:
        examples = load_source(args.source, split=args.split, limit=args.limit,
                               data_dir=args.data_dir)
    # a LoRA run on the seed: one copy in memory, the seed being its adapters-off view
    seed_model, tuned, tokenizer = load_pair(ModelConfig(name=args.seed), ModelConfig(name=args.model))
    result = depth_kl(seed_model, tuned, tokenizer, examples, args.template, n_tokens=args.tokens)
    out = Path(args.output)
    write_depth(out / "depth.json", result)
    plot_depth({args.model: result}, out / "depth.png")
    table = Table(title=f"KL({result['direction']}) per response token, n={len(examples)}")
    for column in ("position", "KL (nats)", "n"):
        table.add_column(column)
    for t, kl, n in zip(result["positions"], result["kl_mean"], result["n"]):
        table.add_row(str(t), "-" if kl is None else f"{kl:.4f}", str(n))
    console.print(table)
    console.print(f"wrote {out / 'depth.json'} and {out / 'depth.png'}")
    return result


def judges_compare(a: str, b: str, output: str | None) -> dict:
    """Agreement and Cohen's kappa of two judges' judgments of the same generations."""
    from stayaligned.evaluation.judges.compare import compare_judges
    from stayaligned.runfiles import read_jsonl, write_json

    paths = [Path(p) / "judgments.jsonl" if Path(p).is_dir() else Path(p) for p in (a, b)]
    generations = read_jsonl(paths[0].parent / "generations.jsonl")
    result = compare_judges(read_jsonl(paths[0]), read_jsonl(paths[1]), str(paths[0]),
                            str(paths[1]), generations=generations or None)
    kappa = result["kappa"]
    console.print(f"n={result['n']}: agreement {fmt_rate(result['agreement'])}, Cohen's kappa "
                  f"{'undefined' if kappa is None else f'{kappa:.3f}'}, "
                  f"{len(result['disagreements'])} disagreement(s)")
    for d in result["disagreements"][:10]:
        console.print(f"- {d['benchmark']} {d['id']}: {(d.get('response') or '')[:100]!r}", markup=False)
    if output:
        write_json(Path(output), result)
    return result


def repair(args) -> int:
    """`stayaligned repair`: 0 when saved, 1 when a target was given and no strength met it."""
    from stayaligned.config import RepairConfig, build
    from stayaligned.repair.run import run_repair
    from stayaligned.repair.sweep import TargetNotMet

    strengths = [float(x) for x in args.strengths.split(",") if x.strip()] if args.strengths else []
    cfg = build(RepairConfig, {
        "method": args.method, "model": args.model, "aligned": args.aligned, "base": args.base,
        "unaligned": args.unaligned, "strengths": strengths, "strength": args.strength,
        "target_refusal": args.target_refusal, "target_kept": args.target_kept,
        "on_miss": args.on_miss, "reference": args.reference, "dare_p": args.dare_p, "select": args.select,
        "calibration": args.calibration, "calibration_limit": args.calibration_limit,
        "validation": {"config": args.validation} if args.validation else {},
        "task_holdout": args.task_holdout, "data_dir": args.data_dir, "seed": args.seed,
        "output_dir": args.output}, where="repair")
    try:
        record = run_repair(cfg, log=console.print)
    except TargetNotMet as err:
        console.print(f"[red]stayaligned repair: {err}[/red]")
        return 1
    if record.get("curve"):
        table = Table(title=f"{record['method']}: validation curve ({record['knob']})")
        for column in (record["knob"], "refusal [95% CI]", "task loss [95% CI]"):
            table.add_column(column)
        for p in record["curve"]:
            r, loss = p["refusal_rate"], p.get("task_loss")
            mark = " (chosen)" if p["strength"] == record["strength"] else ""
            table.add_row(f"{p['strength']:g}{mark}", fmt_rate(r) if r["value"] is not None else "-",
                          fmt_mean(loss, digits=3))
        console.print(table)
    if record.get("target_met") is False:
        console.print(f"[red]stayaligned repair: no strength met the target; saved the best "
                      f"({record['knob']}={record['strength']:g}) as asked by --on-miss best, "
                      "marked target_met: false in repair.json[/red]")
        return 1
    return 0


__all__ = ["train", "evaluate", "data_preview", "data_list", "data_templates", "quickstart",
           "check", "depth", "judges_compare", "repair"]
