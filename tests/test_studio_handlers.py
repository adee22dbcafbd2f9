"""Studio handlers without a browser: what the preview highlights, config form <-> YAML, packing view, jobs.

.venv/bin/pytest tests/test_studio_handlers.py -x -q            (the job test is marked slow; it still runs)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from backend import ROOT, SAMPLE_DATA, TINY_MODEL
from studio import handlers as H
from studio.bindings import TRAIN_FIELDS

DATA, TOK = str(SAMPLE_DATA), str(TINY_MODEL)
USER_START = "<|start_header_id|>user<|end_header_id|>\\n\\n"  # typed form: '\n' means newline
ASSISTANT_START = "<|start_header_id|>assistant<|end_header_id|>\\n\\n"


def preview(index=0, mode="auto", start="", end="", train_on="all", eot=True, template="", seq=None):
    return H.preview_sample(H.DataSettings(DATA, TOK, mode, start, end, train_on, eot, template), index, seq)


def trained_char_set(p: H.Preview) -> set[int]:
    return {c for a, b in p.trained_chars for c in range(a, b)}


# ------------------------------------------------------------------------------------------------ imports / CLI


def test_importing_the_studio_does_not_import_torch():
    code = (
        "import sys, studio.app, studio.jobs, studio.handlers, studio.plots, studio.bindings, studio.__main__; "
        "assert 'torch' not in sys.modules, 'torch was imported'; "
        "assert 'transformers' not in sys.modules, 'transformers was imported'"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("args", [["--host", "0.0.0.0"], ["--share"], ["--host", "192.168.1.5", "--share"]])
def test_exposed_studio_refuses_to_start_without_auth(args):
    env = {k: v for k, v in os.environ.items() if k != "SFT_STUDIO_AUTH"}
    r = subprocess.run(
        [sys.executable, "-m", "studio", *args], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env
    )
    assert r.returncode == 2
    assert "refusing to start" in r.stderr and "--auth" in r.stderr and "SFT_STUDIO_AUTH" in r.stderr


def test_exposure_rules():
    from studio.__main__ import check_exposure, parse_auth

    assert check_exposure("127.0.0.1", False, None) is None
    assert check_exposure("localhost", False, None) is None
    assert "0.0.0.0" in check_exposure("0.0.0.0", False, None)
    assert check_exposure("0.0.0.0", True, ("u", "p")) is None
    assert parse_auth("alice:s3:cret") == ("alice", "s3:cret")
    for bad in ("alice", ":pw", "alice:"):
        with pytest.raises(ValueError):
            parse_auth(bad)


def test_bad_auth_value_exits_2():
    r = subprocess.run(
        [sys.executable, "-m", "studio", "--auth", "nopassword"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2 and "user:password" in r.stderr


# ------------------------------------------------------------------------------------------------ data preview


def test_preview_highlights_exactly_the_trained_tokens_of_render():
    from backend.chat import Masking, render, tokenize

    tok = H.get_tokenizer(TOK)
    rows = H.get_rows(DATA)
    for i in (0, 1, 7):
        p = preview(i)
        assert p.status == ""
        r = render(rows[i], tok, Masking())
        t = tokenize(r.text, r.trained_spans, tok)
        # the highlight is the whole rendered text, in order, nothing added or lost
        assert "".join(s for s, _ in p.highlight) == r.text == p.text
        # highlighted-trained characters = the characters of the tokens tokenize() marks trained
        expected = {c for (a, b), k in zip(t.offsets, t.trained, strict=False) if k for c in range(a, b)}
        assert trained_char_set(p) == expected
        # ... which cover every trained span of render() and nothing from a masked token
        for a, b in r.trained_spans:
            assert set(range(a, b)) <= trained_char_set(p)
        assert f"{int(t.trained.sum())} trained" in p.summary and f"{len(t.input_ids)} tokens" in p.summary
        # the trained text is the assistant replies with their end-of-turn marker
        trained_text = [s for s, lab in p.highlight if lab == H.TRAINED]
        replies = [m["content"] for m in r.messages if m["role"] == "assistant"]
        assert len(trained_text) == len(replies)
        for s, reply in zip(trained_text, replies, strict=False):
            assert reply in s and s.endswith("<|eot_id|>")


def test_changing_delimiters_changes_the_highlight():
    auto = preview(0)
    same = preview(0, "delimiters", ASSISTANT_START, "<|eot_id|>")
    user = preview(0, "delimiters", USER_START, "<|eot_id|>")
    assert same.status == user.status == ""
    assert trained_char_set(same) == trained_char_set(auto)  # the delimiters that match the template
    assert trained_char_set(user) != trained_char_set(auto)
    user_texts = [s for s, lab in user.highlight if lab == H.TRAINED]
    assert any("What is 5 + 37?" in s for s in user_texts)  # now the user turn is what is trained


def test_train_on_last_and_eot_switches():
    all_ = preview(0)
    last = preview(0, train_on="last")
    no_eot = preview(0, eot=False)
    assert len([1 for _, lab in last.highlight if lab == H.TRAINED]) == 1
    assert trained_char_set(last) < trained_char_set(all_)
    assert not any(s.endswith("<|eot_id|>") for s, lab in no_eot.highlight if lab == H.TRAINED)
    assert "eot_not_trained" in no_eot.problems
    assert "`<|eot_id|>` trained in **3 of 3** assistant turns" in all_.summary  # sample 0 has 3 replies
    assert "`<|eot_id|>` trained in **0 of 3** assistant turns" in no_eot.summary


def test_bad_delimiter_or_template_gives_a_problem_message_not_an_exception():
    empty = preview(0, "delimiters", "", "<|eot_id|>")
    assert "start_delimiter" in empty.status and empty.highlight == []
    broken = preview(0, template="{% for m in messages %}{{ m.content }")
    assert "chat.template" in broken.status and "syntax" in broken.status.lower()  # names the config key
    missing = preview(0, "delimiters", "NOT IN THE TEXT", "<|eot_id|>")
    assert missing.status == ""  # a usable sample with a per-sample problem
    assert "span_not_found" in missing.problems and "no_trained_tokens" in missing.problems
    assert trained_char_set(missing) == set()
    bad_path = H.preview_sample(H.DataSettings("no/such/file.jsonl", TOK), 0)
    assert "does not exist" in bad_path.status


def test_edited_template_re_renders():
    own = H.default_template(TOK)
    assert "<|start_header_id|>" in own
    edited = own.replace("Cutting Knowledge Date", "Knowledge cutoff")
    p = preview(0, template=edited)
    assert p.status == "" and "Knowledge cutoff" in p.text and "Cutting Knowledge" not in p.text
    assert trained_char_set(p)  # spans still found with the edited template


def test_sample_navigation_wraps():
    assert H.step_index(0, -1, 10) == 9
    assert H.step_index(9, +1, 10) == 0
    assert 0 <= H.step_index(3, 0, 10) < 10


def test_dataset_check_counts_match_check_dataset_and_tokens_lost():
    from backend.chat import Masking, check_dataset

    r = H.check_whole_dataset(H.DataSettings(DATA, TOK), 100, False, max_rows=200)
    assert r.status == ""
    rows = H.get_rows(DATA)
    idx, sampled = H._sample_indices(len(rows), 200)
    assert sampled and len(idx) == 200
    ref = check_dataset([rows[int(i)] for i in idx], H.get_tokenizer(TOK), Masking(), None, 100)
    assert r.report["trained_tokens"] == ref.n_trained and r.report["tokens"] == ref.n_tokens
    # prepare's per-row problems + the length checks count what a full check_sample of every row counts
    assert {c: p["count"] for c, p in r.report["problems"].items()} == ref.counts
    assert ref.counts.get("too_long")  # the comparison covers the length checks
    lengths = np.asarray(ref.lengths)
    assert f"{int((lengths > 100).sum())} documents holding {int(lengths[lengths > 100].sum())} tokens" in r.summary
    assert "SKIPPED" in r.summary and "even random sample" in r.summary
    # problem examples are rows of the dataset (not positions in the sample) and are offered for jumping
    assert r.problem_rows and set(r.problem_rows) <= {int(i) for i in idx}
    first = r.problem_rows[0]
    assert "too_long" in preview(first, seq=100).problems
    assert "proven not to look at message content" in r.summary  # the Llama 3.1 template: substitution


def test_dataset_check_says_when_the_template_reads_content():
    """A template that branches on message content cannot be rendered by substitution: the check says so and
    why (prepare will render row by row: same result, slower)."""
    from backend.chat import render_fast_path

    tok = H.get_tokenizer(TOK)
    reads = tok.chat_template.replace("message['content'] | trim", "(message['content'] | trim | upper)")
    assert reads != tok.chat_template
    r = H.check_whole_dataset(H.DataSettings(DATA, TOK, template=reads), 100, False, max_rows=30)
    assert r.status == "", r.status
    assert "row by row" in r.summary and "upper" in r.summary
    fp = render_fast_path(tok, reads)
    assert fp["patterns"] > 0 and fp["proven"] == 0


def test_appended_marker_has_its_own_colour_and_the_check_counts_it():
    """vLLM's ChatML template writes <|im_end|> only before a following message: the final reply gets it appended
    (chat.final_eot: append), the preview shows it apart, and the dataset check counts it, like check_dataset."""
    from backend.chat import Masking, check_dataset, render

    open_final = (ROOT / "tests" / "data" / "chat_templates" / "chatml-vllm.jinja").read_text()
    rows = H.get_rows(DATA)
    tok = H.get_tokenizer(TOK)
    p = preview(0, template=open_final)
    r = render(rows[0], tok, chat_template=open_final)
    assert p.status == "" and "".join(x for x, _ in p.highlight) == r.text
    assert [x for x, lab in p.highlight if lab == H.APPENDED] == [r.text[b:e] for b, e in r.appended] == ["<|im_end|>"]
    assert H.APPENDED in H.COLOR_MAP and "appended" in p.summary
    assert p.highlight[-1] == ("<|im_end|>", H.APPENDED) and "<|im_end|>" in r.text[: r.appended[0][0]]

    c = H.check_whole_dataset(H.DataSettings(DATA, TOK, template=open_final), None, False, max_rows=40)
    idx, _ = H._sample_indices(len(rows), 40)
    sample = [rows[int(i)] for i in idx]
    ref = check_dataset(sample, tok, Masking(), open_final)
    ends_with_reply = sum(
        normalized[-1]["role"] == "assistant" for normalized in (render(x, tok).messages for x in sample)
    )
    assert c.report["appended_eot"]["count"] == ref.n_appended == ends_with_reply > 0
    assert f"**{ends_with_reply} samples** (chat.final_eot: append" in c.summary
    assert "end-of-turn marker trained: **yes, in every trained turn**" in c.summary
    # left open instead: the check reports every such final marker as untrained
    left = check_dataset(sample, tok, Masking(final_eot="leave"), open_final)
    assert left.n_appended == 0 and left.counts["eot_not_trained"] == ends_with_reply
    # the Data tab's final_eot widget (chat.final_eot: leave): the same answer through the studio
    leave = H.DataSettings(DATA, TOK, template=open_final, final_eot="leave")
    p_leave = H.preview_sample(leave, 0)
    assert not any(lab == H.APPENDED for _, lab in p_leave.highlight) and "appended" not in p_leave.summary
    c_leave = H.check_whole_dataset(leave, None, False, max_rows=40)
    assert c_leave.report["appended_eot"]["count"] == 0
    assert c_leave.report["problems"]["eot_not_trained"]["count"] == ends_with_reply
    assert "final_eot: leave" in H.prepare_yaml_from("", leave)[0]


# ------------------------------------------------------------------------------------------------ packing view


@pytest.mark.parametrize("strategy,truncate", [("best_fit", False), ("greedy", False), ("best_fit", True)])
def test_packing_view_fill_matches_pack_stats(strategy, truncate):
    from backend.packing import pack

    v = H.packing_view(H.DataSettings(DATA, TOK), 256, 3, strategy, truncate, False, max_docs=60)
    assert v.status == ""

    docs = H.tokenize_documents(H.DataSettings(DATA, TOK), 60)
    plan = pack(np.array([len(d[0]) for d in docs]), 256, strategy=strategy, truncate_documents=truncate)
    assert v.stats["fill"] == pytest.approx(plan.stats()["fill"])
    assert v.stats["rows"] == plan.num_rows
    assert f"{plan.stats()['fill']:.1%}" in v.summary
    # the drawn micro-batch: non-padding cells are exactly the tokens of its rows
    z = np.asarray(v.figure.data[0].z)
    assert z.shape == (3, 256)
    placed = sum(p.end - p.begin for row in plan.rows[:3] for p in row)
    assert int((z != 0).sum()) == placed
    assert v.stats["shown_fill"] == pytest.approx(placed / (3 * 256))


def test_block_mask_is_block_diagonal_without_cross_document_attention():
    v = H.packing_view(H.DataSettings(DATA, TOK), 256, 1, "best_fit", False, False, max_docs=40)
    mask = np.asarray(v.mask_figure.data[0].z).astype(bool)
    assert mask.shape == (256, 256)
    assert not np.triu(mask, 1).any()  # causal
    assert (~np.tril(mask)).sum() > 0 and not mask[-1, 0]  # the last token does not see the first document
    cross = H.packing_view(H.DataSettings(DATA, TOK), 256, 1, "best_fit", False, True, max_docs=40)
    assert np.asarray(cross.mask_figure.data[0].z).astype(bool)[-1, 0]


# ------------------------------------------------------------------------------------------------ config tab


def test_config_form_yaml_round_trip():
    yaml0 = H.default_train_yaml()
    values, status, ok = H.train_yaml_to_form(yaml0)
    assert ok and len(values) == len(TRAIN_FIELDS)
    paths = [b.path for b in TRAIN_FIELDS]
    values[paths.index("training.train_iters")] = 7.0  # gr.Number gives floats
    values[paths.index("optimizer.learning_rate.decay_style")] = "linear"
    values[paths.index("data.truncate_documents")] = True
    text, status = H.form_to_train_yaml(yaml0, *values)
    assert status.startswith("✓")
    d = yaml.safe_load(text)
    assert d["training"]["train_iters"] == 7 and isinstance(d["training"]["train_iters"], int)
    assert d["optimizer"]["learning_rate"]["decay_style"] == "linear" and d["data"]["truncate_documents"] is True
    assert d["optimizer"]["beta_2"] == 0.95  # fields without a widget are kept from the YAML
    back, _, ok = H.train_yaml_to_form(text)
    assert ok and back[paths.index("training.train_iters")] == 7
    # an edit in the YAML view flows back into the form
    edited = text.replace("sequence_length: 512", "sequence_length: 256")
    vals, status, ok = H.train_yaml_to_form(edited)
    assert ok and vals[paths.index("batch.sequence_length")] == 256


def test_bad_config_value_names_the_key():
    yaml0 = H.default_train_yaml()
    values, _, _ = H.train_yaml_to_form(yaml0)
    paths = [b.path for b in TRAIN_FIELDS]
    values[paths.index("batch.micro_batch_size")] = 0
    text, status = H.form_to_train_yaml(yaml0, *values)
    assert "Invalid config" in status and "batch.micro_batch_size" in status
    assert "micro_batch_size: 0" in text  # the YAML shows what was typed
    _, status, ok = H.train_yaml_to_form(yaml0.replace("train_iters:", "train_itrs:"))
    assert not ok and "training.train_itrs" in status and "train_iters" in status
    _, status, ok = H.train_yaml_to_form("training: [unclosed")
    assert not ok and "does not parse" in status and "line" in status


def test_prepare_yaml_follows_data_tab_and_train_dataset_path():
    from backend.config import load_prepare_config

    train = H.default_train_yaml().replace("runs/tiny/data/", "runs/other/data/")
    text, status = H.prepare_yaml_from(
        train, H.DataSettings(DATA, TOK, "delimiters", ASSISTANT_START, "<|eot_id|>", "last", False, "")
    )
    assert status.startswith("✓")
    cfg = load_prepare_config(yaml.safe_load(text))
    assert cfg.output_path == "runs/other/data"
    assert cfg.chat.masking.mode == "delimiters" and cfg.chat.masking.start_delimiter.endswith("\n\n")
    assert cfg.chat.train_on == "last" and cfg.chat.train_on_eot is False and cfg.chat.template is None
    text, status = H.prepare_yaml_from(
        train, H.DataSettings(DATA, TOK, "delimiters", "", "<|eot_id|>", "all", True, "")
    )
    assert "start_delimiter" in status


def test_paths_are_checked():
    assert H.check_path("", "dataset").ok is False
    assert "does not exist" in H.check_path("./nope.jsonl", "dataset").message
    assert H.check_path(str(ROOT / "README.md"), "dataset").ok is False
    assert H.check_path(str(TINY_MODEL), "model").ok
    assert "config.json" in H.check_path(str(ROOT / "assets"), "model").message
    assert "DONE" in H.check_path(str(TINY_MODEL / "config.json"), "prepared").message
    assert "directory" in H.check_path(str(TINY_MODEL), "prepared").message
    hub = H.check_path("meta-llama/Llama-3.1-8B", "model")
    assert hub.ok and hub.kind == "hub" and "hub id" in hub.message


# ------------------------------------------------------------------------------------------------ jobs


def tiny_yamls(root: Path, train_iters: int = 200) -> tuple[str, str]:
    t = yaml.safe_load((ROOT / "assets/configs/tiny_train.yaml").read_text())
    t["training"].update(train_iters=train_iters, logs={"interval": 1})
    t["training"]["checkpoint"]["interval"] = 1000  # the only checkpoint is the one Stop makes
    t["training"]["evaluations"]["validation"]["interval"] = 0
    t["batch"].update(sequence_length=128, batch_size=1, micro_batch_size=1)
    for split in ("training", "validation"):
        t["data"]["datasets"][split]["path"] = str(root / f"data/fast_llm_config_{split}.yaml")
    t["run"]["experiment_dir"] = str(root / "exp")
    train = yaml.safe_dump(t, sort_keys=False)
    prep, status = H.prepare_yaml_from(train, H.DataSettings(DATA, TOK))
    assert status.startswith("✓"), status
    return train, prep


def group_pids(pgid: int) -> list[int]:
    out = []
    for e in Path("/proc").iterdir():
        if e.name.isdigit():
            try:
                stat = (e / "stat").read_text()
            except OSError:
                continue
            f = stat[stat.rfind(")") + 2 :].split()
            if int(f[2]) == pgid and f[0] != "Z":
                out.append(int(e.name))
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def wait_for_train_events(exp: Path, n: int, timeout: float = 300) -> H.RunView:
    deadline = time.time() + timeout
    view = H.poll_run(str(exp), {}, [])
    while time.time() < deadline:
        view = H.poll_run(str(exp), view.cursor, [])
        if sum(e.get("event") == "train" for e in view.cursor["events"]) >= n:
            return view
        assert view.running, f"the job ended early: {view.status}\n{view.log}"
        time.sleep(1)
    raise AssertionError(f"fewer than {n} train events after {timeout} s:\n{view.log}")


@pytest.mark.slow
def test_stop_ends_every_rank_of_an_accelerate_launch(tmp_path):
    """2 processes through `accelerate launch`: torch elastic starts each rank in its OWN session (outside the
    job's process group). Stop must still reach every rank, they checkpoint, and nothing is left running."""
    from studio import jobs

    train, prep = tiny_yamls(tmp_path)
    t = yaml.safe_load(train)
    t["run"]["num_processes"] = 2
    t["batch"]["batch_size"] = 2
    train = yaml.safe_dump(t, sort_keys=False)
    exp = tmp_path / "exp"
    assert H.launch_run(train, prep).startswith("launched")
    try:
        wait_for_train_events(exp, 2)
        st = jobs.job_status(exp)
        procs = jobs.job_processes(st.pgid)
        ranks = jobs.training_workers(st.pgid)
        assert len(ranks) == 2, procs
        assert set(ranks) - set(group_pids(st.pgid)), "expected the ranks outside the process group"
        msg = H.stop_run(str(exp))
        assert "2 training process(es)" in msg
        st = jobs.wait(exp, 180)
        assert st.state == "stopped" and st.returncode == 0, st
        assert not [p for p in procs if alive(p)] and jobs.job_processes(st.pgid) == []
        ckpts = sorted((exp / "checkpoints").glob("step_*"))
        assert ckpts and (ckpts[-1] / "COMPLETE").exists()
    finally:
        st = jobs.job_status(exp)
        for pid in jobs.job_processes(st.pgid):
            os.kill(pid, 9)


@pytest.mark.slow
def test_launch_events_reattach_stop_checkpoint(tmp_path):
    from studio import jobs

    train, prep = tiny_yamls(tmp_path)
    exp = tmp_path / "exp"
    msg = H.launch_run(train, prep)
    assert msg.startswith("launched"), msg
    try:
        # a second launch into the same directory is refused while the first runs
        assert "already has a running job" in H.launch_run(train, prep)
        deadline = time.time() + 300
        view = H.poll_run(str(exp), {}, [])
        while time.time() < deadline:
            view = H.poll_run(str(exp), view.cursor, [])
            if sum(e.get("event") == "train" for e in view.cursor["events"]) >= 2:
                break
            assert view.running, f"the job ended early: {view.status}\n{view.log}"
            time.sleep(1)
        losses = [e["loss"] for e in view.cursor["events"] if e.get("event") == "train"]
        assert len(losses) >= 2, view.log
        assert len(view.figure.data[0].x) == len(losses)  # the loss points are on the chart
        # reattach: another process, knowing only the directory, sees the running job
        code = f"from studio.jobs import job_status; s = job_status({str(exp)!r}); print(s.state, s.phase)"
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.stdout.split() == ["running", "train"], r.stderr[-2000:]
        st = jobs.job_status(exp)
        pids = jobs.job_processes(st.pgid)
        assert len(pids) >= 2  # the runner and the train process
        assert "SIGTERM" in H.stop_run(str(exp))
        st = jobs.wait(exp, 180)
        assert st.state == "stopped", st
        assert group_pids(st.pgid) == [] and jobs.job_processes(st.pgid) == []
        assert not [p for p in pids if alive(p)]
        ckpts = sorted((exp / "checkpoints").glob("step_*"))
        assert ckpts and (ckpts[-1] / "COMPLETE").exists()
        final = H.poll_run(str(exp), {}, [])
        assert "stopped" in final.status and not final.running
        # Resume = launch again: prepare is skipped (data current), the backend resumes from the checkpoint
        msg = H.launch_run(train, prep)
        assert msg.startswith("launched") and "prepare, then" not in msg, msg
        deadline = time.time() + 240
        resumed = []
        while time.time() < deadline and not resumed:
            time.sleep(1)
            view = H.poll_run(str(exp), view.cursor if view.cursor.get("exp") == str(exp) else {}, [])
            resumed = [e for e in view.cursor["events"] if e.get("event") == "start" and e.get("resumed_from")]
        assert resumed and resumed[-1]["step"] == int(ckpts[-1].name.split("_")[1]), view.log
        H.stop_run(str(exp))
        assert jobs.wait(exp, 180).state == "stopped"
    finally:
        st = jobs.job_status(exp)
        if st.running and st.pgid:
            os.killpg(st.pgid, 9)


def test_poll_overlays_past_runs_and_reports_progress(tmp_path):
    from backend.events import EventLog

    for name, losses in (("a", [3.0, 2.5, 2.0]), ("b", [4.0, 3.5])):
        log = EventLog(tmp_path / name / "events.jsonl")
        log.emit("start", 0, train_iters=4)
        for step, loss in enumerate(losses, 1):
            log.emit("train", step, loss=loss, lr=1e-3, tokens_per_s=100.0, eta=5.0)
        log.emit("validation", len(losses), loss=losses[-1] + 0.1)
    view = H.poll_run(str(tmp_path / "a"), {}, [str(tmp_path / "b"), str(tmp_path / "a")])
    names = [t.name for t in view.figure.data]
    assert "a train" in names and "a validation" in names and "b train" in names and "b validation" in names
    assert list(view.figure.data[names.index("b train")].y) == [4.0, 3.5]
    assert view.progress == pytest.approx(3 / 4) and "step 3 / 4" in view.status
    # the cursor reads only new lines on the next tick
    EventLog(tmp_path / "a" / "events.jsonl").emit("train", 4, loss=1.5, lr=1e-3, tokens_per_s=100.0)
    nxt = H.poll_run(str(tmp_path / "a"), view.cursor, [])
    assert [e["step"] for e in nxt.cursor["events"] if e["event"] == "train"] == [1, 2, 3, 4]
    assert H.past_runs(str(tmp_path)) and set(map(Path, H.past_runs(str(tmp_path)))) == {tmp_path / "a", tmp_path / "b"}
    # training.test_iters: the test loss at the end is in the Train tab's summary line
    EventLog(tmp_path / "a" / "events.jsonl").emit("test", 4, loss=1.25, batches=3)
    assert "test loss 1.2500 (3 batches)" in H.poll_run(str(tmp_path / "a"), nxt.cursor, []).status
    # a step with nothing trained has no loss ("nan" in the event), nor has a validation with no trained token
    EventLog(tmp_path / "c" / "events.jsonl").emit("start", 0, train_iters=2)
    EventLog(tmp_path / "c" / "events.jsonl").emit("train", 1, loss=float("nan"), lr=1e-3, trained_tokens=0)
    EventLog(tmp_path / "c" / "events.jsonl").emit("validation", 1, loss=float("nan"))
    status = H.poll_run(str(tmp_path / "c"), {}, []).status
    assert "step 1 / 2, no loss (step skipped)" in status and "validation loss" not in status


def test_crashed_job_shows_its_error(tmp_path):
    """A run whose train step fails reports failed + the log tail (here: a dataset path that does not exist)."""
    from studio import jobs

    train, _ = tiny_yamls(tmp_path)
    exp = tmp_path / "exp"
    jobs.launch(exp, None, train, 1, run_prepare=False)
    st = jobs.wait(exp, 240)
    assert st.state == "failed", st
    view = H.poll_run(str(exp), {}, [])
    assert "failed" in view.status and "fast_llm_config_training.yaml" in view.log


def test_launch_refuses_mismatched_or_unprepared_dataset_path(tmp_path):
    train, prep = tiny_yamls(tmp_path)
    msg = H.launch_run(train, "")  # no prepare YAML and no prepared data
    assert "data.datasets.training.path" in msg and "does not exist" in msg
    bad = train.replace(str(tmp_path / "data/fast_llm_config_training.yaml"), str(tmp_path / "elsewhere.yaml"))
    msg = H.launch_run(bad, prep)
    assert "data.datasets.training.path" in msg and not (tmp_path / "exp").exists()


# ------------------------------------------------------------------------------------------------ chat tab


def test_chat_streams_a_reply_from_the_tiny_model(tmp_path):
    replies = list(H.chat_stream(str(TINY_MODEL), [], "What is 5 + 37?", "", max_new_tokens=12))
    assert replies, "no streamed text"
    assert all(b.startswith(a) for a, b in zip(replies, replies[1:], strict=False))  # each update extends the last
    # an export dir under the runs dir is offered, after the base model
    export = tmp_path / "exp" / "export" / "final"
    export.mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        (export / f).write_bytes((TINY_MODEL / f).read_bytes())
    assert H.chat_models(str(tmp_path)) == [str(TINY_MODEL), str(export)]
    with pytest.raises(ValueError, match="config.json"):
        next(H.chat_stream(str(tmp_path), [], "hi"))


@pytest.mark.slow
def test_chat_offers_the_checkpoint_of_a_stopped_run(tmp_path):
    """Stop leaves a checkpoint and no export: the Chat tab lists the checkpoint and chats with its weights
    (base config + checkpoint weights), also when the weights are FSDP's DCP shards."""
    import torch
    from safetensors.torch import load_file

    from backend.inference import FSDP_MODEL_DIR, load_for_chat
    from studio import jobs

    train, prep = tiny_yamls(tmp_path)
    exp = tmp_path / "exp"
    assert H.launch_run(train, prep).startswith("launched")
    try:
        wait_for_train_events(exp, 1)
        assert "SIGTERM" in H.stop_run(str(exp))
        assert jobs.wait(exp, 180).state == "stopped"
    finally:
        st = jobs.job_status(exp)
        if st.running and st.pgid:
            os.killpg(st.pgid, 9)
    (checkpoint,) = sorted((exp / "checkpoints").glob("step_*"))
    assert not (exp / "export").exists()
    assert str(checkpoint) in H.chat_models(str(tmp_path))
    model, tok = H.get_model(str(checkpoint))
    saved = load_file(str(checkpoint / "model.safetensors"))
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in saved.items())  # the checkpoint's weights, not the base's
    assert not torch.equal(
        saved["model.embed_tokens.weight"],
        load_file(str(TINY_MODEL / "model.safetensors"))["model.embed_tokens.weight"],
    )
    assert model.generation_config.use_cache is True and tok.chat_template
    replies = list(H.chat_stream(str(checkpoint), [], "What is 5 + 37?", "", max_new_tokens=6))
    assert replies and all(b.startswith(a) for a, b in zip(replies, replies[1:], strict=False))

    # the same checkpoint as FSDP writes it (accelerate: DCP shards of {"model": state_dict}) gives the same model
    import shutil

    import torch.distributed.checkpoint as dcp

    sharded = tmp_path / "sharded" / checkpoint.name
    shutil.copytree(checkpoint, sharded, ignore=shutil.ignore_patterns("model.safetensors", "optimizer.bin"))
    dcp.save({"model": dict(saved)}, storage_writer=dcp.FileSystemWriter(str(sharded / FSDP_MODEL_DIR)), no_dist=True)
    from_shards, _ = load_for_chat(sharded)
    ids = tok("Hello there", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(from_shards(ids).logits, model(ids).logits)


def test_preview_reads_every_dataset_form_prepare_reads(tmp_path):
    """Parquet, a save_to_disk directory and a folder of JSONL files preview the same sample as the JSONL file."""
    import datasets

    rows = [__import__("json").loads(line) for line in SAMPLE_DATA.read_text().splitlines()[:20]]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "part-0.jsonl").write_text("\n".join(SAMPLE_DATA.read_text().splitlines()[:20]) + "\n")
    want = preview(3)
    assert want.status == "" and want.trained_chars
    for path in (tmp_path / "rows.parquet", tmp_path / "saved", tmp_path / "folder"):
        got = H.preview_sample(H.DataSettings(str(path), TOK), 3)
        assert got.status == "", (path, got.status)
        assert (got.n_rows, got.text, got.trained_chars) == (20, want.text, want.trained_chars), path
