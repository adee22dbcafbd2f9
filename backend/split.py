"""Long conversations -> several documents cut at turn boundaries (prepare's ``long_documents.mode: split_turns``).

A conversation whose tokens exceed ``sequence_length`` is not skipped (``truncate_documents: no``) nor cut
mid-reply (``yes``): it becomes pieces, each the chat template applied to the piece's own messages::

    conversation  [system] U1 A1 U2 A2 U3 A3 U4 A4          (6,000 tokens, sequence_length 4,096)
    piece 1       [system] U1 A1 U2 A2                       A1, A2 trained
    piece 2       [system] U2 A2 U3 A3 U4 A4                 U2 A2 masked context, A3, A4 trained

Rules (each has a test in tests/test_split.py):

* Cuts fall only at *turn boundaries*: before a user message that follows an assistant message. The messages
  between two boundaries form a *group* (its user question(s), then its assistant reply or replies).
* Each piece is: the leading system message(s), then context groups (rendered, all tokens masked), then the groups
  it trains. Trained groups are taken greedily (as many as fit); then as many preceding groups as still fit are
  added as context. Every trained assistant reply is trained in exactly one piece, and that piece holds its
  question (the reply's own group).
* The rendered text of a piece is exactly ``chat.render(piece_messages)``: the template applied to those messages,
  nothing invented, so a piece looks like a conversation the model will meet at inference.
* Token counts are planned from the full conversation's tokenization (per-group token costs), then every piece is
  rendered, tokenized and checked; one that is still too long loses a context group, then a trained group (which
  moves to the next piece). Nothing longer than ``sequence_length`` is ever returned.
* A group that alone (with the system prompt) exceeds ``sequence_length`` is truncated at ``sequence_length``
  tokens, inside its reply: the tail is dropped, counted in ``SplitResult.truncated_groups`` and
  ``dropped_trained_tokens``. A piece left with no trained token is dropped.

`plan_pieces` is the same planner on token counts alone (no tokenizer): the benchmark and the studio's
comparison use it on simulated or measured group lengths.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

__all__ = [
    "LONG_DOCUMENT_MODES",
    "Piece",
    "SplitResult",
    "turn_groups",
    "plan_pieces",
    "split_conversation",
    "compare_modes",
    "long_document_stats",
    "split_documents",
]

LONG_DOCUMENT_MODES = ("keep", "split_turns")


@dataclass
class Piece:
    """One document made from a long conversation."""

    messages: list[dict]  # the piece's own messages: system, context groups, trained groups
    trained_messages: list[int]  # indices (in the ORIGINAL conversation) of the assistant messages trained here
    context_messages: int  # messages after the system prompt that are masked context
    text: str  # the template applied to ``messages`` (exactly chat.render(messages).text)
    input_ids: np.ndarray  # (T,) int64, T <= sequence_length
    trained: np.ndarray  # (T,) bool
    truncated_tokens: int = 0  # tokens cut off the end (the group alone exceeded sequence_length)
    dropped_trained: int = 0  # of which trained
    # a `reasoning_pieces` document, for `split_documents` to cut it at turns in turn: the piece's `chat.render`
    # output, the masking it was rendered with and its tokens (whose offsets the split plan reads)
    rendered: object = field(default=None, repr=False)
    masking: object = field(default=None, repr=False)
    tokenized: object = field(default=None, repr=False)


@dataclass
class SplitResult:
    pieces: list[Piece] = field(default_factory=list)
    truncated_groups: int = 0  # groups that alone exceeded sequence_length (their reply tail was dropped)
    dropped_trained_tokens: int = 0  # trained tokens lost to that truncation (and to pieces left with none)
    context_tokens: int = 0  # masked tokens before the first trained one, in every piece but the first


def turn_groups(messages: list[dict]) -> tuple[int, list[tuple[int, int]]]:
    """(number of leading system messages, [(start, stop) message ranges of the groups]).

    A group starts at the first non-system message and at every user message that follows an assistant message.

    >>> turn_groups([{"role": "system"}, {"role": "user"}, {"role": "assistant"}, {"role": "user"},
    ...              {"role": "assistant"}, {"role": "assistant"}, {"role": "user"}])
    (1, [(1, 3), (3, 6), (6, 7)])
    """
    n_sys = 0
    while n_sys < len(messages) and messages[n_sys]["role"] == "system":
        n_sys += 1
    starts = [n_sys] if n_sys < len(messages) else []
    for k in range(n_sys + 1, len(messages)):
        if messages[k]["role"] == "user" and messages[k - 1]["role"] == "assistant":
            starts.append(k)
    bounds = starts + [len(messages)]
    return n_sys, [(bounds[g], bounds[g + 1]) for g in range(len(starts))]


def _plan_one(i: int, head: int, costs, targets: set, length: int) -> tuple[int, int]:
    """The piece that trains group ``i`` first: (first context group, last trained group)."""
    total = head + costs[i]
    j = i
    while j + 1 < len(costs) and total + costs[j + 1] <= length:
        j += 1
        total += costs[j]
    while j > i and j not in targets:  # a piece ends with a reply it trains
        total -= costs[j]
        j -= 1
    c = i
    while c > 0 and total + costs[c - 1] <= length:
        c -= 1
        total += costs[c]
    return c, j


def plan_pieces(head: int, costs, length: int, targets=None) -> list[tuple[int, int, int]]:
    """Pieces on token counts: ``head`` tokens of system prompt (and BOS), ``costs[g]`` tokens of group ``g``,
    ``targets`` the groups holding a trained reply (default all). Returns ``[(context_start, first_trained,
    last_trained)]`` (inclusive group indices); a piece with ``head + costs[first] > length`` is one group that
    will be truncated.

    >>> plan_pieces(10, [50, 50, 50, 50], 120)   # 10 + 50 + 50 fits 120: groups 0-1, then 2-3, no context needed
    [(0, 0, 1), (2, 2, 3)]
    >>> plan_pieces(10, [50, 50, 50, 50], 120, targets=[1, 3])   # context fills what the trained group leaves
    [(0, 1, 1), (2, 3, 3)]
    """
    costs = list(costs)
    targets = set(range(len(costs))) if targets is None else set(targets)
    out = []
    i = min(targets, default=len(costs))
    while i < len(costs):
        c, j = _plan_one(i, head, costs, targets, length)
        out.append((c, i, j))
        i = min((g for g in targets if g > j), default=len(costs))
    return out


def _piece_spans(rendered, first_trained_message: int, piece_targets: set) -> list[tuple[int, int]]:
    """The trained character spans of a piece: render's own spans that overlap a trained reply's turn window.
    Turns from delimiter masking carry no message index: they are matched to assistant messages in order."""
    assistants = [k for k, m in enumerate(rendered.messages) if m["role"] == "assistant"]
    windows = []
    turns = list(rendered.turns)
    for n, t in enumerate(turns):
        k = t.message_index if t.message_index >= 0 else (assistants[n] if n < len(assistants) else -1)
        if k >= first_trained_message and k in piece_targets:
            windows.append((t.begin, max(t.end, t.content_end)))
    return [(b, e) for b, e in rendered.trained_spans if any(b < we and e > wb for wb, we in windows)]


def split_conversation(
    rendered,
    tokenized,
    tokenizer,
    sequence_length: int,
    masking=None,
    chat_template: str | None = None,
    targets=None,
) -> SplitResult:
    """Split one rendered conversation (``chat.render`` output) whose tokens (``tokenized``) exceed
    ``sequence_length``; see the module docstring. ``masking`` as given to render (train_on 'last' trains only the
    last reply: then one piece, the last group with as much context as fits). ``targets``: the indices of the
    assistant messages to train, in place of those ``masking.train_on`` names (a `reasoning_pieces` document)."""
    from backend import chat

    masking = masking or chat.Masking()
    # every reply's turn is found (train_on 'last' picks the trained one below); a piece's last reply gets the marker
    # the conversation has after it (append), unless it is the conversation's own last; tool-call turns as the run says
    all_turns = replace(masking, train_on="all", final_eot="append")
    at_the_end = replace(all_turns, final_eot=masking.final_eot)  # the piece that ends the conversation: as it does
    L = int(sequence_length)
    messages = rendered.messages
    n_sys, groups = turn_groups(messages)
    assistants = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    if targets is not None:
        wanted = set(targets) & set(assistants)
    else:
        wanted = set(assistants[-1:] if masking.train_on == "last" else assistants)
    targets = {g for g, (a, b) in enumerate(groups) if any(a <= k < b for k in wanted)}
    result = SplitResult()
    if not groups or not targets:
        return result

    if len(rendered.turns) < len(assistants):  # train_on 'last' finds only the trained turn: find them all
        rendered = chat.render(messages, tokenizer, all_turns, chat_template, tools=rendered.tools)
        tokenized = chat.tokenize(rendered.text, [], tokenizer)
    # per-group token costs from the full tokenization: group g ends where its last reply's turn ends
    ends = {}
    for n, t in enumerate(rendered.turns):
        k = t.message_index if t.message_index >= 0 else (assistants[n] if n < len(assistants) else -1)
        ends[k] = max(t.end, t.content_end)
    starts_tok = tokenized.offsets[:, 0]
    T = len(tokenized.input_ids)
    bound = [0]
    for a, b in groups[:-1]:
        last = max((ends[k] for k in range(a, b) if k in ends), default=None)
        bound.append(bound[-1] if last is None else max(bound[-1], int(np.searchsorted(starts_tok, last))))
    bound.append(T)
    costs = [max(0, bound[g + 1] - bound[g]) for g in range(len(groups))]
    head = 0
    cache: dict = {}

    def build(c: int, i: int, j: int):
        key = (c, i, j)
        if key not in cache:
            msgs = messages[:n_sys] + messages[groups[c][0] : groups[j][1]]
            offset = groups[c][0] - n_sys  # original index = piece index + offset (after the system messages)
            piece_masking = at_the_end if groups[j][1] == len(messages) else all_turns
            r = chat.render(msgs, tokenizer, piece_masking, chat_template, tools=rendered.tools)  # with the row's tools
            piece_targets = {k - offset for k in wanted if groups[i][0] <= k < groups[j][1]}
            spans = _piece_spans(r, groups[i][0] - offset, piece_targets)
            tok = chat.tokenize_batch([r.text], [spans], tokenizer)[0]  # the Rust fast path of prepare
            cache[key] = (msgs, r, tok, sorted(k + offset for k in piece_targets))
        return cache[key]

    if len(groups) > 1:  # the system prompt's cost: the second group rendered alone, minus its own cost
        head = max(0, len(build(1, 1, 1)[2].input_ids) - costs[1])
    i = min(targets)
    while True:
        c, j = _plan_one(i, head, costs, targets, L)
        while True:
            msgs, r, tok, trained_msgs = build(c, i, j)
            if len(tok.input_ids) <= L:
                break
            if c < i:
                c += 1
            elif j > i:
                j -= 1
                while j > i and j not in targets:
                    j -= 1
            else:
                break  # one group alone is too long: truncated below
        ids, trained = tok.input_ids, tok.trained
        cut = max(0, len(ids) - L)
        dropped = int(trained[L:].sum()) if cut else 0
        if cut:
            result.truncated_groups += 1
            ids, trained = ids[:L], trained[:L]
        if trained.any():
            if result.pieces:  # masked tokens before the first trained one: repeated system prompt and context
                result.context_tokens += int(np.argmax(trained))
            result.pieces.append(
                Piece(
                    messages=msgs,
                    trained_messages=trained_msgs,
                    context_messages=groups[i][0] - groups[c][0],
                    text=r.text,
                    input_ids=ids,
                    trained=trained,
                    truncated_tokens=cut,
                    dropped_trained=dropped,
                )
            )
        else:
            dropped = int(tok.trained.sum())
        result.dropped_trained_tokens += dropped
        nxt = [g for g in targets if g > j]
        if not nxt:
            return result
        i = min(nxt)


def long_document_stats(rendered, tokenized, tokenizer, sequence_length, masking=None, chat_template=None):
    """``(n_tokens, n_trained, trained_after_first_cut, pieces)`` of one document for `compare_modes`; pieces
    (``[(tokens, trained)]`` of split_turns) only for a conversation longer than ``sequence_length``."""
    L = int(sequence_length)
    T, k = len(tokenized.input_ids), int(tokenized.trained.sum())
    if T <= L:
        return T, k, 0, None
    pieces = []
    if getattr(rendered, "messages", None):  # guide-form text has no turns: it cannot be split
        res = split_conversation(rendered, tokenized, tokenizer, L, masking, chat_template)
        pieces = [(len(p.input_ids), int(p.trained.sum())) for p in res.pieces]
    return T, k, int(tokenized.trained[L:].sum()), pieces


def compare_modes(docs, sequence_length: int, fitting: tuple[int, int, int] = (0, 0, 0)) -> dict:
    """What each way of handling long documents keeps and trains.

    ``docs``: iterable of ``(n_tokens, n_trained, trained_after_first_cut, pieces)``: a document's tokens, trained
    tokens, trained tokens past its first ``sequence_length`` tokens, and for a long one the ``(tokens, trained)``
    of each split_turns piece (None for a document that fits). Returns, per mode, documents, tokens and trained
    tokens kept; for truncate also the trained tokens that land after the cut, without the start of their
    conversation (system prompt, first questions) in view.
    """
    L = int(sequence_length)
    out = {
        "sequence_length": L,
        "all": {"documents": 0, "tokens": 0, "trained": 0},
        "skip": {"documents": 0, "tokens": 0, "trained": 0},
        "truncate": {"documents": 0, "tokens": 0, "trained": 0, "trained_after_cut": 0},
        "split_turns": {"documents": 0, "tokens": 0, "trained": 0, "long_documents": 0},
    }
    for key in ("all", "skip", "truncate", "split_turns"):
        for name, v in zip(("documents", "tokens", "trained"), fitting, strict=True):
            out[key][name] += int(v)
    for n_tokens, n_trained, after_cut, pieces in docs:
        for key in ("all", "truncate"):
            out[key]["documents"] += 1
            out[key]["tokens"] += n_tokens
            out[key]["trained"] += n_trained
        if n_tokens <= L:
            for key in ("skip", "split_turns"):
                out[key]["documents"] += 1
                out[key]["tokens"] += n_tokens
                out[key]["trained"] += n_trained
            continue
        out["truncate"]["trained_after_cut"] += after_cut
        s = out["split_turns"]
        s["long_documents"] += 1
        for t, k in pieces or ():
            s["documents"] += 1
            s["tokens"] += t
            s["trained"] += k
    total = out["all"]["trained"]
    for key in ("skip", "truncate", "split_turns"):
        out[key]["trained_share"] = out[key]["trained"] / total if total else 0.0
    return out


def split_documents(rows, ids, trained, bounds, rendered, tokenized_of, tokenizer, masking, chat_template, length):
    """Prepare's flat chunk (document ``j`` = ``ids[bounds[j]:bounds[j+1]]`` from input row ``rows[j]``) with every
    conversation longer than ``length`` replaced by its pieces (same row: the pieces stay in one split).

    ``rendered[j]``: the `chat.RenderedSample` of document j (None: not a conversation, kept whole), or the `Piece`
    that `every_turn_documents` made it (cut with the masking and the trained replies of that piece);
    ``tokenized_of(j)``: its `chat.TokenizedSample`. Returns ``(rows, ids, trained, bounds, stats, problems)``,
    problems as prepare's ``(row, code, message, skipped)``.
    """
    from backend import chat

    L = int(length)
    stats = {
        "conversations_split": 0,  # input rows (an every_turn conversation's documents count once)
        "documents_split": 0,  # documents replaced by their pieces (several per row under chat.reasoning: every_turn)
        "pieces": 0,
        "context_tokens": 0,
        "truncated_groups": 0,
        "dropped_trained_tokens": 0,
        "not_split": 0,
    }
    problems = []
    lengths = np.diff(bounds)
    if not (lengths > L).any():
        return rows, ids, trained, bounds, stats, problems
    out_rows, out_ids, out_trained, out_len = [], [], [], []
    split_rows = set()
    for j in range(len(lengths)):
        a, b = int(bounds[j]), int(bounds[j + 1])
        pieces = None
        if b - a > L and rendered[j] is not None:
            src = rendered[j]
            try:
                if isinstance(src, Piece):  # a chat.reasoning: every_turn document: its own replies, as rendered
                    res = split_conversation(
                        src.rendered, src.tokenized, tokenizer, L, src.masking, chat_template, src.trained_messages
                    )
                else:
                    res = split_conversation(src, tokenized_of(j), tokenizer, L, masking, chat_template)
            except chat.ChatError as e:
                problems.append((rows[j], "not_split", f"a piece could not be rendered: {e}", False))
            else:
                if res.pieces:
                    pieces = res.pieces
                    split_rows.add(int(rows[j]))
                    stats["documents_split"] += 1
                    stats["pieces"] += len(pieces)
                    stats["context_tokens"] += res.context_tokens
                    stats["truncated_groups"] += res.truncated_groups
                    stats["dropped_trained_tokens"] += res.dropped_trained_tokens
                    if res.truncated_groups:
                        problems.append(
                            (
                                rows[j],
                                "reply_truncated",
                                f"{res.truncated_groups} exchange(s) longer than {L} tokens alone: reply cut at {L} "
                                f"tokens, {res.dropped_trained_tokens} trained tokens dropped",
                                False,
                            )
                        )
                else:
                    problems.append((rows[j], "not_split", "no piece keeps a trained token: kept whole", False))
        if pieces is None:
            stats["not_split"] += int(b - a > L)
            out_rows.append(rows[j])
            out_ids.append(ids[a:b])
            out_trained.append(trained[a:b])
            out_len.append(b - a)
            continue
        for p in pieces:
            out_rows.append(rows[j])
            out_ids.append(p.input_ids.astype(ids.dtype))
            out_trained.append(p.trained)
            out_len.append(len(p.input_ids))
    stats["conversations_split"] = len(split_rows)
    new_bounds = np.concatenate([[0], np.cumsum(out_len, dtype=np.int64)])
    return (
        np.asarray(out_rows, np.int64),
        np.concatenate(out_ids),
        np.concatenate(out_trained),
        new_bounds,
        stats,
        problems,
    )


def reasoning_pieces(rendered, tokenizer, masking=None, chat_template: str | None = None) -> list[Piece] | None:
    """``chat.reasoning: every_turn`` for one rendered conversation: each trained assistant turn whose reasoning the
    template drops in the full rendering (`RenderedSample.reasoning_rendered`) becomes its own document, the
    conversation up to it rendered as masked context, so the trace is trained once, as the model sees it at
    inference; the full conversation keeps the other trained turns (and is dropped when none is left). None when
    no reasoning is dropped, or when the template drops it even from a final reply (the conversation stays one
    document).

        conversation  U1 A1(r1) T1 A2(r2) U2 A3(r3)     the template writes only r3 (after the last user turn)
        piece 1       U1 A1(r1)                         A1 with r1 trained
        piece 2       U1 A1 T1 A2(r2)                   context masked, A2 with r2 trained
        piece 3       U1 A1 T1 A2 U2 A3(r3)             A3 with r3 trained (the full conversation)
    """
    import dataclasses

    from backend import chat

    dropped = dropped_reasoning(rendered)
    if not dropped:
        return None
    masking = dataclasses.replace(masking or chat.Masking(), train_on="all", reasoning="as_rendered")
    # a piece ends before the conversation does (the final reply's reasoning is never dropped: the piece would be
    # the conversation itself): it trains the marker its reply has there, as split_turns' inner pieces do
    inside = dataclasses.replace(masking, final_eot="append")
    trained_turns = {
        t.message_index for t in rendered.turns if any(b < t.end and e > t.begin for b, e in rendered.trained_spans)
    }
    rest = set(trained_turns)
    pieces = []
    for k in dropped:
        if k not in trained_turns:
            continue
        msgs = rendered.messages[: k + 1]
        r = chat.render(msgs, tokenizer, inside, chat_template, tools=rendered.tools)
        if r.reasoning_rendered.get(k):  # the template writes it as the final reply: its own document
            pieces.append((msgs, r, inside, _piece_spans(r, k, {k}), [k]))
            rest.discard(k)
    if not pieces:
        return None  # the template writes no reasoning at all: nothing to gain from splitting
    if rest:
        pieces.append((rendered.messages, rendered, masking, _piece_spans(rendered, 0, rest), sorted(rest)))
    toks = chat.tokenize_batch([p[1].text for p in pieces], [p[3] for p in pieces], tokenizer)
    n_sys, groups = turn_groups(rendered.messages)

    def context(first_trained: int) -> int:  # messages after the system prompt before the trained reply's group
        return next(a for a, b in groups if a <= first_trained < b) - n_sys

    return [
        Piece(
            messages=msgs,
            trained_messages=trained_msgs,
            context_messages=context(trained_msgs[0]),
            text=r.text,
            input_ids=tok.input_ids,
            trained=tok.trained,
            rendered=r,
            masking=piece_masking,
            tokenized=tok,
        )
        for (msgs, r, piece_masking, _, trained_msgs), tok in zip(pieces, toks, strict=True)
        if tok.trained.any()
    ]


def reasoning_trained_apart(rendered, pieces) -> list[int]:
    """The assistant messages whose reasoning the full rendering ``rendered`` drops and one of ``pieces`` (its
    `reasoning_pieces`) writes and trains: what chat.reasoning: every_turn recovered."""
    dropped = set(dropped_reasoning(rendered))
    return sorted(
        k for p in pieces or () for k in p.trained_messages if k in dropped and p.rendered.reasoning_rendered.get(k)
    )


def dropped_reasoning(rendered) -> list[int]:
    """The assistant messages whose reasoning the template does not write in ``rendered`` (a `RenderedSample`)."""
    return [k for k, shown in rendered.reasoning_rendered.items() if not shown]


def every_turn_documents(rows, ids, trained, bounds, rendered, tokenizer, masking, chat_template):
    """Prepare's flat chunk with every conversation whose template drops reasoning replaced by its
    `reasoning_pieces` (same row: the pieces stay in one split). Returns ``(rows, ids, trained, bounds, origin,
    stats)``: ``origin[d]`` is the input document a kept document is, ``stats`` counts
    ``reasoning_split`` conversations and the ``reasoning_pieces`` documents made of them. A piece's origin is the
    `Piece` itself, which `split_documents` cuts at turns when it is longer than split_turns' length."""
    stats = {"reasoning_split": 0, "reasoning_pieces": 0}
    out_rows, out_ids, out_trained, origin = [], [], [], []
    for j in range(len(bounds) - 1):
        a, b = int(bounds[j]), int(bounds[j + 1])
        pieces = reasoning_pieces(rendered[j], tokenizer, masking, chat_template) if rendered[j] is not None else None
        if not pieces:
            out_rows.append(rows[j])
            out_ids.append(ids[a:b])
            out_trained.append(trained[a:b])
            origin.append(j)
            continue
        stats["reasoning_split"] += 1
        stats["reasoning_pieces"] += len(pieces)
        for p in pieces:
            out_rows.append(rows[j])
            out_ids.append(p.input_ids.astype(ids.dtype))
            out_trained.append(p.trained)
            origin.append(p)
    lengths = [len(x) for x in out_ids]
    return (
        np.asarray(out_rows, np.int64),
        np.concatenate(out_ids) if out_ids else ids[:0],
        np.concatenate(out_trained) if out_trained else trained[:0],
        np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]),
        origin,
        stats,
    )
