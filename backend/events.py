"""The experiment directory's event log and run lock: the only channel between a training run and the UI.

``events.jsonl`` holds one JSON object per line, appended and flushed (and fsynced) as things happen::

    {"event": "start", "step": 0, "time": 1763650000.1, "resumed_from": null, "sharded": false, ...}
    {"event": "train", "step": 1, "time": ..., "loss": 6.21, "lr": 2e-05, "grad_norm": 1.9,
     "tokens_per_s": 1830.0, "trained_tokens": 1210, "elapsed": 0.7, "eta": 69.3}
    {"event": "validation", "step": 100, "time": ..., "loss": 5.98}
    {"event": "test", "step": 300, "time": ..., "loss": 5.91, "batches": 10}     (training.test_iters, at the end)
    {"event": "checkpoint", "step": 100, "time": ..., "path": "runs/x/checkpoints/step_000100"}
    {"event": "export", "step": 100, "time": ..., "path": "runs/x/export/step_000100"}
    {"event": "converted", "step": 300, "time": ..., "gguf": "runs/x/export/final/gguf/model-q8_0.gguf"}
                                                       (training.export.formats beyond hf, after the final export)
    {"event": "end", "step": 300, "time": ..., "stopped": false}
    {"event": "error", "step": 17, "time": ..., "message": "loss is nan at step 17 ..."}

A reader tails the file with ``read_events(path, offset) -> (events, new_offset)``; a line still being written
(no trailing newline yet) is left for the next call, so a tailer never sees half an object.

``LOCK`` (``RunLock``) is held with an OS lock (``fcntl.flock``, released by the kernel when the run dies) and
holds ``{"pid", "hostname", "start_time", "argv", "flock"}`` of the live run, so that a second run cannot write
into the same directory and the studio can reattach after a page reload (``read_lock``).

Nothing here imports torch: the studio imports this module.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import socket
import time
from pathlib import Path

EVENTS = ("start", "train", "validation", "samples", "test", "checkpoint", "export", "converted", "end", "error")
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

    >>> import json, tempfile
    >>> log = EventLog(tempfile.mkdtemp() + "/events.jsonl")
    >>> record = log.emit("train", 3, loss=5.1, lr=1e-4)   # one JSON line per call
    >>> json.loads(log.path.read_text()) == record, sorted(record)
    (True, ['event', 'loss', 'lr', 'step', 'time'])
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


def _flock_held(path: Path) -> bool:
    """True when some open file description holds an flock on ``path`` (probe: a non-blocking shared lock).

    The kernel drops an flock when its holder dies (even by SIGKILL), so this is the authoritative liveness test
    for locks taken by RunLock; the probe holds the shared lock for microseconds only (acquire retries past it).
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # a filesystem without flock: fall back to the pid in the file
        return False
    finally:
        os.close(fd)  # closing releases the probe's shared lock
    return False


def read_lock(directory) -> dict | None:
    """The lock of ``directory`` as a dict ``{"pid", "hostname", "start_time", "argv", "alive"}``, or None.

    ``alive``: True while a process holds the OS lock (fcntl.flock) on ``LOCK``, even one that has not written
    its pid yet (then pid is None and ``starting`` is True); False once the kernel has released it. A LOCK file
    without the ``flock`` mark (written by an older version) is judged by its pid: True/False on this host,
    None (cannot tell) from another host.
    """
    path = Path(directory) / LOCK_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError:
        text = ""
    held = _flock_held(path)
    try:
        info = json.loads(text)
        if not isinstance(info, dict):
            raise ValueError(text)
    except ValueError:
        # empty or half-written: a starter between taking the flock and writing its pid, or a dead writer's debris
        info = {"pid": None, "hostname": None, "start_time": None, "argv": None}
        info["starting" if held else "corrupt"] = True
        info["alive"] = held
        return info
    if held:
        info["alive"] = True
    elif info.get("flock"):
        info["alive"] = False  # taken with an OS lock that no process holds any more: its holder is gone
    else:
        info["alive"] = _pid_lock_alive(info)
    return info


def _pid_lock_alive(info: dict) -> bool | None:
    """Liveness of a LOCK written without an OS lock (older versions): by its pid on this host, None elsewhere."""
    if info.get("hostname") != socket.gethostname():
        return None
    pid = info.get("pid")
    return _pid_alive(int(pid)) if isinstance(pid, int) else False


class RunLock:
    """Exclusive ownership of an experiment directory by one live run.

    >>> import tempfile
    >>> run_dir = tempfile.mkdtemp()
    >>> with RunLock(run_dir) as lock:     # flock(LOCK) + writes {"pid": ..., "hostname": ..., "flock": true, ...}
    ...     lock.held, read_lock(run_dir)["pid"] == os.getpid(), read_lock(run_dir)["flock"]
    (True, True, True)
    >>> lock.held, read_lock(run_dir)        # released on exit
    (False, None)

    Another process that tries while this one holds it gets ``LockedError("... is in use by pid ... on ...")``.

    The OS lock (``fcntl.flock`` on ``LOCK``) is what excludes: the kernel releases it when the holder dies, so a
    killed run's lock is free at once and a starter that has not written its pid yet still holds it. The pid and
    host in the file are for messages and for the studio (Stop signals that pid). A LOCK without the flock mark
    (an older version's) is respected while its pid lives; one from another host is refused with how to remove it.
    """

    def __init__(self, directory):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.held = False
        self._fd: int | None = None

    def _refuse(self, current: dict | None) -> LockedError:
        if not current or current.get("pid") is None:
            return LockedError(
                f"{self.directory} is being taken by another run that is starting right now ({self.path} is "
                "locked but not written yet); wait for it, stop it, or use another run.experiment_dir"
            )
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(current.get("start_time") or 0))
        return LockedError(
            f"{self.directory} is in use by pid {current.get('pid')} on {current.get('hostname')} "
            f"(started {when}); stop that run first, use another run.experiment_dir, or delete "
            f"{self.path} if that run no longer exists"
        )

    def acquire(self) -> RunLock:
        import sys

        self.directory.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "hostname": socket.gethostname()}
        for attempt in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                current = read_lock(self.directory)
                if current and current.get("pid") == me["pid"] and current.get("hostname") == me["hostname"]:
                    self.held = True  # re-entrant within one process (the other RunLock keeps the OS lock)
                    return self
                if attempt < 5:  # maybe only read_lock's brief probe: look again
                    time.sleep(0.05)
                    continue
                raise self._refuse(current) from None
            except OSError as e:  # a filesystem without flock (some network mounts): the pid in the file decides
                print(f"warning: {self.path}: no OS lock on this filesystem ({e}); relying on the pid", file=sys.stderr)
                os_locked = False
            else:
                os_locked = True
            try:
                on_disk = os.stat(self.path)
            except FileNotFoundError:
                on_disk = None
            if on_disk is None or on_disk.st_ino != os.fstat(fd).st_ino:
                os.close(fd)  # we locked a file its holder unlinked as it released: open the path again
                continue
            try:
                current = json.loads(os.read(fd, 1 << 16) or b"null")
            except ValueError:
                current = None  # empty/corrupt: its writer died before finishing (we hold the OS lock now)
            if isinstance(current, dict) and not current.get("flock"):
                # an older version's pid lock (no OS lock): respected while its pid lives
                if _pid_lock_alive(current) is not False and current.get("pid") != me["pid"]:
                    os.close(fd)
                    raise self._refuse(current)
            info = {**me, "start_time": time.time(), "argv": list(sys.argv), "flock": os_locked}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
            os.fsync(fd)
            self._fd, self.held = fd, True
            return self
        raise LockedError(f"could not take {self.path}: it keeps reappearing; another run is starting there")

    def release(self) -> None:
        if not self.held:
            return
        if self._fd is not None:
            # unlink while still holding the OS lock, then close (which releases it); a starter that opened the
            # old file meanwhile sees that it is no longer the path's file and opens the path again
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None
        self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
