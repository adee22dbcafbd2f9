"""Conversations: what is trained (`Masking`), the errors, the sample types and `normalize_conversation`.

Part of `backend.chat` (import from there): ShareGPT ``from/value`` and OpenAI ``role/content`` rows become
``[{"role": "system"|"user"|"assistant", "content": str}]``; a bad row is a `ConversationError` naming the
message index and key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import NamedTuple


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

    def __post_init__(self):
        if self.mode not in ("auto", "delimiters"):
            raise ValueError(f"chat.masking.mode: {self.mode!r} is not one of 'auto', 'delimiters'")
        if self.train_on not in ("all", "last"):
            raise ValueError(f"chat.train_on: {self.train_on!r} is not one of 'all', 'last'")
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
}


# ------------------------------------------------------------------------------------------ conversations
_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
}


_COLUMNS = ("conversations", "messages")


def _content_text(content, i: int, key: str, role: str) -> str:
    if type(content) is str and content and not content.isspace():
        return content  # the common case, without building error context
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
        role = _ROLES.get(raw_role.lower() if isinstance(raw_role, str) else raw_role)
        if role is None:
            raise ConversationError(
                f"message {i}: {role_key!r} is {raw_role!r}, not a known role; use one of "
                "user/human, assistant/gpt/model, system (tool messages are not supported)"
            )
        out.append({"role": role, "content": _content_text(message[content_key], i, content_key, role)})
    return out


def _normalize_plain(obj) -> list[dict] | None:
    """`normalize_conversation`'s loop for the common case (dict messages, a known lower-case role, non-blank
    string content), same key precedence; None sends anything else through the full loop and its errors."""
    if not obj:
        return None
    out = []
    try:
        for message in obj:
            role = _ROLES.get(message["role"] if "role" in message else message["from"])
            content = message["content"] if "content" in message else message["value"]
            if role is None or type(content) is not str or not content or content.isspace():
                return None
            out.append({"role": role, "content": content})
    except (KeyError, TypeError):
        return None
    return out
