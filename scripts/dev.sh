#!/usr/bin/env bash
# SFT Studio developer entry point: sets up the environment, then runs one thing.
#
#   bash scripts/dev.sh studio [studio args...]   set up, then launch the studio on 127.0.0.1:7860
#   bash scripts/dev.sh test   [pytest args...]   set up (incl. Chromium for browser tests), then run the test suite
#   bash scripts/dev.sh setup                     set up only
#
# Set-up is idempotent and fast when nothing changed: a stamp records the hash of pyproject.toml and the
# constraints. On a machine without an NVIDIA GPU the CPU build of torch is pinned (constraints/cpu.txt), so
# pip never pulls the multi-GB CUDA wheels; on a GPU box torch is left to resolve to a CUDA build.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${SFT_STUDIO_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"

log() { printf '[sft-studio] %s\n' "$*" >&2; }

find_python() {
  for candidate in python3.12 python3.11 python3.10 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; raise SystemExit(sys.version_info < (3, 10))' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  log "Python 3.10 or newer is required (python3 -m venv must work)."; exit 1
}

setup_python() {
  local extras="$1"
  if [ ! -x "$PY" ]; then
    local base; base="$(find_python)"
    log "creating virtual environment in $VENV with $base"
    "$base" -m venv "$VENV"
  fi
  local constraint=() gpu=no
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpu=yes; else constraint=(-c constraints/cpu.txt); fi
  local stamp="$VENV/.sft-studio-${extras/,/-}.stamp"
  local want; want="$(cat pyproject.toml constraints/cpu.txt | sha256sum | cut -c1-16)-gpu=$gpu"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return 0; fi
  log "installing sft-studio[$extras] (gpu=$gpu) into $VENV"
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q -e ".[$extras]" "${constraint[@]}"
  echo "$want" > "$stamp"
}

setup_browser() {
  # Browser tests drive the real page in Debian's Chromium through playwright (never `playwright install`).
  if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then return 0; fi
  local sudo=()
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then sudo=(sudo); else log "chromium missing and not root: browser tests will be skipped"; return 0; fi
  fi
  if command -v apt-get >/dev/null 2>&1; then
    log "installing chromium (Debian package) for the browser tests"
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq chromium >/dev/null
  else
    log "no apt-get: install chromium yourself for the browser tests"
  fi
}

cmd="${1:-studio}"; shift || true
case "$cmd" in
  setup)  setup_python test,bench ;;
  studio) setup_python test,bench; exec "$PY" -m studio "$@" ;;
  test)
    setup_python test,bench
    setup_browser
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
    # lint and format first: a new finding fails the run like a failing test (config in pyproject.toml)
    # (two commands, not an && list: set -e does not stop on a failure inside an && list)
    "$VENV/bin/ruff" check .
    "$VENV/bin/ruff" format --check .
    exec "$PY" -m pytest "$@" ;;
  *) log "usage: bash scripts/dev.sh {studio|test|setup} [args...]"; exit 2 ;;
esac
