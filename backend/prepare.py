"""Tokenize a conversation dataset into the memory-mapped token store that training reads.

    python -m backend.prepare PREPARE.yaml [key=value ...] [--validate] [--force]

    >>> import tempfile
    >>> from backend.config import load_prepare_config
    >>> out = tempfile.mkdtemp() + "/data"
    >>> summary = prepare(load_prepare_config("assets/configs/tiny_prepare.yaml", [f"output_path={out}"]))
    preparing assets/data/sample_sharegpt.jsonl: 3000 rows, form conversations ('conversations')
    ...
    >>> summary["splits"]["training"]["num_documents"], summary["skipped"]
    (2850, {})
    >>> prepare(load_prepare_config("assets/configs/tiny_prepare.yaml", [f"output_path={out}"]))["status"]
    /...: already prepared, nothing to do (config hash ...)
    'already_prepared'

Input and forms: `backend.sources` (a hub id, a ``save_to_disk`` directory, a folder of data files, files or
globs; forms ``spans`` (guide: text + loss_masking_spans), ``chat`` (conversations / messages), ``text``).
Rows to documents, bad rows and span repair: `backend.documents` (the same per-row code path the studio's
preview calls). Bad rows are skipped or repaired, never fatal, and every input row is accounted for
(``written + skipped == input rows`` in ``prepare_report.json``). A prepare never succeeds with nothing: zero
documents from a non-empty input is a `NothingPreparedError` (exit status 2) that lists the skip reasons, and a
skipped share above ``report.max_skipped_share`` puts a warning at the top of the summary and in the report.

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
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from backend.dataset import ShardWriter, TokenDataset, descriptor_name
from backend.documents import (  # noqa: F401  (repair_spans and the _-names: re-exported for older callers)
    CHUNK_ROWS,
    SKIP_REASONS,
    _ChunkResult,
    _clean_trained_spans,
    _init_worker,
    _Job,
    _load_tokenizer,
    _process_chunk,
    _run_chunks,
    check_template,
    make_job,
    open_rows,
    repair_spans,
)
from backend.sources import (  # noqa: F401  (re-exported: where prepare's source reading used to live)
    BUILDERS,
    JSONL_SUFFIXES,
    PrepareError,
    _input_files,
    input_fingerprint,
    open_source,
)
from backend.sources import BadRow as _BadRow  # noqa: F401
from backend.sources import HFSource as _HFSource  # noqa: F401
from backend.sources import JsonlSource as _JsonlSource  # noqa: F401
from backend.sources import detect_form as _detect_form  # noqa: F401

if TYPE_CHECKING:
    from backend.config import PrepareConfig

__all__ = ["prepare", "PrepareError", "NothingPreparedError", "repair_spans", "split_assignment", "main"]


class NothingPreparedError(PrepareError):
    """Every row of a non-empty input was skipped: nothing is written, the message lists why (exit status 2)."""


def _print(*args):
    print(*args, flush=True)


# ---------------------------------------------------------------------------------------------- splitting
def split_assignment(n_rows: int, splits: dict[str, float], seed: int) -> np.ndarray:
    """(n_rows,) uint8 index into ``list(splits)``: a seeded permutation cut by largest remainder.

    >>> split_assignment(10, {"training": 0.8, "validation": 0.2}, seed=0)
    array([0, 1, 0, 0, 0, 0, 0, 0, 1, 0], dtype=uint8)
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


def _skipped_warning(skipped_rows: int, n_rows: int, skipped: dict, max_share: float) -> str | None:
    """The loud line for a summary whose skipped share passes ``report.max_skipped_share``, else None.

    >>> _skipped_warning(3, 10, {"bad_conversation": 3}, 0.05)
    'WARNING: 3 of 10 input rows skipped (30.0%, more than report.max_skipped_share 5.0%): bad_conversation 3'
    >>> _skipped_warning(0, 10, {}, 0.05) is None
    True
    """
    if not n_rows or skipped_rows / n_rows <= max_share:
        return None
    reasons = ", ".join(f"{code} {count}" for code, count in sorted(skipped.items(), key=lambda kv: -kv[1]))
    return (
        f"WARNING: {skipped_rows} of {n_rows} input rows skipped ({skipped_rows / n_rows:.1%}, more than "
        f"report.max_skipped_share {max_share:.1%}): {reasons}"
    )


def _nothing_prepared(n_rows: int, where: str, skipped: dict, examples: dict) -> NothingPreparedError:
    """The error for a non-empty input that gave no document: every skip reason with its example rows."""
    lines = [f"{where}: {n_rows} input rows -> 0 documents; nothing was written. Rows were skipped for:"]
    for code, count in skipped.items():
        lines.append(f"  {code}: {count} row(s)")
        lines.extend(f"      row {e['row']} ({e['where']}): {e['message']}" for e in examples.get(code, []))
    return NothingPreparedError("\n".join(lines))


def _summary_lines(summary: dict) -> list[str]:
    lines = [summary["skipped_warning"]] if summary.get("skipped_warning") else []
    lines += [
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
    pr = summary.get("pairs")
    if pr:
        long, once = pr["longer_than_sequence_length"], pr.get("longer_with_shared_prompt")
        lines.append(
            f"  preference pairs: {pr['pairs']} written (two documents each, chosen then rejected), "
            f"{pr['identical_answers']} skipped with identical answers"
            + (
                f", {long} longer than {pr['sequence_length']} tokens together (skipped in training; {once} with "
                "the prompt placed once, training.dpo.share_prompt)"
                if long
                else ""
            )
        )
    appended = summary.get("appended_eot", {}).get("rows", 0)
    if appended:
        lines.append(
            f"  end-of-turn marker appended: {appended} row(s) whose final reply the template leaves open got its "
            "between-turns marker appended and trained (chat.final_eot: append; 'leave' keeps them open)"
        )
    rt = summary.get("reasoning_every_turn")
    if rt:
        lines.append(
            f"  chat.reasoning every_turn: {rt['conversations_split']} conversations whose template drops reasoning "
            f"-> {rt['documents']} documents (before split_turns), each reasoning turn trained once with the "
            "conversation before it as masked context"
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

    >>> import tempfile
    >>> s = prepare({"dataset": {"path": "assets/data/sample_sharegpt.jsonl"},
    ...              "tokenizer": {"path": "assets/tiny-llama"},
    ...              "output_path": tempfile.mkdtemp() + "/data"}, progress=False)
    preparing ...
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
    from backend.config import dump_yaml  # lazy: workers never need pydantic

    tokenizer = _load_tokenizer(cfg.tokenizer.path)
    source, n_rows, form, conv_field = open_rows(cfg)  # backend.sources: the reader the studio's preview uses too
    where = source.description or cfg.dataset.path
    check_template(cfg, tokenizer, form)
    if form == "text":
        _print(
            f"note: {where} has a {cfg.dataset.field!r} column but no loss_masking_spans and no conversations: "
            "every token is trained"
        )
    form_name = {
        "spans": "text + loss_masking_spans (guide)",
        "chat": f"conversations ({conv_field!r})",
        "pairs": "preference pairs (prompt / chosen / rejected)",
    }
    if form == "pairs" and (cfg.long_documents.mode != "keep" or cfg.chat.reasoning != "as_rendered"):
        _print(
            "note: preference pairs are written whole (prompt + each answer): long_documents.mode and "
            "chat.reasoning: every_turn do not apply to them"
        )
    _print(f"preparing {where}: {n_rows} rows, form {form_name.get(form, 'plain text')}")

    # the tokenizer (with the chat template the rows were rendered with) is saved next to the shards: training
    # exports it, so an export's template and stop tokens are the data's, not pretrained.path's
    info = {**tokenizer_info(tokenizer, cfg.tokenizer.path, cfg.chat.template), "saved": TOKENIZER_DIR}
    vocab = info["vocab_size"]
    names = list(cfg.splits)
    assign = split_assignment(n_rows, cfg.splits, cfg.seed)
    pairs = form == "pairs"
    writers = {
        name: ShardWriter(tmp, name, vocab, tokenizer_info=info, prepare_config_hash=digest, pairs=pairs)
        for name in names
    }
    job = make_job(cfg, source, form, conv_field, vocab)  # backend.documents: the per-row work
    workers = max(1, cfg.tokenize_workers)
    if workers > (os.cpu_count() or 1):
        _print(f"note: tokenize_workers {workers} > {os.cpu_count()} CPUs here; using {os.cpu_count()}")
        workers = os.cpu_count() or 1
    if workers > 1:
        try:  # workers rebuild the tokenizer from this with `tokenizers` alone: no transformers import each
            job.tokenizer_spec = chat.portable_spec(tokenizer)
        except ValueError:
            pass  # a slow tokenizer: each worker loads it with transformers

    counts: dict[str, int] = {}  # rows per problem code (a row with three replies and one warning each counts once)
    last_row: dict[str, int] = {}  # a chunk lists a code's problems in row order
    examples: dict[str, list] = {}
    split_stats: dict[str, int] = {}
    skipped_rows = 0  # each row is skipped at most once (processing stops at its first fatal problem)
    appended_eot = 0  # rows whose final reply got the template's between-turns marker appended and trained
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
                if last_row.get(code) != r:
                    counts[code] = counts.get(code, 0) + 1
                    last_row[code] = r
                skipped_rows += bool(skipped)
                ex = examples.setdefault(code, [])
                if len(ex) < cfg.report.examples:
                    ex.append({"row": int(r), "where": source.where(r), "message": message})
            for k, v in chunk.split_stats.items():
                split_stats[k] = split_stats.get(k, 0) + v
            seen_rows += chunk.n_rows
            appended_eot += chunk.appended_eot
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
    lengths, pair_lengths, pair_shared = [], [], []
    for name in names:
        ds = TokenDataset(tmp / descriptor_name(name))
        lengths.append(ds.lengths)
        if ds.pairs is not None:
            from backend.preference import shared_prompt_lengths

            pair_lengths.append(ds.lengths[ds.pairs].sum(1))
            pair_shared.append(shared_prompt_lengths(ds))  # placed once in training (training.dpo.share_prompt)
        if len(ds) == 0 and cfg.splits[name] > 0:
            _print(f"warning: split {name!r} has no documents")
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    num_tokens = sum(c["num_tokens"] for c in split_counts.values())
    num_trained = sum(c["num_trained_tokens"] for c in split_counts.values())
    num_documents = sum(c["num_documents"] for c in split_counts.values())
    # rows: each conversation's documents (chat.reasoning: every_turn, then split_turns' pieces) count as its one row
    written = num_documents // 2 if pairs else num_documents  # a pair row is written as two documents
    written += -split_stats.get("pieces", 0) + split_stats.get("documents_split", 0)
    written += split_stats.get("reasoning_split", 0) - split_stats.get("reasoning_pieces", 0)
    skipped = {c: n for c, n in counts.items() if c in SKIP_REASONS}
    if num_documents == 0:
        raise _nothing_prepared(n_rows, where, skipped, examples)
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
        "appended_eot": {"rows": appended_eot, "final_eot": cfg.chat.final_eot},
        "splits": split_counts,
        "length_percentiles": _percentiles(lengths),
        "skipped": skipped,
        "skipped_share": skipped_rows / n_rows,
        "skipped_warning": _skipped_warning(skipped_rows, n_rows, skipped, cfg.report.max_skipped_share),
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
    if pairs:  # pairs written, skipped for identical answers, and too long for one row (a pair is packed whole)
        both = np.concatenate(pair_lengths) if pair_lengths else np.zeros(0, np.int64)
        once = both - (np.concatenate(pair_shared) if pair_shared else 0)
        summary["pairs"] = {
            "pairs": int(len(both)),
            "identical_answers": counts.get("identical_answers", 0),
            "longer_than_sequence_length": int((both > seq).sum()) if seq is not None else None,
            "longer_with_shared_prompt": int((once > seq).sum()) if seq is not None else None,
            "shared_prompt_tokens": int((both - once).sum()),
            "sequence_length": seq,
            "length_percentiles": _percentiles(both),
        }
    if cfg.long_documents.mode != "keep" and not pairs:
        summary["long_documents"] = {
            "mode": cfg.long_documents.mode,
            "sequence_length": cfg.long_documents.sequence_length,
            **{k: 0 for k in ("conversations_split", "documents_split", "pieces", "context_tokens")},
            "truncated_groups": 0,
            **{k: 0 for k in ("dropped_trained_tokens", "not_split")},
            **{k: v for k, v in split_stats.items() if not k.startswith("reasoning")},
        }
    if cfg.chat.reasoning == "every_turn":
        summary["reasoning_every_turn"] = {
            "conversations_split": split_stats.get("reasoning_split", 0),
            "documents": split_stats.get("reasoning_pieces", 0),
        }
    if written + skipped_rows != n_rows:
        raise PrepareError(f"internal error: {written} written + {skipped_rows} skipped != {n_rows} rows")
    (tmp / "prepare_report.json").write_text(json.dumps({"summary": summary, "tokenizer": info}, indent=2) + "\n")
    save_tokenizer(tokenizer, cfg.chat.template, tmp / TOKENIZER_DIR)
    (tmp / "prepare_config.yaml").write_text(dump_yaml(cfg))
    return summary


def main(cfg: PrepareConfig, force: bool = False) -> int:
    """`run_cli` entry: 0 on success; 2 when a non-empty input gave no document (the reasons are printed) or the
    chat template cannot write the data's tools; 1 with a one-paragraph message (no traceback) when preparation
    fails otherwise."""
    from backend.chat import RenderProofError, TemplateCapabilityError

    try:
        prepare(cfg, force=force)
    except NothingPreparedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TemplateCapabilityError as e:  # a config problem: the template cannot write this dataset
        print(f"error: chat.template: {e}", file=sys.stderr)
        return 2
    except (PrepareError, RenderProofError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from backend.cli import run_cli

    run_cli(sys.argv[1:], "prepare", main, __doc__)
