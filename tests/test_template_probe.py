"""Tests for backend/template_probe.py: the proof that a chat template never looks at message content, which
lets `render` skip the per-row Jinja render. A wrong proof would silently train on wrong text, so the tests
are mostly templates that DO look at content, each in another way: none may be proven, and `render` must
still give exactly transformers' rendering for rows that take the branch."""

import json

import pytest

from backend import SAMPLE_DATA, TEMPLATE_TOKENIZERS, TINY_MODEL, chat
from backend.template_probe import content_independent

LOOP = (
    "{% for message in messages %}<|im_start|>{{ message.role }}\n{BODY}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# each writes the content once but ALSO looks at it: the rendering of some rows differs from a substitution
INSPECTING = {
    "in": "{% if '<think>' in message.content %}T:{% endif %}{{ message.content }}",
    "in plain string": "{% if message.content in 'ok fine yes' %}SHORT:{% endif %}{{ message.content }}",
    "not in": "{% if message.content not in ['x'] %}{{ message.content }}{% endif %}",
    "eq": "{% if message.content == 'yes' %}Y{% endif %}{{ message.content }}",
    "gt": "{% if message.content > 'm' %}late {% endif %}{{ message.content }}",
    "length filter": "{% if message.content|length > 20 %}LONG {% endif %}{{ message.content }}",
    "slice": "{{ message.content[:1] }}|{{ message.content[1:] }}",
    "index": "{% if message.content[0] == 'H' %}h{% endif %}{{ message.content }}",
    "upper filter": "{{ message.content | upper }}",
    "replace filter": "{{ message.content | replace('a', 'A') }}",
    "tojson filter": "{{ message.content | tojson }}",
    "trim chars": "{{ message.content | trim('!') }}",
    "trim of concat": "{{ ('\n' + message.content) | trim }}",
    "lstrip method": "{{ message.content.lstrip() }}",
    "split method": "{{ message.content.split('</think>')[-1] }}",
    "startswith": "{% if message.content.startswith('I') %}I:{% endif %}{{ message.content }}",
    "format filter": "{{ '%s' | format(message.content) }}",
    "mod operator": "{{ '[%s]' % message.content }}",
    "mul": "{{ message.content * 1 }}",
    "iterate": "{% for ch in message.content %}{{ ch }}{% endfor %}",
    "dict get": "{{ {'yes': 'Y'}.get(message.content, '') }}{{ message.content }}",
    "str join method": "{{ ''.join([message.content]) }}",
    "join filter": "{{ [message.content] | join('') }}",
    "set block": "{% set c %}{{ message.content }}{% endset %}{% if 'a' in c %}A{% endif %}{{ c }}",
    "macro": "{% macro m(x) %}{{ x }}{% endmacro %}{{ m(message.content) }}",
    "filter block": "{% filter upper %}{{ message.content }}{% endfilter %}",
    "tilde then inspect": "{% set c = message.content ~ '' %}{% if c|length > 9 %}L{% endif %}{{ c }}",
    "lower test": "{% if message.content is lower %}l{% endif %}{{ message.content }}",
    "filter test": "{% if message.content is filter %}F{% endif %}{{ message.content }}",
    "wordcount": "{{ message.content | wordcount }} {{ message.content }}",
    "messages map join": "{{ messages[:1] | map(attribute='content') | join('') | length }}{{ message.content }}",
    "written twice": "{{ message.content }}{{ message.content }}",
    "not written": "{{ message.role }}",
    "hash": "{{ {message.content: 1} | length }}{{ message.content }}",
    "selectattr on content": "{{ messages[:1] | selectattr('content', 'equalto', 'Hi') | list | length }}"
    "{{ message.content }}",
    "sort by content": "{{ (messages[:1] + [{'role': 'x', 'content': 'M'}]) | sort(attribute='content') | first }}"
    "{{ message.content }}",
    "unique contents": "{{ (messages[:1] + [{'content': 'Hi'}]) | map(attribute='content') | unique | list | length }}"
    "{{ message.content }}",
}

INDEPENDENT = {
    "verbatim": "{{ message.content }}",
    "trim": "{{ message.content | trim }}",
    "strip method": "{{ message.content.strip() }}",
    "concat": "{{ 'A: ' + message.content + '!' }}",
    "tilde": "{{ 'A: ' ~ message.content ~ '!' }}",
    "set": "{% set c = message['content'] | trim %}{{ c }}",
    "namespace": "{% set ns = namespace(c=message.content) %}{{ ns.c }}",
    "truthiness and type": "{% if message.content and message.content is string %}{{ message.content }}{% endif %}",
    "selectattr on roles": "{{ messages | selectattr('role', 'equalto', 'user') | list | length }}"
    "{{ message.content }}",
    "list of contents": "{% set cs = messages | map(attribute='content') | list %}{{ cs[loop.index0] }}",
}


def _tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TEMPLATE_TOKENIZERS / "chatml"))


def _probe(tok, template, roles=("system", "user", "assistant", "user", "assistant")):
    msgs = [
        {"role": r, "content": chat.fastpath._PAD + chat.templates._sentinel(i) + chat.fastpath._PAD}
        for i, r in enumerate(roles)
    ]
    text = chat.render_messages(msgs, tok, template)
    return content_independent(
        template, chat.templates._compile(template).environment, msgs, text, **chat.templates._template_kwargs(tok)
    )


ROWS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  yes  "}],
    [{"role": "user", "content": "<think>x</think>Hello"}, {"role": "assistant", "content": "ok"}],
    [{"role": "user", "content": "Is it a very long question, really?"}, {"role": "assistant", "content": "yes"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "Anything at all!\n"}],
]


@pytest.mark.parametrize("name", list(INSPECTING))
def test_templates_that_look_at_content_are_not_proven(name):
    tok = _tok()
    template = LOOP.replace("{BODY}", INSPECTING[name])
    stripped, _, reason = _probe(tok, template)
    assert stripped is None and reason, name
    # and render stays exact on rows that take the content-dependent branches (after the structure is learned)
    for conv in ROWS * 3:
        try:
            ref = tok.apply_chat_template(conv, chat_template=template, tokenize=False)
        except Exception:
            continue  # the template itself rejects the row (e.g. `'a' * 'b'`)
        assert chat.render(conv, tok, chat_template=template).text == ref, name


@pytest.mark.parametrize("name", list(INDEPENDENT))
def test_templates_that_only_write_content_are_proven(name):
    tok = _tok()
    template = LOOP.replace("{BODY}", INDEPENDENT[name])
    stripped, impure, reason = _probe(tok, template)
    assert stripped is not None, reason
    assert not impure
    assert set(stripped) == set(range(5))
    assert all(stripped.values()) == (name in ("trim", "strip method", "set")), stripped


def test_shipped_families_are_proven_and_render_skips_jinja(monkeypatch):
    """Every shipped template without generation markers is proven for the sample data's role patterns; render
    then calls Jinja only for the first rows of a pattern and every _VERIFY_EVERY-th row, and its texts and
    spans still equal the reference (a fresh cache with per-row verification) on every row."""
    from transformers import AutoTokenizer

    rows = [json.loads(line)["conversations"] for line in open(SAMPLE_DATA)][:400]
    rows += [[{"from": "human", "value": "  padded \n"}, {"from": "gpt", "value": "\n reply with spaces  "}]] * 5
    for path in [TINY_MODEL] + [TEMPLATE_TOKENIZERS / f for f in ("chatml", "gemma", "mistral", "phi3")]:
        tok = AutoTokenizer.from_pretrained(str(path))
        calls = {"n": 0}
        real = chat.templates.render_messages

        def counting(*a, calls=calls, real=real, **k):
            calls["n"] += 1
            return real(*a, **k)

        monkeypatch.setattr(chat.templates, "render_messages", counting)
        fast = [chat.render(r, tok) for r in rows]
        monkeypatch.setattr(chat.templates, "render_messages", real)
        structures = chat.tokens._info(tok)["structures"]
        assert structures and all(s is not None and s.proven for s in structures.values()), path
        # well under one Jinja render per row (the per-row proof would be >= 405)
        assert calls["n"] < len(rows) / 2, (path, calls["n"])
        monkeypatch.setenv("SFT_STUDIO_VERIFY_RENDER", "1")
        chat.tokens._info(tok)["structures"] = {}
        slow = [chat.render(r, tok) for r in rows]
        monkeypatch.delenv("SFT_STUDIO_VERIFY_RENDER")
        assert not any(s is not None and s.proven for s in chat.tokens._info(tok)["structures"].values())
        for a, b, r in zip(fast, slow, rows, strict=False):
            assert (a.text, a.trained_spans, a.turns) == (b.text, b.trained_spans, b.turns), (path, r)
        chat.tokens._info(tok)["structures"] = {}


def test_a_wrong_proof_is_an_error_not_silent(monkeypatch):
    """If a proven structure ever disagreed with the real rendering, the periodic check raises (naming the way
    out) instead of writing wrong text; it is not a ChatError, which prepare would skip as one bad row."""
    tok = _tok()
    conv = ROWS[0]
    chat.render(conv, tok)
    st = next(s for k, s in chat.tokens._info(tok)["structures"].items() if k[1] == ("user", "assistant"))
    assert st.proven
    st.pieces[0] += "X"  # corrupt it, as a wrong proof would
    st.checks_left = 0
    assert not issubclass(chat.RenderProofError, chat.ChatError)
    with pytest.raises(chat.RenderProofError, match="SFT_STUDIO_VERIFY_RENDER=1"):
        for _ in range(chat.fastpath._VERIFY_EVERY + 1):
            chat.render(conv, tok)
    chat.tokens._info(tok)["structures"] = {}


def test_time_dependent_templates(monkeypatch):
    """strftime_now (Llama 3.2/3.3 put today's date in the system header): proven, and the structure is rebuilt
    when the day changes. Any other impure call (here a function passed as a template variable) keeps the
    per-row render."""
    tok = _tok()
    dated = "Today: {{ strftime_now('%d %b %Y') }}\n" + LOOP.replace("{BODY}", "{{ message.content }}")
    stripped, impure, _ = _probe(tok, dated)
    assert stripped is not None and impure == {"strftime_now"}
    chat.render(ROWS[0], tok, chat_template=dated)
    key = next(k for k in chat.tokens._info(tok)["structures"] if k[0] == dated)
    first = chat.tokens._info(tok)["structures"][key]
    assert first.proven
    import datetime

    monkeypatch.setattr(chat.fastpath, "_today", lambda: datetime.date(2100, 1, 1))
    chat.render(ROWS[0], tok, chat_template=dated)
    assert chat.tokens._info(tok)["structures"][key] is not first  # rebuilt for the new day

    info = chat.tokens._info(tok)
    old = info["kwargs"]
    info["kwargs"] = dict(old, today=lambda: "1 Jan")
    try:
        custom = "Today: {{ today() }}\n" + LOOP.replace("{BODY}", "{{ message.content }}")
        chat.render(ROWS[0], tok, chat_template=custom)
        st = next(s for k, s in info["structures"].items() if k[0] == custom)
        assert st is not None and not st.proven
    finally:
        info["kwargs"] = old
        info["structures"] = {}


def test_a_wrong_proof_stops_prepare(tmp_path, monkeypatch, capsys):
    """prepare must not skip rows of a wrong proof as bad rows and carry on: it stops with exit 1, a message,
    and no output directory. Simulated by a 'proof' that wrongly accepts a template that branches on content."""
    import backend.template_probe as probe
    from backend.config import load_prepare_config
    from backend.prepare import main

    def wrong(source, env, messages, expected_text, **kwargs):
        return {i: False for i in range(len(messages))}, set(), ""

    monkeypatch.setattr(probe, "content_independent", wrong)
    template = LOOP.replace("{BODY}", "{% if 'LOUD' in message.content %}!{% endif %}{{ message.content }}")
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"q{i}"},
                {"role": "assistant", "content": "LOUD" if i % 2 else f"a{i}"},
            ]
        }
        for i in range(300)
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_prepare_config(
        {
            "output_path": str(tmp_path / "out"),
            "dataset": {"path": str(tmp_path / "d.jsonl")},
            "tokenizer": {"path": str(TINY_MODEL)},
            "chat": {"template": template},
        }
    )
    chat.tokens._info_cache.clear()
    assert main(cfg) == 1
    assert "internal error" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
