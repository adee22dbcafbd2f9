"""Training objectives: what one micro-batch contributes to a step's loss (STYLE.md point 13).

An objective is called as ``objective(model, micro_batch) -> (loss_sum, denominator)``: a 0-dim fp32 sum with a
grad path, and the count the step divides by. ``objective.denominator(micro_batch)`` gives that count before any
forward, so ``backend.train.train_step`` can scale each micro-batch's backward by 1 / (the global count of the whole
step) and keep accumulation, scaling, clipping and the finite check without importing a loss. SFT's masked
cross-entropy is one objective; a preference objective (DPO, issue #24) is meant to land as another, in
``backend/preference.py``, with pairs as its denominator.

>>> SFT().denominator({"num_trained": 7})
7
>>> SFT("torch").impl
'torch'
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SFT:
    """Sum of cross-entropy over the trained (unmasked) tokens of a packed micro-batch; denominator: their count.

    ``impl``: "fused" (chunked CE through the LM head, backend/loss.py) or "torch" (plain F.cross_entropy).
    """

    impl: str = "fused"

    def denominator(self, micro_batch: dict) -> int:
        """The trained-target count collate stored in the micro-batch (known before the forward)."""
        return micro_batch["num_trained"]

    def __call__(self, model, micro_batch: dict):
        """Forward ``micro_batch`` (tensors on the model's device); return (CE sum, trained-target count)."""
        from backend.loss import trained_token_loss

        return trained_token_loss(model, micro_batch, self.impl)


def as_objective(objective):
    """An objective as given, or a cross-entropy implementation name as shorthand for ``SFT(name)``.

    >>> as_objective("torch")
    SFT(impl='torch')
    >>> as_objective(SFT()) == SFT()
    True
    """
    return SFT(objective) if isinstance(objective, str) else objective
