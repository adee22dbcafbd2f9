"""Rows to documents: the one code path from an input row to the tokens and trained mask prepare writes.

`backend.prepare` runs `_process_chunk` over chunks of rows (in worker processes); the studio's preview, its
dataset check and packing view, and the notebooks call `prepared_sample` / `RowReader.sample` for one row, which
runs the same `_process_chunk` on a chunk of that one row. So what the studio shows is what training reads:

    >>> from backend.config import load_prepare_config
    >>> reader = RowReader(load_prepare_config("assets/configs/tiny_prepare.yaml"))
    >>> s = reader.sample(0)
    >>> s.documents[0][0][:3], s.documents[0][1][:3], s.skipped    # (ids, trained) as TokenDataset.document
    (array([1000, 1004,   82]), array([False, False, False]), None)

Per row, through the table ``FORMS[form](row, (job, tokenizer, masking)) -> list[Document]`` (forms from
`backend.sources.detect_form`; a row that becomes no document raises `SkipRow` with its reason):
- ``chat``: `backend.chat.render` with the ``chat:`` section (and the row's ``tools``) -> text + trained spans;
- ``spans`` (the guide's form): ``field`` + ``loss_masking_spans`` (inclusive, NOT trained), repaired by
  `repair_spans`;
- ``text``: ``field`` alone, every token trained.
Then `backend.chat` tokenizes the chunk in one batched call; a row without a trained token is skipped
(``no_trained_tokens``); with ``long_documents.mode: split_turns`` a long conversation becomes several documents
(`backend.split.split_documents`).

Span repair rule (guide form):
- a span that is not a pair of integers, a null spans value, or a reversed span (begin > end): the row is
  SKIPPED. Dropping a masked span would train on text someone meant to mask, and we cannot tell what was meant.
- a span partly outside the text is clipped to ``[0, len(text) - 1]``; one wholly outside is dropped (it
  masks nothing); overlapping spans are merged. The row is written and the repair is counted.
Rows skipped: ``unparseable_row`` (JSON line), ``missing_field``, ``empty_text``, ``bad_spans``,
``bad_conversation`` (the `ConversationError` message), ``no_trained_tokens``.
"""

from __future__ import annotations

import json
import os
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from backend.dataset import token_dtype
from backend.sources import BadRow, PrepareError, detect_form, open_source

if TYPE_CHECKING:
    from backend.config import PrepareConfig

__all__ = [
    "Document",
    "FORMS",
    "PreparedRow",
    "RowReader",
    "SKIP_REASONS",
    "SkipRow",
    "prepared_sample",
    "repair_spans",
]

CHUNK_ROWS = 512  # rows per worker task: big enough for the batched tokenizer, small enough for smooth progress
SKIP_REASONS = (
    "unparseable_row",
    "missing_field",
    "empty_text",
    "bad_spans",
    "bad_conversation",
    "no_trained_tokens",
    "bad_pair",  # preference rows: a chosen/rejected/prompt value of no usable shape
    "identical_answers",  # preference rows: chosen == rejected (the pair teaches nothing: its loss is always ln 2)
)


# ------------------------------------------------------------------------------------------ span repair
def repair_spans(raw, text_len: int) -> tuple[list[tuple[int, int]] | None, list[str], str | None]:
    """Guide-form masked spans -> (clean inclusive spans, repair notes, reason to skip the row or None).

    >>> spans, notes, skip = repair_spans([[5, 9], [0, 2], [8, 12], [40, 50]], 20)
    >>> spans, skip
    ([(0, 2), (5, 12)], None)
    >>> notes
    ['spans_clipped: span [40, 50] outside text of 20 chars dropped', 'spans_merged: span [8, 12] overlaps [5, 9]']
    >>> repair_spans([[4, 1]], 20)[2]
    'reversed span [4, 1] (begin > end)'
    """
    if raw is None:
        return None, [], "spans value is null (use [] for 'nothing masked')"
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            return None, [], f"spans value is a string that is not JSON: {raw[:40]!r}"
    if not isinstance(raw, (list, tuple, np.ndarray)):
        return None, [], f"spans must be a list of [begin, end] pairs, got {type(raw).__name__}"
    spans, notes = [], []
    for s in raw:
        if (
            not isinstance(s, (list, tuple, np.ndarray))
            or len(s) != 2
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in s)
        ):
            return None, [], f"span {s!r} is not a pair of integers [begin, end]"
        b, e = int(s[0]), int(s[1])
        if b > e:
            return None, [], f"reversed span [{b}, {e}] (begin > end)"
        if b < 0 or e > text_len - 1:
            cb, ce = max(b, 0), min(e, text_len - 1)
            notes.append(
                f"spans_clipped: span [{b}, {e}] outside text of {text_len} chars"
                + (f" clipped to [{cb}, {ce}]" if cb <= ce else " dropped")
            )
            if cb > ce:
                continue
            b, e = cb, ce
        spans.append((b, e))
    spans.sort()
    merged: list[tuple[int, int]] = []
    for b, e in spans:
        if merged and b <= merged[-1][1]:  # overlap (inclusive ends); adjacent spans need no repair
            notes.append(f"spans_merged: span [{b}, {e}] overlaps [{merged[-1][0]}, {merged[-1][1]}]")
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((b, e))
    return merged, notes, None


def _clean_trained_spans(raw, text_len: int) -> list[tuple[int, int]] | None:
    """The trained ranges of masked spans that need no repair (a list of ``[begin, end]`` int pairs, sorted,
    disjoint, inside the text): the common case in one pass. None: anything else, for `repair_spans`.

    >>> _clean_trained_spans([[0, 2], [6, 7]], 10)
    [(3, 6), (8, 10)]
    """
    if type(raw) is not list:
        return None
    out = []
    pos = 0
    for s in raw:
        if type(s) is not list or len(s) != 2:
            return None
        b, e = s
        if type(b) is not int or type(e) is not int or b < pos or e < b or e >= text_len:
            return None
        if b > pos:
            out.append((pos, b))
        pos = e + 1
    if pos < text_len:
        out.append((pos, text_len))
    return out


# ---------------------------------------------------------------------------------------------- the work
@dataclass
class _Job:
    """Everything a worker process needs (picklable)."""

    source: object
    form: str  # "spans" | "chat" | "text"
    field: str
    spans_field: str | None
    conversations_field: str | None
    tokenizer_path: str
    masking: dict
    chat_template: str | None
    vocab_size: int
    tokenizer_spec: dict | None = None  # chat.portable_spec(): workers rebuild the tokenizer without transformers
    split_length: int | None = None  # long_documents.mode split_turns: cut longer conversations at turns


# ------------------------------------------------------------------------------------------ rows -> documents
class Document(NamedTuple):
    """One document a row becomes, before tokenization: its text, the half-open character ranges trained, the
    `chat.RenderedSample` it was rendered as (chat forms; None otherwise) and the row's non-fatal notes (span
    repairs) as ``(code, message)``."""

    text: str
    trained_spans: list
    rendered: object | None = None
    notes: tuple = ()


class SkipRow(Exception):
    """A row that becomes no document: ``code`` (one of `SKIP_REASONS`) and a message naming what to fix."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def chat_documents(row: dict, state: tuple) -> list[Document]:
    """The ``chat`` form: the row's conversation (and its ``tools``) rendered and masked by `backend.chat.render`."""
    from backend import chat

    job, tokenizer, masking = state
    conv = row.get(job.conversations_field)
    if conv is None:
        raise SkipRow("missing_field", f"no {job.conversations_field!r} in this row")
    try:
        rendered = chat.render(conv, tokenizer, masking, job.chat_template, row.get("tools"))
    except chat.ChatError as e:
        raise SkipRow("bad_conversation", str(e)) from None
    return [Document(rendered.text, rendered.trained_spans, rendered)]


def _text_of(row: dict, job) -> str:
    if job.field not in row:
        raise SkipRow("missing_field", f"no {job.field!r} in this row (keys: {sorted(row)[:10]})")
    text = row[job.field]
    if not isinstance(text, str) or not text.strip():
        what = "null" if text is None else "empty" if isinstance(text, str) else type(text).__name__
        raise SkipRow("empty_text", f"{job.field!r} is {what}")
    return text


def spans_documents(row: dict, state: tuple) -> list[Document]:
    """The guide's form: ``field`` + inclusive masked spans, repaired by `repair_spans` (repairs become notes)."""
    from backend import chat

    job = state[0]
    text = _text_of(row, job)
    raw = row.get(job.spans_field)
    trained_spans = _clean_trained_spans(raw, len(text))
    if trained_spans is not None:
        return [Document(text, trained_spans)]
    masked, notes, reason = repair_spans(raw, len(text))  # not sorted, disjoint and in range: the full repair
    if reason:
        raise SkipRow("bad_spans", f"{job.spans_field!r}: {reason}")
    notes = tuple((note.split(":", 1)[0], note.split(": ", 1)[1]) for note in notes)
    return [Document(text, chat.spans_from_loss_masking(len(text), masked), None, notes)]


def text_documents(row: dict, state: tuple) -> list[Document]:
    """The ``text`` form: ``field`` alone, every token trained."""
    text = _text_of(row, state[0])
    return [Document(text, [(0, len(text))])]


def _as_messages(value, what: str) -> list:
    """A preference row's prompt / answer as a list of messages: a string is one message of the default role."""
    if isinstance(value, str):
        return [{"role": "user" if what == "prompt" else "assistant", "content": value}]
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        return list(value)
    shape = "an empty list" if isinstance(value, list) and not value else f"a {type(value).__name__}"
    raise SkipRow("bad_pair", f"{what!r} is {shape}; expected a string, a message or a list of messages")


def _shared_prefix(chosen: list, rejected: list) -> int:
    """Messages the two conversations share from the start (the implicit prompt, UltraFeedback binarized)."""
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    return n


def pair_conversations(row: dict) -> tuple[list | None, list | str, list | str, int]:
    """A preference row -> (prompt messages or None for the text form, chosen, rejected, prompt length).

    Forms (auto-detected, TRL's names): ``prompt`` + ``chosen`` + ``rejected`` as strings (plain text: no template,
    the answer is appended to the prompt, TRL's standard form); ``prompt`` (a string or messages) + ``chosen`` /
    ``rejected`` as assistant messages (TRL's conversational form); ``chosen`` / ``rejected`` as full conversations
    sharing a prefix of messages (the implicit prompt). Returns conversations as ``prompt + answer`` and the number of
    prompt messages (the answers' turns are the ones trained); for the text form (None, prompt + chosen text,
    prompt + rejected text, len(prompt text)).

    >>> pair_conversations({"prompt": "2+2=", "chosen": "4", "rejected": "5"})
    (None, '2+2=4', '2+2=5', 4)
    >>> q = {"role": "user", "content": "hi"}
    >>> a = lambda t: {"role": "assistant", "content": t}
    >>> pair_conversations({"chosen": [q, a("hello")], "rejected": [q, a("go away")]})[3]
    1
    """
    for key in ("chosen", "rejected"):
        if row.get(key) is None:
            raise SkipRow("missing_field", f"no {key!r} in this row (a preference row needs chosen and rejected)")
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    if isinstance(chosen, str) and isinstance(rejected, str) and (prompt is None or isinstance(prompt, str)):
        if prompt is None:  # implicit prompt in plain text: the shared leading characters
            n = len(os.path.commonprefix([chosen, rejected]))
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        if not chosen.strip() or not rejected.strip():
            raise SkipRow("empty_text", "chosen or rejected answer is empty")
        return None, prompt + chosen, prompt + rejected, len(prompt)
    chosen, rejected = _as_messages(chosen, "chosen"), _as_messages(rejected, "rejected")
    if prompt is None:
        n = _shared_prefix(chosen, rejected)
        if n == 0:
            raise SkipRow(
                "bad_pair",
                "no 'prompt' and chosen/rejected share no leading message: give a 'prompt' column, or full "
                "conversations that start with the same messages",
            )
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    else:
        prompt = _as_messages(prompt, "prompt")
    return prompt, prompt + chosen, prompt + rejected, len(prompt)


def pair_documents(row: dict, state: tuple) -> list[Document]:
    """The ``pairs`` form: a preference row -> [prompt + chosen, prompt + rejected], only the answers trained.

    Conversations go through `backend.chat.render` (the same template and masks as SFT, agent traces included); of
    its trained spans only those from the first answer turn on are kept, so a multi-turn prompt's own assistant
    turns stay masked context. Plain-text pairs train the answer and the tokenizer's EOS appended to it (TRL's
    standard form). The two documents are written next to each other, chosen first (`_process_chunk` keeps or drops
    them together); a pair whose answers are identical is skipped (``identical_answers``).
    """
    from backend import chat

    job, tokenizer, masking = state
    prompt, chosen, rejected, n_prompt = pair_conversations(row)
    if chosen == rejected:
        raise SkipRow("identical_answers", "chosen and rejected are identical: the pair carries no preference")
    if prompt is None:  # plain text: prompt + answer + EOS, the answer and EOS trained
        eos = tokenizer.eos_token or ""
        return [Document(t + eos, [(n_prompt, len(t) + len(eos))]) for t in (chosen, rejected)]
    documents = []
    tools = row.get("tools")
    for conversation in (chosen, rejected):
        try:
            prompt_messages = chat.normalize_conversation(conversation[:n_prompt]) if n_prompt else []
            rendered = chat.render(conversation, tokenizer, masking, job.chat_template, tools)
        except chat.ChatError as e:
            raise SkipRow("bad_conversation", str(e)) from None
        answer_turns = [t.begin for t in rendered.turns if t.message_index >= len(prompt_messages)]
        if answer_turns:  # the template's turns: the answer starts at its first turn's reply
            cut = min(answer_turns)
        elif masking.mode == "delimiters":  # no turns: the answer follows the prompt as the template writes it
            cut = _prompt_end(rendered, prompt_messages, tokenizer, job.chat_template, tools)
        else:
            raise SkipRow("bad_pair", "an answer has no assistant message after the prompt")
        rendered.trained_spans = [(max(b, cut), e) for b, e in rendered.trained_spans if e > cut]
        rendered.loss_masking_spans = chat.loss_masking_from_spans(len(rendered.text), rendered.trained_spans)
        documents.append(Document(rendered.text, rendered.trained_spans, rendered))
    return documents


def _prompt_end(rendered, prompt_messages: list, tokenizer, chat_template, tools) -> int:
    """Where the prompt ends in ``rendered.text`` (delimiter masking, which finds no turns): the length of the
    prompt's own rendering when the text starts with it; raises SkipRow when the template rewrites the prompt."""
    from backend import chat

    if not any(m["role"] == "assistant" for m in prompt_messages):
        return 0  # nothing before the answer can be a reply the delimiters mark
    head = chat.templates.render_messages(
        prompt_messages, tokenizer, chat.resolve_template(tokenizer, chat_template), tools=chat.normalize_tools(tools)
    )
    if not rendered.text.startswith(head):
        raise SkipRow(
            "bad_pair", "the template writes the prompt differently before an answer: cannot tell where it ends"
        )
    return len(head)


# Rows become documents through this table: ``FORMS[form](row, (job, tokenizer, masking)) -> list[Document]``,
# raising `SkipRow` for a row that becomes none. A new form (e.g. a preference pair: two documents) is one entry.
FORMS = {"chat": chat_documents, "spans": spans_documents, "text": text_documents, "pairs": pair_documents}


@dataclass
class _ChunkResult:
    """A chunk's documents as flat arrays: document j is row ``rows[j]``, tokens ``ids[bounds[j]:bounds[j+1]]``."""

    n_rows: int
    rows: np.ndarray  # (D,) int64 input row of each document
    ids: np.ndarray  # (N,) smallest uint dtype of the vocabulary
    trained: np.ndarray  # (N,) bool
    bounds: np.ndarray  # (D+1,) int64
    problems: list  # [(row, code, message, skipped: bool)]
    split_stats: dict = field(default_factory=dict)  # backend.split.split_documents counts (split_turns only)
    samples: dict = field(default_factory=dict)  # keep_samples: row -> (RenderedSample | None, TokenizedSample)
    appended_eot: int = 0  # kept rows whose final reply got the template's marker appended (chat.final_eot: append)
    rejected_samples: dict = field(default_factory=dict)  # keep_samples, pairs: row -> the rejected answer's sample
    pieces: dict = field(default_factory=dict)  # keep_samples, every_turn: row -> its reasoning documents (Pieces)


_WORKER: dict = {}


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    from backend.hub import HubUnreachable, require_hub

    try:
        require_hub(str(path), "tokenizer.path")  # an unreachable hub: fail in seconds, not after minutes of retries
    except HubUnreachable as e:
        raise PrepareError(str(e)) from None
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise PrepareError(f"tokenizer.path: could not load tokenizer {path!r}: {type(e).__name__}: {e}") from None


def _init_worker(job: _Job, tokenizer=None, workers: int = 1):
    from backend import chat

    if workers > 1:  # one Rust thread per worker: N workers x N threads only fight over the same cores
        os.environ.setdefault("RAYON_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    if tokenizer is None and job.tokenizer_spec is not None:
        tokenizer = chat.PortableTokenizer(job.tokenizer_spec)
    if tokenizer is None:
        tokenizer = _load_tokenizer(job.tokenizer_path)
    _WORKER.clear()
    _WORKER.update(job=job, tokenizer=tokenizer, masking=chat.Masking(**job.masking))


def _process_chunk(start: int, task, state: tuple | None = None, keep_samples: bool = False) -> _ChunkResult:
    """Rows [start, start + len) -> tokenized documents and per-row problems.

    ``state``: (job, tokenizer, masking), default the worker's (`_init_worker`). ``keep_samples``: also return each
    tokenized row's (RenderedSample or None, TokenizedSample of the whole row) in ``samples`` (the preview's view).
    """
    from backend import chat

    job, tokenizer, masking = state = state or (_WORKER["job"], _WORKER["tokenizer"], _WORKER["masking"])
    form = FORMS[job.form]
    problems, rows, texts, spans_list, rendered_list = [], [], [], [], []
    n = 0
    for i, row in enumerate(job.source.read(task)):
        r = start + i
        n += 1
        if isinstance(row, BadRow):
            problems.append((r, "unparseable_row", row.message, True))
            continue
        try:
            documents = form(row, state)
        except SkipRow as e:
            problems.append((r, e.code, e.message, True))
            continue
        for d in documents:
            problems.extend((r, code, message, False) for code, message in d.notes)
            rows.append(r)
            texts.append(d.text)
            spans_list.append(d.trained_spans)
            rendered_list.append(d.rendered)

    if not texts:
        return _ChunkResult(
            n, np.zeros(0, np.int64), np.zeros(0, np.uint8), np.zeros(0, bool), np.zeros(1, np.int64), problems
        )
    # the whole chunk as flat arrays (one dtype cast, one cumsum); per document only views are cut
    dtype = token_dtype(job.vocab_size)  # the shards' own dtype (tested at every boundary in test_dataset)
    flat = chat.tokens._tokenize_flat(texts, spans_list, tokenizer)
    samples, rejected_samples = {}, {}
    if keep_samples:  # text forms get a RenderedSample too: the preview draws every form the same way
        for j, tok in enumerate(flat.samples()):
            rendered = rendered_list[j] or chat.RenderedSample(texts[j], list(spans_list[j]), [], [])
            if job.form == "pairs" and j % 2:  # a pair's rejected answer: beside its chosen one
                rejected_samples[rows[j]] = (rendered, tok)
            else:
                samples[rows[j]] = (rendered, tok)
    bounds = flat.bounds
    csum = np.concatenate([[0], np.cumsum(flat.trained, dtype=np.int64)])
    n_trained = csum[bounds[1:]] - csum[bounds[:-1]]
    keep = n_trained > 0
    if job.form == "pairs":  # a pair is kept or dropped whole: its two documents are adjacent, chosen first
        lost = np.flatnonzero(~keep.reshape(-1, 2).all(1))
        keep[2 * lost] = keep[2 * lost + 1] = False
    for j in np.flatnonzero(~keep).tolist():
        # the skip names why nothing is trained (e.g. span_not_found), so that `warnings` stays about kept rows
        why = "; ".join(rendered_list[j].problems) if rendered_list[j] is not None else ""
        message = f"no token is trained ({bounds[j + 1] - bounds[j]} tokens)" + (f": {why}" if why else "")
        if job.form == "pairs":  # one skip per pair row, naming the answer that trains nothing
            if n_trained[j] > 0 or (j % 2 and n_trained[j - 1] == 0):
                continue
            message = f"the {('chosen', 'rejected')[j % 2]} answer: {message}"
        problems.append((rows[j], "no_trained_tokens", message, True))
    checked = [j for j in np.flatnonzero(keep).tolist() if rendered_list[j] is not None]
    for j, sample in zip(checked, flat.samples(checked), strict=False):  # health warnings of the one-step form
        for p in chat.check_sample(rendered_list[j], sample, tokenizer):
            code, _, message = p.partition(": ")
            problems.append((rows[j], code, message, False))
    ids, trained = flat.ids.astype(dtype), flat.trained
    if not keep.all():
        token_keep = np.repeat(keep, np.diff(bounds))
        ids, trained = ids[token_keep], trained[token_keep]
        bounds = np.concatenate([[0], np.cumsum(np.diff(bounds)[keep])])
    appended_eot = sum(bool(rendered_list[j].appended) for j in checked)
    rows = np.asarray(rows, np.int64)[keep]
    split_stats = {}
    kept = np.flatnonzero(keep)
    origin = list(range(len(kept)))  # document -> its kept input document, or the split.Piece made below
    pieces = {}
    if masking.reasoning == "every_turn" and job.form == "chat":  # dropped reasoning -> a document per turn
        from backend.split import dropped_reasoning, every_turn_documents, reasoning_trained_apart

        whole = {int(r): rendered_list[j] for r, j in zip(rows.tolist(), kept.tolist(), strict=True)}
        rows, ids, trained, bounds, origin, split_stats = every_turn_documents(
            rows, ids, trained, bounds, [rendered_list[j] for j in kept], tokenizer, masking, job.chat_template
        )
        for row, o in zip(rows.tolist(), origin, strict=True):
            if not isinstance(o, int):
                pieces.setdefault(row, []).append(o)
        # a row whose every dropped trace is now trained in a document of its own is not warned about them
        recovered = {
            r for r, p in pieces.items() if reasoning_trained_apart(whole[r], p) == sorted(dropped_reasoning(whole[r]))
        }
        problems = [p for p in problems if not (p[1] == "reasoning_dropped" and p[0] in recovered)]
        if not keep_samples:
            pieces = {}
    if job.split_length is not None and job.form == "chat":  # long conversations -> pieces cut at turns
        from backend.split import split_documents

        reasoning_stats = split_stats
        rows, ids, trained, bounds, split_stats, split_problems = split_documents(
            rows,
            ids,
            trained,
            bounds,
            [rendered_list[kept[o]] if isinstance(o, int) else o for o in origin],  # a reasoning piece: the Piece
            lambda m: flat.samples([int(kept[origin[m]])])[0],
            tokenizer,
            masking,
            job.chat_template,
            job.split_length,
        )
        problems.extend(split_problems)
        split_stats.update(reasoning_stats)
    return _ChunkResult(
        n, rows, ids, trained, bounds, problems, split_stats, samples, appended_eot, rejected_samples, pieces
    )


def _worker_chunk(args):
    return _process_chunk(*args)


def _run_chunks(job: _Job, source, n_rows: int, workers: int, tokenizer):
    """Yield `_ChunkResult` in input order; at most 2 chunks per worker in flight (flat memory)."""
    tasks = ((s, source.task(s, min(s + CHUNK_ROWS, n_rows))) for s in range(0, n_rows, CHUNK_ROWS))
    if workers <= 1:
        _init_worker(job, tokenizer)
        for s, task in tasks:
            yield _process_chunk(s, task)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # Not plain fork: the parent may already have used the Rust tokenizer's thread pool, which does not survive
    # fork. forkserver: one clean server process imports the worker modules once (kept for later pools of this
    # process), and each worker is forked from it, ready at once; the workers rebuild the tokenizer from
    # job.tokenizer_spec without importing transformers. spawn where forkserver does not exist.
    # ProcessPoolExecutor (not Pool) raises BrokenProcessPool if a worker dies instead of hanging.
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["numpy", "tokenizers", "backend.chat", "backend.documents"])
    else:
        ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(job, None, workers)) as pool:
        pending = deque()
        for s, task in tasks:
            pending.append(pool.submit(_worker_chunk, (s, task)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# ------------------------------------------------------------------------------------------- one row at a time
def open_rows(cfg: PrepareConfig):
    """(source, n_rows, form, conversations_field) of ``cfg.dataset``: prepare's reader, also the preview's."""
    source = open_source(cfg)
    n_rows = source.index()
    where = source.description or cfg.dataset.path
    if n_rows == 0:
        raise PrepareError(f"dataset.path: {where} has no rows")
    form, conv_field = detect_form(cfg, source.columns(), where)
    if hasattr(source, "needed"):  # a datasets source reads only the columns the form needs
        pair_columns = ("prompt", "chosen", "rejected") if form == "pairs" else ()
        wanted = (cfg.dataset.field, cfg.dataset.loss_masking_spans, conv_field, "tools", *pair_columns)
        source.needed = [c for c in wanted if c]
    return source, n_rows, form, conv_field


def check_template(cfg: PrepareConfig, tokenizer, form: str) -> None:
    """A template that cannot work for any row is a config problem (ConfigError), not every row skipped."""
    from backend import chat
    from backend.config import ConfigError

    if form not in ("chat", "pairs"):
        return
    try:
        chat.templates._compile(chat.resolve_template(tokenizer, cfg.chat.template))
    except chat.ChatError as e:
        raise ConfigError([f"chat.template: {e}"]) from None


def make_job(cfg: PrepareConfig, source, form: str, conversations_field: str | None, vocab_size: int) -> _Job:
    """The picklable description of the per-row work for ``cfg`` (what every worker runs)."""
    return _Job(
        source=source,
        form=form,
        field=cfg.dataset.field,
        spans_field=cfg.dataset.loss_masking_spans,
        conversations_field=conversations_field,
        tokenizer_path=cfg.tokenizer.path,
        masking=cfg.chat.to_masking(),
        chat_template=cfg.chat.template,
        vocab_size=vocab_size,
        split_length=cfg.long_documents.sequence_length if cfg.long_documents.mode == "split_turns" else None,
    )


@dataclass
class PreparedRow:
    """What prepare makes of one input row: its documents exactly as written, or why it is skipped."""

    row: int
    where: str  # "file:line" or "row N"
    form: str  # "chat" | "spans" | "text"
    rendered: object | None  # backend.chat.RenderedSample (text forms too); None when skipped before tokenizing
    tokenized: object | None  # backend.chat.TokenizedSample of the whole row (before split_turns), or None
    documents: list[tuple[np.ndarray, np.ndarray]]  # [(ids (T,) int64, trained (T,) bool)]: 0, 1 or several
    problems: list[tuple[str, str, bool]]  # (code, message, skipped): skip reasons, repairs, health warnings
    # preference pairs: rendered/tokenized above are the chosen answer's, this the rejected one's (or None)
    rejected: tuple | None = None  # (RenderedSample, TokenizedSample)
    # chat.reasoning: every_turn: the documents the row is written as instead of ``rendered`` (`split.Piece`s, each
    # with its own rendering and tokens; cut further under split_turns), or None when it stays one document
    pieces: list | None = None

    @property
    def skipped(self) -> str | None:
        """ "code: message" of the reason prepare skips this row, or None when it writes it."""
        return next((f"{c}: {m}" for c, m, skip in self.problems if skip), None)


class RowReader:
    """Random access to what `backend.prepare` writes for each input row of ``cfg`` (same source, same form, same
    `_process_chunk`). Opening indexes the source once; `sample` is cheap after that.

    ``sample(i, cfg)`` may pass a config whose ``chat``/``long_documents``/``tokenizer`` sections differ from the
    one the reader was opened with (the studio's widgets change them), but not its ``dataset`` section.
    """

    def __init__(self, cfg: PrepareConfig):
        self.cfg = cfg
        self.source, self.n_rows, self.form, self.conversations_field = open_rows(cfg)

    def __len__(self) -> int:
        return self.n_rows

    def sample(self, i: int, cfg: PrepareConfig | None = None, tokenizer=None) -> PreparedRow:
        """Row ``i`` (0 <= i < len) as prepare makes it. Raises ConfigError for a template no row can use (one that
        cannot render the dataset's tools, too)."""
        return next(self.samples([i], cfg, tokenizer))

    def samples(self, indices, cfg: PrepareConfig | None = None, tokenizer=None):
        """Yield `PreparedRow` of each row in ``indices``; runs of consecutive rows share one `_process_chunk`."""
        from backend import chat

        cfg = cfg or self.cfg
        if cfg.dataset != self.cfg.dataset:
            raise ValueError("RowReader.sample: cfg.dataset differs from the reader's; open a new RowReader")
        indices = [int(i) for i in indices]
        for i in indices:
            if not 0 <= i < self.n_rows:
                raise IndexError(f"row {i} of {self.n_rows}")
        tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(cfg.tokenizer.path)
        check_template(cfg, tokenizer, self.form)
        job = make_job(cfg, self.source, self.form, self.conversations_field, len(tokenizer))
        state = (job, tokenizer, chat.Masking(**job.masking))
        k = 0
        while k < len(indices):
            start = stop = indices[k]
            while k < len(indices) and indices[k] == stop and stop - start < CHUNK_ROWS:
                k, stop = k + 1, stop + 1
            try:
                res = _process_chunk(start, self.source.task(start, stop), state, keep_samples=True)
            except chat.TemplateCapabilityError as e:  # no row of this dataset can use the template
                from backend.config import ConfigError

                raise ConfigError([f"chat.template: {e}"]) from None
            bounds = res.bounds.tolist()
            for r in range(start, stop):
                docs = [
                    (res.ids[bounds[d] : bounds[d + 1]].astype(np.int64), res.trained[bounds[d] : bounds[d + 1]].copy())
                    for d in np.flatnonzero(res.rows == r).tolist()
                ]
                problems = [(code, message, skip) for row, code, message, skip in res.problems if row == r]
                rendered, tokenized = res.samples.get(r, (None, None))
                rejected, pieces = res.rejected_samples.get(r), res.pieces.get(r)
                yield PreparedRow(
                    r, self.source.where(r), self.form, rendered, tokenized, docs, problems, rejected, pieces
                )


def prepared_sample(cfg: PrepareConfig, i: int, tokenizer=None) -> PreparedRow:
    """Input row ``i`` of ``cfg``'s dataset rendered, masked and tokenized exactly as `backend.prepare` writes it.

    One call opens the source; to read many rows keep a `RowReader`.
    """
    return RowReader(cfg).sample(i, tokenizer=tokenizer)
