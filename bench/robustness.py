"""The bad-input suite as a figure: run tests/test_bad_inputs.py and tests/test_kills.py and
tally their outcomes.

    .venv/bin/python bench/robustness.py [--out bench/results/robustness.json]

Every case of the suite logs its observed outcome (STAYALIGNED_ROBUSTNESS_LOG): `clear_error`
(a non-zero exit with one line naming the culprit), `recovered` (a correct result after the
bad input, e.g. a stale lock taken over), `silent_wrong` (exit 0 with a wrong or partial
result), `traceback` (an exception escaped the CLI), `unclear_error` (an error line that does
not name the culprit), and for the kill tests `kill_identical` / `kill_different` (SIGKILL at
a point of train, eval or study, then a rerun compared with an uninterrupted run).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITE = ("test_bad_inputs.py", "test_kills.py")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "robustness.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "outcomes.jsonl"
        env = {**os.environ, "STAYALIGNED_ROBUSTNESS_LOG": str(log), "HF_HUB_OFFLINE": "1",
               "PYTHONPATH": str(ROOT / "src")}
        started = time.time()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               *(str(ROOT / "tests" / name) for name in SUITE)], cwd=ROOT,
                              env=env, capture_output=True, text=True)
        seconds = round(time.time() - started, 1)
        rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    counts = collections.Counter(r["outcome"] for r in rows)
    kills = [r for r in rows if r["outcome"].startswith("kill_")]
    result = {
        "cases": len(rows) - len(kills),
        "clear_error": counts["clear_error"],
        "recovered": counts["recovered"],
        "silent_wrong": counts["silent_wrong"],
        "traceback": counts["traceback"],
        "unclear_error": counts["unclear_error"],
        "kill_points": len(kills),
        "kill_identical": counts["kill_identical"],
        "meta": {
            "command": "python bench/robustness.py",
            "suite": [f"tests/{name}" for name in SUITE],
            "pytest_exit_code": proc.returncode,
            "pytest_summary": (proc.stdout.strip().splitlines() or [""])[-1],
            "seconds": seconds,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        },
        "outcomes": {r["case"]: r["outcome"] for r in rows},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "outcomes"}, indent=2))
    if proc.returncode != 0:
        print(proc.stdout[-4000:], file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
