"""Train tab handlers: launch prepare + train as subprocesses (`studio.jobs`), poll their event log, stop."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from studio.common import _parse_yaml, check_path, problems_markdown

# =============================================================================================== train tab


# the train.log box holds exactly this many lines, and the poll sends exactly this tail: the newest line (a stop, an
# exit code) is always in sight, whatever the browser does with scrolling
LOG_TAIL_LINES = 16


@dataclass
class RunView:
    figure: Any
    log: str
    status: str  # markdown
    progress: float  # 0..1
    running: bool
    cursor: dict  # per-session tail state: {"exp": str, "offset": int, "events": [...]}
    machine: Any = None  # the machine figure (studio.plots.resource_figure); None until a train event has figures


def prepared_is_current(prepare_yaml: str) -> tuple[bool, bool, str]:
    """(current, exists, why): whether prepare's output already holds this config and these input files.

    Uses backend.prepare's own identity (DONE's prepare_hash and input_fingerprint), so the studio skips prepare
    exactly when `python -m backend.prepare` would say "already prepared", and passes --force when the output is
    stale (prepare refuses to overwrite a different dataset without it).
    """
    from backend.config import ConfigError, load_prepare_config
    from backend.prepare import input_fingerprint, output_hash

    try:
        cfg = load_prepare_config(yaml.safe_load(prepare_yaml))
    except (ConfigError, yaml.YAMLError) as e:
        return False, False, f"invalid prepare config: {e}"
    out = Path(cfg.output_path)
    try:
        done = json.loads((out / "DONE").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False, out.exists(), f"{out} is not prepared yet"
    if done.get("prepare_hash") != output_hash(cfg):
        return False, True, f"{out} was prepared with other settings: it is prepared again (--force)"
    if done.get("input_fingerprint") != input_fingerprint(cfg.dataset.path):
        return False, True, f"the input files changed since {out} was prepared: it is prepared again (--force)"
    return True, True, f"{out} is prepared with these settings"


def launch_run(train_yaml: str, prepare_yaml: str) -> str:
    """Validate both YAMLs, then start prepare (if needed) + train in the experiment dir. Returns a status line."""
    from backend.config import ConfigError, load_prepare_config, load_train_config
    from studio import jobs

    raw, err = _parse_yaml(train_yaml, "train")
    if raw is None:
        return err
    try:
        cfg = load_train_config(raw)
    except ConfigError as e:
        return problems_markdown(e.problems)
    run_prepare, force, why = bool((prepare_yaml or "").strip()), False, ""
    if run_prepare:
        praw, perr = _parse_yaml(prepare_yaml, "prepare")
        if praw is None:
            return perr
        try:
            pcfg = load_prepare_config(praw)
        except ConfigError as e:
            return problems_markdown([f"(prepare) {p}" for p in e.problems])
        expected = Path(pcfg.output_path) / "fast_llm_config_training.yaml"
        if Path(cfg.data.datasets.training.path).resolve() != expected.resolve():
            return (
                f"⚠ `data.datasets.training.path` is {cfg.data.datasets.training.path} but prepare writes "
                f"{expected}; set it to {expected}"
            )
        current, exists, why = prepared_is_current(prepare_yaml)
        run_prepare, force = not current, exists and not current
    else:
        check = check_path(cfg.data.datasets.training.path, "prepared")
        if not check.ok:
            return f"⚠ `data.datasets.training.path`: {check.message}; prepare it first (or give a prepare YAML)"
    exp = cfg.run.experiment_dir
    check = check_path(exp, "dir")
    if not check.ok:
        return f"⚠ `run.experiment_dir`: {check.message}"
    try:
        jobs.launch(
            exp,
            prepare_yaml if (prepare_yaml or "").strip() else None,
            train_yaml,
            cfg.run.num_processes,
            run_prepare=run_prepare,
            force_prepare=force,
        )
    except jobs.JobError as e:
        return f"⚠ {e}"
    return f"launched in {exp}: {'prepare, then ' if run_prepare else ''}train. {why}"


def experiment_dir_of(train_yaml: str) -> str:
    raw, _ = _parse_yaml(train_yaml, "train")
    if raw is None:
        return ""
    return str(((raw.get("run") or {}).get("experiment_dir")) or "runs/experiment")


def stop_run(exp_dir: str) -> str:
    from studio import jobs

    if not exp_dir:
        return "⚠ no experiment directory"
    return jobs.stop(exp_dir)


def _events_of(path: Path, cache: dict) -> list[dict]:
    """All events of a past run, re-read only when the file changed."""
    from backend.events import read_events

    try:
        st = path.stat()
    except OSError:
        return []
    key = (str(path), st.st_mtime_ns, st.st_size)
    if cache.get("key") != key:
        cache["key"], cache["events"] = key, read_events(path)[0]
    return cache["events"]


_past_cache: dict[str, dict] = {}


def poll_run(exp_dir: str, cursor: dict | None, overlays: list[str] | None = None) -> RunView:
    """One timer tick: read new events of ``exp_dir`` from the cursor's offset, redraw, tail the log."""
    from backend.events import read_events
    from studio import jobs
    from studio.plots import resource_figure, training_figure

    cursor = dict(cursor or {})
    exp = Path(exp_dir or "")
    if cursor.get("exp") != str(exp):
        cursor = {"exp": str(exp), "offset": 0, "events": []}
    new, cursor["offset"] = read_events(exp / "events.jsonl", cursor["offset"])
    # A resume appends to the same events.jsonl: the history is kept and the chart shows it by step.
    cursor["events"] = cursor["events"] + new
    st = jobs.job_status(exp)
    runs = {exp.name or "run": cursor["events"]}
    for o in overlays or []:
        if Path(o).resolve() == exp.resolve():
            continue
        runs[Path(o).name] = _events_of(Path(o) / "events.jsonl", _past_cache.setdefault(o, {}))
    fig = training_figure(runs)
    trains = [e for e in cursor["events"] if e.get("event") == "train"]
    total = st.train_iters or next(
        (
            e.get("train_iters")
            for e in reversed(cursor["events"])
            if e.get("event") == "start" and e.get("train_iters")
        ),
        None,
    )
    step = trains[-1]["step"] if trains else 0
    progress = min(1.0, step / total) if total else 0.0
    state = st.state if st.state != "none" else f"no run in {exp} yet"
    parts = [f"**{state}**" + (f" — {st.message}" if st.message else "")]
    if trains:
        last = trains[-1]
        eta = last.get("eta")
        parts.append(
            f"step {step}"
            + (f" / {total}" if total else "")
            + (
                f", loss {last['loss']:.4f}"
                if isinstance(last.get("loss"), (int, float))
                else ", no loss (step skipped)"
            )
            + (f", ETA {eta:.0f} s" if isinstance(eta, (int, float)) else "")
        )
    if trains and "margin" in trains[-1]:  # DPO: the preference figures beside the loss
        parts.append(f"margin {trains[-1]['margin']:.3f}, accuracy {trains[-1].get('accuracy', 0):.2f}")
    vals = [e for e in cursor["events"] if e.get("event") == "validation"]
    if vals and isinstance(vals[-1].get("loss"), (int, float)):
        parts.append(f"validation loss {vals[-1]['loss']:.4f} (step {vals[-1]['step']})")
        if "accuracy" in vals[-1]:
            parts[-1] += f", accuracy {vals[-1]['accuracy']:.2f}"
    tests = [e for e in cursor["events"] if e.get("event") == "test"]
    if tests and isinstance(tests[-1].get("loss"), (int, float)):
        parts.append(f"test loss {tests[-1]['loss']:.4f} ({tests[-1].get('batches')} batches)")
    ckpts = [e for e in cursor["events"] if e.get("event") == "checkpoint"]
    if ckpts:
        parts.append(f"last checkpoint: `{ckpts[-1].get('path')}`")
    exports = [e for e in cursor["events"] if e.get("event") == "export"]
    if exports and any(e.get("event") == "end" for e in cursor["events"]):
        parts.append(f"✓ final export: `{exports[-1].get('path')}` (the Chat tab and the per-token loss view use it)")
    if st.state == "failed":
        parts.append(f"✗ {st.message}")
    start = next((e for e in reversed(cursor["events"]) if e.get("event") == "start"), {})
    machine = resource_figure(trains, start.get("planned_peak_bytes"))
    log = jobs.tail(exp / jobs.LOG_FILE, LOG_TAIL_LINES)
    if st.running and st.phase == "prepare":  # prepare inside Launch: its progress bar and ETA from the log
        parts.insert(1, jobs.tqdm_progress(log) or "preparing the dataset")
    return RunView(fig, log, " · ".join(parts), progress, st.running, cursor, machine)


def past_runs(runs_dir: str) -> list[str]:
    from studio import jobs

    return jobs.list_runs(runs_dir)
