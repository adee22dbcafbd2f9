"""Export formats converted from a finished Hugging Face export (the HF export itself is backend/checkpoint.py's).

    python -m backend.export RUN_DIR [--step N] --gguf [--quant f16|bf16|q8_0|q4_k_m] [--system TEXT]

RUN_DIR/export/final (or export/step_<N>) must be a finished HF export; for a LoRA run that directory is the
merged model (backend/lora.py), so the GGUF holds base + adapters. During training,
``training.export.formats: [hf, gguf]`` converts the final export the same way (``convert_formats``), with
``training.export.gguf_quant``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from backend.checkpoint import step_dir_name
from backend.config import GGUF_QUANTS


def export_dir(run_dir, step: int | None = None) -> Path:
    """The finished HF export of a run: export/final, or export/step_<N> (raises naming what exists)."""
    root = Path(run_dir) / "export"
    path = root / ("final" if step is None else step_dir_name(step))
    if not (path / "config.json").is_file():
        found = sorted(p.name for p in root.iterdir() if (p / "config.json").is_file()) if root.is_dir() else []
        raise FileNotFoundError(
            f"{path} is not a finished Hugging Face export (no config.json); exports of {run_dir}: "
            f"{', '.join(found) or 'none'}"
        )
    return path


def convert_formats(hf_dir, formats: list[str], gguf_quant: str, system: str | None = None) -> dict[str, str]:
    """Run each requested converter on the finished HF export ``hf_dir``: {format: path written}."""
    written = {}
    if "gguf" in formats:
        from backend.gguf import export_gguf

        written["gguf"] = str(export_gguf(hf_dir, gguf_quant, system))
    return written


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend.export", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="A run directory (holds export/final or export/step_<N>).")
    parser.add_argument("--step", type=int, default=None, help="Convert export/step_<N> instead of export/final.")
    parser.add_argument("--gguf", action="store_true", help="Write a GGUF (llama.cpp, Ollama) and a Modelfile.")
    parser.add_argument("--quant", default="q8_0", choices=GGUF_QUANTS, help="GGUF weights.")
    parser.add_argument("--system", default=None, help="System prompt for the Ollama Modelfile (SYSTEM line).")
    args = parser.parse_args(argv)
    if not args.gguf:
        parser.error("choose a format: --gguf")
    from backend.gguf import GGUFError

    try:
        hf_dir = export_dir(args.run_dir, args.step)
        start = time.perf_counter()
        written = convert_formats(hf_dir, ["hf", "gguf"], args.quant, args.system)
    except (FileNotFoundError, GGUFError, ValueError) as e:
        print(f"export: {e}", file=sys.stderr)
        return 2
    path = Path(written["gguf"])
    print(json.dumps({"gguf": str(path), "bytes": path.stat().st_size, "seconds": time.perf_counter() - start}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
