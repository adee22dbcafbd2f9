"""Studio event handlers: typed module-level functions from plain values to plain values (no browser needed).

The Gradio wiring in `studio/app.py` only connects widgets to these. Everything that decides what is trained
goes through `backend.chat.render` + `backend.chat.tokenize`, the same code `backend.prepare` runs:

    p = preview_sample("assets/data/sample_sharegpt.jsonl", "assets/tiny-llama", 0, "auto", "", "", "all", True, "")
    p.highlight   -> [("<|begin_of_text|>...user...", "masked"), ("5 + 37 = 42.<|eot_id|>", "trained"), ...]
    p.summary     -> "**412 tokens**: 61 trained (14.8%), 351 masked ..."
    p.status      -> "" (or the problem text: "chat.masking.start_delimiter: must be a non-empty string ...")

Tokenizers are loaded lazily and cached per path (transformers imports torch then: ~1-10 s once per path, the
only torch import of the UI process; `import studio.app` itself stays torch-free).
"""

from __future__ import annotations

import json
import os
import random
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from backend import ASSETS, TINY_MODEL

DEFAULT_PREPARE_YAML = ASSETS / "configs" / "tiny_prepare.yaml"
DEFAULT_TRAIN_YAML = ASSETS / "configs" / "tiny_train.yaml"
TRAINED, MASKED, APPENDED = "trained", "masked", "appended (trained)"
# APPENDED: the end-of-turn marker added after a final reply the template leaves open (chat.final_eot: append)
COLOR_MAP = {TRAINED: "#2ca02c", MASKED: "#d9d9d9", APPENDED: "#ff7f0e"}
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

    def masking(self):
        return make_masking(self.mode, self.start, self.end, self.train_on, self.train_on_eot, self.final_eot)


_readers: dict[tuple, Any] = {}


def _dataset_section(path: str) -> dict:
    """The prepare ``dataset:`` section the studio uses for ``path``: the default one, plus the guide's form when
    the rows hold ``text`` and a ``loss_masking_spans`` (or ``spans``) column and no conversations."""
    from backend.config import load_prepare_config
    from backend.sources import open_source

    section = {**yaml.safe_load(read_text(DEFAULT_PREPARE_YAML))["dataset"], "path": (path or "").strip()}

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

    base = yaml.safe_load(read_text(DEFAULT_PREPARE_YAML))
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


# =============================================================================================== data tab


def make_masking(
    mode: str, start_delimiter: str, end_delimiter: str, train_on: str, train_on_eot: bool, final_eot: str = "append"
):
    """Widget values -> backend.chat.Masking (raises ValueError with the config key on bad values)."""
    from backend.chat import Masking

    if mode == "delimiters":
        return Masking(
            mode="delimiters",
            start_delimiter=_unescape(start_delimiter),
            end_delimiter=_unescape(end_delimiter),
            train_on=train_on,
            train_on_eot=bool(train_on_eot),
            final_eot=final_eot or "append",
        )
    return Masking(mode="auto", train_on=train_on, train_on_eot=bool(train_on_eot), final_eot=final_eot or "append")


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
    p = _preview_from(rendered, tok, tokenizer, i, n, sequence_length, template)
    if prepared.skipped:  # tokenized, but not written (no_trained_tokens)
        p.summary += f"\n\n⚠ prepare skips this row: {prepared.skipped}"
    if sequence_length and len(tok.input_ids) > int(sequence_length):
        p.summary += _cut_lines(rendered, tok, tokenizer, masking, template, int(sequence_length))
    return p


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


def _preview_from(rendered, tok, tokenizer, i: int, n: int, sequence_length=None, template=None) -> Preview:
    from backend.chat import check_sample, eot_token_ids

    text = rendered.text
    mask = char_labels(len(text), tok.offsets, tok.trained)
    runs = runs_of(mask)
    highlight = [(text[a:b], TRAINED if v else MASKED) for a, b, v in runs]
    appended = getattr(rendered, "appended", None) or []
    if appended:  # the appended marker in its own colour: not written by the template, trained
        kind = mask.astype(np.int8)
        for a, b in appended:
            kind[a:b] = 2
        cuts = np.concatenate([[0], np.flatnonzero(kind[1:] != kind[:-1]) + 1, [len(kind)]]).tolist()
        label = {0: MASKED, 1: TRAINED, 2: APPENDED}
        highlight = [(text[a:b], label[int(kind[a])]) for a, b in zip(cuts[:-1], cuts[1:], strict=False)]
    trained_chars = [(a, b) for a, b, v in runs if v]
    T, k = len(tok.input_ids), int(tok.trained.sum())
    seq = int(sequence_length) if sequence_length else None
    problems = check_sample(rendered, tok, tokenizer, seq)
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
    problems_md = "\n".join(
        f"- ⚠ `{p.split(':', 1)[0]}`: {p.split(':', 1)[1].strip() if ':' in p else p}" for p in problems
    )
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
    backend.chat.check_sample, summarized. Rows prepare skips count under their skip reason."""
    from backend.chat import HealthReport, check_sample
    from backend.config import ConfigError
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
        for j, prepared in enumerate(reader.samples(idx, cfg, tokenizer)):
            if prepared.tokenized is None:
                report.add(j, [f"{prepared.skipped.replace(': ', f': row {prepared.row}: ', 1)}"], 0, 0)
            else:
                tok = prepared.tokenized
                problems = check_sample(prepared.rendered, tok, tokenizer, seq)
                report.add(j, problems, len(tok.input_ids), tok.n_trained, appended=len(prepared.rendered.appended))
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
    nothing = d["problems"].get("no_trained_tokens", {}).get("count", 0)
    lines = [
        f"**{n} samples checked**"
        + (
            f" (an even random sample of {reader.n_rows} rows; raise the limit to check all)"
            if sampled
            else " (the whole dataset)"
        ),
        f"- assistant spans found in **{report.span_found_share:.1%}** of samples",
        f"- samples with nothing to train: **{nothing}**",
        "- end-of-turn marker trained: "
        f"**{'yes, in every trained turn' if not eot_bad else f'NO in {eot_bad} samples'}**"
        + ("" if train_on_eot else " (train_on_eot is off: the model will not learn to stop)"),
        f"- trained tokens: **{report.n_trained} / {report.n_tokens} ({report.trained_token_share:.1%})**",
    ]
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
        lines.append(
            f"- longer than sequence_length {seq}: **{len(too_long)} documents holding {lost_tok} tokens "
            f"({share:.1%} of all tokens)**, {verb}"
        )
    if seq and len(too_long):
        lines += _long_mode_lines(reader, cfg, idx, lengths, report, tokenizer, masking, template, seq)
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


# =============================================================================================== packing view


class _MemoryDocs:
    """What backend.packing.collate reads: ``document(i) -> (tokens, trained)``, here from tokenized samples."""

    def __init__(self, docs: list[tuple[np.ndarray, np.ndarray]]):
        self.docs = docs

    def document(self, i: int):
        return self.docs[i]


@dataclass
class PackingView:
    figure: Any
    mask_figure: Any
    summary: str
    stats: dict
    status: str = ""


def tokenize_documents(
    s: DataSettings,
    max_docs: int,
    split_length: int | None = None,
    split_info: list | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The documents prepare writes for the first ``max_docs`` rows, as (tokens, trained) pairs (rows prepare skips
    are left out). With ``split_length`` (long_documents split_turns), a conversation longer than that is its
    pieces, and ``split_info`` (if given) receives ``(row, tokens, [document index of each piece])`` per split row."""
    tokenizer = get_tokenizer(s.tokenizer)
    cfg = prepare_config_of(s, split_length, split_turns=bool(split_length))
    reader = get_reader(cfg)
    docs = []
    for prepared in reader.samples(range(min(reader.n_rows, int(max_docs))), cfg, tokenizer):
        if len(prepared.documents) > 1 and split_info is not None:
            n_tok = len(prepared.tokenized.input_ids)
            split_info.append((prepared.row, n_tok, list(range(len(docs), len(docs) + len(prepared.documents)))))
        docs += prepared.documents
    return docs


def packing_view(
    s: DataSettings,
    sequence_length: int | float,
    micro_batch_size: int | float,
    strategy: str,
    truncate_documents: bool,
    cross_document_attention: bool,
    max_docs: int | float = 300,
    mask_row: int | float = 0,
    window: int = 1000,
    split_turns: bool = False,
) -> PackingView:
    """Pack the documents prepare writes for the first ``max_docs`` rows with backend.packing.pack, collate the
    first micro-batch with backend.packing.collate and draw it: documents in alternating colors, trained vs masked
    labels, padding."""
    from backend.config import ConfigError
    from backend.packing import collate, pack
    from studio.plots import MASKED_A, MASKED_B, PAD, TRAINED_A, TRAINED_B, block_mask_figure, packed_batch_figure

    try:
        s.masking()  # a bad masking value is named before anything is read
        L = int(sequence_length)
        split_info: list = []
        docs = tokenize_documents(s, int(max_docs or 300), L if split_turns else None, split_info)
        plan = pack(
            np.array([len(d[0]) for d in docs], dtype=np.int64),
            L,
            strategy=strategy,
            window=window,
            truncate_documents=bool(truncate_documents),
        )
    except ConfigError as e:
        return PackingView(None, None, "", {}, "⚠ " + "; ".join(e.problems))
    except Exception as e:
        return PackingView(None, None, "", {}, f"⚠ {type(e).__name__}: {e}")
    stats = plan.stats()
    B = max(1, min(int(micro_batch_size or 1), plan.num_rows))
    rows = plan.rows[:B]
    split_line = ""
    if split_info:  # show the first split conversation: the rows holding its pieces come first
        row_id, n_tok, piece_docs = split_info[0]
        holding = [k for k, row in enumerate(plan.rows) if any(pc.document in piece_docs for pc in row)]
        order = holding + [k for k in range(plan.num_rows) if k not in set(holding)]
        B = max(B, min(len(holding), 8))
        rows = [plan.rows[k] for k in order[:B]]
        split_line = (
            f" split_turns: {len(split_info)} conversations longer than {L} tokens cut at turn boundaries; shown "
            f"first: row {row_id} ({n_tok} tokens) → documents {piece_docs} (lengths "
            f"{[len(docs[d][0]) for d in piece_docs]}), each piece's earlier turns masked context."
        )
    if not rows:
        return PackingView(None, None, "", stats, "⚠ nothing to pack: every document was skipped or empty")
    batch = collate(rows, _MemoryDocs(docs), L, cross_document_attention=bool(cross_document_attention))
    labels = batch["labels"].numpy()  # (B, L)
    positions = batch["position_ids"].numpy()  # (B, L)
    input_ids = batch["input_ids"].numpy()  # (B, L)
    codes = np.full((B, L), PAD, dtype=np.int8)
    hover = [[""] * L for _ in range(B)]
    for r, row in enumerate(rows):
        t = 0
        for k, piece in enumerate(row):
            n = piece.end - piece.begin
            trained = labels[r, t : t + n] != -100
            codes[r, t : t + n] = np.where(
                trained, TRAINED_A if k % 2 == 0 else TRAINED_B, MASKED_A if k % 2 == 0 else MASKED_B
            )
            for j in range(t, t + n):
                hover[r][j] = (
                    f"row {r} slot {j}<br>doc {piece.document} token {piece.begin + j - t}<br>"
                    f"id {input_ids[r, j]} pos {positions[r, j]}<br>"
                    f"label {'trained' if labels[r, j] != -100 else '-100'}"
                )
            t += n
        for j in range(t, L):
            hover[r][j] = f"row {r} slot {j}<br>padding, pos {positions[r, j]}"
    shown_fill = float((codes != PAD).sum()) / codes.size
    fig = packed_batch_figure(codes, hover, f"micro-batch of {B} rows × {L} tokens — fill {shown_fill:.1%}")
    # Block mask of one row: query i may attend key j iff j <= i and both sit in the same segment.
    r = int(mask_row or 0) % B
    seg = np.zeros(L, dtype=np.int64)
    if not cross_document_attention:
        cu = batch["cu_seq_lens_q"].numpy() - r * L
        cu = cu[(cu > 0) & (cu < L)]
        seg[cu] = 1
        seg = np.cumsum(seg)
    stride = max(1, L // 512)  # keep the heatmap drawable: sample every stride-th position
    s = seg[::stride]
    idx = np.arange(L)[::stride]
    mask = (s[:, None] == s[None, :]) & (idx[None, :] <= idx[:, None])
    mask_fig = block_mask_figure(
        mask,
        "row {} attention mask ({})".format(
            r, "documents see each other" if cross_document_attention else "block-diagonal: each document sees itself"
        )
        + (f", every {stride}th position" if stride > 1 else ""),
    )
    summary = (
        f"**{stats['documents']} documents → {stats['rows']} rows** ({strategy}, truncate_documents: "
        f"{'yes' if truncate_documents else 'no'}): fill **{stats['fill']:.1%}**, padding {stats['padding']:.1%}; "
        f"skipped {stats['documents_skipped']} documents holding **{stats['tokens_skipped']} tokens "
        f"({stats['tokens_skipped_share']:.1%})**. Shown micro-batch: fill {shown_fill:.1%}, "
        f"{batch['num_trained']} trained labels."
    ) + split_line
    stats["shown_fill"] = shown_fill
    return PackingView(fig, mask_fig, summary, stats)


# =============================================================================================== config tab


def read_text(path) -> str:
    return Path(path).read_text(encoding="utf-8")


def default_train_yaml() -> str:
    from backend.config import dump_yaml, load_train_config

    return dump_yaml(load_train_config(DEFAULT_TRAIN_YAML))


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


def form_to_train_yaml(yaml_text: str, *values) -> tuple[str, str]:
    """Form values (bindings table order) applied onto the YAML text -> (new YAML text, status markdown).

    On invalid values the YAML is returned with the values written in (so the user sees what they typed) and
    the status lists ConfigError.problems, each naming its key.
    """
    from backend.config import ConfigError, dump_yaml, load_train_config
    from studio.bindings import apply_form_values

    base, err = _parse_yaml(yaml_text, "train")
    if base is None:
        base = {}
    raw = apply_form_values(base, list(values))
    try:
        cfg = load_train_config(raw)
    except ConfigError as e:
        return yaml.safe_dump(raw, sort_keys=False), problems_markdown(e.problems)
    if cfg.pretrained.quantization != "none":  # QLoRA needs CUDA + bitsandbytes on the machine that trains
        from backend.lora import quantization_problems

        if problems := quantization_problems(cfg):
            return dump_yaml(cfg), problems_markdown(problems)
    return dump_yaml(cfg), "✓ valid train config"


def train_yaml_to_form(yaml_text: str) -> tuple[list, str, bool]:
    """YAML text -> (form values in table order, status markdown, valid). Invalid YAML: values are None."""
    from backend.config import ConfigError, load_train_config
    from studio.bindings import TRAIN_FIELDS, form_values_from_config

    raw, err = _parse_yaml(yaml_text, "train")
    if raw is None:
        return [None] * len(TRAIN_FIELDS), err, False
    try:
        cfg = load_train_config(raw)
    except ConfigError as e:
        return [None] * len(TRAIN_FIELDS), problems_markdown(e.problems), False
    return form_values_from_config(cfg), "✓ valid train config", True


def memory_plan_markdown(train_yaml: str, gpus: float | None = None, gpu_memory_gb: float | None = None) -> str:
    """The Config tab's memory plan (backend.plan) of the YAML on `gpus` GPUs (None: run.num_processes) of
    `gpu_memory_gb` GiB each: verdict, the smallest change that fits, and the per-GPU table. Never raises."""
    from backend.config import ConfigError, load_train_config
    from backend.plan import plan_memory

    raw, err = _parse_yaml(train_yaml, "train")
    if raw is None:
        return f"Memory plan: {err}"
    try:
        cfg = load_train_config(raw)
    except ConfigError as e:
        return "Memory plan: the config is not valid yet (see the problems on the left; first: " + (
            f"`{e.problems[0]}`)" if e.problems else ")"
        )
    world = int(gpus) if gpus and gpus >= 1 else cfg.run.num_processes
    memory = float(gpu_memory_gb) if gpu_memory_gb and gpu_memory_gb > 0 else None
    try:
        plan = plan_memory(cfg, world, memory)
    except (FileNotFoundError, ValueError) as e:
        return f"Memory plan: {e}"
    verdict = ""
    if plan.fits is not None:
        verdict = (
            f"✓ **Fits**: peak {plan.peak_bytes / 2**30:.1f} GiB per GPU of {memory:g} GiB"
            if plan.fits
            else f"⚠ **Does not fit**: peak {plan.peak_bytes / 2**30:.1f} GiB per GPU of {memory:g} GiB. "
            + (f"Smallest change that fits: `{plan.suggestion}`" if plan.suggestion else "No single change fits.")
        )
    head = (
        f"{plan.num_params:,} parameters ({plan.trainable_params:,} trained) on {world} GPU{'s' if world > 1 else ''}"
    )
    table = plan.table()
    table = table[table.index("| part") :]  # the verdict is written above, in the studio's words
    return "\n\n".join(x for x in (verdict, head, table) if x)


def prepare_yaml_from(train_yaml: str, s: DataSettings) -> tuple[str, str]:
    """The prepare YAML for the Data tab's settings (`prepare_config_of`: the config the preview reads rows with),
    writing where the train YAML reads its datasets.

    output_path = the directory of ``data.datasets.training.path`` (so the two files can never disagree).
    """
    from backend.config import ConfigError, dump_yaml, load_prepare_config, load_train_config

    base = yaml.safe_load(read_text(DEFAULT_PREPARE_YAML))
    raw, err = _parse_yaml(train_yaml, "train")
    if raw is not None:
        try:
            tcfg = load_train_config(raw)
            base["output_path"] = str(Path(tcfg.data.datasets.training.path).parent)
            base.setdefault("report", {})["sequence_length"] = tcfg.batch.sequence_length
        except ConfigError:
            pass
    try:
        base["dataset"] = _dataset_section(s.dataset)
    except Exception:  # an unreadable dataset: the path as typed (the preview says what is wrong)
        base["dataset"]["path"] = (s.dataset or "").strip()
    base["tokenizer"]["path"] = (s.tokenizer or "").strip()
    base["chat"] = _chat_section(s)
    try:
        return dump_yaml(load_prepare_config(base)), "✓ valid prepare config"
    except ConfigError as e:
        return yaml.safe_dump(base, sort_keys=False), problems_markdown(e.problems)


def save_yaml(text: str, path: str) -> str:
    """Write a YAML file atomically; returns a status line."""
    check = check_path(str(Path(path).parent) if path else "", "dir")
    if not path or not check.ok:
        return f"⚠ cannot save: {check.message or 'no path'}"
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, p)
    return f"saved {p.resolve()}"


def load_yaml_file(path: str) -> tuple[str | None, str]:
    p = Path((path or "").strip())
    if not p.is_file():
        return None, f"⚠ no such file: {p.resolve()}"
    return p.read_text(encoding="utf-8"), f"loaded {p.resolve()}"


# =============================================================================================== train tab


@dataclass
class RunView:
    figure: Any
    log: str
    status: str  # markdown
    progress: float  # 0..1
    running: bool
    cursor: dict  # per-session tail state: {"exp": str, "offset": int, "events": [...]}


def prepared_is_current(prepare_yaml: str) -> tuple[bool, bool, str]:
    """(current, exists, why): whether prepare's output already holds this config and these input files.

    Uses backend.prepare's own identity (DONE's prepare_hash and input_fingerprint), so the studio skips prepare
    exactly when `python -m backend.prepare` would say "already prepared", and passes --force when the output is
    stale (prepare refuses to overwrite a different dataset without it).
    """
    from backend.config import ConfigError, load_prepare_config
    from backend.prepare import input_fingerprint, output_hash

    try:
        cfg = load_prepare_config(yaml.safe_load(prepare_yaml))
    except (ConfigError, yaml.YAMLError) as e:
        return False, False, f"invalid prepare config: {e}"
    out = Path(cfg.output_path)
    try:
        done = json.loads((out / "DONE").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False, out.exists(), f"{out} is not prepared yet"
    if done.get("prepare_hash") != output_hash(cfg):
        return False, True, f"{out} was prepared with other settings: it is prepared again (--force)"
    if done.get("input_fingerprint") != input_fingerprint(cfg.dataset.path):
        return False, True, f"the input files changed since {out} was prepared: it is prepared again (--force)"
    return True, True, f"{out} is prepared with these settings"


def launch_run(train_yaml: str, prepare_yaml: str) -> str:
    """Validate both YAMLs, then start prepare (if needed) + train in the experiment dir. Returns a status line."""
    from backend.config import ConfigError, load_prepare_config, load_train_config
    from studio import jobs

    raw, err = _parse_yaml(train_yaml, "train")
    if raw is None:
        return err
    try:
        cfg = load_train_config(raw)
    except ConfigError as e:
        return problems_markdown(e.problems)
    run_prepare, force, why = bool((prepare_yaml or "").strip()), False, ""
    if run_prepare:
        praw, perr = _parse_yaml(prepare_yaml, "prepare")
        if praw is None:
            return perr
        try:
            pcfg = load_prepare_config(praw)
        except ConfigError as e:
            return problems_markdown([f"(prepare) {p}" for p in e.problems])
        expected = Path(pcfg.output_path) / "fast_llm_config_training.yaml"
        if Path(cfg.data.datasets.training.path).resolve() != expected.resolve():
            return (
                f"⚠ `data.datasets.training.path` is {cfg.data.datasets.training.path} but prepare writes "
                f"{expected}; set it to {expected}"
            )
        current, exists, why = prepared_is_current(prepare_yaml)
        run_prepare, force = not current, exists and not current
    else:
        check = check_path(cfg.data.datasets.training.path, "prepared")
        if not check.ok:
            return f"⚠ `data.datasets.training.path`: {check.message}; prepare it first (or give a prepare YAML)"
    exp = cfg.run.experiment_dir
    check = check_path(exp, "dir")
    if not check.ok:
        return f"⚠ `run.experiment_dir`: {check.message}"
    try:
        jobs.launch(
            exp,
            prepare_yaml if (prepare_yaml or "").strip() else None,
            train_yaml,
            cfg.run.num_processes,
            run_prepare=run_prepare,
            force_prepare=force,
        )
    except jobs.JobError as e:
        return f"⚠ {e}"
    return f"launched in {exp}: {'prepare, then ' if run_prepare else ''}train. {why}"


def experiment_dir_of(train_yaml: str) -> str:
    raw, _ = _parse_yaml(train_yaml, "train")
    if raw is None:
        return ""
    return str(((raw.get("run") or {}).get("experiment_dir")) or "runs/experiment")


def stop_run(exp_dir: str) -> str:
    from studio import jobs

    if not exp_dir:
        return "⚠ no experiment directory"
    return jobs.stop(exp_dir)


def _events_of(path: Path, cache: dict) -> list[dict]:
    """All events of a past run, re-read only when the file changed."""
    from backend.events import read_events

    try:
        st = path.stat()
    except OSError:
        return []
    key = (str(path), st.st_mtime_ns, st.st_size)
    if cache.get("key") != key:
        cache["key"], cache["events"] = key, read_events(path)[0]
    return cache["events"]


_past_cache: dict[str, dict] = {}


def poll_run(exp_dir: str, cursor: dict | None, overlays: list[str] | None = None) -> RunView:
    """One timer tick: read new events of ``exp_dir`` from the cursor's offset, redraw, tail the log."""
    from backend.events import read_events
    from studio import jobs
    from studio.plots import training_figure

    cursor = dict(cursor or {})
    exp = Path(exp_dir or "")
    if cursor.get("exp") != str(exp):
        cursor = {"exp": str(exp), "offset": 0, "events": []}
    new, cursor["offset"] = read_events(exp / "events.jsonl", cursor["offset"])
    # A resume appends to the same events.jsonl: the history is kept and the chart shows it by step.
    cursor["events"] = cursor["events"] + new
    st = jobs.job_status(exp)
    runs = {exp.name or "run": cursor["events"]}
    for o in overlays or []:
        if Path(o).resolve() == exp.resolve():
            continue
        runs[Path(o).name] = _events_of(Path(o) / "events.jsonl", _past_cache.setdefault(o, {}))
    fig = training_figure(runs)
    trains = [e for e in cursor["events"] if e.get("event") == "train"]
    total = st.train_iters or next(
        (
            e.get("train_iters")
            for e in reversed(cursor["events"])
            if e.get("event") == "start" and e.get("train_iters")
        ),
        None,
    )
    step = trains[-1]["step"] if trains else 0
    progress = min(1.0, step / total) if total else 0.0
    state = st.state if st.state != "none" else f"no run in {exp} yet"
    parts = [f"**{state}**" + (f" — {st.message}" if st.message else "")]
    if trains:
        last = trains[-1]
        eta = last.get("eta")
        parts.append(
            f"step {step}"
            + (f" / {total}" if total else "")
            + f", loss {last.get('loss'):.4f}"
            + (f", ETA {eta:.0f} s" if isinstance(eta, (int, float)) else "")
        )
    vals = [e for e in cursor["events"] if e.get("event") == "validation"]
    if vals:
        parts.append(f"validation loss {vals[-1].get('loss'):.4f} (step {vals[-1]['step']})")
    tests = [e for e in cursor["events"] if e.get("event") == "test"]
    if tests and isinstance(tests[-1].get("loss"), (int, float)):
        parts.append(f"test loss {tests[-1]['loss']:.4f} ({tests[-1].get('batches')} batches)")
    ckpts = [e for e in cursor["events"] if e.get("event") == "checkpoint"]
    if ckpts:
        parts.append(f"last checkpoint: `{ckpts[-1].get('path')}`")
    if st.state == "failed":
        parts.append(f"✗ {st.message}")
    log = jobs.tail(exp / jobs.LOG_FILE, 60)
    if st.running and st.phase == "prepare":  # prepare inside Launch: its progress bar and ETA from the log
        from studio.learned import tqdm_progress

        parts.insert(1, tqdm_progress(log) or "preparing the dataset")
    return RunView(fig, log, " · ".join(parts), progress, st.running, cursor)


def past_runs(runs_dir: str) -> list[str]:
    from studio import jobs

    return jobs.list_runs(runs_dir)


# =============================================================================================== chat tab

_models: dict[tuple, Any] = {}


def chat_models(runs_dir: str) -> list[str]:
    """The base tiny model, then every export under the runs dir (HF model directories: full finetuning and LoRA's
    merged export; LoRA adapter directories ``export/<name>/adapter``) and every complete checkpoint, newest first:
    a stopped run has checkpoints but no export yet, and can still be tried."""
    found = []
    root = Path(runs_dir or "runs")
    if root.is_dir():
        for cfg in [*root.glob("**/config.json"), *root.glob("**/adapter_config.json")]:
            d = cfg.parent
            if any(d.glob("*.safetensors")) or any(d.glob("*.bin")):
                found.append(d)
        found += [marker.parent for marker in root.glob("**/checkpoints/step_*/COMPLETE")]
    found.sort(key=lambda d: d.stat().st_mtime, reverse=True)
    return [str(TINY_MODEL)] + [str(d) for d in found]


def get_model(path: str):
    """(model, tokenizer) for a model dir, loaded once per (path, mtime); imports torch/transformers lazily.
    A LoRA adapter dir loads its base (adapter_config.json's base_model_name_or_path) with the adapter on top."""

    def load(path):
        from backend.lora import load_for_inference

        if not (Path(path) / "config.json").exists() and not (Path(path) / "adapter_config.json").exists():
            from backend.inference import load_checkpoint_model  # a checkpoint: base config + its weights

            return load_checkpoint_model(path)
        model = load_for_inference(path)
        model.eval()
        tok_dir = path if (Path(path) / "tokenizer_config.json").exists() else str(TINY_MODEL)
        return model, get_tokenizer(tok_dir)

    return _load_once(_models, path, "model", load)


def chat_stream(
    model_path: str,
    history: list[dict],
    message: str,
    template_text: str = "",
    max_new_tokens: int = 64,
    temperature: float = 0.0,
):
    """Yield the growing assistant reply for ``message`` after ``history`` (OpenAI-style message dicts).

    Uses the same chat template as the Data tab (``template_text``, or the tokenizer's own) with
    add_generation_prompt, and transformers' TextIteratorStreamer in a thread.
    """
    from backend.chat import render_messages, resolve_template

    model, tok = get_model(model_path)
    from transformers import TextIteratorStreamer

    messages = [{"role": m["role"], "content": _text_of(m["content"])} for m in history or []]
    messages.append({"role": "user", "content": message})
    template = resolve_template(tok, _template_arg(template_text, tok))
    prompt = render_messages(messages, tok, template, add_generation_prompt=True)
    enc = tok(prompt, add_special_tokens=not (tok.bos_token and prompt.startswith(tok.bos_token)), return_tensors="pt")
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    from backend.chat import eot_token_ids

    kwargs = dict(
        **enc,
        max_new_tokens=int(max_new_tokens),
        streamer=streamer,
        use_cache=True,
        eos_token_id=eot_token_ids(tok, template) or None,
        pad_token_id=tok.pad_token_id or 0,
    )
    if temperature and temperature > 0:
        kwargs.update(do_sample=True, temperature=float(temperature))
    else:
        kwargs.update(do_sample=False)
    thread = threading.Thread(target=model.generate, kwargs=kwargs, daemon=True)
    thread.start()
    reply = ""
    for piece in streamer:
        reply += piece
        yield reply
    thread.join()


def _text_of(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # gradio 6 message content may be a list of parts
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    if isinstance(content, dict):
        return str(content.get("text", ""))
    return str(content)
