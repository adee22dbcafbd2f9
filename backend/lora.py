"""LoRA and QLoRA with PEFT: a frozen base, trained low-rank adapters, small checkpoints, two exports.

The recipe (backend/train.py) calls this module in a few ``if peft.type == "lora":`` places:

    model = load_lora_model(cfg, attn_impl)       # load (4/8-bit with pretrained.quantization) + get_peft_model
    # FSDP over several processes: load_model_for_rank(..., wrap=lambda m: wrap_lora(m, cfg)), rank 0 reads the base
    save_checkpoint(..., save_state=lora_state_saver(model, optimizer))      # adapters + AdamW moments + RNG
    load_checkpoint(..., load_state=lora_state_loader(model, optimizer))
    export_lora(accelerator, model, tokenizer, run_dir / "export", name, cfg, merged=...)

Config (Fast-LLM's names): ``model.base_model.peft: {type: lora, rank, alpha, dropout, target_modules}``;
``target_modules: all-linear`` is every nn.Linear inside the decoder layers (``model._no_split_modules``), never
the LM head or anything outside the layers. ``pretrained.quantization: 4bit`` loads the frozen base with
bitsandbytes NF4 + double quantization, computing in the training dtype (QLoRA); it needs CUDA and bitsandbytes,
checked by ``check_quantization`` at --validate time and at train start.

Exports under ``export/<name>/`` (``step_000100`` or ``final``)::

    export/final/                    merged full model (merge_and_unload math: W + B @ A * alpha / rank), in the
                                     training dtype: AutoModelForCausalLM.from_pretrained loads it; tokenizer,
                                     chat template, generation_config stopping at the end-of-turn token
    export/final/adapter/            PEFT adapter: adapter_config.json + adapter_model.safetensors (+ tokenizer);
                                     PeftModel.from_pretrained(base, path) loads it; base_model_name_or_path is
                                     the base the run trained
``training.export.merge: no`` writes the merged model only for ``final`` (step exports hold ``adapter/`` only).

Checkpoints hold ``lora_state.pt`` ({"model": trainable parameters only, "optimizer": their AdamW state}, both
gathered to full tensors: adapters are tiny) and ``random_states_<rank>.pkl``; the frozen base is never saved,
it is reloaded from ``pretrained.path`` on resume.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import random
import shutil
from pathlib import Path

ADAPTER_DIR = "adapter"  # export/<name>/adapter
LORA_STATE = "lora_state.pt"


# ------------------------------------------------------------------------------------------------ config checks


def quantization_problems(cfg, world_size: int | None = None) -> list[str]:
    """Problems of ``pretrained.quantization`` on THIS machine (bitsandbytes, CUDA) and with ``run.num_processes``
    (FSDP cannot shard a quantized base; ``world_size`` None: run.num_processes, what the studio launches); [] when
    none or fine.

    Not a pydantic validator: a YAML written on a laptop for a GPU box must still load; the CLI's --validate, the
    studio's Config tab and train start call it where the run would happen.
    """
    from backend.config import quantized_sharding_problem

    q = cfg.pretrained.quantization
    if q == "none":
        return []
    where = "run.num_processes" if world_size is None else "processes launched"
    sharding = quantized_sharding_problem(cfg, cfg.run.num_processes if world_size is None else world_size, where)
    if sharding:  # checked again with the launcher's world size at train start (config.check_world_size)
        return [sharding]
    if importlib.util.find_spec("bitsandbytes") is None:
        return [
            f"pretrained.quantization: {q} needs the bitsandbytes package (pip install bitsandbytes) and a CUDA "
            "GPU; set it to none to train LoRA on an unquantized base"
        ]
    import torch

    if not torch.cuda.is_available():
        return [
            f"pretrained.quantization: {q} needs a CUDA GPU (bitsandbytes 4/8-bit kernels) and this machine has "
            "none; set it to none to train LoRA on an unquantized base"
        ]
    return []


def check_quantization(cfg, world_size: int | None = None) -> None:
    """Raise ConfigError naming ``pretrained.quantization`` when this machine cannot run it."""
    from backend.config import ConfigError

    problems = quantization_problems(cfg, world_size)
    if problems:
        raise ConfigError(problems)


# ------------------------------------------------------------------------------------------------ the model


def decoder_linear_names(model) -> list[str]:
    """Full names of every nn.Linear inside a decoder layer (a ``_no_split_modules`` class), e.g.
    ``model.layers.0.self_attn.q_proj``; the LM head and anything outside the layers are never included."""
    import torch

    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    names = []
    for layer_name, layer in model.named_modules():
        if type(layer).__name__ not in layer_classes:
            continue
        for name, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
                names.append(f"{layer_name}.{name}")
    return names


def resolve_target_modules(model, target) -> list[str] | str:
    """``all-linear`` -> the leaf names of the decoder-layer linears (``[down_proj, gate_proj, ...]``), or their full
    names when a leaf name also occurs outside the layers; a list passes through."""
    if target != "all-linear":
        return list(target) if isinstance(target, (list, tuple)) else target
    inside = decoder_linear_names(model)
    if not inside:
        raise ValueError(
            "model.base_model.peft.target_modules: all-linear found no linear layer inside the decoder layers "
            f"({sorted(getattr(model, '_no_split_modules', None) or [])}); list the module names instead"
        )
    leaves = sorted({n.rsplit(".", 1)[-1] for n in inside})
    inside_set = set(inside)
    import torch

    outside = [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n not in inside_set and n.rsplit(".", 1)[-1] in leaves
    ]
    return inside if outside else leaves


def lora_config(model, peft_cfg):
    from peft import LoraConfig

    return LoraConfig(
        r=peft_cfg.rank,
        lora_alpha=peft_cfg.alpha,
        lora_dropout=peft_cfg.dropout,
        target_modules=resolve_target_modules(model, peft_cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def apply_lora(model, peft_cfg):
    """Wrap ``model`` with PEFT LoRA adapters: base frozen (requires_grad False), adapters trainable.

    lora_A is random (kaiming), lora_B zero, so the wrapped model starts equal to the base; call after the
    recipe's set_seed so that every rank draws the same adapters.
    """
    from peft import get_peft_model

    config = lora_config(model, peft_cfg)
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise ValueError(f"model.base_model.peft.target_modules: {peft_cfg.target_modules!r}: {e}") from e


def load_lora_model(cfg, attn_impl: str, fsdp_sharded: bool = False):
    """The frozen base wrapped with LoRA adapters (fp32). The base is loaded in the training dtype (it is never
    updated, so bf16 storage is what a bf16 run computes with anyway: half the memory of fp32), in fp32 when FSDP
    shards it over several processes (its mixed-precision policy casts the gathered copy, as for a full model),
    or 4/8-bit with bitsandbytes for QLoRA."""
    from backend.modeling import load_model, prepare_for_packed_training

    q = cfg.pretrained.quantization
    if q == "none":
        dtype = "fp32" if fsdp_sharded else cfg.model.distributed.training_dtype
        model = load_model(cfg.pretrained.path, dtype, attn_impl, random_init=not cfg.pretrained.model_weights)
    else:
        check_quantization(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        from peft import prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        from backend.modeling import DTYPES, register_attention

        register_attention(attn_impl)  # sdpa_packed / torch_varlen are ours: transformers must know them first
        compute = DTYPES[cfg.model.distributed.training_dtype]
        quant = (
            BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=compute,
                bnb_4bit_quant_storage=compute,  # FSDP shards the packed 4-bit storage as this dtype
            )
            if q == "4bit"
            else BitsAndBytesConfig(load_in_8bit=True)
        )
        from backend.hub import require_hub

        require_hub(str(cfg.pretrained.path), "pretrained.path")  # an unreachable hub: fail in seconds
        model = AutoModelForCausalLM.from_pretrained(
            cfg.pretrained.path,
            quantization_config=quant,
            dtype=compute,
            attn_implementation=attn_impl,
            device_map={"": int(os.environ.get("LOCAL_RANK", "0"))},  # this process's GPU
        )
        # norms in fp32; no gradient checkpointing here (model.multi_stage.activation_checkpointing decides)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        prepare_for_packed_training(model)
    return wrap_lora(model, cfg)


def wrap_lora(model, cfg):
    """The loaded base -> PeftModel with the run's adapters (frozen base). Also the ``wrap`` of
    backend.scaling.load_model_for_rank: under FSDP with several processes only rank 0 reads the base (fp32, for
    FSDP's mixed precision to cast), the other ranks wrap an empty model whose weights are scattered after prepare."""
    # the adapters' random init comes from the seed alone, whatever loading the base drew (TRL does the same)
    from accelerate.utils import set_seed

    set_seed(cfg.model.distributed.seed)
    model = apply_lora(model, cfg.model.base_model.peft)
    if cfg.model.multi_stage.activation_checkpointing:
        # a frozen embedding gives checkpointed layers an input that does not require grad; make it require grad
        # so that every checkpoint implementation (reentrant ones included) reaches the adapters
        model.enable_input_require_grads()
    return model


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameter counts (4-bit weights counted as the parameters they hold, not bytes)."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if type(p).__name__ == "Params4bit":  # two 4-bit values per stored byte
            n = n * 2 * (p.element_size())
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


# ------------------------------------------------------------------------------------------------ checkpoints


def _plain(module):
    """The module under DDP's ``.module`` (FSDP2 and a single process do not wrap)."""
    return getattr(module, "module", module)


def trainable_state(model, optimizer) -> tuple[dict, dict]:
    """(trainable parameters, their optimizer state) as full CPU tensors keyed by name, on rank 0 (a collective:
    under FSDP2 the adapters' shards are gathered; the frozen base is left out)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
    model_sd = _only_trainable(model, get_model_state_dict(_plain(model), options=options))
    optim_sd = get_optimizer_state_dict(_plain(model), opt, options=options)
    return model_sd, optim_sd


def _only_trainable(model, state: dict) -> dict:
    """ignore_frozen_params still returns a tied frozen weight under its second name (lm_head.weight): drop it."""
    names = {n for n, _ in _named_trainable(model)}
    return {k: v for k, v in state.items() if k in names}


def _adapter_state(model) -> dict:
    """The trainable parameters as full CPU tensors on rank 0 (a collective under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return _only_trainable(model, get_model_state_dict(_plain(model), options=options))


def _rng_state() -> dict:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def lora_state_saver(accelerator, model, optimizer):
    """``save_state(path)`` for backend.checkpoint.save_checkpoint: adapters + optimizer + every rank's RNG."""

    def save_state(path: str) -> None:
        import torch

        model_sd, optim_sd = trainable_state(model, optimizer)  # collective
        path = Path(path)
        if accelerator.is_main_process:
            path.mkdir(parents=True, exist_ok=True)
            torch.save({"model": model_sd, "optimizer": optim_sd}, path / LORA_STATE)
        accelerator.wait_for_everyone()  # the directory exists before the other ranks write into it
        with open(path / f"random_states_{accelerator.process_index}.pkl", "wb") as f:
            pickle.dump(_rng_state(), f)

    return save_state


def lora_state_loader(accelerator, model, optimizer):
    """``load_state(path)`` for backend.checkpoint.load_checkpoint (every rank reads the small full state)."""

    def load_state(path: str) -> None:
        import torch
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        path = Path(path)
        if not (path / LORA_STATE).is_file():
            raise FileNotFoundError(
                f"{path} holds no {LORA_STATE}: it is not a LoRA checkpoint (was this run started without "
                "model.base_model.peft.type: lora?); use another run.experiment_dir"
            )
        state = torch.load(path / LORA_STATE, map_location="cpu", weights_only=False)
        options = StateDictOptions(full_state_dict=True, strict=False)
        missing = set(state["model"]) ^ {n for n, p in _named_trainable(model)}
        if missing:
            raise ValueError(f"{path}: adapter names differ from this run's ({sorted(missing)[:4]} ...)")
        opt = getattr(optimizer, "optimizer", optimizer)
        set_model_state_dict(_plain(model), state["model"], options=options)
        set_optimizer_state_dict(_plain(model), opt, state["optimizer"], options=options)
        rng = path / f"random_states_{accelerator.process_index}.pkl"
        if rng.is_file():
            with open(rng, "rb") as f:
                _set_rng_state(pickle.load(f))

    return load_state


def _named_trainable(model):
    return [(n, p) for n, p in _plain(model).named_parameters() if p.requires_grad]


# ------------------------------------------------------------------------------------------------ exports


def _portable_path(path: str) -> str:
    """A local base path made absolute (the adapter is loaded from elsewhere), a hub id unchanged."""
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() else str(path)


def lora_layers(model) -> dict[str, float]:
    """{module name without the PEFT prefix: scaling (alpha / rank)} of every LoRA layer (adapter "default")."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in _plain(model).named_modules():
        if isinstance(module, LoraLayer) and "default" in module.scaling:
            out[_base_key(name)] = float(module.scaling["default"])
    return out


def _base_key(name: str) -> str:
    """``base_model.model.model.layers.0.q_proj.base_layer.weight`` -> ``model.layers.0.q_proj.weight``."""
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer", "")


def merge_state_dict(full: dict, scalings: dict[str, float], dtype=None) -> dict:
    """PEFT model state dict -> the merged plain model's (merge_and_unload's math, done on the tensors):
    ``W' = W + (B @ A) * scaling`` for every LoRA layer, computed in fp32, then cast to ``dtype``; lora_* keys
    dropped, PEFT prefixes removed."""
    import torch

    merged = {}
    for key, value in full.items():
        if ".lora_" in key:
            continue
        merged[_base_key(key)] = value
    for module, scaling in scalings.items():
        a = full[f"base_model.model.{module}.lora_A.default.weight"].float()  # (r, in)
        b = full[f"base_model.model.{module}.lora_B.default.weight"].float()  # (out, r)
        w = merged[f"{module}.weight"]
        merged[f"{module}.weight"] = (w.float() + (b @ a) * scaling).to(w.dtype)
    if dtype is not None:
        merged = {k: v.to(dtype) if torch.is_floating_point(v) else v for k, v in merged.items()}
    return merged


def _quantized_base_state(cfg) -> dict:
    """QLoRA: the base's weights in the training dtype, read again from pretrained.path (the trained copy is
    4-bit; merging into it would bake the quantization error into the export)."""
    from transformers import AutoModelForCausalLM

    from backend.modeling import DTYPES

    base = AutoModelForCausalLM.from_pretrained(cfg.pretrained.path, dtype=DTYPES[cfg.model.distributed.training_dtype])
    return {f"base_model.model.{k}": v for k, v in base.state_dict().items()}


def export_lora(accelerator, model, tokenizer, export_dir, name: str, cfg, merged: bool) -> dict:
    """Write ``export_dir/<name>/adapter`` (PEFT) and, when ``merged``, ``export_dir/<name>`` (merged HF model).

    With ``merged`` the adapter is written into the merged export's temporary directory, so the one rename that
    completes the export brings both (a kill never leaves a merged export without its adapter). A collective:
    call on every rank. Returns {"adapter": path, "merged": path or None}.
    """
    from backend.checkpoint import export_dtype, export_hf
    from backend.modeling import as_dtype

    export_dir = Path(export_dir)
    adapters = _adapter_state(model)  # collective: only the trainable tensors are gathered (tiny)
    final = export_dir / name / ADAPTER_DIR

    def write_adapter(directory: Path) -> None:  # main process only
        peft_model = accelerator.unwrap_model(model)
        peft_model.peft_config["default"].base_model_name_or_path = _portable_path(cfg.pretrained.path)
        peft_model.save_pretrained(directory, state_dict=adapters, is_main_process=True)
        tokenizer.save_pretrained(directory)  # chat template included: the adapter dir is a complete chat model
        from backend.checkpoint import export_generation_config

        export_generation_config(peft_model.get_base_model().generation_config, tokenizer).save_pretrained(directory)

    if merged:
        if cfg.pretrained.quantization == "none":
            full = accelerator.get_state_dict(model)  # collective: the whole model, gathered on rank 0
        else:
            full = {**_quantized_base_state(cfg), **adapters} if accelerator.is_main_process else {}
        state = {}
        if accelerator.is_main_process:
            state = merge_state_dict(full, lora_layers(model), as_dtype(export_dtype(cfg)))
            del full
        merged_path = export_hf(
            accelerator,
            _skeleton(model, as_dtype(export_dtype(cfg))),
            tokenizer,
            export_dir,
            name,
            export_dtype(cfg),
            cfg.training.export.max_shard_size,
            state_dict=state,
            before_rename=lambda tmp: write_adapter(tmp / ADAPTER_DIR),
        )
        return {"adapter": final, "merged": merged_path}

    if accelerator.is_main_process:  # the adapter alone (export.merge: no, an intermediate export)
        tmp = export_dir / name / (ADAPTER_DIR + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        write_adapter(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    accelerator.wait_for_everyone()
    return {"adapter": final, "merged": None}


def _skeleton(model, dtype):
    """A plain (non-PEFT) model of the base's class on the meta device: save_pretrained's config and class for the
    merged state dict (config.json says ``dtype``), without allocating weights."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    base = accelerator_free_base(model)
    config = copy.deepcopy(base.config)  # the training model's config stays as it is
    config.dtype = dtype
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    skeleton.config.dtype = dtype
    skeleton.generation_config = copy.deepcopy(base.generation_config)
    skeleton.generation_config.use_cache = True  # training closed it (packed rows); generation wants the KV cache
    return skeleton


def accelerator_free_base(model):
    """The transformers model under PEFT (and under DDP's wrapper)."""
    plain = _plain(model)
    return plain.get_base_model() if hasattr(plain, "get_base_model") else plain


# ------------------------------------------------------------------------------------------------ inference


def is_adapter_dir(path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def load_for_inference(path, dtype=None):
    """A causal LM for generation from an export: a merged/plain HF directory, or an adapter directory (its base
    from adapter_config.json's base_model_name_or_path, the adapter applied on top)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not is_adapter_dir(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    from peft import PeftModel

    config = json.loads((path / "adapter_config.json").read_text())
    base_path = config.get("base_model_name_or_path")
    if not base_path:
        raise ValueError(f"{path / 'adapter_config.json'} names no base_model_name_or_path: cannot load its base")
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
    model = PeftModel.from_pretrained(base, str(path))
    if (path / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)
        base.generation_config = model.generation_config
    return model
