"""Run the studio's job steps (prepare, then train) one after another, in the caller's process group.

    python -m studio.runner runs/exp1        # reads runs/exp1/studio_job.json, appends to runs/exp1/train.log

The studio starts this process with ``start_new_session=True`` so that it, and every process it starts (the
prepare and train processes, ``accelerate launch`` and its workers), share one process group that Stop signals
as a whole. It exists so that the prepare -> train chain survives a studio restart: the studio only starts it
and later reads ``studio_status.json``, ``events.jsonl`` and ``train.log``.

``studio_job.json``: ``{"steps": [{"name": "prepare", "argv": [...]}, {"name": "train", "argv": [...]}],
"env": {...}}``. ``studio_status.json`` (written atomically): ``{"phase": "train", "returncode": null,
"stopped": false, "time": ...}``. Nothing here imports torch.

The runner makes itself a *child subreaper* (Linux ``prctl(PR_SET_CHILD_SUBREAPER)``) and exits only when no
descendant is left. Why: ``accelerate launch`` (torch elastic) starts each rank in a NEW session, outside our
process group; if the launcher dies first, its ranks would be re-parented to init and run on unseen. As a
subreaper the runner inherits them, so "the runner is alive" == "some process of this job is alive", and the
studio can find every rank among the runner's descendants.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

JOB_FILE = "studio_job.json"
STATUS_FILE = "studio_status.json"


def write_status(exp_dir: Path, **fields) -> None:
    fields["time"] = time.time()
    tmp = exp_dir / (STATUS_FILE + ".tmp")
    tmp.write_text(json.dumps(fields), encoding="utf-8")
    os.replace(tmp, exp_dir / STATUS_FILE)


def become_subreaper() -> bool:
    """Orphaned descendants are re-parented to this process instead of init (Linux only; False elsewhere)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def reap_all() -> None:
    """Wait for every remaining child (orphaned ranks re-parented to us) so that we end last."""
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return
        except InterruptedError:
            continue


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m studio.runner EXPERIMENT_DIR", file=sys.stderr)
        return 2
    exp_dir = Path(argv[0])
    job = json.loads((exp_dir / JOB_FILE).read_text(encoding="utf-8"))
    env = dict(os.environ)
    env.update({k: str(v) for k, v in job.get("env", {}).items()})
    env["PYTHONUNBUFFERED"] = "1"  # the log tail in the UI should show lines as they are printed

    state = {"child": None, "stopped": False}

    def on_term(signum, frame):
        # Stop signals the whole group, so the child normally has its SIGTERM already; forward it anyway in case
        # only this process was signalled. Then keep waiting: the backend saves a checkpoint before it exits.
        state["stopped"] = True
        child = state["child"]
        if child is not None and child.poll() is None:
            try:
                child.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    become_subreaper()

    returncode = 0
    with open(exp_dir / "train.log", "a", encoding="utf-8", buffering=1) as log:
        for step in job["steps"]:
            if state["stopped"]:
                break
            write_status(exp_dir, phase=step["name"], returncode=None, stopped=False)
            log.write(f"\n== {step['name']}: {' '.join(step['argv'])}\n")
            log.flush()
            state["child"] = subprocess.Popen(
                step["argv"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=job.get("cwd") or None
            )
            returncode = state["child"].wait()
            state["child"] = None
            log.write(f"== {step['name']} exited with code {returncode}\n")
            log.flush()
            if returncode != 0:
                break
        reap_all()
    write_status(exp_dir, phase="done", returncode=returncode, stopped=state["stopped"])
    return returncode


if __name__ == "__main__":
    sys.exit(main())
