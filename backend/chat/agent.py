"""Agent traces: where each assistant turn lies when turns call tools, follow tool results or carry reasoning.

Part of `backend.chat` (`render` calls `agent_turns` for a conversation that `is_agent`). A turn's trained span runs
from the end of its generation prompt to the end of its end-of-turn marker, as the template writes them in the
full rendering. So the model is trained on everything it writes after the prompt (reasoning where the template
writes it, the reply, the tool calls in the template's own format) and on the marker that ends its turn; tool
results, tool schemas, system and user text lie outside every such span and are never trained. No delimiter is
written by hand: the generation prompt and the marker are read from the template itself.

- The generation prompt: ``render(messages[:k], add_generation_prompt=True)`` is a prefix of the full rendering
  (the prefix diff), or, for a template that rewrites earlier turns (Qwen3 drops the reasoning of turns before
  the last user message), the prompt's text found right after message k-1 in the full rendering.
- The end: the rendering of ``messages[:k + 1]`` when it is a prefix of the full one, else the marker found
  before the next message; the marker is `templates._eot`'s (a template that writes it only when another
  message follows gets it from the text after the turn).
- Templates with ``{% generation %}`` blocks (one per assistant message): the blocks, as transformers'
  ``assistant_masks`` reads them.

What cannot be located is a `TemplateError` naming the message: never a guess.
"""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np

from backend.chat.conversations import AssistantTurn, TemplateCapabilityError, TemplateError
from backend.chat.templates import (
    PROBE_TOOLS,
    _common_prefix_len,
    _eot,
    _find_reply,
    _render_chunks,
    _render_generation,
    _sentinel,
    render_messages,
)


def check_capability(messages: list[dict], tools, template: str) -> None:
    """Refuse, once and for the whole dataset, a template that cannot write what the row holds.

    >>> try:
    ...     check_capability([{"role": "user", "content": "q"}], [{"type": "function"}], "{{ messages }}")
    ... except TemplateCapabilityError as e:
    ...     print(str(e)[:80])
    the chat template never reads 'tools', so it cannot write the row's tool schemas
    """
    missing = []
    if tools and "tools" not in template:
        missing.append(("tools", "the row's tool schemas", "drop the 'tools' column"))
    if any(m.get("tool_calls") for m in messages) and "tool_calls" not in template:
        missing.append(("tool_calls", "the assistant's tool calls", "drop the rows with tool calls"))
    if missing:
        name, what, drop = missing[0]
        name = name if name.startswith("the ") else repr(name)
        raise TemplateCapabilityError(
            f"the chat template never reads {name}, so it cannot write {what}; set chat.template to a "
            f"tool-capable template (e.g. the model's tool_use variant) or {drop}"
        )


def _markers(messages, tools, tokenizer, template) -> tuple[str | None, str | None]:
    """(between, final) end-of-turn markers of a plain reply under this template (`templates._eot`, probed with a
    tool schema when the row has tools). A marker `_eot` cannot decide because the final reply ends differently
    (gpt-oss: ``<|end|>`` between turns, ``<|return|>`` at the end) is what the continuations share."""
    probe = PROBE_TOOLS if tools else None
    roles = ("system", "user", "assistant") if messages[0]["role"] == "system" else ("user", "assistant")
    eot = _eot(roles, tokenizer, template, probe)
    if eot.between is None and roles[0] == "system":
        eot = _eot(("user", "assistant"), tokenizer, template, probe)
    between = eot.between if eot.between is not None else _shared_continuation(tokenizer, template, probe)
    return between, eot.final


def _shared_continuation(tokenizer, template, tools) -> str | None:
    """What a template writes after a reply both before a user message and before the generation prompt, cut
    where one of its output pieces ends, without trailing whitespace; None when nothing is shared."""
    head = [{"role": "user", "content": _sentinel(0)}, {"role": "assistant", "content": _sentinel(1)}]
    rests = []
    for messages, generation in ((head + [{"role": "user", "content": _sentinel(2)}], False), (head, True)):
        r = _render_chunks(messages, tokenizer, template, generation, tools)
        if r is None or _sentinel(1) not in r[0]:
            return None
        e = r[0].find(_sentinel(1)) + len(_sentinel(1))
        rests.append((r[0][e:], {x - e for x in r[1] if x > e}))
    shared = _common_prefix_len(rests[0][0], rests[1][0])
    cut = max((b for b in rests[0][1] & rests[1][1] if b <= shared), default=0)
    return rests[0][0][:cut].rstrip() or None


_K1 = "zSFTmessageBeforeReplyz"  # message k-1's text in `_begin`'s probe (printable: a template may JSON-encode it)


def _begin(k, messages, tools, tokenizer, template, text, cursor) -> int:
    """Where the template's generation prompt for message k ends in ``text`` (at or after ``cursor``)."""
    if k == 0:
        raise TemplateError(
            "message 0 (assistant): an agent trace must start with a system or user message before the first reply"
        )
    pre = render_messages(messages[:k], tokenizer, template, True, tools)
    for p in (pre, pre.rstrip()):
        if len(p) >= cursor and text.startswith(p):
            return len(p)
    # not a prefix (an earlier turn rewritten, a system prompt moved): what the template writes after message k-1
    # up to the reply (its closing and the generation prompt), read with a probe for k-1's text (its own text may
    # also sit in the template's markup: 'e' in '<|im_end|>'), found after message k-1 in the full text
    probe = messages[: k - 1] + [{**messages[k - 1], "content": _K1}]
    with_prompt, bare = (render_messages(probe, tokenizer, template, g, tools) for g in (True, False))
    at = with_prompt.rfind(_K1)
    tail = with_prompt[at + len(_K1) :] if at >= 0 else ""
    shared = _common_prefix_len(bare, with_prompt) - (len(with_prompt) - len(tail))  # where the prompt starts
    prompt_at = shared if 0 <= shared <= len(tail) else len(tail)
    before = messages[k - 1]["content"]
    # message k-1's text as the template writes it (gpt-oss JSON-encodes a result), then as the message holds it
    written = pre[at : len(pre) - len(tail)] if tail and pre[:at] == with_prompt[:at] and pre.endswith(tail) else ""
    starts = dict.fromkeys((_past_earlier_messages(k, messages, text, cursor, tail[:4]), cursor)) if tail else {}
    for variant in dict.fromkeys(v for v in (written, before, before.strip()) if v):
        for lo in starts:
            found = _tail_end(text, variant, tail, prompt_at, lo)
            if found is not None:
                return found
    raise TemplateError(
        f"message {k} (assistant): the template rewrites the conversation before this reply and what it writes "
        f"between message {k - 1} and the reply ({tail!r}) is not found after message {k - 1}, so the turn cannot be "
        "located; use a template that writes earlier turns the same way (or chat.masking.mode=delimiters)"
    )


def _tail_end(text, variant, tail, prompt_at, lo) -> int | None:
    """Where the reply begins after the first place at or after ``lo`` where ``variant`` (message k-1's text) is
    written and followed by ``tail``, what the template writes after it up to the reply: its closing, then from
    ``prompt_at`` on the generation prompt. Accepted there: the whole tail, or a head of it that reaches into the
    prompt ('<think>\n' may go); with no prompt (the reply follows the closing), a head of the closing. A head ends
    after a newline or a '>' (never inside '<|START_RESPONSE|>') and is never shorter than 4 characters, a lone '<'
    that could follow a quote. Where the closing is written otherwise once more follows
    (Hermes 3: '\n<|im_end|>' for '<|im_end|>'), the prompt must start within 8 characters of where it would.
    None: nowhere."""
    shortest = min(4, len(tail.strip()))
    cuts = [c for c in range(1, len(tail) + 1) if c in (prompt_at, len(tail)) or tail[c - 1] in "\n>"]
    role = prompt_at + _role_length(tail[prompt_at:])  # the prompt must be matched this far (its role line)
    pos = text.find(variant, lo)
    while pos >= 0 and shortest:  # each place message k-1 is written (it may be quoted earlier, too)
        after = pos + len(variant)
        shared = _common_prefix_len(tail, text[after : after + len(tail)])
        m = max((c for c in cuts if c <= shared), default=0)
        if len(tail[:m].strip()) >= shortest and (m >= role if role > prompt_at else True):
            return after + m
        for c in reversed(cuts) if role > prompt_at else ():  # the prompt, whole or its head, after the closing
            head = tail[prompt_at:c]
            if c >= role:
                q = text.find(head, after + min(m, prompt_at), after + prompt_at + 8 + len(head))
                if q >= 0:
                    return q + len(head)
        pos = text.find(variant, pos + 1)
    return None


def _role_length(prompt: str) -> int:
    r"""How much of a generation prompt a reply's start must match: its first line, without a reasoning opener the
    template may leave out before a reply ('<think>'). 0 for a prompt of only whitespace.

    >>> [_role_length(p) for p in ("<|im_start|>assistant\n<think>\n", "<｜Assistant｜><think>\n", "\n", "")]
    [21, 13, 0, 0]
    >>> [_role_length(p) for p in ("\n<|im_start|>assistant\n", "<|start|>assistant to=all\n")]
    [22, 25]
    """
    if not prompt.strip():
        return 0
    lead = len(prompt) - len(prompt.lstrip())
    first = prompt.lstrip().split("\n")[0]
    return lead + len(re.sub(r"<\|?think\|?>.*", "", first))


def _past_earlier_messages(k, messages, text, cursor, follow: str) -> int:
    """Where the tool results between the previous reply and message k-1 end in ``text``, each found after the one
    before it (from ``cursor``) where it is followed by ``follow`` (how the template closes message k-1: a result is
    closed the same way, and its text alone may also sit in a call's id or arguments): message k-1 is written after
    them, so a result that says what an earlier one said is looked for at its own place. Only tool results are
    walked (a template moves system prompts and merges user turns); one not found so is passed by."""
    previous = max((j for j in range(k) if messages[j]["role"] == "assistant"), default=-1)
    at = cursor
    for m in (m for m in messages[previous + 1 : k - 1] if m["role"] == "tool"):
        for variant in dict.fromkeys((m["content"], m["content"].strip())):
            found = text.find(variant + follow, at) if variant else -1
            if found >= 0:
                at = found + len(variant)
                break
    return at


def _candidates(markers) -> list[str]:
    """End-of-turn markers to look for: between, final, and the between marker's last tag (a call may end with
    ``<|END_ACTION|><|END_OF_TURN_TOKEN|>`` where a plain reply ends with ``<|END_RESPONSE|><|END_OF_TURN_TOKEN|>``).

    >>> _candidates(("<|END_RESPONSE|><|END_OF_TURN_TOKEN|>", ""))
    ['<|END_RESPONSE|><|END_OF_TURN_TOKEN|>', '<|END_OF_TURN_TOKEN|>']
    """
    between, final = markers
    tag = between[between.rfind("<") :] if between and "<" in between else None
    return [m for m in dict.fromkeys((between, final, tag)) if m]


def _last_call_end(message, text, lo, hi) -> int:
    """Where the last of the message's calls (its function names) ends in ``text[lo:hi]`` (-1: none is there). A
    marker found before it ends a block inside the turn, not the turn: gpt-oss writes a call's reasoning as an
    analysis block closed by ``<|end|>``, then the call, closed by ``<|call|>``. (Names, not the reply's text: a
    short reply could match inside a marker or the next turn's opening.)"""
    last = -1
    for call in message.get("tool_calls") or []:
        name = call["function"]["name"]
        at = text.rfind(name, lo, hi) if name else -1
        if at >= 0:
            last = max(last, at + len(name))
    return last


def _end(k, begin, messages, tools, tokenizer, template, text, markers) -> tuple[int, int]:
    """(content_end, end) of message k's turn: where its end-of-turn marker starts and ends."""
    candidates = _candidates(markers)
    if k == len(messages) - 1:
        e = len(text.rstrip())
        final = markers[1]
        if final and text.endswith(final, begin, e):
            return e - len(final), e
        last_call = _last_call_end(messages[k], text, begin, e)
        for marker in candidates:  # a template that opens another turn after the last one (Command R7B)
            q = text.rfind(marker, begin, e)
            if q >= 0 and q >= last_call:
                return q, q + len(marker)
        return _closing_tag(text, begin, e, last_call)  # or left open: `render` may append the between-turns marker
    through = render_messages(messages[: k + 1], tokenizer, template, False, tools)
    d = _common_prefix_len(through, text)
    last_call = _last_call_end(messages[k], text, begin, d)
    for marker in candidates:  # the last marker of the part the two renderings share (or right after it)
        q = text.rfind(marker, begin, d + len(marker))
        if q >= 0 and q >= last_call:
            return q, q + len(marker)
    written = through.rstrip()
    if len(written) > begin and text.startswith(written):  # the turn ends where the rendering up to it ends
        return _closing_tag(text, begin, len(written), _last_call_end(messages[k], text, begin, len(written)))
    if "<" in written[begin:]:  # how the turn ends when it is the last message (gpt-oss: '<|call|>' after a call)
        candidates = candidates + [written[written.rfind("<") :]]
    # the turn is written differently once later messages follow (Qwen3 drops its reasoning): the marker before
    # the next message
    # the next message's text, at the first place a marker precedes (it may also sit in this turn's arguments, or be
    # quoted later); JSON-escaped first, as gpt-oss and Command R7B write a tool result
    content = messages[k + 1]["content"]
    for variant in dict.fromkeys((json.dumps(content)[1:-1], content) if content.strip() else ()):
        start = begin
        while (found := _find_reply(text, variant, start, len(text))) is not None:
            for marker in candidates:
                q = text.rfind(marker, begin, found[0])
                if q >= 0:
                    return q, q + len(marker)
            start = found[0] + 1
    raise TemplateError(
        f"message {k} (assistant): none of the end-of-turn markers {candidates} is found after this reply and "
        f"before message {k + 1}, so the turn's end cannot be located"
    )


def _closing_tag(text, begin, e, last_call) -> tuple[int, int]:
    """(content_end, end) of a turn that ends at ``e`` with no end-of-turn marker of the template's: its closing
    tag after its last call is its marker (gpt-oss '<|call|>', Gemma 4's '<|tool_response>' that hands over to
    the tool), else it has none (a final reply left open: `render` may append
    the between-turns marker, chat.final_eot)."""
    tag = text.rfind("<", max(begin, last_call), e)
    if last_call >= 0 and tag >= 0 and text.endswith(">", begin, e):
        return tag, e
    return e, e


def _generation_turns(messages, tools, tokenizer, template, assistants, markers):
    """Turns from ``{% generation %}`` blocks when there is one block per assistant message, else None."""
    text, blocks = _render_generation(messages, tokenizer, template, tools)
    if len(blocks) != len(assistants):
        return text, None
    turns = []
    for (b, e), k in zip(blocks, assistants, strict=True):
        stop = b + len(text[b:e].rstrip())  # a block may go on past its marker ('<|im_end|>\n': LFM2.5, Laguna)
        content_end = next((at - len(m) for m in markers for at in (e, stop) if m and text.endswith(m, b, at)), e)
        turns.append(AssistantTurn(k, b, content_end, e))
    return text, turns


def agent_turns(messages, tools, tokenizer, template, text, target, generation: bool) -> tuple[str, list]:
    """(text, turns) of the assistant messages ``target`` in the full rendering ``text`` (None: render it)."""
    markers = _markers(messages, tools, tokenizer, template)
    if generation:
        assistants = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
        text, turns = _generation_turns(messages, tools, tokenizer, template, assistants, markers)
        if turns is not None:
            wanted = set(target)
            return text, _calls_written(messages, text, [t for t in turns if t.message_index in wanted])
    if text is None:
        text = render_messages(messages, tokenizer, template, False, tools)
    wanted, turns, cursor, trained_end = set(target), [], 0, 0

    def locate(k, start):  # (begin, content_end, end) of reply k, looked for after ``start``
        begin = _begin(k, messages, tools, tokenizer, template, text, start)
        return begin, *_end(k, begin, messages, tools, tokenizer, template, text, markers)

    # every reply is located in order, trained or not, so that the next one is looked for after it (a reply after
    # an untrained one is otherwise searched from the start of the text, where an earlier tool result or question
    # may say the same); one that is not trained and cannot be located is passed by
    for k in (j for j, m in enumerate(messages) if m["role"] == "assistant" and j <= max(wanted, default=-1)):
        try:
            begin, content_end, end = locate(k, cursor)
        except TemplateError:
            if k not in wanted:
                continue
            if cursor == trained_end:
                raise
            # an untrained reply before it was placed too far: from the end of the last trained one
            begin, content_end, end = locate(k, trained_end)
        if k in wanted:
            _check_reply_inside(k, messages, text, begin, content_end)
            turns.append(AssistantTurn(k, begin, content_end, end))
            trained_end = end
        cursor = end
    return text, _calls_written(messages, text, turns)


def _check_reply_inside(k, messages, text, begin, content_end) -> None:
    """Refuse a reply whose text the template writes after what follows it (Gemma 4: after the tool results)."""
    reply = messages[k]["content"].strip()
    at = text.find(reply, begin) if reply else -1
    if at >= 0 and at + len(reply) > content_end and text.find(reply, begin, content_end) < 0:
        raise TemplateError(
            f"message {k} (assistant): the template writes this reply's text outside its turn (after what "
            "follows it, e.g. after the tool results), so it cannot be trained as one turn; give the text and "
            "the tool calls as two assistant messages"
        )


def _calls_written(messages, text, turns):
    """``turns``, once every tool call of each is found written in it (its function name, as many times as it is
    called, outside the reply's text and reasoning). A template that drops a message's calls would train a turn
    without them: DeepSeek-R1-Distill writes calls only for a ``None`` content (an empty turn that ends the reply),
    gpt-oss only a message's first call."""
    for t in turns:
        message, turn = messages[t.message_index], text[t.begin : t.end]
        owns = [own for own in (message["content"], message.get("reasoning_content")) if own and own in turn]
        names = Counter(c["function"]["name"] for c in message.get("tool_calls") or [])
        # each call's name, once per call, besides where the turn's own reply or trace says it
        missing = [name for name, n in names.items() if turn.count(name) - sum(o.count(name) for o in owns) < n]
        if missing:
            raise TemplateError(
                f"message {t.message_index} (assistant): the template does not write its tool call(s) {missing} in "
                "its turn, so the turn would train without them; give each call its own assistant message if the "
                "template writes one call per message (gpt-oss), set chat.template to one that writes the calls "
                "(the Hugging Face form), or drop these rows"
            )
    return turns


def trace_spans(messages, text: str, turns) -> tuple[list, list, dict]:
    """(tool result spans, reasoning spans, {message index: reasoning written?}) in ``text``, for the studio
    and the dataset check. A tool result is searched after the turn before it; reasoning inside its turn.

    >>> msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": "r"},
    ...         {"role": "tool", "content": "res"}]
    >>> trace_spans(msgs, "U:q A:<r>a| T:res", [AssistantTurn(1, 6, 10, 11)])
    ([(14, 17)], [(7, 8)], {1: True})
    """
    by_message = {t.message_index: t for t in turns}
    results, reasoning, written = [], [], {}
    cursor = 0
    for i, m in enumerate(messages):
        t = by_message.get(i)
        if t is not None:
            r = m.get("reasoning_content")
            if r:
                pos = text.find(r, t.begin, t.end)
                written[i] = pos >= 0
                if pos >= 0:
                    reasoning.append((pos, pos + len(r)))
            cursor = t.end
        elif m["role"] == "tool" and m["content"]:
            found = _find_reply(text, m["content"], cursor, len(text))
            if found is not None:
                results.append(found)
                cursor = found[1]
    return results, reasoning, written


TRACE_KEYS = ("tool_calls_trained", "tool_results_masked", "reasoning_trained", "reasoning_dropped")


def trace_counts(rendered, tokenized, tokenizer=None) -> dict[str, int]:
    """What an agent trace trains, counted for the dataset check: tool calls in trained turns, tool results with no
    trained token, assistant turns whose reasoning is trained or dropped by the template (``as_rendered``), and
    with a tokenizer the tokens of the dropped reasoning (``reasoning_dropped_tokens``). All zero for a plain chat.

    ``tokenized``: the sample's `TokenizedSample` (its character offsets and trained mask).
    """
    counts = dict.fromkeys(TRACE_KEYS, 0)
    counts["reasoning_dropped_tokens"] = 0
    messages = rendered.messages or []
    if not (rendered.tools or rendered.reasoning_rendered or any(m.get("tool_calls") for m in messages)):
        return counts
    offsets, trained = np.asarray(tokenized.offsets).reshape(-1, 2), np.asarray(tokenized.trained)

    def any_trained(b, e):
        return bool(trained[(offsets[:, 0] < e) & (offsets[:, 1] > b)].any())

    for t in rendered.turns:
        if t.message_index >= 0 and any_trained(t.begin, t.end):
            counts["tool_calls_trained"] += len(rendered.messages[t.message_index].get("tool_calls", ()))
    counts["tool_results_masked"] = sum(not any_trained(b, e) for b, e in rendered.tool_result_spans)
    spans = iter(rendered.reasoning_spans)
    for k, written in rendered.reasoning_rendered.items():
        if written:
            b, e = next(spans)
            counts["reasoning_trained"] += any_trained(b, e)
        else:
            counts["reasoning_dropped"] += 1
            if tokenizer is not None:
                text = rendered.messages[k]["reasoning_content"]
                counts["reasoning_dropped_tokens"] += len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return counts
