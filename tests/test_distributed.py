"""Multi-process training on CPU really shards (FSDP2 DTensors) and matches one process (backend/distributed.py).

Run: .venv/bin/pytest tests/test_distributed.py -x -q          (about 1.5 min on 2 cores)

Each case launches tests/dist_worker.py through backend.launch.train_command (accelerate launch + the YAML it
writes + train_env), exactly as the studio launches backend.train, and compares against one process.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from backend import ASSETS
from backend.config import dump_yaml, load_train_config
from backend.launch import accelerate_config_yaml, free_port, train_command, train_env

pytestmark = pytest.mark.slow
ROOT = ASSETS.parent


def run_worker(tmp_path, name, num_processes, zero_stage, impl="fused", overrides=(), untied=False):
    """tests/dist_worker.py (backend.train.train_step on collated PackedSampler rows) with 1 or 2 processes."""
    out = tmp_path / name
    out.mkdir()
    cfg = load_train_config(
        ASSETS / "configs" / "tiny_train.yaml",
        [
            f"model.multi_stage.zero_stage={zero_stage}",
            f"model.base_model.cross_entropy_impl={impl}",
            "model.distributed.timeout=60",
            "batch.sequence_length=16",
            "batch.batch_size=4",
            "batch.micro_batch_size=1",
            f"run.num_processes={num_processes}",
            f"run.experiment_dir={out}",
            *overrides,
        ],
    )
    config_path = out / "config.yaml"
    config_path.write_text(dump_yaml(cfg))
    cmd = train_command(config_path, num_processes, main_process_port=free_port(), module="tests.dist_worker")
    cmd += ["--untied"] if untied else []
    env = {**os.environ, **train_env(num_processes, use_cpu=True, threads=1)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(num_processes)]
    weights = torch.load(out / "weights.pt")
    return ranks, weights, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """One-process runs per impl, made on first use. Compare like with like: fused and torch gradients differ by
    ~1e-7, and AdamW's g / (sqrt(v) + eps) turns that into ~5e-5 weight differences on near-zero gradients."""
    cache = {}

    def get(impl, overrides=(), untied=False):
        key = (impl, tuple(overrides), untied)
        if key not in cache:
            ranks, weights, _ = run_worker(
                tmp_path_factory.mktemp("ref"), "ref", 1, zero_stage=0, impl=impl, overrides=overrides, untied=untied
            )
            assert ranks[0]["describe"]["distributed_type"] == "NO" and not ranks[0]["is_sharded"]
            cache[key] = ranks[0], weights
        return cache[key]

    return get


# the combinations the guide's 8B config trains with, in small: sdpa_packed (CPU), fused CE, untied, bf16, zero 2/3
@pytest.mark.parametrize(
    "zero_stage,impl,untied,dtype",
    [(3, "fused", False, "fp32"), (2, "torch", False, "fp32"), (3, "fused", True, "fp32"), (3, "fused", True, "bf16")],
)
def test_two_process_fsdp_matches_one_process(tmp_path, references, zero_stage, impl, untied, dtype):
    overrides = [f"model.distributed.training_dtype={dtype}"]
    ref, ref_weights = references(impl, overrides, untied)
    ranks, weights, log = run_worker(tmp_path, f"z{zero_stage}", 2, zero_stage, impl, overrides, untied)
    tol = 1e-5 if dtype == "fp32" else 2e-2  # bf16: FSDP casts the gathered weights, one process autocasts
    for r, info in enumerate(ranks):
        d = info["describe"]
        assert (d["distributed_type"], d["world_size"], d["rank"], d["fsdp_version"]) == ("FSDP", 2, r, 2)
        assert d["reshard_after_forward"] is (zero_stage == 3)
        assert info["is_sharded"], f"rank {r}: parameters are not DTensors, FSDP did not shard"
        # every unit, [final norm, LM head] under the fused loss included, is sharded again after each step
        assert info["unsharded_units"] == [[]] * len(info["losses"]) and info["fsdp_warnings"] == [], info
        assert info["attention"] == "sdpa_packed"
        assert info["losses"] == pytest.approx(ref["losses"], abs=tol, rel=tol)
        assert info["grad_norms"] == pytest.approx(ref["grad_norms"], abs=tol, rel=tol)
    assert ranks[0]["local_counts"] != ranks[1]["local_counts"]  # ranks saw different data
    assert len(set(ref["losses"])) == len(ref["losses"])  # the weights changed between steps
    assert weights.keys() == ref_weights.keys()
    tied_now = torch.equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"])
    assert tied_now is not untied  # an untied LM head trained apart from the embeddings
    for k in weights:  # bf16: losses and norms only (AdamW turns bf16 noise on ~0 gradients into lr-sized steps)
        assert dtype == "bf16" or torch.allclose(weights[k], ref_weights[k], atol=tol), k
    assert "distributed: FSDP, world size 2" in log  # print0 logged the choice once
    assert log.count("distributed: FSDP") == 1


def test_two_process_ddp_matches_one_process(tmp_path, references):
    ref, ref_weights = references("fused")
    ranks, weights, _ = run_worker(tmp_path, "ddp", 2, zero_stage=1, impl="fused")
    for info in ranks:
        assert info["describe"]["distributed_type"] == "MULTI_CPU" and not info["is_sharded"]
        assert info["losses"] == pytest.approx(ref["losses"], abs=1e-5)
    for k in weights:
        assert torch.allclose(weights[k], ref_weights[k], atol=1e-5), k


def test_launch_commands_and_yaml(tmp_path):
    config_path = tmp_path / "config.yaml"
    config_path.write_text(
        dump_yaml(
            load_train_config(
                ASSETS / "configs" / "tiny_train.yaml",
                ["model.multi_stage.zero_stage=2", "model.distributed.training_dtype=bf16", "run.num_processes=2"],
            )
        )
    )
    assert train_command(config_path) == [sys.executable, "-m", "backend.train", str(config_path)]
    cmd = train_command(config_path, 2, extra_overrides=["training.train_iters=5"])
    yaml_path = tmp_path / "accelerate_2proc.yaml"
    assert cmd == [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(yaml_path),
        "--num_processes",
        "2",
        "-m",
        "backend.train",
        str(config_path),
        "training.train_iters=5",
    ]
    text = yaml_path.read_text()
    assert "distributed_type: FSDP" in text and "fsdp_reshard_after_forward: false" in text
    # a port picked per launch, not torch's fixed 29500 (two runs at once on one machine would collide)
    port = int(re.search(r"^main_process_port: (\d+)$", text, re.M).group(1))
    assert port != 29500 and 1024 <= port < 65536
    assert "mixed_precision: 'bf16'" in text and "use_cpu: false" in text
    assert "distributed_type: MULTI_GPU" in accelerate_config_yaml(2, zero_stage=1)
    assert train_env(2, use_cpu=True, threads=1) == {
        "PYTHONUNBUFFERED": "1",
        "ACCELERATE_USE_CPU": "true",
        "OMP_NUM_THREADS": "1",
    }
    # the studio imports backend.launch: it must not pull in torch or accelerate
    probe = "import sys, backend.launch; print('torch' in sys.modules, 'accelerate' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_two_processes_of_one_row_micro_batches_equal_one_process_of_one_micro_batch(tmp_path, references):
    """Gradient accumulation and data parallelism at once: 2 ranks x 2 micro-batches of 1 row (unequal trained
    counts per micro-batch and per rank) give the weights of 1 process with the step's 4 rows in one micro-batch."""
    ref, ref_weights = references("fused", ["batch.micro_batch_size=4"], True)
    assert all(len(c) == 1 for c in ref["local_counts"])
    ranks, weights, _ = run_worker(tmp_path, "split", 2, 3, "fused", untied=True)
    assert all(len(c) == 2 for c in ranks[0]["local_counts"])
    assert ranks[0]["local_counts"] != ranks[1]["local_counts"]
    assert ranks[0]["trained_tokens"] == ref["trained_tokens"]
    for k in weights:
        assert torch.allclose(weights[k], ref_weights[k], atol=1e-6), (
            k,
            float((weights[k] - ref_weights[k]).abs().max()),
        )
