"""train_step takes an objective (backend/objective.py): the loss and the count it divides by come from it.

An objective that reports one unit per micro-batch must make the step's loss the mean of its per-micro-batch sums,
read off the model before the step with an independent forward; the default string form stays SFT.

Run: .venv/bin/pytest tests/test_objective.py -x -q
"""

import torch

from backend import ASSETS
from backend.config import load_train_config
from backend.distributed import build_accelerator
from backend.loss import trained_token_loss
from backend.objective import SFT
from backend.packing import PackedSampler, collate
from backend.train import train_step
from tests.dist_worker import MemoryDocuments, tiny_llama

BATCH, MICRO, SEQ = 4, 2, 16


class PerMicroBatch:
    """Twice the SFT sum, counted as one unit per micro-batch (neither is what the step would do by itself), with
    two figures of its own: the sum, and one per micro-batch."""

    def denominator(self, micro_batch):
        return 1

    def __call__(self, model, micro_batch):
        s = SFT("torch")(model, micro_batch)[0]
        return 2 * s, 1, {"sum": float(s), "units": 1.0}


def one_step(objective):
    """(step result, the SFT sums of each micro-batch on the initial weights, the number of trained tokens)."""
    cfg = load_train_config(ASSETS / "configs" / "tiny_train.yaml", ["model.multi_stage.zero_stage=0"])
    accelerator = build_accelerator(cfg)
    torch.manual_seed(0)
    model = tiny_llama("sdpa_packed", tied=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    data = MemoryDocuments()
    rows = PackedSampler(data.lengths, SEQ, seed=0).micro_batches(0, BATCH, MICRO)
    micro_batches = [collate(r, data, SEQ) for r in rows]
    with torch.no_grad():
        sums = [float(trained_token_loss(model, mb, "torch")[0]) for mb in micro_batches]
    trained = sum(mb["num_trained"] for mb in micro_batches)
    return train_step(model, optimizer, accelerator, micro_batches, objective), sums, trained


def test_the_step_divides_by_the_objectives_denominator():
    result, sums, _ = one_step(PerMicroBatch())
    assert result.stepped and result.trained_tokens == len(sums)
    assert abs(result.loss - 2 * sum(sums) / len(sums)) < 1e-4 * max(1.0, abs(result.loss))
    # the objective's figures: summed over the micro-batches, divided by the same denominator
    assert result.metrics.keys() == {"sum", "units"} and result.metrics["units"] == 1.0
    assert abs(result.metrics["sum"] - sum(sums) / len(sums)) < 1e-4 * max(1.0, result.metrics["sum"])


def test_a_cross_entropy_name_is_sft():
    result, sums, trained = one_step("torch")
    assert result.trained_tokens == trained
    assert abs(result.loss - sum(sums) / trained) < 1e-5
