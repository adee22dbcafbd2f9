"""Data tab handlers: the sample preview (what is trained, token by token) and the whole-dataset check.

Both read rows through `backend.documents` (prepare's per-row code), so the preview shows what prepare writes:

    p = preview_sample(DataSettings("assets/data/sample_sharegpt.jsonl", "assets/tiny-llama"), 0)
    p.highlight   -> [("<|begin_of_text|>...user...", "masked"), ("5 + 37 = 42.<|eot_id|>", "trained"), ...]
    p.summary     -> "**412 tokens**: 61 trained (14.8%), 351 masked ..."
    p.status      -> "" (or the problem text: "chat.masking.start_delimiter: must be a non-empty string ...")
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from studio.common import (
    APPENDED,
    CHOSEN,
    COLOR_MAP,
    MASKED,
    REASONING,
    REASONING_MASKED,
    REJECTED,
    TOKEN_VIEW_LIMIT,
    TOOL_RESULT,
    TRAINED,
    DataSettings,
    _template_arg,
    get_reader,
    get_tokenizer,
    prepare_config_of,
    prepared_row,
)


@dataclass
class Preview:
    highlight: list[tuple[str, str | None]]  # for gr.HighlightedText: (text, "trained" | "masked")
    token_html: str  # token boundaries and ids
    summary: str  # markdown: counts
    problems: str  # markdown: per-sample problems ("" if none)
    status: str  # "" when fine; else the error (bad delimiter/template/row)
    n_rows: int = 0
    index: int = 0
    trained_chars: list[tuple[int, int]] = field(default_factory=list)  # half-open ranges highlighted trained
    text: str = ""
    # a preference pair: `highlight` is prompt + chosen answer, this prompt + rejected answer, shown beside it
    highlight_rejected: list[tuple[str, str | None]] | None = None


def char_labels(text_len: int, offsets: np.ndarray, trained: np.ndarray) -> np.ndarray:
    """(text_len,) bool: the character belongs to a trained token (the union of trained tokens' offsets)."""
    d = np.zeros(text_len + 1, dtype=np.int64)
    off = offsets[trained]
    off = off[off[:, 1] > off[:, 0]]
    np.add.at(d, off[:, 0], 1)
    np.add.at(d, off[:, 1], -1)
    return np.cumsum(d[:-1]) > 0


def runs_of(mask: np.ndarray) -> list[tuple[int, int, bool]]:
    """Maximal runs of equal values: [(begin, end, value)] covering the whole array."""
    if len(mask) == 0:
        return []
    change = np.flatnonzero(mask[1:] != mask[:-1]) + 1
    bounds = np.concatenate([[0], change, [len(mask)]])
    return [(int(a), int(b), bool(mask[a])) for a, b in zip(bounds[:-1], bounds[1:], strict=False)]


_TOKEN_CSS = (
    ".sft-tokens{font-family:monospace;font-size:12px;line-height:2.2}"
    ".sft-tokens span{display:inline-block;border:1px solid #bbb;background:#eee;margin:1px;"
    "padding:0 2px;vertical-align:top;text-align:center}"
    ".sft-tokens span.t{border-color:#2ca02c;background:#e5f5e0}"
    ".sft-tokens sub{color:#666}"
)
_VISIBLE = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "\n": "↵", " ": "␣"})


def token_html(
    text: str, input_ids: np.ndarray, offsets: np.ndarray, trained: np.ndarray, tokenizer, limit: int = TOKEN_VIEW_LIMIT
) -> str:
    """Each token as a box: its text (whitespace made visible) over its id; green (class t) = trained.

    Styling sits in one <style> block, so the per-token markup stays short (this runs on every edit).
    """
    n = len(input_ids)
    ids = input_ids[:limit].tolist()
    offs = offsets[:limit].tolist()
    tr = trained[:limit].tolist()
    parts = [f'<style>{_TOKEN_CSS}</style><div class="sft-tokens">']
    for t, (tid, (s, e), k) in enumerate(zip(ids, offs, tr, strict=False)):
        piece = text[s:e] if e > s else tokenizer.convert_ids_to_tokens(tid)
        parts.append(
            f'<span{" class=t" if k else ""} title="token {t}, chars {s}-{e}">'
            f"{piece.translate(_VISIBLE) or '∅'}<br><sub>{tid}</sub></span>"
        )
    if n > limit:
        parts.append(f"<p>… {n - limit} more tokens not drawn (the highlight above shows the whole sample)</p>")
    parts.append("</div>")
    return "".join(parts)


def preview_sample(s: DataSettings, index: int | float | None, sequence_length: int | float | None = None) -> Preview:
    """Row ``index`` as prepare writes it (`backend.documents`), trained tokens highlighted. Never raises: problems
    go to ``.status``."""
    from backend.config import ConfigError

    empty = Preview([], "", "", "", "")
    try:
        i, n, prepared, tokenizer = prepared_row(s, index)
        masking = s.masking()
    except ConfigError as e:
        empty.status = "⚠ " + "; ".join(e.problems)
        return empty
    except Exception as e:  # bad path, unreadable file, bad masking value: say so in the status box
        empty.status = f"⚠ {e}"
        return empty
    empty.n_rows, empty.index = n, i
    if prepared.tokenized is None:  # prepare skips the row before tokenizing: say why
        empty.status = f"⚠ sample {i} ({prepared.where}): prepare skips this row: {prepared.skipped}"
        return empty
    rendered, tok = prepared.rendered, prepared.tokenized
    template = _template_arg(s.template, tokenizer)
    if prepared.rejected is not None:  # a preference pair: both answers, each in its own colour
        return _pair_preview(prepared, tokenizer, i, n, template, sequence_length)
    if prepared.pieces:  # chat.reasoning: every_turn: the row is written as these documents, not as one
        return _pieces_preview(prepared, tokenizer, i, n, template, sequence_length)
    p = _preview_from(rendered, tok, tokenizer, i, n, template, _problems(prepared, sequence_length))
    if prepared.skipped:  # tokenized, but not written (no_trained_tokens)
        p.summary += f"\n\n⚠ prepare skips this row: {prepared.skipped}"
    if sequence_length and len(tok.input_ids) > int(sequence_length):
        p.summary += _cut_lines(rendered, tok, tokenizer, masking, template, int(sequence_length))
    return p


def _shared_prompt(chosen, rejected) -> int:
    """Tokens of the pair's prompt that training places once (backend.preference.shared_prompt_length)."""
    from backend.preference import shared_prompt_length

    return shared_prompt_length(chosen.input_ids, chosen.trained, rejected.input_ids, rejected.trained)


def _pair_length_problems(chosen, rejected, seq: int | None) -> list[str]:
    """A pair is packed whole: too long when its documents together exceed ``seq``; training places the prompt once
    where the attention can mask it (training.dpo.share_prompt with sdpa_packed: every CPU run), so a pair that fits
    only that way is named apart."""
    whole = len(chosen.input_ids) + len(rejected.input_ids)
    once = whole - _shared_prompt(chosen, rejected)
    if not seq or whole <= seq:
        return []
    if once > seq:
        return [f"pair_too_long: {whole} tokens together ({once} with the prompt placed once) > sequence_length "
                f"{seq}: training skips it"]  # fmt: skip
    return [f"pair_fits_with_shared_prompt: {whole} tokens together > sequence_length {seq}, {once} with the prompt "
            "placed once: trained with training.dpo.share_prompt on sdpa_packed attention (every CPU run), "
            "skipped with flash_attention_2 / torch_varlen"]  # fmt: skip


def _pair_preview(prepared, tokenizer, i: int, n: int, template, sequence_length) -> Preview:
    """A preference pair as prepare writes it, side by side: prompt + chosen answer (`highlight`) beside prompt +
    rejected answer (`highlight_rejected`), and their tokens (the token view); the prompt masked, each answer
    trained in its own colour."""
    sides = [(prepared.rendered, prepared.tokenized, CHOSEN), (*prepared.rejected, REJECTED)]
    views = [_preview_from(r, t, tokenizer, i, n, template) for r, t, _ in sides]
    highlight, highlight_rejected = (
        [(text, label if kind == TRAINED else kind) for text, kind in view.highlight]
        for (_, _, label), view in zip(sides, views, strict=True)
    )
    columns = "".join(
        f"<div style='flex:1;min-width:0'><b style='color:{COLOR_MAP[label]}'>{label}</b>{view.token_html}</div>"
        for (_, _, label), view in zip(sides, views, strict=True)
    )
    counts = [
        f"<span style='color:{COLOR_MAP[label]}'>■</span> {label}: {int(tok.trained.sum())} of {len(tok.input_ids)}"
        for _, tok, label in sides
    ]
    total = sum(len(t.input_ids) for _, t, _ in sides)
    once = total - _shared_prompt(prepared.tokenized, prepared.rejected[1])
    seq = int(sequence_length) if sequence_length else None
    summary = (
        f"**Pair {i} of {n}** (preference data, packed whole: {total} tokens, {once} with the prompt placed once) — "
        + "; ".join(counts)
    )
    for problem in _pair_length_problems(prepared.tokenized, prepared.rejected[1], seq):
        summary += f"; ⚠ **{problem.split(': ', 1)[1]}**"
    problems = [f"{code}: {message}" for code, message, _ in prepared.problems]
    problems_md = _problems_markdown(problems)
    if prepared.skipped:
        summary += f"\n\n⚠ prepare skips this pair: {prepared.skipped}"
    return Preview(
        highlight=highlight,
        highlight_rejected=highlight_rejected,
        token_html=f"<div style='display:flex;gap:1em'>{columns}</div>",
        summary=summary,
        problems=problems_md or "✓ no problems in this pair",
        status="",
        n_rows=n,
        index=i,
        trained_chars=views[0].trained_chars,
        text=prepared.rendered.text,
    )


def _pieces_preview(prepared, tokenizer, i: int, n: int, template, sequence_length) -> Preview:
    """A row that chat.reasoning: every_turn writes as several documents (`PreparedRow.pieces`): each document as
    prepare writes it, one after the other under a header that says which replies it trains, and the row's
    counts over all of them."""
    pieces = prepared.pieces
    views = [_preview_from(p.rendered, p.tokenized, tokenizer, i, n, template) for p in pieces]
    highlight, token_views, trained_chars, at = [], [], [], 0
    for k, (piece, view) in enumerate(zip(pieces, views, strict=True), 1):
        replies = ", ".join(str(m) for m in piece.trained_messages)
        ctx = f", {piece.context_messages} context messages masked" if piece.context_messages else ""
        header = f"── document {k} of {len(pieces)}: trains assistant message {replies}{ctx} ──"
        head = ("\n\n" if k > 1 else "") + header + "\n"
        highlight.append((head, None))
        at += len(head)
        highlight += view.highlight
        trained_chars += [(a + at, b + at) for a, b in view.trained_chars]
        at += len(view.text)
        token_views.append(f"<p><b>{header}</b></p>{view.token_html}")
    T = sum(len(p.input_ids) for p in pieces)
    trained = sum(int(p.trained.sum()) for p in pieces)
    summary = (
        f"**Sample {i} of {n}** — chat.reasoning: every_turn writes this row as **{len(pieces)} documents** "
        f"(the template drops the reasoning of earlier turns: each such turn is trained with its reasoning, the "
        f"conversation before it masked): **{T} tokens**, <span style='color:#2ca02c'>■</span> {trained} trained"
    )
    problems = _problems(prepared, sequence_length)
    return Preview(
        highlight=highlight,
        token_html="".join(token_views),
        summary=summary,
        problems=_problems_markdown(problems) or "✓ no problems in this sample",
        status="",
        n_rows=n,
        index=i,
        trained_chars=trained_chars,
        text="".join(x for x, _ in highlight),
    )


def _cut_lines(rendered, tok, tokenizer, masking, template, seq: int) -> str:
    """Preview summary lines: where a sample longer than ``seq`` would be cut by truncate and by split_turns."""
    from backend.split import split_conversation, turn_groups

    at = int(tok.offsets[seq, 0])
    inside = [t for t in getattr(rendered, "turns", None) or [] if t.begin <= at < max(t.end, t.content_end)]
    where = f"inside assistant message {inside[0].message_index}" if inside else "outside the assistant replies"
    out = (
        f"\n\n✂ **{len(tok.input_ids)} tokens > sequence_length {seq}**: truncate_documents: yes cuts at token "
        f"{seq} (char {at}, {where}; the rest goes on without the start of the conversation); no: skipped."
    )
    messages = getattr(rendered, "messages", None)
    if not messages:
        return out + " split_turns needs conversations (turns): this row is not split."
    try:
        res = split_conversation(rendered, tok, tokenizer, seq, masking, template)
    except Exception as e:
        return out + f" split_turns: a piece could not be rendered ({type(e).__name__}: {e})."
    n_sys = turn_groups(messages)[0]
    parts = []
    for k, piece in enumerate(res.pieces, 1):
        stop = piece.trained_messages[-1] + 1
        first = stop - (len(piece.messages) - n_sys)
        ctx = (
            f"context messages {first}–{first + piece.context_messages - 1} masked, " if piece.context_messages else ""
        )
        cut = f", reply cut: {piece.dropped_trained} trained tokens dropped" if piece.truncated_tokens else ""
        trains = ", ".join(str(m) for m in piece.trained_messages)
        parts.append(
            f"{k}) {'system + ' if n_sys else ''}{ctx}trains replies {trains} ({len(piece.input_ids)} tokens{cut})"
        )
    return out + f" split_turns cuts it at turn boundaries into **{len(res.pieces)} pieces**: " + "; ".join(parts)


def _problems(prepared, sequence_length) -> list[str]:
    """A row's health problems, "code: message": what prepare's per-row code found (render problems, end-of-turn
    checks, span repairs, the reason it skips the row) plus the length checks for ``sequence_length``
    (prepare checks lengths over the whole dataset instead). The preview and the dataset check both show these."""
    from backend.chat import check_length

    seq = int(sequence_length) if sequence_length else None
    problems = [f"{code}: {message}" for code, message, _ in prepared.problems]
    if not prepared.pieces:
        return problems + check_length(prepared.rendered, prepared.tokenized, seq)
    for k, p in enumerate(prepared.pieces, 1):  # chat.reasoning: every_turn: each document the row is written as
        problems += [f"{code}: document {k} of {len(prepared.pieces)}:{rest}" for code, _, rest in
                     (x.partition(":") for x in check_length(p.rendered, p.tokenized, seq))]  # fmt: skip
    return problems


def _problems_markdown(problems: list[str]) -> str:
    """ "code: message" problems as the preview's markdown list ("" for none)."""
    return "\n".join(f"- ⚠ `{p.split(':', 1)[0]}`: {p.split(':', 1)[1].strip() if ':' in p else p}" for p in problems)


def _preview_from(rendered, tok, tokenizer, i: int, n: int, template=None, problems=()) -> Preview:
    from backend.chat import eot_token_ids

    text = rendered.text
    mask = char_labels(len(text), tok.offsets, tok.trained)
    runs = runs_of(mask)
    highlight = [(text[a:b], TRAINED if v else MASKED) for a, b, v in runs]
    appended = getattr(rendered, "appended", None) or []
    results = getattr(rendered, "tool_result_spans", None) or []
    reasoning = getattr(rendered, "reasoning_spans", None) or []
    if appended or results or reasoning:  # each in its own colour; a trained tool result shows as trained
        kind = mask.astype(np.int8)
        for a, b in results:
            kind[a:b] = np.where(mask[a:b], 1, 3)
        for a, b in reasoning:
            kind[a:b] = np.where(mask[a:b], 4, 5)
        for a, b in appended:  # the appended marker: not written by the template, trained
            kind[a:b] = 2
        cuts = np.concatenate([[0], np.flatnonzero(kind[1:] != kind[:-1]) + 1, [len(kind)]]).tolist()
        label = {0: MASKED, 1: TRAINED, 2: APPENDED, 3: TOOL_RESULT, 4: REASONING, 5: REASONING_MASKED}
        highlight = [(text[a:b], label[int(kind[a])]) for a, b in zip(cuts[:-1], cuts[1:], strict=False)]
    trained_chars = [(a, b) for a, b, v in runs if v]
    T, k = len(tok.input_ids), int(tok.trained.sum())
    summary = (
        f"**Sample {i} of {n}** — **{T} tokens**: <span style='color:#2ca02c'>■</span> {k} trained "
        f"({k / T:.1%}), <span style='color:#999'>■</span> {T - k} masked; "
        f"{len(rendered.trained_spans)} trained span(s)"
        if T
        else f"Sample {i}: empty"
    )
    if appended:
        summary += f"; <span style='color:{COLOR_MAP[APPENDED]}'>■</span> end-of-turn marker appended (chat.final_eot)"
    eot = eot_token_ids(tokenizer, template)
    turns = getattr(rendered, "turns", None) or []
    if T and eot and turns:
        # the end-of-turn token of each assistant turn: inside the turn's marker text [content_end, end)
        starts = tok.offsets[:, 0]
        is_eot = np.isin(tok.input_ids, eot[:1])
        in_marker = np.zeros(T, dtype=bool)
        for t in turns:
            in_marker |= (starts >= t.content_end) & (starts < max(t.end, t.content_end + 1))
        mine = is_eot & in_marker
        name = tokenizer.convert_ids_to_tokens(eot[0])
        summary += (
            f"; end-of-turn `{name}` trained in **{int((mine & tok.trained).sum())} of {len(turns)}** assistant turns"
        )
    problems_md = _problems_markdown(problems)
    return Preview(
        highlight=highlight,
        token_html=token_html(text, tok.input_ids, tok.offsets, tok.trained, tokenizer),
        summary=summary,
        problems=problems_md or "✓ no problems in this sample",
        status="",
        n_rows=n,
        index=i,
        trained_chars=trained_chars,
        text=text,
    )


def step_index(index: int | float | None, delta: int, n_rows: int) -> int:
    """Prev/next with wrap-around; delta=0 means 'random'."""
    n = max(int(n_rows or 0), 1)
    if delta == 0:
        return random.randrange(n)
    return (int(index or 0) + delta) % n


# =============================================================================================== dataset check


@dataclass
class CheckResult:
    summary: str  # markdown
    figure: Any  # plotly length histogram
    problem_rows: list[int]  # example row indices, for the "jump to" dropdown
    problem_labels: list[str]  # "row 17: eot_not_trained" (same order)
    report: dict  # HealthReport.to_dict() with row indices mapped back to the dataset
    status: str = ""


def _sample_indices(n: int, max_rows: int, seed: int = 0) -> tuple[np.ndarray, bool]:
    if n <= max_rows:
        return np.arange(n), False
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=max_rows, replace=False)), True


def check_whole_dataset(
    s: DataSettings,
    sequence_length: int | float,
    truncate_documents: bool,
    max_rows: int | float = 5000,
    progress: Callable[[int, int], Any] | None = None,
) -> CheckResult:
    """The dataset's rows as prepare makes them (or an even random sample of ``max_rows``), each checked with
    the problems prepare's per-row code found plus the length checks (`_problems`), summarized. Rows prepare skips
    before tokenizing count under their skip reason."""
    from backend.chat import HealthReport
    from backend.chat.agent import trace_counts
    from backend.config import ConfigError
    from backend.split import reasoning_trained_apart
    from studio.plots import length_histogram

    seq = int(sequence_length) if sequence_length else None
    try:
        tokenizer = get_tokenizer(s.tokenizer)
        masking = s.masking()
        template = _template_arg(s.template, tokenizer)
        cfg = prepare_config_of(s)
        reader = get_reader(cfg)
        idx, sampled = _sample_indices(reader.n_rows, int(max_rows or 5000))
        report = HealthReport(examples=5)
        skipped = 0  # rows prepare writes no document for: counted once here, and under their reason below
        pairs = 0  # preference rows kept (each two documents)
        every_turn = [0, 0]  # rows chat.reasoning: every_turn writes as several documents, and those documents
        for j, prepared in enumerate(reader.samples(idx, cfg, tokenizer)):
            if prepared.tokenized is None:
                skipped += 1
                report.add(j, [f"{prepared.skipped.replace(': ', f': row {prepared.row}: ', 1)}"], 0, 0)
            else:
                tok = prepared.tokenized
                problems = _problems(prepared, seq)
                n_tokens, n_trained = len(tok.input_ids), tok.n_trained
                if prepared.rejected is not None:  # a preference pair: packed whole, both answers trained
                    pairs += 1
                    n_tokens += len(prepared.rejected[1].input_ids)
                    n_trained += prepared.rejected[1].n_trained
                    problems = [p for p in problems if not p.startswith(("too_long", "assistant_cut"))]
                    problems += _pair_length_problems(tok, prepared.rejected[1], seq)
                trace, lengths = trace_counts(prepared.rendered, tok, tokenizer), None
                if s.reasoning == "every_turn":  # the check line says how many dropped traces it trains
                    trace["reasoning_trained_apart"] = 0
                if prepared.pieces:  # chat.reasoning: every_turn: the documents the row is written as
                    lengths = [len(p.input_ids) for p in prepared.pieces]
                    every_turn = [every_turn[0] + 1, every_turn[1] + len(lengths)]
                    n_tokens, n_trained = sum(lengths), sum(int(p.trained.sum()) for p in prepared.pieces)
                    trace["reasoning_trained_apart"] = len(reasoning_trained_apart(prepared.rendered, prepared.pieces))
                report.add(j, problems, n_tokens, n_trained, len(prepared.rendered.appended), lengths)
                report.add_trace(trace)
            if progress is not None:
                progress(j + 1, len(idx))
    except ConfigError as e:
        return CheckResult("", None, [], [], {}, "⚠ " + "; ".join(e.problems))
    except Exception as e:
        return CheckResult("", None, [], [], {}, f"⚠ {type(e).__name__}: {e}")
    train_on_eot = s.train_on_eot
    d = report.to_dict()
    for c in [*d["problems"].values(), d["appended_eot"]]:  # positions in the sample -> rows of the dataset
        c["examples"] = [int(idx[j]) for j in c["examples"]]
    lengths = np.asarray(report.lengths, dtype=np.int64)
    n = report.n_samples
    too_long = lengths[lengths > seq] if seq else lengths[:0]
    eot_bad = d["problems"].get("eot_not_trained", {}).get("count", 0)
    kept = n - skipped
    lines = [
        f"**{n} samples checked**"
        + (
            f" (an even random sample of {reader.n_rows} rows; raise the limit to check all)"
            if sampled
            else " (the whole dataset)"
        ),
        f"- samples skipped, nothing trained from them: **{skipped}**"
        + (" (their reasons are listed below)" if skipped else ""),
    ]
    if kept:
        lines += [
            f"- assistant spans found in **{report.span_found_share:.1%}** of samples",
            "- end-of-turn marker trained: "
            f"**{'yes, in every trained turn' if not eot_bad else f'NO in {eot_bad} samples'}**"
            + ("" if train_on_eot else " (train_on_eot is off: the model will not learn to stop)"),
        ]
    else:  # nothing below may read as a pass: there is no trained turn to judge
        lines.append("- ⚠ **no sample is kept: prepare would write no document** (exit code 2)")
    if pairs:
        identical = d["problems"].get("identical_answers", {}).get("count", 0)
        over = d["problems"].get("pair_too_long", {}).get("count", 0)
        fits = d["problems"].get("pair_fits_with_shared_prompt", {}).get("count", 0)
        lines.append(
            f"- preference pairs: **{pairs} kept** (prompt + chosen, prompt + rejected; only the answers trained), "
            f"**{identical}** skipped with identical answers, **{over}** longer than sequence_length together "
            f"even with the prompt placed once, **{fits}** that fit only with it (training.dpo.share_prompt on "
            "sdpa_packed attention: every CPU run)"
        )
    lines.append(f"- trained tokens: **{report.n_trained} / {report.n_tokens} ({report.trained_token_share:.1%})**")
    if report.trace_line():  # tool calls trained, tool results masked, reasoning trained or dropped
        lines.append(f"- {report.trace_line()}")
    if every_turn[0]:
        lines.append(
            f"- chat.reasoning: every_turn writes **{every_turn[0]} row(s) as {every_turn[1]} documents**, each "
            "training a reply with the reasoning the full conversation drops (the counts and lengths here are those "
            "documents')"
        )
    undecided = d["problems"].get("eot_undecided", {}).get("count", 0)
    if undecided:
        lines.append(f"- end-of-turn marker undecidable from the template (not trained): **{undecided} samples**")
    if report.n_appended:
        lines.append(
            f"- end-of-turn marker appended after a final reply the template leaves open: **{report.n_appended} "
            "samples** (chat.final_eot: append; shown in its own colour in the preview)"
        )
    if seq:
        lost_tok = int(too_long.sum())
        share = lost_tok / report.n_tokens if report.n_tokens else 0.0
        verb = (
            "cut at row edges (truncate_documents: yes)" if truncate_documents else "SKIPPED (truncate_documents: no)"
        )
        verb = (
            "counted with the prompt in both documents (the pair line above says what training skips)"
            if pairs
            else verb
        )
        lines.append(
            f"- longer than sequence_length {seq}: **{len(too_long)} {'pairs' if pairs else 'documents'} holding "
            f"{lost_tok} tokens "
            f"({share:.1%} of all tokens)**, {verb}"
        )
    if pairs:  # a pair is never cut or split: long_documents and truncate_documents do not apply
        pass
    elif every_turn[0] and seq:  # the comparison below reads whole conversations, not every_turn's documents
        lines.append(
            "- long documents: split_turns cuts every_turn's documents at turns like conversations (the skip / "
            "truncate / split_turns comparison is shown under chat.reasoning: as_rendered)"
        )
    elif seq and len(too_long):
        lines += _long_mode_lines(reader, cfg, idx, lengths, report, tokenizer, masking, template, seq)
    elif seq and lengths.size:  # nothing to compare at this length: say so, and show it where it matters
        pick = comparison_length(lengths)
        lines.append(
            f"- no document is longer than sequence_length {seq}: skip, truncate and split_turns train the same"
            + (f"; at sequence_length {pick} they would differ:" if pick else "")
        )
        if pick:
            lines += _long_mode_lines(reader, cfg, idx, lengths, report, tokenizer, masking, template, pick)
    if lengths.size:
        lines.append(
            f"- length: median {int(np.median(lengths))}, p99 {int(np.percentile(lengths, 99))}, "
            f"max {int(lengths.max())} tokens"
        )
    rows_out, labels = [], []
    for code, c in d["problems"].items():
        lines.append(f"- ⚠ `{code}`: {c['count']} sample(s), e.g. rows {c['examples']} — {c['first']}")
        for r in c["examples"]:
            rows_out.append(r)
            labels.append(f"row {r}: {code}")
    if not d["problems"]:
        lines.append("- ✓ no problems found")
    lines.append(_fast_path_line(tokenizer, template))
    fig = length_histogram(lengths, seq)
    return CheckResult("\n".join(lines), fig, rows_out, labels, d)


def comparison_length(lengths) -> int | None:
    """A sequence length at which the long-document comparison is worth showing: the power of two (at least 32)
    just below the 90th percentile of document lengths, so about a tenth of documents are longer. None when the
    documents are too short for any.

    >>> comparison_length([100, 200, 300, 400, 500, 600, 700, 800, 900, 1000])
    512
    >>> comparison_length([10, 12]) is None
    True
    """
    import math

    lengths = np.asarray(lengths)
    if not lengths.size:
        return None
    p90 = float(np.percentile(lengths, 90))
    pick = 2 ** int(math.floor(math.log2(max(p90, 1))))
    pick = pick if pick < p90 else pick // 2
    return pick if pick >= 32 and (lengths > pick).any() else None


def _long_mode_lines(reader, cfg, idx, lengths, report, tokenizer, masking, template, seq: int) -> list[str]:
    """What skip / truncate / split_turns keep and train at ``seq`` (backend.split); only long rows are re-read."""
    from backend.split import compare_modes, long_document_stats

    aligned = len(lengths) == len(idx)  # lengths skip rows that failed: then every row is read again
    docs = []
    long_rows = [int(idx[j]) for j in (np.flatnonzero(lengths > seq).tolist() if aligned else range(len(idx)))]
    for prepared in reader.samples(long_rows, cfg, tokenizer):
        if prepared.tokenized is None:  # a row prepare skips already counts under its reason
            continue
        try:
            docs.append(long_document_stats(prepared.rendered, prepared.tokenized, tokenizer, seq, masking, template))
        except Exception:
            continue
    fitting = (0, 0, 0)
    if aligned:
        fit = lengths <= seq
        fitting = (int(fit.sum()), int(lengths[fit].sum()), report.n_trained - sum(d[1] for d in docs))
    m = compare_modes(docs, seq, fitting)
    s, t, sp = m["skip"], m["truncate"], m["split_turns"]
    return [
        f"- long documents at sequence_length {seq}, what each choice keeps and trains:",
        f"    - skip (truncate_documents: no): {s['tokens']:,} tokens kept, **{s['trained']:,} trained "
        f"({s['trained_share']:.1%})**",
        f"    - truncate (truncate_documents: yes): {t['tokens']:,} tokens, {t['trained']:,} trained "
        f"({t['trained_share']:.1%}), of which {t['trained_after_cut']:,} after the cut, without the start of "
        "their conversation",
        f"    - split_turns (prepare long_documents.mode): {sp['long_documents']} conversations → "
        f"{sp['documents'] - s['documents']} pieces cut at turn boundaries, {sp['tokens']:,} tokens (context "
        f"repeated, masked), **{sp['trained']:,} trained ({sp['trained_share']:.1%})**, each with its question",
    ]


def _fast_path_line(tokenizer, template) -> str:
    """One summary line: whether prepare will render these rows by substitution (proven) or row by row."""
    from backend.chat import render_fast_path

    try:
        fp = render_fast_path(tokenizer, template)
    except Exception:
        return ""
    if not fp["patterns"]:
        return "- template speed: rendered row by row (no role pattern with a reply, or generation markers)"
    if fp["proven"] == fp["patterns"]:
        return (
            f"- template speed: proven not to look at message content for all {fp['patterns']} role pattern(s): "
            "rows are rendered by substitution, Jinja only as a periodic check"
        )
    return (
        f"- template speed: {fp['patterns'] - fp['proven']} of {fp['patterns']} role pattern(s) rendered with Jinja "
        f"row by row (same result, slower prepare): {fp['reasons'][0] if fp['reasons'] else 'not proven'}"
    )
