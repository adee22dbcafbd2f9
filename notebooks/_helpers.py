"""Display helpers shared by the notebooks (HTML token views, a work directory, a guarded call).

Only presentation lives here; everything that decides what is trained, packed or logged is in `backend/`.

    from _helpers import work_dir, tokens_html, call_with_timeout
    WORK_DIR = work_dir()                      # $SFT_NOTEBOOK_WORKDIR or runs/notebooks (created)
    display(HTML(tokens_html(tokenizer, tok.input_ids, tok.trained)))
    finished, result = call_with_timeout(get_spans, (text, start, end), timeout=3.0)
"""

from __future__ import annotations

import html
import multiprocessing
import os
import queue
from pathlib import Path

import numpy as np

TRAINED_STYLE = "background:#c7e9c0;color:#00441b;border-bottom:2px solid #238b45"
MASKED_STYLE = "background:#f0f0f0;color:#737373"
_BOX = ("font-family:ui-monospace,Menlo,monospace;font-size:12px;line-height:1.9;white-space:pre-wrap;"
        "border:1px solid #ddd;padding:8px;border-radius:4px")
_TOKEN = "padding:1px 0;margin-right:1px;border-radius:2px"


def work_dir() -> Path:
    """Where the notebooks write: ``$SFT_NOTEBOOK_WORKDIR`` (tests point it at a tmp dir) or ``runs/notebooks``."""
    path = Path(os.environ.get("SFT_NOTEBOOK_WORKDIR") or "runs/notebooks")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _piece(tokenizer, token_id: int) -> str:
    # decode each id alone: byte-level BPE pieces of a multi-byte character may show as '�', which is honest
    text = tokenizer.decode([int(token_id)], skip_special_tokens=False)
    return text.replace("\n", "↵\n") if text.strip() else text.replace("\n", "↵\n").replace(" ", "·")


def tokens_html(tokenizer, input_ids, trained, values=None, vmax=None, title: str | None = None) -> str:
    """One box with every token of a sample: trained tokens green, masked tokens grey.

    With ``values`` (one float per token, e.g. the per-token loss, NaN where there is none) trained tokens are
    shaded from white (0) to red (``vmax``, default the largest value) and the value shows on hover.
    ``input_ids``/``trained``: (T,) arrays as in `backend.chat.TokenizedSample`.
    """
    ids = np.asarray(input_ids).tolist()
    trained = np.asarray(trained, dtype=bool).tolist()
    if values is not None:
        values = np.asarray(values, dtype=float)
        finite = values[np.isfinite(values)]
        vmax = float(vmax if vmax is not None else (finite.max() if finite.size else 1.0)) or 1.0
    spans = []
    for t, (tid, is_trained) in enumerate(zip(ids, trained)):
        piece = html.escape(_piece(tokenizer, tid))
        tip = f"token {t}: id {tid}, {'trained' if is_trained else 'masked'}"
        style = TRAINED_STYLE if is_trained else MASKED_STYLE
        if values is not None and np.isfinite(values[t]):
            share = min(1.0, max(0.0, values[t] / vmax))
            g = int(255 - 200 * share)
            style = f"background:rgb(255,{g},{g});color:#000;border-bottom:2px solid #238b45"
            tip += f", loss {values[t]:.3f}"
        spans.append(f'<span title="{html.escape(tip)}" style="{style};{_TOKEN}">{piece}</span>')
    head = f"<div style='font-weight:600;margin:6px 0 2px'>{html.escape(title)}</div>" if title else ""
    return f"{head}<div style='{_BOX}'>{''.join(spans)}</div>"


def legend_html(loss: bool = False) -> str:
    if loss:
        return (f"<span style='{TRAINED_STYLE};{_TOKEN}'>trained: white = low loss</span> "
                f"<span style='background:rgb(255,55,55);{_TOKEN}'>red = high loss</span> "
                f"<span style='{MASKED_STYLE};{_TOKEN}'>masked (not a target)</span>")
    return (f"<span style='{TRAINED_STYLE};{_TOKEN}'>trained (a loss target)</span> "
            f"<span style='{MASKED_STYLE};{_TOKEN}'>masked</span> (hover a token for its id)")


def chars_html(text: str, trained_spans) -> str:
    """The rendered text with the trained half-open character ranges highlighted (before tokenization)."""
    out, pos = [], 0
    for b, e in sorted(trained_spans):
        out.append(f"<span style='{MASKED_STYLE}'>{html.escape(text[pos:b])}</span>")
        out.append(f"<span style='{TRAINED_STYLE}'>{html.escape(text[b:e])}</span>")
        pos = e
    out.append(f"<span style='{MASKED_STYLE}'>{html.escape(text[pos:])}</span>")
    return f"<div style='{_BOX}'>{''.join(out)}</div>"


def table_html(rows: list[dict]) -> str:
    """A plain HTML table from a list of dicts (same keys); cell text is escaped, newlines kept."""
    if not rows:
        return "<p>(no rows)</p>"
    keys = list(rows[0])
    head = "".join(f"<th style='text-align:left;padding:4px 8px'>{html.escape(str(k))}</th>" for k in keys)
    body = "".join(
        "<tr>" + "".join(f"<td style='vertical-align:top;padding:4px 8px;white-space:pre-wrap;"
                         f"font-family:ui-monospace,monospace;font-size:12px'>{html.escape(str(r[k]))}</td>"
                         for k in keys) + "</tr>"
        for r in rows)
    return f"<table style='border-collapse:collapse'><tr>{head}</tr>{body}</table>"


def _child(q, fn, args):
    q.put(fn(*args))


def call_with_timeout(fn, args=(), timeout: float = 3.0):
    """Run ``fn(*args)`` in a forked child process; return ``(True, result)`` or ``(False, None)`` if it had not
    returned after ``timeout`` seconds (the child is then killed, so a non-terminating loop costs nothing).

    Fork (not spawn) so that functions defined in a notebook cell work without pickling them.
    """
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q, fn, args), daemon=True)
    p.start()
    try:
        result = q.get(timeout=timeout)
        finished = True
    except queue.Empty:
        result, finished = None, False
    if p.is_alive() and not finished:
        p.kill()
    p.join(timeout=5)
    return finished, result


def loss_figure(events: list[dict], title: str = "loss"):
    """Plotly figure of an events.jsonl list: train loss (line), validation loss (markers), a dotted line at each
    (re)start and a tick at each checkpoint. Events are dicts as written by `backend.events.EventLog`."""
    import plotly.graph_objects as go

    train = [e for e in events if e.get("event") == "train"]
    valid = [e for e in events if e.get("event") == "validation"]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[e["step"] for e in train], y=[e["loss"] for e in train], mode="lines+markers",
                             marker=dict(size=4), name="train loss"))
    fig.add_trace(go.Scatter(x=[e["step"] for e in valid], y=[e["loss"] for e in valid], mode="markers+lines",
                             marker=dict(size=9, symbol="diamond"), name="validation loss"))
    for e in events:
        if e.get("event") == "start":
            label = f"resumed at {e['step']}" if e.get("resumed_from") else "start"
            fig.add_vline(x=e["step"], line_dash="dot", line_color="#888", annotation_text=label)
        elif e.get("event") == "checkpoint":
            fig.add_vline(x=e["step"], line_width=1, line_color="#2ca02c", opacity=0.4)
    last = train[-1] if train else {}
    if last:
        title += f" · step {last['step']}, loss {last['loss']:.3f}, {last.get('tokens_per_s', 0):,.0f} tokens/s"
    fig.update_layout(title=title, xaxis_title="step", yaxis_title="loss (mean over trained tokens)", height=360,
                      template="plotly_white")
    return fig
