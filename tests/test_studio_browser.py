"""The real studio page in headless Chromium: preview highlight, live delimiter edit, inline config error,
launch -> loss points on the chart, page reload reattaches, Stop ends every process and leaves a checkpoint.

    .venv/bin/pytest tests/test_studio_browser.py -x -q -m browser

Needs /usr/bin/chromium (apt-get install chromium); never `playwright install`. Skipped when it is missing,
except under CI=true, where a missing browser is a failure.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml

from backend import ROOT

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.browser

if not Path(CHROMIUM).exists():
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but {CHROMIUM} is missing: install chromium (apt-get install -y chromium)", pytrace=False)
    pytest.skip(
        f"{CHROMIUM} is missing (apt-get install -y chromium); the browser test needs it", allow_module_level=True
    )

TRAINED_STYLE = "44, 160, 44"  # COLOR_MAP["trained"] #2ca02c as the rgba() the page renders


def trained_texts(page) -> list[str]:
    return page.eval_on_selector_all(
        f'#preview span.token[style*="{TRAINED_STYLE}"] .text', "els => els.map(e => e.textContent)"
    )


def summary_trained(page) -> str:
    return page.locator("#preview-summary").inner_text()


def tiny_train_yaml(root: Path) -> Path:
    t = yaml.safe_load((ROOT / "assets/configs/tiny_train.yaml").read_text())
    t["training"].update(train_iters=300, logs={"interval": 1})
    t["training"]["checkpoint"]["interval"] = 1000  # the checkpoint checked below is the one Stop makes
    t["training"]["evaluations"]["validation"]["interval"] = 0
    t["batch"].update(sequence_length=128, batch_size=1, micro_batch_size=1)
    for split in ("training", "validation"):
        t["data"]["datasets"][split]["path"] = str(root / f"data/fast_llm_config_{split}.yaml")
    t["run"]["experiment_dir"] = str(root / "exp")
    path = root / "train.yaml"
    path.write_text(yaml.safe_dump(t, sort_keys=False))
    return path


def job_alive(pgid: int) -> bool:
    from studio.jobs import job_processes

    return bool(job_processes(pgid))


def test_studio_in_a_real_browser(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    from studio.screenshots import launch_browser, open_tab, serve

    config = tiny_train_yaml(tmp_path)
    exp = tmp_path / "exp"
    with (
        serve(str(tmp_path), log_path=str(tmp_path / "studio.log"), extra_args=("--config", config)) as url,
        sync_playwright() as p,
    ):
        browser = launch_browser(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(120_000)
        page.goto(url)

        # 1. the preview highlights the assistant replies (with their end-of-turn token)
        expect(page.locator("#preview-summary")).to_contain_text("tokens", timeout=150_000)
        texts = trained_texts(page)
        assert texts and any("5 + 37 = 42." in t for t in texts), texts
        assert all(t.endswith("<|eot_id|>") for t in texts), texts
        before = summary_trained(page)

        # 2. delimiters mode + a start delimiter that opens the USER turn: the highlight changes at once
        page.get_by_label("delimiters", exact=True).check()
        start = page.locator("#start-delim textarea, #start-delim input").first
        start.fill("<|start_header_id|>user<|end_header_id|>\\n\\n")
        page.wait_for_function(
            f"""() => Array.from(document.querySelectorAll('#preview span.token[style*="{TRAINED_STYLE}"] .text'))
                     .some(e => e.textContent.includes('What is 5 + 37?'))""",
            timeout=60_000,
        )
        assert summary_trained(page) != before
        # an empty delimiter is a visible problem, not a traceback
        start.fill("")
        expect(page.locator("#data-status")).to_contain_text("start_delimiter", timeout=60_000)
        page.get_by_label("auto", exact=True).check()

        # 3. a bad config value shows an inline error naming the key
        open_tab(page, "Config")
        mb = page.locator("#cfg-batch-micro_batch_size input")
        mb.fill("0")
        mb.press("Tab")
        expect(page.locator("#config-status")).to_contain_text("batch.micro_batch_size", timeout=60_000)
        mb.fill("1")
        mb.press("Tab")
        expect(page.locator("#config-status")).to_contain_text("valid train config", timeout=60_000)

        # 4. launch a short tiny run: loss points appear on the chart
        open_tab(page, "Train")
        page.locator("#launch-button").click()
        expect(page.locator("#train-action")).to_contain_text("launched", timeout=60_000)
        page.wait_for_function(
            "() => document.querySelectorAll('#train-plot .scatterlayer .point').length >= 2", timeout=300_000
        )
        expect(page.locator("#train-status")).to_contain_text("running")

        # 5. a page reload reattaches to the running job (status + curve come back from the directory)
        page.reload()
        open_tab(page, "Train")
        expect(page.locator("#train-status")).to_contain_text("running", timeout=60_000)
        page.wait_for_function(
            "() => document.querySelectorAll('#train-plot .scatterlayer .point').length >= 2", timeout=60_000
        )
        assert page.locator("#exp-dir input, #exp-dir textarea").first.input_value() == str(exp)

        # 6. Stop: SIGTERM to the group, the run checkpoints and every process ends
        pgid = json.loads((exp / "studio_job.json").read_text())["pgid"]
        page.locator("#stop-button").click()
        expect(page.locator("#train-action")).to_contain_text("SIGTERM", timeout=30_000)
        expect(page.locator("#train-status")).to_contain_text("stopped", timeout=180_000)
        deadline = time.time() + 30
        while job_alive(pgid) and time.time() < deadline:
            time.sleep(0.5)
        assert not job_alive(pgid)
        ckpts = sorted((exp / "checkpoints").glob("step_*"))
        assert ckpts and (ckpts[-1] / "COMPLETE").exists()
        browser.close()
