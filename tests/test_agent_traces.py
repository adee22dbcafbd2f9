"""Agent traces (tool calls, tool results, reasoning) on the tool- and reasoning-capable templates that model families
ship (tests/data/chat_templates, `agent_templates.json`, credited in the folder's README).

The oracle does not use `backend.chat`. Every content, argument value, tool result and tool description holds a
unique marker. Each row goes through prepare's one path (`backend.documents.RowReader`, the stored tokens), and:
- the stored tokens decode to transformers' ``apply_chat_template(messages, tools=...)`` text (plus an appended
  final end-of-turn marker, `RenderedSample.appended`);
- no token of a never-trained marker (system, user, tool result, tool description) is trained;
- every token of a must-train marker (reply text, argument value, reasoning) that the template writes is trained,
  and so is the end-of-turn marker the family documents (written by hand in the manifest) after the final reply;
- where the template has ``{% generation %}`` blocks, the trained mask equals transformers' ``assistant_masks``.
Token character ranges come from the tokenizer's own offsets, not from `backend.chat`.
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from backend import TINY_MODEL
from backend.config import load_prepare_config
from backend.documents import RowReader

pytestmark = pytest.mark.filterwarnings("ignore")

CORPUS = Path(__file__).parent / "data" / "chat_templates"
AGENT = {k: v for k, v in json.loads((CORPUS / "agent_templates.json").read_text()).items() if not k.startswith("_")}

NEVER = ("zqsys", "zqusr", "zqres", "zqdesc")  # marker prefixes that are never trained
MUST = ("zqans", "zqarg", "zqrsn")  # trained wherever the template writes them


def _tools():
    return [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "zqdesc1 the weather in a city",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string", "description": "zqdesc2 city name"}},
                    "required": ["city"],
                },
            },
        },
        {
            "type": "function",
            "function": {
                "name": "get_time",
                "description": "zqdesc3 the local time",
                "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]},
            },
        },
    ]


def _call(i, name, key, value, as_string=False):
    args = {key: value}
    return {
        "id": f"call{i:05d}",  # 9 alphanumerics: what Mistral's templates demand
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(args) if as_string else args},
    }


def _result(i, content, name):
    return {"role": "tool", "tool_call_id": f"call{i:05d}", "name": name, "content": content}


def _shapes(as_string=False):
    sys_ = {"role": "system", "content": "zqsys1 be brief"}
    u1 = {"role": "user", "content": "zqusr1 weather in Oslo?"}
    weather = _call(1, "get_weather", "city", "zqarg1", as_string)
    return {
        "call_without_text": [
            sys_,
            u1,
            {"role": "assistant", "content": "", "tool_calls": [weather]},
            _result(1, "zqres1 sunny", "get_weather"),
            {"role": "assistant", "content": "zqans1 it is sunny"},
        ],
        "call_with_text": [
            u1,
            {"role": "assistant", "content": "zqans2 let me look", "tool_calls": [weather]},
            _result(1, "zqres2 rain", "get_weather"),
            {"role": "assistant", "content": "zqans3 it rains"},
        ],
        "parallel_calls": [
            u1,
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [weather, _call(2, "get_time", "zone", "zqarg2", as_string)],
            },
            _result(1, "zqres3 cold", "get_weather"),
            _result(2, "zqres4 noon", "get_time"),
            {"role": "assistant", "content": "zqans4 cold at noon"},
        ],
        "turns_after_result": [
            sys_,
            u1,
            {"role": "assistant", "content": "", "tool_calls": [weather]},
            _result(1, "zqres5 windy", "get_weather"),
            {"role": "assistant", "content": "zqans5 windy"},
            {"role": "user", "content": "zqusr2 and tomorrow?"},
            {"role": "assistant", "content": "zqans6 no forecast tool"},
            {"role": "user", "content": "zqusr3 thanks"},
            {"role": "assistant", "content": "zqans7 welcome"},
        ],
        "reasoning_every_turn": [
            u1,
            {"role": "assistant", "content": "", "reasoning_content": "zqrsn1 need the tool", "tool_calls": [weather]},
            _result(1, "zqres6 fog", "get_weather"),
            {"role": "assistant", "content": "zqans8 foggy", "reasoning_content": "zqrsn2 the tool said fog"},
            {"role": "user", "content": "zqusr4 sure?"},
            {"role": "assistant", "content": "zqans9 yes", "reasoning_content": "zqrsn3 repeat it"},
        ],
    }


def _hf(messages):
    """The messages as Hugging Face templates read them: arguments as dicts, reasoning also as ``thinking``."""
    out = []
    for m in messages:
        m = dict(m)
        if "tool_calls" in m:
            m["tool_calls"] = [
                {**c, "function": {**c["function"], "arguments": _args(c["function"]["arguments"])}}
                for c in m["tool_calls"]
            ]
        if "reasoning_content" in m:
            m["thinking"] = m["reasoning_content"]
        out.append(m)
    return out


def _args(a):
    return json.loads(a) if isinstance(a, str) else a


ROWS = {**{k: v for k, v in _shapes().items()}, "arguments_as_string": _shapes(as_string=True)["call_without_text"]}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TINY_MODEL))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("agent")
    with open(d / "rows.jsonl", "w") as f, open(d / "rows_without_tools.jsonl", "w") as g:
        for messages in ROWS.values():
            f.write(json.dumps({"messages": messages, "tools": json.dumps(_tools())}) + "\n")  # tools as a string
            g.write(json.dumps({"messages": messages}) + "\n")
    return d


def _rows_reader(d, template, conversations, with_tools=None, **chat):
    """`_reader` over ``conversations`` written to ``d`` (with the tool schemas where the template reads them, or as
    ``with_tools`` says)."""
    tools = AGENT[template].get("tools", True) if with_tools is None else with_tools
    rows = "rows.jsonl" if AGENT[template].get("tools", True) else "rows_without_tools.jsonl"
    with open(d / rows, "w") as f:
        for messages in conversations:
            f.write(json.dumps({"messages": messages, **({"tools": _tools()} if tools else {})}) + "\n")
    return _reader(d, template, **chat)


def _reader(data, template, **chat):
    rows = "rows.jsonl" if AGENT[template].get("tools", True) else "rows_without_tools.jsonl"
    cfg = {
        "output_path": str(data / "out"),
        "dataset": {"path": str(data / rows)},
        "tokenizer": {"path": str(TINY_MODEL)},
        "chat": {"template": str(CORPUS / template), **chat},
    }
    cfg = load_prepare_config(cfg)
    return RowReader(cfg), cfg


def _marker_ranges(text, prefixes):
    out = []
    for p in prefixes:
        start = text.find(p)
        while start >= 0:
            out.append((start, start + len(p) + 1))  # the prefix and its digit
            start = text.find(p, start + 1)
    return out


def _coverage(tokenizer, ids, trained):
    """``(text, covered)`` of a stored document: its ids decoded and tokenized again with offsets (the same ids,
    checked), and ``covered(b, e)``, the trained flags of the tokens that overlap characters ``b..e``."""
    text = tokenizer.decode(ids.tolist())
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert enc["input_ids"] == ids.tolist()
    offsets = np.asarray(enc["offset_mapping"]).reshape(-1, 2)
    return text, lambda b, e: trained[(offsets[:, 0] < e) & (offsets[:, 1] > b)]


def _expected(tokenizer, template_name, messages):
    template = (CORPUS / template_name).read_text()
    tools = _tools() if AGENT[template_name].get("tools", True) else None
    try:
        return tokenizer.apply_chat_template(_hf(messages), tools=tools, chat_template=template, tokenize=False)
    except Exception:
        return None  # the template rejects this shape (e.g. Llama 3.1: one call per message)


CASES = [(name, shape) for name in AGENT for shape in ROWS]


@pytest.mark.parametrize("name,shape", CASES, ids=[f"{n}-{s}" for n, s in CASES])
def test_agent_masks_against_transformers(name, shape, data, tokenizer):
    from backend.config import ConfigError

    reader, cfg = _reader(data, name)
    i = list(ROWS).index(shape)
    entry = AGENT[name]
    if "refuses" in entry:  # the whole dataset is refused with one message, never row by row
        with pytest.raises(ConfigError, match=entry["refuses"]):
            reader.sample(i, cfg, tokenizer)
        return
    _assert_masks(
        name, ROWS[shape], reader.sample(i, cfg, tokenizer), tokenizer, entry.get("refused_shapes", {}).get(shape)
    )


def _assert_masks(name, messages, row, tokenizer, refused=None):
    """``row`` (prepared from ``messages`` with template ``name``) is transformers' rendering, every NEVER marker
    masked, every MUST marker and the final end-of-turn marker trained; or skipped when the template refuses it."""
    entry = AGENT[name]
    expected = _expected(tokenizer, name, messages)
    if expected is None or refused:  # the template rejects the shape, or writes it so a turn cannot be located
        assert row.skipped and row.skipped.startswith("bad_conversation: "), row.problems
        assert refused is None or refused in row.skipped
        return
    assert row.skipped is None, row.problems
    assert "eot_not_trained" not in [code for code, _, _ in row.problems], row.problems  # no false alarm either
    (ids, trained), *rest = row.documents
    assert not rest
    appended = row.rendered.appended
    text = row.rendered.text
    stripped = "".join(text[a:b] for a, b in _complement(appended, len(text)))
    assert stripped == expected
    bos = ids[:1].tolist() == [tokenizer.bos_token_id] and not text.startswith(tokenizer.bos_token)
    assert tokenizer.decode(ids[int(bos) :].tolist()) == text
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert enc["input_ids"] == ids[int(bos) :].tolist()
    offsets = np.asarray(enc["offset_mapping"]).reshape(-1, 2)
    mask = trained[int(bos) :]

    def covered(b, e):
        return mask[(offsets[:, 0] < e) & (offsets[:, 1] > b)]

    for b, e in _marker_ranges(text, NEVER):
        assert not covered(b, e).any(), (text[b:e], text)
    # what the template writes after a question or a tool result, through the next reply's generation prompt as
    # transformers writes it, stays masked (Hermes 3 writes '\n<|im_end|>' there: that closing, and the prompt,
    # were trained); a {% generation %} block says itself where a reply starts (Laguna's holds '<assistant>')
    prompt = None if entry.get("generation") else _generation_prompt(tokenizer, name, messages)
    for _, e in _marker_ranges(text, NEVER) if prompt else ():
        q = text.find(prompt, e)
        if q >= 0 and not _marker_ranges(text[e:q], MUST):
            assert not covered(e, q + len(prompt)).any(), (text[e : q + len(prompt)], text)
    must = _marker_ranges(text, MUST)
    for b, e in must:
        assert covered(b, e).all(), (text[b:e], text)
    eot = entry["eot"].replace("{eos}", tokenizer.eos_token)
    last = text.rstrip().rfind(eot)
    assert last > text.rfind(next(m["content"] for m in reversed(messages) if m["role"] == "assistant"))
    assert covered(last, last + len(eot)).all(), text[last:]  # the final reply's end-of-turn marker is trained


@pytest.mark.parametrize("name,shape", CASES, ids=[f"{n}-{s}" for n, s in CASES])
def test_train_on_eot_off_masks_each_turns_marker_and_nothing_else(name, shape, data, tokenizer):
    """chat.train_on_eot: false masks the end-of-turn marker of every trained turn and nothing else: what it stops
    training holds no reply, call or reasoning text, is one run per trained turn, and holds the template's own
    end-of-turn marker after the final reply."""
    entry = AGENT[name]
    if "refuses" in entry or entry.get("refused_shapes", {}).get(shape) or not _expected(tokenizer, name, ROWS[shape]):
        return
    i = list(ROWS).index(shape)
    rows = {eot: _reader(data, name, final_eot="leave", train_on_eot=eot) for eot in (True, False)}
    on, off = (r.sample(i, c, tokenizer) for r, c in rows.values())
    assert on.skipped is None and off.skipped is None, (on.problems, off.problems)
    (ids, with_eot), (ids_off, without) = on.documents[0], off.documents[0]
    assert (ids == ids_off).all() and not (without & ~with_eot).any()  # the same tokens; off trains a subset
    text, covered_on = _coverage(tokenizer, ids, with_eot)
    _, covered_off = _coverage(tokenizer, ids, without)
    for b, e in _marker_ranges(text, MUST):  # every reply, argument and trace is still trained
        assert covered_off(b, e).all(), (text[b:e], text)
    lost = with_eot & ~without
    runs = int(lost[0]) + int((lost[1:] & ~lost[:-1]).sum())
    assert runs == sum(m["role"] == "assistant" for m in ROWS[shape]), runs  # every reply has a marker
    lost_text = "".join(tokenizer.decode([t]) for t in ids[lost].tolist())
    assert "zq" not in lost_text, lost_text
    eot = entry["eot"].replace("{eos}", tokenizer.eos_token)
    last = text.rstrip().rfind(eot)
    assert covered_on(last, last + len(eot)).all() and not covered_off(last, last + len(eot)).any(), text[last:]


def _same_results():
    """Tool results that say the same as an earlier one (an agent polling a tool; two cities with the same weather),
    after reasoning: on templates that rewrite earlier turns the reply is found after message k-1's text."""
    u1 = {"role": "user", "content": "zqusr1 weather in Oslo?"}
    w1, w2 = _call(1, "get_weather", "city", "zqarg1"), _call(2, "get_weather", "city", "zqarg2")
    return {
        "two_rounds": [
            u1,
            {"role": "assistant", "content": "", "reasoning_content": "zqrsn4 look", "tool_calls": [w1]},
            _result(1, "zqres7 same", "get_weather"),
            {"role": "assistant", "content": "", "reasoning_content": "zqrsn5 again", "tool_calls": [w2]},
            _result(2, "zqres7 same", "get_weather"),
            {"role": "assistant", "content": "zqans10 same twice", "reasoning_content": "zqrsn6 done"},
            {"role": "user", "content": "zqusr5 ok?"},
            {"role": "assistant", "content": "zqans11 ok", "reasoning_content": "zqrsn7 fine"},
        ],
        "parallel": [
            u1,
            {"role": "assistant", "content": "", "reasoning_content": "zqrsn4 look", "tool_calls": [w1, w2]},
            _result(1, "zqres8 same", "get_weather"),
            _result(2, "zqres8 same", "get_weather"),
            {"role": "assistant", "content": "zqans12 both same", "reasoning_content": "zqrsn5 compare"},
            {"role": "user", "content": "zqusr6 ok?"},
            {"role": "assistant", "content": "zqans13 ok", "reasoning_content": "zqrsn6 fine"},
        ],
    }


@pytest.mark.parametrize("name", [n for n, e in AGENT.items() if "refuses" not in e])
def test_a_tool_result_that_repeats_an_earlier_one_is_never_trained(name, tokenizer, tmp_path):
    """Parallel calls with the same result used to train the second result on 7 of the agent templates (Qwen3, Hermes,
    Mistral, Command R7B, Gemma 4...): the reply was located after the first one, and gpt-oss refused the row."""
    shapes = _same_results()
    reader, cfg = _rows_reader(tmp_path, name, shapes.values())
    like = {"two_rounds": "call_without_text", "parallel": "parallel_calls"}  # refused as the shape it resembles
    for i, (shape, messages) in enumerate(shapes.items()):
        refused = AGENT[name].get("refused_shapes", {}).get(like[shape])
        _assert_masks(name, messages, reader.sample(i, cfg, tokenizer), tokenizer, refused)


def _generation_prompt(tokenizer, name, messages):
    """The first line of the generation prompt transformers writes for the conversation's last reply (None when
    shorter than 4 characters or not readable): '<|im_start|>assistant', '<|start|>assistant', ..."""
    template = (CORPUS / name).read_text()
    tools = _tools() if AGENT[name].get("tools", True) else None
    k = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    try:
        with_prompt, bare = (
            tokenizer.apply_chat_template(
                _hf(messages[:k]), tools=tools, chat_template=template, tokenize=False, add_generation_prompt=g
            )
            for g in (True, False)
        )
    except Exception:
        return None
    n = next((i for i, (a, b) in enumerate(zip(with_prompt, bare, strict=False)) if a != b), len(bare))
    line = with_prompt[n:].strip().split("\n")[0]
    return line if len(line) >= 4 else None


@pytest.mark.parametrize("chat", [{"train_on": "last"}, {"train_on_tool_calls": False}], ids=["last", "no-calls"])
@pytest.mark.parametrize("name", [n for n, e in AGENT.items() if "refuses" not in e])
def test_a_reply_after_an_untrained_one_is_found_at_its_own_place(name, chat, tokenizer, tmp_path):
    """Every reply is located in order, trained or not: a reply after an untrained one used to be searched from the
    end of the last trained turn, where an earlier result or question saying the same was found, and the tool
    result or user turn between them was trained (Qwen3, QwQ, Hermes 3, Command R7B, Gemma 4...)."""
    shapes = {
        **_same_results(),
        "echo": [  # the result repeats the call's argument: found there, it took the tool turn into the reply
            {"role": "user", "content": "zqusr9 echo it"},
            {
                "role": "assistant",
                "content": "",
                "reasoning_content": "zqrsn10 echo",
                "tool_calls": [_call(1, "get_weather", "city", "zqres9 echo")],
            },
            _result(1, "zqres9 echo", "get_weather"),
            {"role": "assistant", "content": "zqans16 it echoed"},
        ],
        "continue": [
            {"role": "user", "content": "zqusr8 continue"},
            {"role": "assistant", "content": "zqans14 part one", "reasoning_content": "zqrsn8 start"},
            {"role": "user", "content": "zqusr8 continue"},
            {"role": "assistant", "content": "zqans15 part two", "reasoning_content": "zqrsn9 go on"},
        ],
    }
    reader, cfg = _rows_reader(tmp_path, name, shapes.values(), **chat)
    for i, messages in enumerate(shapes.values()):
        row = reader.sample(i, cfg, tokenizer)
        if row.skipped:  # a template that rejects parallel calls (Llama) or cannot write these calls
            assert "does not write its tool call" in row.skipped or "template rejected" in row.skipped, row.skipped
            continue
        (ids, trained), *_ = row.documents
        text, covered = _coverage(tokenizer, ids, trained)
        for b, e in _marker_ranges(text, NEVER + (("zqarg",) if "train_on_tool_calls" in chat else ())):
            assert not covered(b, e).any(), (text[b:e], text)
        final = messages[-1]["content"].split()[0]
        assert all(covered(b, e).all() for b, e in _marker_ranges(text, (final,))), (final, text)


def test_a_trace_that_names_its_call_does_not_end_the_turn_before_the_call(tokenizer):
    """gpt-oss closes a call's analysis block with '<|end|>' before the call: the turn ends after the call, found by
    its last mention of the function, also when the trace names it first (its arguments stay trained)."""
    from backend.chat import render
    from backend.chat.conversations import Masking

    trace = {
        "role": "assistant",
        "content": "",
        "reasoning_content": "zqrsn1 get_weather it is",
        "tool_calls": [_call(1, "get_weather", "city", "zqarg1")],
    }
    template = (CORPUS / "gpt-oss-120b.jinja").read_text()
    r = render([{"role": "user", "content": "zqusr1 weather?"}, trace], tokenizer, Masking(), template, tools=_tools())
    trained = "".join(r.text[b:e] for b, e in r.trained_spans)
    assert "zqrsn1" in trained and "zqarg1" in trained and trained.endswith("<|call|>"), trained


REVIEWED_ROWS = {  # rows a cold review found trained wrongly or refused, each with its template
    "gpt-oss: a JSON result, quoted by the next trace": (
        "gpt-oss-120b.jinja",
        [
            {"role": "user", "content": "zqusr1 weather?"},
            {"role": "assistant", "content": "", "reasoning_content": "zqrsn1 need it", "tool_calls": [
                _call(1, "get_weather", "city", "zqarg1")]},
            _result(1, '{"sky": "zqres1 sunny"}', "get_weather"),
            {"role": "assistant", "content": "zqans1 sunny", "reasoning_content": 'zqrsn2 got {"sky": "zqres1 sunny"}'},
        ],
    ),
    "mistral: a reply that is the question": (
        "mistral-nemo-instruct-2407.jinja",
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello!"},
            {"role": "assistant", "content": "Hello!"},
        ],
    ),
    "qwen2.5: an unwritten trace that names the call": (
        "qwen2.5-instruct.jinja",
        [
            {"role": "user", "content": "zqusr1 1"},
            {"role": "assistant", "content": "", "reasoning_content": "weather", "tool_calls": [
                _call(1, "get_weather", "city", "zqarg1")]},
            _result(1, "zqres1 x", "get_weather"),
            {"role": "assistant", "content": "zqans1 1"},
        ],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REVIEWED_ROWS))
def test_rows_a_review_found_are_trained_where_they_are_written(case, tokenizer):
    """Each reply (its text, arguments and written trace) trained at its own place, no question or result text:
    gpt-oss writes results JSON-encoded, so a result quoted raw in a later trace was taken for the result; a
    Mistral question that is the reply was trained as it; a trace the template drops that names the call made
    the call count as written nowhere."""
    from backend.chat import render
    from backend.chat.conversations import Masking

    name, messages = REVIEWED_ROWS[case]
    tools = _tools() if any(m.get("tool_calls") for m in messages) else None  # a plain chat: the plain path
    r = render(messages, tokenizer, Masking(), (CORPUS / name).read_text(), tools=tools)
    mask = np.zeros(len(r.text), bool)
    for b, e in r.trained_spans:
        mask[b:e] = True
    replies = [m for m in messages if m["role"] == "assistant"]
    for k, m in enumerate(replies):
        at = r.text.rfind(m["content"]) if k == len(replies) - 1 else r.text.find("zqarg1")
        assert mask[at : at + 6].all(), (case, r.text)  # the reply's own place (its last one: after the question)
        first = r.text.find(m["content"])
        assert first == at or not mask[first : first + len(m["content"])].any(), (case, r.text)  # not the question
    quote = r.text.find("zqrsn2") if "zqrsn2" in r.text else len(r.text)  # the final trace may quote a result
    for b, e in _marker_ranges(r.text[:quote], ("zqusr", "zqres", "zqsys")):
        assert not mask[b:e].any(), (case, r.text[b:e], r.text)
    if "zqrsn2" in r.text:
        assert mask[r.text.find("zqrsn2") :][:6].all(), r.text  # the final trace, quote and all


def test_a_call_named_only_in_the_reasoning_is_not_counted_as_written(tokenizer):
    """gpt-oss writes only a message's first call: two calls of one function whose trace names the function are
    refused, not trained as one call (the name in the trace does not count as the second call)."""
    from backend.chat import ChatError, render
    from backend.chat.conversations import Masking

    calls = [_call(1, "get_weather", "city", "zqarg1"), _call(2, "get_weather", "city", "zqarg2")]
    trace = {
        "role": "assistant",
        "content": "",
        "reasoning_content": "zqrsn1 get_weather for both",
        "tool_calls": calls,
    }
    template = (CORPUS / "gpt-oss-120b.jinja").read_text()
    with pytest.raises(ChatError, match=r"does not write its tool call\(s\) \['get_weather'\]"):
        render(
            [{"role": "user", "content": "zqusr1 two cities"}, trace], tokenizer, Masking(), template, tools=_tools()
        )


def _complement(spans, n):
    out, pos = [], 0
    for b, e in sorted(spans):
        out.append((pos, b))
        pos = e
    out.append((pos, n))
    return out


@pytest.mark.parametrize("name", [n for n, e in AGENT.items() if e.get("generation")])
def test_mask_equals_assistant_masks_where_the_template_marks_generation(name, data, tokenizer):
    reader, cfg = _reader(data, name, final_eot="leave")
    template = (CORPUS / name).read_text()
    compared = 0
    for i, shape in enumerate(ROWS):
        try:
            out = tokenizer.apply_chat_template(
                _hf(ROWS[shape]),
                tools=_tools(),
                chat_template=template,
                tokenize=True,
                return_dict=True,
                return_assistant_tokens_mask=True,
            )
        except Exception:
            continue
        row = reader.sample(i, cfg, tokenizer)
        (ids, trained), *_ = row.documents
        bos = ids[:1].tolist() == [tokenizer.bos_token_id] and ids.tolist()[1:] == out["input_ids"]
        assert ids[int(bos) :].tolist() == out["input_ids"], shape
        assert trained[int(bos) :].astype(int).tolist() == out["assistant_masks"], shape
        compared += 1
    assert compared >= 4


@pytest.mark.parametrize("name", [n for n, e in AGENT.items() if e.get("generation")])
def test_repeated_replies_are_each_trained_at_their_own_place_in_generation_blocks(name, tokenizer, tmp_path):
    """A plain chat that repeats a question and its reply: each reply is found inside its own {% generation %}
    block (a search from the text's start finds the first one twice), so both are trained with their marker."""
    messages = [
        {"role": "user", "content": "zqusr1 ping"},
        {"role": "assistant", "content": "zqans1 pong"},
        {"role": "user", "content": "zqusr1 ping"},
        {"role": "assistant", "content": "zqans1 pong"},
    ]
    reader, cfg = _rows_reader(tmp_path, name, [messages], with_tools=False, final_eot="leave")
    (ids, trained), *_ = reader.sample(0, cfg, tokenizer).documents
    text, covered = _coverage(tokenizer, ids, trained)
    replies, eot = _marker_ranges(text, ("zqans",)), AGENT[name]["eot"]
    assert len(replies) == 2 and all(covered(b, e).all() for b, e in replies)
    assert not any(covered(b, e).any() for b, e in _marker_ranges(text, NEVER))
    assert all(covered(text.find(eot, e), text.find(eot, e) + len(eot)).all() for _, e in replies)


@pytest.mark.parametrize("name", ["mistral-nemo-instruct-2407.jinja", "mistral-small-3.2-24b-instruct.jinja"])
def test_a_reply_quoted_in_the_question_before_it_is_trained_at_its_own_place(name, tokenizer, tmp_path):
    """Mistral writes the system prompt into the last user turn, so an earlier reply is not after a prefix of the
    full text and is searched in it: a question that quotes the reply holds it first. The reply is trained where
    it is written after the question, the quote in the question never."""
    messages = [
        {"role": "system", "content": "zqsys1 be brief"},
        {"role": "user", "content": "zqusr1 repeat after me: zqans1 ok"},
        {"role": "assistant", "content": "zqans1 ok"},
        {"role": "user", "content": "zqusr2 again"},
        {"role": "assistant", "content": "zqans2 fine"},
    ]
    reader, cfg = _rows_reader(tmp_path, name, [messages], with_tools=False)  # a plain chat: the plain path
    row = reader.sample(0, cfg, tokenizer)
    (ids, trained), *_ = row.documents
    text, covered = _coverage(tokenizer, ids, trained)
    quoted, reply = _marker_ranges(text, ("zqans1",))
    assert not covered(*quoted).any() and covered(*reply).all(), text
    assert not any(covered(b, e).any() for b, e in _marker_ranges(text, NEVER))


def test_every_row_form_normalizes_to_the_same_conversation(tokenizer):
    from backend.chat import normalize_conversation

    openai = _shapes(as_string=True)["call_without_text"][1:]
    sharegpt = [
        {"from": "human", "value": "zqusr1 weather in Oslo?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "zqarg1"}})},
        {"from": "observation", "value": "zqres1 sunny"},
        {"from": "gpt", "value": "zqans1 it is sunny"},
    ]
    a, b = normalize_conversation(openai), normalize_conversation(sharegpt)
    assert (
        a[1]["tool_calls"][0]["function"]
        == b[1]["tool_calls"][0]["function"]
        == {
            "name": "get_weather",
            "arguments": {"city": "zqarg1"},
        }
    )
    assert [m["role"] for m in a] == [m["role"] for m in b] == ["user", "assistant", "tool", "assistant"]
    assert b[2]["name"] == "get_weather" and a[2]["tool_call_id"] == "call00001"
    inline = normalize_conversation(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>r</think>a"}]
    )
    named = normalize_conversation(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "thinking": "r"}]
    )
    assert inline == named and inline[1]["reasoning_content"] == "r" and inline[1]["content"] == "a"
    # render's own quick pass over plain rows leaves inline reasoning to the full one, after leading whitespace too
    from backend.chat import render

    for reply in ("<think>r</think>a", " \n<think>r</think>a"):
        conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": reply}]
        assert render(conv, tokenizer).messages == named


def test_tool_results_take_the_name_of_the_call_they_answer_and_other_accepted_forms():
    """What the normalizer makes of the forms datasets use: a ``function_call`` turn holding a list of calls
    under ``content``; results naming their call by id (out of order), by an explicit name, or not at all (the
    latest call turn's first call); a result as text parts or as a JSON object; inline reasoning after leading
    whitespace, ended by the first ``</think>``."""
    from backend.chat import normalize_conversation

    calls = [{"name": "f", "arguments": {"a": 1}, "id": "c1"}, {"name": "g", "arguments": "{}", "id": "c2"}]
    out = normalize_conversation(
        [
            {"role": "user", "content": "q"},
            {"role": "function_call", "content": json.dumps(calls)},
            {"role": "tool", "tool_call_id": "c2", "content": "rg"},
            {"role": "tool", "tool_call_id": "c1", "content": "rf"},
            {"role": "tool", "name": "custom", "tool_call_id": "c1", "content": "rx"},
            {"role": "tool", "content": [{"type": "text", "text": "part1 "}, {"type": "text", "text": "part2"}]},
            {"role": "function_call", "content": json.dumps({"name": "h", "arguments": {}})},
            {"role": "tool", "content": {"temp": 3, "city": "Zürich"}},
            {"role": "assistant", "content": "  \n<think>r1</think>the </think> tag ends a trace"},
        ]
    )
    assert [(c["function"]["name"], c.get("id")) for c in out[1]["tool_calls"]] == [("f", "c1"), ("g", "c2")]
    assert out[1]["tool_calls"][1]["function"]["arguments"] == {} and out[1]["content"] == ""
    results = [(m["content"], m.get("name"), m.get("tool_call_id")) for m in out if m["role"] == "tool"]
    assert results == [
        ("rg", "g", "c2"),
        ("rf", "f", "c1"),
        ("rx", "custom", "c1"),
        ("part1 part2", "f", None),
        ('{"temp": 3, "city": "Zürich"}', "h", None),
    ]
    assert out[-1]["reasoning_content"] == "r1" and out[-1]["content"] == "the </think> tag ends a trace"


def test_a_reply_written_after_its_results_is_refused_where_the_question_quotes_it_too(tokenizer, tmp_path):
    """Gemma 4 writes the text of a reply that also calls a tool after the call's results, outside the reply's
    turn: refused. A question that quotes the reply holds its text before the turn too; the refusal looks for the
    text from the turn's start, so the quote does not make the reply look written in its turn."""
    name = "gemma-4-31b-it.jinja"
    messages = [dict(m) for m in ROWS["call_with_text"]]
    reply = "zqans2 let me look up " + " ".join(["the forecast"] * 20)  # longer than what the template writes before it
    messages[0] = {"role": "user", "content": f"zqusr1 weather in Oslo? start with: {reply}"}
    messages[1] = {**messages[1], "content": reply}
    reader, cfg = _rows_reader(tmp_path, name, [messages])
    row = reader.sample(0, cfg, tokenizer)
    assert row.skipped == (
        "bad_conversation: message 1 (assistant): the template writes this reply's text outside its turn (after "
        "what follows it, e.g. after the tool results), so it cannot be trained as one turn; give the text and the "
        "tool calls as two assistant messages"
    ), row.problems


def test_replies_that_cannot_be_located_are_refused_saying_why(tokenizer):
    """An agent trace whose first message is the assistant's has no prompt for its first reply; a template that
    writes a tool result one way while it is the last message and another way once a reply follows leaves no place
    to find the reply's turn. Both refused, naming the message and what is missing."""
    from backend.chat import TemplateError, render

    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
    conv = [{"role": "assistant", "content": "zqans0", "tool_calls": [call]}, {"role": "tool", "content": "zqres0"}]
    conv.append({"role": "assistant", "content": "zqans1"})
    with pytest.raises(TemplateError) as e:
        render(conv, tokenizer)
    assert str(e.value) == (
        "message 0 (assistant): an agent trace must start with a system or user message before the first reply"
    )
    hides = (
        "{% for m in messages %}{% if m.role == 'tool' %}<T>{{ m.content if loop.last else 'hidden' }}</T>"
        "{% elif m.role == 'assistant' %}<A>{{ m.content }}{{ m.tool_calls|tojson if m.tool_calls }}</A>"
        "{% else %}<U>{{ m.content }}</U>{% endif %}{% endfor %}{% if add_generation_prompt %}<A>{% endif %}"
    )
    with pytest.raises(TemplateError) as e:
        render([{"role": "user", "content": "zqusr0"}] + conv, tokenizer, chat_template=hides)
    assert str(e.value) == (
        "message 3 (assistant): the template rewrites the conversation before this reply and what it writes between "
        "message 2 and the reply ('</T><A>') is not found after message 2, so the turn cannot be located; use a "
        "template that writes earlier turns the same way (or chat.masking.mode=delimiters)"
    )


def test_a_template_without_tools_is_refused_once_for_the_dataset(data, tokenizer, tmp_path, capsys):
    from backend.chat import TemplateCapabilityError
    from backend.cli import run_cli
    from backend.config import ConfigError
    from backend.prepare import main, prepare

    plain = "{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}"
    (tmp_path / "plain.jinja").write_text(plain)
    cfg = {
        "output_path": str(tmp_path / "out"),
        "dataset": {"path": str(data / "rows.jsonl")},
        "tokenizer": {"path": str(TINY_MODEL)},
        "chat": {"template": str(tmp_path / "plain.jinja")},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(TemplateCapabilityError, match="never reads 'tools'") as refused:
        prepare(load_prepare_config(cfg), progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as e:
        run_cli([str(tmp_path / "cfg.yaml")], "prepare", main)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "chat.template: the chat template never reads 'tools'" in err
    assert "Traceback" not in err
    with pytest.raises(ConfigError) as e:  # the studio's preview: the same refusal, once, as a config problem
        RowReader(load_prepare_config(cfg)).sample(0, tokenizer=tokenizer)
    assert e.value.problems == [f"chat.template: {refused.value}"]


def _word_trained(text, covered, word):
    """Whether ``word`` is written in ``text``, and whether a token over any place it is written is trained."""
    at = [m.start() for m in re.finditer(re.escape(word), text)]
    return bool(at), any(covered(b, b + len(word)).any() for b in at)


@pytest.mark.parametrize(
    "with_tools, chat",
    [(True, {}), (False, {}), (True, {"train_on_tool_calls": False}), (True, {"train_on": "last"})],
    ids=["default", "without-tool-schemas", "tool-calls-untrained", "train-on-last"],
)
def test_trace_counts_are_what_the_stored_tokens_train(tmp_path, tokenizer, with_tools, chat):
    """The dataset check's agent-trace counts (`trace_counts`) equal counts read off the stored tokens by marker, on
    every agent template and row shape: calls whose argument is trained, results with no trained token, reasoning
    trained or not written (of the turns the settings train). Also for rows without tool schemas (many datasets
    have none: the calls are still counted) and for settings that leave calls or earlier turns untrained."""
    from backend.chat.agent import trace_counts

    total = dict.fromkeys(("tool_calls_trained", "tool_results_masked", "reasoning_trained", "reasoning_dropped"), 0)
    reasoning_only = [  # no call, no result: a reasoning dataset's row
        {"role": "user", "content": "zqusr8 2+2?"},
        {"role": "assistant", "content": "zqans20 4", "reasoning_content": "zqrsn8 add them"},
        {"role": "user", "content": "zqusr9 and 3+3?"},
        {"role": "assistant", "content": "zqans21 6", "reasoning_content": "zqrsn9 add again"},
    ]
    rows = [*ROWS.values(), reasoning_only]
    for name in (n for n in AGENT if "refuses" not in AGENT[n]):  # Granite refuses every call (tested above)
        reader, cfg = _rows_reader(tmp_path, name, rows, with_tools=None if with_tools else False, **chat)
        for row in reader.samples(range(len(rows)), cfg, tokenizer):
            if row.tokenized is None:  # a shape the template refuses (counted as such by the check)
                continue
            (ids, trained), messages = row.documents[0], row.rendered.messages
            text, covered = _coverage(tokenizer, ids, trained)
            want = dict.fromkeys(total, 0)
            replies = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
            targets = replies[-1:] if chat.get("train_on") == "last" else replies
            if chat.get("train_on_tool_calls") is False:
                targets = [k for k in targets if not messages[k].get("tool_calls")]
            for k, m in enumerate(messages):
                if m["role"] == "tool":
                    want["tool_results_masked"] += not _word_trained(text, covered, m["content"].split()[0])[1]
                calls = m.get("tool_calls") or []
                if any(_word_trained(text, covered, next(iter(_args(c["function"]["arguments"]).values())))[1]
                       for c in calls):  # fmt: skip
                    want["tool_calls_trained"] += len(calls)
                if m.get("reasoning_content") and k in targets:  # reasoning is counted where the turn is trained
                    written, is_trained = _word_trained(text, covered, m["reasoning_content"].split()[0])
                    want["reasoning_trained"] += is_trained
                    want["reasoning_dropped"] += not written
            got = trace_counts(row.rendered, row.tokenized)
            assert {k: got[k] for k in want} == want, (name, row.where, got, want)
            for k in total:
                total[k] += want[k]
    # each count is reached (not all zero) where the settings train it
    assert total["tool_results_masked"] > 0 and total["reasoning_dropped"] > 0
    assert (total["tool_calls_trained"] > 0) == ("train_on" not in chat and chat.get("train_on_tool_calls", True))
    assert total["reasoning_trained"] > 0


def test_studio_preview_colours_and_check_counts(data):
    """The studio's preview colours tool results and reasoning apart, and its dataset check counts calls trained,
    results masked, reasoning trained and dropped (Qwen3 drops the reasoning of turns before the last user turn)."""
    from studio import handlers as H
    from studio.common import REASONING, TOOL_RESULT, TRAINED

    template = (CORPUS / "qwen3-0.6b.jinja").read_text()
    s = H.DataSettings(str(data / "rows.jsonl"), str(TINY_MODEL), template=template)
    p = H.preview_sample(s, list(ROWS).index("reasoning_every_turn"))
    assert not p.status, p.status
    labelled = {}
    for piece, label in p.highlight:
        labelled.setdefault(label, []).append(piece)
    assert any("zqres6 fog" in x for x in labelled[TOOL_RESULT])
    assert any("zqrsn3 repeat it" in x for x in labelled[REASONING])
    assert not any("zqres" in x for x in labelled[TRAINED]) and "zqrsn1" not in "".join(x for x, _ in p.highlight)
    c = H.check_whole_dataset(s, None, False, max_rows=50)
    assert not c.status, c.status
    tokens = sum(
        len(H.get_tokenizer(str(TINY_MODEL))(r, add_special_tokens=False)["input_ids"])
        for r in ("zqrsn1 need the tool", "zqrsn2 the tool said fog")
    )
    assert c.report["agent_traces"] == {
        "tool_calls_trained": 7,  # 1 + 1 + 2 (parallel) + 1 + 1 + 1 over the six rows
        "tool_results_masked": 7,
        "reasoning_trained": 1,  # the reply after the last user message
        "reasoning_dropped": 2,
        "reasoning_dropped_tokens": tokens,
    }
    assert "7 tool calls trained, 7 tool results masked" in c.summary
    from backend.chat import Masking, check_dataset  # the library's check (the notebooks') counts the same

    rows = [json.loads(line) for line in (data / "rows.jsonl").read_text().splitlines()]
    assert check_dataset(rows, H.get_tokenizer(str(TINY_MODEL)), Masking(), template).trace == c.report["agent_traces"]


def test_studio_shows_every_turn_documents_as_prepare_writes_them(data, tokenizer):
    """The Data tab's chat.reasoning and chat.train_on_tool_calls settings reach the preview, the dataset check and
    the prepare YAML. Under every_turn the preview shows each document prepare writes for the row, its trained
    characters those of the stored document's trained tokens, and the check counts those documents."""
    from studio import handlers as H
    from studio.common import APPENDED, REASONING, TRAINED

    name = "qwen3-0.6b.jinja"
    i = list(ROWS).index("reasoning_every_turn")
    template = (CORPUS / name).read_text()
    s = H.DataSettings(str(data / "rows.jsonl"), str(TINY_MODEL), template=template, reasoning="every_turn")
    p = H.preview_sample(s, i)
    assert not p.status, p.status
    reader, cfg = _reader(data, name, reasoning="every_turn")
    docs = reader.sample(i, cfg, tokenizer).documents
    assert len(docs) == 3 and "**3 documents**" in p.summary
    shown, where, at = [], [], 0  # each document's text and its trained characters, from the highlight alone
    for text, label in p.highlight:
        if label is None:  # the header that opens a document
            shown.append([])
            where.append(set())
        else:
            if label in (TRAINED, REASONING, APPENDED):
                where[-1] |= {len("".join(shown[-1])) + c for c in range(len(text))}
            shown[-1].append(text)
        at += len(text)
    assert at == len(p.text)
    bos = tokenizer.bos_token
    for (ids, trained), parts, chars in zip(docs, shown, where, strict=True):
        text, covered = _coverage(tokenizer, ids, trained)
        assert "".join(parts) == text.removeprefix(bos)
        skip = len(text) - len(text.removeprefix(bos))
        expected = {c - skip for c in range(skip, len(text)) if covered(c, c + 1).any()}
        assert chars == expected
    # the check counts the documents written, and says the dropped traces are trained apart
    c = H.check_whole_dataset(s, None, False, max_rows=50)
    assert not c.status, c.status
    n_trained = sum(int(t.sum()) for r in reader.samples(range(len(ROWS)), cfg, tokenizer) for _, t in r.documents)
    assert f"**{n_trained} / " in c.summary and "every_turn trains 2 of them" in c.summary
    assert "1 row(s) as 3 documents" in c.summary and "reasoning_dropped" not in c.report["problems"]
    assert "reasoning: every_turn" in H.prepare_yaml_from("", s)[0]
    # the Packing tab packs those documents and does not call them a split conversation (none is longer than 4096)
    v = H.packing_view(s, 4096, 2, "best_fit", False, False, split_turns=True)
    assert not v.status and v.stats["documents"] == len(ROWS) - 1 + 3 and "split_turns:" not in v.summary
    # chat.train_on_tool_calls off: the turn that calls the tool is masked context, in the preview and the YAML
    calls = H.DataSettings(str(data / "rows.jsonl"), str(TINY_MODEL), template=template, train_on_tool_calls=False)
    p = H.preview_sample(calls, list(ROWS).index("reasoning_every_turn"))
    trained_text = "".join(x for x, label in p.highlight if label == TRAINED)
    assert "zqans9" in trained_text and "zqarg1" not in trained_text
    assert "train_on_tool_calls: false" in H.prepare_yaml_from("", calls)[0]


def test_every_turn_trains_each_dropped_trace_once_in_its_own_context(data, tokenizer):
    """Qwen3 writes only the reasoning after the last user message. With chat.reasoning: every_turn each turn whose
    reasoning it drops becomes its own document (the conversation up to it, as transformers renders it), and every
    reasoning marker is trained exactly once over the row's documents; as_rendered trains only the last one."""
    name = "qwen3-0.6b.jinja"
    i = list(ROWS).index("reasoning_every_turn")
    messages = ROWS["reasoning_every_turn"]
    template = (CORPUS / name).read_text()

    def trained_markers(docs):
        seen = []
        for ids, trained in docs:
            text, covered = _coverage(tokenizer, ids, trained)
            for b, e in _marker_ranges(text, ("zqrsn",)):
                if covered(b, e).all():
                    seen.append(text[b:e])
        return sorted(seen)

    reader, cfg = _reader(data, name)
    assert trained_markers(reader.sample(i, cfg, tokenizer).documents) == ["zqrsn3"]
    reader, cfg = _reader(data, name, reasoning="every_turn")
    docs = reader.sample(i, cfg, tokenizer).documents
    assert trained_markers(docs) == ["zqrsn1", "zqrsn2", "zqrsn3"]
    expected = [
        tokenizer.apply_chat_template(_hf(messages[: k + 1]), tools=_tools(), chat_template=template, tokenize=False)
        for k in (1, 3, len(messages) - 1)
    ]
    bos = tokenizer.bos_token
    assert [tokenizer.decode(ids.tolist()).removeprefix(bos) for ids, _ in docs] == expected
    # a template that never writes reasoning (Llama 3.1): nothing to gain, the row stays one document
    reader, cfg = _reader(data, "llama-3.1-8b-instruct.jinja", reasoning="every_turn")
    assert len(reader.sample(i, cfg, tokenizer).documents) == 1


def test_every_turn_in_prepare_keeps_every_row_accounted_for(data, tmp_path):
    from backend.prepare import prepare

    cfg = {
        "output_path": str(tmp_path / "out"),
        "dataset": {"path": str(data / "rows.jsonl")},
        "tokenizer": {"path": str(TINY_MODEL)},
        "splits": {"training": 1.0},
        "chat": {"template": str(CORPUS / "qwen3-0.6b.jinja"), "reasoning": "every_turn"},
    }
    s = prepare(load_prepare_config(cfg), progress=False)
    assert s["written"] == len(ROWS) and s["skipped_rows"] == 0
    assert s["reasoning_every_turn"] == {"conversations_split": 1, "documents": 3}
    assert s["num_documents"] == len(ROWS) - 1 + 3
    # the row whose dropped traces are now each trained is not warned about them; as_rendered still warns
    assert "reasoning_dropped" not in s["warnings"]
    cfg["chat"]["reasoning"], cfg["output_path"] = "as_rendered", str(tmp_path / "as_rendered")
    assert prepare(load_prepare_config(cfg), progress=False)["warnings"]["reasoning_dropped"] == 1


def test_the_prepared_tokenizer_that_exports_ship_renders_tools_as_the_trainer_did(data, tmp_path, tokenizer):
    """Training exports the tokenizer prepare saved (tests/test_train.py checks the export keeps it): given
    ``tools=``, it renders each row exactly as the stored tokens read."""
    from transformers import AutoTokenizer

    from backend.dataset import TokenDataset
    from backend.prepare import prepare

    name = "hermes-3-llama-3.1-tool-use.jinja"  # renders nothing at all without tools
    cfg = {
        "output_path": str(tmp_path / "out"),
        "dataset": {"path": str(data / "rows.jsonl")},
        "tokenizer": {"path": str(TINY_MODEL)},
        "splits": {"training": 1.0},
        "chat": {"template": str(CORPUS / name), "final_eot": "leave"},
    }
    prepare(load_prepare_config(cfg), progress=False)
    exported = AutoTokenizer.from_pretrained(str(tmp_path / "out" / "tokenizer"))
    ds = TokenDataset(tmp_path / "out", split="training")
    stored = sorted(
        tokenizer.decode(ds.document(d)[0].tolist()).removeprefix(tokenizer.bos_token) for d in range(len(ds))
    )
    rendered = sorted(
        exported.apply_chat_template(_hf(m), tools=_tools(), tokenize=False).removeprefix(tokenizer.bos_token)
        for m in ROWS.values()
    )
    assert stored == rendered and len(stored) == len(ROWS)


def test_chat_tab_passes_the_tools_box_to_the_template():
    """Hermes 3's tool_use template renders nothing without tools: the tools box is what makes it work."""
    from backend.chat import ChatError
    from studio import handlers as H

    template = (CORPUS / "hermes-3-llama-3.1-tool-use.jinja").read_text()
    with pytest.raises(ChatError):
        next(H.chat_stream(str(TINY_MODEL), [], "zqusr1 weather?", template, max_new_tokens=2))
    with pytest.raises(ChatError, match="the tools box"):
        next(H.chat_stream(str(TINY_MODEL), [], "zqusr1 weather?", template, max_new_tokens=2, tools_json="[1"))
    replies = list(
        H.chat_stream(str(TINY_MODEL), [], "hi", template, max_new_tokens=4, tools_json=json.dumps(_tools()))
    )
    assert replies and isinstance(replies[-1], str)


def test_an_export_of_a_tool_use_template_stops_at_its_end_of_turn_token():
    """Exports set generation eos from `eot_token_ids`: a template that renders nothing without tools is probed
    with a tool schema, so its end-of-turn token is found."""
    from transformers import AutoTokenizer

    from backend.chat import eot_token_ids

    tok = AutoTokenizer.from_pretrained(str(TINY_MODEL))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    template = (CORPUS / "hermes-3-llama-3.1-tool-use.jinja").read_text()
    assert eot_token_ids(tok, template)[0] == tok.convert_tokens_to_ids("<|im_end|>")


def test_train_on_tool_calls_off_masks_the_turns_that_call_tools(data, tokenizer):
    reader, cfg = _reader(data, "qwen2.5-instruct.jinja", train_on_tool_calls=False)
    row = reader.sample(list(ROWS).index("call_with_text"), cfg, tokenizer)
    (ids, trained), *_ = row.documents
    text = tokenizer.decode(ids.tolist())
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = np.asarray(enc["offset_mapping"]).reshape(-1, 2)
    mask = trained[len(ids) - len(enc["input_ids"]) :]
    for marker, want in (("zqarg1", False), ("zqans2", False), ("zqans3", True)):
        b = text.find(marker)
        assert b >= 0 and mask[(offsets[:, 0] < b + len(marker)) & (offsets[:, 1] > b)].all() == want, marker


def test_a_sharegpt_function_calling_row_prepares_like_its_openai_form(tmp_path, tokenizer):
    """Glaive / LLaMA-Factory rows: ``function_call`` and ``observation`` turns, ``tools`` as a JSON string."""
    row = {
        "conversations": [
            {"from": "human", "value": "zqusr1 weather in Oslo?"},
            {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "zqarg1"}})},
            {"from": "observation", "value": "zqres1 sunny"},
            {"from": "gpt", "value": "zqans1 it is sunny"},
        ],
        "tools": json.dumps([t["function"] for t in _tools()]),  # the bare form
    }
    (tmp_path / "d.jsonl").write_text(json.dumps(row) + "\n")
    template = CORPUS / "qwen2.5-instruct.jinja"
    cfg = load_prepare_config(
        {
            "output_path": str(tmp_path / "out"),
            "dataset": {"path": str(tmp_path / "d.jsonl")},
            "tokenizer": {"path": str(TINY_MODEL)},
            "chat": {"template": str(template)},
        }
    )
    (ids, trained), *_ = RowReader(cfg).sample(0, cfg, tokenizer).documents
    openai = [
        {"role": "user", "content": "zqusr1 weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [_call(1, "get_weather", "city", "zqarg1")]},
        {"role": "tool", "name": "get_weather", "content": "zqres1 sunny"},
        {"role": "assistant", "content": "zqans1 it is sunny"},
    ]
    expected = tokenizer.apply_chat_template(openai, tools=_tools(), chat_template=template.read_text(), tokenize=False)
    assert tokenizer.decode(ids.tolist()).removeprefix(tokenizer.bos_token) == expected
    assert trained.any()


@pytest.mark.parametrize(
    "masking",
    [
        {"train_on_tool_calls": True},
        {"train_on_tool_calls": False},
        {"mode": "delimiters", "start_delimiter": "<|im_start|>assistant\n", "end_delimiter": "<|im_end|>"},
    ],
    ids=["tool-calls-trained", "tool-calls-masked", "delimiters"],
)
def test_a_long_agent_trace_is_split_into_pieces_that_keep_its_tools(masking, tokenizer):
    """long_documents: split_turns on an agent trace: every piece is the template applied to its own messages with
    the row's tool schemas (a piece without them teaches calls to tools it never saw defined), and the pieces train
    what the whole trace trains under the run's masking (chat.train_on_tool_calls too), each reply once."""
    from backend.chat import Masking, render, tokenize
    from backend.split import split_conversation

    template = (CORPUS / "qwen2.5-instruct.jinja").read_text()
    messages, masking = ROWS["turns_after_result"], Masking(**masking)
    whole = render(messages, tokenizer, masking, template, tools=_tools())
    full = tokenize(whole.text, whole.trained_spans, tokenizer)
    res = split_conversation(whole, full, tokenizer, len(full.input_ids) - 1, masking, template)
    assert len(res.pieces) >= 2 and res.truncated_groups == 0
    for p in res.pieces:
        assert p.text == tokenizer.apply_chat_template(
            _hf(p.messages), tools=_tools(), chat_template=template, tokenize=False
        )
        assert "zqdesc1" in p.text and len(p.input_ids) < len(full.input_ids)
    seen = [k for p in res.pieces for k in p.trained_messages]
    assert len(seen) == len(set(seen))
    trained_ids = np.concatenate([p.input_ids[p.trained] for p in res.pieces])
    np.testing.assert_array_equal(trained_ids, full.input_ids[full.trained])  # the same tokens, in order, once


# Qwen3's rule for reasoning (written only after the last user message) in a template that leaves the final reply
# open: chat.final_eot decides the conversation's last marker; a document that ends earlier trains the one it has.
OPEN_FINAL_REASONING = (
    "{%- set ns = namespace(last_user=0) -%}"
    "{%- for m in messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor -%}"
    "{%- for m in messages -%}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' and loop.index0 > ns.last_user and m.reasoning_content %}"
    "<think>\n{{ m.reasoning_content }}\n</think>\n\n{% endif %}"
    "{{ m.content }}{% if not (loop.last and m.role == 'assistant') %}<|im_end|>\n{% endif %}"
    "{%- endfor -%}{%- if add_generation_prompt %}{% if messages[-1].role == 'assistant' %}<|im_end|>\n{% endif %}"
    "<|im_start|>assistant\n{% endif -%}"
)


@pytest.mark.parametrize("template_name", ["qwen3-0.6b.jinja", "open-final"])
@pytest.mark.parametrize("final_eot", ["append", "leave"])
def test_every_turn_with_split_turns_cuts_long_reasoning_documents_at_turns(
    final_eot, template_name, tmp_path, tokenizer
):
    """chat.reasoning: every_turn makes a document per reply whose reasoning Qwen3 drops, each with the whole
    conversation before it as context; with long_documents: split_turns a document longer than the sequence is cut
    at turns like any long conversation (context trimmed from the front), not kept whole to be dropped by packing.
    Every document is transformers' rendering of a run of the conversation's messages, fits the sequence, and every
    reply and reasoning is trained exactly once, each reply with its end-of-turn marker."""
    if template_name == "open-final":
        template_path = tmp_path / "open-final.jinja"
        template_path.write_text(OPEN_FINAL_REASONING)
    else:
        template_path = CORPUS / template_name
    template = template_path.read_text()
    pad = " ".join(["filler"] * 40)
    messages = [{"role": "system", "content": "zqsys1 be brief"}]
    for n in range(1, 6):
        messages.append({"role": "user", "content": f"zqusr{n} question {pad}"})
        messages.append({"role": "assistant", "content": f"zqans{n} answer", "reasoning_content": f"zqrsn{n} think"})
    (tmp_path / "rows.jsonl").write_text(json.dumps({"messages": messages}) + "\n")
    whole = tokenizer.apply_chat_template(_hf(messages), chat_template=template, tokenize=False)
    length = len(tokenizer(whole, add_special_tokens=False)["input_ids"]) // 2

    def documents(**long):
        cfg = {
            "output_path": str(tmp_path / "out"),
            "dataset": {"path": str(tmp_path / "rows.jsonl")},
            "tokenizer": {"path": str(TINY_MODEL)},
            "chat": {"template": str(template_path), "reasoning": "every_turn", "final_eot": final_eot},
            **long,
        }
        cfg = load_prepare_config(cfg)
        return RowReader(cfg).sample(0, cfg, tokenizer).documents

    kept_whole = documents()
    assert max(len(ids) for ids, _ in kept_whole) > length  # the late documents carry every turn before them
    docs = documents(long_documents={"mode": "split_turns", "sequence_length": length})
    trained_markers, eots = [], 0
    for ids, trained in docs:
        assert len(ids) <= length
        text, covered = _coverage(tokenizer, ids, trained)
        # the system prompt and a run of whole exchanges, as transformers renders them (a final marker appended)
        first = next(k for k in range(1, len(messages), 2) if f"zqusr{(k + 1) // 2} " in text)
        last = max(k for k in range(2, len(messages), 2) if f"zqans{k // 2} " in text)
        rendered = tokenizer.apply_chat_template(
            _hf(messages[:1] + messages[first : last + 1]), chat_template=template, tokenize=False
        )
        at_the_end = last == len(messages) - 1
        if template_name == "open-final" and (final_eot == "append" or not at_the_end):
            rendered += "<|im_end|>"  # the marker the template writes between turns, appended
        assert text.removeprefix(tokenizer.bos_token).removesuffix("\n") == rendered.removesuffix("\n")
        for b, e in _marker_ranges(text, ("zqans", "zqrsn", "zqusr", "zqsys")):
            if covered(b, e).all():
                trained_markers.append(text[b:e])
            else:
                assert not covered(b, e).any(), text[b:e]  # a marker is trained whole or not at all
        eots += sum(bool(covered(m.start(), m.end()).all()) for m in re.finditer(re.escape("<|im_end|>"), text))
    assert sorted(trained_markers) == sorted([f"zqans{n}" for n in range(1, 6)] + [f"zqrsn{n}" for n in range(1, 6)])
    # every reply's marker; the conversation's last one as chat.final_eot says where the template leaves it open
    assert eots == (4 if template_name == "open-final" and final_eot == "leave" else 5)


@pytest.mark.parametrize(
    "chat, trained, eots",
    [
        ({}, ["zqans8", "zqans9", "zqarg1", "zqrsn1", "zqrsn2", "zqrsn3"], 3),
        ({"train_on_eot": False}, ["zqans8", "zqans9", "zqarg1", "zqrsn1", "zqrsn2", "zqrsn3"], 0),
        ({"train_on": "last"}, ["zqans9", "zqrsn3"], 1),  # the dropped traces are not trained: no piece for them
        ({"train_on_tool_calls": False}, ["zqans8", "zqans9", "zqrsn2", "zqrsn3"], 2),  # the call's trace neither
    ],
    ids=["default", "no-eot", "train-on-last", "tool-calls-masked"],
)
def test_every_turn_pieces_are_masked_as_the_run_says(chat, trained, eots, data, tokenizer):
    """The documents chat.reasoning: every_turn makes train what the run's masking trains (markers, the last reply
    only, tool calls), each once: a piece rendered with other settings trains what the user switched off."""
    i = list(ROWS).index("reasoning_every_turn")
    reader, cfg = _reader(data, "qwen3-0.6b.jinja", reasoning="every_turn", **chat)
    docs = reader.sample(i, cfg, tokenizer).documents
    seen, n_eot = [], 0
    for ids, mask in docs:
        text, covered = _coverage(tokenizer, ids, mask)
        for b, e in _marker_ranges(text, MUST + NEVER):
            assert covered(b, e).all() or not covered(b, e).any(), text[b:e]
            seen += [text[b:e]] if covered(b, e).all() else []
        n_eot += sum(bool(covered(m.start(), m.end()).all()) for m in re.finditer(re.escape("<|im_end|>"), text))
    assert sorted(seen) == trained and n_eot == eots
    assert len(docs) == (1 if chat.get("train_on") == "last" else 2 if chat.get("train_on_tool_calls") is False else 3)


def test_every_turn_and_split_turns_in_prepare_count_each_conversation(tmp_path, tokenizer):
    """Two reasoning conversations and one long plain conversation in one chunk, through prepare: the report counts
    both reasoning conversations and their documents, the plain one is split too, and every stored document fits."""
    from backend.dataset import TokenDataset
    from backend.prepare import prepare

    pad = " ".join(["filler"] * 40)
    rows = []
    for r in range(2):
        messages = [{"role": "system", "content": "zqsys1 be brief"}]
        for n in range(1, 6):
            messages.append({"role": "user", "content": f"zqusr{n} row {r} {pad}"})
            messages.append({"role": "assistant", "content": f"zqans{n}", "reasoning_content": f"zqrsn{n} think"})
        rows.append({"messages": messages})
    plain = [{"role": "system", "content": "zqsys1 be brief"}]
    for n in range(1, 6):
        plain += [{"role": "user", "content": f"zqusr{n} {pad}"}, {"role": "assistant", "content": f"zqans{n}"}]
    rows.append({"messages": plain})
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    template = (CORPUS / "qwen3-0.6b.jinja").read_text()
    whole = tokenizer.apply_chat_template(plain, chat_template=template, tokenize=False)
    length = len(tokenizer(whole, add_special_tokens=False)["input_ids"]) // 2
    cfg = {
        "output_path": str(tmp_path / "out"),
        "dataset": {"path": str(tmp_path / "rows.jsonl")},
        "tokenizer": {"path": str(TINY_MODEL)},
        "splits": {"training": 1.0},
        "chat": {"template": str(CORPUS / "qwen3-0.6b.jinja"), "reasoning": "every_turn"},
        "long_documents": {"mode": "split_turns", "sequence_length": length},
    }
    s = prepare(load_prepare_config(cfg), progress=False)
    assert s["written"] == 3 and s["skipped_rows"] == 0
    assert s["reasoning_every_turn"] == {"conversations_split": 2, "documents": 10}  # 4 dropped traces + the rest
    ld = s["long_documents"]
    assert ld["not_split"] == 0 and ld["conversations_split"] == 3  # rows, not the every_turn documents cut
    assert ld["documents_split"] > 3 and ld["pieces"] > ld["documents_split"]
    ds = TokenDataset(tmp_path / "out" / "fast_llm_config_training.yaml")
    lengths = [len(ds.document(i)[0]) for i in range(len(ds))]
    assert max(lengths) <= length and len(ds) == s["num_documents"] > 10 + 1
    # each row's documents, in order, are what the one-row path makes of that row (not another row's pieces)
    pcfg = load_prepare_config(cfg)
    reader = RowReader(pcfg)
    expected = [d for i in range(3) for d in reader.sample(i, pcfg, tokenizer).documents]
    assert len(expected) == len(ds)
    for i, (ids, trained) in enumerate(expected):
        stored_ids, stored_trained = ds.document(i)
        assert np.array_equal(stored_ids, ids) and np.array_equal(stored_trained, trained), i
    texts = [tokenizer.decode(ds.document(i)[0].tolist()) for i in range(len(ds))]
    assert sum("row " not in t for t in texts) >= 2  # the plain conversation, cut in pieces of its own


def test_every_turn_pieces_say_which_messages_are_context(tokenizer):
    """`reasoning_pieces`' metadata (as `split_conversation`'s pieces say it): each document trains one reply whose
    trace the template drops, after the messages before its question as context; the last trains the rest."""
    from backend.chat import Masking, render
    from backend.split import reasoning_pieces

    template = (CORPUS / "qwen3-0.6b.jinja").read_text()
    messages = [{"role": "system", "content": "zqsys1 be brief"}]
    for n in range(1, 4):
        messages.append({"role": "user", "content": f"zqusr{n}"})
        messages.append({"role": "assistant", "content": f"zqans{n}", "reasoning_content": f"zqrsn{n}"})
    masking = Masking(reasoning="every_turn")
    pieces = reasoning_pieces(render(messages, tokenizer, masking, template), tokenizer, masking, template)
    assert [p.trained_messages for p in pieces] == [[2], [4], [6]]
    assert [p.context_messages for p in pieces] == [0, 2, 4]  # after the system prompt, before the question
    assert [len(p.messages) for p in pieces] == [3, 5, 7]
    # a first reply without reasoning stays in the conversation's own document, whose first trained reply it is
    messages[2] = {"role": "assistant", "content": "zqans1"}
    pieces = reasoning_pieces(render(messages, tokenizer, masking, template), tokenizer, masking, template)
    assert [(p.trained_messages, p.context_messages) for p in pieces] == [([4], 2), ([2, 6], 0)]


@pytest.mark.parametrize("with_result", [False, True], ids=["ends-at-call", "ends-at-result"])
@pytest.mark.parametrize("name", [n for n in AGENT if "refuses" not in AGENT[n]])
def test_a_call_with_reasoning_trains_its_arguments_where_the_turn_ends_with_it(name, with_result, tmp_path, tokenizer):
    """A conversation that ends with a call carrying reasoning (or with that call's result), as every_turn's
    documents do: the call's arguments and its reasoning are trained wherever the template writes them, nothing of
    the system, user, result or tool schemas is. gpt-oss writes the reasoning as an analysis block closed by
    '<|end|>' before the call: that marker is not the turn's end, the call's '<|call|>' is."""
    call = {
        "role": "assistant",
        "content": "",
        "reasoning_content": "zqrsn1 need the tool",
        "tool_calls": [_call(1, "get_weather", "city", "zqarg1")],
    }
    messages = [{"role": "system", "content": "zqsys1 be brief"}, {"role": "user", "content": "zqusr1 Oslo?"}, call]
    if with_result:
        messages.append(_result(1, "zqres1 fog", "get_weather"))
    tools = AGENT[name].get("tools", True)
    row = {"messages": messages, **({"tools": _tools()} if tools else {})}
    (tmp_path / "rows.jsonl").write_text(json.dumps(row) + "\n")
    cfg = {
        "output_path": str(tmp_path / "out"),
        "dataset": {"path": str(tmp_path / "rows.jsonl")},
        "tokenizer": {"path": str(TINY_MODEL)},
        "chat": {"template": str(CORPUS / name)},
    }
    cfg = load_prepare_config(cfg)
    prepared = RowReader(cfg).sample(0, cfg, tokenizer)
    if prepared.skipped:  # the template rejects the shape, or writes it so a turn cannot be located: said
        assert prepared.skipped.startswith(("bad_conversation: ", "no_trained_tokens")), prepared.skipped
        return
    (ids, trained), *rest = prepared.documents
    assert not rest
    text, covered = _coverage(tokenizer, ids, trained)
    for b, e in _marker_ranges(text, NEVER):
        assert not covered(b, e).any(), (text[b:e], text)
    for b, e in _marker_ranges(text, MUST):
        assert covered(b, e).all(), (text[b:e], text)
    rendered = prepared.rendered  # the text is transformers' rendering (plus an appended final marker)
    kept = "".join(rendered.text[a:b] for a, b in _complement(rendered.appended, len(rendered.text)))
    assert kept == _expected(tokenizer, name, messages)
    assert "zqarg1" in text or name.startswith("deepseek-r1")  # R1 writes calls only when content is null


def test_an_untrained_reply_the_template_does_not_write_is_passed_by(tokenizer):
    """``train_on: last`` with a template that writes the last two messages only (a window): the earlier,
    untrained reply is not located and is passed by; when it and its question say what the last ones say, it is
    located at the last turn, and the last reply is looked for again from the end of the last trained turn. Either
    way the last reply is trained where it is written, and with every reply trained the row is refused."""
    from backend.chat import Masking, TemplateError, render

    nl = "{{ '\\n' }}"
    template = (
        "{% if tools %}<|system|>tools: {{ tools | tojson }}<|end|>" + nl + "{% endif %}"
        "{% for m in messages[-2:] %}<|{{ m.role }}|>" + nl + "{{ m.content }}<|end|>" + nl + "{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>" + nl + "{% endif %}"
    )
    tools = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {}}}]
    for question, reply, refused in (("zqusr1 hello", "zqans1 ok", 1), ("zqusr2 again", "zqans2 fine", 3)):
        messages = [
            {"role": "user", "content": question},
            {"role": "assistant", "content": reply},
            {"role": "user", "content": "zqusr2 again"},
            {"role": "assistant", "content": "zqans2 fine"},
        ]
        r = render(messages, tokenizer, Masking(train_on="last"), chat_template=template, tools=tools)
        assert r.text.endswith("<|user|>\nzqusr2 again<|end|>\n<|assistant|>\nzqans2 fine<|end|>\n"), r.text
        assert [r.text[b:e] for b, e in r.trained_spans] == ["zqans2 fine<|end|>"] and r.problems == []
        with pytest.raises(TemplateError, match=rf"message {refused} \(assistant\)"):  # reply 1, or 3 past it
            render(messages, tokenizer, Masking(), chat_template=template, tools=tools)


def test_reasoning_is_looked_for_in_its_own_turn_only(tokenizer):
    """A reasoning text the question quotes is coloured in its turn, not in the question; one the template drops
    (Qwen3: turns before the last user message) is counted dropped although a later message quotes it."""
    from backend.chat import render
    from backend.chat.conversations import Masking

    messages = [
        {"role": "user", "content": "zqusr1 think 'zqrsn1 step one' then answer"},
        {"role": "assistant", "content": "zqans1 done", "reasoning_content": "zqrsn1 step one"},
        {"role": "user", "content": "zqusr2 you thought 'zqrsn1 step one'; now 'zqrsn2 step two'"},
        {"role": "assistant", "content": "zqans2 done", "reasoning_content": "zqrsn2 step two"},
    ]
    r = render(messages, tokenizer, Masking(), (CORPUS / "qwen3-0.6b.jinja").read_text(), tools=_tools())
    assert r.reasoning_rendered == {1: False, 3: True}  # the first is dropped, though quoted after its turn
    (turn,) = [t for t in r.turns if t.message_index == 3]
    ((b, e),) = r.reasoning_spans
    assert r.text[b:e] == "zqrsn2 step two" and turn.begin <= b < e <= turn.end  # not the question's quote


def test_a_tool_result_is_coloured_where_it_is_written_after_its_call(tokenizer):
    """A result whose text the question already quotes is coloured after the call that asked for it,
    the second of two equal results after the first."""
    from backend.chat import render
    from backend.chat.conversations import Masking

    messages = [
        {"role": "user", "content": "zqusr1 is it 'zqres1 sunny' in Oslo and Bergen?"},
        {"role": "assistant", "content": "", "tool_calls": [_call(1, "get_weather", "city", "zqarg1"),
                                                           _call(2, "get_weather", "city", "zqarg2")]},
        _result(1, "zqres1 sunny", "get_weather"),
        _result(2, "zqres1 sunny", "get_weather"),
        {"role": "assistant", "content": "zqans1 sunny in both"},
    ]  # fmt: skip
    r = render(messages, tokenizer, Masking(), (CORPUS / "qwen3-0.6b.jinja").read_text(), tools=_tools())
    (call,) = [t for t in r.turns if t.message_index == 1]
    places = [m.start() for m in re.finditer("zqres1 sunny", r.text)]
    assert len(places) == 3 and places[0] < call.begin  # the question's quote, then the two results
    assert [b for b, _ in r.tool_result_spans] == places[1:] and all(b >= call.end for b in places[1:])
