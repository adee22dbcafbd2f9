"""Preference tuning (DPO, issue #24): pairs packed whole into rows, each answer's summed log-prob read off the
packed row, the pair losses, the reference model's pass, and the `DPO` objective that ``backend.train.train_step``
receives (backend/objective.py holds SFT, the other objective).

A pair is one unit of a row (`PairSampler`): its chosen document, then its rejected one. With
``training.dpo.share_prompt`` (the default, where the attention is sdpa_packed) the prompt the two documents share
is placed once: the rejected piece starts after it, attends to it (sdpa_packed's ``shared_prefix``), and its first
answer token is predicted by the prompt's last position, so every log-prob is the one of the document alone
(tests/test_dpo.py) with fewer tokens per pair::

    row        [ prompt | chosen answer ][ rejected answer ] pad      (positions 0..c-1, then s..r-1)
    attention   causal over the first      the s prompt tokens, then causal over itself

``pair_losses`` follows the DPO paper (Rafailov et al. 2023) with TRL's conventions: rewards are
beta * (policy - reference) log-prob of each answer; sigmoid loss -log sigmoid(beta * margin), IPO
(logits - 1 / (2 beta))^2 with length-normalized log-probs, SimPO reference-free -log sigmoid(beta * margin - gamma).

>>> import torch
>>> z = torch.zeros(2)
>>> losses, chosen, rejected = pair_losses(z, z, z, z, beta=0.1)
>>> round(float(losses[0]), 6), float(chosen.abs().max()), float(rejected.abs().max())
(0.693147, 0.0, 0.0)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from backend import IGNORE_INDEX
from backend.packing import PackedSampler, Piece, collate

LOSSES = ("sigmoid", "ipo", "simpo")


def pair_losses(
    policy_chosen,
    policy_rejected,
    reference_chosen,
    reference_rejected,
    beta: float,
    loss="sigmoid",
    simpo_gamma: float = 0.5,
):
    """Per-pair (losses (P,), chosen rewards (P,), rejected rewards (P,)) from (P,) log-probs of each answer.

    For ``ipo`` and ``simpo`` the caller passes length-normalized (mean per token) log-probs; ``simpo`` ignores the
    reference tensors (reference-free). Rewards are detached, for logging.

    >>> import torch
    >>> t = torch.tensor
    >>> l, c, r = pair_losses(t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0]), beta=0.5)
    >>> round(float(c), 3), round(float(r), 3), round(float(l), 4)  # beta * margin = 1: -log sigmoid(1)
    (0.5, -0.5, 0.3133)
    """
    import torch.nn.functional as F

    if loss not in LOSSES:
        raise ValueError(f"training.dpo.loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if loss == "simpo":
        logits = policy_chosen - policy_rejected
        losses = -F.logsigmoid(beta * logits - simpo_gamma)
        return losses, (beta * policy_chosen).detach(), (beta * policy_rejected).detach()
    chosen = policy_chosen - reference_chosen
    rejected = policy_rejected - reference_rejected
    logits = chosen - rejected
    losses = -F.logsigmoid(beta * logits) if loss == "sigmoid" else (logits - 1 / (2 * beta)) ** 2
    return losses, (beta * chosen).detach(), (beta * rejected).detach()


# ------------------------------------------------------------------------------------------------- pairs as rows
class PairSampler(PackedSampler):
    """`PackedSampler` over preference pairs: a pair (its chosen and rejected documents) is ONE unit of
    ``lengths[chosen] + lengths[rejected] - shared[pair]`` tokens, packed whole into one row, never cut; each row
    lists the pairs' documents chosen, rejected, chosen, rejected, ... (`collate_pairs` reads them in that order),
    the rejected piece starting after the ``shared`` prompt tokens (0: the whole document).

    >>> s = PairSampler([3, 4, 5, 2, 20, 1], [[0, 1], [2, 3], [4, 5]], 12, seed=0, strategy="greedy")
    >>> s.skipped.tolist()                            # pair 2 (21 tokens) never fits a row of 12
    [2]
    >>> sorted(len(s.row(i)) for i in range(s.num_rows_in_epoch(0)))   # two pairs, each in a row of its own
    [2, 2]
    """

    def __init__(
        self, lengths, pairs, sequence_length: int, seed: int = 0, strategy="best_fit", window=1000, shared=None
    ):
        lengths = np.asarray(lengths, np.int64)
        self.pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
        self.document_lengths = lengths
        # shared[k]: the first tokens of pair k's rejected document that are its chosen document's too (the prompt,
        # `shared_prompt_lengths`): placed once, the rejected piece starts after them (`collate_pairs`)
        self.shared = np.zeros(len(self.pairs), np.int64) if shared is None else np.asarray(shared, np.int64)
        units = lengths[self.pairs].sum(1) - self.shared
        super().__init__(units, sequence_length, seed, strategy, window, False)

    def row(self, i: int) -> list[Piece]:
        out = []
        for unit in super().row(i):
            chosen, rejected = (int(d) for d in self.pairs[unit.document])
            out.append(Piece(chosen, 0, int(self.document_lengths[chosen])))
            out.append(Piece(rejected, int(self.shared[unit.document]), int(self.document_lengths[rejected])))
        return out


def _placed_shared_tokens(sampler) -> int:
    """Prompt tokens placed once instead of twice over the pairs `sampler` places (not those it skips)."""
    shared = getattr(sampler, "shared", None)
    if shared is None:
        return 0
    return int(np.delete(shared, np.asarray(sampler.skipped, np.int64)).sum())


def shared_prompt_lengths(dataset) -> np.ndarray:
    """(P,) for each pair: how many first tokens its two documents have in common before either trains one (the
    prompt, as the template rendered it: identical ids at identical positions give identical hidden states), 0
    when placing it once would leave nothing of the rejected document before its first trained token's predictor.

    >>> from backend.dataset import ShardWriter, TokenDataset
    >>> import tempfile
    >>> out = tempfile.mkdtemp(); w = ShardWriter(out, "training", vocab_size=32, pairs=True)
    >>> w.add(np.array([1, 2, 3, 9]), np.array([0, 0, 1, 1], bool))
    >>> w.add(np.array([1, 2, 4]), np.array([0, 0, 1], bool))
    >>> _ = w.close(); shared_prompt_lengths(TokenDataset(out)).tolist()
    [2]
    """
    cached = getattr(dataset, "_shared_prompt_lengths", None)
    if cached is not None:  # every sampler of a split (train, validation, the reference pass) asks again
        return cached
    out = np.zeros(len(dataset.pairs), np.int64)
    for k, (c, r) in enumerate(dataset.pairs):
        out[k] = shared_prompt_length(*dataset.document(int(c)), *dataset.document(int(r)))
    try:
        dataset._shared_prompt_lengths = out
    except AttributeError:  # a dataset type without attributes of its own: no cache
        pass
    return out


def shared_prompt_length(chosen, chosen_trained, rejected, rejected_trained) -> int:
    """One pair's `shared_prompt_lengths` from its two documents' tokens and trained masks."""
    n = min(len(chosen), len(rejected))
    limit = min(_first(chosen_trained, n), _first(rejected_trained, n))  # never share a trained token
    differ = np.flatnonzero(np.asarray(chosen[:limit]) != np.asarray(rejected[:limit]))
    s = int(differ[0]) if len(differ) else limit
    return s if 0 < s < len(rejected) else 0


def _first(mask, default: int) -> int:
    hits = np.flatnonzero(np.asarray(mask, bool))
    return int(hits[0]) if len(hits) else default


def collate_pairs(rows, dataset, sequence_length: int, reference=None) -> dict:
    """`backend.packing.collate` of pair rows (from `PairSampler`), plus what the DPO objective reads:

    ``segment`` (B*L,) int64: index of the document (0..2P-1, in row order: pair k = documents 2k, 2k+1) each
    flattened position belongs to, -1 on padding; ``documents`` (2P,) their dataset ids; ``answer_tokens`` (2P,)
    their trained-target counts; ``num_pairs`` P; ``logp_positions`` / ``logp_targets`` / ``logp_documents`` (K,)
    each flattened position that predicts a trained token, that token and its document (what `document_logps`
    reads); ``reference_logps`` (2P,) float64 from ``reference`` (a per-document array of the reference model's
    summed log-probs) when given; and, when a row places a pair's prompt once (a rejected piece that starts at
    token s > 0, `PairSampler`), ``shared_prefix`` (n, 3) [its start, its chosen document's start, s] for
    sdpa_packed (backend/attention.py).

    >>> from backend.dataset import ShardWriter, TokenDataset
    >>> import tempfile
    >>> out = tempfile.mkdtemp(); w = ShardWriter(out, "training", vocab_size=32, pairs=True)
    >>> w.add(np.array([1, 2, 3]), np.array([0, 0, 1], bool))
    >>> w.add(np.array([1, 2, 4, 5]), np.array([0, 0, 1, 1], bool))
    >>> _ = w.close(); ds = TokenDataset(out)
    >>> mb = collate_pairs([[Piece(0, 0, 3), Piece(1, 0, 4)]], ds, 8, reference=np.array([-1.0, -2.0]))
    >>> mb["segment"].tolist(), mb["answer_tokens"].tolist(), mb["num_pairs"], mb["reference_logps"].tolist()
    ([0, 0, 0, 1, 1, 1, 1, -1], [1, 2], 1, [-1.0, -2.0])
    """
    import torch

    from backend.loss import shifted_targets

    batch = collate(rows, dataset, sequence_length)
    L = int(sequence_length)
    segment = np.full((len(rows), L), -1, np.int64)
    documents, shared, extra = [], [], []  # extra: (predictor position, target, document) of shared prompts
    for r, row in enumerate(rows):
        if len(row) % 2:
            raise ValueError(f"collate_pairs: row {r} holds {len(row)} documents, not whole pairs")
        t = 0
        for j, piece in enumerate(row):
            n = piece.end - piece.begin
            if piece.begin:  # a rejected document placed after its pair's shared prompt (PairSampler's `shared`)
                _check_shared(row, j, dataset, r)
                s, start = piece.begin, r * L + t
                prompt = start - (row[j - 1].end - row[j - 1].begin)  # the chosen document's first position
                shared.append((start, prompt, s))
                tokens, trained = dataset.document(piece.document)
                if trained[s]:  # its first own token is predicted by the prompt's last position
                    extra.append((prompt + s - 1, int(tokens[s]), len(documents)))
            segment[r, t : t + n] = len(documents)
            documents.append(piece.document)
            t += n
    segment = torch.from_numpy(segment.reshape(-1))
    targets = shifted_targets(batch["labels"])  # position t predicts label t+1 of its row
    positions = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    logp_targets, logp_documents = targets[positions], segment[positions]
    if extra:
        more = torch.tensor(extra, dtype=torch.int64)
        positions = torch.cat([positions, more[:, 0]])
        logp_targets, logp_documents = torch.cat([logp_targets, more[:, 1]]), torch.cat([logp_documents, more[:, 2]])
    counts = torch.zeros(len(documents), dtype=torch.int64)
    counts.index_add_(0, logp_documents, torch.ones(len(logp_documents), dtype=torch.int64))
    batch.update(
        segment=segment,
        documents=torch.tensor(documents, dtype=torch.int64),
        answer_tokens=counts,
        num_pairs=len(documents) // 2,
        logp_positions=positions,  # (K,) flattened positions whose next token is a trained answer token
        logp_targets=logp_targets,  # (K,) that token
        logp_documents=logp_documents,  # (K,) its document (0..2P-1)
    )
    if shared:
        batch["shared_prefix"] = torch.tensor(shared, dtype=torch.int64)  # read by sdpa_packed (backend/attention.py)
    if reference is not None:
        batch["reference_logps"] = torch.as_tensor(np.asarray(reference, np.float64)[documents])
    return batch


def _check_shared(row, j: int, dataset, r: int) -> None:
    """A piece that starts inside its document must be a pair's rejected one after its chosen one, and its skipped
    tokens must be the chosen document's first ones (else the plan was made for other data)."""
    chosen, rejected = row[j - 1] if j % 2 else None, row[j]
    if chosen is None or chosen.begin != 0:
        raise ValueError(f"collate_pairs: row {r} piece {j} starts at token {rejected.begin}: only a pair's rejected "
                         "document may start after its shared prompt")  # fmt: skip
    s = rejected.begin
    if not np.array_equal(dataset.document(chosen.document)[0][:s], dataset.document(rejected.document)[0][:s]):
        raise ValueError(f"collate_pairs: row {r}: documents {chosen.document} and {rejected.document} do not share "
                         f"their first {s} tokens; was the plan built from another dataset?")  # fmt: skip


def document_logps(model, batch: dict):
    """Forward a `collate_pairs` micro-batch; return (2P,) fp32: each document's summed log-probability of its
    trained targets, with a grad path. The LM head runs only at the positions that predict a trained token (as the
    fused SFT loss does; a shared prompt's last position twice: it predicts both answers' first token), so the (K, V)
    logits are those of the answers' tokens only.
    """
    import torch
    import torch.nn.functional as F

    from backend.modeling import model_inputs

    kwargs = model_inputs(model, batch)
    n_docs = int(batch["documents"].numel())
    # (K,) each: the flattened positions that predict a trained token (a shared prompt's last position twice), the
    # token, its document (`collate_pairs`)
    trained, targets, documents = batch["logp_positions"], batch["logp_targets"], batch["logp_documents"]
    # (B, L) rows only where flattening would join two rows (`model_inputs`): never for pair rows, which start every
    # document at position 0; kept for that form, which it reads right (trained positions are flattened indices)
    if kwargs["input_ids"].shape[0] == 1:  # one flattened row: the LM head on the K trained positions only
        logits = model(**kwargs, logits_to_keep=trained).logits.reshape(-1, model_vocab(model))  # (K, V)
    else:
        logits = model(**kwargs).logits.reshape(-1, model_vocab(model))[trained]
    token_logps = -F.cross_entropy(logits.float(), targets, reduction="none")  # (K,)
    out = torch.zeros(n_docs, dtype=torch.float32, device=token_logps.device)
    return out.index_add(0, documents, token_logps)


def model_vocab(model) -> int:
    from backend.modeling import hf_model

    return int(hf_model(model).config.vocab_size)


@contextlib.contextmanager
def adapters_disabled(model):
    """The frozen base of a LoRA model: PEFT's ``disable_adapter`` on the (DDP-unwrapped) PeftModel."""
    import torch

    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    if not hasattr(inner, "disable_adapter"):
        raise TypeError(
            "training.dpo.reference: adapters_off needs a LoRA model (model.base_model.peft.type: lora); "
            "use precompute for full finetuning"
        )
    with inner.disable_adapter():
        yield


METRICS = (
    "rewards_chosen",
    "rewards_rejected",
    "margin",
    "accuracy",
    "logps_chosen",
    "logps_rejected",
    "answer_tokens",
)


@dataclass(frozen=True)
class DPO:
    """The preference objective for ``backend.train.train_step``: sum of the pair losses of a `collate_pairs`
    micro-batch; denominator: its pairs. Also returns the sums of `METRICS` over its pairs (the step averages them).

    ``reference``: ``precompute`` (the micro-batch carries ``reference_logps``, `reference_pass`), ``adapters_off``
    (the LoRA model with its adapters disabled, no grad, in the same micro-batch) or ``none`` (reference-free: the
    reference log-probs are 0). ``ipo`` and ``simpo`` use log-probs averaged over each answer's tokens.
    """

    beta: float = 0.1
    loss: str = "sigmoid"
    reference: str = "precompute"
    simpo_gamma: float = 0.5
    share_prompt: bool = False  # each pair's prompt placed once (`shared_prompt_lengths`); sdpa_packed only

    def denominator(self, micro_batch: dict) -> int:
        return micro_batch["num_pairs"]

    def sampler(self, dataset, cfg):
        """The split's pairs, each packed whole into one row (`PairSampler`)."""
        sampling, L = cfg.data.sampling, cfg.batch.sequence_length
        shared = shared_prompt_lengths(dataset) if self.share_prompt else None
        return PairSampler(
            dataset.lengths, dataset.pairs, L, sampling.seed, sampling.packing, sampling.packing_window, shared
        )

    def collate(self, rows, dataset, batch, reference=None) -> dict:
        """`collate_pairs` with the split's precomputed reference log-probs (None: adapters_off / none)."""
        return collate_pairs(rows, dataset, batch.sequence_length, reference)

    def report(self, result) -> dict:
        """The train event's fields: pairs (the step's denominator), trained tokens, the per-pair means."""
        metrics = dict(result.metrics or {})
        per_pair = metrics.pop("answer_tokens", 0.0)
        return {"pairs": result.trained_tokens, "trained_tokens": round(per_pair * result.trained_tokens), **metrics}

    def describe(self, sampler) -> dict:
        """What the start event says about a DPO run."""
        return {
            "dpo": {
                "beta": self.beta,
                "loss": self.loss,
                "reference": self.reference,
                "simpo_gamma": self.simpo_gamma,
                "share_prompt": self.share_prompt,
            },
            "shared_prompt_tokens": _placed_shared_tokens(sampler),
            "training_pairs": int(len(sampler.lengths)),
            "skipped_pairs": int(len(sampler.skipped)),
        }

    def __call__(self, model, micro_batch: dict):
        import torch

        if self.reference == "adapters_off":
            with torch.no_grad(), adapters_disabled(model):
                reference = document_logps(model, micro_batch).double()
        elif self.reference == "precompute":
            reference = micro_batch["reference_logps"]
        else:
            reference = None
        return self.pair_loss(document_logps(model, micro_batch), reference, micro_batch["answer_tokens"])

    def pair_loss(self, policy, reference, answer_tokens):
        """(loss sum, pairs, metric sums) from (2P,) policy log-prob sums, (2P,) reference sums or None, (2P,)
        trained-token counts."""
        import torch

        reference = torch.zeros_like(policy) if reference is None else reference.to(policy.device, policy.dtype)
        if self.loss in ("ipo", "simpo"):  # length-normalized: mean log-prob per answer token
            n = answer_tokens.to(policy.device).clamp(min=1).to(policy.dtype)
            policy, reference = policy / n, reference / n
        losses, chosen, rejected = pair_losses(
            policy[0::2], policy[1::2], reference[0::2], reference[1::2], self.beta, self.loss, self.simpo_gamma
        )
        metrics = {
            "rewards_chosen": chosen.sum(),
            "rewards_rejected": rejected.sum(),
            "margin": (chosen - rejected).sum(),
            "accuracy": (chosen > rejected).float().sum(),
            "logps_chosen": policy[0::2].detach().sum(),
            "logps_rejected": policy[1::2].detach().sum(),
            "answer_tokens": answer_tokens.sum(),  # trained tokens of both answers (per pair once averaged)
        }
        return losses.sum(), int(losses.numel()), {k: float(v) for k, v in metrics.items()}


def objective_of(cfg):
    """The run's objective: ``SFT(cross_entropy_impl)`` or `DPO` from ``training.dpo`` (reference resolved)."""
    from backend.objective import SFT

    if cfg.training.objective == "sft":
        return SFT(cfg.model.base_model.cross_entropy_impl)
    d = cfg.training.dpo
    return DPO(d.beta, d.loss, reference_mode(cfg), d.simpo_gamma, share_prompt(cfg))


def share_prompt(cfg, device=None) -> bool:
    """``training.dpo.share_prompt`` where the run's attention can mask it: sdpa_packed (any device, and every CPU
    run); the varlen kernels (flash_attention_2, torch_varlen) see each document whole, so a pair's prompt is then
    placed twice, as without sharing."""
    from backend.modeling import PACKED_SDPA, select_attention

    if not cfg.training.dpo.share_prompt:
        return False
    return select_attention(cfg.model.base_model.transformer.use_flash_attention, device)[0] == PACKED_SDPA


def reference_mode(cfg) -> str:
    """``training.dpo.reference`` with ``auto`` resolved: none for simpo, adapters_off for LoRA, else precompute."""
    d = cfg.training.dpo
    if d.reference != "auto":
        return d.reference
    if d.loss == "simpo":
        return "none"
    return "adapters_off" if cfg.model.base_model.peft.type == "lora" else "precompute"


# --------------------------------------------------------------------------------------- the reference model's pass
def reference_pass(
    model, accelerator, dataset, sampler, micro_batch_size: int, path, log=print, key: dict | None = None
) -> np.ndarray:
    """Each document's summed log-prob of its trained tokens under ``model`` as it is now (the frozen initial
    policy: `fit` calls this before loading any checkpoint), for every pair ``sampler`` can place: (D,) float64,
    NaN for documents of pairs too long for a row.

    One pass over epoch 0's rows (each placeable pair exactly once), ``micro_batch_size`` rows per forward, batch j
    on rank j % world (every rank runs the same number of forwards: FSDP's collectives). Written to ``path`` (.npy)
    when complete; ``path``.partial.npz every 16 rounds, so a killed pass goes on where it stopped. Every rank calls
    it and gets the whole array. ``key``: what the values depend on (the data's fingerprint, the initial model),
    stored beside them (``path``.key.json); a file made for another key is computed again, never reused.
    """
    import json
    import os
    from pathlib import Path

    import torch
    from tqdm.auto import tqdm

    path = Path(path)
    key_path = path.with_suffix(".key.json")
    expanded = [sampler.row(i) for i in range(sampler.num_rows_in_epoch(0))]  # epoch 0: each placeable pair once
    # the rows the pass runs over are part of what its values are for: another sequence_length, share_prompt, packing
    # or seed places other pairs (a pair too long whole has no value in a file made without sharing)
    rows_digest = _rows_digest(expanded)
    key = json.loads(json.dumps({**(key or {}), "rows": rows_digest} if key else {}, default=str))
    try:
        same_key = json.loads(key_path.read_text()) == key
    except (OSError, ValueError):
        same_key = not key  # no key file: only a pass that names no key may reuse it
    if path.is_file() and not same_key:
        log(f"reference: {path} was computed for other data or another initial model: computing it again")
        path.unlink()
    if path.is_file():
        values = np.load(path)
        placed = np.array([p.document for row in expanded for p in row], np.int64)
        if values.shape == (len(dataset),) and np.isfinite(values[placed]).all():
            return values
        log(f"reference: {path} holds no value for some documents this run places: computing it again")
    batches = [expanded[i : i + micro_batch_size] for i in range(0, len(expanded), micro_batch_size)]
    world, rank = accelerator.num_processes, accelerator.process_index
    rounds = -(-len(batches) // world)
    values = np.full(len(dataset), np.nan)
    partial = path.with_suffix(".partial.npz")
    start = 0
    if partial.is_file() and same_key:
        with np.load(partial) as saved:
            if saved["values"].shape == values.shape and int(saved["world"]) == world:
                values, start = saved["values"].copy(), int(saved["rounds"])
                log(f"reference: continuing the pass at round {start} of {rounds} ({partial})")
    reference = None
    model.eval()
    bar = tqdm(total=rounds, initial=start, desc="reference log-probs", disable=not accelerator.is_main_process)
    local = np.zeros(len(dataset))
    done = np.zeros(len(dataset))
    try:
        for k in range(start, rounds):
            j = k * world + rank
            rows_j = batches[j] if j < len(batches) else batches[0]  # an extra forward, discarded: same collectives
            mb = _to_device(collate_pairs(rows_j, dataset, sampler.sequence_length, reference), accelerator.device)
            with torch.no_grad(), accelerator.autocast():
                logps = document_logps(model, mb).double().cpu().numpy()
            if j < len(batches):
                docs = mb["documents"].cpu().numpy()
                local[docs] = logps
                done[docs] = 1.0
            bar.update(1)
            if (k + 1) % 16 == 0 or k + 1 == rounds:
                merged, count = _sum_over_ranks(accelerator, local, done)
                values = np.where(count > 0, merged, values)
                local[:], done[:] = 0.0, 0.0
                if accelerator.is_main_process:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    key_path.write_text(json.dumps(key))  # before the values it describes
                    tmp = partial.with_name(partial.name + f".tmp-{os.getpid()}.npz")
                    np.savez(tmp, values=values, rounds=k + 1, world=world)
                    os.replace(tmp, partial)
                accelerator.wait_for_everyone()
    finally:
        bar.close()
        model.train()
    if accelerator.is_main_process:
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}.npy")
        np.save(tmp, values)
        os.replace(tmp, path)
        partial.unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    return values


def _rows_digest(rows) -> str:
    """A digest of a row plan: (document, begin, end) of every piece, row by row."""
    import hashlib

    h = hashlib.sha1()
    for row in rows:
        h.update(np.array([tuple(p) for p in row], np.int64).tobytes() + b"|")
    return h.hexdigest()[:16]


def _sum_over_ranks(accelerator, values: np.ndarray, done: np.ndarray):
    if accelerator.num_processes == 1:
        return values.copy(), done.copy()
    import torch

    dtype = torch.float32 if torch.device(accelerator.device).type == "mps" else torch.float64
    t = torch.tensor(np.stack([values, done]), dtype=dtype, device=accelerator.device)
    t = accelerator.reduce(t, reduction="sum").cpu().double().numpy()
    return t[0], t[1]


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


def reference_digest(values: np.ndarray) -> str:
    """16 hex of sha256 over the reference log-probs: a checkpoint records it, a resume compares it."""
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(values, np.float64).tobytes()).hexdigest()[:16]
