"""Benchmark: render + mask + tokenize vs plain batched tokenization of the same rendered texts.

Run: OMP_NUM_THREADS=1 .venv/bin/python bench/bench_chat.py [--rows 1000] [--repeats 5] [--tokenizer PATH]
     [--chat-template FILE]  (e.g. tests/data/chat_templates/deepseek-r1-distill-qwen.jinja: a template that is not
     prefix-preserving, whose replies are located by rendering the conversation with a sentinel in their place)

Prints samples/s (medians of --repeats) for:
  floor      tokenizer(texts, add_special_tokens=False) on already rendered texts (batched, Rust)
  tokenize   backend.chat.tokenize_batch on the rendered texts + spans (offsets + numpy mask)
  render     backend.chat.render for every row -- and the same with train_on=last and with delimiters. Auto mode
             renders the template ONCE per row (the real text, compared with the text substituted into the role
             pattern's cached sentinel structure); the full prefix diff (~2 renders per assistant turn) only runs
             for a pattern's first rows (cross-check) and for rows whose rendering differs from the substitution
  total      render + tokenize_batch, the path prepare takes
  tool rows  the same conversations as agent traces (a row-level ``tools`` schema; each first reply preceded by an
             assistant tool call and its tool result), which take `backend.chat.agent`'s path: rendered with
             ``tools=``, every turn found by the prefix diff (no substitution fast path); printed per row and per
             token against the plain rows
and the ratios against the floor. The target is that masking (everything but the floor) adds < 30%.
"""

import argparse
import functools
import json
import statistics
import time
import warnings
from pathlib import Path

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
    from backend.chat import ChatError, Masking, TemplateCapabilityError, render, tokenize_batch

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokenizer", default=str(TINY_MODEL))
    ap.add_argument("--chat-template", help="a Jinja chat template file in place of the tokenizer's own")
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    if args.chat_template:  # every render below uses it (the delimiters contestant keeps Llama 3's delimiters)
        render = functools.partial(render, chat_template=Path(args.chat_template).read_text(encoding="utf-8"))
    rows = [json.loads(line) for _, line in zip(range(args.rows), open(SAMPLE_DATA), strict=False)]
    n = len(rows)
    rendered = [render(r, tok) for r in rows]
    texts = [r.text for r in rendered]
    spans = [r.trained_spans for r in rendered]
    delim = Masking(
        mode="delimiters",
        start_delimiter="<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        end_delimiter="<|eot_id|>",
    )
    last = Masking(train_on="last")
    tool_rows = [as_tool_row(r) for r in rows]
    try:
        tool_texts = [render(r, tok).text for r in tool_rows]
    except (ChatError, TemplateCapabilityError) as e:  # a --chat-template that cannot write tools: no tool rows
        print(f"no tool rows: {e}")
        tool_rows = tool_texts = None

    def total_tools():
        rs = [render(r, tok) for r in tool_rows]
        tokenize_batch([r.text for r in rs], [r.trained_spans for r in rs], tok)

    def total():
        rs = [render(r, tok) for r in rows]
        tokenize_batch([r.text for r in rs], [r.trained_spans for r in rs], tok)

    def total_delim():
        rs = [render(r, tok, delim) for r in rows]
        tokenize_batch([r.text for r in rs], [r.trained_spans for r in rs], tok)

    contestants = {
        "floor (batched tokenize)": lambda: tok(texts, add_special_tokens=False),
        "tokenize_batch (offsets+mask)": lambda: tokenize_batch(texts, spans, tok),
        "render auto": lambda: [render(r, tok) for r in rows],
        "render auto, train_on=last": lambda: [render(r, tok, last) for r in rows],
        "render delimiters": lambda: [render(r, tok, delim) for r in rows],
        "total auto: render + tokenize_batch": total,
        "total delimiters": total_delim,
    }
    if tool_rows:
        contestants["render tool rows (agent path)"] = lambda: [render(r, tok) for r in tool_rows]
        contestants["total tool rows"] = total_tools
    # round robin: every repeat times each contestant once, so that load changes hit all of them alike; the
    # ratio to the floor is taken within each repeat, then the median over repeats
    times = {name: [] for name in contestants}
    for _ in range(args.repeats):
        for name, fn in contestants.items():
            times[name].append(timed(fn, 1))
    ratios = {
        name: statistics.median(t / f for t, f in zip(times[name], times["floor (batched tokenize)"], strict=False))
        for name in contestants
    }
    results = {name: statistics.median(t) for name, t in times.items()}
    turns = sum(sum(m["role"] == "assistant" for m in r.messages) for r in rendered) / n
    tokens = sum(len(x) for x in tok(texts, add_special_tokens=False)["input_ids"]) / n
    print(f"{n} rows, {turns:.2f} assistant turns/row, {tokens:.0f} tokens/row, medians of {args.repeats}")
    print(f"{'what':40s} {'samples/s':>10s} {'time/floor':>11s}")
    for name, t in results.items():
        print(f"{name:40s} {n / t:10.0f} {ratios[name]:10.2f}x")
    over = ratios["total auto: render + tokenize_batch"] - 1
    print(f"masking overhead on top of plain tokenization (auto): {over:+.0%} (target < +30%)")
    over = ratios["total delimiters"] - 1
    print(f"masking overhead on top of plain tokenization (delimiters): {over:+.0%}")
    if not tool_rows:
        return
    tool_tokens = sum(len(x) for x in tok(tool_texts, add_special_tokens=False)["input_ids"]) / n
    plain_tps = n * tokens / results["total auto: render + tokenize_batch"]
    tool_tps = n * tool_tokens / results["total tool rows"]
    tool_rows_s = n / results["total tool rows"]
    print(
        f"tool rows ({tool_tokens:.0f} tokens/row): {tool_rows_s:.0f} rows/s, {tool_tps:,.0f} tokens/s "
        f"vs plain rows {plain_tps:,.0f} tokens/s ({tool_tps / plain_tps:.2f}x)"
    )


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Look a fact up",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
        },
    }
]


def as_tool_row(row: dict) -> dict:
    """A sample conversation as an agent trace: the first question is looked up with a tool before the reply."""
    from backend.chat import normalize_conversation

    messages = normalize_conversation(row)
    first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    call = {"id": "call00001", "type": "function", "function": {"name": "lookup", "arguments": {"query": "q"}}}
    trace = [
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call00001", "content": messages[first - 1]["content"][:80]},
    ]
    return {"messages": messages[:first] + trace + messages[first:], "tools": TOOLS}


if __name__ == "__main__":
    main()
