"""The DPO pair loss (backend/preference.py) and the objective module's docstring examples.

Run: .venv/bin/pytest tests/test_preference.py -x -q
"""

import doctest
import math

import pytest
import torch

import backend.objective
import backend.preference
from backend.preference import pair_losses


@pytest.mark.parametrize("module", [backend.objective, backend.preference])
def test_docstring_examples_run(module):
    assert doctest.testmod(module).failed == 0


def test_policy_equal_to_reference_gives_ln2_and_zero_rewards():
    """Step one of DPO: the policy is the reference, so every pair's loss is ln 2 and both rewards are 0."""
    logps = torch.randn(5, dtype=torch.float64) * 30
    losses, chosen, rejected = pair_losses(logps, logps.flip(0), logps, logps.flip(0), beta=0.1)
    assert torch.allclose(losses, torch.full_like(losses, math.log(2)), atol=1e-6)
    assert chosen.abs().max() == 0 and rejected.abs().max() == 0


def test_an_unknown_loss_names_the_key():
    z = torch.zeros(1)
    with pytest.raises(ValueError, match="training.dpo.loss"):
        pair_losses(z, z, z, z, beta=0.1, loss="hinge")
