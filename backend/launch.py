"""Command lines that start prepare and train, for the studio, the notebooks and the tests (no torch import here).

    >>> train_command("runs/x/config.yaml")[1:]   # [0] is sys.executable
    ['-m', 'backend.train', 'runs/x/config.yaml']

With ``num_processes=2`` it also writes ``runs/x/accelerate_2proc.yaml`` and returns (not run here: it reads the
config)::

    ['/…/python', '-m', 'accelerate.commands.launch', '--config_file', 'runs/x/accelerate_2proc.yaml',
     '--num_processes', '2', '-m', 'backend.train', 'runs/x/config.yaml']

Run the returned list with `env={**os.environ, **train_env(n)}` in its own process group (the studio's Stop sends
SIGTERM to the group). The accelerate YAML written next to the config:

    distributed_type: FSDP      zero_stage 2/3 (fsdp_config: fsdp_version 2, TRANSFORMER_BASED_WRAP,
                                fsdp_reshard_after_forward: zero_stage == 3, SHARDED_STATE_DICT)
                      MULTI_GPU zero_stage 0/1 (DDP)
    use_cpu: false              even on a CPU machine: accelerate's launcher starts ONE process when use_cpu is
                                true; with false it starts N through torch elastic, and each process then picks
                                the CPU and gloo from ACCELERATE_USE_CPU=true (train_env) and build_accelerator
                                forces FSDP (backend/distributed.py, FACTS.md "Accelerate and FSDP").
    num_processes, mixed_precision (from model.distributed.training_dtype)
    main_process_port           a free port picked at launch (not torch's fixed 29500: two runs started on one
                                machine, e.g. two studio jobs, would otherwise collide with EADDRINUSE)

The backend builds its FSDP plugin from the training config itself (backend.distributed.build_accelerator), so
the YAML only has to make the launcher start the right number of processes with a matching distributed type.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

__all__ = ["train_command", "prepare_command", "train_env", "accelerate_config_yaml", "cuda_present"]

_MIXED = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}


def cuda_present() -> bool:
    """Whether an NVIDIA GPU looks present, without importing torch (the studio process never does)."""
    return shutil.which("nvidia-smi") is not None or Path("/dev/nvidia0").exists()


def accelerate_config_yaml(
    num_processes: int, zero_stage: int, training_dtype: str = "fp32", main_process_port: int | None = None
) -> str:
    """Text of an accelerate launch config for one machine; see the module docstring for each choice."""
    lines = [
        "# written by backend.launch; the backend builds the FSDP plugin from the training config",
        "compute_environment: LOCAL_MACHINE",
        f"distributed_type: {'FSDP' if zero_stage >= 2 else 'MULTI_GPU'}",
        "num_machines: 1",
        "machine_rank: 0",
        f"num_processes: {int(num_processes)}",
        f"mixed_precision: '{_MIXED[training_dtype]}'",
        "use_cpu: false  # true would make accelerate start a single process; CPU is chosen by ACCELERATE_USE_CPU",
    ]
    if main_process_port is not None:
        lines.append(f"main_process_port: {int(main_process_port)}")
    if zero_stage >= 2:
        lines += [
            "fsdp_config:",
            "  fsdp_version: 2",
            "  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP",
            f"  fsdp_reshard_after_forward: {'true' if zero_stage == 3 else 'false'}",
            "  fsdp_state_dict_type: SHARDED_STATE_DICT",
        ]
    return "\n".join(lines) + "\n"


def _resolved(config_path, extra_overrides):
    from backend.config import load_train_config  # pydantic only, no torch

    return load_train_config(config_path, list(extra_overrides))


def free_port() -> int:
    """A TCP port free on this machine now (the OS picks it), for the rendezvous of one multi-process run."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def train_command(
    config_path,
    num_processes: int = 1,
    use_cpu: bool | None = None,
    extra_overrides=(),
    main_process_port: int | None = None,
    module: str = "backend.train",
) -> list[str]:
    """argv that trains `config_path` with `num_processes` processes (writes the accelerate YAML when > 1).

    use_cpu: None = detect (no NVIDIA GPU -> CPU); only decides the environment (train_env), kept for callers
    that want to record it. `module` exists for tests that launch a worker the same way. main_process_port: None =
    a free port (`free_port`); a multi-machine launch passes its own on the accelerate command line.
    """
    config_path = str(config_path)
    overrides = [str(o) for o in extra_overrides]
    if int(num_processes) <= 1:
        return [sys.executable, "-m", module, config_path, *overrides]
    cfg = _resolved(config_path, overrides)
    yaml_path = Path(config_path).resolve().parent / f"accelerate_{int(num_processes)}proc.yaml"
    text = accelerate_config_yaml(
        num_processes,
        int(cfg.model.multi_stage.zero_stage),
        cfg.model.distributed.training_dtype,
        free_port() if main_process_port is None else main_process_port,
    )
    tmp = yaml_path.with_name(yaml_path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, yaml_path)
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(yaml_path),
        "--num_processes",
        str(int(num_processes)),
        "-m",
        module,
        config_path,
        *overrides,
    ]


def prepare_command(config_path, force: bool = False) -> list[str]:
    """argv of `python -m backend.prepare PREPARE.yaml [--force]`."""
    return [sys.executable, "-m", "backend.prepare", str(config_path), *(["--force"] if force else [])]


def train_env(num_processes: int = 1, use_cpu: bool | None = None, threads: int | None = None) -> dict:
    """Environment additions for train_command: CPU selection and one thread pool per process.

    {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"} for 2 processes on a
    2-core CPU machine; threads = cores // processes unless given.
    """
    if use_cpu is None:
        use_cpu = not cuda_present()
    n = max(1, int(num_processes))
    env = {"PYTHONUNBUFFERED": "1"}  # train.log is tailed live by the studio
    if use_cpu:
        env["ACCELERATE_USE_CPU"] = "true"
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // n)
    if n > 1 or use_cpu:
        env["OMP_NUM_THREADS"] = str(int(threads))  # N processes x all cores each would thrash
    return env
