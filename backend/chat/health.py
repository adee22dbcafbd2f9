"""Dataset health: per-sample problem codes (`check_sample`), `HealthReport` and `check_dataset`.

Part of `backend.chat` (import from there). The studio's dataset check and prepare's report use these.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from backend.chat.agent import trace_counts
from backend.chat.conversations import ChatError, Masking, RenderedSample
from backend.chat.templates import _compile, render, resolve_template
from backend.chat.tokens import TokenizedSample, _token_range, tokenize_batch


# ------------------------------------------------------------------------------------------ health checks
def _code(problem: str) -> str:
    return problem.split(":", 1)[0]


def _overlapping_tokens(tokenized: TokenizedSample, b: int, e: int) -> np.ndarray:
    """Indices of the tokens overlapping chars ``[b, e)`` (the offsets rule), without building the offsets
    when the sample still has its encoding."""
    if tokenized._offsets is None and tokenized._encoding is not None:
        shift = int(tokenized._bos_added)
        r = _token_range(tokenized._encoding, b, e, len(tokenized.input_ids) - shift)
        if r is not None:
            return np.arange(r[0] + shift, r[1] + shift)
    off = tokenized.offsets
    return np.flatnonzero((off[:, 0] < e) & (off[:, 1] > b) & (off[:, 1] > off[:, 0]))


def _token_end_char(tokenized: TokenizedSample, t: int) -> int:
    if tokenized._offsets is None and tokenized._encoding is not None:
        k = t - int(tokenized._bos_added)
        if k < 0:
            return 0
        chars = tokenized._encoding.token_to_chars(k)
        if chars is not None:
            return chars[1]
    return int(tokenized.offsets[t, 1])


def check_sample(rendered: RenderedSample, tokenized: TokenizedSample, tokenizer, sequence_length=None) -> list[str]:
    """Health problems of one sample, ``"code: message"`` (codes in `PROBLEM_CODES`); includes render problems."""
    problems = list(rendered.problems)
    if not tokenized.trained.any():
        problems.append("no_trained_tokens: no token of this sample is trained")
    if rendered.turns:
        for t in rendered.turns:
            if rendered.trained_spans and not any(b <= t.begin < e for b, e in rendered.trained_spans):
                continue  # a turn not selected for training (train_on=last)
            if t.end <= t.content_end:
                problems.append(f"eot_not_trained: the assistant turn at char {t.begin} has no end-of-turn marker")
                continue
            marker = _overlapping_tokens(tokenized, t.content_end, t.end)
            # a marker inside one trained span has all its tokens trained (the token rule): no array check
            inside = any(b <= t.content_end and t.end <= e for b, e in rendered.trained_spans)
            if not len(marker) or not (inside or tokenized.trained[marker].all()):
                problems.append(
                    f"eot_not_trained: end-of-turn {rendered.text[t.content_end : t.end]!r} at char {t.content_end} "
                    "is not trained"
                )
    return problems + check_length(rendered, tokenized, sequence_length)


def check_length(rendered: RenderedSample, tokenized: TokenizedSample, sequence_length=None) -> list[str]:
    """The part of `check_sample` that depends on the row length: ``too_long`` and ``assistant_cut`` (the studio
    adds these to the problems prepare's per-row check already found, for the sequence length on screen)."""
    n = len(tokenized.input_ids)
    if sequence_length is None or n <= sequence_length:
        return []
    problems = [f"too_long: {n} tokens > sequence_length {sequence_length}"]
    limit = _token_end_char(tokenized, sequence_length - 1) if sequence_length > 0 else 0
    for t in rendered.turns:
        if t.begin < limit < t.end:
            problems.append(f"assistant_cut: the assistant turn at char {t.begin} crosses token {sequence_length}")
            break
    return problems


class HealthReport:
    """Aggregate of `check_sample` over a dataset: counts per problem code, first example indices, lengths."""

    def __init__(self, examples: int = 5):
        self.examples = examples
        self.n_samples = 0
        self.n_tokens = 0
        self.n_trained = 0
        self.counts: dict[str, int] = {}
        self.example_indices: dict[str, list[int]] = {}
        self.first_messages: dict[str, str] = {}
        self.lengths: list[int] = []
        self.n_with_spans = 0
        self.n_appended = 0  # samples whose final reply got the template's marker appended (chat.final_eot)
        self.appended_indices: list[int] = []
        self.trace: dict[str, int] = {}  # agent traces: `backend.chat.agent.trace_counts` summed over samples

    def add_trace(self, counts: dict[str, int]) -> None:
        """Sum one sample's agent-trace counts (tool calls trained, results masked, reasoning trained/dropped)."""
        for k, v in counts.items():
            self.trace[k] = self.trace.get(k, 0) + int(v)

    def trace_line(self) -> str | None:
        """One line on agent traces, or None when the samples had none.

        >>> r = HealthReport(); r.add_trace({"tool_calls_trained": 3, "tool_results_masked": 3,
        ...     "reasoning_trained": 1, "reasoning_dropped": 2, "reasoning_dropped_tokens": 40})
        >>> r.trace_line()[:64]
        'agent traces: 3 tool calls trained, 3 tool results masked, reaso'
        >>> r.trace_line()[-87:]
        'dropped by the template in 2 turn(s) (40 tokens; chat.reasoning: every_turn keeps them)'
        """
        t = self.trace
        if not any(t.values()):
            return None
        line = (
            f"agent traces: {t.get('tool_calls_trained', 0)} tool calls trained, {t.get('tool_results_masked', 0)} "
            f"tool results masked, reasoning trained in {t.get('reasoning_trained', 0)} turn(s)"
        )
        if t.get("reasoning_dropped"):
            line += (
                f", dropped by the template in {t['reasoning_dropped']} turn(s) ({t.get('reasoning_dropped_tokens', 0)}"
                + (
                    f" tokens; chat.reasoning: every_turn trains {t['reasoning_trained_apart']} of them, each in a "
                    "document of its own)"
                    if "reasoning_trained_apart" in t  # every_turn is on
                    else " tokens; chat.reasoning: every_turn keeps them)"
                )
            )
        return line

    def add(
        self, index: int, problems: list[str], n_tokens: int, n_trained: int, appended: int = 0, lengths=None
    ) -> None:
        """One sample: its problems ("code: message"), tokens and trained tokens; ``lengths``: the lengths of the
        documents it is written as when they are several (chat.reasoning: every_turn), default ``[n_tokens]``."""
        self.n_samples += 1
        if appended:
            self.n_appended += 1
            if len(self.appended_indices) < self.examples:
                self.appended_indices.append(int(index))
        self.n_tokens += int(n_tokens)
        self.n_trained += int(n_trained)
        self.lengths += [int(n) for n in (lengths if lengths is not None else [n_tokens]) if n]
        codes = []
        for p in problems:
            c = _code(p)
            if c in codes:
                continue
            codes.append(c)
            self.counts[c] = self.counts.get(c, 0) + 1
            ex = self.example_indices.setdefault(c, [])
            if len(ex) < self.examples:
                ex.append(int(index))
            self.first_messages.setdefault(c, p)
        if "span_not_found" not in codes and "bad_conversation" not in codes and n_trained > 0:
            self.n_with_spans += 1

    @property
    def span_found_share(self) -> float:
        return self.n_with_spans / self.n_samples if self.n_samples else 0.0

    @property
    def trained_token_share(self) -> float:
        return self.n_trained / self.n_tokens if self.n_tokens else 0.0

    def to_dict(self) -> dict:
        return {
            "samples": self.n_samples,
            "tokens": self.n_tokens,
            "trained_tokens": self.n_trained,
            "span_found_share": self.span_found_share,
            "trained_token_share": self.trained_token_share,
            "problems": {
                c: {"count": n, "examples": self.example_indices[c], "first": self.first_messages[c]}
                for c, n in sorted(self.counts.items())
            },
            "lengths": list(self.lengths),
            "appended_eot": {"count": self.n_appended, "examples": list(self.appended_indices)},
            "agent_traces": dict(self.trace),
        }

    def summary(self) -> str:
        lines = [
            f"{self.n_samples} samples, {self.n_tokens} tokens, {self.n_trained} trained "
            f"({self.trained_token_share:.1%}); assistant spans found in {self.span_found_share:.1%} of samples"
        ]
        if self.lengths:
            arr = np.asarray(self.lengths)
            lines.append(f"length: median {int(np.median(arr))}, p99 {int(np.percentile(arr, 99))}, max {arr.max()}")
        for c, n in sorted(self.counts.items(), key=lambda kv: -kv[1]):
            lines.append(f"{c}: {n} sample(s), e.g. rows {self.example_indices[c]}: {self.first_messages[c]}")
        if self.n_appended:
            lines.append(
                f"end-of-turn marker appended (chat.final_eot: append): {self.n_appended} sample(s) whose final reply "
                f"the template leaves open, e.g. rows {self.appended_indices}"
            )
        if self.trace_line():
            lines.append(self.trace_line())
        if not self.counts:
            lines.append("no problems found")
        return "\n".join(lines)


def check_dataset(
    rows: Iterable,
    tokenizer,
    masking: Masking | None = None,
    chat_template=None,
    sequence_length=None,
    limit=None,
    progress: Callable[[int, int], Any] | None = None,
    examples: int = 5,
) -> HealthReport:
    """Render, tokenize and check every row (or the first ``limit``); rows that fail get ``bad_conversation``.

    A template error that is not about one row (syntax error, missing template) is raised at once.
    """
    masking = masking or Masking()
    template = resolve_template(tokenizer, chat_template)
    _compile(template)
    rows = list(rows) if limit is None else [r for _, r in zip(range(limit), rows, strict=False)]
    report = HealthReport(examples=examples)
    n = len(rows)
    pending: list = []  # (row index, RenderedSample or the error), reported in row order per batch

    def flush():
        ok = [r for _, r in pending if isinstance(r, RenderedSample)]
        toks = iter(tokenize_batch([r.text for r in ok], [r.trained_spans for r in ok], tokenizer))
        for i, r in pending:
            if isinstance(r, RenderedSample):
                tok = next(toks)
                problems = check_sample(r, tok, tokenizer, sequence_length)
                report.add(i, problems, len(tok.input_ids), tok.n_trained, appended=len(r.appended))
                report.add_trace(trace_counts(r, tok, tokenizer))
            else:
                report.add(i, [f"bad_conversation: row {i}: {r}"], 0, 0)
            if progress is not None:
                progress(i + 1, n)
        pending.clear()

    for i, row in enumerate(rows):
        try:
            pending.append((i, render(row, tokenizer, masking, template)))
        except ChatError as e:
            pending.append((i, e))
        if len(pending) == 256:  # one batched tokenizer call per 256 rows
            flush()
    flush()
    return report
