"""Re-judge a finished evaluation with another judge, without regenerating: the generations of
EVAL_DIR are judged again into TARGET (judgments.jsonl, metrics.json, the judgment cache), the
task benchmarks' scores and task losses carried over unchanged (they need no judge). A study
with `judges: [classifier, keyword]` writes eval*/judge-keyword/ this way; judge agreement
(Cohen's kappa) is then computed from the two judgments.jsonl files.
"""

from __future__ import annotations

from pathlib import Path

from stayaligned.data.types import DataError
from stayaligned.evaluation.judging import build_judge, judge_rows, score
from stayaligned.runfiles import file_sha256, read_json, read_jsonl, write_json, write_jsonl


def rejudge(eval_dir: str | Path, judge: str, options: dict | None, target: str | Path) -> dict:
    """metrics.json of `eval_dir`'s generations judged by `judge`; written into `target`."""
    source, target = Path(eval_dir), Path(target)
    metrics = read_json(source / "metrics.json")
    if not metrics:
        raise DataError(f"{source / 'metrics.json'}: not found; evaluate first, then re-judge")
    benchmarks = metrics.get("benchmarks") or {}
    kinds = {name: str(entry.get("kind", "task")) for name, entry in benchmarks.items()}
    task_metrics = {name: entry.get("metric") for name, entry in benchmarks.items()
                    if kinds[name] == "task" and entry.get("metric")}
    # exactly the items the evaluation judged: generations.jsonl can hold more (rows kept from
    # an earlier run of the directory with a larger limit or other items)
    judged = {(r["benchmark"], r["id"]) for r in read_jsonl(source / "judgments.jsonl")}
    if not judged:
        raise DataError(f"{source / 'judgments.jsonl'}: not found or empty; evaluate first "
                        "(stayaligned eval with the same config), then re-judge")
    rows = [r for r in read_jsonl(source / "generations.jsonl")
            if r["benchmark"] in kinds and (r["benchmark"], r["id"]) in judged]
    judgments = judge_rows(rows, kinds, build_judge(judge, options), cache_dir=target,
                           task_metrics=task_metrics)
    categories = {(r["benchmark"], r["id"]): (r.get("meta") or {}).get("category") for r in rows}
    scores = score(judgments, kinds, categories, task_metrics)
    for name, entry in benchmarks.items():
        if kinds[name] == "task":
            scores[name] = entry  # scored by the task metric, not by a judge
    result = {"model": metrics.get("model"), "template": metrics.get("template"),
              "judge": judge, "rejudged_from": str(source),
              "source_config": metrics.get("config"),
              "source_generations": _digest(source), "benchmarks": scores}
    write_jsonl(target / "judgments.jsonl", judgments)
    write_json(target / "metrics.json", result)
    return result


def rejudge_done(eval_dir: str | Path, judge: str, target: str | Path) -> bool:
    """True when `target` holds `judge`'s verdicts on `eval_dir`'s current evaluation: same
    config and the same generations (an evaluation can regenerate rows under one config)."""
    mine = read_json(Path(target) / "metrics.json")
    source = read_json(Path(eval_dir) / "metrics.json")
    return bool(mine and source) and mine.get("judge") == judge and \
        mine.get("source_config") == source.get("config") and \
        mine.get("source_generations") == _digest(Path(eval_dir))


def _digest(eval_dir: Path) -> str | None:
    path = eval_dir / "generations.jsonl"
    return file_sha256(path) if path.is_file() else None
