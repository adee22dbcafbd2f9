"""Smoke run of bench/bench_dpo.py: one epoch of 24 shipped pairs for ours and for TRL's DPOTrainer, tiny sizes.

    .venv/bin/pytest tests/test_bench_dpo_smoke.py -x -q -m slow

Proves the harness executes end to end (prepare, `python -m backend.train` with training.objective: dpo, TRL's
DPOTrainer on the pre-tokenized pairs, the reference-pass timing, report) and that both contestants train the same
thing: the same pairs per step and, over one epoch each, the same trained tokens. Timings are never asserted.
"""

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_dpo_runs_and_contestants_train_the_same_pairs(tmp_path):
    pytest.importorskip("trl")
    sys.path.insert(0, str(BENCH))
    import bench_dpo

    out, results = tmp_path / "dpo.json", tmp_path / "dpo.md"
    # 24 shipped pairs of 80-113 tokens with their prompt placed once (training.dpo.share_prompt, on for CPU; 150-200
    # whole): one per row of 128 (two never fit), 2 rows a step -> 12 steps are one epoch for both contestants
    args = "--pairs 24 --steps 12 --warmup 1 --repeats 1 --seq-len 128 --rows-per-step 2 --threads 1 --write"
    rc = bench_dpo.main(
        [*args.split(), "--work", str(tmp_path / "work"), "--json", str(out), "--results", str(results)]
    )
    assert rc == 0
    data = json.loads(out.read_text())
    (ours,), (trl,) = data["runs"]["ours"], data["runs"]["trl"]
    for run in (ours, trl):
        assert len(run["step_times"]) == 12 and all(t > 0 for t in run["step_times"])
    assert ours["pairs"] == trl["pairs"] and sum(ours["pairs"]) == 24
    assert sum(ours["trained"]) == sum(trl["trained"]) > 0  # the same answers' tokens, epoch for epoch
    assert data["reference"]["pairs"] == 24 and data["reference"]["reference_s"] > 0
    text = results.read_text()
    assert "| ours (`backend.train`" in text and "Reference pass" in text
