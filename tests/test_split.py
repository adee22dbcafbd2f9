"""Tests for backend/split.py (long conversations cut at turn boundaries) and prepare's long_documents.mode.

Run: .venv/bin/pytest tests/test_split.py -x -q
"""

import json
from pathlib import Path

import numpy as np
import pytest

from backend import SAMPLE_DATA_OPENAI, TEMPLATE_TOKENIZERS, TINY_MODEL
from backend.chat import Masking, render, tokenize
from backend.split import compare_modes, plan_pieces, split_conversation, turn_groups

pytestmark = pytest.mark.filterwarnings("ignore")

FAMILIES = {
    "llama": TINY_MODEL,
    "chatml": TEMPLATE_TOKENIZERS / "chatml",
    "gemma": TEMPLATE_TOKENIZERS / "gemma",
    "mistral": TEMPLATE_TOKENIZERS / "mistral",
    "phi3": TEMPLATE_TOKENIZERS / "phi3",
    "llama-generation": TEMPLATE_TOKENIZERS / "llama-generation",
}
_tok_cache = {}


def tok(family):
    from transformers import AutoTokenizer

    if family not in _tok_cache:
        _tok_cache[family] = AutoTokenizer.from_pretrained(str(FAMILIES[family]))
    return _tok_cache[family]


def long_conversation(n_rows=12, system=True, start=0):
    """User/assistant exchanges of several sample rows joined into one long conversation."""
    rows = [json.loads(line) for line in open(SAMPLE_DATA_OPENAI)][start : start + n_rows]
    msgs = [{"role": "system", "content": "You are terse and exact."}] if system else []
    for r in rows:
        msgs += [m for m in r["messages"] if m["role"] != "system"]
    return msgs


def full_and_split(family, messages, length, masking=None):
    t = tok(family)
    masking = masking or Masking()
    r = render(messages, t, masking)
    full = tokenize(r.text, r.trained_spans, t)
    return t, r, full, split_conversation(r, full, t, length, masking)


def reply_token_ids(rendered, tokenized, k):
    """Trained token ids inside assistant message k's turn window."""
    t = next(t for t in rendered.turns if t.message_index == k)
    s, e = tokenized.offsets[:, 0], tokenized.offsets[:, 1]
    inside = (s < max(t.end, t.content_end)) & (e > t.begin) & tokenized.trained
    return tokenized.input_ids[inside]


def piece_rendering(t, piece):
    r = render(piece.messages, t, Masking())
    return r, tokenize(r.text, [], t)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pieces_cover_every_reply_once_with_its_question(family):
    messages = long_conversation()
    t, r, full, res = full_and_split(family, messages, 160)
    assert len(full.input_ids) > 160 and len(res.pieces) >= 3
    assert res.truncated_groups == 0 and res.dropped_trained_tokens == 0
    assistants = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    seen = [k for p in res.pieces for k in p.trained_messages]
    assert sorted(seen) == assistants and len(seen) == len(set(seen))  # every reply trained exactly once
    assert sum(int(p.trained.sum()) for p in res.pieces) == full.n_trained
    for p in res.pieces:
        assert len(p.input_ids) <= 160
        pr, ptok = piece_rendering(t, p)
        assert pr.text == p.text and np.array_equal(ptok.input_ids, p.input_ids)
        # no invented text: the piece is the template applied to its own messages
        assert p.text == t.apply_chat_template(p.messages, tokenize=False)
        n_sys, groups = turn_groups(messages)
        stop = p.trained_messages[-1] + 1  # a piece ends with the last reply it trains
        first = stop - (len(p.messages) - n_sys)  # original index of the piece's first message after the system
        assert p.messages == messages[:n_sys] + messages[first:stop] and first in {a for a, _ in groups}
        trained_windows = []
        for turn in pr.turns:
            k = turn.message_index - n_sys + first
            if k in p.trained_messages:
                trained_windows.append((turn.begin, max(turn.end, turn.content_end)))
                # its own question is in the piece, right before the reply
                assert messages[k - 1]["role"] == "user" and k - 1 >= first
                assert p.text.find(messages[k - 1]["content"]) < turn.begin
                # the reply is trained exactly as in the whole conversation
                piece_tok = type(full)(p.input_ids, p.trained, ptok.offsets)
                assert np.array_equal(reply_token_ids(pr, piece_tok, turn.message_index), reply_token_ids(r, full, k))
        # as much context as fits: one more group before the piece would not fit
        first_trained_group = max(a for a, _ in groups if a <= min(p.trained_messages))
        assert p.context_messages == first_trained_group - first
        if first > groups[0][0]:
            before = max(a for a, _ in groups if a < first)
            more = render(messages[:n_sys] + messages[before:stop], t, Masking())
            assert len(tokenize(more.text, [], t).input_ids) > 160
        # context tokens (and everything outside the trained replies' turns) are never targets
        starts, ends = ptok.offsets[:, 0], ptok.offsets[:, 1]
        in_trained = np.zeros(len(starts), bool)
        for b, e in trained_windows:  # chat's token rule: a token is trained iff it overlaps a trained range
            in_trained |= (starts < e) & (ends > b)
        assert not (p.trained & ~in_trained).any()
        assert p.trained.any()
    # every piece starts with the system prompt
    assert all(p.messages[0] == messages[0] for p in res.pieces)


def test_a_group_too_long_alone_is_truncated_and_counted():
    messages = long_conversation(4)
    messages[4] = {"role": "assistant", "content": " ".join(["a long reply"] * 200)}
    t, r, full, res = full_and_split("llama", messages, 120)
    assert res.truncated_groups == 1
    assert all(len(p.input_ids) <= 120 for p in res.pieces)
    cut = [p for p in res.pieces if p.truncated_tokens]
    assert len(cut) == 1 and cut[0].trained_messages == [4] and len(cut[0].input_ids) == 120
    assert cut[0].dropped_trained > 0
    assert sum(int(p.trained.sum()) for p in res.pieces) + res.dropped_trained_tokens == full.n_trained
    # the other replies are whole and trained once
    seen = [k for p in res.pieces for k in p.trained_messages]
    assert sorted(seen) == [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    # two such groups: both cut, both counted
    messages[2] = messages[4]
    t, r, full, res = full_and_split("llama", messages, 120)
    assert res.truncated_groups == 2 == len([p for p in res.pieces if p.truncated_tokens])
    assert sum(int(p.trained.sum()) for p in res.pieces) + res.dropped_trained_tokens == full.n_trained


def test_train_on_last_gives_one_piece_with_context():
    messages = long_conversation()
    t, r, full, res = full_and_split("llama", messages, 160, Masking(train_on="last"))
    assert len(res.pieces) == 1
    p = res.pieces[0]
    assert p.trained_messages == [len(messages) - 1] and p.context_messages > 0
    assert int(p.trained.sum()) == full.n_trained and len(p.input_ids) <= 160


def test_train_on_last_plans_its_piece_with_the_runs_template():
    """Under train_on 'last' the conversation is rendered again to find every turn (the plan's token costs), with
    the run's template: one far shorter than the tokenizer's own still gets all the context that fits, so one more
    group before the piece would not fit."""
    t = tok("llama")
    short = "{% for m in messages %}{{ m.role[0] }}:{{ m.content }}\n{% endfor %}"
    short += "{% if add_generation_prompt %}a:{% endif %}"
    messages, masking = long_conversation(), Masking(train_on="last")
    r = render(messages, t, masking, short)
    full = tokenize(r.text, r.trained_spans, t)
    assert len(full.input_ids) < 0.7 * len(tokenize(render(messages, t).text, [], t).input_ids)
    (p,) = split_conversation(r, full, t, 160, masking, short).pieces
    assert p.trained_messages == [len(messages) - 1] and len(p.input_ids) <= 160
    n_sys, groups = turn_groups(messages)
    first = len(messages) - (len(p.messages) - n_sys)
    before = max(a for a, _ in groups if a < first)
    assert len(tokenize(render(messages[:n_sys] + messages[before:], t, masking, short).text, [], t).input_ids) > 160


def _assert_pieces_train_what_the_whole_trains(messages, full, res, length):
    """Every piece fits, every reply is trained in one piece, and the pieces' trained tokens, in order, are the
    whole conversation's trained tokens."""
    assert res.pieces and all(len(p.input_ids) <= length and p.trained.any() for p in res.pieces)
    seen = [k for p in res.pieces for k in p.trained_messages]
    assert sorted(seen) == [k for k, m in enumerate(messages) if m["role"] == "assistant"] and len(set(seen)) == len(
        seen
    )
    trained_ids = np.concatenate([p.input_ids[p.trained] for p in res.pieces])
    np.testing.assert_array_equal(trained_ids, full.input_ids[full.trained])


@pytest.mark.parametrize(
    "masking",
    [
        Masking(train_on_eot=False),
        Masking(
            mode="delimiters",
            start_delimiter="<|start_header_id|>assistant<|end_header_id|>\n\n",
            end_delimiter="<|eot_id|>",
        ),
    ],
    ids=["no-eot", "delimiters"],
)
def test_pieces_are_masked_as_the_run_says(masking):
    """The pieces are rendered with the run's masking (train_on_eot, delimiter mode), not the default's."""
    messages = long_conversation()
    t, r, full, res = full_and_split("llama", messages, 160, masking)
    assert len(res.pieces) >= 3 and res.truncated_groups == 0
    _assert_pieces_train_what_the_whole_trains(messages, full, res, 160)


def test_a_conversation_that_opens_with_the_assistant_is_split_with_its_greeting_trained():
    """A greeting before the first question is a group of its own whose reply is its first message: it is trained
    in one piece like every other reply."""
    messages = long_conversation()
    messages = messages[:1] + [{"role": "assistant", "content": "Hello! Ask me anything."}] + messages[1:]
    t, r, full, res = full_and_split("llama", messages, 160)
    assert len(res.pieces) >= 3 and res.truncated_groups == 0
    _assert_pieces_train_what_the_whole_trains(messages, full, res, 160)
    assert res.pieces[0].trained_messages[0] == 1


@pytest.mark.parametrize("final_eot", ["leave", "append"])
def test_the_piece_that_ends_the_conversation_treats_its_open_final_reply_as_the_run_says(final_eot):
    """A template that leaves the final reply open (vLLM's ChatML): chat.final_eot decides for the whole
    conversation's last reply, so for the piece that ends with it too; every other piece's last reply gets the
    marker the conversation has after it."""
    t = tok("chatml")
    template = (Path(__file__).parent / "data" / "chat_templates" / "chatml-vllm.jinja").read_text()
    messages, masking = long_conversation(), Masking(final_eot=final_eot)
    r = render(messages, t, masking, template)
    full = tokenize(r.text, r.trained_spans, t)
    res = split_conversation(r, full, t, 200, masking, template)
    assert len(res.pieces) >= 2 and res.truncated_groups == 0
    _assert_pieces_train_what_the_whole_trains(messages, full, res, 200)
    assert res.pieces[-1].text.endswith("<|im_end|>") == (final_eot == "append")


def test_pieces_fit_and_train_each_reply_once_when_the_plan_overshoots(monkeypatch):
    """Each planned piece is built and shrunk until it fits (context first, then its last trained groups, which
    move to the next piece): with a plan that always asks for the whole conversation the pieces still fit and
    train every reply once."""
    import backend.split as S

    monkeypatch.setattr(S, "_plan_one", lambda i, head, costs, targets, length: (0, max(targets)))
    messages = long_conversation()
    t, r, full, res = full_and_split("llama", messages, 160)
    assert len(res.pieces) >= 3 and res.truncated_groups == 0
    _assert_pieces_train_what_the_whole_trains(messages, full, res, 160)


def test_a_piece_shrunk_from_an_overshooting_plan_keeps_every_target_that_fits(monkeypatch):
    """The shrink loop on its own (a plan that asks for the whole conversation each time), with trained replies
    that skip groups (`targets`, as an every_turn document passes them): each piece drops its last trained groups
    one at a time until it fits, so it keeps every target group that fits and trains each target once; a piece
    exactly as long as the limit fits (split at its own length, the first piece is the same)."""
    import backend.split as S

    monkeypatch.setattr(S, "_plan_one", lambda i, head, costs, targets, length: (0, max(targets)))
    t = tok("llama")
    messages = long_conversation()
    r = render(messages, t, Masking())
    full = tokenize(r.text, r.trained_spans, t)
    n_sys, groups = turn_groups(messages)
    assistants = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    targets = [k for n, k in enumerate(assistants) if n % 3 != 2]  # two replies of three: targets, some adjacent
    res = split_conversation(r, full, t, 160, Masking(), targets=targets)
    assert sorted(k for p in res.pieces for k in p.trained_messages) == targets and res.truncated_groups == 0
    assert len(res.pieces) > 1 and all(len(p.input_ids) <= 160 for p in res.pieces)
    group_of = {k: g for g, (a, b) in enumerate(groups) for k in range(a, b)}
    for p, after in zip(res.pieces, res.pieces[1:], strict=False):
        assert len(p.input_ids) <= 160
        first = group_of[min(p.trained_messages)]
        assert p.messages == messages[:n_sys] + messages[groups[first][0] : p.trained_messages[-1] + 1]
        longer = messages[:n_sys] + messages[groups[first][0] : after.trained_messages[0] + 1]
        assert len(tokenize(render(longer, t).text, [], t).input_ids) > 160  # the next target did not fit
    exact = len(res.pieces[0].input_ids)
    again = split_conversation(r, full, t, exact, Masking(), targets=targets).pieces[0]
    assert again.messages == res.pieces[0].messages and np.array_equal(again.input_ids, res.pieces[0].input_ids)


def test_turn_groups_and_plan_pieces_properties():
    n_sys, groups = turn_groups(long_conversation(3))
    assert n_sys == 1 and groups[0][0] == 1 and groups[-1][1] == len(long_conversation(3))
    rng = np.random.default_rng(0)
    for _ in range(300):
        costs = rng.integers(1, 60, size=rng.integers(1, 12)).tolist()
        head, L = int(rng.integers(0, 20)), int(rng.integers(40, 160))
        targets = set(np.flatnonzero(rng.random(len(costs)) < 0.8).tolist()) or {len(costs) - 1}
        plan = plan_pieces(head, costs, L, targets)
        trained = [g for c, i, j in plan for g in range(i, j + 1) if g in targets]
        assert trained == sorted(targets)  # every target group exactly once, in order
        for n, (c, i, j) in enumerate(plan):
            assert 0 <= c <= i <= j and i in targets and j in targets
            size = head + sum(costs[c : j + 1])
            assert size <= L or (c == i == j and head + costs[i] > L)
            if c > 0 and size <= L:  # as much context as fits
                assert size + costs[c - 1] > L
            if n + 1 < len(plan):  # as many trained groups as fit: the next piece's first would not have
                assert head + sum(costs[i : plan[n + 1][1] + 1]) > L


def test_turn_groups_cut_exactly_before_each_user_message_that_follows_a_reply():
    """On random role sequences: the leading system messages are counted, the groups cover every other message in
    order, none is empty, and a group starts at message k > first exactly when k is a user message right after an
    assistant one (a greeting, tool turns and consecutive user messages stay in their group)."""
    rng = np.random.default_rng(3)
    for _ in range(500):
        n_sys = int(rng.integers(0, 3))
        roles = ["system"] * n_sys + rng.choice(["user", "assistant", "tool"], int(rng.integers(0, 9))).tolist()
        got_sys, groups = turn_groups([{"role": r} for r in roles])
        assert got_sys == n_sys
        covered = [k for a, b in groups for k in range(a, b)]
        assert covered == list(range(n_sys, len(roles))) and all(a < b for a, b in groups)
        starts = {a for a, _ in groups}
        for k in range(n_sys + 1, len(roles)):
            assert (k in starts) == (roles[k] == "user" and roles[k - 1] == "assistant"), (roles, groups)


def test_compare_modes_counts():
    docs = [(100, 40, 0, None), (300, 120, 70, [(150, 60), (180, 60)])]
    m = compare_modes(docs, 200)
    assert m["skip"]["trained"] == 40 and m["truncate"]["trained"] == 160
    assert m["truncate"]["trained_after_cut"] == 70 and m["split_turns"]["trained"] == 160
    assert m["split_turns"]["documents"] == 3 and m["split_turns"]["trained_share"] == 1.0


def test_compare_modes_whole_result_by_hand():
    """Every count, worked out by hand: documents that fit (counted by the caller, and one of exactly L tokens), a
    long one split in two pieces, a long one that no turn boundary splits (no pieces)."""
    docs = [(100, 40, 0, None), (200, 50, 0, None), (300, 120, 70, [(150, 60), (180, 60)]), (500, 30, 20, [])]
    assert compare_modes(docs, 200, fitting=(5, 400, 90)) == {
        "sequence_length": 200,
        "all": {"documents": 9, "tokens": 1500, "trained": 330},
        "skip": {"documents": 7, "tokens": 700, "trained": 180, "trained_share": 180 / 330},
        "truncate": {"documents": 9, "tokens": 1500, "trained": 330, "trained_after_cut": 90, "trained_share": 1.0},
        "split_turns": {
            "documents": 9,
            "tokens": 1030,
            "trained": 300,
            "long_documents": 2,
            "trained_share": 300 / 330,
        },
    }
    empty = compare_modes([], 64)
    assert empty["all"] == {"documents": 0, "tokens": 0, "trained": 0}
    assert [empty[k]["trained_share"] for k in ("skip", "truncate", "split_turns")] == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError):  # the caller's fitting counts are (documents, tokens, trained)
        compare_modes(docs, 200, fitting=(5, 400))


@pytest.mark.parametrize(
    "chat",
    [{}, {"train_on": "last"}, {"template": "chatml"}],
    ids=["default", "train-on-last", "chatml-template"],
)
def test_prepare_split_turns_end_to_end(tmp_path, chat):
    """The pieces are made with the run's own chat settings: the same trained tokens as the unsplit run (minus the
    counted tails), under train_on: last too, and written by the configured template."""
    from backend.config import load_prepare_config
    from backend.dataset import TokenDataset, descriptor_name
    from backend.prepare import prepare

    L = 100
    if chat.get("template") == "chatml":
        chat = {"template": str(TEMPLATE_TOKENIZERS / "chatml" / "chat_template.jinja")}
    base = {
        "dataset": {"path": str(SAMPLE_DATA_OPENAI)},
        "tokenizer": {"path": str(TINY_MODEL)},
        "splits": {"training": 0.9, "validation": 0.1},
        "report": {"sequence_length": L},
        "chat": chat,
    }
    kept = {"output_path": str(tmp_path / "keep"), "long_documents": {"mode": "keep", "sequence_length": L}}
    keep = prepare(load_prepare_config({**base, **kept}), progress=False)  # the length is read by split_turns only
    cfg = {
        **base,
        "output_path": str(tmp_path / "split"),
        "long_documents": {"mode": "split_turns", "sequence_length": L},
    }
    s = prepare(load_prepare_config(cfg), progress=False)
    ld = s["long_documents"]
    assert keep["longer_than_sequence_length"]["documents"] > 100  # the case matters on this data
    assert ld["conversations_split"] > 0
    if chat.get("train_on") == "last":  # one piece: the last reply with as much context as fits
        assert ld["pieces"] == ld["conversations_split"]
    else:
        assert ld["pieces"] > ld["conversations_split"]
    assert s["input_rows"] == s["written"] + s["skipped_rows"] == keep["written"]
    assert s["num_documents"] == keep["num_documents"] + ld["pieces"] - ld["conversations_split"]
    # every trained token is kept, except the counted tails of groups too long alone
    assert s["num_trained_tokens"] + ld["dropped_trained_tokens"] == keep["num_trained_tokens"]
    report = json.loads((tmp_path / "split" / "prepare_report.json").read_text())["summary"]
    assert report["long_documents"] == ld
    longer = sum(int((TokenDataset(tmp_path / "split" / descriptor_name(n)).lengths > L).sum()) for n in base["splits"])
    assert longer == s["longer_than_sequence_length"]["documents"] == ld["not_split"]
    tokenizer = tok("llama")  # TINY_MODEL's, loaded once for the module
    if "template" in chat:  # every document, piece or whole, is in the configured template's own words
        ds = TokenDataset(tmp_path / "split" / descriptor_name("training"))
        texts = [tokenizer.decode(ds.document(i)[0]) for i in range(len(ds))]
        assert all("<|im_start|>" in x and "<|start_header_id|>" not in x for x in texts)
    # the studio's comparison of the modes (long_document_stats per row, with the run's chat settings, then
    # compare_modes) foretells what prepare's split_turns writes and what keeping every document trains
    from backend.split import long_document_stats

    masking = Masking(train_on=chat.get("train_on", "all"))
    docs = []
    for line in SAMPLE_DATA_OPENAI.read_text().splitlines():
        r = render(json.loads(line)["messages"], tokenizer, masking, chat.get("template"))
        t = tokenize(r.text, r.trained_spans, tokenizer)
        docs.append(long_document_stats(r, t, tokenizer, L, masking, chat.get("template")))
    m = compare_modes(docs, L)
    assert m["all"]["documents"] == keep["num_documents"] and m["all"]["trained"] == keep["num_trained_tokens"]
    # truncate: the trained tokens past each long document's first L, read back from what prepare wrote
    kept = [TokenDataset(tmp_path / "keep" / descriptor_name(n)) for n in base["splits"]]
    after_cut = sum(int(k.document(i)[1][L:].sum()) for k in kept for i in np.flatnonzero(k.lengths > L))
    assert m["truncate"]["trained_after_cut"] == after_cut > 0
    assert m["split_turns"]["long_documents"] == ld["conversations_split"] + ld["not_split"]
    assert m["split_turns"]["documents"] == s["num_documents"] - ld["not_split"]
    assert m["split_turns"]["trained"] == s["num_trained_tokens"] - sum(
        d[1] for d in docs if d[0] > L and not d[3]
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ studio
def _studio_settings():
    from backend import SAMPLE_DATA
    from studio import handlers as H

    return H.DataSettings(str(SAMPLE_DATA), str(TINY_MODEL))


def test_studio_check_compares_the_three_choices():
    from studio import handlers as H

    r = H.check_whole_dataset(_studio_settings(), 100, False, 300)
    assert not r.status
    line = {k: ln for ln in r.summary.splitlines() for k in ("skip (", "truncate (", "split_turns (") if k in ln}
    assert len(line) == 3
    trained = r.report["trained_tokens"]
    assert f"{trained:,} trained (100.0%)" in line["split_turns ("] and f"{trained:,} trained" in line["truncate ("]
    assert "(100.0%)" not in line["skip ("]  # skipping loses trained tokens on this data at 100


def test_studio_preview_shows_where_a_long_sample_is_cut():
    from studio import handlers as H

    p = H.preview_sample(_studio_settings(), 27, 100)
    assert not p.status and "✂" in p.summary and "cuts at token 100" in p.summary
    t = tok("llama")
    rows = [json.loads(line) for line in open(_studio_settings().dataset)]
    r = render(rows[27], t)
    res = split_conversation(r, tokenize(r.text, r.trained_spans, t), t, 100)
    assert f"**{len(res.pieces)} pieces**" in p.summary
    short = H.preview_sample(_studio_settings(), 27, 4096)
    assert "✂" not in short.summary


def test_studio_packing_shows_split_pieces_with_context_masked():
    from studio import handlers as H

    info: list = []
    docs = H.tokenize_documents(_studio_settings(), 60, 100, info)
    assert info and all(len(d[0]) <= 100 for d in docs)
    row, n_tok, piece_docs = info[0]
    assert n_tok > 100 and len(piece_docs) >= 2
    for d in piece_docs[1:]:  # a later piece: its system prompt / context is masked, its reply trained
        ids, trained = docs[d]
        assert trained.any() and not trained[: int(np.argmax(trained))].any()
    v = H.packing_view(_studio_settings(), 100, 1, "best_fit", False, False, 60, 0, split_turns=True)
    assert not v.status and v.stats["documents_skipped"] == 0 and "split_turns" in v.summary
    plain = H.packing_view(_studio_settings(), 100, 1, "best_fit", False, False, 60, 0)
    assert plain.stats["documents_skipped"] > 0


def test_prepare_reports_truncated_and_unsplittable_rows(tmp_path, capsys):
    from backend.config import load_prepare_config
    from backend.prepare import prepare

    base = long_conversation(6, system=False)
    huge_reply = long_conversation(2, system=False) + [
        {"role": "user", "content": "Tell me everything."},
        {"role": "assistant", "content": " ".join(["and then more"] * 120)},
    ]
    huge_question = [{"role": "user", "content": " ".join(["why"] * 300)}, {"role": "assistant", "content": "Yes."}]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in (base, huge_reply, huge_question)))
    L = 120
    cfg = {
        "output_path": str(tmp_path / "out"),
        "dataset": {"path": str(data)},
        "tokenizer": {"path": str(TINY_MODEL)},
        "splits": {"training": 1.0},
        "report": {"sequence_length": L},
        "long_documents": {"mode": "split_turns", "sequence_length": L},
    }
    s = prepare(load_prepare_config(cfg), progress=False)
    ld = s["long_documents"]
    assert ld["truncated_groups"] == 1 and ld["dropped_trained_tokens"] > 0
    assert ld["not_split"] == 1  # the question alone is longer than L: nothing to train in a piece, kept whole
    assert s["warnings"]["reply_truncated"] == 1 and s["warnings"]["not_split"] == 1
    assert s["written"] == 3 and s["num_documents"] == 1 + ld["pieces"]
    out = capsys.readouterr().out
    assert f"split_turns at {L}: {ld['conversations_split']} conversations" in out and "reply_truncated" in out


def test_split_documents_edges_exact_fit_rejected_pieces_and_context_count():
    """`split_documents` (prepare's chunk step): a conversation of exactly the sequence length is left alone; one
    whose pieces the template rejects is kept whole with a `not_split` problem naming why; the report's context
    tokens are the masked tokens before each later piece's first trained one."""
    from backend.split import split_documents

    t = tok("llama")
    messages = long_conversation(6)
    messages[1] = {**messages[1], "content": "zqfirst " + messages[1]["content"]}
    # a template that accepts every prefix of the conversation but no piece (which opens with a later question)
    picky = "{% if 'zqfirst' not in messages[1].content %}{{ raise_exception('whole only') }}{% endif %}"
    picky += t.chat_template

    def run(length, template=None, conversations=(messages,)):
        rs = [render(m, t, Masking(), template) for m in conversations]
        fulls = [tokenize(r.text, r.trained_spans, t) for r in rs]
        ids, trained = (np.concatenate([getattr(f, k) for f in fulls]) for k in ("input_ids", "trained"))
        bounds = np.cumsum([0] + [len(f.input_ids) for f in fulls])
        rows = np.arange(7, 7 + len(rs))
        out = split_documents(rows, ids, trained, bounds, rs, lambda j: fulls[j], t, Masking(), template, length)
        return fulls[0], out

    # beside a longer conversation (so the chunk is split at all), one of exactly the sequence length is left alone
    exact = len(tokenize(render(messages, t).text, [], t).input_ids)
    full, (rows, ids, trained, bounds, stats, problems) = run(exact, conversations=(messages, long_conversation(8)))
    assert problems == [] and stats["conversations_split"] == 1 and stats["not_split"] == 0
    assert rows[0] == 7 and np.array_equal(ids[: bounds[1]], full.input_ids) and bounds[1] == exact
    assert set(rows[1:].tolist()) == {8}

    length = len(full.input_ids) // 3
    _, (rows, ids, trained, bounds, stats, problems) = run(length, picky)
    assert stats["not_split"] == 1 and stats["conversations_split"] == 0 and len(rows) == 1
    assert [p[:2] for p in problems] == [(7, "not_split")] and "whole only" in problems[0][2]
    assert problems[0][3] is False  # a warning: the row is written whole, not skipped

    # two long conversations: the counts add up over the chunk
    _, (rows, ids, trained, bounds, stats, problems) = run(length, conversations=(messages, long_conversation(9)))
    assert stats["conversations_split"] == 2 and stats["pieces"] == len(rows) > 4 and set(rows.tolist()) == {7, 8}
    later = [trained[bounds[d] : bounds[d + 1]] for d in range(1, len(rows)) if rows[d] == rows[d - 1]]
    assert stats["context_tokens"] == sum(int(np.argmax(m)) for m in later) > 0
    assert ids.dtype == full.input_ids.dtype and rows.dtype == bounds.dtype == np.int64

    # nothing longer than the sequence length: the chunk as it came, every count zero
    _, (rows, ids, trained, bounds, stats, problems) = run(exact)
    assert problems == [] and rows.tolist() == [7] and np.array_equal(ids, full.input_ids)
    counts = ("conversations_split", "documents_split", "pieces", "context_tokens", "truncated_groups")
    assert stats == dict.fromkeys((*counts, "dropped_trained_tokens", "not_split"), 0)

    # a question alone longer than the length (no piece keeps a trained token): kept whole, saying so; replies
    # alone longer than it, in two conversations: each cut, and the cuts add up
    question = [{"role": "user", "content": " ".join(["why"] * 300)}, {"role": "assistant", "content": "Yes."}]
    huge = [{"role": "user", "content": "Tell me everything."}, {"role": "assistant", "content": "and more " * 150}]
    again = [{"role": "user", "content": "All of it."}, huge[1]]
    _, (rows, ids, trained, bounds, stats, problems) = run(120, conversations=(question, huge, again))
    assert (stats["not_split"], stats["conversations_split"], stats["truncated_groups"]) == (1, 2, 2)
    assert problems[0] == (7, "not_split", "no piece keeps a trained token: kept whole", False)
    assert [p[:2] for p in problems[1:]] == [(8, "reply_truncated"), (9, "reply_truncated")]
