"""Screenshots of every studio tab from the real app in headless Chromium (for the README and review).

    python -m studio.screenshots [--out assets/screenshots] [--runs-dir RUNS] [--chromium /usr/bin/chromium]

Starts `python -m studio` on a free 127.0.0.1 port in a subprocess, drives it with playwright (no browser
download: the system Chromium), and writes data.png, check.png, packing.png, config.png, train.png, learned.png,
chat.png.
`serve()` and `launch_browser()` are also used by tests/test_studio_browser.py.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from backend import ROOT
from backend.launch import free_port

CHROMIUM = "/usr/bin/chromium"


@contextlib.contextmanager
def serve(
    runs_dir: str,
    port: int | None = None,
    timeout: float = 180.0,
    log_path: str | None = None,
    cwd: str | None = None,
    extra_args: tuple = (),
):
    """Run `python -m studio` on 127.0.0.1 in its own process group; yield its URL; stop the group after."""
    port = port or free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), GRADIO_ANALYTICS_ENABLED="False", OMP_NUM_THREADS="1")
    log = open(log_path or os.devnull, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "studio", "--port", str(port), "--runs-dir", str(runs_dir), *map(str, extra_args)],
        cwd=cwd or str(ROOT),
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the studio exited with code {proc.returncode} before serving (log: {log_path})")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    raise TimeoutError(f"the studio did not answer on {url} within {timeout:.0f} s") from None
                time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def launch_browser(playwright, chromium: str = CHROMIUM):
    return playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()
    page.wait_for_timeout(500)


def tiny_train_config(root: Path, train_iters: int = 40) -> Path:
    """A short tiny-model train YAML whose data and experiment live under ``root`` (nothing lands in the repo)."""
    import yaml

    t = yaml.safe_load((ROOT / "assets/configs/tiny_train.yaml").read_text())
    t["training"].update(train_iters=train_iters, logs={"interval": 1})
    t["training"]["evaluations"]["validation"].update(interval=10, iterations=2)
    t["training"]["checkpoint"]["interval"] = 1000
    t["batch"].update(sequence_length=256, batch_size=2, micro_batch_size=1)
    t["optimizer"]["learning_rate"].update(decay_iterations=train_iters, warmup_iterations=5)
    for split in ("training", "validation"):
        t["data"]["datasets"][split]["path"] = str(root / f"data/fast_llm_config_{split}.yaml")
    t["run"]["experiment_dir"] = str(root / "tiny-run")
    path = root / "train.yaml"
    path.write_text(yaml.safe_dump(t, sort_keys=False))
    return path


def take(out: Path, runs_dir: str, chromium: str = CHROMIUM, with_run: bool = True) -> list[Path]:
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    runs = Path(runs_dir)
    runs.mkdir(parents=True, exist_ok=True)
    config = tiny_train_config(runs)
    shots = []

    def shot(name):
        page.wait_for_timeout(1000)
        page.screenshot(path=str(out / name), full_page=True)
        shots.append(out / name)

    with serve(runs_dir, extra_args=("--config", config)) as url, sync_playwright() as p:
        browser = launch_browser(p, chromium)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(180_000)
        page.goto(url)
        page.locator("#preview-summary").get_by_text("tokens").first.wait_for()
        shot("data.png")
        page.locator("#check-button").click()
        page.locator("#check-summary").get_by_text("samples checked").wait_for()
        page.locator("#check-summary").scroll_into_view_if_needed()
        shot("check.png")
        open_tab(page, "Packing")
        page.locator("#pack-button").click()
        page.locator("#pack-summary").get_by_text("rows").wait_for()
        shot("packing.png")
        open_tab(page, "Config")
        shot("config.png")
        open_tab(page, "Train")
        if with_run:
            page.locator("#launch-button").click()
            page.wait_for_function(
                "() => /finished|failed|stopped/.test(document.querySelector('#train-status').innerText)",
                timeout=600_000,
            )
        shot("train.png")
        if with_run:  # what the model learned: the sample's tokens coloured by their loss under the export
            open_tab(page, "Data")
            page.locator("#loss-refresh").click()
            page.wait_for_timeout(1500)
            page.locator("#loss-button").click()
            page.locator("#loss-mean").wait_for()
            page.locator("#loss-summary").scroll_into_view_if_needed()
            shot("learned.png")
        open_tab(page, "Chat")
        if with_run:
            export = runs / "tiny-run" / "export" / "final"
            page.get_by_role("button", name="↻ models").click()
            page.wait_for_timeout(1500)
            model = page.get_by_label("model (export dir or base)")
            model.fill(str(export))
            model.press("Enter")
            msg = page.get_by_label("message")
            msg.fill("What is 5 + 37?")
            msg.press("Enter")
            page.wait_for_timeout(8000)
        shot("chat.png")
        browser.close()
    return shots


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "assets" / "screenshots"))
    ap.add_argument("--runs-dir", default=None, help="where the demo run goes (default: a new temporary dir)")
    ap.add_argument("--no-run", action="store_true", help="do not launch the short training run")
    ap.add_argument("--chromium", default=CHROMIUM)
    args = ap.parse_args(argv)
    import tempfile

    runs_dir = args.runs_dir or tempfile.mkdtemp(prefix="sft-studio-shots-")
    for p in take(Path(args.out), runs_dir, args.chromium, with_run=not args.no_run):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
