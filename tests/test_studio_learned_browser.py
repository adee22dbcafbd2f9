"""What the model learned, in the real page (headless Chromium): the default short run from the studio fills the
answers table while it trains, reaches "finished", the Data tab's per-token loss view scores the highlighted
sample with its export (mean = the trainer's loss on that document), and the Chat tab answers with the export.

    .venv/bin/pytest tests/test_studio_learned_browser.py -x -q -m browser
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from backend import SAMPLE_DATA, TINY_MODEL

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.browser

if not Path(CHROMIUM).exists():
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but {CHROMIUM} is missing: install chromium (apt-get install -y chromium)", pytrace=False)
    pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)", allow_module_level=True)


def trainer_loss(export: Path, row: int) -> float:
    """The trainer's loss (collate + trained_token_loss, fused) on sample ``row`` rendered as prepare renders it."""
    import torch

    from backend.chat import Masking, render, tokenize
    from backend.evaluate import _Docs, load_scoring_model
    from backend.loss import trained_token_loss
    from backend.modeling import load_tokenizer
    from backend.packing import Piece, collate
    from studio.handlers import get_rows

    tokenizer = load_tokenizer(TINY_MODEL)
    rendered = render(get_rows(str(SAMPLE_DATA))[row], tokenizer, Masking())
    tok = tokenize(rendered.text, rendered.trained_spans, tokenizer)
    n = len(tok.input_ids)
    batch = collate([[Piece(0, 0, n)]], _Docs([(tok.input_ids, tok.trained)]), n)
    with torch.no_grad():
        loss_sum, count = trained_token_loss(load_scoring_model(export), batch, "fused")
    return float(loss_sum) / count


def test_samples_table_loss_view_and_chat(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    from studio.screenshots import launch_browser, open_tab, serve, tiny_train_config

    config = tiny_train_config(tmp_path)  # the screenshots' short run: 40 steps, validation every 10
    exp = tmp_path / "tiny-run"
    with (
        serve(str(tmp_path), log_path=str(tmp_path / "studio.log"), extra_args=("--config", config)) as url,
        sync_playwright() as p,
    ):
        browser = launch_browser(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(120_000)
        page.goto(url)
        expect(page.locator("#preview-summary")).to_contain_text("tokens", timeout=150_000)

        # 1. launch (prepare, then train): the answers table fills during the run, then the run finishes
        open_tab(page, "Train")
        started = time.time()
        page.locator("#launch-button").click()
        expect(page.locator("#train-action")).to_contain_text("launched", timeout=60_000)
        expect(page.locator("#samples-table")).to_be_visible(timeout=400_000)
        filled_at = time.time() - started
        assert "running" in page.locator("#train-status").inner_text(), "the table should fill while training"
        assert "step 10" in page.locator("#samples-table").inner_text()
        expect(page.locator("#train-status")).to_contain_text("finished", timeout=600_000)
        done_at = time.time() - started
        print(f"samples table after {filled_at:.0f} s, run finished after {done_at:.0f} s")
        headers = page.locator("#samples-table th").all_inner_texts()
        assert headers[:2] == ["prompt", "reference"] and headers[2:] == [f"step {s}" for s in (10, 20, 30, 40)]

        # 2. Data tab: score the highlighted sample with the export; the mean is the trainer's loss on it
        open_tab(page, "Data")
        page.locator("#loss-refresh").click()
        page.wait_for_timeout(1500)
        page.locator("#loss-button").click()
        expect(page.locator("#loss-mean")).to_be_visible(timeout=120_000)
        shown = float(page.locator("#loss-mean").inner_text())
        assert abs(shown - trainer_loss(exp / "export" / "final", 0)) <= 1e-4
        assert page.locator("#loss-tokens span.sft-loss").count() > 0
        assert page.locator("#loss-delta span.sft-loss").count() > 0  # change from the base model
        # the highest-loss validation samples: one click opens one (the Data tab jumps to its source row)
        page.locator("#worst-button").click()
        expect(page.locator("#worst-status")).to_contain_text("validation documents scored", timeout=120_000)
        page.locator("#worst-pick input").click()
        first = page.get_by_role("option").first
        label = first.inner_text()
        row = int(label.rsplit("row", 1)[1])
        first.click()
        expect(page.locator("#sample-index input")).to_have_value(str(row), timeout=60_000)
        expect(page.locator("#loss-view")).to_contain_text(f"sample {row}:", timeout=120_000)
        shown = float(page.locator("#loss-mean").inner_text())
        assert f"loss {shown:.3f}" in label  # the ranked loss is the one the view shows for that sample

        # 3. Chat answers with the export
        open_tab(page, "Chat")
        page.get_by_role("button", name="↻ models").click()
        page.wait_for_timeout(1500)
        model = page.get_by_label("model (export dir or base)")
        model.fill(str(exp / "export" / "final"))
        model.press("Enter")
        msg = page.get_by_label("message")
        msg.fill("What is 5 + 37?")
        msg.press("Enter")
        page.wait_for_function(
            "() => Array.from(document.querySelectorAll('.message-wrap, [role=log]'))"
            ".some(e => e.innerText.includes('5 + 37') && e.innerText.split('5 + 37')[1].trim().length > 0)",
            timeout=120_000,
        )
        browser.close()
