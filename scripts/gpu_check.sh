#!/usr/bin/env bash
# GPU check: every optimizer x every task smoke run on CUDA under bf16 autocast, small-CNN and
# ResNet-50 (synthetic, batch 128) step ratios vs SGD with the cost model's floor, and one real
# `ngbench train` per task; one JSON + a short markdown table (scripts/gpu_check.py says more).
#
#   scripts/gpu_check.sh                          # on a GPU machine, < 8 minutes
#   scripts/gpu_check.sh --dry-run --out /tmp/gc  # the whole script on the CPU, tiny sizes
#
# Output: results/gpu_check/gpu_check.{json,md} (the JSON is rewritten after every section, so
# a run stopped by the hard limit below keeps what was done).  PYTHON picks the interpreter
# (default: .venv/bin/python if present, else python3); GPU_CHECK_LIMIT_S the hard limit (480).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LIMIT="${GPU_CHECK_LIMIT_S:-480}"
if command -v timeout >/dev/null; then
  exec timeout --signal=TERM "$LIMIT" "$PY" scripts/gpu_check.py "$@"
fi
exec "$PY" scripts/gpu_check.py "$@"
