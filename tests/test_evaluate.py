"""What the model learned (backend/evaluate.py, backend/trackers.py) on the tiny model and the shipped sample data.

What each test proves:
- the per-token loss of a document, through collate + backend.loss.trained_token_losses, has the trainer's loss
  (trained_token_loss, both impls) as its mean, is NaN exactly where a token is not a target, and a checkpoint
  scores like the export made from the same weights;
- greedy answers with our KV-cache loop equal transformers' `generate` (greedy, cache) token for token;
- a run with `training.evaluations.samples` writes `samples` events at each validation, and with
  `run.trackers: [tensorboard]` TensorBoard holds the same train/validation losses as events.jsonl and the config;
- wandb (offline) and mlflow (a SQLite store in each run, also for two runs in one process) get the same
  scalars (the test set-up installs both);
- two FSDP processes generate together and finish (no hang), only rank 0 writes the event (slow).
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from backend import ASSETS, ROOT, TINY_MODEL
from backend.chat import eot_token_ids
from backend.dataset import TokenDataset
from backend.evaluate import (
    document_loss,
    greedy_answers,
    load_scoring_model,
    rank_documents,
    run_models,
    sample_prompts,
    token_losses,
)
from backend.events import read_events
from backend.loss import trained_token_loss
from backend.modeling import load_tokenizer
from backend.packing import Piece, collate

TINY_TRAIN = ASSETS / "configs" / "tiny_train.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def overrides(data, run_dir, **extra) -> list[str]:
    values = {
        "data.datasets.training.path": data / "fast_llm_config_training.yaml",
        "data.datasets.validation.path": data / "fast_llm_config_validation.yaml",
        "run.experiment_dir": run_dir,
        "batch.sequence_length": 256,
        "batch.batch_size": 4,
        "batch.micro_batch_size": 2,
        "training.train_iters": 6,
        "training.logs.interval": 1,
        "training.evaluations.validation.iterations": 2,
        "training.evaluations.validation.interval": 3,
        "training.evaluations.samples": 2,
        "training.evaluations.sample_max_new_tokens": 8,
        "training.checkpoint.interval": 3,
        "optimizer.learning_rate.warmup_iterations": 2,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="module")
def tracked_run(data, tmp_path_factory):
    from backend.train import train

    run_dir = tmp_path_factory.mktemp("run") / "exp"
    train(TINY_TRAIN, overrides(data, run_dir, **{"run.trackers": "[tensorboard]"}))
    return run_dir


def events_of(run_dir, kind):
    return [e for e in read_events(run_dir / "events.jsonl")[0] if e["event"] == kind]


def test_per_token_loss_mean_is_the_trainers_loss(data):
    model = load_scoring_model(TINY_MODEL)
    tokenizer = load_tokenizer(TINY_MODEL)
    valid = TokenDataset(data, "validation")
    eot = eot_token_ids(tokenizer)
    for d in range(4):
        tokens, trained = valid.document(d)
        result = document_loss(model, tokens, trained, eot)
        batch = collate([[Piece(d, 0, len(tokens))]], valid, len(tokens))
        for impl in ("fused", "torch"):
            with torch.no_grad():
                loss_sum, count = trained_token_loss(model, batch, impl)
            assert result.count == count
            assert result.mean == pytest.approx(float(loss_sum) / count, abs=1e-5)
        # a loss exactly where the token is a target: trained, and not the document's first token
        targets = np.asarray(trained, dtype=bool).copy()
        targets[0] = False
        assert np.array_equal(np.isfinite(result.losses), targets)
        # each token's own loss (not one value spread over them): a plain forward of the document, log-softmax
        with torch.no_grad():
            logits = model(input_ids=torch.as_tensor(tokens, dtype=torch.long)[None]).logits[0].double()
        each = -logits[:-1].log_softmax(-1).gather(1, torch.as_tensor(tokens[1:], dtype=torch.long)[:, None])[:, 0]
        assert np.allclose(result.losses[targets], each.numpy()[targets[1:]], atol=1e-4)
        # the end-of-turn token of each reply is trained (train_on_eot), so it has a loss
        assert result.eot_count == int((targets & np.isin(tokens, eot)).sum()) > 0
        worst = [loss for _, loss in result.worst]
        assert worst == sorted(worst, reverse=True) and worst[0] == np.nanmax(result.losses)
    ranked = rank_documents(model, valid, limit=6)
    assert [r[0] for r in ranked] != [] and [r[1] for r in ranked] == sorted((r[1] for r in ranked), reverse=True)
    tokens, trained = valid.document(ranked[0][0])
    assert ranked[0][1] == pytest.approx(np.nanmean(token_losses(model, tokens, trained)))


def test_kv_cache_greedy_equals_transformers_generate(data):
    model = load_scoring_model(TINY_MODEL)
    stop = eot_token_ids(load_tokenizer(TINY_MODEL))
    prompts = sample_prompts(TokenDataset(data, "validation"), 3)
    assert len(prompts) == 3
    for p in prompts:  # a prompt ends where its last trained stretch (the reference reply) begins
        assert len(p.prompt_ids) and len(p.reference_ids) and p.reference_ids[-1] in stop
    answers = greedy_answers(model, prompts, 12, stop)
    for p, answer in zip(prompts, answers, strict=True):
        ids = torch.as_tensor(p.prompt_ids.astype(np.int64))[None]
        out = model.generate(ids, max_new_tokens=12, do_sample=False, use_cache=True, eos_token_id=stop)
        assert answer == out[0, ids.shape[1] :].tolist()
    assert model.config.use_cache is False  # the packed-training trap stays closed


def test_run_writes_samples_and_tensorboard_matches_events(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from backend.trackers import tracker_locations

    run_dir = tracked_run
    samples = events_of(run_dir, "samples")
    assert [e["step"] for e in samples] == [e["step"] for e in events_of(run_dir, "validation")] == [3, 6]
    for e in samples:
        assert len(e["samples"]) == 2
        for s in e["samples"]:
            assert s["prompt"] and s["reference"] and isinstance(s["answer"], str)
    assert [s["prompt"] for s in samples[0]["samples"]] == [s["prompt"] for s in samples[1]["samples"]]

    logdir = tracker_locations(run_dir, ["tensorboard"])["tensorboard"]
    acc = EventAccumulator(logdir)
    acc.Reload()
    for kind in ("train", "validation"):
        logged = [(s.step, s.value) for s in acc.Scalars(f"{kind}/loss")]
        expected = [(e["step"], e["loss"]) for e in events_of(run_dir, kind)]
        assert [s for s, _ in logged] == [s for s, _ in expected]
        assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6)  # float32 in TB
    assert "train/lr" in acc.Tags()["scalars"]
    # the config is stored with the run (hparams): its YAML copy holds the flattened keys
    hparams = list((run_dir / "trackers").glob("**/hparams.yml"))
    assert hparams and "batch.sequence_length: 256" in hparams[0].read_text()


def test_checkpoint_and_export_score_the_same(tracked_run, data):
    labels = dict((label, path) for label, path in run_models(tracked_run))
    assert {"checkpoint step 6", "export final"} <= set(labels) and any(k.startswith("base") for k in labels)
    tokens, trained = TokenDataset(data, "validation").document(0)
    a = token_losses(load_scoring_model(labels["checkpoint step 6"]), tokens, trained)
    b = token_losses(load_scoring_model(labels["export final"]), tokens, trained)
    base = token_losses(load_scoring_model(TINY_MODEL), tokens, trained)
    assert np.allclose(a, b, atol=1e-5, equal_nan=True)
    assert not np.allclose(a, base, atol=1e-3, equal_nan=True)  # 6 steps changed the model


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_wandb_offline_and_mlflow_store_in_the_run(data, tmp_path, monkeypatch, tracker):
    pytest.importorskip(tracker)
    from backend.trackers import tracker_locations
    from backend.train import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    # set, then removed: pytest restores the variable after the test (mlflow.set_tracking_uri writes it)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "unset-by-this-test")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # MLflow's own default would be ./mlflow.db in the cwd
    runs = [tmp_path / "exp", tmp_path / "exp_b"]
    stores = [f"sqlite:///{r.resolve() / 'trackers' / 'mlflow.db'}" for r in runs]
    if tracker == "mlflow":  # what the studio shows before the run is where the run writes
        assert tracker_locations(runs[0], ["mlflow"])["mlflow"] == f"{stores[0]} (experiment sft-studio)"
    run_dir = runs[0]
    train(TINY_TRAIN, overrides(data, run_dir, **{"run.trackers": f"[{tracker}]", "training.evaluations.samples": 0}))
    losses = [e["loss"] for e in events_of(run_dir, "train")]
    if tracker == "mlflow":
        import mlflow

        # a second run in the same process (a notebook) gets its own store, not the first run's
        assert tracker_locations(runs[1], ["mlflow"])["mlflow"] == f"{stores[1]} (experiment sft-studio)"
        train(TINY_TRAIN, overrides(data, runs[1], **{"run.trackers": "[mlflow]", "training.evaluations.samples": 0}))
        for store, run_dir in zip(stores, runs, strict=True):
            assert (run_dir / "trackers" / "mlflow.db").is_file()  # the store lives in the run
            client = mlflow.tracking.MlflowClient(store)
            (run,) = client.search_runs([client.get_experiment_by_name("sft-studio").experiment_id])
            assert run.info.run_name == run_dir.name
            history = client.get_metric_history(run.info.run_id, "train/loss")
            assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(losses, rel=1e-6)
            assert run.data.params["batch.sequence_length"] == "256"
    else:
        assert list((run_dir / "trackers").glob("**/offline-run-*")), "wandb wrote no offline run"


@pytest.mark.slow
def test_two_fsdp_processes_generate_together_and_finish(data, tmp_path):
    from backend.launch import train_command, train_env

    run_dir = tmp_path / "exp"
    extra = {
        "training.train_iters": 2,
        "training.evaluations.validation.interval": 2,
        "training.checkpoint.interval": 0,
        "batch.micro_batch_size": 1,
        "model.multi_stage.zero_stage": 3,
        "model.distributed.timeout": 60,
        "run.num_processes": 2,
    }
    config = tmp_path / "train.yaml"  # train_command writes its accelerate config next to it
    config.write_text(TINY_TRAIN.read_text())
    cmd = train_command(config, 2, use_cpu=True, extra_overrides=overrides(data, run_dir, **extra))
    proc = subprocess.run(
        cmd, cwd=ROOT, env={**ENV, **train_env(2, use_cpu=True)}, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (start,) = events_of(run_dir, "start")
    assert (start["world_size"], start["sharded"]) == (2, True)
    (samples,) = events_of(run_dir, "samples")  # one validation, one event: rank 1 wrote none
    assert samples["step"] == 2 and len(samples["samples"]) == 2
    # all ranks produced the same answers as one unsharded process with the same final weights
    model = load_scoring_model(run_dir / "export" / "final")
    stop = eot_token_ids(load_tokenizer(TINY_MODEL))
    prompts = sample_prompts(TokenDataset(data, "validation"), 2)
    tokenizer = load_tokenizer(TINY_MODEL)
    expected = [tokenizer.decode(a, skip_special_tokens=True).strip() for a in greedy_answers(model, prompts, 8, stop)]
    assert [s["answer"] for s in samples["samples"]] == expected
    # the final checkpoint holds FSDP (DCP) shards: scored after gathering them, it equals the export
    (checkpoint,) = [path for label, path in run_models(run_dir) if label.startswith("checkpoint")]
    assert (Path(checkpoint) / "pytorch_model_fsdp_0").is_dir()
    tokens, trained = TokenDataset(data, "validation").document(0)
    a = token_losses(load_scoring_model(checkpoint), tokens, trained)
    assert np.allclose(a, token_losses(model, tokens, trained), atol=1e-5, equal_nan=True)


def test_studio_loss_view_samples_table_and_trackers(tracked_run, data):
    """The studio handlers (studio/learned.py): what the page shows, without a browser."""
    from backend.chat import Masking, render, tokenize
    from studio import handlers as H
    from studio import learned

    export = str(tracked_run / "export" / "final")
    choices, model, base = learned.model_choices(str(tracked_run))
    assert model == export and Path(base).resolve() == TINY_MODEL.resolve()
    dataset = str(ASSETS / "data" / "sample_sharegpt.jsonl")
    view = learned.sample_loss(export, base, H.DataSettings(dataset, str(TINY_MODEL)), 7)
    assert view.status == "" and "loss-delta" in view.tokens and "worst-tokens" in view.summary
    # the mean shown is the trainer's loss on that sample, tokenized as prepare does
    rows = H.get_rows(dataset)
    tokenizer = load_tokenizer(TINY_MODEL)
    rendered = render(rows[7], tokenizer, Masking())
    tok = tokenize(rendered.text, rendered.trained_spans, tokenizer)
    batch = collate([[Piece(0, 0, len(tok.input_ids))]], learned_docs(tok), len(tok.input_ids))
    with torch.no_grad():
        loss_sum, count = trained_token_loss(load_scoring_model(export), batch, "fused")
    assert view.mean == pytest.approx(float(loss_sum) / count, abs=1e-5)
    assert f"{view.mean:.6f}" in view.summary

    # highest-loss validation documents, and the row each came from (prepare keeps input order in a split)
    picks, message = learned.worst_validation(str(tracked_run), export, dataset, 10)
    assert len(picks) == 10 and "scored" in message
    losses = [float(label.split()[1]) for label, _ in picks]
    assert losses == sorted(losses, reverse=True)
    valid_rows = learned.validation_rows(str(tracked_run), dataset)
    document = picks[0][1]
    row, _ = learned.pick_validation(str(tracked_run), export, None, dataset, document)
    assert row == valid_rows[document]
    r = render(rows[row], tokenizer, Masking())
    tokens, trained = TokenDataset(data, "validation").document(document)
    assert np.array_equal(tokenize(r.text, r.trained_spans, tokenizer).input_ids, tokens)

    # the Train tab's answers table and the tracker's path
    table, trackers, cursor = learned.poll_samples(str(tracked_run), None)
    assert table.count("<th>step") == 2 and "samples-table" in table
    for s in events_of(tracked_run, "samples")[-1]["samples"]:
        assert html_escape(s["reference"]) in table
    assert "tensorboard" in trackers and str(tracked_run / "trackers") in trackers
    assert learned.poll_samples(str(tracked_run), cursor)[0] is None  # nothing new: nothing resent


def learned_docs(tok):
    from backend.evaluate import _Docs

    return _Docs([(tok.input_ids, tok.trained)])


def html_escape(text):
    import html

    return html.escape(text)


def test_progress_lines_for_waits():
    """Prepare inside Launch shows its bar's state and ETA; the dataset check's ETA follows the rate so far."""
    from studio.jobs import eta_text, tqdm_progress

    log = (
        "distributed: ...\n"
        "prepare:  12%|█         | 360/3000 [00:01<00:07, 360.00row/s]\r"
        "prepare:  45%|████▌     | 1350/3000 [00:03<01:04, 400.00row/s]\n"
    )
    assert tqdm_progress(log) == "prepare 45% (1350/3000), 3 s elapsed, ETA 64 s"
    assert tqdm_progress("no bar here\n") == ""
    assert eta_text(0, 10, 0.0) == "0/10"
    assert eta_text(5, 10, __import__("time").perf_counter() - 2.0) == "5/10, ETA 2 s"


def test_a_tracker_whose_package_is_missing_is_a_config_error(monkeypatch):
    """Accelerate drops an unavailable tracker silently; we refuse it at --validate (and at train start, and in
    the studio's Config tab, through the same backend.compat.machine_problems)."""
    import importlib.util

    from backend.compat import machine_problems
    from backend.config import load_train_config

    missing = "mlflow"  # the test set-up installs it: hide it (find_spec returns None for a None module entry)
    monkeypatch.setitem(sys.modules, missing, None)
    assert importlib.util.find_spec(missing) is None
    cfg = load_train_config(TINY_TRAIN, [f"run.trackers=[tensorboard, {missing}]"])
    assert machine_problems(cfg) == [
        f"run.trackers: {missing} is not installed on this machine; pip install 'sft-studio[{missing}]' or remove it"
    ]
    from backend.lora import quantization_problems

    qlora = ["model.base_model.peft.type=lora", "pretrained.quantization=4bit", "model.multi_stage.zero_stage=3"]
    both = load_train_config(TINY_TRAIN, [f"run.trackers=[{missing}]", *qlora, "batch.batch_size=8"])
    quantized = quantization_problems(both, 2)  # sharded over 2 processes: refused on any machine
    assert quantized and machine_problems(both, 2) == machine_problems(cfg) + quantized  # both kinds, listed
    hidden = f"import sys, runpy; sys.modules[{missing!r}] = None; "
    hidden += "runpy.run_module('backend.train', run_name='__main__')"  # python -m backend.train without mlflow
    proc = subprocess.run(
        [sys.executable, "-c", hidden, str(TINY_TRAIN), f"run.trackers=[{missing}]", "--validate"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and f"run.trackers: {missing} is not installed" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


def test_evaluate_objective_weighs_loss_and_figures_by_the_objectives_own_count():
    """evaluate_objective over `iterations` batches of micro-batches: the loss is the summed losses over the summed
    denominators, and each figure an objective reports (DPO's rewards, accuracy) is summed likewise, with its sign,
    from the micro-batches that report it (here not the one-row ones); the model is back in train mode after. A
    stand-in objective, sampler and accelerator: the sums are worked out by hand."""
    import contextlib
    from types import SimpleNamespace

    import torch

    from backend.train import evaluate_objective

    class Objective:
        def collate(self, rows, dataset, b, reference):
            return {"rows": rows, "reference": reference}

        def __call__(self, model, batch):
            assert not model.training and batch["reference"] == "ref"
            s, n = sum(batch["rows"]), len(batch["rows"])
            if n == 1:
                return torch.tensor(float(s)), n  # no figures from this one
            return torch.tensor(float(s)), n, {"reward": -2.0 * s, "accuracy": float(n)}

    class Sampler:
        def micro_batches(self, i, batch_size, micro_batch_size, rank, world):
            assert (rank, world) == (0, 1)
            return [[i + 1, i + 2], [10 * (i + 1)]]  # two micro-batches per batch: 3 documents

    accelerator = SimpleNamespace(process_index=0, num_processes=1, device="cpu", autocast=contextlib.nullcontext)
    model = torch.nn.Linear(1, 1)
    cfg = SimpleNamespace(batch=SimpleNamespace(batch_size=3, micro_batch_size=2))
    loss, figures = evaluate_objective(model, accelerator, Sampler(), None, cfg, 2, Objective(), reference="ref")
    total, reported = (1 + 2 + 10) + (2 + 3 + 20), (1 + 2) + (2 + 3)  # iterations 0 and 1; the two-row ones
    assert loss == total / 6 and figures == {"accuracy": 4 / 6, "reward": -2.0 * reported / 6} and model.training
