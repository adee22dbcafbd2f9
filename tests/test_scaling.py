"""The real backend.train on 2 gloo processes: what an 8B run needs, measured on CPU (backend/scaling.py).

Run: .venv/bin/pytest tests/test_scaling.py -m slow -x -q          (a few minutes on 2 cores)

- FSDP (zero 3) with 4 micro-batches per rank per step: after every micro-batch each rank holds only its gradient
  shard (measured on the real step through the SFT_STUDIO_PROBE probe), and the final weights equal one process;
  activation checkpointing is on in the 2-process run, off in the reference, so it is also checked under FSDP2.
- Loading a ~100M-parameter model: rank 1's peak RSS grows by far less than the fp32 model during load (rank 0
  alone reads it and prepare() broadcasts); losses equal one process that loads it with from_pretrained; tied
  embeddings stay tied.
- Multi-node the way users run it: two `accelerate launch --num_machines 2 --machine_rank r` commands (one process
  per "machine", gloo on loopback) train like one process.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from backend import ASSETS, ROOT, TINY_MODEL
from backend.events import read_events
from backend.launch import free_port, train_command, train_env
from backend.scaling import PROBE_ENV

pytestmark = pytest.mark.slow
TINY_TRAIN = ASSETS / "configs" / "tiny_train.yaml"


def write_config(run_dir: Path, data: Path, **extra) -> Path:
    from backend.config import dump_yaml, load_train_config

    values = {
        "data.datasets.training.path": data / "fast_llm_config_training.yaml",
        "data.datasets.validation": None,
        "training.evaluations.validation.interval": 0,
        "run.experiment_dir": run_dir,
        "batch.sequence_length": 128,
        "batch.micro_batch_size": 1,
        "training.logs.interval": 1,
        "training.checkpoint.interval": 0,
        "optimizer.learning_rate.warmup_iterations": 1,
        "model.distributed.timeout": 120,
        **extra,
    }
    cfg = load_train_config(TINY_TRAIN, [f"{k}={'null' if v is None else v}" for k, v in values.items()])
    run_dir.mkdir(parents=True)
    path = run_dir / "train.yaml"
    path.write_text(dump_yaml(cfg))
    return path


def run(config_path: Path, num_processes: int, probe: Path | None = None, timeout=300) -> str:
    cmd = train_command(config_path, num_processes, main_process_port=free_port())
    env = {**os.environ, **train_env(num_processes, use_cpu=True, threads=1), "HF_HUB_OFFLINE": "1"}
    if probe is not None:
        env[PROBE_ENV] = str(probe)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{log[-6000:]}"
    return log


def losses(run_dir: Path) -> list[float]:
    events, _ = read_events(run_dir / "events.jsonl")
    return [e["loss"] for e in events if e["event"] == "train"]


def start_event(run_dir: Path) -> dict:
    events, _ = read_events(run_dir / "events.jsonl")
    return next(e for e in events if e["event"] == "start")


def export_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    weights = {}
    for f in sorted((run_dir / "export" / "final").glob("*.safetensors")):
        weights.update({k: v.float() for k, v in load_file(f).items()})
    return weights


def probes(directory: Path, world: int) -> list[dict]:
    return [json.loads((directory / f"rank{r}.json").read_text()) for r in range(world)]


def reference_run(data, run_dir, **extra) -> Path:
    """The tiny model, 3 steps of 8 micro-batches of 1 row, one process, no checkpointing: the reference."""
    values = {"batch.batch_size": 8, "training.train_iters": 3, "model.multi_stage.zero_stage": 0, **extra}
    run(write_config(run_dir, data, **values), 1)
    return run_dir


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory):
    return reference_run(data, tmp_path_factory.mktemp("ref") / "exp")


def test_fsdp_accumulation_keeps_gradients_sharded_and_matches_one_process(data, one_process, tmp_path):
    run_dir, probe = tmp_path / "exp", tmp_path / "probe"
    config = write_config(
        run_dir,
        data,
        **{
            "batch.batch_size": 8,  # 8 rows / (1 row x 2 ranks) = 4 micro-batches per rank per step
            "training.train_iters": 3,
            "model.multi_stage.zero_stage": 3,
            "model.multi_stage.activation_checkpointing": True,
            "run.num_processes": 2,
        },
    )
    log = run(config, 2, probe)
    start = start_event(run_dir)
    assert (start["world_size"], start["distributed_type"], start["sharded"]) == (2, "FSDP", True)
    assert start["gradient_accumulation"] == 4
    assert "activation checkpointing: 4 decoder layers" in log
    for r, p in enumerate(probes(probe, 2)):
        full, shard, layer = p["parameter_bytes_full"], p["parameter_bytes_local"], p["largest_layer_bytes"]
        grads = p["gradient_bytes"]
        assert len(grads) == 4, grads  # measured after each micro-batch of the first step
        assert shard < 0.6 * full  # the parameters really are sharded
        for g in grads:
            # reduce-scattered every micro-batch: the shard plus at most one layer in flight, never the whole model
            assert 0 < g <= shard + layer and g < full, (r, grads, shard, layer, full)
    assert losses(run_dir) == pytest.approx(losses(one_process), abs=1e-5)
    ref, got = export_weights(one_process), export_weights(run_dir)
    assert got.keys() == ref.keys()
    worst = max((got[k] - ref[k]).abs().max().item() for k in ref)
    assert worst <= 1e-5, worst


def random_llama_100m(path: Path) -> int:
    """A ~100M-parameter random Llama (tied embeddings) saved as safetensors with the tiny tokenizer; -> fp32 bytes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32_000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        use_cache=False,
    )
    with torch.device("cpu"):
        model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    for f in TINY_MODEL.iterdir():
        if "token" in f.name or f.name == "chat_template.jinja":
            shutil.copy(f, path / f.name)
    n = sum(p.numel() for p in model.parameters())
    assert 90e6 < n < 120e6, n
    return 4 * n


def test_rank0_loading_keeps_other_ranks_light_and_trains_like_one_process(data, tmp_path):
    model_dir = tmp_path / "model100m"
    model_bytes = random_llama_100m(model_dir)
    common = {
        "pretrained.path": model_dir,
        "batch.batch_size": 2,
        "training.train_iters": 2,
        "optimizer.learning_rate.base": 1e-3,
    }
    ref_dir = tmp_path / "ref"
    run(write_config(ref_dir, data, **common, **{"model.multi_stage.zero_stage": 0}), 1)
    run_dir, probe = tmp_path / "exp", tmp_path / "probe"
    config = write_config(run_dir, data, **common, **{"model.multi_stage.zero_stage": 3, "run.num_processes": 2})
    run(config, 2, probe)
    rank0, rank1 = probes(probe, 2)
    mib = 2**20
    load = [p["peak_rss_after_load"] - p["rss_before_load"] for p in (rank0, rank1)]
    prepare = [p["peak_rss_after_prepare"] - p["rss_after_load"] for p in (rank0, rank1)]
    shard = rank1["parameter_bytes_local"]
    print(
        f"\nfp32 model {model_bytes / mib:.0f} MiB, shard per rank {shard / mib:.0f} MiB; peak RSS growth: "
        f"rank 0 {(load[0] + prepare[0]) / mib:.0f} MiB (load {load[0] / mib:.0f} + prepare {prepare[0] / mib:.0f}), "
        f"rank 1 {(load[1] + prepare[1]) / mib:.0f} MiB (load {load[1] / mib:.0f} + prepare {prepare[1] / mib:.0f})"
    )
    # rank 0 reads the whole model (the measurement sees a full load where there is one)
    assert load[0] + prepare[0] > 0.8 * model_bytes
    # rank 1 builds an empty model (imports only), then holds its shards plus one chunk in flight
    assert load[1] < 0.25 * model_bytes, load
    assert prepare[1] < shard + 0.25 * model_bytes, (prepare, shard)
    assert rank0["tied"] and rank1["tied"]  # lm_head and embed_tokens are still one parameter after the broadcast
    # tied + same weights on both ranks: the same losses as one process loading with from_pretrained
    assert losses(run_dir) == pytest.approx(losses(ref_dir), abs=1e-5)


def test_lora_under_fsdp_reads_the_base_on_rank0_only_and_trains_like_one_process(data, tmp_path):
    """LoRA with FSDP over 2 processes: rank 0 reads the fp32 base, rank 1 builds an empty one and gets its shards
    (backend.lora.wrap_lora through scaling.load_model_for_rank). Before, every rank read the whole base (8B: 8 x 32
    GB of host RAM). Peak host memory of rank 1 stays under a quarter of the model; losses equal one process."""
    model_dir = tmp_path / "model100m"
    model_bytes = random_llama_100m(model_dir)
    common = {
        "pretrained.path": model_dir,
        "batch.batch_size": 2,
        "training.train_iters": 2,
        "optimizer.learning_rate.base": 1e-2,
        "model.base_model.peft.type": "lora",
        "model.base_model.peft.rank": 4,
        "training.export.merge": "no",
    }
    ref_dir = tmp_path / "ref"
    run(write_config(ref_dir, data, **common, **{"model.multi_stage.zero_stage": 0}), 1)
    run_dir, probe = tmp_path / "exp", tmp_path / "probe"
    config = write_config(run_dir, data, **common, **{"model.multi_stage.zero_stage": 3, "run.num_processes": 2})
    run(config, 2, probe)
    rank0, rank1 = probes(probe, 2)
    load = [p["peak_rss_after_load"] - p["rss_before_load"] for p in (rank0, rank1)]
    prepare = [p["peak_rss_after_prepare"] - p["rss_after_load"] for p in (rank0, rank1)]
    mib = 2**20
    print(
        f"\nLoRA, fp32 base {model_bytes / mib:.0f} MiB; peak RSS growth at load / prepare: "
        f"rank 0 {load[0] / mib:.0f} / {prepare[0] / mib:.0f} MiB, "
        f"rank 1 {load[1] / mib:.0f} / {prepare[1] / mib:.0f} MiB"
    )
    assert load[0] + prepare[0] > 0.8 * model_bytes  # rank 0 read the base
    assert load[1] < 0.5 * model_bytes, load  # rank 1 did not (imports only: ~90 MiB measured)
    assert prepare[1] < rank1["parameter_bytes_local"] + 0.25 * model_bytes, prepare
    assert start_event(run_dir)["trainable_parameters"] < 0.01 * start_event(run_dir)["num_parameters"]
    assert losses(run_dir) == pytest.approx(losses(ref_dir), abs=1e-5)
    assert len(set(losses(run_dir))) == 2  # the adapters trained


def test_two_machines_with_accelerate_launch_match_one_process(data, tmp_path):
    """`accelerate launch --num_machines 2 --machine_rank r --main_process_ip ... --main_process_port ...` on each
    "machine" (here two processes on loopback, one per machine), with the config file backend.launch writes.
    model_weights: no, so this also checks that rank 0's random init reaches rank 1 (the other machine)."""
    random_init = {"pretrained.model_weights": False}
    reference = reference_run(data, tmp_path / "ref", **random_init)
    run_dir = tmp_path / "exp"
    config = write_config(
        run_dir,
        data,
        **{
            "batch.batch_size": 8,
            "training.train_iters": 3,
            "model.multi_stage.zero_stage": 3,
            "run.num_processes": 2,
            **random_init,
        },
    )
    port = free_port()
    base = train_command(config, 2, main_process_port=port)  # writes accelerate_2proc.yaml (FSDP, 2 processes)
    cut = base.index("-m", 3)  # [python, -m, accelerate.commands.launch, --config_file, YAML, --num_processes, 2]
    env = {**os.environ, **train_env(2, use_cpu=True, threads=1), "HF_HUB_OFFLINE": "1"}
    procs = []
    for machine_rank in (0, 1):
        cmd = [
            *base[:cut],
            "--num_machines",
            "2",
            "--machine_rank",
            str(machine_rank),
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            str(port),
            *base[cut:],
        ]
        procs.append(
            subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-6000:]
    start = start_event(run_dir)
    assert (start["world_size"], start["distributed_type"], start["sharded"]) == (2, "FSDP", True)
    assert losses(run_dir) == pytest.approx(losses(reference), abs=1e-5)
