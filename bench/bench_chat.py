"""Benchmark: render + mask + tokenize vs plain batched tokenization of the same rendered texts.

Run: OMP_NUM_THREADS=1 .venv/bin/python bench/bench_chat.py [--rows 1000] [--repeats 5] [--tokenizer PATH]

Prints samples/s (medians of --repeats) for:
  floor      tokenizer(texts, add_special_tokens=False) on already rendered texts (batched, Rust)
  tokenize   backend.chat.tokenize_batch on the rendered texts + spans (offsets + numpy mask)
  render     backend.chat.render for every row -- and the same with train_on=last and with delimiters. Auto mode
             renders the template ONCE per row (the real text, compared with the text substituted into the role
             pattern's cached sentinel structure); the full prefix diff (~2 renders per assistant turn) only runs
             for a pattern's first rows (cross-check) and for rows whose rendering differs from the substitution
  total      render + tokenize_batch, the path prepare takes
and the ratios against the floor. The target is that masking (everything but the floor) adds < 30%.
"""

import argparse
import json
import statistics
import time
import warnings

warnings.filterwarnings("ignore")


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    from transformers import AutoTokenizer

    from backend import SAMPLE_DATA, TINY_MODEL
    from backend.chat import Masking, render, tokenize_batch

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokenizer", default=str(TINY_MODEL))
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    rows = [json.loads(line) for _, line in zip(range(args.rows), open(SAMPLE_DATA))]
    n = len(rows)
    rendered = [render(r, tok) for r in rows]
    texts = [r.text for r in rendered]
    spans = [r.trained_spans for r in rendered]
    delim = Masking(mode="delimiters", start_delimiter="<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
                    end_delimiter="<|eot_id|>")
    last = Masking(train_on="last")

    results = {
        "floor (batched tokenize)": timed(lambda: tok(texts, add_special_tokens=False), args.repeats),
        "tokenize_batch (offsets+mask)": timed(lambda: tokenize_batch(texts, spans, tok), args.repeats),
        "render auto (1 verified render/row)": timed(lambda: [render(r, tok) for r in rows], args.repeats),
        "render auto, train_on=last": timed(lambda: [render(r, tok, last) for r in rows], args.repeats),
        "render delimiters": timed(lambda: [render(r, tok, delim) for r in rows], args.repeats),
    }

    def total():
        rs = [render(r, tok) for r in rows]
        tokenize_batch([r.text for r in rs], [r.trained_spans for r in rs], tok)

    results["total auto: render + tokenize_batch"] = timed(total, args.repeats)

    def total_delim():
        rs = [render(r, tok, delim) for r in rows]
        tokenize_batch([r.text for r in rs], [r.trained_spans for r in rs], tok)

    results["total delimiters"] = timed(total_delim, args.repeats)
    floor = results["floor (batched tokenize)"]
    turns = sum(sum(m["role"] == "assistant" for m in r.messages) for r in rendered) / n
    tokens = sum(len(x) for x in tok(texts, add_special_tokens=False)["input_ids"]) / n
    print(f"{n} rows, {turns:.2f} assistant turns/row, {tokens:.0f} tokens/row, medians of {args.repeats}")
    print(f"{'what':40s} {'samples/s':>10s} {'time/floor':>11s}")
    for name, t in results.items():
        print(f"{name:40s} {n / t:10.0f} {t / floor:10.2f}x")
    over = results["total auto: render + tokenize_batch"] / floor - 1
    print(f"masking overhead on top of plain tokenization (auto): {over:+.0%} (target < +30%)")
    over = results["total delimiters"] / floor - 1
    print(f"masking overhead on top of plain tokenization (delimiters): {over:+.0%}")


if __name__ == "__main__":
    main()
