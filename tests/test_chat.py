"""Tests for backend/chat/: what is trained, for every chat-template family shipped in assets/.

Run: .venv/bin/pytest tests/test_chat.py -x -q
"""

import json
import multiprocessing as mp
import random
import re
from pathlib import Path

import numpy as np
import pytest

from backend import SAMPLE_DATA, TEMPLATE_TOKENIZERS, TINY_MODEL
from backend.chat import (
    ConversationError,
    HealthReport,
    Masking,
    TemplateError,
    check_dataset,
    check_length,
    check_sample,
    eot_token_ids,
    get_spans,
    loss_masking_from_spans,
    normalize_conversation,
    render,
    spans_from_loss_masking,
    tokenize,
    tokenize_batch,
)

pytestmark = pytest.mark.filterwarnings("ignore")

FAMILIES = {
    # family: (path, end-of-turn marker, BOS string the template writes or None)
    "llama": (TINY_MODEL, "<|eot_id|>"),
    "chatml": (TEMPLATE_TOKENIZERS / "chatml", "<|im_end|>"),
    "gemma": (TEMPLATE_TOKENIZERS / "gemma", "<end_of_turn>"),
    "mistral": (TEMPLATE_TOKENIZERS / "mistral", "</s>"),
    "phi3": (TEMPLATE_TOKENIZERS / "phi3", "<|end|>"),
    "llama-generation": (TEMPLATE_TOKENIZERS / "llama-generation", "<|eot_id|>"),
}
_tok_cache = {}


def tok(family):
    from transformers import AutoTokenizer

    if family not in _tok_cache:
        _tok_cache[family] = AutoTokenizer.from_pretrained(str(FAMILIES[family][0]))
    return _tok_cache[family]


def fresh_tok(family):
    """``tok(family)`` with its memos (template structures, markers) forgotten: for tests that count what a
    first rendering builds, whatever ran before them in this process (mutmut's clean run runs every test twice)."""
    from backend.chat import tokens

    t = tok(family)
    tokens._info_cache.pop(t, None)
    return t


SYSTEM = {"from": "system", "value": "You are terse."}
TURNS = [
    {"from": "human", "value": "Hi there, who are you?"},
    {"from": "gpt", "value": "I am a helpful assistant."},
    {"from": "human", "value": "What is 2+2?"},
    {"from": "gpt", "value": "2+2 = 4.\nAnything else?"},
    {"from": "human", "value": "No, thanks."},
    {"from": "gpt", "value": "Goodbye!"},
]
REPLIES = [m["value"] for m in TURNS if m["from"] == "gpt"]
_WELCOME = [{"from": "gpt", "value": "Welcome."}]  # a conversation may open with the assistant
CHATML = (  # a minimal ChatML template: the fast-path tests build their variants from it
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
OTHER_TEXT = [SYSTEM["value"]] + [m["value"] for m in TURNS if m["from"] == "human"]


def trained_text(r):
    return "".join(r.text[b:e] for b, e in r.trained_spans)


def token_covered_text(text, tk):
    """The characters covered by trained tokens, per token (its offset range)."""
    return "".join(text[s:e] for (s, e), t in zip(tk.offsets.tolist(), tk.trained, strict=False) if t)


def n_bos(family, tk):
    bos_id = tok(family).bos_token_id
    return int((tk.input_ids == bos_id).sum()) if bos_id is not None else 0


# --------------------------------------------------------------------------------- per family, auto mode
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("with_system", [True, False])
def test_auto_trains_exactly_replies_and_eot(family, with_system):
    t = tok(family)
    conv = ([SYSTEM] if with_system else []) + TURNS
    r = render(conv, t)
    eot = FAMILIES[family][1]
    # the rendering is the tokenizer's own apply_chat_template output (what inference sees)
    assert r.text == t.apply_chat_template(normalize_conversation(conv), tokenize=False)
    assert trained_text(r) == "".join(reply + eot for reply in REPLIES)
    assert [r.text[b:e] for b, e in r.trained_spans] == [reply + eot for reply in REPLIES]
    assert r.problems == []
    # no header, system or user character is trained
    trained = np.zeros(len(r.text), bool)
    for b, e in r.trained_spans:
        trained[b:e] = True
    for other in OTHER_TEXT:
        pos = r.text.find(other)
        if pos >= 0:
            assert not trained[pos : pos + len(other)].any()
    # the loss-masking spans are the inclusive complement
    assert spans_from_loss_masking(len(r.text), r.loss_masking_spans) == r.trained_spans
    # token mask agrees with the char spans: trained tokens cover the replies (+ at most straddling whitespace)
    tk = tokenize(r.text, r.trained_spans, t)
    covered = token_covered_text(r.text, tk)
    assert covered.replace(" ", "") == trained_text(r).replace(" ", "")
    ids = t(r.text, add_special_tokens=False)["input_ids"]
    assert tk.input_ids[-len(ids) :].tolist() == ids  # nothing appended, nothing changed
    # BOS exactly once when the tokenizer or template uses one, never doubled
    expected_bos = (
        1 if (t.bos_token and (r.text.startswith(t.bos_token) or t("a")["input_ids"][0] == t.bos_token_id)) else 0
    )
    assert n_bos(family, tk) == expected_bos
    assert check_sample(r, tk, t) == []


@pytest.mark.parametrize("family", ["llama", "chatml", "gemma", "mistral", "phi3"])
def test_train_on_last_and_no_eot(family):
    t = tok(family)
    eot = FAMILIES[family][1]
    r = render([SYSTEM] + TURNS, t, Masking(train_on="last"))
    assert trained_text(r) == REPLIES[-1] + eot
    r = render([SYSTEM] + TURNS, t, Masking(train_on_eot=False))
    assert [r.text[b:e] for b, e in r.trained_spans] == REPLIES
    tk = tokenize(r.text, r.trained_spans, t)
    assert any(p.startswith("eot_not_trained") for p in check_sample(r, tk, t))


def test_generation_markers_agree_with_prefix_diff():
    """llama-generation has {% generation %}; the same template without markers goes through the prefix diff."""
    t = tok("llama-generation")
    src = t.chat_template
    plain = re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", src)
    assert plain != src and "{%- generation" in src and "endgeneration" not in plain
    for conv in ([SYSTEM] + TURNS, TURNS[:2], TURNS):
        a = render(conv, t)
        b = render(conv, t, chat_template=plain)
        assert a.text == b.text
        assert a.trained_spans == b.trained_spans
        # and with transformers' own token-level assistant mask
        out = t.apply_chat_template(
            normalize_conversation(conv), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        tk = tokenize(a.text, a.trained_spans, t)
        assert tk.input_ids.tolist() == list(out["input_ids"])
        assert tk.trained.astype(int).tolist() == list(out["assistant_masks"])


def test_generation_blocks_that_do_not_hold_each_reply_fall_back_to_the_prefix_diff():
    """``{% generation %}`` blocks are used only when there is one per reply and each holds its reply verbatim;
    blocks around the last reply only or all but the last, or around the role instead of the reply, train what
    the markerless template trains."""
    t = tok("chatml")
    tail = "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    last_only = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' and loop.last %}"
        "{% generation %}{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}" + tail
    )
    not_last = last_only.replace("and loop.last", "and not loop.last")
    role_only = (
        "{% for m in messages %}<|im_start|>{% if m.role == 'assistant' %}{% generation %}{{ m.role }}"
        "{% endgeneration %}{% else %}{{ m.role }}{% endif %}\n{{ m.content }}" + tail
    )
    for conv in (TURNS, [SYSTEM] + TURNS, TURNS[:2]):
        for tpl in (last_only, not_last, role_only):
            want = render(conv, t, chat_template=re.sub(r"\{% (end)?generation %\}", "", tpl))
            got = render(conv, t, chat_template=tpl)
            assert (got.text, got.trained_spans, got.problems) == (want.text, want.trained_spans, want.problems)
            assert trained_text(got) == "".join(m["value"] + "<|im_end|>" for m in conv if m["from"] == "gpt")


def test_a_generation_template_that_rejects_a_conversation_is_refused_with_its_own_message():
    """A ``{% generation %}`` template's ``raise_exception`` reaches the user as a TemplateError with its text."""
    t = tok("chatml")
    tpl = (
        "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('zqbad no system prompts') }}{% endif %}"
        "<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}{% generation %}{{ m.content }}<|im_end|>"
        "{% endgeneration %}{% else %}{{ m.content }}<|im_end|>{% endif %}\n{% endfor %}"
    )
    assert trained_text(render(TURNS, t, chat_template=tpl)) == "".join(
        m["value"] + "<|im_end|>" for m in TURNS if m["from"] == "gpt"
    )
    with pytest.raises(TemplateError) as e:
        render([SYSTEM] + TURNS, t, chat_template=tpl)
    assert str(e.value) == "chat template rejected the conversation: zqbad no system prompts"


def test_a_template_that_rewrites_every_reply_trains_each_turns_text_and_says_so():
    """A prefix-preserving template that writes replies otherwise than the messages hold them (upper-cased): no
    reply is found verbatim, so each turn's text up to where the next message starts is trained (the reply as
    written and the end-of-turn marker, never whitespace before it), and each is reported with its message and the
    characters trained."""
    t = tok("chatml")
    for newline in ("", "{{ '\\n' }}"):  # the turn as the generation prompt ends, or a newline more
        tpl = (
            "{% for m in messages %}<{{ m.role }}>{% if m.role == 'assistant' %}" + newline + "{{ m.content | upper }}"
            "{% else %}{{ m.content }}{% endif %}</s>{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
        )
        r = render(TURNS, t, chat_template=tpl)
        replies = [m["value"].upper() + "</s>" for m in TURNS if m["from"] == "gpt"]
        assert [r.text[b:e] for b, e in r.trained_spans] == replies  # never the newline before a reply
        starts = [r.text.index(x) for x in replies]
        assert [(turn.begin, turn.content_end, turn.end) for turn in r.turns] == [
            (b, b + len(x), b + len(x)) for b, x in zip(starts, replies, strict=True)
        ]
        assert r.problems == [
            f"content_not_verbatim: message {k}: the template does not write the reply verbatim; trained the whole "
            f"turn text at chars {b}..{b + len(x)}"
            for k, b, x in zip((1, 3, 5), starts, replies, strict=True)
        ]


_UPPER = (  # a prefix-preserving template that upper-cases every reply (and writes questions trimmed, on one line)
    "{% for m in messages %}<{{ m.role }}>{% if m.role == 'assistant' %}{{ m.content | upper }}{% else %}"
    "{{ m.content | replace('\\n', ' ') | trim }}{% endif %}</s>{% endfor %}{% if add_generation_prompt %}<assistant>"
    "{% endif %}"
)


@pytest.mark.parametrize(
    "conv",
    [
        _WELCOME + TURNS,  # the conversation opens with the assistant: nothing is rendered before its reply
        TURNS + [{"from": "human", "value": "Bye."}],  # it ends with a question after the last reply
        [  # the next question quotes the reply as the message holds it
            TURNS[0],
            TURNS[1],
            {"from": "human", "value": "You said: I am a helpful assistant. Why?  "},
            {"from": "gpt", "value": "Because."},
        ],
        TURNS[:4] + [{"from": "human", "value": "Earlier you said: I am a helpful assistant."}],  # two turns on
        # ... after a question written otherwise than the message holds it (its newline)
        TURNS[:2]
        + [{"from": "human", "value": "What is\n2+2?"}, TURNS[3]]
        + [{"from": "human", "value": "Earlier you said: I am a helpful assistant."}],
        [  # the questions before and after the reply hold its text
            {"from": "human", "value": "Say: Hello there."},
            {"from": "gpt", "value": "Hello there."},
            {"from": "human", "value": "You said: Hello there. Why?"},
            TURNS[3],
        ],
        [  # the next question opens with the reply's text
            TURNS[0],
            {"from": "gpt", "value": "Hello there."},
            {"from": "human", "value": "Hello there. Why?"},
            TURNS[3],
        ],
        [  # the question before the reply holds its text
            {"from": "human", "value": "Say: I am a helpful assistant."},
            TURNS[1],
            TURNS[2],
            TURNS[3],
        ],
    ],
    ids=[
        "assistant-first",
        "question-last",
        "quoted-after",
        "quoted-later",
        "quoted-later-rewritten",
        "quoted-before-and-after",
        "quoted-at-the-start",
        "quoted-before",
    ],
)
@pytest.mark.parametrize("trailing", ["", "{{ '\\n' }}"], ids=["", "newline-after-every-rendering"])
@pytest.mark.parametrize("case", ["upper", "lower"])
def test_a_rewritten_reply_is_trained_in_its_own_turn_whatever_surrounds_it(conv, trailing, case):
    """Replies the template rewrites are each trained as their turn's text, in their own turn: never the text of
    a question that quotes them as the message holds it (before or after the turn), never what follows the last
    reply, and never refused because a question holds the reply's text; also where the template ends every
    rendering with a newline (DeepSeek-V3's way), which the generation prompt is not followed by in the text.
    Upper- or lower-cased: a reply that opens the conversation is located by a probe the case filter rewrites."""
    t = tok("chatml")
    r = render(conv, t, chat_template=_UPPER.replace("| upper", "| " + case) + trailing)
    replies = [getattr(m["value"], case)() + "</s>" for m in conv if m["from"] == "gpt"]
    starts, at = [], 0
    for x in replies:  # each upper-cased reply, right after its turn's opening
        at = r.text.index("<assistant>" + x, at) + len("<assistant>")
        starts.append(at)
    assert [r.text[b:e] for b, e in r.trained_spans] == replies
    assert [(turn.begin, turn.end) for turn in r.turns] == [
        (b, b + len(x)) for b, x in zip(starts, replies, strict=True)
    ]
    assert [p.split(":")[0] for p in r.problems] == ["content_not_verbatim"] * len(replies)


def test_a_rewritten_reply_is_not_looked_for_past_the_next_replys_turn_where_a_later_prompt_is_no_prefix():
    """A prefix-preserving template that upper-cases one reply ('Hello'), and writes a line of its own only for a
    five-message conversation (so the last reply's prompt is no prefix of the six-message text, the others are): the
    rewritten reply is trained as its turn's text, not where a later question quotes it as the message holds it."""
    t = tok("chatml")
    tpl = (
        "{% if messages|length == 5 %}Five messages.\n{% endif %}"
        + _LOOP
        + "<|{{ m.role }}|>{{ m.content|upper if 'Hello' in m.content and m.role == 'assistant' else m.content }}"
        "<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    human, gpt = ({"from": f, "value": v} for f, v in (("human", "Why?"), ("gpt", "Hello")))
    conv = [TURNS[0], gpt, human, TURNS[1], {"from": "human", "value": "You said Hello. Why?"}, TURNS[3]]
    r = render(conv, t, chat_template=tpl)
    want = ["HELLO<|end|>", REPLIES[0] + "<|end|>", REPLIES[1] + "<|end|>"]
    assert [(r.text[b - 2 : b], r.text[b:e]) for b, e in r.trained_spans] == [("|>", x) for x in want]
    assert [p.split(":")[0] for p in r.problems] == ["content_not_verbatim"]


def test_a_reply_the_template_does_not_write_is_said_untrained_and_the_next_one_trained():
    """A template that drops an assistant message opening the conversation (and the next question quotes it): that
    reply is reported as not written and nothing is trained for it (not the quote); the next reply is trained in
    its own turn."""
    t = tok("chatml")
    tpl = (
        _LOOP + "{% if not (loop.first and m.role == 'assistant') %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    conv = [{"from": "gpt", "value": "Hello there"}, {"from": "human", "value": "Say Hello there"}, TURNS[1]]
    r = render(conv, t, chat_template=tpl)
    assert r.text == "<|user|>Say Hello there<|end|><|assistant|>" + REPLIES[0] + "<|end|>"
    assert [r.text[b:e] for b, e in r.trained_spans] == [REPLIES[0] + "<|end|>"]
    assert r.problems == [
        "content_not_verbatim: message 0: the template does not write the reply verbatim; it writes no text of it: "
        "none trained"
    ]


def test_a_reply_opening_the_conversation_is_found_after_a_later_system_message_written_before_it():
    """A template that writes every system message first (DeepSeek's way) and a conversation that opens with a
    reply the later system message holds: the reply is trained in its own turn, not inside the system prompt."""
    t = tok("chatml")
    tpl = (
        "{% for m in messages if m.role == 'system' %}<|system|>{{ m.content }}<|end|>{% endfor %}"
        "{% for m in messages if m.role != 'system' %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    system = {"from": "system", "value": "Always greet with: Hello there"}
    conv = [{"from": "gpt", "value": "Hello there"}, system, TURNS[0], TURNS[1]]
    r = render(conv, t, chat_template=tpl)
    assert r.text.startswith("<|system|>Always greet with: Hello there<|end|><|assistant|>Hello there<|end|>")
    assert [(r.text[b - 2 : b], r.text[b:e]) for b, e in r.trained_spans] == [
        ("|>", "Hello there<|end|>"),
        ("|>", REPLIES[0] + "<|end|>"),
    ]
    assert r.problems == []


@pytest.mark.parametrize(
    "tpl", [None, _UPPER.replace("{{ m.content | upper }}", "{{ m.content }}")], ids=["chatml", "plain"]
)
def test_a_reply_the_next_question_repeats_is_trained_at_its_own_place(tpl):
    """A question that says exactly what the reply before it said: the reply is trained in its turn, the
    question is not, and nothing is refused."""
    t = tok("chatml")
    eot = "<|im_end|>" if tpl is None else "</s>"
    # the same text, and a reply that opens with the question's text (written on one line by the plain template)
    for reply, question in (("Yes.", "Yes."), ("What is\n2+2? Four.", "What is\n2+2?")):
        conv = [TURNS[0], {"from": "gpt", "value": reply}, {"from": "human", "value": question}, TURNS[3]]
        r = render(conv, t, chat_template=tpl)
        assert [r.text[b:e] for b, e in r.trained_spans] == [reply + eot, REPLIES[1] + eot]
        assert r.trained_spans[0][0] == r.text.index(reply) and r.problems == []


def test_a_trimmed_reply_quoted_as_the_message_holds_it_is_trained_in_its_own_turn():
    """A template that trims replies, a reply with spaces around it, and a question after it that quotes it spaces
    and all: the reply as the message holds it is only in the question; the reply is its trimmed text, in its turn."""
    t = tok("chatml")
    tpl = CHATML.replace("{{ m.content }}", "{{ m.content | trim if m.role == 'assistant' else m.content }}")
    conv = [
        TURNS[0],
        {"from": "gpt", "value": " Hello there. "},
        {"from": "human", "value": "You said:  Hello there.  Why?"},
    ]
    r = render(conv + [TURNS[3]], t, chat_template=tpl)
    b, e = r.trained_spans[0]
    assert r.text[b:e] == "Hello there.<|im_end|>" and r.text[:b].endswith("<|im_start|>assistant\n")


def test_a_reply_that_opens_with_the_prompts_last_character_trains_none_of_the_prompt():
    """A template that trims replies, and a reply that opens with a newline as its generation prompt ends: the
    reply is found after the prompt, which is not trained (not one character earlier, where its text starts too)."""
    t = fresh_tok("chatml")
    tpl = CHATML.replace("{{ m.content }}", "{{ m.content | trim }}")
    conv = [TURNS[0], {"from": "gpt", "value": "\nI am a helpful assistant."}, TURNS[2], TURNS[3]]
    for _ in range(3):  # the structure's first rows are checked against the full search
        r = render(conv, t, chat_template=tpl)
        assert [r.text[b:e] for b, e in r.trained_spans] == [x + "<|im_end|>" for x in REPLIES[:2]]
        assert r.problems == []


def test_resolve_template_reads_the_tokenizers_default_and_names_a_tokenizer_without_one():
    from types import SimpleNamespace

    from backend.chat import resolve_template

    named = SimpleNamespace(chat_template={"default": "{{ x }}", "tool_use": "{{ y }}"}, name_or_path="org/model")
    assert resolve_template(named) == "{{ x }}"
    for missing in (None, "", {"tool_use": "{{ y }}"}):
        with pytest.raises(TemplateError, match=r"tokenizer 'org/model' has no chat template; set chat.template"):
            resolve_template(SimpleNamespace(chat_template=missing, name_or_path="org/model"))
    for bad in ("  ", 5):
        with pytest.raises(TemplateError, match="chat.template must be a non-empty Jinja string or a file path"):
            resolve_template(named, bad)


def test_llama_matches_guide_delimiters():
    """Auto mode on Llama 3.1 gives the same spans as the guide's delimiters."""
    t = tok("llama")
    m = Masking(
        mode="delimiters",
        start_delimiter="<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        end_delimiter="<|eot_id|>",
    )
    for conv in ([SYSTEM] + TURNS, TURNS):
        a, d = render(conv, t), render(conv, t, m)
        assert a.text == d.text and a.trained_spans == d.trained_spans and d.problems == []


# ------------------------------------------------------------------------------------- guide's get_spans
def guide_get_spans(text: str, start_delimiter: str, end_delimiter: str):
    """Copied verbatim from the guide (indentation restored): loops forever on some inputs."""
    spans = []
    start = 0
    while start < len(text):
        end = text.find(start_delimiter, start) + len(start_delimiter)
        if end == -1:
            break
        spans.append([start, end - 1])  # character span indices are inclusive
        start = text.find(end_delimiter, end) + len(end_delimiter)
    return spans


def _guide_worker(args, q):
    q.put(guide_get_spans(*args))


def run_guide(args, timeout=5):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_guide_worker, args=(args, q))
    p.start()
    p.join(timeout)
    if p.is_alive():
        p.kill()
        p.join()
        return "hang"
    return q.get(timeout=1)


LLAMA_SD = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
LLAMA_ED = "<|eot_id|>"


@pytest.mark.timeout(30)
def test_get_spans_equals_guide_on_well_formed_llama():
    t = tok("llama")
    rows = [json.loads(line) for line in open(SAMPLE_DATA)][:40]
    texts = [render(r, t).text for r in rows]
    for text in texts:
        assert get_spans(text, LLAMA_SD, LLAMA_ED) == run_guide((text, LLAMA_SD, LLAMA_ED))
    # and the guide's own example-level check: the spans mask everything except replies + <|eot_id|>
    r = render(rows[0], t, Masking(mode="delimiters", start_delimiter=LLAMA_SD, end_delimiter=LLAMA_ED))
    assert r.loss_masking_spans == [tuple(s) for s in run_guide((r.text, LLAMA_SD, LLAMA_ED))]


@pytest.mark.timeout(30)
def test_guide_snippet_hangs_where_ours_terminates():
    text = render(TURNS[:3], tok("llama")).text  # ends with a user turn
    assert run_guide((text, LLAMA_SD, LLAMA_ED), timeout=2) == "hang"
    spans = get_spans(text, LLAMA_SD, LLAMA_ED)
    assert spans[-1][1] == len(text) - 1  # the trailing user turn is masked


DELIM = Masking(mode="delimiters", start_delimiter=LLAMA_SD, end_delimiter=LLAMA_ED)
CHATML_SD, CHATML_ED = "<|im_start|>assistant\n", "<|im_end|>"  # ChatML's delimiters (Qwen, the CHATML template)


@pytest.mark.timeout(10)
def test_delimiters_conversation_ending_with_user():
    r = render(TURNS[:3], tok("llama"), DELIM)
    assert trained_text(r) == REPLIES[0] + LLAMA_ED
    assert r.problems == []  # 1 assistant message, 1 span


@pytest.mark.timeout(10)
def test_delimiters_missing_end_delimiter_trains_to_end():
    r = render(TURNS[:2], tok("llama"), Masking(mode="delimiters", start_delimiter=LLAMA_SD, end_delimiter="<END>"))
    assert trained_text(r) == REPLIES[0] + LLAMA_ED
    assert any(p.startswith("end_delimiter_missing") for p in r.problems)
    tk = tokenize(r.text, r.trained_spans, tok("llama"))
    begin = r.trained_spans[0][0]
    assert f"eot_not_trained: the assistant turn at char {begin} has no end-of-turn marker" in check_sample(
        r, tk, tok("llama")
    )


@pytest.mark.timeout(10)
def test_delimiter_turns_are_the_replies_and_their_end_delimiters():
    """Each delimiter turn is (no message index, reply start, reply end, end of the end delimiter), found in text
    that goes on after the last delimiter (a one-character reply included); a final reply the template leaves open
    is trained to the end of the text and said to be. With train_on_eot off, the replies alone are trained."""
    t = tok("chatml")
    sd, ed = CHATML_SD, CHATML_ED
    conv = [TURNS[0], {"role": "assistant", "content": "first"}, TURNS[2], {"role": "assistant", "content": "2"}]
    conv += [TURNS[2], {"role": "assistant", "content": "last"}]
    r = render(conv, t, Masking(mode="delimiters", start_delimiter=sd, end_delimiter=ed, train_on_eot=False))
    assert not r.text.endswith(ed) and r.problems == []
    expected, at = [], 0
    for reply in ("first", "2", "last"):
        b = r.text.index(sd, at) + len(sd)
        assert r.text.startswith(reply + ed, b)
        expected.append((-1, b, b + len(reply), b + len(reply) + len(ed)))
        at = expected[-1][3]
    assert [tuple(x) for x in r.turns] == expected
    assert r.trained_spans == [(b, c) for _, b, c, _ in expected]
    # the final reply left open by the template: its turn runs to the end of the text, with the problem said
    open_end = CHATML.replace("<|im_end|>\n", "{% if not loop.last %}<|im_end|>\n{% endif %}")
    r = render(conv, t, Masking(mode="delimiters", start_delimiter=sd, end_delimiter=ed), chat_template=open_end)
    assert r.text.endswith("last") and tuple(r.turns[-1]) == (-1, len(r.text) - 4, len(r.text), len(r.text))
    assert [p.split(":")[0] for p in r.problems] == ["end_delimiter_missing"]


@pytest.mark.timeout(10)
def test_delimiters_under_train_on_last_train_the_last_reply_alone():
    """Delimiter masking finds every turn; with train_on: last it trains the last reply alone and appends nothing."""
    masking = Masking(mode="delimiters", start_delimiter=CHATML_SD, end_delimiter=CHATML_ED, train_on="last")
    r = render(TURNS, tok("chatml"), masking)
    assert trained_text(r) == REPLIES[-1] + CHATML_ED and len(r.turns) == len(REPLIES) and r.appended == []


def test_a_row_given_as_a_dict_renders_with_its_own_tools():
    t = tok("chatml")
    tools = [{"type": "function", "function": {"name": "zqlookup", "description": "d", "parameters": {}}}]
    tpl = "{% if tools %}<tools>{{ tools|tojson }}</tools>{% endif %}" + CHATML
    row = {"conversations": TURNS[:2], "tools": tools}
    own = render(row, t, chat_template=tpl)
    assert "zqlookup" in own.text and own.text == render(TURNS[:2], t, chat_template=tpl, tools=tools).text


def test_a_conversation_without_a_reply_is_rendered_and_said_to_train_nothing():
    """A row with no assistant message still renders (the preview shows it) and trains nothing, said once."""
    t = tok("chatml")
    for conv in (TURNS[:1], [SYSTEM, TURNS[0]]):
        r = render(conv, t)
        assert r.text == t.apply_chat_template(normalize_conversation(conv), tokenize=False) and r.text
        assert (
            r.trained_spans == []
            and r.turns == []
            and r.problems == ["span_not_found: the conversation has no assistant message; nothing is trained"]
        )


def test_an_untrained_end_of_turn_is_reported_for_the_turns_trained_alone():
    """With train_on: last, the turns not trained are passed by and the last one is checked: its marker untrained
    (train_on_eot: false) is reported once, where it is."""
    t = tok("chatml")
    delimiters = dict(mode="delimiters", start_delimiter=CHATML_SD, end_delimiter=CHATML_ED)
    for masking in (
        Masking(train_on="last", train_on_eot=False),
        Masking(**delimiters, train_on="last", train_on_eot=False),
    ):
        r = render(TURNS, t, masking)
        last = r.turns[-1]  # delimiter masking finds every turn; automatic masking the trained one only
        problems = check_sample(r, tokenize(r.text, r.trained_spans, t), t)
        assert problems == [f"eot_not_trained: end-of-turn {r.text[last.content_end : last.end]!r} at char "
                            f"{last.content_end} is not trained"]  # fmt: skip


@pytest.mark.timeout(10)
def test_delimiters_absent():
    t = tok("llama")
    r = render(TURNS, t, Masking(mode="delimiters", start_delimiter=CHATML_SD, end_delimiter=CHATML_ED))
    assert r.trained_spans == [] and r.loss_masking_spans == [(0, len(r.text) - 1)]
    tk = tokenize(r.text, r.trained_spans, t)
    codes = [p.split(":")[0] for p in check_sample(r, tk, t)]
    assert "span_not_found" in codes and "no_trained_tokens" in codes


@pytest.mark.timeout(10)
def test_delimiter_text_in_content_terminates_and_is_reported():
    t = tok("llama")
    conv = [
        {"role": "user", "content": "Say <|eot_id|> please"},
        {"role": "assistant", "content": "Here: <|eot_id|> done"},
    ]
    r = render(conv, t, DELIM)
    # the reply is cut at the end delimiter inside it: reported, never a hang
    assert trained_text(r) == "Here: <|eot_id|>"
    codes = {p.split(":")[0] for p in r.problems}
    assert {"delimiter_in_content", "special_text_in_content"} <= codes
    # the original snippet hangs on this input
    assert run_guide((r.text, LLAMA_SD, LLAMA_ED), timeout=2) == "hang"
    # auto mode uses the structure and trains the whole reply
    a = render(conv, t)
    assert trained_text(a) == "Here: <|eot_id|> done<|eot_id|>"


def test_get_spans_masks_exactly_what_a_regex_scan_leaves_untrained():
    """Random texts over a small alphabet (delimiters at the text's start and end, adjacent, overlapping, missing):
    the characters get_spans leaves out of its masked spans are exactly those a left-to-right regex scan trains,
    from after each start delimiter through the next end delimiter (or to the end of the text)."""
    rng = random.Random(0)
    for sd, ed in (("|A:", "."), ("<s>", "</s>"), ("ab", "b")):
        scan = re.compile(re.escape(sd) + "(.*?" + re.escape(ed) + "|.*$)", re.DOTALL)
        alphabet = sorted(set(sd + ed + "xy"))
        for _ in range(400):
            text = "".join(rng.choice(alphabet + [sd, ed]) for _ in range(rng.randint(0, 12)))
            trained = set()
            for m in scan.finditer(text):
                trained.update(range(m.start(1), m.end(1)))
            masked = set()
            for b, e in get_spans(text, sd, ed):
                assert 0 <= b <= e < len(text)  # inclusive spans inside the text
                masked.update(range(b, e + 1))
            assert masked == set(range(len(text))) - trained, (text, sd, ed)
    assert get_spans("|A:yo.|", "|A:", ".") == [[0, 2], [6, 6]]  # a text that opens with the assistant's turn


def test_empty_delimiters_are_errors():
    with pytest.raises(ValueError, match="start_delimiter"):
        Masking(mode="delimiters", start_delimiter="", end_delimiter="x")
    with pytest.raises(ValueError, match="end_delimiter"):
        Masking(mode="delimiters", start_delimiter="x", end_delimiter=None)
    with pytest.raises(ValueError):
        get_spans("abc", "", "x")
    for key, value, names in [
        ("mode", "regex", "'auto', 'delimiters'"),
        ("train_on", "first", "'all', 'last'"),
        ("reasoning", "never", "'as_rendered', 'every_turn'"),
        ("final_eot", "drop", "'append', 'leave'"),
    ]:
        with pytest.raises(ValueError, match=rf"^chat\.(masking\.)?{key}: '{value}' is not one of {names}$"):
            Masking(**{key: value})
    assert Masking(mode="delimiters", start_delimiter="a", end_delimiter="b").end_delimiter == "b"


def test_span_conversions_roundtrip():
    assert loss_masking_from_spans(10, [(3, 6), (8, 10)]) == [(0, 2), (6, 7)]
    assert spans_from_loss_masking(10, [[0, 2], [6, 7]]) == [(3, 6), (8, 10)]
    assert spans_from_loss_masking(5, []) == [(0, 5)]
    assert loss_masking_from_spans(5, []) == [(0, 4)]


# ------------------------------------------------------------------------------------------ tokenization
def test_token_rule_straddling_tokens_are_trained():
    t = tok("llama")
    text = "hello world"
    enc = t(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    # a span that starts in the middle of the first token and ends in the middle of the last
    s0, e0 = offsets[0]
    sl, el = offsets[-1]
    span = (s0 + 1, el - 1) if e0 - s0 > 1 and el - sl > 1 else (s0, el)
    tk = tokenize(text, [span], t)
    exp = [(s < span[1] and e > span[0]) for s, e in offsets]
    assert tk.trained[1:].tolist() == exp  # index 0 is the added BOS (zero width, never trained)
    assert tk.input_ids[0] == t.bos_token_id and not tk.trained[0]
    # a span that touches a token only at its boundary does not train it
    tk = tokenize(text, [(offsets[1][0], offsets[1][1])], t)
    assert tk.trained[1:].tolist() == [i == 1 for i in range(len(offsets))]


def test_tokenize_batch_equals_tokenize():
    t = tok("llama")
    rs = [render(r, t) for r in [json.loads(line) for line in open(SAMPLE_DATA)][:20]]
    batch = tokenize_batch([r.text for r in rs], [r.trained_spans for r in rs], t)
    for r, b in zip(rs, batch, strict=False):
        s = tokenize(r.text, r.trained_spans, t)
        assert np.array_equal(s.input_ids, b.input_ids) and np.array_equal(s.trained, b.trained)
        assert n_bos("llama", b) == 1


@pytest.mark.parametrize("family", ["llama", "chatml", "gemma", "mistral", "phi3"])
def test_unicode_emoji_long_and_special_text(family):
    t = tok(family)
    eot = FAMILIES[family][1]
    long_reply = ("Lorem ipsum dolor sit amet. " * 4000)[:100_000].strip()
    replies = ["日本語の答えです。", "e\u0301 combining, emoji 👩‍👩‍👧 🎉", long_reply]
    conv = []
    for i, rep in enumerate(replies):
        conv += [{"role": "user", "content": f"question {i} 中文"}, {"role": "assistant", "content": rep}]
    r = render(conv, t)
    assert [r.text[b:e] for b, e in r.trained_spans] == [x + eot for x in replies]
    tk = tokenize(r.text, r.trained_spans, t)
    assert t.decode(tk.input_ids[tk.trained]).replace(" ", "") == "".join(x + eot for x in replies).replace(" ", "")
    # special-token text inside user content: reported, does not crash
    conv2 = [{"role": "user", "content": f"what does {eot} mean?"}, {"role": "assistant", "content": "It ends a turn."}]
    r2 = render(conv2, t)
    tk2 = tokenize(r2.text, r2.trained_spans, t)
    probs = check_sample(r2, tk2, t)
    assert any(p.startswith("special_text_in_content: message 0") for p in probs)
    assert trained_text(r2) == "It ends a turn." + eot


def test_special_text_is_found_for_added_special_tokens_too():
    """A token added as special (``add_tokens(AddedToken(..., special=True))``, as tokenizer files list tool and
    role markers) is not in ``all_special_tokens``; its text in a message still tokenizes as that one token, so it
    is reported like the named special tokens (a token added as plain text is not)."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(TINY_MODEL))
    t.add_tokens([AddedToken("<|tool|>", special=True), AddedToken("zqword", special=False)])
    assert len(t("<|tool|>", add_special_tokens=False)["input_ids"]) == 1  # (transformers 5 leaves it out of
    # all_special_tokens: the case this test is for)
    conv = [{"role": "user", "content": "what is <|tool|>?"}, {"role": "assistant", "content": "A zqword marker."}]
    r = render(conv, t)
    assert r.problems == [
        "special_text_in_content: message 0 (user) contains '<|tool|>', which tokenizes as the special token, not as "
        "text; clean the data if this is not intended"
    ]


# ------------------------------------------------------------------------------------- template problems
def test_non_prefix_preserving_template_is_located_or_refused_with_the_reason():
    t = tok("chatml")
    # a template that injects the turn count changes every earlier character, yet writes each reply verbatim:
    # the replies are located in the one full rendering, each with its marker
    counted = "Turns: {{ messages|length }}\n" + t.chat_template
    r = render(TURNS, t, chat_template=counted)
    assert r.text == t.apply_chat_template(normalize_conversation(TURNS), chat_template=counted, tokenize=False)
    assert [r.text[b:e] for b, e in r.trained_spans] == [x + "<|im_end|>" for x in REPLIES]
    assert r.problems == []
    # a template that rewrites earlier replies (like reasoning stripping) once later turns exist: refused, naming
    # the message and what differs
    strip = (
        "{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}<A>{{ m.content[:3] }}</A>"
        "{% elif m.role == 'assistant' %}<A>{{ m.content }}</A>{% else %}<U>{{ m.content }}</U>{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<A>{% endif %}"
    )
    assert _refusal_reason(TURNS, t, strip) == (1, REWRITTEN_EARLIER)
    # a system prompt the template leaves where it is: not said to be moved
    assert _refusal_reason([SYSTEM] + TURNS, t, strip) == (2, REWRITTEN_EARLIER)
    # a template that rewrites the reply itself, wherever it is
    upper = strip.replace("{{ m.content[:3] }}", "{{ m.content|upper }}").replace("and not loop.last", "")
    upper = "{{ messages|length }}" + upper
    assert _refusal_reason(TURNS, t, upper) == (1, REWRITTEN_REPLY)


_NO_CONTROL = (  # a template that rejects contents that hold a NUL and no digit: the probes that mask a reply (not
    # the sentinels, which hold their index) cannot run
    "{% for m in messages %}{% if '\\x00' in m.content and not m.content|select('in', '0123456789')|list %}"
    "{{ raise_exception('control characters') }}{% endif %}{% endfor %}"
)


_MEASURED = "{{ messages|map(attribute='content')|join|length }} characters\n"  # first lines that depend on contents
_VOWELS = "{{ messages|map(attribute='content')|join|select('in', 'aeiouAEIOU')|list|length }} vowels\n"
_DASHES = "{{ '-' * (messages|map(attribute='content')|join|length % 7) }}\n"  # a line whose own length changes


@pytest.fixture(
    params=["Turns: {{ messages|length }}\n", _MEASURED, _VOWELS, _NO_CONTROL + _MEASURED, _NO_CONTROL + _DASHES],
    ids=["counted", "measured", "vowels", "measured-no-probe", "measured-in-dashes-no-probe"],
)
def head(request):
    """A first line that makes every earlier character differ between the rendering up to a reply's generation
    prompt and the full one: the turn count (the full conversation with a sentinel in the reply's place shares it:
    the reply is located there), the contents' length or their vowels (it does not; the conversation with the reply
    masked shares the text before the reply, or after it), or the contents' length, also as a line whose own
    length changes with it, under a template that rejects the probes' control characters (the reply is searched
    after its question)."""
    return request.param


def test_a_question_asked_before_and_after_a_reply_is_not_taken_for_a_quote_of_it(head):
    """A template that changes every earlier character (the turn count written first) has each reply searched in
    the full rendering from before the questions; a user who asks the same question again after a reply (the
    next message's text is also written before the reply) does not make the reply look like a quote."""
    t = tok("chatml")
    counted = head + t.chat_template
    again = {"from": "human", "value": "Continue."}
    conv = [again, TURNS[1], again, TURNS[3], again, TURNS[5]]
    r = render(conv, t, chat_template=counted)
    assert [r.text[b:e] for b, e in r.trained_spans] == [x + "<|im_end|>" for x in REPLIES]
    assert r.problems == []


def test_a_reply_followed_by_a_reply_that_names_its_header_is_trained_in_its_own_turn():
    """A template that writes a channel header before each reply (gpt-oss's '<|channel|>final<|message|>'), and
    two replies in a row, the second saying 'final': the first reply's header holds the next message's text
    before the reply, and that message is written after it (past the next reply's generation prompt): the row is
    not refused, and the first reply is trained at its place. (The second is found in its own header, which the
    generation prompt does not hold: reported as eot_undecided, tests/MUTATION.md.)"""
    t = tok("chatml")
    tpl = (
        _LOOP + "{% if m.role == 'assistant' %}<|start|>assistant<|channel|>final<|message|>{{ m.content }}<|end|>"
        "{% else %}<|start|>{{ m.role }}<|message|>{{ m.content }}<|end|>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|start|>assistant{% endif %}"
    )
    conv = [TURNS[0], TURNS[1], {"from": "gpt", "value": "final"}, TURNS[2], TURNS[3]]
    r = render(conv, t, chat_template=tpl)
    b, e = r.trained_spans[0]
    assert r.text[b:e] == REPLIES[0] + "<|end|>" and r.text[b - len("<|message|>") : b] == "<|message|>"
    assert r.text[slice(*r.trained_spans[-1])] == REPLIES[1] + "<|end|>"


def test_a_rewritten_reply_quoted_before_and_after_it_is_refused_where_the_template_changes_earlier_text(head):
    """A template that changes every earlier character (the turn count first) and upper-cases replies: a reply
    quoted by the question before it and by the one after it is written nowhere verbatim in its turn; it is
    refused (no prefix-preserving window to train), never located in either question."""
    t = tok("chatml")
    counted = head + _UPPER
    conv = [
        {"from": "human", "value": "Say: Hello there."},
        {"from": "gpt", "value": "Hello there."},
        {"from": "human", "value": "You said: Hello there. Why?"},
        {"from": "gpt", "value": "Because."},
    ]
    with pytest.raises(TemplateError, match="does not write message 1 "):
        render(conv, t, chat_template=counted)


_SAY, _OK = {"from": "human", "value": "Say OK."}, {"from": "gpt", "value": "OK."}
_OKAY = {"from": "gpt", "value": "Okay."}  # not three characters, the length of a probe's sentinel


@pytest.mark.parametrize(
    "conv",
    [
        [{"from": "human", "value": "Continue."}, _OK] * 3,  # the same question and the same reply, three times
        [_SAY, _OK, _SAY, _OK],  # a question that holds the reply, asked twice
        [{"from": "human", "value": "OK. Go on."}, _OK, TURNS[2], TURNS[3]],  # a question that opens with it
    ],
    ids=["same-turns", "holds-it-twice", "opens-with-it"],
)
def test_each_reply_is_trained_in_its_own_turn_where_the_template_changes_every_earlier_character(conv, head):
    """Where every earlier character changes (the turn count first), each reply is searched after the question
    before it, in the full rendering: the reply in its own turn, never inside the question or an earlier turn."""
    t = tok("chatml")
    r = render(conv, t, chat_template=head + t.chat_template)
    header, at, starts = "<|im_start|>assistant\n", 0, []
    for m in (m for m in conv if m["from"] == "gpt"):
        at = r.text.index(header, at) + len(header)
        starts.append((at, at + len(m["value"]) + len("<|im_end|>")))
    assert r.trained_spans == starts and r.problems == []


@pytest.mark.parametrize(
    "head, conv",
    [  # earlier text longer the fewer the messages: the renderings share none of the earlier replies' places
        ("{{ '-' * (40 - 10 * (messages|length)) }}\n", [{"from": "human", "value": "Sure?"}] + [_OKAY] * 3),
        # the contents' length first: the conversation rendered with a sentinel in a reply's place differs before it
        ("{{ messages|map(attribute='content')|join|length }}\n", [{"from": "human", "value": "Sure?"}] + [_OKAY] * 3),
        # a start that depends on the first message: the reply that opens the conversation is not where it probes
        ("Opens with {{ messages[0].content|length }} characters.\n", [_OKAY, {"from": "human", "value": "Okay."}]),
    ],
    ids=["replies-in-a-row", "replies-in-a-row-measured", "opened-by-a-reply-the-last-message-says"],
)
def test_a_reply_after_a_reply_or_none_is_not_moved_past_a_message_before_it(head, conv):
    """Where the renderings differ before a reply, the reply is searched after the question before it; a reply
    whose message before it is a reply (the same text, three in a row), or that opens the conversation (the last
    message saying the same), has no question: each is trained in its own turn, none refused or moved on."""
    t = tok("chatml")
    r = render(conv, t, chat_template=head + CHATML)
    header, at, want = "<|im_start|>assistant\n", 0, []
    for m in (m for m in conv if m["from"] == "gpt"):
        at = r.text.index(header, at) + len(header)
        want.append((at, at + len(m["value"]) + len("<|im_end|>")))
    assert r.trained_spans == want and r.problems == []


def test_a_reply_that_repeats_the_question_before_it_is_trained_in_its_own_turn_without_role_markers():
    """A template that writes contents one per line and a generation prompt ('<think>') the text does not hold:
    the question before a reply is in what both renderings share, so a reply that says the same is its own."""
    t = tok("chatml")
    tpl = "{% for m in messages %}{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<think>\n{% endif %}"
    yes = [{"from": "human", "value": "Yes."}, {"from": "gpt", "value": "Yes."}]
    r = render(yes * 2, t, chat_template=tpl)
    assert r.text == "Yes.\n" * 4 and r.trained_spans == [(5, 9), (15, 19)]


def _says(*lines) -> list[dict]:
    return [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(lines)]


@pytest.mark.parametrize(
    "conv",
    [
        _says("say yes.", "yes."),  # the question opens the text and holds the reply
        _says("say yes.", "yes.", "and again?", "yes."),
        _says("yes.", "yes.", "yes.", "yes."),  # every message the same
        _says("yes.", "yes.", "yes. and?", "yes.", "yes."),  # a question that opens with the reply, one after it
        _says("a", "yes.", "yes.", "yes.", "yes.", "yes."),
    ],
    ids=["opens-the-text", "asked-again", "all-the-same", "opens-with-it", "same-after-the-first"],
)
@pytest.mark.parametrize("lead", ["", "{{ messages|length }} turns\n"], ids=["", "counted"])
def test_a_question_the_generation_prompt_rewrites_is_searched_and_the_reply_trained_after_it(conv, lead):
    """A template that writes contents with nothing between them, each reply after its length in brackets (so the
    conversation rendered with a sentinel in a reply's place differs before it), and rewrites the last question
    where a generation prompt follows (upper-cased), so the renderings never share the question: each reply is
    searched after its question (also where the text opens with it, or an earlier message says the same), and
    trained in its own place with the '</s>' after it: never the question's copy of the reply, never refused."""
    t = tok("chatml")
    tpl = (
        lead + _LOOP + "{% if m.role == 'assistant' %}[{{ m.content|length }}]{% endif %}"
        "{{ m.content|upper if loop.last and add_generation_prompt else m.content }}"
        "{% if m.role == 'assistant' %}</s>{% endif %}{% endfor %}{% if add_generation_prompt %}<think>{% endif %}"
    )
    r = render(conv, t, chat_template=tpl)
    tags = [f"[{len(m['value'])}]" if m["from"] == "gpt" else "" for m in conv]
    written = "".join(tag + m["value"] + "</s>" * (m["from"] == "gpt") for tag, m in zip(tags, conv, strict=True))
    at, want = len(r.text) - len(written), []
    for tag, m in zip(tags, conv, strict=True):
        at += len(tag)
        end = at + len(m["value"]) + 4 * (m["from"] == "gpt")
        want += [(at, end)] if m["from"] == "gpt" else []
        at = end
    assert r.text.endswith(written) and r.text[: len(r.text) - len(written)] in ("", f"{len(conv)} turns\n")
    assert r.trained_spans == want and r.problems == []


_WHICH, _AND = {"from": "human", "value": "Which?"}, {"from": "human", "value": "And?"}


@pytest.mark.parametrize(
    "letters, conv",
    [
        ("ts", [_WHICH, "t", TURNS[2], "s"]),
        ("ts", [_WHICH, "t", _WHICH, "s"]),  # the same question again after the reply
        ("t", [_WHICH, "t", _AND]),  # a question after the last reply
    ],
    ids=["two-replies", "same-question-twice", "question-last"],
)
@pytest.mark.parametrize("trim", [False, True], ids=["", "trimmed-with-a-space-after"])
def test_one_letter_replies_are_trained_where_their_marker_follows_not_in_their_turns_header(letters, conv, trim, head):
    """A template that changes every earlier character (the turn count first), so that each reply is searched in
    the full rendering from before its turn's header: one-letter replies that the header '<|assistant|>' also
    holds are trained where the marker follows them, '<|end|>' between turns and the EOS after the final one (also
    written trimmed, the message holding a space after the letter)."""
    t = tok("chatml")
    tpl = (
        head + _LOOP + "{% if not loop.first %}<|end|>{% endif %}<|{{ m.role }}|>{{ m.content | trim }}{% endfor %}"
        "{% if add_generation_prompt %}<|end|><|assistant|>{% else %}{{ eos_token }}{% endif %}"
    )
    conv = [{"from": "gpt", "value": m + " " * trim} if isinstance(m, str) else m for m in conv]
    r = render(conv, t, chat_template=tpl)
    markers = ["<|end|>"] * (len(conv) - 1) + ["<|im_end|>"]
    want = [("|>", x + markers[i]) for i, x in zip((1, 3), letters, strict=False)]
    assert [(r.text[b - 2 : b], r.text[b:e]) for b, e in r.trained_spans] == want
    assert r.problems == []


@pytest.mark.parametrize("strip", ["rstrip", "lstrip"])
def test_a_short_reply_stripped_on_one_side_is_trained_as_written_not_in_its_turns_header(strip, head):
    """A one-letter reply with spaces on both sides (' a  '), which the template writes stripped on one side only,
    while its turn's header ('<|an assistant|>') holds ' a': the reply is trained as the template wrote it before
    the marker, its space included, not one character off (nor the header's ' a')."""
    t = tok("chatml")
    tpl = (
        head
        + _LOOP
        + "{% if not loop.first %}<|end|>{% endif %}<|{{ 'an assistant' if m.role == 'assistant' else m.role }}|>"
        "{{ m.content." + strip + "() if m.role == 'assistant' else m.content }}{% endfor %}"
        "{% if add_generation_prompt %}<|end|><|an assistant|>{% else %}{{ eos_token }}{% endif %}"
    )
    reply = {"from": "gpt", "value": " a  "}  # not three characters, the length of a probe's sentinel
    r = render([_WHICH, reply, _AND, reply], t, chat_template=tpl)
    written = getattr(" a  ", strip)()
    assert [r.text[b:e] for b, e in r.trained_spans] == [written + "<|end|>", written + "<|im_end|>"]
    assert all(r.text[b - 2 : b] == "|>" for b, _ in r.trained_spans) and r.problems == []


def test_a_short_reply_in_its_turns_header_is_not_moved_past_the_next_message(head):
    """Where the marker does not follow the place a short reply is first found (its turn's header), the reply is
    looked for right before the next marker, but not past the next message: a template that leaves the reply
    's' open (no marker after it) does not get the 's' that ends the next question trained as the reply."""
    t = tok("chatml")
    tpl = (
        head
        + _LOOP
        + "<|{{ 'human' if m.role == 'user' else m.role }}|>{{ m.content }}{% if m.content != 's' %}<|end|>{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    conv = [TURNS[0], {"from": "gpt", "value": "s"}, {"from": "human", "value": "Is it s"}]
    for c in (conv, conv + [TURNS[3]]):  # the question last, or another reply after it
        r = render(c, t, chat_template=tpl)
        question = r.text.index("Is it s")
        assert all(e <= question or b > question + 7 for b, e in r.trained_spans)
    assert r.text[slice(*r.trained_spans[-1])] == REPLIES[1] + "<|end|>"


REWRITTEN_EARLIER = (
    "an earlier turn is rewritten: the reply is written verbatim while it is the last message, but not once "
    "later messages are added (e.g. reasoning dropped from earlier turns)"
)
REWRITTEN = "the template rewrites the reply itself"  # (where it writes it, the masked rendering says: what it writes)
REWRITTEN_REPLY = REWRITTEN + " (it is not written verbatim even as the last message)"


def _refusal_reason(conv, t, template) -> tuple[int, str]:
    """The message index and the whole reason of auto masking's refusal to locate a reply."""
    with pytest.raises(TemplateError) as e:
        render(conv, t, chat_template=template)
    m = re.fullmatch(
        r"chat template does not write message (\d+) \(assistant\) verbatim in the full rendering, so the reply "
        r"cannot be located: (.*)\. Use chat.masking.mode=delimiters or a template that writes each reply verbatim\.",
        str(e.value),
        re.S,
    )
    assert m, str(e.value)
    return int(m[1]), m[2]


@pytest.mark.parametrize(
    "conv, k",
    [
        (_says("Say: hi there!", "hi there!"), 1),
        (_says("x", "ok", "Say: hi there!", "hi there!", "and", "fine"), 3),
        (_says("Say: hi there! Please.", "hi there!", "ok", "fine"), 1),
    ],
    ids=["last", "between", "quoted-inside"],
)
def test_a_rewritten_reply_whose_question_holds_it_is_refused_not_trained_in_the_question(conv, k, head):
    """A template that renders the last question otherwise where a generation prompt follows (so the renderings
    never share it) and upper-cases replies holding '!': the reply is not written verbatim, only the question's copy
    of it is. That copy is never trained as the reply: the row is refused, naming the reply as rewritten."""
    t = tok("chatml")
    tpl = (
        head + _LOOP + "{% if m.role == 'assistant' and '!' in m.content %}{{ m.content|upper }}"
        "{% else %}{{ m.content|upper if loop.last and add_generation_prompt else m.content }}{% endif %}"
        "{% if m.role == 'assistant' %}</s>{% endif %}{% endfor %}{% if add_generation_prompt %}<think>{% endif %}"
    )
    assert _refusal_reason(conv, t, tpl)[0] == k
    assert _refusal_reason(conv, t, tpl)[1].startswith(REWRITTEN)


def test_a_reply_saying_what_its_rewritten_question_says_is_trained_or_refused_never_taken_from_the_question(head):
    """A template that changes every earlier character and rewrites one message's text (upper-cased), and a reply
    saying what the message before it says, so that the message's text is found only at one place. Where the
    conversation rendered with a sentinel in the reply's place says where it is (the turn count first), or the one
    rendered with the reply masked (the contents' length or vowels first: the text after it is the same), the reply
    is trained there. Where neither says (a template that rejects the probes, or the reply is the one rewritten), the
    search after the question takes the place for the reply where the message before it is a system message (which
    a template may drop or rewrite), and refuses the row where it is a user question (written: the place may be the
    question's own; a cold review's case)."""
    t = tok("chatml")
    tpl = head + CHATML.replace("{{ m.content }}", "{{ m.content|upper if m.role == 'user' else m.content }}")
    conv = _says("yes.", "yes.", "no?", "fine.")
    if head.startswith(_NO_CONTROL):  # neither probe runs: the search after the question cannot tell the places
        assert _refusal_reason(conv, t, tpl)[0] == 1
    else:
        r = render(conv, t, chat_template=tpl)
        want = ["assistant\nyes.<|im_end|>", "assistant\nfine.<|im_end|>"]
        assert [r.text[b - 10 : e] for b, e in r.trained_spans] == want and r.problems == []
    upper_replies = head + CHATML.replace(
        "{{ m.content }}", "{{ m.content|upper if m.role == 'assistant' else m.content }}"
    )
    if not head.startswith(
        "Turns"
    ):  # the question written, the reply rewritten: the question's 'Hello' is never trained
        assert _refusal_reason(_says("Hello", "Hello"), t, upper_replies)[0] == 1
    system = head + CHATML.replace("{{ m.content }}", "{{ m.content|upper if m.role == 'system' else m.content }}")
    conv = _says("Q", "ok") + [{"from": "system", "value": "yes."}, {"from": "gpt", "value": "yes."}]
    r = render(conv, t, chat_template=system)
    assert [r.text[b - 10 : e] for b, e in r.trained_spans][-1] == "assistant\nyes.<|im_end|>" and r.problems == []


def test_a_reply_holding_its_unwritten_question_or_followed_by_a_dropped_copy_of_it_is_trained_in_place(head):
    """Two templates whose renderings do not share the question before a reply: one that upper-cases questions
    (their text is then found first inside the reply 'because why', which a later reply repeats), one that writes
    contents with nothing between them and drops system messages (the next message, a dropped system message,
    says what the question said). Each reply is trained where it is, none refused or moved to a later copy."""
    t = tok("chatml")
    upper = head + CHATML.replace("{{ m.content }}", "{{ m.content|upper if m.role == 'user' else m.content }}")
    r = render(_says("why", "because why", "ok", "because why"), t, chat_template=upper)
    assert [r.text[b - 10 : e] for b, e in r.trained_spans] == ["assistant\nbecause why<|im_end|>"] * 2
    dropped = (  # each question after the length of everything after it (so a reply's sentinel changes it)
        _LOOP + "{% if m.role == 'user' %}[{{ messages[loop.index0:]|map(attribute='content')|join|length }}]"
        "{% endif %}{% if m.role != 'system' %}{{ m.content|upper if loop.last and add_generation_prompt else "
        "m.content }}{% endif %}{% if m.role == 'assistant' %}</s>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<think>{% endif %}"
    )
    conv = _says("Q: tell me?", "fine") + [{"from": "system", "value": "tell me?"}] + _says("ok", "sure")
    r = render(conv, t, chat_template=dropped)
    assert r.text == "[29]Q: tell me?fine</s>[6]oksure</s>" and r.trained_spans == [(15, 23), (28, 36)]
    assert r.problems == []


def test_a_short_reply_the_system_prompt_holds_is_trained_after_its_question(head):
    """A system prompt that holds a short reply's text ('Answer Yes. or No.'), under a template whose text before a
    reply differs between the renderings: the reply is trained in its own turn, after its question, never inside
    the system prompt."""
    t = tok("chatml")
    conv = [{"from": "system", "value": "Answer Yes. or No."}] + _says("Is it?", "Yes.", "Sure?", "No.")
    r = render(conv, t, chat_template=head + CHATML)
    assert [r.text[b - 10 : e] for b, e in r.trained_spans] == [f"assistant\n{x}<|im_end|>" for x in ("Yes.", "No.")]
    assert r.problems == []


def test_a_rewritten_reply_located_in_its_turn_is_not_taken_from_a_later_message():
    """A template that changes every earlier character (the turn count first) and upper-cases replies with '!':
    the conversation rendered with a sentinel in the reply's place says where the reply is written, and it is not
    written verbatim there; a later question that quotes it (and repeats the next question) is past the next
    reply's place, so the row is refused, not trained inside that question."""
    t = tok("chatml")
    tpl = "Turns: {{ messages|length }}\n" + CHATML.replace(
        "{{ m.content }}", "{{ m.content|upper if m.role == 'assistant' and '!' in m.content else m.content }}"
    )
    conv = _says("Q", "hi there!", "ok", "fine", "hi there! ok", "bye")
    assert _refusal_reason(conv, t, tpl) == (1, REWRITTEN_REPLY)
    assert _refusal_reason(conv[:-1], t, tpl) == (1, REWRITTEN_REPLY)  # the next reply is the last one


def test_a_located_reply_is_not_looked_for_again_after_a_later_copy_of_its_question():
    """A template that changes every earlier character (the turn count first) and rewrites the last question
    where a generation prompt follows: the conversation rendered with a sentinel in a reply's place says where the
    reply is; a last question that repeats the question and the reply ('ok fine') does not move it there."""
    t = tok("chatml")
    tpl = (
        "Turns: {{ messages|length }}\n"
        + _LOOP
        + "<|{{ m.role }}|>{{ m.content|upper if loop.last and add_generation_prompt else m.content }}<|end|>"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    r = render(_says("why", "no", "ok", "fine", "ok fine"), t, chat_template=tpl)
    assert [r.text[b - 13 : e] for b, e in r.trained_spans] == [f"<|assistant|>{x}<|end|>" for x in ("no", "fine")]
    assert r.problems == []


def test_a_reply_the_template_drops_is_not_taken_from_its_question():
    """A template that changes every earlier character (the turn count first) and drops the first reply: where the
    conversation rendered with a sentinel in its place does not write it, the reply is searched after its question,
    which quotes it; it is nowhere else, so the row is refused, never trained inside the question."""
    t = tok("chatml")
    drop = "{% if not (m.role == 'assistant' and loop.index0 == 1) %}"
    tpl = "Turns: {{ messages|length }}\n" + CHATML.replace("messages %}", "messages %}" + drop).replace(
        "{% endfor %}", "{% endif %}{% endfor %}"
    )
    with pytest.raises(TemplateError, match="does not write message 1 "):
        render(_says("say hi", "hi", "ok", "fine"), t, chat_template=tpl)


def test_a_short_reply_written_right_before_its_question_in_the_system_prompt_is_not_trained_there(head):
    """A template that writes contents with nothing between them, under a first line that makes the renderings
    differ from the start: a system prompt ending with the reply's text ('Say Yes.') right before the question
    ('ok?'): the reply is trained after the question, not at the end of the system prompt."""
    t = tok("chatml")
    tpl = head + _LOOP + "{{ m.content }}{% if m.role == 'assistant' %}</s>{% endif %}{% endfor %}"
    conv = [{"from": "system", "value": "Say Yes."}] + _says("ok?", "Yes.", "more?", "No.")
    r = render(conv, t, chat_template=tpl)
    assert r.text.endswith("Say Yes.ok?Yes.</s>more?No.</s>")
    assert [r.text[b - 3 : e] for b, e in r.trained_spans] == ["ok?Yes.</s>", "re?No.</s>"] and r.problems == []


_R1 = "deepseek-r1-distill-qwen.jinja"  # not prefix-preserving: '<think>\n' after its generation prompt
_LENGTHS = (  # not prefix-preserving (each reply's length before it, '?' in the generation prompt), drops system
    "{% for m in messages %}{% if m.role=='user' %}<U>{{ m.content }}{% elif m.role=='assistant' %}"
    "<A{{ m.content|length }}>{{ m.content }}</A>{% endif %}{% endfor %}{% if add_generation_prompt %}<A?>{% endif %}"
)
_PREVIEW = (  # each reply's first five characters first, then the turns
    "{% for m in messages if m.role=='assistant' %}[{{ m.content[:5] }}]{% endfor %}{% for m in messages %}"
    "{% if m.role=='user' %}<U>{{ m.content }}{% elif m.role=='assistant' %}<A>{{ m.content }}</A>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<A>{% endif %}"
)


_SAYS_TWICE = [("user", "Say yes."), ("assistant", "You are terse."), ("user", "Say yes."), ("assistant", "yes.ok")]
_SAYS_TWICE += [("user", "Say yes.")]
_SAYS_NOTE = [("user", "Q1"), ("assistant", "R1"), ("system", "Note"), ("assistant", "answer"), ("user", "x")]


@pytest.mark.parametrize(
    "template, conv, refused",
    [
        (_R1, [("user", "Q1 \x003\x00"), ("assistant", "a1"), ("user", "Q2"), ("assistant", "a2")], False),
        (_LENGTHS, _SAYS_NOTE + [("assistant", "Note")], False),
        (_LENGTHS, _SAYS_NOTE + [("assistant", "Note: answer")], False),
        (_PREVIEW, [("user", "Q1"), ("assistant", "Hello world"), ("user", "Q2"), ("assistant", "Goodbye")], False),
        (_R1, [("user", "Q"), ("assistant", "r</think>a"), ("system", "Be."), ("user", "Say r</think>a")], True),
    ],
    ids=["sentinel-text-in-a-question", "dropped-system-said", "dropped-system-said-first", "previews", "quoted"],
)
def test_each_reply_is_located_only_where_the_template_writes_it(template, conv, refused):
    """Cold review's cases against the sentinel locator (the conversation rendered with a sentinel in a reply's
    place): a question holding the sentinel's text, a dropped system message whose text a later reply says, each
    reply previewed before the turns, and a rewritten reply that a later question quotes. Each reply is found in its
    own turn, or the row is refused (a reply the template rewrites), never trained inside another message."""
    from pathlib import Path

    from backend.chat.templates import _auto_turns, render_messages

    t = tok("chatml")
    if template == _R1:
        template = (Path(__file__).parent / "data" / "chat_templates" / _R1).read_text()
    messages = [{"role": r, "content": c} for r, c in conv]
    text = render_messages(messages, t, template)
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if refused:
        with pytest.raises(TemplateError, match="does not write message 1 "):
            _auto_turns(messages, t, template, text, assistants, [])
        return
    turns = _auto_turns(messages, t, template, text, assistants, [])
    assert [text[x.begin : x.content_end] for x in turns] == [messages[k]["content"] for k in assistants]
    opening = "<A>" if template == _PREVIEW else None
    for x in turns:  # each right after its own turn's opening
        k = x.message_index
        want = opening or (f"<A{len(messages[k]['content'])}>" if template == _LENGTHS else "<｜Assistant｜>")
        assert text[x.begin - len(want) : x.begin] == want


_BARE = "{% for m in messages %}{{ m.content }}{% if m.role == 'assistant' %}</s>{% endif %}{% endfor %}"


@pytest.mark.parametrize(
    "template, conv",
    [  # a one-letter reply the first line and the question's header hold ('characters', 'user')
        (CHATML, [("user", "<b>x</b>"), ("assistant", "e"), ("user", "Q")]),
        # ... and a one-letter question the first line holds too ('a' in 'characters'), contents with nothing between
        (_BARE, [("user", "a"), ("assistant", "e"), ("user", "Why?"), ("assistant", "ok"), ("user", "s>")]),
        # a system prompt that says the reply, right before a question that is the end-of-turn marker's text
        (_BARE, [("system", "Say: Hi."), ("user", "</s>"), ("assistant", "Say: Hi."), ("user", "x")]),
        # a question asked twice (and a third time after the last reply), under DeepSeek R1's template
        (_R1, _SAYS_TWICE),
    ],
    ids=["one-letter-reply", "one-letter-question", "system-says-it-before-a-marker-question", "asked-twice-r1"],
)
@pytest.mark.parametrize("head", ["measured", "vowels", "measured-no-probe", "dashes-no-probe"])
def test_a_reply_searched_after_its_question_is_not_taken_from_the_templates_own_text(head, template, conv):
    """Where the template's text before a reply depends on the contents (their length or vowels first), each reply
    is located where the conversation with the reply masked differs from the text, or searched after its question
    (a template that rejects that probe): a short reply or question that the template's own text holds (a first
    line, a header, the system prompt) is still trained in its own turn, with its marker right after it. (A
    differential fuzz of the surviving mutants against the code found these shapes.)"""
    from pathlib import Path

    from backend.chat.templates import _auto_turns, render_messages

    heads = {  # the reply masked says where it is (the text before it the same, or after it), or cannot run
        "measured": _MEASURED,
        "vowels": _VOWELS,
        "measured-no-probe": _NO_CONTROL + _MEASURED,
        "dashes-no-probe": _NO_CONTROL + _DASHES,
    }
    t, marker = tok("chatml"), "</s>" if template == _BARE else "<|im_end|>"
    if template == _R1:
        t, marker = tok("llama"), "<｜end▁of▁sentence｜>"
        template = (Path(__file__).parent / "data" / "chat_templates" / _R1).read_text()
    messages = [{"role": r, "content": c} for r, c in conv]
    text = render_messages(messages, t, heads[head] + template)
    problems = []
    turns = _auto_turns(
        messages, t, heads[head] + template, text, [i for i, (r, _) in enumerate(conv) if r == "assistant"], problems
    )
    assert problems == []
    for x in turns:
        k = x.message_index
        before = (
            messages[k - 1]["content"]
            if template == _BARE
            else "<|im_start|>assistant\n"
            if template == CHATML
            else "<｜Assistant｜>"
        )
        assert text[x.begin - len(before) : x.begin] == before
        assert text[x.begin : x.content_end] == messages[k]["content"]
        assert text[x.content_end : x.end] == marker


_COUNTS = {  # what a header writes of its reply: its length, its line count, whether it ends with a newline
    "{{ m.content|length }}": len,
    "{{ m.content.splitlines()|length }}": lambda c: len(c.splitlines()),
    "{{ '[nl]' if m.content.endswith('\\n') else '' }}": lambda c: "[nl]" if c.endswith("\n") else "",
}


@pytest.mark.parametrize(
    "header",
    ["\n", "\n\n", ": ", "[{{ m.content|length }}]\n", "[{{ m.content.splitlines()|length }}]"]
    + ["{{ '[nl]' if m.content.endswith('\\n') else '' }}\n"],
    ids=["newline", "two-newlines", "colon-space", "length", "lines", "ends-with-newline"],
)
@pytest.mark.parametrize("write", ["", "|trim", ".lstrip()", ".rstrip()", ".lstrip('\\n')"])
@pytest.mark.parametrize("reply", ["\nyes.\n", "\nyes.", " e ", "e", "\n\nyes. and?", "\tyes.", " yes.", "  yes. and?"])
def test_a_reply_under_a_first_line_measuring_the_contents_takes_its_own_whitespace_only(header, write, reply):
    """Under a first line counting the contents' characters (no rendering shares the text before a reply), each
    reply is located where the conversation with it masked differs from the text: with the whitespace the template
    writes of it (a leading newline, tab or spaces verbatim: its own; the header's newline or space never, one or
    two of them, also where the template strips newlines only or writes the reply's length, line count or last
    character in its header), found in place though the questions and the first line hold its text ('e' in
    'characters')."""
    from backend.chat.templates import _auto_turns, render_messages

    if write == ".lstrip('\\n')" and "endswith" in header and reply == "\nyes.":
        pytest.skip("known limit (tests/MUTATION.md): newlines stripped and the last character in the header")
    t = tok("chatml")
    tpl = _MEASURED + CHATML.replace(
        "{{ m.role }}\n{{ m.content }}", "{{ m.role }}" + header + "{{ m.content" + write + " }}"
    ).replace(
        "<|im_start|>assistant\n{% endif %}",
        "<|im_start|>assistant"
        + "".join([header.split("{{")[0]] + [x.split("}}")[-1] for x in header.split("{{")[1:]])  # no reply yet
        + "{% endif %}",
    )
    written = {"": reply, "|trim": reply.strip(), ".lstrip()": reply.lstrip(), ".rstrip()": reply.rstrip()}.get(
        write,
        reply.lstrip("\n"),  # Qwen3's and QwQ's way: newlines stripped, not spaces
    )
    messages = [{"role": r, "content": c} for r, c in (("user", "Q e"), ("assistant", reply), ("user", "e e"))]
    messages.append({"role": "assistant", "content": reply})
    text = render_messages(messages, t, tpl)
    opening = "<|im_start|>assistant" + header
    for count, f in _COUNTS.items():  # a header that writes something of the reply: what it writes for this one
        opening = opening.replace(count, str(f(reply)))
    want, at = [], 0
    for _ in range(2):
        at = text.index(opening, at) + len(opening)
        assert text.startswith(written + "<|im_end|>", at)
        want.append((at, at + len(written), at + len(written) + len("<|im_end|>")))
    problems = []
    turns = _auto_turns(messages, t, tpl, text, [1, 3], problems)
    assert [(x.begin, x.content_end, x.end) for x in turns] == want and problems == []


@pytest.mark.parametrize(
    "name, conv, at, written",
    [  # gpt-oss's generation prompt stops before '<|channel|>final<|message|>', which holds 'a', 'e' and '|'
        (
            "gpt-oss-120b.jinja",
            [("user", "Pick a letter"), ("assistant", " a"), ("user", "Again")],
            "<|message|>",
            " a",
        ),
        ("gpt-oss-120b.jinja", [("user", "Say yes."), ("assistant", "|"), ("user", "I")], "<|message|>", "|"),
        ("gpt-oss-120b.jinja", [("user", "S"), ("assistant", "e"), ("user", "e")], "<|message|>", "e"),
        # laguna's generation block holds '</think>' before the reply, and 'i' of '<assistant>' before that
        ("laguna-xs-2.1.jinja", [("user", "Q"), ("assistant", " \ni\n")], "</think>\n", "i"),
        ("laguna-xs-2.1.jinja", [("user", "Q"), ("assistant", "\n\nthink\n")], "</think>\n", "think"),
        # Qwen3 writes '<think>\n\n</think>\n\n' before a last reply, which it writes with its newlines stripped
        ("qwen3.jinja", [("user", "Q"), ("assistant", "\n\nHello there.\n")], "</think>\n\n", "Hello there.\n"),
        # ... and its spaces kept: they are the reply's, the newline before them the template's
        ("qwen3.jinja", [("user", "Q"), ("assistant", "\n  Hello there.")], "</think>\n\n", "  Hello there."),
    ],
    ids=["gpt-oss-a", "gpt-oss-bar", "gpt-oss-e", "laguna-letter", "laguna-think", "qwen3-newlines", "qwen3-spaces"],
)
def test_a_padded_reply_is_not_taken_from_the_text_the_template_writes_before_it(name, conv, at, written):
    """A reply whose text (or its stripped text) the template's own opening holds (a header letter, 'think' in
    '</think>', the newlines after '</think>'): the reply is trained where it is written, right after the
    opening, with its whitespace where the template writes it; never the opening's characters (the sentinel
    rendering says where the reply is when it is not right after its generation prompt; a cold review's cases)."""
    from pathlib import Path

    t = fresh_tok("llama")
    template = (Path(__file__).parent / "data" / "chat_templates" / name).read_text()
    r = render([{"role": r, "content": c} for r, c in conv], t, chat_template=template)
    b, e = r.trained_spans[0]
    assert r.text.endswith(at, 0, b) and r.text[b:e].startswith(written)


def test_a_padded_reply_under_raw_zephyr_and_a_first_line_of_dashes_is_trained_without_the_headers_newline():
    """Raw Zephyr writes '<|assistant|>\\n', the reply trimmed, and newlines after every rendering (so the rendering
    up to a generation prompt is a prefix of the text only without them). Under a first line whose length depends
    on the contents' (the same here for both renderings), the sentinel rendering does not share the text before
    the reply, the masked one does: the reply is trained from its first letter, not from the header's newline
    (the twelfth sitting's differential fuzz, mutant 48)."""
    from pathlib import Path

    template = _DASHES + (Path(__file__).parent / "data" / "chat_templates" / "zephyr.jinja").read_text()
    conv = [("system", "S"), ("user", "yes. yes."), ("assistant", "\nyes.\n"), ("user", "<b>x</b>")]
    r = render([{"role": r, "content": c} for r, c in conv], fresh_tok("llama"), chat_template=template)
    assert [r.text[b - 14 : e] for b, e in r.trained_spans] == ["<|assistant|>\nyes.<|eot_id|>"]
    assert r.problems == []


_UPPER_TAGS = (  # each message between tags of its role; replies upper-cased
    "{% for m in messages %}<{{ m.role }}>{% if m.role == 'assistant' %}{{ m.content|upper }}{% else %}"
    "{{ m.content|replace('\\n', ' ')|trim }}{% endif %}</s>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def _tagged(reply: str, head: str = "") -> str:
    """A template that writes ``reply`` (Jinja, of ``m.content``) after '<assistant>' and each question after
    '<user>'."""
    return (
        head
        + "{% for m in messages %}{% if m.role == 'user' %}<user>{{ m.content }}</s>\n{% else %}<assistant>"
        + reply
        + "</s>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    )


@pytest.mark.parametrize(
    "template, replies",
    [  # what the template writes after a reply depends on its end, and coincides with it: '.' added where it lacks
        (_tagged("<think></think>{{ m.content }}{{ '' if m.content.endswith('.') else '.' }}"), ["Yes.", "Sure."]),
        # a newline or a space of the template's own, written only before a reply that has none: the reply's are its
        (_tagged("<think></think>{{ '' if m.content.startswith('\\n') else '\\n' }}{{ m.content }}"), ["\n\nYes"]),
        (_tagged("<think></think>{{ '' if m.content.startswith(' ') else ' ' }}{{ m.content }}"), ["  Yes"]),
        # a dash before a reply that asks, after one that does not, under a first line measuring the contents: the
        # reply '?-' is written one character on from where the masked rendering puts it, not rewritten
        (_tagged("{% if '?' in m.content %}-{{ m.content }}{% else %}{{ m.content }}-{% endif %}", _MEASURED), ["?-"]),
        # ' (asks)' after a reply that asks, under a first line counting vowels: the text after the masked reply's
        # place is the text's end, the text before that place is not its header: searched, not refused as rewritten
        (_tagged("{{ m.content }}{% if '?' in m.content %} (asks){% endif %}", _VOWELS), ["Why?", "So?"]),
    ],
    ids=["period-added", "own-newlines", "own-spaces", "dash-shifted", "asks-after"],
)
def test_a_reply_next_to_text_the_template_writes_depending_on_it_is_trained_whole(template, replies):
    """Templates whose text right before or after a reply depends on the reply's first or last character, in a way
    that makes the text next to the reply look like the sentinel's or the masked rendering's: each reply is trained
    whole, with its own whitespace (its last character its own, not taken for the marker the template writes after
    a reply that lacks it), and the row is not refused (a cold review's cases)."""
    from backend.chat.templates import _auto_turns, render_messages

    messages = []
    for reply in replies:
        messages += [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": reply}]
    r = render(messages, fresh_tok("llama"), chat_template=template)
    assert [r.text[b:e].removesuffix("</s>") for b, e in r.trained_spans] == replies
    text = render_messages(messages, fresh_tok("llama"), template)
    turns = _auto_turns(messages, fresh_tok("llama"), template, text, list(range(1, len(messages), 2)), [])
    assert [text[x.begin : x.content_end] for x in turns] == replies


@pytest.mark.parametrize("reply, own", [("\n\nyes", "\n\nyes"), ("\nyes", "yes"), (" \nyes", " \nyes")])
def test_a_reply_opening_the_conversation_keeps_its_own_newlines_where_the_template_adds_one_only_if_none(reply, own):
    """A conversation that opens with a reply, under a template that writes a newline of its own only before a reply
    that has none: the sentinel rendering (which has none) ends with that newline, so the text before the reply
    looks like the template's. The reply's newlines are its own where the full rendering changes without them
    ('\\n\\nyes'); a single one is the template's by that rule (the rendering of 'yes' is the same text)."""
    template = _tagged("<think></think>{{ '' if m.content.startswith('\\n') else '\\n' }}{{ m.content }}")
    messages = [{"role": "assistant", "content": reply}, {"role": "user", "content": "Hi"}]
    r = render(messages, fresh_tok("llama"), chat_template=template)
    assert [r.text[b:e] for b, e in r.trained_spans] == [own + "</s>"]


def test_a_long_run_of_a_replys_own_leading_whitespace_costs_a_few_renders(monkeypatch):
    """A template that writes two spaces of its own and the reply with its newlines stripped, and a reply opening
    with a newline and 1,000 spaces: the spaces are the reply's (the rendering changes without them), the newline
    the template's; telling them apart renders the conversation a few times (bisection), not once per character (a
    cold review's case: 10,042 renders for 10 such replies)."""
    from backend.chat import templates

    calls = []
    real = templates.render_messages
    monkeypatch.setattr(templates, "render_messages", lambda *a, **k: calls.append(1) or real(*a, **k))
    reply = "\n" + " " * 1000 + "Yes"
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": reply}]
    r = render(messages, fresh_tok("llama"), chat_template=_tagged("  {{ m.content.lstrip('\\n') }}"))
    assert [r.text[b:e] for b, e in r.trained_spans] == [" " * 1000 + "Yes</s>"]
    assert len(calls) < 60


def test_a_replys_own_space_after_the_newlines_the_template_strips_and_writes_its_own():
    """A template that writes a newline of its own and the reply with its newlines stripped, and a reply opening
    with two newlines and a space: before the reply's letters the text has a newline and a space; the space is the
    reply's (the rendering changes without it), the newline the template's (it does not change when the reply's
    newlines go). The bisection stops at the boundary, not a character early or late."""
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "\n\n yes"}]
    r = render(messages, fresh_tok("llama"), chat_template=_tagged("\n{{ m.content.lstrip('\\n') }}"))
    assert [r.text[b - 12 : e] for b, e in r.trained_spans] == ["<assistant>\n yes</s>"]
    assert [r.text[b:e] for b, e in r.trained_spans] == [" yes</s>"]


def test_a_reply_a_think_block_holds_is_taken_after_it_where_the_text_after_the_reply_depends_on_it():
    """An empty think block between each generation prompt and its reply, and the reply's length written after it
    (so the sentinel rendering shares the text before the reply, not after): a reply that the block holds ('k' of
    'think', 'in') is trained where the sentinel rendering puts it, after the block, not inside it."""
    template = _tagged("<think></think>{{ m.content }} [{{ m.content|length }}]")
    messages = [
        {"role": r, "content": c} for r, c in (("user", "Hi"), ("assistant", "k"), ("user", "Hi"), ("assistant", "in"))
    ]
    r = render(messages, fresh_tok("llama"), chat_template=template)
    assert [r.text[b - 15 : e] for b, e in r.trained_spans] == ["<think></think>k", "<think></think>in"]


def test_a_reply_a_think_block_holds_under_a_first_line_of_dashes_is_placed_by_the_masked_rendering():
    """Under a first line of dashes (the contents' length modulo 7) that the rendering up to the generation prompt
    happens to share with the full one (the reply and the question after it: 7 characters), the sentinel rendering
    (3 characters for the reply's 5) does not; the reply 'think', which the empty think block before it holds, is
    trained where the masked rendering puts it, after the block (its length written after it, so that no marker
    can be read to move a form found in the block to the reply's end)."""
    template = _tagged("<think></think>{{ m.content }} [{{ m.content|length }}]", _DASHES)
    messages = [{"role": r, "content": c} for r, c in (("user", "Hi"), ("assistant", "think"), ("user", "ab"))]
    r = render(messages, fresh_tok("llama"), chat_template=template)
    assert [r.text[b - 15 : e] for b, e in r.trained_spans] == ["<think></think>think"]


def test_a_template_that_rejects_every_probe_keeps_the_first_form_after_the_prompt():
    """A template that rejects any content holding a NUL (the sentinel and the masked reply both do) and writes an
    empty think block between each generation prompt and its reply: no probe renders, and each reply is the first
    form written after its prompt (no crash, no refusal; the marker, which probes read, is reported undecided)."""
    reject = (
        "{% for m in messages %}{% if '\\x00' in m.content %}{{ raise_exception('control') }}{% endif %}{% endfor %}"
    )
    messages = [
        {"role": r, "content": c}
        for r, c in (("user", "Hi"), ("assistant", "Yes."), ("user", "And?"), ("assistant", "No."))
    ]
    r = render(messages, fresh_tok("llama"), chat_template=_tagged("<think></think>{{ m.content }}", reject))
    assert [r.text[b - 15 : e] for b, e in r.trained_spans] == ["<think></think>Yes.", "<think></think>No."]
    assert [p.split(":")[0] for p in r.problems] == ["eot_undecided", "eot_undecided"]


def test_a_template_that_rejects_the_moved_whitespace_probe_still_trains_the_reply():
    """Under a first line measuring the contents, a template that rejects a masked content ending with whitespace:
    the probe that moves a reply's leading newline to its end is rejected; the reply is still located by the
    masked rendering and trained with its marker (its newline, which no probe could read, left untrained), no crash."""
    reject = (
        "{% for m in messages %}{% if '\\x00' in m.content and m.content != m.content.rstrip() %}"
        "{{ raise_exception('trailing whitespace') }}{% endif %}{% endfor %}"
    )
    t = tok("chatml")
    messages = [{"role": r, "content": c} for r, c in (("user", "Q"), ("assistant", "\nyes."), ("user", "ok"))]
    r = render(messages, t, chat_template=reject + _MEASURED + CHATML)
    assert [r.text[b:e] for b, e in r.trained_spans] == ["yes.<|im_end|>"]


def test_a_rewritten_reply_under_a_first_line_that_the_prompt_rendering_happens_to_share_is_refused():
    """A first line of dashes whose count (the contents' length modulo 7) happens to be the same for the rendering up
    to the generation prompt and the full one, so that one is a prefix of the other, and a template that upper-cases
    replies: the reply 'e' is not written verbatim, and its letter in the next question's tag ('<user>') is not it.
    The sentinel rendering (three characters more) does not share the text before it; the masked one does, and says
    the template rewrites it (the differential fuzz's row)."""
    conv = [("user", "user"), ("assistant", "e"), ("user", "\nyes.\n")]
    messages = [{"role": r, "content": c} for r, c in conv]
    template = "{{ bos_token }}" + _DASHES + _UPPER_TAGS
    assert _refusal_reason(messages, tok("llama"), template) == (1, f"{REWRITTEN} (it writes 'E')")


_S, _U, _A = "system", "user", "assistant"
_DASH_ASKED = "{% if '?' in m.content %}-{{ m.content }}{% else %}{{ m.content }}-{% endif %}"  # '-' before or after


@pytest.mark.parametrize(
    "template, family, conv, want",
    [  # the thirteenth sitting's differential fuzz: rows where a surviving mutant trained another place or refused
        (  # Qwen3 under a first line of dashes the prompt rendering happens to share: its think block before the
            # reply, the sentinel rendering not sharing the text, the masked one placing it (mutants 220-229)
            _DASHES + (Path(__file__).parent / "data" / "chat_templates" / "qwen3.jinja").read_text(),
            "llama",
            [(_U, "<b>x</b>"), (_A, "  yes\n  Hello.")],
            [("</think>\n\n", "  yes\n  Hello.<|im_end|>")],
        ),
        (  # two replies in a row saying the same: the second at its own place, not the first's (mutant 236)
            _MEASURED + _tagged(_DASH_ASKED),
            "llama",
            [(_U, "Q<b>x</b>"), (_A, "\nyes.\n"), (_U, "\n\nyes"), (_A, "Hello there. Why?"), (_A, "Hello there. Why?")]
            + [(_U, "USER")],
            [
                ("<assistant>", "\nyes.\n-</s>"),
                ("<assistant>-", "Hello there. Why?"),
                ("<assistant>-", "Hello there. Why?"),
            ],
        ),
        (  # a reply opening with its question's text, under the vowels first line: trained, not refused (330-337)
            _VOWELS + _tagged(_DASH_ASKED),
            "chatml",
            [(_U, "user"), (_A, "user?-"), (_U, "YES.")],
            [("<assistant>-", "user?-")],
        ),
    ],
    ids=["qwen3-dashes", "same-reply-twice", "opens-with-its-question"],
)
def test_fuzz_rows_where_a_mutant_differed_train_each_reply_at_its_place(template, family, conv, want):
    """Each reply trained where the template writes it (after the text given with it; the markers the template
    writes after a reply that does not end with '-' are reported undecided), in rows where a surviving mutant of
    `_auto_turns` trained another place or refused the row."""
    messages = [{"role": r, "content": c} for r, c in conv]
    r = render(messages, fresh_tok(family), chat_template=template)
    got = [
        (r.text[b - len(before) : b], r.text[b:e]) for (b, e), (before, _) in zip(r.trained_spans, want, strict=True)
    ]
    assert got == want
    assert all(e <= b for (_, e), (b, _) in zip(r.trained_spans, r.trained_spans[1:], strict=False))  # own places


@pytest.mark.parametrize(
    "conv, k, writes",
    [  # the reply's text only in a tag ('<user>') or in a question: the differential fuzz's rows (mutants 201, 268)
        ([(_S, "yes. and?"), (_U, "a"), (_A, "INST"), (_U, "Say yes."), (_U, "assistant"), (_A, "user")], 5, "USER"),
        ([(_U, "\nyes.\n"), (_A, "yes."), (_U, "\nyes.\n"), (_S, "Yes."), (_U, "Hello there.")], 1, "YES."),
        ([(_U, "\nyes.\n"), (_A, "INST"), (_U, "user"), (_A, "user"), (_U, "Continue."), (_A, "INST")], 3, "USER"),
        # the contents' vowels first, which the masked reply changes (mutant 263 of the thirteenth sitting)
        ([(_U, "Q"), (_A, "\n\nyes"), (_U, "yes."), (_A, "e"), (_S, "</s>yes.")], 1, "YES"),
    ],
    ids=["a-tag", "the-next-question", "the-question", "vowels-first"],
)
def test_a_reply_the_template_rewrites_under_a_first_line_measuring_the_contents_is_refused_where_it_is(
    conv, k, writes
):
    """A template that upper-cases replies, under a first line counting the contents' characters (or their vowels):
    the text after the reply's place and right before it is the conversation rendered with the reply masked, and
    the place does not hold the reply. The row is refused, saying what the template writes there; the reply's text
    in a tag, in the question before it or in the next one is never trained as the reply."""
    messages = [{"role": r, "content": c} for r, c in conv]
    head = _VOWELS if conv[-1] == (_S, "</s>yes.") else _MEASURED
    assert _refusal_reason(messages, tok("llama"), head + _UPPER_TAGS) == (
        k,
        f"{REWRITTEN} (it writes {writes!r})",
    )


def test_a_masked_reply_that_changes_what_the_template_writes_before_it_is_located_by_the_text_after_it():
    """A first line with the contents' length, and 'Q: ' written before a reply that asks something: the reply
    masked has no '?', so the masked rendering lacks 'Q: ' and its text before the reply is the text's start
    though the reply is not there; the text after it says where it is. Trained, not refused (a cold review's
    case)."""
    from backend.chat.templates import _auto_turns, render_messages

    t = tok("chatml")
    tpl = (
        "len={{ messages|map(attribute='content')|join|length }}\n"
        + _LOOP
        + "<|{{ m.role }}|>{% if m.role == 'assistant' and '?' in m.content %}Q: {% endif %}{{ m.content }}<E>"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    messages = [{"role": r, "content": c} for r, c in (("user", "Why"), ("assistant", "Why?"), ("user", "ok"))]
    messages.append({"role": "assistant", "content": "fine"})
    text = render_messages(messages, t, tpl)
    turns = _auto_turns(messages, t, tpl, text, [1, 3], [])
    assert [text[x.begin - 3 : x.end] for x in turns] == ["Q: Why?<E>", "t|>fine<E>"]


_VOWELS_LAST = "\n" + _VOWELS.rstrip("\n")


_TAGGED = (  # each message between tags of its role, system messages too
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.mark.parametrize(
    "template, conv",
    [  # the contents' length first, their vowels last: the masked reply's rendering shares the text before it only
        (_TAGGED + _VOWELS_LAST, [("system", "|>"), ("user", "1"), ("assistant", "e"), ("user", "1")]),
        (_TAGGED + _VOWELS_LAST, [("system", "</s>"), ("user", "Continue."), ("assistant", "a"), ("user", "a")]),
        # each reply written whole first, then the turns: the masked reply is written twice, the turns are its place
        (_PREVIEW.replace("m.content[:5]", "m.content"), [("user", "Q"), ("assistant", "yes."), ("user", "Q2")]),
    ],
    ids=["vowels-last", "vowels-last-question-says-it", "previewed-whole"],
)
def test_a_reply_masked_is_located_where_the_text_around_it_says(template, conv):
    """Under a first line counting the contents' characters, the conversation with a reply masked says where the
    reply is: the text before the masked run is how the text starts (the vowels counted on the last line), and the
    masked run is written once (a template that writes each reply first too is not read so: the reply is searched
    after its question). The reply is trained in its own turn, right after its opening tag, never in another
    message, the first line or the preview. (A differential fuzz found the first two shapes.)"""
    from backend.chat.templates import _auto_turns, render_messages

    t, template = tok("chatml"), _MEASURED + template
    messages = [{"role": r, "content": c} for r, c in conv]
    text = render_messages(messages, t, template)
    ((k, reply),) = [(k, c) for k, (r, c) in enumerate(conv) if r == "assistant"]
    (turn,) = _auto_turns(messages, t, template, text, [k], [])
    opening = "<A>" if template.endswith(_PREVIEW.replace("m.content[:5]", "m.content")) else "<assistant>"
    at = text.index(opening, text.index("<user>" if opening != "<A>" else "<U>")) + len(opening)
    assert (turn.begin, turn.content_end) == (at, at + len(reply))


_MERGED = (  # the turn count first (no rendering is a prefix of a longer one); replies in a row written as one
    # turn, each right-stripped, with nothing between them
    "Turns: {{ messages|length }}\n{% for m in messages %}"
    "{% if loop.first or messages[loop.index0 - 1].role != m.role %}<|{{ m.role }}|>{% endif %}"
    "{{ m.content.rstrip() }}"
    "{% if loop.last or messages[loop.index0 + 1].role != m.role %}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_replies_in_a_row_written_with_nothing_between_them_are_each_bounded_by_the_next():
    """A template that writes replies in a row as one turn, right-stripped, with nothing between them: each reply
    is taken where the sentinel rendering places it, up to where the next one is placed: 'Hi ' (written 'Hi') is
    not taken with the space that opens ' there ', nor ' there ' (written ' there', ending right where ' !'
    starts: taken so, not refused) with the space that opens ' !'."""
    from backend.chat.templates import _auto_turns, render_messages

    t = tok("chatml")
    messages = [{"role": "user", "content": "Q"}]
    messages += [{"role": "assistant", "content": c} for c in ("Hi ", " there ", " !")]
    text = render_messages(messages, t, _MERGED)
    assert text == "Turns: 4\n<|user|>Q<|end|><|assistant|>Hi there !<|end|>"
    turns = _auto_turns(messages, t, _MERGED, text, [1, 2, 3], [])
    at = text.index("Hi there !")
    assert [(x.begin - at, x.content_end - at) for x in turns] == [(0, 2), (2, 8), (8, 10)]
    assert text[turns[-1].content_end : turns[-1].end] == "<|end|>"


def test_a_rewritten_reply_its_question_quotes_is_refused_at_its_own_message():
    """A template that writes '[long]' before a long reply's turn (so its text before that reply depends on it: the
    old search answers for it, while the short next reply is located) and upper-cases replies with '!': the
    reply's raw text is only in its question and in a question after the next reply. The row is refused at that
    reply, which is not taken from the later question (past the next reply's place)."""
    t = tok("chatml")
    tpl = "Turns: {{ messages|length }}\n" + CHATML.replace(
        "{% for m in messages %}",
        "{% for m in messages %}{% if m.role == 'assistant' and m.content|length > 8 %}[long]{% endif %}",
    ).replace("{{ m.content }}", "{{ m.content|upper if m.role == 'assistant' and '!' in m.content else m.content }}")
    conv = _says("say hello there!", "hello there!", "ok", "fine", "you said hello there! ok", "yes")
    assert _refusal_reason(conv, t, tpl)[0] == 1
    # the same where only the system prompt says it before the reply (found there first, before the question)
    lines = ("Hi", "hello there!", "ok", "fine", "you said hello there! ok", "yes")
    conv = [{"from": "system", "value": "Greet with hello there!"}] + _says(*lines)
    assert _refusal_reason(conv, t, tpl)[0] == 2


def test_refusals_name_what_differs():
    """Besides the rewritten reply, the refusal names a system prompt moved into the last user turn and a
    generation prompt that is not how the history writes a reply's turn."""
    t = tok("chatml")
    conv = [SYSTEM] + TURNS[:4]
    moved = (
        "{% set sys = messages[0].content if messages[0].role == 'system' else '' %}"
        "{% for m in messages if m.role != 'system' %}{% if m.role == 'user' %}[U]{% if loop.last and sys %}"
        "{{ sys }} {% endif %}{{ m.content }}[/U]{% elif loop.last %}{{ m.content }}</s>{% else %}{{ m.content[:5] }}"
        "</s>{% endif %}{% endfor %}"
    )
    moved_why = "; besides, the system prompt is moved (written elsewhere once later messages are added)"
    assert _refusal_reason(conv, t, moved) == (2, REWRITTEN_EARLIER + moved_why)
    # the same template with the system prompt left where it is: the reason says no more than the rewrite
    assert _refusal_reason(TURNS[:4], t, moved) == (1, REWRITTEN_EARLIER)
    think = (
        "{% for m in messages %}{% if m.role == 'user' %}<U>{{ m.content }}{% elif m.role == 'assistant' %}<A>"
        "{% if loop.last %}{{ m.content }}{% else %}{{ m.content[:4] }}{% endif %}<E>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<A><think>\n{% endif %}"
    )
    gp_why = "; besides, the generation prompt's '<think>\\n' is not in the history"
    assert _refusal_reason(conv, t, think) == (2, REWRITTEN_EARLIER + gp_why)
    # the same generation prompt with replies written verbatim: located in the full rendering, no refusal
    verbatim = think.replace("{{ m.content[:4] }}", "{{ m.content }}")
    r = render(conv, t, chat_template=verbatim)
    assert [r.text[b:e] for b, e in r.trained_spans] == [x + "<E>" for x in REPLIES[:2]] and r.problems == []


def test_undecidable_marker_trains_none_and_says_so():
    """A template that writes only a newline between turns has no end-of-turn marker: nothing after the replies
    is trained (never the next turn's 'user: ' opening), each reply says eot_undecided, the check eot_not_trained."""
    t = tok("chatml")
    plain = "{% for m in messages %}{{ m.role + ': ' + m.content + '\\n' }}{% endfor %}"
    r = render(TURNS, t, chat_template=plain)
    assert [r.text[b:e] for b, e in r.trained_spans] == REPLIES and r.appended == []
    assert [p.split(":")[0] for p in r.problems] == ["eot_undecided"] * 3
    assert "message 5" in r.problems[-1] and "nothing appended" in r.problems[-1]
    tk = tokenize(r.text, r.trained_spans, t)
    assert sum(p.startswith("eot_not_trained") for p in check_sample(r, tk, t)) == 3


# Hand-written templates that each make one of `_eot`'s probes decide the marker (none of the shipped or public
# templates does; tests/MUTATION.md): the reply sentinel found once, the next turn's opening, the generation prompt
# and a following system message as continuations that must share the marker.
_LOOP = "{% for m in messages %}"
_NO_LATE_SYSTEM = "{% if m.role == 'system' and not loop.first %}{{ raise_exception('system first only') }}{% endif %}"
# a system block always first, a default one where the conversation has none, with a date line after its opening
# (Llama 3.1's way), the final reply left open, ``sep`` then '<|start|>' (a piece of its own) between turns
_DATED = (
    "{{% set h = '<|start|>' %}}{{{{ bos_token or '' }}}}{{% if messages[0].role == 'system' %}}"
    "{{% set sys = messages[0].content %}}{{% set msgs = messages[1:] %}}{{% else %}}{required}"
    "{{% set sys = 'default' %}}{{% set msgs = messages %}}{{% endif %}}<|start|>system\nDate: today\n\n{{{{ sys }}}}"
    "{{% for m in msgs %}}{sep}{{{{ h }}}}{{{{ m.role + '\n' }}}}{{{{ m.content }}}}{{% endfor %}}"
    "{{% if add_generation_prompt %}}{sep}{{{{ h }}}}{{{{ 'assistant\n' }}}}{{% endif %}}"
)
# a default system message added where the conversation has none (as Llama 3.1 writes its default block)
_INJECT = (
    "{% if messages[0].role != 'system' %}"
    "{% set messages = [{'role': 'system', 'content': 'default'}] + messages %}{% endif %}"
)


@pytest.mark.parametrize(
    "tpl",
    [
        # the final reply left open, the separator written before the next turn, the role between '<|' and '|>':
        # the continuations share '<|end|><|' (a piece of its own), but '<|' opens the next turn
        _LOOP + "{% if not loop.first %}<|end|>{% endif %}<|{{ m.role }}|>{{ m.content }}{% endfor %}",
        # the same after a default system block at the conversation's start (the opening is only its end there)
        "{% if messages[0].role != 'system' %}<|system|>default{% endif %}"
        + _LOOP
        + "{% if not loop.first %}<|end|>{% endif %}<|{{ m.role }}|>{{ m.content }}{% endfor %}",
        # ... and after one that ends with the marker (the opening is then all of the text between turns)
        "{% if messages[0].role != 'system' %}<|system|>default<|end|>{% endif %}"
        + _LOOP
        + "{% if not loop.first %}<|end|>{% endif %}<|{{ m.role }}|>{{ m.content }}{% endfor %}",
        # the same with a newline, no generation prompt and no system message after the first: one continuation
        _LOOP
        + _NO_LATE_SYSTEM
        + "{% if not loop.first %}<|end|>\n{% endif %}<|{{ m.role }}|>{{ m.content }}{% endfor %}",
        # the separator and the next role's opening written as one piece, with and without a generation prompt
        _LOOP + "{% if not loop.first %}{{ '<|end|>\\n<|' + m.role + '|>' }}{% else %}{{ '<|' + m.role + '|>' }}"
        "{% endif %}{{ m.content }}{% endfor %}",
        _LOOP + "{% if not loop.first %}{{ '<|end|>\\n<|' + m.role + '|>' }}{% else %}{{ '<|' + m.role + '|>' }}"
        "{% endif %}{{ m.content }}{% endfor %}{% if add_generation_prompt %}<|end|>\n<|assistant|>{% endif %}",
        # a default system message added before the first user turn, so that the user turn's opening cannot be
        # placed (the start holds all of the text between turns and more): a system message's opening is
        _INJECT + _LOOP + "{% if not loop.first %}<|end|>{% endif %}<|{{ m.role }}|>{{ m.content }}{% endfor %}",
        # ... and no system message after the first: no opening can be placed; the two continuations share
        # '<|end|>' as a piece of its own, and the generation prompt writes '<|assistant|>' as one piece
        _INJECT
        + _LOOP
        + _NO_LATE_SYSTEM
        + "{% if not loop.first %}<|end|>{% endif %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|end|>' if messages else '' }}<|assistant|>{% endif %}",
        # a conversation without a user message refused (Qwen3's "No user query found"): a system message's
        # opening cannot be placed, the user turn's can
        "{% if not messages | selectattr('role', 'equalto', 'user') | list %}{{ raise_exception('no user') }}"
        "{% endif %}" + _LOOP + "{% if not loop.first %}<|end|>{% endif %}<|{{ m.role }}|>{{ m.content }}{% endfor %}",
        # a system message written bare at the start (no opening), '<|end|><|' one piece: the user turn's opening
        # is placed, and it is the one that bounds the marker
        _LOOP + "{% if not loop.first %}<|end|><|{{ m.role }}|>{% elif m.role != 'system' %}<|{{ m.role }}|>"
        "{% endif %}{{ m.content }}{% endfor %}",
        # no opening at all, and a start ('<|begin|>') that ends like the marker, though not at a piece's start:
        # all of the text between turns is the marker
        "<|begin|>" + _LOOP + "{% if not loop.first %}<|end|>{% endif %}{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}<|end|>{% endif %}",
        # a system block always first (a default one), with a date line after its opening: no turn's opening can
        # be told apart from the text between turns, but '<|start|>' is how every conversation starts
        _DATED.format(sep="<|end|>", required=""),
    ],
    ids=[
        "split-opening",
        "default-system",
        "default-system-closed",
        "one-continuation",
        "one-piece-separator",
        "one-piece-separator-generation",
        "default-system-added",
        "default-system-added-no-opening",
        "needs-a-user-message",
        "bare-system-at-the-start",
        "no-role-markers",
        "system-block-with-a-date-line",
    ],
)
@pytest.mark.parametrize("conv", [TURNS, _WELCOME + TURNS], ids=["user-first", "assistant-first"])
def test_the_marker_stops_where_the_next_turn_opens(tpl, conv):
    """What follows a reply up to the next turn's opening (as the template writes it at a conversation's start)
    is the marker, appended after the final reply the template leaves open; never the opening's first piece."""
    t = tok("chatml")
    r = render(conv, t, chat_template=tpl)
    replies = [m["value"] for m in conv if m["from"] == "gpt"]
    assert [r.text[b:e] for b, e in r.trained_spans] == [x + "<|end|>" for x in replies]
    assert len(r.appended) == 1 and r.text.endswith("Goodbye!<|end|>") and r.problems == []


def test_a_template_that_requires_a_system_message_places_the_next_turn_from_a_system_message():
    """A template that refuses a conversation without a system message first cannot render a user turn at a
    conversation's start; where the next turn opens is read from a system message's opening instead, and bounds
    the marker (the final reply left open, '<|' a piece of its own)."""
    t = tok("chatml")
    tpl = (
        "{% if messages[0].role != 'system' %}{{ raise_exception('a system message first') }}{% endif %}"
        + _LOOP
        + "{% if not loop.first %}<|end|>{% endif %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
    )
    r = render([SYSTEM] + TURNS, t, chat_template=tpl)
    assert [r.text[b:e] for b, e in r.trained_spans] == [x + "<|end|>" for x in REPLIES]
    assert len(r.appended) == 1 and r.problems == []


@pytest.mark.parametrize("family", ["chatml", "llama"])  # no BOS, and a BOS before the system block
@pytest.mark.parametrize("required", [False, True], ids=["default-system", "system-required"])
@pytest.mark.parametrize("newline", ["", "{{ '\\n' }}"], ids=["", "newline-before-the-start"])
def test_the_marker_stops_before_how_every_conversation_starts(family, required, newline):
    """Where no turn's opening can be told apart from the text between turns (a system block written first,
    with a date line after its opening; a template that requires that block, so that no conversation starts with
    a user turn), the marker ends before the pieces a conversation starts with after its BOS ('<|start|>'):
    '<|end|>', appended after the final reply the template leaves open; never '<|end|><|start|>'."""
    t = tok(family)
    raise_ = "{{ raise_exception('a system message first') }}" if required else ""
    r = render([SYSTEM] + TURNS, t, chat_template=_DATED.format(sep="<|end|>" + newline, required=raise_))
    assert [r.text[b:e] for b, e in r.trained_spans] == [x + "<|end|>" for x in REPLIES]
    assert len(r.appended) == 1 and r.problems == []


def test_a_closed_marker_keeps_a_piece_a_conversation_also_starts_with():
    """A template that closes every reply, the final one too, with '<|end|>' and the EOS, and writes the EOS before
    every other message (so a conversation starts with it): the marker is '<|end|>' and the EOS, the closing the
    final reply has; the EOS is not taken for the next turn's opening."""
    t = tok("chatml")
    tpl = (
        _LOOP + "{% if m.role == 'assistant' %}{{ 'Assistant: ' }}{{ m.content }}{{ '<|end|>' }}{{ eos_token }}"
        "{% else %}{{ eos_token }}{{ m.role + ': ' }}{{ m.content }}{{ '\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
    )
    r = render(TURNS, t, chat_template=tpl)
    assert r.text.startswith("<|im_end|>user: ")
    assert [r.text[b:e] for b, e in r.trained_spans] == [x + "<|end|><|im_end|>" for x in REPLIES]
    assert r.problems == [] and r.appended == []


def test_a_template_without_role_markers_trains_the_eos_after_a_reply_at_the_very_start():
    """The reply sentinel at offset 0 (the conversation opens with the assistant, nothing written before it) is
    found like any other."""
    t = tok("chatml")
    bare = _LOOP + "{{ m.content }}{{ eos_token }}{% endfor %}"
    r = render(_WELCOME + TURNS, t, chat_template=bare)
    assert [r.text[b:e] for b, e in r.trained_spans] == [x + "<|im_end|>" for x in ["Welcome."] + REPLIES]
    assert r.problems == []


@pytest.mark.parametrize(
    "tpl",
    [
        # '<|end|>' before a user turn, but the generation prompt follows a reply without it
        _LOOP + _NO_LATE_SYSTEM + "{% if m.role == 'user' %}<|user|>{{ m.content }}<|end|>{% else %}<|assistant|>"
        "{{ m.content }}{% if not loop.last %}<|end|>{% endif %}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}",
        # '<|end|>' before a user turn and the generation prompt, but not before a system message
        _LOOP + "{% if not loop.first and m.role != 'system' %}<|end|>{% endif %}<|{{ m.role }}|>{{ m.content }}"
        "{% endfor %}{% if add_generation_prompt %}<|end|><|assistant|>{% endif %}",
        # nothing between a reply and the next turn's opening, which every continuation starts with
        _LOOP + "{{ '<|start|>' }}{{ m.role }}\n{{ m.content }}{% endfor %}",
        # only a newline before the next turn's '<|start|>', where no opening can be told apart
        _DATED.format(sep="{{ '\\n' }}", required=""),
    ],
    ids=["generation-prompt-differs", "system-message-differs", "opening-only", "newline-then-how-it-starts"],
)
def test_a_marker_some_continuation_lacks_is_not_trained(tpl):
    """Text that follows a reply before some next messages only is not an end-of-turn marker: nothing after the
    replies is trained, and every reply says so (no guess from the user turn alone)."""
    t = tok("chatml")
    r = render(TURNS, t, chat_template=tpl)
    assert [r.text[b:e] for b, e in r.trained_spans] == REPLIES and r.appended == []
    assert [p.split(":")[0] for p in r.problems] == ["eot_undecided"] * 3
    assert "every next message shares" in r.problems[0]


def test_a_marker_is_cut_where_the_user_turns_continuation_parts_from_the_others():
    """The marker is what every continuation shares, the user turn's included: a template that writes '<p>' after
    a message unless a user turn follows ('<u>') gives '<|end|>', not the user turn's '<|end|><u>' (whose pieces
    end where the others' '<|end|><p>' do), and the final reply, closed by '<|end|><p>', trains '<|end|>' too."""
    t = tok("chatml")
    tpl = (
        _LOOP + "{% if m.role == 'user' %}<u>{% else %}<|{{ m.role }}|>{% endif %}{{ m.content }}{{ '<|end|>' }}"
        "{% if loop.nextitem is not defined or loop.nextitem.role != 'user' %}{{ '<p>' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    r = render(TURNS, t, chat_template=tpl)
    assert r.text.endswith("Goodbye!<|end|><p>") and "thing else?<|end|><u>No" in r.text
    assert [r.text[b:e] for b, e in r.trained_spans] == [x + "<|end|>" for x in REPLIES]
    assert r.problems == [] and r.appended == []


def test_a_final_closing_of_its_own_is_trained_without_its_trailing_whitespace():
    """A template that closes the final reply otherwise than the replies between turns (an EOS and a newline,
    written only when no generation prompt follows) trains '<|end|>' between turns and the EOS after the final
    reply, not the newline after it."""
    t = tok("chatml")
    tpl = (
        _LOOP + "{% if not loop.first %}<|end|>{% endif %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}<|end|><|assistant|>{% else %}{{ eos_token }}\n{% endif %}"
    )
    r = render(TURNS, t, chat_template=tpl)
    assert r.text.endswith("Goodbye!<|im_end|>\n")
    assert [r.text[b:e] for b, e in r.trained_spans] == [x + "<|end|>" for x in REPLIES[:2]] + ["Goodbye!<|im_end|>"]
    assert r.problems == [] and r.appended == []


@pytest.mark.parametrize("train_on_eot", [True, False])
@pytest.mark.parametrize("marker", ["<|end_tools|>", "<|end|>"])
def test_a_template_that_writes_tools_otherwise_is_probed_with_the_rows_tools(marker, train_on_eot):
    """The marker of a row with tools is read from renderings with tools. A template that writes a tools block
    instead of a default system message at the start, and closes a turn with ``marker`` when tools are given
    ('<|end|>' otherwise), trains that marker after each reply of such a row (appended after the final one it leaves
    open), and nothing after a reply under train_on_eot: false; '<|end|>' for a row without tools. (Probed without
    tools, the closing is another, and the default system block hides where the next user turn opens, while a
    system message after the first is refused with tools: the marker would reach into the next turn's '<|'.)"""
    t = tok("chatml")
    tools = [{"type": "function", "function": {"name": "zqlookup", "description": "d", "parameters": {}}}]
    tpl = (
        "{% set end = '" + marker + "' if tools else '<|end|>' %}{% if tools %}<|tools|>{{ tools | tojson }}"
        "{% elif messages[0].role != 'system' %}{% set messages = [{'role': 'system', 'content': 'default'}] + "
        "messages %}{% endif %}"
        + _LOOP
        + "{% if tools %}"
        + _NO_LATE_SYSTEM
        + "{% endif %}{% if not loop.first %}{{ end }}{% endif %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}{% if messages %}{{ end }}{% endif %}<|{{ 'assistant' if end }}|>{% endif %}"
    )
    masking = Masking(train_on_eot=train_on_eot)
    r = render(TURNS, t, masking, chat_template=tpl, tools=tools)
    assert "zqlookup" in r.text and r.problems == []
    marker = marker if train_on_eot else ""
    assert [r.text[b:e] for b, e in r.trained_spans] == [x + marker for x in REPLIES]
    assert r.text.endswith("Goodbye!" + marker) and len(r.appended) == int(train_on_eot)
    plain = render(TURNS, t, masking, chat_template=tpl)
    end = "<|end|>" if train_on_eot else ""
    assert [plain.text[b:e] for b, e in plain.trained_spans] == [x + end for x in REPLIES]


@pytest.mark.parametrize("family", ["chatml", "llama"])
def test_a_template_that_writes_bos_and_no_marker_trains_nothing_of_the_next_opening(family):
    """The text before a first user turn is the BOS (the Llama tokenizer has one) and the turn's opening; between
    turns only the opening is written: there is no marker, and '<|', which opens every next turn, is not one."""
    t = tok(family)
    tpl = "{{ bos_token or '' }}" + _LOOP + "<|{{ m.role }}|>{{ m.content }}{% endfor %}"
    tpl += "{% if add_generation_prompt %}<|{{ messages[0].role[:0] }}assistant|>{% endif %}"  # '<|': a piece
    r = render(TURNS, t, chat_template=tpl)
    assert [r.text[b:e] for b, e in r.trained_spans] == REPLIES and r.appended == []
    assert [p.split(":")[0] for p in r.problems] == ["eot_undecided"] * 3


def test_one_tokenizer_under_two_templates_gets_each_templates_own_marker():
    """The marker is memoized per tokenizer, keyed by template and roles: the studio switching templates on one
    tokenizer trains the new template's marker, not the first one's."""
    t = tok("chatml")
    bare = _LOOP + "{{ m.content }}{{ eos_token }}{% endfor %}"
    for tpl, eot in (
        (None, "<|im_end|>"),
        (bare, "<|im_end|>"),
        (_LOOP + "<{{ m.role }}>{{ m.content }}</s>{% endfor %}", "</s>"),
    ):
        r = render(TURNS, t, chat_template=tpl)
        assert [r.text[b:e] for b, e in r.trained_spans] == [x + eot for x in REPLIES], tpl


def test_a_template_that_writes_the_final_reply_twice_gets_no_marker_guessed_after_it():
    """A rendering that ends at the reply and writes it twice (a recap) cannot say whether the template closes
    the reply: between turns the marker is still found, after the final reply nothing is trained or appended."""
    t = tok("chatml")
    echo = (
        _LOOP + "<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
        "{% if messages[-1].role == 'assistant' %}<|recap|>{{ messages[-1].content }}{% endif %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    r = render(TURNS, t, chat_template=echo)
    assert r.text == t.apply_chat_template(normalize_conversation(TURNS), chat_template=echo, tokenize=False)
    assert [r.text[b:e] for b, e in r.trained_spans] == [x + "<|end|>" for x in REPLIES[:2]] + [REPLIES[2]]
    assert r.appended == [] and len(r.problems) == 1
    assert r.problems[0].startswith("eot_undecided: message 5") and "more than once" in r.problems[0]


def test_template_with_trailing_whitespace_after_every_rendering():
    """Some templates (DeepSeek-V3 style) end every rendering with a newline after their last block and indent the
    reply: the generation prompt then ends in whitespace the final text does not have at that place. That
    whitespace is not the start of the reply's turn: the reply and its marker are still found, nothing else."""
    t = tok("chatml")
    tpl = (
        "{% for m in messages %}{% if m.role == 'user' %}<U>{{ m.content }}<|im_end|>{% else %}"
        "    {{ m.content }}<|im_end|>{% endif %}{% endfor %}\n\n{% if add_generation_prompt %}{% endif %}"
    )
    r = render(TURNS, t, chat_template=tpl)
    assert r.text == t.apply_chat_template(normalize_conversation(TURNS), chat_template=tpl, tokenize=False)
    assert [r.text[b:e] for b, e in r.trained_spans] == [x + "<|im_end|>" for x in REPLIES]
    for _ in range(5):  # the structure path (after its cross-checks) gives the same
        again = render(TURNS, t, chat_template=tpl)
        assert (again.text, again.trained_spans) == (r.text, r.trained_spans)


def test_a_trimmed_reply_after_its_headers_newline_trains_no_part_of_the_header():
    """Zephyr writes each content trimmed after its header's newline and a newline after every block: the
    rendering up to the generation prompt ends '<|assistant|>\\n\\n', the text '<|assistant|>\\nR'. A reply that
    opens with a newline ('\\nR\\n', written 'R') trains 'R' and its marker, not the header's newline before it
    (what the template writes before the reply is read from the conversation with a sentinel in its place), on the
    full path and on the structure path alike."""
    from backend import chat

    t = fresh_tok("chatml")
    tpl = (
        "{% for m in messages %}{{ '<|' + m.role + '|>\\n' + m.content | trim + '<|im_end|>' }}\n{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}\n{% endif %}"
    )
    conv = [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "\nR\n"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "\nR2"},
    ]
    assert chat.render_messages(conv[:1], t, tpl, add_generation_prompt=True).endswith("<|assistant|>\n\n")
    for _ in range(6):  # the first rows take the full path (and cross-check the structure), the rest substitute
        r = render(conv, t, chat_template=tpl)
        assert r.text == t.apply_chat_template(conv, chat_template=tpl, tokenize=False)
        assert "<|assistant|>\nR<|im_end|>" in r.text
        assert [r.text[b:e] for b, e in r.trained_spans] == ["R<|im_end|>", "R2<|im_end|>"]


def test_template_errors_are_clear():
    t = tok("gemma")
    with pytest.raises(TemplateError, match="alternate"):
        render(
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}],
            t,
        )
    with pytest.raises(TemplateError, match="syntax error at line 2"):
        render(TURNS, t, chat_template="{% for m in messages %}\n{{ m.content }\n{% endfor %}")
    with pytest.raises(TemplateError, match="does not exist"):
        render(TURNS, t, chat_template="/nonexistent/template.jinja")


def test_template_from_file(tmp_path):
    t = tok("chatml")
    p = tmp_path / "t.jinja"
    p.write_text(tok("phi3").chat_template)
    r = render(TURNS, tok("phi3"), chat_template=str(p))
    assert r.text.startswith("<|user|>\n") and trained_text(r) == "".join(x + "<|end|>" for x in REPLIES)
    # phi3's template with a tokenizer for which <|end|> is plain text: the reply is still found, and the
    # marker of a non-final turn is bounded by what the full rendering shares (the final eos differs)
    r = render(TURNS, t, chat_template=str(p))
    assert [r.text[b:e] for b, e in r.trained_spans][:2] == [x + "<|end|>" for x in REPLIES[:2]]


# ---------------------------------------------------------------------------------------- conversations
@pytest.mark.parametrize(
    "conv, match",
    [
        ([{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}], r"message 1: 'from' is 'robot'"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant"}], r"message 1: missing key 'content'"),
        ([{"from": "human"}], r"message 0: missing key 'value'"),
        ([{"content": "hi"}], r"message 0: missing key 'role'"),
        (
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}],
            r"message 1 \(assistant\): 'content' is empty",
        ),
        ([{"role": "user", "content": 5}], r"message 0 \(user\): 'content' must be a string"),
        ([{"role": "user", "content": None}], r"message 0 \(user\): 'content' is null"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
            r"message 0 \(user\): 'content' part 0 is of type 'image_url'; only text parts",
        ),
        ({"text": "hi"}, r"no 'conversations' or 'messages' column"),
        ([], r"empty"),
        (["hi"], r"message 0: must be a dict"),
        ([{"role": "user", "content": " \n "}], r"message 0 \(user\): 'content' is empty"),
        ([{"role": "user", "content": ["a", 5]}], r"message 0 \(user\): 'content' part 1 is of type 'int'"),
        *[
            ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "", **bad}], match)
            for bad, match in [
                ({"tool_calls": []}, r"message 1 \(assistant\): the reply is empty"),
                ({"tool_calls": {"name": "f"}}, r"message 1 \(assistant\): 'tool_calls' must be a list"),
                ({"tool_calls": [{"arguments": {}}]}, r"message 1 \(assistant\) tool call 0: the call has no function"),
                ({"tool_calls": [7]}, r"tool call 0: a tool call must be a dict, got int"),
                ({"tool_calls": ["{f("]}, r"tool call 0: the call is a string that is not JSON \('\{f\('\)"),
                (
                    {"tool_calls": [{"name": "f", "arguments": "{x"}]},
                    r"tool call 0: 'arguments' is a string that is not JSON",
                ),
                (
                    {"tool_calls": [{"name": "f", "arguments": [1]}]},
                    r"tool call 0: 'arguments' must be a dict .* got list",
                ),
            ]
        ],
        (
            [{"role": "user", "content": "q"}, {"from": "function_call", "value": "f("}],
            r"message 1 \(function_call\): the value is not JSON",
        ),
        (
            [{"role": "user", "content": "q"}, {"from": "function_call", "value": "[]"}],
            r"message 1 \(function_call\): the value holds no call",
        ),
        (
            [{"role": "user", "content": "q"}, {"from": "function_call", "value": '[{"name": "f"}, {"x": 1}]'}],
            r"message 1 \(function_call\) call 1: the call has no function name",
        ),
        ("[{'role': 'user'", r"conversation is a string that is not JSON; give a list of messages"),
        ({"role": "user", "content": "hi"}, r"conversation must be a list of messages, got dict"),
        ({"messages": 5}, r"conversation must be a list of messages, got int"),
        ([{"role": 5, "content": "hi"}], r"message 0: 'role' is 5, not a known role"),
        ([{"role": "user", "content": [{"type": "text", "text": 5}]}], r"'content' part 0 is of type 'text'"),
        ([{"role": "user", "content": [{"type": "image", "text": "alt"}]}], r"'content' part 0 is of type 'image'"),
        ({"from": "human", "value": "hi"}, r"conversation must be a list of messages, got dict"),
    ],
)
def test_bad_conversations(conv, match):
    with pytest.raises(ConversationError, match=match):
        normalize_conversation(conv)
    with pytest.raises(ConversationError, match=match):  # render's own fast path gives the same errors
        render(conv, tok("llama"))


def test_accepted_message_forms():
    """Text parts (plain strings, parts without a type) are joined; a call may be a JSON string, name its
    arguments ``parameters``, give them as an empty string; every call is stored in one OpenAI form."""
    out = normalize_conversation(
        [
            {"role": "user", "content": ["a ", {"text": "b "}, {"type": "text", "text": "c"}]},
            {"role": "assistant", "content": "", "tool_calls": ['{"name": "f", "parameters": {"x": 1}, "id": 7}']},
            {"role": "tool", "content": "r"},
            {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "g", "arguments": " "}}]},
            {"role": "tool", "content": "r"},
            {"role": "assistant", "content": "", "function_call": {"name": "h", "arguments": "{}"}, "reasoning": "t"},
            {"role": "tool", "content": "r"},
            {"role": "assistant", "content": "", "thinking": " only a trace "},
        ]
    )
    assert out[5] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "h", "arguments": {}}}],
        "reasoning_content": "t",
        "thinking": "t",
    }
    assert out[7] == {
        "role": "assistant",
        "content": "",
        "reasoning_content": "only a trace",
        "thinking": "only a trace",
    }
    # a result with no call before it keeps no name; an empty result is a result; a JSON array result is JSON text
    results = normalize_conversation(
        [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"},
            {"role": "tool", "content": ""},
            {"role": "tool", "content": [{"temp": 3}]},
        ]
    )[2:]
    assert results == [{"role": "tool", "content": ""}, {"role": "tool", "content": '[{"temp": 3}]'}]
    assert out[0] == {"role": "user", "content": "a b c"}
    plain = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert normalize_conversation([{"from": "Human", "value": "q"}, {"role": "ASSISTANT", "content": "a"}]) == plain
    assert normalize_conversation(json.dumps(plain)) == plain  # a column that stores the messages as JSON text
    assert normalize_conversation({"dialog": plain, "messages": 1}, field="dialog") == plain
    with pytest.raises(ConversationError, match=r"row has no 'dialog' column \(columns: \['messages'\]\)"):
        normalize_conversation({"messages": plain}, field="dialog")
    assert out[1]["tool_calls"] == [{"type": "function", "function": {"name": "f", "arguments": {"x": 1}}, "id": "7"}]
    assert out[3] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "g", "arguments": {}}}],
    }


def test_tool_schema_forms_and_refusals():
    """A row's ``tools``: absent or blank is no tools; a JSON string, one schema, flat schemas and schemas as JSON
    strings all become OpenAI-form schemas; anything else is refused naming the row and the tool."""
    from backend.chat import normalize_tools

    flat = {"name": "f", "description": "d", "parameters": {}}
    openai = {"type": "function", "function": flat}
    for empty in (None, "", "  ", []):
        assert normalize_tools(empty) is None
    for given in ([flat], [openai], flat, json.dumps([flat]), [json.dumps(flat)], (flat,)):
        assert normalize_tools(given) == [openai], given
    for bad, match in [
        ("[{", r"row 3: 'tools' is a string that is not JSON"),
        (5, r"row 3: 'tools' must be a list of tool schemas, got int"),
        (["{"], r"row 3: tool 0 is a string that is not JSON"),
        ([flat, 7], r"row 3: tool 1 must be a dict, got int"),
        ([flat, {"description": "no name"}], r"row 3: tool 1 has no 'name'"),
        ([{"function": "f"}], r"row 3: tool 0 has no 'name'"),
    ]:
        with pytest.raises(ConversationError, match=match):
            normalize_tools(bad, "row 3")


def test_conversation_shapes():
    want = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "ab"},
    ]
    share = [{"from": "system", "value": "s"}, {"from": "human", "value": "u"}, {"from": "gpt", "value": "ab"}]
    openai = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ]
    assert normalize_conversation(share) == want
    assert normalize_conversation({"conversations": share, "uuid": 1}) == want
    assert normalize_conversation({"messages": openai}) == want
    assert normalize_conversation([{"role": "model", "content": "x"}])[0]["role"] == "assistant"
    rows = [json.loads(line) for line in open(SAMPLE_DATA_OPENAI_PATH())][:3]
    shares = [json.loads(line) for line in open(SAMPLE_DATA)][:3]
    for a, b in zip(rows, shares, strict=False):
        assert render(a, tok("llama")).text == render(b, tok("llama")).text


def SAMPLE_DATA_OPENAI_PATH():
    from backend import SAMPLE_DATA_OPENAI

    return SAMPLE_DATA_OPENAI


# ------------------------------------------------------------------------------------------- health checks
def test_check_sample_length_problems():
    t = tok("llama")
    r = render(TURNS, t)
    tk = tokenize(r.text, r.trained_spans, t)
    n = len(tk.input_ids)
    assert check_sample(r, tk, t, sequence_length=n) == []
    # cut inside the last reply
    last = r.turns[-1]
    cut = int(np.searchsorted(tk.offsets[:, 0], last.begin)) + 1
    codes = [p.split(":")[0] for p in check_sample(r, tk, t, sequence_length=cut)]
    assert codes == ["too_long", "assistant_cut"]
    # cut between turns (before the last reply starts): too long but no assistant turn crosses
    first_user_after = r.text.find("No, thanks.")
    cut2 = int(np.searchsorted(tk.offsets[:, 0], first_user_after))
    codes = [p.split(":")[0] for p in check_sample(r, tk, t, sequence_length=cut2)]
    assert codes == ["too_long"]


def test_check_dataset_and_report():
    t = tok("llama")
    rows = [json.loads(line) for line in open(SAMPLE_DATA)][:30]
    rows.append({"conversations": [{"from": "human", "value": "hi"}]})  # no assistant
    rows.append({"conversations": [{"from": "alien", "value": "hi"}]})  # bad
    seen = []
    rep = check_dataset(rows, t, Masking(), sequence_length=64, progress=lambda i, n: seen.append((i, n)))
    assert seen[-1] == (32, 32) and len(seen) == 32
    d = rep.to_dict()
    assert d["samples"] == 32
    assert d["problems"]["bad_conversation"]["examples"] == [31]
    assert "message 0" in d["problems"]["bad_conversation"]["first"]
    assert d["problems"]["span_not_found"]["examples"] == [30]
    assert d["problems"]["no_trained_tokens"]["count"] == 1
    assert abs(d["span_found_share"] - 30 / 32) < 1e-9
    assert 0 < d["trained_token_share"] < 1
    assert len(d["lengths"]) == 31
    long_rows = sum(n > 64 for n in d["lengths"])
    assert d["problems"].get("too_long", {"count": 0})["count"] == long_rows
    s = rep.summary()
    assert "bad_conversation" in s and "30" in s
    json.dumps(d)
    rep2 = check_dataset(rows, t, limit=5)
    assert rep2.n_samples == 5 and rep2.counts == {}
    h = HealthReport()
    h.add(0, ["x: a", "x: b"], 10, 5)
    assert h.counts == {"x": 1}


def test_eot_token_ids():
    for family, (_, eot) in FAMILIES.items():
        t = tok(family)
        ids = eot_token_ids(t)
        assert ids[0] == t.convert_tokens_to_ids(eot)
        assert t.eos_token_id in ids and len(set(ids)) == len(ids), ids  # each id once (generation stop list)


# ------------------------------------------------------------------ fast paths agree with the reference
def _reference(conv, t, template=None, train_on="all"):
    """The full prefix diff on the real rendering (what render did before the structure cache)."""
    from backend import chat

    msgs = normalize_conversation(conv)
    template = chat.resolve_template(t, template)
    text = chat.render_messages(msgs, t, template)
    assistants = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    target = assistants[-1:] if train_on == "last" else assistants
    problems = []
    return text, chat.templates._auto_turns(msgs, t, template, text, target, problems), problems


@pytest.mark.parametrize("family", ["llama", "chatml", "gemma", "mistral", "phi3"])
def test_structure_cache_equals_full_prefix_diff(family):
    """Every row of the sample data (many role patterns, far more rows than the per-pattern cross-checks) plus
    replies with surrounding whitespace (stripping templates) give exactly the reference text and turns."""
    t = tok(family)
    rows = [json.loads(line) for line in open(SAMPLE_DATA)][:120]
    padded = [
        {"from": "human", "value": "  Hi  \n"},
        {"from": "gpt", "value": "\n  Padded reply.  \n"},
        {"from": "human", "value": "again"},
        {"from": "gpt", "value": " x "},
    ]
    convs = [r["conversations"] for r in rows] + [TURNS, [SYSTEM] + TURNS, padded, padded]
    for train_on in ("all", "last"):
        for conv in convs:
            try:
                ref_text, ref_turns, ref_problems = _reference(conv, t, train_on=train_on)
            except TemplateError:
                with pytest.raises(TemplateError):
                    render(conv, t, Masking(train_on=train_on))
                continue
            r = render(conv, t, Masking(train_on=train_on))
            assert r.text == ref_text
            assert r.turns == ref_turns
            assert r.problems == ref_problems + [p for p in r.problems if p.startswith("special_text_in_content")]
    from backend import chat

    # the fast path is really taken for these templates (a learned structure per role pattern)
    assert sum(v is not None for v in chat.tokens._info(t)["structures"].values()) >= 2


def test_structure_is_cross_checked_on_its_first_rows_and_dropped_when_they_disagree(monkeypatch):
    """A role pattern's first three rows also run the full prefix diff; later rows do not. When one of those
    checks disagrees with the structure, the pattern is dropped for good and the row takes the full path."""
    from backend import chat
    from backend.chat import fastpath

    t = fresh_tok("chatml")
    base = CHATML
    real = fastpath._auto_turns
    calls = []

    def spy(messages, *args):
        calls.append(len(messages))
        turns = real(messages, *args)
        return turns[:-1] if disagree and len(calls) == 4 else turns  # the build, then the third row's check

    monkeypatch.setattr(fastpath, "_auto_turns", spy)
    want = [x + "<|im_end|>" for x in REPLIES]
    for disagree, tpl in ((False, base + "{# agree #}"), (True, base + "{# disagree #}")):
        calls.clear()
        key = fastpath._structure_key(normalize_conversation(TURNS), tpl, "all")
        for row in range(6):
            r = render(TURNS, t, chat_template=tpl)
            assert [r.text[b:e] for b, e in r.trained_spans] == want
            assert len(calls) == 1 + min(row + 1, 3), (disagree, row)
            structure = chat.tokens._info(t)["structures"][key]
            assert (structure is None) == (disagree and row >= 2), (disagree, row)
            if structure is not None:
                assert structure.checks_left == max(0, 2 - row)


def test_a_template_that_writes_the_date_is_rebuilt_when_the_day_changes(monkeypatch):
    """Llama 3.1's template writes ``strftime_now``'s date: still proven content-independent (rendered by
    substitution), but only for the day it was built on. A prepare that runs past midnight writes the new date."""
    import datetime
    import uuid

    from backend import chat
    from backend.chat import fastpath, templates

    monkeypatch.delenv("SFT_STUDIO_VERIFY_RENDER", raising=False)  # what is proven is asserted
    t = fresh_tok("chatml")
    tpl = "Today: {{ strftime_now('%d %b') }}\n" + CHATML
    day = {"text": "01 Jan", "date": datetime.date(2026, 1, 1)}
    tpl += f"{{# {uuid.uuid4()} #}}"  # its own template: the probe keeps an instrumented copy per template source

    def strftime_now(fmt):
        return day["text"]

    monkeypatch.setitem(templates._compile(tpl).environment.globals, "strftime_now", strftime_now)
    monkeypatch.setattr(fastpath, "_today", lambda: day["date"])
    key = fastpath._structure_key(normalize_conversation(TURNS), tpl, "all")
    want = [x + "<|im_end|>" for x in REPLIES]
    for text, date in (("01 Jan", datetime.date(2026, 1, 1)), ("02 January", datetime.date(2026, 1, 2))):
        day.update(text=text, date=date)
        for _ in range(5):
            r = render(TURNS, t, chat_template=tpl)
            assert r.text == chat.render_messages(normalize_conversation(TURNS), t, tpl)
            assert r.text.startswith(f"Today: {text}\n") and [r.text[b:e] for b, e in r.trained_spans] == want
        structure = chat.tokens._info(t)["structures"][key]
        assert structure.proven and structure.day == date


@pytest.mark.parametrize(
    "content, proven, reply",
    [
        ("{{ m.content }}", 1, "\n  Padded reply.  \n"),
        ("{{ m.content|trim }}", 1, "Padded reply."),
        ("{{ m.content.strip() }}", 1, "Padded reply."),
        ("{{ m.content.lstrip() }}", 0, "Padded reply.  \n"),  # stripped on one side: not substituted
        ("{{ m.content.rstrip() }}", 0, "\n  Padded reply."),
        # the user's text stripped between a space and a newline on each side, which the probe's padding around
        # its text looks like: the pattern would write it verbatim, and the probe of the template says otherwise
        ("{% if m.role == 'user' %} \n{{ m.content|trim }} \n{% else %}{{ m.content }}{% endif %}", 0, None),
    ],
    ids=["verbatim", "trim", "strip", "lstrip", "rstrip", "padded-by-the-template"],
)
def test_contents_written_verbatim_stripped_or_half_stripped(content, proven, reply, monkeypatch):
    """The structure tells a content written verbatim from one written stripped (the padding around its probe),
    and substitutes neither for a template that strips one side only, nor where the two ways of telling disagree:
    every row is then the real rendering."""
    from backend import chat

    monkeypatch.setenv("SFT_STUDIO_VERIFY_RENDER", "0")  # "0" is off, as unset: what is proven is asserted
    t = fresh_tok("chatml")
    tpl = CHATML.replace("{{ m.content }}", content) + "{# padded #}"
    padded = [{"from": "human", "value": "  Hi  \n"}, {"from": "gpt", "value": "\n  Padded reply.  \n"}]
    for _ in range(5):
        r = render(padded, t, chat_template=tpl)
        assert r.text == chat.render_messages(normalize_conversation(padded), t, tpl)
        assert [r.text[b:e] for b, e in r.trained_spans] == [(reply or padded[1]["value"]) + "<|im_end|>"]
    report = chat.render_fast_path(t, tpl)
    assert report["proven"] == proven
    if reply is None:
        assert report["reasons"] == ["a content is stripped on one side only, or the template writes ' \\n' around it"]


def test_a_proven_structure_is_still_checked_every_64th_row(monkeypatch):
    """Substitution is the rendering for a proven template: its first three rows (cross-checked) and every 64th
    row are rendered anyway, no other. A difference there (which the proof rules out) stops the run loudly,
    naming the roles and the first differing character, instead of training on a wrong text."""
    from backend.chat import RenderProofError, fastpath

    monkeypatch.delenv("SFT_STUDIO_VERIFY_RENDER", raising=False)  # what is proven is asserted
    t = fresh_tok("chatml")
    tpl = CHATML + "{# checked #}"
    real = fastpath.templates.render_messages
    rendered = []

    def spy(messages, *args, **kwargs):
        whole = messages == row and not kwargs.get("add_generation_prompt")  # a row's rendering, not a prefix
        rendered.append(whole)
        return real(messages, *args, **kwargs) + (" " if drift and whole else "")

    monkeypatch.setattr(fastpath.templates, "render_messages", spy)
    drift, row = False, normalize_conversation(TURNS)
    for _ in range(3):
        render(TURNS, t, chat_template=tpl)
    assert sum(rendered) == 3  # each cross-checked row
    drift, rendered = True, []
    for _ in range(4, 64):
        render(TURNS, t, chat_template=tpl)  # substituted: not rendered
    assert rendered == []
    n = len(real(row, t, tpl))
    with pytest.raises(RenderProofError) as e:
        render(TURNS, t, chat_template=tpl)
    assert str(e.value) == (
        "internal error: the chat template was proven not to depend on message content for roles "
        f"user/assistant/user/assistant/user/assistant, yet this row renders differently from the substitution (at "
        f"char {n}). Please report it with the template; set SFT_STUDIO_VERIFY_RENDER=1 to render every row meanwhile."
    )


def test_content_dependent_template_falls_back_to_prefix_diff():
    """A template that rewrites some replies (upper-cases those with '!') and strips others: rows where the
    substituted text differs from the real rendering must take the full prefix diff and still be exact."""
    t = tok("chatml")
    tpl = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if '!' in m.content %}{{ m.content|upper }}"
        "{% else %}{{ m.content|trim }}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    plain = [
        {"from": "human", "value": "hi"},
        {"from": "gpt", "value": "  calm reply "},
        {"from": "human", "value": "more"},
        {"from": "gpt", "value": "also calm"},
    ]
    loud = [
        {"from": "human", "value": "hi"},
        {"from": "gpt", "value": "loud reply!"},
        {"from": "human", "value": "more"},
        {"from": "gpt", "value": "also calm"},
    ]
    for conv in [plain] * 4 + [loud] + [plain] * 2 + [loud]:
        r = render(conv, t, chat_template=tpl)
        ref_text, ref_turns, _ = _reference(conv, t, tpl)
        assert r.text == ref_text and r.turns == ref_turns
    r = render(plain, t, chat_template=tpl)
    assert [r.text[b:e] for b, e in r.trained_spans] == ["calm reply<|im_end|>", "also calm<|im_end|>"]
    r = render(loud, t, chat_template=tpl)
    assert [r.text[b:e] for b, e in r.trained_spans][1] == "also calm<|im_end|>"
    assert r.text[r.trained_spans[0][0] : r.trained_spans[0][1]].startswith("LOUD REPLY!")


def test_delimiter_mode_substitutes_only_for_proven_templates(monkeypatch):
    """Delimiter masking needs the text only: it is built by substitution where the template is proven not to
    look at contents (rendered for real on the first three rows only, as a check), else rendered on every row. A
    template that rewrites some contents, or writes one twice, still gives the real rendering on every row."""
    from backend.chat import fastpath

    monkeypatch.delenv("SFT_STUDIO_VERIFY_RENDER", raising=False)
    t = fresh_tok("chatml")
    plain = CHATML
    loud = plain.replace(
        "{{ m.content }}", "{% if '!' in m.content %}{{ m.content|upper }}{% else %}{{ m.content }}{% endif %}"
    )
    twice = plain.replace("{{ m.content }}", "{{ m.content }}{% if m.role == 'user' %} {{ m.content }}{% endif %}")
    masking = Masking(mode="delimiters", start_delimiter=CHATML_SD, end_delimiter=CHATML_ED)
    real, row, rendered = fastpath.templates.render_messages, normalize_conversation(TURNS), []

    def spy(messages, *args, **kwargs):
        rendered.append(messages == row and not kwargs.get("add_generation_prompt"))  # a whole row's rendering
        return real(messages, *args, **kwargs)

    monkeypatch.setattr(fastpath.templates, "render_messages", spy)
    for tpl in (plain, loud, twice):
        rendered.clear()
        for _ in range(8):
            r = render(TURNS, t, masking, chat_template=tpl)
            assert r.text == real(row, t, tpl), tpl
            assert trained_text(r) == "".join(
                (x.upper() if "!" in x and tpl == loud else x) + "<|im_end|>" for x in REPLIES
            )
        assert sum(rendered) == (3 if tpl == plain else 8), tpl


def test_date_injecting_template_is_exact():
    """A template that injects a date which changes mid-run (after the structure was learned) never reuses the
    stale structure: the row's real rendering differs from the substituted text, so it takes the prefix diff."""
    from backend import chat

    t = tok("chatml")
    day = {"today": "1 Jan"}
    tpl = (
        "Today: {{ today() }}\n{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    info = chat.tokens._info(t)
    old = info["kwargs"]
    info["kwargs"] = dict(old, today=lambda: day["today"])
    try:
        for _ in range(5):
            r = render(TURNS, t, chat_template=tpl)
            assert r.text.startswith("Today: 1 Jan") and trained_text(r) == "".join(x + "<|im_end|>" for x in REPLIES)
        day["today"] = "2 January"  # longer: every position after it shifts
        r = render(TURNS, t, chat_template=tpl)
        ref_text, ref_turns, _ = _reference(TURNS, t, tpl)
        assert r.text == ref_text and r.text.startswith("Today: 2 January") and r.turns == ref_turns
        assert [r.text[b:e] for b, e in r.trained_spans] == [x + "<|im_end|>" for x in REPLIES]
    finally:
        info["kwargs"] = old


def test_render_fast_path_reports_each_role_pattern_and_why_it_is_not_proven(monkeypatch):
    """The studio's "template speed" line: per template, the role patterns rendered so far, how many are proven
    content-independent (rendered by substitution), and each reason for the others once."""
    from backend.chat import render_fast_path

    monkeypatch.delenv("SFT_STUDIO_VERIFY_RENDER", raising=False)  # what is proven is asserted
    t = fresh_tok("chatml")
    base = CHATML + "{# report #}"
    reads = base.replace("{{ m.content }}", "{% if '!' in m.content %}!{% endif %}{{ m.content }}")
    twice = base.replace("{{ m.content }}", "{{ m.content }}{% if m.role == 'user' %} {{ m.content }}{% endif %}")
    expected = {
        base: (3, []),
        reads: (0, ["the template inspects message content (str.__contains__)"]),
        twice: (0, ["the template does not write each message's content once, verbatim or stripped"]),
    }
    for tpl, (proven, reasons) in expected.items():
        assert render_fast_path(t, tpl) == {"patterns": 0, "proven": 0, "reasons": []}
        for conv in (TURNS, [SYSTEM] + TURNS, TURNS[:2]):
            render(conv, t, chat_template=tpl)
        assert render_fast_path(t, tpl) == {"patterns": 3, "proven": proven, "reasons": reasons}, tpl
    render(TURNS, t)  # the tokenizer's own template, when none is named
    assert render_fast_path(t) == {"patterns": 1, "proven": 1, "reasons": []}
    monkeypatch.setenv("SFT_STUDIO_VERIFY_RENDER", "1")  # every row rendered: nothing is taken as proven
    verify = base + "{# verify #}"
    for conv in (TURNS, [SYSTEM] + TURNS):
        render(conv, t, chat_template=verify)
    assert render_fast_path(t, verify) == {"patterns": 2, "proven": 0, "reasons": ["SFT_STUDIO_VERIFY_RENDER is set"]}


def test_tokenize_batch_refuses_texts_and_span_lists_of_different_lengths():
    with pytest.raises(ValueError, match="tokenize_batch: 1 texts but 0 span lists"):
        tokenize_batch(["a"], [], tok("llama"))


@pytest.mark.parametrize("setup", ["truncation", "padding", "split_special_tokens"])
def test_tokenize_batch_on_a_tokenizer_set_to_truncate_pad_or_split_specials(setup):
    """The Rust tokenizer is called directly only when that gives what the tokenizer's own call gives. A call
    with ``truncation=True`` or ``padding=...`` leaves the Rust tokenizer truncating or padding, and
    ``split_special_tokens`` may be set after the first use: every token still comes out, as the tokenizer's own
    call gives it."""
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(TINY_MODEL))
    texts = ["Hello world, a sentence long enough to be cut.<|eot_id|>", "x"]
    tokenize_batch(texts, [[(0, 5)], []], t)  # its facts are learned before the setting changes
    if setup == "truncation":
        t(texts, truncation=True, max_length=4)
    elif setup == "padding":
        t(texts, padding="max_length", max_length=64)
    else:
        t.split_special_tokens = True
    out = tokenize_batch(texts, [[(0, 5)], []], t)
    want = t(texts, add_special_tokens=False)["input_ids"]
    assert [o.input_ids.tolist() for o in out] == [[t.bos_token_id] + w for w in want]
    eot = t.convert_tokens_to_ids("<|eot_id|>")
    assert len(want[0]) > 10 and (setup == "split_special_tokens") == (eot not in want[0])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tokenize_batch_equals_the_tokenizer_call(family):
    """The batched fast path (Rust encodings -> flat numpy) gives the tokenizer's own ids and offsets, BOS added
    once where the text lacks it, and the mask of the token rule computed per sample."""
    from backend.chat.tokens import _mask_from_offsets

    t = tok(family)
    texts = ["Hello world", "  two  spaces ", "émoji 🙂 done", "x"]
    if t.bos_token:
        texts.append(t.bos_token + "starts with bos")
    spans = [[(0, 3)], [(2, 5), (7, 9)], [], [(0, 1)]] + ([[(3, 8)]] if t.bos_token else [])
    out = tokenize_batch(texts, spans, t)
    enc = t(texts, add_special_tokens=False, return_offsets_mapping=True)
    adds_bos = t.bos_token_id is not None and t("a")["input_ids"][0] == t.bos_token_id
    for text, sp, o, ids, offs in zip(texts, spans, out, enc["input_ids"], enc["offset_mapping"], strict=False):
        extra = int(adds_bos and not text.startswith(t.bos_token))
        assert o.input_ids.tolist() == [t.bos_token_id] * extra + list(ids)
        assert o.offsets.tolist() == [[0, 0]] * extra + [list(x) for x in offs]
        assert o.trained.tolist() == _mask_from_offsets(o.offsets, sorted(sp)).tolist()
        single = tokenize(text, sp, t)
        assert np.array_equal(single.input_ids, o.input_ids) and np.array_equal(single.trained, o.trained)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_portable_tokenizer_equals_the_original(family):
    """prepare's workers rebuild the tokenizer from `portable_spec` with `tokenizers` alone (pickled across the
    process boundary): render and tokenize_batch must give exactly what the transformers tokenizer gives."""
    import pickle

    from backend.chat import PortableTokenizer, portable_spec

    t = tok(family)
    lite = PortableTokenizer(pickle.loads(pickle.dumps(portable_spec(t))))
    convs = [[SYSTEM] + TURNS, TURNS] + [json.loads(line)["conversations"] for line in open(SAMPLE_DATA)][:30]
    a = [render(c, t) for c in convs]
    b = [render(c, lite) for c in convs]
    for x, y in zip(a, b, strict=False):
        assert (x.text, x.trained_spans, x.turns, x.problems) == (y.text, y.trained_spans, y.turns, y.problems)
    ta = tokenize_batch([x.text for x in a], [x.trained_spans for x in a], t)
    tb = tokenize_batch([x.text for x in a], [x.trained_spans for x in a], lite)
    for x, y in zip(ta, tb, strict=False):
        assert np.array_equal(x.input_ids, y.input_ids) and np.array_equal(x.trained, y.trained)
        assert np.array_equal(x.offsets, y.offsets)
    assert lite("Hi")["input_ids"] == t("Hi")["input_ids"]  # incl. the BOS its post-processor adds
    _assert_calls_alike(lite, t, [x.text for x in a[:3]])
    from backend.chat.tokens import _info

    facts = ("specials", "regex", "adds_bos", "bos", "bos_id", "kwargs")  # not the memos filled as rows render
    own = {k: _info(t)[k] for k in facts}
    assert {k: _info(lite)[k] for k in facts} == own  # its specials' regex too
    for attr in ("bos_token_id", "eos_token_id", "name_or_path", "chat_template", "split_special_tokens"):
        assert getattr(lite, attr) == getattr(t, attr), attr
    for token in own["specials"]:  # eot_token_ids reads the stop tokens' ids this way
        assert lite.convert_tokens_to_ids(token) == t.convert_tokens_to_ids(token), token


def _assert_calls_alike(lite, t, texts):
    """``lite(...)`` gives the ids and offsets ``t(...)`` gives: one text or a batch, with or without the special
    tokens the post-processor adds (what render, tokenize and the checks call)."""
    for special in (True, False):
        for one in texts:
            got, want = lite(one, special, True), t(one, add_special_tokens=special, return_offsets_mapping=True)
            assert got == {k: want[k] for k in ("input_ids", "offset_mapping")}
            assert lite(one, add_special_tokens=special) == {"input_ids": want["input_ids"]}
        want = t(texts, add_special_tokens=special)["input_ids"]
        assert lite(texts, add_special_tokens=special) == {"input_ids": want}


def test_portable_tokenizer_keeps_split_special_tokens_and_a_named_default_template():
    """A tokenizer loaded with split_special_tokens=True (special-token text in the data encoded as plain text) keeps
    that in prepare's workers; a chat template given per name ({"default": ..., "tool_use": ...}) travels as its
    default, which render reads in-process too."""
    import copy

    from transformers import AutoTokenizer

    from backend.chat import PortableTokenizer, portable_spec

    t = AutoTokenizer.from_pretrained(str(TINY_MODEL), split_special_tokens=True)
    lite = PortableTokenizer(portable_spec(t))
    text = "<|begin_of_text|>Hi <|eot_id|>"
    assert lite.split_special_tokens and len(lite(text, False)["input_ids"]) > 4  # the markers as plain text
    _assert_calls_alike(lite, t, [text, "plain"])
    named = copy.deepcopy(tok("llama"))
    named.chat_template = {"default": named.chat_template, "tool_use": "{{ messages }}"}
    assert PortableTokenizer(portable_spec(named)).chat_template == tok("llama").chat_template


def _odd_tokenizers():
    """Fast tokenizers unlike the shipped byte-level BPEs, built here with `tokenizers`: a Metaspace BPE with
    byte fallback (SentencePiece-like, as Mistral/Gemma/Llama 2 ship) and a whitespace-splitting WordPiece
    whose tokens do not cover the spaces (char -> token lookups return None there)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["Hello world, the end.", "Ünïcödé «ok» — 日本語", "def f(x):\n    return x**2", "emoji 🙂 done"] * 20
    sp = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    sp.normalizer = normalizers.Sequence([normalizers.Replace(" ", "▁")])
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    sp.decoder = decoders.Metaspace()
    sp.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
        ),
    )
    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]", "[SEP]"]))
    return {
        "metaspace-bytefallback": PreTrainedTokenizerFast(tokenizer_object=sp, bos_token="<s>", eos_token="</s>"),
        "wordpiece-gaps": PreTrainedTokenizerFast(tokenizer_object=wp, unk_token="[UNK]", sep_token="[SEP]"),
    }


@pytest.mark.parametrize("family", list(FAMILIES) + ["metaspace-bytefallback", "wordpiece-gaps"])
def test_mask_from_char_lookups_equals_the_offsets_rule(family):
    """prepare's mask comes from char -> token lookups at the span edges (no per-token offsets). For every span
    of many random ones it must equal the offsets rule, whatever the tokenizer: emoji split into byte pieces,
    spaces no token covers (that sample falls back to its offsets), spans that touch, spans past the text."""
    from backend.chat.tokens import _mask_from_offsets, _tokenize_flat

    t = tok(family) if family in FAMILIES else _odd_tokenizers()[family]
    rng = np.random.default_rng(0)
    base = [
        "Hello  world,\tthe end.\n\n",
        "emoji 🙂🧑‍🚀 done ",
        "日本語のテキスト x\u0301 ",
        "  def f(x):\n    return x**2\n",
    ]
    texts, spans_list = [], []
    for _ in range(60):
        text = "".join(rng.choice(base, size=rng.integers(1, 5)))
        cuts = sorted(set(rng.integers(0, len(text) + 3, size=2 * rng.integers(0, 4)).tolist()))
        texts.append(text)
        spans_list.append([(cuts[i], cuts[i + 1]) for i in range(0, len(cuts) - 1, 2)])
    fast = _tokenize_flat(texts, spans_list, t)
    slow = _tokenize_flat(texts, spans_list, t, offsets=True)
    assert np.array_equal(fast.ids, slow.ids) and np.array_equal(fast.bounds, slow.bounds)
    for j, (text, spans) in enumerate(zip(texts, spans_list, strict=False)):
        a, z = slow.bounds[j], slow.bounds[j + 1]
        want = _mask_from_offsets(slow.offsets[a:z], sorted((min(s, len(text)), min(e, len(text))) for s, e in spans))
        assert fast.trained[a:z].tolist() == want.tolist(), (family, text, spans)
        assert np.array_equal(fast.samples([j])[0].offsets, slow.offsets[a:z])  # built lazily, the same
    assert np.array_equal(fast.trained, slow.trained)
    for x, y in zip(fast.samples(), slow.samples(), strict=True):  # each sample, from either form of the batch
        assert np.array_equal(x.input_ids, y.input_ids) and np.array_equal(x.trained, y.trained)
        assert np.array_equal(x.offsets, y.offsets) and x.n_trained == y.n_trained


class _EditedBackend:
    """A Rust tokenizer backend whose encodings are edited by ``edit(enc)`` (offsets, char lookups): a tokenizer the
    char-lookup rule does not hold for. Counts its encode_batch calls."""

    def __init__(self, backend, edit):
        self.backend, self.edit, self.calls = backend, edit, 0

    def encode_batch(self, texts, add_special_tokens=False):
        self.calls += 1
        return [
            _EditedEncoding(e, self.edit)
            for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        ]


class _EditedEncoding:
    def __init__(self, enc, edit):
        self.ids, self.offsets, self.lookup = enc.ids, list(enc.offsets), enc.char_to_token
        edit(self)

    def char_to_token(self, c):
        return self.lookup(c)

    def token_to_chars(self, i):
        return self.offsets[i]


def _swap_two(enc):
    enc.offsets[2], enc.offsets[3] = enc.offsets[3], enc.offsets[2]


def _zero_width(enc):
    enc.offsets[3] = (enc.offsets[3][0], enc.offsets[3][0])


def _lookup_one_on(enc):  # past the probe's first line only: the whole probe is compared
    real, n = enc.lookup, len(enc.ids)
    enc.lookup = lambda c: real(c) if c < 60 or real(c) is None else min(real(c) + 1, n - 1)


@pytest.mark.parametrize(
    "edit", [None, _swap_two, _zero_width, _lookup_one_on], ids=lambda f: getattr(f, "__name__", "as-is")
)
def test_the_char_lookup_probe_accepts_only_what_it_proves(edit):
    """prepare builds masks from char -> token lookups only where `_char_lookup_ok`'s probe proves they give the
    offsets rule: offsets out of order, a token of zero width, or lookups that disagree with the offsets keep the
    offsets path. The verdict is taken once per tokenizer."""
    from transformers import AutoTokenizer

    from backend.chat.tokens import _char_lookup_ok, _fast_backend

    t = AutoTokenizer.from_pretrained(str(TINY_MODEL))  # its own memo of the verdict
    backend = _fast_backend(t) if edit is None else _EditedBackend(_fast_backend(t), edit)
    counted = backend if edit is not None else _EditedBackend(backend, lambda enc: None)
    assert _char_lookup_ok(t, counted) is (edit is None)
    assert _char_lookup_ok(t, counted) is (edit is None) and counted.calls == 1  # taken once


@pytest.mark.parametrize("family", list(FAMILIES))
def test_health_checks_agree_on_batched_and_single_tokenization(family):
    """check_sample on a `tokenize_batch` sample (mask from char lookups, offsets never built) reports exactly
    what it reports on a `tokenize` sample (offsets), including too_long / assistant_cut at a short
    sequence_length and eot_not_trained when the marker is not trained."""
    from backend.chat.tokens import _info

    t = tok(family)
    convs = [json.loads(line)["conversations"] for line in open(SAMPLE_DATA)][:60]
    for masking in (Masking(), Masking(train_on_eot=False)):
        rs = [render(c, t, masking) for c in convs]
        batch = tokenize_batch([r.text for r in rs], [r.trained_spans for r in rs], t)
        for r, b in zip(rs, batch, strict=False):
            assert b._offsets is None  # the char-lookup path ran: no offsets were built...
            single = tokenize(r.text, r.trained_spans, t)
            for seq in (None, 40, 80, 120, len(single.input_ids) - 3):
                assert check_sample(r, b, t, seq) == check_sample(r, single, t, seq)
            assert b._offsets is None  # ...and the health checks did not need them
        problems = {
            p.split(":")[0]
            for r, s in zip(rs, batch, strict=False)
            for seq in (40, 80, 120)
            for p in check_sample(r, s, t, seq)
        }
        assert "too_long" in problems and "assistant_cut" in problems
        assert ("eot_not_trained" in problems) == (not masking.train_on_eot)
    # every cut, a BOS the tokenizer adds included (a template that does not write it)
    rs = [render(c, t, chat_template=CHATML) for c in convs[:6]]
    batch = tokenize_batch([r.text for r in rs], [r.trained_spans for r in rs], t)
    assert [b._bos_added for b in batch] == [_info(t)["adds_bos"]] * len(batch)
    for r, b in zip(rs, batch, strict=True):
        single = tokenize(r.text, r.trained_spans, t)
        for seq in range(1, len(single.input_ids) + 1):
            problems = check_length(r, b, seq)
            assert problems == check_length(r, single, seq), seq
            # a turn is cut where the last token that fits ends inside it (not at its start: it then lies wholly after)
            limit = int(single.offsets[seq - 1, 1])
            assert any(p.startswith("assistant_cut") for p in problems) == any(
                turn.begin < limit < turn.end for turn in r.turns
            ), seq


def test_the_tokens_under_a_char_range_by_encoding_and_by_offsets():
    """The health checks find a marker's tokens from the encoding (batched samples) or from the offsets: both give
    the tokens whose characters overlap the range, a BOS the tokenizer adds counted, for any range."""
    from backend.chat.health import _overlapping_tokens

    rng = random.Random(0)
    for family in ("llama", "chatml"):  # a BOS the llama tokenizer adds (the template writes none), and none
        t = tok(family)
        r = render(TURNS, t, chat_template=CHATML)
        batched = tokenize_batch([r.text], [r.trained_spans], t)[0]
        single = tokenize(r.text, r.trained_spans, t)
        off = single.offsets.tolist()
        assert batched._bos_added == (family == "llama")
        for _ in range(400):
            b = rng.randrange(len(r.text))
            e = rng.randrange(b, min(len(r.text), b + 40) + 1)
            want = [i for i, (s, f) in enumerate(off) if s < e and f > b and f > s]
            assert _overlapping_tokens(batched, b, e).tolist() == want, (b, e)
            assert _overlapping_tokens(single, b, e).tolist() == want, (b, e)
        assert batched._offsets is None  # the encoding's path was the one taken


def test_a_token_that_covers_no_character_is_never_trained():
    """The token rule: a token is trained when its characters overlap a trained span, so one with empty offsets
    (an added BOS at (0, 0), a zero-width piece inside a reply) never is, even inside a trained span."""
    from backend.chat.tokens import _mask_from_offsets

    offsets = np.array([[0, 0], [0, 2], [2, 2], [2, 4], [4, 5]])
    assert _mask_from_offsets(offsets, [(0, 4)]).tolist() == [False, True, False, True, False]
    assert _mask_from_offsets(offsets, [(2, 5)]).tolist() == [False, False, False, True, True]


@pytest.mark.parametrize("family", ["llama", "chatml"])
def test_empty_and_overhanging_spans_train_what_the_token_rule_says(family):
    """The batched lookups clamp spans to the text and pass over empty ones: an empty span trains nothing, also at
    the text's start; a span past the end trains up to the last token; the same mask as the token rule per sample."""
    from backend.chat.tokens import _mask_from_offsets

    t = tok(family)
    texts = ["Hello world, again", "second text here", "x y"]
    spans = [[(0, 0), (6, 11)], [(3, 3), (7, 40)], [(0, 0)]]
    for text, sp, o in zip(texts, spans, tokenize_batch(texts, spans, t), strict=True):
        assert o.trained.tolist() == _mask_from_offsets(o.offsets, sorted(sp)).tolist()
        assert o.trained.tolist() == tokenize(text, sp, t).trained.tolist()
    assert not tokenize_batch(["x y"], [[(0, 0)]], t)[0].trained.any()


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_the_offsets_fallback_of_the_batched_mask_equals_the_token_rule(family, monkeypatch):
    """A sample with a character no token covers takes its own offsets (`_mask_by_lookup`'s fallback): forced for
    every sample here, with a tokenizer that adds BOS, the masks are still the token rule's, sample by sample."""
    import backend.chat.tokens as tokens_mod

    t = tok(family)
    texts = ["Hello world, again", "second text here", "x y"]
    spans = [[(6, 11)], [(0, 6), (7, 40)], [(0, 1)]]
    expected = [tokenize(text, sp, t).trained.tolist() for text, sp in zip(texts, spans, strict=True)]
    monkeypatch.setattr(tokens_mod, "_token_range", lambda *a: None)  # every lookup "finds an uncovered char"
    got = [o.trained.tolist() for o in tokenize_batch(texts, spans, t)]
    assert got == expected and any(any(m) for m in got)


def test_a_range_whose_first_or_last_character_no_token_covers_is_left_to_the_offsets():
    """`_token_range` answers None when either end of the range is a character no token covers (tokenizers that
    leave spaces out of their offsets), so that the sample takes its offsets; never a range open at one end."""
    from backend.chat.tokens import _token_range

    class Encoding:  # "abc def": tokens (0, 3) and (4, 7), the space at 3 in none
        offsets = [(0, 3), (4, 7)]

        def char_to_token(self, i):
            return next((t for t, (b, e) in enumerate(self.offsets) if b <= i < e), None)

        def token_to_chars(self, t):
            return self.offsets[t] if 0 <= t < len(self.offsets) else None

    enc = Encoding()
    assert [_token_range(enc, b, e, 2) for b, e in ((0, 3), (1, 2), (4, 7), (0, 7))] == [(0, 1), (0, 1), (1, 2), (0, 2)]
    assert _token_range(enc, 3, 7, 2) is None  # starts at the space
    assert _token_range(enc, 0, 4, 2) is None  # ends at it


def test_common_prefix_len_equals_a_character_scan():
    """`_common_prefix_len` (the binary search every marker and reply search relies on) on random strings over a
    small alphabet, against os.path.commonprefix: strings differing at their first character, one a prefix of the
    other, empty."""
    import os

    from backend.chat.templates import _common_prefix_len

    rng = random.Random(1)
    for _ in range(2000):
        a, b = ("".join(rng.choice("ab") for _ in range(rng.randint(0, 9))) for _ in range(2))
        assert _common_prefix_len(a, b) == len(os.path.commonprefix([a, b])), (a, b)


def test_a_reply_before_a_final_user_turn_gets_the_between_turns_marker():
    """A conversation that ends with a user message: its last reply is followed by a turn, so it trains the marker
    written between turns, not the final reply's (here none: the template leaves a final reply open)."""
    t = tok("chatml")
    tpl = _LOOP + "{% if not loop.first %}<|end|>{% endif %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
    r = render(TURNS + [{"from": "human", "value": "One more thing."}], t, chat_template=tpl)
    assert [r.text[b:e] for b, e in r.trained_spans] == [x + "<|end|>" for x in REPLIES]
    assert r.appended == [] and r.problems == []


def test_a_reply_whose_trailing_space_the_template_trims_trains_the_marker_after_it():
    """A template that trims replies and writes ' ' + EOS after them: a reply that ends with a space has its
    trailing space not written; the marker (' </s>' as the template writes it) is trained right after the text."""
    t = tok("chatml")
    tpl = _LOOP + "{% if m.role == 'user' %}[INST] {{ m.content }} [/INST]{% else %}{{ m.content | trim }} </s>"
    tpl += "{% endif %}{% endfor %}"
    turns = [dict(m, value=m["value"] + " ") if m["from"] == "gpt" else m for m in TURNS]
    r = render(turns, t, chat_template=tpl)
    assert [r.text[b:e] for b, e in r.trained_spans] == [x + " </s>" for x in REPLIES]
    assert r.problems == []


def test_health_report_adds_up_samples_as_counted_by_hand():
    """The dataset check's aggregate, worked out by hand: a code counted once per sample however often it is
    reported, examples capped, a sample with a reply not found (or nothing trained) not counted as found, the
    lengths of a sample written as several documents, and the samples whose final marker was appended."""
    from backend.chat.agent import TRACE_KEYS

    r = HealthReport(examples=2)
    r.add(0, [], 10, 4, appended=1)
    r.add(1, ["eot_not_trained: a", "eot_not_trained: b", "too_long: x"], 20, 5)
    r.add(2, ["span_not_found: none"], 5, 1)  # a reply whose span was not found, others trained: not found
    r.add(3, ["eot_not_trained: c"], 30, 6, appended=1, lengths=[12, 18, 0])
    r.add(4, [], 7, 0, appended=1)  # nothing trained
    r.add(5, ["eot_not_trained: d"], 8, 1)  # one trained token is enough
    assert r.to_dict() == {
        "samples": 6,
        "tokens": 80,
        "trained_tokens": 17,
        "span_found_share": 4 / 6,  # rows 0, 1, 3, 5
        "trained_token_share": 17 / 80,
        "problems": {
            "eot_not_trained": {"count": 3, "examples": [1, 3], "first": "eot_not_trained: a"},
            "span_not_found": {"count": 1, "examples": [2], "first": "span_not_found: none"},
            "too_long": {"count": 1, "examples": [1], "first": "too_long: x"},
        },
        "lengths": [10, 20, 5, 12, 18, 7, 8],
        "appended_eot": {"count": 3, "examples": [0, 3]},
        "agent_traces": {},
    }
    assert r.summary().splitlines() == [
        "6 samples, 80 tokens, 17 trained (21.2%); assistant spans found in 66.7% of samples",
        "length: median 10, p99 19, max 20",  # 18 + 0.94 * (20 - 18)
        "eot_not_trained: 3 sample(s), e.g. rows [1, 3]: eot_not_trained: a",
        "too_long: 1 sample(s), e.g. rows [1]: too_long: x",  # most frequent first, then as first seen
        "span_not_found: 1 sample(s), e.g. rows [2]: span_not_found: none",
        "end-of-turn marker appended (chat.final_eot: append): 3 sample(s) whose final reply the template leaves "
        "open, e.g. rows [0, 3]",
    ]
    assert HealthReport().summary().splitlines()[-1] == "no problems found"
    # agent traces: keys a sample did not report read as 0; every_turn says how many dropped traces it trains
    r.add_trace({"reasoning_dropped": 2})
    r.add_trace({"reasoning_dropped": 1, "reasoning_trained_apart": 3})
    assert r.trace_line() == (
        "agent traces: 0 tool calls trained, 0 tool results masked, reasoning trained in 0 turn(s), dropped by the "
        "template in 3 turn(s) (0 tokens; chat.reasoning: every_turn trains 3 of them, each in a document of its own)"
    )
    every = HealthReport()
    every.add_trace(dict(zip(TRACE_KEYS + ("reasoning_dropped_tokens",), (1, 2, 3, 4, 5), strict=True)))
    assert every.trace_line() == (
        "agent traces: 1 tool calls trained, 2 tool results masked, reasoning trained in 3 turn(s), dropped by the "
        "template in 4 turn(s) (5 tokens; chat.reasoning: every_turn keeps them)"
    )
    assert r.summary().splitlines()[-1] == r.trace_line() and r.to_dict()["agent_traces"] == {
        "reasoning_dropped": 3,
        "reasoning_trained_apart": 3,
    }
