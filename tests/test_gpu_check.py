"""scripts/gpu_check.sh and bench/bench_gpu.py on a machine without CUDA: they refuse clearly (exit 2, nothing
written) and document themselves; the harness pieces (data, model, run-and-stop of backend.train) work on CPU."""

import json
import os
import subprocess
import sys

import numpy as np

from backend import ROOT, TINY_MODEL

SCRIPT = ROOT / "scripts" / "gpu_check.sh"
NO_CUDA = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}


def test_gpu_check_help_lists_what_it_runs_and_the_wheels_it_needs():
    out = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    for word in ("pytest -m gpu", "bench/GPU.md", "pydantic", "typing-inspection", "annotated-types", "Exit codes"):
        assert word in out.stdout, word


def test_gpu_wheels_help_names_every_wheel_and_bad_arguments_exit_2():
    """scripts/gpu_wheels.sh needs the package index (not run here): its help names each wheel gpu_check installs."""
    script = ROOT / "scripts" / "gpu_wheels.sh"
    out = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    for word in ("pydantic-core", "annotated-types", "typing-inspection", "typing-extensions", ".whl/pytest", "3.12"):
        assert word in out.stdout, word
    out = subprocess.run(["bash", str(script), "--python-version"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "needs a value" in out.stderr
    assert "/.whl/" in (ROOT / ".gitignore").read_text().split()  # the wheels are never committed


def test_gpu_check_refuses_without_cuda_and_writes_nothing(tmp_path):
    report = tmp_path / "GPU.md"
    out = subprocess.run(
        ["bash", str(SCRIPT), "--out", str(report)], env=NO_CUDA, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2 and "no CUDA device" in out.stderr
    assert not report.exists()
    out = subprocess.run(["bash", str(SCRIPT), "--layers"], env=NO_CUDA, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "--layers needs a value" in out.stderr
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_gpu.py"), "--out", str(report)],
        env=NO_CUDA,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "no CUDA device" in out.stderr and not report.exists()


def test_harness_runs_backend_train_and_stops_after_the_last_step(tmp_path):
    """What bench_gpu does per case, on the tiny model and CPU: data written, trainer stopped after its last train
    event (no checkpoint or export wanted), figures computed against the plan."""
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_gpu

    model = bench_gpu.write_model(tmp_path / "model8b", layers=2)
    config = json.loads((model / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["vocab_size"] == 128256 and (model / "tokenizer.json").exists()
    data = bench_gpu.write_data(tmp_path / "data", tokens=20_000, vocab=1008)
    from backend.dataset import TokenDataset

    ds = TokenDataset(data)
    tokens, trained = ds.document(0)
    assert ds.num_tokens >= 20_000 and tokens.max() < 1008 and not trained[0] and trained[-1]
    lengths = np.asarray(ds.lengths)
    assert 300 < np.median(lengths) < 3000  # Magpie-like
    overrides = [
        f"pretrained.path={TINY_MODEL}",
        f"data.datasets.training.path={data}",
        "data.datasets.validation=null",
        "training.train_iters=50",
        "training.logs.interval=1",
        "training.evaluations.validation.interval=0",
        "batch.sequence_length=256",
        "batch.micro_batch_size=1",
        "batch.batch_size=1",
        "model.multi_stage.zero_stage=0",
        "model.distributed.training_dtype=fp32",
        "model.base_model.transformer.use_flash_attention=no",
        "run.num_processes=1",
    ]
    result = bench_gpu.run_case("tiny cpu", overrides, tmp_path / "work", steps=4, timeout=120)
    assert "error" not in result, result.get("error")
    assert result["start"]["attention"] == "sdpa_packed" and len(result["train"]) >= 4
    assert result["train"][-1]["step"] < 50  # stopped by the harness, not run to the end
    figures = bench_gpu.figures(result, tflops=1.0, model_dir=TINY_MODEL)
    assert figures["tokens_per_s"] > 0 and figures["planned_peak"] > 0 and figures["peak"] is None  # no CUDA


def test_step_flops_matches_torch_flop_counter_and_labels_say_what_ran():
    """bench_gpu's model FLOPs against torch's FlopCounterMode on a real forward + backward of one document:
    the matmuls are 6 x the non-embedding parameters per token (norm weights aside), and eager attention, which
    computes the full n x n scores, counts exactly twice the causal attention term."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(ROOT / "bench"))
    import bench_gpu

    from backend.config import load_train_config
    from backend.plan import ModelShape
    from tests.tiny import tiny_llama

    n = 48
    counted = {}
    for attn in ("sdpa", "eager"):  # CPU sdpa's kernel is not counted: the matmuls alone
        model = tiny_llama(101, attn=attn, hidden=64, layers=2, positions=128).train()
        with FlopCounterMode(display=False) as counter:
            model(input_ids=torch.randint(0, 101, (1, n)), position_ids=torch.arange(n)[None]).logits.sum().backward()
        counted[attn] = counter.get_total_flops()
    shape = ModelShape(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=101, tied=False)
    norms = 6 * (2 * 2 * 64 + 64) * n  # RMSNorm weights are parameters but not matmuls
    linear = bench_gpu.step_flops(shape, [], positions=n)
    assert counted["sdpa"] == linear - norms
    attention = bench_gpu.step_flops(shape, [n], positions=n) - linear
    assert counted["eager"] - counted["sdpa"] == 2 * attention
    lora = bench_gpu.step_flops(shape, [], positions=n, adapter_params=1000)
    assert lora == 4 / 6 * linear + 6 * 1000 * n
    guide = ROOT / "assets" / "configs" / "llama31_8b_magpie_train.yaml"
    cfg = load_train_config(guide, ["model.base_model.peft.type=lora"])
    assert bench_gpu.case_label(cfg).endswith("checkpointing yes")  # the guide's config has it on


def test_wheels_alone_make_backend_train_importable_offline(tmp_path):
    """#23's proof for the device run: the wheels gpu_wheels.sh downloads are enough, installed with no index as
    gpu_check.sh installs them (pip --no-index --no-deps --target), for backend.train to import and the guide's
    config to load: every pydantic module comes from them, none from this venv. Downloads from PyPI (the brief's
    registries); skipped when PyPI cannot be reached. This venv's Python version stands in for the image's 3.12."""
    import socket

    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
    except OSError:
        import pytest

        pytest.skip("PyPI unreachable: gpu_wheels.sh cannot download")
    wheels, site = tmp_path / "whl", tmp_path / "site"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    env = {**os.environ, "PYTHON": sys.executable}
    made = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_wheels.sh"), "--python-version", version, "--dest", str(wheels)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr[-2000:]
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site)]
        + [str(w) for w in sorted(wheels.glob("*.whl"))],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr[-2000:]
    code = (
        "import sys, backend.train\n"
        "from backend import ROOT\n"
        "from backend.config import load_train_config\n"
        "cfg = load_train_config(ROOT / 'assets/configs/llama31_8b_magpie_train.yaml')\n"
        "names = ('pydantic', 'pydantic_core', 'annotated_types', 'typing_inspection', 'typing_extensions')\n"
        "print(cfg.batch.sequence_length, *(sys.modules[n].__file__ for n in names))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}", "HF_HUB_OFFLINE": "1"},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    length, *files = out.stdout.split()
    assert length == "4096"
    assert files and all(f.startswith(str(site)) for f in files), files
