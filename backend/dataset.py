"""Memory-mapped token store: `ShardWriter` (used by prepare) and `TokenDataset` (used by train, studio, tests).

On disk, for an output directory ``out/`` and a split ``training``::

    out/fast_llm_config_training.yaml     descriptor (the file the guide's train config points at)
    out/training/shard_00000.tokens.npy   (N,) uint8|uint16|uint32  concatenated token ids of the shard
    out/training/shard_00000.trained.npy  (N,) bool                 True where the token is a training target
    out/training/shard_00000.index.npy    (D+1,) int64              document offsets into the shard

Example: two documents ``[1, 5, 7]`` (trained ``[F, T, T]``) and ``[1, 9]`` (trained ``[F, T]``) in one shard::

    tokens  = [1, 5, 7, 1, 9]
    trained = [F, T, T, F, T]
    index   = [0, 3, 5]

Every array is a plain ``.npy`` file, so ``np.load(path, mmap_mode="r")`` reads it without this module.
The writer streams: each array is appended to its file as documents arrive and the ``.npy`` header (which
numpy pads so that the shape can grow in place) is rewritten with the final length when the shard closes, so
memory stays flat whatever the dataset size.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import yaml

DESCRIPTOR_TYPE = "sft_studio_memmap"
FORMAT_VERSION = 1
DEFAULT_SHARD_TOKENS = 50_000_000


def descriptor_name(split: str) -> str:
    """``"training"`` -> ``"fast_llm_config_training.yaml"``."""
    return f"fast_llm_config_{split}.yaml"


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id of the vocabulary: 256 -> uint8, 512 -> uint16, 128256 -> uint32."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"vocab_size {vocab_size} does not fit in uint32")


class _NpyAppender:
    """A 1-D ``.npy`` file written by appending; the header is fixed up with the final length on close."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.length = 0
        self._file = open(self.path, "wb")
        self._header_len = self._write_header(0)

    def _header(self, length: int) -> dict:
        return {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (length,)}

    def _write_header(self, length: int) -> int:
        np.lib.format.write_array_header_1_0(self._file, self._header(length))
        return self._file.tell()

    def append(self, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values, dtype=self.dtype)
        self._file.write(values.tobytes())
        self.length += values.size

    def close(self) -> None:
        self._file.flush()
        self._file.seek(0)
        # numpy pads the header with room for 21 shape digits, so the final header has the same size.
        if self._write_header(self.length) != self._header_len:
            raise RuntimeError(f"{self.path}: .npy header changed size; cannot finalize in place")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


class ShardWriter:
    """Streams documents of one split to ``dir/split/shard_*.npy`` and writes ``dir/fast_llm_config_<split>.yaml``.

    >>> import tempfile
    >>> out = tempfile.mkdtemp()
    >>> w = ShardWriter(out, "training", vocab_size=512, prepare_config_hash="ab12")
    >>> w.add(np.array([1, 5, 7]), np.array([False, True, True]))
    >>> counts = w.close()
    >>> {k: counts[k] for k in ("num_documents", "num_tokens", "num_trained_tokens", "num_shards", "token_dtype")}
    {'num_documents': 1, 'num_tokens': 3, 'num_trained_tokens': 2, 'num_shards': 1, 'token_dtype': 'uint16'}

    A document never straddles two shards: a new shard starts when the next document would push the current
    one past ``shard_tokens`` (a single document longer than that gets a shard of its own).
    """

    def __init__(
        self,
        dir,
        split: str,
        vocab_size: int,
        shard_tokens: int = DEFAULT_SHARD_TOKENS,
        tokenizer_info: dict | None = None,
        prepare_config_hash: str | None = None,
        pairs: bool = False,
    ):
        self.root = Path(dir)
        self.pairs = bool(pairs)  # preference data: documents 2k, 2k+1 are pair k's chosen and rejected answers
        self.split = split
        self.vocab_size = int(vocab_size)
        self.dtype = token_dtype(self.vocab_size)
        self.shard_tokens = int(shard_tokens)
        self.tokenizer_info = dict(tokenizer_info or {})
        self.prepare_config_hash = prepare_config_hash
        self.split_dir = self.root / split
        self.split_dir.mkdir(parents=True, exist_ok=True)
        self.num_documents = 0
        self.num_tokens = 0
        self.num_trained_tokens = 0
        self.num_shards = 0
        self._shard = None  # (tokens, trained, index) appenders of the open shard
        self._shard_len = 0
        self._closed = False

    def _open_shard(self) -> None:
        stem = self.split_dir / f"shard_{self.num_shards:05d}"
        self._shard = (
            _NpyAppender(Path(f"{stem}.tokens.npy"), self.dtype),
            _NpyAppender(Path(f"{stem}.trained.npy"), np.bool_),
            _NpyAppender(Path(f"{stem}.index.npy"), np.int64),
        )
        self._shard[2].append(np.zeros(1, np.int64))
        self._shard_len = 0
        self.num_shards += 1

    def _close_shard(self) -> None:
        if self._shard is not None:
            for appender in self._shard:
                appender.close()
            self._shard = None

    def add(self, tokens, trained) -> None:
        """Append one document: ``tokens`` (T,) ints in ``[0, vocab_size)``, ``trained`` (T,) bool."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 1:
            raise ValueError(f"tokens {tokens.shape} must be 1-D")
        if tokens.size == 0:
            raise ValueError("empty document: prepare skips these before writing")
        self.add_batch(tokens, trained, np.array([0, tokens.size], np.int64))

    def add_batch(self, tokens, trained, bounds) -> None:
        """Append documents given as flat arrays: document j is ``tokens[bounds[j]:bounds[j+1]]``.

        Whole runs of documents go to the open shard in one write each; a new shard starts where the next
        document would overflow it."""
        if self._closed:
            raise RuntimeError("ShardWriter.add after close()")
        tokens = np.asarray(tokens)
        trained = np.asarray(trained, dtype=np.bool_)
        bounds = np.asarray(bounds, dtype=np.int64)
        if tokens.ndim != 1 or tokens.shape != trained.shape:
            raise ValueError(f"tokens {tokens.shape} and trained {trained.shape} must be 1-D of the same length")
        if bounds.ndim != 1 or bounds.size < 1 or bounds[0] != 0 or bounds[-1] != tokens.size:
            raise ValueError(f"bounds must run from 0 to {tokens.size}")
        lengths = np.diff(bounds)
        if lengths.size == 0:
            return
        if (lengths <= 0).any():
            raise ValueError("empty document: prepare skips these before writing")
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= self.vocab_size:
            raise ValueError(f"token id out of range [0, {self.vocab_size}): min {low}, max {high}")
        d = 0
        while d < lengths.size:
            if self._shard is None:
                self._open_shard()
            room = self.shard_tokens - self._shard_len
            # documents d..k-1 fit in the open shard: the largest k with bounds[k] - bounds[d] <= room
            k = int(np.searchsorted(bounds, bounds[d] + room, side="right")) - 1
            if k <= d:
                if self._shard_len > 0:  # the next document does not fit: it starts a new shard
                    self._close_shard()
                    continue
                k = d + 1  # a document longer than a shard gets a shard of its own
            a, z = int(bounds[d]), int(bounds[k])
            tok_file, trained_file, index_file = self._shard
            tok_file.append(tokens[a:z])
            trained_file.append(trained[a:z])
            index_file.append(self._shard_len + bounds[d + 1 : k + 1] - a)
            self._shard_len += z - a
            d = k
        self.num_documents += int(lengths.size)
        self.num_tokens += int(tokens.size)
        self.num_trained_tokens += int(trained.sum())

    def counts(self) -> dict:
        return {
            "num_documents": self.num_documents,
            "num_tokens": self.num_tokens,
            "num_trained_tokens": self.num_trained_tokens,
            "num_shards": self.num_shards,
            "token_dtype": self.dtype.name,
            "vocab_size": self.vocab_size,
        }

    def close(self) -> dict:
        """Finalize the open shard, write the descriptor YAML, return the counts."""
        if self._closed:
            return self.counts()
        self._close_shard()
        self._closed = True
        extra = {}
        if self.pairs:  # the pair index: (P, 2) document ids of each pair's chosen and rejected answer
            if self.num_documents % 2:
                raise ValueError(f"preference split {self.split!r}: {self.num_documents} documents, not pairs")
            np.save(self.split_dir / "pairs.npy", np.arange(self.num_documents, dtype=np.int64).reshape(-1, 2))
            extra = {"kind": "preference", "num_pairs": self.num_documents // 2}
        descriptor = {
            "type": DESCRIPTOR_TYPE,
            "version": FORMAT_VERSION,
            "path": self.split,
            **self.counts(),
            **extra,
            "tokenizer": self.tokenizer_info,
            "prepare_config_hash": self.prepare_config_hash,
        }
        path = self.root / descriptor_name(self.split)
        tmp = path.with_suffix(".yaml.tmp")
        tmp.write_text(yaml.safe_dump(descriptor, sort_keys=False))
        os.replace(tmp, path)
        return self.counts()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class DatasetNotFoundError(FileNotFoundError):
    """The path is not a prepared dataset (no descriptor YAML, or shards missing)."""


def _not_prepared(path, why: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"{path}: not a prepared dataset ({why}). Run `python -m backend.prepare PREPARE.yaml` "
        f"with output_path pointing there first."
    )


def resolve_descriptor(descriptor_path_or_dir, split: str = "training") -> Path:
    """``out/`` or ``out/fast_llm_config_training.yaml`` -> the descriptor path (checked to exist)."""
    path = Path(descriptor_path_or_dir)
    if path.is_dir():
        candidate = path / descriptor_name(split)
        if not candidate.is_file():
            found = sorted(p.name for p in path.glob("fast_llm_config_*.yaml"))
            why = f"no {descriptor_name(split)}" + (f"; found {', '.join(found)}" if found else "")
            raise _not_prepared(path, why)
        return candidate
    if path.is_file():
        return path
    raise _not_prepared(path, "path does not exist")


class TokenDataset:
    """Read-only, memory-mapped view of one split written by `ShardWriter`.

    >>> import tempfile
    >>> out = tempfile.mkdtemp()
    >>> w = ShardWriter(out, "training", vocab_size=512)
    >>> w.add(np.array([1, 5, 7]), np.array([False, True, True])); w.add(np.array([2, 9]), np.array([False, True]))
    >>> _ = w.close()
    >>> ds = TokenDataset(out + "/fast_llm_config_training.yaml")   # or the directory and the split name
    >>> len(ds), ds.lengths.tolist()
    (2, [3, 2])
    >>> tokens, trained = ds.document(0)     # (3,) int64, (3,) bool
    >>> tokens.tolist(), trained.tolist()
    ([1, 5, 7], [False, True, True])
    """

    def __init__(self, descriptor_path_or_dir, split: str = "training"):
        self.descriptor_path = resolve_descriptor(descriptor_path_or_dir, split)
        try:
            meta = yaml.safe_load(self.descriptor_path.read_text())
        except yaml.YAMLError as e:
            raise _not_prepared(self.descriptor_path, f"unreadable YAML: {e}") from None
        if not isinstance(meta, dict) or meta.get("type") != DESCRIPTOR_TYPE:
            raise _not_prepared(self.descriptor_path, f"descriptor 'type' is not {DESCRIPTOR_TYPE!r}")
        if meta.get("version") != FORMAT_VERSION:
            raise _not_prepared(
                self.descriptor_path, f"format version {meta.get('version')}, expected {FORMAT_VERSION}"
            )
        self.meta = meta
        self.split = str(meta["path"])
        self.root = self.descriptor_path.parent
        split_dir = self.root / self.split
        self.vocab_size = int(meta["vocab_size"])
        self.num_tokens = int(meta["num_tokens"])
        self.num_trained_tokens = int(meta["num_trained_tokens"])
        self.tokenizer_info = dict(meta.get("tokenizer") or {})
        self.prepare_config_hash = meta.get("prepare_config_hash")

        self._tokens, self._trained, lengths, doc_counts = [], [], [], []
        for s in range(int(meta["num_shards"])):
            stem = split_dir / f"shard_{s:05d}"
            try:
                tokens = np.load(f"{stem}.tokens.npy", mmap_mode="r")
                trained = np.load(f"{stem}.trained.npy", mmap_mode="r")
                index = np.load(f"{stem}.index.npy")  # (D+1,) small: 8 bytes per document
            except (FileNotFoundError, ValueError) as e:
                raise _not_prepared(self.descriptor_path, f"shard {stem.name} unreadable: {e}") from None
            if tokens.shape != trained.shape or index[-1] != tokens.shape[0]:
                raise _not_prepared(self.descriptor_path, f"shard {stem.name} is inconsistent (truncated write?)")
            self._tokens.append(tokens)
            self._trained.append(trained)
            lengths.append(np.diff(index))
            doc_counts.append(len(index) - 1)
        self._offsets = [np.concatenate([[0], np.cumsum(n)]) if len(n) else np.zeros(1, np.int64) for n in lengths]
        self.lengths = np.concatenate(lengths).astype(np.int64) if lengths else np.zeros(0, np.int64)
        self._shard_start = np.concatenate([[0], np.cumsum(doc_counts)]).astype(np.int64)
        if len(self.lengths) != int(meta["num_documents"]) or int(self.lengths.sum()) != self.num_tokens:
            raise _not_prepared(self.descriptor_path, "document/token counts do not match the shards")
        self.pairs = None  # preference data: (P, 2) int64 document ids (chosen, rejected) of each pair
        if meta.get("kind") == "preference":
            try:
                self.pairs = np.load(split_dir / "pairs.npy")
            except (FileNotFoundError, ValueError) as e:
                raise _not_prepared(self.descriptor_path, f"pair index unreadable: {e}") from None
            if (
                self.pairs.ndim != 2
                or self.pairs.shape != (int(meta.get("num_pairs", -1)), 2)
                or (self.pairs.size and not (0 <= self.pairs.min() and self.pairs.max() < len(self.lengths)))
            ):
                raise _not_prepared(self.descriptor_path, "pair index does not match the documents")

    def __len__(self) -> int:
        return len(self.lengths)

    def document(self, i: int, begin: int = 0, end: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Tokens ``(T,) int64`` and trained mask ``(T,) bool`` of document ``i``.

        ``begin``/``end`` select its ``[begin, end)`` slice."""
        n = len(self.lengths)
        if not -n <= i < n:
            raise IndexError(f"document {i} out of range for {n} documents")
        i = int(i) % n
        shard = int(np.searchsorted(self._shard_start, i, side="right") - 1)
        local = i - self._shard_start[shard]
        start = int(self._offsets[shard][local])
        length = int(self.lengths[i])
        end = length if end is None else min(int(end), length)
        begin = max(0, int(begin))
        lo, hi = start + begin, start + max(begin, end)
        return (
            np.asarray(self._tokens[shard][lo:hi], dtype=np.int64),
            np.asarray(self._trained[shard][lo:hi], dtype=np.bool_),
        )

    def __iter__(self):
        for i in range(len(self)):
            yield self.document(i)

    def __repr__(self) -> str:
        return (
            f"TokenDataset({str(self.descriptor_path)!r}: {len(self)} documents, {self.num_tokens} tokens, "
            f"{self.num_trained_tokens} trained)"
        )


class EveryTokenTrained:
    """A split read with every token marked trained: ``data.sampling.use_loss_masking_spans: no``.

    The prepared mask is ignored (the guide's meaning: train on the whole text, prompts included); collate still
    never makes the first token of a document (its predictor is another document) or padding a target.
    Everything else (lengths, counts, descriptor) is the wrapped dataset's.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __getattr__(self, name):
        return getattr(self.dataset, name)

    def __len__(self) -> int:
        return len(self.dataset)

    def document(self, i: int, begin: int = 0, end: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        tokens, _ = self.dataset.document(i, begin, end)
        return tokens, np.ones(len(tokens), dtype=np.bool_)
