"""`sdpa_packed`: attention that runs causal SDPA inside each packed document, with no (L, L) mask at all.

transformers' own `sdpa` path for packed rows builds a dense (B, 1, L, L) block-causal mask from the position ids
and runs SDPA over the whole row: its cost is O(L²) whatever the document lengths, the mask alone is L² bytes,
and an explicit mask rules out SDPA's flash kernel on GPU (FACTS.md). A row of 4,096 tokens holding 40 documents
of ~100 tokens does ~40× more attention work than needed.

`sdpa_packed` splits the flattened micro-batch at document boundaries and calls
`F.scaled_dot_product_attention(..., is_causal=True)` once per document (cost Σ len², the flash/efficient kernels
allowed), the way flash-attention's varlen kernel does on GPU:

    tokens     a0 a1 a2 | b0 b1 | p | p          (B*L flattened; documents a, b; two padding tokens)
    segments   [0, 3)     [3, 5)  [5,6) [6,7)    from cu_seq_lens_q (backend.packing.collate), else from
                                                 position-id restarts, like transformers' packed detection
    attention  causal SDPA on a0..a2, causal SDPA on b0..b1; a one-token segment attends to itself only, so its
               output is its own value vector (padding runs are copied, not attended)

Boundaries come from `cu_seq_lens_q` when the caller passes it (backend.loss does for this implementation) and
otherwise from `position_ids` (a new segment wherever a position is not the previous one + 1). Anything that is
not a packed training forward (a KV cache, a 2D padding mask, query/key lengths that differ) falls back to
transformers' `sdpa`, so `generate` works unchanged. Registered under the name `sdpa_packed` in transformers'
attention and mask registries on import; backend.modeling selects it instead of `sdpa` for training.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "sdpa_packed"

__all__ = ["NAME", "packed_sdpa_attention_forward", "segment_lengths", "register"]


def segment_lengths(total: int, cu_seq_lens: torch.Tensor | None, position_ids: torch.Tensor | None) -> list[int]:
    """Lengths of the documents of a flattened (B*L,) batch, in order; they sum to `total`."""
    if cu_seq_lens is not None:
        lengths = torch.diff(cu_seq_lens.long()).tolist()
    else:
        positions = position_ids.reshape(position_ids.shape[0], -1)  # (B, L)
        starts = torch.ones_like(positions, dtype=torch.bool)
        starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
        begin = starts.reshape(-1).nonzero().squeeze(1).tolist() + [positions.numel()]
        lengths = [e - b for b, e in zip(begin[:-1], begin[1:], strict=False)]
    if sum(lengths) != total:
        raise ValueError(
            f"sdpa_packed: document lengths sum to {sum(lengths)} but the batch holds {total} tokens; "
            "cu_seq_lens must describe the flattened micro-batch (backend.packing.collate)"
        )
    return lengths


_last_plan: list = [None, -1, None]  # [weakref to the boundary tensor, total, (chunks, attended)]


def _chunk_plan(total: int, cu_seq_lens, position_ids) -> tuple[list[int], list[bool]]:
    """Chunks to split the flattened batch into, and whether each is attended: each document of 2+ tokens, and
    each run of one-token segments (padding) merged into one chunk.

    Every layer of a forward gets the same boundary tensor: the plan (a ``.tolist()``, i.e. a host sync on GPU)
    is computed once per forward and reused while that tensor is alive and the batch size is the same."""
    source = cu_seq_lens if cu_seq_lens is not None else position_ids
    ref, cached_total, plan = _last_plan
    if ref is not None and ref() is source and cached_total == total:
        return plan
    chunks, attended = [], []
    for seg in segment_lengths(total, cu_seq_lens, position_ids):
        if seg == 1 and chunks and not attended[-1]:
            chunks[-1] += 1
        else:
            chunks.append(seg)
            attended.append(seg > 1)
    _last_plan[:] = [weakref.ref(source), total, (chunks, attended)]
    return chunks, attended


def packed_sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """query (B, Hq, L, D), key/value (B, Hkv, L, D) -> (B, L, Hq, D), None (transformers' attention contract)."""
    batch, heads, length, dim = query.shape
    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    position_ids = kwargs.get("position_ids")
    if (
        key.shape[2] != length
        or attention_mask is not None
        or length == 1
        or (cu_seq_lens is None and position_ids is None)
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    groups = heads // key.shape[1]
    total = batch * length
    q = query.transpose(0, 1).reshape(heads, total, dim)  # (Hq, T, D)
    k = key.transpose(0, 1).reshape(key.shape[1], total, dim)  # (Hkv, T, D)
    v = value.transpose(0, 1).reshape(value.shape[1], total, dim)  # (Hkv, T, D)
    dropout = dropout if module.training else 0.0

    # torch.split, not slicing: a slice's backward writes into a zero tensor of the full size, per slice.
    chunks, attended = _chunk_plan(total, cu_seq_lens, position_ids)
    pieces = []
    for q_c, k_c, v_c, attend in zip(
        q.split(chunks, 1), k.split(chunks, 1), v.split(chunks, 1), attended, strict=False
    ):
        if attend:
            pieces.append(
                F.scaled_dot_product_attention(
                    q_c[None],
                    k_c[None],
                    v_c[None],
                    dropout_p=dropout,
                    is_causal=True,
                    scale=scaling,
                    enable_gqa=groups > 1,
                )[0]
            )  # (Hq, seg, D)
        else:  # one-token segments: softmax over one key is 1, the output is the value itself
            pieces.append(v_c.repeat_interleave(groups, dim=0))
    out = torch.cat(pieces, dim=1)  # (Hq, T, D)
    return out.reshape(heads, batch, length, dim).permute(1, 2, 0, 3).contiguous(), None


def _packed_mask(*args, attention_mask=None, **kwargs):
    """No (L, L) mask for packed training; a real 2D padding mask (generation on a padded batch) goes to sdpa's."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> str:
    """Make `attn_implementation="sdpa_packed"` known to transformers (idempotent). Returns the name."""
    AttentionInterface.register(NAME, packed_sdpa_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, _packed_mask)
    return NAME


register()
