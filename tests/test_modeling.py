"""Packed forward equals separate per-document forwards (logits, summed loss, gradients), on a tiny random Llama,
fp32, sdpa and eager; the use_cache guard matters; cross_document_attention really changes attention."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import backend.attention  # noqa: F401  registers sdpa_packed
from backend import IGNORE_INDEX
from backend.modeling import load_model, model_inputs, prepare_for_packed_training, select_attention
from backend.packing import PackedSampler, collate
from tests.tiny import tiny_llama

torch.set_num_threads(1)
VOCAB = 97
L = 64


class MemDataset:
    def __init__(self, lengths, seed=0):
        rng = np.random.default_rng(seed)
        self.docs = [(rng.integers(1, VOCAB, n), rng.random(n) < 0.6) for n in lengths]

    def document(self, i):
        return self.docs[i]


def tiny_model(attn="sdpa", use_cache=True, seed=0):
    return tiny_llama(VOCAB, attn=attn, positions=256, use_cache=use_cache, seed=seed)


def setup(seed, truncate=False, rows=4, n=40):
    rng = np.random.default_rng(seed)
    lengths = np.maximum(2, rng.lognormal(np.log(14), 0.7, n).astype(np.int64)).clip(max=200 if truncate else L)
    ds = MemDataset(lengths, seed)
    s = PackedSampler(lengths, L, seed=seed, truncate_documents=truncate, window=16)
    rows_ = s.rows(0, rows)
    return ds, rows_, collate(rows_, ds, L)


def shifted_ce_sum(logits, labels):
    """Sum of per-token CE with transformers' shift: logit t predicts label t+1."""
    return F.cross_entropy(
        logits[..., :-1, :].reshape(-1, logits.shape[-1]).float(),
        labels[..., 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def separate(model, ds, rows):
    """Per-piece forwards, each alone with its own positions: logits (B, L, V) laid out like the packed batch (0 on
    padding), and the sum of per-piece losses."""
    out = torch.zeros(len(rows), L, VOCAB)
    loss = 0.0
    for r, row in enumerate(rows):
        t = 0
        for p in row:
            tok, tr = ds.document(p.document)
            ids = torch.tensor(tok[p.begin : p.end]).long()[None]
            lab = torch.where(torch.tensor(tr[p.begin : p.end]), ids[0], IGNORE_INDEX)[None]
            lab[0, 0] = IGNORE_INDEX
            pos = torch.arange(p.begin, p.end)[None]
            logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
            out[r, t : t + ids.shape[1]] = logits[0]
            loss = loss + shifted_ce_sum(logits, lab)
            t += ids.shape[1]
    return out, loss


def packed_logits(model, batch):
    """The trainer's forward (backend.modeling.model_inputs, as backend.loss calls it): logits as (B, L, V)."""
    return model(**model_inputs(model, batch)).logits.reshape(*batch["input_ids"].shape, -1)


def with_real(batch, rows):
    """Add batch["real"]: (B, L) True on real tokens, False on padding (from the pieces, not from pad ids)."""
    real = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    for r, row in enumerate(rows):
        real[r, : sum(p.end - p.begin for p in row)] = True
    batch["real"] = real
    return batch


@pytest.mark.parametrize("attn", ["sdpa", "eager", "sdpa_packed"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_packed_equals_separate_logits_loss_grads(attn, seed):
    ds, rows, batch = setup(seed)
    with_real(batch, rows)
    model = prepare_for_packed_training(tiny_model(attn, use_cache=True, seed=seed))
    ref = copy.deepcopy(model)
    packed = packed_logits(model, batch)
    sep, sep_loss = separate(ref, ds, rows)
    real = batch["real"]
    assert sum(len(r) > 1 for r in rows) >= len(rows) // 2  # the rows really hold several documents
    assert (packed[real] - sep[real]).abs().max() < 1e-4
    assert torch.isfinite(packed).all()  # padding rows have something to attend to: no NaN
    loss = shifted_ce_sum(packed, batch["labels"])
    assert torch.allclose(loss, sep_loss, rtol=1e-5, atol=1e-4)
    loss.backward()
    sep_loss.backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=False):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), name


def test_truncated_continuations_equal_their_slice():
    """truncate_documents=True: each piece (continuations included, positions continuing) equals a forward of the
    same slice with the same positions; the row does not leak into it."""
    ds, rows, batch = setup(5, truncate=True, rows=4, n=30)
    assert any(p.begin > 0 for r in rows for p in r)
    with_real(batch, rows)
    model = prepare_for_packed_training(tiny_model("sdpa"))
    packed = packed_logits(model, batch)
    sep, sep_loss = separate(model, ds, rows)
    assert (packed[batch["real"]] - sep[batch["real"]]).abs().max() < 1e-4
    assert torch.allclose(shifted_ce_sum(packed, batch["labels"]), sep_loss, rtol=1e-5)


@pytest.mark.parametrize("B", [1, 2, 4])
def test_detection_works_for_any_micro_batch_size(B):
    """FACTS said batch 1 or 2; transformers splits each row at position restarts for any B (it only skips the
    block mask when no row has a restart). Checked here for B = 1, 2, 4, and the flattened (1, B*L) layout."""
    ds, rows, batch = setup(7, rows=B)
    with_real(batch, rows)
    model = prepare_for_packed_training(tiny_model("sdpa"))
    sep, _ = separate(model, ds, rows)
    rows_layout = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    flat = packed_logits(model, batch)  # the trainer's (1, B*L) layout
    assert model_inputs(model, batch)["input_ids"].shape == (1, B * L)
    real = batch["real"]
    assert (rows_layout[real] - sep[real]).abs().max() < 1e-4
    assert (flat[real] - sep[real]).abs().max() < 1e-4


@pytest.mark.parametrize("attn", ["sdpa", "sdpa_packed"])
def test_cross_document_attention_changes_logits(attn):
    ds, rows, batch = setup(3)
    rows = [r for r in rows if len(r) > 1]
    assert rows
    blocked = collate(rows, ds, L)
    cross = collate(rows, ds, L, cross_document_attention=True)
    model = prepare_for_packed_training(tiny_model(attn))
    a = packed_logits(model, blocked)
    b = packed_logits(model, cross)
    first = rows[0][0].end - rows[0][0].begin
    assert (a[0, :first] - b[0, :first]).abs().max() < 1e-4  # the first document sees nothing before it either way
    assert (a[0, first:] - b[0, first:]).abs().max() > 1e-2  # later documents now see earlier ones
    assert torch.equal(blocked["labels"], cross["labels"])


def test_use_cache_trap_is_real_and_the_guard_closes_it():
    ds, rows, batch = setup(1)
    with_real(batch, rows)
    raw = tiny_model("sdpa", use_cache=True).train()
    sep, _ = separate(raw, ds, rows)
    real = batch["real"]
    # called like a naive training loop would: no use_cache kwarg, no attention mask
    leaky = raw(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    assert (leaky[real] - sep[real]).abs().max() > 1e-2  # documents attended to each other, silently
    guarded = prepare_for_packed_training(raw)
    assert guarded.config.use_cache is False
    clean = guarded(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    assert (clean[real] - sep[real]).abs().max() < 1e-4


def test_model_inputs_never_flattens_rows_that_positions_would_join():
    """A row ending at position p followed by a row starting a continuation at p+1 would merge when flattened:
    sdpa (boundaries from positions) keeps the (B, L) layout; sdpa_packed reads cu_seq_lens and flattens."""
    batch = {
        "input_ids": torch.ones(2, 4, dtype=torch.long),
        "labels": torch.zeros(2, 4, dtype=torch.long),
        "position_ids": torch.tensor([[0, 1, 0, 1], [2, 3, 4, 5]]),
        "cu_seq_lens_q": torch.tensor([0, 2, 4, 8], dtype=torch.int32),
        "cu_seq_lens_k": torch.tensor([0, 2, 4, 8], dtype=torch.int32),
        "max_length_q": 4,
        "max_length_k": 4,
    }
    assert model_inputs(tiny_model("sdpa"), batch)["input_ids"].shape == (2, 4)
    flat = model_inputs(tiny_model("sdpa_packed"), batch)
    assert flat["input_ids"].shape == (1, 8) and flat["cu_seq_lens_q"] is batch["cu_seq_lens_q"]
    assert "attention_mask" not in flat and flat["use_cache"] is False
    batch["position_ids"] = torch.tensor([[0, 1, 0, 1], [0, 1, 2, 3]])  # a row that starts a document: flat
    assert model_inputs(tiny_model("sdpa"), batch)["input_ids"].shape == (1, 8)


def test_select_attention_falls_back_with_reason(caplog):
    impl, reason = select_attention(False, "cpu")
    assert impl == "sdpa_packed" and "off" in reason
    impl, reason = select_attention(True, "cpu")
    assert impl == "sdpa_packed" and ("not installed" in reason or "not CUDA" in reason)


def test_load_model_closes_trap(tmp_path):
    tiny_model(use_cache=True).save_pretrained(tmp_path / "m")
    for random_init in (False, True):
        m = load_model(tmp_path / "m", "fp32", "sdpa", random_init=random_init)
        assert m.config.use_cache is False and m.generation_config.use_cache is False
    with pytest.raises(OSError, match="pretrained.path"):
        load_model(tmp_path / "missing", "fp32", "sdpa")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flash_varlen_equals_separate():
    pytest.importorskip("flash_attn")
    ds, rows, batch = setup(0, rows=4)
    with_real(batch, rows)
    model = prepare_for_packed_training(tiny_model("sdpa")).to("cuda", torch.bfloat16)
    model.set_attn_implementation("flash_attention_2")
    packed = packed_logits(model, batch).float().cpu()
    model.set_attn_implementation("sdpa")
    sep, _ = separate(model.float().cpu(), ds, rows)
    real = batch["real"]
    assert (packed[real] - sep[real]).abs().max() < 5e-2  # bf16 kernel vs fp32 reference
