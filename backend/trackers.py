"""Experiment trackers (TensorBoard, Weights & Biases, MLflow) through Accelerate's integrations.

    run:
      trackers: [tensorboard]          # any of tensorboard | wandb | mlflow; default none

The trackers get exactly what events.jsonl gets, no second bookkeeping: `start_trackers` wraps the run's
EventLog so that every scalar field of a `train` or `validation` event is also `accelerator.log`ged, as
``train/loss``, ``train/lr``, ``validation/loss``, ... at the event's step. The resolved config is stored once
(flattened to ``a.b.c`` keys; TensorBoard's hparams accept only scalars).

Where each one writes (``tracker_locations`` returns it; the studio shows it):
    tensorboard  <experiment_dir>/trackers/sft-studio           tensorboard --logdir <that>
    wandb        wandb's own dir under <experiment_dir>/trackers (WANDB_MODE=offline: no account, `wandb sync` later)
    mlflow       $MLFLOW_TRACKING_URI when set (a server, a database); else a SQLite store in the run,
                 sqlite:///<experiment_dir>/trackers/mlflow.db (mlflow ui --backend-store-uri <that>); experiment
                 "sft-studio", run name = the experiment directory's name. Not ./mlruns: MLflow 3 refuses a new
                 file store, and its own default (./mlflow.db) depends on the directory training was started from.

Accelerate creates the trackers on the main process only; `accelerator.log` is a no-op elsewhere.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from backend.events import EventLog

PROJECT = "sft-studio"
LOGGED_EVENTS = ("train", "validation")

__all__ = [
    "accelerator_tracker_kwargs",
    "start_trackers",
    "TrackedEventLog",
    "tracker_locations",
    "flat_config",
    "mlflow_uri",
]


_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def tracker_problems(cfg) -> list[str]:
    """``run.trackers`` whose package is not installed: Accelerate would drop them without a word."""
    import importlib.util

    return [
        f"run.trackers: {name} is not installed on this machine; pip install 'sft-studio[{name}]' or remove it"
        for name in cfg.run.trackers
        if importlib.util.find_spec(_PACKAGES[name]) is None
    ]


def trackers_dir(experiment_dir) -> Path:
    return Path(experiment_dir) / "trackers"


_MLFLOW_URI_SET_HERE: str | None = None  # mlflow.set_tracking_uri also writes $MLFLOW_TRACKING_URI: not the user's


def mlflow_uri(experiment_dir) -> str:
    """The MLflow tracking URI of a run: $MLFLOW_TRACKING_URI as the user set it, else the SQLite store inside the
    run (a value this module set for an earlier run in the same process, e.g. a notebook's, is not the user's)."""
    user = os.environ.get("MLFLOW_TRACKING_URI")
    if user and user != _MLFLOW_URI_SET_HERE:
        return user
    return f"sqlite:///{(trackers_dir(experiment_dir) / 'mlflow.db').resolve()}"


def accelerator_tracker_kwargs(cfg) -> dict:
    """Accelerator(...) arguments for ``run.trackers`` (empty when there is none)."""
    if not cfg.run.trackers:
        return {}
    return {"log_with": list(cfg.run.trackers), "project_dir": str(trackers_dir(cfg.run.experiment_dir))}


def flat_config(cfg) -> dict:
    """The resolved config as {"a.b.c": bool | int | float | str} (lists and None as their text)."""
    out = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, (bool, int, float, str)):
            out[prefix] = value
        else:
            out[prefix] = str(value)

    walk("", cfg.model_dump(mode="json"))
    return out


class TrackedEventLog(EventLog):
    """An EventLog that also logs the scalars of train/validation events to the Accelerator's trackers."""

    def __init__(self, path, accelerator):
        super().__init__(path)
        self.accelerator = accelerator

    def emit(self, event: str, step: int, **fields) -> dict:
        record = super().emit(event, step, **fields)
        if event in LOGGED_EVENTS:
            scalars = {
                f"{event}/{k}": float(v)
                for k, v in record.items()
                if k not in ("event", "step", "time")
                and isinstance(v, (int, float))
                and not isinstance(v, bool)
                and math.isfinite(v)
            }
            if scalars:
                self.accelerator.log(scalars, step=int(step))
        return record


def start_trackers(accelerator, cfg, events: EventLog) -> TrackedEventLog:
    """init_trackers with the config (a collective-free call on every rank); returns the wrapped event log."""
    name = Path(cfg.run.experiment_dir).name or "run"
    init_kwargs = {
        "tensorboard": {},
        "wandb": {"name": name, "dir": str(trackers_dir(cfg.run.experiment_dir))},
        "mlflow": {"run_name": name},
    }
    if accelerator.is_main_process:
        trackers_dir(cfg.run.experiment_dir).mkdir(parents=True, exist_ok=True)
        if "mlflow" in cfg.run.trackers:
            import mlflow

            global _MLFLOW_URI_SET_HERE
            _MLFLOW_URI_SET_HERE = mlflow_uri(cfg.run.experiment_dir)
            mlflow.set_tracking_uri(_MLFLOW_URI_SET_HERE)
    accelerator.init_trackers(
        PROJECT,
        config=flat_config(cfg),
        init_kwargs={k: v for k, v in init_kwargs.items() if k in cfg.run.trackers},
    )
    return TrackedEventLog(events.path, accelerator)


def tracker_locations(experiment_dir, trackers) -> dict[str, str]:
    """{tracker: where its data is} for a run (no tracker library is imported: the studio calls this)."""
    out = {}
    for name in trackers or ():
        if name == "tensorboard":
            out[name] = str(trackers_dir(experiment_dir) / PROJECT)
        elif name == "wandb":
            out[name] = str(trackers_dir(experiment_dir) / "wandb")
        elif name == "mlflow":
            out[name] = f"{mlflow_uri(experiment_dir)} (experiment {PROJECT})"
    return out
