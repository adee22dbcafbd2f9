"""DPO's reference pass (`backend.preference.reference_pass`) as bookkeeping, in seconds: which document gets which
value, over one or two ranks, killed and continued, reused or computed again.

The model's forward is replaced by a stand-in that reads the collated micro-batch (each document's value is minus
the sum of its trained target ids), so the expected value of every document is computed independently from the
dataset alone. `tests/test_dpo.py` runs the same pass with the real model (log-probabilities equal to each document
forwarded alone); this file covers what the pass does around the forward, which costs a real forward per mutant
there.
"""

import contextlib
import json
import threading

import numpy as np
import pytest
import torch

from backend import ASSETS
from backend.config import load_prepare_config
from backend.dataset import TokenDataset
from backend.preference import PairSampler, reference_pass, shared_prompt_lengths

SEQ = 180  # a few of the shipped pairs are longer: skipped without sharing, placed with it


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    from backend.prepare import prepare

    out = tmp_path_factory.mktemp("pairs") / "data"
    prepare(load_prepare_config(ASSETS / "configs" / "tiny_dpo_prepare.yaml", [f"output_path={out}"]), progress=False)
    return TokenDataset(out)


class StandIn(torch.nn.Module):
    """The model: counts forwards and checks the pass runs it in eval mode."""

    def __init__(self):
        super().__init__()
        self.forwards = 0
        self.lock = threading.Lock()


@pytest.fixture
def forward(monkeypatch):
    """Replace `document_logps` by minus each document's summed trained target ids, read off the micro-batch; ``die
    [0]``: raise KeyboardInterrupt at that forward (counted over every rank)."""
    import backend.preference as preference

    die = [None]

    def logps(model, batch):
        assert not model.training, "the reference pass forwards in eval mode"
        with model.lock:
            model.forwards += 1
            if die[0] is not None and model.forwards >= die[0]:
                raise KeyboardInterrupt("killed")
        n = int(batch["documents"].numel())
        return torch.zeros(n, dtype=torch.float32).index_add(
            0, batch["logp_documents"], -batch["logp_targets"].to(torch.float32)
        )

    monkeypatch.setattr(preference, "document_logps", logps)
    return die


def expected(ds, sampler):
    """Every document of a pair the sampler places: minus its trained target ids summed; NaN elsewhere."""
    out = np.full(len(ds), np.nan)
    placed = np.setdiff1d(np.arange(len(ds.pairs)), sampler.skipped)
    for d in ds.pairs[placed].ravel():
        ids, trained = ds.document(int(d))
        out[d] = -float(np.asarray(ids[1:], np.int64)[np.asarray(trained[1:], bool)].sum())
    return out


class Hub:
    """What ``world`` ranks share: a barrier, and a slot per rank for the sum `accelerator.reduce` makes."""

    def __init__(self, world):
        self.barrier = threading.Barrier(world, timeout=20)  # a rank that stops: the others fail in seconds
        self.slots = [None] * world


class Rank:
    """The accelerator `reference_pass` reads, for rank ``rank`` of ``world`` run as threads of this process."""

    def __init__(self, hub, world, rank):
        self.hub, self.num_processes, self.process_index = hub, world, rank
        self.is_main_process = rank == 0
        self.device = torch.device("cpu")
        self.reduced = 0

    def autocast(self):
        return contextlib.nullcontext()

    def reduce(self, t, reduction):
        assert reduction == "sum"
        self.reduced += 1
        self.hub.slots[self.process_index] = t.clone()
        self.hub.barrier.wait()
        total = sum(self.hub.slots)
        self.hub.barrier.wait()
        return total

    def wait_for_everyone(self):
        self.hub.barrier.wait()


def run(world, sampler, ds, path, micro_batch_size=1, key=None, model=None):
    """``reference_pass`` on ``world`` ranks; (each rank's values, each rank's log, the ranks, the model)."""
    model = model or StandIn()
    hub = Hub(world)
    ranks = [Rank(hub, world, r) for r in range(world)]
    values, logs, errors = [None] * world, [[] for _ in range(world)], [None] * world

    def one(r):
        try:
            values[r] = reference_pass(model, ranks[r], ds, sampler, micro_batch_size, path, logs[r].append, key)
        except BaseException as e:  # noqa: BLE001 -- re-raised below, on the test's thread
            errors[r] = e
            hub.barrier.abort()

    if world == 1:
        one(0)
    else:
        threads = [threading.Thread(target=one, args=(r,)) for r in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "a rank is still running"
    first = next((e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)), None)
    if first is not None or any(errors):
        raise first or next(e for e in errors if e is not None)
    return values, logs, ranks, model


@pytest.mark.parametrize("world, micro_batch_size", [(1, 1), (1, 3), (2, 1), (3, 2), (2, 16), (2, 1000)])
# (2, 16): 29 micro-batches in 15 rounds, one extra forward in the same save as the first batch; (2, 1000): one
# micro-batch, and rank 1 forwards it again, discarded
def test_every_placed_document_gets_its_own_value_once_on_every_rank(ds, forward, tmp_path, world, micro_batch_size):
    sampler = PairSampler(ds.lengths, ds.pairs, SEQ, seed=3)
    assert len(sampler.skipped) > 0
    want = expected(ds, sampler)
    path = tmp_path / "run" / "reference" / "training.npy"  # folders made as needed
    values, logs, ranks, model = run(world, sampler, ds, path, micro_batch_size)
    for v in values:  # every rank gets the whole array
        np.testing.assert_array_equal(v, want)
    np.testing.assert_array_equal(np.load(path), want)
    assert not path.with_suffix(".partial.npz").exists() and logs == [[]] * world
    # each rank runs the same number of forwards (FSDP's collectives); the extra ones are discarded
    rows = sampler.num_rows_in_epoch(0)
    batches = -(-rows // micro_batch_size)
    rounds = -(-batches // world)
    assert model.forwards == rounds * world and model.training
    # the ranks' values are summed every 16 rounds and at the end
    assert all(r.reduced == (-(-rounds // 16) if world > 1 else 0) for r in ranks)


def test_a_killed_pass_goes_on_where_its_last_save_left_it(ds, forward, tmp_path):
    sampler = PairSampler(ds.lengths, ds.pairs, SEQ, seed=3)
    rows = sampler.num_rows_in_epoch(0)
    assert rows > 40
    path = tmp_path / "ref" / "training.npy"
    partial = path.with_suffix(".partial.npz")
    forward[0] = 41  # saved after rounds 16 and 32; killed in round 41
    with pytest.raises(KeyboardInterrupt):
        run(1, sampler, ds, path)
    assert not path.exists() and partial.is_file()
    with np.load(partial) as saved:
        assert int(saved["rounds"]) == 32 and int(saved["world"]) == 1
        assert np.isfinite(saved["values"]).sum() == sum(len(sampler.row(i)) for i in range(32))
    forward[0] = None
    values, logs, _, model = run(1, sampler, ds, path)
    assert logs == [[f"reference: continuing the pass at round 32 of {rows} ({partial})"]]
    assert model.forwards == rows - 32 and model.training
    np.testing.assert_array_equal(values[0], expected(ds, sampler))
    assert not partial.exists()
    # a partial pass saved by another number of ranks is not continued: its rounds are other rows
    forward[0] = 20
    with pytest.raises(KeyboardInterrupt):
        run(1, sampler, ds, tmp_path / "w" / "training.npy")
    forward[0] = None
    values, logs, _, model = run(2, sampler, ds, tmp_path / "w" / "training.npy")
    assert logs == [[], []] and model.forwards == 2 * -(-rows // 2)
    np.testing.assert_array_equal(values[0], expected(ds, sampler))


def test_a_finished_pass_is_reused_only_for_the_same_key_and_rows(ds, forward, tmp_path):
    sampler = PairSampler(ds.lengths, ds.pairs, SEQ, seed=3)
    path = tmp_path / "ref" / "training.npy"
    key = {"data": {"fingerprint": "abc"}, "model": tmp_path / "tiny"}  # a path: stored as its text
    run(1, sampler, ds, path, key=key)
    stored = path.with_suffix(".key.json").read_text()
    assert '"abc"' in stored and '"rows"' in stored and json.dumps(str(tmp_path / "tiny")) in stored
    _, logs, _, model = run(1, sampler, ds, path, key=key)  # the same key: read back, no forward
    assert logs == [[]] and model.forwards == 0
    path.with_suffix(".key.json").unlink()  # values without their key: they may be for anything
    _, logs, _, model = run(1, sampler, ds, path, key=key)
    assert "computing it again" in logs[0][0] and model.forwards == sampler.num_rows_in_epoch(0)
    _, logs, _, model = run(1, sampler, ds, path, key={**key, "model": "other"})
    assert logs == [[f"reference: {path} was computed for other data or another initial model: computing it again"]]
    assert model.forwards == sampler.num_rows_in_epoch(0)
    run(1, sampler, ds, path, key=key)  # stored for `key` again
    # another seed places the same pairs in other rows: the rows are part of the key
    other = PairSampler(ds.lengths, ds.pairs, SEQ, seed=4)
    _, logs, _, model = run(1, other, ds, path, key=key)
    assert "computing it again" in logs[0][0] and model.forwards == other.num_rows_in_epoch(0)
    # a file that names no key is reused only by a pass that names none
    keyless = tmp_path / "keyless" / "training.npy"
    run(1, sampler, ds, keyless)
    assert keyless.with_suffix(".key.json").read_text() == "{}"  # written with the values: names no key
    _, logs, _, model = run(1, sampler, ds, keyless)
    assert logs == [[]] and model.forwards == 0
    keyless.with_suffix(".key.json").unlink(missing_ok=True)  # values from before keys were written: keyless reuse
    _, logs, _, model = run(1, sampler, ds, keyless)
    assert logs == [[]] and model.forwards == 0
    _, logs, _, model = run(1, sampler, ds, keyless, key=key)
    assert "computing it again" in logs[0][0] and model.forwards > 0


def test_a_file_without_a_value_for_a_placed_document_is_computed_again(ds, forward, tmp_path):
    sampler = PairSampler(ds.lengths, ds.pairs, SEQ, seed=3)
    shared = PairSampler(ds.lengths, ds.pairs, SEQ, seed=3, shared=shared_prompt_lengths(ds))
    assert len(shared.skipped) < len(sampler.skipped)  # sharing places pairs too long whole
    path = tmp_path / "ref" / "training.npy"
    run(1, sampler, ds, path)
    values, logs, _, model = run(1, shared, ds, path)
    assert logs == [[f"reference: {path} holds no value for some documents this run places: computing it again"]]
    assert model.forwards == shared.num_rows_in_epoch(0)
    np.testing.assert_array_equal(values[0], expected(ds, shared))
    # a file of another shape (other data) is computed again too
    np.save(path, np.zeros(len(ds) - 1))
    _, logs, _, model = run(1, shared, ds, path)
    assert "holds no value" in logs[0][0] and model.forwards > 0
    np.testing.assert_array_equal(np.load(path), expected(ds, shared))
