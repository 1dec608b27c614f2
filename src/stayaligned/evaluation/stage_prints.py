"""The fingerprint of an evaluation directory's stage files (generations, task loss, judgments,
metrics), kept in ``fingerprint.json`` and checked before anything in the directory is reused.

Generations depend on the model (identity: see stayaligned.fingerprint; for a model that
stayaligned made, also the sha256 of its run.json / repair.json), the generation
settings (batch size aside), the precision, device and attention implementation they are
computed with (`compute`; not checked against fingerprints written before it was recorded)
and the seed, and per benchmark on its settings, its rendered
template and each item's content. A stored fingerprint that differs in any of these is an
error naming the keys, and so are rows without a fingerprint (it is written before the first
row: such rows were made elsewhere); a benchmark's item *selection* (limit, seed, where) may change, since
rows are reused per item, but an item whose content changed is an error. The judge and its
options are recorded (judgments are recomputed from the generations on every run, through a
cache keyed by the judge's name, options and model: evaluation.judging.judge_cache_name).
"""

from __future__ import annotations

from pathlib import Path

from stayaligned.config import BenchmarkConfig, EvalConfig, GenerationConfig, to_dict
from stayaligned.fingerprint import StaleError, check_same, json_digest, made_identity
from stayaligned.runfiles import read_json, write_json

FILE = "fingerprint.json"
DECODING = "decoding.json"  # per benchmark, what generation decoded with (evaluation.run)
STAGE_FILES = ("generations.jsonl", "judgments.jsonl", "judgments.cache.jsonl", "task_loss.json",
               "metrics.json", DECODING, FILE)
SELECTION = ("name", "limit", "seed", "where", "task_loss")  # rows are reused per item
SECRET_WORDS = ("key", "token", "secret", "password")


def item_digest(example) -> str:
    return json_digest([list(example.messages), example.meta])[:16]


def fingerprint(cfg: EvalConfig, benches: dict, templates: dict) -> dict:
    """What the stage files depend on; `benches` as from `expand_benchmarks`, `templates`
    the template name each benchmark is rendered with."""
    generation = {k: v for k, v in to_dict(cfg.generation).items() if k != "batch_size"}
    from stayaligned.models import chat_template_kwargs

    if kwargs := chat_template_kwargs(cfg.model):  # they change the prompts (absent: none)
        generation["chat_template_kwargs"] = kwargs
    m = cfg.model
    model = made_identity(m.name, m.revision, m.gguf_file)
    from stayaligned.precision import resolve

    prec = resolve(m.precision, m.dtype)
    # what the numbers are computed in: fp32 generations resumed in bf16 (or on another device)
    # would mix two computations in one file
    compute = {"precision": prec.name, "device": prec.device,
               "attn_implementation": m.attn_implementation}
    out = {"model": model, "generation": generation, "compute": compute,
           "seed": cfg.seed, "benchmarks": {},
           "judge": {"name": cfg.judge, "options": public_options(cfg.judge_options)}}
    for name, (bench, examples, k) in benches.items():
        settings = {key: v for key, v in to_dict(bench).items() if key not in SELECTION}
        out["benchmarks"][name] = {"settings": settings, "prefill": k,
                                   "template": templates[name],
                                   "items": {ex.id: item_digest(ex) for ex in examples}}
    return out


def public_options(options: dict) -> dict:
    """Judge options without values that look like secrets (a key's *name* may be kept)."""
    return {k: ("[REDACTED]" if any(w in k.lower() for w in SECRET_WORDS) and not
                k.lower().endswith("_env") else v) for k, v in (options or {}).items()}


def _defaults() -> dict:
    bench = {k: v for k, v in to_dict(BenchmarkConfig()).items() if k not in SELECTION}
    generation = to_dict(GenerationConfig())
    return {"generation": generation, "settings": bench}


def check_reuse(out: Path, new: dict, has_rows: bool) -> None:
    """Raise `StaleError` if the stored fingerprint of `out` differs from `new` in anything
    the stored rows depend on."""
    stored = read_json(out / FILE)
    fix = "pass --overwrite to recompute them, or choose another output_dir"
    what = f"the stage files in {out}"
    if stored is None:
        if has_rows:  # FILE is written before any row: these rows came from elsewhere
            raise StaleError(f"{what} have no {FILE}, so nothing says which model, settings "
                             f"and prompts made them (a copied or hand-made directory, or one "
                             f"whose {FILE} was deleted); {fix}")
        return
    defaults = _defaults()
    if has_rows:
        # fingerprints written before `compute` was recorded (v0.x studies) do not check it
        keys = ("model", "generation", "seed") + (("compute",) if "compute" in stored else ())
        check_same(what, {k: stored.get(k) for k in keys}, {k: new[k] for k in keys},
                   {"generation": defaults["generation"]}, fix)
    for name, mine in new["benchmarks"].items():
        old = stored.get("benchmarks", {}).get(name)
        if old is None:
            continue
        check_same(f"{what} (benchmark {name})",
                   {k: old.get(k) for k in ("settings", "prefill", "template")},
                   {k: mine[k] for k in ("settings", "prefill", "template")},
                   {"settings": defaults["settings"]}, fix)
        changed = [i for i, d in mine["items"].items() if old["items"].get(i, d) != d]
        if changed:
            raise StaleError(f"{what} (benchmark {name}): item {changed[0]} has different "
                             f"content now ({len(changed)} changed); {fix}")


def record(out: Path, new: dict) -> None:
    """Store `new`, keeping the entries of benchmarks it does not mention."""
    stored = read_json(out / FILE) or {}
    merged = {**new, "benchmarks": {**stored.get("benchmarks", {}), **new["benchmarks"]}}
    for name, entry in new["benchmarks"].items():
        old_items = stored.get("benchmarks", {}).get(name, {}).get("items", {})
        merged["benchmarks"][name] = {**entry, "items": {**old_items, **entry["items"]}}
    write_json(out / FILE, merged)


def clear_stage_files(out: Path) -> None:
    """--overwrite: delete every stage file of an evaluation directory, and the answers that
    `prefill_source: model:NAME` generated (prefill_cache/)."""
    import shutil

    for name in STAGE_FILES:
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "prefill_cache", ignore_errors=True)


__all__ = ["fingerprint", "check_reuse", "record", "clear_stage_files", "StaleError", "FILE"]
