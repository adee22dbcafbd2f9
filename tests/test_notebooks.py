"""The five notebooks run top to bottom, headless, and their assert cells hold.

    .venv/bin/pytest tests/test_notebooks.py -x -q            # all (the execution tests are marked slow)
    .venv/bin/pytest tests/test_notebooks.py -x -q -m 'not slow'   # only the static checks

Each notebook checks real outputs in its own ``assert`` cells (trained text = assistant replies + end-of-turn,
documents read back = their tokenization, the loss fell, a resumed run continued from its checkpoint...), so a
notebook that executes without a cell error has passed those checks. They run in order 1 -> 4 in one temporary
work directory (``SFT_NOTEBOOK_WORKDIR``): notebook 4 reuses the run that notebook 3 trained.

The kernel is pinned to the interpreter running pytest (a kernelspec written into a temporary JUPYTER_PATH entry,
which jupyter_client searches first), so a fresh clone needs only ``pip install -e .[test]``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = [
    "01_chat_templates.ipynb",
    "02_prepare_and_pack.ipynb",
    "03_train_and_watch.ipynb",
    "04_evaluate_and_chat.ipynb",
    "05_preference_tuning.ipynb",
]
# the real model and dataset one edit away: the SFT notebooks name Magpie, the DPO one a public preference set
REAL_DATA = {"05_preference_tuning.ipynb": ("backend.ASSETS", "HuggingFaceH4/ultrafeedback_binarized")}
CELL_TIMEOUT_S = 300


def _read(name):
    return nbformat.read(NOTEBOOK_DIR / name, as_version=4)


# ------------------------------------------------------------------------------------------------ static checks
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_clean(name):
    nb = _read(name)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    assert nb.cells[0].cell_type == "markdown", "a notebook opens with a short explanation"
    code = [c for c in nb.cells if c.cell_type == "code"]
    for c in code:
        assert not c.get("outputs") and c.get("execution_count") is None, f"{name}: committed with outputs"
    source = "\n".join(c.source for c in code)
    # the settings cell: tiny defaults, the real model and dataset one edit away
    tiny_data, real_data = REAL_DATA.get(
        name, ("backend.SAMPLE_DATA", "Magpie-Align/Magpie-Llama-3.1-Pro-MT-300K-Filtered")
    )
    assert "backend.TINY_MODEL" in source and tiny_data in source
    assert "meta-llama/Llama-3.1-8B-Instruct" in source
    assert real_data in source
    assert "SFT_NOTEBOOK_WORKDIR" in source or "work_dir()" in source or name.startswith("01")
    assert sum(line.lstrip().startswith("assert ") for line in source.splitlines()) >= 3, (
        f"{name}: needs assert cells that check real outputs"
    )


# ---------------------------------------------------------------------------------------------- execution
@pytest.fixture(scope="module")
def notebook_env(tmp_path_factory):
    """A kernelspec for this interpreter, a temporary work directory, small thread counts."""
    jupyter_dir = tmp_path_factory.mktemp("jupyter")
    spec_dir = jupyter_dir / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python 3 (tests)",
                "language": "python",
            }
        )
    )
    work_dir = tmp_path_factory.mktemp("notebook_work")
    mp = pytest.MonkeyPatch()
    mp.setenv("JUPYTER_PATH", os.pathsep.join(p for p in (str(jupyter_dir), os.environ.get("JUPYTER_PATH")) if p))
    mp.setenv("SFT_NOTEBOOK_WORKDIR", str(work_dir))
    mp.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "2"))
    mp.setenv("TOKENIZERS_PARALLELISM", "false")
    mp.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    yield work_dir
    mp.undo()


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name, notebook_env):
    nb = _read(name)
    # a first cell that reports the kernel's interpreter: the notebooks must run on this environment's python
    nb.cells.insert(0, nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=CELL_TIMEOUT_S, resources={"metadata": {"path": str(ROOT)}}
    )
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        # keep the executed notebook next to the work files: its outputs show what the assert saw
        nbformat.write(nb, notebook_env / f"failed_{name}")
        pytest.fail(f"{name}: a cell failed (executed copy: {notebook_env / f'failed_{name}'})\n{e}", pytrace=False)
    kernel_python = "".join(o.get("text", "") for o in nb.cells[0].outputs).strip()
    assert Path(kernel_python).resolve() == Path(sys.executable).resolve()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_notebook_3_checks_hold_with_lora(notebook_env, tmp_path, monkeypatch):
    """Notebook 3's one-line switch (``LORA``, read from SFT_NOTEBOOK_LORA here): the same stop/resume/export
    checks with LoRA adapters on the tiny model, plus its LoRA asserts (adapter export, trainable < total / 10)."""
    monkeypatch.setenv("SFT_NOTEBOOK_LORA", "1")
    monkeypatch.setenv("SFT_NOTEBOOK_WORKDIR", str(tmp_path))  # its own run: notebook 4 keeps the full one
    nb = _read("03_train_and_watch.ipynb")
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=CELL_TIMEOUT_S, resources={"metadata": {"path": str(ROOT)}}
    )
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        nbformat.write(nb, tmp_path / "failed_03_lora.ipynb")
        pytest.fail(f"notebook 3 with LoRA: a cell failed ({tmp_path / 'failed_03_lora.ipynb'})\n{e}", pytrace=False)
    events = (tmp_path / "run" / "events.jsonl").read_text()
    assert '"peft": "lora"' in events
