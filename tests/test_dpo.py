"""DPO training (#24) on the tiny model and the shipped preference pairs (prepared once per module).

What each test proves:
- each document's log-probability read off a packed row equals the document forwarded alone (an independent
  forward, log_softmax and gather per document), also with each pair's prompt placed once (share_prompt), which
  gives the loss and gradients of whole pairs;
- packed pairs give the loss and gradients of one pair per row; k micro-batches give the step of one;
- the first logged step's loss is ln 2 and the rewards 0, with the precomputed reference and with LoRA's
  adapters_off reference;
- the reference pass, killed half-way, goes on where it stopped and ends with the uninterrupted values;
- a run killed after a checkpoint and restarted is bit-exact; a resume against another reference is refused;
- (slow) 2 FSDP processes equal 1; the shipped tiny flow lifts validation accuracy above 0.9.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from backend import ASSETS, ROOT, TINY_MODEL
from backend.checkpoint import latest_complete, list_checkpoints
from backend.config import load_prepare_config
from backend.dataset import TokenDataset
from backend.packing import Piece
from backend.preference import (
    DPO,
    PairSampler,
    collate_pairs,
    document_logps,
    pair_losses,
    reference_pass,
    shared_prompt_length,
    shared_prompt_lengths,
)

DPO_TRAIN = ASSETS / "configs" / "tiny_dpo_train.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
L = 1024  # rows the tests assemble by hand: three pairs fit


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from backend.prepare import prepare

    out = tmp_path_factory.mktemp("pairs") / "data"
    prepare(load_prepare_config(ASSETS / "configs" / "tiny_dpo_prepare.yaml", [f"output_path={out}"]), progress=False)
    return out


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    from backend.modeling import prepare_for_packed_training, register_attention

    register_attention("sdpa_packed")
    m = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32, attn_implementation="sdpa_packed")
    prepare_for_packed_training(m)
    return m


def overrides(data, run_dir, **extra) -> list[str]:
    values = {
        "data.datasets.training.path": data / "fast_llm_config_training.yaml",
        "data.datasets.validation.path": data / "fast_llm_config_validation.yaml",
        "run.experiment_dir": run_dir,
        "training.logs.interval": 1,
        "training.evaluations.validation.interval": 2,
        "training.evaluations.validation.iterations": 1,
        "training.evaluations.samples": 0,
        "optimizer.learning_rate.warmup_iterations": 0,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def run_cli(args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "backend.train", str(DPO_TRAIN), *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def events_of(run_dir, kind):
    lines = (run_dir / "events.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


def some_rows(ds, n_pairs, per_row):
    """Rows holding ``per_row`` whole pairs each (chosen, rejected, chosen, rejected, ...)."""
    rows = []
    for k in range(0, n_pairs, per_row):
        rows.append([Piece(int(d), 0, int(ds.lengths[d])) for p in ds.pairs[k : k + per_row] for d in p])
    return rows


def assert_each_document_alone(model, ds, mb):
    """Each document's log-prob read off the packed micro-batch equals the document forwarded alone (an independent
    forward, log_softmax and gather per document), and its trained-token count is the document's own."""
    with torch.no_grad():
        packed = document_logps(model, mb)
        for j, d in enumerate(mb["documents"].tolist()):
            ids, trained = ds.document(d)
            logits = model(torch.as_tensor(ids)[None], use_cache=False).logits[0, :-1].double()
            token_logps = torch.log_softmax(logits, -1).gather(1, torch.as_tensor(ids[1:])[:, None])[:, 0]
            alone = token_logps[torch.as_tensor(trained[1:])].sum()
            assert abs(float(packed[j]) - float(alone)) < 1e-4, (j, float(packed[j]), float(alone))
    assert mb["answer_tokens"].tolist() == [int(ds.document(d)[1][1:].sum()) for d in mb["documents"].tolist()]


def test_each_document_log_prob_equals_the_document_forwarded_alone(pairs, model):
    ds = TokenDataset(pairs)
    mb = collate_pairs(some_rows(ds, 6, 3), ds, L)
    assert_each_document_alone(model, ds, mb)


def shared_rows(ds, n_pairs, per_row):
    """`some_rows` with each pair's prompt placed once (the rejected piece starts after the shared tokens)."""
    shared = shared_prompt_lengths(ds)
    rows = []
    for k in range(0, n_pairs, per_row):
        row = []
        for j in range(k, min(k + per_row, n_pairs)):
            c, r = (int(d) for d in ds.pairs[j])
            row += [Piece(c, 0, int(ds.lengths[c])), Piece(r, int(shared[j]), int(ds.lengths[r]))]
        rows.append(row)
    return rows


def test_a_pairs_shared_prompt_is_the_common_prefix_before_either_trains():
    """`shared_prompt_length` on hand-made pairs: the tokens both documents start with, up to the first that either
    trains; 0 where they differ at once, where a trained token comes first, or where the rejected document would
    be left with nothing of its own."""

    def shared(c, c_trained, r, r_trained):
        return shared_prompt_length(np.array(c), np.array(c_trained, bool), np.array(r), np.array(r_trained, bool))

    assert shared([1, 2, 3, 9], [0, 0, 1, 1], [1, 2, 4], [0, 0, 1]) == 2  # a prompt, then the answers
    assert shared([1, 2, 3, 9], [0, 0, 0, 1], [1, 5, 3, 9], [0, 0, 0, 1]) == 1  # prompts that differ at token 1
    assert shared([1, 2, 3, 9], [0, 0, 0, 1], [1, 2, 3, 4, 5], [0, 0, 1, 1, 1]) == 2  # the rejected trains token 2
    assert shared([1, 2, 3, 4, 5], [0, 0, 1, 1, 1], [1, 2, 3, 9], [0, 0, 0, 1]) == 2  # the chosen trains token 2
    # a document that trains nothing (prepare writes none; the bound is then the other's first trained token)
    assert shared([1, 2, 3], [0, 0, 1], [1, 2, 5], [0, 0, 0]) == 2
    assert shared([1, 2, 5], [0, 0, 0], [1, 2, 3], [0, 0, 1]) == 2
    assert shared([7, 2], [0, 1], [8, 2], [0, 1]) == 0  # differ at once
    assert shared([1, 2], [1, 1], [1, 2], [1, 1]) == 0  # the first token trained
    assert shared([1, 2, 3, 4], [0, 0, 0, 1], [1, 2, 3], [0, 0, 0]) == 0  # the rejected would have no token left


def test_shared_prompts_are_the_common_untrained_prefix_of_each_pair(pairs):
    ds = TokenDataset(pairs)
    shared = shared_prompt_lengths(ds)
    assert (shared > 0).all()  # every shipped pair has a prompt before its answers
    for (c, r), s in zip(ds.pairs, shared, strict=True):
        (tc, mc), (tr, mr) = ds.document(int(c)), ds.document(int(r))
        assert np.array_equal(tc[:s], tr[:s]) and not mc[:s].any() and not mr[:s].any()
        # the longest such prefix: the next token differs, or one of them trains it
        assert tc[s] != tr[s] or mc[s] or mr[s]


def test_a_shared_prompt_gives_each_document_its_log_probability_alone(pairs, model):
    """The rejected answer attends to its pair's prompt placed once (sdpa_packed's shared_prefix), and its first
    token is predicted by the prompt's last position: each document's log-prob equals it forwarded alone."""
    ds = TokenDataset(pairs)
    mb = collate_pairs(shared_rows(ds, 6, 3), ds, L)
    assert len(mb["shared_prefix"]) == 6 and (mb["labels"] != -100).sum() < mb["answer_tokens"].sum()
    assert_each_document_alone(model, ds, mb)


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "simpo"])
def test_shared_prompt_pairs_give_the_loss_and_gradients_of_whole_pairs(pairs, model, loss):
    ds = TokenDataset(pairs)
    rng = np.random.default_rng(1)
    reference = -np.abs(rng.normal(20, 5, len(ds)))
    objective = DPO(beta=0.1, loss=loss, reference="none" if loss == "simpo" else "precompute")
    shared = loss_and_grads(model, [collate_pairs(shared_rows(ds, 6, 3), ds, L, reference)], objective)
    whole = loss_and_grads(model, [collate_pairs(some_rows(ds, 6, 1), ds, L, reference)], objective)
    assert shared[1] == whole[1] == 6 and abs(shared[0] - whole[0]) < 1e-5
    worst = max((shared[2][k] - whole[2][k]).abs().max().item() for k in shared[2])
    assert worst < 1e-5, worst


def test_a_shared_prompt_is_refused_where_it_cannot_be_masked(pairs, model):
    from backend.modeling import model_inputs

    ds = TokenDataset(pairs)
    rows = shared_rows(ds, 2, 2)
    mb = collate_pairs(rows, ds, L)
    model.config._attn_implementation = "eager"
    try:
        with pytest.raises(ValueError, match="training.dpo.share_prompt: no"):
            model_inputs(model, mb)
    finally:
        model.config._attn_implementation = "sdpa_packed"
    c, r = rows[0][0].document, rows[0][1].document
    other = int(ds.pairs[1][1])  # another pair's rejected document: its first tokens are another prompt's
    with pytest.raises(ValueError, match="do not share"):
        collate_pairs(
            [[Piece(c, 0, int(ds.lengths[c])), Piece(other, rows[0][1].begin, int(ds.lengths[other]))]], ds, L
        )
    with pytest.raises(ValueError, match="only a pair's rejected"):
        collate_pairs([[Piece(r, 1, int(ds.lengths[r])), Piece(c, 0, int(ds.lengths[c]))]], ds, L)


def test_the_sampler_places_a_shared_prompt_once(pairs):
    ds = TokenDataset(pairs)
    shared = shared_prompt_lengths(ds)
    whole = PairSampler(ds.lengths, ds.pairs, L, seed=0)
    placed = PairSampler(ds.lengths, ds.pairs, L, seed=0, shared=shared)
    assert placed.lengths.sum() == whole.lengths.sum() - shared.sum()
    assert placed.num_rows_in_epoch(0) < whole.num_rows_in_epoch(0)
    seen = [(p.document, p.begin) for i in range(placed.num_rows_in_epoch(0)) for p in placed.row(i)]
    rejected = {int(r): int(s) for (_, r), s in zip(ds.pairs, shared, strict=True)}
    assert sorted(d for d, _ in seen) == sorted(int(d) for d in ds.pairs.reshape(-1))  # every document once
    assert all(b == rejected.get(d, 0) for d, b in seen)


def loss_and_grads(model, batches, objective):
    model.zero_grad(set_to_none=True)
    total, pairs_seen = 0.0, 0
    for mb in batches:
        loss, n, _ = objective(model, mb)
        loss.backward()
        total += float(loss.detach())
        pairs_seen += n
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return total, pairs_seen, grads


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "simpo"])
def test_packed_pairs_equal_one_pair_per_row(pairs, model, loss):
    ds = TokenDataset(pairs)
    rng = np.random.default_rng(0)
    reference = -np.abs(rng.normal(20, 5, len(ds)))  # a reference away from the policy: the loss is not ln 2
    objective = DPO(beta=0.1, loss=loss, reference="none" if loss == "simpo" else "precompute")
    packed = loss_and_grads(model, [collate_pairs(some_rows(ds, 6, 3), ds, L, reference)], objective)
    alone = loss_and_grads(model, [collate_pairs(some_rows(ds, 6, 1), ds, L, reference)], objective)
    assert packed[1] == alone[1] == 6
    assert abs(packed[0] - alone[0]) < 1e-5 and abs(packed[0] - 6 * math.log(2)) > 1e-3
    worst = max((packed[2][k] - alone[2][k]).abs().max().item() for k in packed[2])
    assert worst < 1e-5, worst


def test_a_step_of_k_micro_batches_equals_one_micro_batch(pairs, model):
    """train_step divides by the step's pairs (not per micro-batch): 1 micro-batch of 4 rows == 2 of 2 rows, even
    with unequal pairs per micro-batch. SGD with lr 1 makes the update the gradient itself."""
    from accelerate import Accelerator

    from backend.train import train_step

    ds = TokenDataset(pairs)
    reference = -np.abs(np.random.default_rng(1).normal(20, 5, len(ds)))
    rows = some_rows(ds, 3, 3) + some_rows(ds, 3, 1)[:1] + some_rows(ds, 4, 2)[1:]  # 3, 1, 2 pairs per row
    accelerator = Accelerator(cpu=True)
    results = []
    for split in ([rows], [rows[:1], rows[1:]]):
        m = type(model)(model.config)
        m.load_state_dict(model.state_dict())
        before = {k: p.detach().clone() for k, p in m.named_parameters()}
        opt = torch.optim.SGD(m.parameters(), lr=1.0)
        mbs = [collate_pairs(r, ds, L, reference) for r in split]
        result = train_step(m, opt, accelerator, mbs, DPO(0.1, "sigmoid", "precompute"))
        results.append((result, {k: before[k] - p.detach() for k, p in m.named_parameters()}))
    (one, g1), (two, g2) = results
    assert one.trained_tokens == two.trained_tokens == 6  # pairs
    assert abs(one.loss - two.loss) < 1e-6
    assert one.metrics == pytest.approx(two.metrics, rel=1e-6, abs=1e-6) and one.metrics["accuracy"] >= 0
    assert max((g1[k] - g2[k]).abs().max().item() for k in g1) < 1e-6


@pytest.mark.parametrize("extra", [{}, {"model.base_model.peft.type": "lora"}], ids=["precompute", "adapters_off"])
def test_first_step_loss_is_ln2_and_rewards_are_zero(pairs, tmp_path, extra):
    from backend.train import train

    run_dir = tmp_path / "run"
    summary = train(DPO_TRAIN, overrides(pairs, run_dir, **{"training.train_iters": 1, **extra}))
    assert summary["step"] == 1
    start, step = events_of(run_dir, "start")[0], events_of(run_dir, "train")[0]
    assert start["dpo"]["reference"] == ("adapters_off" if extra else "precompute")
    assert {k: start["dpo"][k] for k in ("beta", "loss", "simpo_gamma")} == {
        "beta": 0.1,
        "loss": "sigmoid",
        "simpo_gamma": 0.5,
    }
    from backend.config import load_train_config
    from backend.preference import share_prompt

    cfg = load_train_config(DPO_TRAIN, overrides(pairs, run_dir, **{"training.train_iters": 1, **extra}))
    assert start["dpo"]["share_prompt"] == share_prompt(cfg) and start["skipped_pairs"] == 0
    assert start["training_pairs"] == len(TokenDataset(pairs / "fast_llm_config_training.yaml").pairs)
    assert abs(step["loss"] - math.log(2)) < 1e-6, step["loss"]
    assert abs(step["rewards_chosen"]) < 1e-6 and abs(step["rewards_rejected"]) < 1e-6
    assert step["accuracy"] == 0.0 and step["pairs"] > 0 and step["trained_tokens"] > step["pairs"]
    assert (run_dir / "reference" / "training.npy").is_file() != bool(extra)


def test_the_reference_pass_goes_on_where_it_stopped(pairs, model, tmp_path, monkeypatch):
    from accelerate import Accelerator

    import backend.preference as preference

    ds = TokenDataset(pairs)
    sampler = PairSampler(ds.lengths, ds.pairs, 180, seed=3)  # a few pairs are longer: skipped
    accelerator = Accelerator(cpu=True)
    whole = reference_pass(model, accelerator, ds, sampler, 1, tmp_path / "a" / "training.npy", log=lambda m: None)
    placed = np.zeros(len(ds), bool)
    placed[ds.pairs[np.setdiff1d(np.arange(len(ds.pairs)), sampler.skipped)].ravel()] = True
    assert np.isfinite(whole[placed]).all() and np.isnan(whole[~placed]).all() and (~placed).any()

    calls, real = [0], preference.document_logps

    def dies_after_40(model, batch):
        calls[0] += 1
        if calls[0] > 40:
            raise KeyboardInterrupt("killed")
        return real(model, batch)

    path = tmp_path / "b" / "training.npy"
    monkeypatch.setattr(preference, "document_logps", dies_after_40)
    with pytest.raises(KeyboardInterrupt):
        reference_pass(model, accelerator, ds, sampler, 1, path, log=lambda m: None)
    assert not path.exists() and path.with_suffix(".partial.npz").is_file()
    monkeypatch.setattr(preference, "document_logps", real)
    said = []
    again = reference_pass(model, accelerator, ds, sampler, 1, path, log=said.append)
    assert said == [f"reference: continuing the pass at round 32 of {sampler.num_rows_in_epoch(0)} "
                    f"({path.with_suffix('.partial.npz')})"]  # fmt: skip
    np.testing.assert_array_equal(again, whole)
    assert not path.with_suffix(".partial.npz").exists()
    # a reference made for other data or another initial model is never reused: its key differs
    said = []
    key = {"data": {"num_documents": 1}}
    reference_pass(model, accelerator, ds, sampler, 1, path, log=said.append, key=key)
    assert any("computed for other data or another initial model" in m for m in said), said
    # nor one made for other rows: with each prompt placed once, the pairs too long whole are placed (NaN in the
    # file made without sharing), so the values are computed again, by key and, keyless, by their NaNs
    shared = PairSampler(ds.lengths, ds.pairs, 180, seed=3, shared=shared_prompt_lengths(ds))
    assert len(shared.skipped) < len(sampler.skipped)
    for k in (key, None):
        said = []
        values = reference_pass(model, accelerator, ds, shared, 1, tmp_path / "a" / "training.npy", said.append, k)
        assert said and "again" in said[0] and np.isfinite(values[ds.pairs[~np.isin(np.arange(len(ds.pairs)),
                                                                                   shared.skipped)]]).all()  # fmt: skip
        reference_pass(model, accelerator, ds, sampler, 1, tmp_path / "a" / "training.npy", log=lambda m: None)


def test_a_killed_run_resumes_bit_exact_and_refuses_another_reference(pairs, tmp_path):
    # the schedule of 4 steps whatever train_iters says: the killed run is started with many more
    common = {
        "training.train_iters": 4,
        "training.checkpoint.interval": 2,
        "optimizer.learning_rate.decay_iterations": 4,
    }
    reference = tmp_path / "reference"
    proc = run_cli(overrides(pairs, reference, **common))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref_losses = {e["step"]: e["loss"] for e in events_of(reference, "train")}

    killed = tmp_path / "killed"
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "backend.train", str(DPO_TRAIN)]
        + overrides(pairs, killed, **{**common, "training.train_iters": 100_000}),
        cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    import time

    deadline = time.time() + 240
    while latest_complete(killed / "checkpoints", warn=lambda m: None) is None:
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "killed.log").read_text()[-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert [e["loss"] for e in events_of(killed, "train")[:2]] == [ref_losses[1], ref_losses[2]]
    for step, path, _ in list_checkpoints(killed / "checkpoints"):
        if step > 2:
            shutil.rmtree(path)
    # the run went on past step 2 before the kill: its events after step 2 belong to the killed future
    proc = run_cli(overrides(pairs, killed, **common))
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = {e["step"]: e["loss"] for e in events_of(killed, "train")[-2:]}
    assert resumed == {3: ref_losses[3], 4: ref_losses[4]}
    from safetensors.torch import load_file

    a, b = (load_file(r / "export" / "final" / "model.safetensors") for r in (reference, killed))
    assert all(torch.equal(a[k], b[k]) for k in a)

    # the reference is part of what a resume checks: another one refuses, naming the key and the way on
    values = np.load(killed / "reference" / "training.npy")
    np.save(killed / "reference" / "training.npy", values + 1.0)
    proc = run_cli(overrides(pairs, killed, **{**common, "training.train_iters": 6}))
    assert proc.returncode == 2 and "other reference log-probs" in proc.stderr, proc.stderr[-3000:]
    np.save(killed / "reference" / "training.npy", values)

    # so is where the prompts went: a checkpoint that does not say placed every pair whole (made before prompts
    # were shared), and this CPU run would place each prompt once: refused, naming the key
    latest = latest_complete(killed / "checkpoints", warn=lambda m: None)
    meta = json.loads((latest / "meta.json").read_text())
    assert meta.pop("share_prompt") is True
    (latest / "meta.json").write_text(json.dumps(meta))
    proc = run_cli(overrides(pairs, killed, **{**common, "training.train_iters": 6}))
    assert proc.returncode == 2 and "each pair whole" in proc.stderr, proc.stderr[-3000:]
    assert "training.dpo.share_prompt: no" in proc.stderr


@pytest.mark.slow
def test_two_fsdp_processes_match_one_process(pairs, tmp_path):
    from backend.launch import train_command, train_env

    common = {"training.train_iters": 3, "batch.micro_batch_size": 2, "model.multi_stage.zero_stage": 3}
    config = tmp_path / "train.yaml"  # train_command writes the accelerate YAML beside the config: not in assets/
    shutil.copy(DPO_TRAIN, config)
    runs = {}
    for n in (1, 2):
        run_dir = tmp_path / f"p{n}"
        args = overrides(pairs, run_dir, **common, **{"run.num_processes": n})
        cmd = train_command(config, n, use_cpu=True, extra_overrides=args)
        proc = subprocess.run(
            cmd, cwd=ROOT, env={**ENV, **train_env(n, use_cpu=True)}, capture_output=True, text=True, timeout=400
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[n] = run_dir
    assert events_of(runs[2], "start")[0]["sharded"] is True
    np.testing.assert_allclose(*(np.load(runs[n] / "reference" / "training.npy") for n in (1, 2)), atol=1e-5)
    for kind in ("train", "validation"):
        one, two = (events_of(runs[n], kind) for n in (1, 2))
        assert len(one) == len(two) > 0
        for a, b in zip(one, two, strict=True):
            for key in ("loss", "margin", "accuracy", "rewards_chosen", "rewards_rejected"):
                assert a[key] == pytest.approx(b[key], abs=1e-5), (kind, key)
    from safetensors.torch import load_file

    a, b = (load_file(runs[n] / "export" / "final" / "model.safetensors") for n in (1, 2))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


@pytest.mark.slow
def test_the_shipped_tiny_flow_lifts_validation_accuracy_above_0_9(pairs, tmp_path):
    """Chosen right, rejected wrong (mostly a refusal; a few wrong results or another question's answer): the model
    learns to prefer the right answers on pairs it never trained on (about a minute; tiny_dpo_train.yaml as
    shipped, only the paths changed)."""
    run_dir = tmp_path / "run"
    paths = {"data.datasets.training.path": pairs / "fast_llm_config_training.yaml"}
    paths["data.datasets.validation.path"] = pairs / "fast_llm_config_validation.yaml"
    proc = run_cli([f"{k}={v}" for k, v in paths.items()] + [f"run.experiment_dir={run_dir}"])  # the shipped config
    assert proc.returncode == 0, proc.stderr[-3000:]
    validation = events_of(run_dir, "validation")
    assert validation[-1]["accuracy"] > 0.9, [round(e["accuracy"], 3) for e in validation]
    assert validation[-1]["margin"] > validation[0]["margin"] > 0


def test_the_attention_plan_of_a_shared_prompt_is_never_reused_without_it():
    """sdpa_packed caches its chunk plan per forward (keyed by the boundary tensor): a plan made with a shared_prefix
    must not answer a later forward without one, also once that shared_prefix tensor is freed."""
    import gc

    from backend.attention import _chunk_plan

    cu = torch.tensor([0, 6, 9, 12], dtype=torch.int32)  # chosen 6 tokens, rejected answer 3 (after 2 shared), pad
    shared = torch.tensor([[6, 0, 2]])
    assert _chunk_plan(12, cu, None, shared) == ([6, 3, 3], [True, (0, 2), True])
    del shared
    gc.collect()
    assert _chunk_plan(12, cu, None, None) == ([6, 3, 3], [True, True, True])


@pytest.mark.parametrize("share", [False, True])
def test_the_objectives_sampler_shares_prompts_exactly_when_asked(pairs, share):
    """`DPO.sampler` (the trainer's own builder): training.dpo.share_prompt places each pair's prompt once, and
    without it every document is placed whole (a prompt shared where the attention cannot mask it would let the
    rejected answer read the chosen one); the start event reports the prompt tokens saved."""
    from types import SimpleNamespace

    from backend.preference import DPO

    ds = TokenDataset(pairs)
    sampling = SimpleNamespace(seed=0, packing="best_fit", packing_window=64)
    cfg = SimpleNamespace(data=SimpleNamespace(sampling=sampling), batch=SimpleNamespace(sequence_length=L))
    sampler = DPO(share_prompt=share).sampler(ds, cfg)
    shared = shared_prompt_lengths(ds) if share else np.zeros(len(ds.pairs), np.int64)
    assert shared.sum() > 0 or not share
    rejected = {int(r): int(s) for (_, r), s in zip(ds.pairs, shared, strict=True)}
    seen = [(p.document, p.begin) for i in range(sampler.num_rows_in_epoch(0)) for p in sampler.row(i)]
    assert sorted(d for d, _ in seen) == sorted(int(d) for d in ds.pairs.reshape(-1))
    assert all(b == rejected.get(d, 0) for d, b in seen)
    assert DPO(share_prompt=share).describe(sampler)["shared_prompt_tokens"] == int(shared.sum())


def test_the_reference_digest_tells_other_log_probs_apart():
    """A checkpoint records the reference log-probs' digest and a resume compares it (`train._check_reference`)."""
    from backend.preference import reference_digest

    values = np.linspace(-40.0, -1.0, 7).astype(np.float32)
    digest = reference_digest(values)
    assert len(digest) == 16 and int(digest, 16) >= 0
    assert reference_digest(values.copy()) == digest == reference_digest(values.astype(np.float64))
    assert reference_digest(values + 1.0) != digest and reference_digest(values[:-1]) != digest


def test_the_reference_and_prompt_sharing_the_run_resolves(monkeypatch):
    """``training.dpo.reference: auto`` (none for SimPO, which has no reference; adapters_off for LoRA; else
    precompute) and ``share_prompt`` (only where the attention is sdpa_packed: the varlen kernels see each document
    whole, so a rejected answer placed after its shared prompt would lose it)."""
    from backend import modeling
    from backend.config import load_train_config
    from backend.preference import reference_mode, share_prompt

    def cfg(*overrides):
        return load_train_config(DPO_TRAIN, list(overrides))

    auto = "training.dpo.reference=auto"
    assert reference_mode(cfg(auto)) == "precompute"
    assert reference_mode(cfg(auto, "training.dpo.loss=simpo")) == "none"
    assert reference_mode(cfg(auto, "model.base_model.peft.type=lora")) == "adapters_off"
    assert reference_mode(cfg("training.dpo.reference=none")) == "none"

    assert share_prompt(cfg("training.dpo.share_prompt=yes"), "cpu") is True
    assert share_prompt(cfg("training.dpo.share_prompt=no"), "cpu") is False
    asked = []

    def varlen(use_flash_attention, device=None):
        asked.append((use_flash_attention, device))
        return modeling.FLASH, "flash-attn installed"

    monkeypatch.setattr(modeling, "select_attention", varlen)
    flash = cfg("training.dpo.share_prompt=yes", "model.base_model.transformer.use_flash_attention=yes")
    assert share_prompt(flash, "cuda") is False and asked == [(True, "cuda")]
    monkeypatch.undo()

    # the run's objective carries every setting, resolved
    from backend.preference import objective_of

    simpo = cfg(
        "training.dpo.loss=simpo",
        "training.dpo.beta=2.5",
        "training.dpo.simpo_gamma=0.3",
        "training.dpo.share_prompt=no",
    )
    d = objective_of(simpo)
    assert (d.beta, d.loss, d.reference, d.simpo_gamma, d.share_prompt) == (2.5, "simpo", "none", 0.3, False)
    d = objective_of(cfg("training.dpo.share_prompt=yes"))
    assert (d.loss, d.reference, d.share_prompt) == ("sigmoid", "precompute", True)


def test_simpo_loss_and_rewards_are_trls_formula():
    """SimPO (TRL's CPOTrainer, loss_type="simpo"): -log sigmoid(beta * (chosen - rejected) - gamma) on the
    length-normalized log-probs, rewards beta * each, and the reference tensors ignored (NaN here)."""
    import math

    nan = torch.full((3,), float("nan"), dtype=torch.float64)
    chosen = torch.tensor([-1.0, -2.5, -0.2], dtype=torch.float64)
    rejected = torch.tensor([-3.0, -2.0, -0.2], dtype=torch.float64)
    beta, gamma = 2.0, 0.5
    losses, r_chosen, r_rejected = pair_losses(chosen, rejected, nan, nan, beta, "simpo", gamma)
    expected = [
        math.log1p(math.exp(-(beta * (c - r) - gamma))) for c, r in zip(chosen.tolist(), rejected.tolist(), strict=True)
    ]
    assert torch.allclose(losses, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    assert torch.equal(r_chosen, beta * chosen) and torch.equal(r_rejected, beta * rejected)
    assert not r_chosen.requires_grad


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "simpo"])
def test_pair_loss_reads_interleaved_pairs_and_normalizes_by_answer_tokens(loss):
    """`DPO.pair_loss` on (2P,) sums ordered chosen, rejected, chosen, ...: the loss sum and the pair count of its
    pairs, each pair's log-probs per answer token for ipo and simpo (a zero-token answer counts one), summed
    metrics; simpo with no reference."""
    import math

    from backend.preference import DPO

    policy = torch.tensor([-4.0, -9.0, -1.0, -6.0, -3.0, -3.5], dtype=torch.float64)
    reference = None if loss == "simpo" else torch.tensor([-5.0, -8.0, -2.0, -5.0, -3.0, -4.0], dtype=torch.float64)
    tokens = torch.tensor([2, 3, 1, 4, 0, 5])
    objective = DPO(beta=0.5, loss=loss, reference="none" if loss == "simpo" else "precompute", simpo_gamma=0.3)
    total, pairs, metrics = objective.pair_loss(policy, reference, tokens)
    p, ref = policy.tolist(), (reference.tolist() if reference is not None else [0.0] * 6)
    if loss != "sigmoid":
        n = [max(int(t), 1) for t in tokens.tolist()]
        p, ref = [a / b for a, b in zip(p, n, strict=True)], [a / b for a, b in zip(ref, n, strict=True)]
    expected, rewards = 0.0, []
    for j in range(3):
        c, r = p[2 * j], p[2 * j + 1]
        if loss == "simpo":
            expected += math.log1p(math.exp(-(0.5 * (c - r) - 0.3)))
            rewards.append((0.5 * c, 0.5 * r))
        else:
            logits = (c - ref[2 * j]) - (r - ref[2 * j + 1])
            expected += math.log1p(math.exp(-0.5 * logits)) if loss == "sigmoid" else (logits - 1 / (2 * 0.5)) ** 2
            rewards.append((0.5 * (c - ref[2 * j]), 0.5 * (r - ref[2 * j + 1])))
    assert pairs == 3 and math.isclose(float(total), expected, rel_tol=1e-12)
    assert 0 < sum(a > b for a, b in rewards) < 3  # the accuracy below counts some pairs, not all
    for key, value in (
        ("rewards_chosen", sum(a for a, _ in rewards)),
        ("rewards_rejected", sum(b for _, b in rewards)),
        ("margin", sum(a - b for a, b in rewards)),
        ("accuracy", sum(a > b for a, b in rewards)),
        ("logps_chosen", p[0] + p[2] + p[4]),
        ("logps_rejected", p[1] + p[3] + p[5]),
        ("answer_tokens", 15),
    ):
        assert math.isclose(metrics[key], value, rel_tol=1e-12, abs_tol=1e-12), key


def test_rows_forwarded_unflattened_give_each_document_its_own_positions(pairs, model, monkeypatch):
    """`document_logps` on a micro-batch forwarded as (B, L) rows (what `model_inputs` returns where flattening would
    join two rows): the LM head runs on every position and the trained ones are read by their flattened index, each
    summed into its document. Checked against the same forward read position by position."""
    import backend.modeling

    ds = TokenDataset(pairs)
    mb = collate_pairs(some_rows(ds, 4, 2), ds, L)
    rows = dict(input_ids=mb["input_ids"], position_ids=mb["position_ids"], use_cache=False)
    assert rows["input_ids"].shape[0] == 2
    monkeypatch.setattr(backend.modeling, "model_inputs", lambda model, batch: rows)
    with torch.no_grad():
        got = document_logps(model, mb)
        logp = torch.log_softmax(model(**rows).logits.double(), -1)  # (B, L, V)
    want = torch.zeros(len(mb["documents"]), dtype=torch.float64)
    read = (mb[k].tolist() for k in ("logp_positions", "logp_targets", "logp_documents"))
    for pos, target, doc in zip(*read, strict=True):
        want[doc] += logp[pos // L, pos % L, target]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
