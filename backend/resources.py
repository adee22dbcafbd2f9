"""What the machine is doing while a run trains: memory, utilization, disk; and what to say when the GPU runs out.

Sampled at each log interval (never per micro-batch) and written into the ``train`` events, so the studio's Train tab,
the notebooks and the trackers all plot the same figures:

    host_ram_used_bytes     the machine's used RAM (psutil)          cpu_percent      the machine's CPU use since the
    process_rss_bytes       this rank's resident memory                                last sample (psutil)
    run_dir_bytes           disk used by run.experiment_dir
    gpu_allocated_bytes     [per rank] torch's allocated memory now   (CUDA only: absent on CPU, never zeros)
    gpu_reserved_bytes      [per rank] torch's reserved (cached) memory now
    gpu_peak_bytes          [per rank] torch's peak allocated memory since the last sample
    gpu_utilization         [per rank] NVML's GPU utilization in % (when nvidia-ml-py is installed)

>>> summarize_bytes(3 * 2**30)
'3.0 GiB'
"""

from __future__ import annotations

import os
from pathlib import Path

GIB = 2**30


class OutOfMemory(RuntimeError):
    """The GPU ran out of memory in a step; the message says where, how much, and what the plan would change."""


def summarize_bytes(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def dir_bytes(path: str | Path) -> int:
    """Bytes of every file under ``path`` (0 when it does not exist); files that vanish meanwhile are skipped."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:  # a checkpoint rotated away while we walk
                pass
    return total


def nvml_device(cuda_index: int, visible: str | None = None) -> int | str | None:
    """The NVML device (an index, or a UUID string) behind CUDA device ``cuda_index``: CUDA numbers only the devices
    in ``CUDA_VISIBLE_DEVICES`` (default: the environment's), NVML numbers every device on the machine. None where
    it cannot be told (a MIG slice).

    >>> nvml_device(1, "4,6"), nvml_device(0, ""), nvml_device(0, "GPU-8f2c"), nvml_device(0, "MIG-1a2b")
    (6, 0, 'GPU-8f2c', None)
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "") if visible is None else visible
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    if not entries:
        return cuda_index
    if cuda_index >= len(entries):
        return None
    entry = entries[cuda_index]
    if entry.isdigit():
        return int(entry)
    return entry if entry.startswith("GPU-") else None


def _nvml_utilization(device_index: int) -> float | None:
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return None
    device = nvml_device(device_index)
    if device is None:
        return None
    try:
        pynvml.nvmlInit()
        if isinstance(device, str):
            handle = pynvml.nvmlDeviceGetHandleByUUID(device)
        else:
            handle = pynvml.nvmlDeviceGetHandleByIndex(device)
        return float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    except Exception:  # no driver, a MIG slice without utilization: leave the figure out
        return None


def sample(accelerator, run_dir: str | Path) -> dict:
    """This log interval's figures (see the module docstring). Every rank calls it: on CUDA the per-rank GPU
    figures are gathered (one small collective), so all ranks must reach it at the same step."""
    import psutil
    import torch

    figures = {
        "host_ram_used_bytes": int(psutil.virtual_memory().used),
        "process_rss_bytes": int(psutil.Process().memory_info().rss),
        "cpu_percent": float(psutil.cpu_percent(interval=None)),
        "run_dir_bytes": dir_bytes(run_dir) if accelerator.is_main_process else 0,
    }
    if accelerator.device.type == "cuda":
        util = _nvml_utilization(accelerator.device.index or 0)
        local = torch.tensor(
            [
                torch.cuda.memory_allocated(),
                torch.cuda.memory_reserved(),
                torch.cuda.max_memory_allocated(),
                -1.0 if util is None else util,
            ],
            dtype=torch.float64,
            device=accelerator.device,
        )
        torch.cuda.reset_peak_memory_stats()
        per_rank = accelerator.gather(local[None]).view(-1, 4).tolist()  # (world, 4)
        figures["gpu_allocated_bytes"] = [int(r[0]) for r in per_rank]
        figures["gpu_reserved_bytes"] = [int(r[1]) for r in per_rank]
        figures["gpu_peak_bytes"] = [int(r[2]) for r in per_rank]
        if all(r[3] >= 0 for r in per_rank):
            figures["gpu_utilization"] = [r[3] for r in per_rank]
    return figures


def planned_peak_bytes(cfg, world_size: int) -> int | None:
    """The memory planner's per-GPU peak for this config (backend.plan), or None when it cannot be computed."""
    try:
        from backend.plan import plan_memory

        return int(plan_memory(cfg, world_size).peak_bytes)
    except Exception:  # a model the planner cannot read: the plot simply has no promised line
        return None


def _cuda_peak_and_total() -> tuple[int | None, int | None]:
    """(peak allocated, total memory) of this rank's GPU in bytes; (None, None) without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None, None
    return torch.cuda.max_memory_allocated(), torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory


def oom_message(cfg, world_size: int, step: int, error: BaseException, gpu_memory_bytes: int | None = None) -> str:
    """What a CUDA out-of-memory error means for this run: the step, the peak reached, the plan's figure and the
    plan's smallest change that fits this GPU."""
    peak, total = _cuda_peak_and_total()
    gpu_memory_bytes = gpu_memory_bytes or total
    parts = [f"CUDA out of memory at step {step}"]
    parts.append(f"peak allocated {summarize_bytes(peak)}" if peak else "peak allocated: not measured")
    try:
        from backend.plan import plan_memory

        plan = plan_memory(cfg, world_size, gpu_memory_bytes / GIB if gpu_memory_bytes else None)
        parts.append(f"the memory plan's peak for this config: {summarize_bytes(plan.peak_bytes)} per GPU")
        if gpu_memory_bytes:
            change = plan.suggestion
            parts.append(
                f"smallest change that fits {summarize_bytes(gpu_memory_bytes)}: {change}"
                if change
                else f"no single change fits {summarize_bytes(gpu_memory_bytes)}"
            )
    except Exception as e:  # the planner could not read the model: still name the step and the peak
        parts.append(f"no memory plan ({type(e).__name__}: {e})")
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    return "; ".join(parts) + f". (torch: {first}) Check the plan with `python -m backend.plan CONFIG`."
