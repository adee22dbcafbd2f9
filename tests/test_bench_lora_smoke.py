"""Smoke run of bench/peers_lora.py: 2 LoRA steps of ours and of TRL's SFTTrainer + peft_config on a tiny model.

    .venv/bin/pytest tests/test_bench_lora_smoke.py -x -q

Proves the harness executes end to end (setup, `python -m backend.train` with LoRA, TRL with peft_config, the
row-by-row agreement run, report) and that it compares the same computation: on identical rows, seed and LoRA
settings, TRL reproduces our per-step losses and trained-token counts. Timings are never asserted.
"""

import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_peers_lora_harness_runs_and_losses_agree(tmp_path):
    pytest.importorskip("trl")
    sys.path.insert(0, str(BENCH))
    import peers_lora

    out, results = tmp_path / "lora.json", tmp_path / "lora.md"
    args = "--steps 2 --warmup 1 --repeats 1 --conversations 120 --shape tiny --vocab 600 --threads 1 --in-process"
    rc = peers_lora.main(
        [*args.split(), "--work", str(tmp_path / "work"), "--json", str(out), "--results", str(results)]
    )
    assert rc == 0
    data = json.loads(out.read_text())
    for name, (run,) in data["runs"].items():
        assert len(run["step_times"]) == 2 and all(t > 0 for t in run["step_times"]), name
        assert all(math.isfinite(x) and x > 0 for x in run["losses"]), name
    agreement = data["agreement"]
    assert agreement["trl_trained"] == agreement["ours_trained"]
    # step 2 depends on the initial lora_A through step 1's update: equal losses = same adapters, same math
    assert agreement["max_rel_trl"] < 1e-5, agreement
    assert 0 < data["meta"]["trainable"] < data["meta"]["num_parameters"]
    assert "ours vs TRL (LoRA)" in results.read_text()
