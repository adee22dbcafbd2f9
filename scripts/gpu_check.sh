#!/usr/bin/env bash
# GPU check of SFT Studio, one prepared script for a machine with an NVIDIA GPU (< 8 minutes on one H100/H200):
#   1. `pytest -m gpu` (the tests that need CUDA);
#   2. bench/bench_gpu.py: backend.train on the Llama-3.1-8B shape with fewer layers (random init, bf16, sequence
#      4,096, packed Magpie-like lengths), activation checkpointing off and on, for the attention tier the trainer
#      selects and sdpa_packed, plus LoRA / QLoRA when peft / bitsandbytes are installed: tokens/s/GPU, MFU against
#      the bf16 matmul rate measured in the same run, peak memory against backend.plan's estimate;
#   3. writes bench/GPU.md (date, machine, figures). Nothing is written without a GPU.
#
# Usage: bash scripts/gpu_check.sh [--layers N] [--steps N] [--out FILE] [--skip-tests] [--help]
# Exit codes: 0 done; 1 a test or a case failed (bench/GPU.md says which); 2 no CUDA device, or bad arguments.
#
# Needs on the GPU machine (no network): python3 with a CUDA build of torch, transformers, accelerate, safetensors,
# tokenizers, numpy, pyyaml, tqdm, psutil; optional: peft (LoRA case), bitsandbytes (QLoRA case), flash-attn (its
# attention tier). Wheels it needs beyond those, made beforehand on a machine with the package index by
# `bash scripts/gpu_wheels.sh` (cp312 manylinux x86_64 by default) into .whl/ at the repository root, carried with
# the checkout, and installed with `pip --no-index` into /tmp/site:
#   .whl/*.whl         when pydantic is missing: pydantic, pydantic-core (compiled for the machine's Python),
#                      annotated-types, typing-inspection, typing-extensions
#   .whl/pytest/*.whl  when pytest is missing: pytest, iniconfig, pluggy, packaging, pygments
# (the studio's packages, gradio/plotly/datasets, are not needed).
# The device run, in one command from the repository root (carry .whl): bash scripts/gpu_check.sh
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
LAYERS=4
STEPS=10
OUT="$ROOT/bench/GPU.md"
SKIP_TESTS=0

usage() { sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; }

need() { [ $# -ge 2 ] && [ -n "$2" ] || { echo "error: $1 needs a value (see --help)" >&2; exit 2; }; }

while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --layers) need "$@"; LAYERS="$2"; shift 2 ;;
    --steps) need "$@"; STEPS="$2"; shift 2 ;;
    --out) need "$@"; OUT="$2"; shift 2 ;;
    --skip-tests) SKIP_TESTS=1; shift ;;
    *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 2)' 2>/dev/null; then
  echo "error: no CUDA device (torch.cuda.is_available() is False, or torch is missing): this GPU check" \
       "measures nothing on CPU and writes nothing. Run it on a machine with an NVIDIA GPU." >&2
  exit 2
fi

wheels=()
if ! "$PY" -c 'import pydantic' 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 || {
    echo "error: pydantic is not installed and there is no .whl/ folder with its wheels: run" \
         "'bash scripts/gpu_wheels.sh' on a machine with the package index and carry .whl/ here" >&2; exit 1; }
  wheels+=(.whl/*.whl)
fi
if [ "$SKIP_TESTS" = 0 ] && ! "$PY" -c 'import pytest' 2>/dev/null; then
  ls .whl/pytest/*.whl >/dev/null 2>&1 || {
    echo "error: pytest is not installed and there is no .whl/pytest/ (scripts/gpu_wheels.sh makes it);" \
         "or pass --skip-tests" >&2; exit 1; }
  wheels+=(.whl/pytest/*.whl)
fi
if [ ${#wheels[@]} -gt 0 ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}" \
    || { echo "error: could not install the wheels in .whl/" >&2; exit 1; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

status=0
summary="skipped (--skip-tests)"
if [ "$SKIP_TESTS" = 0 ]; then
  echo "== pytest -m gpu"
  log="$(mktemp)"
  timeout 150 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  summary="$(grep -E '(passed|failed|error|skipped|no tests ran)' "$log" | tail -1)"
  [ -n "$summary" ] || summary="exit code $rc"
  # 5 = no test collected: not a failure of the machine
  if [ "$rc" != 0 ] && [ "$rc" != 5 ]; then status=1; fi
  rm -f "$log"
fi

echo "== bench/bench_gpu.py (layers $LAYERS, steps $STEPS)"
"$PY" bench/bench_gpu.py --layers "$LAYERS" --steps "$STEPS" --out "$OUT" --budget-s 330 --pytest-summary "$summary" \
  || status=1
echo "== wrote $OUT (exit $status)"
exit $status
