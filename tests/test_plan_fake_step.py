"""The memory planner against the trainer's real step at the 8B widths, on fake tensors (tests/fake_step.py).

Full finetuning, ZeRO-3 over 8 (fake) ranks, bf16, one packed row of 4,096 tokens per rank, fused loss, checkpointing
off and on: backend.plan must be within 10% of the measured peak, at the phase where the peak occurs, and of each of
the forward and backward phases. The model has Llama-3.1-8B's exact widths (hidden 4,096, 32 heads, 8 KV heads, MLP
14,336, vocabulary 128,256) with 2 decoder layers instead of 32, to keep the test near 30 s on 2 cores; the planner
is given that same config (its formulas are per layer, and the 2-layer case is the harder one: the fixed parts, the
LM head's 1 GiB units and buffers, weigh most there). Not covered here: LoRA on one rank (the probe needs FSDP's
tracker) and the optimizer step's foreach temporary (CPU AdamW does not use foreach; the step is not the peak).
"""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from backend import ROOT
from backend.config import load_train_config
from backend.plan import model_shape, plan_memory

LAYERS, WORLD = 2, 8


def measure(checkpointing: bool) -> dict:
    cmd = [sys.executable, "-m", "tests.fake_step", "--layers", str(LAYERS), "--world", str(WORLD), "--json"]
    cmd += ["--checkpointing"] if checkpointing else []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("checkpointing", [False, True])
def test_planner_within_10_percent_of_the_real_step_on_fake_tensors(checkpointing):
    measured = measure(checkpointing)
    cfg = load_train_config(
        ROOT / "assets" / "configs" / "llama31_8b_magpie_train.yaml",
        [
            f"batch.batch_size={WORLD}",  # one micro-batch per rank, as measured
            f"run.num_processes={WORLD}",
            f"model.multi_stage.activation_checkpointing={'yes' if checkpointing else 'no'}",
        ],
    )
    shape = dataclasses.replace(model_shape(ROOT / "tests" / "data" / "llama-3.1-8b"), layers=LAYERS)
    plan = plan_memory(cfg, WORLD, shape=shape)
    gib = 2**30
    print(
        f"\ncheckpointing {checkpointing}: measured peak {measured['peak'] / gib:.2f} GiB at the "
        f"{measured['peak_phase']}, planned {plan.peak_bytes / gib:.2f} GiB at the {plan.peak_phase}; phases "
        + ", ".join(
            f"{name} {parts['Total'] / gib:.2f} vs {plan.phases[name] / gib:.2f}"
            for name, parts in measured["phases"].items()
        )
    )
    assert plan.peak_phase == measured["peak_phase"]
    assert abs(plan.peak_bytes / measured["peak"] - 1) <= 0.10
    for name in ("forward", "backward"):
        assert abs(plan.phases[name] / measured["phases"][name]["Total"] - 1) <= 0.10, name
    # what a rank really holds at the peak: its shards, the LM head's unit gathered twice (unsharded + all-gather
    # buffer), no unsharded gradient
    parts = measured["phases"][measured["peak_phase"]]
    assert parts.get("UNSHARDED_GRAD", 0) == 0
    assert parts["UNSHARDED_PARAM"] == parts["ALL_GATHER"] and parts["UNSHARDED_PARAM"] < 1.1 * gib
