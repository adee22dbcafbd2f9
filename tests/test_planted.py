"""Tests for the bugs a review planted and the whole suite let through (issue #27), each on the product's own path
and against a reference that shares no code with it:

1. the guide's span form (text + inclusive masked spans) off by one character before each span;
2. activation checkpointing read from the config but never applied;
3. validation over the first batch only;
4. ``truncate_documents`` dropped on the way into the trainer's sampler;
5. weight decay on norms and biases;
and the two that were caught only by luck: gradient clipping removed, and non-causal attention inside a document.

Each test was run with its bug planted and failed (see the commit messages).
"""

import json
import random
from collections import Counter

import numpy as np
import pytest
import torch

from backend import ASSETS, TINY_MODEL
from backend.chat import spans_from_loss_masking
from backend.documents import _clean_trained_spans, repair_spans

TINY_TRAIN = ASSETS / "configs" / "tiny_train.yaml"


# ---------------------------------------------------------------------------- 1. the guide's span form
def masked_chars(n: int, spans) -> set:
    """Reference: the characters an inclusive span list masks, clipped to the text."""
    return {c for b, e in spans for c in range(max(b, 0), min(e, n - 1) + 1)}


def trained_chars(ranges) -> set:
    return {c for b, e in ranges for c in range(b, e)}


def random_spans(rng: random.Random, n: int) -> list[list[int]]:
    """Sorted inclusive spans, some touching each other ([a, b], [b + 1, c]), some at the text's ends, some
    single characters."""
    spans, pos = [], rng.choice([0, 0, 1, 2])
    while pos < n and rng.random() < 0.8:
        length = rng.choice([1, 1, 2, 3, 7])
        end = min(n - 1, pos + length - 1)
        spans.append([pos, end])
        pos = end + 1 + rng.choice([0, 0, 1, 2, 5])  # 0: the next span touches this one
    if spans and rng.random() < 0.3:
        spans[-1][1] = n - 1  # to the text's end
    return spans


def test_trained_characters_are_exactly_the_complement_of_the_masked_spans():
    rng = random.Random(27)
    clean = repaired = 0
    for _ in range(2000):
        n = rng.randint(1, 40)
        spans = random_spans(rng, n)
        expected = set(range(n)) - masked_chars(n, spans)
        fast = _clean_trained_spans([list(s) for s in spans], n)
        assert fast is not None, spans  # sorted, disjoint, in range: the one-pass path takes it
        assert trained_chars(fast) == expected, (n, spans, fast)
        clean += 1
        # the same spans shuffled, overlapping and reaching outside the text: the repair path must train the
        # characters no span covers, and say what it repaired
        messy = [list(s) for s in spans] + [[b, min(e + 1, n - 1)] for b, e in spans[:1]]
        if rng.random() < 0.5:
            messy.append([-rng.randint(1, 3), rng.randint(-1, 2)])  # before the text, maybe into it
        if rng.random() < 0.5:
            messy.append([rng.randint(n - 2, n + 1), n + rng.randint(0, 3)])  # past the text's end
        messy = [[b, e] for b, e in messy if b <= e]
        rng.shuffle(messy)
        masked, notes, reason = repair_spans(messy, n)
        assert reason is None
        assert trained_chars(spans_from_loss_masking(n, masked)) == set(range(n)) - masked_chars(n, messy)
        assert all(0 <= b <= e < n for b, e in masked), masked
        kinds = {note.split(":")[0] for note in notes}
        assert ("spans_clipped" in kinds) == any(b < 0 or e >= n for b, e in messy), (n, messy, notes)
        inside = sorted((max(b, 0), min(e, n - 1)) for b, e in messy if max(b, 0) <= min(e, n - 1))
        overlaps = any(b2 <= e1 for (_, e1), (b2, _) in zip(inside, inside[1:], strict=False))
        assert ("spans_merged" in kinds) == overlaps, (n, messy, notes)
        repaired += 1
    assert clean == repaired == 2000


@pytest.mark.parametrize(
    "raw",
    [[[1, 2, 3]], [[0, 10]], [[-1, 2]], [[3, 2]], [[4, 6], [1, 2]], [[1, 4], [4, 6]], [[1.0, 2]], [[True, 2]], [5], ""],
)
def test_the_one_pass_path_leaves_every_irregular_span_list_to_the_repair(raw):
    """Anything but sorted, disjoint, in-range [int, int] pairs goes to repair_spans (which notes or rejects it):
    the one-pass path must neither take it nor crash on it. Text of 10 characters."""
    assert _clean_trained_spans(raw, 10) is None


GUIDE_ROWS = [
    # (text, inclusive spans NOT trained): the trained range ends with a one-character token before a masked span
    ("User: hi\nBot: ok!\nUser: bye\nBot: x", [[0, 13], [17, 30]]),
    ("User: hi\nBot: ok!\nUser: bye\nBot: x", [[0, 13], [17, 30], [33, 33]]),  # and the text's last character
    ("a!b?c.d", [[0, 0], [1, 1], [3, 3], [5, 5]]),  # single-character spans touching trained single characters
    ("a!b?c.d", [[0, 1], [2, 3], [4, 6]]),  # touching spans that cover the whole text
    ("Q: 2+2?\nA: 4.\nQ: and?\nA: 5!", [[0, 10], [14, 24]]),
]


def test_prepare_stores_the_token_mask_of_the_character_spans(tmp_path):
    """Through prepare, guide form: every stored token is trained iff one of its characters is (tokenizer offsets,
    computed here independently of backend.chat)."""
    from transformers import AutoTokenizer

    from backend.dataset import TokenDataset
    from backend.prepare import prepare

    rng = random.Random(1)
    words = ["a", "b", "!", "?", ".", " ", "\n", "ok", "Bot", ":", "hello", "1"]
    rows = list(GUIDE_ROWS)
    for _ in range(60):
        text = "".join(rng.choice(words) for _ in range(rng.randint(3, 30)))
        rows.append((text, random_spans(rng, len(text))))
    path = tmp_path / "guide.jsonl"
    path.write_text("".join(json.dumps({"text": t, "spans": s}) + "\n" for t, s in rows))
    out = tmp_path / "data"
    cfg = {
        "dataset": {"path": str(path), "field": "text", "loss_masking_spans": "spans"},
        "tokenizer": {"path": str(TINY_MODEL)},
        "output_path": str(out),
        "splits": {"training": 1.0},
    }
    summary = prepare(cfg, progress=False)

    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    expected = Counter()  # (token ids, trained mask) of every row that trains something
    for text, spans in rows:
        enc = tokenizer(text, return_offsets_mapping=True)  # adds BOS: offsets (0, 0), never trained
        masked = masked_chars(len(text), spans)
        mask = tuple(any(c not in masked for c in range(b, e)) for b, e in enc["offset_mapping"])
        if any(mask):  # a row with nothing trained is skipped and reported
            expected[tuple(enc["input_ids"]), mask] += 1
    written = sum(expected.values())
    assert summary["written"] == written and summary["skipped"] == {"no_trained_tokens": len(rows) - written}
    data = TokenDataset(out, "training")
    stored = Counter()
    for i in range(len(data)):
        tokens, trained = data.document(i)
        stored[tuple(int(t) for t in tokens), tuple(bool(x) for x in trained)] += 1
    wrong = stored - expected
    assert not wrong, [(tokenizer.decode(ids), mask) for ids, mask in wrong]
    assert stored == expected


# ---------------------------------------------------------------------- the trainer's own builders, tiny run
def train_config(data, tmp_path, *extra):
    from backend.config import load_train_config

    return load_train_config(
        TINY_TRAIN,
        [
            f"data.datasets.training.path={data / 'fast_llm_config_training.yaml'}",
            f"data.datasets.validation.path={data / 'fast_llm_config_validation.yaml'}",
            f"run.experiment_dir={tmp_path / 'run'}",
            "batch.sequence_length=256",
            "batch.batch_size=2",
            "batch.micro_batch_size=2",
            *extra,
        ],
    )


def built_model(cfg):
    """backend.train.build_model as fit calls it, and the run's data."""
    from backend.distributed import build_accelerator
    from backend.scaling import Probe
    from backend.train import build_model, load_data

    accelerator = build_accelerator(cfg)
    run_data = load_data(cfg)
    splits = {"training": run_data.train, "validation": run_data.validation, "test": None}
    return build_model(cfg, accelerator, splits, Probe(0)), run_data


def saved_bytes_and_recomputes(model, batch) -> tuple[int, list[int]]:
    """(bytes of the distinct non-parameter storages autograd saves in forward for backward, per decoder layer the
    number of times its MLP runs during backward)."""
    from backend.loss import trained_token_loss

    saved = {}

    def pack(t):
        base = t if t._base is None else t._base
        if not isinstance(base, torch.nn.Parameter):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_sum, _ = trained_token_loss(model, batch)
    layers = model.model.layers
    runs = [0] * len(layers)
    hooks = [
        layer.mlp.register_forward_pre_hook(lambda module, args, i=i: runs.__setitem__(i, runs[i] + 1))
        for i, layer in enumerate(layers)
    ]
    loss_sum.backward()
    for h in hooks:
        h.remove()
    return sum(saved.values()), runs


def test_activation_checkpointing_is_applied_by_build_model(data, tmp_path):
    """(2) With the flag on, every decoder layer recomputes in backward and the saved bytes drop by the planner's
    factor (backend.plan: activations with / without checkpointing)."""
    from backend.packing import collate
    from backend.plan import plan_memory

    measured, factor = {}, {}
    for on in (False, True):
        cfg = train_config(data, tmp_path, f"model.multi_stage.activation_checkpointing={on}")
        (m, run_data) = built_model(cfg)
        rows = next(iter(run_data.sampler.micro_batches(0, 2, 2, 0, 1)))
        batch = collate(rows, run_data.train, cfg.batch.sequence_length)
        saved, recomputes = saved_bytes_and_recomputes(m.model.train(), batch)
        layers = m.model.config.num_hidden_layers
        assert recomputes == [1 if on else 0] * layers
        plan = plan_memory(cfg, 1)
        measured[on] = saved
        # the planner's loss term assumes every position trained; this batch trains num_trained of them
        loss_saved = plan.loss_saved - (plan.tokens - int(batch["num_trained"])) * m.model.config.hidden_size * 4
        factor[on] = plan.activations + loss_saved
    # measured here: 24.3 MB off, 2.1 MB on; the plan's parts: 24.3 MB and 2.2 MB
    assert measured[False] == pytest.approx(factor[False], rel=0.1)
    assert measured[False] / measured[True] == pytest.approx(factor[False] / factor[True], rel=0.1)


# --------------------------------------------------------------------------------------------- 5. weight decay
def test_weight_decay_on_every_matrix_and_no_vector(data, tmp_path):
    """(5) The optimizer build_model makes: every 2-D parameter decayed, no 1-D one (norms, biases)."""
    cfg = train_config(data, tmp_path, "optimizer.weight_decay=0.1")
    m, _ = built_model(cfg)
    decay = {id(p) for g in m.optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {id(p) for g in m.optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    params = dict(m.model.named_parameters())
    assert any(p.ndim == 1 for p in params.values()) and any(p.ndim == 2 for p in params.values())
    assert decay | plain == {id(p) for p in params.values()} and not decay & plain
    for name, p in params.items():
        assert (id(p) in decay) == (p.ndim >= 2), f"{name} ({p.ndim}-D) {'is' if id(p) in decay else 'is not'} decayed"


# ------------------------------------------------------------------------------------ 3. validation loss
def test_logged_validation_loss_covers_every_validation_document(data, tmp_path):
    """(3) The validation loss fit logs equals the summed token losses over the trained tokens of every validation
    document, each run alone through the exported model with eager attention, divided by their count."""
    from transformers import AutoModelForCausalLM

    from backend.dataset import TokenDataset
    from backend.events import read_events
    from backend.train import packed_sampler, train

    cfg = train_config(
        data,
        tmp_path,
        "batch.batch_size=1",  # one row per validation batch: the capped batch count covers every row
        "batch.micro_batch_size=1",
        "training.train_iters=1",
        "training.evaluations.validation.interval=1",
        "training.evaluations.validation.iterations=100000",
        "training.checkpoint.interval=0",
    )
    train(cfg)
    events, _ = read_events(tmp_path / "run" / "events.jsonl")
    (logged,) = [e for e in events if e["event"] == "validation"]

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "export" / "final", attn_implementation="eager")
    validation = TokenDataset(data, "validation")
    loss_sum, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(validation)):
            tokens, trained = validation.document(i)
            logits = model(input_ids=torch.as_tensor(tokens, dtype=torch.long)[None]).logits[0].double()
            logp = torch.log_softmax(logits[:-1], dim=-1)  # position t predicts token t + 1
            nll = -logp[torch.arange(len(tokens) - 1), torch.as_tensor(tokens[1:], dtype=torch.long)]
            target = torch.tensor(trained[1:])  # a copy: the memory-mapped split is read-only
            loss_sum += float(nll[target].sum())
            count += int(target.sum())
    assert logged["batches"] == packed_sampler(cfg, validation).num_rows_in_epoch(0)  # every row, once
    assert logged["loss"] == pytest.approx(loss_sum / count, rel=1e-5)


# ---------------------------------------------------------------------------- 4. truncate_documents, trainer
def test_trainer_sampler_skips_or_cuts_long_documents_as_prepare_reported(tmp_path):
    """(4) Through backend.train.packed_sampler: with documents longer than batch.sequence_length,
    truncate_documents: no skips exactly the documents and tokens prepare's report counted, yes keeps every token
    (the long documents cut into pieces)."""
    from backend.config import load_prepare_config
    from backend.dataset import TokenDataset
    from backend.prepare import prepare
    from backend.train import packed_sampler

    length = 120  # the tiny sample's documents run from about 40 to 155 tokens
    out = tmp_path / "data"
    prepare_cfg = load_prepare_config(
        ASSETS / "configs" / "tiny_prepare.yaml", [f"output_path={out}", f"report.sequence_length={length}"]
    )
    long = prepare(prepare_cfg, progress=False)["longer_than_sequence_length"]
    assert long["sequence_length"] == length and long["documents"] > 0
    training = TokenDataset(out, "training")
    lengths = training.lengths
    for truncate in (False, True):
        cfg = train_config(out, tmp_path, f"batch.sequence_length={length}", f"data.truncate_documents={truncate}")
        sampler = packed_sampler(cfg, training)
        pieces = [p for row in sampler.rows(0, sampler.num_rows_in_epoch(0)) for p in row]
        covered = {}  # document -> the token positions its pieces hold (a cut piece repeats its edge token)
        for p in pieces:
            covered.setdefault(p.document, set()).update(range(p.begin, p.end))
        too_long = set(np.flatnonzero(lengths > length).tolist())
        if truncate:
            assert len(sampler.skipped) == 0
            assert covered == {d: set(range(n)) for d, n in enumerate(lengths.tolist())}  # every token
            assert all(sum(p.document == d for p in pieces) >= 2 for d in too_long)  # long ones cut
        else:
            assert set(sampler.skipped.tolist()) == too_long
            # prepare's report counts both splits
            both = [sampler, packed_sampler(cfg, TokenDataset(out, "validation"))]
            assert sum(len(s.skipped) for s in both) == long["documents"]
            assert sum(s.tokens_skipped for s in both) == long["tokens"]
            assert covered == {d: set(range(n)) for d, n in enumerate(lengths.tolist()) if d not in too_long}
            assert all(sum(p.document == d for p in pieces) == 1 for d in covered)  # whole, never cut


# ---------------------------------------------------------------------------------- the kills that were luck
def test_a_huge_gradient_is_clipped_to_clip_grad():
    """With plain SGD at lr 1 the update is the applied gradient: its norm must be ``clip`` when the gradient is
    far larger, and the whole gradient with clip 0 (only measured)."""
    from backend.config import load_train_config
    from backend.distributed import build_accelerator
    from backend.packing import PackedSampler, collate
    from backend.train import train_step
    from tests.dist_worker import MemoryDocuments, tiny_llama

    cfg = load_train_config(TINY_TRAIN, ["model.multi_stage.zero_stage=0", "model.distributed.training_dtype=fp32"])
    accelerator = build_accelerator(cfg)
    data = MemoryDocuments()
    micro_batches = [collate(rows, data, 16) for rows in PackedSampler(data.lengths, 16).micro_batches(0, 4, 2)]
    moved = {}
    for clip in (1e-3, 0.0):
        model = tiny_llama("sdpa_packed", tied=False)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        model, optimizer = accelerator.prepare(model, optimizer)
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        result = train_step(model, optimizer, accelerator, micro_batches, "fused", clip=clip)
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        moved[clip] = float((after - before).norm())
        assert result.stepped and result.grad_norm > 100 * 1e-3  # a gradient far above the clip
    assert moved[1e-3] == pytest.approx(1e-3, rel=1e-4)
    assert moved[0.0] == pytest.approx(result.grad_norm, rel=1e-4)


@pytest.mark.parametrize("attn", ["sdpa_packed", "sdpa"])
def test_packed_logits_equal_each_document_alone_with_eager_attention(data, attn):
    """Packed rows (several documents per row, two rows) through the training attention against every document
    forwarded alone with transformers' plain eager attention: no shared attention or masking code."""
    from backend.dataset import TokenDataset
    from backend.modeling import load_model, model_inputs
    from backend.packing import PackedSampler, collate

    length = 256
    training = TokenDataset(data, "training")
    rows = PackedSampler(training.lengths, length, seed=3).rows(0, 2)
    assert all(len(row) >= 2 for row in rows)
    batch = collate(rows, training, length)
    packed = load_model(TINY_MODEL, "fp32", attn).eval()
    alone = load_model(TINY_MODEL, "fp32", "eager").eval()
    with torch.no_grad():
        logits = packed(**model_inputs(packed, batch)).logits.reshape(len(rows), length, -1)  # (B, L, V)
        for r, row in enumerate(rows):
            at = 0
            for piece in row:
                tokens, _ = training.document(piece.document, piece.begin, piece.end)
                reference = alone(input_ids=torch.as_tensor(tokens, dtype=torch.long)[None]).logits[0]
                got = logits[r, at : at + len(tokens)]
                worst = float((got - reference).abs().max())
                assert worst <= 1e-4, f"row {r}, {piece}: logits differ by {worst}"
                at += len(tokens)


def test_preview_rows_in_runs_are_the_rows_asked_for_as_prepare_makes_them():
    """RowReader.samples (the studio's preview and dataset check) reads runs of consecutive rows in one chunk: each
    yielded row is the one asked for, with the documents it gives alone (from the mutation run: a run that
    advanced two rows at a time survived)."""
    from backend.config import load_prepare_config
    from backend.documents import RowReader
    from backend.modeling import load_tokenizer

    cfg = load_prepare_config(ASSETS / "configs" / "tiny_prepare.yaml")
    reader = RowReader(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer.path)
    wanted = [0, 1, 2, 3, 7, 8, 20]
    got = list(reader.samples(wanted, cfg, tokenizer))
    assert [p.row for p in got] == wanted and [p.form for p in got] == ["chat"] * len(wanted)
    for p in got:
        alone = reader.sample(p.row, cfg, tokenizer)
        assert p.where == alone.where and len(p.documents) == len(alone.documents) == 1
        for (ids, trained), (ids_alone, trained_alone) in zip(p.documents, alone.documents, strict=True):
            assert ids.dtype == np.int64 and ids.tolist() == ids_alone.tolist()
            assert trained.tolist() == trained_alone.tolist() and trained.any()


def test_evaluate_with_cross_document_attention_reads_each_row_as_one_sequence(data, tmp_path):
    """evaluate under batch.cross_document_attention: yes equals each row's documents forwarded as one sequence
    with eager attention, the first token of each document not a target (from the mutation run: evaluate collating
    without the flag, so validation silently blocked attention that training allowed, survived)."""
    from backend.distributed import build_accelerator
    from backend.modeling import load_model
    from backend.train import evaluate, load_data

    cfg = train_config(data, tmp_path, "batch.cross_document_attention=yes", "batch.batch_size=2")
    accelerator = build_accelerator(cfg)
    run_data = load_data(cfg)
    model = load_model(TINY_MODEL, "fp32", "sdpa_packed")
    iterations = 2
    got = evaluate(model, accelerator, run_data.validation_sampler, run_data.validation, cfg, iterations)

    alone = load_model(TINY_MODEL, "fp32", "eager").eval()
    loss_sum, count = 0.0, 0
    with torch.no_grad():
        for i in range(iterations):
            for micro_batch in run_data.validation_sampler.micro_batches(i, 2, 2):
                for row in micro_batch:
                    docs = [run_data.validation.document(p.document, p.begin, p.end) for p in row]
                    tokens = np.concatenate([t for t, _ in docs])
                    logits = alone(input_ids=torch.as_tensor(tokens, dtype=torch.long)[None]).logits[0].double()
                    nll = -torch.log_softmax(logits[:-1], dim=-1)[torch.arange(len(tokens) - 1), tokens[1:]]
                    target = np.concatenate([np.r_[False, trained[1:]] for _, trained in docs])[1:]
                    assert len(docs) >= 2  # documents that see each other
                    loss_sum += float(nll[torch.tensor(target)].sum())
                    count += int(target.sum())
    assert got == pytest.approx(loss_sum / count, rel=1e-5)


def test_the_step_reports_the_mean_loss_over_its_trained_tokens():
    """train_step's loss: the summed CE over every trained token of the step's micro-batches / their count, each
    document forwarded alone before the update (from the mutation run: the reported loss starting at 1.0, summed
    with the wrong sign or multiplied by the count survived; the weights were right, the logged curve was not)."""
    import copy

    import torch.nn.functional as F

    from backend.config import load_train_config
    from backend.distributed import build_accelerator
    from backend.packing import PackedSampler, collate
    from backend.train import train_step
    from tests.dist_worker import MemoryDocuments, tiny_llama

    cfg = load_train_config(TINY_TRAIN, ["model.multi_stage.zero_stage=0", "model.distributed.training_dtype=fp32"])
    accelerator = build_accelerator(cfg)
    data = MemoryDocuments()
    rows = PackedSampler(data.lengths, 16).micro_batches(0, 4, 2)
    model = tiny_llama("sdpa_packed", tied=False)
    before = copy.deepcopy(model).eval()
    loss_sum, count = 0.0, 0
    with torch.no_grad():
        for micro_batch in rows:
            for row in micro_batch:
                for piece in row:
                    tokens, trained = data.document(piece.document)
                    tokens = torch.as_tensor(tokens[piece.begin : piece.end], dtype=torch.long)
                    target = torch.as_tensor(trained[piece.begin : piece.end][1:])
                    logits = before(input_ids=tokens[None]).logits[0, :-1].double()
                    loss_sum += float(F.cross_entropy(logits[target], tokens[1:][target], reduction="sum"))
                    count += int(target.sum())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    result = train_step(model, optimizer, accelerator, [collate(r, data, 16) for r in rows], "fused", clip=1.0)
    assert result.trained_tokens == count > 0
    assert result.loss == pytest.approx(loss_sum / count, rel=1e-5)
