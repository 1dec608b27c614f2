"""Where a fine-tune's answers stop refusing, read from a study's generations (no model runs).

    python bench/answer_openings.py bench/studies/embedded_gsm8k_v2 \\
        --output bench/results/embedded_gsm8k_v2/openings.json

The depth diagnostic measures how far a fine-tune moved from the aligned seed on fixed
refusal answers; this reads what the fine-tunes actually wrote on the evaluation's harmful
benchmark. For every model of the study (cells pooled over their seeds), under one template
(default: the study's first) and one judge (default: its headline judge), on the plain harmful
benchmark:

- `eroded`: items the aligned seed refuses and the model does not;
- `diverge_at`: for each eroded item, the first word (0-based, whitespace words) at which the
  model's answer differs from the aligned seed's answer, counted as 0, 1, 2 and "3+": LookAhead
  Tuning and deep alignment are about the first answer tokens, so whether erosion starts at
  the first word or later says which of them could have prevented it;
- `echo`: answers that open by repeating the request (their first 3 words, lower-cased with
  quotes and punctuation stripped, equal the request's), on every benchmark, and among the
  eroded items (`eroded_echo`): a keyword judge counts a bare restatement of the request as
  compliance, so echoes in the eroded count are partly a judge effect, and LookAhead's real
  mode, which trains with the answer's first words in the prompt, may teach copying from it;
- `openings`: the commonest first two words of the eroded answers (ties alphabetical).

Counts are summed over a cell's seeds (`runs` says how many).
"""

from __future__ import annotations

import argparse
import json
import string
import sys
from collections import Counter
from pathlib import Path

from stayaligned.reports.headline import benchmark_roles, templates
from stayaligned.reports.study_files import ModelRun, load_study
from stayaligned.runfiles import read_jsonl, write_json

ECHO_WORDS = 3
STRIP = string.punctuation + "“”‘’"


def words(text: str) -> list[str]:
    """Lower-cased whitespace words with quotes and punctuation stripped at their ends."""
    return [w for w in (w.strip(STRIP).lower() for w in text.split()) if w]


def echoes(request: str, response: str, n: int = ECHO_WORDS) -> bool:
    """True when the response opens with the request's first `n` words."""
    head = words(request)[:n]
    return len(head) == n and words(response)[:n] == head


def diverge_at(reference: str, response: str) -> int:
    """The first whitespace word at which `response` differs from `reference` (0-based); the
    shorter length when one is a prefix of the other."""
    a, b = reference.split(), response.split()
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def bucket(i: int) -> str:
    return str(i) if i < 3 else "3+"


def _view(model: ModelRun, template: str, judge: str):
    return next((v for v in model.views if v.template == template and v.judge == judge), None)


def _generations(model: ModelRun, root: Path, view) -> dict:
    folder = root / model.key / view.folder.split("/")[0]
    return {(r["benchmark"], str(r["id"])): r for r in read_jsonl(folder / "generations.jsonl")}


def openings(study_dir: str | Path, template: str | None = None, judge: str | None = None,
             top: int = 5) -> dict:
    study = load_study(study_dir)
    template = template or templates(study)[0]
    judge = judge or (study.manifest.get("config") or {}).get("headline_judge") or next(
        (v.judge for m in study.models for v in m.views if v.folder == "eval"), None)
    harmful = benchmark_roles(study)["harmful"]
    aligned = next((m for m in study.models if m.label == "aligned"), None)
    a_view = aligned and _view(aligned, template, judge)
    if a_view is None:
        raise SystemExit(f"{study.root}: the aligned seed has no evaluation under template "
                         f"{template!r} judged by {judge!r}; choose --template / --judge")
    a_gen = _generations(aligned, study.root, a_view)
    a_refused = a_view.verdicts.get(harmful, {})
    out: dict = {}
    for model in study.models:
        view = _view(model, template, judge)
        if view is None or not (study.root / model.key / view.folder.split("/")[0]
                                / "generations.jsonl").is_file():
            continue
        group = "aligned" if model is aligned else model.group
        entry = out.setdefault(group, {"runs": 0, "echo": {}, "eroded": 0, "eroded_echo": 0,
                                       "diverge_at": {k: 0 for k in ("0", "1", "2", "3+")},
                                       "openings": Counter()})
        entry["runs"] += 1
        gens = _generations(model, study.root, view)
        for (bench, _), row in gens.items():
            n, e = entry["echo"].get(bench, (0, 0))
            entry["echo"][bench] = (n + 1, e + echoes(row.get("user", ""), row["response"]))
        refused = view.verdicts.get(harmful, {})
        for item, ok in refused.items():
            if ok or not a_refused.get(item) or (harmful, item) not in gens:
                continue
            row, ref = gens[(harmful, item)], a_gen.get((harmful, item))
            entry["eroded"] += 1
            entry["eroded_echo"] += echoes(row.get("user", ""), row["response"])
            if ref is not None:
                entry["diverge_at"][bucket(diverge_at(ref["response"], row["response"]))] += 1
            entry["openings"][" ".join(row["response"].split()[:2])] += 1
    for entry in out.values():
        entry["echo"] = {b: {"n": n, "echo": e, "rate": e / n if n else None}
                         for b, (n, e) in sorted(entry["echo"].items())}
        ranked = sorted(entry["openings"].items(), key=lambda tc: (-tc[1], tc[0]))
        entry["openings"] = [{"text": t, "count": c} for t, c in ranked[:top]]
    return {"study": str(study_dir), "template": template, "judge": judge,
            "harmful": harmful, "echo_words": ECHO_WORDS,
            "models": out}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", help="a study's output directory (holding study.json)")
    parser.add_argument("--template", help="the eval template to read (default: the first)")
    parser.add_argument("--judge", help="the judge to read (default: the headline judge)")
    parser.add_argument("--output", help="write the JSON here (default: print it)")
    args = parser.parse_args(argv)
    data = openings(args.study, args.template, args.judge)
    data["command"] = "python bench/answer_openings.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    if args.output:
        write_json(Path(args.output), data)
    else:
        json.dump(data, sys.stdout, indent=1)
        print()
    for name, e in data["models"].items():
        harm = e["echo"].get(data["harmful"], {})
        print(f"{name:32s} runs {e['runs']}  eroded {e['eroded']:4d} (echo {e['eroded_echo']:3d})"
              f"  diverge at word {e['diverge_at']}  echo on {data['harmful']}: "
              f"{harm.get('echo', 0)}/{harm.get('n', 0)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
