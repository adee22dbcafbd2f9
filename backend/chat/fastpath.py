"""The structure cache: rows rendered by substitution where that is proven to equal the Jinja rendering.

Part of `backend.chat`; `render` calls it through `_structure_turns` / `_proven_text` and nothing else does.
The proof is `backend.template_probe.content_independent`; `bench/bench_chat.py` measures what it saves.
"""

from __future__ import annotations

import os
from itertools import accumulate

from backend.chat import templates  # templates.render_messages: one patchable place
from backend.chat.conversations import AssistantTurn, ChatError, RenderProofError
from backend.chat.templates import (
    _auto_turns,
    _common_prefix_len,
    _compile,
    _sentinel,
    _template_kwargs,
    resolve_template,
)
from backend.chat.tokens import _info

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
# content at all. Then the substitution IS the rendering and only the first _STRUCTURE_CHECKS rows and every
# _VERIFY_EVERY-th row are rendered as a check (all rows with SFT_STUDIO_VERIFY_RENDER=1), in both masking modes;
# a difference there is an internal error, raised loudly.
_PAD = " \n"  # around each sentinel: tells a template that writes content verbatim from one that strips it


_STRUCTURE_CHECKS = 3


_VERIFY_EVERY = 64


def _today():
    import datetime

    return datetime.date.today()


class _Structure:
    __slots__ = (
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
        # literals: the n_slots + 1 fixed strings around the contents
        self.slots = slots  # [(message index, strip: bool)] in text order
        self.turns = turns  # [(message index, slot number, marker length)] in turn order
        self.checks_left = _STRUCTURE_CHECKS
        self.proven = proven  # the template never inspects content: no per-row render needed
        self.rows = 0
        self.day = day  # the date it was built on: a proven structure is rebuilt when the day changes
        self.reason = reason  # why it is not proven ("" when it is)
        self.pieces = [x for lit in literals for x in (lit, None)][:-1]  # literals, a hole for each content
        self.literal_ends = list(accumulate(map(len, literals)))  # chars of literals[0..n]


def _build_structure(roles, tokenizer, template, target) -> _Structure | None:
    probe = [{"role": r, "content": _PAD + _sentinel(i) + _PAD} for i, r in enumerate(roles)]
    try:
        text = templates.render_messages(probe, tokenizer, template)
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
            reason = "a content is stripped on one side only, or the template writes ' \\n' around it"
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
    if not st.proven or st.rows <= _STRUCTURE_CHECKS or st.rows % _VERIFY_EVERY == 0:  # rows: counted from 1
        real = templates.render_messages(messages, tokenizer, template)  # the one real render: the proof for this row
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
