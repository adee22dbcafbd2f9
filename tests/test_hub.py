"""backend.hub: a hub id that cannot be reached fails in seconds, with what to do; local paths never probe."""

import socket
import time

import pytest

from backend import TINY_MODEL
from backend.hub import HubUnreachable, hub_unreachable, looks_like_hub_id, require_hub


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed once the socket is: connections are refused


def test_local_paths_are_not_hub_ids(tmp_path):
    assert not looks_like_hub_id(str(TINY_MODEL))
    assert not looks_like_hub_id(str(tmp_path))
    assert looks_like_hub_id("meta-llama/Llama-3.1-8B")
    require_hub(str(TINY_MODEL))  # never probes, never raises


def test_offline_mode_fails_at_once_and_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    with pytest.raises(HubUnreachable) as e:
        require_hub("nobody-owns-this/not-a-model-xyz", "tokenizer")
    assert time.monotonic() - t0 < 1.0
    msg = str(e.value)
    assert "HF_HUB_OFFLINE" in msg and "not-a-model-xyz" in msg and "local" in msg


def test_unreachable_endpoint_answers_within_the_timeout(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    t0 = time.monotonic()
    reason = hub_unreachable(timeout=2.0)
    assert reason is not None and "127.0.0.1" in reason
    assert time.monotonic() - t0 < 3.0
    with pytest.raises(HubUnreachable):
        require_hub("nobody-owns-this/not-a-model-xyz")


def test_reachable_endpoint_passes(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub_unreachable(timeout=2.0) is None
        require_hub("nobody-owns-this/not-a-model-xyz")
