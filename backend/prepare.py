"""Tokenize a conversation dataset into the memory-mapped token store that training reads.

    python -m backend.prepare PREPARE.yaml [key=value ...] [--validate] [--force]

    >>> from backend.config import load_prepare_config
    >>> summary = prepare(load_prepare_config("assets/configs/tiny_prepare.yaml"))
    >>> summary["splits"]["training"]["num_documents"], summary["skipped"]
    (2850, {})

Input (`dataset.path`): a hub id (``load_dataset(path, name, split=...)``), a ``save_to_disk`` directory
(``load_from_disk``, then ``dataset.split`` of a DatasetDict), a folder of data files, or files / globs
(``.jsonl``/``.ndjson`` are read line by line by this module so that one broken line is reported and skipped
instead of failing the whole load; ``.json``/``.parquet``/``.csv``/``.arrow``/``.txt`` go through ``datasets``).

Forms, detected in this order:
1. ``dataset.loss_masking_spans`` set: the guide's form, ``field`` holds the text and the spans column holds
   inclusive character spans that are NOT trained (``[[0, 247], [270, 383]]``).
2. the rows hold conversations (``dataset.conversations_field``, else ``conversations``, else ``messages``): the
   one-step form, rendered by `backend.chat.render` with the ``chat:`` section.
3. only ``field``: plain text, every token trained.

Bad rows are skipped or repaired, never fatal, and every input row is accounted for
(``written + skipped == input rows`` in ``prepare_report.json``). Span repair rule (guide form):
- a span that is not a pair of integers, a null spans value, or a reversed span (begin > end): the row is
  SKIPPED. Dropping a masked span would train on text someone meant to mask, and we cannot tell what was meant.
- a span partly outside the text is clipped to ``[0, len(text) - 1]``; one wholly outside is dropped (it
  masks nothing); overlapping spans are merged. The row is written and the repair is counted.
Rows skipped: ``unparseable_row`` (JSON line), ``missing_field``, ``empty_text``, ``bad_spans``,
``bad_conversation`` (the `ConversationError` message), ``no_trained_tokens``.

Split: document ``i`` goes to the split at its position in ``permutation(seed)`` of the input rows, cut in
proportions ``splits`` (largest remainder; each split with a positive fraction gets at least one row when there
are enough rows). Output order within a split is input order, whatever ``tokenize_workers`` is.

Safety: everything is written to ``<output_path>.tmp-<pid>`` and renamed into place after ``DONE`` is written;
``--force`` renames the old output to ``<output_path>.old-<pid>`` first and deletes it last. A kill at any moment
leaves the old output or none; stale ``.tmp-``/``.old-`` directories of dead processes are removed on the next run.
Rerunning with the same config (and unchanged input files) prints "already prepared, nothing to do".
"""

from __future__ import annotations

import glob
import hashlib
import inspect
import json
import os
import shutil
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from backend.dataset import ShardWriter, TokenDataset, descriptor_name

if TYPE_CHECKING:
    from backend.config import PrepareConfig

__all__ = ["prepare", "PrepareError", "repair_spans", "split_assignment", "main"]

CHUNK_ROWS = 512  # rows per worker task: big enough for the batched tokenizer, small enough for smooth progress
JSONL_SUFFIXES = (".jsonl", ".ndjson")
BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".tsv": "csv",
    ".arrow": "arrow",
    ".txt": "text",
}
SKIP_REASONS = ("unparseable_row", "missing_field", "empty_text", "bad_spans", "bad_conversation", "no_trained_tokens")


class PrepareError(RuntimeError):
    """Preparation cannot start or finish; the message says what to change."""


def _print(*args):
    print(*args, flush=True)


# ------------------------------------------------------------------------------------------ span repair
def repair_spans(raw, text_len: int) -> tuple[list[tuple[int, int]] | None, list[str], str | None]:
    """Guide-form masked spans -> (clean inclusive spans, repair notes, reason to skip the row or None).

    >>> repair_spans([[5, 9], [0, 2], [8, 12], [40, 50]], 20)
    ([(0, 2), (5, 12)], ['spans_merged: ...', 'spans_clipped: ...'], None)
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


# ---------------------------------------------------------------------------------------------- splitting
def split_assignment(n_rows: int, splits: dict[str, float], seed: int) -> np.ndarray:
    """(n_rows,) uint8 index into ``list(splits)``: a seeded permutation cut by largest remainder.

    >>> split_assignment(10, {"training": 0.8, "validation": 0.2}, seed=0)
    array([0, 0, 1, 0, 0, 0, 0, 1, 0, 0], dtype=uint8)
    """
    names = list(splits)
    fractions = np.array([splits[k] for k in names], dtype=np.float64)
    exact = fractions * n_rows
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: n_rows - counts.sum()]] += 1
    # a split that was asked for but rounded to zero rows gets one, taken from the largest split
    positive = np.flatnonzero(fractions > 0)
    if n_rows >= len(positive):
        for k in positive:
            if counts[k] == 0:
                counts[int(np.argmax(counts))] -= 1
                counts[k] = 1
    perm = np.random.default_rng(seed).permutation(n_rows)
    out = np.empty(n_rows, dtype=np.uint8)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    for k in range(len(names)):
        out[perm[bounds[k] : bounds[k + 1]]] = k
    return out


# ------------------------------------------------------------------------------------------------ sources
class _BadRow:
    """Placeholder for an input row that could not be parsed."""

    def __init__(self, message: str):
        self.message = message


@dataclass
class _JsonlSource:
    """JSON-lines files read line by line; rows are the non-blank lines, indexed by byte offset."""

    files: list[str]
    description: str = ""

    def index(self):
        file_ids, offsets, lines = [], [], []
        for f_id, path in enumerate(self.files):
            with open(path, "rb") as f:
                pos = 0
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        file_ids.append(f_id)
                        offsets.append(pos)
                        lines.append(lineno)
                    pos += len(line)
        self._file_ids = np.asarray(file_ids, np.int32)
        self._offsets = np.asarray(offsets, np.int64)
        self._lines = np.asarray(lines, np.int64)
        return len(self._offsets)

    def columns(self, sample: int = 100) -> list[str]:
        cols: dict[str, None] = {}
        for row in self.read(self.task(0, min(sample, len(self._offsets)))):
            if isinstance(row, dict):
                cols.update(dict.fromkeys(row))
        return list(cols)

    def task(self, start: int, stop: int):
        return (self._file_ids[start:stop], self._offsets[start:stop], self._lines[start:stop])

    def where(self, row: int) -> str:
        return f"{self.files[self._file_ids[row]]}:{self._lines[row]}"

    def read(self, task):
        file_ids, offsets, lines = task
        handle, current = None, -1
        try:
            for f_id, off, lineno in zip(file_ids, offsets, lines, strict=False):
                if f_id != current:
                    if handle:
                        handle.close()
                    handle, current = open(self.files[f_id], "rb"), f_id
                handle.seek(off)
                raw = handle.readline()
                try:
                    row = json.loads(raw)
                except (ValueError, UnicodeDecodeError) as e:
                    yield _BadRow(f"{self.files[f_id]} line {lineno}: not valid JSON ({e})")
                    continue
                yield (
                    row
                    if isinstance(row, dict)
                    else _BadRow(f"{self.files[f_id]} line {lineno}: a JSON {type(row).__name__}, expected an object")
                )
        finally:
            if handle:
                handle.close()


@dataclass
class _HFSource:
    """A `datasets.Dataset` (memory-mapped Arrow: cheap to pickle into worker processes)."""

    dataset: object
    description: str = ""
    needed: list[str] = field(default_factory=list)

    def index(self):
        return len(self.dataset)

    def columns(self, sample: int = 100) -> list[str]:
        return list(self.dataset.column_names)

    def task(self, start: int, stop: int):
        return (start, stop)

    def where(self, row: int) -> str:
        return f"row {row}"

    def read(self, task):
        start, stop = task
        cols = [c for c in self.needed if c in self.dataset.column_names] or self.dataset.column_names
        batch = self.dataset.select_columns(cols)[start:stop]
        for values in zip(*(batch[c] for c in cols), strict=False):
            yield dict(zip(cols, values, strict=False))


def _input_files(path: str) -> list[str] | None:
    """Files named by a file path or a glob; None when ``path`` is neither."""
    if any(ch in path for ch in "*?["):
        return sorted(glob.glob(path, recursive=True))
    if os.path.isfile(path):
        return [path]
    return None


def _load_kwargs(ds_cfg, loading_workers: int) -> dict:
    from datasets import load_dataset

    kwargs = {}
    params = inspect.signature(load_dataset).parameters
    if "trust_remote_code" in params:
        kwargs["trust_remote_code"] = ds_cfg.trust_remote_code
    elif ds_cfg.trust_remote_code:
        import datasets

        _print(
            f"note: dataset.trust_remote_code is set but datasets {datasets.__version__} no longer runs dataset "
            "loading scripts; the option is ignored"
        )
    if loading_workers > 1:
        kwargs["num_proc"] = loading_workers
    return kwargs


def _pick_split(obj, split: str, path: str):
    from datasets import DatasetDict

    from backend.config import ConfigError  # lazy: workers never need pydantic

    if isinstance(obj, DatasetDict):
        if split not in obj:
            raise ConfigError([f"dataset.split: {path!r} has no split {split!r}; its splits are: {', '.join(obj)}"])
        return obj[split]
    return obj


def open_source(cfg: PrepareConfig):
    """The configured input as a row source (`_JsonlSource` or `_HFSource`)."""
    from backend.config import ConfigError  # lazy: workers never need pydantic

    ds = cfg.dataset
    path = ds.path
    workers = max(1, min(cfg.loading_workers, os.cpu_count() or 1))
    try:
        from datasets import load_dataset, load_from_disk

        if ds.data_files is not None:
            obj = load_dataset(path, ds.name, data_files=ds.data_files, split=ds.split, **_load_kwargs(ds, workers))
            return _HFSource(obj, f"{path} (data_files {ds.data_files})")
        files = _input_files(path)
        if files is not None:
            if not files:
                raise ConfigError([f"dataset.path: no file matches {path!r}"])
            suffixes = {Path(f).suffix.lower() for f in files}
            if suffixes <= set(JSONL_SUFFIXES):
                return _JsonlSource(files, path)
            unknown = suffixes - set(BUILDERS)
            if unknown or len({BUILDERS[s] for s in suffixes}) != 1:
                raise ConfigError(
                    [
                        f"dataset.path: cannot tell the file format of {path!r} (suffixes "
                        f"{sorted(suffixes)}); use one of {', '.join(sorted(BUILDERS))}"
                    ]
                )
            builder = BUILDERS[suffixes.pop()]
            kwargs = _load_kwargs(ds, workers)
            kwargs.pop("trust_remote_code", None)
            kwargs.pop("num_proc", None) if len(files) == 1 else None
            obj = load_dataset(builder, data_files=files, split="train", **kwargs)
            return _HFSource(obj, path)
        if os.path.isdir(path):
            p = Path(path)
            if any((p / marker).is_file() for marker in ("dataset_dict.json", "dataset_info.json", "state.json")):
                return _HFSource(_pick_split(load_from_disk(path), ds.split, path), path)
            return _HFSource(load_dataset(path, ds.name, split=ds.split, **_load_kwargs(ds, workers)), path)
        if path.startswith((".", "/", "~")) or Path(path).suffix.lower() in BUILDERS:
            raise ConfigError(
                [
                    f"dataset.path: {path!r} does not exist (relative paths are resolved against "
                    f"the current directory {os.getcwd()})"
                ]
            )
        return _HFSource(load_dataset(path, ds.name, split=ds.split, **_load_kwargs(ds, workers)), path)
    except (ConfigError, PrepareError):
        raise
    except Exception as e:  # datasets raises many types; the user needs the path and the reason, not a traceback
        raise PrepareError(f"dataset.path: could not load {path!r}: {type(e).__name__}: {e}") from None


def input_fingerprint(path: str) -> str | None:
    """sha of (name, size, mtime) of the local input files; None for a hub dataset."""
    files = _input_files(path)
    if files is None and os.path.isdir(path):
        files = sorted(str(p) for p in Path(path).rglob("*") if p.is_file())
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


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


_WORKER: dict = {}


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

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


def _process_chunk(start: int, task) -> _ChunkResult:
    """Rows [start, start + len) -> tokenized documents and per-row problems."""
    from backend import chat

    job: _Job = _WORKER["job"]
    tokenizer = _WORKER["tokenizer"]
    problems, rows, texts, spans_list, rendered_list = [], [], [], [], []
    n = 0
    for i, row in enumerate(job.source.read(task)):
        r = start + i
        n += 1
        if isinstance(row, _BadRow):
            problems.append((r, "unparseable_row", row.message, True))
            continue
        rendered = None
        if job.form == "chat":
            conv = row.get(job.conversations_field)
            if conv is None:
                problems.append((r, "missing_field", f"no {job.conversations_field!r} in this row", True))
                continue
            try:
                rendered = chat.render(conv, tokenizer, _WORKER["masking"], job.chat_template)
            except chat.ChatError as e:
                problems.append((r, "bad_conversation", str(e), True))
                continue
            text, trained_spans = rendered.text, rendered.trained_spans
        else:
            if job.field not in row:
                problems.append((r, "missing_field", f"no {job.field!r} in this row (keys: {sorted(row)[:10]})", True))
                continue
            text = row[job.field]
            if not isinstance(text, str) or not text.strip():
                what = "null" if text is None else "empty" if isinstance(text, str) else type(text).__name__
                problems.append((r, "empty_text", f"{job.field!r} is {what}", True))
                continue
            if job.form == "spans":
                raw = row.get(job.spans_field)
                trained_spans = _clean_trained_spans(raw, len(text))
                if trained_spans is None:  # not already sorted, disjoint and in range: the full repair
                    masked, notes, reason = repair_spans(raw, len(text))
                    if reason:
                        problems.append((r, "bad_spans", f"{job.spans_field!r}: {reason}", True))
                        continue
                    problems.extend((r, note.split(":", 1)[0], note.split(": ", 1)[1], False) for note in notes)
                    trained_spans = chat.spans_from_loss_masking(len(text), masked)
            else:
                trained_spans = [(0, len(text))]
        rows.append(r)
        texts.append(text)
        spans_list.append(trained_spans)
        rendered_list.append(rendered)

    if not texts:
        return _ChunkResult(
            n, np.zeros(0, np.int64), np.zeros(0, np.uint8), np.zeros(0, bool), np.zeros(1, np.int64), problems
        )
    # the whole chunk as flat arrays (one dtype cast, one cumsum); per document only views are cut
    dtype = np.uint8 if job.vocab_size <= 256 else np.uint16 if job.vocab_size <= 65536 else np.uint32
    flat = chat.tokens._tokenize_flat(texts, spans_list, tokenizer)
    bounds = flat.bounds
    csum = np.concatenate([[0], np.cumsum(flat.trained, dtype=np.int64)])
    n_trained = csum[bounds[1:]] - csum[bounds[:-1]]
    keep = n_trained > 0
    for j in np.flatnonzero(~keep).tolist():
        problems.append(
            (rows[j], "no_trained_tokens", f"no token is trained ({bounds[j + 1] - bounds[j]} tokens)", True)
        )
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
    rows = np.asarray(rows, np.int64)[keep]
    split_stats = {}
    if job.split_length is not None and job.form == "chat":  # long conversations -> pieces cut at turns
        from backend.split import split_documents

        kept = np.flatnonzero(keep)
        rows, ids, trained, bounds, split_stats, split_problems = split_documents(
            rows,
            ids,
            trained,
            bounds,
            [rendered_list[j] for j in kept],
            lambda m: flat.samples([int(kept[m])])[0],
            tokenizer,
            _WORKER["masking"],
            job.chat_template,
            job.split_length,
        )
        problems.extend(split_problems)
    return _ChunkResult(n, rows, ids, trained, bounds, problems, split_stats)


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
        ctx.set_forkserver_preload(["numpy", "tokenizers", "backend.chat", "backend.prepare"])
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


def _detect_form(cfg: PrepareConfig, columns: list[str], where: str) -> tuple[str, str | None]:
    from backend.config import ConfigError  # lazy: workers never need pydantic

    ds = cfg.dataset
    listed = ", ".join(columns) if columns else "(none)"
    if ds.loss_masking_spans:
        missing = [
            f"dataset.{k}: column {v!r} not found in {where}; its columns are: {listed}"
            for k, v in (("field", ds.field), ("loss_masking_spans", ds.loss_masking_spans))
            if v not in columns
        ]
        if missing:
            raise ConfigError(missing)
        return "spans", None
    if ds.conversations_field:
        if ds.conversations_field not in columns:
            raise ConfigError(
                [
                    f"dataset.conversations_field: column {ds.conversations_field!r} not found in "
                    f"{where}; its columns are: {listed}"
                ]
            )
        return "chat", ds.conversations_field
    for name in ("conversations", "messages"):
        if name in columns:
            return "chat", name
    if ds.field in columns:
        return "text", None
    raise ConfigError(
        [
            f"dataset.field: column {ds.field!r} not found in {where}, and no 'conversations' or "
            f"'messages' column either; its columns are: {listed}. Set dataset.field (plus "
            "dataset.loss_masking_spans for the guide's text+spans form) or dataset.conversations_field"
        ]
    )


def tokenizer_info(tokenizer, path: str, chat_template: str | None) -> dict:
    from backend import chat

    try:
        template = chat.resolve_template(tokenizer, chat_template)
    except chat.ChatError:
        template = None
    return {
        "path": str(path),
        "name_or_path": str(getattr(tokenizer, "name_or_path", path)),
        "vocab_size": len(tokenizer),
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "chat_template_sha": hashlib.sha256(template.encode()).hexdigest()[:16] if template else None,
    }


TOKENIZER_DIR = "tokenizer"  # output_path/tokenizer/: the tokenizer + chat template the data was prepared with


def save_tokenizer(tokenizer, chat_template: str | None, directory: Path) -> None:
    """Save ``tokenizer`` with the chat template prepare rendered with (chat.template, or the tokenizer's own)."""
    from backend import chat

    try:
        template = chat.resolve_template(tokenizer, chat_template)
    except chat.ChatError:
        template = None  # the guide's text+spans form needs no template
    own = getattr(tokenizer, "chat_template", None)
    try:
        if template is not None:
            tokenizer.chat_template = template
        tokenizer.save_pretrained(str(directory))
    finally:
        tokenizer.chat_template = own


def output_hash(cfg: PrepareConfig) -> str:
    """`config_hash` of the settings that change the output's content: worker counts (same output, by design)
    and output_path (where it lies) are left out."""
    from backend.config import config_hash  # lazy: workers never need pydantic

    return config_hash(
        cfg.model_copy(update={"output_path": ".", "loading_workers": 1, "tokenize_workers": 1, "saving_workers": 1})
    )


# ------------------------------------------------------------------------------------ output directories
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(out: Path) -> None:
    """Remove ``<out>.tmp-<pid>`` / ``<out>.old-<pid>`` left by a killed run; refuse if that run is alive."""
    for p in out.parent.glob(f"{glob.escape(out.name)}.*-*"):
        kind, _, pid = p.name[len(out.name) + 1 :].partition("-")
        if kind not in ("tmp", "old") or not pid.isdigit():
            continue
        if int(pid) != os.getpid() and _pid_alive(int(pid)):
            raise PrepareError(f"{p} belongs to a running prepare (pid {pid}); wait for it or stop it")
        shutil.rmtree(p, ignore_errors=True)


def _read_done(out: Path) -> dict | None:
    try:
        return json.loads((out / "DONE").read_text())
    except (OSError, ValueError):
        return None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -------------------------------------------------------------------------------------------- prepare()
def _percentiles(lengths: np.ndarray) -> dict:
    if len(lengths) == 0:
        return {}
    q = np.percentile(lengths, [50, 90, 99])
    return {
        "min": int(lengths.min()),
        "p50": float(q[0]),
        "p90": float(q[1]),
        "p99": float(q[2]),
        "max": int(lengths.max()),
        "mean": float(lengths.mean()),
    }


def _summary_lines(summary: dict) -> list[str]:
    lines = [
        f"prepared {summary['output_path']}: {summary['input_rows']} input rows -> "
        f"{summary['num_documents']} documents, {summary['num_tokens']:,} tokens, "
        f"{summary['trained_token_share']:.1%} trained"
    ]
    for name, s in summary["splits"].items():
        lines.append(f"  {name}: {s['num_documents']} documents, {s['num_tokens']:,} tokens")
    lp = summary["length_percentiles"]
    if lp:
        lines.append(
            f"  document length: p50 {lp['p50']:.0f}, p90 {lp['p90']:.0f}, p99 {lp['p99']:.0f}, max {lp['max']}"
        )
    long = summary.get("longer_than_sequence_length")
    if long:
        lines.append(
            f"  longer than sequence_length {long['sequence_length']}: {long['documents']} documents "
            f"holding {long['tokens']:,} tokens ({long['token_share']:.1%} of tokens) - skipped in "
            "training with truncate_documents: no"
        )
    ld = summary.get("long_documents")
    if ld:
        lines.append(
            f"  split_turns at {ld['sequence_length']}: {ld['conversations_split']} conversations -> {ld['pieces']} "
            f"documents cut at turn boundaries ({ld['context_tokens']:,} tokens of masked context repeated); "
            f"{ld['truncated_groups']} exchange(s) longer than a sequence alone: reply cut, "
            f"{ld['dropped_trained_tokens']:,} trained tokens dropped; {ld['not_split']} long document(s) not split"
        )
    for title, key in (("skipped", "skipped"), ("repaired / warnings (rows kept)", "warnings")):
        for code, count in summary[key].items():
            ex = summary["examples"].get(code, [])
            lines.append(f"  {title}: {code}: {count} row(s)")
            for e in ex:
                lines.append(f"      row {e['row']} ({e['where']}): {e['message']}")
    return lines


def prepare(config, force: bool = False, progress: bool = True) -> dict:
    """Prepare the dataset of ``config`` (a `PrepareConfig`, a YAML path or a dict); returns the summary dict.

    >>> s = prepare("assets/configs/tiny_prepare.yaml", progress=False)
    >>> s["status"], s["input_rows"] == s["written"] + s["skipped_rows"]
    ('prepared', True)
    """
    from backend.config import PrepareConfig, load_prepare_config  # lazy: workers never need pydantic

    cfg = config if isinstance(config, PrepareConfig) else load_prepare_config(config)
    out = Path(cfg.output_path)
    digest = output_hash(cfg)
    fingerprint = input_fingerprint(cfg.dataset.path)
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(out)

    if out.exists():
        done = _read_done(out)
        if done is None:
            if not force:
                raise PrepareError(
                    f"output_path {out} exists but is not a completed prepare (no DONE marker); "
                    "remove it, choose another output_path, or pass --force to replace it"
                )
        elif done.get("prepare_hash") == digest and done.get("input_fingerprint") == fingerprint and not force:
            _print(f"{out}: already prepared, nothing to do (config hash {digest})")
            try:
                summary = json.loads((out / "prepare_report.json").read_text())["summary"]
            except (OSError, ValueError, KeyError):
                summary = {}
            return {**summary, "status": "already_prepared"}
        elif not force:
            why = (
                "the input files changed since"
                if done.get("prepare_hash") == digest
                else f"it was prepared with a different config (hash {done.get('prepare_hash')}, now {digest}); "
                f"see {out / 'prepare_config.yaml'}"
            )
            raise PrepareError(
                f"output_path {out} already holds a prepared dataset and {why}. Pass --force to "
                "replace it, or choose another output_path"
            )

    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        summary = _prepare_into(cfg, tmp, digest, fingerprint, progress)
        summary["output_path"] = str(out)
        # the order below is what makes a kill safe: DONE last inside tmp, then renames
        (tmp / "DONE").write_text(
            json.dumps(
                {"prepare_hash": digest, "input_fingerprint": fingerprint, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            )
            + "\n"
        )
        _fsync_dir(tmp)
        old = None
        if out.exists():
            old = out.parent / f"{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        _fsync_dir(out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for line in _summary_lines(summary):
        _print(line)
    return summary


def _prepare_into(cfg: PrepareConfig, tmp: Path, digest: str, fingerprint, progress: bool) -> dict:
    from backend import chat
    from backend.config import ConfigError, dump_yaml  # lazy: workers never need pydantic

    tokenizer = _load_tokenizer(cfg.tokenizer.path)
    source = open_source(cfg)
    n_rows = source.index()
    where = source.description or cfg.dataset.path
    if n_rows == 0:
        raise PrepareError(f"dataset.path: {where} has no rows")
    form, conv_field = _detect_form(cfg, source.columns(), where)
    if isinstance(source, _HFSource):
        source.needed = [c for c in (cfg.dataset.field, cfg.dataset.loss_masking_spans, conv_field) if c]
    if form == "chat":
        try:  # a template that cannot work for any row is a config problem, not 3000 skipped rows
            chat.templates._compile(chat.resolve_template(tokenizer, cfg.chat.template))
        except chat.ChatError as e:
            raise ConfigError([f"chat.template: {e}"]) from None
    elif form == "text":
        _print(
            f"note: {where} has a {cfg.dataset.field!r} column but no loss_masking_spans and no conversations: "
            "every token is trained"
        )
    form_name = {"spans": "text + loss_masking_spans (guide)", "chat": f"conversations ({conv_field!r})"}
    _print(f"preparing {where}: {n_rows} rows, form {form_name.get(form, 'plain text')}")

    # the tokenizer (with the chat template the rows were rendered with) is saved next to the shards: training
    # exports it, so an export's template and stop tokens are the data's, not pretrained.path's
    info = {**tokenizer_info(tokenizer, cfg.tokenizer.path, cfg.chat.template), "saved": TOKENIZER_DIR}
    vocab = info["vocab_size"]
    names = list(cfg.splits)
    assign = split_assignment(n_rows, cfg.splits, cfg.seed)
    writers = {name: ShardWriter(tmp, name, vocab, tokenizer_info=info, prepare_config_hash=digest) for name in names}
    job = _Job(
        source=source,
        form=form,
        field=cfg.dataset.field,
        spans_field=cfg.dataset.loss_masking_spans,
        conversations_field=conv_field,
        tokenizer_path=cfg.tokenizer.path,
        masking=cfg.chat.to_masking(),
        chat_template=cfg.chat.template,
        vocab_size=vocab,
        split_length=cfg.long_documents.sequence_length if cfg.long_documents.mode == "split_turns" else None,
    )
    workers = max(1, cfg.tokenize_workers)
    if workers > (os.cpu_count() or 1):
        _print(f"note: tokenize_workers {workers} > {os.cpu_count()} CPUs here; using {os.cpu_count()}")
        workers = os.cpu_count() or 1
    if workers > 1:
        try:  # workers rebuild the tokenizer from this with `tokenizers` alone: no transformers import each
            job.tokenizer_spec = chat.portable_spec(tokenizer)
        except ValueError:
            pass  # a slow tokenizer: each worker loads it with transformers

    counts: dict[str, int] = {}
    examples: dict[str, list] = {}
    split_stats: dict[str, int] = {}
    skipped_rows = 0  # each row is skipped at most once (processing stops at its first fatal problem)
    seen_rows = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_rows, unit="row", desc="prepare", file=sys.stderr)
    t0 = time.perf_counter()
    try:
        for chunk in _run_chunks(job, source, n_rows, workers, tokenizer):
            split_of = assign[chunk.rows]
            for k, name in enumerate(names):
                sel = split_of == k
                if sel.all():
                    writers[name].add_batch(chunk.ids, chunk.trained, chunk.bounds)
                elif sel.any():
                    tokens_sel = np.repeat(sel, np.diff(chunk.bounds))
                    writers[name].add_batch(
                        chunk.ids[tokens_sel],
                        chunk.trained[tokens_sel],
                        np.concatenate([[0], np.cumsum(np.diff(chunk.bounds)[sel])]),
                    )
            for r, code, message, skipped in chunk.problems:
                counts[code] = counts.get(code, 0) + 1
                skipped_rows += bool(skipped)
                ex = examples.setdefault(code, [])
                if len(ex) < cfg.report.examples:
                    ex.append({"row": int(r), "where": source.where(r), "message": message})
            for k, v in chunk.split_stats.items():
                split_stats[k] = split_stats.get(k, 0) + v
            seen_rows += chunk.n_rows
            if bar is not None:
                bar.update(chunk.n_rows)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    if seen_rows != n_rows:
        raise PrepareError(f"internal error: read {seen_rows} rows of {n_rows}")
    split_counts = {name: w.close() for name, w in writers.items()}

    # read back what was written: the summary describes the files, not our intentions
    lengths = []
    for name in names:
        ds = TokenDataset(tmp / descriptor_name(name))
        lengths.append(ds.lengths)
        if len(ds) == 0 and cfg.splits[name] > 0:
            _print(f"warning: split {name!r} has no documents")
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    num_tokens = sum(c["num_tokens"] for c in split_counts.values())
    num_trained = sum(c["num_trained_tokens"] for c in split_counts.values())
    num_documents = sum(c["num_documents"] for c in split_counts.values())
    written = num_documents - split_stats.get("pieces", 0) + split_stats.get("conversations_split", 0)  # rows
    skipped = {c: n for c, n in counts.items() if c in SKIP_REASONS}
    summary = {
        "status": "prepared",
        "output_path": str(cfg.output_path),
        "form": form,
        "input_rows": n_rows,
        "written": written,
        "skipped_rows": skipped_rows,
        "num_documents": num_documents,
        "num_tokens": num_tokens,
        "num_trained_tokens": num_trained,
        "trained_token_share": num_trained / num_tokens if num_tokens else 0.0,
        "splits": split_counts,
        "length_percentiles": _percentiles(lengths),
        "skipped": skipped,
        "warnings": {c: n for c, n in counts.items() if c not in SKIP_REASONS},
        "examples": examples,
        "tokens_per_s": num_tokens / seconds if seconds > 0 else None,
        "seconds": seconds,
        "tokenize_workers": workers,
        "prepare_hash": digest,
    }
    seq = cfg.report.sequence_length
    if seq is not None:
        longer = lengths > seq
        summary["longer_than_sequence_length"] = {
            "sequence_length": int(seq),
            "documents": int(longer.sum()),
            "tokens": int(lengths[longer].sum()),
            "token_share": float(lengths[longer].sum() / num_tokens) if num_tokens else 0.0,
        }
    if cfg.long_documents.mode != "keep":
        summary["long_documents"] = {
            "mode": cfg.long_documents.mode,
            "sequence_length": cfg.long_documents.sequence_length,
            **{k: 0 for k in ("conversations_split", "pieces", "context_tokens", "truncated_groups")},
            **{k: 0 for k in ("dropped_trained_tokens", "not_split")},
            **split_stats,
        }
    if written + skipped_rows != n_rows:
        raise PrepareError(f"internal error: {written} written + {skipped_rows} skipped != {n_rows} rows")
    (tmp / "prepare_report.json").write_text(json.dumps({"summary": summary, "tokenizer": info}, indent=2) + "\n")
    save_tokenizer(tokenizer, cfg.chat.template, tmp / TOKENIZER_DIR)
    (tmp / "prepare_config.yaml").write_text(dump_yaml(cfg))
    return summary


def main(cfg: PrepareConfig, force: bool = False) -> int:
    """`run_cli` entry: 0 on success, 1 with a one-paragraph message (no traceback) when preparation fails."""
    from backend.chat import RenderProofError

    try:
        prepare(cfg, force=force)
    except (PrepareError, RenderProofError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from backend.cli import run_cli

    run_cli(sys.argv[1:], "prepare", main, __doc__)
