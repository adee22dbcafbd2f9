"""Training throughput of backend.train: trained tokens/s and model-FLOPs utilization against this machine's own
fp32 matmul rate, measured in the same run.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_train.py [--steps 4] [--repeats 3] [--sequence-length 1024]
                                                           [--batch-size 2] [--impl fused]

Model: a random Llama built locally from LlamaConfig (hidden 512, 8 layers, 8 heads, 4 KV heads, MLP 1376,
vocabulary 8,000, tied embeddings: ~29M parameters), the tiny-llama tokenizer copied beside it (only the export
reads it). Data: 3,000 synthetic documents of random token ids, lognormal lengths (median 300, sigma 0.75, at
most sequence_length), the last ~60% of each document trained. Each repeat is a fresh `train()` run of `--steps`
optimizer steps (batch_size rows of sequence_length, micro-batch 1, fp32, sdpa); the first step is warm-up and
not counted. Figures are medians over the repeats:

    tokens/s          positions through the model per second of step compute (padding included)
    trained tokens/s  trained targets per second
    MFU               6 * N * tokens/s / measured fp32 matmul FLOP/s (N = all parameters; the 6*N rule ignores
                      attention's L^2 term, which is small at L=1024 for hidden 512)
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from backend import TINY_MODEL  # noqa: E402
from bench.common import matmul_peak_flops  # noqa: E402


def build_model(out: Path, vocab: int, seed: int = 0) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=vocab,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=1000,
        eos_token_id=1001,
        pad_token_id=1002,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(TINY_MODEL / name, out / name)
    return sum(p.numel() for p in model.parameters())


def build_data(out: Path, vocab: int, sequence_length: int, n: int = 3000, seed: int = 0) -> dict:
    from backend.dataset import ShardWriter

    rng = np.random.default_rng(seed)
    counts = {}
    for split, docs in (("training", n), ("validation", 50)):
        with ShardWriter(out, split, vocab_size=vocab) as writer:
            for _ in range(docs):
                length = int(np.clip(rng.lognormal(np.log(300), 0.75), 8, sequence_length))
                tokens = rng.integers(0, vocab, length)
                trained = np.arange(length) >= int(length * 0.4)
                writer.add(tokens, trained)
        counts[split] = writer.counts()
    return counts


def run_once(model_dir: Path, data_dir: Path, run_dir: Path, args) -> dict:
    from backend.events import read_events
    from backend.train import train

    train(
        Path(__file__).resolve().parent.parent / "assets" / "configs" / "tiny_train.yaml",
        [
            f"pretrained.path={model_dir}",
            f"data.datasets.training.path={data_dir / 'fast_llm_config_training.yaml'}",
            f"data.datasets.validation.path={data_dir / 'fast_llm_config_validation.yaml'}",
            f"run.experiment_dir={run_dir}",
            f"training.train_iters={args.steps}",
            "training.logs.interval=1",
            "training.evaluations.validation.interval=0",
            f"training.checkpoint.interval={10**6}",
            f"batch.sequence_length={args.sequence_length}",
            f"batch.batch_size={args.batch_size}",
            "batch.micro_batch_size=1",
            f"model.base_model.cross_entropy_impl={args.impl}",
            "optimizer.learning_rate.warmup_iterations=0",
            f"optimizer.learning_rate.decay_iterations={args.steps}",
        ],
    )
    events, _ = read_events(run_dir / "events.jsonl")
    steps = [e for e in events if e["event"] == "train"][1:]  # first step: warm-up (allocations, lazy init)
    return {
        "tokens_per_s": statistics.median(e["tokens_per_s"] for e in steps),
        "trained_tokens_per_s": statistics.median(e["trained_tokens_per_s"] for e in steps),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sequence-length", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--impl", choices=("fused", "torch"), default="fused")
    args = ap.parse_args()

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n_params = build_model(tmp / "model", args.vocab)
        build_data(tmp / "data", args.vocab, args.sequence_length)
        results, peaks = [], []
        for r in range(args.repeats):
            # the matmul rate is measured between the runs, so that machine load affects both alike
            peaks.append(matmul_peak_flops(1024, seconds=1.0))
            results.append(run_once(tmp / "model", tmp / "data", tmp / f"run{r}", args))
    peak = statistics.median(peaks)
    tps = statistics.median(r["tokens_per_s"] for r in results)
    trained = statistics.median(r["trained_tokens_per_s"] for r in results)
    mfu = 6 * n_params * tps / peak
    print(
        f"\nbackend.train, random Llama {n_params / 1e6:.1f}M params, vocab {args.vocab}, "
        f"{args.batch_size} x {args.sequence_length} tokens/step, micro-batch 1, fp32, {args.impl} CE, "
        f"torch threads {torch.get_num_threads()}, medians of {args.repeats}"
    )
    print(f"| {'measure':28s} | {'value':>12s} |")
    print(f"|{'-' * 30}|{'-' * 14}|")
    print(f"| {'fp32 matmul FLOP/s (peak)':28s} | {peak / 1e9:9.1f} G |")
    print(f"| {'tokens/s':28s} | {tps:12,.0f} |")
    print(f"| {'trained tokens/s':28s} | {trained:12,.0f} |")
    print(f"| {'model FLOP/s (6*N*tokens/s)':28s} | {6 * n_params * tps / 1e9:9.1f} G |")
    print(f"| {'MFU (vs matmul peak)':28s} | {mfu:11.1%} |")
    print("per repeat tokens/s: " + ", ".join(f"{r['tokens_per_s']:,.0f}" for r in results))


if __name__ == "__main__":
    main()
