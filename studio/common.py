"""What every studio tab shares: path checks, cached tokenizers and row readers, the Data tab's settings.

`DataSettings` is the Data tab's values, built once in `studio.app`; `prepare_config_of` turns it into the
`PrepareConfig` that the preview, the dataset check, the packing view and the prepare YAML all use, and
`get_reader` opens that config's rows with `backend.documents.RowReader`: prepare's own reader and per-row code.

Tokenizers are loaded lazily and cached per path (transformers imports torch then: ~1-10 s once per path, the
only torch import of the UI process; `import studio.app` itself stays torch-free).
"""

from __future__ import annotations

import copy
import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from backend import ASSETS, TINY_MODEL

DEFAULT_PREPARE_YAML = ASSETS / "configs" / "tiny_prepare.yaml"
DEFAULT_TRAIN_YAML = ASSETS / "configs" / "tiny_train.yaml"
TRAINED, MASKED, APPENDED = "trained", "masked", "appended (trained)"
# APPENDED: the end-of-turn marker added after a final reply the template leaves open (chat.final_eot: append)
# agent traces: tool results (never trained) and reasoning in colours of their own; tool calls are trained text
TOOL_RESULT, REASONING, REASONING_MASKED = "tool result (masked)", "reasoning (trained)", "reasoning (masked)"
# preference pairs (DPO): each answer trained, in its own colour; the prompt masked
CHOSEN, REJECTED = "chosen answer (trained)", "rejected answer (trained)"
COLOR_MAP = {
    CHOSEN: "#1f77b4",
    REJECTED: "#d62728",
    TRAINED: "#2ca02c",
    MASKED: "#d9d9d9",
    APPENDED: "#ff7f0e",
    TOOL_RESULT: "#9ecae1",
    REASONING: "#9467bd",
    REASONING_MASKED: "#dadaeb",
}
TOKEN_VIEW_LIMIT = 3000  # tokens drawn in the token view (the highlight always shows the whole sample)


# =============================================================================================== paths


@dataclass
class PathCheck:
    ok: bool
    path: str  # what to pass on (resolved local path, or the hub id as typed)
    message: str  # "" when fine, else what is wrong and what to do
    kind: str = ""  # "file" | "dir" | "hub"


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def check_path(text: str, what: str = "dataset", must_exist: bool = True) -> PathCheck:
    """Validate a path typed in the UI.

    what: "dataset" (a .jsonl/.json/.parquet file, a save_to_disk dir or a hub id), "model" (a dir with
    config.json, or a hub id), "tokenizer" (a dir with tokenizer files, or a hub id), "dir" (any directory to
    write into). Relative paths are relative to the studio's working directory; the message shows where that is.
    """
    raw = (text or "").strip()
    if not raw:
        return PathCheck(False, "", f"{what} path is empty: type a path")
    if "\x00" in raw:
        return PathCheck(False, "", f"{what} path contains a NUL character")
    p = Path(raw).expanduser()
    resolved = p.resolve()
    if what == "dir":
        if resolved.exists() and not resolved.is_dir():
            return PathCheck(False, str(resolved), f"{raw} exists and is not a directory ({resolved})")
        parent = resolved if resolved.exists() else next((q for q in resolved.parents if q.exists()), None)
        if parent is None or not os.access(parent, os.W_OK):
            return PathCheck(False, str(resolved), f"cannot write under {resolved}: {parent} is not writable")
        return PathCheck(True, raw, "", "dir")
    if not p.exists():
        if _HUB_ID.match(raw) and not raw.startswith((".", "/")) and not (Path.cwd() / raw.split("/")[0]).exists():
            return PathCheck(True, raw, f"'{raw}' is not a local path: treated as a hub id (needs network)", "hub")
        if must_exist:
            return PathCheck(False, str(resolved), f"{what} path {raw} does not exist (looked at {resolved})")
        return PathCheck(True, raw, "", "")
    if what == "dataset":
        if p.is_file() and p.suffix not in (".jsonl", ".json", ".parquet", ".csv"):
            return PathCheck(
                False,
                str(resolved),
                f"{raw}: expected a .jsonl, .json, .parquet or .csv file, or "
                f"a directory (save_to_disk output or data files)",
            )
        return PathCheck(True, raw, "", "file" if p.is_file() else "dir")
    if what == "prepared":  # a descriptor written by backend.prepare, as data.datasets.*.path expects
        if p.is_dir():
            return PathCheck(
                False,
                str(resolved),
                f"{raw} is a directory; point at its fast_llm_config_training.yaml (written by prepare)",
            )
        if not (p.parent / "DONE").exists():
            return PathCheck(False, str(resolved), f"{raw}: {p.parent} is not a completed prepare output (no DONE)")
        return PathCheck(True, raw, "", "file")
    if what == "model" and (p / "adapter_config.json").is_file():  # a LoRA adapter export (base in its config)
        return PathCheck(True, raw, "", "dir")
    if what in ("model", "tokenizer"):
        if not p.is_dir():
            return PathCheck(False, str(resolved), f"{what} path {raw} is a file; pass the model directory")
        needed = ["config.json"] if what == "model" else ["tokenizer.json", "tokenizer_config.json"]
        if what == "model" and (p / "COMPLETE").exists() and (p / "config.yaml").exists():
            return PathCheck(True, raw, "", "dir")  # a run's checkpoint: base config + its weights (Chat tab)
        if what == "model" and not (p / "config.json").exists():
            return PathCheck(
                False,
                str(resolved),
                f"{raw} holds no config.json: not a Hugging Face model directory (export/final or export/step_* are)",
            )
        if what == "tokenizer" and not any((p / n).exists() for n in needed):
            return PathCheck(False, str(resolved), f"{raw} holds no tokenizer.json / tokenizer_config.json")
        return PathCheck(True, raw, "", "dir")
    return PathCheck(True, raw, "", "file" if p.is_file() else "dir")


# =============================================================================================== caches

_lock = threading.Lock()
# Loading is serialized: two handlers importing transformers at once (page load fires several) race on its lazy
# module ("cannot import name 'AutoTokenizer'"), and loading the same tokenizer twice wastes seconds.
_load_lock = threading.RLock()
_tokenizers: dict[tuple, Any] = {}


def _stamp(path: str) -> tuple:
    p = Path(path)
    try:
        return (str(p.resolve()), p.stat().st_mtime_ns)
    except OSError:
        return (path, 0)


def _load_once(cache: dict, path: str, kind: str, load):
    """``load(path)`` once per (path, mtime); loads are serialized (two concurrent transformers imports fail)."""
    check = check_path(path, kind)
    if not check.ok:
        raise ValueError(check.message)
    key = _stamp(path)
    with _lock:
        hit = cache.get(key)
    if hit is None:
        with _load_lock:  # re-entrant: a model load also loads its tokenizer
            hit = cache.get(key)
            if hit is None:
                hit = load(path)
                with _lock:
                    cache[key] = hit
    return hit


def get_tokenizer(path: str):
    """The tokenizer at ``path``, loaded once per (path, mtime) through backend.modeling.load_tokenizer."""

    def load(path):
        from backend.modeling import load_tokenizer  # imports torch: only here, lazily

        return load_tokenizer(path)

    return _load_once(_tokenizers, path, "tokenizer", load)


_default_prepare: dict = {}


def default_prepare() -> dict:
    """A fresh copy of assets/configs/tiny_prepare.yaml as a dict (parsed once: a config is built per edit)."""
    if not _default_prepare:
        _default_prepare.update(yaml.safe_load(read_text(DEFAULT_PREPARE_YAML)))
    return copy.deepcopy(_default_prepare)


@dataclass(frozen=True)
class DataSettings:
    """The Data tab's values, built once in `studio.app` from its widgets, passed to every data handler."""

    dataset: str
    tokenizer: str
    mode: str = "auto"  # chat.masking.mode
    start: str = ""  # chat.masking.start_delimiter, typed on one line ('\\n' = newline)
    end: str = ""  # chat.masking.end_delimiter
    train_on: str = "all"
    train_on_eot: bool = True
    template: str = ""  # the chat template box: '' or the tokenizer's own = chat.template null
    final_eot: str = "append"  # chat.final_eot
    train_on_tool_calls: bool = True  # chat.train_on_tool_calls
    reasoning: str = "as_rendered"  # chat.reasoning

    def masking(self):
        return make_masking(
            self.mode,
            self.start,
            self.end,
            self.train_on,
            self.train_on_eot,
            self.final_eot,
            self.train_on_tool_calls,
            self.reasoning,
        )


_readers: dict[tuple, Any] = {}


def _dataset_section(path: str) -> dict:
    """The prepare ``dataset:`` section the studio uses for ``path``: the default one, plus the guide's form when
    the rows hold ``text`` and a ``loss_masking_spans`` (or ``spans``) column and no conversations."""
    from backend.config import load_prepare_config
    from backend.sources import open_source

    section = {**default_prepare()["dataset"], "path": (path or "").strip()}

    def load(_):
        source = open_source(load_prepare_config({"output_path": ".", "dataset": section, "tokenizer": {"path": "."}}))
        source.index()
        return source.columns()

    columns = _load_once(_columns, section["path"], "dataset", load)
    spans = next((c for c in ("loss_masking_spans", "spans") if c in columns), None)
    if spans and section.get("field", "text") in columns and not {"conversations", "messages"} & set(columns):
        section["loss_masking_spans"] = spans
    return section


_columns: dict[tuple, list] = {}


def prepare_config_of(s: DataSettings, sequence_length=None, split_turns: bool = False, output_path: str = "."):
    """The `PrepareConfig` of the Data tab's settings: what the preview, the check and the packing view read rows
    with (`backend.documents`), and what `prepare_yaml_from` writes. Raises ConfigError / ValueError."""
    from backend.config import load_prepare_config

    base = default_prepare()
    base["output_path"] = output_path
    base["dataset"] = _dataset_section(s.dataset)
    base["tokenizer"]["path"] = (s.tokenizer or "").strip()
    base["chat"] = _chat_section(s)
    if split_turns and sequence_length:
        base["long_documents"] = {"mode": "split_turns", "sequence_length": int(sequence_length)}
    return load_prepare_config(base)


def _chat_section(s: DataSettings) -> dict:
    template = None
    if (s.template or "").strip():
        try:
            template = _template_arg(s.template, get_tokenizer(s.tokenizer))
        except Exception:
            template = s.template
    masking = {"mode": s.mode}
    if s.mode == "delimiters":
        masking.update(start_delimiter=_unescape(s.start), end_delimiter=_unescape(s.end))
    return {
        "template": template,
        "masking": masking,
        "train_on": s.train_on,
        "train_on_eot": bool(s.train_on_eot),
        "final_eot": s.final_eot or "append",
        "train_on_tool_calls": bool(s.train_on_tool_calls),
        "reasoning": s.reasoning or "as_rendered",
    }


def get_reader(cfg):
    """The `backend.documents.RowReader` of ``cfg.dataset``, opened once per (path, mtime, dataset section)."""
    from backend.documents import RowReader

    key = (_stamp(cfg.dataset.path), json.dumps(cfg.dataset.model_dump(), sort_keys=True, default=str))
    with _lock:
        hit = _readers.get(key)
    if hit is None:
        with _load_lock:
            hit = _readers.get(key) or RowReader(cfg)
            with _lock:
                _readers[key] = hit
    return hit


class _Rows:
    """The raw input rows of a dataset (dicts), read through prepare's source (`backend.sources`)."""

    def __init__(self, reader):
        self.source, self.n = reader.source, reader.n_rows

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        from backend.sources import BadRow

        row = next(iter(self.source.read(self.source.task(int(i), int(i) + 1))))
        if isinstance(row, BadRow):
            raise ValueError(row.message)
        return row


def warm_up(tokenizer_path: str = str(TINY_MODEL)) -> None:
    """Load the default tokenizer in the background at startup, so the first preview does not wait for it."""

    def run():
        try:
            get_tokenizer(tokenizer_path)
        except Exception:
            pass  # the preview will show the problem

    threading.Thread(target=run, daemon=True).start()


def get_rows(path: str) -> _Rows:
    """The raw rows of the dataset at ``path`` as prepare reads them (its default dataset section)."""
    check = check_path(path, "dataset")
    if not check.ok:
        raise ValueError(check.message)
    return _Rows(get_reader(prepare_config_of(DataSettings(path, str(TINY_MODEL)))))


def prepared_row(s: DataSettings, index: int | float | None, sequence_length=None, split_turns: bool = False):
    """(row index, n_rows, PreparedRow, tokenizer): row ``index`` (wrapping) exactly as prepare writes it."""
    tokenizer = get_tokenizer(s.tokenizer)
    cfg = prepare_config_of(s, sequence_length, split_turns)
    reader = get_reader(cfg)
    i = int(index or 0) % reader.n_rows
    return i, reader.n_rows, reader.sample(i, cfg, tokenizer), tokenizer


# =============================================================================================== masking


def make_masking(
    mode: str,
    start_delimiter: str,
    end_delimiter: str,
    train_on: str,
    train_on_eot: bool,
    final_eot: str = "append",
    train_on_tool_calls: bool = True,
    reasoning: str = "as_rendered",
):
    """Widget values -> backend.chat.Masking (raises ValueError with the config key on bad values)."""
    from backend.chat import Masking

    delimiters = mode == "delimiters"
    return Masking(
        mode="delimiters" if delimiters else "auto",
        start_delimiter=_unescape(start_delimiter) if delimiters else None,
        end_delimiter=_unescape(end_delimiter) if delimiters else None,
        train_on=train_on,
        train_on_eot=bool(train_on_eot),
        final_eot=final_eot or "append",
        train_on_tool_calls=bool(train_on_tool_calls),
        reasoning=reasoning or "as_rendered",
    )


def _unescape(s: str | None) -> str | None:
    """Delimiters are typed on one line: '\\n' in the textbox means a newline (as in YAML double quotes)."""
    if s is None:
        return None
    return s.replace("\\n", "\n").replace("\\t", "\t")


def default_template(tokenizer_path: str) -> str:
    """The tokenizer's own chat template (what `chat.template: null` uses), or '' with no tokenizer."""
    from backend.chat import resolve_template

    try:
        return resolve_template(get_tokenizer(tokenizer_path), None)
    except Exception:
        return ""


def _template_arg(template_text: str, tokenizer) -> str | None:
    """None when the box holds the tokenizer's own template (keeps `chat.template: null` in the YAML)."""
    from backend.chat import resolve_template

    t = (template_text or "").strip()
    if not t:
        return None
    try:
        own = resolve_template(tokenizer, None)
    except Exception:
        own = None
    return None if own is not None and t == own.strip() else template_text


# =============================================================================================== YAML text


def read_text(path) -> str:
    return Path(path).read_text(encoding="utf-8")


def _parse_yaml(text: str, name: str) -> tuple[dict | None, str]:
    try:
        d = yaml.safe_load(text or "") or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        return None, f"⚠ {name} YAML does not parse{where}: {getattr(e, 'problem', e)}"
    if not isinstance(d, dict):
        return None, f"⚠ {name} YAML must be a mapping of sections (training:, batch:, ...)"
    return d, ""


def problems_markdown(problems: list[str]) -> str:
    return "⚠ **Invalid config** — fix these keys:\n" + "\n".join(
        f"- `{p.split(':', 1)[0]}`:{p.split(':', 1)[1] if ':' in p else ''}" for p in problems
    )
