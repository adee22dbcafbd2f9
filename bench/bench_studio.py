"""Time to re-render the Data-tab highlight after a delimiter edit, for a ~4k-token sample (target < 100 ms).

    python bench/bench_studio.py [--tokens 4096] [--repeats 20]

What is timed is the whole handler the page calls (`studio.handlers.preview_sample`): render with the chat
template + delimiter span search, tokenize with offsets, per-token trained mask, highlight segments, token HTML
and the per-sample health check. Baseline measured in the same run: a plain `tokenizer(text)` of the same
rendered text (the floor any preview has to pay). Prints medians and the ratio. The tokenizer is loaded once
before timing (the page caches it per path).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend import TINY_MODEL  # noqa: E402
from studio import handlers as H  # noqa: E402

QA = [
    ("What is {a} + {b}?", "{a} + {b} = {c}. Adding the ones and then the tens gives the same result."),
    ("Reverse the words: river rocket number {a}", "Reversed: number {a} rocket river, as you asked."),
]


def long_conversation(target_tokens: int, tokenizer) -> dict:
    """A ShareGPT row of alternating turns that renders to about ``target_tokens`` tokens."""
    turns, k = [], 0
    while True:
        q, a = QA[k % 2]
        turns += [
            {"from": "human", "value": q.format(a=k, b=k + 7, c=2 * k + 7)},
            {"from": "gpt", "value": a.format(a=k, b=k + 7, c=2 * k + 7)},
        ]
        k += 1
        if k % 4 == 0:
            text = tokenizer.apply_chat_template(
                [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in turns],
                tokenize=False,
            )
            if len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= target_tokens:
                return {"conversations": turns}


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)
    tok = H.get_tokenizer(str(TINY_MODEL))
    row = long_conversation(args.tokens, tok)
    with tempfile.TemporaryDirectory() as d:
        data = Path(d) / "long.jsonl"
        data.write_text(json.dumps(row) + "\n")
        start_a = "<|start_header_id|>assistant<|end_header_id|>\\n\\n"
        start_u = "<|start_header_id|>user<|end_header_id|>\\n\\n"
        edits = [start_a, start_u]
        state = {"i": 0}

        def rerender():  # each call is a delimiter edit: alternate between two start delimiters
            state["i"] += 1
            settings = H.DataSettings(str(data), str(TINY_MODEL), "delimiters", edits[state["i"] % 2], "<|eot_id|>")
            p = H.preview_sample(settings, 0, 4096)
            assert p.status == "", p.status
            return p

        p = rerender()  # warm-up (file index, template compile)
        text = p.text
        n_tokens = len(tok(text, add_special_tokens=False)["input_ids"])
        base = median_ms(lambda: tok(text, add_special_tokens=False, return_offsets_mapping=True), args.repeats)
        preview = median_ms(rerender, args.repeats)
    print(f"sample: {n_tokens} tokens, {len(text)} characters, tiny tokenizer (vocab {tok.vocab_size})")
    print(f"baseline  tokenizer(text) with offsets            median {base:8.2f} ms")
    print(
        f"re-render after a delimiter edit (whole handler)  median {preview:8.2f} ms  "
        f"({preview / base:.1f}x baseline; target < 100 ms: {'met' if preview < 100 else 'NOT met'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
