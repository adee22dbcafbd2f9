"""Training jobs as subprocesses: launch, stop, reattach; the studio's only way to run the backend.

    launch("runs/exp1", prepare_yaml, train_yaml)   # writes prepare.yaml + train.yaml there, starts
                                                   #   python -m studio.runner runs/exp1   (own process group)
                                                   #   -> python -m backend.prepare runs/exp1/prepare.yaml
                                                   #   -> python -m backend.train runs/exp1/train.yaml
                                                   #      (accelerate launch ... when num_processes > 1)
    job_status("runs/exp1")  -> JobStatus(state="running", phase="train", pgid=4242, ...)
    stop("runs/exp1")        # SIGTERM to the group (the backend checkpoints, then exits); SIGKILL after a grace

State lives in the experiment directory, never in this process: ``studio_job.json`` (pgid, steps),
``studio_status.json`` (runner's phase and exit code), the backend's ``LOCK`` and ``events.jsonl``. So a page
reload or a studio restart finds a running job by reading the directory. Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from backend import ROOT
from backend.events import read_events, read_lock
from studio.runner import JOB_FILE, STATUS_FILE

PREPARE_YAML = "prepare.yaml"
TRAIN_YAML = "train.yaml"
LOG_FILE = "train.log"

_children: dict[str, subprocess.Popen] = {}  # runners started by this process, reaped by a thread each


class JobError(RuntimeError):
    """A job cannot be started or stopped; the message says why and what to do."""


@dataclass
class JobStatus:
    state: str  # "none" | "running" | "stopping" | "finished" | "stopped" | "failed"
    exp_dir: str
    phase: str | None = None  # "prepare" | "train" | "done"
    pgid: int | None = None
    returncode: int | None = None
    message: str = ""  # error message of a failed run, or what is going on
    last_step: int | None = None
    train_iters: int | None = None
    eta_s: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def running(self) -> bool:
        return self.state in ("running", "stopping")


# ------------------------------------------------------------------------------------------- process groups


def _live_processes() -> dict[int, tuple[int, int | None]]:
    """pid -> (ppid, pgid) of every live (non-zombie) process, through psutil (Linux and macOS alike)."""
    import psutil

    table = {}
    for proc in psutil.process_iter(["pid", "ppid", "status"]):
        info = proc.info
        if info.get("status") == psutil.STATUS_ZOMBIE or info.get("pid") is None:
            continue
        try:
            pgid = os.getpgid(info["pid"])
        except (ProcessLookupError, PermissionError):
            continue  # gone since the listing, or not ours to ask about
        table[info["pid"]] = (info.get("ppid") or 0, pgid)
    return table


def group_members(pgid: int | None) -> list[int]:
    """Pids of the live (non-zombie) processes of process group ``pgid``.

    Listed rather than ``killpg(pgid, 0)``: a zombie (exited, not yet reaped by a parent that is not us) still
    counts for killpg and would make a finished job look alive forever.
    """
    if not pgid:
        return []
    return sorted(pid for pid, (_, group) in _live_processes().items() if group == pgid)


def group_alive(pgid: int | None) -> bool:
    """True while any non-zombie process is in process group ``pgid``."""
    return bool(group_members(pgid))


def job_processes(pgid: int | None) -> list[int]:
    """Every live process of a job: its process group plus all their descendants.

    Descendants matter because torch elastic (``accelerate launch``) starts each rank in its own session, so
    the ranks are not in our group; the runner is their subreaper (studio/runner.py), so they stay findable.
    """
    if not pgid:
        return []
    table = _live_processes()
    found = {pid for pid, (_, group) in table.items() if group == pgid}
    frontier = list(found)
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    while frontier:
        for child in children.get(frontier.pop(), []):
            if child not in found:
                found.add(child)
                frontier.append(child)
    return sorted(found)


def _cmdline(pid: int) -> str:
    import psutil

    try:
        return " ".join(psutil.Process(pid).cmdline())
    except (psutil.Error, OSError):
        return ""


def training_workers(pgid: int | None) -> list[int]:
    """The processes of the group that run the training loop itself (not the runner, not a launcher).

    With ``accelerate launch`` the group holds: the runner, the launcher (torch elastic agent, whose command line
    also names backend.train) and one worker per rank. The agent answers SIGTERM by killing its workers after a
    short timeout, which could cut a large checkpoint short; so Stop signals the workers only and lets the
    launcher end by itself once they have saved and exited.
    """
    return [
        pid
        for pid in job_processes(pgid)
        if "backend.train" in (cmd := _cmdline(pid))
        and "accelerate" not in cmd
        and "torchrun" not in cmd
        and "torch.distributed.run" not in cmd
    ]


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def job_status(exp_dir) -> JobStatus:
    """What is going on in ``exp_dir``, read from the directory alone (works after a studio restart)."""
    exp = Path(exp_dir)
    job = _read_json(exp / JOB_FILE)
    status = _read_json(exp / STATUS_FILE) or {}
    lock = read_lock(exp) if exp.is_dir() else None
    events, _ = read_events(exp / "events.jsonl")
    out = JobStatus(state="none", exp_dir=str(exp), phase=status.get("phase"))
    trains = [e for e in events if e.get("event") == "train"]
    if trains:
        out.last_step = trains[-1].get("step")
        out.eta_s = trains[-1].get("eta")
    starts = [e for e in events if e.get("event") == "start"]
    if starts:
        out.train_iters = starts[-1].get("train_iters")
    errors = [e for e in events if e.get("event") == "error"]

    pgid = job.get("pgid") if job else None
    out.pgid = pgid
    if pgid and (group_alive(pgid) or job_processes(pgid)):
        out.state = "stopping" if job.get("stop_requested") else "running"
        out.message = f"running ({status.get('phase') or 'starting'}), process group {pgid}"
        return out
    if lock and lock.get("alive"):
        # A run that the studio did not start (command line, notebook): show it, Stop signals its pid.
        out.state = "running"
        out.pgid = None
        out.extra["pid"] = lock.get("pid")
        out.message = f"running outside the studio: pid {lock.get('pid')} holds {exp / 'LOCK'}"
        return out
    if not job and not events:
        return out
    out.returncode = status.get("returncode")
    ended = [e for e in events if e.get("event") == "end"]
    if job and job.get("stop_requested") or status.get("stopped") or (ended and ended[-1].get("stopped")):
        out.state = "stopped"
        out.message = "stopped; Resume continues from the last checkpoint"
    elif errors and (not ended or errors[-1].get("time", 0) >= ended[-1].get("time", 0)):
        out.state = "failed"
        out.message = str(errors[-1].get("message", "error"))
    elif out.returncode not in (None, 0):
        out.state = "failed"
        out.message = f"{status.get('phase') or 'job'} exited with code {out.returncode}; see the log below"
    elif ended:
        out.state = "finished"
        out.message = f"finished at step {ended[-1].get('step')}"
    elif job and status.get("phase") != "done":
        out.state = "failed"
        out.message = "the job's processes are gone without a final status (killed?); see the log below"
    else:
        out.state = "finished"
    return out


# ------------------------------------------------------------------------------------------- launch / stop


def build_steps(
    exp_dir: Path, num_processes: int, run_prepare: bool, force_prepare: bool = False
) -> tuple[list[dict], dict]:
    """The runner's steps and environment, from backend.launch (the one place that knows the command lines)."""
    from backend import launch as L

    steps = []
    if run_prepare:
        steps.append(
            {
                "name": "prepare",
                "argv": [str(a) for a in L.prepare_command(exp_dir / PREPARE_YAML, force=force_prepare)],
            }
        )
    steps.append({"name": "train", "argv": [str(a) for a in L.train_command(exp_dir / TRAIN_YAML, num_processes)]})
    env = {k: str(v) for k, v in (L.train_env(num_processes) or {}).items()}
    return steps, env


def launch(
    exp_dir,
    prepare_yaml: str | None,
    train_yaml: str,
    num_processes: int = 1,
    run_prepare: bool = True,
    force_prepare: bool = False,
) -> JobStatus:
    """Write the YAMLs into ``exp_dir`` and start the runner in a new process group.

    Raises JobError if a job already runs there (the backend's RunLock would refuse too, later and less clearly).
    """
    exp = Path(exp_dir)
    current = job_status(exp)
    if current.running:
        raise JobError(
            f"{exp} already has a running job ({current.message}); stop it first or pick another run.experiment_dir"
        )
    exp.mkdir(parents=True, exist_ok=True)
    if prepare_yaml is not None:
        _atomic_write(exp / PREPARE_YAML, prepare_yaml)
    _atomic_write(exp / TRAIN_YAML, train_yaml)
    steps, env = build_steps(exp, int(num_processes or 1), run_prepare and prepare_yaml is not None, force_prepare)
    (exp / STATUS_FILE).unlink(missing_ok=True)
    job = {"steps": steps, "env": env, "cwd": str(Path.cwd()), "created": time.time(), "pgid": None}
    _atomic_write(exp / JOB_FILE, json.dumps(job, indent=1))
    child_env = dict(os.environ)
    # The runner must import studio/backend even when the studio was started from another directory.
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), child_env.get("PYTHONPATH", "")) if p)
    proc = subprocess.Popen(
        [sys.executable, "-m", "studio.runner", str(exp)],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=child_env,
    )
    job["pgid"] = proc.pid  # start_new_session: the runner leads its own group, pgid == pid
    job["pid"] = proc.pid
    _atomic_write(exp / JOB_FILE, json.dumps(job, indent=1))
    _children[str(exp.resolve())] = proc
    threading.Thread(target=proc.wait, daemon=True).start()  # reap it, so no zombie keeps the group "alive"
    return job_status(exp)


def stop(exp_dir, grace_s: float = 300.0) -> str:
    """SIGTERM to the training processes (or the whole group while preparing); SIGKILL to the group if anything
    is left after ``grace_s`` (generous: saving a sharded checkpoint of a large model takes minutes).

    Returns at once with a message; a daemon thread enforces the grace period. The backend saves a checkpoint
    on SIGTERM, so a stopped run resumes from where it was.
    """
    exp = Path(exp_dir)
    st = job_status(exp)
    if not st.running:
        return f"nothing to stop in {exp} ({st.state})"
    if st.pgid is None:  # started outside the studio: we only know the pid in LOCK
        pid = st.extra.get("pid")
        os.kill(int(pid), signal.SIGTERM)
        return f"sent SIGTERM to pid {pid} (started outside the studio)"
    job = _read_json(exp / JOB_FILE) or {}
    job["stop_requested"] = time.time()
    _atomic_write(exp / JOB_FILE, json.dumps(job, indent=1))
    pgid = st.pgid
    workers = training_workers(pgid) if st.phase == "train" else []
    try:
        if workers:  # the training processes save a checkpoint and exit; the runner and launcher follow
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            target = f"{len(workers)} training process(es) {workers}"
        else:  # preparing, or starting up: the whole group
            os.killpg(pgid, signal.SIGTERM)
            target = f"process group {pgid}"
    except ProcessLookupError:
        return "the job had already ended"

    def enforce():
        deadline = time.time() + grace_s
        while time.time() < deadline:
            if not job_processes(pgid) and not group_alive(pgid):
                return
            time.sleep(0.5)
        for pid in job_processes(pgid):  # ranks in their own sessions first, then the group
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)

    threading.Thread(target=enforce, daemon=True).start()
    return (
        f"sent SIGTERM to {target}: the run saves a checkpoint and exits (the whole group is killed if "
        f"anything is left after {grace_s:.0f} s)"
    )


def wait(exp_dir, timeout: float) -> JobStatus:
    """Block until the job in ``exp_dir`` is no longer running, or ``timeout`` seconds pass."""
    deadline = time.time() + timeout
    st = job_status(exp_dir)
    while st.running and time.time() < deadline:
        time.sleep(0.5)
        st = job_status(exp_dir)
    return st


# ------------------------------------------------------------------------------------------- reading runs


def list_runs(runs_dir) -> list[str]:
    """Experiment directories under ``runs_dir`` (those holding events.jsonl or a studio job), newest first."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and ((p / "events.jsonl").exists() or (p / JOB_FILE).exists())]
    found.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return [str(p) for p in found]


def tail(path, max_lines: int = 40, max_bytes: int = 64_000) -> str:
    """The last lines of a text file ('' if missing); reads only the end of a big log."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            f.seek(max(0, size - max_bytes))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    # progress bars redraw with '\r': keep only the last state of each line
    lines = [ln.rsplit("\r", 1)[-1] for ln in data.split("\n")]
    return "\n".join([ln for ln in lines if ln.strip()][-max_lines:])


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ------------------------------------------------------------------ progress lines (log tails, gr.Progress)

_TQDM = re.compile(
    r"^(?P<desc>[^:|]*):\s*(?P<pct>\d+)%\|.*?\|\s*(?P<i>[\d.]+\w?)/(?P<n>[\d.]+\w?)\s*\[(?P<el>[\d:]+)<(?P<eta>[\d:?]+)"
)


def tqdm_progress(log: str) -> str:
    """The last tqdm bar of a log as a status line: "prepare 45% (1,350/3,000), 3 s elapsed, ETA 4 s"; "" if none."""
    for line in reversed(log.splitlines()):
        m = _TQDM.match(line.rsplit("\r", 1)[-1].strip())
        if m:
            return (
                f"{m['desc'].strip()} {m['pct']}% ({m['i']}/{m['n']}), {_seconds(m['el'])} elapsed, "
                f"ETA {_seconds(m['eta'])}"
            )
    return ""


def _seconds(clock: str) -> str:
    if "?" in clock:
        return "?"
    total = 0
    for part in clock.split(":"):
        total = total * 60 + int(part)
    return f"{total} s"


def eta_text(done: int, total: int, started: float) -> str:
    """ "1,200/5,000, ETA 9 s" from the rate so far (for gr.Progress descriptions)."""
    elapsed = time.perf_counter() - started
    eta = elapsed / done * (total - done) if done else float("nan")
    return f"{done:,}/{total:,}" + (f", ETA {eta:.0f} s" if math.isfinite(eta) else "")
