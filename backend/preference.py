"""Preference tuning (DPO, issue #24): the pair loss on per-document summed log-probs.

Only the loss on already-computed log-probs lands here so far; the pair data form, the objective for
``backend.train.train_step`` and the reference pass are still to come (see the issue).

``pair_losses`` follows the DPO paper (Rafailov et al. 2023) with TRL's conventions: rewards are
beta * (policy - reference) log-prob of each answer; sigmoid loss -log sigmoid(beta * margin), IPO
(logits - 1 / (2 beta))^2 with length-normalized log-probs, SimPO reference-free -log sigmoid(beta * margin - gamma).

>>> import torch
>>> z = torch.zeros(2)
>>> losses, chosen, rejected = pair_losses(z, z, z, z, beta=0.1)
>>> round(float(losses[0]), 6), float(chosen.abs().max()), float(rejected.abs().max())
(0.693147, 0.0, 0.0)
"""

from __future__ import annotations

LOSSES = ("sigmoid", "ipo", "simpo")


def pair_losses(
    policy_chosen,
    policy_rejected,
    reference_chosen,
    reference_rejected,
    beta: float,
    loss="sigmoid",
    simpo_gamma: float = 0.5,
):
    """Per-pair (losses (P,), chosen rewards (P,), rejected rewards (P,)) from (P,) log-probs of each answer.

    For ``ipo`` and ``simpo`` the caller passes length-normalized (mean per token) log-probs; ``simpo`` ignores the
    reference tensors (reference-free). Rewards are detached, for logging.

    >>> import torch
    >>> t = torch.tensor
    >>> l, c, r = pair_losses(t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0]), beta=0.5)
    >>> round(float(c), 3), round(float(r), 3), round(float(l), 4)  # beta * margin = 1: -log sigmoid(1)
    (0.5, -0.5, 0.3133)
    """
    import torch.nn.functional as F

    if loss not in LOSSES:
        raise ValueError(f"training.dpo.loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if loss == "simpo":
        logits = policy_chosen - policy_rejected
        losses = -F.logsigmoid(beta * logits - simpo_gamma)
        return losses, (beta * policy_chosen).detach(), (beta * policy_rejected).detach()
    chosen = policy_chosen - reference_chosen
    rejected = policy_rejected - reference_rejected
    logits = chosen - rejected
    losses = -F.logsigmoid(beta * logits) if loss == "sigmoid" else (logits - 1 / (2 * beta)) ** 2
    return losses, (beta * chosen).detach(), (beta * rejected).detach()
