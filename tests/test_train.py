"""The training recipe end to end on the tiny model and the shipped sample data (prepared once per module).

What each test proves:
- a short run lowers training and validation loss; events.jsonl carries the contract fields; the export loads
  with AutoModelForCausalLM, keeps the chat template and stops on <|eot_id|>;
- a run SIGKILLed after a checkpoint and restarted ends with the same weights as an uninterrupted run, skipping
  a newer checkpoint that has no COMPLETE marker;
- SIGTERM (the studio's Stop) saves a complete checkpoint and writes an end event with stopped: true; while that
  run is alive a second run in the same directory is refused with the holder's pid;
- a NaN/inf loss stops the run with an error event and exit code 4, keeping the last good checkpoint;
- the guide's YAML runs with only paths and iterations changed;
- 1 process and 2 FSDP processes (gloo, real DTensor shards) give the same losses and weights.
"""

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from backend import ASSETS, ROOT, TINY_MODEL
from backend.checkpoint import COMPLETE, latest_complete, list_checkpoints
from backend.events import LockedError, read_events
from backend.train import EXIT_DIVERGED, lr_at, train

TINY_TRAIN = ASSETS / "configs" / "tiny_train.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The tiny one-step prepare (sample conversations -> masked, tokenized splits)."""
    out = tmp_path_factory.mktemp("data") / "tiny"
    subprocess.run(
        [sys.executable, "-m", "backend.prepare", str(ASSETS / "configs" / "tiny_prepare.yaml"), f"output_path={out}"],
        cwd=ROOT,
        env=ENV,
        check=True,
        capture_output=True,
    )
    return out


def overrides(data, experiment_dir, **extra) -> list[str]:
    """tiny_train.yaml made small: 4 rows of 256 tokens per step, 2 micro-batches of accumulation."""
    values = {
        "data.datasets.training.path": data / "fast_llm_config_training.yaml",
        "data.datasets.validation.path": data / "fast_llm_config_validation.yaml",
        "run.experiment_dir": experiment_dir,
        "batch.sequence_length": 256,
        "batch.batch_size": 4,
        "batch.micro_batch_size": 2,
        "training.logs.interval": 1,
        "training.evaluations.validation.iterations": 2,
        "training.evaluations.validation.interval": 10,
        "training.checkpoint.interval": 10,
        "optimizer.learning_rate.warmup_iterations": 5,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def events_of(run_dir, kind=None) -> list[dict]:
    events, _ = read_events(Path(run_dir) / "events.jsonl")
    return [e for e in events if kind is None or e["event"] == kind]


def final_weights(run_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(Path(run_dir) / "export" / "final" / "model.safetensors")


def assert_same_weights(a: dict, b: dict, tol: float):
    assert a.keys() == b.keys(), (
        f"only in the first: {sorted(a.keys() - b.keys())}, only in the second: {sorted(b.keys() - a.keys())}"
    )
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= tol, f"weights differ by {worst}"


def start_cli(args, log_path) -> subprocess.Popen:
    log = open(log_path, "w")
    return subprocess.Popen(
        [sys.executable, "-m", "backend.train", str(TINY_TRAIN), *args],
        cwd=ROOT,
        env=ENV,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_for(predicate, proc, timeout=240, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run exited with {proc.returncode} before {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_lr_schedule_warmup_then_cosine_to_minimum():
    from backend.config import LearningRateConfig

    lr = LearningRateConfig(base=1.0, minimum=0.1, warmup_iterations=2, decay_iterations=6, decay_style="cosine")
    got = [lr_at(s, lr, 100) for s in range(8)]
    assert got[:2] == [0.5, 1.0]  # linear warmup reaching base
    assert got[2] == 1.0 and got[4] == pytest.approx(0.55)  # cosine midpoint
    assert got[6:] == [0.1, 0.1]  # stays at minimum after decay_iterations (counted from 0)
    lin = LearningRateConfig(base=1.0, minimum=0.0, warmup_iterations=0, decay_style="linear")
    assert [lr_at(s, lin, 4) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]  # decay_iterations = train_iters
    const = LearningRateConfig(base=0.3, warmup_iterations=0, decay_style="constant")
    assert {lr_at(s, const, 10) for s in range(10)} == {0.3}


@pytest.fixture(scope="module")
def finished_run(data, tmp_path_factory):
    """20 steps from the tiny pretrained model (checkpoints at 5, 10, 15, 20; keep 2)."""
    run_dir = tmp_path_factory.mktemp("run") / "exp"
    summary = train(
        TINY_TRAIN,
        overrides(
            data,
            run_dir,
            **{"training.train_iters": 20, "training.checkpoint.interval": 5, "training.checkpoint.keep": 2},
        ),
    )
    return run_dir, summary


def test_training_lowers_loss_and_writes_the_event_contract(finished_run):
    run_dir, summary = finished_run
    events = events_of(run_dir)
    assert [e["event"] for e in events][0] == "start" and events[-1]["event"] == "end"
    for e in events:
        assert {"event", "step", "time"} <= e.keys()
    start = events[0]
    assert start["resumed_from"] is None and start["sharded"] is False and start["world_size"] == 1
    train_events = events_of(run_dir, "train")
    assert [e["step"] for e in train_events] == list(range(1, 21))
    for e in train_events:
        assert {"loss", "lr", "grad_norm", "tokens_per_s", "trained_tokens", "elapsed", "eta"} <= e.keys()
        assert e["trained_tokens"] > 0 and e["tokens_per_s"] > 0
    losses = [e["loss"] for e in train_events]
    assert losses[-1] < losses[0] - 1.0, losses  # clearly learning, not noise
    validation = events_of(run_dir, "validation")
    assert [e["step"] for e in validation] == [10, 20]
    assert validation[-1]["loss"] < validation[0]["loss"] - 0.3, validation
    assert summary["last_validation_loss"] == validation[-1]["loss"]
    # checkpoints: every 10 steps, the newest 2 kept, each complete, with the resolved config
    assert [(s, ok) for s, _, ok in list_checkpoints(run_dir / "checkpoints")] == [(15, True), (20, True)]
    assert [e["step"] for e in events_of(run_dir, "checkpoint")] == [5, 10, 15, 20]
    saved = yaml.safe_load((run_dir / "checkpoints" / "step_000020" / "config.yaml").read_text())
    assert saved["training"]["train_iters"] == 20 and saved["batch"]["sequence_length"] == 256
    assert (run_dir / "config.yaml").is_file() and not (run_dir / "LOCK").exists()
    assert events_of(run_dir, "export")[-1]["path"] == str(run_dir / "export" / "final")
    # the start event's disk estimate (backend.plan.disk_estimate) against what was written
    disk, files = events[0]["disk_bytes"], (run_dir / "checkpoints" / "step_000020").rglob("*")
    written = sum(f.stat().st_size for f in files if f.is_file())
    assert abs(written - disk["checkpoint_bytes"]) <= 0.05 * written, (written, disk)
    written = sum(f.stat().st_size for f in (run_dir / "export" / "final").glob("*.safetensors"))
    assert abs(written - disk["export_bytes"]) <= 0.05 * written, (written, disk)


def test_export_loads_with_transformers_and_stops_at_end_of_turn(finished_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, _ = finished_run
    path = run_dir / "export" / "final"
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    eos = model.generation_config.eos_token_id
    assert eot in (eos if isinstance(eos, list) else [eos])
    assert tokenizer.chat_template and "<|start_header_id|>" in tokenizer.chat_template
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    # the export holds the trained weights, not the initial ones
    initial = AutoModelForCausalLM.from_pretrained(TINY_MODEL)
    assert not torch.equal(initial.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_nan_loss_stops_with_an_error_and_keeps_the_last_good_checkpoint(finished_run, tmp_path):
    run_dir = tmp_path / "exp"
    shutil.copytree(finished_run[0], run_dir)
    before = len(events_of(run_dir))
    data = Path(yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["datasets"]["training"]["path"]).parent
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "backend.train",
            str(TINY_TRAIN),
            *overrides(data, run_dir, **{"training.train_iters": 30, "optimizer.learning_rate.base": 1e30}),
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == EXIT_DIVERGED, proc.stderr[-2000:]
    new = events_of(run_dir)[before:]
    assert new[0]["event"] == "start" and new[0]["resumed_from"].endswith("step_000020")
    message = new[-1]["message"].lower()
    assert new[-1]["event"] == "error" and ("nan" in message or "inf" in message), new[-1]
    assert not [e for e in new if e["event"] == "checkpoint"]  # nothing saved after the blow-up
    assert latest_complete(run_dir / "checkpoints").name == "step_000020"
    assert "last good checkpoint" in proc.stderr


def test_sigkill_then_restart_matches_an_uninterrupted_run(data, tmp_path):
    common = {
        "training.train_iters": 6,
        "training.checkpoint.interval": 2,
        "training.evaluations.validation.interval": 3,
    }
    reference = tmp_path / "reference"
    train(TINY_TRAIN, overrides(data, reference, **common))

    killed = tmp_path / "killed"
    kill_after = random.choice([2, 4])  # a random checkpointed step; the kill lands somewhere after it
    proc = start_cli(overrides(data, killed, **common), tmp_path / "killed.log")
    wait_for(
        lambda: (
            (latest := latest_complete(killed / "checkpoints", warn=lambda m: None)) is not None
            and int(latest.name.split("_")[1]) >= kill_after
        ),
        proc,
        what=f"a checkpoint at step {kill_after}",
    )
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not events_of(killed, "end")
    # a newer save that never completed (as a kill in the middle of save_state would leave it) must be skipped
    fake = killed / "checkpoints" / "step_000005"
    shutil.copytree(latest_complete(killed / "checkpoints"), fake)
    (fake / COMPLETE).unlink()
    (fake / "model.safetensors").write_bytes(b"truncated")
    resumed_at = latest_complete(killed / "checkpoints")

    summary = train(TINY_TRAIN, overrides(data, killed, **common))  # also takes over the dead run's LOCK
    assert summary["resumed_from"] == str(resumed_at) and summary["step"] == 6
    assert events_of(killed, "start")[-1]["resumed_from"] == str(resumed_at)
    assert_same_weights(final_weights(reference), final_weights(killed), 1e-6)
    ref_losses = {e["step"]: e["loss"] for e in events_of(reference, "train")}
    for e in events_of(killed, "train")[-2:]:
        assert e["loss"] == pytest.approx(ref_losses[e["step"]], abs=1e-6)


def test_sigterm_saves_and_ends_and_a_second_run_is_refused(data, tmp_path):
    run_dir = tmp_path / "exp"
    args = overrides(
        data,
        run_dir,
        **{
            "training.train_iters": 10_000,
            "training.checkpoint.interval": 10_000,
            "training.evaluations.validation.interval": 0,
        },
    )
    proc = start_cli(args, tmp_path / "run.log")
    try:
        wait_for(lambda: len(events_of(run_dir, "train")) >= 2, proc, what="two train events")
        with pytest.raises(LockedError, match=f"pid {proc.pid}"):
            train(TINY_TRAIN, args)
        second = subprocess.run(
            [sys.executable, "-m", "backend.train", str(TINY_TRAIN), *args],
            cwd=ROOT,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 3 and f"pid {proc.pid}" in second.stderr
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    end = events_of(run_dir)[-1]
    assert end["event"] == "end" and end["stopped"] is True
    latest = latest_complete(run_dir / "checkpoints")
    assert latest is not None and int(latest.name.split("_")[1]) == end["step"] >= 2
    assert not (run_dir / "LOCK").exists()
    assert not (run_dir / "export" / "final").exists()  # a stop is not the end of training


@pytest.mark.slow
def test_guide_yaml_runs_with_only_paths_and_iterations_changed(data, tmp_path):
    run_dir = tmp_path / "guide"
    summary = train(
        ASSETS / "configs" / "guide_train.yaml",
        [
            f"data.datasets.training.path={data / 'fast_llm_config_training.yaml'}",
            f"data.datasets.validation.path={data / 'fast_llm_config_validation.yaml'}",
            f"run.experiment_dir={run_dir}",
            "training.train_iters=1",
            "training.evaluations.validation.iterations=1",
        ],
    )
    start = events_of(run_dir, "start")[0]
    assert start["attention"] == "sdpa_packed" and "flash" in start["attention_reason"]  # the fallback is said
    assert start["mixed_precision"] == "bf16"
    assert summary["step"] == 1 and (run_dir / "export" / "final" / "model.safetensors").is_file()
    assert events_of(run_dir, "train")[0]["trained_tokens"] > 0


@pytest.mark.slow
def test_two_fsdp_processes_match_one_process(data, tmp_path):
    from backend.launch import train_command, train_env

    config = tmp_path / "train.yaml"
    shutil.copy(TINY_TRAIN, config)
    common = {
        "training.train_iters": 4,
        "training.checkpoint.interval": 2,
        "training.evaluations.validation.interval": 2,
        "batch.micro_batch_size": 1,
        "model.multi_stage.zero_stage": 3,
    }
    runs = {}
    for n in (1, 2):
        run_dir = tmp_path / f"p{n}"
        cmd = train_command(
            config, n, use_cpu=True, extra_overrides=overrides(data, run_dir, **common, **{"run.num_processes": n})
        )
        proc = subprocess.run(
            cmd, cwd=ROOT, env={**ENV, **train_env(n, use_cpu=True)}, capture_output=True, text=True, timeout=400
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[n] = run_dir
    one, two = (events_of(runs[n], "start")[0] for n in (1, 2))
    assert (one["world_size"], one["sharded"]) == (1, False)
    assert (two["world_size"], two["sharded"], two["distributed_type"]) == (2, True, "FSDP")
    for kind in ("train", "validation"):
        a, b = ([e["loss"] for e in events_of(runs[n], kind)] for n in (1, 2))
        assert len(a) == len(b) > 0
        assert a == pytest.approx(b, abs=1e-5)
    assert_same_weights(final_weights(runs[1]), final_weights(runs[2]), 1e-5)
