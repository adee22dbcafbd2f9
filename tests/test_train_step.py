"""The trainer's optimizer step (backend.train.train_step) does not depend on how the step is cut.

One optimizer step over k micro-batches of one row must give the weights of the same step as one micro-batch of k
rows (gradient accumulation), and 2 processes the weights of 1 (tests/test_distributed.py runs the 2-process case
through the same worker). The data is packed so that micro-batches and ranks hold unequal trained-token counts,
including a micro-batch with none: a loss normalized per micro-batch (a mean of means) or per rank would change
the weights, and the test shows that it does.

Run: .venv/bin/pytest tests/test_train_step.py -x -q
"""

import math

import pytest
import torch

import backend.loss as loss_mod
from backend import ASSETS
from backend.config import load_train_config
from backend.distributed import build_accelerator
from backend.packing import PackedSampler, collate
from backend.train import train_step
from tests.dist_worker import MemoryDocuments, tiny_llama

BATCH, SEQ = 4, 16


def run(micro_batch_size: int, steps: int = 2, dtype: str = "fp32", wrap_loss=None, monkeypatch=None):
    """``steps`` optimizer steps of the tiny untied Llama through train_step; returns (weights, per-step counts);
    run.results holds the StepResults of the last call."""
    cfg = load_train_config(
        ASSETS / "configs" / "tiny_train.yaml",
        [
            f"batch.batch_size={BATCH}",
            f"batch.micro_batch_size={micro_batch_size}",
            f"batch.sequence_length={SEQ}",
            "model.multi_stage.zero_stage=0",
            f"model.distributed.training_dtype={dtype}",
        ],
    )
    accelerator = build_accelerator(cfg)
    model = tiny_llama("sdpa_packed", tied=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    data = MemoryDocuments()
    sampler = PackedSampler(data.lengths, SEQ, seed=cfg.data.sampling.seed)
    counts, run.results = [], []
    for step in range(steps):
        micro_batches = [collate(rows, data, SEQ) for rows in sampler.micro_batches(step, BATCH, micro_batch_size)]
        counts.append([mb["num_trained"] for mb in micro_batches])
        if wrap_loss is not None:
            monkeypatch.setattr(loss_mod, "trained_token_loss", wrap_loss(loss_mod.trained_token_loss, counts[-1]))
        result = train_step(model, optimizer, accelerator, micro_batches, "fused", clip=0.0)
        assert result.stepped and result.trained_tokens == sum(counts[-1])
        run.results.append(result)
        if wrap_loss is not None:
            monkeypatch.undo()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, counts


def max_diff(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_k_micro_batches_equal_one_micro_batch_of_k_rows():
    one, counts_one = run(micro_batch_size=BATCH)
    split, counts_split = run(micro_batch_size=1)
    assert [sum(c) for c in counts_one] == [sum(c) for c in counts_split]
    assert any(len(set(c)) > 1 for c in counts_split)  # unequal trained counts across the micro-batches
    assert max_diff(one, split) <= 1e-6


def test_a_per_micro_batch_mean_would_be_caught(monkeypatch):
    """The bug the test above must catch: each micro-batch weighted by its own trained count (a mean of
    per-micro-batch means) instead of the step's. With these counts it moves the weights far past 1e-6."""

    def mean_of_means(real, counts):
        total, k = sum(counts), len(counts)

        def loss(model, mb, impl="fused"):
            s, n = real(model, mb, impl)
            return (s * total / (n * k) if n else s), n  # train_step divides by total: s / n / k

        return loss

    one, _ = run(micro_batch_size=BATCH)
    buggy, _ = run(micro_batch_size=1, wrap_loss=mean_of_means, monkeypatch=monkeypatch)
    assert max_diff(one, buggy) > 1e-4


def test_bf16_autocast_step_matches_across_micro_batch_splits():
    """bf16 autocast (the 8B config's dtype) through the same step: losses and gradient norms independent of the
    split to bf16 precision (weights are not compared: AdamW turns bf16 noise on near-zero gradients into
    lr-sized steps), and the fp32 master weights stay fp32."""
    one, _ = run(micro_batch_size=BATCH, dtype="bf16")
    ref = run.results
    split, _ = run(micro_batch_size=1, dtype="bf16")
    assert all(v.dtype == torch.float32 for v in one.values())
    assert [r.loss for r in run.results] == pytest.approx([r.loss for r in ref], rel=1e-2)
    assert [r.grad_norm for r in run.results] == pytest.approx([r.grad_norm for r in ref], rel=2e-2)


def prepared(make_optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2)):
    """(model, optimizer, accelerator): the tiny untied Llama prepared for one process, no sharding."""
    cfg = load_train_config(ASSETS / "configs" / "tiny_train.yaml", ["model.multi_stage.zero_stage=0"])
    accelerator = build_accelerator(cfg)
    model = tiny_llama("sdpa_packed", tied=False)
    model, optimizer = accelerator.prepare(model, make_optimizer(model.parameters()))
    return model, optimizer, accelerator


def one_batch(micro_batch_size=BATCH):
    """Step 0's rows of the packed memory documents, collated into micro-batches."""
    data = MemoryDocuments()
    rows = PackedSampler(data.lengths, SEQ, seed=0).micro_batches(0, BATCH, micro_batch_size)
    return [collate(r, data, SEQ) for r in rows]


def test_a_step_is_the_gradient_of_the_mean_loss_over_the_steps_trained_tokens():
    """With SGD (lr 1, which shows the gradient's scale that AdamW hides): one step over micro-batches of unequal
    trained counts moves each weight by minus the gradient of the step's summed CE over its trained tokens divided
    by their count, computed here on a copy of the model; the reported norm is that gradient's. Without
    ``objective`` and ``clip`` the step is ("fused", clip=0.0), on a norm past 1 (where a clipping default would
    change it)."""
    batches = one_batch(micro_batch_size=1)
    assert len({int(b["num_trained"]) for b in batches}) > 1
    ref = tiny_llama("sdpa_packed", tied=False)
    init = {k: v.detach().clone() for k, v in ref.named_parameters()}
    total = sum(int(b["num_trained"]) for b in batches)
    (sum(loss_mod.trained_token_loss(ref, b, "torch")[0] for b in batches) / total).backward()
    grads = {k: p.grad for k, p in ref.named_parameters()}
    weights, norms = [], []
    for args in ((), ("fused", 0.0)):
        model, optimizer, accelerator = prepared(lambda params: torch.optim.SGD(params, lr=1.0))
        result = train_step(model, optimizer, accelerator, batches, *args)
        weights.append({k: v.detach().cpu().clone() for k, v in model.named_parameters()})
        norms.append(result.grad_norm)
    assert norms[0] == pytest.approx(norms[1], rel=1e-6) and norms[0] > 1.0 and max_diff(*weights) < 1e-6
    assert norms[0] == pytest.approx(float(torch.sqrt(sum((g**2).sum() for g in grads.values()))), rel=1e-5)
    assert max_diff(weights[0], {k: init[k] - grads[k] for k in init}) < 1e-5


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_loss_drops_the_step(monkeypatch, bad):
    """train_step never applies a NaN/inf step: gradients are dropped, weights unchanged, stepped is False."""
    model, optimizer, accelerator = prepared()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    real = loss_mod.trained_token_loss
    monkeypatch.setattr(loss_mod, "trained_token_loss", lambda m, mb, impl: (real(m, mb, impl)[0] * bad, 1))
    result = train_step(model, optimizer, accelerator, one_batch(), "fused")
    assert not result.stepped
    assert max_diff(before, model.state_dict()) == 0
    assert all(p.grad is None for p in model.parameters())


def test_a_non_finite_gradient_with_a_finite_loss_drops_the_step():
    """A finite loss whose gradient is not (one parameter's gradient made inf by a hook): no update, stepped False
    and, without fp16's grad scaler, not an overflow (which would step)."""
    model, optimizer, accelerator = prepared()
    next(model.parameters()).register_hook(lambda g: torch.full_like(g, float("inf")))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    result = train_step(model, optimizer, accelerator, one_batch(), "fused")
    assert math.isfinite(result.loss) and result.grad_norm == float("inf")
    assert not result.stepped and not result.overflow
    assert max_diff(before, model.state_dict()) == 0
