"""The Gradio page: one ``build_*_tab()`` per tab, wired to the typed handlers of ``studio.handlers``.

    python -m studio                      # see studio/__main__.py
    demo = build_app(runs_dir="runs")     # gr.Blocks; demo.launch(server_name="127.0.0.1")

This module only lays out widgets and converts handler results (plain dataclasses) into widget updates.
Importing it does not import torch (tests check it); tokenizers and models load lazily inside handlers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from backend import SAMPLE_DATA, TINY_MODEL
from studio import export_panel, jobs, learned
from studio import handlers as H
from studio.bindings import GROUPS, TRAIN_FIELDS, Binding, label_and_info

CSS = """
.sft-status p { color: #b30000; font-weight: 600; }
.sft-tokens { max-height: 420px; overflow-y: auto; }
"""


def _rel(p: Path) -> str:
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


# ============================================================================================ data tab


@dataclass
class DataTab:
    dataset: gr.Textbox
    tokenizer: gr.Textbox
    mode: gr.Radio
    start: gr.Textbox
    end: gr.Textbox
    train_on: gr.Radio
    train_on_eot: gr.Checkbox
    final_eot: gr.Radio
    train_on_tool_calls: gr.Checkbox
    reasoning: gr.Radio
    template: gr.Code
    index: gr.Number
    n_rows: gr.State
    outputs: list  # preview outputs: highlight, rejected highlight (pairs), tokens, summary, problems, status, index,
    # n_rows
    buttons: tuple  # prev, next, random

    @property
    def settings_inputs(self) -> list:
        """The widgets of `H.DataSettings`, in its field order: every data handler gets ``H.DataSettings(*values)``."""
        return [
            self.dataset,
            self.tokenizer,
            self.mode,
            self.start,
            self.end,
            self.train_on,
            self.train_on_eot,
            self.template,
            self.final_eot,
            self.train_on_tool_calls,
            self.reasoning,
        ]


def on_preview(index: float, seq_len: float | None, *data) -> tuple:
    p = H.preview_sample(H.DataSettings(*data), index, seq_len)
    pair = p.highlight_rejected is not None  # a preference pair: the rejected document beside the chosen one
    rejected = gr.update(value=p.highlight_rejected if pair else [], visible=pair)
    label = "Chosen: prompt + chosen answer" if pair else "Rendered sample: trained vs masked tokens"
    highlight = gr.update(value=p.highlight, label=label)
    return highlight, rejected, p.token_html, p.summary, p.problems, p.status, p.index, p.n_rows


def on_step(delta: int):
    def step(index: float, n_rows: int) -> int:
        return H.step_index(index, delta, n_rows)

    return step


_AUTO_DELIM_INFO = "read-only in auto masking: spans come from the chat template itself (switch to delimiters to edit)"


def on_mode(mode: str) -> tuple:
    """The delimiter fields are editable only in delimiter masking, and say why when they are not."""
    editable = mode == "delimiters"
    info = "'\\n' = newline" if editable else _AUTO_DELIM_INFO
    return gr.update(interactive=editable, info=info), gr.update(interactive=editable, info=info)


def on_load_template(tokenizer: str) -> str:
    return H.default_template(tokenizer)


def build_data_tab() -> DataTab:
    """Lay out the Data tab; `wire_data_tab` connects it once the Config tab (sequence length) exists."""
    with gr.Row():
        dataset = gr.Textbox(
            _rel(SAMPLE_DATA),
            label="Dataset",
            scale=3,
            info="a .jsonl/.json/.parquet file, a save_to_disk directory, or a hub id",
        )
        tokenizer = gr.Textbox(_rel(TINY_MODEL), label="Tokenizer", scale=2, info="directory or hub id")
    with gr.Row():
        mode = gr.Radio(
            ["auto", "delimiters"],
            value="auto",
            label="Masking",
            info="auto: assistant spans from the chat template itself",
        )
        start = gr.Textbox(
            "<|start_header_id|>assistant<|end_header_id|>\\n\\n",
            label="start delimiter",
            info=_AUTO_DELIM_INFO,
            interactive=False,
            elem_id="start-delim",
        )
        end = gr.Textbox(
            "<|eot_id|>", label="end delimiter", info=_AUTO_DELIM_INFO, interactive=False, elem_id="end-delim"
        )
        train_on = gr.Radio(["all", "last"], value="all", label="Train on assistant turns")
        train_on_eot = gr.Checkbox(True, label="Train end-of-turn token")
        final_eot = gr.Radio(
            ["append", "leave"],
            value="append",
            label="Final reply left open",
            info="chat.final_eot: append the end-of-turn marker the template leaves off a final reply",
        )
    with gr.Row():  # agent traces: what the tool-calling turns and the reasoning train
        train_on_tool_calls = gr.Checkbox(
            True,
            label="Train tool calls",
            info="chat.train_on_tool_calls: assistant turns that call tools are trained (off: masked context)",
        )
        reasoning = gr.Radio(
            ["as_rendered", "every_turn"],
            value="as_rendered",
            label="Reasoning the template drops",
            info="chat.reasoning: as_rendered trains what the template writes; every_turn trains each dropped "
            "trace in a document of its own (the preview shows each one)",
        )
    with gr.Accordion("Chat template (editable; re-renders at once)", open=False):
        # Filled on page load (loading the tokenizer takes seconds; building the page should not).
        template = gr.Code("", language="jinja2", label="chat template", elem_id="chat-template")
    with gr.Row():
        prev_b = gr.Button("◀ prev", size="sm")
        next_b = gr.Button("next ▶", size="sm")
        rand_b = gr.Button("random", size="sm")
        index = gr.Number(0, label="sample #", precision=0, minimum=0, elem_id="sample-index")
    n_rows = gr.State(0)
    status = gr.Markdown("", elem_classes="sft-status", elem_id="data-status")
    summary = gr.Markdown(elem_id="preview-summary")
    with gr.Row(equal_height=False):
        highlight = gr.HighlightedText(
            label="Rendered sample: trained vs masked tokens",
            color_map=H.COLOR_MAP,
            show_legend=True,
            combine_adjacent=False,
            show_inline_category=False,
            elem_id="preview",
        )
        rejected = gr.HighlightedText(  # preference pairs only: the same prompt, the other answer
            label="Rejected: the same prompt, the other answer",
            color_map=H.COLOR_MAP,
            show_legend=True,
            combine_adjacent=False,
            show_inline_category=False,
            visible=False,
            elem_id="preview-rejected",
        )
    problems = gr.Markdown(elem_id="preview-problems")
    with gr.Accordion("Tokens (boundaries and ids)", open=False):
        tokens = gr.HTML()
    return DataTab(
        dataset,
        tokenizer,
        mode,
        start,
        end,
        train_on,
        train_on_eot,
        final_eot,
        train_on_tool_calls,
        reasoning,
        template,
        index,
        n_rows,
        [highlight, rejected, tokens, summary, problems, status, index, n_rows],
        (prev_b, next_b, rand_b),
    )


def wire_data_tab(tab: DataTab, seq_len: gr.Number, demo: gr.Blocks) -> None:
    """Every masking control re-renders the preview at once (.input for typed text, .change for toggles)."""
    t = tab
    dataset, tokenizer, template, index, n_rows = t.dataset, t.tokenizer, t.template, t.index, t.n_rows
    prev_b, next_b, rand_b = t.buttons
    inputs = [index, seq_len] + t.settings_inputs
    outputs = t.outputs
    # .change (not .input) for the typed fields too: gradio 6 fires .input on key presses only, not on a paste;
    # always_last drops stale renders while the user types. Every preview event shares one queue of one worker
    # (concurrency_id), so renders finish in the order they were asked for: an earlier, slower input (a dataset
    # no longer selected) can never land after the answer to the inputs on screen.
    one_queue = dict(trigger_mode="always_last", concurrency_id="data-preview", concurrency_limit=1)
    toggles = (t.mode, t.train_on, t.train_on_eot, t.final_eot, t.train_on_tool_calls, t.reasoning)
    for w in (*toggles, index, t.start, t.end, template, seq_len):
        w.change(on_preview, inputs, outputs, show_progress="hidden", **one_queue)
    for w in (dataset, tokenizer):
        w.submit(on_preview, inputs, outputs, **one_queue)
        w.blur(on_preview, inputs, outputs, **one_queue)
    tokenizer.submit(on_load_template, [tokenizer], [template])
    t.mode.change(on_mode, [t.mode], [t.start, t.end], show_progress="hidden", queue=False)
    prev_b.click(on_step(-1), [index, n_rows], [index])
    next_b.click(on_step(+1), [index, n_rows], [index])
    rand_b.click(on_step(0), [index, n_rows], [index])
    demo.load(on_preview, inputs, outputs)
    demo.load(on_load_template, [tokenizer], [template])


def on_check(seq_len: float, truncate: bool, max_rows: float, progress=gr.Progress(), *data) -> tuple:  # noqa: B008
    started = time.perf_counter()

    def report(i, n):
        if i % 50 == 0 or i == n:
            progress((i, n), desc=f"checking samples: {jobs.eta_text(i, n, started)}")

    r = H.check_whole_dataset(H.DataSettings(*data), seq_len, truncate, max_rows, progress=report)
    choices = [(label, row) for label, row in zip(r.problem_labels, r.problem_rows, strict=False)]
    return r.summary or r.status, r.figure, gr.update(choices=choices, value=None)


def on_jump(row: int | None) -> int:
    return row if row is not None else gr.skip()


def build_check_section(data: DataTab):
    """Lay out the dataset check; returns a function that wires it to the Config tab's widgets."""
    with gr.Accordion("Dataset check (whole dataset, before launch)", open=True):
        with gr.Row():
            max_rows = gr.Number(5000, label="check at most N rows (an even random sample above that)", precision=0)
            run = gr.Button("Check dataset", variant="primary", elem_id="check-button")
        with gr.Row():
            summary = gr.Markdown(elem_id="check-summary")
            plot = gr.Plot(label="document lengths")
        jump = gr.Dropdown([], label="Jump to a problem sample", interactive=True, elem_id="problem-jump")
    jump.input(on_jump, [jump], [data.index])

    def wire(seq_len, truncate):
        run.click(on_check, [seq_len, truncate, max_rows] + data.settings_inputs, [summary, plot, jump])

    return wire


# ============================================================================================ packing tab


def on_packing(
    seq_len: float,
    micro_batch: float,
    strategy: str,
    truncate: bool,
    cross_doc: bool,
    max_docs: float,
    mask_row: float,
    split_turns: bool,
    *data,
) -> tuple:
    v = H.packing_view(
        H.DataSettings(*data),
        seq_len,
        micro_batch,
        strategy,
        truncate,
        cross_doc,
        max_docs,
        mask_row,
        split_turns=split_turns,
    )
    return v.figure, v.mask_figure, v.summary or v.status


def build_packing_tab(data: DataTab):
    """Lay out the packing view; returns a function that wires it to the Config tab's widgets."""
    gr.Markdown(
        "One packed micro-batch of the first documents, built by `backend.packing.pack` + `collate` "
        "(the training code). These toggles are a what-if: the Config tab decides what runs."
    )
    with gr.Row():
        strategy = gr.Radio(["best_fit", "greedy"], value="best_fit", label="packing strategy")
        truncate = gr.Checkbox(False, label="truncate_documents")
        cross_doc = gr.Checkbox(False, label="cross-document attention")
        max_docs = gr.Number(300, label="documents to pack", precision=0)
        mask_row = gr.Number(0, label="row for the block mask", precision=0)
        split_turns = gr.Checkbox(False, label="split long conversations at turns (prepare long_documents)")
        run = gr.Button("Draw", variant="primary", elem_id="pack-button")
    summary = gr.Markdown(elem_id="pack-summary")
    plot = gr.Plot(label="packed micro-batch")
    mask = gr.Plot(label="block mask")

    def wire(seq_len, micro_batch, demo):
        inputs = [seq_len, micro_batch, strategy, truncate, cross_doc, max_docs, mask_row, split_turns]
        inputs += data.settings_inputs
        run.click(on_packing, inputs, [plot, mask, summary])
        demo.load(on_packing, inputs, [plot, mask, summary])  # drawn at once, not after a first click
        for w in (strategy, truncate, cross_doc, mask_row, split_turns):
            w.change(on_packing, inputs, [plot, mask, summary])

    return wire


# ============================================================================================ config tab


@dataclass
class ConfigTab:
    widgets: list  # one per TRAIN_FIELDS row, same order
    train_yaml: gr.Code
    prepare_yaml: gr.Code
    status: gr.Markdown

    def widget(self, path: str):
        return self.widgets[[b.path for b in TRAIN_FIELDS].index(path)]


def make_widget(b: Binding, value):
    label, info = label_and_info(b)
    common = dict(label=label, info=info, elem_id="cfg-" + b.path.replace(".", "-"), min_width=260)
    if b.kind == "int":  # no precision=0: it rounds 2.5 to 2 silently; the typed config refuses 2.5 by name
        return gr.Number(value, step=1, **common)
    if b.kind == "float":
        return gr.Number(value, **common)
    if b.kind == "bool":
        return gr.Checkbox(bool(value), **common)
    if b.kind == "choice":
        return gr.Dropdown(list(b.choices), value=value, **common)
    return gr.Textbox(value or "", **common)


def on_form(yaml_text: str, *values) -> tuple[str, str]:
    return H.form_to_train_yaml(yaml_text, *values)


def on_yaml(yaml_text: str) -> list:
    values, status, ok = H.train_yaml_to_form(yaml_text)
    return [v if ok else gr.skip() for v in values] + [status]


def on_load_file(path: str) -> list:
    text, status = H.load_yaml_file(path)
    if text is None:
        return [gr.skip()] * (len(TRAIN_FIELDS) + 1) + [status]
    return [text] + on_yaml(text)[:-1] + [status]


def on_save(train_text: str, prepare_text: str, path: str) -> tuple[str, dict]:
    s1 = H.save_yaml(train_text, path)
    p = Path(path or "")
    s2 = H.save_yaml(prepare_text, str(p.with_name(p.stem + "_prepare" + p.suffix))) if prepare_text else ""
    ok = not s1.startswith("⚠")
    return "\n\n".join(x for x in (s1, s2) if x), gr.update(value=str(Path(path).resolve()) if ok else None, visible=ok)


def build_config_tab(train_config: str | None = None) -> ConfigTab:
    yaml0 = H.read_text(train_config) if train_config else H.default_train_yaml()
    values0, status0, ok = H.train_yaml_to_form(yaml0)
    if not ok:  # an invalid file still opens: the form starts from the defaults, the status says what is wrong
        values0 = H.train_yaml_to_form(H.default_train_yaml())[0]
    widgets = [None] * len(TRAIN_FIELDS)
    with gr.Row():
        with gr.Column(scale=3):
            status = gr.Markdown(status0, elem_id="config-status")  # above the form: never scrolled out of sight
            for group in GROUPS:
                with gr.Accordion(group, open=group in ("Schedule", "Batch", "Learning rate")):
                    # checkboxes in their own row: squeezed between number boxes they wrap word by word
                    for bools in (False, True):
                        if not any(b.group == group and (b.kind == "bool") == bools for b in TRAIN_FIELDS):
                            continue
                        with gr.Row():
                            for k, b in enumerate(TRAIN_FIELDS):
                                if b.group == group and (b.kind == "bool") == bools:
                                    widgets[k] = make_widget(b, values0[k])
        with gr.Column(scale=2):
            train_yaml = gr.Code(
                yaml0,
                language="yaml",
                label="train YAML (edit here or in the form)",
                elem_id="train-yaml",
                interactive=True,
            )
            prepare_yaml = gr.Code(
                "", language="yaml", label="prepare YAML (from the Data tab)", elem_id="prepare-yaml", interactive=True
            )
            with gr.Row():
                path = gr.Textbox("runs/studio_train.yaml", label="YAML file", scale=3)
                load_b = gr.Button("Load", size="sm")
                save_b = gr.Button("Save", size="sm")
            download = gr.File(label="download", interactive=False, visible=False)
            file_status = gr.Markdown()
            with gr.Accordion("Memory plan (backend.plan)", open=True):
                with gr.Row():
                    plan_gpus = gr.Number(
                        None,
                        precision=0,
                        label="GPUs",
                        placeholder="run.num_processes",
                        min_width=120,
                        elem_id="plan-gpus",
                    )
                    plan_memory = gr.Number(80, label="GiB per GPU", min_width=120)
                plan_config = gr.Textbox(
                    "",
                    label="model config (optional)",
                    placeholder="a directory with config.json, or the file: instead of pretrained.path",
                    info="plan a model whose weights are not here (or a hub id while offline) from its config.json",
                    elem_id="plan-model-config",
                )
                plan_md = gr.Markdown(H.memory_plan_markdown(yaml0, None, 80), elem_id="memory-plan")
    for w in widgets:
        # .input (user edits only) in both directions, so that form -> YAML -> form does not loop.
        w.input(on_form, [train_yaml] + widgets, [train_yaml, status], show_progress="hidden")
        if isinstance(w, (gr.Number, gr.Textbox)):  # a pasted value fires no .input: leaving the field counts
            w.blur(on_form, [train_yaml] + widgets, [train_yaml, status], show_progress="hidden")
    # .change: typed text, a paste and the form's own rewrite alike (the form listens to .input, so no loop)
    train_yaml.change(on_yaml, [train_yaml], widgets + [status], show_progress="hidden", trigger_mode="always_last")
    load_b.click(on_load_file, [path], [train_yaml] + widgets + [file_status])
    save_b.click(on_save, [train_yaml, prepare_yaml, path], [file_status, download])
    plan_inputs = [train_yaml, plan_gpus, plan_memory, plan_config]
    for w in (train_yaml, plan_gpus, plan_memory, plan_config):  # .change: also when the form rewrites the YAML
        # first say that the plan is being recomputed (never the previous model's figures), then compute it
        w.change(H.plan_pending, None, [plan_md], show_progress="hidden", queue=False).then(
            H.memory_plan_markdown,
            plan_inputs,
            [plan_md],
            show_progress="hidden",
            trigger_mode="always_last",
            concurrency_id="memory-plan",  # one ordered queue for the four inputs: an older plan never lands last
            concurrency_limit=1,
        )
    return ConfigTab(widgets, train_yaml, prepare_yaml, status)


def on_prepare_yaml(train_text: str, *data) -> str:
    text, status = H.prepare_yaml_from(train_text, H.DataSettings(*data))
    return text


def wire_prepare_yaml(data: DataTab, cfg: ConfigTab, demo: gr.Blocks) -> None:
    """The prepare YAML follows the Data tab and the train YAML's dataset path."""
    inputs = [cfg.train_yaml] + data.settings_inputs
    for w in data.settings_inputs + [cfg.train_yaml]:
        w.change(on_prepare_yaml, inputs, [cfg.prepare_yaml], show_progress="hidden")
    demo.load(on_prepare_yaml, inputs, [cfg.prepare_yaml])


# ============================================================================================ train tab


def _progress_html(fraction: float) -> str:
    pct = max(0.0, min(1.0, float(fraction or 0))) * 100
    return (
        f'<div style="background:#eee;border-radius:4px;height:14px"><div id="run-progress" '
        f'style="width:{pct:.1f}%;background:#2ca02c;height:14px;border-radius:4px"></div></div>'
        f"<small>{pct:.0f}%</small>"
    )


def on_poll(exp_dir: str, cursor: dict, overlays: list[str] | None) -> tuple:
    before = (cursor or {}).get("offset"), (cursor or {}).get("state"), (cursor or {}).get("log_size")
    v = H.poll_run(exp_dir, cursor, overlays)
    log_size = len(v.log)
    v.cursor["state"], v.cursor["log_size"] = v.status, log_size
    v.cursor["overlays"] = list(overlays or [])
    changed = (
        before != (v.cursor["offset"], v.status, log_size) or (cursor or {}).get("overlays") != v.cursor["overlays"]
    )
    if not changed:  # nothing new: do not resend the figure every second
        return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), v.cursor
    # the machine plot exists only once figures arrive (and its GPU panels only on a GPU): hidden, never empty
    machine = gr.update(value=v.machine, visible=True) if v.machine is not None else gr.update(visible=False)
    return v.figure, v.log, v.status, _progress_html(v.progress), machine, v.cursor


def on_launch(train_text: str, prepare_text: str) -> tuple[str, str]:
    return H.launch_run(train_text, prepare_text), H.experiment_dir_of(train_text)


def on_stop(exp_dir: str) -> str:
    return H.stop_run(exp_dir)


def on_refresh_runs(runs_dir: str) -> dict:
    return gr.update(choices=H.past_runs(runs_dir))


def on_page_load(runs_dir: str, train_text: str) -> list:
    """Reattach: if a job runs under the runs dir, show it (its train YAML in the Config tab, form included);
    else follow the YAML's experiment dir."""
    from studio import jobs

    for exp in jobs.list_runs(runs_dir):
        if jobs.job_status(exp).running:
            path = Path(exp) / jobs.TRAIN_YAML
            if path.exists():
                text = path.read_text(encoding="utf-8")
                values, status, ok = H.train_yaml_to_form(text)
                if ok:
                    return [exp, text] + values
            return [exp, gr.skip()] + [gr.skip()] * len(TRAIN_FIELDS)
    return [H.experiment_dir_of(train_text), gr.skip()] + [gr.skip()] * len(TRAIN_FIELDS)


def build_train_tab(cfg: ConfigTab, runs_dir: str, demo: gr.Blocks) -> None:
    runs_state = gr.State(runs_dir)
    with gr.Row():
        exp_dir = gr.Textbox(
            "", label="experiment dir (run.experiment_dir of the train YAML)", scale=3, elem_id="exp-dir"
        )
        launch_b = gr.Button("Launch / Resume", variant="primary", elem_id="launch-button")
        stop_b = gr.Button("■ Stop (checkpoint, then exit)", variant="stop", elem_id="stop-button")
    action = gr.Markdown(elem_id="train-action")
    status = gr.Markdown(elem_id="train-status")
    progress = gr.HTML(_progress_html(0))
    plot = gr.Plot(label="training curves", elem_id="train-plot")
    machine = gr.Plot(label="the machine while it trains", elem_id="machine-plot", visible=False)
    with gr.Row():
        overlays = gr.Dropdown([], multiselect=True, label="overlay past runs", scale=4)
        refresh = gr.Button("↻ runs", size="sm")
    log = gr.Textbox(
        label="train.log (tail)",
        lines=H.LOG_TAIL_LINES,
        max_lines=H.LOG_TAIL_LINES,
        autoscroll=True,
        elem_id="train-log",
    )
    learned.build_samples_section(exp_dir)  # answers to fixed validation prompts + tracker paths (studio/learned.py)
    cursor = gr.State({})
    timer = gr.Timer(1.0)
    timer.tick(
        on_poll, [exp_dir, cursor, overlays], [plot, log, status, progress, machine, cursor], show_progress="hidden"
    )
    launch_b.click(on_launch, [cfg.train_yaml, cfg.prepare_yaml], [action, exp_dir])
    stop_b.click(on_stop, [exp_dir], [action])
    refresh.click(on_refresh_runs, [runs_state], [overlays])
    cfg.train_yaml.change(H.experiment_dir_of, [cfg.train_yaml], [exp_dir], show_progress="hidden")
    demo.load(on_page_load, [runs_state, cfg.train_yaml], [exp_dir, cfg.train_yaml] + cfg.widgets)
    demo.load(on_refresh_runs, [runs_state], [overlays])


# ============================================================================================ chat tab


def on_chat(
    model_path: str,
    base_path: str,
    compare: bool,
    template: str,
    tools_json: str,
    message: str,
    history: list[dict],
    history_base: list[dict],
    max_new_tokens: float = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    system_prompt: str = "",
    progress=gr.Progress(track_tqdm=True),  # loading a model: transformers' "Loading weights" bar, with its ETA
):
    history = list(history or [])
    history_base = list(history_base or [])
    if not (message or "").strip():
        yield history, history_base, ""
        return
    settings = dict(
        max_new_tokens=int(max_new_tokens or 64),
        temperature=float(temperature or 0.0),
        top_p=float(top_p or 1.0),
        system_prompt=system_prompt,
        tools_json=tools_json,
    )
    try:
        for reply in H.chat_stream(model_path, history, message, template, **settings):
            yield (
                history + [{"role": "user", "content": message}, {"role": "assistant", "content": reply}],
                history_base,
                "",
            )
        history = history + [{"role": "user", "content": message}, {"role": "assistant", "content": reply}]
        if compare:
            for reply_b in H.chat_stream(base_path, history_base, message, template, **settings):
                yield (
                    history,
                    history_base + [{"role": "user", "content": message}, {"role": "assistant", "content": reply_b}],
                    "",
                )
    except Exception as e:  # a bad model dir: show it in the chat rather than a traceback
        yield (
            history
            + [{"role": "user", "content": message}, {"role": "assistant", "content": f"⚠ {type(e).__name__}: {e}"}],
            history_base,
            "",
        )


def on_refresh_models(runs_dir: str, current: str | None = None) -> dict:
    models = H.chat_models(runs_dir)
    return gr.update(choices=models, value=H.default_chat_model(models, current))


def on_refresh_compared(runs_dir: str, current: str | None = None) -> dict:
    """The compared model offers the same exports as the model (an SFT run beside a DPO run), keeping its choice."""
    models = H.chat_models(runs_dir)
    return gr.update(choices=models, value=current or str(TINY_MODEL))


def on_load_models(runs_dir: str) -> dict:
    """On page load: the newest export, not the base model."""
    return on_refresh_models(runs_dir, None)


def build_chat_tab(data: DataTab, runs_dir: str, demo: gr.Blocks) -> None:
    runs_state = gr.State(runs_dir)
    with gr.Row():
        model = gr.Dropdown(
            [str(TINY_MODEL)],
            value=str(TINY_MODEL),
            label="model (export dir or base)",
            allow_custom_value=True,
            scale=3,
        )
        base = gr.Dropdown(  # the base (before vs after), or another run's export: the SFT model vs the DPO model
            [str(TINY_MODEL)],
            value=str(TINY_MODEL),
            label="compared with (the base, or another export: e.g. the SFT model beside the DPO one)",
            allow_custom_value=True,
            scale=3,
        )
        compare = gr.Checkbox(True, label="side by side")
        refresh = gr.Button("↻ models", size="sm")
    with gr.Row():
        chat = gr.Chatbot(label="model", height=360)
        chat_base = gr.Chatbot(label="compared with", height=360)
    message = gr.Textbox(label="message", placeholder="What is 5 + 37?")
    with gr.Accordion("tools (JSON list of tool schemas, passed to the template as tools=)", open=False):
        tools = gr.Code("", language="json", label="tools")
    with gr.Accordion("generation settings", open=False):
        with gr.Row():
            max_new = gr.Number(64, label="max new tokens", minimum=1, step=1, precision=0)
            temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature (0: greedy)")
            top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top-p (when sampling)")
        system = gr.Textbox("", label="system prompt (optional)", lines=2)
    send = gr.Button("Send", variant="primary")
    inputs = [model, base, compare, data.template, tools, message, chat, chat_base, max_new, temperature, top_p, system]
    send.click(on_chat, inputs, [chat, chat_base, message])
    message.submit(on_chat, inputs, [chat, chat_base, message])
    refresh.click(on_refresh_models, [runs_state, model], [model]).then(on_refresh_compared, [runs_state, base], [base])
    demo.load(on_load_models, [runs_state], [model]).then(on_refresh_compared, [runs_state, base], [base])


# ============================================================================================ the page


def build_app(runs_dir: str = "runs", train_config: str | None = None) -> gr.Blocks:
    """The whole page. Tabs are laid out in reading order; events that cross tabs are wired at the end."""
    with gr.Blocks(title="SFT Studio") as demo:
        gr.Markdown("# SFT Studio — see what is trained, then train it")
        with gr.Tabs():
            with gr.Tab("Data", id="data"):
                data = build_data_tab()
                wire_check = build_check_section(data)
                wire_loss = learned.build_loss_section(data, runs_dir, demo)  # per-token loss (studio/learned.py)
            with gr.Tab("Packing", id="packing"):
                wire_packing = build_packing_tab(data)
            with gr.Tab("Config", id="config"):
                cfg = build_config_tab(train_config)
            with gr.Tab("Train", id="train"):
                build_train_tab(cfg, runs_dir, demo)
            with gr.Tab("Chat", id="chat"):
                build_chat_tab(data, runs_dir, demo)
            with gr.Tab("Export", id="export"):
                export_panel.build_export_panel(runs_dir, demo)  # GGUF for llama.cpp / Ollama (studio/export_panel.py)
        seq_len = cfg.widget("batch.sequence_length")
        wire_data_tab(data, seq_len, demo)
        wire_check(seq_len, cfg.widget("data.truncate_documents"))
        wire_packing(seq_len, cfg.widget("batch.micro_batch_size"), demo)
        wire_prepare_yaml(data, cfg, demo)
        wire_loss(cfg.train_yaml)
    return demo
