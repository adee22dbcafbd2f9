"""Tests for backend/dataset.py: the streamed shard writer and the memory-mapped reader."""

import numpy as np
import pytest
import yaml

from backend.dataset import DatasetNotFoundError, ShardWriter, TokenDataset, descriptor_name, token_dtype


def _random_docs(n, vocab, seed=0, max_len=40):
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        length = int(rng.integers(1, max_len))
        docs.append((rng.integers(0, vocab, length), rng.random(length) < 0.5))
    return docs


@pytest.mark.parametrize(
    "vocab,expected", [(256, np.uint8), (257, np.uint16), (65536, np.uint16), (65537, np.uint32), (128256, np.uint32)]
)
def test_token_dtype_is_smallest_unsigned(vocab, expected):
    assert token_dtype(vocab) == np.dtype(expected)


@pytest.mark.parametrize("vocab", [200, 512, 128256])
@pytest.mark.parametrize("shard_tokens", [25, 10_000])
def test_round_trip_across_shards(tmp_path, vocab, shard_tokens):
    docs = _random_docs(60, vocab)
    info = {"path": "tok", "vocab_size": vocab}
    with ShardWriter(
        tmp_path, "training", vocab, shard_tokens=shard_tokens, tokenizer_info=info, prepare_config_hash="abc"
    ) as w:
        for tokens, trained in docs:
            w.add(tokens, trained)
    counts = w.close()
    assert counts["num_documents"] == 60
    assert counts["num_tokens"] == sum(len(t) for t, _ in docs)
    if shard_tokens == 25:
        assert counts["num_shards"] > 1

    ds = TokenDataset(tmp_path / descriptor_name("training"))
    assert len(ds) == 60
    assert ds.lengths.tolist() == [len(t) for t, _ in docs]
    assert ds.num_trained_tokens == sum(int(m.sum()) for _, m in docs)
    assert ds.tokenizer_info == info and ds.prepare_config_hash == "abc"
    for i, (tokens, trained) in enumerate(docs):
        got_tokens, got_trained = ds.document(i)
        assert got_tokens.dtype == np.int64 and got_trained.dtype == np.bool_
        np.testing.assert_array_equal(got_tokens, tokens)
        np.testing.assert_array_equal(got_trained, trained)
    # slices and negative index
    np.testing.assert_array_equal(ds.document(-1)[0], docs[-1][0])
    np.testing.assert_array_equal(ds.document(3, 1, 4)[0], docs[3][0][1:4])
    # the directory form reads the same split
    assert TokenDataset(tmp_path).lengths.tolist() == ds.lengths.tolist()
    # files are plain .npy with the smallest dtype
    tokens0 = np.load(tmp_path / "training" / "shard_00000.tokens.npy", mmap_mode="r")
    assert tokens0.dtype == token_dtype(vocab)


def test_document_never_straddles_shards(tmp_path):
    with ShardWriter(tmp_path, "training", 100, shard_tokens=10) as w:
        for length in [4, 4, 4, 30, 2]:
            w.add(np.ones(length, int), np.ones(length, bool))
    idx = [np.load(p).tolist() for p in sorted((tmp_path / "training").glob("*.index.npy"))]
    assert idx == [[0, 4, 8], [0, 4], [0, 30], [0, 2]]


def test_empty_split_and_descriptor_fields(tmp_path):
    ShardWriter(tmp_path, "validation", 512).close()
    ds = TokenDataset(tmp_path, split="validation")
    assert len(ds) == 0 and ds.num_tokens == 0
    meta = yaml.safe_load((tmp_path / "fast_llm_config_validation.yaml").read_text())
    assert meta["type"] == "sft_studio_memmap" and meta["path"] == "validation" and meta["token_dtype"] == "uint16"


def test_writer_rejects_out_of_range_and_mismatched(tmp_path):
    w = ShardWriter(tmp_path, "training", 10)
    with pytest.raises(ValueError, match="out of range"):
        w.add(np.array([3, 10]), np.array([True, True]))
    with pytest.raises(ValueError, match="same length"):
        w.add(np.array([3, 4]), np.array([True]))


def test_not_a_dataset_errors_name_the_path(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="prepare") as e:
        TokenDataset(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)
    with pytest.raises(DatasetNotFoundError, match="no fast_llm_config_training.yaml"):
        TokenDataset(tmp_path)
    bad = tmp_path / "x.yaml"
    bad.write_text("type: something_else\n")
    with pytest.raises(DatasetNotFoundError, match="type"):
        TokenDataset(bad)


def test_truncated_shard_detected(tmp_path):
    with ShardWriter(tmp_path, "training", 100) as w:
        w.add(np.arange(5), np.ones(5, bool))
    np.save(tmp_path / "training" / "shard_00000.tokens.npy", np.arange(3, dtype=np.uint8))
    with pytest.raises(DatasetNotFoundError, match="inconsistent"):
        TokenDataset(tmp_path)


def test_writer_memory_is_streamed(tmp_path):
    """The writer keeps no per-document state: files grow while it runs, headers are fixed at close."""
    w = ShardWriter(tmp_path, "training", 512)
    path = tmp_path / "training" / "shard_00000.tokens.npy"
    for _ in range(100):
        w.add(np.arange(1000) % 512, np.ones(1000, bool))
    w._shard[0]._file.flush()
    assert path.stat().st_size >= 100 * 1000 * 2  # data already on disk before close
    w.close()
    assert np.load(path, mmap_mode="r").shape == (100_000,)


@pytest.mark.parametrize("shard_tokens", [1, 7, 25, 10_000])
def test_add_batch_writes_what_one_by_one_adds_write(tmp_path, shard_tokens):
    """prepare hands whole chunks to `add_batch`: the shards (files and their bytes) must be exactly those that
    adding the documents one at a time gives, for shards smaller than a document, exactly full, or roomy."""
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 12, size=40)
    docs = [(rng.integers(0, 300, size=n), rng.random(n) < 0.5) for n in lengths]
    with ShardWriter(tmp_path / "one", "training", 300, shard_tokens=shard_tokens) as w:
        for tokens, trained in docs:
            w.add(tokens, trained)
    with ShardWriter(tmp_path / "batch", "training", 300, shard_tokens=shard_tokens) as w:
        for part in (docs[:3], docs[3:4], docs[4:]):  # several batches: shards continue across calls
            bounds = np.concatenate([[0], np.cumsum([len(t) for t, _ in part])])
            w.add_batch(np.concatenate([t for t, _ in part]), np.concatenate([m for _, m in part]), bounds)
    one = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.npy"))
    batch = sorted(p.relative_to(tmp_path / "batch") for p in (tmp_path / "batch").rglob("*.npy"))
    assert one == batch and len(one) >= 3
    for p in one:
        assert (tmp_path / "one" / p).read_bytes() == (tmp_path / "batch" / p).read_bytes(), p
    ds = TokenDataset(tmp_path / "batch" / "fast_llm_config_training.yaml")
    assert [ds.document(i)[0].tolist() for i in range(len(ds))] == [t.tolist() for t, _ in docs]
