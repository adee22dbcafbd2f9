"""How long GGUF export takes (backend/gguf.py), on the tiny model and on a wider random Llama, extrapolated to 8B.

    python bench/bench_gguf.py [--repeats 3] [--hidden 1024] [--layers 4]

For each model and quantization: the median wall time of ``export_gguf`` (converter subprocess + check + Modelfile),
and of the converter alone. The 8B estimate scales the wider model's converter time by parameter count (the
converter reads every weight once and writes it once: linear in the weights), plus the fixed start-up cost
measured on the tiny model. Needs llama-cpp-python and the converter (``bash scripts/dev.sh llama-cpp``).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from backend import TINY_MODEL
from backend.gguf import convert, export_gguf

PARAMS_8B = 8.03e9  # Llama-3.1-8B


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def wide_model(dst: Path, hidden: int, layers: int) -> int:
    """The tiny model's tokenizer with a wider random Llama (bf16 on disk); returns its parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shutil.copytree(TINY_MODEL, dst)
    src = LlamaConfig.from_pretrained(TINY_MODEL)
    config = LlamaConfig(
        **{k: getattr(src, k) for k in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")},
        hidden_size=hidden,
        intermediate_size=int(3.5 * hidden),
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 256),
        tie_word_embeddings=False,
    )
    import torch

    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(dst)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tiny = Path(tmp) / "tiny"
        shutil.copytree(TINY_MODEL, tiny)
        wide = Path(tmp) / "wide"
        n_wide = wide_model(wide, args.hidden, args.layers)
        fixed = None
        for name, hf_dir, n in (("tiny", tiny, None), (f"wide ({n_wide / 1e6:.0f}M params)", wide, n_wide)):
            for quant in ("f16", "q8_0", "q4_k_m"):
                out = Path(tmp) / f"{name[:4]}-{quant}.gguf"
                t_conv = median_time(lambda: convert(hf_dir, out, quant), args.repeats)  # noqa: B023
                t_all = median_time(lambda: export_gguf(hf_dir, quant), args.repeats)  # noqa: B023
                size = out.stat().st_size / 1e6
                print(f"{name:24s} {quant:7s} converter {t_conv:6.2f} s   export_gguf {t_all:6.2f} s   {size:8.1f} MB")
                if n is None:  # start-up cost (python, torch, the converter's imports): the tiny model's fastest
                    fixed = t_conv if fixed is None else min(fixed, t_conv)
                if n is not None:
                    per_param = (t_conv - fixed) / n
                    print(f"{'':24s} {quant:7s} 8B estimate: {fixed + per_param * PARAMS_8B:8.0f} s (linear)")


if __name__ == "__main__":
    main()
