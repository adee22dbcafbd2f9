"""backend.hub: a hub id that cannot be reached fails in seconds, with what to do; local paths never probe."""

import socket
import time

import pytest

from backend import TINY_MODEL
from backend.hub import HubUnreachable, hub_unreachable, looks_like_hub_id, require_hub

PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed once the socket is: connections are refused


def test_local_paths_are_not_hub_ids(tmp_path):
    assert not looks_like_hub_id(str(TINY_MODEL))
    assert not looks_like_hub_id(str(tmp_path))
    assert looks_like_hub_id("meta-llama/Llama-3.1-8B")
    require_hub(str(TINY_MODEL))  # never probes, never raises


def test_offline_mode_is_a_reason_but_leaves_the_cache_to_the_libraries(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    t0 = time.monotonic()
    assert "HF_HUB_OFFLINE" in hub_unreachable()
    require_hub("nobody-owns-this/not-a-model-xyz", "tokenizer")  # transformers answers from its cache, fast
    assert time.monotonic() - t0 < 1.0


def test_unreachable_endpoint_answers_within_the_timeout(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", *PROXY_VARS):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    t0 = time.monotonic()
    reason = hub_unreachable(timeout=2.0)
    assert reason is not None and "127.0.0.1" in reason
    assert time.monotonic() - t0 < 3.0
    with pytest.raises(HubUnreachable) as e:
        require_hub("nobody-owns-this/not-a-model-xyz", "tokenizer")
    msg = str(e.value)
    assert "not-a-model-xyz" in msg and "tokenizer" in msg and "HF_HUB_OFFLINE=1" in msg and "local" in msg


def test_reachable_endpoint_passes(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", *PROXY_VARS):
        monkeypatch.delenv(var, raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub_unreachable(timeout=2.0) is None
        require_hub("nobody-owns-this/not-a-model-xyz")


@pytest.fixture
def unreachable_hub(monkeypatch):
    """No offline mode, and a hub endpoint that refuses connections: what a user without network has."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", *PROXY_VARS):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")


def test_loaders_fail_in_seconds_on_an_unreachable_hub(unreachable_hub):
    from backend.config import load_prepare_config
    from backend.modeling import load_model, load_tokenizer
    from backend.sources import PrepareError, open_source

    t0 = time.monotonic()
    with pytest.raises(HubUnreachable, match="tokenizer 'nobody-owns-this/tok'"):
        load_tokenizer("nobody-owns-this/tok")
    with pytest.raises(HubUnreachable, match="pretrained.path 'nobody-owns-this/model'"):
        load_model("nobody-owns-this/model")
    cfg = load_prepare_config(
        {"output_path": "x", "dataset": {"path": "nobody-owns-this/data"}, "tokenizer": {"path": str(TINY_MODEL)}}
    )
    with pytest.raises(PrepareError, match="dataset.path 'nobody-owns-this/data'.*HF_HUB_OFFLINE=1"):
        open_source(cfg)
    from backend.documents import _load_tokenizer  # prepare's and the studio's tokenizer loader

    with pytest.raises(PrepareError, match="tokenizer.path 'nobody-owns-this/tok'.*HF_HUB_OFFLINE=1"):
        _load_tokenizer("nobody-owns-this/tok")
    assert time.monotonic() - t0 < 10


def test_studio_preview_of_a_hub_tokenizer_says_so_in_seconds(unreachable_hub):
    from backend import SAMPLE_DATA
    from studio import handlers as H

    t0 = time.monotonic()
    s = H.DataSettings(str(SAMPLE_DATA), "nobody-owns-this/tok", "auto", "", "", "all", True, "", "append")
    p = H.preview_sample(s, 0)
    assert time.monotonic() - t0 < 10
    assert "hub cannot be reached" in p.status and "nobody-owns-this/tok" in p.status


def test_training_checks_pass_the_fast_refusal_on(unreachable_hub):
    """compat caught (OSError, ValueError) and logged 'no tokenizer to compare', then read the config with
    minutes of retries: the refusal now reaches the user from both checks, in seconds."""
    from backend.compat import check_tokenizers_compatible, model_vocab
    from backend.modeling import load_tokenizer

    t0 = time.monotonic()
    with pytest.raises(HubUnreachable, match="^tokenizer 'nobody-owns-this/model' is not a local path"):
        check_tokenizers_compatible(load_tokenizer(TINY_MODEL), str(TINY_MODEL), "nobody-owns-this/model")
    with pytest.raises(HubUnreachable, match="^pretrained.path 'nobody-owns-this/model' is not a local path"):
        model_vocab("nobody-owns-this/model")
    assert time.monotonic() - t0 < 10


def test_behind_a_proxy_the_hub_is_not_probed_directly(unreachable_hub, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")
    assert hub_unreachable(timeout=1.0) is None
    require_hub("nobody-owns-this/not-a-model-xyz")  # the libraries go through the proxy


def test_a_local_model_without_a_readable_config_is_named(tmp_path):
    """model_vocab on a folder with no model config: the error names pretrained.path and the library's reason."""
    import re

    from backend.compat import model_vocab

    with pytest.raises(
        (OSError, ValueError), match=re.escape(f"pretrained.path {tmp_path}: could not read the model's config (")
    ):
        model_vocab(str(tmp_path))


def test_a_local_folder_without_a_tokenizer_is_named_with_the_librarys_reason(tmp_path):
    """prepare's and the studio's tokenizer loader on a folder that holds none: a PrepareError naming
    tokenizer.path, the folder and the library's error type, not a transformers traceback."""
    import re

    from backend.documents import _load_tokenizer
    from backend.sources import PrepareError

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(PrepareError) as e:
        _load_tokenizer(str(tmp_path))
    assert re.fullmatch(
        rf"tokenizer\.path: could not load tokenizer '{re.escape(str(tmp_path))}': \w+Error: .+", str(e.value), re.S
    )


def test_the_vocabulary_of_a_multimodal_model_is_its_text_models(tmp_path):
    """A vision-language checkpoint keeps the embedding rows in its text config: model_vocab reads them there."""
    from transformers import LlavaConfig

    from backend.compat import model_vocab

    LlavaConfig(text_config={"model_type": "llama", "vocab_size": 321}).save_pretrained(tmp_path)
    assert model_vocab(str(tmp_path)) == 321
