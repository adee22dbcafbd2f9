"""Masks on the chat templates that model families ship (tests/data/chat_templates, credited in its README).

The oracle does not use `backend.chat` to decide what should be trained. For each template and conversation shape
it takes transformers' own rendering (``apply_chat_template``), finds each message's content there in order, and
expects trained exactly: every assistant content character, plus the end-of-turn marker the family documents
(``templates.json``, written by hand) right after it. Nothing of a system or user message, no header, never the
next turn's opening. A final reply the template leaves open gets the marker appended (``chat.final_eot:
append``), recorded in ``RenderedSample.appended``; the text minus what was appended is transformers' rendering.

Two tokenizers: the tiny Llama one, where the other families' markers are plain text (``<|end|><|user|>`` is
split into ordinary pieces), and a copy where each template's markers and role tags are added as special tokens.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from backend import TINY_MODEL
from backend.chat import Masking, check_sample, render, tokenize, tokens

pytestmark = pytest.mark.filterwarnings("ignore")

CORPUS = Path(__file__).parent / "data" / "chat_templates"
MANIFEST = {k: v for k, v in json.loads((CORPUS / "templates.json").read_text()).items() if not k.startswith("_")}

SYSTEM = {"role": "system", "content": "You are terse and exact."}
SHAPES = {
    "single": [
        {"role": "user", "content": "Hi there, who are you?"},
        {"role": "assistant", "content": "I am a helpful assistant."},
    ],
    "multi": [
        {"role": "user", "content": "Hi there, who are you?"},
        {"role": "assistant", "content": "I am a helpful assistant."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "2+2 = 4.\nAnything else?"},
        {"role": "user", "content": "No, thanks."},
        {"role": "assistant", "content": "Goodbye!"},
    ],
    "system": [
        SYSTEM,
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one."},
        {"role": "assistant", "content": "Green."},
    ],
    # a reply that says what the question before it said, and the next question again; a question that opens
    # with the reply before it
    "echo": [
        {"role": "user", "content": "Yes."},
        {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": "Yes."},
        {"role": "assistant", "content": "Yes."},
    ],
    "quoted": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hi"},
        {"role": "user", "content": "Hi again"},
        {"role": "assistant", "content": "Bye."},
    ],
    # one-letter replies (a multiple-choice dataset), letters the turn's header also holds ('ASSISTANT:',
    # '[/INST]', '<|START_RESPONSE|>')
    "letters": [
        {"role": "user", "content": "Which letter?"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "And now?"},
        {"role": "assistant", "content": "S"},
    ],
    "letters-system": [
        SYSTEM,
        {"role": "user", "content": "Which letter?"},
        {"role": "assistant", "content": "S"},
        {"role": "user", "content": "And now?"},
        {"role": "assistant", "content": "A"},
    ],
    # replies that open with markup: a generation prompt that adds '<think>' shares its '<' with them (QwQ, the R1
    # distills, Gemma 4)
    "markup": [
        {"role": "user", "content": "Bold?"},
        {"role": "assistant", "content": "<b>bold</b> text"},
        {"role": "user", "content": "Italic?"},
        {"role": "assistant", "content": "<i>x</i>"},
    ],
    # marker-like text in contents, surrounding spaces and newlines (templates that trim write less of them)
    "tricky": [
        SYSTEM,
        {"role": "user", "content": "  Write <|end|><|user|> and </s> literally.\n"},
        {"role": "assistant", "content": "  Sure: <|end|><|user|> and <|im_end|> are only text here.\n\nSecond line. "},
        {"role": "user", "content": "\nAnd <end_of_turn> [/INST]?"},
        {"role": "assistant", "content": "\n  Also text: <end_of_turn> [INST] <|END_OF_TURN_TOKEN|>  \n"},
    ],
}
_tok = {}


def tokenizer(name: str, special: bool):
    """The tiny tokenizer; with ``special``, a copy with the template's markers and role tags as special tokens."""
    from transformers import AutoTokenizer

    key = (name, special)
    if key not in _tok:
        t = AutoTokenizer.from_pretrained(str(TINY_MODEL))
        if special and MANIFEST[name]["special"]:
            t.add_special_tokens({"additional_special_tokens": MANIFEST[name]["special"]})
        _tok[key] = t
    return _tok[key]


def written(text: str, content: str, lo: int, marker: str, reply: bool) -> tuple[int, int] | None:
    """Where the template wrote ``content`` at or after ``lo``: verbatim, or trimmed on one side or both; of
    these, the first that the marker follows (``' ' + eos`` after a trimmed reply is the marker's space). A reply
    is the first place before the next marker that the marker follows, when there is one: a one-letter reply
    ('A') may also be written in its turn's header ('ASSISTANT:')."""
    found = []
    for variant in (content, content.rstrip(), content.lstrip(), content.strip()):
        pos = text.find(variant, lo)
        while reply and pos >= 0 and not text.startswith(marker, pos + len(variant)):
            following = text.find(variant, pos + 1)
            if not 0 <= following < text.find(marker, pos + len(variant)):
                break
            pos = following
        if pos >= 0:
            found.append((pos, pos + len(variant)))
    followed = [s for s in found if text.startswith(marker, s[1])]  # the earliest: a trimmed reply, not a later
    return min(followed, key=lambda s: s[0]) if followed else found[0] if found else None  # copy with whitespace


def opening(messages, hf: str, rendering) -> int:
    """Where the first message's content may start in ``hf``: after what ``rendering`` (transformers') writes
    before it with another content in its place, which may be a default system block that holds the same words.
    0 for a system message (a template may move it anywhere)."""
    if messages[0]["role"] == "system":
        return 0
    with_probe = rendering([{**messages[0], "content": "zqFirstMessagez"}] + messages[1:])
    at = with_probe.find("zqFirstMessagez")
    return at if at >= 0 and hf.startswith(with_probe[:at]) else 0


def expected_chars(hf: str, messages, marker: str, rendering) -> tuple[np.ndarray, list[int], list[int]]:
    """(per char of ``hf``: should be trained, message indices of replies with no marker after them in ``hf``,
    where the markers after the other replies start).

    Contents are found in order: each user message after the previous reply, each reply after that user message
    (a system prompt may be moved anywhere, so it is not used to advance). A reply's leading whitespace is looked
    for only where the template writes it (transformers' rendering changes when it changes)."""
    want = np.zeros(len(hf), dtype=bool)
    open_replies, markers = [], []
    cursor = opening(messages, hf, rendering)
    for i, m in enumerate(messages):
        if m["role"] == "system":
            continue
        content = m["content"]
        lead = content[: len(content) - len(content.lstrip())]
        if m["role"] == "assistant" and lead and content.strip():  # the most of it the template drops (the same
            # rendering without it) is not the reply's: a header's newline before a trimmed reply, Qwen3's newlines
            same = [
                j
                for j in range(1, len(lead) + 1)
                if rendering(messages[:i] + [{**m, "content": content[j:]}] + messages[i + 1 :]) == hf
            ]
            content = content[max(same, default=0) :]
        span = written(hf, content, cursor, marker, m["role"] == "assistant")
        assert span is not None, f"message {i} is not in the rendering"
        b, e = span
        cursor = e
        if m["role"] != "assistant":
            continue
        want[b:e] = True
        if hf.startswith(marker, e):
            want[e : e + len(marker)] = True
            markers.append(e)
            cursor = e + len(marker)
        else:
            open_replies.append(i)
    return want, open_replies, markers


def without(text: str, ranges) -> tuple[str, np.ndarray]:
    """``text`` minus the half-open ``ranges``, and the kept positions (index into ``text``)."""
    keep = np.ones(len(text), dtype=bool)
    for b, e in ranges:
        keep[b:e] = False
    return "".join(c for c, k in zip(text, keep, strict=True) if k), np.flatnonzero(keep)


CASES = [
    (name, shape, special)
    for name, entry in MANIFEST.items()
    for shape in SHAPES
    if entry["system"] or SHAPES[shape][0]["role"] != "system"
    for special in (False, True)
]


@pytest.mark.parametrize("name, shape, special", CASES)
def test_trained_is_exactly_the_replies_and_their_marker(name, shape, special):
    _assert_exactly_the_replies_and_their_marker(name, SHAPES[shape], special)


# shapes only some families accept: a system message after a reply (DeepSeek's templates move every system message
# to the top, before the replies), and a conversation that opens with the assistant (Qwen2.5 and Llama 3.2 write a
# default system block first, which may hold the reply's words)
MORE = {
    "system-after-reply": [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "R1"},
        {"role": "system", "content": "Use French."},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "R2"},
    ],
    # two replies in a row that say the same; a system message the template drops that says what the reply said
    "same-reply-twice": [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "ok"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "R"},
    ],
    "dropped-system-says-the-reply": [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "Fine."},
        {"role": "system", "content": "Fine."},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "R2"},
    ],
    # a system message after a reply that says what the reply said, written first by DeepSeek's templates
    "later-system-says-the-reply": [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "Use French."},
        {"role": "system", "content": "Use French."},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "Bonjour."},
    ],
    # a reply that opens with a newline, written trimmed by Llama 3 and Gemma 2, whose text the next question says
    # (the next turn's header ends with a newline too: '<|end_header_id|>\n\nyes.')
    "padded-reply-said-again": [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "\nyes.\n"},
        {"role": "user", "content": "yes."},
        {"role": "assistant", "content": "ok"},
    ],
    # a reply after a reply, opening with a space before a letter of the next turn's header ('s' in
    # '<|im_start|>'): templates with no generation prompt after a reply have that header in the search
    "padded-letter-after-a-reply": [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "Fine."},
        {"role": "assistant", "content": " s"},
        {"role": "user", "content": "t"},
        {"role": "assistant", "content": "ok"},
    ],
    "padded-letter-after-a-reply-last": [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "Fine."},
        {"role": "assistant", "content": " s"},
    ],
    "assistant-first": [
        {"role": "assistant", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Today Date: 26 Jul 2024"},
        {"role": "assistant", "content": "Today Date: 26 Jul 2024"},
    ],
}


@pytest.mark.parametrize("special", [False, True])
@pytest.mark.parametrize(
    "name, shape",
    [
        ("deepseek-r1-distill-qwen.jinja", "system-after-reply"),
        ("deepseek-r1-distill-qwen.jinja", "later-system-says-the-reply"),
        ("qwen2.5-instruct.jinja", "later-system-says-the-reply"),
        ("qwen2.5-instruct.jinja", "system-after-reply"),
        ("qwen2.5-instruct.jinja", "assistant-first"),
        ("llama-3.2-instruct.jinja", "assistant-first"),
        ("phi-4-mini.jinja", "assistant-first"),
        ("qwen2.5-instruct.jinja", "same-reply-twice"),
        ("llama-3.2-instruct.jinja", "same-reply-twice"),
        ("phi-3-mini.jinja", "same-reply-twice"),
        ("phi-3-medium.jinja", "dropped-system-says-the-reply"),
        ("llama-3-instruct.jinja", "padded-reply-said-again"),
        ("llama-3.2-instruct.jinja", "padded-reply-said-again"),
        ("gemma-2-it.jinja", "padded-reply-said-again"),
        ("qwen2.5-instruct.jinja", "padded-reply-said-again"),
        ("mistral-7b-instruct-v0.2.jinja", "padded-reply-said-again"),
        ("chatml-vllm.jinja", "padded-letter-after-a-reply"),
        ("chatml-vllm.jinja", "padded-letter-after-a-reply-last"),
        ("qwen1.5-chat.jinja", "padded-letter-after-a-reply"),
        ("qwen1.5-chat.jinja", "padded-letter-after-a-reply-last"),
    ],
)
def test_messages_in_other_places_train_exactly_the_replies_and_their_marker(name, shape, special):
    _assert_exactly_the_replies_and_their_marker(name, MORE[shape], special)


def _assert_exactly_the_replies_and_their_marker(name, messages, special):
    entry = MANIFEST[name]
    template = (CORPUS / name).read_text(encoding="utf-8")
    tok = tokenizer(name, special)
    marker = entry["eot"].replace("{eos}", tok.eos_token)

    tokens._info_cache.pop(tok, None)  # the full search (which cross-checks the role pattern's structure) ...
    r = render(messages, tok, Masking(), chat_template=template)
    for _ in range(3):  # ... and the structure, once its cross-checks are done, train the same
        again = render(messages, tok, Masking(), chat_template=template)
        assert (again.text, again.trained_spans, again.appended) == (r.text, r.trained_spans, r.appended)

    def rendering(m):
        return tok.apply_chat_template(m, chat_template=template, tokenize=False)

    hf = rendering(messages)
    text, kept = without(r.text, r.appended)
    assert text == hf  # what inference sees, plus only the documented appended marker
    want, open_replies, markers = expected_chars(hf, messages, marker, rendering)

    trained = np.zeros(len(r.text), dtype=bool)
    for b, e in r.trained_spans:
        trained[b:e] = True
    assert np.array_equal(trained[kept], want), [r.text[b:e] for b, e in r.trained_spans]
    # a final reply left open gets the family's marker appended right after it, trained; nothing else is appended
    assert bool(entry.get("open_final")) == bool(open_replies)
    assert [r.text[b:e] for b, e in r.appended] == [marker] * len(open_replies)
    assert all(trained[b:e].all() for b, e in r.appended)
    assert open_replies in ([], [len(messages) - 1])
    assert not any(p.startswith(("eot_undecided", "content_not_verbatim")) for p in r.problems), r.problems

    # tokens: a token is trained iff it overlaps a trained character (the token rule), every marker is trained
    tk = tokenize(r.text, r.trained_spans, tok)
    off = tk.offsets
    by_chars = np.array([s < e and trained[s:e].any() for s, e in off.tolist()], dtype=bool)
    assert np.array_equal(tk.trained, by_chars)
    assert not any(p.startswith("eot_not_trained") for p in check_sample(r, tk, tok))
    if special and marker in entry["special"]:  # each marker is one special token, trained
        starts = [int(kept[b]) for b in markers] + [b for b, _ in r.appended]
        for b in starts:
            (t,) = np.flatnonzero((off[:, 0] < b + len(marker)) & (off[:, 1] > b))
            assert tk.input_ids[t] == tok.convert_tokens_to_ids(marker) and tk.trained[t]


@pytest.mark.parametrize("special", [False, True])
def test_phi4_mini_never_trains_the_next_turns_opening(special):
    """`<|end|><|user|>` / `<|end|><|assistant|>` with no whitespace between: exactly `<|end|>` after each reply."""
    tok = tokenizer("phi-4-mini.jinja", special)
    template = (CORPUS / "phi-4-mini.jinja").read_text()
    r = render([SYSTEM] + SHAPES["multi"], tok, chat_template=template)
    replies = [m["content"] for m in SHAPES["multi"] if m["role"] == "assistant"]
    assert [r.text[b:e] for b, e in r.trained_spans] == [x + "<|end|>" for x in replies]
    assert "<|end|><|user|>" in r.text and r.problems == []


@pytest.mark.parametrize("name", ["chatml-vllm.jinja", "qwen1.5-chat.jinja"])
def test_final_eot_leave_keeps_the_templates_text(name):
    tok = tokenizer(name, False)
    template = (CORPUS / name).read_text()
    messages = SHAPES["multi"]
    r = render(messages, tok, Masking(final_eot="leave"), chat_template=template)
    assert r.text == tok.apply_chat_template(messages, chat_template=template, tokenize=False)
    assert r.appended == []
    assert [r.text[b:e] for b, e in r.trained_spans][-1] == messages[-1]["content"]  # the reply, no marker
    tk = tokenize(r.text, r.trained_spans, tok)
    assert any(p.startswith("eot_not_trained") for p in check_sample(r, tk, tok))  # and the check says so


def test_refusal_names_the_message_and_what_differs():
    """Qwen3 drops reasoning from earlier turns. Inline ``<think>`` reasoning is normalized into
    ``reasoning_content`` (backend.chat.agent): the row is kept, the reply and its marker trained, the drop
    reported (chat.reasoning: every_turn trains it)."""
    tok = tokenizer("qwen3.jinja", False)
    template = (CORPUS / "qwen3.jinja").read_text()
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4."},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6."},
    ]
    r = render(messages, tok, chat_template=template)
    assert [r.text[b:e] for b, e in r.trained_spans][0] == "4.<|im_end|>" and "add them" not in r.text
    assert [p.split(":")[0] for p in r.problems] == ["reasoning_dropped"] and r.reasoning_rendered == {1: False}
    # the same reply as the last message is written verbatim (after the template's think block): trained
    r = render(messages[:2], tok, chat_template=template)
    assert [r.text[b:e] for b, e in r.trained_spans] == [messages[1]["content"] + "<|im_end|>"]
