"""Export panel: convert a finished run's HF export to GGUF (llama.cpp, Ollama) from the studio.

    export_panel.build_export_panel(runs_dir, demo)     # inside a gr.Tab; backend/gguf.py does the work

The panel lists finished exports (``export/final``, ``export/step_*``), converts the chosen one with the chosen
quantization (backend.gguf.export_gguf, the call ``python -m backend.export`` makes), shows a progress bar
and then the file's size and path. Nothing here imports torch at module level.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from backend.config import GGUF_QUANTS

QUANTS = sorted(GGUF_QUANTS, key=lambda q: q != "q8_0")  # the config's list, q8_0 first: the usual choice


def finished_exports(runs_dir: str) -> list[str]:
    """HF export directories under ``runs_dir`` (export/<name> holding config.json), newest first."""
    root = Path(runs_dir or "runs")
    found = [c.parent for c in root.glob("**/export/*/config.json")] if root.is_dir() else []
    return [str(d) for d in sorted(found, key=lambda d: d.stat().st_mtime, reverse=True)]


def human_size(n: int) -> str:
    """Bytes as text.

    >>> human_size(1_234), human_size(3_400_000), human_size(8_500_000_000)
    ('1.2 KB', '3.4 MB', '8.5 GB')
    """
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def on_export_gguf(export_dir: str, quant: str, system: str, progress=gr.Progress()) -> str:  # noqa: B008 gradio's idiom
    """Convert ``export_dir`` to GGUF; returns a Markdown line with the path and size (or the refusal)."""
    from backend.gguf import GGUFError, export_gguf

    if not export_dir:
        return "Choose a finished export first (train a run, then press ↻ exports)."
    try:  # the same export_gguf as python -m backend.export and training.export.formats
        path = export_gguf(export_dir, quant, system or None, progress=lambda f, what: progress(f, desc=what))
    except (FileNotFoundError, GGUFError, ValueError, ImportError) as e:
        return f"**Not exported:** {e}"
    size = human_size(path.stat().st_size)
    return f"**GGUF:** `{path}` ({size}); Ollama: `ollama create NAME -f {path.parent}/Modelfile`"


def build_export_panel(runs_dir: str, demo: gr.Blocks) -> None:
    runs_state = gr.State(runs_dir)
    with gr.Row():
        export = gr.Dropdown([], label="finished export (HF directory)", allow_custom_value=True, scale=3)
        quant = gr.Dropdown(QUANTS, value="q8_0", label="GGUF quantization")
        refresh = gr.Button("↻ exports", size="sm")
    system = gr.Textbox(label="system prompt for the Ollama Modelfile (optional)")
    go = gr.Button("Export GGUF", variant="primary")
    result = gr.Markdown()
    go.click(on_export_gguf, [export, quant, system], [result])

    def refresh_exports(runs):
        choices = finished_exports(runs)
        return gr.update(choices=choices, value=choices[0] if choices else None)

    refresh.click(refresh_exports, [runs_state], [export])
    demo.load(refresh_exports, [runs_state], [export])
