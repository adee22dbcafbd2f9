"""Conversations -> rendered chat text + trained character spans -> token ids + per-token trained mask.

This module is the single source of truth for WHAT IS TRAINED: the studio preview, `backend.prepare` and the
notebooks all call `render()` then `tokenize()`.

Pipeline, for one ShareGPT row::

    row = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}
    sample = render(row, tokenizer)                 # Masking() = automatic span finding
    sample.text            # '<|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n...Hi<|eot_id|>
                           #  <|start_header_id|>assistant<|end_header_id|>\\n\\nHello!<|eot_id|>'
    sample.trained_spans   # [(k, k + 16)]  -> text[k:k+16] == 'Hello!<|eot_id|>'   (half-open)
    sample.loss_masking_spans  # [(0, k - 1)]  inclusive spans NOT trained (the guide's convention)
    tok = tokenize(sample.text, sample.trained_spans, tokenizer)
    tok.input_ids          # (T,) int64, BOS exactly once
    tok.trained            # (T,) bool, True for the tokens of 'Hello!' and '<|eot_id|>'

Masking modes (`Masking`):
- ``auto`` (default). The reply of assistant message k is located in the FINAL rendering: from transformers'
  ``{% generation %}`` blocks when the template has them; else right after ``pre = render(msgs[:k],
  add_generation_prompt=True)`` when ``pre`` is a prefix of the final text (the *prefix diff*); else (templates
  that move the system prompt, add ``<think>\n`` in the generation prompt, drop reasoning from earlier turns)
  verbatim in the full rendering, in order (`_auto_turns`). A reply not written verbatim there is a
  `TemplateError` naming the message and what differs: we refuse to guess. The reply is followed by its
  *end-of-turn marker*, read from the template itself (`_eot`): the text it writes after a reply whatever comes
  next, cut where one of its output pieces ends (``<|end|><|user|>`` trains ``<|end|>``), without trailing
  whitespace. Header residue, the next turn's opening and whitespace after the marker are never trained; a marker
  that cannot be decided is not trained and reported (``eot_undecided``).
- ``delimiters``: the guide's ``get_spans`` semantics (mask from the start of the text through each start
  delimiter; train from there through and including the end delimiter), with its hangs fixed (see
  `get_spans`).

Options: ``train_on="all"|"last"`` assistant turns; ``train_on_eot`` trains the end-of-turn marker (default on:
a model that never sees its end-of-turn token as a target never learns to stop); ``final_eot``: a final reply the
template leaves open (it writes its marker only before a following message) gets that marker appended right
after it and trained (``"append"``, recorded in ``RenderedSample.appended``) or stays open (``"leave"``).

Token rule (`tokenize`): a token is trained iff its character range overlaps a trained character range
(``start < span_end and end > span_start``). A token that straddles a boundary (e.g. a merged ``"\\n\\n"`` that
ends a header and starts a reply) is therefore trained. Zero-width tokens (an added BOS) are never trained.
``trained[t]`` marks tokens that are TARGETS (labels); the model shifts labels internally.

BOS: if the text already starts with the tokenizer's BOS string (Llama 3.1, Gemma, Mistral templates write it),
the text is tokenized with ``add_special_tokens=False`` (no double BOS). If the tokenizer's post-processor would
add a BOS and the text lacks it, one BOS id is prepended. Nothing else is added at tokenization: the end-of-turn
marker (the template's, or the appended one) is the end of the document.
"""

from __future__ import annotations

import json
import os
import re
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import accumulate, chain
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "Masking",
    "ChatError",
    "ConversationError",
    "TemplateError",
    "RenderProofError",
    "AssistantTurn",
    "RenderedSample",
    "TokenizedSample",
    "HealthReport",
    "normalize_conversation",
    "resolve_template",
    "render_messages",
    "render",
    "render_fast_path",
    "get_spans",
    "spans_from_loss_masking",
    "loss_masking_from_spans",
    "tokenize",
    "tokenize_batch",
    "check_sample",
    "PortableTokenizer",
    "portable_spec",
    "check_dataset",
    "eot_token_ids",
    "PROBLEM_CODES",
]


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


class TokenizedSample:
    """Token ids + per-token trained mask of one text. ``offsets`` ((T, 2) int64 char offsets into the text,
    (0, 0) for an added BOS) are built on first use when the sample came from the fast path of
    `tokenize_batch`/prepare, which computes the mask without materializing them."""

    __slots__ = ("input_ids", "trained", "_offsets", "_encoding", "_bos_added")

    def __init__(
        self,
        input_ids: np.ndarray,
        trained: np.ndarray,
        offsets: np.ndarray | None = None,
        *,
        encoding=None,
        bos_added: bool = False,
    ):
        if offsets is None and encoding is None:
            raise ValueError("TokenizedSample needs offsets or the tokenizers Encoding they come from")
        self.input_ids = input_ids  # (T,) int64, BOS exactly once, never doubled
        self.trained = trained  # (T,) bool: this token is a training TARGET (a label), before shifting
        self._offsets = offsets
        self._encoding = encoding
        self._bos_added = bos_added

    @property
    def offsets(self) -> np.ndarray:
        if self._offsets is None:
            off = np.asarray(self._encoding.offsets, dtype=np.int64).reshape(-1, 2)
            if self._bos_added:
                off = np.concatenate([np.zeros((1, 2), np.int64), off])
            self._offsets = off
        return self._offsets

    @property
    def n_trained(self) -> int:
        return int(self.trained.sum())

    def __repr__(self):
        return f"TokenizedSample({len(self.input_ids)} tokens, {self.n_trained} trained)"


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


# ----------------------------------------------------------------------------------------------- templates
def resolve_template(tokenizer, chat_template: str | None = None) -> str:
    """The Jinja source to use: ``chat_template`` (a Jinja string or a file path) or the tokenizer's own."""
    if chat_template is None:
        chat_template = getattr(tokenizer, "chat_template", None)
        if isinstance(chat_template, dict):
            chat_template = chat_template.get("default")
        if not chat_template:
            raise TemplateError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; set chat.template "
                "to a Jinja string or a .jinja file"
            )
        return chat_template
    if not isinstance(chat_template, str) or not chat_template.strip():
        raise TemplateError("chat.template must be a non-empty Jinja string or a file path")
    if "{" not in chat_template and "\n" not in chat_template:
        if not os.path.isfile(chat_template):
            raise TemplateError(f"chat.template: file {chat_template!r} does not exist (and it is not a Jinja string)")
        with open(chat_template, encoding="utf-8") as f:
            return f.read()
    return chat_template


_compiled_cache: dict[str, Any] = {}


def _compile(template: str):
    """Compile once per template source; Jinja syntax errors become a `TemplateError` with the line."""
    compiled = _compiled_cache.get(template)
    if compiled is None:
        import jinja2
        from transformers.utils.chat_template_utils import _compile_jinja_template

        try:
            compiled = _compile_jinja_template(template)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"chat template has a Jinja syntax error at line {e.lineno}: {e.message}") from None
        if len(_compiled_cache) > 64:
            _compiled_cache.clear()
        _compiled_cache[template] = compiled
    return compiled


def _template_kwargs(tokenizer) -> dict:
    # apply_chat_template passes the special tokens (bos_token, eos_token, ...) as template variables
    return _info(tokenizer)["kwargs"]


def render_messages(messages: list[dict], tokenizer, template: str, add_generation_prompt=False) -> str:
    """Render normalized messages with a Jinja template, exactly like ``apply_chat_template(tokenize=False)``
    but without its per-call overhead (messages are already plain dicts of strings)."""
    import jinja2

    compiled = _compile(template)
    try:
        return compiled.render(
            messages=messages,
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **_template_kwargs(tokenizer),
        )
    except jinja2.TemplateError as e:
        roles = "/".join(m["role"] for m in messages)
        raise TemplateError(f"chat template rejected the conversation (roles {roles}): {e}") from None
    except Exception as e:  # a template bug (e.g. indexing an empty list): still not a Jinja-internals traceback
        raise TemplateError(f"chat template failed on the conversation: {type(e).__name__}: {e}") from None


def _render_generation(messages, tokenizer, template) -> tuple[str, list[tuple[int, int]]]:
    """Render with ``{% generation %}`` tracking: (text, char ranges of the generation blocks)."""
    import jinja2
    from transformers.utils.chat_template_utils import _render_with_assistant_indices

    try:
        return _render_with_assistant_indices(
            _compile(template), messages, None, None, False, **_template_kwargs(tokenizer)
        )
    except jinja2.TemplateError as e:
        raise TemplateError(f"chat template rejected the conversation: {e}") from None


_GENERATION_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")
_generation_cache: dict[str, bool] = {}


def _has_generation(template: str) -> bool:
    """Whether the template marks replies with ``{% generation %}`` (cached: `render` asks for every row)."""
    found = _generation_cache.get(template)
    if found is None:
        if len(_generation_cache) > 64:
            _generation_cache.clear()
        found = _generation_cache[template] = bool(_GENERATION_RE.search(template))
    return found


# ------------------------------------------------------------------------------------ per-tokenizer facts
_info_cache: weakref.WeakKeyDictionary[Any, dict] = weakref.WeakKeyDictionary()


def _info(tokenizer) -> dict:
    """Facts about a tokenizer computed once: special-token regex, template kwargs, whether it adds BOS."""
    try:
        info = _info_cache.get(tokenizer)
    except TypeError:
        info = None
    if info is not None:
        return info
    specials = set(tokenizer.all_special_tokens)
    for tok in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(tok, "special", False):
            specials.add(str(tok.content if hasattr(tok, "content") else tok))
    specials.discard("")
    specials_sorted = sorted(specials, key=len, reverse=True)  # longest first: '<|eot_id|>' before '<|e'
    regex = re.compile("|".join(re.escape(s) for s in specials_sorted)) if specials_sorted else None
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    bos_id = tokenizer.bos_token_id
    adds_bos = bos_id is not None and len(with_special) > len(without) and with_special[0] == bos_id
    kwargs = dict(tokenizer.special_tokens_map)
    info = {
        "specials": specials_sorted,
        "regex": regex,
        "adds_bos": adds_bos,
        "bos": tokenizer.bos_token,
        "bos_id": bos_id,
        "kwargs": kwargs,
    }
    try:
        _info_cache[tokenizer] = info
    except TypeError:
        pass
    return info


# ------------------------------------------------------------------------------------------- span finding
def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # binary search on slice equality: C-speed compares instead of a Python char loop
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _find_reply(text: str, content: str, lo: int, hi: int) -> tuple[int, int] | None:
    """The reply as the template wrote it in ``text[lo:hi]``: verbatim, else with its surrounding whitespace
    removed on one side or both (templates that ``| trim`` or ``lstrip`` contents); None when not written."""
    for variant in dict.fromkeys((content, content.rstrip(), content.lstrip(), content.strip())):
        if variant:
            pos = text.find(variant, lo, hi)
            if pos >= 0:
                return pos, pos + len(variant)
    return None


class _Eot(NamedTuple):
    """What a template writes after an assistant reply (see `_eot`)."""

    between: str | None  # the end-of-turn marker when another message follows; None = could not be decided
    final: str  # the marker when the reply is the last message; "" = the template leaves it open
    why: str  # why ``between`` is None


def _render_chunks(messages, tokenizer, template, add_generation_prompt=False) -> tuple[str, set[int]] | None:
    """The rendering and the character offsets where the template's output pieces end (each ``{{ ... }}``
    and each run of literal text is one piece), or None when the template rejects the conversation."""
    try:
        parts = list(
            _compile(template).generate(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **_template_kwargs(tokenizer),
            )
        )
    except Exception:
        return None
    return "".join(parts), set(accumulate(map(len, parts)))


def _eot(roles: tuple, tokenizer, template) -> _Eot:
    """The end-of-turn marker a template writes after the reply of the last message in ``roles`` (an assistant),
    read from the template itself, once per role prefix (cached).

    The conversation is rendered with sentinel contents ending at the reply, followed by a user message, and
    with the generation prompt (and followed by a system message when the template accepts it). The marker is
    the text after the reply that these renderings share, cut at the end of one of the template's output pieces
    (so ``<|end|><|user|>`` vs ``<|end|><|endoftext|>`` gives ``<|end|>``, not ``<|end|><|``) and without
    trailing whitespace. When the template leaves a final reply open, the marker between turns is what follows
    the reply minus the next turn's opening, as the template writes that opening at the start of a
    conversation. What cannot be decided this way is None: no marker is trained, never a guess."""
    cache = _info(tokenizer).setdefault("eot", {})
    key = (template, roles)
    found = cache.get(key)
    if found is not None:
        return found
    head = [{"role": r, "content": _sentinel(i)} for i, r in enumerate(roles)]
    reply, probe = _sentinel(len(roles) - 1), _sentinel(len(roles))

    def after_reply(messages, generation=False):
        r = _render_chunks(messages, tokenizer, template, generation)
        if r is None:
            return None
        text, ends = r
        pos = text.find(reply)
        if pos < 0 or text.find(reply, pos + 1) >= 0:
            return None
        e = pos + len(reply)
        return text[e:], {x - e for x in ends if x > e}

    last = after_reply(head)
    follows = []
    for variant in (
        after_reply(head + [{"role": "user", "content": probe}]),
        after_reply(head, generation=True),
        after_reply(head + [{"role": "system", "content": probe}]),
    ):
        if variant is not None and (last is None or variant[0] != last[0]) and variant not in follows:
            follows.append(variant)
    between, why = None, ""
    closes = last is not None and last[0].strip() != ""
    pool = follows + ([last] if closes else [])
    if len(pool) >= 2:
        rests = [t for t, _ in pool]
        shared = min(_common_prefix_len(rests[0], t) for t in rests[1:])
        cut = max((b for b in set.intersection(*[b for _, b in pool]) if b <= shared), default=0)
        between = rests[0][:cut].rstrip() or None
    if between is None and follows:
        between = _between_from_opening(follows, probe, tokenizer, template)
    if between is None:
        why = (
            "the template writes no text after the reply that every next message shares, up to the next turn's opening"
            if follows
            else "the template rejects every conversation that continues after this reply"
        )
    final = ""
    if closes:
        final = between if between and last[0].startswith(between) else last[0].rstrip()
    if len(cache) > 1024:
        cache.clear()
    found = cache[key] = _Eot(between, final, why)
    return found


def _between_from_opening(follows, probe, tokenizer, template) -> str | None:
    """For a template that leaves a final reply open: the text between a reply and a following user message,
    minus the user turn's opening as the template writes it at the start of a conversation (their common
    suffix). Kept only when every continuation starts with it."""
    first = _render_chunks([{"role": "user", "content": probe}], tokenizer, template)
    rest = follows[0][0]
    if first is None or probe not in rest:
        return None
    gap, opening = rest[: rest.find(probe)], first[0][: first[0].find(probe)]
    shared = 0
    while shared < min(len(gap), len(opening)) and gap[-1 - shared] == opening[-1 - shared]:
        shared += 1
    marker = gap[: len(gap) - shared].rstrip()
    if not marker or not all(t.startswith(marker) for t, _ in follows):
        return None
    return marker


def _close_turn(text, k, begin, content_end, messages, tokenizer, template, problems) -> AssistantTurn:
    """The reply of message k at ``text[begin:content_end]`` with its end-of-turn marker (`_eot`) when the text
    has it right there. A final reply the template leaves open ends at the reply (`render` may append)."""
    eot = _eot(tuple([m["role"] for m in messages[: k + 1]]), tokenizer, template)
    marker = eot.between if k < len(messages) - 1 else eot.final
    trimmed = begin + len(text[begin:content_end].rstrip())
    if marker and not text.startswith(marker, content_end) and text.startswith(marker, trimmed):
        content_end = trimmed  # the reply's trailing whitespace was not written: it is the marker's (' ' + eos)
    if marker is None:
        problems.append(f"eot_undecided: message {k}: {eot.why}; no end-of-turn marker is trained after this reply")
    elif marker and not text.startswith(marker, content_end):
        problems.append(
            f"eot_undecided: message {k}: the template's end-of-turn marker {marker!r} does not follow this reply "
            f"(the text has {text[content_end : content_end + len(marker) + 8]!r}); none is trained after it"
        )
    elif marker:
        return AssistantTurn(k, begin, content_end, content_end + len(marker))
    return AssistantTurn(k, begin, content_end, content_end)


def _rewrite_reason(messages, k, tokenizer, template, text, pre, alone) -> str:
    """What differs between the full rendering and the one that ends at reply k (for the refusal message)."""
    if _find_reply(alone, messages[k]["content"], 0, len(alone)) is not None:
        why = (
            "an earlier turn is rewritten: the reply is written verbatim while it is the last message, but not once "
            "later messages are added (e.g. reasoning dropped from earlier turns)"
        )
    else:
        why = "the template rewrites the reply itself (it is not written verbatim even as the last message)"
    history = render_messages(messages[:k], tokenizer, template) if k else ""
    system = messages[0]["content"].strip() if messages[0]["role"] == "system" else ""
    if k and text.startswith(history) and not text.startswith(pre):
        gp = pre[_common_prefix_len(pre, text) :]
        why += f"; besides, the generation prompt's {gp[:40]!r} is not in the history"
    elif system and history.find(system) != text.find(system):
        why += "; besides, the system prompt is moved (written elsewhere once later messages are added)"
    return why


def _auto_turns(messages, tokenizer, template, text, assistants, problems) -> list[AssistantTurn]:
    """Each reply located in the final text, with its end-of-turn marker (`_close_turn`).

    Where the template is prefix-preserving (the rendering up to the reply's generation prompt is a prefix of
    the final text) the reply is searched right after that prompt. Where it is not (a system prompt moved into
    the last user turn, a generation prompt that adds ``<think>\\n``, reasoning dropped from earlier turns) the
    reply is searched verbatim in the one full rendering, in order, after the part both renderings share and
    after the message before it; a reply not written verbatim there is refused with the message index and what
    differs."""
    pres = []
    for k in assistants:
        pre = render_messages(messages[:k], tokenizer, template, add_generation_prompt=True) if k else ""
        if not text.startswith(pre) and text.startswith(pre.rstrip()):
            # the template ends every rendering with whitespace (a trailing newline after its last block): that
            # is not how the reply's turn starts; the reply is searched from before it
            pre = pre.rstrip()
        pres.append(pre)
    turns = []
    cursor = 0
    last = len(messages) - 1
    for i, k in enumerate(assistants):
        pre, content = pres[i], messages[k]["content"]
        exact = text.startswith(pre)
        lo = max(len(pre) if exact else _common_prefix_len(pre, text), cursor)
        hi = len(pres[i + 1]) if i + 1 < len(pres) and text.startswith(pres[i + 1]) else len(text)
        span = _find_reply(text, content, lo, hi)
        if span is not None and not exact and k and messages[k - 1]["role"] != "assistant":
            # the message before the reply, found before it: the reply is after it (not a quote inside it)
            before = messages[k - 1]["content"].strip()
            p = text.find(before, lo, hi)
            if 0 <= p < span[0]:
                span = _find_reply(text, content, p + len(before), hi) or span
        alone = None
        if span is None:
            alone = render_messages(messages[: k + 1], tokenizer, template) if k != last else text
        if span is None and (not exact or _find_reply(alone, content, lo, len(alone)) is not None):
            raise TemplateError(
                f"chat template does not write message {k} (assistant) verbatim in the full rendering, so the reply "
                f"cannot be located: {_rewrite_reason(messages, k, tokenizer, template, text, pre, alone)}. Use "
                "chat.masking.mode=delimiters or a template that writes each reply verbatim."
            )
        if span is None:
            # the template rewrites the reply wherever it is (e.g. a filter), in a prefix-preserving rendering:
            # train the turn's text minus surrounding whitespace, and say so
            end = _common_prefix_len(alone, text)
            window = text[lo:end]
            problems.append(
                f"content_not_verbatim: message {k}: the template does not write the reply verbatim; trained the "
                f"whole turn text at chars {lo}..{end}"
            )
            b, e = lo + len(window) - len(window.lstrip()), lo + len(window.rstrip())
            turn = AssistantTurn(k, b, max(b, e), max(b, e))
        else:
            turn = _close_turn(text, k, span[0], span[1], messages, tokenizer, template, problems)
        turns.append(turn)
        cursor = turn.end
    return turns


# --------------------------------------------------------------------------- structure cache (fast path)
# Rendering is the cost of `render`: the prefix diff renders the template ~2 times per assistant turn. Most
# templates write each message's content verbatim (or stripped) between fixed pieces of text that depend only
# on the roles. For each role pattern we therefore render ONCE with sentinel contents, learn the fixed pieces
# and where every turn lies (the full prefix diff, run on the sentinel conversation), and then, per row, build
# the text by substitution. The first _STRUCTURE_CHECKS rows of every pattern also run the full prefix diff and
# must give the same turns, else the pattern is never used again.
# Per row the real text is rendered too and must EQUAL the substituted text (else the row takes the full prefix
# diff: templates that inject a date, branch on content, trim it in other ways, ...) -- unless
# `backend.template_probe` proved, from an instrumented render of the pattern, that the template never looks at
# content at all. Then the substitution IS the rendering and only every _VERIFY_EVERY-th row is rendered as a
# check (all rows with SFT_STUDIO_VERIFY_RENDER=1); a difference there is an internal error, raised loudly.
_PAD = " \n"  # around each sentinel: tells a template that writes content verbatim from one that strips it
_STRUCTURE_CHECKS = 3
_VERIFY_EVERY = 64


def _today():
    import datetime

    return datetime.date.today()


class _Structure:
    __slots__ = (
        "literals",
        "slots",
        "turns",
        "checks_left",
        "proven",
        "rows",
        "day",
        "pieces",
        "literal_ends",
        "reason",
    )

    def __init__(self, literals, slots, turns, proven=False, day=None, reason=""):
        self.literals = literals  # n_slots + 1 fixed strings
        self.slots = slots  # [(message index, strip: bool)] in text order
        self.turns = turns  # [(message index, slot number, marker length)] in turn order
        self.checks_left = _STRUCTURE_CHECKS
        self.proven = proven  # the template never inspects content: no per-row render needed
        self.rows = 0
        self.day = day  # the date it was built on: a proven structure is rebuilt when the day changes
        self.reason = reason  # why it is not proven ("" when it is)
        self.pieces = [x for lit in literals for x in (lit, None)][:-1]  # literals, a hole for each content
        self.literal_ends = list(accumulate(map(len, literals)))  # chars of literals[0..n]


def _sentinel(i: int) -> str:
    return f"\x00SFT{i}\x00"


def _build_structure(roles, tokenizer, template, target) -> _Structure | None:
    probe = [{"role": r, "content": _PAD + _sentinel(i) + _PAD} for i, r in enumerate(roles)]
    try:
        text = render_messages(probe, tokenizer, template)
        problems: list[str] = []
        turns = _auto_turns(probe, tokenizer, template, text, target, problems)
    except ChatError:
        return None  # the full path raises the real error for the real row
    if problems:
        return None
    found = []
    for i in range(len(roles)):
        s = _sentinel(i)
        pos = text.find(s)
        if pos < 0 or text.find(s, pos + 1) >= 0:
            return None  # content not written, or written twice: substitution would not be simple
        if text.startswith(_PAD, pos - len(_PAD)) and text.startswith(_PAD, pos + len(s)):
            found.append((pos - len(_PAD), pos + len(s) + len(_PAD), i, False))  # written verbatim
        else:  # written stripped (e.g. `| trim`); anything else fails the per-row equality check
            found.append((pos, pos + len(s), i, True))
    found.sort()
    literals, prev = [], 0
    for b, e, _, _ in found:
        if b < prev:
            return None
        literals.append(text[prev:b])
        prev = e
    literals.append(text[prev:])
    slot_of = {i: n for n, (_, _, i, _) in enumerate(found)}
    struct_turns = []
    for t in turns:
        n = slot_of[t.message_index]
        b, e, _, _ = found[n]
        if (t.begin, t.content_end) != (b, e) or t.end < e or t.end > e + len(literals[n + 1]):
            return None  # the turn is not exactly the content slot + a marker from the fixed text after it
        struct_turns.append((t.message_index, n, t.end - e))
    slots = [(i, strip) for _, _, i, strip in found]
    proven, dated, reason = False, False, "SFT_STUDIO_VERIFY_RENDER is set"
    if os.environ.get("SFT_STUDIO_VERIFY_RENDER", "") in ("", "0"):
        from backend.template_probe import content_independent

        stripped, impure, reason = content_independent(
            template, _compile(template).environment, probe, text, **_template_kwargs(tokenizer)
        )
        # a date from strftime_now is fine while the day lasts (the structure is rebuilt when it changes);
        # any other impure call (lipsum, a function passed in) keeps the per-row render
        if stripped is not None and not all(stripped.get(i) == strip for i, strip in slots):
            reason = "a content is stripped on one side only"
        elif stripped is not None and not impure <= {"strftime_now"}:
            reason = f"the template calls {sorted(impure - {'strftime_now'})[0]}(), whose result may change"
        proven = not reason
        dated = proven and bool(impure)
    return _Structure(literals, slots, struct_turns, proven, _today() if dated else None, reason)


def render_fast_path(tokenizer, chat_template: str | None = None) -> dict:
    """How `render` has been rendering with this template so far, per role pattern seen: ``{"patterns": n,
    "proven": k, "reasons": [why a pattern is not proven, ...]}``. Proven patterns are rendered by substitution
    (Jinja only as a periodic check); the others with one real render per row (same result, slower)."""
    template = resolve_template(tokenizer, chat_template)
    structures = [st for key, st in _info(tokenizer).get("structures", {}).items() if key[0] == template]
    reasons = []
    for st in structures:
        why = (
            "the template does not write each message's content once, verbatim or stripped" if st is None else st.reason
        )
        if why and why not in reasons:
            reasons.append(why)
    return {
        "patterns": len(structures),
        "proven": sum(st is not None and st.proven for st in structures),
        "reasons": reasons,
    }


def _structure_key(messages, template, train_on) -> tuple:
    return template, tuple([m["role"] for m in messages]), train_on


def _structure(messages, tokenizer, template, target, train_on) -> _Structure | None:
    """The role pattern's cached structure (built on first use, rebuilt when a dated template's day changed)."""
    cache = _info(tokenizer).setdefault("structures", {})
    key = _structure_key(messages, template, train_on)
    st = cache.get(key, False)
    if st is False or (st is not None and st.day is not None and st.day != _today()):
        if len(cache) > 256:
            cache.clear()
        st = cache[key] = _build_structure(key[1], tokenizer, template, target)
    return st


def _substitute(st: _Structure, messages, tokenizer, template) -> tuple[str, list, str | None]:
    """(substituted text, [(begin, end)] of each slot, the real rendering when this row was rendered)."""
    contents = [messages[i]["content"].strip() if strip else messages[i]["content"] for i, strip in st.slots]
    pieces = st.pieces.copy()
    pieces[1::2] = contents
    text = "".join(pieces)
    before = accumulate(map(len, contents), initial=0)  # content chars before slot n
    slots = [(e + c, e + c + len(x)) for e, c, x in zip(st.literal_ends, before, contents, strict=False)]
    st.rows += 1
    real = None
    if not st.proven or st.checks_left > 0 or st.rows % _VERIFY_EVERY == 0:
        real = render_messages(messages, tokenizer, template)  # the one real render: the proof for this row
        if real != text and st.proven:
            roles = "/".join(m["role"] for m in messages)
            raise RenderProofError(
                f"internal error: the chat template was proven not to depend on message content for roles "
                f"{roles}, yet this row renders differently from the substitution (at char "
                f"{_common_prefix_len(real, text)}). Please report it with the template; set "
                "SFT_STUDIO_VERIFY_RENDER=1 to render every row meanwhile."
            )
    return text, slots, real


def _proven_text(messages, tokenizer, template, assistants) -> str | None:
    """The rendering by substitution when the template is proven content-independent for this role pattern
    (delimiter masking needs the text only), else None."""
    st = _structure(messages, tokenizer, template, assistants, "all")
    if st is None or not st.proven:
        return None
    return _substitute(st, messages, tokenizer, template)[0]


def _structure_turns(messages, tokenizer, template, target, train_on):
    """(text, turns) from the role pattern's structure; turns is None when the full prefix diff must run (text
    is then the real rendering when it was already made, else None)."""
    st = _structure(messages, tokenizer, template, target, train_on)
    if st is None:
        return None, None
    text, slot_begin, real = _substitute(st, messages, tokenizer, template)
    if real is not None and real != text:
        return real, None
    turns = []
    for k, n, marker in st.turns:
        b, e = slot_begin[n]
        turns.append(AssistantTurn(k, b, e, e + marker))
    if st.checks_left > 0:
        st.checks_left -= 1
        problems: list[str] = []
        if _auto_turns(messages, tokenizer, template, text, target, problems) != turns or problems:
            _info(tokenizer)["structures"][_structure_key(messages, template, train_on)] = None
            return text, None
    return text, turns


def _generation_turns(messages, tokenizer, template, assistants, problems):
    text, blocks = _render_generation(messages, tokenizer, template)
    if len(blocks) != len(assistants):
        return text, None  # markers do not map one-to-one onto assistant messages: fall back to the prefix diff
    turns, found = [], []
    for (b, e), k in zip(blocks, assistants, strict=False):
        span = _find_reply(text, messages[k]["content"], b, e)
        if span is None:
            return text, None  # the block does not hold the reply verbatim: the prefix diff decides
        turns.append(_close_turn(text, k, span[0], span[1], messages, tokenizer, template, found))
    problems.extend(found)
    return text, turns


def get_spans(text: str, start_delimiter: str, end_delimiter: str) -> list[list[int]]:
    """The guide's ``get_spans``, fixed: inclusive character spans that are NOT trained.

    Semantics kept: mask from the start of the text through each start delimiter; train from there through and
    including the next end delimiter; repeat after it. Fixed: it always terminates (every iteration advances);
    a start delimiter that is not found masks the rest of the text (the original appended a bogus span and
    looped); a missing end delimiter trains to the end of the text (the original jumped back and looped).

    >>> get_spans("Uhi|A:yo.|", "|A:", ".")
    [[0, 5]]
    """
    if not start_delimiter or not end_delimiter:
        raise ValueError("start_delimiter and end_delimiter must be non-empty strings")
    spans = []
    start = 0
    n = len(text)
    while start < n:
        found = text.find(start_delimiter, start)
        if found < 0:
            spans.append([start, n - 1])  # no more assistant turns: mask the rest
            break
        end = found + len(start_delimiter)
        spans.append([start, end - 1])  # character span indices are inclusive
        close = text.find(end_delimiter, end)
        if close < 0:
            break  # unclosed final turn: trained to the end of the text (reported by render)
        start = close + len(end_delimiter)
    return spans


def spans_from_loss_masking(text_len: int, loss_masking_spans) -> list[tuple[int, int]]:
    """Guide form (inclusive spans NOT trained) -> half-open trained ranges.

    >>> spans_from_loss_masking(10, [[0, 2], [6, 7]])
    [(3, 6), (8, 10)]
    """
    out = []
    pos = 0
    for b, e in sorted((int(b), int(e)) for b, e in loss_masking_spans):
        b, e = max(b, 0), min(e, text_len - 1)
        if b > pos:
            out.append((pos, b))
        pos = max(pos, e + 1)
    if pos < text_len:
        out.append((pos, text_len))
    return out


def loss_masking_from_spans(text_len: int, trained_spans) -> list[tuple[int, int]]:
    """Half-open trained ranges -> inclusive spans NOT trained (the guide's ``spans`` field).

    >>> loss_masking_from_spans(10, [(3, 6), (8, 10)])
    [(0, 2), (6, 7)]
    """
    out = []
    pos = 0
    for b, e in trained_spans:
        if b > pos:
            out.append((pos, b - 1))
        pos = max(pos, e)
    if pos < text_len:
        out.append((pos, text_len - 1))
    return out


def _delimiter_turns(text, masking: Masking, messages, problems) -> list[AssistantTurn]:
    sd, ed = masking.start_delimiter, masking.end_delimiter
    for i, m in enumerate(messages):
        for name, d in (("start", sd), ("end", ed)):
            if d in m["content"]:
                problems.append(
                    f"delimiter_in_content: message {i} ({m['role']}) contains the {name} delimiter {d!r}; "
                    "the delimiter spans may not follow the turns (use chat.masking.mode=auto)"
                )
    turns = []
    masked = get_spans(text, sd, ed)
    # trained ranges are the gaps between masked spans; each one starts right after a start delimiter
    trained = spans_from_loss_masking(len(text), masked)
    for b, e in trained:
        if text.endswith(ed, b, e) and e - b >= len(ed):
            turns.append(AssistantTurn(-1, b, e - len(ed), e))
        else:
            problems.append(
                f"end_delimiter_missing: end delimiter {ed!r} not found after char {b}; trained to the end of the text"
            )
            turns.append(AssistantTurn(-1, b, e, e))
    if not turns:
        problems.append(f"span_not_found: start delimiter {sd!r} not found; nothing is trained")
    n_assistant = sum(m["role"] == "assistant" for m in messages)
    if messages and turns and len(turns) != n_assistant:
        problems.append(f"turn_count_mismatch: {len(turns)} trained span(s) for {n_assistant} assistant message(s)")
    return turns


def _special_text_problems(messages, tokenizer, problems):
    regex = _info(tokenizer)["regex"]
    if regex is None or not regex.search("\x00".join([m["content"] for m in messages])):
        return
    for i, m in enumerate(messages):
        hit = regex.search(m["content"])
        if hit:
            problems.append(
                f"special_text_in_content: message {i} ({m['role']}) contains {hit.group()!r}, which tokenizes "
                "as the special token, not as text; clean the data if this is not intended"
            )


def render(conversation, tokenizer, masking: Masking | None = None, chat_template: str | None = None) -> RenderedSample:
    """Render a conversation with the chat template and find what is trained. See the module docstring.

    Raises `ConversationError` (bad messages) or `TemplateError` (bad template, or a reply it rewrites).
    Per-sample issues that still give a usable sample are in ``.problems`` as ``"code: message"``.
    """
    masking = masking or _DEFAULT_MASKING
    messages = _normalize_plain(conversation) if isinstance(conversation, list) else None
    if messages is None:
        messages = normalize_conversation(conversation)
    template = resolve_template(tokenizer, chat_template)
    problems: list[str] = []
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if masking.train_on == "last":
        target = assistants[-1:]
    else:
        target = assistants

    appended: list[tuple[int, int]] = []
    if masking.mode == "delimiters":
        text = None
        if assistants and not _has_generation(template):  # the text alone, from a proven structure if any
            text = _proven_text(messages, tokenizer, template, assistants)
        if text is None:
            text = render_messages(messages, tokenizer, template)
        turns = _delimiter_turns(text, masking, messages, problems)
        chosen = turns[-1:] if masking.train_on == "last" else turns
    else:
        turns = None
        if assistants and _has_generation(template):
            text, turns = _generation_turns(messages, tokenizer, template, assistants, problems)
        else:
            text = None
            if target:
                text, turns = _structure_turns(messages, tokenizer, template, target, masking.train_on)
            if text is None:
                text = render_messages(messages, tokenizer, template)
        if turns is None:
            turns = _auto_turns(messages, tokenizer, template, text, target, problems)
        appended = []
        if target and target[-1] == len(messages) - 1 and masking.train_on_eot and masking.final_eot == "append":
            text, turns, appended = _append_final_eot(text, turns, messages, tokenizer, template, problems)
        wanted = set(target)
        chosen = [t for t in turns if t.message_index in wanted]
        if not assistants:
            problems.append("span_not_found: the conversation has no assistant message; nothing is trained")

    trained = []
    for t in chosen:
        e = t.end if masking.train_on_eot else t.content_end
        if e > t.begin:
            trained.append((t.begin, e))
    _special_text_problems(messages, tokenizer, problems)
    return RenderedSample(
        text=text,
        trained_spans=trained,
        loss_masking_spans=loss_masking_from_spans(len(text), trained),
        problems=problems,
        turns=turns,
        messages=messages,
        appended=appended,
    )


def _append_final_eot(text, turns, messages, tokenizer, template, problems):
    """A final reply the template leaves open (no marker after it in the rendering): insert the template's
    between-turns marker right after it (chat.final_eot: append). Returns (text, turns, appended ranges)."""
    t = turns[-1] if turns else None
    if t is None or t.message_index != len(messages) - 1 or t.end > t.content_end:
        return text, turns, []
    eot = _eot(tuple([m["role"] for m in messages]), tokenizer, template)
    if eot.final or t.begin == t.content_end:
        return text, turns, []  # the template closes it in its own way (or the turn has no reply text)
    if eot.between is None:
        problems.append(
            f"eot_undecided: message {t.message_index}: the template leaves the final reply open and its "
            f"between-turns marker could not be decided ({eot.why}); nothing appended"
        )
        return text, turns, []
    at, marker = t.content_end, eot.between
    text = text[:at] + marker + text[at:]
    return text, turns[:-1] + [AssistantTurn(t.message_index, t.begin, at, at + len(marker))], [(at, at + len(marker))]


# ----------------------------------------------------------------------------------------------- tokenize
def _mask_from_offsets(offsets: np.ndarray, trained_spans) -> np.ndarray:
    """(T, 2) offsets + sorted disjoint half-open spans -> (T,) bool: token overlaps a trained span."""
    if len(trained_spans) == 0 or len(offsets) == 0:
        return np.zeros(len(offsets), dtype=bool)
    spans = np.asarray(trained_spans, dtype=np.int64).reshape(-1, 2)
    starts, ends = offsets[:, 0], offsets[:, 1]
    # first span whose end is after the token's start; overlap iff that span begins before the token ends
    idx = np.searchsorted(spans[:, 1], starts, side="right")
    ok = idx < len(spans)
    idx_c = np.minimum(idx, len(spans) - 1)
    return ok & (spans[idx_c, 0] < ends) & (ends > starts)


def _finish(text: str, ids, offsets, trained_spans, info) -> TokenizedSample:
    ids = np.asarray(ids, dtype=np.int64)
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    if info["adds_bos"] and not (info["bos"] and text.startswith(info["bos"])):
        ids = np.concatenate([np.array([info["bos_id"]], dtype=np.int64), ids])
        offsets = np.concatenate([np.zeros((1, 2), dtype=np.int64), offsets])
    return TokenizedSample(input_ids=ids, trained=_mask_from_offsets(offsets, trained_spans), offsets=offsets)


def tokenize(text: str, trained_spans, tokenizer) -> TokenizedSample:
    """Text + half-open trained character spans -> token ids and per-token trained mask (see module docstring)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return _finish(text, enc["input_ids"], enc["offset_mapping"], sorted(trained_spans), _info(tokenizer))


def _fast_backend(tokenizer):
    """The Rust ``tokenizers.Tokenizer`` behind a fast tokenizer, when calling it directly gives exactly what
    ``tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)`` gives (no truncation or padding
    configured, same special-token splitting); else None. Skips transformers' per-sample dict building."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch"):
        return None
    try:
        if backend.truncation is not None or backend.padding is not None:
            return None
        if bool(backend.encode_special_tokens) != bool(getattr(tokenizer, "split_special_tokens", False)):
            return None
    except AttributeError:
        return None
    return backend


def tokenize_batch(texts: list[str], spans_list, tokenizer) -> list[TokenizedSample]:
    """`tokenize` for many texts with one batched (parallel, Rust) tokenizer call.

    The whole batch is converted to numpy at once; the per-sample Python work is a handful of operations, not
    one per token. With a fast tokenizer the mask comes from the encodings' char -> token lookups at the span
    edges (see `_char_lookup_ok`), and each sample's offsets are only built if something reads them.
    """
    texts = list(texts)
    spans_list = list(spans_list)
    if len(texts) != len(spans_list):
        raise ValueError(f"tokenize_batch: {len(texts)} texts but {len(spans_list)} span lists")
    if not texts:
        return []
    return _tokenize_flat(texts, spans_list, tokenizer).samples()


@dataclass
class _Flat:
    """A tokenized batch as flat arrays: sample j is ``[bounds[j], bounds[j+1])``."""

    ids: np.ndarray  # (N,) int64
    trained: np.ndarray  # (N,) bool
    bounds: np.ndarray  # (n+1,) int64
    offsets: np.ndarray | None  # (N, 2) int64, or None when the encodings are kept instead
    encodings: list | None
    bos_added: np.ndarray  # (n,) bool

    def samples(self, which=None) -> list[TokenizedSample]:
        """Samples ``which`` (default all), as views of the flat arrays."""
        cuts = self.bounds.tolist()
        which = range(len(cuts) - 1) if which is None else which
        ids, trained = self.ids, self.trained
        if self.offsets is not None:
            off = self.offsets
            return [
                TokenizedSample(ids[cuts[j] : cuts[j + 1]], trained[cuts[j] : cuts[j + 1]], off[cuts[j] : cuts[j + 1]])
                for j in which
            ]
        encs, added = self.encodings, self.bos_added.tolist()
        return [
            TokenizedSample(
                ids[cuts[j] : cuts[j + 1]], trained[cuts[j] : cuts[j + 1]], encoding=encs[j], bos_added=added[j]
            )
            for j in which
        ]


def _token_range(enc, b: int, e: int, n: int):
    """Tokens overlapping chars ``[b, e)`` as ``(lo, hi)`` from an Encoding's char lookups, or None when a
    char is covered by no token (then the caller uses the offsets). Valid for tokenizers whose offsets are
    monotone (checked once per tokenizer by `_char_lookup_ok`)."""
    lo = enc.char_to_token(b)
    last = enc.char_to_token(e - 1)
    if lo is None or last is None:
        return None
    hi = last + 1
    while hi < n:  # the byte-fallback pieces of one character all carry its offsets
        c = enc.token_to_chars(hi)
        if c is None or c[0] >= e or c[1] <= c[0]:
            break
        hi += 1
    return lo, hi


_PROBE = (
    "Hello  world,\tthe end.\n\n  Ünïcödé «ok» — 日本語のテキスト, emoji 👋🏽🧑‍🚀 x\u0301 \r\n"
    "```py\ndef f(x):\n    return x**2\n```   trailing   \n"
)


def _char_lookup_ok(tokenizer, backend) -> bool:
    """Whether `_token_range` gives exactly the offsets rule for this tokenizer.

    It does for an encoding whose token starts and ends are both non-decreasing and whose tokens all have
    positive width: the tokens overlapping ``[b, e)`` are then one run, from the first token containing ``b``
    through the last containing ``e - 1`` (a char no token covers makes the lookup return None and the sample
    falls back to its offsets). Checked once per tokenizer on probe texts (scripts, emoji, combining marks,
    whitespace runs, code, the special tokens), plus direct comparisons on spans of the probe; a tokenizer
    that fails keeps the offsets path."""
    info = _info(tokenizer)
    ok = info.get("char_lookup")
    if ok is not None:
        return ok
    ok = True
    try:
        specials = info["specials"][:4]
        texts = [_PROBE] + [s + _PROBE + s + _PROBE[:40] + s for s in specials]
        for text, enc in zip(texts, backend.encode_batch(texts, add_special_tokens=False), strict=False):
            off = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
            n = len(off)
            if n == 0 or (np.diff(off, axis=0) < 0).any() or (off[:, 1] <= off[:, 0]).any():
                raise ValueError("offsets are not monotone with positive widths")
            for b in range(0, len(text), 7):
                for e in (b + 1, b + 2, b + 5, b + 13):
                    e = min(e, len(text))
                    r = _token_range(enc, b, e, n)
                    if r is None:
                        continue  # uncovered char: such a sample takes its offsets anyway
                    got = np.zeros(n, dtype=bool)
                    got[r[0] : r[1]] = True
                    if not np.array_equal(got, _mask_from_offsets(off, [(b, e)])):
                        raise ValueError(f"lookup differs from offsets on chars {b}..{e}")
    except Exception:
        ok = False
    info["char_lookup"] = ok
    return ok


def _tokenize_flat(texts: list[str], spans_list, tokenizer, offsets: bool = False) -> _Flat:
    """Tokenize a batch into flat arrays (see `_Flat`). ``offsets=True`` materializes every offset (else
    they are kept in the encodings and the mask is built from char lookups when the tokenizer allows)."""
    n = len(texts)
    info = _info(tokenizer)
    backend = _fast_backend(tokenizer)
    encs = None
    if backend is not None:
        encs = backend.encode_batch(texts, add_special_tokens=False)
        ids_lists = [e.ids for e in encs]
        lookup = not offsets and _char_lookup_ok(tokenizer, backend)
        off_lists = None if lookup else [e.offsets for e in encs]
    else:
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        ids_lists, off_lists = enc["input_ids"], enc["offset_mapping"]
        lookup = False
    lengths = np.fromiter(map(len, ids_lists), dtype=np.int64, count=n)
    total = int(lengths.sum())
    ids = np.fromiter(chain.from_iterable(ids_lists), dtype=np.int64, count=total)
    offs = None
    if off_lists is not None:
        offs = np.fromiter(
            chain.from_iterable(chain.from_iterable(off_lists)), dtype=np.int64, count=2 * total
        ).reshape(total, 2)
    needs = np.zeros(n, dtype=bool)
    if info["adds_bos"]:
        bos = info["bos"]
        needs = np.fromiter((not (bos and t.startswith(bos)) for t in texts), dtype=bool, count=n)
        if needs.any():
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])[needs]
            ids = np.insert(ids, starts, info["bos_id"])
            if offs is not None:
                offs = np.insert(offs, starts, 0, axis=0)  # (0, 0): zero-width, never trained
            lengths = lengths + needs
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    if lookup:
        trained = _mask_by_lookup(texts, spans_list, encs, bounds, needs, info)
        return _Flat(ids, trained, bounds, None, encs, needs)
    # batch coordinates: sample i's characters live at [base[i], base[i] + len(text_i)); spans and offsets
    # shifted by base stay sorted and disjoint across samples, so one searchsorted gives every mask
    text_lens = np.fromiter(map(len, texts), dtype=np.int64, count=n)
    base = np.concatenate([[0], np.cumsum(text_lens + 1)[:-1]])
    token_base = np.repeat(base, lengths)
    flat_spans = []
    for b, m, spans in zip(base.tolist(), text_lens.tolist(), spans_list, strict=False):
        if spans:  # clipped to the text: a span past its end must not reach into the next sample
            flat_spans.extend(
                (b + max(0, min(s, m)), b + max(0, min(e, m))) for s, e in (sorted(spans) if len(spans) > 1 else spans)
            )
    trained = _mask_from_offsets(offs + token_base[:, None], flat_spans)
    return _Flat(ids, trained, bounds, offs, None, needs)


def _mask_by_lookup(texts, spans_list, encs, bounds, bos_added, info) -> np.ndarray:
    """The offsets rule's mask from char -> token lookups at the span edges: O(spans) Python calls, no
    per-token objects. A sample with a char no token covers takes its own offsets instead."""
    total = int(bounds[-1])
    edges = np.zeros(total + 1, dtype=np.int32)  # +1 at a trained run's first token, -1 after its last
    lo_list, hi_list = [], []
    fallback = []
    cuts, added = bounds.tolist(), bos_added.tolist()  # Python ints: no numpy scalar per row
    for j, (text, spans, enc) in enumerate(zip(texts, spans_list, encs, strict=False)):
        if not spans:
            continue
        m = len(text)
        shift = cuts[j] + added[j]
        n_tok = cuts[j + 1] - shift
        ranges = []
        for s, e in sorted(spans) if len(spans) > 1 else spans:
            s, e = max(0, min(s, m)), max(0, min(e, m))
            if e <= s:
                continue
            r = _token_range(enc, s, e, n_tok)
            if r is None:
                break
            ranges.append(r)
        else:
            for lo, hi in ranges:
                if hi > lo:
                    lo_list.append(shift + lo)
                    hi_list.append(shift + hi)
            continue
        fallback.append(j)
    if lo_list:
        # runs of different spans may touch or share a token (a token straddling two spans): count, then > 0
        np.add.at(edges, np.asarray(lo_list), 1)
        np.add.at(edges, np.asarray(hi_list), -1)
    trained = np.cumsum(edges[:-1]) > 0
    for j in fallback:
        a = int(bounds[j]) + int(bos_added[j])
        off = np.asarray(encs[j].offsets, dtype=np.int64).reshape(-1, 2)
        trained[a : int(bounds[j + 1])] = _mask_from_offsets(off, sorted(spans_list[j]))
    return trained


class PortableTokenizer:
    """What `render`, `tokenize_batch` and `check_sample` need from a fast tokenizer, rebuilt from a picklable
    spec with the `tokenizers` library only: worker processes start in a fraction of a second instead of
    importing transformers (seconds) and loading the tokenizer again.

    >>> spec = portable_spec(AutoTokenizer.from_pretrained("assets/tiny-llama"))   # in the parent
    >>> tok = PortableTokenizer(spec)                                              # in a worker
    >>> tokenize_batch(["<|begin_of_text|>Hi"], [[(17, 19)]], tok)[0].input_ids    # same ids as the original
    """

    def __init__(self, spec: dict):
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_str(spec["backend"])
        # what the transformers wrapper sets before every call (tokenize_batch checks these)
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self.split_special_tokens = spec["split_special_tokens"]
        self._tokenizer.encode_special_tokens = self.split_special_tokens
        self.chat_template = spec["chat_template"]
        self.name_or_path = spec["name_or_path"]
        self.bos_token_id = spec["info"]["bos_id"]
        self.eos_token_id = spec["eos_token_id"]
        info = dict(spec["info"])
        info["regex"] = re.compile("|".join(re.escape(t) for t in info["specials"])) if info["specials"] else None
        _info_cache[self] = info

    def __call__(self, texts, add_special_tokens=True, return_offsets_mapping=False):
        single = isinstance(texts, str)
        encs = self._tokenizer.encode_batch([texts] if single else list(texts), add_special_tokens=add_special_tokens)
        out = {"input_ids": [e.ids for e in encs]}
        if return_offsets_mapping:
            out["offset_mapping"] = [e.offsets for e in encs]
        return {k: v[0] for k, v in out.items()} if single else out

    def convert_tokens_to_ids(self, token):
        return self._tokenizer.token_to_id(token)


def portable_spec(tokenizer) -> dict:
    """A picklable description of a fast tokenizer for `PortableTokenizer` (raises ValueError for slow ones)."""
    backend = _fast_backend(tokenizer)
    if backend is None:
        raise ValueError("not a fast tokenizer with default truncation/padding")
    info = {k: v for k, v in _info(tokenizer).items() if k not in ("regex", "structures", "eot")}
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return {
        "backend": backend.to_str(),
        "split_special_tokens": bool(getattr(tokenizer, "split_special_tokens", False)),
        "chat_template": template,
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "eos_token_id": tokenizer.eos_token_id,
        "info": info,
    }


# ------------------------------------------------------------------------------------------ health checks
def _code(problem: str) -> str:
    return problem.split(":", 1)[0]


def _overlapping_tokens(tokenized: TokenizedSample, b: int, e: int) -> np.ndarray:
    """Indices of the tokens overlapping chars ``[b, e)`` (the offsets rule), without building the offsets
    when the sample still has its encoding."""
    if tokenized._offsets is None and tokenized._encoding is not None:
        shift = int(tokenized._bos_added)
        r = _token_range(tokenized._encoding, b, e, len(tokenized.input_ids) - shift)
        if r is not None:
            return np.arange(r[0] + shift, r[1] + shift)
    off = tokenized.offsets
    return np.flatnonzero((off[:, 0] < e) & (off[:, 1] > b) & (off[:, 1] > off[:, 0]))


def _token_end_char(tokenized: TokenizedSample, t: int) -> int:
    if tokenized._offsets is None and tokenized._encoding is not None:
        k = t - int(tokenized._bos_added)
        if k < 0:
            return 0
        chars = tokenized._encoding.token_to_chars(k)
        if chars is not None:
            return chars[1]
    return int(tokenized.offsets[t, 1])


def check_sample(rendered: RenderedSample, tokenized: TokenizedSample, tokenizer, sequence_length=None) -> list[str]:
    """Health problems of one sample, ``"code: message"`` (codes in `PROBLEM_CODES`); includes render problems."""
    problems = list(rendered.problems)
    n = len(tokenized.input_ids)
    if not tokenized.trained.any():
        problems.append("no_trained_tokens: no token of this sample is trained")
    if rendered.turns:
        for t in rendered.turns:
            if rendered.trained_spans and not any(b <= t.begin < e for b, e in rendered.trained_spans):
                continue  # a turn not selected for training (train_on=last)
            if t.end <= t.content_end:
                problems.append(f"eot_not_trained: the assistant turn at char {t.begin} has no end-of-turn marker")
                continue
            marker = _overlapping_tokens(tokenized, t.content_end, t.end)
            # a marker inside one trained span has all its tokens trained (the token rule): no array check
            inside = any(b <= t.content_end and t.end <= e for b, e in rendered.trained_spans)
            if not len(marker) or not (inside or tokenized.trained[marker].all()):
                problems.append(
                    f"eot_not_trained: end-of-turn {rendered.text[t.content_end : t.end]!r} at char {t.content_end} "
                    "is not trained"
                )
    if sequence_length is not None and n > sequence_length:
        problems.append(f"too_long: {n} tokens > sequence_length {sequence_length}")
        limit = _token_end_char(tokenized, sequence_length - 1) if sequence_length > 0 else 0
        for t in rendered.turns:
            if t.begin < limit < t.end:
                problems.append(f"assistant_cut: the assistant turn at char {t.begin} crosses token {sequence_length}")
                break
    return problems


class HealthReport:
    """Aggregate of `check_sample` over a dataset: counts per problem code, first example indices, lengths."""

    def __init__(self, examples: int = 5):
        self.examples = examples
        self.n_samples = 0
        self.n_tokens = 0
        self.n_trained = 0
        self.counts: dict[str, int] = {}
        self.example_indices: dict[str, list[int]] = {}
        self.first_messages: dict[str, str] = {}
        self.lengths: list[int] = []
        self.n_with_spans = 0
        self.n_appended = 0  # samples whose final reply got the template's marker appended (chat.final_eot)
        self.appended_indices: list[int] = []

    def add(self, index: int, problems: list[str], n_tokens: int, n_trained: int, appended: int = 0) -> None:
        self.n_samples += 1
        if appended:
            self.n_appended += 1
            if len(self.appended_indices) < self.examples:
                self.appended_indices.append(int(index))
        self.n_tokens += int(n_tokens)
        self.n_trained += int(n_trained)
        if n_tokens:
            self.lengths.append(int(n_tokens))
        codes = []
        for p in problems:
            c = _code(p)
            if c in codes:
                continue
            codes.append(c)
            self.counts[c] = self.counts.get(c, 0) + 1
            ex = self.example_indices.setdefault(c, [])
            if len(ex) < self.examples:
                ex.append(int(index))
            self.first_messages.setdefault(c, p)
        if "span_not_found" not in codes and "bad_conversation" not in codes and n_trained > 0:
            self.n_with_spans += 1

    @property
    def span_found_share(self) -> float:
        return self.n_with_spans / self.n_samples if self.n_samples else 0.0

    @property
    def trained_token_share(self) -> float:
        return self.n_trained / self.n_tokens if self.n_tokens else 0.0

    def to_dict(self) -> dict:
        return {
            "samples": self.n_samples,
            "tokens": self.n_tokens,
            "trained_tokens": self.n_trained,
            "span_found_share": self.span_found_share,
            "trained_token_share": self.trained_token_share,
            "problems": {
                c: {"count": n, "examples": self.example_indices[c], "first": self.first_messages[c]}
                for c, n in sorted(self.counts.items())
            },
            "lengths": list(self.lengths),
            "appended_eot": {"count": self.n_appended, "examples": list(self.appended_indices)},
        }

    def summary(self) -> str:
        lines = [
            f"{self.n_samples} samples, {self.n_tokens} tokens, {self.n_trained} trained "
            f"({self.trained_token_share:.1%}); assistant spans found in {self.span_found_share:.1%} of samples"
        ]
        if self.lengths:
            arr = np.asarray(self.lengths)
            lines.append(f"length: median {int(np.median(arr))}, p99 {int(np.percentile(arr, 99))}, max {arr.max()}")
        for c, n in sorted(self.counts.items(), key=lambda kv: -kv[1]):
            lines.append(f"{c}: {n} sample(s), e.g. rows {self.example_indices[c]}: {self.first_messages[c]}")
        if self.n_appended:
            lines.append(
                f"end-of-turn marker appended (chat.final_eot: append): {self.n_appended} sample(s) whose final reply "
                f"the template leaves open, e.g. rows {self.appended_indices}"
            )
        if not self.counts:
            lines.append("no problems found")
        return "\n".join(lines)


def check_dataset(
    rows: Iterable,
    tokenizer,
    masking: Masking | None = None,
    chat_template=None,
    sequence_length=None,
    limit=None,
    progress: Callable[[int, int], Any] | None = None,
    examples: int = 5,
) -> HealthReport:
    """Render, tokenize and check every row (or the first ``limit``); rows that fail get ``bad_conversation``.

    A template error that is not about one row (syntax error, missing template) is raised at once.
    """
    masking = masking or Masking()
    template = resolve_template(tokenizer, chat_template)
    _compile(template)
    rows = list(rows) if limit is None else [r for _, r in zip(range(limit), rows, strict=False)]
    report = HealthReport(examples=examples)
    n = len(rows)
    pending: list = []  # (row index, RenderedSample or the error), reported in row order per batch

    def flush():
        ok = [r for _, r in pending if isinstance(r, RenderedSample)]
        toks = iter(tokenize_batch([r.text for r in ok], [r.trained_spans for r in ok], tokenizer))
        for i, r in pending:
            if isinstance(r, RenderedSample):
                tok = next(toks)
                problems = check_sample(r, tok, tokenizer, sequence_length)
                report.add(i, problems, len(tok.input_ids), tok.n_trained, appended=len(r.appended))
            else:
                report.add(i, [f"bad_conversation: row {i}: {r}"], 0, 0)
            if progress is not None:
                progress(i + 1, n)
        pending.clear()

    for i, row in enumerate(rows):
        try:
            pending.append((i, render(row, tokenizer, masking, template)))
        except ChatError as e:
            pending.append((i, e))
        if len(pending) == 256:  # one batched tokenizer call per 256 rows
            flush()
    flush()
    return report


def eot_token_ids(tokenizer, chat_template: str | None = None) -> list[int]:
    """Token ids that end an assistant turn under this template (then the tokenizer's eos, if different).

    Found by rendering a probe conversation and reading the special tokens of the first reply's end-of-turn
    marker; e.g. Llama 3.1 -> [<|eot_id|>], ChatML -> [<|im_end|>, ...], Gemma -> [<end_of_turn>, <eos>].
    """
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    ids: list[int] = []
    try:
        r = render(probe, tokenizer, Masking(), chat_template)
        regex = _info(tokenizer)["regex"]
        for t in r.turns[:1]:
            for m in regex.finditer(r.text[t.content_end : t.end]) if regex else ():
                tid = tokenizer.convert_tokens_to_ids(m.group())
                if tid is not None and tid not in ids:
                    ids.append(int(tid))
    except ChatError:
        pass
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    return ids
