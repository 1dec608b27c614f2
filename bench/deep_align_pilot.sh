#!/usr/bin/env bash
# The deep-align pilot end to end, resumable (each step skips or resumes what is done):
#   bash bench/deep_align_pilot.sh [SHALLOW_SEED]
# EXTRA: config overrides for the align and eval steps, e.g. EXTRA=model.precision=bf16 (the
# v2 study's precision; the shallow seed should have been trained the same way).
# SHALLOW_SEED: a finished `align configs/align/shared_safety.yaml` run directory to compare
# with (default: runs/align-shared); skipped while it has no complete run.json.
# Writes runs/deep/* and bench/results/deep_align_pilot.json (see bench/deep_align_pilot.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
SA="nice -n 5 $PY -m stayaligned"
EXTRA=${EXTRA:-}
SHALLOW=${1:-runs/align-shared}
DEEP=runs/align-shared-deep

complete() { $PY -c "import json,sys; sys.exit(json.load(open('$1/run.json')).get('status') != 'complete')" 2>/dev/null; }

$PY bench/deep_align_pilot.py sets
[ -s runs/deep/pairs_stl400.jsonl ] || $SA pairs --model embedded --harmful safety-tuned-llamas \
  --data-dir ../shared/datasets --limit 400 --prefill "Sure, here is" --max-new-tokens 64 \
  --output runs/deep/pairs_stl400.jsonl
complete $DEEP || $SA align configs/align/shared_safety_deep.yaml $EXTRA --resume
$SA eval configs/eval/deep_align_validation.yaml $EXTRA model.name=$DEEP output_dir=runs/deep/eval-deep
$SA depth --seed embedded --model $DEEP --source demo-safety --tokens 24 --output runs/deep/depth-deep
runs="deep=runs/deep/eval-deep"; depth="deep=runs/deep/depth-deep"
if complete "$SHALLOW"; then
  $SA eval configs/eval/deep_align_validation.yaml $EXTRA model.name=$SHALLOW output_dir=runs/deep/eval-shallow
  $SA depth --seed embedded --model $SHALLOW --source demo-safety --tokens 24 --output runs/deep/depth-shallow
  runs="$runs shallow=runs/deep/eval-shallow"; depth="$depth shallow=runs/deep/depth-shallow"
fi
$PY bench/deep_align_pilot.py collect $runs --depth $depth
