"""Long conversations: tokens trained and packing fill with skip / truncate / split_turns, and prepare time.

    python bench/bench_split.py [--documents 300000] [--sequence-length 4096] [--real 2000] [--real-length 1024]

Part 1, simulated (no tokenizer): FACTS.md's lognormal case, 300,000 documents of median 1,000 tokens (sigma 1.0,
the lengths of bench/bench_packing.py), at sequence_length 4,096. The turn structure is SIMULATED, not tokenized:
each document gets a head (BOS, plus a system prompt of 20-200 tokens in 3 of 4 documents) and groups (a user
question then its assistant reply) whose count follows the length (one per ~350 tokens, lognormal) and whose sizes
are Dirichlet shares of the rest; the question takes a Beta(2, 4) share of its group, the reply (trained, end-of-turn
included) the rest. Pieces are planned by `backend.split.plan_pieces`, the planner prepare uses, on these counts
(prepare then renders each piece and checks its real length, which this part cannot do). Rows are packed with
`backend.packing.pack` (best_fit, window 1,000, the training default; truncate: the stream cut).
- skip: documents longer than a sequence are dropped (truncate_documents: no);
- truncate: the token stream is cut at row edges (truncate_documents: yes). Every token is trained, but some replies
  land in a row without their question (counted), and every continuation lacks the system prompt;
- split_turns: pieces at turn boundaries, context masked. "Fits anywhere": per reply, the tokens that fit in a
  sequence together with the head and its own question, the most any method can train with the question in view.
The first token of each document is never a target (packing rule); the counts here ignore that one token.

Part 2, real tokenization: ``--real`` conversations stitched from the exchanges of assets/data/sample_openai.jsonl
(lognormal count of exchanges, median 10), tokenized with assets/tiny-llama, prepared by `backend.prepare` with
``long_documents.mode`` keep and split_turns at ``--real-length`` (prepare wall time, medians of ``--repeats``),
then packed as training would.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from backend.packing import pack  # noqa: E402
from backend.split import plan_pieces  # noqa: E402


def chat_lengths(n: int, seed: int = 0) -> np.ndarray:  # the distribution of bench/bench_packing.py
    rng = np.random.default_rng(seed)
    return np.maximum(1, rng.lognormal(np.log(1000), 1.0, n)).astype(np.int64)


def simulate_turns(lengths: np.ndarray, seed: int = 1):
    """Per document: head tokens, and per group (flat, ``offsets[d]:offsets[d+1]``) question and reply tokens."""
    rng = np.random.default_rng(seed)
    n = len(lengths)
    head = 1 + np.where(rng.random(n) < 0.75, rng.integers(20, 201, n), 0)
    head = np.minimum(head, lengths // 2)
    body = lengths - head
    per_group = rng.lognormal(np.log(350), 0.8, n)
    groups = np.clip(np.round(body / per_group), 1, np.maximum(1, body // 8)).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(groups)])
    w = rng.gamma(1.5, size=int(offsets[-1]))
    doc = np.repeat(np.arange(n), groups)
    w /= np.bincount(doc, weights=w, minlength=n)[doc]
    cost = np.floor(w * body[doc]).astype(np.int64)
    rest = body - np.bincount(doc, weights=cost, minlength=n).astype(np.int64)
    cost[offsets[1:] - 1] += rest  # the rounding remainder to each document's last group
    cost = np.maximum(cost, 2)
    question = np.clip(np.round(cost * rng.beta(2, 4, len(cost))), 1, cost - 1).astype(np.int64)
    lengths = head + np.bincount(doc, weights=cost, minlength=n).astype(np.int64)
    return lengths, head, offsets, question, cost - question


def simulated(a) -> dict:
    L = a.sequence_length
    lengths, head, offsets, question, reply = simulate_turns(chat_lengths(a.documents))
    n = len(lengths)
    cost = question + reply
    doc = np.repeat(np.arange(n), np.diff(offsets))
    reply_of_doc = np.bincount(doc, weights=reply, minlength=n).astype(np.int64)
    all_trained = int(reply.sum())
    fits_anywhere = int(np.minimum(reply, np.maximum(0, L - head[doc] - question)).sum())
    long = lengths > L
    out = {
        "documents": n,
        "tokens": int(lengths.sum()),
        "long_documents": int(long.sum()),
        "assistant_tokens": all_trained,
        "assistant_tokens_fit_anywhere": fits_anywhere,
    }

    rng = np.random.default_rng(2)  # training packs each epoch's documents in a shuffled order (PackedSampler)
    t0 = time.perf_counter()
    s = pack(rng.permutation(lengths[~long]), L, strategy="best_fit", window=1000).stats()
    out["skip"] = dict(trained=int(reply_of_doc[~long].sum()), fill=s["fill"], rows=s["rows"])
    out["skip"]["seconds"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    perm = rng.permutation(n)
    plan = pack(lengths[perm], L, truncate_documents=True)
    s = plan.stats()
    # a continuation piece (begin > 0) starts inside group k: the reply tokens of k in the piece lack their question
    cont = plan.piece_begin > 0
    d, b, e = perm[plan.piece_document[cont]], plan.piece_begin[cont], plan.piece_end[cont]
    gstart = np.concatenate([[0], np.cumsum(cost)])[:-1] - np.repeat(
        np.concatenate([[0], np.cumsum(cost)])[offsets[:-1]], np.diff(offsets)
    )  # group start inside its document, after the head
    gstart = gstart + head[doc]
    key = doc * (int(lengths.max()) + 1) + gstart  # sorted: documents in order, groups in order
    k = np.searchsorted(key, d * (int(lengths.max()) + 1) + b, side="right") - 1
    rs, re = gstart[k] + question[k], gstart[k] + cost[k]
    orphan = np.maximum(0, np.minimum(re, e) - np.maximum(rs, b + 1)) * (doc[k] == d)  # b in the head: none
    in_cont = np.zeros(len(cont), np.int64)
    # trained tokens in continuation pieces: replies overlapping [b+1, e) (targets; slot b is input only)
    starts_sorted = key
    lo = np.maximum(np.searchsorted(starts_sorted, d * (int(lengths.max()) + 1) + b, side="right") - 1, offsets[d])
    hi = np.searchsorted(starts_sorted, d * (int(lengths.max()) + 1) + e, side="left")
    rstart_all, rend_all = gstart + question, gstart + cost
    for j in range(len(d)):
        g = slice(lo[j], hi[j])
        in_cont[j] = np.maximum(0, np.minimum(rend_all[g], e[j]) - np.maximum(rstart_all[g], b[j] + 1)).sum()
    out["truncate"] = dict(
        trained=all_trained,
        trained_without_question=int(orphan.sum()),
        trained_without_system_prompt=int(in_cont.sum()),
        fill=s["fill"],
        rows=s["rows"],
        continuation_pieces=int(cont.sum()),
    )
    out["truncate"]["seconds"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    piece_len, piece_trained, ctx, truncated, dropped = [], [], 0, 0, 0
    for dd in np.flatnonzero(long).tolist():
        q, r = question[offsets[dd] : offsets[dd + 1]], reply[offsets[dd] : offsets[dd + 1]]
        c_ = (q + r).tolist()
        h = int(head[dd])
        for c, i, j in plan_pieces(h, c_, L):
            size = h + sum(c_[c : j + 1])
            trained = int(r[i : j + 1].sum())
            if size > L:  # one group alone too long: the reply's tail is dropped
                truncated += 1
                kept = max(0, L - h - int(q[i]))
                dropped += trained - kept
                trained, size = kept, L
            if trained:
                piece_len.append(size)
                piece_trained.append(trained)
                ctx += h + sum(c_[c:i]) if (c, i) != (0, 0) else 0
    plan_seconds = time.perf_counter() - t0
    docs = np.concatenate([lengths[~long], np.asarray(piece_len, np.int64)])
    t1 = time.perf_counter()
    s = pack(rng.permutation(docs), L, strategy="best_fit", window=1000).stats()
    out["split_turns"] = dict(
        trained=int(reply_of_doc[~long].sum()) + int(sum(piece_trained)),
        pieces=len(piece_len),
        context_tokens=int(ctx),
        truncated_groups=truncated,
        dropped_trained=int(dropped),
        fill=s["fill"],
        rows=s["rows"],
        plan_seconds=plan_seconds,
        pack_seconds=time.perf_counter() - t1,
    )
    return out


def stitched_conversations(n: int, seed: int = 0) -> list[dict]:
    """Long multi-turn conversations made of the sample data's exchanges (lognormal count, median 10)."""
    from backend import SAMPLE_DATA_OPENAI

    rows = [json.loads(line) for line in open(SAMPLE_DATA_OPENAI)]
    systems = [m for r in rows for m in r["messages"] if m["role"] == "system"]
    exchanges = []
    for r in rows:
        msgs = [m for m in r["messages"] if m["role"] != "system"]
        exchanges += [msgs[k : k + 2] for k in range(0, len(msgs) - 1, 2) if msgs[k]["role"] == "user"]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(np.clip(round(rng.lognormal(np.log(10), 1.0)), 1, 400))
        msgs = [systems[rng.integers(len(systems))]] if systems and rng.random() < 0.75 else []
        for x in rng.integers(len(exchanges), size=k):
            msgs += exchanges[x]
        out.append({"id": f"stitched-{i}", "messages": msgs})
    return out


def real(a) -> dict:
    from backend import TINY_MODEL
    from backend.config import load_prepare_config
    from backend.dataset import TokenDataset, descriptor_name
    from backend.prepare import prepare

    L = a.real_length
    work = Path(tempfile.mkdtemp(prefix="bench_split_"))
    data = work / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in stitched_conversations(a.real)))
    out: dict = {"conversations": a.real, "sequence_length": L}
    times: dict = {"keep": [], "split_turns": []}
    warm = {"output_path": str(work / "warm"), "dataset": {"path": str(data)}, "tokenizer": {"path": str(TINY_MODEL)}}
    prepare(load_prepare_config(warm), force=True, progress=False)  # imports and caches: not timed
    summaries = {}
    for _rep in range(a.repeats):
        for mode in ("keep", "split_turns"):
            cfg = load_prepare_config(
                {
                    "output_path": str(work / mode),
                    "dataset": {"path": str(data)},
                    "tokenizer": {"path": str(TINY_MODEL)},
                    "splits": {"training": 1.0},
                    "report": {"sequence_length": L},
                    "long_documents": {"mode": mode, "sequence_length": L},
                }
            )
            t0 = time.perf_counter()
            summaries[mode] = prepare(cfg, force=True, progress=False)
            times[mode].append(time.perf_counter() - t0)
    for mode, s in summaries.items():
        ds = TokenDataset(work / mode / descriptor_name("training"))
        lengths = ds.lengths
        trained = np.array([int(ds.document(i)[1].sum()) for i in range(len(ds))], np.int64)
        fits = lengths <= L
        plan = pack(np.random.default_rng(2).permutation(lengths[fits]), L, strategy="best_fit", window=1000).stats()
        out[mode] = dict(
            seconds=statistics.median(times[mode]),
            documents=int(len(lengths)),
            tokens=int(lengths.sum()),
            trained_in_file=int(trained.sum()),
            trained_after_skip=int(trained[fits].sum()),
            long_documents=int((~fits).sum()),
            fill=plan["fill"],
            long_report=s.get("long_documents"),
        )
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--documents", type=int, default=300_000)
    ap.add_argument("--sequence-length", type=int, default=4096)
    ap.add_argument("--real", type=int, default=2000, help="stitched conversations prepared for real (0 = skip)")
    ap.add_argument("--real-length", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=str, default=None)
    a = ap.parse_args(argv)
    res = {"simulated": simulated(a)}
    s = res["simulated"]
    A, F = s["assistant_tokens"], s["assistant_tokens_fit_anywhere"]
    print(
        f"simulated: {s['documents']:,} documents, {s['tokens']:,} tokens, {s['long_documents']:,} longer than "
        f"{a.sequence_length:,}; assistant tokens {A:,}, of which fit anywhere {F:,} ({F / A:.2%})"
    )
    print(f"{'mode':<13}{'trained':>14}{'of all':>8}{'of fit':>8}{'rows':>9}{'fill':>8}  notes")
    for mode in ("skip", "truncate", "split_turns"):
        m = s[mode]
        note = ""
        if mode == "truncate":
            note = (
                f"{m['trained_without_question']:,} trained without their question in the row, "
                f"{m['trained_without_system_prompt']:,} in continuations (no system prompt)"
            )
        if mode == "split_turns":
            note = (
                f"{m['pieces']:,} pieces, {m['context_tokens']:,} context tokens repeated, "
                f"{m['truncated_groups']} groups too long alone ({m['dropped_trained']:,} trained dropped); "
                f"plan {m['plan_seconds']:.1f} s"
            )
        print(
            f"{mode:<13}{m['trained']:>14,}{m['trained'] / A:>8.2%}{m['trained'] / F:>8.2%}{m['rows']:>9,}"
            f"{m['fill']:>8.4f}  {note}"
        )
    if a.real:
        res["real"] = r = real(a)
        print(f"real: {a.real} stitched conversations, tiny-llama tokenizer, sequence_length {a.real_length}")
        for mode in ("keep", "split_turns"):
            m = r[mode]
            print(
                f"  prepare {mode:<12} {m['seconds']:6.2f} s  {m['documents']:>6,} documents {m['tokens']:>10,} tokens"
                f"  trained in file {m['trained_in_file']:>9,}, after skipping long {m['trained_after_skip']:>9,}"
                f"  fill {m['fill']:.4f}"
            )
        print(f"  split_turns / keep prepare time: {r['split_turns']['seconds'] / r['keep']['seconds']:.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
