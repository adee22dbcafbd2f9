"""The experiment directory's event log and run lock: the only channel between a training run and the UI.

``events.jsonl`` holds one JSON object per line, appended and flushed (and fsynced) as things happen::

    {"event": "start", "step": 0, "time": 1763650000.1, "resumed_from": null, "sharded": false, ...}
    {"event": "train", "step": 1, "time": ..., "loss": 6.21, "lr": 2e-05, "grad_norm": 1.9,
     "tokens_per_s": 1830.0, "trained_tokens": 1210, "elapsed": 0.7, "eta": 69.3}
    {"event": "validation", "step": 100, "time": ..., "loss": 5.98}
    {"event": "checkpoint", "step": 100, "time": ..., "path": "runs/x/checkpoints/step_000100"}
    {"event": "export", "step": 100, "time": ..., "path": "runs/x/export/step_000100"}
    {"event": "end", "step": 300, "time": ..., "stopped": false}
    {"event": "error", "step": 17, "time": ..., "message": "loss is nan at step 17 ..."}

A reader tails the file with ``read_events(path, offset) -> (events, new_offset)``; a line still being written
(no trailing newline yet) is left for the next call, so a tailer never sees half an object.

``LOCK`` (``RunLock``) holds ``{"pid", "hostname", "start_time", "argv"}`` of the live run, so that a second run
cannot write into the same directory and the studio can reattach after a page reload (``read_lock``).

Nothing here imports torch: the studio imports this module.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path

EVENTS = ("start", "train", "validation", "samples", "checkpoint", "export", "end", "error")
LOCK_NAME = "LOCK"


def _jsonable(value):
    """Make a field JSON-safe: NaN/inf become strings ("nan", "inf") because strict JSON has no such numbers,
    numpy/torch scalars become Python numbers, paths become strings."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class EventLog:
    """Append-only writer of ``events.jsonl``.

    >>> log = EventLog("runs/x/events.jsonl")
    >>> log.emit("train", 3, loss=5.1, lr=1e-4)   # writes {"event": "train", "step": 3, "time": ..., "loss": 5.1, ...}
    """

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, event: str, step: int, **fields) -> dict:
        if event not in EVENTS:
            raise ValueError(f"unknown event {event!r}; expected one of {', '.join(EVENTS)}")
        record = {"event": event, "step": int(step), "time": time.time()}
        record.update({k: _jsonable(v) for k, v in fields.items()})
        line = json.dumps(record, allow_nan=False) + "\n"
        # One write of a whole line in append mode, then fsync: a reader (or a crash) sees whole lines or a
        # partial last line, which read_events leaves alone.
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        return record


def read_events(path, start_offset: int = 0, *, offset: int | None = None) -> tuple[list[dict], int]:
    """Read the complete lines of ``events.jsonl`` from byte ``start_offset``.

    Returns ``(events, new_offset)``; pass ``new_offset`` back next time to get only new events. A last line
    without its newline (being written right now) is not returned and ``new_offset`` points at its start.
    A missing file gives ``([], start_offset)``. A complete line that is not JSON is skipped (reported as an
    ``{"event": "unreadable", "line": ...}`` entry so that a UI can show it rather than silently drop it).
    """
    if offset is not None:  # alias: the brief called it offset, the contract start_offset
        start_offset = offset
    path = Path(path)
    try:
        with open(path, "rb") as f:
            f.seek(start_offset)
            data = f.read()
    except FileNotFoundError:
        return [], start_offset
    end = data.rfind(b"\n")
    if end < 0:
        return [], start_offset
    events = []
    for raw in data[: end + 1].splitlines():
        if not raw.strip():
            continue
        try:
            events.append(json.loads(raw))
        except json.JSONDecodeError:
            events.append({"event": "unreadable", "line": raw.decode("utf-8", "replace")})
    return events, start_offset + end + 1


# ---------------------------------------------------------------------------------------------------- run lock


class LockedError(RuntimeError):
    """Another live run holds the experiment directory."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def read_lock(directory) -> dict | None:
    """The lock of ``directory`` as a dict ``{"pid", "hostname", "start_time", "argv", "alive"}``, or None.

    ``alive`` is True/False when the lock was taken on this host (we can check the pid), None otherwise.
    """
    path = Path(directory) / LOCK_NAME
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, OSError):
        return {"pid": None, "hostname": None, "start_time": None, "argv": None, "alive": False, "corrupt": True}
    same_host = info.get("hostname") == socket.gethostname()
    pid = info.get("pid")
    info["alive"] = (_pid_alive(int(pid)) if isinstance(pid, int) else False) if same_host else None
    return info


class RunLock:
    """Exclusive ownership of an experiment directory by one live run.

    >>> with RunLock("runs/x"):      # writes runs/x/LOCK = {"pid": 4242, "hostname": "box", "start_time": ...}
    ...     train()
    RunLock("runs/x") while pid 4242 is alive -> LockedError("runs/x is in use by pid 4242 on box since ...")

    A lock whose pid is dead (same host) is stale and taken over. A lock from another host cannot be checked:
    it is refused, and the message says to delete the LOCK file if that run is gone.
    """

    def __init__(self, directory):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.held = False

    def acquire(self) -> RunLock:
        import sys

        self.directory.mkdir(parents=True, exist_ok=True)
        info = {"pid": os.getpid(), "hostname": socket.gethostname(), "start_time": time.time(), "argv": list(sys.argv)}
        for _ in range(2):
            try:
                # O_EXCL makes creation atomic: of two runs started at once, exactly one wins.
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                current = read_lock(self.directory)
                if current is None:
                    continue  # released between our open and our read: try again
                if current.get("pid") == os.getpid() and current.get("hostname") == info["hostname"]:
                    self.held = True  # re-entrant within one process
                    return self
                if current.get("alive") is False:
                    # stale: the run that held it died without releasing (SIGKILL, power loss)
                    self.path.unlink(missing_ok=True)
                    continue
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(current.get("start_time") or 0))
                raise LockedError(
                    f"{self.directory} is in use by pid {current.get('pid')} on {current.get('hostname')} "
                    f"(started {when}); stop that run first, use another run.experiment_dir, or delete "
                    f"{self.path} if that run no longer exists"
                ) from None
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(info, f)
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            return self
        raise LockedError(f"could not take {self.path}: it keeps reappearing; another run is starting there")

    def release(self) -> None:
        if not self.held:
            return
        current = read_lock(self.directory)
        if current is not None and current.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
