"""Fixtures shared by the test modules."""

import os
import subprocess
import sys

import pytest

from backend import ASSETS, ROOT

if os.path.basename(sys.argv[0]) == "mutmut" or sys.argv[0].endswith(os.path.join("mutmut", "__main__.py")):
    # mutmut forks every mutant's run from a process that has already trained models in the tests: a torch thread
    # pool started before the fork hangs the child in a futex, a wall-clock hang that mutmut's CPU-time limit never
    # ends. One thread means no pool (tests/MUTATION.md).
    os.environ["OMP_NUM_THREADS"] = "1"
    # the Rust tokenizer's thread pool did the same: the reference pass's mutants (tests/test_reference_pass.py
    # prepares data in the parent) hung at no CPU cost until it was off
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    # and no tqdm monitor thread, whose lock a child forked at the wrong moment would wait for at its first bar
    import tqdm

    tqdm.tqdm.monitor_interval = 0


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """The tiny one-step prepare (sample conversations -> masked, tokenized splits), made once per session with
    the real CLI. Read-only for the tests: a test that changes prepared data works on its own copy."""
    out = tmp_path_factory.mktemp("data") / "tiny"
    subprocess.run(
        [sys.executable, "-m", "backend.prepare", str(ASSETS / "configs" / "tiny_prepare.yaml"), f"output_path={out}"],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
        check=True,
        capture_output=True,
    )
    return out


@pytest.fixture(autouse=True)
def _fresh_chat_memos_under_mutmut():
    """Under mutmut (MUTANT_UNDER_TEST set) every test starts with backend.chat's memos empty: mutmut forks each
    mutant's run from a process that has already run the tests, so an end-of-turn marker or a template structure
    memoized there by the unmutated code would answer in place of the mutant (tests/MUTATION.md)."""
    if os.environ.get("MUTANT_UNDER_TEST"):
        from backend.chat import templates, tokens

        tokens._info_cache.clear()
        templates._compiled_cache.clear()
        templates._generation_cache.clear()
    yield
