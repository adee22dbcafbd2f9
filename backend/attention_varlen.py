"""`torch_varlen`: packed attention through PyTorch's own flash-attention varlen kernel (no flash-attn package).

`torch.nn.attention.varlen.varlen_attn` (PyTorch >= 2.10, CUDA only) runs causal attention over the flattened
tokens of a micro-batch, each document separately, from the same `cu_seq_lens` that flash-attn's varlen uses:

    tokens      a0 a1 a2 | b0 b1 | p | p            (B*L flattened; documents a, b; padding)
    cu_seq_lens [0, 3, 5, 6, 7]                      (backend.packing.collate; passed by backend.loss)
    one kernel launch per layer (sdpa_packed: one SDPA call per document per layer, from Python)

Its signature moved between releases, read once here: 2.10 has `is_causal` and needs equal head counts; later
releases take `window_size=(-1, 0)` for causal and `enable_gqa`. Anything that is not a packed training forward
(no cu_seq_lens, a KV cache, a padding mask, a CPU tensor, fp32 without autocast) goes to `sdpa_packed`, which
itself falls back to transformers' sdpa for generation. Registered under `torch_varlen` on import;
backend.modeling.select_attention picks it on CUDA when flash-attn is not installed. The kernel takes q, k and v in
one 16-bit dtype and autocast does not cast a custom op's inputs, so they are cast here (`kernel_dtype`);
tests/test_gpu_paths.py records the calls.
"""

from __future__ import annotations

import importlib.util
import inspect

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from backend.attention import _packed_mask, packed_sdpa_attention_forward

NAME = "torch_varlen"

__all__ = ["NAME", "available", "kernel_dtype", "varlen_attention_forward", "register"]


def available() -> bool:
    """Whether this torch ships varlen_attn (2.10+); it still needs a CUDA device to run."""
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def _varlen_kwargs(varlen_attn, groups: int, scaling) -> tuple[dict, bool] | None:
    """(causal + scale + GQA keyword arguments, whether k/v heads must be repeated by hand) for this torch's
    signature; None when it cannot apply this scaling (2.10 has no `scale`: only the default 1/sqrt(D))."""
    params = inspect.signature(varlen_attn).parameters
    kwargs = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if "scale" in params:
        kwargs["scale"] = scaling
    elif scaling is not None:
        return None
    if groups > 1 and "enable_gqa" in params:
        kwargs["enable_gqa"] = True
        return kwargs, False
    return kwargs, groups > 1


def kernel_dtype(query, key, value) -> torch.dtype | None:
    """The one 16-bit dtype q, k and v go to the flash kernel in; None when there is none (fp32, no autocast).

    `varlen_attn` is a custom op: autocast does not cast its inputs, and the kernel takes fp16/bf16 only, all three
    alike. Under autocast with fp32 master weights (one GPU, DDP, QLoRA) RoPE leaves q and k in fp32 while v comes
    out of its projection in bf16, so the autocast dtype is the one (transformers' flash path casts the same way).

    >>> t32, t16 = torch.zeros(1), torch.zeros(1, dtype=torch.bfloat16)
    >>> kernel_dtype(t32, t32, t16), kernel_dtype(t32, t32, t32)
    (torch.bfloat16, None)
    >>> with torch.autocast("cpu", dtype=torch.float16):
    ...     kernel_dtype(t32, t32, t16)
    torch.float16
    """
    device = query.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return next((t.dtype for t in (query, key, value) if t.dtype in (torch.bfloat16, torch.float16)), None)


def _on_kernel_device(query) -> bool:
    """varlen_attn runs on CUDA only (a seam for the CPU tests that record what would reach the kernel)."""
    return query.device.type == "cuda"


def _kernel():
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn


def varlen_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """query (B, Hq, L, D), key/value (B, Hkv, L, D) -> (B, L, Hq, D), None (transformers' attention contract).

    The output is in the kernel's 16-bit dtype (`kernel_dtype`), as transformers' flash path returns it."""
    batch, heads, length, dim = query.shape
    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    dropout = dropout if module.training else 0.0
    dtype = kernel_dtype(query, key, value)
    if (
        cu_seq_lens is None
        or attention_mask is not None
        or key.shape[2] != length
        or not _on_kernel_device(query)
        or dropout > 0.0  # varlen_attn has no dropout
        or dtype is None  # fp32 without autocast: the flash kernel has no fp32
    ):
        return packed_sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    varlen_attn = _kernel()
    query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    groups = heads // key.shape[1]
    plan = _varlen_kwargs(varlen_attn, groups, None if scaling == dim**-0.5 else scaling)
    if plan is None:
        return packed_sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    extra, repeat = plan
    total = batch * length
    q = query.transpose(1, 2).reshape(total, heads, dim)  # (T, Hq, D)
    k = key.transpose(1, 2).reshape(total, key.shape[1], dim)  # (T, Hkv, D)
    v = value.transpose(1, 2).reshape(total, value.shape[1], dim)  # (T, Hkv, D)
    if repeat:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (T, Hq, D)
    cu = cu_seq_lens.to(device=q.device, dtype=torch.int32)
    max_len = int(kwargs.get("max_length_q") or int(torch.diff(cu).max()))
    out = varlen_attn(q, k, v, cu, cu, max_len, max_len, **extra)  # (T, Hq, D)
    return out.reshape(batch, length, heads, dim), None


def register() -> str:
    """Make `attn_implementation="torch_varlen"` known to transformers (idempotent). Returns the name."""
    AttentionInterface.register(NAME, varlen_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, _packed_mask)
    return NAME


register()
