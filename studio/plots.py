"""Plotly figures for the studio: length histogram, one packed micro-batch, a block mask, training curves.

Pure functions from plain data (lists, numpy arrays, event dicts) to ``plotly.graph_objects.Figure``.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

# Cell codes of the packed-batch heatmap.
PAD, MASKED_A, TRAINED_A, MASKED_B, TRAINED_B = 0, 1, 2, 3, 4
_PACK_COLORS = ["#f2f2f2", "#c6dbef", "#2171b5", "#fdd0a2", "#d94801"]
_PACK_NAMES = ["padding", "doc (even) masked", "doc (even) trained", "doc (odd) masked", "doc (odd) trained"]


def _layout(fig: go.Figure, title: str, height: int = 320) -> go.Figure:
    fig.update_layout(title=title, height=height, margin=dict(l=50, r=20, t=50, b=40), template="plotly_white")
    return fig


def length_histogram(lengths, sequence_length: int | None, title: str = "Document length (tokens)") -> go.Figure:
    """Histogram of tokens per document with a vertical line at ``sequence_length``."""
    lengths = np.asarray(lengths)
    fig = go.Figure(go.Histogram(x=lengths, nbinsx=50, marker_color="#4c78a8", name="documents"))
    if sequence_length:
        fig.add_vline(
            x=sequence_length,
            line_color="#d62728",
            line_dash="dash",
            annotation_text=f"sequence_length {sequence_length}",
            annotation_position="top right",
        )
    fig.update_xaxes(title="tokens")
    fig.update_yaxes(title="documents")
    return _layout(fig, title)


def packed_batch_figure(codes: np.ndarray, hover: list[list[str]], title: str) -> go.Figure:
    """Heatmap of a packed micro-batch. ``codes``: (rows, L) ints in PAD..TRAINED_B; ``hover``: (rows, L) text."""
    n = len(_PACK_COLORS)
    # A discrete colorscale: each code gets a flat band.
    scale = []
    for i, c in enumerate(_PACK_COLORS):
        scale += [[i / n, c], [(i + 1) / n, c]]
    fig = go.Figure(
        go.Heatmap(
            z=codes,
            zmin=-0.5,
            zmax=n - 0.5,
            colorscale=scale,
            text=hover,
            hoverinfo="text",
            xgap=0,
            ygap=2,
            showscale=False,
        )
    )
    for name, color in zip(
        _PACK_NAMES, _PACK_COLORS, strict=False
    ):  # a legend of colored squares instead of a colorbar
        fig.add_trace(
            go.Scatter(
                x=[None],
                y=[None],
                mode="markers",
                name=name,
                marker=dict(symbol="square", size=12, color=color, line=dict(color="#999", width=1)),
            )
        )
    fig.update_layout(legend=dict(orientation="h", y=1.02, yanchor="bottom", x=1, xanchor="right"))
    fig.update_yaxes(autorange="reversed", title="row", tickmode="linear", dtick=1)
    fig.update_xaxes(title="position")
    fig = _layout(fig, title, height=max(260, 110 + 40 * codes.shape[0]))
    fig.update_layout(margin=dict(t=90))
    return fig


def block_mask_figure(mask: np.ndarray, title: str) -> go.Figure:
    """(L, L) bool: query i may attend to key j. Drawn dark where attention is allowed."""
    fig = go.Figure(
        go.Heatmap(
            z=mask.astype(np.int8),
            colorscale=[[0, "#ffffff"], [1, "#08306b"]],
            showscale=False,
            hovertemplate="query %{y}, key %{x}: %{z}<extra></extra>",
        )
    )
    fig.update_yaxes(autorange="reversed", title="query position")
    fig.update_xaxes(title="key position")
    return _layout(fig, title, height=420)


def training_figure(runs: dict[str, list[dict]], title: str = "") -> go.Figure:
    """Loss (train solid, validation dashed + markers), learning rate and tokens/s for one or more runs.

    ``runs``: {"run name": [event dicts from events.jsonl]}; the first run is the live one.
    """
    # DPO runs (train events with a margin) get a second row: reward margin and preference accuracy, live
    dpo = any(e.get("event") == "train" and "margin" in e for events in runs.values() for e in events)
    titles = ("loss", "learning rate", "tokens/s") + (
        ("reward margin", "accuracy (chosen > rejected)", "") if dpo else ()
    )
    fig = make_subplots(
        rows=2 if dpo else 1, cols=3, subplot_titles=titles, horizontal_spacing=0.07, vertical_spacing=0.18
    )
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    for k, (name, events) in enumerate(runs.items()):
        if dpo:
            _preference_traces(fig, name, events, palette[k % len(palette)])
        color = palette[k % len(palette)]
        train = [e for e in events if e.get("event") == "train" and _finite(e.get("loss"))]
        val = [e for e in events if e.get("event") == "validation" and _finite(e.get("loss"))]
        steps = [e["step"] for e in train]
        fig.add_trace(
            go.Scatter(
                x=steps,
                y=[e["loss"] for e in train],
                mode="lines+markers",
                marker_size=4,
                name=f"{name} train",
                line_color=color,
                legendgroup=name,
            ),
            row=1,
            col=1,
        )
        if val:
            fig.add_trace(
                go.Scatter(
                    x=[e["step"] for e in val],
                    y=[e["loss"] for e in val],
                    mode="lines+markers",
                    name=f"{name} validation",
                    line=dict(color=color, dash="dash"),
                    marker_symbol="diamond",
                    legendgroup=name,
                ),
                row=1,
                col=1,
            )
        fig.add_trace(
            go.Scatter(
                x=steps,
                y=[e.get("lr") for e in train],
                mode="lines",
                name=f"{name} lr",
                line_color=color,
                showlegend=False,
                legendgroup=name,
            ),
            row=1,
            col=2,
        )
        fig.add_trace(
            go.Scatter(
                x=steps,
                y=[e.get("tokens_per_s") for e in train],
                mode="lines",
                name=f"{name} tokens/s",
                line_color=color,
                showlegend=False,
                legendgroup=name,
            ),
            row=1,
            col=3,
        )
    fig.update_xaxes(title="step")
    fig.update_layout(legend=dict(orientation="h", y=-0.15 if dpo else -0.25))
    return _layout(fig, title, height=620 if dpo else 360)


def _preference_traces(fig: go.Figure, name: str, events: list[dict], color: str) -> None:
    """Row 2 of a DPO run's figure: margin and accuracy, train solid, validation dashed."""
    for col, key in ((1, "margin"), (2, "accuracy")):
        for kind, dash in (("train", "solid"), ("validation", "dash")):
            points = [e for e in events if e.get("event") == kind and _finite(e.get(key))]
            if points:
                fig.add_trace(
                    go.Scatter(
                        x=[e["step"] for e in points],
                        y=[e[key] for e in points],
                        mode="lines+markers",
                        marker_size=4,
                        name=f"{name} {kind} {key}",
                        line=dict(color=color, dash=dash),
                        showlegend=False,
                        legendgroup=name,
                    ),
                    row=2,
                    col=col,
                )


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and np.isfinite(x)


def resource_figure(train_events: list[dict], planned_peak_bytes: int | None = None) -> go.Figure | None:
    """The machine during a run, from the ``train`` events' resource figures (backend/resources.py): host RAM and
    CPU, the run directory's disk, and per rank GPU memory (allocated, reserved) beside the planner's peak, and GPU
    utilization. The GPU panels exist only when the events carry GPU figures (absent on CPU, never empty). None when
    no event has resource figures yet."""
    events = [e for e in train_events if "host_ram_used_bytes" in e]
    if not events:
        return None
    gib = 2**30
    steps = [e["step"] for e in events]
    gpu = any("gpu_allocated_bytes" in e for e in events)
    util = any("gpu_utilization" in e for e in events)
    titles = ["host RAM used (GiB)", "CPU (%)", "run directory on disk (GiB)"]
    if gpu:
        titles.append("GPU memory per rank (GiB)")
    if util:
        titles.append("GPU utilization per rank (%)")
    fig = make_subplots(rows=len(titles), cols=1, shared_xaxes=True, subplot_titles=titles, vertical_spacing=0.08)
    fig.add_trace(go.Scatter(x=steps, y=[e["host_ram_used_bytes"] / gib for e in events], name="host RAM used"), 1, 1)
    fig.add_trace(go.Scatter(x=steps, y=[e["cpu_percent"] for e in events], name="CPU %"), 2, 1)
    fig.add_trace(go.Scatter(x=steps, y=[e["run_dir_bytes"] / gib for e in events], name="run dir"), 3, 1)
    row = 4
    if gpu:
        gpu_events = [e for e in events if "gpu_allocated_bytes" in e]
        for rank in range(len(gpu_events[0]["gpu_allocated_bytes"])):
            x = [e["step"] for e in gpu_events]
            for key, dash in (
                ("gpu_allocated_bytes", "solid"),
                ("gpu_reserved_bytes", "dot"),
                ("gpu_peak_bytes", "dash"),
            ):
                if not all(key in e for e in gpu_events):
                    continue
                y = [e[key][rank] / gib for e in gpu_events]  # peak: the interval's highest, what the plan predicts
                fig.add_trace(go.Scatter(x=x, y=y, name=f"rank {rank} {key[4:-6]}", line_dash=dash), row, 1)
        if planned_peak_bytes:
            fig.add_hline(
                y=planned_peak_bytes / gib,
                line_color="#d62728",
                line_dash="dash",
                annotation_text=f"planned peak {planned_peak_bytes / gib:.1f} GiB",
                row=row,
                col=1,
            )
        row += 1
    if util:
        util_events = [e for e in events if "gpu_utilization" in e]
        for rank in range(len(util_events[0]["gpu_utilization"])):
            y = [e["gpu_utilization"][rank] for e in util_events]
            fig.add_trace(go.Scatter(x=[e["step"] for e in util_events], y=y, name=f"rank {rank} util %"), row, 1)
    fig.update_xaxes(title="step", row=len(titles), col=1)
    return _layout(fig, "Machine", height=180 * len(titles))
