"""Load a trained model for generation, from an export or straight from a checkpoint (the studio's Chat tab).

    model, tokenizer = load_for_chat("runs/x/export/final")                  # a Hugging Face directory
    model, tokenizer = load_for_chat("runs/x/checkpoints/step_000040")       # a (stopped) run's checkpoint

A checkpoint is read as: the architecture of its config's ``pretrained.path`` + the checkpoint's weights
(``model.safetensors`` of a one-process run, or the DCP shards ``pytorch_model_fsdp_0/`` that FSDP writes, read
into one process with ``torch.distributed.checkpoint``, no process group needed) + the tokenizer the data was
prepared with (``backend.compat.data_tokenizer``), and the same generation settings an export would carry
(KV cache on, stop on the template's end-of-turn ids). So a run stopped before its final export can be tried
at once, and nothing is written into the run directory.
"""

from __future__ import annotations

import warnings
from pathlib import Path

FSDP_MODEL_DIR = "pytorch_model_fsdp_0"  # accelerate's name for the DCP model shards of save_state under FSDP


def is_checkpoint(path) -> bool:
    p = Path(path)
    return (p / "COMPLETE").is_file() and (p / "config.yaml").is_file()


def _tied_keys(model) -> set[str]:
    keys = getattr(model, "_tied_weights_keys", None) or {}
    return set(keys) if getattr(model.config, "tie_word_embeddings", False) else set()


def checkpoint_state_dict(checkpoint_dir, model) -> dict:
    """The model weights of ``checkpoint_dir`` as a full state dict shaped like ``model.state_dict()``."""
    checkpoint_dir = Path(checkpoint_dir)
    single = checkpoint_dir / "model.safetensors"
    if single.is_file():
        from safetensors.torch import load_file

        return load_file(str(single))
    shards = checkpoint_dir / FSDP_MODEL_DIR
    if not shards.is_dir():
        raise FileNotFoundError(
            f"{checkpoint_dir}: no model.safetensors and no {FSDP_MODEL_DIR}/ (DCP shards): not a model checkpoint"
        )
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    reader = dcp.FileSystemReader(str(shards))
    saved = {k.removeprefix("model.") for k in reader.read_metadata().state_dict_metadata if k.startswith("model.")}
    target = {k: v.detach().clone() for k, v in model.state_dict().items()}
    missing = sorted(set(target) - saved - _tied_keys(model))
    if missing:
        raise KeyError(f"{shards}: the checkpoint lacks {len(missing)} weights of the model, e.g. {missing[:3]}")
    wanted = {k: v for k, v in target.items() if k in saved}
    # DCP loads in place into the given tensors; no_dist: one process reads every rank's shards
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(
            {"model": wanted}, storage_reader=reader, planner=DefaultLoadPlanner(allow_partial_load=True), no_dist=True
        )
    return wanted


def load_checkpoint_model(checkpoint_dir):
    """(model, tokenizer) from a checkpoint directory of a run (see the module docstring); a LoRA checkpoint
    (lora_state.pt) gives the base with its adapters merged."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from backend.config import load_train_config

    checkpoint_dir = Path(checkpoint_dir)
    cfg = load_train_config(checkpoint_dir / "config.yaml")
    base = cfg.pretrained.path
    if (checkpoint_dir / "lora_state.pt").is_file():  # a LoRA checkpoint: the base + its adapters, merged
        model = _lora_checkpoint_model(checkpoint_dir, cfg)
        return _with_tokenizer_and_generation(model, cfg, base)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    state = checkpoint_state_dict(checkpoint_dir, model)
    result = model.load_state_dict(state, strict=False)
    unexpected, missing = list(result.unexpected_keys), sorted(set(result.missing_keys) - _tied_keys(model))
    if unexpected or missing:
        raise KeyError(
            f"{checkpoint_dir}: weights do not fit {base}'s architecture (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]})"
        )
    model.tie_weights()
    return _with_tokenizer_and_generation(model, cfg, base)


def _lora_checkpoint_model(checkpoint_dir: Path, cfg):
    """Base weights from pretrained.path (frozen during training, so they are the run's) + the checkpoint's
    adapters (lora_state.pt), merged into a plain model."""
    import torch
    from transformers import AutoModelForCausalLM

    from backend.lora import LORA_STATE, apply_lora

    if not cfg.pretrained.model_weights:
        raise ValueError(
            f"{checkpoint_dir}: a LoRA checkpoint of a randomly initialized base (pretrained.model_weights: no) "
            "cannot be rebuilt from the checkpoint alone; chat with the run's export instead"
        )
    model = apply_lora(AutoModelForCausalLM.from_pretrained(cfg.pretrained.path), cfg.model.base_model.peft)
    adapters = torch.load(checkpoint_dir / LORA_STATE, map_location="cpu", weights_only=False)["model"]
    result = model.load_state_dict(adapters, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if result.unexpected_keys or trainable - set(adapters):
        raise KeyError(
            f"{checkpoint_dir}: its adapters do not fit {cfg.pretrained.path} with model.base_model.peft "
            f"(unexpected {list(result.unexpected_keys)[:3]}, missing {sorted(trainable - set(adapters))[:3]})"
        )
    return model.merge_and_unload()


def _with_tokenizer_and_generation(model, cfg, base):
    from transformers import GenerationConfig

    from backend import compat
    from backend.checkpoint import export_generation_config
    from backend.dataset import TokenDataset

    model.eval()
    try:
        tokenizer, _ = compat.data_tokenizer(TokenDataset(cfg.data.datasets.training.path), base, log=lambda m: None)
    except FileNotFoundError:  # the prepared data is gone: the base model's tokenizer
        from backend.modeling import load_tokenizer

        tokenizer = load_tokenizer(base)
    try:
        generation = GenerationConfig.from_pretrained(base)
    except OSError:
        generation = model.generation_config
    model.config.use_cache = True
    model.generation_config = export_generation_config(generation, tokenizer)
    return model, tokenizer


def load_for_chat(path):
    """(model, tokenizer) for an export directory (config.json) or a checkpoint directory (COMPLETE)."""
    if is_checkpoint(path) and not (Path(path) / "config.json").is_file():
        return load_checkpoint_model(path)
    from transformers import AutoModelForCausalLM

    from backend.modeling import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(path)
    model.eval()
    return model, load_tokenizer(path)
