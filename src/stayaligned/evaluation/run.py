"""`evaluate(cfg)`: generate -> judge -> score, each stage a file in the output directory.

  generations.jsonl   one row per (benchmark, example): rendered prompt, response, reference
  judgments.jsonl     one row per generation: the judge's verdict (refusal, harmfulness score),
                      or for task benchmarks the metric's per-item score (correct, ROUGE F1s)
  task_loss.json      per task benchmark: mean NLL of the reference answers (held-out loss)
  metrics.json        per benchmark: refusal rate / attack success rate / harmfulness,
                      accuracy or mean ROUGE, with 95% intervals (Wilson for rates, bootstrap
                      for means); plus the model, template and judge used, and
                      seconds (this call) and seconds_total (with the earlier calls
                      whose stage files it reused)

Generations are saved after every batch and reused on the next run, so an interrupted
evaluation resumes; judgments are recomputed from generations (cheap for the keyword judge).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from stayaligned.config import BenchmarkConfig, EvalConfig, to_dict
from stayaligned.data.loading import subset
from stayaligned.data.registry import DATASETS
from stayaligned.data.sources import load_source, registry_name
from stayaligned.data.types import DataError, Example
from stayaligned.evaluation.generation import decoding, generate
from stayaligned.evaluation.judging import build_judge, judge_rows, score
from stayaligned.evaluation.metrics import TASK_METRICS
from stayaligned.evaluation.prefill import harmful_responses, prefix_tokens
from stayaligned.evaluation.stage_prints import DECODING
from stayaligned.precision import resolve as resolve_precision
from stayaligned.runfiles import (
    machine_info,
    package_versions,
    provenance,
    read_json,
    read_jsonl,
    recorded_templates,
    write_json,
    write_jsonl,
)
from stayaligned.templates.library import get_template
from stayaligned.templates.render import encode, prompt_text

KINDS = ("harmful", "benign", "task")
# Prefilled rows record how their response joins the prefill and the continuation: before
# version 1 the continuation was stripped, so "Sure, here" + " is ..." read "Sure, hereis ...".
JOIN_VERSION = 1


def stale_prefill_rows(rows: list[dict]) -> list[dict]:
    """Prefilled rows generated before JOIN_VERSION (their response lost the whitespace
    between the prefill and the continuation): regenerated on the next run."""
    return [r for r in rows if r.get("prefill") and r.get("joined") != JOIN_VERSION]


def judge_caveats(judge: str, benches: dict) -> list[str]:
    """Measured limits of `judge` on these benchmarks (`benches` as from expand_benchmarks),
    printed before judging."""
    prefilled = [name for name, (b, _, k) in benches.items() if b.kind == "harmful" and k]
    if judge == "classifier" and prefilled:
        return [f"judge classifier on prefilled harmful benchmarks ({', '.join(prefilled)}): it "
                "calls 43% of compliant answers after 'Sure, here is' refusals (keyword judge: "
                "2.5%; bench/results/judges_harmful_domain.json), so these refusal rates run "
                "high; judge=keyword is the measured better choice here"]
    return []


def eval_needs_rejoin(out_dir: str | Path) -> bool:
    """True when a finished evaluation in `out_dir` has prefilled rows to regenerate."""
    return bool(stale_prefill_rows(read_jsonl(Path(out_dir) / "generations.jsonl")))


def benchmark_examples(bench: BenchmarkConfig, data_dir: str | None) -> list[Example]:
    if bench.kind not in KINDS:
        raise DataError(f"benchmark {bench.name}: kind {bench.kind!r} is not one of {KINDS}")
    where = bench.where or {}
    examples = load_source(
        bench.source or bench.name, split=bench.split, limit=None if where else bench.limit,
        seed=bench.seed, fields=bench.fields, data_dir=data_dir,
    )
    if where:
        missing = [k for k in where if examples and k not in examples[0].meta]
        if missing:
            raise DataError(f"benchmark {bench.name}: where.{missing[0]} is not a field of its "
                            f"records' meta ({', '.join(examples[0].meta) or 'none'}); add it to "
                            "fields.meta")
        examples = [ex for ex in examples if all(str(ex.meta.get(k)) == str(v) for k, v in where.items())]
        examples = subset(examples, bench.limit, bench.seed)
    return examples


def task_metric(bench: BenchmarkConfig) -> str | None:
    """The metric of a task benchmark: its `metric`, else its registry dataset's default, else
    GSM8K exact match (what every task benchmark used before `metric` existed); None for
    safety benchmarks."""
    if bench.kind != "task":
        if bench.metric is not None:
            raise DataError(f"benchmark {bench.name}: metric {bench.metric!r} applies only to "
                            "kind: task (safety benchmarks are scored by the judge)")
        return None
    if bench.metric is not None:
        if bench.metric not in TASK_METRICS:
            raise DataError(f"benchmark {bench.name}: metric {bench.metric!r} is unknown; use "
                            f"one of {', '.join(TASK_METRICS)}")
        return bench.metric
    name, _ = registry_name(bench.source or bench.name)
    return (DATASETS[name].metric if name else None) or "gsm8k_exact_match"


def reference_answer(example: Example) -> str | None:
    """The gold answer of a task example (GSM8K-style `answer` field or assistant turn)."""
    return example.meta.get("answer") or example.content("assistant")


def eval_template_name(cfg: EvalConfig) -> str:
    """The configured template, else the eval template recorded by a stayaligned run (PTST's
    safe testing), else the model's own chat template."""
    if cfg.template:
        return cfg.template
    return recorded_templates(cfg.model.name).get("eval", "native")


def _prefills(cfg, out, bench, examples, k, tokenizer) -> list[str]:
    """The prefill of each example: the first k tokens of its harmful response ("" for none)."""
    if k is None:
        return [""] * len(examples)
    responses = harmful_responses(bench.prefill_source, examples, cache_dir=out,
                                  bench_name=bench.name, generate_with=_generator(cfg.generation))
    return [prefix_tokens(tokenizer, r, k) for r in responses]


def _check_prefills(cfg, out, benches: dict, rows: list[dict], tokenizer_holder) -> None:
    """Reused prefilled rows must have the prefill the config gives now: an edited prefill
    file (or another model:NAME answer) changes what was asked, like an edited item."""
    from stayaligned.fingerprint import StaleError

    for name, (bench, examples, k) in benches.items():
        mine = {r["id"]: r.get("prefill", "") for r in rows if r["benchmark"] == name}
        reused = [ex for ex in examples if ex.id in mine]
        if k is None or not reused:
            continue
        now = _prefills(cfg, out, bench, reused, k, tokenizer_holder())
        changed = [ex.id for ex, pre in zip(reused, now) if mine[ex.id] != pre]
        if changed:
            raise StaleError(
                f"the stage files in {out} (benchmark {name}): item {changed[0]} was generated "
                f"after another prefill than prefill_source {bench.prefill_source} gives now "
                f"({len(changed)} changed); pass --overwrite to recompute them, or choose "
                "another output_dir")


def _generate_missing(cfg, out, rows, todo, model_holder, aside=()) -> None:
    """Generate the missing rows of each benchmark, saving after each batch (with `aside`,
    rows of the file that this evaluation does not select, kept for a later one).

    `todo` maps a benchmark name to (BenchmarkConfig, examples, prefill k or None)."""
    for name, (bench, examples, k) in todo.items():
        if not examples:
            continue
        template = get_template(bench.template or eval_template_name(cfg))
        model, tokenizer = model_holder()
        prefills = _prefills(cfg, out, bench, examples, k, tokenizer)
        prompts = [prompt_text(tokenizer, ex, template, prefill=pre)
                   for ex, pre in zip(examples, prefills)]
        gen = (replace(cfg.generation, max_new_tokens=bench.max_new_tokens)
               if bench.max_new_tokens else cfg.generation)
        check_context(model, tokenizer, template, name, examples, prompts, gen)
        _record_decoding(out, name, decoding(model, gen, tokenizer), cfg.generation)

        def save(batch, texts, name=name, examples=examples, prompts=prompts, prefills=prefills):
            for i, text in zip(batch, texts):
                ex = examples[i]
                rows.append({
                    "benchmark": name, "id": ex.id, "prompt": prompts[i],
                    "user": ex.content("user"), "prefill": prefills[i],
                    "response": (prefills[i] + text) if prefills[i] else text.strip(),
                    **({"joined": JOIN_VERSION} if k is not None else {}),
                    "reference": reference_answer(ex), "meta": ex.meta,
                    "template": template.name,
                })
            write_jsonl(out / "generations.jsonl", [*aside, *rows])

        generate(model, tokenizer, prompts, template, gen, on_batch=save, desc=name,
                 joined=k is not None)


def _record_decoding(out: Path, bench: str, used: dict, gen) -> None:
    """decoding.json: per benchmark, what generation used (metrics.json `decoding`); a note when
    the model's own generation_config changes greedy or sampled decoding."""
    stored = read_json(out / DECODING) or {}
    if stored.get(bench) == used:
        return
    if gen.repetition_penalty is None and used["repetition_penalty"] not in (None, 1.0):
        print(f"[eval] note: the model's generation_config sets repetition_penalty="
              f"{used['repetition_penalty']}; it applies to {bench} (generation."
              "repetition_penalty=1.0 turns it off)")
    write_json(out / DECODING, {**stored, bench: used})


def _generator(gen):
    """Writes harmful responses with a named model, for `prefill_source: model:NAME`."""
    def write(model_name, examples):
        from stayaligned.config import ModelConfig
        from stayaligned.models import load_model

        model, tokenizer = load_model(ModelConfig(name=model_name), inference=True)
        native = get_template("native")
        prompts = [prompt_text(tokenizer, ex, native) for ex in examples]
        return generate(model, tokenizer, prompts, native, gen, desc=f"prefill by {model_name}")
    write.settings = {k: v for k, v in to_dict(gen).items() if k != "batch_size"}
    return write


def expand_benchmarks(cfg: EvalConfig) -> dict:
    """name -> (BenchmarkConfig, examples, prefill k or None); a benchmark with prefill_k
    becomes one derived benchmark per k, named "<name> [prefill k=K]" (k = 0 keeps the plain
    benchmark under its own name, so `prefill_k: [0, 3, 5]` gives a whole curve)."""
    out = {}
    for bench in cfg.benchmarks:
        examples = benchmark_examples(bench, cfg.data_dir)
        if bench.kind == "task":
            _require_references(bench, examples)
        names = ([bench.name] if not bench.prefill_k or 0 in bench.prefill_k else []) + \
            [f"{bench.name} [prefill k={k}]" for k in bench.prefill_k if k > 0]
        for k in bench.prefill_k:
            if k < 0:
                raise DataError(f"benchmark {bench.name}: prefill_k values must be >= 0, got {k}")
        for name in names:
            if name in out:
                raise DataError(f"benchmarks: two benchmarks are named {name!r}; give each a "
                                "unique name")
            out[name] = (bench, examples, None if name == bench.name else
                         int(name.rsplit("=", 1)[1].rstrip("]")))
    return out


def _require_references(bench: BenchmarkConfig, examples: list[Example]) -> None:
    """A task item without a reference answer cannot be scored: an error, not a wrong answer."""
    for ex in examples:
        reference = reference_answer(ex)
        if not isinstance(reference, str) or not reference.strip():
            raise DataError(f"benchmark {bench.name}, record {ex.id}: the reference answer is "
                            "empty; fill it in, remove the record, or set fields.assistant to "
                            "the field holding it")


def _task_losses(cfg: EvalConfig, out: Path, benches: dict, model_holder) -> dict:
    """Held-out task loss per task benchmark, cached in task_loss.json (keyed by benchmark,
    with the item ids and template it was computed on, so a changed subset recomputes)."""
    from stayaligned.evaluation.task_loss import reference_nll, with_reference

    cached = read_json(out / "task_loss.json") or {}
    results = {}
    for name, (bench, examples, k) in benches.items():
        if bench.kind != "task" or k is not None or not bench.task_loss or not examples:
            continue
        template = bench.template or eval_template_name(cfg)
        ids = [ex.id for ex in examples]
        hit = cached.get(name)
        if hit and hit.get("ids") == ids and hit.get("template") == template:
            results[name] = hit["result"]
            continue
        model, tokenizer = model_holder()
        refs = [with_reference(ex, reference_answer(ex)) for ex in examples]
        results[name] = reference_nll(model, tokenizer, refs, get_template(template),
                                      batch_size=cfg.generation.batch_size)
        cached[name] = {"ids": ids, "template": template, "result": results[name]}
        write_json(out / "task_loss.json", cached)
    return results


def check_context(model, tokenizer, template, name, examples, prompts, gen) -> None:
    """Refuse prompts that cannot fit in the model's context with room for the answer."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if not limit:
        return
    for ex, prompt in zip(examples, prompts):
        n = len(encode(tokenizer, prompt, template)["input_ids"])
        if n + gen.max_new_tokens > limit:
            raise DataError(
                f"benchmark {name}, record {ex.id}: the prompt has {n} tokens, and with "
                f"generation.max_new_tokens={gen.max_new_tokens} it exceeds the model's context "
                f"of {limit} tokens; shorten the record or lower max_new_tokens"
            )


def _earlier_seconds(out: Path) -> float:
    """The seconds the earlier calls that wrote `out`'s stage files took, from the
    metrics.json they left (`seconds_total`, else `seconds`; 0 when there is none): a
    resumed evaluation's total then counts the work it reuses."""
    try:
        earlier = read_json(out / "metrics.json") or {}
    except (ValueError, OSError):
        return 0.0
    value = earlier.get("seconds_total", earlier.get("seconds")) if isinstance(earlier, dict) else 0
    return float(value) if isinstance(value, (int, float)) and value > 0 else 0.0


def evaluate(cfg: EvalConfig, *, model=None, tokenizer=None, overwrite: bool = False) -> dict:
    """Run (or resume) an evaluation; returns the metrics dict also written to metrics.json.

    The config is checked before anything is loaded, the output directory is locked, and its
    stage files are reused only when their fingerprint matches (`--overwrite` deletes them)."""
    from stayaligned.runlock import run_lock
    from stayaligned.validate import check_eval

    check_eval(cfg)
    with run_lock(Path(cfg.output_dir)):
        return _evaluate(cfg, model, tokenizer, overwrite)


def _evaluate(cfg: EvalConfig, model, tokenizer, overwrite: bool) -> dict:
    from stayaligned.evaluation import stage_prints

    out = Path(cfg.output_dir)
    started = time.time()
    benches = expand_benchmarks(cfg)
    kinds = {name: b.kind for name, (b, _, _) in benches.items()}
    task_metrics = {name: task_metric(b) for name, (b, _, _) in benches.items()
                    if b.kind == "task"}
    if overwrite:
        stage_prints.clear_stage_files(out)
    wanted = {(name, ex.id) for name, (_, exs, _) in benches.items() for ex in exs}
    stored = read_jsonl(out / "generations.jsonl")
    rows = [r for r in stored if (r["benchmark"], r["id"]) in wanted]
    aside = [r for r in stored if (r["benchmark"], r["id"]) not in wanted]
    stamp = stage_prints.fingerprint(cfg, benches, {
        name: b.template or eval_template_name(cfg) for name, (b, _, _) in benches.items()})
    reused = bool(rows) or (out / "task_loss.json").exists()
    stage_prints.check_reuse(out, stamp, has_rows=reused)
    earlier = _earlier_seconds(out) if reused else 0.0  # timing only: never read otherwise
    stage_prints.record(out, stamp)
    stale = stale_prefill_rows(rows)
    if stale:
        print(f"[eval] {len(stale)} prefilled row(s) in {out / 'generations.jsonl'} were "
              "generated before the prefill join fix (no space kept between the prefill and "
              "the continuation): generating them again")
        stale_keys = {(r["benchmark"], r["id"]) for r in stale}
        rows = [r for r in rows if (r["benchmark"], r["id"]) not in stale_keys]
    done = {(r["benchmark"], r["id"]) for r in rows}
    todo = {name: (b, [ex for ex in exs if (name, ex.id) not in done], k)
            for name, (b, exs, k) in benches.items()}

    loaded = {}

    def model_holder():
        if "pair" not in loaded:
            from stayaligned.models import load_model

            loaded["pair"] = ((model, tokenizer) if model is not None
                              else load_model(cfg.model, inference=True))
        return loaded["pair"]

    def tokenizer_holder():
        if "pair" in loaded or tokenizer is not None:
            return loaded["pair"][1] if "pair" in loaded else tokenizer
        if "tokenizer" not in loaded:
            from stayaligned.models import load_tokenizer

            loaded["tokenizer"] = load_tokenizer(cfg.model)
        return loaded["tokenizer"]

    _check_prefills(cfg, out, benches, rows, tokenizer_holder)
    _generate_missing(cfg, out, rows, todo, model_holder, aside)
    for caveat in judge_caveats(cfg.judge, benches):
        print(f"[eval] note: {caveat}")
    judge = build_judge(cfg.judge, cfg.judge_options)
    judgments = judge_rows(rows, kinds, judge, cache_dir=out, task_metrics=task_metrics)
    write_jsonl(out / "judgments.jsonl", judgments)
    categories = {(r["benchmark"], r["id"]): (r.get("meta") or {}).get("category") for r in rows}
    losses = _task_losses(cfg, out, benches, model_holder)
    scores = score(judgments, kinds, categories, task_metrics)
    for name, loss in losses.items():
        scores[name]["task_loss"] = loss
    metrics = {
        "model": cfg.model.name, "template": eval_template_name(cfg), "judge": cfg.judge,
        "unscored": sum(m.get("unscored", 0) for m in scores.values()),
        "config": to_dict(cfg), "seconds": round(time.time() - started, 1),
        # this call plus the calls that made the stage files it reused (`seconds`: this call)
        "seconds_total": round(time.time() - started + earlier, 1),
        "precision": resolve_precision(cfg.model.precision, cfg.model.dtype).to_dict(),
        "benchmarks": scores,
        "decoding": {k: v for k, v in (read_json(out / DECODING) or {}).items() if k in scores},
        "versions": package_versions(), "machine": machine_info(), **provenance(),
    }
    write_json(out / "metrics.json", metrics)
    from stayaligned.modelcard import record_evaluation

    record_evaluation(cfg.model.name, out, metrics)  # a stayaligned run's card lists it
    return metrics
