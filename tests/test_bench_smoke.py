"""Smoke run of bench/peers.py: 2 optimizer steps per contestant on a tiny model, through main() itself.

    .venv/bin/pytest tests/test_bench_smoke.py -x -q

Proves the harness executes end to end (setup, backend.prepare, `python -m backend.train`, TRL, Trainer, the
minimal loop, the loss-agreement run, packing comparison, report) and that the figures it compares are the same
computation: on identical rows and initialization, ours, the minimal loop and TRL give the same per-step loss.
Timings are never asserted.
"""

import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_peers_harness_runs_and_contestants_agree(tmp_path):
    pytest.importorskip("trl")
    sys.path.insert(0, str(BENCH))
    import peers

    out = tmp_path / "peers.json"
    results = tmp_path / "RESULTS.md"
    rc = peers.main(
        [
            "--steps",
            "2",
            "--warmup",
            "1",
            "--repeats",
            "1",
            "--conversations",
            "120",
            "--shape",
            "tiny",
            "--vocab",
            "600",
            "--threads",
            "1",
            "--in-process",
            "--work",
            str(tmp_path / "work"),
            "--json",
            str(out),
            "--write",
            "--results",
            str(results),
        ]
    )
    assert rc == 0
    data = json.loads(out.read_text())
    runs = data["runs"]
    assert set(runs) == {"ours", "trl", "trainer", "minimal"}
    for name, (run,) in runs.items():
        assert len(run["step_times"]) == 2 and all(t > 0 for t in run["step_times"]), name
        assert all(math.isfinite(x) and x > 0 for x in run["losses"]), name
        assert all(n > 0 for n in run["trained"]), name
        assert all(t >= n for t, n in zip(run["tokens"], run["trained"], strict=False)), name
    # same rows, same init, same optimizer: the minimal loop and TRL fed our rows reproduce our losses and counts
    ours = runs["ours"][0]
    assert runs["minimal"][0]["trained"] == ours["trained"]
    assert data["agreement"]["trl_trained"] == ours["trained"]
    assert data["agreement"]["max_rel_minimal"] < 1e-4
    assert data["agreement"]["max_rel_trl"] < 1e-4
    # packing: ours loses exactly the documents longer than the sequence length; TRL's bfd truncates instead
    stats = data["meta"]["data"]
    assert data["packing"]["ours best_fit"]["tokens_lost"] == stats["over_seq_tokens"]
    assert data["packing"]["TRL pack_dataset bfd"]["documents_truncated"] == stats["over_seq_docs"]
    for name, p in data["packing"].items():
        assert 0 < p["fill"] <= 1, name
    text = results.read_text()
    assert "| ours (backend.train" in text and "Loss agreement" in text and "TRL pack_dataset bfd" in text
