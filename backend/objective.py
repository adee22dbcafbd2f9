"""Training objectives: what one micro-batch contributes to a step's loss (STYLE.md point 13).

An objective is called as ``objective(model, micro_batch) -> (loss_sum, denominator[, figure sums])``: a 0-dim fp32
sum with a grad path, the count the step divides by, and optionally sums of its own figures (the step divides them
by the same count). ``objective.denominator(micro_batch)`` gives that count before any forward, so
``backend.train.train_step`` can scale each micro-batch's backward by 1 / (the global count of the whole step) and
keep accumulation, scaling, clipping and the finite check without importing a loss. The objective also says how its
rows are made and read, so that ``fit`` has no branch per objective:

    objective.sampler(dataset, cfg)                       the split's sampler of rows (backend.packing)
    objective.collate(rows, dataset, batch, reference)    a micro-batch of those rows
    objective.report(result)                              the train event's fields of a StepResult
    objective.describe(sampler)                           what the start event adds

SFT's masked cross-entropy is one objective (here); DPO is another (``backend.preference.DPO``: pairs packed whole,
pairs as its denominator). ``backend.preference.objective_of(cfg)`` picks the run's.

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

    def sampler(self, dataset, cfg):
        """Documents packed into rows (``data.truncate_documents`` may cut them across rows)."""
        from backend.packing import PackedSampler

        sampling, L = cfg.data.sampling, cfg.batch.sequence_length
        return PackedSampler(
            dataset.lengths, L, sampling.seed, sampling.packing, sampling.packing_window, cfg.data.truncate_documents
        )

    def collate(self, rows, dataset, batch, reference=None) -> dict:
        """`backend.packing.collate` under the run's ``batch`` section (``reference``: DPO's; unused here)."""
        from backend.packing import collate

        return collate(rows, dataset, batch.sequence_length, batch.cross_document_attention)

    def report(self, result) -> dict:
        """The train event's fields of a `backend.train.StepResult`: its trained-token count."""
        return {"trained_tokens": result.trained_tokens, **(result.metrics or {})}

    def describe(self, sampler) -> dict:
        """What the start event adds for this objective (SFT: nothing beyond the usual fields)."""
        return {}


def as_objective(objective):
    """An objective as given, or a cross-entropy implementation name as shorthand for ``SFT(name)``.

    >>> as_objective("torch")
    SFT(impl='torch')
    >>> as_objective(SFT()) == SFT()
    True
    """
    return SFT(objective) if isinstance(objective, str) else objective
