"""Model and tokenizer loading, attention selection, and the one place where packed training is made safe.

The use_cache trap (FACTS.md, "Packed sequences and attention in transformers 5.x"): transformers builds the
block-diagonal mask from position ids only when no KV cache exists, and `config.use_cache=True` (the default of
every released checkpoint) makes the model create a cache even in train mode; documents then attend to each
other with no error (tests/test_modeling.py shows the contamination). `prepare_for_packed_training` closes it and
`load_model` always calls it; `forward_packed` also passes `use_cache=False` explicitly.

Forward for packed rows (from `backend.packing.collate`), never with a 2D attention_mask (even all-ones disables
the detection):

    sdpa / eager:       model(input_ids, position_ids=..., use_cache=False)
                        transformers' masking_utils splits each row at every position-id restart
                        (`find_packed_sequence_indices`, per row: correct for any micro-batch size B; checked for
                        B = 1, 2, 4 in the tests) and builds a dense (B, 1, L, L) block-causal mask.
    flash_attention_2:  the same + cu_seq_lens_q/k, max_length_q/k  -> flash_attn_varlen_func over the flattened
                        B*L tokens (position-only detection works for B = 1 only, so the kwargs are mandatory).
    torch_varlen / sdpa_packed: the same kwargs -> torch.nn.attention.varlen / causal SDPA per document
                        (backend/attention_varlen.py, backend/attention.py); `select_attention` picks the tier.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

log = logging.getLogger("sft_studio.modeling")

DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}
FLASH = "flash_attention_2"
PACKED_SDPA = "sdpa_packed"  # backend/attention.py: causal SDPA per document, no dense (L, L) mask
TORCH_VARLEN = "torch_varlen"  # backend/attention_varlen.py: torch.nn.attention.varlen (CUDA, torch >= 2.10)


def as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def select_attention(use_flash_attention: bool, device=None, _has_module=None) -> tuple[str, str]:
    """-> (attn_implementation, reason): the one place that picks packed attention. Three tiers on CUDA, in order:

        flash_attention_2   the flash-attn package is installed: its varlen kernel over cu_seq_lens
        torch_varlen        PyTorch's own flash varlen kernel, torch.nn.attention.varlen (torch >= 2.10, nothing
                            to compile; backend/attention_varlen.py)
        sdpa_packed         causal SDPA per document (backend/attention.py): no O(L²) mask, one call per document

    Off CUDA, or with use_flash_attention off, sdpa_packed. The reason is logged and returned so that the trainer
    can put it in its start event. `_has_module(name) -> bool` is for tests (default: importlib's find_spec).
    """
    if _has_module is None:
        _has_module = _module_available
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    on_cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
    fallback = "falling back to sdpa_packed (causal SDPA per document)"
    if not use_flash_attention:
        impl, reason = PACKED_SDPA, "use_flash_attention is off: using sdpa_packed (causal SDPA per document)"
    elif not on_cuda:
        impl, reason = PACKED_SDPA, f"use_flash_attention is on but the device is {device}, not CUDA: {fallback}"
    elif _has_module("flash_attn"):
        impl, reason = FLASH, "flash_attention_2 (flash-attn varlen over cu_seq_lens: packed documents stay separate)"
    elif _has_module("torch.nn.attention.varlen"):
        impl, reason = (
            TORCH_VARLEN,
            f"the flash_attn package is not installed: using torch_varlen (torch {torch.__version__} "
            "torch.nn.attention.varlen, flash kernels over cu_seq_lens, nothing to compile)",
        )
    else:
        impl, reason = (
            PACKED_SDPA,
            f"neither the flash_attn package (pip install 'sft-studio[gpu]') nor torch.nn.attention.varlen "
            f"(torch >= 2.10; this is {torch.__version__}) is available: {fallback}",
        )
    log.info("attention: %s", reason)
    return impl, reason


def _module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def register_attention(attn_implementation: str) -> None:
    """Import the module that registers our own attention names with transformers (no-op for built-in ones)."""
    if attn_implementation == PACKED_SDPA:
        import backend.attention  # noqa: F401
    elif attn_implementation == TORCH_VARLEN:
        import backend.attention_varlen  # noqa: F401


def prepare_for_packed_training(model):
    """Close the use_cache trap: no KV cache, ever, during training. Returns the model."""
    model.config.use_cache = False
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.use_cache = False
    return model


def load_model(path, dtype="fp32", attn_implementation: str = "sdpa", random_init: bool = False):
    """Load a causal LM for packed training. random_init=True builds it from the config (`model_weights: no`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    register_attention(attn_implementation)
    dtype = as_dtype(dtype)
    try:
        if random_init:
            config = AutoConfig.from_pretrained(path)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    except (OSError, ValueError) as e:
        raise type(e)(
            f"pretrained.path {path!s}: could not load the model ({e}). Check the path holds a Hugging "
            "Face model (config.json + weights) or a hub id reachable from this machine."
        ) from e
    return prepare_for_packed_training(model)


def load_tokenizer(path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise type(e)(f"tokenizer path {path!s}: could not load the tokenizer ({e})") from e


def forward_packed(model, batch: dict, attn_impl: str, **kwargs):
    """Run the model on a collated batch. Never passes an attention_mask; passes varlen kwargs for flash.

    Returns the model output (`.logits` (B, L, V)); labels are not passed: the loss is computed outside
    (backend.loss) as a sum over trained tokens.
    """
    device = next(model.parameters()).device
    inputs = {
        "input_ids": batch["input_ids"].to(device),  # (B, L)
        "position_ids": batch["position_ids"].to(device),  # (B, L)
        "use_cache": False,
    }
    if attn_impl.startswith("flash") or attn_impl in (PACKED_SDPA, TORCH_VARLEN):  # document boundaries, authoritative
        inputs["cu_seq_lens_q"] = batch["cu_seq_lens_q"].to(device)
        inputs["cu_seq_lens_k"] = batch["cu_seq_lens_k"].to(device)
        inputs["max_length_q"] = int(batch["max_length_q"])
        inputs["max_length_k"] = int(batch["max_length_k"])
    return model(**inputs, **kwargs)


def position_segments(position_ids: torch.Tensor) -> torch.Tensor:
    """Segment lengths that transformers' detection derives from (B, L) position ids (a new one at every restart,
    i.e. wherever the position does not increase by exactly 1), flattened in row order."""
    lengths = []
    for row in position_ids:
        starts = [0] + (torch.nonzero(torch.diff(row) != 1).flatten() + 1).tolist() + [len(row)]
        lengths += [b - a for a, b in zip(starts[:-1], starts[1:], strict=False)]
    return torch.tensor(lengths)


def flatten_micro_batch(batch: dict, check_positions: bool = True) -> dict:
    """(B, L) -> (1, B*L): one long row; cu_seq_lens are already over the flattened tokens.

    Not needed for correctness (detection is per row for any B), but it is the padding-free layout that flash
    kernels prefer. With sdpa/eager the flattened row is split by positions only, and a row that starts with a
    continuation piece at position p right after a row ending at p-1 would be merged with it; check_positions
    verifies that the position-derived segments equal cu_seq_lens and raises otherwise (pass False for flash,
    which uses cu_seq_lens).
    """
    out = dict(batch)
    for key in ("input_ids", "labels", "position_ids"):
        out[key] = batch[key].reshape(1, -1)
    if check_positions:
        got = position_segments(out["position_ids"])
        want = torch.diff(batch["cu_seq_lens_q"].long())
        if not torch.equal(got, want):
            raise ValueError(
                "flatten_micro_batch: position ids of the flattened batch do not separate the documents "
                "as cu_seq_lens does (a continuation piece follows a row ending one position "
                "earlier); keep the (B, L) layout for sdpa/eager"
            )
    return out
