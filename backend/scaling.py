"""What makes a large model fit on N ranks: gradient accumulation that stays sharded, activation checkpointing, and
loading that does not put the full model in every rank's host memory. backend/train.py calls each at its place.

    micro_batch_sync(accelerator, model, last)   the context of one micro-batch's backward
        FSDP (zero_stage 2/3): never no_sync. FSDP2's no_sync (set_requires_gradient_sync(False)) keeps every
            parameter's UNSHARDED gradient (in the reduce dtype) on every rank until the last micro-batch: the whole
            model's gradient per rank (8B: +32 GB per GPU). Reduce-scattering every micro-batch keeps each rank at
            its gradient shard plus the layer being reduced, as torchtitan and torchtune do (FACTS.md).
        DDP (zero_stage 0/1, several processes): no_sync on all but the last micro-batch. DDP's gradients are
            unsharded anyway, so skipping the all-reduce saves communication and costs no memory.
        One process: nothing to synchronize.

    enable_activation_checkpointing(model)       model.multi_stage.activation_checkpointing
        Every decoder layer (transformers' GradientCheckpointingLayer) recomputes its forward in backward, with
        torch.utils.checkpoint(use_reentrant=False): works under FSDP2 (the recompute runs inside the layer's
        pre-backward all-gather) and in one process. Only each layer's input is kept from forward to backward.

    load_model_for_rank(path, attn_impl, random_init, rank, world, fsdp) -> model, finish
        FSDP with several processes: rank 0 loads the weights (or draws the random init, model_weights: no); every
        other rank builds the model with parameters that own no data yet (torch.empty, pages never written, so no
        host memory), real buffers (rotary frequencies) and the same ties. accelerator.prepare shards it (each
        rank > 0 now holds shards of garbage), then `finish(model)` scatters rank 0's tensors into the shards one
        at a time (scatter_from_rank0). Host memory of a rank > 0: its shards plus one chunk. DDP and one process
        load normally (each rank needs a full replica anyway). Accelerate's own cpu_ram_efficient_loading is not
        used: it broadcasts every full tensor to every rank, and its rank-0 copy of the state dict maps the
        optimizer by data_ptr(), which is 0 for every meta tensor.

    gradient_bytes(model)                        bytes of gradient this rank holds now (the probe of the tests)

Probe: with SFT_STUDIO_PROBE=DIR in the environment, backend.train writes DIR/rank<r>.json per rank (gradient bytes
after each micro-batch of the first step, host RSS around loading): tests/test_scaling.py measures the real loop.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
from pathlib import Path

import torch

PROBE_ENV = "SFT_STUDIO_PROBE"

__all__ = [
    "micro_batch_sync",
    "enable_activation_checkpointing",
    "load_model_for_rank",
    "gradient_bytes",
    "Probe",
    "PROBE_ENV",
]


def micro_batch_sync(accelerator, model, last: bool):
    """Context for the forward/backward of one micro-batch (see module docstring): no_sync for DDP only."""
    from accelerate.utils import DistributedType

    if last or accelerator.num_processes == 1 or accelerator.distributed_type == DistributedType.FSDP:
        return contextlib.nullcontext()  # FSDP: reduce-scatter now, gradients stay sharded between micro-batches
    return accelerator.no_sync(model)  # DDP: all-reduce once, on the step's last micro-batch


def enable_activation_checkpointing(model) -> int:
    """Per-decoder-layer, non-reentrant checkpointing; returns the number of checkpointed layers (0 = unsupported,
    an error: silently training without it would OOM where the user planned for it)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"model.multi_stage.activation_checkpointing: {type(model).__name__} does not support gradient "
            "checkpointing in transformers; set it to no"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    from transformers.modeling_layers import GradientCheckpointingLayer

    return sum(1 for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing)


def load_model_for_rank(
    path, attn_implementation: str, random_init: bool, rank: int, world: int, fsdp: bool, wrap=None
):
    """-> (model for accelerator.prepare, fp32 master weights; `finish(prepared_model)` or None).

    FSDP with several processes: rank 0 loads; the others build an empty model (see module docstring). Call
    `finish` on every rank right after prepare: it scatters rank 0's weights into every rank's shards. ``wrap(model)
    -> model`` is applied on every rank before that (LoRA: backend.lora.wrap_lora adds the adapters, so a LoRA run's
    frozen base is read once, by rank 0, not by every rank)."""
    from backend.modeling import load_model

    wrap = wrap or (lambda model: model)
    if not fsdp or world == 1:
        return wrap(load_model(path, "fp32", attn_implementation, random_init=random_init)), None
    if rank == 0:
        model = wrap(load_model(path, "fp32", attn_implementation, random_init=random_init))
        full = model.state_dict()  # keeps rank 0's full tensors alive through prepare(), which frees the model's
    else:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        from backend.modeling import prepare_for_packed_training, register_attention

        register_attention(attn_implementation)
        config = AutoConfig.from_pretrained(path)
        with init_empty_weights(include_buffers=False):  # parameters on meta, buffers computed for real
            model = AutoModelForCausalLM.from_config(
                config, dtype=torch.float32, attn_implementation=attn_implementation
            )
        _materialize_empty(model)
        model.tie_weights()  # init_empty_weights re-creates each assigned parameter, which unties tied embeddings
        model, full = wrap(prepare_for_packed_training(model)), None

    def finish(prepared) -> None:
        scatter_from_rank0(prepared, full)
        full.clear() if full is not None else None

    return model, finish


@torch.no_grad()
def scatter_from_rank0(model: torch.nn.Module, full: dict | None) -> None:
    """Copy rank 0's full tensors (``full``, None on other ranks) into every rank's FSDP2 shards, one tensor at a
    time: rank 0 scatters each tensor's chunks (distribute_tensor, src_data_rank=0), so a rank > 0 never holds more
    than one chunk beyond its own shards. Unsharded tensors (buffers) are broadcast whole. A collective."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, distribute_tensor

    rank = dist.get_rank()
    done: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in done:  # tied parameters appear under two names
            continue
        done.add(id(tensor))
        if isinstance(tensor, DTensor):
            dtype, device = tensor.dtype, tensor.to_local().device
            source = full[name] if rank == 0 else torch.empty(tensor.shape, dtype=dtype, device=device)  # unwritten
            shard = distribute_tensor(source.to(device, dtype), tensor.device_mesh, tensor.placements)
            tensor.to_local().copy_(shard.to_local())
        else:
            if rank == 0:
                tensor.copy_(full[name])
            dist.broadcast(tensor.data, src=0)


def _materialize_empty(model: torch.nn.Module) -> None:
    """Meta parameters -> torch.empty on the CPU, keeping tied parameters one object.

    Why not leave them on meta: Accelerate maps the optimizer's parameters to the sharded ones by data_ptr(), and
    every meta tensor's data_ptr() is 0. torch.empty allocates address space whose pages are never written here
    (accelerate moves the model to meta before sharding), so it costs no resident memory."""
    done: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None or not param.is_meta:
                continue
            if id(param) not in done:
                done[id(param)] = torch.nn.Parameter(
                    torch.empty(param.shape, dtype=param.dtype, device="cpu"), requires_grad=param.requires_grad
                )
            module._parameters[name] = done[id(param)]


def gradient_bytes(model: torch.nn.Module) -> int:
    """Bytes of gradient this rank holds: each parameter's .grad (a DTensor's local shard under FSDP2) plus what FSDP2
    keeps unsharded between micro-batches (unsharded_accumulated_grad, the unsharded parameter's .grad)."""
    seen: set[int] = set()
    total = 0

    def add(t):
        nonlocal total
        if t is None:
            return
        t = getattr(t, "_local_tensor", t)
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()

    for p in model.parameters():
        add(p.grad)
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        for group in module._get_fsdp_state()._fsdp_param_groups:
            for fsdp_param in group.fsdp_params:
                add(fsdp_param.unsharded_accumulated_grad)
                unsharded = getattr(fsdp_param, "_unsharded_param", None)
                add(None if unsharded is None else unsharded.grad)
    return total


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class Probe:
    """Measurements of the real training loop for the tests; does nothing unless SFT_STUDIO_PROBE is set."""

    def __init__(self, rank: int):
        directory = os.environ.get(PROBE_ENV)
        self.path = Path(directory) / f"rank{rank}.json" if directory else None
        self.data: dict = {}

    def __bool__(self) -> bool:
        return self.path is not None

    def before_load(self) -> None:
        if self:
            self.data.update(rss_before_load=_rss(), peak_rss_before_load=_peak_rss())

    def after_load(self) -> None:
        if self:
            self.data.update(rss_after_load=_rss(), peak_rss_after_load=_peak_rss())

    def after_prepare(self, model) -> None:
        if self:
            local = sum(getattr(p, "_local_tensor", p).numel() * p.element_size() for p in model.parameters())
            self.data.update(
                rss_after_prepare=_rss(),
                peak_rss_after_prepare=_peak_rss(),
                parameter_bytes_local=local,
                parameter_bytes_full=sum(p.numel() * p.element_size() for p in model.parameters()),
                largest_layer_bytes=_largest_unit_bytes(model),
                tied=_tied(model),
            )

    def micro_batch(self, step: int, model) -> None:
        if self and step == self.data.setdefault("first_step", step):
            self.data.setdefault("gradient_bytes", []).append(gradient_bytes(model))

    def write(self) -> None:
        if self:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data))
            tmp.replace(self.path)


def _tied(model) -> bool:
    """Whether the LM head and the input embeddings are still one parameter (False for an untied model)."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and out.weight is inp.weight


def _largest_unit_bytes(model) -> int:
    """Full (unsharded) bytes of the largest FSDP unit's own parameters (a decoder layer, or the root)."""
    from torch.distributed.fsdp import FSDPModule

    sizes = [0]
    for module in model.modules():
        if isinstance(module, FSDPModule):
            for group in module._get_fsdp_state()._fsdp_param_groups:
                sizes.append(
                    sum(fp.sharded_param.numel() * fp.sharded_param.element_size() for fp in group.fsdp_params)
                )
    return max(sizes)
