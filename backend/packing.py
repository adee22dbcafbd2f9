"""Packing: documents -> fixed-length rows -> model inputs.

Three pure pieces, each tested alone (tests/test_packing.py), benchmarked by `python bench/bench_packing.py`:

* `pack(lengths, sequence_length, ...)` plans which token slices of which documents go in which row.
* `PackedSampler` shuffles documents per epoch (seed, epoch), packs them and numbers the rows globally, so that a
  step's rows are a pure function of (seed, step): resuming is exact and the global batch does not depend on the
  number of processes.
* `collate(rows, dataset, sequence_length)` reads the tokens and builds the tensors the model takes.

Worked example: sequence_length 12, one row holding document A (5 tokens, a0..a4, trained from a2 on, i.e. a user
turn a0 a1 then an assistant reply a2 a3 a4), document B (4 tokens b0..b3, b2 b3 trained) and 3 tokens of padding::

    slot          0   1   2   3   4 | 5   6   7   8 | 9  10  11
    input_ids    a0  a1  a2  a3  a4 |b0  b1  b2  b3 | p   p   p        p = pad_id
    position_ids  0   1   2   3   4 | 0   1   2   3 | 0   1   2        restart per document; padding is its own
    trained       .   .   T   T   T | .   .   T   T | .   .   .        "document" starting at 0
    labels        -   -  a2  a3  a4 | -   -  b2  b3 | -   -   -        - = IGNORE_INDEX (-100); unshifted: the
                                                                       model's logit at slot t-1 predicts label t
    cu_seq_lens  [0, 5, 9, 12]   max_length 5   num_trained 5

    block mask (row = query slot, column = key slot; # = may attend):
          0 1 2 3 4 5 6 7 8 9 0 1
      0   #
      1   # #
      2   # # #
      3   # # # #
      4   # # # # #
      5             #
      6             # #
      7             # # #
      8             # # # #
      9                     #
     10                     # #
     11                     # # #

Rules (each has a test):
* The label at the first slot of every piece is IGNORE_INDEX even if that token is trained: the logit that would
  predict it sits at the previous slot, which belongs to another document (or another row). Nothing is predicted
  across a document boundary. With `cross_document_attention=True` we keep the same rule (the old Fast-LLM
  behaviour of training "last token of A -> first token of B" was a bug they fixed; we do not bring it back).
* Padding is never trained and forms its own segment(s) with positions from 0, so no real token attends to padding
  and every padding query has at least itself to attend to (no all-masked softmax row, no NaN).
* Row capacity is `sequence_length` input tokens. A document of exactly `sequence_length` tokens fits (it trains
  sequence_length - 1 targets: its first token is never a target). This differs from Fast-LLM's "samples of
  sequence_length + 1 tokens" only in that our labels are unshifted (transformers shifts internally).
* `truncate_documents=False` (default): documents are never split; a document longer than `sequence_length` is
  skipped and reported (documents AND tokens: long documents are few but hold many tokens).
* `truncate_documents=True`: the shuffled token stream is cut at row edges (Fast-LLM semantics). As in Fast-LLM,
  whose consecutive samples overlap by one token, a continuation piece starts ONE token before the cut: that token
  is input only (its label is IGNORE_INDEX by the first-slot rule), so that the first token after the cut is still
  a target, predicted from its real predecessor. Every target token of a document is therefore trained exactly
  once; every token is input at least once (the token before each cut twice). Continuation positions continue from
  the document offset (piece [begin, end) has positions begin..end-1); attention cannot see the earlier row, so a
  continuation sees only its own piece. Pieces shorter than 2 tokens are never started (they train nothing): such
  a 1-token gap at a row end is padding. `strategy` and `window` have no effect with truncation (rows are full).

Packing strategies (truncate_documents=False), over documents in the given (shuffled) order:
* "greedy": the guide's Fast-LLM behaviour, order-keeping next-fit: a document that does not fit closes the row and
  starts the next one. Fill ~0.79 on long-tailed chat lengths (bench/bench_packing.py).
* "best_fit": best-fit decreasing within consecutive windows of `window` documents (sort the window by length,
  longest first; put each document in the open row with the least room that still fits it, else open a row).
  Rows are closed at the end of each window, so data order is kept at window granularity. Fill >= 0.99.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from functools import cached_property
from typing import NamedTuple

import numpy as np

from backend import IGNORE_INDEX

STRATEGIES = ("best_fit", "greedy")


class Piece(NamedTuple):
    """Token slice [begin, end) of one document, placed in a row."""

    document: int
    begin: int
    end: int


@dataclass
class PackingPlan:
    """Rows as flat arrays (fast for 300k documents); `rows` / `row(i)` give lists of `Piece`.

    Row i holds pieces `row_offsets[i]:row_offsets[i+1]` of `piece_document/begin/end`, in slot order.
    """

    sequence_length: int
    strategy: str
    truncate_documents: bool
    row_offsets: np.ndarray  # (R+1,) int64
    piece_document: np.ndarray  # (P,) int64 document ids (indices into the `lengths` given to pack)
    piece_begin: np.ndarray  # (P,) int64
    piece_end: np.ndarray  # (P,) int64
    skipped: np.ndarray  # document ids longer than sequence_length (never placed), in input order
    num_documents: int
    num_tokens: int  # tokens of all documents given
    tokens_skipped: int  # tokens of the skipped documents
    documents_empty: int = 0  # zero-length documents (nothing to place)
    extra: dict = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return len(self.row_offsets) - 1

    def row(self, i: int) -> list[Piece]:
        a, b = self.row_offsets[i], self.row_offsets[i + 1]
        return [
            Piece(int(d), int(s), int(e))
            for d, s, e in zip(self.piece_document[a:b], self.piece_begin[a:b], self.piece_end[a:b], strict=False)
        ]

    @cached_property
    def rows(self) -> list[list[Piece]]:
        return [self.row(i) for i in range(self.num_rows)]

    @property
    def tokens_placed(self) -> int:
        """Input tokens in rows (with truncation, the token before each cut counts twice)."""
        return int((self.piece_end - self.piece_begin).sum())

    @property
    def fill(self) -> float:
        """Real tokens / capacity (rows * sequence_length)."""
        cap = self.num_rows * self.sequence_length
        return self.tokens_placed / cap if cap else 0.0

    @property
    def padding(self) -> float:
        return 1.0 - self.fill if self.num_rows else 0.0

    def stats(self) -> dict:
        continuation = int((self.piece_begin > 0).sum())
        return {
            "strategy": self.strategy,
            "truncate_documents": self.truncate_documents,
            "sequence_length": self.sequence_length,
            "rows": self.num_rows,
            "documents": self.num_documents,
            "documents_skipped": int(len(self.skipped)),
            "documents_skipped_share": len(self.skipped) / self.num_documents if self.num_documents else 0.0,
            "documents_empty": self.documents_empty,
            "tokens": self.num_tokens,
            "tokens_placed": self.tokens_placed,
            "tokens_skipped": self.tokens_skipped,
            "tokens_skipped_share": self.tokens_skipped / self.num_tokens if self.num_tokens else 0.0,
            "continuation_pieces": continuation,
            "fill": self.fill,
            "padding": self.padding,
        }

    def take_rows(self, order: np.ndarray) -> PackingPlan:
        """The same plan with rows reordered (row k of the result is row order[k] of this one)."""
        order = np.asarray(order, dtype=np.int64)
        counts = np.diff(self.row_offsets)[order]
        offsets = np.zeros(len(order) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        # index of each output piece in the input arrays
        starts = self.row_offsets[order]
        idx = np.repeat(starts - offsets[:-1], counts) + np.arange(offsets[-1], dtype=np.int64)
        return PackingPlan(
            self.sequence_length,
            self.strategy,
            self.truncate_documents,
            offsets,
            self.piece_document[idx],
            self.piece_begin[idx],
            self.piece_end[idx],
            self.skipped,
            self.num_documents,
            self.num_tokens,
            self.tokens_skipped,
            self.documents_empty,
            dict(self.extra),
        )

    def map_documents(self, ids: np.ndarray) -> PackingPlan:
        """The same plan with document ids translated through `ids` (position in the packed order -> real id)."""
        ids = np.asarray(ids, dtype=np.int64)
        return PackingPlan(
            self.sequence_length,
            self.strategy,
            self.truncate_documents,
            self.row_offsets,
            ids[self.piece_document],
            self.piece_begin,
            self.piece_end,
            ids[self.skipped],
            self.num_documents,
            self.num_tokens,
            self.tokens_skipped,
            self.documents_empty,
            dict(self.extra),
        )


def _check_lengths(lengths, sequence_length) -> np.ndarray:
    lengths = np.asarray(lengths)
    if lengths.ndim != 1:
        raise ValueError(f"pack: lengths must be a 1-D array of tokens per document, got shape {lengths.shape}")
    if len(lengths) and not np.issubdtype(lengths.dtype, np.integer):
        raise ValueError(f"pack: lengths must be integers, got dtype {lengths.dtype}")
    lengths = lengths.astype(np.int64, copy=False)
    if len(lengths) and lengths.min() < 0:
        raise ValueError(f"pack: document {int(np.argmin(lengths))} has a negative length")
    if int(sequence_length) < 2:
        raise ValueError(f"pack: sequence_length must be >= 2 (got {sequence_length}); a row must hold a target")
    return lengths


def pack(
    lengths, sequence_length: int, strategy: str = "best_fit", window: int = 1000, truncate_documents: bool = False
) -> PackingPlan:
    """Plan rows of `sequence_length` tokens over documents 0..D-1 taken in the given order.

    >>> plan = pack([5, 4, 9, 3], 12, strategy="greedy")
    >>> plan.rows   # [5,4] fit (9 tokens); 9 does not fit in the 3 left: new row; 3 fits with it
    [[Piece(document=0, begin=0, end=5), Piece(document=1, begin=0, end=4)],
     [Piece(document=2, begin=0, end=9), Piece(document=3, begin=0, end=3)]]
    >>> pack([5, 4, 9, 3], 12, truncate_documents=True).rows   # stream cut at 12; piece of 2 starts 1 before the cut
    [[Piece(document=0, begin=0, end=5), Piece(document=1, begin=0, end=4), Piece(document=2, begin=0, end=3)],
     [Piece(document=2, begin=2, end=9), Piece(document=3, begin=0, end=3)]]
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"pack: unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    if int(window) < 1:
        raise ValueError(f"pack: window must be >= 1 document (got {window})")
    L = int(sequence_length)
    lengths = _check_lengths(lengths, L)
    n = len(lengths)
    empty = int((lengths == 0).sum())
    if truncate_documents:
        skipped = np.zeros(0, dtype=np.int64)
        offsets, docs, begins, ends = _pack_stream(lengths, L)
    else:
        skipped = np.flatnonzero(lengths > L).astype(np.int64)
        if strategy == "greedy":
            offsets, docs, begins, ends = _pack_greedy(lengths, L)
        else:
            offsets, docs, begins, ends = _pack_best_fit(lengths, L, int(window))
    return PackingPlan(
        L,
        strategy,
        bool(truncate_documents),
        offsets,
        docs,
        begins,
        ends,
        skipped,
        n,
        int(lengths.sum()),
        int(lengths[skipped].sum()),
        empty,
    )


def _arrays(row_sizes, docs, begins, ends):
    offsets = np.zeros(len(row_sizes) + 1, dtype=np.int64)
    np.cumsum(np.asarray(row_sizes, dtype=np.int64), out=offsets[1:])
    return (
        offsets,
        np.asarray(docs, dtype=np.int64),
        np.asarray(begins, dtype=np.int64),
        np.asarray(ends, dtype=np.int64),
    )


def _pack_greedy(lengths: np.ndarray, L: int):
    docs = np.flatnonzero((lengths > 0) & (lengths <= L))
    row_sizes, used, count = [], 0, 0
    for ln in lengths[docs].tolist():
        if used + ln > L:  # does not fit: close the row (its rest is padding), start the next
            row_sizes.append(count)
            used, count = 0, 0
        used += ln
        count += 1
    if count:
        row_sizes.append(count)
    return _arrays(row_sizes, docs, np.zeros(len(docs)), lengths[docs])


def _pack_best_fit(lengths: np.ndarray, L: int, window: int):
    out_docs, row_sizes = [], []
    for w0 in range(0, len(lengths), window):
        lw = lengths[w0 : w0 + window]
        ok = np.flatnonzero((lw > 0) & (lw <= L))
        # longest first; stable so that equal lengths keep the shuffled order
        order = ok[np.argsort(-lw[ok], kind="stable")]
        bins: list[list[int]] = []
        room: list[int] = []  # sorted remaining capacities of open rows
        room_bin: list[int] = []  # row index for each entry of `room`
        for j, ln in zip((order + w0).tolist(), lw[order].tolist(), strict=False):
            k = bisect.bisect_left(room, ln)  # the open row with the least room that still fits
            if k < len(room):
                left = room.pop(k) - ln
                b = room_bin.pop(k)
            else:
                left, b = L - ln, len(bins)
                bins.append([])
            bins[b].append(j)
            if left > 0:
                k = bisect.bisect_left(room, left)
                room.insert(k, left)
                room_bin.insert(k, b)
        for b in bins:
            out_docs.extend(b)
            row_sizes.append(len(b))
    docs = np.asarray(out_docs, dtype=np.int64)
    return _arrays(row_sizes, docs, np.zeros(len(docs)), lengths[docs] if len(docs) else docs)


def _pack_stream(lengths: np.ndarray, L: int):
    docs, begins, ends, row_sizes = [], [], [], []
    used, count = 0, 0
    for d, ln in enumerate(lengths.tolist()):
        if ln == 0:
            continue
        start = 0
        while True:
            if L - used < 2:
                # a piece of <2 tokens trains nothing: leave the gap as padding, start a fresh row
                row_sizes.append(count)
                used, count = 0, 0
            take = min(ln - start, L - used)
            docs.append(d)
            begins.append(start)
            ends.append(start + take)
            used += take
            count += 1
            if start + take >= ln:
                break
            # cut: this row is full; the continuation repeats the last token as context for the next target
            row_sizes.append(count)
            used, count = 0, 0
            start = start + take - 1
    if count:
        row_sizes.append(count)
    return _arrays(row_sizes, docs, begins, ends)


class PackedSampler:
    """Rows numbered globally across epochs: epoch e shuffles documents with `np.random.default_rng((seed, e))`,
    packs that order, then shuffles the rows (best-fit creates each window's rows longest-first).

    `row(i)` packs only the epochs needed to locate i (each epoch is packed once; the two most recent plans are
    cached, earlier epochs keep only their row counts). Everything is a pure function of the arguments.

    >>> s = PackedSampler([5, 4, 9, 3, 20], 12, seed=0, strategy="greedy")
    >>> s.skipped.tolist(), s.num_rows_in_epoch(0)      # document 4 (20 tokens) never fits
    ([4], 2)
    """

    def __init__(
        self,
        lengths,
        sequence_length: int,
        seed: int = 0,
        strategy: str = "best_fit",
        window: int = 1000,
        truncate_documents: bool = False,
    ):
        self.lengths = _check_lengths(lengths, sequence_length)
        self.sequence_length = int(sequence_length)
        self.seed = int(seed)
        self.strategy = strategy
        self.window = int(window)
        self.truncate_documents = bool(truncate_documents)
        if strategy not in STRATEGIES:
            raise ValueError(f"PackedSampler: unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
        placeable = (
            self.lengths > 0 if self.truncate_documents else (self.lengths > 0) & (self.lengths <= self.sequence_length)
        )
        if not placeable.any():
            raise ValueError(
                f"PackedSampler: no document can be packed: {len(self.lengths)} documents, longest "
                f"{int(self.lengths.max()) if len(self.lengths) else 0} tokens, "
                f"sequence_length {self.sequence_length}. "
                "Raise batch.sequence_length or set data.truncate_documents: yes."
            )
        self._plans: dict[int, PackingPlan] = {}
        self._epoch_rows: list[int] = []  # rows in epochs 0..k-1
        self._epoch_start = [0]  # global index of each epoch's first row

    @property
    def skipped(self) -> np.ndarray:
        """Document ids never placed (longer than sequence_length, truncate_documents=False); same every epoch."""
        if self.truncate_documents:
            return np.zeros(0, dtype=np.int64)
        return np.flatnonzero(self.lengths > self.sequence_length)

    @property
    def tokens_skipped(self) -> int:
        """Tokens in the skipped documents: report these, not only the document count (few long documents can
        hold a third of the tokens; bench/bench_packing.py)."""
        return int(self.lengths[self.skipped].sum())

    def stats(self) -> dict:
        """Packing statistics of epoch 0 (fill varies slightly by epoch; skipped counts do not)."""
        return self.plan(0).stats()

    def plan(self, epoch: int) -> PackingPlan:
        if epoch not in self._plans:
            rng = np.random.default_rng((self.seed, epoch))
            perm = rng.permutation(len(self.lengths))
            plan = pack(self.lengths[perm], self.sequence_length, self.strategy, self.window, self.truncate_documents)
            plan = plan.map_documents(perm).take_rows(rng.permutation(plan.num_rows))
            plan.skipped = np.sort(plan.skipped)
            if len(self._plans) >= 2:
                self._plans.pop(min(self._plans))
            self._plans[epoch] = plan
        return self._plans[epoch]

    def num_rows_in_epoch(self, epoch: int) -> int:
        while len(self._epoch_rows) <= epoch:
            rows = self.plan(len(self._epoch_rows)).num_rows
            self._epoch_rows.append(rows)
            self._epoch_start.append(self._epoch_start[-1] + rows)
        return self._epoch_rows[epoch]

    def locate(self, i: int) -> tuple[int, int]:
        """Global row index -> (epoch, row within that epoch)."""
        if i < 0:
            raise IndexError(f"PackedSampler: row index must be >= 0, got {i}")
        e = bisect.bisect_right(self._epoch_start, i) - 1
        while e >= len(self._epoch_rows):  # i lies beyond the epochs counted so far
            self.num_rows_in_epoch(len(self._epoch_rows))
            e = bisect.bisect_right(self._epoch_start, i) - 1
        return e, i - self._epoch_start[e]

    def row(self, i: int) -> list[Piece]:
        e, k = self.locate(int(i))
        return self.plan(e).row(k)

    def rows(self, start: int, count: int) -> list[list[Piece]]:
        return [self.row(i) for i in range(start, start + count)]

    @staticmethod
    def micro_batch_indices(
        step: int, batch_size: int, micro_batch_size: int, rank: int = 0, world_size: int = 1
    ) -> list[list[int]]:
        """Global row indices for one rank at one optimizer step, grouped in micro-batches.

        The step's rows are always [step*batch_size, (step+1)*batch_size), whatever the world size; rank r takes
        the r-th contiguous share, cut into micro-batches. batch_size=8, micro_batch_size=2, world_size=2:
        rank 0 -> [[8s, 8s+1], [8s+2, 8s+3]], rank 1 -> [[8s+4, 8s+5], [8s+6, 8s+7]].
        """
        if micro_batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"micro_batches: bad micro_batch_size={micro_batch_size}, rank={rank}, world_size={world_size}"
            )
        if batch_size % (micro_batch_size * world_size):
            raise ValueError(
                f"batch.batch_size ({batch_size}) must be a multiple of batch.micro_batch_size ({micro_batch_size}) "
                f"x number of processes ({world_size}); e.g. batch_size: "
                f"{max(1, round(batch_size / (micro_batch_size * world_size))) * micro_batch_size * world_size}"
            )
        per_rank = batch_size // world_size
        first = step * batch_size + rank * per_rank
        return [list(range(first + m, first + m + micro_batch_size)) for m in range(0, per_rank, micro_batch_size)]

    def micro_batches(
        self, step: int, batch_size: int, micro_batch_size: int, rank: int = 0, world_size: int = 1
    ) -> list[list[list[Piece]]]:
        """Rows (lists of `Piece`) for one rank at one step: a list of micro-batches, each a list of rows."""
        return [
            [self.row(i) for i in mb]
            for mb in self.micro_batch_indices(step, batch_size, micro_batch_size, rank, world_size)
        ]


def collate(
    rows: list[list[Piece]], dataset, sequence_length: int, cross_document_attention: bool = False, pad_id: int = 0
) -> dict:
    """Rows of pieces -> model inputs (see the module docstring for a drawn example).

    `dataset.document(i) -> (tokens, trained)` (backend.dataset.TokenDataset or anything with that method).
    Returns torch tensors: input_ids, labels, position_ids (B, L) int64; cu_seq_lens_q/k (N+1,) int32 over the
    flattened B*L tokens (padding segments included, so they sum to B*L); max_length_q/k int; num_trained int.
    With cross_document_attention=True each row is one segment with positions 0..L-1 (documents see each other);
    labels keep IGNORE_INDEX at each document's first slot.
    """
    import torch

    L = int(sequence_length)
    B = len(rows)
    input_ids = np.full((B, L), pad_id, dtype=np.int64)
    labels = np.full((B, L), IGNORE_INDEX, dtype=np.int64)
    position_ids = np.zeros((B, L), dtype=np.int64)
    segments: list[int] = []
    for r, row in enumerate(rows):
        t = 0
        for piece in row:
            d, begin, end = int(piece[0]), int(piece[1]), int(piece[2])
            tokens, trained = dataset.document(d)
            if not 0 <= begin < end <= len(tokens):
                raise ValueError(
                    f"collate: row {r} piece {piece} is outside document {d} "
                    f"({len(tokens)} tokens); was the plan built from another dataset?"
                )
            n = end - begin
            if t + n > L:
                raise ValueError(
                    f"collate: row {r} holds {t + n} tokens > sequence_length {L}; the plan was "
                    "built with another sequence_length"
                )
            tok = np.asarray(tokens[begin:end], dtype=np.int64)
            lab = np.where(np.asarray(trained[begin:end], dtype=bool), tok, IGNORE_INDEX)
            lab[0] = IGNORE_INDEX  # its predictor (slot t-1) is another document / row: never a target
            input_ids[r, t : t + n] = tok
            labels[r, t : t + n] = lab
            position_ids[r, t : t + n] = np.arange(begin, end)  # continuation pieces continue their positions
            segments.append(n)
            t += n
        if cross_document_attention:
            position_ids[r] = np.arange(L)
            segments[len(segments) - len(row) :] = []
            segments.append(L)
        elif t < L:
            position_ids[r, t:] = np.arange(L - t)  # padding: its own segment, positions from 0
            segments.append(L - t)
    cu = np.zeros(len(segments) + 1, dtype=np.int32)
    np.cumsum(segments, out=cu[1:])
    cu_t = torch.from_numpy(cu)
    max_len = int(max(segments)) if segments else 0
    return {
        "input_ids": torch.from_numpy(input_ids),  # (B, L)
        "labels": torch.from_numpy(labels),  # (B, L) unshifted
        "position_ids": torch.from_numpy(position_ids),  # (B, L)
        "cu_seq_lens_q": cu_t,  # (N+1,) int32
        "cu_seq_lens_k": cu_t.clone(),
        "max_length_q": max_len,
        "max_length_k": max_len,
        "num_trained": int((labels != IGNORE_INDEX).sum()),
    }
