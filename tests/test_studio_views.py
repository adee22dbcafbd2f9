"""The studio never shows a stale or contradictory view (issue #26): the wiring of the page and the handlers
behind each view, checked without a browser (tests/test_studio_browser.py drives the page itself).

Each test names the bug it guards against; each fails with that bug back in place.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from backend import SAMPLE_DATA, TINY_MODEL
from studio import app as A
from studio import handlers as H
from studio.bindings import TRAIN_FIELDS

DATA, TOK = str(SAMPLE_DATA), str(TINY_MODEL)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return A.build_app(runs_dir=str(tmp_path_factory.mktemp("runs")))


def _block(demo, elem_id):
    return next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == elem_id)


def _listeners(demo, block, event):
    """The functions that run when ``event`` fires on ``block``, in the order they were wired."""
    return [f for f in demo.fns.values() if (block._id, event) in [(t[0], t[1]) for t in f.targets]]


def _fn_name(f) -> str:
    return getattr(f.fn, "__name__", "")


def test_a_sequence_length_change_re_renders_the_preview(demo):
    # bug 1: batch.sequence_length = 128 left sample 0 saying "no problems" while the check listed it too_long
    seq = _block(demo, "cfg-batch-sequence_length")
    assert "on_preview" in [_fn_name(f) for f in _listeners(demo, seq, "change")]
    s = H.DataSettings(DATA, TOK)
    assert not any(p.startswith("too_long") for p in H.preview_sample(s, 0, None).problems.splitlines())
    assert "too_long" in H.preview_sample(s, 0, 16).problems  # the handler answers for the length it is given


def test_every_preview_event_runs_in_one_ordered_queue(demo):
    # bug 8: an earlier input's answer (a dataset no longer selected) landed 61 s after the current one's
    previews = [f for f in demo.fns.values() if _fn_name(f) == "on_preview"]
    assert len(previews) >= 10  # every masking control, the dataset, the tokenizer, the sequence length, load
    wired = [f for f in previews if f.targets and f.targets[0][1] != "load"]
    assert {f.concurrency_id for f in wired} == {"data-preview"}
    assert {f.concurrency_limit for f in wired} == {1}  # one worker: answers land in the order they were asked
    assert {f.trigger_mode for f in wired} == {"always_last"}  # inputs superseded while waiting are dropped


def test_the_yaml_editor_is_checked_on_any_change_and_its_status_is_above_the_form(demo):
    # bug 2: a pasted unknown key kept "✓ valid" until the editor lost focus (a paste fires no .input)
    yaml_box = _block(demo, "train-yaml")
    assert "on_yaml" in [_fn_name(f) for f in _listeners(demo, yaml_box, "change")]
    text = H.default_train_yaml().replace("batch:\n", "batch:\n  micro_batchsize: 4\n", 1)
    *_, status = A.on_yaml(text)
    assert "micro_batchsize" in status and "valid" not in status.lower().replace("invalid", "")
    # the status line comes before the first form field in the page, not below the whole form
    ids = list(demo.blocks)
    assert ids.index(_block(demo, "config-status")._id) < ids.index(_block(demo, "cfg-training-train_iters")._id)


def test_a_fractional_count_is_refused_not_rounded(demo):
    # bug 6: train_iters = 2.5 was rounded to 2 by the widget and the status said valid
    widget = _block(demo, "cfg-training-train_iters")
    typed = widget.preprocess(2.5)
    assert typed == 2.5
    values = [None] * len(TRAIN_FIELDS)
    values[[b.path for b in TRAIN_FIELDS].index("training.train_iters")] = typed
    _, status = H.form_to_train_yaml(H.default_train_yaml(), *values)
    assert "training.train_iters" in status and "✓" not in status


def test_the_log_box_shows_the_newest_lines(tmp_path, demo):
    # bug 3: "stop requested…" and "exited with code 0" were below the box's visible part
    from studio import jobs

    exp = tmp_path / "run"
    exp.mkdir()
    (exp / jobs.LOG_FILE).write_text("".join(f"line {i}\n" for i in range(200)) + "exited with code 0\n")
    view = H.poll_run(str(exp), {})
    lines = view.log.splitlines()
    assert lines[-1] == "exited with code 0" and len(lines) <= H.LOG_TAIL_LINES
    box = _block(demo, "train-log")
    assert box.lines == box.max_lines == H.LOG_TAIL_LINES  # the whole tail fits: nothing to scroll to


def test_the_plan_never_shows_the_previous_model_while_it_recomputes(demo, tmp_path):
    # bug 4: the plan kept showing the previous model for ~20 s, and offline it had no way to take a local config
    yaml_box = _block(demo, "train-yaml")
    first = [_fn_name(f) for f in _listeners(demo, yaml_box, "change")]
    assert "plan_pending" in first  # the box is cleared at once ...
    then = [f for f in demo.fns.values() if _fn_name(f) == "memory_plan_markdown"]
    assert then and all(f.trigger_after is not None for f in then)  # ... and the plan follows it
    # a local config.json stands in for pretrained.path (here: a hub id that cannot be read)
    text = H.default_train_yaml().replace(f"path: {TOK}", "path: nobody-owns-this/model-xyz")
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    (cfg_dir / "config.json").write_text((TINY_MODEL / "config.json").read_text())
    planned = H.memory_plan_markdown(text, 1, 80, str(cfg_dir / "config.json"))
    assert "parameters" in planned and "Fits" in planned, planned
    assert "no config.json" in H.memory_plan_markdown(text, 1, 80, str(tmp_path))


def test_an_all_skipped_dataset_is_not_reported_as_healthy(tmp_path):
    # bug 7: "nothing to train: 0" and "end-of-turn trained in every turn" next to "trained tokens 0 / 0"
    bad = tmp_path / "bad.jsonl"
    rows = [{"messages": [{"role": "narrator", "content": f"x{i}"}]} for i in range(3)]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = H.check_whole_dataset(H.DataSettings(str(bad), TOK), 128, False, max_rows=50)
    assert r.status == "", r.status
    assert "samples skipped, nothing trained from them: **3**" in r.summary
    assert "in every trained turn" not in r.summary and "no sample is kept" in r.summary
    assert "✓" not in r.summary


def test_studio_modules_import_each_other_in_one_direction():
    """No circle among studio/*.py imports (handlers <-> train_tab <-> learned had one), and only the page
    (app.py) uses the handlers' re-export: each tab's code imports what it needs from where it lives."""
    import ast
    from pathlib import Path

    root = Path(A.__file__).parent
    graph = {}
    for f in root.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                mods = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                names |= {m.split(".")[1] for m in mods if m.startswith("studio.")}
            elif isinstance(node, ast.Import):
                names |= {a.name.split(".")[1] for a in node.names if a.name.startswith("studio.")}
        graph[f.stem] = names & {g.stem for g in root.glob("*.py")}
    assert {m for m, deps in graph.items() if "handlers" in deps} <= {"app", "screenshots", "__main__"}

    def reach(start, seen=()):
        for dep in graph.get(start, ()):
            if dep in seen:
                continue
            yield dep
            yield from reach(dep, (*seen, dep))

    circles = sorted(m for m in graph if m in set(reach(m)))
    assert not circles, f"studio modules that import themselves through others: {circles}"


def test_chat_takes_a_system_prompt_and_sampling_settings(monkeypatch):
    """The Chat tab's generation settings reach generate(): max new tokens, temperature, top-p, and the system
    prompt rendered by the chat template before the history."""
    import studio.chat_tab as C

    tokenizer = H.get_tokenizer(TOK)
    seen = {}

    class Recorder:
        def generate(self, **kwargs):
            seen.update(kwargs)
            kwargs["streamer"].end()

    monkeypatch.setattr(C, "get_model", lambda path: (Recorder(), tokenizer))
    list(H.chat_stream(TOK, [], "zq-user", "", max_new_tokens=7, temperature=0.7, top_p=0.8, system_prompt="zq-sys"))
    prompt = tokenizer.decode(seen["input_ids"][0])
    assert "zq-sys" in prompt and prompt.index("zq-sys") < prompt.index("zq-user")
    assert seen["max_new_tokens"] == 7 and seen["do_sample"] and seen["temperature"] == 0.7 and seen["top_p"] == 0.8
    list(H.chat_stream(TOK, [], "zq-user", "", temperature=0.0))
    assert seen["do_sample"] is False and "zq-sys" not in tokenizer.decode(seen["input_ids"][0])


def test_the_chat_tab_opens_on_the_newest_export(tmp_path):
    runs = tmp_path / "runs"
    for d in ("a/checkpoints/step_4", "a/export/final"):
        (runs / d).mkdir(parents=True)
    (runs / "a/checkpoints/step_4/COMPLETE").write_text("")
    (runs / "a/export/final/config.json").write_text("{}")
    (runs / "a/export/final/model.safetensors").write_text("")
    models = H.chat_models(str(runs))
    assert H.default_chat_model(models) == str(runs / "a/export/final")
    assert A.on_load_models(str(runs))["value"] == str(runs / "a/export/final")
    assert A.on_refresh_models(str(runs), TOK)["value"] == TOK  # a user's pick is kept on refresh


@pytest.mark.parametrize("tokenizer", ["tiny-llama", "tokenizers/chatml", "tokenizers/phi3", "tokenizers/gemma"])
def test_sample_prompts_read_as_role_lines(tokenizer):
    """The answers table showed prompts run together ("winterassistant"): each turn is now its own role line."""
    from backend import ASSETS
    from backend.evaluate import readable_prompt

    tok = H.get_tokenizer(str(ASSETS / tokenizer))
    messages = [
        {"role": "user", "content": "what is winter"},
        {"role": "assistant", "content": "cold"},
        {"role": "user", "content": "and summer"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    lines = readable_prompt(tok(text, add_special_tokens=False)["input_ids"], tok).splitlines()
    reply_role = "model" if "gemma" in tokenizer else "assistant"
    assert lines[-3:] == ["user: what is winter", f"{reply_role}: cold", "user: and summer"]


def test_the_check_shows_the_long_document_comparison_where_it_matters():
    """At a sequence length nothing exceeds, the check says so and compares skip / truncate / split_turns at a
    length where they differ, instead of showing nothing."""
    import re

    r = H.check_whole_dataset(H.DataSettings(DATA, TOK), 100_000, False, max_rows=100)
    assert "no document is longer than sequence_length 100000" in r.summary
    picked = re.search(r"at sequence_length (\d+) they would differ", r.summary)
    assert picked and 32 <= int(picked.group(1)) < 100_000, r.summary
    assert "split_turns" in r.summary.split(picked.group(0), 1)[1]  # the comparison itself follows


def test_delimiters_are_read_only_in_auto_masking_and_the_packing_view_draws_on_load(demo):
    start, end = _block(demo, "start-delim"), _block(demo, "end-delim")
    assert not start.interactive and not end.interactive and "read-only" in start.info
    s_auto, e_auto = A.on_mode("auto")
    assert s_auto["interactive"] is False and "chat template" in s_auto["info"]
    s_delim, _ = A.on_mode("delimiters")
    assert s_delim["interactive"] is True and "read-only" not in s_delim["info"]
    mode = next(b for b in demo.blocks.values() if getattr(b, "label", None) == "Masking")
    assert "on_mode" in [_fn_name(f) for f in _listeners(demo, mode, "change")]
    loads = [_fn_name(f) for f in demo.fns.values() if f.targets and f.targets[0][1] == "load"]
    assert "on_packing" in loads


def test_activation_checkpointing_is_in_the_form(demo):
    from backend.config import load_train_config
    from studio.bindings import form_values_from_config

    box = _block(demo, "cfg-model-multi_stage-activation_checkpointing")
    values = form_values_from_config(load_train_config(__import__("yaml").safe_load(H.default_train_yaml())))
    values[[b.path for b in TRAIN_FIELDS].index("model.multi_stage.activation_checkpointing")] = True
    text, status = H.form_to_train_yaml(H.default_train_yaml(), *values)
    assert box is not None and "✓" in status
    assert load_train_config(__import__("yaml").safe_load(text)).model.multi_stage.activation_checkpointing is True


# ---------------------------------------------------------------------------------------- preference pairs (#24)
PAIRS = SAMPLE_DATA.parent / "sample_preference.jsonl"


def _pair_settings(dataset=PAIRS):
    return H.DataSettings(str(dataset), str(TINY_MODEL), "auto", "", "", "all", True, "", "append")


def test_the_preview_shows_a_pair_with_each_answer_in_its_colour():
    """The highlight is what prepare writes for the row (RowReader): prompt + chosen, then prompt + rejected; each
    answer's trained text in its own colour, the prompt masked; the token view has the two side by side."""
    from backend.config import load_prepare_config
    from backend.documents import RowReader
    from studio.app import on_preview

    p = H.preview_sample(_pair_settings(), 3, 512)
    assert not p.status, p.status
    row = json.loads(PAIRS.read_text().splitlines()[3])
    sides = []
    for highlight in (p.highlight, p.highlight_rejected):  # side by side: chosen document, rejected document
        by_label = {}
        for text, label in highlight:
            by_label.setdefault(label, []).append(text)
        sides.append(by_label)
        assert row["prompt"][-1]["content"] in "".join(by_label[H.MASKED])  # each with the prompt, masked
        assert H.TRAINED not in by_label  # no answer drawn in the plain SFT colour
    chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
    assert "".join(sides[0][H.CHOSEN]).startswith(chosen) and H.REJECTED not in sides[0]
    assert "".join(sides[1][H.REJECTED]).startswith(rejected) and H.CHOSEN not in sides[1]
    # the page: the rejected highlight is shown beside the chosen one for a pair, hidden for a conversation
    shown = on_preview(3, 512, *dataclasses.astuple(_pair_settings()))
    assert shown[1]["visible"] is True and shown[1]["value"] == p.highlight_rejected
    assert shown[0]["value"] == p.highlight and "Chosen" in shown[0]["label"]
    hidden = on_preview(0, 512, *dataclasses.astuple(H.DataSettings(DATA, TOK)))
    assert hidden[1]["visible"] is False and H.preview_sample(H.DataSettings(DATA, TOK), 0).highlight_rejected is None
    assert p.token_html.count('<div class="sft-tokens">') == 2 and "display:flex" in p.token_html
    # the trained characters are exactly those of the stored trained tokens, both documents
    cfg = load_prepare_config(
        {"output_path": "x", "dataset": {"path": str(PAIRS)}, "tokenizer": {"path": str(TINY_MODEL)}}
    )
    tok = H.get_tokenizer(str(TINY_MODEL))
    docs = RowReader(cfg).sample(3).documents
    assert "".join(sides[0][H.CHOSEN]) == tok.decode(docs[0][0][docs[0][1]])
    assert "".join(sides[1][H.REJECTED]) == tok.decode(docs[1][0][docs[1][1]])


def test_the_dataset_check_counts_pairs_identical_answers_and_pairs_too_long(tmp_path):
    rows = PAIRS.read_text().splitlines()[:20]
    same = json.loads(rows[0])
    same["rejected"] = same["chosen"]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join([*rows, json.dumps(same)]) + "\n")
    lengths, once = [], []
    for i in range(20):
        p = H.preview_sample(_pair_settings(path), i)
        whole, shared = p.summary.split("packed whole: ")[1].split(" with the prompt")[0].split(" tokens, ")
        lengths.append(int(whole))
        once.append(int(shared))
    assert all(o < n for o, n in zip(once, lengths, strict=True))  # every shipped pair has a prompt to share
    seq = sorted(lengths)[10]  # about half the pairs are longer together
    r = H.check_whole_dataset(_pair_settings(path), seq, False, 5000)
    assert "preference pairs: **20 kept**" in r.summary and "**1** skipped with identical answers" in r.summary
    over = sum(o > seq for o in once)
    fits = sum(o <= seq < n for o, n in zip(once, lengths, strict=True))
    assert f"**{over}** longer than sequence_length together" in r.summary
    assert f"**{fits}** that fit only with it" in r.summary and fits > 0
    seq = sorted(once)[10]  # about half are too long even with the prompt placed once
    r = H.check_whole_dataset(_pair_settings(path), seq, False, 5000)
    assert f"**{sum(o > seq for o in once)}** longer than sequence_length together" in r.summary


def test_the_config_form_has_the_objective_and_the_prepare_yaml_says_pairs_need_dpo():
    from studio.bindings import form_values_from_config

    paths = [b.path for b in TRAIN_FIELDS]
    for key in ("training.objective", "training.dpo.beta", "training.dpo.loss", "training.dpo.reference"):
        assert key in paths
    import yaml

    from backend.config import load_train_config
    from studio.common import DEFAULT_TRAIN_YAML

    values = form_values_from_config(load_train_config(DEFAULT_TRAIN_YAML))
    values[paths.index("training.objective")] = "dpo"
    yaml_text, status = H.form_to_train_yaml(H.default_train_yaml(), *values)
    assert status.startswith("✓") and load_train_config(yaml.safe_load(yaml_text)).training.objective == "dpo"
    _, status = H.prepare_yaml_from(H.default_train_yaml(), _pair_settings())
    assert "training.objective: dpo" in status
    raw = yaml.safe_load(H.default_train_yaml())
    raw["training"]["objective"] = "dpo"
    dpo_yaml = yaml.safe_dump(raw)
    _, status = H.prepare_yaml_from(dpo_yaml, _pair_settings())
    assert "preference pairs" not in status


def test_the_train_tab_plots_margin_and_accuracy_for_a_dpo_run(tmp_path):
    from studio.train_tab import poll_run

    events = [
        {"event": "start", "step": 0, "train_iters": 2, "objective": "dpo"},
        {"event": "train", "step": 1, "loss": 0.69, "lr": 1e-3, "tokens_per_s": 1.0, "margin": 0.0, "accuracy": 0.0},
        {"event": "train", "step": 2, "loss": 0.5, "lr": 1e-3, "tokens_per_s": 1.0, "margin": 0.7, "accuracy": 0.8},
        {"event": "validation", "step": 2, "loss": 0.55, "margin": 0.6, "accuracy": 0.75},
    ]
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    view = poll_run(str(tmp_path), None)
    names = [t.name for t in view.figure.data]
    assert any(n.endswith("train margin") for n in names) and any(n.endswith("validation accuracy") for n in names)
    margin = next(t for t in view.figure.data if t.name.endswith("train margin"))
    assert list(margin.y) == [0.0, 0.7]
    assert "margin 0.700, accuracy 0.80" in view.status and "accuracy 0.75" in view.status
    sft = [{k: v for k, v in e.items() if k not in ("margin", "accuracy")} for e in events]
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in sft))
    assert not any("margin" in (t.name or "") for t in poll_run(str(tmp_path), None).figure.data)


def test_the_chat_tab_compares_two_exports_side_by_side(tmp_path):
    """The SFT model beside the DPO model: the compared model is picked from the same exports, and one message is
    answered by both, each in its own column, by its own weights."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    runs = tmp_path / "runs"
    for name in ("sft", "dpo"):
        shutil.copytree(TINY_MODEL, runs / name / "export" / "final")
    weights = runs / "dpo" / "export" / "final" / "model.safetensors"
    state = load_file(weights)
    torch.manual_seed(0)
    save_file({k: v + 0.5 * torch.randn_like(v) for k, v in state.items()}, weights)  # another model's answers
    sft, dpo = (str(runs / n / "export" / "final") for n in ("sft", "dpo"))
    assert {sft, dpo} <= set(A.on_refresh_compared(str(runs), sft)["choices"])
    assert A.on_refresh_compared(str(runs), sft)["value"] == sft
    *_, (left, right, _) = A.on_chat(dpo, sft, True, "", "", "What is 5 + 37?", [], [], 8, 0.0, 1.0, "")
    assert [m["role"] for m in left] == [m["role"] for m in right] == ["user", "assistant"]
    assert left[1]["content"] != right[1]["content"]
    assert left[1]["content"] == list(H.chat_stream(dpo, [], "What is 5 + 37?", "", 8))[-1]
    assert right[1]["content"] == list(H.chat_stream(sft, [], "What is 5 + 37?", "", 8))[-1]
