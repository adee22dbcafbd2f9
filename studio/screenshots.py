"""Screenshots of every studio tab from the real app in headless Chromium (for the README and review).

    python -m studio.screenshots [--out assets/screenshots] [--runs-dir RUNS] [--chromium /usr/bin/chromium]

Starts `python -m studio` on a free 127.0.0.1 port in a subprocess, drives it with playwright (no browser
download: the system Chromium), and writes data.png, check.png, packing.png, config.png, train.png, chat.png.
`serve()` and `launch_browser()` are also used by tests/test_studio_browser.py.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from backend import ROOT

CHROMIUM = "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(runs_dir: str, port: int | None = None, timeout: float = 180.0, log_path: str | None = None,
          cwd: str | None = None, extra_args: tuple = ()):
    """Run `python -m studio` on 127.0.0.1 in its own process group; yield its URL; stop the group after."""
    port = port or free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), GRADIO_ANALYTICS_ENABLED="False", OMP_NUM_THREADS="1")
    log = open(log_path or os.devnull, "w")
    proc = subprocess.Popen([sys.executable, "-m", "studio", "--port", str(port), "--runs-dir", str(runs_dir),
                             *map(str, extra_args)],
                            cwd=cwd or str(ROOT), env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
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
                    raise TimeoutError(f"the studio did not answer on {url} within {timeout:.0f} s")
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


def take(out: Path, runs_dir: str, chromium: str = CHROMIUM) -> list[Path]:
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    shots = []
    with serve(runs_dir) as url, sync_playwright() as p:
        browser = launch_browser(p, chromium)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        page.locator("#preview-summary").get_by_text("tokens").first.wait_for(timeout=120_000)
        page.wait_for_timeout(1000)
        page.screenshot(path=str(out / "data.png"), full_page=True)
        shots.append(out / "data.png")
        page.locator("#check-button").click()
        page.locator("#check-summary").get_by_text("samples checked").wait_for(timeout=180_000)
        page.locator("#check-summary").scroll_into_view_if_needed()
        page.wait_for_timeout(1000)
        page.screenshot(path=str(out / "check.png"), full_page=True)
        shots.append(out / "check.png")
        open_tab(page, "Packing")
        page.locator("#pack-button").click()
        page.locator("#pack-summary").get_by_text("rows").wait_for(timeout=120_000)
        page.wait_for_timeout(1500)
        page.screenshot(path=str(out / "packing.png"), full_page=True)
        shots.append(out / "packing.png")
        for tab, name in (("Config", "config.png"), ("Train", "train.png"), ("Chat", "chat.png")):
            open_tab(page, tab)
            page.wait_for_timeout(1500)
            page.screenshot(path=str(out / name), full_page=True)
            shots.append(out / name)
        browser.close()
    return shots


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "assets" / "screenshots"))
    ap.add_argument("--runs-dir", default=str(ROOT / "runs"))
    ap.add_argument("--chromium", default=CHROMIUM)
    args = ap.parse_args(argv)
    for p in take(Path(args.out), args.runs_dir, args.chromium):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
