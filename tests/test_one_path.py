"""One path from the studio's preview to what training reads (issue 16, item 1).

For every input form prepare accepts, what `backend.documents.RowReader.sample` (the studio's preview, dataset
check and packing view, and notebooks 01/02 read rows through it) shows for rows 0..N equals, token for token and
mask bit for mask bit, `TokenDataset.document(d)` after `backend.prepare` wrote the same config. Skipped rows give
the reason prepare counted. Inputs are built from assets/data/sample_sharegpt.jsonl in tmp_path (no hub).
"""

import json
from pathlib import Path

import numpy as np
import pytest

from backend import SAMPLE_DATA, TINY_MODEL, chat
from backend.config import load_prepare_config
from backend.dataset import TokenDataset
from backend.documents import RowReader, prepared_sample
from backend.prepare import prepare

N = 10  # rows of the sample data used per form


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_MODEL)


@pytest.fixture(scope="module")
def rows():
    return [json.loads(line) for line in Path(SAMPLE_DATA).read_text().splitlines()[:N]]


def _messages(conv):
    role = {"human": "user", "gpt": "assistant", "system": "system"}
    return [{"role": role[m["from"]], "content": m["value"]} for m in conv]


def _guide(rows, tokenizer):
    """The guide's form: rendered text + inclusive loss_masking_spans (what is NOT trained)."""
    out = []
    for r in rows:
        s = chat.render(r, tokenizer)
        out.append({"text": s.text, "loss_masking_spans": [list(x) for x in s.loss_masking_spans]})
    return out


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _dataset(rows):
    import datasets

    return datasets.Dataset.from_list(rows)


def _inputs(tmp_path, rows, tokenizer):
    """{form: (dataset section, expected skipped rows)} of every input form prepare accepts."""
    import datasets

    guide = _guide(rows, tokenizer)
    d = tmp_path / "in"
    d.mkdir()
    messages = [{"messages": _messages(r["conversations"])} for r in rows]
    messages[3] = {"messages": [{"role": "user", "content": "a question without a reply"}]}  # nothing to train
    bad_guide = [*guide]
    bad_guide[2] = {**guide[2], "loss_masking_spans": [[9, 4]]}  # reversed span: skipped (bad_spans)
    bad_guide[5] = {**guide[5], "loss_masking_spans": [[0, 30], [20, 40], [-5, 3]]}  # overlapping/outside: repaired
    plain = [{"text": g["text"]} for g in guide]
    sharegpt_lines = [json.dumps(r) for r in rows]
    sharegpt_lines[4] = "{not json"  # unparseable_row
    (d / "sharegpt.jsonl").write_text("\n".join(sharegpt_lines) + "\n")
    _write_jsonl(d / "messages.jsonl", messages)
    _write_jsonl(d / "guide.jsonl", bad_guide)
    _write_jsonl(d / "plain.jsonl", plain)
    _dataset([{**g, "loss_masking_spans": json.dumps(g["loss_masking_spans"])} for g in guide]).to_csv(
        str(d / "guide.csv"), index=False
    )
    _dataset(rows).to_parquet(str(d / "sharegpt.parquet"))
    _dataset(messages).save_to_disk(str(d / "saved"))
    (d / "folder").mkdir()
    _dataset(rows[:4]).to_parquet(str(d / "folder" / "part-0.parquet"))
    _dataset(rows[4:]).to_parquet(str(d / "folder" / "part-1.parquet"))
    datasets.DatasetDict(train=_dataset(rows[:3]), test=_dataset(rows[3:])).save_to_disk(str(d / "dict"))
    spans = {"field": "text", "loss_masking_spans": "loss_masking_spans"}
    return {
        "sharegpt_jsonl": ({"path": str(d / "sharegpt.jsonl")}, {4: "unparseable_row"}),
        "openai_messages": ({"path": str(d / "messages.jsonl")}, {3: "no_trained_tokens"}),
        "guide_text_spans": ({"path": str(d / "guide.jsonl"), **spans}, {2: "bad_spans"}),
        "plain_text": ({"path": str(d / "plain.jsonl")}, {}),
        "csv_text_spans": ({"path": str(d / "guide.csv"), **spans}, {}),
        "parquet": ({"path": str(d / "sharegpt.parquet")}, {}),
        "save_to_disk": ({"path": str(d / "saved")}, {3: "no_trained_tokens"}),
        "folder_of_files": ({"path": str(d / "folder")}, {}),
        "chosen_split": ({"path": str(d / "dict"), "split": "test"}, {}),
    }


FORMS = [
    "sharegpt_jsonl",
    "openai_messages",
    "guide_text_spans",
    "plain_text",
    "csv_text_spans",
    "parquet",
    "save_to_disk",
    "folder_of_files",
    "chosen_split",
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, rows, tokenizer):
    return _inputs(tmp_path_factory.mktemp("one_path"), rows, tokenizer)


def _check_same(cfg, tokenizer, skipped):
    """Prepare ``cfg``; every row's preview documents == the documents prepare wrote, in order."""
    summary = prepare(cfg, progress=False)
    ds = TokenDataset(Path(cfg.output_path) / "fast_llm_config_training.yaml")
    reader = RowReader(cfg)
    assert len(reader) == summary["input_rows"]
    d = 0
    for i in range(len(reader)):
        shown = reader.sample(i, tokenizer=tokenizer)
        if i in skipped:
            assert shown.documents == [] and shown.skipped.startswith(skipped[i]), (i, shown.problems)
            continue
        assert shown.skipped is None and shown.documents, (i, shown.problems)
        for ids, trained in shown.documents:
            want_ids, want_trained = ds.document(d)
            assert np.array_equal(ids, want_ids.astype(np.int64)), (i, d)
            assert np.array_equal(trained, want_trained), (i, d)
            d += 1
    assert d == len(ds) == summary["num_documents"]
    assert sum(summary["skipped"].values()) == len(skipped)
    return reader


@pytest.mark.parametrize("form", FORMS)
def test_preview_equals_prepared_documents(form, inputs, tokenizer, tmp_path):
    dataset, skipped = inputs[form]
    cfg = load_prepare_config(
        {
            "output_path": str(tmp_path / "out"),
            "dataset": dataset,
            "tokenizer": {"path": str(TINY_MODEL)},
            "splits": {"training": 1.0},
        }
    )
    reader = _check_same(cfg, tokenizer, skipped)
    if form == "plain_text":  # every token trained, and said so
        assert reader.form == "text" and reader.sample(0, tokenizer=tokenizer).documents[0][1].all()
    if form == "guide_text_spans":  # the repaired row is written, its repairs reported (not skipped)
        codes = {c for c, _, skip in reader.sample(5, tokenizer=tokenizer).problems if not skip}
        assert codes >= {"spans_merged", "spans_clipped"}
    if form == "chosen_split":  # the test split, not train: 7 rows
        assert len(reader) == N - 3


def test_split_turns_row_gives_its_pieces(inputs, tokenizer, tmp_path):
    """long_documents split_turns: one long row becomes several documents, shown as prepare writes them."""
    dataset, skipped = inputs["sharegpt_jsonl"]
    cfg = load_prepare_config(
        {
            "output_path": str(tmp_path / "out"),
            "dataset": dataset,
            "tokenizer": {"path": str(TINY_MODEL)},
            "splits": {"training": 1.0},
            "long_documents": {"mode": "split_turns", "sequence_length": 128},
        }
    )
    reader = _check_same(cfg, tokenizer, skipped)
    assert any(len(reader.sample(i, tokenizer=tokenizer).documents) > 1 for i in range(len(reader)))


def test_prepared_sample_is_row_of_a_split(inputs, tokenizer, tmp_path):
    """With several splits, row i is the next document of the split `split_assignment` gives it."""
    from backend.prepare import split_assignment

    dataset, _ = inputs["parquet"]
    cfg = load_prepare_config(
        {
            "output_path": str(tmp_path / "out"),
            "dataset": dataset,
            "tokenizer": {"path": str(TINY_MODEL)},
            "splits": {"training": 0.7, "validation": 0.3},
        }
    )
    prepare(cfg, progress=False)
    names = list(cfg.splits)
    ds = {n: TokenDataset(Path(cfg.output_path) / f"fast_llm_config_{n}.yaml") for n in names}
    seen = dict.fromkeys(names, 0)
    for i, k in enumerate(split_assignment(N, cfg.splits, cfg.seed).tolist()):
        ids, trained = prepared_sample(cfg, i, tokenizer).documents[0]
        want_ids, want_trained = ds[names[k]].document(seen[names[k]])
        seen[names[k]] += 1
        assert np.array_equal(ids, want_ids.astype(np.int64)) and np.array_equal(trained, want_trained)


@pytest.mark.parametrize(
    "form,settings",
    [
        ("guide_text_spans", {}),  # a text + loss_masking_spans file: the studio sets dataset.loss_masking_spans
        ("sharegpt_jsonl", {"train_on": "last", "train_on_eot": False}),
        (
            "openai_messages",
            {"mode": "delimiters", "start": "<|start_header_id|>assistant<|end_header_id|>\\n\\n", "end": "<|eot_id|>"},
        ),
    ],
)
def test_studio_preview_is_what_prepare_of_the_studio_yaml_writes(form, settings, inputs, tmp_path):
    """The Data tab end to end: the prepare YAML the studio writes for its settings, prepared, holds for each row
    the tokens the preview drew, and the preview's trained characters are those of the prepared trained tokens."""
    import yaml

    from studio import handlers as H

    s = H.DataSettings(inputs[form][0]["path"], str(TINY_MODEL), **settings)
    text, status = H.prepare_yaml_from("", s)
    assert status.startswith("✓"), status
    raw = {**yaml.safe_load(text), "output_path": str(tmp_path / "out"), "splits": {"training": 1.0}}
    prepare(load_prepare_config(raw), progress=False)
    ds = TokenDataset(tmp_path / "out" / "fast_llm_config_training.yaml")
    d = 0
    for i in range(N):
        shown = H.preview_sample(s, i)
        _, _, prepared, _ = H.prepared_row(s, i)
        if prepared.skipped:
            assert "prepare skips this row" in shown.status + shown.summary, i
            continue
        ids, trained = ds.document(d)
        d += 1
        tok = prepared.tokenized
        assert np.array_equal(tok.input_ids, ids.astype(np.int64)) and np.array_equal(tok.trained, trained), i
        chars = H.char_labels(len(shown.text), tok.offsets, trained)
        assert [(a, b) for a, b, v in H.runs_of(chars) if v] == shown.trained_chars, i
    assert d == len(ds)


def test_a_form_in_the_table_may_make_several_documents_of_a_row(tmp_path, tokenizer, monkeypatch):
    """`documents.FORMS` is the one place rows become documents: a form returning two documents per row (as a
    preference pair does) gets both written for that row, in order; `SkipRow` skips a row with its reason."""
    from backend import documents

    def twice(row, state):
        if row["text"] == "skip me":
            raise documents.SkipRow("empty_text", "told to")
        return [documents.Document(row["text"], [(0, 3)]), documents.Document(row["text"].upper(), [(0, 2)])]

    monkeypatch.setitem(documents.FORMS, "text", twice)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ("abc def", "skip me", "xyz")))
    cfg = load_prepare_config(
        {
            "output_path": str(tmp_path / "out"),
            "dataset": {"path": str(tmp_path / "d.jsonl")},
            "tokenizer": {"path": str(TINY_MODEL)},
        }
    )
    reader = RowReader(cfg)
    first, skipped, last = list(reader.samples([0, 1, 2], cfg, tokenizer))
    assert [tokenizer.decode(ids.tolist(), skip_special_tokens=True) for ids, _ in first.documents] == [
        "abc def",
        "ABC DEF",
    ]
    assert all(trained.any() for _, trained in first.documents)
    assert skipped.skipped == "empty_text: told to" and len(last.documents) == 2


def test_plain_text_trains_every_token_from_the_first_character(tokenizer, tmp_path):
    """The text form trains the whole text: a text whose first token is one character trains it too."""
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("A b c.", "I am.", "x")))
    cfg = load_prepare_config(
        {"output_path": str(tmp_path / "out"), "dataset": {"path": str(path)}, "tokenizer": {"path": str(TINY_MODEL)}}
    )
    for row in RowReader(cfg).samples(range(3), cfg, tokenizer):
        ((ids, trained),) = row.documents
        first = int(ids[0] == tokenizer.bos_token_id)  # the BOS the tokenizer adds is not text
        assert trained[first:].all() and len(tokenizer.decode(ids[first : first + 1])) == 1


def test_the_reader_names_each_rows_line_and_refuses_what_it_cannot_read(rows, tokenizer, tmp_path):
    """`RowReader`: each row names its file and line (what the studio and the dataset check show); a row out of
    range, a config over another dataset, an empty file, a file without the columns of any form and a template that
    cannot compile are refused, each saying so."""
    from backend.config import ConfigError
    from backend.sources import PrepareError

    path = _write_jsonl(tmp_path / "rows.jsonl", rows[:3])
    base = {"output_path": str(tmp_path / "out"), "tokenizer": {"path": str(TINY_MODEL)}}
    cfg = load_prepare_config({**base, "dataset": {"path": str(path)}})
    reader = RowReader(cfg)
    assert [r.where for r in reader.samples([2, 0, 1], cfg, tokenizer)] == [f"{path}:{i}" for i in (3, 1, 2)]
    for i in (3, -1):
        with pytest.raises(IndexError) as e:
            reader.sample(i, cfg, tokenizer)
        assert str(e.value) == f"row {i} of 3"
    other = load_prepare_config({**base, "dataset": {"path": str(_write_jsonl(tmp_path / "other.jsonl", rows[:3]))}})
    with pytest.raises(ValueError) as e:
        reader.sample(0, other, tokenizer)
    assert str(e.value) == "RowReader.sample: cfg.dataset differs from the reader's; open a new RowReader"
    broken = load_prepare_config({**base, "dataset": {"path": str(path)}, "chat": {"template": "{% if %}"}})
    with pytest.raises(ConfigError, match=r"chat\.template: "):
        reader.sample(0, broken, tokenizer)
    empty = _write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(PrepareError) as e:
        RowReader(load_prepare_config({**base, "dataset": {"path": str(empty)}}))
    assert str(e.value) == f"dataset.path: {empty} has no rows"
    other_columns = _write_jsonl(tmp_path / "cols.jsonl", [{"prompt": "a", "answer": "b"}])
    with pytest.raises(ConfigError) as e:
        RowReader(load_prepare_config({**base, "dataset": {"path": str(other_columns)}}))
    assert e.value.problems[0].startswith(f"dataset.field: column 'text' not found in {other_columns}, and no ")
    pairs = _write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Q?", "chosen": "yes", "rejected": "no"}])
    broken = load_prepare_config({**base, "dataset": {"path": str(pairs)}, "chat": {"template": "{% if %}"}})
    with pytest.raises(ConfigError, match=r"chat\.template: "):  # preference pairs are rendered too
        RowReader(broken).sample(0, broken, tokenizer)


def test_pairs_and_tool_schemas_from_a_datasets_source_are_read_like_their_jsonl(tokenizer, tmp_path):
    """A datasets source (save_to_disk, parquet) reads only the columns the form needs: for preference pairs
    those are prompt, chosen and rejected; for conversations, the row's tool schemas too. Both give the documents
    their JSON lines give."""
    tools = [{"type": "function", "function": {"name": "get_time", "description": "the time", "parameters": {}}}]
    forms = {
        "pairs": [{"prompt": f"Q{i}?", "chosen": f"yes {i}", "rejected": f"no {i}", "score": i} for i in range(3)],
        "tools": [
            {
                "messages": [{"role": "user", "content": f"time {i}?"}, {"role": "assistant", "content": f"noon {i}"}],
                "tools": json.dumps(tools),
                "score": i,
            }
            for i in range(3)
        ],
    }
    base = {"output_path": str(tmp_path / "out"), "tokenizer": {"path": str(TINY_MODEL)}}
    for name, rows in forms.items():
        paths = [
            _write_jsonl(tmp_path / f"{name}.jsonl", rows),
            tmp_path / f"{name}_saved",
            tmp_path / f"{name}.parquet",
        ]
        _dataset(rows).save_to_disk(str(paths[1]))
        _dataset(rows).to_parquet(str(paths[2]))
        documents = []
        for path in paths:
            cfg = load_prepare_config({**base, "dataset": {"path": str(path)}})
            read = list(RowReader(cfg).samples(range(len(rows)), cfg, tokenizer))
            assert all(r.skipped is None for r in read), [r.problems for r in read]
            documents.append([[(ids.tolist(), trained.tolist()) for ids, trained in r.documents] for r in read])
        assert documents[1] == documents[0] == documents[2], name
        first = [tokenizer.decode(ids) for ids, _ in documents[0][0]]
        if name == "pairs":  # the chosen and the rejected answer, each a document
            assert len(first) == 2 and "yes 0" in first[0] and "no 0" in first[1]
        else:  # the schemas written by the template, from the row's own column
            assert len(first) == 1 and "get_time" in first[0]
