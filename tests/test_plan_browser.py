"""The Config tab's memory plan in headless Chromium: it is shown for the loaded YAML and follows a field edit and
the GPU fields. `pytest tests/test_plan_browser.py -m browser` (needs /usr/bin/chromium; skipped without it)."""

from pathlib import Path

import pytest
import yaml

from backend import ROOT

pytestmark = pytest.mark.browser
if not Path("/usr/bin/chromium").exists():
    pytest.skip("/usr/bin/chromium is missing (apt-get install -y chromium)", allow_module_level=True)


def test_config_tab_plan_follows_fields(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    from studio.screenshots import launch_browser, open_tab, serve

    t = yaml.safe_load((ROOT / "assets/configs/llama31_8b_magpie_train.yaml").read_text())
    t["pretrained"]["path"] = str(ROOT / "tests/data/llama-3.1-8b")
    t["model"]["multi_stage"]["activation_checkpointing"] = False
    t["run"]["experiment_dir"] = str(tmp_path / "exp")
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(t, sort_keys=False))
    with (
        serve(str(tmp_path), log_path=str(tmp_path / "studio.log"), extra_args=("--config", config)) as url,
        sync_playwright() as p,
    ):
        browser = launch_browser(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(url)
        open_tab(page, "Config")
        plan = page.locator("#memory-plan")
        expect(plan).to_contain_text("8,030,261,248 parameters")
        expect(plan).to_contain_text("on 8 GPUs")
        expect(plan).to_contain_text("Fits")
        seq = page.locator("#cfg-batch-sequence_length input")
        seq.fill("65536")
        seq.blur()
        expect(plan).to_contain_text("Does not fit")
        expect(plan).to_contain_text("Smallest change that fits")
        seq.fill("4096")
        seq.blur()
        expect(plan).to_contain_text("Fits")
        gpus = page.locator("#plan-gpus input").first
        gpus.fill("2")
        gpus.blur()
        expect(plan).to_contain_text("on 2 GPUs")
        expect(plan).to_contain_text("Does not fit")
        browser.close()
