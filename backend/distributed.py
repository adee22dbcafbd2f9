"""The one place that turns the config into an Accelerator: FSDP2 plugin, mixed precision, the CPU FSDP workaround.

    model.multi_stage.zero_stage   3 -> FSDP2, parameters, gradients and optimizer state sharded; parameters
                                        re-sharded after each forward (reshard_after_forward=True, ZeRO-3)
                                   2 -> FSDP2 keeping the gathered parameters from forward to backward
                                        (reshard_after_forward=False: gradients and optimizer state sharded, ZeRO-2)
                                   0, 1 -> no plugin: DDP with several processes, plain with one
    model.distributed.training_dtype  bf16 -> fp32 master weights, bf16 compute, fp32 gradient reduction;
                                      fp16 -> same with fp16; fp32 -> no mixed precision
    model.distributed.timeout         seconds a collective may wait (process-group timeout)

Every FSDP2 unit is one decoder layer (TRANSFORMER_BASED_WRAP on `model._no_split_modules`, e.g.
LlamaDecoderLayer) plus the root (embeddings, final norm, LM head); checkpoints use SHARDED_STATE_DICT.

Why a workaround on CPU (FACTS.md, "Accelerate and FSDP"): Accelerate only selects FSDP for GPU-like device types;
on a CPU-only machine it silently falls back to DDP over gloo (or to N independent runs). build_accelerator
therefore sets the distributed type to FSDP in BOTH the shared PartialState and the AcceleratorState and installs
the plugin, right after creating the Accelerator and before `prepare`. `prepare` then calls FSDP2's
`fully_shard` on a gloo CPU mesh: parameters become DTensors (check with `is_sharded`), losses match one process.
Works when started by `accelerate launch --config_file` (see backend/launch.py) or by torchrun.
"""

from __future__ import annotations

import datetime
import logging
import os

import torch
from accelerate import Accelerator, FullyShardedDataParallelPlugin, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, InitProcessGroupKwargs

__all__ = [
    "fsdp_plugin_from_config",
    "build_accelerator",
    "close_distributed",
    "is_sharded",
    "describe",
    "print0",
    "mixed_precision_of",
]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_ACCELERATE_MP = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}

logger = logging.getLogger("backend")


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def print0(*args, **kwargs) -> None:
    """print() on global rank 0 only (flushed: the studio tails train.log while the run is alive)."""
    if _rank() == 0:
        print(*args, **kwargs, flush=True)


def mixed_precision_of(cfg) -> str:
    """Accelerate's mixed_precision string for model.distributed.training_dtype: bf16 -> "bf16", fp32 -> "no"."""
    return _ACCELERATE_MP[cfg.model.distributed.training_dtype]


def fsdp_plugin_from_config(cfg) -> FullyShardedDataParallelPlugin | None:
    """FSDP2 plugin for zero_stage 2/3; None for 0/1 (DDP or a single process)."""
    stage = int(cfg.model.multi_stage.zero_stage)
    if stage < 2:
        return None
    dtype = cfg.model.distributed.training_dtype
    mixed = None
    if dtype != "fp32":
        from torch.distributed.fsdp import MixedPrecisionPolicy

        # Parameters stay fp32 in the sharded master copy; FSDP casts the gathered copy for compute and reduces
        # gradients in fp32 (a bf16 reduce-scatter loses low bits of small gradients summed over many ranks).
        mixed = MixedPrecisionPolicy(param_dtype=_DTYPES[dtype], reduce_dtype=torch.float32)
    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        reshard_after_forward=(stage == 3),
        auto_wrap_policy="transformer_based_wrap",  # classes from model._no_split_modules at prepare()
        state_dict_type="SHARDED_STATE_DICT",
        mixed_precision_policy=mixed,
        # ranks > 0 hold no weights before prepare(); backend.scaling scatters rank 0's into the shards after it
        cpu_ram_efficient_loading=False,
    )


def build_accelerator(cfg, **accelerator_kwargs) -> Accelerator:
    """Accelerator for this run: FSDP2 per zero_stage (also on CPU, see module docstring), mixed precision, timeout.

    gradient_accumulation_steps stays 1: the loop scales each micro-batch's loss itself (backend/loss.py) and
    `accelerator.backward` would otherwise divide by the accumulation steps a second time.
    """
    plugin = fsdp_plugin_from_config(cfg)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        # Under torchrun on a CPU machine Accelerate stays single-process (DistributedType.NO on each rank: N
        # independent runs) unless told to use the CPU; cpu=True makes it MULTI_CPU over gloo.
        accelerator_kwargs.setdefault("cpu", True)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # One process (python -m backend.train, or train() called again in a notebook or test): Accelerate keeps
        # its state in class-level singletons and refuses a second Accelerator with another mixed precision.
        # Nothing distributed has been initialized, so start from a clean state.
        AcceleratorState._reset_state(reset_partial_state=True)
    if cfg.run.trackers:  # Accelerate's tracker integrations; backend/trackers.py starts them and logs to them
        from backend.trackers import accelerator_tracker_kwargs

        accelerator_kwargs = {**accelerator_tracker_kwargs(cfg), **accelerator_kwargs}
    handlers = [InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=float(cfg.model.distributed.timeout)))]
    accelerator = Accelerator(
        fsdp_plugin=plugin,
        mixed_precision=mixed_precision_of(cfg),
        gradient_accumulation_steps=1,
        kwargs_handlers=handlers,
        **accelerator_kwargs,
    )
    if plugin is not None and accelerator.num_processes > 1 and accelerator.distributed_type != DistributedType.FSDP:
        # CPU (gloo): Accelerate picked MULTI_CPU and ignored the plugin. Override both states: overriding only
        # one makes get_state_dict fail (FACTS.md).
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
    if plugin is not None and accelerator.num_processes == 1:
        print0("zero_stage >= 2 with one process: nothing to shard, training unsharded")
    info = describe(accelerator)
    print0(
        f"distributed: {info['distributed_type']}, world size {info['world_size']}, "
        f"mixed precision {info['mixed_precision']}, zero_stage {cfg.model.multi_stage.zero_stage}, "
        f"device {info['device']}"
    )
    return accelerator


def is_sharded(model: torch.nn.Module) -> bool:
    """True if any parameter is a DTensor (FSDP2 really sharded the model)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def describe(accelerator: Accelerator) -> dict:
    """{"distributed_type": "FSDP", "world_size": 2, "rank": 0, "mixed_precision": "no", "device": "cpu",
    "fsdp_version": 2, "reshard_after_forward": True} (the last two None without FSDP)."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    fsdp = accelerator.distributed_type == DistributedType.FSDP and plugin is not None
    return {
        "distributed_type": str(accelerator.distributed_type).split(".")[-1],
        "world_size": accelerator.num_processes,
        "rank": accelerator.process_index,
        "mixed_precision": accelerator.mixed_precision,
        "device": str(accelerator.device),
        "fsdp_version": plugin.fsdp_version if fsdp else None,
        "reshard_after_forward": plugin.reshard_after_forward if fsdp else None,
    }


def close_distributed(accelerator: Accelerator | None = None) -> None:
    """End a run's process group while the interpreter is whole: destroy the group, then drop the Accelerator's
    references to the prepared model and optimizer and collect them (FSDP2 modules sit in reference cycles).

    Left to interpreter exit, the last references to the gloo group (the DTensors' device mesh, the FSDP state)
    die during finalization, and a rank that finished its work can abort ('terminate called without an active
    exception', exit -6), failing a run that succeeded. Measured on 2 gloo processes under load, tests/dist_worker:
    6 aborts in 96 runs without this, none in 290 with it. Callers drop their own references first (or return).
    Never raises (it runs in `finally` blocks, where it must not replace the run's own error): a failure is logged.
    On an error path the traceback still holds the recipe's frame; backend.train.main collects again after it.
    """
    import gc

    import torch.distributed as dist

    try:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception as e:  # noqa: BLE001 - e.g. a peer already gone: nothing left to close
        logger.warning("close_distributed: destroy_process_group failed: %s: %s", type(e).__name__, e)
    try:
        if accelerator is not None:
            accelerator.free_memory()  # Accelerator._models / _optimizers hold the prepared objects
    except Exception as e:  # noqa: BLE001 - e.g. a sticky CUDA error in empty_cache
        logger.warning("close_distributed: free_memory failed: %s: %s", type(e).__name__, e)
    gc.collect()
