#!/usr/bin/env bash
# The GPU check on a lent GPU machine (README "GPU check"), from a bare Python with torch:
# the carried wheels (make gpu-wheels -> build/gpu-wheels) go into build/gpu-site, the project
# runs from this checkout through PYTHONPATH (no virtual environment, nothing downloaded), and
# bench/gpu/check.py writes its results to $OUT.
#
#   bash bench/gpu/run.sh                              # the GPU run (GPU_BUDGET=450 s in all)
#   bash bench/gpu/run.sh --device cpu --tiny --inline # the CPU dry run
#
# Extra arguments go to check.py (--steps, --budget, ...). PYTHON, GPU_WHEELS, GPU_SITE and OUT
# override the interpreter and the folders.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
start=$(date +%s)
if [ -z "${PYTHON:-}" ]; then  # the first interpreter that has torch
  for c in python3 python python3.12; do
    if command -v "$c" >/dev/null && "$c" -c "import torch" 2>/dev/null; then PYTHON=$c; break; fi
  done
fi
PY=$(command -v "${PYTHON:-python3}")
WHEELS=${GPU_WHEELS:-build/gpu-wheels}
SITE=${GPU_SITE:-$PWD/build/gpu-site}
OUT=${OUT:-$PWD/build/gpu-out}
mkdir -p "$OUT"
echo "run.sh: $("$PY" -V 2>&1) at $PY, in $PWD, out $OUT" | tee -a "$OUT/check.log"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  "$PY" bench/gpu/wheels.py install --wheels "$WHEELS" --target "$SITE" 2>&1 \
    | tee -a "$OUT/check.log" \
    || echo "run.sh: installing the wheels failed; going on with what is importable"
  PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "run.sh: no wheels in $WHEELS: using this Python's own packages" | tee -a "$OUT/check.log"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -f "$WHEELS/tokenizer/tokenizer.json" ]; then
  DISTILL_GPU_TOKENIZER="$(cd "$WHEELS/tokenizer" && pwd)"
  export DISTILL_GPU_TOKENIZER
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export DISTILL_CACHE=${DISTILL_CACHE:-$PWD/build/distill-cache}
budget=$(( ${GPU_BUDGET:-450} - ($(date +%s) - start) ))
exec "$PY" bench/gpu/check.py --out "$OUT" --budget "$budget" "$@"
