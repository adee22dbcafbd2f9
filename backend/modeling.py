"""Model and tokenizer loading, attention selection, and the one place where packed training is made safe.

The use_cache trap (FACTS.md, "Packed sequences and attention in transformers 5.x"): transformers builds the
block-diagonal mask from position ids only when no KV cache exists, and `config.use_cache=True` (the default of
every released checkpoint) makes the model create a cache even in train mode; documents then attend to each
other with no error (tests/test_modeling.py shows the contamination). `prepare_for_packed_training` closes it and
`load_model` always calls it; `model_inputs` (the one builder of model inputs from a collated batch) also passes
`use_cache=False` explicitly.

Forward for packed rows (from `backend.packing.collate`), `model(**model_inputs(model, batch))`, never with a 2D
attention_mask (even all-ones disables the detection):

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
    """Register our own attention names with transformers (no-op for built-in ones). Every path that hands an
    ``attn_implementation`` to transformers calls it first (full, LoRA and QLoRA loading)."""
    if attn_implementation == PACKED_SDPA:
        import backend.attention

        backend.attention.register()
    elif attn_implementation == TORCH_VARLEN:
        import backend.attention_varlen

        backend.attention_varlen.register()


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

    from backend.hub import require_hub

    register_attention(attn_implementation)
    dtype = as_dtype(dtype)
    require_hub(str(path), "pretrained.path")  # an unreachable hub: fail in seconds, not after minutes of retries
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

    from backend.hub import require_hub

    require_hub(str(path), "tokenizer")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise type(e)(f"tokenizer path {path!s}: could not load the tokenizer ({e})") from e


def hf_model(model):
    """The Hugging Face model under a DDP wrapper and/or a PEFT wrapper (FSDP2 and plain models are the model)."""
    model = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # LoRA: PeftModel


def model_inputs(model, batch: dict) -> dict:
    """THE builder of model inputs from a collated batch (`backend.packing.collate`): the trainer, evaluation,
    the studio's loss view, the notebooks and the tests all forward through it. Never a 2D attention mask (even an
    all-ones one disables transformers' packed-sequence detection), never a cache.

    Document boundaries have one source, the batch's ``cu_seq_lens_q/k`` (collate computes them over the
    flattened micro-batch), read by the attention kernel the model was loaded with:

        flash_attention_2, torch_varlen, sdpa_packed   (1, B*L) + cu_seq_lens_q/k, max_length_q/k
        sdpa, eager                                    (1, B*L), split by position-id restarts (masking_utils)
                                                       or (B, L) when flattening would join two rows: a row
                                                       that continues at position p after a row ending at p - 1
                                                       (only truncate_documents: yes makes such rows)
    """
    attn = getattr(getattr(hf_model(model), "config", None), "_attn_implementation", "") or ""
    varlen = "flash" in attn or (attn in (PACKED_SDPA, TORCH_VARLEN) and "cu_seq_lens_q" in batch)
    if "shared_prefix" in batch and (attn != PACKED_SDPA or "cu_seq_lens_q" not in batch):
        # DPO pairs whose prompt is placed once (backend.preference.collate_pairs): only sdpa_packed masks them
        raise ValueError(
            f"this batch places each pair's prompt once (training.dpo.share_prompt), which only sdpa_packed "
            f"attention can mask; the model uses {attn or 'another attention'}: set training.dpo.share_prompt: no"
        )
    if not varlen and _flattening_joins_rows(batch["position_ids"]):
        return dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    kwargs = dict(
        input_ids=batch["input_ids"].reshape(1, -1),  # (1, B*L)
        position_ids=batch["position_ids"].reshape(1, -1),  # (1, B*L)
        use_cache=False,
    )
    if varlen:
        for key in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
            if key not in batch:
                raise KeyError(f"batch has no {key!r}: {attn} needs the cu_seq_lens from backend.packing.collate")
            kwargs[key] = batch[key]
    if "shared_prefix" in batch:
        kwargs["shared_prefix"] = batch["shared_prefix"]
    return kwargs


def _flattening_joins_rows(position_ids: torch.Tensor) -> bool:
    """True when some row starts at position p > 0 right after a row that ends at p - 1 (B, L).

    Only continuation pieces (truncate_documents: yes) start a row at p > 0. Flattened, such a row would read as
    the continuation of the previous row's last document, and sdpa/eager would let it attend there.
    """
    if position_ids.shape[0] < 2:
        return False
    starts = position_ids[1:, 0]
    return bool(((starts > 0) & (starts == position_ids[:-1, -1] + 1)).any())
