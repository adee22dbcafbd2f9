"""Rendering and spans: chat templates, the end-of-turn marker, assistant spans, delimiters and `render`.

Part of `backend.chat` (import from there). `render` is the one function that decides what is trained; the
substitution fast path (`backend.chat.fastpath`) sits behind one call in it and is used only where it is
proven to give the same text.
"""

from __future__ import annotations

import os
import re
from itertools import accumulate
from typing import Any, NamedTuple

from backend.chat.conversations import (
    _DEFAULT_MASKING,
    AssistantTurn,
    ChatError,
    Masking,
    RenderedSample,
    TemplateError,
    _normalize_plain,
    is_agent,
    normalize_conversation,
    normalize_tools,
)
from backend.chat.tokens import _info


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


def render_messages(messages: list[dict], tokenizer, template: str, add_generation_prompt=False, tools=None) -> str:
    """Render normalized messages with a Jinja template, exactly like ``apply_chat_template(tokenize=False)``
    but without its per-call overhead (messages are already plain dicts of strings; ``tools``: the row's
    schemas from `normalize_tools`)."""
    import jinja2

    compiled = _compile(template)
    try:
        return compiled.render(
            messages=messages,
            tools=tools,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **_template_kwargs(tokenizer),
        )
    except jinja2.TemplateError as e:
        roles = "/".join(m["role"] for m in messages)
        raise TemplateError(f"chat template rejected the conversation (roles {roles}): {e}") from None
    except Exception as e:  # a template bug (e.g. indexing an empty list): still not a Jinja-internals traceback
        raise TemplateError(f"chat template failed on the conversation: {type(e).__name__}: {e}") from None


def _render_generation(messages, tokenizer, template, tools=None) -> tuple[str, list[tuple[int, int]]]:
    """Render with ``{% generation %}`` tracking: (text, char ranges of the generation blocks)."""
    import jinja2
    from transformers.utils.chat_template_utils import _render_with_assistant_indices

    try:
        return _render_with_assistant_indices(
            _compile(template), messages, tools, None, False, **_template_kwargs(tokenizer)
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


def _written_forms(content: str) -> list[str]:
    """How a template may write a content, in the order they are tried: verbatim, else with its surrounding
    whitespace removed on one side or both (templates that ``| trim`` or ``lstrip`` contents); none empty."""
    return [v for v in dict.fromkeys((content, content.rstrip(), content.lstrip(), content.strip())) if v]


def _find_reply(text: str, content: str, lo: int, hi: int) -> tuple[int, int] | None:
    """The reply as the template wrote it in ``text[lo:hi]`` (`_written_forms`); None when not written."""
    for variant in _written_forms(content):
        pos = text.find(variant, lo, hi)
        if pos >= 0:
            return pos, pos + len(variant)
    return None


def _reply_at(text: str, content: str, at: int, hi: int) -> tuple[int, int] | None:
    """The reply as `_find_reply` takes it, written right at ``at`` (where the template writes it); None when it is
    not (rewritten there: never a later message's copy of it)."""
    for variant in _written_forms(content):
        if text.startswith(variant, at) and at + len(variant) <= hi:
            return at, at + len(variant)
    return None


class _Eot(NamedTuple):
    """What a template writes after an assistant reply (see `_eot`)."""

    between: str | None  # the end-of-turn marker when another message follows; None = could not be decided
    final: str | None  # the marker when the reply is the last message; "" = left open; None = could not be read
    why: str  # why ``between`` is None


# a tool schema for probing templates that need tools to render at all (Hermes tool_use): markers do not depend on it
PROBE_TOOLS = [{"type": "function", "function": {"name": "probe", "description": "probe", "parameters": {}}}]


def _render_chunks(
    messages, tokenizer, template, add_generation_prompt=False, tools=None
) -> tuple[str, set[int]] | None:
    """The rendering and the character offsets where the template's output pieces end (each ``{{ ... }}``
    and each run of literal text is one piece), or None when the template rejects the conversation."""
    try:
        parts = list(
            _compile(template).generate(
                messages=messages,
                tools=tools,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **_template_kwargs(tokenizer),
            )
        )
    except Exception:
        return None
    return "".join(parts), set(accumulate(map(len, parts)))


def _eot(roles: tuple, tokenizer, template, tools=None) -> _Eot:
    """The end-of-turn marker a template writes after the reply of the last message in ``roles`` (an assistant),
    read from the template itself, once per role prefix (cached).

    The conversation is rendered with sentinel contents ending at the reply, followed by a user message, and
    with the generation prompt (and followed by a system message when the template accepts it). The marker is
    the text after the reply that these renderings share, cut at the end of one of the template's output pieces
    (so ``<|end|><|user|>`` vs ``<|end|><|endoftext|>`` gives ``<|end|>``, not ``<|end|><|``) and without
    trailing whitespace, and never reaching into the next user turn's opening (as the template writes that
    opening at the start of a conversation: ``<|end|>`` from ``<|end|><|start|>user``, where both continuations
    open with ``<|start|>``; a system message's opening where a default system block hides the user turn's).
    When the template leaves a final reply open, the marker between turns is what follows the reply up to that
    opening, when every continuation starts with it. What cannot be decided this way is None: no marker is
    trained, never a guess."""
    cache = _info(tokenizer).setdefault("eot", {})
    key = (template, roles, tools is not None)
    found = cache.get(key)
    if found is not None:
        return found
    head = [{"role": r, "content": _sentinel(i)} for i, r in enumerate(roles)]
    reply, probe = _sentinel(len(roles) - 1), _sentinel(len(roles))

    def after_reply(messages, generation=False):
        r = _render_chunks(messages, tokenizer, template, generation, tools)
        if r is None:
            return None
        text, ends = r
        pos = text.find(reply)
        if pos < 0 or text.find(reply, pos + 1) >= 0:
            return None
        e = pos + len(reply)
        return text[e:], {x - e for x in ends if x > e}

    last = after_reply(head)
    user = after_reply(head + [{"role": "user", "content": probe}])
    system = after_reply(head + [{"role": "system", "content": probe}])
    follows = []
    for variant in (user, after_reply(head, generation=True), system):
        if variant is not None and (last is None or variant[0] != last[0]) and variant not in follows:
            follows.append(variant)
    between, why = None, ""
    closes = last is not None and last[0].strip() != ""
    pool = follows + ([last] if closes else [])
    # where the next turn's opening begins after the reply: it bounds the shared text when no closed final reply
    # does. A user turn's, else a system message's: a conversation's start may hold a default system block that
    # ends like the marker (Command R7B's), which a conversation that starts with its own system message has not
    starts = {role: _start(role, probe, tokenizer, template, tools) for role in ("user", "system")}
    opening = None
    for after, role in ((user, "user"), (system, "system")):
        if opening is None and after is not None:
            opening = _opening_at(after, probe, starts[role], tokenizer)
    if len(pool) >= 2:
        rests = [t for t, _ in pool]
        shared = min(_common_prefix_len(rests[0], t) for t in rests[1:])
        cut = max((b for b in set.intersection(*[b for _, b in pool]) if b <= shared), default=0)
        between = rests[0][: cut if opening is None or closes else min(cut, opening)].rstrip() or None
    if between is None and follows and opening is not None:
        marker = follows[0][0][:opening].rstrip()  # every continuation must start with it
        between = marker if marker and all(t.startswith(marker) for t, _ in follows) else None
    if between and not closes:
        # nor into the opening of a conversation's first turn, where no closed final reply bounds the marker and
        # the next turn's opening could not be told apart (a system block that writes more after its opening)
        between = _before_a_start(between, follows[0][1], starts.values(), tokenizer)
    if between is None:
        why = (
            "the template writes no text after the reply that every next message shares, up to the next turn's opening"
            if follows
            else "the template rejects every conversation that continues after this reply"
        )
    final = "" if last is not None else None  # a rendering ending at the reply that cannot be read is not "open"
    if closes:
        final = between if between and last[0].startswith(between) else last[0].rstrip()
    if len(cache) > 1024:
        cache.clear()
    found = cache[key] = _Eot(between, final, why)
    return found


def _start(role, probe, tokenizer, template, tools) -> tuple[str, set[int]] | None:
    """How a conversation starts with one ``role`` message: the rendering up to its content ``probe``, and where
    the template's output pieces end there; None when the template rejects it or does not write the content."""
    r = _render_chunks([{"role": role, "content": probe}], tokenizer, template, False, tools)
    if r is None or probe not in r[0]:
        return None
    return r[0][: r[0].find(probe)], r[1]


def _without_bos(text: str, tokenizer) -> str:
    bos = _info(tokenizer)["bos"]
    return text.removeprefix(bos) if bos else text


def _before_a_start(marker, ends, starts, tokenizer) -> str | None:
    """``marker`` up to its first piece (its pieces end at ``ends``) from which the rest of it is how a
    conversation starts after its BOS (``starts``, `_start`'s, with a user message or a system message): that rest
    opens the next turn (``<|eot_id|>`` from ``<|eot_id|><|start_header_id|>``). None when nothing is left before
    it."""
    starts = [_without_bos(s[0], tokenizer) for s in starts if s is not None]
    for b in sorted(e for e in ends if 0 < e < len(marker)):
        if any(s.startswith(marker[b:]) for s in starts):
            return marker[:b].rstrip() or None
    return marker


def _opening_at(after, probe, first, tokenizer) -> int | None:
    """Where the next turn's opening begins in ``after`` (the text after a reply, up to that turn's content
    ``probe``): the gap before the content minus the opening as the template writes it at the start of a
    conversation (``first``, `_start`'s for the turn's role: their common suffix, shortened until the opening
    starts one of the template's output pieces there: ``<|eot_id|>`` and ``<|begin_of_text|>`` share their last
    two characters). None when the template does not write the content, rejects a conversation that starts with
    such a message, or writes all of the gap and more before it (Llama 3.1's default system block ends with the
    same ``<|eot_id|>``): where the opening begins is not known. 0 when the gap is the opening itself (nothing
    written between a reply and the next turn)."""
    rest = after[0]
    if first is None or probe not in rest:
        return None
    (start, ends), gap = first, rest[: rest.find(probe)]
    shared = _common_prefix_len(gap[::-1], start[::-1])  # their common suffix
    while 0 < shared < len(start) and len(start) - shared not in ends:  # the opening starts a piece there
        shared -= 1
    at = len(gap) - shared
    if at == 0 and shared < len(_without_bos(start, tokenizer)):
        return None  # the start's opening holds all of the gap and more: the gap may end a block before it
    return at


def _close_turn(text, k, begin, content_end, messages, tokenizer, template, problems) -> AssistantTurn:
    """The reply of message k at ``text[begin:content_end]`` with its end-of-turn marker (`_eot`) when the text
    has it right there. A final reply the template leaves open ends at the reply (`render` may append)."""
    eot = _eot(tuple([m["role"] for m in messages[: k + 1]]), tokenizer, template)
    marker = eot.between if k < len(messages) - 1 else eot.final or ""  # a final None: `_append_final_eot` says
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
    question = _question(messages, k)
    at = _common_prefix_len(alone, pre)
    q = alone.find(question, max(0, at - len(question))) if question else -1  # shared a few characters into it
    at = q + len(question) if q >= 0 else at  # after the question: not its copy of the reply
    if _find_reply(alone, messages[k]["content"], at, len(alone)) is not None:
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


def _question(messages, k) -> str:
    """The text of the message before reply k, stripped, where that message is not a reply; "" otherwise."""
    return messages[k - 1]["content"].strip() if k and messages[k - 1]["role"] != "assistant" else ""


def _auto_turns(messages, tokenizer, template, text, assistants, problems) -> list[AssistantTurn]:
    """Each reply located in the final text, with its end-of-turn marker (`_close_turn`).

    Where the template is prefix-preserving (the rendering up to the reply's generation prompt is a prefix of
    the final text) the reply is taken right after that prompt, else where the sentinel rendering puts it (between
    the text it writes before and after it, `_between`; a form found elsewhere is a look-alike), else searched in
    the window after the prompt. Where it is not (a system prompt moved into the last user turn or a later one
    written first, a generation prompt that adds ``<think>\\n``, reasoning dropped from earlier turns) the reply is
    taken right where the full conversation, rendered with a sentinel in its place, writes it, when that rendering
    up to the sentinel is a prefix of the text; where even that is not (the template's text before the reply depends
    on the reply), where the rendering with the reply masked puts it (`_in_place`); else it is searched verbatim in
    the one full rendering, in order, after the part both renderings share and after the message before it. A reply
    not written verbatim there is refused with the message index and what differs."""
    pres, located = [], []
    for k in assistants:
        pre = (
            render_messages(messages[:k], tokenizer, template, add_generation_prompt=True)
            if k
            else _opening(messages, 0, tokenizer, template)
        )
        at = None
        if not text.startswith(pre):
            if k:
                # where the full rendering writes this reply, where what it writes before it does not depend on the
                # reply (a later system message written first, a generation prompt the history lacks)
                probe = _opening(messages, k, tokenizer, template)
                at = len(probe) if probe and text.startswith(probe) else None
            if text.startswith(pre.rstrip()):
                # the template ends every rendering with whitespace (a trailing newline after its last block): that
                # is not how the reply's turn starts; the reply is searched from before it, unless it is right where
                # the sentinel rendering places it, or the masked one (a newline before it is then the header's)
                at = at if at is not None else _in_place(messages, k, tokenizer, template, text)
                if at is None or _reply_at(text, messages[k]["content"], at, len(text)) is None:
                    pre, at = pre.rstrip(), None
            elif at is None:
                at = _in_place(messages, k, tokenizer, template, text)  # the text before it depends on the reply
        pres.append(pre)
        located.append(at)
    turns = []
    cursor = 0
    last = len(messages) - 1
    for i, k in enumerate(assistants):
        pre, content = pres[i], messages[k]["content"]
        exact = text.startswith(pre)
        lo = len(pre) if exact else located[i] if located[i] is not None else _common_prefix_len(pre, text)
        lo = max(lo, cursor)
        hi = len(pres[i + 1]) if i + 1 < len(pres) and text.startswith(pres[i + 1]) else len(text)
        hi = located[i + 1] if i + 1 < len(pres) and located[i + 1] is not None else hi
        if located[i] is not None or exact:  # the reply where the template writes it, right after its prompt
            span = _reply_at(text, content, lo, hi)  # (a trimmed reply there, not a later copy with its whitespace)
        if exact and span is None:
            span = _find_reply(text, content, lo, hi)  # the first form the window holds, unless ...
            if span and not (text[lo : span[0]].isspace() and text[span[0] : span[1]] == content.strip()):
                # ... there is text between the prompt and it ('<think></think>', a channel; not only a space
                # before the stripped reply, Llama 2's): where the sentinel rendering puts the reply says where it
                # is; where the text after the sentinel is also how the text ends, the reply is what lies between
                # (a form found elsewhere, a header's or a later message's, is not it: the template rewrites it);
                # where the sentinel changes the text before it (a first line counting the contents), the masked one
                around = _around(messages, k, tokenizer, template)
                if around and text.startswith(around[0]):
                    a, b = len(around[0]), len(text) - len(around[1])
                    if a <= b <= hi and text.endswith(around[1]):
                        span = _between(messages, k, tokenizer, template, text, a, b, hi)
                    else:
                        span = _reply_at(text, content, a, hi) or span
                elif (placed := _in_place(messages, k, tokenizer, template, text)) is not None:
                    span = _reply_at(text, content, placed, hi) or span
            elif span:  # the stripped reply after whitespace: the reply's own leading whitespace, where the text
                # has it right before and the template does not drop it (a newline of its own only where none is)
                lead = len(content) - len(content.lstrip())
                span = (span[0] - _own_lead(messages, k, tokenizer, template, text, lead, span[0]), span[1])
        elif located[i] is None and not exact:
            span = _find_reply(text, content, lo, hi)
        start = lo  # where the reply's turn may begin: after the message before it, where that is placed
        before = _question(messages, k)
        if (
            span is not None
            and located[i] is None
            and not exact
            and before
            and not cursor <= pre.rfind(before) <= lo - len(before)
        ):
            # the message before the reply (not in the part both renderings share, after the turn before it: not an
            # earlier message saying the same), found before it: the reply is after it (not a quote inside it);
            # looked for from a little before lo, which the two renderings may share a few characters into its text
            p = text.find(before, max(cursor, lo - len(before)), hi)
            asked = messages[k - 1]["role"] == "user"  # a user message is written; a system message may be dropped
            if span[1] <= p and asked:  # found before the question (in the system prompt, a header): not it
                span = _find_reply(text, content, p + len(before), hi)
            while span is not None and 0 <= p <= span[0]:
                # not after it: the question opens with the reply's text (or is it), or only the question's copy
                # of the reply is written (the template rewrites the reply itself): not the reply. Where the place
                # is the question's own, a user message (written) has it; another (maybe not written) may not
                span = _find_reply(text, content, p + len(before), hi) or (span if not asked and p == span[0] else None)
                if span is None:
                    break
                start = p + len(before) if p + len(before) <= span[0] else start
                p = text.find(before, p + 1, span[0])  # the question written again before the reply
        if span is not None and k < last:
            # what was found lies after the next message starts (a question that quotes the reply as the message
            # holds it, where the template rewrites it), or is the start of a longer one: the reply is before that
            # message, or not written verbatim (a next message written after it, or not at all, is not in question)
            after = messages[k + 1]["content"].strip()
            q = text.find(after, start, hi) if after and text.find(after, span[1]) < 0 else -1
            if 0 <= q <= span[0] and (q < span[0] or span[1] - span[0] < len(after)):
                span = _find_reply(text, content, start, q)
        alone = None
        if span is None:
            alone = render_messages(messages[: k + 1], tokenizer, template) if k != last else text
        if span is None and (not exact or _find_reply(alone, content, lo, len(alone)) is not None):
            raise _not_verbatim(k, _rewrite_reason(messages, k, tokenizer, template, text, pre, alone))
        if span is None:
            # the template rewrites the reply wherever it is (e.g. a filter), in a prefix-preserving rendering:
            # train the turn's text minus surrounding whitespace, and say so
            end = _common_prefix_len(alone, text)
            window = text[lo:end]
            b, e = lo + len(window) - len(window.lstrip()), lo + len(window.rstrip())
            problems.append(
                f"content_not_verbatim: message {k}: the template does not write the reply verbatim; "
                + (
                    f"trained the whole turn text at chars {b}..{e}"
                    if b < e
                    else "it writes no text of it: none trained"
                )
            )
            turn = AssistantTurn(k, b, max(b, e), max(b, e))
        else:
            span = _before_marker(text, content, span, k, messages, tokenizer, template)
            turn = _close_turn(text, k, span[0], span[1], messages, tokenizer, template, problems)
        turns.append(turn)
        cursor = turn.end
    return turns


def _between(messages, k, tokenizer, template, text, a, b, hi) -> tuple[int, int] | None:
    """Reply k, where the conversation rendered with a sentinel in its place shares the text before ``a`` and after
    ``b``: all of ``text[a:b]`` where that is the reply less some of its whitespace (Qwen3 strips a last reply's
    newlines, not its spaces), with the rest of its leading whitespace where the text has it right before ``a``,
    less the most of it the template drops (the full rendering is the same without it; a template that writes a
    newline of its own only before a reply that has none drops none of the reply's); else the form written at ``a``
    or the first after it, where that starts before ``b`` (what the template writes after a reply may coincide with
    the reply's end: a '.' added to a reply that lacks one); else None (the template rewrites the reply: its copy in
    a tag or a later message is not it)."""
    content, written = messages[k]["content"], text[a:b]
    i = content.find(written) if written.strip() == content.strip() else -1
    if i >= 0:
        return a - _own_lead(messages, k, tokenizer, template, text, i, a), b
    span = _reply_at(text, content, a, hi) or _find_reply(text, content, a, hi)
    return span if span and span[0] < max(b, a + 1) else None


def _own_lead(messages, k, tokenizer, template, text, i, at) -> int:
    """How much of reply k's leading whitespace ``content[:i]`` (which the text at ``at`` lacks) is written right
    before ``at`` and is the reply's: what the text has there, less the most of it the template drops (the full
    rendering the same without it: a template drops a run of it from the start, so the lengths that leave the
    rendering the same are those up to some length, found by bisection: a few renders for any length of whitespace;
    none where the text has none of it there)."""
    content = messages[k]["content"]
    n = next((n for n in range(i, 0, -1) if text.endswith(content[i - n : i], 0, at)), 0)  # the most the text has

    def same(j: int) -> bool:  # the template drops content[:j]
        return j == 0 or _rendered_with(messages, k, content[j:], tokenizer, template) == text

    if not n or same(i) or not same(i - n):  # the template drops all of it, or the text has none of the reply's
        return 0
    kept, dropped = i - n, i  # same(kept), not same(dropped): the most it drops lies between
    while dropped - kept > 1:
        mid = (kept + dropped) // 2
        kept, dropped = (mid, dropped) if same(mid) else (kept, mid)
    return i - kept


def _rendered_with(messages, k, content, tokenizer, template) -> str | None:
    """The full conversation rendered with ``content`` for message k; None where the template rejects it."""
    try:
        return render_messages(
            messages[:k] + [{**messages[k], "content": content}] + messages[k + 1 :], tokenizer, template
        )
    except TemplateError:
        return None


def _not_verbatim(k: int, why: str) -> TemplateError:
    """The refusal of a row whose reply k cannot be located, saying ``why`` and what to do."""
    return TemplateError(
        f"chat template does not write message {k} (assistant) verbatim in the full rendering, so the reply cannot "
        f"be located: {why}. Use chat.masking.mode=delimiters or a template that writes each reply verbatim."
    )


def _before_marker(text, content, span, k, messages, tokenizer, template) -> tuple[int, int]:
    """``span``, or where the reply is written right before the first end-of-turn marker after it, when the marker
    does not follow ``span`` itself: a short reply found first inside its turn's header ('A' in Vicuna's
    'ASSISTANT:', 'S' in '[/INST]' or '<|START_RESPONSE|>'). Not past the next message's text."""
    eot = _eot(tuple([m["role"] for m in messages[: k + 1]]), tokenizer, template)
    marker = eot.between if k < len(messages) - 1 else eot.final
    at = text.find(marker, span[1]) if marker else -1  # span[1] itself where the marker follows it
    after = messages[k + 1]["content"].strip() if k < len(messages) - 1 else ""
    if at < 0 or (after and text.find(after, span[1], at) >= 0):
        return span
    for variant in _written_forms(content):
        if text.endswith(variant, span[1], at):
            return at - len(variant), at
    return span


def _opening(messages, k, tokenizer, template) -> str:
    """What the template writes before reply k in the whole conversation (for k = 0: a default system block, the
    turn's opening): the conversation rendered with a sentinel for that reply, up to it; "" where the template does
    not write it once (a preview of each reply, a message holding the sentinel's text) or rejects the probe (a first
    reply is then searched from the start, a later one as if there were no sentinel rendering)."""
    around = _around(messages, k, tokenizer, template)
    return around[0] if around else ""


def _around(messages, k, tokenizer, template) -> tuple[str, str] | None:
    """The conversation rendered with a sentinel for reply k: what the template writes before it and after it;
    None where it does not write the sentinel once, or rejects it (see `_opening`)."""
    rendered = _rendered_with(messages, k, _sentinel(k), tokenizer, template)
    at = rendered.find(_sentinel(k)) if rendered is not None else -1
    if at < 0 or rendered.find(_sentinel(k), at + 1) >= 0:
        return None
    return rendered[:at], rendered[at + len(_sentinel(k)) :]


def _in_place(messages, k, tokenizer, template, text) -> int | None:
    """Where the full rendering ``text`` writes reply k, read from the conversation rendered with the reply masked
    (each non-whitespace character a NUL, which the text does not hold): the masked run is written once, and what
    the template writes before it is how the text starts, or what it writes after it is how the text ends (a first
    line that counts the contents' characters or their vowels changes the one, not the other); the reply must be
    written right there (else the other side is tried: a masked reply may change what the template writes next to
    it). Its leading whitespace, where the text has it before the reply, is the reply's where the text before the
    reply changes both when that whitespace is moved to the reply's end and when it is replaced by other whitespace
    (else it is the header's: a template that trims it, strips newlines only, or counts the reply's lines). None
    otherwise: the template writes the reply more than once, or text both before and after it that depends on it.
    Refused (TemplateError) where the text after the run's place (read from the text's end) and the 16 characters
    before it are the masked rendering's, and neither the reply nor a copy overlapping that place is there: the
    template rewrites it (a case filter). (A reply of whitespace only never comes here: `_content_text` refuses it.)"""
    content, mask = messages[k]["content"], "\x00"
    core = content.strip()  # from the first masked character to the last
    if mask in text or not core:
        return None
    lead = content[: content.find(core)]

    def masked(s: str) -> str:
        return "".join(c if c.isspace() else mask for c in s)

    run = masked(core)

    def masked_run(probe: str) -> tuple[str, int] | None:
        """The rendering with the reply's content ``probe``, and where the masked run starts; None where it is not
        written once, whole."""
        rendered = _rendered_with(messages, k, probe, tokenizer, template)
        if rendered is None:
            return None
        at = rendered.find(run)
        return (rendered, at) if at >= 0 and rendered.count(mask) == run.count(mask) else None

    found = masked_run(masked(content))
    if found is None:
        return None
    rendered, at = found
    place = len(text) - (len(rendered) - at)  # where the run is, read from the text's end
    ends = text.endswith(rendered[at + len(core) :])
    # the text before the run is how the text starts, or the text after it how it ends
    for start, shared in ((at, text.startswith(rendered[:at])), (place, ends)):
        if not (shared and start >= 0 and text.startswith(core, start)):
            continue  # (a masked reply changes what the template writes there: '?' or '<think>' in it)
        if lead and text.endswith(lead, 0, start):  # the text has it right before: the reply's, or the header's?
            rest = masked(content[len(lead) :])
            moved = masked_run(rest + lead)  # moved to the end (the same length and characters), and ...
            w = min(16, at, moved[1]) if moved else 0
            if w > 0 and rendered[at - w : at] != moved[0][moved[1] - w : moved[1]]:
                swapped = masked_run("".join("\t" if c == " " else " " for c in lead) + rest)  # ... other whitespace
                if swapped and not swapped[0].endswith(lead, 0, swapped[1]):
                    return start - len(lead)  # both change the text before the reply: the template writes it
        return start
    if (
        place >= 0
        and ends
        and text.endswith(rendered[max(0, at - 16) : at], 0, place)
        and text.find(core, max(0, place - len(core) + 1), place + 2 * len(core) - 1) < 0
    ):
        # the text after the run is the masked rendering's, and so is what comes right before it (a first line
        # counting vowels may differ), and no copy of the reply overlaps it (one shifted by a character the reply's
        # own text makes the template write): the template writes the reply there, rewritten
        raise _not_verbatim(
            k, f"the template rewrites the reply itself (it writes {text[place : place + len(core)]!r})"
        )
    return None


def _sentinel(i: int) -> str:
    """A probe content no text holds, which a template's case filter (``| upper``, ``| lower``) leaves as it is."""
    return f"\x00{i}\x00"


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

    >>> get_spans("Uhi|A:yo.|", "|A:", ".")   # "yo." is trained; the "|" after the end delimiter is masked
    [[0, 5], [9, 9]]
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


def render(
    conversation, tokenizer, masking: Masking | None = None, chat_template: str | None = None, tools=None
) -> RenderedSample:
    """Render a conversation with the chat template and find what is trained. See the module docstring.

    ``tools``: the row's tool schemas (a list or a JSON string; a row dict's own ``tools`` when None). A
    conversation with tools, tool calls, tool results or reasoning takes `backend.chat.agent`'s span finder.
    Raises `ConversationError` (bad messages) or `TemplateError` (bad template, or a reply it rewrites), and
    `TemplateCapabilityError` for a template that cannot write tools at all (a dataset-wide refusal).
    Per-sample issues that still give a usable sample are in ``.problems`` as ``"code: message"``.
    """
    from backend.chat.fastpath import _proven_text, _structure_turns  # the fast path, behind these two calls

    masking = masking or _DEFAULT_MASKING
    messages = _normalize_plain(conversation) if isinstance(conversation, list) else None
    if tools is None and isinstance(conversation, dict):
        tools = conversation.get("tools")
    if messages is None:
        messages = normalize_conversation(conversation)
    tools = normalize_tools(tools)
    template = resolve_template(tokenizer, chat_template)
    if masking.mode == "auto" and is_agent(messages, tools):
        return _render_agent(messages, tools, tokenizer, masking, template)
    problems: list[str] = []
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if masking.train_on == "last":
        target = assistants[-1:]
    else:
        target = assistants

    appended: list[tuple[int, int]] = []
    if masking.mode == "delimiters":
        text = None
        if assistants and not tools and not _has_generation(template):  # from a proven structure if any
            text = _proven_text(messages, tokenizer, template, assistants)
        if text is None:
            text = render_messages(messages, tokenizer, template, tools=tools)
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

    return _sample(text, turns, chosen, masking, messages, tokenizer, problems, appended, tools=tools)


def _sample(text, turns, chosen, masking: Masking, messages, tokenizer, problems, appended, **extra) -> RenderedSample:
    """The `RenderedSample` of a rendering: each chosen turn trained from its reply's start to the end of its
    end-of-turn marker (or of the reply, train_on_eot: false), plus the special-text check of the messages."""
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
        **extra,
    )


def _append_final_eot(text, turns, messages, tokenizer, template, problems, eot=None):
    """A final reply the template leaves open (no marker after it in the rendering): insert the template's
    between-turns marker right after it (chat.final_eot: append). Returns (text, turns, appended ranges)."""
    t = turns[-1] if turns else None
    if t is None or t.message_index != len(messages) - 1 or t.end > t.content_end:
        return text, turns, []
    eot = eot or _eot(tuple([m["role"] for m in messages]), tokenizer, template)
    if eot.final or t.begin == t.content_end:
        return text, turns, []  # the template closes it in its own way (or the turn has no reply text)
    if eot.final is None:
        problems.append(
            f"eot_undecided: message {t.message_index}: the template's rendering that ends at this reply cannot be "
            "read (it rejects it, or writes the reply more than once), so whether it closes the reply is unknown; "
            "nothing appended"
        )
        return text, turns, []
    if eot.between is None:
        problems.append(
            f"eot_undecided: message {t.message_index}: the template leaves the final reply open and its "
            f"between-turns marker could not be decided ({eot.why}); nothing appended"
        )
        return text, turns, []
    at, marker = t.content_end, eot.between
    text = text[:at] + marker + text[at:]
    return text, turns[:-1] + [AssistantTurn(t.message_index, t.begin, at, at + len(marker))], [(at, at + len(marker))]


def _render_agent(messages, tools, tokenizer, masking: Masking, template: str) -> RenderedSample:
    """`render` for agent traces (`backend.chat.agent`): tools passed to the template, each assistant turn from the
    end of its generation prompt to the end of its end-of-turn marker."""
    from backend.chat import agent

    agent.check_capability(messages, tools, template)
    problems: list[str] = []
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    target = assistants[-1:] if masking.train_on == "last" else assistants
    if not masking.train_on_tool_calls:
        target = [k for k in target if not messages[k].get("tool_calls")]
    text, turns = agent.agent_turns(messages, tools, tokenizer, template, None, target, _has_generation(template))
    appended: list[tuple[int, int]] = []
    if target and target[-1] == len(messages) - 1 and masking.train_on_eot and masking.final_eot == "append":
        between, final = agent._markers(messages, tools, tokenizer, template)
        eot = _Eot(between, final, "the template's marker between plain turns could not be decided")
        text, turns, appended = _append_final_eot(text, turns, messages, tokenizer, template, problems, eot)
    if not assistants:
        problems.append("span_not_found: the conversation has no assistant message; nothing is trained")
    results, reasoning, written = agent.trace_spans(messages, text, turns)
    dropped = [k for k, shown in written.items() if not shown]
    if dropped:
        chars = sum(len(messages[k]["reasoning_content"]) for k in dropped)
        problems.append(
            f"reasoning_dropped: message(s) {dropped}: the template does not write their reasoning ({chars} chars); "
            "chat.reasoning: every_turn trains it where the template writes a final reply's reasoning"
        )
    extra = dict(tools=tools, tool_result_spans=results, reasoning_spans=reasoning, reasoning_rendered=written)
    return _sample(text, turns, turns, masking, messages, tokenizer, problems, appended, **extra)


def eot_token_ids(tokenizer, chat_template: str | None = None) -> list[int]:
    """Token ids that end an assistant turn under this template (then the tokenizer's eos, if different).

    Found by rendering a probe conversation and reading the special tokens of the first reply's end-of-turn
    marker; e.g. Llama 3.1 -> [<|eot_id|>], ChatML -> [<|im_end|>, ...], Gemma -> [<end_of_turn>, <eos>].
    """
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    ids: list[int] = []
    for tools in (None, PROBE_TOOLS):  # a tool_use template (Hermes) renders nothing without tools
        try:
            r = render(probe, tokenizer, Masking(), chat_template, tools=tools)
        except ChatError:
            continue
        regex = _info(tokenizer)["regex"]
        for t in r.turns[:1]:
            for m in regex.finditer(r.text[t.content_end : t.end]) if regex else ():
                tid = tokenizer.convert_tokens_to_ids(m.group())
                if tid is not None and tid not in ids:
                    ids.append(int(tid))
        break
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    return ids
