#!/usr/bin/env bash
# Wheels that scripts/gpu_check.sh needs on a GPU machine without a package index, downloaded here (a machine that
# reaches PyPI) into the ignored folder .whl/ at the repository root; carry .whl/ to the GPU machine with the checkout.
#
# The GPU image (FACTS.md: Python 3.12, torch 2.11, transformers 5.17, accelerate 1.15, peft, pytest) lacks pydantic,
# which backend.config needs. Downloaded, for CPython $PYTHON_VERSION on manylinux x86_64, without dependencies (each
# one is named):
#   .whl/          pydantic, pydantic-core (compiled: the wheel for that Python), annotated-types, typing-inspection,
#                  typing-extensions                      (installed by gpu_check.sh when `import pydantic` fails)
#   .whl/pytest/   pytest, iniconfig, pluggy, packaging, pygments   (installed when `import pytest` fails)
# The studio's packages (gradio, plotly, datasets) are not needed by the check.
#
# Usage: bash scripts/gpu_wheels.sh [--python-version 3.12] [--dest DIR] [--help]
# Then on the GPU machine, from the repository root with .whl/ beside it: bash scripts/gpu_check.sh
# Exit codes: 0 done; 1 pip could not download a wheel; 2 bad arguments.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
PYTHON_VERSION=3.12
DEST="$ROOT/.whl"
# the versions the CPU set-up resolved together (constraints/cpu.txt's environment)
CHECK_WHEELS=(pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
              typing-extensions==4.16.0)
PYTEST_WHEELS=(pytest==9.2.0 iniconfig==2.3.1 pluggy==1.7.0 packaging==26.4 pygments==2.21.0)

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; }
need() { [ $# -ge 2 ] && [ -n "$2" ] || { echo "error: $1 needs a value (see --help)" >&2; exit 2; }; }

while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --python-version) need "$@"; PYTHON_VERSION="$2"; shift 2 ;;
    --dest) need "$@"; DEST="$2"; shift 2 ;;
    *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

download() {  # download DIR WHEEL...
  local dir="$1"; shift
  mkdir -p "$dir"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$dir" "$@" \
    || { echo "error: pip could not download $* for Python $PYTHON_VERSION (is the package index reachable?)" >&2; exit 1; }
}

download "$DEST" "${CHECK_WHEELS[@]}"
download "$DEST/pytest" "${PYTEST_WHEELS[@]}"
echo "wheels for Python $PYTHON_VERSION in $DEST:"
ls -1 "$DEST" "$DEST/pytest" | grep '\.whl$' | sed 's/^/  /'
