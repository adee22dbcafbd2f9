"""Preference pairs in prepare (#24): every row form becomes two documents whose trained tokens are exactly the
answer as the template writes it, on several real template families, with an oracle that does not use
backend.chat (transformers' own ``apply_chat_template`` of the prompt with and without the answer).

Run: .venv/bin/pytest tests/test_preference_data.py -x -q
"""

import json
import subprocess
import sys

import numpy as np
import pytest
from transformers import AutoTokenizer

from backend import ASSETS, ROOT, TINY_MODEL
from backend.config import ConfigError, load_prepare_config, load_train_config
from backend.dataset import DatasetNotFoundError, TokenDataset
from backend.documents import RowReader
from backend.preference import shared_prompt_lengths
from backend.prepare import prepare

TEMPLATES = {
    "llama31": TINY_MODEL,
    "chatml": ASSETS / "tokenizers" / "chatml",
    "gemma": ASSETS / "tokenizers" / "gemma",
    "phi3": ASSETS / "tokenizers" / "phi3",
}
Q1, A1, Q2 = "First question zq?", "First reply zr.", "Second question zs?"
GOOD, BAD = "The good answer zg.", "The bad answer zb."


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


ROWS = {
    # TRL's conversational form with a multi-turn prompt: its own assistant turn must stay masked
    "prompt_messages": {
        "prompt": [user(Q1), assistant(A1), user(Q2)],
        "chosen": [assistant(GOOD)],
        "rejected": [assistant(BAD)],
    },
    # a string prompt with message answers
    "prompt_string": {"prompt": Q2, "chosen": [assistant(GOOD)], "rejected": [assistant(BAD)]},
    # the implicit prompt: full conversations sharing their first messages (UltraFeedback binarized)
    "implicit": {
        "chosen": [user(Q1), assistant(A1), user(Q2), assistant(GOOD)],
        "rejected": [user(Q1), assistant(A1), user(Q2), assistant(BAD)],
    },
}
PROMPTS = {
    "prompt_messages": [user(Q1), assistant(A1), user(Q2)],
    "prompt_string": [user(Q2)],
    "implicit": [user(Q1), assistant(A1), user(Q2)],
}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def reader_for(path, tokenizer_path, **extra):
    overrides = [f"dataset.path={path}", f"tokenizer.path={tokenizer_path}", "output_path=/nonexistent"]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return RowReader(load_prepare_config(ASSETS / "configs" / "tiny_prepare.yaml", overrides))


@pytest.mark.parametrize("family", sorted(TEMPLATES))
@pytest.mark.parametrize("form", sorted(ROWS))
def test_each_answer_is_trained_exactly_as_the_template_writes_it(tmp_path, family, form):
    """Oracle: transformers renders prompt + answer; the document's tokens decode to that text, and its trained
    tokens decode to the start of what follows the rendering of the prompt with the generation prompt: the answer
    and its end-of-turn marker. Nothing of the prompt (its own earlier reply included) is trained.
    """
    tokenizer = AutoTokenizer.from_pretrained(TEMPLATES[family])
    reader = reader_for(write_jsonl(tmp_path / "pairs.jsonl", [ROWS[form]]), TEMPLATES[family])
    assert reader.form == "pairs"
    row = reader.sample(0)
    assert row.skipped is None and len(row.documents) == 2
    prompt = PROMPTS[form]
    head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    for (ids, trained), answer in zip(row.documents, (GOOD, BAD), strict=True):
        full = tokenizer.apply_chat_template([*prompt, assistant(answer)], tokenize=False)
        assert tokenizer.decode(ids) == full
        assert full.startswith(head)
        trained_text, rest = tokenizer.decode(ids[trained]), full[len(head) :]
        # the answer, then its end-of-turn marker (trained: the model learns to stop), then nothing else of the
        # conversation: what a template writes after the last turn (phi3's <|endoftext|>) is not an answer
        assert rest.startswith(trained_text) and trained_text.startswith(answer), (trained_text, rest)
        assert trained_text[len(answer) :].strip(), "the end-of-turn marker after the answer is not trained"
        assert A1 not in trained_text and Q2 not in trained_text
    # the preview's two samples are the chosen and the rejected answer, as written
    assert GOOD in row.rendered.text and BAD in row.rejected[0].text


def test_plain_text_pairs_train_the_answer_and_eos(tmp_path):
    """TRL's standard form: no template, prompt + answer, the answer and the tokenizer's EOS trained."""
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    reader = reader_for(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q: 2+2=", "chosen": " 4", "rejected": " 5"}]),
                        TINY_MODEL)  # fmt: skip
    (c_ids, c_tr), (r_ids, r_tr) = reader.sample(0).documents
    assert tokenizer.decode(c_ids, skip_special_tokens=True) == "Q: 2+2= 4"
    assert tokenizer.decode(c_ids[c_tr]) == " 4" + tokenizer.eos_token
    assert tokenizer.decode(r_ids[r_tr]) == " 5" + tokenizer.eos_token


def test_pairs_are_rendered_with_the_configured_template_and_the_rows_tools(tmp_path):
    """chat.template (not the tokenizer's own) writes a pair, and with the row's tool schemas, as transformers'
    apply_chat_template does: a DPO run on agent traces sees the tools its answers call."""
    template = ROOT / "tests" / "data" / "chat_templates" / "qwen3-0.6b.jinja"
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "zqdesc the weather",
                                               "parameters": {"type": "object", "properties": {}}}}]  # fmt: skip
    row = {**ROWS["prompt_string"], "tools": tools}
    cfg = load_prepare_config(
        ASSETS / "configs" / "tiny_prepare.yaml",
        [f"dataset.path={write_jsonl(tmp_path / 'p.jsonl', [row])}", f"output_path={tmp_path / 'out'}",
         f"chat.template={template}"],
    )  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    for (ids, trained), answer in zip(RowReader(cfg).sample(0, cfg, tokenizer).documents, (GOOD, BAD), strict=True):
        want = tokenizer.apply_chat_template(
            [user(Q2), assistant(answer)], tools=tools, chat_template=template.read_text(), tokenize=False
        )
        assert tokenizer.decode(ids).removeprefix(tokenizer.bos_token) == want and "zqdesc the weather" in want
        assert tokenizer.decode(ids[trained]).endswith(answer + "<|im_end|>")  # after Qwen3's empty think block
        assert Q2 not in tokenizer.decode(ids[trained]) and "zqdesc" not in tokenizer.decode(ids[trained])


def test_message_prompts_with_string_answers_and_the_rows_a_pair_skips_by_reason(tmp_path):
    """A message prompt with answers given as strings: each answer is the assistant's reply. A pair whose answer is
    a conversation the template refuses, or that has no assistant reply after the prompt, is skipped under its own
    reason, counted in the report."""
    rows = [
        {"prompt": [user(Q2)], "chosen": GOOD, "rejected": BAD},
        {"prompt": [user(Q2)], "chosen": [{"role": "robot", "content": "x"}], "rejected": [assistant("y")]},
        {"prompt": [user(Q2)], "chosen": [user("more?")], "rejected": [user("else?")]},
    ] * 4
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = load_prepare_config(
        ASSETS / "configs" / "tiny_prepare.yaml",
        [f"dataset.path={path}", f"output_path={tmp_path / 'out'}", "splits={training: 1.0}"],
    )
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    (c, ct), (r, rt) = RowReader(cfg).sample(0, cfg, tokenizer).documents
    assert tokenizer.decode(c[ct]).startswith(GOOD) and tokenizer.decode(r[rt]).startswith(BAD)
    assert prepare(cfg, progress=False)["skipped"] == {"bad_conversation": 4, "bad_pair": 4}


def test_prepare_writes_pairs_whole_with_their_index_and_counts_what_it_skips(tmp_path):
    rows = [ROWS["prompt_messages"], ROWS["implicit"]] * 10
    rows += [{"prompt": "Same?", "chosen": [assistant("x")], "rejected": [assistant("x")]}]  # identical answers
    rows += [{"prompt": "Odd?", "chosen": [], "rejected": [assistant("y")]}]  # no answer: bad_pair
    rows += [{"prompt": "Long?", "chosen": [assistant("word " * 400)], "rejected": [assistant("short")]}]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = load_prepare_config(
        ASSETS / "configs" / "tiny_prepare.yaml",
        [f"dataset.path={path}", f"output_path={tmp_path / 'out'}", "report.sequence_length=400"],
    )
    summary = prepare(cfg, progress=False)
    assert summary["form"] == "pairs"
    assert summary["skipped"] == {"identical_answers": 1, "bad_pair": 1}
    assert summary["written"] == 21 and summary["pairs"]["pairs"] == 21
    assert summary["pairs"]["identical_answers"] == 1
    assert summary["pairs"]["longer_than_sequence_length"] == 1
    assert summary["pairs"]["longer_with_shared_prompt"] == 1  # its chosen answer alone is longer than 400
    total = shared = 0
    for split in cfg.splits:
        ds = TokenDataset(tmp_path / "out", split)
        assert ds.pairs is not None and len(ds) == 2 * len(ds.pairs)
        total += len(ds.pairs)
        shared += int(shared_prompt_lengths(ds).sum())
        for chosen, rejected in ds.pairs:
            (c, ct), (r, rt) = ds.document(chosen), ds.document(rejected)
            # a pair's documents share the prompt up to the first trained token of either answer
            first = min(int(np.argmax(ct)), int(np.argmax(rt)))
            assert first > 0 and (c[:first] == r[:first]).all()
            assert ct.any() and rt.any()
    assert total == 21
    assert summary["pairs"]["shared_prompt_tokens"] == shared > 21  # every pair's prompt, placed once in training
    report = json.loads((tmp_path / "out" / "prepare_report.json").read_text())["summary"]
    assert report["pairs"]["pairs"] == 21


def delimiter_config(rows, tmp_path, *extra):
    """A prepare config over ``rows`` (written to ``tmp_path``) with delimiter masking, '<<' to '>>'."""
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    return load_prepare_config(
        ASSETS / "configs" / "tiny_prepare.yaml",
        [
            f"dataset.path={path}",
            f"output_path={tmp_path / 'out'}",
            "chat.masking.mode=delimiters",
            "chat.masking.start_delimiter='<<'",
            "chat.masking.end_delimiter='>>'",
            "splits={training: 1.0}",
            *extra,
        ],
    )


def test_a_pair_is_dropped_whole_when_one_answer_trains_nothing(tmp_path):
    """Delimiter masking finds a span in one answer only: that pair is skipped once, never half-written, and
    every other pair is kept whole, each answer beside its own (the lost pairs are not the chunk's first)."""
    rows = [{"prompt": "Q0?", "chosen": [assistant("<<aa>>")], "rejected": [assistant("<<bb>>")]}]
    rows += [{"prompt": "Q?", "chosen": [assistant("<<ok>>")], "rejected": [assistant("plain")]}]
    rows += [{"prompt": "Q1?", "chosen": [assistant("plain")], "rejected": [assistant("plain too")]}]  # one skip
    rows += [{"prompt": "Q2?", "chosen": [assistant("<<cc>>")], "rejected": [assistant("<<dd>>")]}]
    rows += [{"prompt": "Q3?", "chosen": [assistant("plain")], "rejected": [assistant("<<no>>")]}]
    # after a pair whose answers both train nothing, one whose rejected answer alone trains nothing: named too
    rows += [{"prompt": "Q4?", "chosen": [assistant("plain")], "rejected": [assistant("plain two")]}]
    rows += [{"prompt": "Q5?", "chosen": [assistant("<<ee>>")], "rejected": [assistant("plain")]}]
    cfg = delimiter_config(rows, tmp_path, "report.examples=10")
    summary = prepare(cfg, progress=False)
    assert summary["skipped"] == {"no_trained_tokens": 5}
    skips = summary["examples"]["no_trained_tokens"]
    assert [(x["row"], x["message"].split(":")[0]) for x in skips] == [
        (1, "the rejected answer"),
        (2, "the chosen answer"),
        (4, "the chosen answer"),
        (5, "the chosen answer"),
        (6, "the rejected answer"),
    ]
    ds = TokenDataset(tmp_path / "out")
    assert len(ds) == 4 and ds.pairs.tolist() == [[0, 1], [2, 3]]
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    trained = [tokenizer.decode(t[m]) for t, m in map(ds.document, range(4))]
    assert [x.strip() for x in trained] == ["aa>>", "bb>>", "cc>>", "dd>>"]  # through the end delimiter
    # the preview of every row of the chunk: its chosen answer as the sample, its rejected one beside it
    for r, row in zip(rows, RowReader(cfg).samples(range(len(rows))), strict=True):
        chosen, rejected = (r[k][0]["content"] for k in ("chosen", "rejected"))
        assert chosen in row.rendered.text and rejected in row.rejected[0].text
        assert row.rendered.text != row.rejected[0].text


def test_under_delimiters_a_prompts_own_reply_stays_context(tmp_path):
    """Delimiter masking finds no turns, so the answer starts where the prompt's own rendering ends: a delimited
    reply inside a multi-turn prompt is not trained, only each answer's."""
    prompt = [user("Q0?"), assistant("<<old>>"), user("Q1?")]
    rows = [{"prompt": prompt, "chosen": [assistant("<<aa>>")], "rejected": [assistant("<<bb>>")]}] * 2
    cfg = delimiter_config(rows, tmp_path)
    assert prepare(cfg, progress=False)["skipped"] == {}
    ds = TokenDataset(tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    trained = [tokenizer.decode(t[m]).strip() for t, m in map(ds.document, range(len(ds)))]
    assert trained == ["aa>>", "bb>>"] * 2 and all("old" in tokenizer.decode(ds.document(i)[0]) for i in range(4))


def test_a_broken_pair_index_is_refused_by_name(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [ROWS["prompt_string"]] * 4)
    cfg = load_prepare_config(
        ASSETS / "configs" / "tiny_prepare.yaml",
        [f"dataset.path={path}", f"output_path={tmp_path / 'out'}", "splits={training: 1.0}"],
    )
    prepare(cfg, progress=False)
    np.save(tmp_path / "out" / "training" / "pairs.npy", np.array([[0, 1], [2, 9]]))
    with pytest.raises(DatasetNotFoundError, match="pair index"):
        TokenDataset(tmp_path / "out")


def test_sft_on_pairs_and_dpo_on_conversations_are_config_errors(tmp_path, data):
    path = write_jsonl(tmp_path / "pairs.jsonl", [ROWS["prompt_string"]] * 4)
    out = tmp_path / "out"
    prepare(
        load_prepare_config(
            ASSETS / "configs" / "tiny_prepare.yaml",
            [f"dataset.path={path}", f"output_path={out}", "splits={training: 1.0}"],
        ),
        progress=False,
    )

    def run(objective, train_path):
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "backend.train",
                str(ASSETS / "configs" / "tiny_train.yaml"),
                f"training.objective={objective}",
                f"data.datasets.training.path={train_path}",
                "training.evaluations.validation.interval=0",
                f"run.experiment_dir={tmp_path / objective}",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )

    sft = run("sft", out / "fast_llm_config_training.yaml")
    assert sft.returncode == 2 and "training.objective: dpo" in sft.stderr, sft.stderr[-2000:]
    dpo = run("dpo", data / "fast_llm_config_training.yaml")
    assert dpo.returncode == 2 and "holds no preference pairs" in dpo.stderr, dpo.stderr[-2000:]


def test_dpo_refuses_settings_that_would_mix_prompt_or_answers():
    base = ASSETS / "configs" / "tiny_dpo_train.yaml"
    for override, key in (
        ("data.sampling.use_loss_masking_spans=no", "use_loss_masking_spans"),
        ("batch.cross_document_attention=yes", "cross_document_attention"),
        ("data.truncate_documents=yes", "truncate_documents"),
        ("training.dpo.reference=adapters_off", "adapters_off needs"),
    ):
        with pytest.raises(ConfigError, match=key):
            load_train_config(base, [override])
    with pytest.raises(ConfigError, match="reference-free"):
        load_train_config(base, ["training.dpo.loss=simpo", "training.dpo.reference=precompute"])


def test_pair_forms_and_the_rows_they_skip():
    """`pair_conversations` on each form: the text form's implicit prompt is the shared leading characters; an
    answer may be one message; a row that cannot make a pair is skipped with its reason, never half-used."""
    from backend.documents import SkipRow, pair_conversations

    q, a = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
    assert pair_conversations({"chosen": "Q: 2+2? A: 4", "rejected": "Q: 2+2? A: 5"}) == (
        None,
        "Q: 2+2? A: 4",
        "Q: 2+2? A: 5",
        len("Q: 2+2? A: "),
    )
    assert pair_conversations({"prompt": "hi", "chosen": a, "rejected": [dict(a, content="go")]}) == (
        [q],
        [q, a],
        [q, dict(a, content="go")],
        1,
    )
    go = dict(a, content="go")
    # the implicit prompt: the messages both conversations start with, always leaving each its answer
    assert pair_conversations({"chosen": [q, a, q, a], "rejected": [q, a, q, go]}) == (
        [q, a, q],
        [q, a, q, a],
        [q, a, q, go],
        3,
    )
    assert pair_conversations({"chosen": [q, a], "rejected": [q, a]})[3] == 1
    for row, code, message in [
        ({"chosen": "x"}, "missing_field", "no 'rejected' in this row"),
        ({"prompt": "p", "chosen": "same", "rejected": " "}, "empty_text", "chosen or rejected answer is empty"),
        ({"chosen": "ab", "rejected": "ab"}, "empty_text", "chosen or rejected answer is empty"),
        ({"chosen": [q, a], "rejected": [dict(q, content="other"), a]}, "bad_pair", "share no leading message"),
        ({"prompt": "p", "chosen": [], "rejected": [a]}, "bad_pair", "'chosen' is an empty list"),
        ({"prompt": 5, "chosen": [a], "rejected": [a]}, "bad_pair", "'prompt' is a int"),
    ]:
        with pytest.raises(SkipRow, match=message) as e:
            pair_conversations(row)
        assert e.value.code == code, row
