"""Chat tab handlers: the models to chat with (exports and checkpoints) and a streamed reply (with tools)."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Any

from backend import TINY_MODEL
from studio.common import _load_once, _template_arg, get_tokenizer

# =============================================================================================== chat tab

_models: dict[tuple, Any] = {}


def chat_models(runs_dir: str) -> list[str]:
    """The base tiny model, then every export under the runs dir (HF model directories: full finetuning and LoRA's
    merged export; LoRA adapter directories ``export/<name>/adapter``) and every complete checkpoint, newest first:
    a stopped run has checkpoints but no export yet, and can still be tried."""
    found = []
    root = Path(runs_dir or "runs")
    if root.is_dir():
        for cfg in [*root.glob("**/config.json"), *root.glob("**/adapter_config.json")]:
            d = cfg.parent
            if any(d.glob("*.safetensors")) or any(d.glob("*.bin")):
                found.append(d)
        found += [marker.parent for marker in root.glob("**/checkpoints/step_*/COMPLETE")]
    found.sort(key=lambda d: d.stat().st_mtime, reverse=True)
    from studio.gguf_chat import gguf_files  # GGUF exports chat through llama.cpp (studio/gguf_chat.py)

    return [str(TINY_MODEL)] + [str(d) for d in found] + gguf_files(runs_dir)


def default_chat_model(models: list[str], current: str | None = None) -> str:
    """The model the Chat tab shows: the user's pick while it still exists, else the newest export (a run's
    ``export/<name>``: what finished training produced), else the newest checkpoint, else the base model.

    >>> default_chat_model(["tiny", "runs/a/checkpoints/step_4", "runs/a/export/final"])
    'runs/a/export/final'
    >>> default_chat_model(["tiny", "runs/a/export/final"], current="tiny")
    'tiny'
    """
    if current and current in models:
        return current
    exports = [m for m in models[1:] if "export" in Path(m).parts]
    return (exports or models[1:] or models)[0]


def get_model(path: str):
    """(model, tokenizer) for a model dir, loaded once per (path, mtime); imports torch/transformers lazily.
    A LoRA adapter dir loads its base (adapter_config.json's base_model_name_or_path) with the adapter on top."""

    def load(path):
        from backend.lora import load_for_inference

        if not (Path(path) / "config.json").exists() and not (Path(path) / "adapter_config.json").exists():
            from backend.inference import load_checkpoint_model  # a checkpoint: base config + its weights

            return load_checkpoint_model(path)
        model = load_for_inference(path)
        model.eval()
        tok_dir = path if (Path(path) / "tokenizer_config.json").exists() else str(TINY_MODEL)
        return model, get_tokenizer(tok_dir)

    return _load_once(_models, path, "model", load)


def chat_stream(
    model_path: str,
    history: list[dict],
    message: str,
    template_text: str = "",
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    tools_json: str = "",
    top_p: float = 1.0,
    system_prompt: str = "",
):
    """Yield the growing assistant reply for ``message`` after ``history`` (OpenAI-style message dicts).

    Uses the same chat template as the Data tab (``template_text``, or the tokenizer's own) with
    add_generation_prompt and ``tools_json`` (a JSON list of tool schemas, as prepare reads a row's ``tools``),
    and transformers' TextIteratorStreamer in a thread. Tool calls in the reply are shown as blocks
    (`tool_call_blocks`).
    """
    from backend.chat import normalize_tools, render_messages, resolve_template

    tools = normalize_tools(tools_json, "the tools box") if (tools_json or "").strip() else None

    messages = [{"role": "system", "content": system_prompt.strip()}] if (system_prompt or "").strip() else []
    messages += [{"role": m["role"], "content": _text_of(m["content"])} for m in history or []]
    messages.append({"role": "user", "content": message})
    if str(model_path).endswith(".gguf"):  # llama.cpp, with the template and stop tokens stored in the GGUF
        from studio.gguf_chat import gguf_chat_stream

        yield from gguf_chat_stream(model_path, messages, max_new_tokens, temperature, top_p, tools)
        return
    model, tok = get_model(model_path)
    from transformers import TextIteratorStreamer

    template = resolve_template(tok, _template_arg(template_text, tok))
    prompt = render_messages(messages, tok, template, add_generation_prompt=True, tools=tools)
    enc = tok(prompt, add_special_tokens=not (tok.bos_token and prompt.startswith(tok.bos_token)), return_tensors="pt")
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    from backend.chat import eot_token_ids

    kwargs = dict(
        **enc,
        max_new_tokens=int(max_new_tokens),
        streamer=streamer,
        use_cache=True,
        eos_token_id=eot_token_ids(tok, template) or None,
        pad_token_id=tok.pad_token_id or 0,
    )
    if temperature and temperature > 0:
        kwargs.update(do_sample=True, temperature=float(temperature), top_p=float(top_p))
    else:
        kwargs.update(do_sample=False)
    thread = threading.Thread(target=model.generate, kwargs=kwargs, daemon=True)
    thread.start()
    reply = ""
    for piece in streamer:
        reply += piece
        yield tool_call_blocks(reply)
    thread.join()


_CALL_RES = (
    re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S),  # Hermes, Qwen2.5/3
    re.compile(r"\[TOOL_CALLS\]\s*(\[.*?\])(?=\s*(?:</s>|$))", re.S),  # Mistral
    re.compile(r"<\|tool_call>(.*?)(?:<tool_call\|>|$)", re.S),  # Gemma 4
)


def tool_call_blocks(reply: str) -> str:
    """A reply with its tool calls shown as blocks: the formats of the tool templates the tests cover (Hermes
    ``<tool_call>``, Mistral ``[TOOL_CALLS]``, Gemma 4 ``<|tool_call>``, and a whole reply that is one JSON call as
    Llama 3.1 writes it). Other text is left as it is.

    >>> print(tool_call_blocks('Let me look.<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>'))
    Let me look.
    🔧 **tool call**
    ```json
    {"name": "f", "arguments": {"x": 1}}
    ```
    <BLANKLINE>
    """
    for pattern in _CALL_RES:
        if pattern.search(reply):
            return pattern.sub(lambda m: f"\n🔧 **tool call**\n```json\n{m.group(1).strip()}\n```\n", reply)
    stripped = reply.strip()
    if stripped.startswith("{") and stripped.endswith("}"):
        try:
            call = json.loads(stripped)
        except ValueError:
            return reply
        if isinstance(call, dict) and "name" in call and ({"arguments", "parameters"} & call.keys()):
            return f"🔧 **tool call**\n```json\n{stripped}\n```"
    return reply


def _text_of(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # gradio 6 message content may be a list of parts
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    if isinstance(content, dict):
        return str(content.get("text", ""))
    return str(content)
