"""Tests for backend/prepare.py: both input forms, round trip, split, bad rows, atomic output, CLI exit codes."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from backend import ROOT, SAMPLE_DATA, SAMPLE_DATA_OPENAI, TINY_MODEL, chat
from backend.config import ConfigError, load_prepare_config
from backend.dataset import TokenDataset
from backend.prepare import PrepareError, prepare, repair_spans, split_assignment

PY = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_MODEL)


def head_jsonl(src, dst, n):
    lines = Path(src).read_text().splitlines()[:n]
    Path(dst).write_text("\n".join(lines) + "\n")
    return [json.loads(line) for line in lines]


def write_jsonl(path, rows):
    Path(path).write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def make_cfg(tmp_path, data, out="out", **sections):
    d = {
        "output_path": str(tmp_path / out),
        "dataset": {"path": str(data)},
        "tokenizer": {"path": str(TINY_MODEL)},
        "splits": {"training": 0.8, "validation": 0.2},
        "report": {"sequence_length": 64, "examples": 3},
    }
    for k, v in sections.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            d[k] = {**d[k], **v}
        else:
            d[k] = v
    return load_prepare_config(d)


def read_all(out):
    """{split: [(tokens, trained), ...]} of a prepared directory."""
    result = {}
    for name in ("training", "validation"):
        ds = TokenDataset(out, split=name)
        result[name] = [ds.document(i) for i in range(len(ds))]
    return result


def expected_docs(n_rows, cfg, per_row):
    """Reference output: per_row(i) -> (tokens, trained) or None (skipped), placed by the documented split rule."""
    assign = split_assignment(n_rows, cfg.splits, cfg.seed)
    names = list(cfg.splits)
    out = {name: [] for name in names}
    for i in range(n_rows):
        doc = per_row(i)
        if doc is not None:
            out[names[assign[i]]].append(doc)
    return out


def assert_same(got, want):
    assert got.keys() == want.keys()
    for name in got:
        assert len(got[name]) == len(want[name]), name
        for (t1, m1), (t2, m2) in zip(got[name], want[name], strict=False):
            np.testing.assert_array_equal(t1, t2)
            np.testing.assert_array_equal(m1, m2)


def dir_bytes(out):
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(Path(out).rglob("*.npy"))}


# ------------------------------------------------------------------------------------------ unit pieces
def test_split_assignment_proportions_and_determinism():
    a = split_assignment(1000, {"training": 0.9, "validation": 0.1}, seed=3)
    assert np.bincount(a).tolist() == [900, 100]
    np.testing.assert_array_equal(a, split_assignment(1000, {"training": 0.9, "validation": 0.1}, seed=3))
    assert not np.array_equal(a, split_assignment(1000, {"training": 0.9, "validation": 0.1}, seed=4))
    # the guide's 0.998/0.002 on a small dataset still gives a validation document
    b = split_assignment(100, {"training": 0.998, "validation": 0.002}, seed=0)
    assert np.bincount(b).tolist() == [99, 1]
    c = split_assignment(10, {"a": 0.5, "b": 0.3, "c": 0.2}, seed=0)
    assert np.bincount(c).tolist() == [5, 3, 2]


def test_repair_spans_rule():
    spans, notes, reason = repair_spans([[5, 9], [0, 2], [8, 12], [40, 50], [18, 30]], 20)
    assert reason is None and spans == [(0, 2), (5, 12), (18, 19)]
    assert sorted(n.split(":")[0] for n in notes) == ["spans_clipped", "spans_clipped", "spans_merged"]
    assert repair_spans([], 5) == ([], [], None)
    assert "reversed" in repair_spans([[4, 1]], 20)[2]
    assert "null" in repair_spans(None, 20)[2]
    assert "pair of integers" in repair_spans([[1, "x"]], 20)[2]
    assert "pair of integers" in repair_spans([[1, 2, 3]], 20)[2]
    assert repair_spans("[[0, 1]]", 5)[0] == [(0, 1)]  # JSON-encoded spans (CSV columns) are accepted


# ---------------------------------------------------------------------------------------- one-step form
def test_one_step_round_trip_and_openai_shape(tmp_path, tokenizer):
    rows = head_jsonl(SAMPLE_DATA, tmp_path / "share.jsonl", 40)
    head_jsonl(SAMPLE_DATA_OPENAI, tmp_path / "openai.jsonl", 40)
    cfg = make_cfg(tmp_path, tmp_path / "share.jsonl")
    summary = prepare(cfg, progress=False)
    assert summary["form"] == "chat" and summary["written"] == 40 and summary["skipped_rows"] == 0

    def reference(i):
        r = chat.render(rows[i]["conversations"], tokenizer)
        t = chat.tokenize(r.text, r.trained_spans, tokenizer)
        return t.input_ids, t.trained

    got = read_all(tmp_path / "out")
    assert_same(got, expected_docs(40, cfg, reference))
    # what is trained is exactly the assistant replies plus their <|eot_id|>
    tokens, trained = got["training"][0]
    trained_text = tokenizer.decode(tokens[trained])
    assert "<|eot_id|>" in trained_text and "<|start_header_id|>" not in trained_text
    assert tokens[0] == tokenizer.bos_token_id and tokens[1] != tokenizer.bos_token_id  # BOS exactly once

    ds = TokenDataset(tmp_path / "out" / "fast_llm_config_training.yaml")
    assert ds.tokenizer_info["vocab_size"] == len(tokenizer) and ds.prepare_config_hash == summary["prepare_hash"]
    report = json.loads((tmp_path / "out" / "prepare_report.json").read_text())
    assert report["summary"]["num_tokens"] == summary["num_tokens"]
    assert (tmp_path / "out" / "DONE").is_file()
    assert load_prepare_config(str(tmp_path / "out" / "prepare_config.yaml")) == cfg

    # the OpenAI shape of the same conversations gives the same documents
    prepare(make_cfg(tmp_path, tmp_path / "openai.jsonl", out="out_openai"), progress=False)
    assert_same(read_all(tmp_path / "out_openai"), got)


def test_the_prepared_tokenizer_and_template_are_saved_with_the_data(tmp_path, tokenizer):
    """Training exports this tokenizer: it must be the one the rows were rendered with, custom template included."""
    from transformers import AutoTokenizer

    rows = head_jsonl(SAMPLE_DATA, tmp_path / "d.jsonl", 10)
    template = "{#- this dataset's own template -#}\n" + tokenizer.chat_template
    prepare(make_cfg(tmp_path, tmp_path / "d.jsonl", chat={"template": template}), progress=False)
    ds = TokenDataset(tmp_path / "out" / "fast_llm_config_training.yaml")
    saved = AutoTokenizer.from_pretrained(ds.root / ds.tokenizer_info["saved"])
    assert saved.chat_template == template != tokenizer.chat_template
    assert saved.get_vocab() == tokenizer.get_vocab() and saved.eos_token == tokenizer.eos_token
    # the saved tokenizer renders the rows to the very tokens that were stored
    r = chat.render(rows[0]["conversations"], saved)
    stored = [ds.document(i)[0] for i in range(len(ds))] + [
        TokenDataset(tmp_path / "out", split="validation").document(i)[0]
        for i in range(len(TokenDataset(tmp_path / "out", split="validation")))
    ]
    assert any(np.array_equal(chat.tokenize(r.text, r.trained_spans, saved).input_ids, t) for t in stored)


@pytest.mark.parametrize("final_eot", ["append", "leave"])
def test_report_counts_rows_whose_final_marker_was_appended(tmp_path, tokenizer, final_eot, capsys):
    """A template that leaves the final reply open (vLLM's ChatML): prepare says how many rows got the between-turns
    marker appended and trained (chat.final_eot: append), and none with 'leave'; the stored tokens agree."""
    rows = head_jsonl(SAMPLE_DATA, tmp_path / "d.jsonl", 12)
    template = (ROOT / "tests" / "data" / "chat_templates" / "chatml-vllm.jinja").read_text()
    cfg = make_cfg(tmp_path, tmp_path / "d.jsonl", chat={"template": template, "final_eot": final_eot})
    s = prepare(cfg, progress=False)
    ending_in_a_reply = sum(r["conversations"][-1]["from"] in ("gpt", "assistant") for r in rows)
    assert ending_in_a_reply > 0
    want = ending_in_a_reply if final_eot == "append" else 0
    assert s["appended_eot"] == {"rows": want, "final_eot": final_eot}
    assert ("end-of-turn marker appended: " in capsys.readouterr().out) is (want > 0)
    stored = [TokenDataset(tmp_path / "out", split=n) for n in ("training", "validation")]
    ends = [tokenizer.decode(d.document(i)[0][-24:]) for d in stored for i in range(len(d))]
    assert sum(e.endswith("<|im_end|>") for e in ends) == want  # the appended marker ends the document
    assert all(d.document(i)[1][-1] for d in stored for i in range(len(d)))  # the marker or the open reply: trained


def test_a_row_with_nothing_trained_is_reported_with_the_reason(tmp_path):
    """Delimiters found in some rows only: the others are skipped (no_trained_tokens) and the skip says why
    (span_not_found), as the studio's preview of the same row does; `warnings` stays about the rows kept."""
    rows = head_jsonl(SAMPLE_DATA, tmp_path / "d.jsonl", 40)
    start = "Reversed: "
    masking = {"mode": "delimiters", "start_delimiter": start, "end_delimiter": "<|eot_id|>"}
    s = prepare(make_cfg(tmp_path, tmp_path / "d.jsonl", chat={"masking": masking}), progress=False)
    without = [i for i, r in enumerate(rows) if not any(start in m["value"] for m in r["conversations"])]
    assert 0 < len(without) < len(rows)
    assert s["skipped"] == {"no_trained_tokens": len(without)}
    assert "span_not_found" not in s["warnings"]
    examples = s["examples"]["no_trained_tokens"]
    assert [e["row"] for e in examples] == without[:3]
    assert all("no token is trained" in e["message"] and "span_not_found: " in e["message"] for e in examples)


def test_a_chunk_of_only_skipped_rows_adds_no_document_and_counts_its_rows(tmp_path, monkeypatch):
    """prepare works in chunks of rows (CHUNK_ROWS); a chunk whose rows are all skipped contributes its rows to
    the counts and nothing else: no empty document, the next chunks' documents unchanged."""
    monkeypatch.setattr("backend.documents.CHUNK_ROWS", 2)
    good = head_jsonl(SAMPLE_DATA, tmp_path / "g.jsonl", 3)
    bad = [{"conversations": []}, "[1, 2]"]
    write_jsonl(tmp_path / "d.jsonl", bad + good[:2] + bad + good[2:])
    s = prepare(make_cfg(tmp_path, tmp_path / "d.jsonl", splits={"training": 1.0, "validation": 0.0}), progress=False)
    assert s["input_rows"] == 7 and s["written"] == 3 and s["num_documents"] == 3
    assert s["skipped"] == {"bad_conversation": 2, "unparseable_row": 2}
    write_jsonl(tmp_path / "only_good.jsonl", good)
    prepare(
        make_cfg(tmp_path, tmp_path / "only_good.jsonl", out="ref", splits={"training": 1.0, "validation": 0.0}),
        progress=False,
    )
    got, want = TokenDataset(tmp_path / "out"), TokenDataset(tmp_path / "ref")
    assert got.lengths.tolist() == want.lengths.tolist() and got.lengths.min() > 0
    for i in range(3):
        for a, b in zip(got.document(i), want.document(i), strict=True):
            np.testing.assert_array_equal(a, b)


def test_a_document_with_one_trained_token_is_kept_first_in_its_chunk(tmp_path, tokenizer):
    """The guide's span form: a first row whose spans leave exactly one token trained is written, with that one
    token trained (one trained token is a document; zero is a skip)."""
    text = "Tell me one word. Fine"
    last = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"][-1]
    rows = [{"text": text, "spans": [[0, last[0] - 1]]}] + _guide_rows(tokenizer, 1)  # only the last token trained
    write_jsonl(tmp_path / "spans.jsonl", rows)
    cfg = make_cfg(
        tmp_path,
        tmp_path / "spans.jsonl",
        dataset={"loss_masking_spans": "spans"},
        splits={"training": 1.0, "validation": 0.0},
    )
    s = prepare(cfg, progress=False)
    assert s["written"] == 2 and s["skipped"] == {}
    tokens, trained = TokenDataset(tmp_path / "out").document(0)
    assert int(trained.sum()) == 1 and tokenizer.decode(tokens[trained]) == text[last[0] :]


def test_warnings_count_rows_and_keep_each_message(tmp_path):
    """A template with no end-of-turn marker warns once per reply; the report counts rows (as it says) and its
    examples keep each reply's own message, code and text split at the first ': '."""
    rows = head_jsonl(SAMPLE_DATA, tmp_path / "d.jsonl", 5)
    plain = "{% for m in messages %}{{ m.role + ': ' + m.content + '\\n' }}{% endfor %}"
    s = prepare(
        make_cfg(tmp_path, tmp_path / "d.jsonl", chat={"template": plain}, report={"examples": 50}), progress=False
    )
    replies = [sum(m["from"] == "gpt" for m in r["conversations"]) for r in rows]
    assert sum(replies) > len(rows)  # some row warns more than once
    assert s["warnings"] == {"eot_undecided": len(rows), "eot_not_trained": len(rows)}
    undecided = s["examples"]["eot_undecided"]
    assert len(undecided) == sum(replies) and all(e["message"].startswith("message ") for e in undecided)
    assert [e["row"] for e in undecided] == [i for i, n in enumerate(replies) for _ in range(n)]


def test_summary_counts_long_documents(tmp_path):
    head_jsonl(SAMPLE_DATA, tmp_path / "d.jsonl", 30)
    s = prepare(make_cfg(tmp_path, tmp_path / "d.jsonl", report={"sequence_length": 90}), progress=False)
    lengths = np.concatenate([TokenDataset(tmp_path / "out", split=n).lengths for n in ("training", "validation")])
    long = s["longer_than_sequence_length"]
    assert long["documents"] == int((lengths > 90).sum()) > 0
    assert long["tokens"] == int(lengths[lengths > 90].sum())
    assert s["length_percentiles"]["max"] == lengths.max()
    assert s["trained_token_share"] == pytest.approx(s["num_trained_tokens"] / s["num_tokens"])


def test_bad_conversations_are_skipped_and_reported(tmp_path, tokenizer, capsys):
    good = head_jsonl(SAMPLE_DATA, tmp_path / "g.jsonl", 6)
    rows = [
        good[0],
        {"conversations": [{"from": "human"}]},  # missing 'value'
        {"conversations": []},  # empty
        '{"conversations": [broken json',  # unparseable line
        "[1, 2, 3]",  # not an object
        {"conversations": [{"from": "human", "value": "hi"}]},  # nothing trained
        {"other": 1},  # no conversations key
        good[1],
    ]
    write_jsonl(tmp_path / "bad.jsonl", rows)
    s = prepare(make_cfg(tmp_path, tmp_path / "bad.jsonl"), progress=False)
    assert s["input_rows"] == 8 and s["written"] == 2 and s["written"] + s["skipped_rows"] == 8
    assert s["skipped"] == {"bad_conversation": 2, "unparseable_row": 2, "no_trained_tokens": 1, "missing_field": 1}
    ex = s["examples"]
    assert [e["row"] for e in ex["bad_conversation"]] == [1, 2]
    assert "message 0" in ex["bad_conversation"][0]["message"] and "'value'" in ex["bad_conversation"][0]["message"]
    assert ex["unparseable_row"][0]["where"].endswith("bad.jsonl:4")
    printed = capsys.readouterr().out
    assert "bad_conversation: 2 row(s)" in printed and "row 1" in printed
    report = json.loads((tmp_path / "out" / "prepare_report.json").read_text())["summary"]
    assert report["skipped"] == s["skipped"]


def test_zero_documents_from_rows_is_exit_2_with_the_reasons(tmp_path, capsys):
    from backend.cli import run_cli
    from backend.prepare import NothingPreparedError, main

    rows = [{"conversations": [{"from": "human", "value": "hi"}]}, {"conversations": [{"from": "human"}]}]
    write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = make_cfg(tmp_path, tmp_path / "d.jsonl")
    with pytest.raises(NothingPreparedError, match="2 input rows -> 0 documents"):
        prepare(cfg, progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    with pytest.raises(SystemExit) as e:
        run_cli([str(tmp_path / "cfg.yaml")], "prepare", main)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no_trained_tokens: 1 row(s)" in err and "bad_conversation: 1 row(s)" in err
    assert "Traceback" not in err


def test_skipped_share_over_the_limit_is_a_loud_warning(tmp_path, capsys):
    good = head_jsonl(SAMPLE_DATA, tmp_path / "g.jsonl", 9)
    write_jsonl(tmp_path / "d.jsonl", good + [{"conversations": [{"from": "human", "value": "hi"}]}])  # 1 of 10
    s = prepare(make_cfg(tmp_path, tmp_path / "d.jsonl"), progress=False)
    assert s["skipped_share"] == pytest.approx(0.1) and "1 of 10 input rows skipped" in s["skipped_warning"]
    assert s["skipped_warning"] in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "prepare_report.json").read_text())["summary"]
    assert report["skipped_warning"] == s["skipped_warning"]
    s = prepare(make_cfg(tmp_path, tmp_path / "d.jsonl", "out2", report={"max_skipped_share": 0.1}), progress=False)
    assert s["skipped_warning"] is None and "WARNING" not in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- guide form
def _guide_rows(tokenizer, n=6):
    rows = []
    for conv in [json.loads(x)["conversations"] for x in Path(SAMPLE_DATA).read_text().splitlines()[:n]]:
        r = chat.render(conv, tokenizer)
        rows.append({"text": r.text, "spans": [list(s) for s in r.loss_masking_spans]})
    return rows


def test_guide_form_bad_spans(tmp_path, tokenizer):
    base = _guide_rows(tokenizer, 8)
    t = base[0]["text"]
    rows = [
        base[0],  # 0 fine
        {"text": None, "spans": []},  # 1 null text
        {"text": "", "spans": []},  # 2 empty text
        {"text": t, "spans": [[10, 5]]},  # 3 reversed -> skipped
        {"text": t, "spans": base[0]["spans"] + [[3, 20], [0, 8]]},  # 4 overlapping -> merged, kept
        {"text": t, "spans": [[-5, 3]] + base[0]["spans"][1:] + [[len(t) - 3, len(t) + 50]]},  # 5 clipped, kept
        {"text": t, "spans": [[0, len(t) - 1]]},  # 6 all masked -> nothing trained
        {"text": t, "spans": [[0, "a"]]},  # 7 malformed span
        {"text": t, "spans": None},  # 8 null spans
        {"words": "x"},  # 9 no text field
        base[1],  # 10 fine
    ]
    write_jsonl(tmp_path / "spans.jsonl", rows)
    cfg = make_cfg(tmp_path, tmp_path / "spans.jsonl", dataset={"loss_masking_spans": "spans"})
    s = prepare(cfg, progress=False)
    assert s["form"] == "spans"
    assert s["skipped"] == {"empty_text": 2, "bad_spans": 3, "no_trained_tokens": 1, "missing_field": 1}
    assert s["warnings"] == {
        "spans_merged": 1,
        "spans_clipped": 1,
    }  # rows: row 4 merged twice, row 5 clipped at both ends
    assert s["written"] == 4 and s["written"] + s["skipped_rows"] == len(rows)
    (masked,) = s["examples"]["no_trained_tokens"]  # row 6: its whole text masked; the skip names its length
    assert (
        masked["row"] == 6
        and masked["message"] == f"no token is trained ({len(chat.tokenize(t, [], tokenizer).input_ids)} tokens)"
    )

    def reference(i):
        if i in (0, 4, 10):  # merging [3,20],[0,8] into [0, 247] changes nothing
            row = base[0] if i != 10 else base[1]
            spans = chat.spans_from_loss_masking(len(row["text"]), row["spans"])
            tok = chat.tokenize(row["text"], spans, tokenizer)
            return tok.input_ids, tok.trained
        if i == 5:  # clipped [-5, 3] -> [0, 3] masks only 4 chars; clipped end span masks the tail
            spans = chat.spans_from_loss_masking(len(t), [[0, 3]] + base[0]["spans"][1:] + [[len(t) - 3, len(t) - 1]])
            tok = chat.tokenize(t, spans, tokenizer)
            return tok.input_ids, tok.trained
        return None

    assert_same(read_all(tmp_path / "out"), expected_docs(len(rows), cfg, reference))


def test_missing_field_names_the_columns(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "answer": "b"}])
    with pytest.raises(ConfigError) as e:
        prepare(make_cfg(tmp_path, tmp_path / "d.jsonl"), progress=False)
    assert "'text' not found" in str(e.value) and "prompt, answer" in str(e.value)
    with pytest.raises(ConfigError, match="loss_masking_spans: column 'spans' not found.*prompt, answer"):
        prepare(make_cfg(tmp_path, tmp_path / "d.jsonl", dataset={"loss_masking_spans": "spans"}), progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))


def test_parquet_and_glob_and_save_to_disk_inputs(tmp_path, tokenizer):
    from datasets import Dataset, DatasetDict

    rows = _guide_rows(tokenizer, 6)
    Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved"))
    write_jsonl(tmp_path / "part-0.jsonl", rows[:3])
    write_jsonl(tmp_path / "part-1.jsonl", rows[3:])
    outs = []
    for i, path in enumerate([tmp_path / "d.parquet", tmp_path / "saved", tmp_path / "part-*.jsonl"]):
        s = prepare(make_cfg(tmp_path, path, out=f"o{i}", dataset={"loss_masking_spans": "spans"}), progress=False)
        assert s["written"] == 6
        outs.append(read_all(tmp_path / f"o{i}"))
    assert_same(outs[0], outs[1])
    assert_same(outs[0], outs[2])
    with pytest.raises(ConfigError, match="no split 'test'.*train"):
        prepare(
            make_cfg(tmp_path, tmp_path / "saved", out="o9", dataset={"loss_masking_spans": "spans", "split": "test"}),
            progress=False,
        )
    with pytest.raises(ConfigError, match="does not exist"):
        prepare(make_cfg(tmp_path, tmp_path / "missing.jsonl", out="o9"), progress=False)


@pytest.mark.slow
def test_guide_step2_script_then_guide_prepare_config(tmp_path, tokenizer):
    """The guide's own two steps: its step-2 script (paths adapted) then its step-3 YAML (paths overridden)."""
    head_jsonl(SAMPLE_DATA, tmp_path / "s.jsonl", 24)
    subprocess.run(
        [PY, str(ROOT / "scripts" / "guide_step2.py"), str(tmp_path / "hf_dataset"), str(tmp_path / "s.jsonl")],
        cwd=ROOT,
        env=ENV,
        check=True,
        capture_output=True,
        timeout=300,
    )
    guide = yaml.safe_load((ROOT / "assets" / "configs" / "guide_prepare.yaml").read_text())
    assert guide["dataset"]["path"] == "runs/guide/hf_dataset" and guide["dataset"]["loss_masking_spans"] == "spans"
    cfg = load_prepare_config(
        ROOT / "assets" / "configs" / "guide_prepare.yaml",
        [f"output_path={tmp_path / 'tok'}", f"dataset.path={tmp_path / 'hf_dataset'}", "tokenize_workers=1"],
    )
    s = prepare(cfg, progress=False)
    assert s["form"] == "spans" and s["written"] == 24 and s["splits"]["validation"]["num_documents"] == 1

    from datasets import load_from_disk

    data = load_from_disk(str(tmp_path / "hf_dataset"))["train"]

    def reference(i):
        text, spans = data[i]["text"], data[i]["spans"]
        tok = chat.tokenize(text, chat.spans_from_loss_masking(len(text), spans), tokenizer)
        return tok.input_ids, tok.trained

    got = read_all(tmp_path / "tok")
    assert_same(got, expected_docs(24, cfg, reference))
    # the guide's delimiter spans train each reply and its <|eot_id|>, never a header
    tokens, trained = got["training"][0]
    assert tokenizer.decode(tokens[trained]).count("<|eot_id|>") == tokenizer.decode(tokens).count(
        "assistant<|end_header_id|>"
    )
    assert "<|start_header_id|>" not in tokenizer.decode(tokens[trained])


# ------------------------------------------------------------------------------ determinism and workers
@pytest.mark.slow
def test_workers_do_not_change_the_output(tmp_path, tokenizer):
    rows = _guide_rows(tokenizer, 20)
    write_jsonl(tmp_path / "d.jsonl", [rows[i % 20] for i in range(1500)])  # 3 chunks: both workers get work
    spans = {"loss_masking_spans": "spans"}
    a = prepare(make_cfg(tmp_path, tmp_path / "d.jsonl", out="w1", tokenize_workers=1, dataset=spans), progress=False)
    b = prepare(make_cfg(tmp_path, tmp_path / "d.jsonl", out="w2", tokenize_workers=2, dataset=spans), progress=False)
    assert b["tokenize_workers"] == min(2, os.cpu_count())
    assert dir_bytes(tmp_path / "w1") == dir_bytes(tmp_path / "w2")
    assert a["prepare_hash"] == b["prepare_hash"]  # worker counts are not part of the output identity


@pytest.mark.slow
def test_workers_do_not_change_the_output_chat_form(tmp_path, monkeypatch):
    """Chat rows through 2 workers: each worker renders and tokenizes with chat.PortableTokenizer (rebuilt from the
    parent's spec without transformers); the output must be byte-identical to the in-process path. Chunks of 64
    rows: 18 of them, more than the 4 a pool of 2 keeps in flight, so results are also taken while more are sent."""
    import backend.documents as documents

    monkeypatch.setattr(documents, "CHUNK_ROWS", 64)
    rows = [json.loads(line) for line in open(SAMPLE_DATA)][:50]
    write_jsonl(tmp_path / "d.jsonl", [rows[i % 50] for i in range(1100)])
    prepare(make_cfg(tmp_path, tmp_path / "d.jsonl", out="c1", tokenize_workers=1), progress=False)
    b = prepare(make_cfg(tmp_path, tmp_path / "d.jsonl", out="c2", tokenize_workers=2), progress=False)
    assert b["tokenize_workers"] == min(2, os.cpu_count()) and b["written"] == 1100
    assert dir_bytes(tmp_path / "c1") == dir_bytes(tmp_path / "c2")


def test_same_config_same_split_different_seed_different_split(tmp_path):
    head_jsonl(SAMPLE_DATA, tmp_path / "d.jsonl", 30)
    prepare(make_cfg(tmp_path, tmp_path / "d.jsonl", out="a"), progress=False)
    prepare(make_cfg(tmp_path, tmp_path / "d.jsonl", out="b"), progress=False)
    prepare(make_cfg(tmp_path, tmp_path / "d.jsonl", out="c", seed=99), progress=False)
    assert dir_bytes(tmp_path / "a") == dir_bytes(tmp_path / "b")
    assert dir_bytes(tmp_path / "a") != dir_bytes(tmp_path / "c")
    assert len(TokenDataset(tmp_path / "c", "validation")) == 6


# --------------------------------------------------------------------------------------- output safety
def test_rerun_is_noop_and_different_config_needs_force(tmp_path, capsys):
    head_jsonl(SAMPLE_DATA, tmp_path / "d.jsonl", 20)
    cfg = make_cfg(tmp_path, tmp_path / "d.jsonl")
    prepare(cfg, progress=False)
    stamp = (tmp_path / "out" / "DONE").stat().st_mtime_ns
    again = prepare(make_cfg(tmp_path, tmp_path / "d.jsonl", tokenize_workers=2), progress=False)
    assert again["status"] == "already_prepared" and again["written"] == 20
    assert "already prepared, nothing to do" in capsys.readouterr().out
    assert (tmp_path / "out" / "DONE").stat().st_mtime_ns == stamp

    other = make_cfg(tmp_path, tmp_path / "d.jsonl", splits={"training": 0.5, "validation": 0.5})
    with pytest.raises(PrepareError, match="different config.*--force"):
        prepare(other, progress=False)
    assert (tmp_path / "out" / "DONE").stat().st_mtime_ns == stamp
    s = prepare(other, force=True, progress=False)
    assert s["splits"]["validation"]["num_documents"] == 10
    assert len(TokenDataset(tmp_path / "out", "validation")) == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "out"]  # no tmp/old directories left

    # the input changed: refused too, with the reason
    head_jsonl(SAMPLE_DATA, tmp_path / "d.jsonl", 25)
    os.utime(tmp_path / "d.jsonl", ns=(time.time_ns(), time.time_ns() + 10**9))
    with pytest.raises(PrepareError, match="input files changed"):
        prepare(other, progress=False)


def test_foreign_directory_and_stale_tmp(tmp_path):
    head_jsonl(SAMPLE_DATA, tmp_path / "d.jsonl", 10)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("not a dataset")
    with pytest.raises(PrepareError, match="no DONE marker"):
        prepare(make_cfg(tmp_path, tmp_path / "d.jsonl"), progress=False)
    assert (tmp_path / "out" / "mine.txt").exists()
    # leftovers of a killed run (pid that cannot be alive) are removed
    stale = tmp_path / "out2.tmp-999999999"
    stale.mkdir()
    (tmp_path / "out2.old-999999998").mkdir()
    prepare(make_cfg(tmp_path, tmp_path / "d.jsonl", out="out2"), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "out", "out2"]


def _write_big(tmp_path, tokenizer, n):
    rows = _guide_rows(tokenizer, 40)
    write_jsonl(tmp_path / "big.jsonl", [rows[i % len(rows)] for i in range(n)])
    cfg = {
        "output_path": str(tmp_path / "out"),
        "dataset": {"path": str(tmp_path / "big.jsonl"), "loss_masking_spans": "spans"},
        "tokenizer": {"path": str(TINY_MODEL)},
        "splits": {"training": 0.9, "validation": 0.1},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return cfg


@pytest.mark.slow
def test_sigkill_leaves_old_output_or_none(tmp_path, tokenizer):
    cfg = _write_big(tmp_path, tokenizer, 15_000)
    reference = tmp_path / "ref"
    prepare(load_prepare_config({**cfg, "output_path": str(reference)}), progress=False)
    rng = random.Random(0)
    killed_midway = 0
    for _attempt in range(2):
        proc = subprocess.Popen(
            [PY, "-m", "backend.prepare", str(tmp_path / "cfg.yaml")],
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.time() + 120
        while not list(tmp_path.glob("out.tmp-*")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)  # wait until it has started writing, then kill at a random moment
        time.sleep(rng.uniform(0.0, 1.0))
        if proc.poll() is None:
            killed_midway += 1
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        out = tmp_path / "out"
        if out.exists():  # complete, never partial
            assert (out / "DONE").is_file()
            assert dir_bytes(out) == dir_bytes(reference)
    assert killed_midway >= 1
    # rerun: stale tmp directories go away and the result equals the uninterrupted run
    r = subprocess.run(
        [PY, "-m", "backend.prepare", str(tmp_path / "cfg.yaml")],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert dir_bytes(tmp_path / "out") == dir_bytes(reference)
    assert not list(tmp_path.glob("out.tmp-*")) and not list(tmp_path.glob("out.old-*"))


# ------------------------------------------------------------------------------------------------- CLI
def test_cli_validate_exit_codes(tmp_path, capsys):
    from backend.cli import run_cli
    from backend.prepare import main

    head_jsonl(SAMPLE_DATA, tmp_path / "d.jsonl", 10)
    good = {
        "output_path": str(tmp_path / "out"),
        "dataset": {"path": str(tmp_path / "d.jsonl")},
        "tokenizer": {"path": str(TINY_MODEL)},
    }
    (tmp_path / "good.yaml").write_text(yaml.safe_dump(good))
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**good, "tokenize_wrkers": 2}))
    with pytest.raises(SystemExit) as e:
        run_cli([str(tmp_path / "good.yaml"), "--validate"], "prepare", main)
    assert e.value.code == 0 and not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as e:
        run_cli([str(tmp_path / "bad.yaml"), "--validate"], "prepare", main)
    assert e.value.code == 2 and "tokenize_workers" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        run_cli([str(tmp_path / "good.yaml"), "splits.training=0.3"], "prepare", main)
    assert e.value.code == 2
    # a run-time problem (missing column) is a config error: exit 2, no traceback
    write_jsonl(tmp_path / "d.jsonl", [{"q": 1}])
    with pytest.raises(SystemExit) as e:
        run_cli([str(tmp_path / "good.yaml")], "prepare", main)
    assert e.value.code == 2 and "its columns are: q" in capsys.readouterr().err
    # an output conflict: exit 1 with the reason
    (tmp_path / "out").mkdir()
    write_jsonl(tmp_path / "d.jsonl", [{"text": "hello"}])
    with pytest.raises(SystemExit) as e:
        run_cli([str(tmp_path / "good.yaml")], "prepare", main)
    assert e.value.code == 1 and "--force" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_subprocess_validate(tmp_path):
    r = subprocess.run(
        [PY, "-m", "backend.prepare", "assets/configs/tiny_prepare.yaml", "--validate"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and "OK" in r.stdout
    r = subprocess.run(
        [PY, "-m", "backend.prepare", "assets/configs/tiny_prepare.yaml", "splits.training=2", "--validate"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
