"""Our DPO objective equals TRL 1.16's DPOTrainer: loss, rewards and every gradient, same pairs, same weights (#24).

Run: .venv/bin/pytest tests/test_dpo_trl.py -x -q

The pairs are the first shipped preference pairs, prepared by OUR pipeline (`backend.prepare`: chat template,
masks). TRL gets the same token ids: each document is split at its first trained token into ``prompt_ids`` and the
completion (TRL's pre-tokenized columns ``prompt_ids``/``chosen_ids``/``rejected_ids``, padded by its own
``DataCollatorForPreference``, one pair per row). Our side packs several pairs per row (`PairSampler`,
`collate_pairs`), so these tests also prove that packing changes nothing. fp32 on CPU, the tiny model in assets/.

TRL 1.16 always re-tokenizes its train dataset in ``__init__`` (``_prepare_dataset`` extracts ``prompt`` from text
and applies the chat template); it has no switch for pre-tokenized rows. ``_PreTokenized`` skips that one method;
the loss is TRL's own ``compute_loss``/``_compute_loss``, its rewards are read from ``trainer._metrics``.

Reference modes, as each side defines them:
- ``precompute``: ours is `reference_pass` over the initial model (before the policy moves); TRL's is a ``ref_model``
  copy of the initial model (a frozen copy, as ``precompute_ref_log_probs`` would also read from, through a cache
  file this test does not need).
- ``adapters_off``: ours disables the LoRA adapters; TRL does the same when it wraps the model itself from a
  ``peft_config`` with no ``ref_model`` (``use_adapter(model, None)``). Given an already-wrapped PeftModel, TRL 1.16
  instead copies the initial adapter into a "ref" adapter: equal to adapters off only while lora_B is still zero.
- ``ipo``: TRL's ``loss_type="ipo"`` is (chosen_logratio / chosen_tokens - rejected_logratio / rejected_tokens -
  1 / (2 beta))^2, i.e. our definition (policy and reference log-probs each averaged over the answer's tokens). TRL
  logs the un-normalized rewards beta * (policy - reference) summed log-probs; ours logs them normalized for IPO,
  so for IPO the rewards are compared as TRL's divided by the answer's token count.

The policy is moved away from the reference by seeded noise on the trainable weights, identically on both sides,
so that the loss is not ln 2; one case keeps it unmoved and checks exactly ln 2 and zero rewards.

TRL must be told ``bf16=False``: DPOConfig defaults to bf16, and accelerate then runs the ``ref_model`` under bf16
autocast even on CPU (step 0's loss read 0.69328 instead of ln 2). Gradient checkpointing is off, as ours is.
"""

import json
import math

import numpy as np
import pytest
import torch

from backend.dataset import TokenDataset
from backend.modeling import PACKED_SDPA, load_model
from backend.preference import DPO, PairSampler, collate_pairs, reference_pass
from backend.prepare import prepare

TINY = "assets/tiny-llama"
N_PAIRS = 12
SEQUENCE_LENGTH = 512  # several pairs per packed row
TOL = 1e-5


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """(TokenDataset, TRL examples in pair order) of the first N_PAIRS shipped pairs, prepared by our pipeline."""
    tmp = tmp_path_factory.mktemp("dpo_trl")
    with open("assets/data/sample_preference.jsonl") as f:
        rows = [json.loads(next(f)) for _ in range(N_PAIRS)]
    (tmp / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare(
        {
            "dataset": {"path": str(tmp / "pairs.jsonl")},
            "tokenizer": {"path": TINY},
            "output_path": str(tmp / "data"),
            "splits": {"training": 1.0},
            "chat": {"train_on_eot": True},
        },
        progress=False,
    )
    ds = TokenDataset(tmp / "data", "training")
    assert ds.pairs is not None and len(ds.pairs) == N_PAIRS
    return ds, [_trl_example(ds, c, r) for c, r in ds.pairs]


def _trl_example(ds, chosen, rejected) -> dict:
    """Our two documents as TRL's pre-tokenized columns: the shared prompt, then each completion."""
    out = {}
    for key, d in (("chosen_ids", chosen), ("rejected_ids", rejected)):
        tokens, mask = ds.document(int(d))
        first = int(np.argmax(mask))
        assert mask[first:].all(), "TRL trains a completion suffix: the trained tokens must be the document's tail"
        prompt = tokens[:first].tolist()
        assert out.setdefault("prompt_ids", prompt) == prompt, "chosen and rejected share the prompt"
        out[key] = tokens[first:].tolist()
    return out


def _trl_trainer(tmp_path, examples, model, ref_model=None, peft_config=None, loss="sigmoid", beta=0.1):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    class _PreTokenized(DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):  # the rows are already TRL's tokenized columns
            return dataset

    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        report_to=[],
        use_cpu=True,
        beta=beta,
        loss_type=[loss],
        max_length=None,
        per_device_train_batch_size=len(examples),
        disable_dropout=True,
        bf16=False,  # DPOConfig defaults to bf16, and accelerate wraps the ref_model in bf16 autocast even on CPU
        gradient_checkpointing=False,
    )
    return _PreTokenized(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=Dataset.from_list(examples),
        processing_class=AutoTokenizer.from_pretrained(TINY),
        peft_config=peft_config,
    )


def _trl_step(trainer, examples):
    """TRL's loss on all pairs at once (mean over pairs), its logged rewards, and its gradients by name."""
    trainer.model.train()  # TRL files its metrics under "train" only in training mode
    trainer.model.zero_grad()
    batch = trainer.data_collator(examples)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    m = trainer._metrics["train"]
    rewards = (m["rewards/chosen"][-1], m["rewards/rejected"][-1], m["rewards/margins"][-1])
    return float(loss), rewards, _grads(trainer.model)


def _ours(model, ds, objective, reference=None):
    """Our loss (sum / pairs), the mean rewards and gradients: every pair packed, several to a row, one micro-batch."""
    sampler = PairSampler(ds.lengths, ds.pairs, SEQUENCE_LENGTH, seed=0)
    rows = [sampler.row(i) for i in range(sampler.num_rows_in_epoch(0))]
    assert len(rows) < N_PAIRS, "the test must pack several pairs into a row"
    mb = collate_pairs(rows, ds, SEQUENCE_LENGTH, reference)
    model.zero_grad()
    loss_sum, n, metrics = objective(model, mb)
    assert n == N_PAIRS
    (loss_sum / n).backward()
    rewards = (metrics["rewards_chosen"] / n, metrics["rewards_rejected"] / n, metrics["margin"] / n)
    return float(loss_sum) / n, rewards, _grads(model), mb


def _grads(model) -> dict:
    return {
        name.replace("base_model.model.", ""): p.grad.detach().clone()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def _move(model, seed=1, scale=0.02):
    """The policy after 'training': seeded noise on every trainable weight (the same draw on both sides)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda np_: np_[0].replace("base_model.model.", "")):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def _assert_same_grads(ours: dict, trl: dict):
    assert ours.keys() == trl.keys() and ours
    for name in ours:
        diff = (ours[name] - trl[name]).abs().max().item()
        scale = max(1.0, trl[name].abs().max().item())
        assert diff <= TOL * scale, f"{name}: max |grad diff| {diff:.3g} (max |grad| {scale:.3g})"


def _full_models():
    """Our policy (packed attention), TRL's policy and TRL's reference (plain sdpa): the same initial weights."""
    ours = load_model(TINY, "fp32", PACKED_SDPA)
    return ours, load_model(TINY, "fp32", "sdpa"), load_model(TINY, "fp32", "sdpa")


@pytest.mark.parametrize(
    ("loss", "moved"), [("sigmoid", False), ("sigmoid", True), ("ipo", True)], ids=["step0", "sigmoid", "ipo"]
)
def test_precompute_equals_trl_with_a_reference_model(pairs, tmp_path, loss, moved):
    from accelerate import Accelerator

    ds, examples = pairs
    ours, trl_policy, trl_reference = _full_models()
    sampler = PairSampler(ds.lengths, ds.pairs, SEQUENCE_LENGTH, seed=0)
    reference = reference_pass(ours, Accelerator(cpu=True), ds, sampler, 2, tmp_path / "ref.npy", log=lambda *a: None)
    assert np.isfinite(reference).all()
    if moved:
        _move(ours), _move(trl_policy)
    trainer = _trl_trainer(tmp_path, examples, trl_policy, ref_model=trl_reference, loss=loss)
    trl_loss, trl_rewards, trl_grads = _trl_step(trainer, examples)
    our_loss, our_rewards, our_grads, mb = _ours(ours, ds, DPO(0.1, loss, "precompute"), reference)

    if not moved:
        assert our_loss == pytest.approx(math.log(2), abs=1e-6) and max(map(abs, our_rewards)) < 1e-6
    else:
        assert abs(our_loss - math.log(2)) > 1e-3, "the moved policy must not sit at the reference"
    assert our_loss == pytest.approx(trl_loss, abs=TOL)
    if loss == "ipo":  # TRL logs the summed-log-prob rewards; ours are per answer token for IPO (docstring)
        trl_rewards = _trl_rewards_per_token(trainer, examples)
    assert our_rewards == pytest.approx(trl_rewards, abs=TOL)
    _assert_same_grads(our_grads, trl_grads)


def _trl_rewards_per_token(trainer, examples):
    """TRL's per-pair rewards beta * (policy - reference) over its completion tokens, divided by their count."""
    batch = trainer.data_collator(examples)
    labels_mask = batch["completion_mask"][:, 1:].sum(1).double()
    with torch.no_grad():
        policy = trainer.compute_ref_log_probs(trainer.model, batch)
        reference = trainer.compute_ref_log_probs(trainer.ref_model, batch)
    n_chosen, n_rejected = labels_mask.chunk(2)
    chosen = trainer.beta * (policy[0].double() - reference[0].double()) / n_chosen
    rejected = trainer.beta * (policy[1].double() - reference[1].double()) / n_rejected
    return float(chosen.mean()), float(rejected.mean()), float((chosen - rejected).mean())


def test_adapters_off_equals_trl_with_a_peft_config(pairs, tmp_path):
    from backend.config import PeftConfig
    from backend.lora import apply_lora, lora_config

    ds, examples = pairs
    torch.manual_seed(0)
    peft = PeftConfig(type="lora", rank=4, alpha=8.0)
    ours = apply_lora(load_model(TINY, "fp32", PACKED_SDPA), peft)
    base = load_model(TINY, "fp32", "sdpa")
    trainer = _trl_trainer(tmp_path, examples, base, peft_config=lora_config(base, peft))
    trainer.model.load_state_dict(ours.state_dict())  # the same adapters (lora_A random, lora_B zero)
    assert trainer.ref_model is None and "ref" not in trainer.model.peft_config  # TRL disables adapters
    _move(ours), _move(trainer.model)  # lora_B no longer zero: the policy differs from the base

    trl_loss, trl_rewards, trl_grads = _trl_step(trainer, examples)
    our_loss, our_rewards, our_grads, _ = _ours(ours, ds, DPO(0.1, "sigmoid", "adapters_off"))
    assert abs(our_loss - math.log(2)) > 1e-3
    assert our_loss == pytest.approx(trl_loss, abs=TOL)
    assert our_rewards == pytest.approx(trl_rewards, abs=TOL)
    assert any("lora_B" in name for name in our_grads) and not any("lora" not in n for n in our_grads)
    _assert_same_grads(our_grads, trl_grads)
