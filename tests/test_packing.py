"""Packing plans, the sampler and collate: properties over random lengths and masks (no model here; the model-level
equalities are in tests/test_modeling.py)."""

from collections import Counter

import numpy as np
import pytest
import torch

from backend import IGNORE_INDEX
from backend.packing import PackedSampler, Piece, collate, pack


class MemDataset:
    """Same `document(i) -> (tokens, trained)` method as backend.dataset.TokenDataset."""

    def __init__(self, lengths, seed=0, vocab=97):
        rng = np.random.default_rng(seed)
        self.docs = [(rng.integers(1, vocab, n), rng.random(n) < 0.6) for n in lengths]
        self.lengths = np.asarray(lengths, dtype=np.int64)

    def __len__(self):
        return len(self.docs)

    def document(self, i):
        return self.docs[i]


def random_lengths(seed, n=200, hi=80):
    rng = np.random.default_rng(seed)
    return np.maximum(1, rng.lognormal(np.log(20), 0.9, n).astype(np.int64)).clip(max=hi)


def covered(plan):
    """document -> list of (begin, end) pieces."""
    out = {}
    for row in plan.rows:
        for p in row:
            out.setdefault(p.document, []).append((p.begin, p.end))
    return out


@pytest.mark.parametrize("strategy", ["greedy", "best_fit"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_truncation_every_document_whole_once(strategy, seed):
    lengths = random_lengths(seed)
    L = 64
    plan = pack(lengths, L, strategy=strategy, window=37)
    cov = covered(plan)
    long = set(np.flatnonzero(lengths > L).tolist())
    assert set(plan.skipped.tolist()) == long
    assert plan.tokens_skipped == int(lengths[list(long)].sum()) if long else plan.tokens_skipped == 0
    for d, n in enumerate(lengths.tolist()):
        if d in long:
            assert d not in cov
        else:
            assert cov[d] == [(0, n)], (d, cov.get(d))
    for row in plan.rows:
        assert 0 < sum(p.end - p.begin for p in row) <= L
    assert plan.tokens_placed == int(lengths.sum()) - plan.tokens_skipped
    assert plan.fill == pytest.approx(plan.tokens_placed / (plan.num_rows * L))


def test_greedy_is_order_keeping_next_fit():
    plan = pack([5, 4, 9, 3, 12, 1], 12, strategy="greedy")
    assert [[p.document for p in r] for r in plan.rows] == [[0, 1], [2, 3], [4], [5]]
    # a document of exactly sequence_length fits
    assert plan.rows[2] == [Piece(4, 0, 12)]


def test_best_fit_fills_better_and_keeps_windows():
    lengths = random_lengths(3, n=2000, hi=64)
    g = pack(lengths, 64, "greedy")
    b = pack(lengths, 64, "best_fit", window=100)
    assert b.fill > g.fill and b.num_rows < g.num_rows
    # rows never mix documents of different windows
    for row in b.rows:
        assert len({p.document // 100 for p in row}) == 1


@pytest.mark.parametrize("seed", [0, 1])
def test_truncation_covers_every_token_and_target_exactly_once(seed):
    lengths = random_lengths(seed, n=100, hi=300)
    L = 48
    plan = pack(lengths, L, truncate_documents=True)
    assert len(plan.skipped) == 0 and plan.tokens_skipped == 0
    cov = covered(plan)
    for d, n in enumerate(lengths.tolist()):
        pieces = sorted(cov[d])
        inputs = Counter(t for b, e in pieces for t in range(b, e))
        targets = Counter(t for b, e in pieces for t in range(b + 1, e))  # first slot of a piece is never a target
        assert set(inputs) == set(range(n))
        assert targets == Counter(range(1, n)), d  # each target token trained exactly once
        assert all(e - b >= 2 or n == 1 for b, e in pieces)
    # rows full except the last and 1-token gaps
    sizes = [sum(p.end - p.begin for p in r) for r in plan.rows]
    assert all(s >= L - 1 for s in sizes[:-1])


def test_bad_input_messages():
    with pytest.raises(ValueError, match="unknown strategy"):
        pack([3], 8, strategy="first_fit")
    with pytest.raises(ValueError, match="pack: document 1 has a negative length"):
        pack([3, -1], 8)
    with pytest.raises(ValueError, match="no document can be packed"):
        PackedSampler([100, 200], 64)
    with pytest.raises(
        ValueError, match=r"pack: lengths must be a 1-D array of tokens per document, got shape \(1, 2\)"
    ):
        pack([[3, 4]], 8)
    with pytest.raises(ValueError, match="pack: lengths must be integers, got dtype float64"):
        pack([3.5], 8)
    with pytest.raises(ValueError, match=r"pack: sequence_length must be >= 2 \(got 1\); a row must hold a target"):
        pack([1], 1)
    assert pack([2, 1], 2).num_rows == 2  # the shortest row there is


# --- sampler --------------------------------------------------------------------------------------------------------


def test_sampler_deterministic_epochs_and_resume():
    lengths = random_lengths(4, n=300, hi=100)
    a = PackedSampler(lengths, 64, seed=7, strategy="best_fit", window=50)
    b = PackedSampler(lengths, 64, seed=7, strategy="best_fit", window=50)
    n0, n1 = a.num_rows_in_epoch(0), a.num_rows_in_epoch(1)
    stream = a.rows(0, n0 + n1 + 5)
    # a fresh sampler asked directly for row k (a resume) gives the same rows, no replay needed
    for k in [0, n0 - 1, n0, n0 + 3, n0 + n1 + 4]:
        assert PackedSampler(lengths, 64, seed=7, strategy="best_fit", window=50).row(k) == stream[k]
    assert b.rows(n0 - 2, 4) == stream[n0 - 2 : n0 + 2]
    # each epoch holds every packable document whole, exactly once
    long = set(np.flatnonzero(lengths > 64).tolist())
    for e, (s, n) in enumerate([(0, n0), (n0, n1)]):
        docs = Counter(p.document for r in stream[s : s + n] for p in r)
        assert set(docs) == set(range(len(lengths))) - long and max(docs.values()) == 1, e
    assert a.skipped.tolist() == sorted(long)
    assert a.tokens_skipped == int(lengths[sorted(long)].sum()) == a.stats()["tokens_skipped"]
    # epochs differ (reshuffled); a different seed differs
    assert stream[:n0] != stream[n0 : 2 * n0]
    assert PackedSampler(lengths, 64, seed=8, window=50).rows(0, 5) != stream[:5]


def test_micro_batches_same_global_batch_for_any_world_size():
    lengths = random_lengths(5, n=400, hi=64)
    s = PackedSampler(lengths, 64, seed=1)
    for step in [0, 3]:
        one = [r for mb in s.micro_batches(step, 8, 2, 0, 1) for r in mb]
        two = [r for rank in range(2) for mb in s.micro_batches(step, 8, 2, rank, 2) for r in mb]
        four = [r for rank in range(4) for mb in s.micro_batches(step, 8, 1, rank, 4) for r in mb]
        assert one == two == four == s.rows(step * 8, 8)
        i0 = s.micro_batch_indices(step, 8, 2, 0, 2)
        i1 = s.micro_batch_indices(step, 8, 2, 1, 2)
        assert not set(sum(i0, [])) & set(sum(i1, []))
    with pytest.raises(ValueError, match="multiple of"):
        s.micro_batch_indices(0, 6, 2, 0, 2)


# --- collate --------------------------------------------------------------------------------------------------------


def segments_from_positions(pos_row):
    starts = [0] + [t for t in range(1, len(pos_row)) if pos_row[t] != pos_row[t - 1] + 1]
    return np.diff(starts + [len(pos_row)]).tolist()


@pytest.mark.parametrize("truncate", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_collate_labels_positions_segments(seed, truncate):
    lengths = random_lengths(seed, n=60, hi=100)
    ds = MemDataset(lengths, seed)
    L = 64
    s = PackedSampler(lengths, L, seed=seed, truncate_documents=truncate, window=20)
    rows = s.rows(0, 5)
    batch = collate(rows, ds, L, pad_id=0)
    ids, labels, pos = batch["input_ids"].numpy(), batch["labels"].numpy(), batch["position_ids"].numpy()
    assert ids.shape == labels.shape == pos.shape == (5, L)
    cu = batch["cu_seq_lens_q"]
    assert cu.dtype == torch.int32 and int(cu[-1]) == 5 * L
    assert batch["max_length_q"] == int(torch.diff(cu).max())
    seg_from_pos = sum((segments_from_positions(pos[r]) for r in range(5)), [])
    assert seg_from_pos == torch.diff(cu).tolist()  # the position ids split exactly as cu_seq_lens do
    expected_trained = 0
    for r, row in enumerate(rows):
        t = 0
        for p in row:
            tok, tr = ds.document(p.document)
            n = p.end - p.begin
            assert (ids[r, t : t + n] == tok[p.begin : p.end]).all()
            assert (pos[r, t : t + n] == np.arange(p.begin, p.end)).all()
            assert labels[r, t] == IGNORE_INDEX  # never predicted across a boundary
            want = np.where(tr[p.begin + 1 : p.end], tok[p.begin + 1 : p.end], IGNORE_INDEX)
            assert (labels[r, t + 1 : t + n] == want).all()
            expected_trained += int(tr[p.begin + 1 : p.end].sum())
            t += n
        assert (labels[r, t:] == IGNORE_INDEX).all() and (ids[r, t:] == 0).all()  # padding never trained
        assert (pos[r, t:] == np.arange(L - t)).all()
    assert batch["num_trained"] == expected_trained == int((labels != IGNORE_INDEX).sum())


def test_collate_docstring_example_and_cross_document():
    class DS:
        def document(self, i):
            return [
                (np.array([10, 11, 12, 13, 14]), np.array([0, 0, 1, 1, 1], bool)),
                (np.array([20, 21, 22, 23]), np.array([0, 0, 1, 1], bool)),
            ][i]

    rows = [[Piece(0, 0, 5), Piece(1, 0, 4)]]
    b = collate(rows, DS(), 12, pad_id=0)
    assert b["input_ids"].tolist() == [[10, 11, 12, 13, 14, 20, 21, 22, 23, 0, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]]
    X = IGNORE_INDEX
    assert b["labels"].tolist() == [[X, X, 12, 13, 14, X, X, 22, 23, X, X, X]]
    assert b["cu_seq_lens_q"].tolist() == [0, 5, 9, 12] and b["max_length_q"] == 5 and b["num_trained"] == 5
    c = collate(rows, DS(), 12, cross_document_attention=True)
    assert c["position_ids"].tolist() == [list(range(12))]
    assert c["cu_seq_lens_q"].tolist() == [0, 12] and c["max_length_q"] == 12
    assert c["labels"].tolist() == b["labels"].tolist()  # boundary label still not trained


def test_collate_rejects_plan_from_other_dataset():
    with pytest.raises(ValueError, match="outside document"):
        collate([[Piece(0, 0, 9)]], MemDataset([5]), 16)
    with pytest.raises(ValueError, match="sequence_length"):
        collate([[Piece(0, 0, 5), Piece(1, 0, 5)]], MemDataset([5, 5]), 8)


@pytest.mark.parametrize("L", [4, 7, 16])
def test_stream_packing_fills_every_row_it_cuts_and_loses_no_document(L):
    """truncate_documents: yes (the stream): a row that ends in a cut holds exactly L tokens; any other row ends
    only where fewer than 2 tokens are left (a piece of one token trains nothing); each document is covered from
    its first to its last token, each continuation starting one token before the cut (the next target's context);
    empty documents are passed over, never the ones after them."""
    rng = np.random.default_rng(L)
    for _ in range(20):
        lengths = rng.integers(0, 3 * L, size=12)
        lengths[rng.integers(0, 12)] = 0
        rows = pack(lengths, L, truncate_documents=True).rows
        pieces = {}
        for i, row in enumerate(rows):
            used = sum(p.end - p.begin for p in row)
            assert used <= L
            cut = row[-1].end < lengths[row[-1].document]
            if cut:
                assert used == L, (lengths, rows[i])
            elif i < len(rows) - 1:
                assert L - used < 2, (lengths, rows[i])
            for p in row:
                pieces.setdefault(p.document, []).append((p.begin, p.end))
        assert sorted(pieces) == [d for d in range(len(lengths)) if lengths[d] > 0]
        for d, spans in pieces.items():
            assert spans[0][0] == 0 and spans[-1][1] == lengths[d]
            assert all(b == prev_end - 1 for (_, prev_end), (b, _) in zip(spans[:-1], spans[1:], strict=False))


def test_micro_batch_indices_refuses_bad_arguments_and_suggests_the_nearest_batch_size():
    rows = PackedSampler.micro_batch_indices
    assert rows(1, 8, 2, rank=1, world_size=2) == [[12, 13], [14, 15]]
    for bad in ({"micro_batch_size": 0}, {"world_size": 0, "rank": 0}, {"rank": 2}, {"rank": -1}):
        args = {"step": 0, "batch_size": 8, "micro_batch_size": 2, "rank": 0, "world_size": 2, **bad}
        with pytest.raises(ValueError, match="bad micro_batch_size"):
            rows(**args)
    for batch, mbs, world, nearest in ((10, 4, 1, 8), (11, 2, 3, 12), (3, 2, 2, 4), (23, 3, 2, 24)):
        with pytest.raises(ValueError, match=f"multiple of batch.micro_batch_size .*e.g. batch_size: {nearest}$"):
            rows(0, batch, mbs, 0, world)


def test_what_can_be_packed_at_the_edges():
    """A document exactly sequence_length long, or of one token, is placed; with truncate_documents a longer one is
    too (cut); only a split where nothing can be placed is refused; a window of one document is a window."""
    assert PackedSampler([4, 4], 4).num_rows_in_epoch(0) == 2
    assert PackedSampler([1, 1], 4).num_rows_in_epoch(0) == 1
    assert PackedSampler([10], 4, truncate_documents=True).num_rows_in_epoch(0) == 3  # 4 + 4 + 4 (overlaps of 1)
    assert PackedSampler([1], 4, truncate_documents=True).num_rows_in_epoch(0) == 1
    for lengths, truncate in (([0, 0], True), ([0, 0], False), ([5, 6], False)):
        with pytest.raises(ValueError, match="no document can be packed"):
            PackedSampler(lengths, 4, truncate_documents=truncate)
    assert pack([3, 2], 4, window=1).num_rows == 2  # best fit within each one-document window
    with pytest.raises(ValueError, match="window must be >= 1"):
        pack([3], 4, window=0)


def test_greedy_rows_fill_exactly_and_an_empty_plan_reports_zeros():
    """A greedy row filled exactly, then the next one opened; an empty plan's figures are zeros, not a division."""
    assert pack([6, 6, 12, 1], 12, strategy="greedy").rows == [
        [Piece(0, 0, 6), Piece(1, 0, 6)], [Piece(2, 0, 12)], [Piece(3, 0, 1)]
    ]  # fmt: skip
    empty = pack([], 12, strategy="greedy").stats()
    assert (empty["documents_skipped_share"], empty["tokens_skipped_share"], empty["padding"]) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("truncate", [False, True])
def test_the_plan_reports_what_it_was_given_and_what_it_placed(truncate):
    """The figures the Packing tab and the bench show: counted from the lengths given, not assumed."""
    lengths = [5, 0, 4, 9, 3, 14]
    plan = pack(lengths, 12, strategy="greedy", truncate_documents=truncate)
    assert all(p.end > p.begin for row in plan.rows for p in row)  # the empty document is in no row
    s = plan.stats()
    assert s["strategy"] == "greedy" and s["truncate_documents"] is truncate and s["sequence_length"] == 12
    assert s["documents"] == 6 and s["documents_empty"] == 1 and s["tokens"] == 35
    assert s["documents_skipped"] == (0 if truncate else 1) and s["tokens_skipped"] == (0 if truncate else 14)
    placed = 35 + 3 if truncate else 21  # the stream (rows of 12, 12, 12, 2) repeats the token before its 3 cuts
    assert s["tokens_placed"] == placed and s["fill"] == pytest.approx(placed / (12 * s["rows"]))
    assert s["continuation_pieces"] == (3 if truncate else 0) and s["rows"] == (4 if truncate else 2)
    assert s["padding"] == pytest.approx(1 - s["fill"])
    assert s["documents_skipped_share"] == pytest.approx(s["documents_skipped"] / 6)
    assert s["tokens_skipped_share"] == pytest.approx(s["tokens_skipped"] / 35)


def test_a_plan_shuffled_or_renumbered_keeps_its_figures():
    """`PackedSampler` shuffles a plan's rows and maps its documents back to dataset ids: the same plan, so the same
    figures (what the Packing tab and prepare's report read), its rows reordered and renumbered."""
    lengths = [5, 0, 4, 9, 3, 14, 7]
    for truncate in (False, True):
        plan = pack(lengths, 12, strategy="greedy", truncate_documents=truncate)
        plan.extra["note"] = 1
        order = np.arange(plan.num_rows)[::-1].copy()
        ids = np.arange(len(lengths))[::-1] + 100
        for other in (plan.take_rows(order), plan.map_documents(ids)):
            assert other.stats() == plan.stats() and other.extra == plan.extra and other.extra is not plan.extra
        assert plan.take_rows(order).rows == plan.rows[::-1]
        renumbered = plan.map_documents(ids)
        assert renumbered.rows == [[Piece(int(ids[p.document]), p.begin, p.end) for p in row] for row in plan.rows]
        assert renumbered.skipped.tolist() == [int(ids[d]) for d in plan.skipped]
