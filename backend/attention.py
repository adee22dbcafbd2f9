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

A DPO pair whose prompt is placed once (backend/preference.py) passes ``shared_prefix``: its rejected answer is
its own segment that attends to the s prompt tokens at the start of its chosen document, then causally to itself
(one SDPA call with an (n, s + n) bottom-right causal mask); no other kernel is given such a batch
(backend.modeling.model_inputs refuses it).

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


_last_plan: list = [None, -1, None, None]  # [weakref to the boundary tensor, total, plan, weakref to shared_prefix]


def _chunk_plan(total: int, cu_seq_lens, position_ids, shared_prefix=None) -> tuple[list[int], list]:
    """Chunks to split the flattened batch into, and how each is attended: True for each document of 2+ tokens
    (causal within it), False for each run of one-token segments (padding) merged into one chunk, and (i, s) for a
    document that continues the first s tokens of chunk i (a shared prompt: `shared_prefix`).

    ``shared_prefix`` (n, 3) int64 rows [start, prefix_start, s] in flattened positions (backend.preference's
    shared-prompt pairs): the document starting at ``start`` sees the s tokens from ``prefix_start`` (the start of
    an earlier document) before its own, causally, as if they were its first s tokens; its positions continue from
    s. Every layer of a forward gets the same tensors: the plan (a ``.tolist()``, i.e. a host sync on GPU) is
    computed once per forward and reused while they are alive and the batch size is the same."""
    source = cu_seq_lens if cu_seq_lens is not None else position_ids
    ref, cached_total, plan, shared_ref = _last_plan
    if (
        ref is not None
        and ref() is source
        and cached_total == total
        and (shared_ref is None) == (shared_prefix is None)  # a freed shared_prefix's weakref also answers None
        and (shared_ref is None or shared_ref() is shared_prefix)
    ):
        return plan
    continues = {}
    if shared_prefix is not None:
        continues = {int(b): (int(a), int(n)) for b, a, n in shared_prefix.tolist()}
    chunks, attended, chunk_at, offset = [], [], {}, 0
    for seg in segment_lengths(total, cu_seq_lens, position_ids):
        if offset in continues:
            a, n = continues.pop(offset)
            if a not in chunk_at or not 0 < n < chunks[chunk_at[a]]:
                raise ValueError(f"sdpa_packed: shared_prefix [{offset}, {a}, {n}] names no earlier document")
            chunks.append(seg)
            attended.append((chunk_at[a], n))
        elif seg == 1 and chunks and attended[-1] is False:
            chunks[-1] += 1
        else:
            chunk_at[offset] = len(chunks)
            chunks.append(seg)
            attended.append(seg > 1)
        offset += seg
    if continues:
        raise ValueError(f"sdpa_packed: shared_prefix starts {sorted(continues)} are not document starts")
    plan = (chunks, attended)
    shared_ref = weakref.ref(shared_prefix) if shared_prefix is not None else None
    _last_plan[:] = [weakref.ref(source), total, plan, shared_ref]
    return plan


def packed_sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """query (B, Hq, L, D), key/value (B, Hkv, L, D) -> (B, L, Hq, D), None (transformers' attention contract)."""
    batch, heads, length, dim = query.shape
    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    position_ids = kwargs.get("position_ids")
    shared_prefix = kwargs.pop("shared_prefix", None)
    if (
        key.shape[2] != length
        or attention_mask is not None
        or length == 1
        or (cu_seq_lens is None and position_ids is None)
    ):
        if shared_prefix is not None and len(shared_prefix):
            raise ValueError("sdpa_packed: a shared_prefix batch needs a packed training forward (no cache or mask)")
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
    chunks, attended = _chunk_plan(total, cu_seq_lens, position_ids, shared_prefix)
    pieces = []
    k_pieces, v_pieces = k.split(chunks, 1), v.split(chunks, 1)
    for q_c, k_c, v_c, attend in zip(q.split(chunks, 1), k_pieces, v_pieces, attended, strict=False):
        if isinstance(attend, tuple):  # continues the first s tokens of chunk i: bottom-right causal over s + n keys
            i, s = attend
            n = q_c.shape[1]
            keys = torch.cat([k_pieces[i][:, :s], k_c], 1)
            values = torch.cat([v_pieces[i][:, :s], v_c], 1)
            mask = torch.ones(n, s + n, dtype=torch.bool, device=q_c.device).tril(s)
            pieces.append(
                F.scaled_dot_product_attention(
                    q_c[None], keys[None], values[None], attn_mask=mask, dropout_p=dropout, scale=scaling,
                    enable_gqa=groups > 1,
                )[0]
            )  # fmt: skip
        elif attend:
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
