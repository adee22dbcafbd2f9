"""Tokenization and masks: text + trained character spans -> token ids + per-token trained mask.

Part of `backend.chat` (import from there): `tokenize`, `tokenize_batch` (one batched fast-tokenizer call; the
mask from char->token lookups at span edges), `PortableTokenizer` for worker processes, and the per-tokenizer
facts (`_info`) the other parts share.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np


class TokenizedSample:
    """Token ids + per-token trained mask of one text. ``offsets`` ((T, 2) int64 char offsets into the text,
    (0, 0) for an added BOS) are built on first use when the sample came from the fast path of
    `tokenize_batch`/prepare, which computes the mask without materializing them."""

    __slots__ = ("input_ids", "trained", "_offsets", "_encoding", "_bos_added")

    def __init__(
        self,
        input_ids: np.ndarray,
        trained: np.ndarray,
        offsets: np.ndarray | None = None,
        *,
        encoding=None,
        bos_added: bool = False,
    ):
        if offsets is None and encoding is None:
            raise ValueError("TokenizedSample needs offsets or the tokenizers Encoding they come from")
        self.input_ids = input_ids  # (T,) int64, BOS exactly once, never doubled
        self.trained = trained  # (T,) bool: this token is a training TARGET (a label), before shifting
        self._offsets = offsets
        self._encoding = encoding
        self._bos_added = bos_added

    @property
    def offsets(self) -> np.ndarray:
        if self._offsets is None:
            off = np.asarray(self._encoding.offsets, dtype=np.int64).reshape(-1, 2)
            if self._bos_added:
                off = np.concatenate([np.zeros((1, 2), np.int64), off])
            self._offsets = off
        return self._offsets

    @property
    def n_trained(self) -> int:
        return int(self.trained.sum())

    def __repr__(self):
        return f"TokenizedSample({len(self.input_ids)} tokens, {self.n_trained} trained)"


# ------------------------------------------------------------------------------------ per-tokenizer facts
_info_cache: weakref.WeakKeyDictionary[Any, dict] = weakref.WeakKeyDictionary()


def _info(tokenizer) -> dict:
    """Facts about a tokenizer computed once: special-token regex, template kwargs, whether it adds BOS."""
    try:
        info = _info_cache.get(tokenizer)
    except TypeError:
        info = None
    if info is not None:
        return info
    specials = set(tokenizer.all_special_tokens)
    for tok in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(tok, "special", False):
            specials.add(str(tok.content if hasattr(tok, "content") else tok))
    specials.discard("")
    specials_sorted = sorted(specials, key=len, reverse=True)  # longest first: '<|eot_id|>' before '<|e'
    regex = re.compile("|".join(re.escape(s) for s in specials_sorted)) if specials_sorted else None
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    bos_id = tokenizer.bos_token_id
    adds_bos = bos_id is not None and len(with_special) > len(without) and with_special[0] == bos_id
    kwargs = dict(tokenizer.special_tokens_map)
    info = {
        "specials": specials_sorted,
        "regex": regex,
        "adds_bos": adds_bos,
        "bos": tokenizer.bos_token,
        "bos_id": bos_id,
        "kwargs": kwargs,
    }
    try:
        _info_cache[tokenizer] = info
    except TypeError:
        pass
    return info


# ----------------------------------------------------------------------------------------------- tokenize
def _mask_from_offsets(offsets: np.ndarray, trained_spans) -> np.ndarray:
    """(T, 2) offsets + sorted disjoint half-open spans -> (T,) bool: token overlaps a trained span."""
    if len(trained_spans) == 0 or len(offsets) == 0:
        return np.zeros(len(offsets), dtype=bool)
    spans = np.asarray(trained_spans, dtype=np.int64).reshape(-1, 2)
    starts, ends = offsets[:, 0], offsets[:, 1]
    # first span whose end is after the token's start; overlap iff that span begins before the token ends
    idx = np.searchsorted(spans[:, 1], starts, side="right")
    ok = idx < len(spans)
    idx_c = np.minimum(idx, len(spans) - 1)
    return ok & (spans[idx_c, 0] < ends) & (ends > starts)


def _finish(text: str, ids, offsets, trained_spans, info) -> TokenizedSample:
    ids = np.asarray(ids, dtype=np.int64)
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    if info["adds_bos"] and not (info["bos"] and text.startswith(info["bos"])):
        ids = np.concatenate([np.array([info["bos_id"]], dtype=np.int64), ids])
        offsets = np.concatenate([np.zeros((1, 2), dtype=np.int64), offsets])
    return TokenizedSample(input_ids=ids, trained=_mask_from_offsets(offsets, trained_spans), offsets=offsets)


def tokenize(text: str, trained_spans, tokenizer) -> TokenizedSample:
    """Text + half-open trained character spans -> token ids and per-token trained mask (see module docstring)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return _finish(text, enc["input_ids"], enc["offset_mapping"], sorted(trained_spans), _info(tokenizer))


def _fast_backend(tokenizer):
    """The Rust ``tokenizers.Tokenizer`` behind a fast tokenizer, when calling it directly gives exactly what
    ``tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)`` gives (no truncation or padding
    configured, same special-token splitting); else None. Skips transformers' per-sample dict building."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch"):
        return None
    try:
        if backend.truncation is not None or backend.padding is not None:
            return None
        if bool(backend.encode_special_tokens) != bool(getattr(tokenizer, "split_special_tokens", False)):
            return None
    except AttributeError:
        return None
    return backend


def tokenize_batch(texts: list[str], spans_list, tokenizer) -> list[TokenizedSample]:
    """`tokenize` for many texts with one batched (parallel, Rust) tokenizer call.

    The whole batch is converted to numpy at once; the per-sample Python work is a handful of operations, not
    one per token. With a fast tokenizer the mask comes from the encodings' char -> token lookups at the span
    edges (see `_char_lookup_ok`), and each sample's offsets are only built if something reads them.
    """
    texts = list(texts)
    spans_list = list(spans_list)
    if len(texts) != len(spans_list):
        raise ValueError(f"tokenize_batch: {len(texts)} texts but {len(spans_list)} span lists")
    if not texts:
        return []
    return _tokenize_flat(texts, spans_list, tokenizer).samples()


@dataclass
class _Flat:
    """A tokenized batch as flat arrays: sample j is ``[bounds[j], bounds[j+1])``."""

    ids: np.ndarray  # (N,) int64
    trained: np.ndarray  # (N,) bool
    bounds: np.ndarray  # (n+1,) int64
    offsets: np.ndarray | None  # (N, 2) int64, or None when the encodings are kept instead
    encodings: list | None
    bos_added: np.ndarray  # (n,) bool

    def samples(self, which=None) -> list[TokenizedSample]:
        """Samples ``which`` (default all), as views of the flat arrays."""
        cuts = self.bounds.tolist()
        which = range(len(cuts) - 1) if which is None else which
        ids, trained = self.ids, self.trained
        if self.offsets is not None:
            off = self.offsets
            return [
                TokenizedSample(ids[cuts[j] : cuts[j + 1]], trained[cuts[j] : cuts[j + 1]], off[cuts[j] : cuts[j + 1]])
                for j in which
            ]
        encs, added = self.encodings, self.bos_added.tolist()
        return [
            TokenizedSample(
                ids[cuts[j] : cuts[j + 1]], trained[cuts[j] : cuts[j + 1]], encoding=encs[j], bos_added=added[j]
            )
            for j in which
        ]


def _token_range(enc, b: int, e: int, n: int):
    """Tokens overlapping chars ``[b, e)`` as ``(lo, hi)`` from an Encoding's char lookups, or None when a
    char is covered by no token (then the caller uses the offsets). Valid for tokenizers whose offsets are
    monotone (checked once per tokenizer by `_char_lookup_ok`)."""
    lo = enc.char_to_token(b)
    last = enc.char_to_token(e - 1)
    if lo is None or last is None:
        return None
    hi = last + 1
    while hi < n:  # the byte-fallback pieces of one character all carry its offsets
        c = enc.token_to_chars(hi)
        if c is None or c[0] >= e or c[1] <= c[0]:
            break
        hi += 1
    return lo, hi


_PROBE = (
    "Hello  world,\tthe end.\n\n  Ünïcödé «ok» — 日本語のテキスト, emoji 👋🏽🧑‍🚀 x\u0301 \r\n"
    "```py\ndef f(x):\n    return x**2\n```   trailing   \n"
)


def _char_lookup_ok(tokenizer, backend) -> bool:
    """Whether `_token_range` gives exactly the offsets rule for this tokenizer.

    It does for an encoding whose token starts and ends are both non-decreasing and whose tokens all have
    positive width: the tokens overlapping ``[b, e)`` are then one run, from the first token containing ``b``
    through the last containing ``e - 1`` (a char no token covers makes the lookup return None and the sample
    falls back to its offsets). Checked once per tokenizer on probe texts (scripts, emoji, combining marks,
    whitespace runs, code, the special tokens), plus direct comparisons on spans of the probe; a tokenizer
    that fails keeps the offsets path."""
    info = _info(tokenizer)
    ok = info.get("char_lookup")
    if ok is not None:
        return ok
    ok = True
    try:
        specials = info["specials"][:4]
        texts = [_PROBE] + [s + _PROBE + s + _PROBE[:40] + s for s in specials]
        for text, enc in zip(texts, backend.encode_batch(texts, add_special_tokens=False), strict=False):
            off = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
            n = len(off)
            if n == 0 or (np.diff(off, axis=0) < 0).any() or (off[:, 1] <= off[:, 0]).any():
                raise ValueError("offsets are not monotone with positive widths")
            for b in range(0, len(text), 7):
                for e in (b + 1, b + 2, b + 5, b + 13):
                    e = min(e, len(text))
                    r = _token_range(enc, b, e, n)
                    if r is None:
                        continue  # uncovered char: such a sample takes its offsets anyway
                    got = np.zeros(n, dtype=bool)
                    got[r[0] : r[1]] = True
                    if not np.array_equal(got, _mask_from_offsets(off, [(b, e)])):
                        raise ValueError(f"lookup differs from offsets on chars {b}..{e}")
    except Exception:
        ok = False
    info["char_lookup"] = ok
    return ok


def _tokenize_flat(texts: list[str], spans_list, tokenizer, offsets: bool = False) -> _Flat:
    """Tokenize a batch into flat arrays (see `_Flat`). ``offsets=True`` materializes every offset (else
    they are kept in the encodings and the mask is built from char lookups when the tokenizer allows)."""
    n = len(texts)
    info = _info(tokenizer)
    backend = _fast_backend(tokenizer)
    encs = None
    if backend is not None:
        encs = backend.encode_batch(texts, add_special_tokens=False)
        ids_lists = [e.ids for e in encs]
        lookup = not offsets and _char_lookup_ok(tokenizer, backend)
        off_lists = None if lookup else [e.offsets for e in encs]
    else:
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        ids_lists, off_lists = enc["input_ids"], enc["offset_mapping"]
        lookup = False
    lengths = np.fromiter(map(len, ids_lists), dtype=np.int64, count=n)
    total = int(lengths.sum())
    ids = np.fromiter(chain.from_iterable(ids_lists), dtype=np.int64, count=total)
    offs = None
    if off_lists is not None:
        offs = np.fromiter(
            chain.from_iterable(chain.from_iterable(off_lists)), dtype=np.int64, count=2 * total
        ).reshape(total, 2)
    needs = np.zeros(n, dtype=bool)
    if info["adds_bos"]:
        bos = info["bos"]
        needs = np.fromiter((not (bos and t.startswith(bos)) for t in texts), dtype=bool, count=n)
        if needs.any():
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])[needs]
            ids = np.insert(ids, starts, info["bos_id"])
            if offs is not None:
                offs = np.insert(offs, starts, 0, axis=0)  # (0, 0): zero-width, never trained
            lengths = lengths + needs
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    if lookup:
        trained = _mask_by_lookup(texts, spans_list, encs, bounds, needs, info)
        return _Flat(ids, trained, bounds, None, encs, needs)
    # batch coordinates: sample i's characters live at [base[i], base[i] + len(text_i)); spans and offsets
    # shifted by base stay sorted and disjoint across samples, so one searchsorted gives every mask
    text_lens = np.fromiter(map(len, texts), dtype=np.int64, count=n)
    base = np.concatenate([[0], np.cumsum(text_lens + 1)[:-1]])
    token_base = np.repeat(base, lengths)
    flat_spans = []
    for b, m, spans in zip(base.tolist(), text_lens.tolist(), spans_list, strict=False):
        if spans:  # clipped to the text: a span past its end must not reach into the next sample
            flat_spans.extend(
                (b + max(0, min(s, m)), b + max(0, min(e, m))) for s, e in (sorted(spans) if len(spans) > 1 else spans)
            )
    trained = _mask_from_offsets(offs + token_base[:, None], flat_spans)
    return _Flat(ids, trained, bounds, offs, None, needs)


def _mask_by_lookup(texts, spans_list, encs, bounds, bos_added, info) -> np.ndarray:
    """The offsets rule's mask from char -> token lookups at the span edges: O(spans) Python calls, no
    per-token objects. A sample with a char no token covers takes its own offsets instead."""
    total = int(bounds[-1])
    edges = np.zeros(total + 1, dtype=np.int32)  # +1 at a trained run's first token, -1 after its last
    lo_list, hi_list = [], []
    fallback = []
    cuts, added = bounds.tolist(), bos_added.tolist()  # Python ints: no numpy scalar per row
    for j, (text, spans, enc) in enumerate(zip(texts, spans_list, encs, strict=False)):
        if not spans:
            continue
        m = len(text)
        shift = cuts[j] + added[j]
        n_tok = cuts[j + 1] - shift
        ranges = []
        for s, e in sorted(spans) if len(spans) > 1 else spans:
            s, e = max(0, min(s, m)), max(0, min(e, m))
            if e <= s:
                continue
            r = _token_range(enc, s, e, n_tok)
            if r is None:
                break
            ranges.append(r)
        else:
            for lo, hi in ranges:
                if hi > lo:
                    lo_list.append(shift + lo)
                    hi_list.append(shift + hi)
            continue
        fallback.append(j)
    if lo_list:
        # runs of different spans may touch or share a token (a token straddling two spans): count, then > 0
        np.add.at(edges, np.asarray(lo_list), 1)
        np.add.at(edges, np.asarray(hi_list), -1)
    trained = np.cumsum(edges[:-1]) > 0
    for j in fallback:
        a = int(bounds[j]) + int(bos_added[j])
        off = np.asarray(encs[j].offsets, dtype=np.int64).reshape(-1, 2)
        trained[a : int(bounds[j + 1])] = _mask_from_offsets(off, sorted(spans_list[j]))
    return trained


class PortableTokenizer:
    """What `render`, `tokenize_batch` and `check_sample` need from a fast tokenizer, rebuilt from a picklable
    spec with the `tokenizers` library only: worker processes start in a fraction of a second instead of
    importing transformers (seconds) and loading the tokenizer again.

    >>> from transformers import AutoTokenizer
    >>> original = AutoTokenizer.from_pretrained("assets/tiny-llama")
    >>> tok = PortableTokenizer(portable_spec(original))                  # the spec pickles to a worker
    >>> ids = tokenize_batch(["<|begin_of_text|>Hi"], [[(17, 19)]], tok)[0].input_ids
    >>> ids.tolist() == tokenize_batch(["<|begin_of_text|>Hi"], [[(17, 19)]], original)[0].input_ids.tolist()
    True
    """

    def __init__(self, spec: dict):
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_str(spec["backend"])
        # what the transformers wrapper sets before every call (tokenize_batch checks these)
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self.split_special_tokens = spec["split_special_tokens"]
        self._tokenizer.encode_special_tokens = self.split_special_tokens
        self.chat_template = spec["chat_template"]
        self.name_or_path = spec["name_or_path"]
        self.bos_token_id = spec["info"]["bos_id"]
        self.eos_token_id = spec["eos_token_id"]
        info = dict(spec["info"])
        info["regex"] = re.compile("|".join(re.escape(t) for t in info["specials"])) if info["specials"] else None
        _info_cache[self] = info

    def __call__(self, texts, add_special_tokens=True, return_offsets_mapping=False):
        single = isinstance(texts, str)
        encs = self._tokenizer.encode_batch([texts] if single else list(texts), add_special_tokens=add_special_tokens)
        out = {"input_ids": [e.ids for e in encs]}
        if return_offsets_mapping:
            out["offset_mapping"] = [e.offsets for e in encs]
        return {k: v[0] for k, v in out.items()} if single else out

    def convert_tokens_to_ids(self, token):
        return self._tokenizer.token_to_id(token)


def portable_spec(tokenizer) -> dict:
    """A picklable description of a fast tokenizer for `PortableTokenizer` (raises ValueError for slow ones)."""
    backend = _fast_backend(tokenizer)
    if backend is None:
        raise ValueError("not a fast tokenizer with default truncation/padding")
    info = {k: v for k, v in _info(tokenizer).items() if k not in ("regex", "structures", "eot")}
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return {
        "backend": backend.to_str(),
        "split_special_tokens": bool(getattr(tokenizer, "split_special_tokens", False)),
        "chat_template": template,
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "eos_token_id": tokenizer.eos_token_id,
        "info": info,
    }
