#!/usr/bin/env bash
# SFT Studio developer entry point: sets up the environment, then runs one thing.
#
#   bash scripts/dev.sh studio [studio args...]   set up, then launch the studio on 127.0.0.1:7860
#   bash scripts/dev.sh test   [pytest args...]   set up (incl. Chromium for browser tests), then run the test suite
#   bash scripts/dev.sh setup                     set up only
#   bash scripts/dev.sh llama-cpp                 build/install llama-cpp-python + llama.cpp's converter only
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
  log "installing chromium (Debian package) for the browser tests"
  apt_install chromium || log "browser tests will be skipped"
}

apt_install() {
  # Debian packages the set-up needs (chromium for the browser tests, a C/C++ toolchain for llama-cpp-python)
  local sudo=()
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then sudo=(sudo); else log "not root and no sudo: install $* yourself"; return 1; fi
  fi
  if ! command -v apt-get >/dev/null 2>&1; then log "no apt-get: install $* yourself"; return 1; fi
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "$@" >/dev/null
}

setup_llama_cpp() {
  # GGUF export (backend/gguf.py) runs llama.cpp's converter and checks the file with llama-cpp-python, which
  # compiles llama.cpp from source (about 17 min on 2 cores, measured). The wheel is built ONCE per version and
  # cached outside the venv; its sdist's vendored llama.cpp (convert_hf_to_gguf.py + conversion/ + gguf-py) is
  # unpacked beside it: the converter that matches the bindings. Keep the version equal to
  # backend/gguf.py's LLAMA_CPP_PYTHON_VERSION.
  local ver=0.3.36 cache="${SFT_STUDIO_CACHE:-$HOME/.cache/sft-studio}"
  local wheels="$cache/wheels/llama-cpp-python-$ver" src="$cache/llama.cpp-$ver"
  if ! "$PY" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$ver')" 2>/dev/null; then
    if ! ls "$wheels"/llama_cpp_python-"$ver"-*.whl >/dev/null 2>&1; then
      if ! command -v c++ >/dev/null 2>&1; then
        log "no C++ compiler: installing build-essential (Debian) to build llama-cpp-python"
        apt_install build-essential || return 1
      fi
      log "building llama-cpp-python $ver (CPU only; once, cached in $wheels)"
      mkdir -p "$wheels"
      CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_BLAS=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF \
-DGGML_OPENMP=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
-DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_MTMD=OFF" \
        CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$PY" -m pip wheel -q --no-deps "llama-cpp-python==$ver" -w "$wheels" ||
          return 1  # (called in an || list, where set -e does not apply: every step returns on failure)
    fi
    "$PY" -m pip install -q --no-deps "$wheels"/llama_cpp_python-"$ver"-*.whl || return 1
    "$PY" -m pip install -q diskcache jinja2 numpy typing-extensions -c constraints/cpu.txt || return 1
  fi
  if [ ! -f "$src/convert_hf_to_gguf.py" ]; then
    log "unpacking llama.cpp's converter (llama-cpp-python $ver sdist) into $src"
    local tmp; tmp="$(mktemp -d)"
    "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$ver" -d "$tmp" || return 1
    tar -xzf "$tmp"/llama_cpp_python-"$ver".tar.gz -C "$tmp" || return 1
    mkdir -p "$cache" && rm -rf "$src.tmp" && mv "$tmp/llama_cpp_python-$ver/vendor/llama.cpp" "$src.tmp" &&
      mv "$src.tmp" "$src" || return 1
    rm -rf "$tmp"
  fi
}

cmd="${1:-studio}"; shift || true
case "$cmd" in
  setup)  setup_python test,bench; setup_llama_cpp ;;
  llama-cpp) setup_python test,bench; setup_llama_cpp ;;
  studio) setup_python test,bench; exec "$PY" -m studio "$@" ;;
  test)
    setup_python test,bench
    setup_browser
    # GGUF tests (tests/test_gguf.py); the build is set-up time, never the tests' time. A failed build does not stop
    # the other tests: test_gguf.py then fails under CI=true (so CI notices) and skips, saying why, elsewhere
    setup_llama_cpp || log "llama-cpp-python could not be set up: GGUF tests will fail under CI=true, else skip"
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
    # lint and format first: a new finding fails the run like a failing test (config in pyproject.toml)
    # (two commands, not an && list: set -e does not stop on a failure inside an && list)
    "$VENV/bin/ruff" check .
    "$VENV/bin/ruff" format --check .
    exec "$PY" -m pytest "$@" ;;
  *) log "usage: bash scripts/dev.sh {studio|test|setup|llama-cpp} [args...]"; exit 2 ;;
esac
