"""Replies located among look-alikes: random conversations whose contents collide with each other and with the
template's own text, checked by an oracle that does not use `backend.chat`.

Each conversation is drawn (seeded) from a small vocabulary chosen to collide: questions that say the reply, replies
that are one letter of a header ('e' in 'assistant'), the end-of-turn marker's text, padded replies, a system prompt
holding the reply. Each template writes every reply after a fixed opening, so the oracle needs nothing but the text:
the n-th opening after the first line starts the n-th reply, which is written as the template writes it (verbatim,
or stripped where it trims), followed by the family's marker. Every reply must be trained exactly there, nothing
refused, and no problem reported. The first lines make the renderings differ before a reply (the turn count, the
contents' length or their vowels), so that each way of locating a reply is crossed: the prefix diff, the sentinel
rendering and the masked rendering.

Rows the product refuses by design (a reply of whitespace only) are not drawn. Left out, and written down in
tests/MUTATION.md: a template whose text both before and after a reply depends on the reply's characters (the
vowels counted first and last), where only the search after the question is left and a reply that a header holds
can be taken there (reported as eot_undecided).

Templates that rewrite every reply (upper-case it) have no verbatim reply to find, only look-alikes: a reply is
trained in its own turn (as the turn's text, reported) or the row is refused; never a header's or a question's copy.
"""

import random
from pathlib import Path

import pytest

from backend import TEMPLATE_TOKENIZERS, TINY_MODEL
from backend.chat import templates, tokens

pytestmark = pytest.mark.filterwarnings("ignore")

CORPUS = Path(__file__).parent / "data" / "chat_templates"

HEADS = {
    "none": "",
    "counted": "Turns: {{ messages|length }}\n",
    "measured": "{{ messages|map(attribute='content')|join|length }} characters\n",
    "dashes": "{{ '-' * (messages|map(attribute='content')|join|length % 7) }}\n",
    "last-length": "{{ (messages|last).content|length }}\n",
    "vowels": "{{ messages|map(attribute='content')|join|select('in', 'aeiouAEIOU')|list|length }} vowels\n",
}
_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_NO_SYSTEM = (
    "{% for m in messages %}{% if m.role == 'user' %}USER: {{ m.content|trim }}\n{% elif m.role == 'assistant' %}"
    "ASSISTANT: {{ m.content }}</s>\n{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT: {% endif %}"
)
_SYSTEM_LAST = (  # the system prompt written into the last user turn
    "{% set sys = messages|selectattr('role', 'equalto', 'system')|map(attribute='content')|join %}"
    "{% for m in messages if m.role != 'system' %}{% if m.role == 'user' %}[U]{% if loop.last %}{{ sys }} {% endif %}"
    "{{ m.content }}[/U]{% else %}[A]{{ m.content }}[/A]{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}[A]{% endif %}"
)
_TAGGED_VOWELS_LAST = (  # the contents' vowels written after the last turn
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
    "\n{{ messages|map(attribute='content')|join|select('in', 'aeiouAEIOU')|list|length }} vowels"
)
# body: (template, tokenizer, opening, marker, how a reply is written)
BODIES = {
    "chatml": (_CHATML, "chatml", "<|im_start|>assistant\n", "<|im_end|>", str),
    "no-system": (_NO_SYSTEM, "chatml", "ASSISTANT: ", "</s>", str),
    "system-last": (_SYSTEM_LAST, "chatml", "[A]", "[/A]", str),
    "vowels-last": (_TAGGED_VOWELS_LAST, "chatml", "<assistant>", "</assistant>", str),
    "llama-3.1": (
        "llama-3.1-8b-instruct.jinja",
        "llama",
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "<|eot_id|>",
        str.strip,
    ),
    "deepseek-r1": ("deepseek-r1-distill-qwen.jinja", "llama", "<｜Assistant｜>", "<｜end▁of▁sentence｜>", str),
    "qwen2.5": ("qwen2.5-instruct.jinja", "chatml", "<|im_start|>assistant\n", "<|im_end|>", str),
    "phi-3": ("phi-3-mini.jinja", "chatml", "<|assistant|>\n", "<|end|>", str),
}
VOCAB = [
    "yes.", "Yes.", "ok", "OK.", "Say yes.", "yes. and?", "a", "e", "Q", "S", "A", "Hello there.",
    "You said: Hello there. Why?", " yes. ", "\nyes.\n", "ok\n", "Continue.", "INST", "assistant", "ASSISTANT",
    "user", "<b>x</b>", "yes.ok", "ok yes.", "You are terse.", "s>", "</s>", "<|im_end|>", "im_end", "U]", "[A]",
    "characters", "vowels", "1", "-", "|>", "end",
]  # fmt: skip


def _conversation(rng) -> list[dict]:
    messages = [{"role": "system", "content": rng.choice(VOCAB)}] if rng.random() < 0.3 else []
    role = "assistant" if rng.random() < 0.1 else "user"
    for _ in range(rng.randint(2, 7)):
        text = rng.choice(VOCAB) if rng.random() < 0.8 else rng.choice(VOCAB) + rng.choice(VOCAB)
        messages.append({"role": role, "content": text})
        r = rng.random()  # mostly alternating; sometimes two in a row, or a system message between turns
        role = ("assistant" if role == "user" else "user") if r < 0.8 else role if r < 0.9 else "system"
    return messages


def _drawn(seed: str, n: int):
    """Of ``n`` conversations drawn with ``seed``, those that hold a reply, with their replies' indices."""
    rng = random.Random(seed)
    for _ in range(n):
        messages = _conversation(rng)
        assistants = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
        if assistants:
            yield messages, assistants


_tok = {}


def _tokenizer(name):
    from transformers import AutoTokenizer

    if name not in _tok:
        _tok[name] = AutoTokenizer.from_pretrained(str(TINY_MODEL if name == "llama" else TEMPLATE_TOKENIZERS / name))
    return _tok[name]


def _expected(text, messages, assistants, head, opening, marker, written):
    """(message index, reply start, reply end, marker end) per reply, from the text alone; None where the text has
    not one opening per reply (a template that drops a reply or writes the opening inside a content)."""
    opens, at = [], text.index("\n") + 1 if head else 0
    while (at := text.find(opening, at)) >= 0:
        at += len(opening)
        opens.append(at)
    if len(opens) != len(assistants):
        return None
    want = []
    for k, b in zip(assistants, opens, strict=True):
        reply = written(messages[k]["content"])
        if not text.startswith(reply, b):
            return None
        e = b + len(reply)
        want.append((k, b, e, e + len(marker) if text.startswith(marker, e) else e))
    return want


CASES = [
    (head, body)
    for head in HEADS
    for body in BODIES
    if not (body == "vowels-last" and head in ("vowels", "none", "counted"))  # both sides depend, or no head needed
]


@pytest.mark.parametrize("head, body", CASES)
def test_each_reply_is_trained_exactly_where_the_template_writes_it_among_look_alikes(head, body):
    template, tok_name, opening, marker, written = BODIES[body]
    if template.endswith(".jinja"):
        template = (CORPUS / template).read_text(encoding="utf-8")
    template = HEADS[head] + template
    tok = _tokenizer(tok_name)
    checked, wrong = 0, []
    for messages, assistants in _drawn(f"{head}/{body}", 40):
        try:
            text = templates.render_messages(messages, tok, template)
        except templates.TemplateError:  # a template that rejects the roles (alternation, a system message late)
            continue
        want = _expected(text, messages, assistants, HEADS[head], opening, marker, written)
        if want is None:
            continue
        tokens._info_cache.pop(tok, None)  # the full search, not a structure memoized by an earlier row
        problems = []
        try:
            got = [tuple(t) for t in templates._auto_turns(messages, tok, template, text, assistants, problems)]
        except templates.TemplateError as e:
            got = f"refused: {e}"
        checked += 1
        if got != want or problems:
            wrong.append((messages, want, got, problems))
    assert checked >= 20  # the oracle could read most rows
    assert wrong == []


_UPPER_TAGS = (
    "{% for m in messages %}<{{ m.role }}>{% if m.role == 'assistant' %}{{ m.content|upper }}{% else %}"
    "{{ m.content|replace('\\n', ' ')|trim }}{% endif %}</s>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
_UPPER_CHATML = _CHATML.replace("{{ m.content }}", "{{ m.content|upper if m.role == 'assistant' else m.content }}")
REWRITING = {
    "upper-tags": (_UPPER_TAGS, "llama", "<assistant>", "</s>"),
    "upper-chatml": (_UPPER_CHATML, "chatml", "<|im_start|>assistant\n", "<|im_end|>"),
}


@pytest.mark.parametrize("head", ["none", "counted", "measured", "dashes", "vowels"])
@pytest.mark.parametrize("body", REWRITING)
def test_a_reply_the_template_rewrites_is_trained_in_its_own_turn_or_refused_never_at_a_look_alike(head, body):
    """A template that upper-cases each reply, and conversations whose questions, system prompts and tags say what
    a reply says ('user', 'assistant', 'e', the next question): a reply the template leaves as it is ('OK.') is
    trained exactly after its opening with its marker; one it rewrites is trained within its own turn (from its
    opening to its marker's end, reported as content_not_verbatim) or the row is refused, naming a rewritten reply.
    Nothing is ever trained outside a reply's turn. (The first lines: none, where the renderings share the text
    before each reply; the turn count, where the sentinel rendering places it; the contents' length, where the
    masked rendering does; their vowels, which the masked rendering changes: the text after the reply and right
    before it is still the masked rendering's.)"""
    template, tok_name, opening, marker = REWRITING[body]
    template = HEADS[head] + template
    tok = _tokenizer(tok_name)
    checked, wrong = 0, []
    for messages, assistants in _drawn(f"rewriting/{head}/{body}", 60):
        text = templates.render_messages(messages, tok, template)
        opens, at = [], text.index("\n") + 1 if head != "none" else 0
        while (at := text.find(opening, at)) >= 0:
            at += len(opening)
            opens.append(at)
        if len(opens) != len(assistants):
            continue
        turns = [(b, text.index(marker, b)) for b in opens]  # each reply's turn: its written form, then its marker
        tokens._info_cache.pop(tok, None)
        problems = []
        try:
            got = [tuple(t) for t in templates._auto_turns(messages, tok, template, text, assistants, problems)]
        except templates.TemplateError as e:
            got = str(e)
        checked += 1
        rewritten = [k for k in assistants if messages[k]["content"].upper() != messages[k]["content"]]
        if isinstance(got, str):
            if not rewritten or "(assistant) verbatim" not in got:
                wrong.append((messages, "refused", got))
            continue
        for k, (b, e), turn in zip(assistants, turns, got, strict=True):
            if k in rewritten:
                ok = b <= turn[1] <= turn[3] <= e + len(marker)  # within its own turn
                ok = ok and any(p.startswith(f"content_not_verbatim: message {k}:") for p in problems)
            else:
                reply = messages[k]["content"]
                ok = turn == (k, b, b + len(reply), b + len(reply) + len(marker))
            if not ok:
                wrong.append((messages, k, turn, (b, e), problems))
    assert checked >= 30
    assert wrong == []
