"""Fixtures shared by the test modules."""

import os
import subprocess
import sys

import pytest

from backend import ASSETS, ROOT


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
