"""Packing fill and speed: greedy next-fit (the guide's Fast-LLM `truncate_documents: no`, baseline) vs best-fit
decreasing within windows, and the truncating stream.

    python bench/bench_packing.py [--documents 300000] [--sequence-length 4096] [--window 1000] [--repeats 3]

Lengths: a long-tailed multi-turn-chat-like distribution, lognormal with median 1,000 tokens and sigma 1.0
(so about 2% of documents are longer than 8,000 tokens), at least 1 token, seed 0. Times are medians of
`--repeats` runs of `pack()` on the whole set (the PackedSampler packs one epoch this way).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from backend.packing import pack  # noqa: E402


def chat_lengths(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.maximum(1, rng.lognormal(np.log(1000), 1.0, n)).astype(np.int64)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--documents", type=int, default=300_000)
    ap.add_argument("--sequence-length", type=int, default=4096)
    ap.add_argument("--window", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    lengths = chat_lengths(a.documents)
    L = a.sequence_length
    print(
        f"{a.documents:,} documents, median {int(np.median(lengths)):,} tokens, "
        f"{(lengths > 8000).mean():.1%} over 8,000, {(lengths > L).mean():.1%} over {L:,}; "
        f"{int(lengths.sum()):,} tokens; sequence_length {L:,}"
    )
    cases = [
        ("greedy (baseline)", dict(strategy="greedy")),
        (f"best_fit window {a.window}", dict(strategy="best_fit", window=a.window)),
        ("best_fit whole set", dict(strategy="best_fit", window=a.documents)),
        ("truncate_documents", dict(truncate_documents=True)),
    ]
    print(
        f"{'packing':<26}{'rows':>10}{'fill':>8}{'vs greedy':>10}{'docs skipped':>15}{'tokens skipped':>19}"
        f"{'cont. pieces':>14}{'time s (med)':>14}"
    )
    base = None
    for name, kw in cases:
        times, plan = [], None
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            plan = pack(lengths, L, **kw)
            times.append(time.perf_counter() - t0)
        s = plan.stats()
        base = base or s["fill"]
        print(
            f"{name:<26}{s['rows']:>10,}{s['fill']:>8.4f}{s['fill'] / base:>10.3f}"
            f"{s['documents_skipped']:>8,} ({s['documents_skipped_share']:>4.1%})"
            f"{s['tokens_skipped']:>13,} ({s['tokens_skipped_share']:>3.0%})"
            f"{s['continuation_pieces']:>14,}{statistics.median(times):>14.2f}"
        )


if __name__ == "__main__":
    main()
