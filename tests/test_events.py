"""events.jsonl writer/reader and the experiment-directory lock."""

import json
import os
import socket
import subprocess
import sys

import pytest

from backend import ROOT
from backend.events import EVENTS, EventLog, LockedError, RunLock, read_events, read_lock


def test_emit_appends_one_json_line_per_event(tmp_path):
    log = EventLog(tmp_path / "run" / "events.jsonl")  # parent is created
    log.emit("start", 0, resumed_from=None, sharded=False)
    log.emit("train", 1, loss=5.25, lr=1e-4, grad_norm=float("nan"), trained_tokens=10)
    lines = (tmp_path / "run" / "events.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["event"] == "start" and first["step"] == 0 and isinstance(first["time"], float)
    assert first["resumed_from"] is None and first["sharded"] is False
    assert second == {**second, "event": "train", "step": 1, "loss": 5.25, "lr": 1e-4, "trained_tokens": 10}
    assert second["grad_norm"] == "nan"  # strict JSON: non-finite numbers become strings, the line stays valid


def test_emit_rejects_unknown_event(tmp_path):
    with pytest.raises(ValueError, match="unknown event 'trian'"):
        EventLog(tmp_path / "e.jsonl").emit("trian", 1)
    assert set(EVENTS) == {
        "start",
        "train",
        "validation",
        "samples",
        "test",
        "checkpoint",
        "export",
        "converted",
        "end",
        "error",
    }


def test_read_events_tails_incrementally_and_leaves_a_partial_line(tmp_path):
    path = tmp_path / "events.jsonl"
    assert read_events(path) == ([], 0)  # missing file: nothing yet
    log = EventLog(path)
    log.emit("start", 0)
    log.emit("train", 1, loss=3.0)
    events, offset = read_events(path)
    assert [e["event"] for e in events] == ["start", "train"]
    assert offset == path.stat().st_size

    # a writer caught mid-line: the half object is not returned, and the offset stays before it
    with open(path, "a") as f:
        f.write('{"event": "validation", "step": 1, "lo')
    events, offset2 = read_events(path, offset)
    assert events == [] and offset2 == offset
    with open(path, "a") as f:
        f.write('ss": 2.5, "time": 1.0}\n')
    events, offset3 = read_events(path, offset2)
    assert events == [{"event": "validation", "step": 1, "loss": 2.5, "time": 1.0}]
    assert offset3 == path.stat().st_size
    assert read_events(path, offset=offset3) == ([], offset3)  # keyword alias


def test_read_events_reports_garbage_lines_instead_of_crashing(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text('{"event": "start", "step": 0, "time": 0}\nnot json\n')
    events, _ = read_events(path)
    assert events[0]["event"] == "start"
    assert events[1] == {"event": "unreadable", "line": "not json"}


def test_lock_refuses_a_second_live_run_and_names_the_pid(tmp_path):
    # a live foreign process holds the lock
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "LOCK").write_text(
            json.dumps({"pid": holder.pid, "hostname": socket.gethostname(), "start_time": 0.0, "argv": ["x"]})
        )
        info = read_lock(tmp_path)
        assert info["pid"] == holder.pid and info["alive"] is True
        with pytest.raises(LockedError, match=f"in use by pid {holder.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    # the holder is dead now: its lock is stale and is taken over
    assert read_lock(tmp_path)["alive"] is False
    with RunLock(tmp_path):
        info = read_lock(tmp_path)
        assert info["pid"] == os.getpid() and info["alive"] is True
    assert read_lock(tmp_path) is None  # released on exit


def test_lock_from_another_host_is_refused(tmp_path):
    (tmp_path / "LOCK").write_text(json.dumps({"pid": 1, "hostname": "some-other-host", "start_time": 0.0, "argv": []}))
    assert read_lock(tmp_path)["alive"] is None  # cannot tell
    with pytest.raises(LockedError, match="some-other-host"):
        RunLock(tmp_path).acquire()


def test_a_lock_read_empty_from_a_racing_starter_is_live_and_freed_by_the_kernel_on_death(tmp_path):
    # a starter that holds the OS lock but has not written its pid yet (the window between open and write)
    code = (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)"
    )
    starter = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "LOCK")], stdout=subprocess.PIPE, text=True)
    try:
        assert starter.stdout.readline().strip() == "locked"
        assert (tmp_path / "LOCK").read_text() == ""
        info = read_lock(tmp_path)
        assert info["alive"] is True and info["pid"] is None and info.get("starting") is True
        with pytest.raises(LockedError, match="starting right now"):
            RunLock(tmp_path).acquire()
        assert (tmp_path / "LOCK").exists()  # not removed as stale
    finally:
        starter.kill()  # SIGKILL: no cleanup code runs, only the kernel releases the lock
        starter.wait()
    assert read_lock(tmp_path)["alive"] is False
    with RunLock(tmp_path) as lock:
        info = read_lock(tmp_path)
        assert lock.held and info["pid"] == os.getpid() and info["alive"] is True and info["flock"] is True
    assert read_lock(tmp_path) is None


def test_a_killed_runs_lock_is_free_even_when_its_pid_is_reused(tmp_path):
    # the LOCK names a live pid (ours, as if the dead run's pid had been reused) but no process holds the OS lock
    holder = subprocess.run(
        [
            sys.executable,
            "-c",
            "from backend.events import RunLock; import os, sys; RunLock(sys.argv[1]).acquire(); os._exit(0)",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert holder.returncode == 0, holder.stderr
    info = json.loads((tmp_path / "LOCK").read_text())
    info["pid"] = os.getppid()  # alive, not us
    (tmp_path / "LOCK").write_text(json.dumps(info))
    assert read_lock(tmp_path)["alive"] is False
    with RunLock(tmp_path):
        assert read_lock(tmp_path)["pid"] == os.getpid()


def test_without_os_locks_the_pid_in_the_file_decides(tmp_path, monkeypatch):
    import errno

    import backend.events as events_module

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(events_module.fcntl, "flock", no_flock)
    with RunLock(tmp_path):
        info = read_lock(tmp_path)
        assert info["flock"] is False and info["pid"] == os.getpid() and info["alive"] is True
    assert read_lock(tmp_path) is None
