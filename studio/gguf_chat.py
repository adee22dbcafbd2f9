"""Chat with a GGUF through llama.cpp (llama-cpp-python): a fast, CPU-friendly way to try an exported model.

    for reply in gguf_chat_stream("runs/x/export/final/gguf/model-q8_0.gguf", history, "hi"): ...

The GGUF carries the chat template and the end-of-turn token it was exported with (backend/gguf.py), so the
reply is rendered and stopped by llama.cpp exactly as llama.cpp-based servers (Ollama, LM Studio) will.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_llms: dict[tuple, Any] = {}


def gguf_files(runs_dir: str) -> list[str]:
    """The GGUF files of every export under ``runs_dir`` (export/<name>/gguf/*.gguf), newest first."""
    root = Path(runs_dir or "runs")
    found = list(root.glob("**/export/*/gguf/*.gguf")) if root.is_dir() else []
    return [str(p) for p in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]


def get_llm(path: str):
    """A llama_cpp.Llama for ``path``, loaded once per (path, mtime)."""
    key = (path, Path(path).stat().st_mtime)
    if key not in _llms:
        import llama_cpp

        _llms.clear()
        _llms[key] = llama_cpp.Llama(path, n_ctx=2048, verbose=False)
    return _llms[key]


def gguf_chat_stream(
    path: str,
    messages: list[dict],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    tools: list[dict] | None = None,
):
    """Yield the growing assistant reply to OpenAI-style ``messages`` (the last one the user's), sampled with
    ``temperature`` / ``top_p`` as the transformers path is, and the ``tools`` schemas handed to the GGUF's template.
    """
    llm = get_llm(path)
    reply = ""
    stream = llm.create_chat_completion(
        messages,
        max_tokens=int(max_new_tokens),
        temperature=float(temperature),
        top_p=float(top_p),
        tools=tools or None,
        stream=True,
    )
    for chunk in stream:
        reply += chunk["choices"][0]["delta"].get("content") or ""
        yield reply
