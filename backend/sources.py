"""Where prepare's rows come from: open the configured input as a row source, and detect the row form.

    >>> from backend.config import load_prepare_config
    >>> cfg = load_prepare_config("assets/configs/tiny_prepare.yaml")
    >>> source = open_source(cfg)
    >>> n_rows = source.index()                      # 3000 rows of assets/data/sample_sharegpt.jsonl
    >>> detect_form(cfg, source.columns(), source.description)
    ('chat', 'conversations')

Input (`dataset.path`): a hub id (``load_dataset(path, name, split=...)``), a ``save_to_disk`` directory
(``load_from_disk``, then ``dataset.split`` of a DatasetDict), a folder of data files, or files / globs
(``.jsonl``/``.ndjson`` are read line by line here so that one broken line is reported and skipped instead of
failing the whole load; ``.json``/``.parquet``/``.csv``/``.arrow``/``.txt`` go through ``datasets``).

A source is random access by row index: ``index()`` counts the rows, ``task(start, stop)`` names a range of them
cheaply (picklable: prepare's worker processes read their own chunk), ``read(task)`` yields the rows as dicts
(or `BadRow` for a line that is not a JSON object), ``where(row)`` says where a row lies (``file:line``).
`backend.documents` turns the rows into documents; `backend.prepare` and the studio's preview both read through
here, so they see the same rows in the same order.
"""

from __future__ import annotations

import glob
import hashlib
import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from backend.hub import HubUnreachable, require_hub

if TYPE_CHECKING:
    from backend.config import PrepareConfig

__all__ = [
    "BUILDERS",
    "BadRow",
    "HFSource",
    "JsonlSource",
    "PrepareError",
    "detect_form",
    "input_fingerprint",
    "open_source",
]

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


class PrepareError(RuntimeError):
    """Preparation cannot start or finish; the message says what to change."""


def _print(*args):
    print(*args, flush=True)


class BadRow:
    """Placeholder for an input row that could not be parsed."""

    def __init__(self, message: str):
        self.message = message


@dataclass
class JsonlSource:
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
                    yield BadRow(f"{self.files[f_id]} line {lineno}: not valid JSON ({e})")
                    continue
                yield (
                    row
                    if isinstance(row, dict)
                    else BadRow(f"{self.files[f_id]} line {lineno}: a JSON {type(row).__name__}, expected an object")
                )
        finally:
            if handle:
                handle.close()


@dataclass
class HFSource:
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
    """The configured input as a row source (`JsonlSource` or `HFSource`)."""
    from backend.config import ConfigError  # lazy: workers never need pydantic

    ds = cfg.dataset
    path = ds.path
    workers = max(1, min(cfg.loading_workers, os.cpu_count() or 1))
    try:
        from datasets import load_dataset, load_from_disk

        if ds.data_files is not None:
            obj = load_dataset(path, ds.name, data_files=ds.data_files, split=ds.split, **_load_kwargs(ds, workers))
            return HFSource(obj, f"{path} (data_files {ds.data_files})")
        files = _input_files(path)
        if files is not None:
            if not files:
                raise ConfigError([f"dataset.path: no file matches {path!r}"])
            suffixes = {Path(f).suffix.lower() for f in files}
            if suffixes <= set(JSONL_SUFFIXES):
                return JsonlSource(files, path)
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
            return HFSource(obj, path)
        if os.path.isdir(path):
            p = Path(path)
            if any((p / marker).is_file() for marker in ("dataset_dict.json", "dataset_info.json", "state.json")):
                return HFSource(_pick_split(load_from_disk(path), ds.split, path), path)
            return HFSource(load_dataset(path, ds.name, split=ds.split, **_load_kwargs(ds, workers)), path)
        if path.startswith((".", "/", "~")) or Path(path).suffix.lower() in BUILDERS:
            raise ConfigError(
                [
                    f"dataset.path: {path!r} does not exist (relative paths are resolved against "
                    f"the current directory {os.getcwd()})"
                ]
            )
        require_hub(path, "dataset.path")  # an unreachable hub: fail in seconds, not after minutes of retries
        return HFSource(load_dataset(path, ds.name, split=ds.split, **_load_kwargs(ds, workers)), path)
    except (ConfigError, PrepareError):
        raise
    except HubUnreachable as e:  # its message already names the key and says how to work offline
        raise PrepareError(str(e)) from None
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


def detect_form(cfg: PrepareConfig, columns: list[str], where: str) -> tuple[str, str | None]:
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
    if "chosen" in columns and "rejected" in columns and not ds.conversations_field:
        return "pairs", None  # preference pairs (TRL's column names): backend.documents.pair_documents
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
