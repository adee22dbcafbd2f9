"""Supervised finetuning of a causal LM on a prepared (packed, assistant-masked) dataset.

    python -m backend.train TRAIN.yaml [key=value ...] [--validate] [--print-config]
    accelerate launch --config_file fsdp.yaml -m backend.train TRAIN.yaml ...      # or torchrun -m backend.train
    from backend.train import train; summary = train("TRAIN.yaml", ["training.train_iters=50"])   # notebooks

Writes into ``run.experiment_dir``: config.yaml (resolved), events.jsonl, LOCK, checkpoints/step_XXXXXX/,
export/step_XXXXXX/ and export/final/ (see backend/checkpoint.py). A run resumes by itself from the newest
complete checkpoint there (same data position: the step number fixes the sampler's rows).

Exit codes: 0 done, or stopped by SIGTERM/SIGINT after saving a checkpoint ("end" event with "stopped": true);
1 unexpected error ("error" event, traceback on stderr); 2 invalid config or arguments, or a resume refused
because the config changed (backend/compat.py), or data the model cannot take ("error" event); 3 another live run holds
the experiment directory; 4 the loss or gradient became NaN/inf (the last good checkpoint is kept, nothing saved).
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import NamedTuple

EXIT_OK, EXIT_ERROR, EXIT_CONFIG, EXIT_LOCKED, EXIT_DIVERGED = 0, 1, 2, 3, 4


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm is NaN/inf."""


def lr_at(step: int, lr, train_iters: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup from 0 to ``base`` over
    ``warmup_iterations``, then ``decay_style`` from ``base`` to ``minimum`` until step ``decay_iterations``
    (counted from 0, default ``train_iters``), then ``minimum``. A pure function of the step, so a checkpoint's
    step is the schedule's whole state.

    >>> from backend.config import LearningRateConfig
    >>> [round(lr_at(s, LearningRateConfig(base=1.0, minimum=0.0, warmup_iterations=2, decay_iterations=6), 6), 2)
    ...  for s in range(7)]
    [0.5, 1.0, 1.0, 0.85, 0.5, 0.15, 0.0]
    """
    if step < lr.warmup_iterations:
        return lr.base * (step + 1) / lr.warmup_iterations
    if lr.decay_style == "constant":
        return lr.base
    end = lr.decay_iterations or train_iters
    progress = min(1.0, max(0.0, (step - lr.warmup_iterations) / max(1, end - lr.warmup_iterations)))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if lr.decay_style == "cosine" else 1.0 - progress
    return lr.minimum + (lr.base - lr.minimum) * shape


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices only; norms, biases (1-D) and nothing else are not decayed."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, saves and ends (the studio's Stop button)."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        def handler(signum, frame):
            self.requested = True

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. a notebook worker thread): no signal handling
                pass
        return self

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def _reduction_dtype(device):
    """float64 where the device has it (CPU, CUDA), float32 on Apple MPS, which has no float64."""
    import torch

    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def _global_sum(accelerator, values: list[float]) -> list[float]:
    """Sum a few floats over ranks. One process: Python floats (float64 on the CPU), no device tensor at all.
    Several: reduced on the device the collective backend needs, in float64 (so that 1 and 2 processes give
    the same loss to ~1e-12) or float32 where the device lacks float64 (MPS)."""
    if accelerator.num_processes == 1:
        return [float(v) for v in values]
    import torch

    t = torch.tensor(values, dtype=_reduction_dtype(accelerator.device), device=accelerator.device)
    return [float(v) for v in accelerator.reduce(t, reduction="sum").tolist()]


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


class StepResult(NamedTuple):
    loss: float  # mean CE over every trained token of the step, all micro-batches and ranks
    grad_norm: float  # global gradient norm before clipping
    trained_tokens: int  # trained tokens of the step, all ranks (the loss's denominator)
    stepped: bool  # False: loss or gradient norm not finite, gradients dropped, no optimizer step
    overflow: bool = False  # fp16: the grad scaler found inf/NaN gradients, skipped the step and lowered its scale
    metrics: dict | None = None  # the objective's own figures (DPO: rewards, margin, accuracy), means over the step


def train_step(
    model, optimizer, accelerator, micro_batches, objective="fused", clip=0.0, on_micro_batch=None
) -> StepResult:
    """One optimizer step over this rank's micro-batches (collated dicts from backend.packing.collate).

    Loss = sum of CE over the trained tokens of every micro-batch of the step on every rank / the global count of
    those tokens, so neither the micro-batch split nor the number of processes changes it (tests/test_train_step.py
    checks 1 micro-batch vs k, and 1 vs 2 processes with unequal counts per rank). Every rank calls it (collectives:
    the count, the gradient reduction, the loss sum, the norm). ``clip``: 0 only measures the norm.
    ``objective``: what a micro-batch contributes (backend/objective.py); a cross-entropy implementation name
    ("fused", "torch") stands for SFT with it. The step never computes a loss itself.
    """
    from backend.loss import global_trained_count, loss_scale
    from backend.objective import as_objective
    from backend.scaling import micro_batch_sync

    objective = as_objective(objective)
    # the loss is a mean over the objective's denominator (SFT: trained tokens) of the whole step on all ranks
    global_count = global_trained_count(accelerator, [objective.denominator(mb) for mb in micro_batches])
    if not global_count:  # nothing to learn from on any rank (the count is global): no forward, no scaler state
        optimizer.zero_grad(set_to_none=True)
        return StepResult(float("nan"), 0.0, 0, False)
    scale = loss_scale(global_count, accelerator.num_processes)
    local_loss, sums = 0.0, {}
    for i, mb in enumerate(micro_batches):
        mb = _to_device(mb, accelerator.device)
        # DDP: no_sync until the step's last micro-batch (one all-reduce). FSDP: reduce-scatter every micro-batch,
        # so that no rank holds the whole model's gradient unsharded (backend/scaling.py)
        with micro_batch_sync(accelerator, model, last=i == len(micro_batches) - 1), accelerator.autocast():
            loss_sum, _, *extra = objective(model, mb)  # an objective may add sums of its own figures
            accelerator.backward(loss_sum * scale)  # Accelerator has gradient_accumulation_steps=1: no division
        local_loss += float(loss_sum.detach())
        for k, v in (extra[0] if extra else {}).items():
            sums[k] = sums.get(k, 0.0) + v
        if on_micro_batch is not None:
            on_micro_batch()
    names = sorted(sums)
    loss_total, *totals = _global_sum(accelerator, [local_loss, *(sums[k] for k in names)])
    loss = loss_total / global_count
    metrics = {k: v / global_count for k, v in zip(names, totals, strict=True)}
    # clip_grad_norm_ returns the norm before clipping (all ranks' shards); inf = only measure it
    grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), clip or float("inf")))
    stepped = math.isfinite(loss) and math.isfinite(grad_norm)
    # fp16: an inf norm with a finite loss is the grad scaler's overflow, not divergence. Its step() skips the update
    # and its update() lowers the scale; not calling it would keep the scale that overflows, every step
    overflow = not stepped and math.isfinite(loss) and getattr(accelerator, "scaler", None) is not None
    if stepped or overflow:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, grad_norm, int(global_count), stepped, overflow, metrics)


def evaluate(model, accelerator, sampler, dataset, cfg, iterations: int) -> float:
    """Mean CE over every trained token of ``iterations`` validation batches (the same rows every time)."""
    from backend.objective import SFT

    return evaluate_objective(
        model, accelerator, sampler, dataset, cfg, iterations, SFT(cfg.model.base_model.cross_entropy_impl)
    )[0]


def evaluate_objective(model, accelerator, sampler, dataset, cfg, iterations: int, objective, reference=None):
    """(mean loss over the objective's denominator, mean of each of its figures) over ``iterations`` batches (the
    same rows every time): SFT's trained tokens, DPO's pairs (``reference``: the split's precomputed log-probs)."""
    import torch

    b = cfg.batch
    model.eval()
    loss_sum = count = 0.0
    sums: dict[str, float] = {}
    with torch.no_grad():
        for i in range(iterations):
            for rows in sampler.micro_batches(
                i, b.batch_size, b.micro_batch_size, accelerator.process_index, accelerator.num_processes
            ):
                batch = _to_device(objective.collate(rows, dataset, b, reference), accelerator.device)
                with accelerator.autocast():
                    s, n, *extra = objective(model, batch)
                loss_sum += float(s)
                count += n
                for k, v in (extra[0] if extra else {}).items():
                    sums[k] = sums.get(k, 0.0) + v
    model.train()
    names = sorted(sums)
    loss_sum, count, *totals = _global_sum(accelerator, [loss_sum, count, *(sums[k] for k in names)])
    if not count:
        return float("nan"), {}
    return loss_sum / count, {k: v / count for k, v in zip(names, totals, strict=True)}


class RunData(NamedTuple):
    train: object  # TokenDataset (or EveryTokenTrained over it with use_loss_masking_spans: no)
    sampler: object  # PackedSampler of the training split
    fingerprint: dict  # what identifies the prepared training content (backend.compat.data_fingerprint)
    validation: object | None
    validation_sampler: object | None
    validation_batches: int  # batches per validation (0: validation off)


def read_split(cfg, path: str, split: str):
    """A prepared split as the loss reads it: its trained mask, or every token with use_loss_masking_spans: no (the
    guide's meaning: prompts included)."""
    from backend.config import ConfigError
    from backend.dataset import EveryTokenTrained, TokenDataset

    data = TokenDataset(path, split)
    key = f"data.datasets.{split}.path"
    if cfg.training.objective == "dpo" and data.pairs is None:
        raise ConfigError(
            [
                f"{key}: {path} holds no preference pairs (training.objective: dpo); prepare rows with "
                "prompt/chosen/rejected columns, or set training.objective: sft"
            ]
        )
    if cfg.training.objective == "sft" and data.pairs is not None:
        raise ConfigError(
            [
                f"{key}: {path} holds preference pairs: SFT on them would train the rejected answers too; set "
                "training.objective: dpo"
            ]
        )
    return data if cfg.data.sampling.use_loss_masking_spans else EveryTokenTrained(data)


def packed_sampler(cfg, dataset):
    """The sampler of ``dataset``'s rows under the run's batch and sampling settings: packed documents (SFT), or
    pairs each packed whole (DPO); the objective decides (backend/objective.py)."""
    from backend.preference import objective_of

    return objective_of(cfg).sampler(dataset, cfg)


def evaluation_batches(cfg, sampler, wanted: int, what: str) -> int:
    """Batches an evaluation takes: ``wanted``, capped so that each row of the split is evaluated at most once."""
    from backend.distributed import print0

    rows = sampler.num_rows_in_epoch(0)
    batches = min(wanted, max(1, rows // cfg.batch.batch_size))
    if batches < wanted:
        print0(f"{what}: the split holds {rows} rows, so {batches} batches instead of {wanted}")
    return batches


def load_data(cfg) -> RunData:
    """The training and validation splits and their packed samplers, with what the log must say about them
    (documents too long for the rows, split_turns data prepared for longer rows, a short validation split)."""
    from backend import compat
    from backend.distributed import print0

    b, t = cfg.batch, cfg.training
    train_data = read_split(cfg, cfg.data.datasets.training.path, "training")
    fingerprint = compat.data_fingerprint(train_data)
    sampler = packed_sampler(cfg, train_data)
    if len(sampler.skipped) and cfg.training.objective == "dpo":
        print0(
            f"packing: {len(sampler.skipped)} of {len(sampler.lengths)} training pairs holding "
            f"{sampler.tokens_skipped:,} tokens are longer than sequence_length {b.sequence_length} together and are "
            "skipped (a pair is packed whole, in one row)"
        )
    elif len(sampler.skipped):
        print0(
            f"packing: {len(sampler.skipped)} of {len(train_data)} training documents holding "
            f"{sampler.tokens_skipped:,} tokens ({sampler.tokens_skipped / max(1, train_data.num_tokens):.1%} of "
            f"tokens) are longer than sequence_length {b.sequence_length} and are skipped "
            f"(data.truncate_documents: no)"
        )
    split_length = _split_turns_length(cfg.data.datasets.training.path)
    if split_length and split_length > b.sequence_length:
        print0(
            f"warning: the data was prepared with long_documents.mode: split_turns at sequence_length "
            f"{split_length}, longer than batch.sequence_length {b.sequence_length}: pieces longer than "
            f"{b.sequence_length} are {'cut' if cfg.data.truncate_documents else 'skipped'} here. Prepare again with "
            f"long_documents.sequence_length: {b.sequence_length} to keep them."
        )
    val_cfg = t.evaluations.validation
    val_iters, val_data, val_sampler = 0, None, None
    if cfg.data.datasets.validation is not None and val_cfg.interval and val_cfg.iterations:
        val_data = read_split(cfg, cfg.data.datasets.validation.path, "validation")
        val_sampler = packed_sampler(cfg, val_data)
        val_iters = evaluation_batches(cfg, val_sampler, val_cfg.iterations, "validation")
    if t.evaluations.samples and not val_iters:
        print0(
            f"warning: training.evaluations.samples: {t.evaluations.samples} writes answers at each validation, "
            "and validation is off (training.evaluations.validation.interval / iterations, "
            "data.datasets.validation): no samples will be written"
        )
    return RunData(train_data, sampler, fingerprint, val_data, val_sampler, val_iters)


class Model(NamedTuple):
    model: object  # loaded for this rank, not yet prepared by the Accelerator
    optimizer: object  # AdamW over the trainable parameters
    finish_loading: object  # FSDP with rank-0 loading: call with the prepared model (scatters the weights), or None
    tokenizer: object  # the data's tokenizer: its chat template and stop tokens go into every export
    attention: str  # the attention implementation select_attention chose, and why
    attention_reason: str
    num_parameters: int
    trainable_parameters: int


def build_model(cfg, accelerator, splits: dict, probe) -> Model:
    """The tokenizer checked against the model and the data, the model loaded for this rank (full weights, or a
    frozen base + LoRA adapters), activation checkpointing and AdamW; the recipe prepares them."""
    import torch
    from accelerate.utils import set_seed

    from backend import compat
    from backend.distributed import describe, print0
    from backend.modeling import select_attention
    from backend.scaling import enable_activation_checkpointing, load_model_for_rank

    rank, world = accelerator.process_index, accelerator.num_processes
    set_seed(cfg.model.distributed.seed)  # same random init on every rank when model_weights: no
    attn_impl, attn_reason = select_attention(cfg.model.base_model.transformer.use_flash_attention, accelerator.device)
    print0(f"attention: {attn_reason}")
    # the tokenizer the data was prepared with, checked against the model: ids within its vocabulary, same
    # vocabulary as pretrained.path's tokenizer
    tokenizer, tokenizer_source = compat.data_tokenizer(splits["training"], cfg.pretrained.path, log=print0)
    compat.check_tokenizers_compatible(tokenizer, tokenizer_source, cfg.pretrained.path, log=print0)
    compat.check_data_fits_model(splits, compat.model_vocab(cfg.pretrained.path), cfg.pretrained.path, tokenizer_source)
    # weights stay fp32 (master copy); bf16/fp16 compute comes from the Accelerator's mixed precision. Under FSDP
    # only rank 0 reads the weights; finish_loading scatters them into the shards after prepare() (backend/scaling.py)
    sharded = describe(accelerator)["distributed_type"] == "FSDP" and world > 1
    probe.before_load()
    lora = cfg.model.base_model.peft.type == "lora"
    if lora:  # frozen base (4/8-bit with pretrained.quantization) + trainable adapters: backend/lora.py
        from backend.lora import load_lora_model, parameter_counts, wrap_lora

        if sharded:  # rank 0 reads the base, the other ranks get their shards of it after prepare (as full runs do)
            model, finish_loading = load_model_for_rank(
                cfg.pretrained.path, attn_impl, not cfg.pretrained.model_weights, rank, world, True,
                wrap=lambda base: wrap_lora(base, cfg),
            )  # fmt: skip
        else:
            model, finish_loading = load_lora_model(cfg, attn_impl), None
        trainable_params, num_params = parameter_counts(model)
    else:
        model, finish_loading = load_model_for_rank(
            cfg.pretrained.path, attn_impl, not cfg.pretrained.model_weights, rank, world, sharded
        )
        trainable_params = num_params = sum(p.numel() for p in model.parameters())
    probe.after_load()
    if cfg.model.multi_stage.activation_checkpointing:
        layers = enable_activation_checkpointing(model)
        print0(f"activation checkpointing: {layers} decoder layers recompute their forward in backward")
    opt = cfg.optimizer
    optimizer = torch.optim.AdamW(
        param_groups(model, opt.weight_decay),
        lr=lr_at(0, opt.learning_rate, cfg.training.train_iters),
        betas=(opt.beta_1, opt.beta_2),
    )
    return Model(model, optimizer, finish_loading, tokenizer, attn_impl, attn_reason, num_params, trainable_params)


class RunOutputs:
    """What a run writes as it goes: checkpoints (to resume) and exports (to use), each with its event on rank 0.
    Every rank calls save and export (collectives: sharded state, gathered weights). ``model`` and ``optimizer``
    are the prepared ones."""

    def __init__(self, cfg, accelerator, events, model, optimizer, tokenizer, data_fingerprint: dict):
        from backend.config import config_hash, dump_yaml

        self.cfg, self.accelerator, self.events = cfg, accelerator, events
        self.model, self.tokenizer = model, tokenizer
        self.run_dir = Path(cfg.run.experiment_dir)
        self.checkpoints = self.run_dir / "checkpoints"
        self.config_yaml = dump_yaml(cfg)
        self.meta = {"config_hash": config_hash(cfg), "data": data_fingerprint}  # compared on resume
        self.lora = cfg.model.base_model.peft.type == "lora"
        self.state_io = {}  # LoRA checkpoints hold the adapters and their optimizer state only, not the frozen base
        if self.lora:
            from backend.lora import lora_state_loader, lora_state_saver

            self.state_io = {
                "save": lora_state_saver(accelerator, model, optimizer),
                "load": lora_state_loader(accelerator, model, optimizer),
            }

    def save(self, step: int) -> Path:
        from backend.checkpoint import save_checkpoint

        t = self.cfg.training
        path = save_checkpoint(
            self.accelerator,
            self.checkpoints,
            step,
            self.config_yaml,
            t.checkpoint.keep,
            self.meta,
            self.state_io.get("save"),
        )
        if self.accelerator.is_main_process:
            self.events.emit("checkpoint", step, path=str(path))
        return path

    def export(self, step: int, name: str) -> Path:
        from backend.checkpoint import export_dtype, export_hf, prune_exports
        from backend.distributed import print0

        cfg, accelerator, t = self.cfg, self.accelerator, self.cfg.training
        model, tokenizer, out = self.model, self.tokenizer, self.run_dir / "export"
        if self.lora:  # export/<name>/adapter (PEFT) + export/<name> merged at every export or only the final one
            from backend.lora import export_lora

            paths = export_lora(accelerator, model, tokenizer, out, name, cfg, t.export.merge or name == "final")
            path, extra = paths["merged"] or paths["adapter"], {"adapter": str(paths["adapter"])}
        else:
            path = export_hf(accelerator, model, tokenizer, out, name, export_dtype(cfg), t.export.max_shard_size)
            extra = {}
        if accelerator.is_main_process:
            self.events.emit("export", step, path=str(path), **extra)
            for old in prune_exports(out, t.export.keep):  # training.export.keep; final is kept
                print0(f"export: removed {old} (training.export.keep: {t.export.keep})")
        return path


def fit(cfg, accelerator, events, stop: StopRequest) -> dict:
    """The training recipe: set up, resume, loop (train, log, validate, checkpoint, export), finish."""
    import torch
    from tqdm.auto import tqdm

    from backend import compat, resources
    from backend.checkpoint import latest_complete, load_checkpoint, step_dir_name
    from backend.config import check_world_size, config_hash
    from backend.distributed import describe, is_sharded, print0
    from backend.plan import disk_estimate
    from backend.preference import objective_of
    from backend.scaling import Probe

    run_dir = Path(cfg.run.experiment_dir)
    t, b, opt = cfg.training, cfg.batch, cfg.optimizer
    rank, world = accelerator.process_index, accelerator.num_processes
    grad_accum = check_world_size(cfg, world)  # batch_size / (micro_batch_size * world): micro-batches per rank

    # ---- data: the rows of step s are a pure function of (seed, s), so resuming at step s is exact
    data = load_data(cfg)
    train_data, sampler, val_data = data.train, data.sampler, data.validation
    val_sampler, val_iters = data.validation_sampler, data.validation_batches
    test_data = _test_split(cfg)
    # a restart continues only with the settings its checkpoint was made with (or run.resume: force)
    checkpoints = run_dir / "checkpoints"
    latest = latest_complete(checkpoints, warn=lambda message: None)
    resume_changes = [] if latest is None else compat.check_resume(latest, cfg, data.fingerprint, log=print0)

    # ---- model, tokenizer, optimizer (backend/scaling.py, backend/lora.py), then what the run writes
    probe = Probe(rank)  # measurements for the tests, only with SFT_STUDIO_PROBE set
    m = build_model(cfg, accelerator, {"training": train_data, "validation": val_data, "test": test_data}, probe)
    # prepare: wraps/shards the model (FSDP2 turns parameters into DTensors) and re-points the optimizer at them
    model, optimizer = accelerator.prepare(m.model, m.optimizer)
    if m.finish_loading is not None:
        m.finish_loading(model)  # FSDP: rank 0's weights scattered into every rank's shards
    model.train()
    probe.after_prepare(model)
    objective = objective_of(cfg)  # SFT, or DPO with its reference resolved (backend/preference.py)
    # DPO's precomputed reference: the initial model's log-probs of every answer, before any checkpoint is loaded
    references = _reference_passes(cfg, accelerator, model, data, test_data, objective, run_dir)
    outputs = RunOutputs(cfg, accelerator, events, model, optimizer, m.tokenizer, data.fingerprint)
    if references:
        from backend.preference import reference_digest

        outputs.meta["reference"] = {split: reference_digest(v) for split, v in references.items()}
        _check_reference(latest, outputs.meta["reference"], cfg)
    if cfg.training.objective == "dpo":  # where the prompts go decides the rows: a resume keeps it
        outputs.meta["share_prompt"] = bool(objective.share_prompt)
        _check_shared_prompts(latest, objective.share_prompt, cfg)
    sample_writer = None
    if val_iters and t.evaluations.samples:  # greedy answers to fixed validation prompts (backend/evaluate.py)
        from backend.evaluate import SampleWriter

        # prompts and references come from the prepared masks (the question, then the reply), also when the loss
        # reads every token (use_loss_masking_spans: no wraps the split in EveryTokenTrained)
        prompts_from = getattr(val_data, "dataset", val_data)
        samples, max_new = t.evaluations.samples, t.evaluations.sample_max_new_tokens
        sample_writer = SampleWriter(prompts_from, m.tokenizer, samples, max_new)

    # ---- resume from the newest complete checkpoint (a save cut short has no COMPLETE marker: skipped)
    start_step, resumed_from = 0, None
    latest = latest_complete(checkpoints, warn=print0)
    if latest is not None:
        start_step = load_checkpoint(accelerator, latest, outputs.state_io.get("load"))["step"]  # model, optimizer, RNG
        resumed_from = str(latest)
        print0(f"resuming from {latest} (step {start_step})")

    sharded = is_sharded(model)
    disk = disk_estimate(cfg, m.num_parameters, m.trainable_parameters)
    gib = resources.summarize_bytes
    print0(
        f"disk: {gib(disk['checkpoint_bytes'])} per checkpoint, {gib(disk['export_bytes'])} per export, "
        f"{gib(disk['total_bytes'])} in all (kept checkpoints and exports, backend.plan.disk_estimate)"
    )
    if accelerator.is_main_process:
        events.emit(
            "start",
            start_step,
            resumed_from=resumed_from,
            resume_changes=resume_changes,
            train_iters=t.train_iters,
            world_size=world,
            distributed_type=describe(accelerator)["distributed_type"],
            sharded=sharded,
            mixed_precision=str(accelerator.mixed_precision),
            attention=m.attention,
            attention_reason=m.attention_reason,
            num_parameters=m.num_parameters,
            trainable_parameters=m.trainable_parameters,
            peft=cfg.model.base_model.peft.type,
            objective=cfg.training.objective,
            **objective.describe(sampler),
            gradient_accumulation=grad_accum,
            training_documents=len(train_data),
            skipped_documents=len(sampler.skipped),
            skipped_tokens=int(sampler.tokens_skipped),
            validation_batches=val_iters,
            config_hash=config_hash(cfg),
            experiment_dir=str(run_dir),
            disk_bytes=disk,
            planned_peak_bytes=resources.planned_peak_bytes(cfg, world),  # the line the Train tab draws
        )

    # ---- the loop
    step, last_saved, stopped = start_step, start_step if latest is not None else None, False
    first_val = last_val = first_loss = last_loss = None
    tokens_per_step = b.batch_size * b.sequence_length  # positions through the model, padding included
    quiet = not accelerator.is_main_process
    bar = tqdm(total=t.train_iters, initial=start_step, desc="train", disable=quiet, dynamic_ncols=True)
    session_start = time.perf_counter()
    interval_trained, interval_time = 0, 0.0
    while step < t.train_iters:
        step_start = time.perf_counter()
        lr = lr_at(step, opt.learning_rate, t.train_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro_batches = [  # the objective's rows: packed documents, or whole pairs with their reference log-probs
            objective.collate(rows, train_data, b, references.get("training"))
            for rows in sampler.micro_batches(step, b.batch_size, b.micro_batch_size, rank, world)
        ]
        try:
            result = train_step(
                model,
                optimizer,
                accelerator,
                micro_batches,
                objective,
                opt.gradient_norm_clipping,
                on_micro_batch=lambda step=step: probe.micro_batch(step, model),
            )
        except torch.OutOfMemoryError as e:  # name the step, the peak, the plan's figure and its smallest fix
            raise resources.OutOfMemory(resources.oom_message(cfg, world, step + 1, e)) from e
        loss, grad_norm = result.loss, result.grad_norm
        step_fields = objective.report(result)  # trained_tokens (+ DPO: pairs, rewards, margin, accuracy, log-probs)
        global_count = step_fields["trained_tokens"]
        if result.overflow:
            print0(f"step {step + 1}: fp16 gradients overflowed; step skipped, loss scale lowered")
        elif not result.stepped and not result.trained_tokens:  # nothing to learn from: no loss to take a mean of
            print0(
                f"step {step + 1}: nothing in this step's rows is trained (every token of them is masked; e.g. rows "
                "cut from the token stream under data.truncate_documents: yes may hold only a prompt); step skipped"
            )
        elif not result.stepped:
            raise TrainingDiverged(
                f"step {step + 1}: loss is {loss} and gradient norm {grad_norm}; stopped before the optimizer "
                f"step, nothing saved. The last good checkpoint is {latest_complete(checkpoints, warn=print0)}. "
                f"Lower optimizer.learning_rate.base (now {opt.learning_rate.base}) or check the data."
            )
        probe.write()
        step += 1
        bar.update(1)
        interval_trained += global_count
        interval_time += time.perf_counter() - step_start  # training compute only: not validation or saving
        if math.isfinite(loss):  # a skipped step has none
            first_loss = loss if first_loss is None else first_loss
            last_loss = loss

        if step % t.logs.interval == 0 or step == t.train_iters:
            now = time.perf_counter()
            steps_in_interval = t.logs.interval if step % t.logs.interval == 0 else step % t.logs.interval
            elapsed = now - session_start
            eta = elapsed / (step - start_step) * (t.train_iters - step)
            machine = resources.sample(accelerator, run_dir)  # every rank: the GPU figures are gathered
            if accelerator.is_main_process:
                events.emit(
                    "train",
                    step,
                    loss=loss,
                    lr=lr,
                    grad_norm=grad_norm,
                    tokens_per_s=tokens_per_step * steps_in_interval / interval_time,
                    trained_tokens_per_s=interval_trained / interval_time,
                    elapsed=elapsed,
                    eta=eta,
                    **({"peak_memory_bytes": max(machine["gpu_peak_bytes"])} if "gpu_peak_bytes" in machine else {}),
                    **machine,
                    **step_fields,
                )
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            interval_trained, interval_time = 0, 0.0

        if val_iters and (step % t.evaluations.validation.interval == 0 or step == t.train_iters):
            val_loss, val_metrics = evaluate_objective(
                model, accelerator, val_sampler, val_data, cfg, val_iters, objective, references.get("validation")
            )
            first_val = val_loss if first_val is None else first_val
            last_val = val_loss
            val_metrics.pop("answer_tokens", None)
            if accelerator.is_main_process:
                events.emit("validation", step, loss=val_loss, batches=val_iters, **val_metrics)
            if sample_writer is not None:  # a collective: every rank generates (FSDP), rank 0 writes the event
                sample_writer.write(model, accelerator, events, step)
            bar.write(f"step {step}: validation loss {val_loss:.4f}") if accelerator.is_main_process else None

        # Stop (SIGTERM/SIGINT): every rank must take the same branch, so the flag is summed over ranks
        stopped = _global_sum(accelerator, [float(stop.requested)])[0] > 0 if world > 1 else stop.requested
        if (t.checkpoint.interval and step % t.checkpoint.interval == 0) or stopped or step == t.train_iters:
            outputs.save(step)
            last_saved = step
        if t.export.interval and step % t.export.interval == 0 and step != t.train_iters:
            outputs.export(step, step_dir_name(step))
        if stopped:
            print0(f"stop requested: saved a checkpoint at step {step}")
            break
    bar.close()

    test_loss = None
    if test_data is not None and not stopped:  # training.test_iters: once, at the end, on data.datasets.test
        test_loss, test_batches = _test_evaluation(model, accelerator, test_data, cfg, objective, references)
        if accelerator.is_main_process:
            events.emit("test", step, loss=test_loss, batches=test_batches)
        print0(f"test loss {test_loss:.4f} over {test_batches} batches")
    final_export = None
    if not stopped:
        if last_saved != step:  # e.g. resumed at the end: make sure the final state is saved
            outputs.save(step)
        final_export = str(outputs.export(step, "final"))
        if accelerator.is_main_process and len(t.export.formats) > 1:  # gguf: converters on the finished export
            from backend.export import convert_formats

            try:  # the run itself succeeded: a failed conversion is reported, never turned into a failed run
                converted = convert_formats(final_export, t.export.formats, t.export.gguf_quant)
                events.emit("converted", step, **converted)
            except Exception as e:  # noqa: BLE001 - GGUFError, a missing llama.cpp, a converter crash
                print0(
                    f"export: converting {final_export} failed ({type(e).__name__}: {e}); the HF export is fine, "
                    f"retry with `python -m backend.export {run_dir} --gguf`"
                )
                events.emit("converted", step, error=f"{type(e).__name__}: {e}")
    summary = {
        "stopped": stopped,
        "resumed_from": resumed_from,
        "first_loss": first_loss,
        "last_loss": last_loss,
        "first_validation_loss": first_val,
        "last_validation_loss": last_val,
        "test_loss": test_loss,
        "export": final_export,
        "sharded": sharded,
        "world_size": world,
        "experiment_dir": str(run_dir),
    }
    if accelerator.is_main_process:
        events.emit("end", step, **summary)
    return {"step": step, **summary}


def _split_turns_length(descriptor_path) -> int | None:
    """long_documents.sequence_length of the prepare that made this dataset when it split long conversations."""
    import yaml

    prepare_yaml = Path(descriptor_path).parent / "prepare_config.yaml"
    try:
        long_documents = (yaml.safe_load(prepare_yaml.read_text()) or {}).get("long_documents") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    return long_documents.get("sequence_length") if long_documents.get("mode") == "split_turns" else None


def _test_split(cfg):
    """The test split (training.test_iters > 0 with data.datasets.test), read as training reads its data."""
    if not cfg.training.test_iters or cfg.data.datasets.test is None:
        return None
    return read_split(cfg, cfg.data.datasets.test.path, "test")


def _test_evaluation(model, accelerator, test_data, cfg, objective, references) -> tuple[float, int]:
    """Mean loss (SFT: over the trained tokens; DPO: over the pairs) of ``training.test_iters`` test batches (at
    most one epoch of the split)."""
    sampler = packed_sampler(cfg, test_data)
    iters = evaluation_batches(cfg, sampler, cfg.training.test_iters, "test")
    loss, _ = evaluate_objective(model, accelerator, sampler, test_data, cfg, iters, objective, references.get("test"))
    return loss, iters


def _reference_passes(cfg, accelerator, model, data, test_data, objective, run_dir) -> dict:
    """training.dpo.reference: precompute: each split's reference log-probs (backend.preference.reference_pass),
    under ``run_dir/reference/``; {} for every other objective or reference."""
    if cfg.training.objective != "dpo" or getattr(objective, "reference", None) != "precompute":
        return {}
    from backend.compat import data_fingerprint
    from backend.distributed import print0
    from backend.preference import reference_pass

    pre = cfg.pretrained  # the initial model the values come from (and its dtype): a file made for another is redone
    model_key = {
        "pretrained": pre.path,
        "model_weights": pre.model_weights,
        "quantization": pre.quantization,
        "training_dtype": cfg.model.distributed.training_dtype,
        "seed": cfg.model.distributed.seed,
    }
    splits = {"training": (data.train, data.sampler), "validation": (data.validation, data.validation_sampler)}
    if test_data is not None:
        splits["test"] = (test_data, packed_sampler(cfg, test_data))
    out = {}
    for split, (dataset, sampler) in splits.items():
        if dataset is None:
            continue
        path = Path(run_dir) / "reference" / f"{split}.npy"
        key = {"data": data_fingerprint(dataset), **model_key}
        mbs = cfg.batch.micro_batch_size
        out[split] = reference_pass(model, accelerator, dataset, sampler, mbs, path, print0, key)
    return out


def _check_shared_prompts(latest, share_prompt: bool, cfg) -> None:
    """A DPO resume continues only with the rows its checkpoint was packed with: each pair's prompt placed once or
    not (training.dpo.share_prompt where the attention is sdpa_packed; use_flash_attention can change that on CUDA).
    A checkpoint that does not say (made before prompts were shared) placed every pair whole."""
    import json

    from backend.config import ConfigError

    if latest is None:
        return
    try:
        saved = bool(json.loads((Path(latest) / "meta.json").read_text()).get("share_prompt", False))
    except (OSError, ValueError):
        return
    if saved != bool(share_prompt) and cfg.run.resume != "force":
        how = ("each pair's prompt placed once", "each pair whole")
        raise ConfigError(
            [
                f"run.resume: {latest} was trained with {how[not saved]} in its rows and this run would pack "
                f"{how[not share_prompt]} (training.dpo.share_prompt: {'yes' if share_prompt else 'no'} with this "
                f"run's attention): set training.dpo.share_prompt: {'yes' if saved else 'no'}"
                + (" and model.base_model.transformer.use_flash_attention: no" if saved else "")
                + ", start a new run, or resume anyway with run.resume=force"
            ]
        )


def _check_reference(latest, digests: dict, cfg) -> None:
    """A resume continues only against the reference log-probs its checkpoint trained with."""
    import json

    from backend.config import ConfigError

    if latest is None:
        return
    try:
        saved = json.loads((Path(latest) / "meta.json").read_text()).get("reference")
    except (OSError, ValueError):
        saved = None
    if saved is not None and saved != digests and cfg.run.resume != "force":
        raise ConfigError(
            [
                f"run.resume: {latest} was trained against other reference log-probs ({saved} -> {digests}): the "
                f"reference under {Path(cfg.run.experiment_dir) / 'reference'} changed. Restore it, start a new run, "
                "or resume anyway with run.resume=force"
            ]
        )


def train(config, overrides=()) -> dict:
    """Run training; ``config`` is a TrainConfig, a YAML path or a dict. Returns the summary of the end event.

    Raises LockedError (another live run in experiment_dir), TrainingDiverged (NaN/inf), ConfigError, or what
    failed; every failure is written to events.jsonl as an "error" event first.
    """
    from backend.config import TrainConfig, dump_yaml, load_train_config
    from backend.distributed import build_accelerator, close_distributed
    from backend.events import EventLog, LockedError, RunLock

    cfg = config if isinstance(config, TrainConfig) else load_train_config(config, overrides)
    from backend.compat import check_machine

    # QLoRA needs CUDA + bitsandbytes (and no FSDP sharding over the processes launched), trackers their packages:
    # config errors, not crashes. WORLD_SIZE: what accelerate launch / torchrun started (absent: one process)
    check_machine(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    run_dir = Path(cfg.run.experiment_dir)
    accelerator = build_accelerator(cfg)
    events = EventLog(run_dir / "events.jsonl")
    lock = RunLock(run_dir)
    lock_error = None
    if accelerator.is_main_process:
        try:
            lock.acquire()
        except LockedError as e:
            lock_error = e
    # every rank must learn that rank 0 could not take the lock, or the others would wait in a collective forever
    locked_out = (
        _global_sum(accelerator, [1.0 if lock_error else 0.0])[0] > 0
        if accelerator.num_processes > 1
        else lock_error is not None
    )
    if locked_out:
        close_distributed(accelerator)
        raise lock_error or LockedError(f"{run_dir} is in use by another run (see {run_dir / 'LOCK'})")
    try:
        if accelerator.is_main_process:
            tmp = run_dir / "config.yaml.tmp"
            tmp.write_text(dump_yaml(cfg))
            tmp.replace(run_dir / "config.yaml")
        if cfg.run.trackers:  # the same scalars + the config to TensorBoard / wandb / MLflow (backend/trackers.py)
            from backend.trackers import start_trackers

            events = start_trackers(accelerator, cfg, events)
        with StopRequest() as stop:
            return fit(cfg, accelerator, events, stop)
    except BaseException as e:
        if accelerator.is_main_process:
            from backend.resources import OutOfMemory

            message = str(e) if isinstance(e, (TrainingDiverged, OutOfMemory)) else f"{type(e).__name__}: {e}"
            kind = {TrainingDiverged: "diverged", OutOfMemory: "out_of_memory"}.get(type(e), type(e).__name__)
            events.emit("error", _last_step(run_dir / "events.jsonl"), message=message, kind=kind)
        raise
    finally:
        if cfg.run.trackers:
            accelerator.end_training()  # flushes and closes every tracker
        lock.release()
        close_distributed(accelerator)  # before the interpreter exits: see backend/distributed.py


def _last_step(events_path) -> int:
    from backend.events import read_events

    events, _ = read_events(events_path)
    return max((e.get("step", 0) for e in events if isinstance(e.get("step"), int)), default=0)


def main(cfg) -> int:
    """run_cli's entry: exit code per the module docstring."""
    import gc

    try:
        return _exit_code(cfg)
    finally:  # a failed run's traceback held fit's frame (the FSDP model) through train's close_distributed
        gc.collect()


def _exit_code(cfg) -> int:
    from backend.events import LockedError

    try:
        train(cfg)
    except LockedError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_LOCKED
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        return EXIT_ERROR
    except Exception as e:  # noqa: BLE001 - the error event is written; show the traceback for the log
        from backend.config import ConfigError

        if isinstance(e, ConfigError):
            raise  # run_cli reports it (exit 2)
        traceback.print_exc()
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


if __name__ == "__main__":
    from backend.cli import run_cli

    run_cli(sys.argv[1:], "train", main, __doc__)
