"""Loss normalization and the two cross-entropy implementations (backend/loss.py).

Run: .venv/bin/pytest tests/test_loss.py -x -q
"""

import pytest
import torch
import torch.nn.functional as F

import backend.loss as loss_mod
import backend.modeling as modeling
import tests.tiny
from backend import IGNORE_INDEX
from backend.loss import global_trained_count, loss_scale, shifted_targets, trained_token_loss

torch.set_num_threads(1)
V = 97  # odd vocabulary so chunk boundaries never line up by accident


def tiny_llama(tie=False, seed=0):
    return tests.tiny.tiny_llama(V, tied=tie, seed=seed)


def make_batch(rows, L=12, seed=1):
    """rows: list of rows, each a list of (doc_len, trained_from) documents; the rest of the row is padding.

    Within a document, tokens at index >= trained_from are trained targets (label = token), others masked;
    index 0 (the document's first token) is never a target.
    """
    g = torch.Generator().manual_seed(seed)
    B = len(rows)
    input_ids = torch.zeros(B, L, dtype=torch.long)
    labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros(B, L, dtype=torch.long)
    documents = []  # (row, begin, end) for per-document reference forwards
    for b, docs in enumerate(rows):
        pos = 0
        for doc_len, trained_from in docs:
            toks = torch.randint(1, V, (doc_len,), generator=g)
            input_ids[b, pos : pos + doc_len] = toks
            position_ids[b, pos : pos + doc_len] = torch.arange(doc_len)
            for i in range(max(1, trained_from), doc_len):
                labels[b, pos + i] = toks[i]
            documents.append((b, pos, pos + doc_len))
            pos += doc_len
        assert pos <= L
        # padding: token 0, position 0 each (its own document), label ignored
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}, documents


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


ROWS = [[(5, 2), (4, 1)], [(7, 3)], [(3, 1), (3, 2), (4, 4)], [(12, 6)]]


def test_shifted_targets_docstring_example():
    labels = torch.tensor([[-100, 6, -100, 8], [-100, 10, 11, -100]])
    t = shifted_targets(labels)
    assert t.tolist() == [6, -100, 8, -100, 10, 11, -100, -100]
    assert (t != IGNORE_INDEX).nonzero().squeeze(1).tolist() == [0, 2, 4, 5]


@pytest.mark.parametrize("impl", ["torch", "fused"])
def test_loss_sum_equals_per_document_log_softmax(impl):
    """Packed, flattened loss sum == sum of -log p(label) computed on each document ALONE (no packing)."""
    model = tiny_llama()
    batch, documents = make_batch(ROWS)
    loss_sum, count = trained_token_loss(model, batch, impl=impl)
    expected_sum, expected_count = 0.0, 0
    with torch.no_grad():
        for b, begin, end in documents:
            ids = batch["input_ids"][b : b + 1, begin:end]
            logp = F.log_softmax(model(ids, use_cache=False).logits[0].float(), dim=-1)  # (T, V)
            for t in range(end - begin - 1):  # logit t predicts label t+1
                label = int(batch["labels"][b, begin + t + 1])
                if label != IGNORE_INDEX:
                    expected_sum += -float(logp[t, label])
                    expected_count += 1
    assert count == expected_count == int((batch["labels"] != IGNORE_INDEX).sum())
    assert abs(float(loss_sum.detach()) - expected_sum) <= 1e-4
    assert abs(float(loss_sum.detach()) / count - expected_sum / expected_count) <= 1e-5
    assert loss_sum.dtype == torch.float32 and loss_sum.dim() == 0 and loss_sum.requires_grad


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("chunk_elements", [loss_mod.FUSED_CHUNK_ELEMENTS, 3 * V])  # one chunk / chunks of 3 rows
def test_fused_equals_torch_loss_and_grads(tie, chunk_elements, monkeypatch):
    monkeypatch.setattr(loss_mod, "FUSED_CHUNK_ELEMENTS", chunk_elements)
    batch, _ = make_batch(ROWS)
    results = {}
    for impl in ("torch", "fused"):
        model = tiny_llama(tie=tie)
        loss_sum, count = trained_token_loss(model, batch, impl=impl)
        (loss_sum / count).backward()
        results[impl] = (float(loss_sum.detach()), count, grads(model), model)
    (lt, ct, gt, mt), (lf, cf, gf, mf) = results["torch"], results["fused"]
    assert ct == cf and abs(lt - lf) <= 1e-5 * max(1.0, abs(lt))
    assert gt.keys() == gf.keys() == {n for n, _ in mt.named_parameters()}
    for name in gt:
        assert torch.allclose(gt[name], gf[name], atol=1e-5, rtol=1e-4), name
    # the swap is undone: lm_head is the model's own Linear again
    assert type(mf.lm_head) is torch.nn.Linear
    if tie:
        assert mf.lm_head.weight is mf.model.embed_tokens.weight


def test_fused_under_no_grad_matches_torch():
    model = tiny_llama()
    batch, _ = make_batch(ROWS)
    with torch.no_grad():
        lf, cf = trained_token_loss(model, batch, impl="fused")
        lt, ct = trained_token_loss(model, batch, impl="torch")
    assert cf == ct and abs(float(lf.detach()) - float(lt)) <= 1e-5 * float(lt)
    assert not lf.requires_grad


def test_logits_to_keep_index_equals_full_logits():
    """transformers' 1-D logits_to_keep computes exactly the kept rows of the full logits."""
    model = tiny_llama()
    batch, _ = make_batch(ROWS)
    ids, pos = batch["input_ids"].reshape(1, -1), batch["position_ids"].reshape(1, -1)
    keep = (shifted_targets(batch["labels"]) != IGNORE_INDEX).nonzero().squeeze(1)
    with torch.no_grad():
        full = model(input_ids=ids, position_ids=pos, use_cache=False).logits  # (1, N, V)
        kept = model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=keep).logits  # (1, K, V)
    assert kept.shape == (1, keep.numel(), V) and keep.numel() < ids.shape[1]
    assert torch.allclose(kept, full[:, keep], atol=1e-6)


@pytest.mark.parametrize("impl", ["torch", "fused"])
def test_micro_batch_without_trained_token(impl):
    model = tiny_llama()
    batch, _ = make_batch([[(6, 6), (3, 3)], [(5, 5)]])  # nothing trained anywhere
    assert int((batch["labels"] != IGNORE_INDEX).sum()) == 0
    loss_sum, count = trained_token_loss(model, batch, impl=impl)
    assert count == 0 and float(loss_sum.detach()) == 0.0 and loss_sum.requires_grad
    (loss_sum * loss_scale(count, 1)).backward()
    g = grads(model)
    # every parameter is reached by backward (FSDP/DDP ranks stay in step) and nothing is NaN
    assert g.keys() == {n for n, _ in model.named_parameters()}
    assert all(torch.isfinite(v).all() and float(v.abs().max()) == 0.0 for v in g.values())


@pytest.mark.parametrize("impl", ["torch", "fused"])
def test_accumulating_four_micro_batches_equals_one_batch(impl):
    """4 micro-batches of 1 row, scaled by world_size / global count == 1 micro-batch of 4 rows (mean over tokens)."""
    batch, _ = make_batch(ROWS)
    per_row_counts = [int((batch["labels"][b] != IGNORE_INDEX).sum()) for b in range(4)]
    assert len(set(per_row_counts)) > 1  # different trained counts per micro-batch: the case that matters

    whole = tiny_llama()
    loss_sum, count = trained_token_loss(whole, batch, impl=impl)
    (loss_sum * loss_scale(global_trained_count(None, [count]), 1)).backward()
    g_whole = grads(whole)

    micro = [{k: v[b : b + 1] for k, v in batch.items()} for b in range(4)]
    acc = tiny_llama()
    counts = [int((m["labels"] != IGNORE_INDEX).sum()) for m in micro]
    scale = loss_scale(global_trained_count(None, counts), world_size=1)
    for m in micro:
        loss_sum, n = trained_token_loss(acc, m, impl=impl)
        (loss_sum * scale).backward()
    g_acc = grads(acc)

    wrong = tiny_llama()  # per-micro-batch mean, averaged over micro-batches: over-weights sparse micro-batches
    for m in micro:
        loss_sum, n = trained_token_loss(wrong, m, impl=impl)
        (loss_sum / n / len(micro)).backward()
    g_wrong = grads(wrong)

    assert sum(counts) == count
    for name in g_whole:
        assert torch.allclose(g_whole[name], g_acc[name], atol=1e-6, rtol=1e-5), name
    diff = max(float((g_whole[n] - g_wrong[n]).abs().max()) for n in g_whole)
    assert diff > 1e-3


def test_rank_average_of_scaled_sums_is_global_mean():
    """Simulate 2 ranks: each scales its local sum by world_size / N; DDP/FSDP averaging gives grad(S) / N."""
    batch, _ = make_batch(ROWS)
    halves = [{k: v[:1] for k, v in batch.items()}, {k: v[1:] for k, v in batch.items()}]
    counts = [int((h["labels"] != IGNORE_INDEX).sum()) for h in halves]
    assert counts[0] != counts[1]
    scale = loss_scale(sum(counts), world_size=2)  # global_trained_count would all-reduce to sum(counts)
    rank_grads = []
    for h in halves:
        model = tiny_llama()
        loss_sum, _ = trained_token_loss(model, h, impl="fused")
        (loss_sum * scale).backward()
        rank_grads.append(grads(model))
    whole = tiny_llama()
    loss_sum, count = trained_token_loss(whole, batch, impl="fused")
    (loss_sum / count).backward()
    for name, g in grads(whole).items():
        averaged = (rank_grads[0][name] + rank_grads[1][name]) / 2  # what the all-reduce(avg) produces
        assert torch.allclose(g, averaged, atol=1e-6, rtol=1e-5), name


def test_loss_scale_and_count_edge_cases():
    assert loss_scale(0, 4) == 0.0  # nothing trained in the whole step: zero gradient, never NaN
    assert loss_scale(1, 1) == 1.0  # one trained token in the step still trains
    assert loss_scale(10, 2) == pytest.approx(0.2)
    assert global_trained_count(None, [3, 0, 5]) == 8


class _Ranks:
    """An Accelerator's face to global_trained_count: `num_processes` ranks whose counts are `others` besides ours;
    reduce sums like a real all-reduce and checks it is asked for a sum of one integer count."""

    device = torch.device("cpu")

    def __init__(self, others: list[int]):
        self.others, self.num_processes, self.calls = others, len(others) + 1, 0

    def reduce(self, tensor, reduction="mean"):
        assert self.num_processes > 1, "one process: nothing to all-reduce"
        assert reduction == "sum" and tensor.dtype == torch.long and tensor.shape == (1,), (reduction, tensor)
        self.calls += 1
        return tensor + sum(self.others)


@pytest.mark.parametrize("others", [[], [4], [0, 9]])
def test_the_step_count_is_summed_over_every_rank(others):
    """The denominator of the step's mean: this rank's micro-batches, then an all-reduce (sum) when there are several
    ranks, never with one; the 2-process runs (tests/test_distributed.py, slow) check it for real."""
    ranks = _Ranks(others)
    assert global_trained_count(ranks, [3, 0, 5]) == 8 + sum(others)
    assert ranks.calls == (1 if others else 0)


@pytest.mark.parametrize("rows_per_chunk", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("frozen", [None, "head", "hidden"])
def test_chunked_linear_ce_equals_torch_for_every_input_that_trains(rows_per_chunk, bias, frozen, monkeypatch):
    """The fused loss on its own: more rows than the hidden width, chunks of FUSED_CHUNK_ELEMENTS // V rows (the
    last one partial), an LM head with a bias (Phi-2's has one), a frozen head (LoRA) or a frozen input, a
    non-unit incoming gradient: loss and each gradient equal torch's linear + cross-entropy, and a frozen input
    gets none."""
    from backend.loss import chunked_linear_cross_entropy

    torch.manual_seed(0)
    k, h, v = 37, 8, 11
    hidden, weight = torch.randn(k, h, dtype=torch.float64), torch.randn(v, h, dtype=torch.float64)
    b = torch.randn(v, dtype=torch.float64) if bias else None
    targets = torch.randint(0, v, (k,))
    hidden.requires_grad_(frozen != "hidden")
    weight.requires_grad_(frozen != "head")
    if b is not None:
        b.requires_grad_(frozen != "head")
    linear, rows = F.linear, []
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, w, bb=None: rows.append(len(x)) or linear(x, w, bb))
    monkeypatch.setattr(loss_mod, "FUSED_CHUNK_ELEMENTS", rows_per_chunk * v)
    fused = chunked_linear_cross_entropy(hidden, weight, targets, b)
    (0.5 * fused).backward()
    assert rows == [rows_per_chunk] * (k // rows_per_chunk) + ([k % rows_per_chunk] if k % rows_per_chunk else [])
    inputs = [t for t in (hidden, weight, b) if t is not None]
    copies = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    reference = F.cross_entropy(linear(*copies[:2], copies[2] if bias else None), targets, reduction="sum")
    (0.5 * reference).backward()
    assert abs(float(fused) - float(reference)) <= 1e-5 * float(reference)
    for t, c in zip(inputs, copies, strict=True):
        if c.requires_grad:
            assert t.grad is not None and torch.allclose(t.grad, c.grad, rtol=1e-5, atol=1e-6)
        else:
            assert t.grad is None
    with pytest.raises(ValueError, match="cross_entropy_impl"):
        trained_token_loss(tiny_llama(), make_batch(ROWS)[0], impl="triton")


@pytest.mark.parametrize("impl", ["torch", "fused"])
def test_rows_that_would_join_when_flattened_stay_separate(impl):
    """Row 1 starts at position 6 right after row 0 ends at position 5 (a continuation piece under
    truncate_documents: yes). Flattened, sdpa would read them as one document; the loss must still equal the
    two rows computed alone, and its gradients too."""
    model = tiny_llama(seed=3)
    g = torch.Generator().manual_seed(7)
    L = 6
    input_ids = torch.randint(1, V, (2, L), generator=g)
    position_ids = torch.stack([torch.arange(L), torch.arange(L) + L])  # row 1 continues at 6..11
    labels = input_ids.clone()
    labels[0, 0] = IGNORE_INDEX
    labels[1, :2] = IGNORE_INDEX
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    assert modeling._flattening_joins_rows(position_ids)

    loss, count = trained_token_loss(model, batch, impl)
    loss.backward()
    got = grads(model)
    model.zero_grad()

    want, want_count = 0.0, 0
    for b in range(2):
        row = {k: v[b : b + 1] for k, v in batch.items()}
        part, n = trained_token_loss(model, row, "torch")
        part.backward()
        want, want_count = want + part.detach(), want_count + n
    assert count == want_count == 9
    assert torch.allclose(loss.detach(), want, atol=1e-5, rtol=1e-5)
    for name, grad in grads(model).items():
        assert torch.allclose(got[name], grad, atol=1e-5), name

    # The hazard is real: the same rows flattened into one sequence give a different loss.
    flat = {k: v.reshape(1, -1) for k, v in batch.items()}
    flat["labels"] = torch.cat([labels[0], torch.full((1,), IGNORE_INDEX), labels[1, 1:]]).reshape(1, -1)
    with torch.no_grad():
        joined, _ = trained_token_loss(model, flat, "torch")
    assert not torch.allclose(joined, want, atol=1e-4)


@pytest.mark.parametrize("impl", ["torch", "fused"])
def test_sdpa_packed_with_cu_seq_lens_equals_sdpa(impl):
    """The trainer's default attention (backend/attention.py) gives the same loss and gradients as sdpa's mask."""
    import backend.attention  # noqa: F401  registers sdpa_packed

    batch, documents = make_batch(ROWS)
    B, L = batch["input_ids"].shape
    # every token starts a segment (padding: one-token segments, like collate's) except inside a document
    inside = {b * L + i for b, s, e in documents for i in range(s + 1, e)}
    cu = torch.tensor([i for i in range(B * L + 1) if i not in inside], dtype=torch.int32)
    batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=L, max_length_k=L)

    ref = tiny_llama(seed=5)
    packed = tiny_llama(seed=5)
    packed.config._attn_implementation = "sdpa_packed"
    want, n_want = trained_token_loss(ref, batch, impl)
    got, n_got = trained_token_loss(packed, batch, impl)
    want.backward()
    got.backward()
    assert n_got == n_want > 0
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-6)
    for (name, p), q in zip(packed.named_parameters(), ref.parameters(), strict=False):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name


def test_sdpa_packed_reads_the_boundaries_once_per_forward(monkeypatch):
    """Every layer receives the same cu_seq_lens: the segment lengths (a .tolist(), a host sync on GPU) are read
    once per forward, not once per layer, and a new batch is never served the previous batch's plan."""
    import backend.attention as attention

    calls = []
    real = attention.segment_lengths
    monkeypatch.setattr(attention, "segment_lengths", lambda *a: calls.append(1) or real(*a))
    model = tiny_llama(seed=5)
    model.config._attn_implementation = "sdpa_packed"
    assert model.config.num_hidden_layers > 1
    batch, documents = make_batch(ROWS)
    B, L = batch["input_ids"].shape
    inside = {b * L + i for b, s, e in documents for i in range(s + 1, e)}
    cu = torch.tensor([i for i in range(B * L + 1) if i not in inside], dtype=torch.int32)
    batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=L, max_length_k=L)
    with torch.no_grad():
        first, _ = trained_token_loss(model, batch, "torch")
    assert len(calls) == 1
    # the same rows as one document each (a different tensor): recomputed, and the loss changes with it
    whole = torch.arange(0, B * L + 1, L, dtype=torch.int32)
    batch.update(cu_seq_lens_q=whole, cu_seq_lens_k=whole)
    with torch.no_grad():
        joined, _ = trained_token_loss(model, batch, "torch")
    assert len(calls) == 2
    assert not torch.allclose(first, joined, atol=1e-4)
