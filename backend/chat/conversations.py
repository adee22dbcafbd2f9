"""Conversations: what is trained (`Masking`), the errors, the sample types and `normalize_conversation`.

Part of `backend.chat` (import from there): ShareGPT ``from/value`` and OpenAI ``role/content`` rows become
``[{"role": "system"|"user"|"assistant", "content": str}]``; a bad row is a `ConversationError` naming the
message index and key.

Agent traces become the same list of `Message` dicts, with the fields Hugging Face chat templates read by their
usual names: ``tool_calls`` (``[{"id", "type": "function", "function": {"name", "arguments": dict}}]``) on an
assistant message, ``role: "tool"`` with ``tool_call_id`` / ``name`` for a tool result, ``reasoning_content`` (and
the same text as ``thinking``, the name gpt-oss-style templates read) on an assistant message. Accepted forms:
OpenAI ``tool_calls`` (arguments a dict or a JSON string) and ``tool`` messages; ShareGPT ``function_call`` /
``observation`` turns (Glaive, Hermes, LLaMA-Factory); reasoning as ``reasoning_content``, ``reasoning`` or
``thinking``, or inline ``<think>...</think>`` at the start of a reply. A row's ``tools`` (a list or a JSON
string; OpenAI ``{"type": "function", "function": {...}}`` or bare ``{"name", "description", "parameters"}``)
become `normalize_tools`'s list, passed to the template as ``tools=``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import NamedTuple, TypedDict


# --------------------------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class Masking:
    """What is trained. ``Masking()`` = automatic span finding, all assistant turns, end-of-turn trained."""

    mode: str = "auto"  # "auto" | "delimiters"
    start_delimiter: str | None = None
    end_delimiter: str | None = None
    train_on: str = "all"  # "all" assistant turns | "last"
    train_on_eot: bool = True  # train the end-of-turn marker after each assistant reply
    final_eot: str = "append"  # a final reply the template leaves open: "append" its between-turns marker | "leave"
    train_on_tool_calls: bool = True  # train assistant turns that call tools (agent traces)
    reasoning: str = "as_rendered"  # "as_rendered": train what the template writes | "every_turn": see backend.split

    def __post_init__(self):
        if self.mode not in ("auto", "delimiters"):
            raise ValueError(f"chat.masking.mode: {self.mode!r} is not one of 'auto', 'delimiters'")
        if self.train_on not in ("all", "last"):
            raise ValueError(f"chat.train_on: {self.train_on!r} is not one of 'all', 'last'")
        if self.reasoning not in ("as_rendered", "every_turn"):
            raise ValueError(f"chat.reasoning: {self.reasoning!r} is not one of 'as_rendered', 'every_turn'")
        if self.final_eot not in ("append", "leave"):
            raise ValueError(f"chat.final_eot: {self.final_eot!r} is not one of 'append', 'leave'")
        if self.mode == "delimiters":
            for name in ("start_delimiter", "end_delimiter"):
                value = getattr(self, name)
                if not isinstance(value, str) or value == "":
                    raise ValueError(
                        f"chat.masking.{name}: must be a non-empty string in mode 'delimiters' (got {value!r}); "
                        "e.g. start '<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n', end '<|eot_id|>'"
                    )


_DEFAULT_MASKING = Masking()


class ChatError(ValueError):
    """Base class: a row that cannot be rendered (bad conversation or template)."""


class ConversationError(ChatError):
    """A conversation is malformed. The message names the message index, the key and what to do."""


class TemplateError(ChatError):
    """The chat template cannot be loaded, raised an error, or does not write a reply verbatim where it must."""


class TemplateCapabilityError(RuntimeError):
    """The chat template cannot write what the data holds (tools, tool calls, tool results): no row of this kind
    can be rendered with it, so it stops a prepare with one message instead of skipping every row."""


class RenderProofError(RuntimeError):
    """A template proven content-independent rendered a row differently from the substitution: a bug in the
    proof. Not a `ChatError` on purpose: it must stop a prepare, not be skipped as one bad row."""


class AssistantTurn(NamedTuple):
    """One assistant reply in the rendered text: ``text[begin:content_end]`` is the reply as rendered,
    ``text[content_end:end]`` its end-of-turn marker (empty when the template writes none). Immutable (a
    NamedTuple: built for every turn of every row, several times cheaper than a frozen dataclass)."""

    message_index: int
    begin: int
    content_end: int
    end: int


class ToolCall(TypedDict, total=False):
    id: str  # the call id a tool result refers to (absent when the data has none)
    type: str  # "function"
    function: dict  # {"name": str, "arguments": dict}


class Message(TypedDict, total=False):
    """One normalized message, as chat templates read it. Only ``role`` and ``content`` are always present."""

    role: str  # "system" | "user" | "assistant" | "tool"
    content: str  # may be "" for an assistant message that only calls tools or only reasons
    tool_calls: list[ToolCall]  # assistant
    reasoning_content: str  # assistant: its reasoning trace (also given as "thinking")
    thinking: str
    tool_call_id: str  # tool
    name: str  # tool: the function whose result this is


@dataclass
class RenderedSample:
    text: str
    trained_spans: list[tuple[int, int]]  # half-open character ranges that ARE trained
    loss_masking_spans: list[tuple[int, int]]  # inclusive character spans NOT trained (guide convention)
    problems: list[str]  # "code: message", e.g. "span_not_found: start delimiter not found"
    turns: list[AssistantTurn] = field(default_factory=list)  # every assistant turn found (trained or not)
    messages: list[dict] = field(default_factory=list)  # the normalized conversation
    # half-open ranges of text NOT written by the template: the between-turns marker appended after a final reply
    # the template leaves open (chat.final_eot: append); trained, and shown apart in the studio
    appended: list[tuple[int, int]] = field(default_factory=list)
    tools: list[dict] | None = None  # the row's tool schemas as passed to the template (agent traces)
    # agent traces: half-open character ranges of tool results and of reasoning as rendered (the studio colours
    # them), and per assistant turn (message index) whether its reasoning is written in the text
    tool_result_spans: list[tuple[int, int]] = field(default_factory=list)
    reasoning_spans: list[tuple[int, int]] = field(default_factory=list)
    reasoning_rendered: dict[int, bool] = field(default_factory=dict)


PROBLEM_CODES = {
    "no_trained_tokens": "nothing in the sample is trained",
    "eot_not_trained": "an assistant turn's end-of-turn marker is not trained (the model never learns to stop)",
    "eot_undecided": "the template's end-of-turn marker after a reply could not be decided: none is trained there",
    "span_not_found": "no assistant span was found",
    "too_long": "longer than sequence_length: skipped when truncate_documents is no",
    "assistant_cut": "an assistant turn crosses sequence_length",
    "special_text_in_content": "message text contains a special-token string, which tokenizes as that token",
    "end_delimiter_missing": "an assistant turn has no end delimiter: trained to the end of the text",
    "delimiter_in_content": "a message contains delimiter text: the delimiter spans may not follow the turns",
    "turn_count_mismatch": "the number of trained spans differs from the number of assistant messages",
    "content_not_verbatim": "the template rewrote a reply: the whole turn window was trained",
    "bad_conversation": "the row could not be rendered",
    "reasoning_dropped": "the template drops the reasoning of an assistant turn (chat.reasoning: every_turn keeps it)",
}


# ------------------------------------------------------------------------------------------ conversations
_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
    "tool": "tool",
    "ipython": "tool",
    "observation": "tool",
    "function": "tool",
    "function_call": "assistant",
}
_PLAIN_ROLES = {k: v for k, v in _ROLES.items() if v != "tool" and k != "function_call"}
_TOOL_KEYS = ("tool_calls", "function_call", "reasoning_content", "reasoning", "thinking", "tool_call_id", "name")


_COLUMNS = ("conversations", "messages")


def _content_text(content, i: int, key: str, role: str, may_be_empty: bool = False) -> str:
    if type(content) is str and content and not content.isspace():
        return content  # the common case, without building error context
    if may_be_empty and (content is None or content == "" or content == []):
        return ""
    where = f"message {i} ({role})"
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if isinstance(part, str):
                texts.append(part)
                continue
            if (
                not isinstance(part, dict)
                or part.get("type", "text") != "text"
                or not isinstance(part.get("text"), str)
            ):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ConversationError(
                    f"{where}: {key!r} part {j} is of type {kind!r}; only text parts "
                    "({'type': 'text', 'text': ...}) are supported. Drop non-text parts or convert them to text."
                )
            texts.append(part["text"])
        content = "".join(texts)
    if content is None:
        raise ConversationError(f"{where}: {key!r} is null; give the message text as a string")
    if not isinstance(content, str):
        raise ConversationError(
            f"{where}: {key!r} must be a string, got {type(content).__name__}; give the message text as a string"
        )
    if not content.strip():
        raise ConversationError(f"{where}: {key!r} is empty; remove the message or fill in its text")
    return content


def normalize_conversation(obj, field: str | None = None) -> list[dict]:
    """Any supported conversation shape -> ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``.

    Accepts a list of messages, or a row dict holding them in ``field`` / ``"conversations"`` / ``"messages"``.
    Messages may be ShareGPT (``{"from": "human", "value": "Hi"}``; from: human/user, gpt/assistant/model,
    system) or OpenAI (``{"role": "user", "content": "Hi"}``; content may be a list of text parts).

    >>> normalize_conversation({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]})
    [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Yo'}]
    """
    if isinstance(obj, dict) and not ({"role", "from"} & obj.keys()):
        names = (field,) if field else _COLUMNS
        for name in names:
            if name in obj:
                obj = obj[name]
                break
        else:
            raise ConversationError(
                f"row has no {' or '.join(repr(n) for n in names)} column (columns: {sorted(obj)[:12]}); "
                "set dataset.conversations_field to the column that holds the messages"
            )
    if isinstance(obj, str):
        try:
            obj = json.loads(obj)
        except ValueError:
            raise ConversationError("conversation is a string that is not JSON; give a list of messages") from None
    if not isinstance(obj, (list, tuple)):
        raise ConversationError(f"conversation must be a list of messages, got {type(obj).__name__}")
    if len(obj) == 0:
        raise ConversationError("conversation is empty; give at least one user and one assistant message")
    out = _normalize_plain(obj)
    if out is not None:
        return out
    out = []
    for i, message in enumerate(obj):
        if not isinstance(message, dict):
            raise ConversationError(f"message {i}: must be a dict with 'role'/'content' or 'from'/'value'")
        role_key = "role" if "role" in message else "from" if "from" in message else None
        if role_key is None:
            raise ConversationError(
                f"message {i}: missing key 'role' (OpenAI form: 'role' + 'content') or 'from' (ShareGPT form: "
                f"'from' + 'value'); keys present: {sorted(message)}"
            )
        content_key = "content" if "content" in message else "value" if "value" in message else None
        if content_key is None:
            want = "value" if role_key == "from" else "content"
            raise ConversationError(f"message {i}: missing key {want!r}; keys present: {sorted(message)}")
        raw_role = message[role_key]
        raw_role = raw_role.lower() if isinstance(raw_role, str) else raw_role
        role = _ROLES.get(raw_role)
        if role is None:
            raise ConversationError(
                f"message {i}: {role_key!r} is {raw_role!r}, not a known role; use one of "
                "user/human, assistant/gpt/model, system, tool/observation/ipython, function_call"
            )
        if raw_role == "function_call":  # ShareGPT function calling: the value is the call (or a list of calls)
            out.append({"role": "assistant", "content": "", "tool_calls": _function_call_value(message, i)})
            continue
        content = message[content_key]
        if role == "tool" and isinstance(content, (dict, list)) and not _is_text_parts(content):
            content = json.dumps(content, ensure_ascii=False)  # a structured tool result, as JSON text
        agent = role == "tool" or (role == "assistant" and any(k in message for k in _TOOL_KEYS))
        m: dict = {"role": role, "content": _content_text(content, i, content_key, role, may_be_empty=agent)}
        if role == "assistant":
            _assistant_fields(m, message, i)
        elif role == "tool":
            _tool_fields(m, message, out)
        out.append(m)
    return out


def _is_text_parts(content) -> bool:
    return isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content)


def _arguments(raw, where: str) -> dict:
    """A call's arguments as a dict: a dict as is, a JSON string parsed (templates write them with ``tojson``).

    >>> _arguments('{"city": "Oslo"}', "message 1")
    {'city': 'Oslo'}
    """
    if raw is None:
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw) if raw.strip() else {}
        except ValueError:
            raise ConversationError(
                f"{where}: 'arguments' is a string that is not JSON ({raw[:60]!r}); give a dict or a JSON object"
            ) from None
    if not isinstance(raw, dict):
        raise ConversationError(
            f"{where}: 'arguments' must be a dict (or a JSON object string), got {type(raw).__name__}"
        )
    return raw


def _tool_call(raw, where: str) -> dict:
    """One call in OpenAI form (``{"function": {"name", "arguments"}}``) or flat (``{"name", "arguments"}``)."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            raise ConversationError(f"{where}: the call is a string that is not JSON ({raw[:60]!r})") from None
    if not isinstance(raw, dict):
        raise ConversationError(f"{where}: a tool call must be a dict, got {type(raw).__name__}")
    fn = raw.get("function", raw)
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ConversationError(f"{where}: the call has no function name ('function': {{'name': ...}})")
    args = fn.get("arguments", fn.get("parameters"))
    call = {"type": "function", "function": {"name": fn["name"], "arguments": _arguments(args, where)}}
    if raw.get("id"):
        call["id"] = str(raw["id"])
    return call


def _function_call_value(message: dict, i: int) -> list[dict]:
    value = message.get("value", message.get("content"))
    where = f"message {i} (function_call)"
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ConversationError(
                f"{where}: the value is not JSON; give the call as {{'name': ..., 'arguments': {{...}}}}"
            ) from None
    calls = value if isinstance(value, list) else [value]
    if not calls:
        raise ConversationError(f"{where}: the value holds no call")
    return [_tool_call(c, f"{where} call {j}") for j, c in enumerate(calls)]


def split_think(content: str) -> tuple[str, str] | None:
    """Inline reasoning at the start of a reply: ``(reasoning, reply)``, or None when there is none.

    >>> split_think("<think>\\nadd 2 and 2\\n</think>\\n\\nIt is 4.")
    ('add 2 and 2', 'It is 4.')
    """
    head = content.lstrip()
    if not head.startswith("<think>"):
        return None
    close = head.find("</think>")
    if close < 0:
        return None
    return head[len("<think>") : close].strip(), head[close + len("</think>") :].lstrip()


def _assistant_fields(m: dict, message: dict, i: int) -> None:
    calls = message.get("tool_calls")
    if calls is None and message.get("function_call") is not None:
        calls = [message["function_call"]]  # the older OpenAI form
    if calls:
        if not isinstance(calls, list):
            raise ConversationError(f"message {i} (assistant): 'tool_calls' must be a list of calls")
        m["tool_calls"] = [_tool_call(c, f"message {i} (assistant) tool call {j}") for j, c in enumerate(calls)]
    reasoning = next(
        (message[k] for k in ("reasoning_content", "reasoning", "thinking") if isinstance(message.get(k), str)), None
    )
    if reasoning is None:
        inline = split_think(m["content"])
        if inline is not None:
            reasoning, m["content"] = inline
    if reasoning is not None and reasoning.strip():
        m["reasoning_content"] = m["thinking"] = reasoning.strip()
    if not m["content"].strip() and not m.get("tool_calls") and "reasoning_content" not in m:
        raise ConversationError(f"message {i} (assistant): the reply is empty (no text, no tool call, no reasoning)")


def _tool_fields(m: dict, message: dict, before: list[dict]) -> None:
    """A tool result's ``tool_call_id`` and ``name``; a missing name is taken from the call it answers."""
    call_id = message.get("tool_call_id")
    name = message.get("name")
    if not name:
        calls = [c for prev in reversed(before) if prev["role"] == "assistant" for c in prev.get("tool_calls", ())]
        match = [c for c in calls if call_id and c.get("id") == call_id] or calls[:1]
        name = match[0]["function"]["name"] if match else None
    if call_id:
        m["tool_call_id"] = str(call_id)
    if name:
        m["name"] = str(name)


def normalize_tools(raw, where: str = "row") -> list[dict] | None:
    """A row's ``tools``: None/empty -> None; a list (or JSON string of one) -> OpenAI-form tool schemas.

    >>> normalize_tools('[{"name": "f", "description": "d", "parameters": {}}]')
    [{'type': 'function', 'function': {'name': 'f', 'description': 'd', 'parameters': {}}}]
    """
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            raise ConversationError(
                f"{where}: 'tools' is a string that is not JSON; give a list of tool schemas"
            ) from None
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, (list, tuple)):
        raise ConversationError(f"{where}: 'tools' must be a list of tool schemas, got {type(raw).__name__}")
    out = []
    for j, t in enumerate(raw):
        if isinstance(t, str):
            try:
                t = json.loads(t)
            except ValueError:
                raise ConversationError(f"{where}: tool {j} is a string that is not JSON") from None
        if not isinstance(t, dict):
            raise ConversationError(f"{where}: tool {j} must be a dict, got {type(t).__name__}")
        fn = t.get("function", t)
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ConversationError(
                f"{where}: tool {j} has no 'name' (OpenAI form: {{'type': 'function', "
                "'function': {'name', 'description', 'parameters'}}})"
            )
        out.append(t if "function" in t else {"type": "function", "function": fn})
    return out or None


def is_agent(messages: list[dict], tools) -> bool:
    """Whether a normalized conversation needs the agent path (tools, tool calls, tool results or reasoning)."""
    return bool(tools) or any(len(m) > 2 or m["role"] == "tool" for m in messages)


def _normalize_plain(obj) -> list[dict] | None:
    """`normalize_conversation`'s loop for the common case (dict messages, a known lower-case role, non-blank
    string content), same key precedence; None sends anything else through the full loop and its errors."""
    if not obj:
        return None
    out = []
    try:
        for message in obj:
            if len(message) > 2:  # tool calls, reasoning, a name...: the full loop
                return None
            role = _PLAIN_ROLES.get(message["role"] if "role" in message else message["from"])
            content = message["content"] if "content" in message else message["value"]
            if role is None or type(content) is not str or not content or content.isspace():
                return None
            if role == "assistant" and "<think>" in content[:64] and content.lstrip().startswith("<think>"):
                return None  # inline reasoning: the full loop splits it off
            out.append({"role": role, "content": content})
    except (KeyError, TypeError):
        return None
    return out
