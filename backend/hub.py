"""Can the Hugging Face hub be reached? Answer in seconds, never after minutes of retries.

transformers retries an unreachable hub for minutes before it fails (FACTS.md: a hub id typed in the studio while
offline left a view "processing" for 209 s). Every place that is about to resolve a name that is not a local path (a
model, tokenizer, config or dataset id) calls :func:`require_hub` first: a local path passes; offline mode
(``HF_HUB_OFFLINE=1`` and friends) passes, because the libraries then answer from their cache at once; a reachable hub
passes; otherwise it raises :class:`HubUnreachable` at once, with what to do.

>>> looks_like_hub_id("meta-llama/Llama-3.1-8B"), looks_like_hub_id("gpt2"), looks_like_hub_id("./runs/x")
(True, True, False)
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

_TRUE = {"1", "true", "yes", "on"}
_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_cache: dict[str, tuple[float, str | None]] = {}  # endpoint -> (when probed, reason)
_CACHE_S = 30.0


class HubUnreachable(ValueError):
    """A hub id was asked for and the hub cannot be reached (or offline mode is set); the message says what to do."""


def looks_like_hub_id(name: str) -> bool:
    """True for ``owner/name`` or ``name`` that is not an existing local path (and has no path-like prefix)."""
    name = str(name)
    if not name or Path(name).expanduser().exists() or name.startswith((".", "/", "~")):
        return False
    return bool(_ID.match(name))


def offline_mode() -> str | None:
    """The environment variable that puts the hub libraries in offline mode, if one is set."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return var
    return None


def _endpoint() -> tuple[str, int]:
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """None when the hub answers a TCP connection within ``timeout`` seconds; else a one-line reason.

    The probe runs in a daemon thread so that a slow DNS lookup cannot hold the caller past ``timeout``; the answer is
    cached for 30 s per endpoint.
    """
    var = offline_mode()
    if var:
        return f"{var} is set (offline mode)"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # behind a proxy a direct connection proves nothing: let the libraries go through the proxy
    host, port = _endpoint()
    key = f"{host}:{port}"
    hit = _cache.get(key)
    if hit and time.monotonic() - hit[0] < _CACHE_S:
        return hit[1]
    answer: list[str | None] = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            answer.append(None)
        except OSError as e:
            answer.append(f"cannot connect to {key} ({e.__class__.__name__}: {e})")

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout + 0.5)
    reason = answer[0] if answer else f"no answer from {key} within {timeout:g} s"
    _cache[key] = (time.monotonic(), reason)
    return reason


def in_cache(repo_id: str, filename: str = "config.json") -> bool:
    """True when ``filename`` of ``repo_id`` is already in the local hub cache (usable offline)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return False
    try:
        return isinstance(try_to_load_from_cache(repo_id, filename), str)
    except Exception:  # a malformed id: let the caller's own loader name the problem
        return False


def require_hub(name: str, what: str = "model", timeout: float = 3.0) -> None:
    """Raise :class:`HubUnreachable` at once when ``name`` must come from a hub that cannot be reached.

    Passes for a local path, for anything that is not shaped like a hub id (the caller's loader reports it), in
    offline mode (the libraries then read their cache without a network call, and fail fast themselves), and when
    the hub answers. A cached id while the hub is unreachable is refused too: without offline mode the libraries
    would retry the network for minutes before falling back to the cache, so the message says to set it.
    """
    if not looks_like_hub_id(name) or offline_mode():
        return
    reason = hub_unreachable(timeout)
    if reason is None:
        return
    cached = " It is in the local hub cache: set HF_HUB_OFFLINE=1 to use that copy." if in_cache(name) else ""
    raise HubUnreachable(
        f"{what} {name!r} is not a local path and the Hugging Face hub cannot be reached ({reason}).{cached} "
        f"Work offline with a local copy: give the path of a directory saved with save_pretrained (or a hub "
        f"snapshot copied onto this machine), or set HF_HUB_OFFLINE=1 to use the hub cache (HF_HOME)."
    )
