"""The machine while a run trains (backend/resources.py): figures in the train events, the studio's plot of them,
and a CUDA out-of-memory error that says what to change (issue #26)."""

from __future__ import annotations

import pytest
import torch

from backend.resources import OutOfMemory, dir_bytes
from backend.train import train
from studio.plots import resource_figure
from tests.test_train import TINY_TRAIN, events_of, overrides


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("res") / "run"
    train(TINY_TRAIN, overrides(data, run_dir, **{"training.train_iters": 3, "training.checkpoint.interval": 2}))
    return run_dir


def test_train_events_carry_the_machine_and_the_plot_draws_exactly_them(run):
    trains = events_of(run, "train")
    assert len(trains) == 3
    for e in trains:
        assert e["host_ram_used_bytes"] > 0 and e["process_rss_bytes"] > 0 and 0 <= e["cpu_percent"] <= 100
        assert not any(k.startswith("gpu_") for k in e)  # CPU: no GPU figures at all, rather than zeros
    # the run directory grows once a checkpoint is written (step 2), and never exceeds what is on disk now
    assert trains[2]["run_dir_bytes"] > trains[0]["run_dir_bytes"] > 0
    assert trains[2]["run_dir_bytes"] <= dir_bytes(run)
    start = events_of(run, "start")[0]
    assert start["planned_peak_bytes"] > 0
    fig = resource_figure(trains, start["planned_peak_bytes"])
    by_name = {t.name: t for t in fig.data}
    assert list(by_name["host RAM used"].y) == [e["host_ram_used_bytes"] / 2**30 for e in trains]
    assert list(by_name["run dir"].y) == [e["run_dir_bytes"] / 2**30 for e in trains]
    assert list(by_name["host RAM used"].x) == [e["step"] for e in trains]
    assert not any("rank" in name for name in by_name)  # the GPU panels are absent on CPU


def test_gpu_figures_are_plotted_per_rank_beside_the_planned_peak():
    events = [
        {"step": s, "host_ram_used_bytes": 1, "cpu_percent": 5.0, "run_dir_bytes": 0,
         "gpu_allocated_bytes": [s * 2**30, 2 * s * 2**30], "gpu_reserved_bytes": [3 * 2**30, 4 * 2**30]}
        for s in (1, 2)
    ]  # fmt: skip
    fig = resource_figure(events, 5 * 2**30)
    by_name = {t.name: t for t in fig.data}
    assert list(by_name["rank 0 allocated"].y) == [1.0, 2.0] and list(by_name["rank 1 allocated"].y) == [2.0, 4.0]
    assert list(by_name["rank 1 reserved"].y) == [4.0, 4.0]
    assert any(getattr(s, "y0", None) == 5.0 for s in fig.layout.shapes)  # the planner's peak as a line


def test_an_out_of_memory_step_ends_the_run_with_the_plan_and_what_to_change(data, tmp_path, monkeypatch):
    import backend.resources as R
    import backend.train as T

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(T, "train_step", oom)
    # a GPU of 1 MiB that reached a 900 KiB peak: the tiny model's plan does not fit it
    monkeypatch.setattr(R, "_cuda_peak_and_total", lambda: (900 * 2**10, 2**20))
    run_dir = tmp_path / "oom"
    with pytest.raises(OutOfMemory) as e:
        train(TINY_TRAIN, overrides(data, run_dir, **{"training.train_iters": 2}))
    message = str(e.value)
    assert "step 1" in message and "peak allocated 0.0 GiB" in message
    assert "memory plan's peak" in message and ("smallest change that fits" in message or "no single change" in message)
    error = events_of(run_dir, "error")[-1]
    assert error["kind"] == "out_of_memory" and error["message"] == message


def test_checkpoints_of_tied_embeddings_do_not_warn_about_shared_tensors(tmp_path, caplog):
    """accelerate's "Removed shared tensor {'lm_head.weight'}" on every checkpoint read like a fault: it is the tied
    embedding, restored on load. Other shared tensors still warn."""
    import logging

    from accelerate import Accelerator

    from backend import TINY_MODEL
    from backend.checkpoint import _TiedWeightsNotice, save_checkpoint
    from backend.modeling import load_model

    model = load_model(TINY_MODEL)
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(model)
    with caplog.at_level(logging.WARNING):
        path = save_checkpoint(accelerator, tmp_path / "checkpoints", 1, "run: {}\n")
    assert (path / "model.safetensors").is_file()
    assert not [r for r in caplog.records if "Removed shared tensor" in r.getMessage()]
    notice = _TiedWeightsNotice({"lm_head.weight", "model.embed_tokens.weight"})

    def record(names):
        return logging.LogRecord("accelerate.utils.other", logging.WARNING, "", 0, names, None, None)

    assert not notice.filter(record("[RANK 0] Removed shared tensor {'lm_head.weight'} while saving. It is OK"))
    assert notice.filter(record("Removed shared tensor {'model.rotary.inv_freq'} while saving. This should be OK"))
