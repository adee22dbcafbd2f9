"""What the model learned, in the studio: per-token loss over the masked view (Data tab) and the answers written
during training (Train tab), plus where the run's experiment trackers write.

    build_loss_section(data_tab, runs_dir, demo) -> wire(train_yaml)   # Data tab, under the highlighted sample
    build_samples_section(exp_dir)                                      # Train tab, under the curves

Handlers are plain typed functions (tested without a browser). Scores come from backend.evaluate (the trainer's
collate + loss code); the highlighted sample is rendered and tokenized by the same code as the preview above it,
so the loss view colours exactly the tokens the preview calls trained. No torch import at module level.
"""

from __future__ import annotations

import html
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from studio.common import DataSettings, _load_once, get_rows, get_tokenizer, prepared_row
from studio.train_tab import experiment_dir_of

_models: dict = {}


def _scoring_model(path: str):
    """backend.evaluate.load_scoring_model once per (path, mtime)."""

    def load(path):
        from backend.evaluate import load_scoring_model  # imports torch: only here

        return load_scoring_model(path)

    return _load_once(_models, path, "dir", load)


def _run_config(exp_dir: str) -> dict:
    try:
        return yaml.safe_load((Path(exp_dir) / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}


def run_choices(runs_dir: str) -> list[str]:
    """Experiment directories under ``runs_dir`` (any depth up to 3) holding a config.yaml, newest first."""
    root = Path(runs_dir or "runs")
    found = [
        p.parent for pattern in ("*/config.yaml", "*/*/config.yaml", "*/*/*/config.yaml") for p in root.glob(pattern)
    ]
    found = [p for p in found if (p / "events.jsonl").exists()]
    found.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return [str(p) for p in found]


def model_choices(exp_dir: str) -> tuple[list[tuple[str, str]], str | None, str | None]:
    """(choices, default model, default comparison): the newest export (or checkpoint) against the base model."""
    from backend.evaluate import run_models

    if not exp_dir or not Path(exp_dir).is_dir():
        return [], None, None
    choices = run_models(exp_dir)
    model = choices[-1][1] if len(choices) > 1 else None
    base = choices[0][1] if choices and choices[0][0].startswith("base") else None
    return choices, model, base


@dataclass
class LossView:
    summary: str  # HTML: mean, end-of-turn loss, worst tokens
    tokens: str  # HTML: the tokens coloured by loss (and by change)
    status: str = ""
    mean: float = float("nan")


def _piece(tokenizer, token_id: int) -> str:
    text = tokenizer.decode([int(token_id)], skip_special_tokens=False)
    return text.replace("\n", "↵\n") if text.strip() else text.replace("\n", "↵\n").replace(" ", "·")


_BOX = (
    "font-family:ui-monospace,monospace;font-size:12px;line-height:1.9;white-space:pre-wrap;max-height:360px;"
    "overflow-y:auto;border:1px solid #ddd;padding:8px;border-radius:4px"
)


def loss_tokens_html(tokenizer, tokens, losses, delta=None, title: str = "", elem: str = "loss-tokens") -> str:
    """Every token of a document; masked ones grey, trained ones white (low loss) to red (high loss), or, with
    ``delta``, green (the loss fell) to red (it rose). Hover shows the numbers; each trained span carries
    data-loss (and data-delta)."""
    values = np.asarray(delta if delta is not None else losses, dtype=float)
    finite = np.abs(values[np.isfinite(values)])
    vmax = float(finite.max()) if finite.size else 1.0
    vmax = vmax or 1.0
    spans = []
    for t, tid in enumerate(np.asarray(tokens).tolist()):
        piece = html.escape(_piece(tokenizer, tid))
        loss = float(losses[t])
        if not math.isfinite(loss):
            spans.append(f'<span title="token {t}: masked" style="background:#f0f0f0;color:#8c8c8c">{piece}</span>')
            continue
        v = float(values[t])
        share = min(1.0, abs(v) / vmax) if math.isfinite(v) else 0.0
        g = int(255 - 200 * share)
        colour = f"rgb({g},255,{g})" if delta is not None and v < 0 else f"rgb(255,{g},{g})"
        tip = f"token {t}: loss {loss:.4f}" + (f", change {v:+.4f}" if delta is not None else "")
        extra = f' data-delta="{v:.6f}"' if delta is not None else ""
        spans.append(
            f'<span class="sft-loss" data-loss="{loss:.6f}"{extra} title="{tip}" '
            f'style="background:{colour};border-bottom:2px solid #238b45">{piece}</span>'
        )
    head = f"<div style='font-weight:600;margin:6px 0 2px'>{html.escape(title)}</div>" if title else ""
    return f"{head}<div id='{elem}' style='{_BOX}'>{''.join(spans)}</div>"


def _summary_html(tokenizer, tokens, result, other=None, other_name: str = "") -> str:
    parts = [
        f"<b>mean loss <span id='loss-mean'>{result.mean:.6f}</span></b> over {result.count} trained tokens "
        "(the trainer's loss on this document)"
    ]
    if result.eot_count:
        parts.append(
            f"end-of-turn loss {result.eot_loss:.4f} ({result.eot_count} token(s), "
            f"p = {math.exp(-result.eot_loss):.3f})"
        )
    if other is not None:
        parts.append(f"under {html.escape(other_name)}: {other.mean:.4f} (change {result.mean - other.mean:+.4f})")
    rows = "".join(
        f"<tr><td>{t}</td><td><code>{html.escape(_piece(tokenizer, tokens[t]))}</code></td><td>{loss:.4f}</td>"
        + (f"<td>{loss - other.losses[t]:+.4f}</td>" if other is not None else "")
        + "</tr>"
        for t, loss in result.worst
    )
    head = "<tr><th>#</th><th>token</th><th>loss</th>" + ("<th>change</th>" if other is not None else "") + "</tr>"
    return (
        f"<div id='loss-summary-text'>{' · '.join(parts)}</div>"
        f"<details open><summary>worst tokens</summary><table id='worst-tokens'>{head}{rows}</table></details>"
    )


def score_document(model_path: str, compare_path: str | None, tokens, trained, tokenizer, title: str) -> LossView:
    """Per-token loss of one document under ``model_path`` (and its change from ``compare_path``)."""
    from backend.chat import eot_token_ids
    from backend.evaluate import document_loss

    model = _scoring_model(model_path)
    eot = eot_token_ids(tokenizer)
    result = document_loss(model, tokens, trained, eot)
    other = document_loss(_scoring_model(compare_path), tokens, trained, eot) if compare_path else None
    delta = result.losses - other.losses if other is not None else None
    name = Path(model_path).name
    view = loss_tokens_html(tokenizer, tokens, result.losses, title=f"{title}: loss under {name}")
    if delta is not None:
        view += loss_tokens_html(
            tokenizer,
            tokens,
            result.losses,
            delta,
            title=f"change from {Path(compare_path).name} (green = lower loss now, red = higher)",
            elem="loss-delta",
        )
    return LossView(
        _summary_html(tokenizer, tokens, result, other, Path(compare_path or "").name), view, "", result.mean
    )


def sample_loss(model_path: str, compare_path: str | None, settings, index: float) -> LossView:
    """The highlighted Data-tab sample (``settings``: `studio.handlers.DataSettings`) scored: the conversation as
    prepare renders and masks it (under chat.reasoning: every_turn, which writes a row as several documents, the
    whole conversation as the template renders it). Never raises."""
    if not model_path:
        return LossView("", "", "pick a run and a checkpoint or export to score with")
    try:
        i, _, prepared, tokenizer = prepared_row(settings, index)
        if prepared.tokenized is None:
            raise ValueError(f"prepare skips row {i}: {prepared.skipped}")
        tok = prepared.tokenized
        return score_document(model_path, compare_path or None, tok.input_ids, tok.trained, tokenizer, f"sample {i}")
    except Exception as e:  # a bad path or model: say so
        return LossView("", "", f"⚠ {type(e).__name__}: {e}")


def _validation_data(exp_dir: str):
    from backend.dataset import TokenDataset

    path = ((_run_config(exp_dir).get("data") or {}).get("datasets") or {}).get("validation") or {}
    if not path.get("path"):
        raise ValueError(f"{exp_dir}: the run has no data.datasets.validation")
    return TokenDataset(path["path"], "validation")


def validation_rows(exp_dir: str, dataset: str) -> np.ndarray | None:
    """Source row of each validation document when the Data tab shows the run's input file, else None.

    prepare keeps input order within a split, so the k-th validation document is the k-th row assigned to
    validation, as long as no row was dropped (then the counts differ and None is returned)."""
    from backend.prepare import split_assignment

    try:
        data_dir = Path(_run_config(exp_dir)["data"]["datasets"]["validation"]["path"]).parent
        prep = yaml.safe_load((data_dir / "prepare_config.yaml").read_text(encoding="utf-8"))
        if Path(prep["dataset"]["path"]).resolve() != Path(dataset).resolve():
            return None
        n_rows = len(get_rows(dataset))
        splits = prep.get("splits") or {"training": 0.998, "validation": 0.002}
        assign = split_assignment(n_rows, splits, prep.get("seed", 0))
        rows = np.flatnonzero(assign == list(splits).index("validation"))
        return rows if len(rows) == len(_validation_data(exp_dir)) else None
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return None


def worst_validation(exp_dir: str, model_path: str, dataset: str, limit: float, progress=None):
    """-> (choices [(label, document)], status): validation documents by loss under the model, highest first."""
    from backend.evaluate import rank_documents

    if not model_path:
        return [], "pick a checkpoint or export first"
    try:
        data = _validation_data(exp_dir)
        model = _scoring_model(model_path)
    except Exception as e:
        return [], f"⚠ {type(e).__name__}: {e}"
    rows = validation_rows(exp_dir, dataset)
    t0 = time.perf_counter()
    ranked = rank_documents(model, data, int(limit or 100), progress=progress)
    choices = [
        (f"loss {loss:.3f} · validation doc {d}" + (f" · row {rows[d]}" if rows is not None else ""), d)
        for d, loss, _ in ranked[:50]
    ]
    return choices, f"{len(ranked)} validation documents scored in {time.perf_counter() - t0:.1f} s"


def pick_validation(exp_dir: str, model_path: str, compare_path: str | None, dataset: str, document: int | None):
    """-> (row of the Data tab or None, LossView) for a picked validation document."""
    if document is None:
        return None, LossView("", "", "")
    rows = validation_rows(exp_dir, dataset)
    if rows is not None:
        return int(rows[int(document)]), None  # the Data tab jumps there; its loss view follows
    try:
        data = _validation_data(exp_dir)
        tokens, trained = data.document(int(document))
        tokenizer = get_tokenizer(
            model_path if Path(model_path, "tokenizer_config.json").exists() else str(_base(exp_dir))
        )
        return None, score_document(model_path, compare_path, tokens, trained, tokenizer, f"validation doc {document}")
    except Exception as e:
        return None, LossView("", "", f"⚠ {type(e).__name__}: {e}")


def _base(exp_dir: str) -> str:
    return str((_run_config(exp_dir).get("pretrained") or {}).get("path") or "")


# ============================================================================================ train tab: samples


def samples_table_html(events: list[dict]) -> str:
    """One row per fixed prompt: prompt, reference, then the answer at each validation step (newest last)."""
    samples = [e for e in events if e.get("event") == "samples" and e.get("samples")]
    if not samples:
        return (
            "<p id='samples-empty'>No sample answers yet "
            "(training.evaluations.samples: N writes them at each validation).</p>"
        )
    steps = [e["step"] for e in samples]
    prompts = samples[-1]["samples"]
    head = "<tr><th>prompt</th><th>reference</th>" + "".join(f"<th>step {s}</th>" for s in steps) + "</tr>"
    body = []
    for k, p in enumerate(prompts):
        cells = []
        for e in samples:
            s = e["samples"][k] if k < len(e["samples"]) else {}
            answer = html.escape(s.get("answer", ""))
            mark = "" if s.get("stopped", True) else " <i title='no end-of-turn token'>…</i>"
            match = " style='background:#e5f5e0'" if s.get("answer") == p.get("reference") else ""
            cells.append(f"<td{match}>{answer}{mark}</td>")
        body.append(
            f"<tr><td>{html.escape(p.get('prompt', '')).replace(chr(10), '<br>')}</td>"
            f"<td>{html.escape(p.get('reference', ''))}</td>"
            f"{''.join(cells)}</tr>"
        )
    return (
        "<div style='overflow-x:auto'><table id='samples-table' style='font-size:12px'>"
        f"{head}{''.join(body)}</table></div>"
    )


def trackers_markdown(exp_dir: str) -> str:
    from backend.trackers import tracker_locations

    names = (_run_config(exp_dir).get("run") or {}).get("trackers") or []
    if not names:
        return ""
    where = tracker_locations(exp_dir, names)
    lines = [
        f"- **{n}**: `{p}`" + (f" — `tensorboard --logdir {p}`" if n == "tensorboard" else "") for n, p in where.items()
    ]
    return "**Trackers**\n" + "\n".join(lines)


def poll_samples(exp_dir: str, cursor: dict | None) -> tuple[str | None, str | None, dict]:
    """Timer tick: (table HTML, trackers markdown, cursor), None where nothing changed."""
    from backend.events import read_events

    cursor = dict(cursor or {})
    if cursor.get("exp") != exp_dir:
        cursor = {"exp": exp_dir, "offset": 0, "events": [], "shown": None}
    new, cursor["offset"] = read_events(Path(exp_dir or ".") / "events.jsonl", cursor["offset"])
    cursor["events"] = cursor["events"] + [e for e in new if e.get("event") in ("samples", "start")]
    key = (exp_dir, len(cursor["events"]))
    if cursor.get("shown") == key:
        return None, None, cursor
    cursor["shown"] = key
    return samples_table_html(cursor["events"]), trackers_markdown(exp_dir), cursor


# ============================================================================================ gradio layout


def build_loss_section(data, runs_dir: str, demo):
    """Lay out 'What the model learned' under the Data tab's preview; returns wire(train_yaml)."""
    import gradio as gr

    with gr.Accordion("What the model learned: per-token loss of this sample", open=True):
        with gr.Row():
            run = gr.Dropdown(run_choices(runs_dir), label="run", allow_custom_value=True, scale=3, elem_id="loss-run")
            model = gr.Dropdown([], label="score with (checkpoint or export)", scale=3, elem_id="loss-model")
            compare = gr.Dropdown([], label="compare with (base or earlier)", scale=3, elem_id="loss-compare")
            refresh = gr.Button("↻", size="sm", elem_id="loss-refresh", min_width=40)
            score = gr.Button("Score this sample", variant="primary", elem_id="loss-button")
        status = gr.Markdown(elem_classes="sft-status", elem_id="loss-status")
        summary = gr.HTML(elem_id="loss-summary")
        tokens = gr.HTML(elem_id="loss-view")
        with gr.Row():
            limit = gr.Number(100, label="validation documents to rank", precision=0)
            worst_b = gr.Button("Highest-loss validation samples", elem_id="worst-button")
            worst = gr.Dropdown([], label="open one", interactive=True, scale=3, elem_id="worst-pick")
        worst_status = gr.Markdown(elem_id="worst-status")

    sample_inputs = [model, compare, data.index] + data.settings_inputs

    def on_run(exp_dir: str):
        choices, default, base = model_choices(exp_dir)
        return gr.update(choices=choices, value=default), gr.update(choices=[("none", "")] + choices, value=base)

    def on_score(model_path, compare_path, index, *data):
        v = sample_loss(model_path, compare_path, DataSettings(*data), index)
        return v.summary, v.tokens, v.status

    def on_index(*args):
        return on_score(*args) if args[0] else (gr.skip(), gr.skip(), gr.skip())

    def on_worst(exp_dir, model_path, dataset, n, progress=gr.Progress()):  # noqa: B008 - gradio injects it
        def report(i, total):
            if i % 10 == 0 or i == total:
                progress((i, total), desc="scoring validation documents")

        choices, message = worst_validation(exp_dir, model_path, dataset, n, report)
        return gr.update(choices=choices, value=None), message

    def on_pick(exp_dir, model_path, compare_path, dataset, document):
        row, view = pick_validation(exp_dir, model_path, compare_path, dataset, document)
        if row is not None:
            return row, gr.skip(), gr.skip(), gr.skip()
        return gr.skip(), view.summary, view.tokens, view.status

    run.change(on_run, [run], [model, compare])
    refresh.click(on_run, [run], [model, compare])  # new checkpoints and exports of a running job
    score.click(on_score, sample_inputs, [summary, tokens, status])
    data.index.change(on_index, sample_inputs, [summary, tokens, status], trigger_mode="always_last")
    worst_b.click(on_worst, [run, model, data.dataset, limit], [worst, worst_status])
    worst.input(on_pick, [run, model, compare, data.dataset, worst], [data.index, summary, tokens, status])

    def wire(train_yaml):
        def follow(text):  # the run of the Config tab's YAML, when it exists
            exp = experiment_dir_of(text)
            return gr.update(choices=sorted(set(run_choices(runs_dir)) | ({exp} if exp else set())), value=exp)

        train_yaml.change(follow, [train_yaml], [run], show_progress="hidden")
        demo.load(follow, [train_yaml], [run])

    return wire


def build_samples_section(exp_dir) -> None:
    """Under the Train tab's curves: the answers table (filled from `samples` events) and the trackers' paths."""
    import gradio as gr

    with gr.Accordion("Answers during training (fixed validation prompts, greedy)", open=True):
        trackers = gr.Markdown(elem_id="trackers-info")
        table = gr.HTML(samples_table_html([]), elem_id="samples")
    cursor = gr.State({})
    timer = gr.Timer(2.0)

    def on_tick(exp: str, c: dict):
        html_, md, c = poll_samples(exp, c)
        return (gr.skip() if html_ is None else html_), (gr.skip() if md is None else md), c

    timer.tick(on_tick, [exp_dir, cursor], [table, trackers, cursor], show_progress="hidden")


# ============================================================================================ progress while waiting
