"""Packing tab handler: the documents prepare writes for the first rows, packed and collated by the training code
(`backend.packing.pack` + `collate`) and drawn."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from studio.common import DataSettings, get_reader, get_tokenizer, prepare_config_of

# =============================================================================================== packing view


class _MemoryDocs:
    """What backend.packing.collate reads: ``document(i) -> (tokens, trained)``, here from tokenized samples."""

    def __init__(self, docs: list[tuple[np.ndarray, np.ndarray]]):
        self.docs = docs

    def document(self, i: int):
        return self.docs[i]


@dataclass
class PackingView:
    figure: Any
    mask_figure: Any
    summary: str
    stats: dict
    status: str = ""


def tokenize_documents(
    s: DataSettings,
    max_docs: int,
    split_length: int | None = None,
    split_info: list | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The documents prepare writes for the first ``max_docs`` rows, as (tokens, trained) pairs (rows prepare skips
    are left out). With ``split_length`` (long_documents split_turns), a conversation longer than that is its
    pieces, and ``split_info`` (if given) receives ``(row, tokens, [document index of each piece])`` per split row."""
    tokenizer = get_tokenizer(s.tokenizer)
    cfg = prepare_config_of(s, split_length, split_turns=bool(split_length))
    reader = get_reader(cfg)
    docs = []
    for prepared in reader.samples(range(min(reader.n_rows, int(max_docs))), cfg, tokenizer):
        cut = len(prepared.documents) > len(prepared.pieces or [None])  # split_turns cut it (every_turn: pieces)
        if cut and split_info is not None:
            n_tok = len(prepared.tokenized.input_ids)
            split_info.append((prepared.row, n_tok, list(range(len(docs), len(docs) + len(prepared.documents)))))
        docs += prepared.documents
    return docs


def packing_view(
    s: DataSettings,
    sequence_length: int | float,
    micro_batch_size: int | float,
    strategy: str,
    truncate_documents: bool,
    cross_document_attention: bool,
    max_docs: int | float = 300,
    mask_row: int | float = 0,
    window: int = 1000,
    split_turns: bool = False,
) -> PackingView:
    """Pack the documents prepare writes for the first ``max_docs`` rows with backend.packing.pack, collate the
    first micro-batch with backend.packing.collate and draw it: documents in alternating colors, trained vs masked
    labels, padding."""
    from backend.config import ConfigError
    from backend.packing import collate, pack
    from studio.plots import MASKED_A, MASKED_B, PAD, TRAINED_A, TRAINED_B, block_mask_figure, packed_batch_figure

    try:
        s.masking()  # a bad masking value is named before anything is read
        L = int(sequence_length)
        split_info: list = []
        docs = tokenize_documents(s, int(max_docs or 300), L if split_turns else None, split_info)
        plan = pack(
            np.array([len(d[0]) for d in docs], dtype=np.int64),
            L,
            strategy=strategy,
            window=window,
            truncate_documents=bool(truncate_documents),
        )
    except ConfigError as e:
        return PackingView(None, None, "", {}, "⚠ " + "; ".join(e.problems))
    except Exception as e:
        return PackingView(None, None, "", {}, f"⚠ {type(e).__name__}: {e}")
    stats = plan.stats()
    B = max(1, min(int(micro_batch_size or 1), plan.num_rows))
    rows = plan.rows[:B]
    split_line = ""
    if split_info:  # show the first split conversation: the rows holding its pieces come first
        row_id, n_tok, piece_docs = split_info[0]
        holding = [k for k, row in enumerate(plan.rows) if any(pc.document in piece_docs for pc in row)]
        order = holding + [k for k in range(plan.num_rows) if k not in set(holding)]
        B = max(B, min(len(holding), 8))
        rows = [plan.rows[k] for k in order[:B]]
        split_line = (
            f" split_turns: {len(split_info)} conversations longer than {L} tokens cut at turn boundaries; shown "
            f"first: row {row_id} ({n_tok} tokens) → documents {piece_docs} (lengths "
            f"{[len(docs[d][0]) for d in piece_docs]}), each piece's earlier turns masked context."
        )
    if not rows:
        return PackingView(None, None, "", stats, "⚠ nothing to pack: every document was skipped or empty")
    batch = collate(rows, _MemoryDocs(docs), L, cross_document_attention=bool(cross_document_attention))
    labels = batch["labels"].numpy()  # (B, L)
    positions = batch["position_ids"].numpy()  # (B, L)
    input_ids = batch["input_ids"].numpy()  # (B, L)
    codes = np.full((B, L), PAD, dtype=np.int8)
    hover = [[""] * L for _ in range(B)]
    for r, row in enumerate(rows):
        t = 0
        for k, piece in enumerate(row):
            n = piece.end - piece.begin
            trained = labels[r, t : t + n] != -100
            codes[r, t : t + n] = np.where(
                trained, TRAINED_A if k % 2 == 0 else TRAINED_B, MASKED_A if k % 2 == 0 else MASKED_B
            )
            for j in range(t, t + n):
                hover[r][j] = (
                    f"row {r} slot {j}<br>doc {piece.document} token {piece.begin + j - t}<br>"
                    f"id {input_ids[r, j]} pos {positions[r, j]}<br>"
                    f"label {'trained' if labels[r, j] != -100 else '-100'}"
                )
            t += n
        for j in range(t, L):
            hover[r][j] = f"row {r} slot {j}<br>padding, pos {positions[r, j]}"
    shown_fill = float((codes != PAD).sum()) / codes.size
    fig = packed_batch_figure(codes, hover, f"micro-batch of {B} rows × {L} tokens — fill {shown_fill:.1%}")
    # Block mask of one row: query i may attend key j iff j <= i and both sit in the same segment.
    r = int(mask_row or 0) % B
    seg = np.zeros(L, dtype=np.int64)
    if not cross_document_attention:
        cu = batch["cu_seq_lens_q"].numpy() - r * L
        cu = cu[(cu > 0) & (cu < L)]
        seg[cu] = 1
        seg = np.cumsum(seg)
    stride = max(1, L // 512)  # keep the heatmap drawable: sample every stride-th position
    s = seg[::stride]
    idx = np.arange(L)[::stride]
    mask = (s[:, None] == s[None, :]) & (idx[None, :] <= idx[:, None])
    mask_fig = block_mask_figure(
        mask,
        "row {} attention mask ({})".format(
            r, "documents see each other" if cross_document_attention else "block-diagonal: each document sees itself"
        )
        + (f", every {stride}th position" if stride > 1 else ""),
    )
    summary = (
        f"**{stats['documents']} documents → {stats['rows']} rows** ({strategy}, truncate_documents: "
        f"{'yes' if truncate_documents else 'no'}): fill **{stats['fill']:.1%}**, padding {stats['padding']:.1%}; "
        f"skipped {stats['documents_skipped']} documents holding **{stats['tokens_skipped']} tokens "
        f"({stats['tokens_skipped_share']:.1%})**. Shown micro-batch: fill {shown_fill:.1%}, "
        f"{batch['num_trained']} trained labels."
    ) + split_line
    stats["shown_fill"] = shown_fill
    return PackingView(fig, mask_fig, summary, stats)
