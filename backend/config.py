"""Typed configuration for `python -m backend.prepare PREPARE.yaml` and `python -m backend.train TRAIN.yaml`.

One pydantic model per YAML section, nested exactly like the file (the guide's keys plus a few of ours). Defaults
live here and only here; every field carries a one-line description that the CLI help and the studio labels reuse.

    >>> cfg = load_train_config("assets/configs/guide_train.yaml", ["training.train_iters=10"])
    >>> cfg.optimizer.learning_rate.base, cfg.data.truncate_documents
    (2e-05, False)
    >>> load_train_config("assets/configs/guide_train.yaml", ["training.train_itrs=5"])
    Traceback (most recent call last):
    backend.config.ConfigError: assets/configs/guide_train.yaml: 1 problem in the config:
      - training.train_itrs: unknown key; did you mean 'train_iters'?

Decisions worth knowing (each check sits next to its fields below):
- `optimizer.learning_rate.decay_iterations` longer than `training.train_iters` is allowed: the learning rate
  simply never reaches `minimum`. This keeps `training.train_iters=10` usable as a smoke-test override of any
  recipe. `decay_iterations: null` means "decay over train_iters".
- Validation with `evaluations.validation.interval > 0` and `iterations > 0` but no validation dataset is an
  error (the user asked for something that cannot run); set `interval: 0` to turn validation off.
- `batch.truncate_documents` / `batch.use_loss_masking_spans` (older Fast-LLM locations) are accepted and moved to
  `data.truncate_documents` / `data.sampling.use_loss_masking_spans`; giving both with different values is an error.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import math
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "ConfigError",
    "PrepareConfig",
    "TrainConfig",
    "load_prepare_config",
    "load_train_config",
    "dump_yaml",
    "config_hash",
    "field_description",
    "get_field",
    "set_field",
    "iter_fields",
    "check_world_size",
    "gradient_accumulation_steps",
    "LEGACY_KEYS",
]


class ConfigError(ValueError):
    """Invalid configuration. `.problems` lists every problem, each `"<yaml.path>: <message>"`."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        head = f"{source}: " if source else ""
        n = len(self.problems)
        lines = [f"{head}{n} problem{'s' if n != 1 else ''} in the config:"] + [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


# ----------------------------------------------------------------------------------------------------------------
# Field types. Numbers reject booleans (YAML `yes` is True, and True silently becoming 1 hides a mistake);
# numeric strings such as "3e-3" (PyYAML 1.1 reads a float without a dot as a string) go through pydantic's lax mode.


def _not_bool(v: Any) -> Any:
    if isinstance(v, bool):
        raise ValueError(f"expected a number, got {v!r} (YAML reads yes/no/on/off as booleans)")
    return v


Int = Annotated[int, BeforeValidator(_not_bool)]
Float = Annotated[float, BeforeValidator(_not_bool)]


class Section(BaseModel):
    """Base of every YAML section: unknown keys are errors, no inf/nan, numbers given for text become text."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, coerce_numbers_to_str=True, validate_default=True)


def _fail(*problems: str) -> None:
    """Raise from a model validator; each problem is `"<key relative to this section>: <message>"`."""
    if problems:
        raise ValueError("\n".join(problems))


# ----------------------------------------------------------------------------------------------------------------
# Train config


def _dtype_alias(v: Any) -> Any:
    aliases = {"bfloat16": "bf16", "float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16"}
    return aliases.get(v, v) if isinstance(v, str) else v


class LogsConfig(Section):
    interval: Int = Field(1, ge=1, description="Log training metrics every N iterations.")


class ValidationConfig(Section):
    iterations: Int = Field(25, ge=0, description="Number of batches evaluated at each validation.")
    interval: Int = Field(0, ge=0, description="Validate every N iterations (0 = no validation).")


class EvaluationsConfig(Section):
    validation: ValidationConfig = Field(
        default_factory=ValidationConfig, description="Periodic loss on the validation dataset."
    )
    samples: Int = Field(
        0, ge=0, description="Greedy answers to this many fixed validation prompts at each validation (0 = none)."
    )
    sample_max_new_tokens: Int = Field(64, ge=1, description="Longest answer generated for each sample prompt.")


class CheckpointConfig(Section):
    interval: Int = Field(1000, ge=0, description="Save a resumable checkpoint every N iterations (0 = never).")
    keep: Int = Field(5, ge=1, description="Number of most recent checkpoints kept on disk.")


GGUF_QUANTS = ("f16", "bf16", "q8_0", "q4_k_m")  # the one list: backend.gguf, backend.export and the studio read it


class ExportConfig(Section):
    format: Literal["llama", "huggingface"] = Field(
        "llama", description="Export format: a Hugging Face Llama checkpoint ('llama' and 'huggingface' are the same)."
    )
    formats: list[Literal["hf", "gguf"]] = Field(
        ["hf"],
        description="Formats of the final export: hf (always written) and gguf (llama.cpp/Ollama, converted from it).",
    )
    gguf_quant: Literal[GGUF_QUANTS] = Field(
        "q8_0", description="GGUF weights: f16, bf16, q8_0 (converter outtypes) or q4_k_m (llama.cpp's quantizer)."
    )
    interval: Int = Field(0, ge=0, description="Export every N iterations (0 = only the final export).")
    keep: Int | None = Field(
        None, ge=0, description="Intermediate exports kept on disk, newest first (null = all; final always kept)."
    )
    dtype: Annotated[Literal["bf16", "fp32", "fp16"] | None, BeforeValidator(_dtype_alias)] = Field(
        None, description="Dtype of exported weights (null = the training dtype)."
    )
    max_shard_size: str = Field(
        "5GB", description="Largest safetensors shard of an export: a number and KB|MB|GB (or KiB|MiB|GiB), e.g. 5GB."
    )

    @field_validator("formats")
    @classmethod
    def _formats(cls, v: list[str]) -> list[str]:
        if "hf" not in v:  # every other format is converted from the finished HF export
            raise ValueError(f"{v} lacks hf: the HF export is always written, other formats are converted from it")
        return list(dict.fromkeys(v))

    @field_validator("max_shard_size")
    @classmethod
    def _shard_size(cls, v: str) -> str:
        # transformers reads a lowercase b as bits ("5gb" = 625 MB) and raises deep in save_pretrained on "5G"
        if not re.fullmatch(r"\d+(\.\d+)?\s*([KMGT]i?B)", v.strip()):
            raise ValueError(f"{v!r} is not a size like 5GB, 500MB or 2GiB (a number, then KB|MB|GB|KiB|MiB|GiB)")
        return v.strip()

    merge: bool = Field(
        True, description="LoRA: also write the merged full model at every export (no = only at the end)."
    )


class DPOConfig(Section):
    beta: Float = Field(0.1, gt=0, description="DPO beta: how far the policy may move from the reference (KL weight).")
    loss: Literal["sigmoid", "ipo", "simpo"] = Field(
        "sigmoid",
        description="Pair loss: sigmoid (DPO), ipo, or simpo (reference-free, length-normalized log-probs).",
    )
    reference: Literal["auto", "precompute", "adapters_off", "none"] = Field(
        "auto",
        description="Reference model: precompute (the initial model's log-probs, one pass before the first step), "
        "adapters_off (LoRA with adapters disabled), none (reference-free); auto = none for simpo, adapters_off for "
        "LoRA, else precompute.",
    )
    simpo_gamma: Float = Field(0.5, ge=0, description="SimPO's target reward margin (loss: simpo only).")
    share_prompt: bool = Field(
        True,
        description="Place each pair's prompt once in its row, the rejected answer attending to it (same log-probs, "
        "fewer tokens); applies with sdpa_packed attention (CPU, or use_flash_attention: no), else each answer "
        "carries its prompt.",
    )


class TrainingConfig(Section):
    objective: Literal["sft", "dpo"] = Field(
        "sft",
        description="sft = cross-entropy on the trained tokens; dpo = preference pairs (prepared chosen/rejected).",
    )
    dpo: DPOConfig = Field(default_factory=DPOConfig, description="Preference tuning (training.objective: dpo).")
    train_iters: Int = Field(1000, ge=0, description="Number of optimizer steps to train.")
    test_iters: Int = Field(0, ge=0, description="Batches of the test dataset evaluated at the end (0 = none).")
    logs: LogsConfig = Field(default_factory=LogsConfig, description="Logging of training metrics.")
    evaluations: EvaluationsConfig = Field(
        default_factory=EvaluationsConfig, description="Evaluations during training."
    )
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Resumable checkpoints.")
    export: ExportConfig = Field(
        default_factory=ExportConfig, description="Exports of the model in Hugging Face format."
    )


class BatchConfig(Section):
    micro_batch_size: Int = Field(1, ge=1, description="Packed rows per process per forward pass.")
    sequence_length: Int = Field(2048, gt=0, description="Tokens per packed row.")
    batch_size: Int = Field(8, ge=1, description="Packed rows per optimizer step, over all processes.")
    cross_document_attention: bool = Field(
        False, description="Let documents packed into one row attend to each other (false for SFT)."
    )

    @model_validator(mode="after")
    def _divisible(self):
        if self.batch_size % self.micro_batch_size:
            _fail(
                f"batch_size: {self.batch_size} is not divisible by batch.micro_batch_size "
                f"({self.micro_batch_size}); make batch_size a multiple of micro_batch_size"
            )
        return self


class DatasetConfig(Section):
    type: Literal["file"] = Field("file", description="Dataset kind: 'file' = a prepared dataset descriptor.")
    path: str = Field(..., min_length=1, description="Path of the fast_llm_config_<split>.yaml written by prepare.")


class DatasetsConfig(Section):
    training: DatasetConfig = Field(..., description="Prepared training dataset.")
    validation: DatasetConfig | None = Field(None, description="Prepared validation dataset (optional).")
    test: DatasetConfig | None = Field(
        None, description="Prepared test dataset, used by training.test_iters (optional)."
    )


class SamplingConfig(Section):
    use_loss_masking_spans: bool = Field(True, description="Train only on tokens marked trained (assistant replies).")
    seed: Int = Field(1234, description="Seed of the per-epoch document shuffle.")
    packing: Literal["best_fit", "greedy"] = Field(
        "best_fit", description="Packing strategy: best_fit (dense) or greedy (the guide's next-fit in shuffled order)."
    )
    packing_window: Int = Field(1000, ge=1, description="Documents considered together by best_fit packing.")


class DataConfig(Section):
    datasets: DatasetsConfig = Field(..., description="Prepared datasets by split.")
    truncate_documents: bool = Field(
        False, description="Cut documents across rows (yes) or start a new row and skip over-long documents (no)."
    )
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="How documents become rows.")


class LearningRateConfig(Section):
    base: Float = Field(1e-5, gt=0, description="Peak learning rate, reached after warmup.")
    minimum: Float = Field(0.0, ge=0, description="Learning rate at the end of the decay.")
    decay_style: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Shape of the decay after warmup."
    )
    decay_iterations: Int | None = Field(
        None, ge=1, description="Iterations from 0 to the end of the decay (null = training.train_iters)."
    )
    warmup_iterations: Int = Field(0, ge=0, description="Iterations of linear warmup from 0 to base.")

    @model_validator(mode="after")
    def _consistent(self):
        problems = []
        if self.minimum > self.base:
            problems.append(f"minimum: {self.minimum} is larger than base ({self.base})")
        if (
            self.decay_style != "constant"
            and self.decay_iterations is not None
            and self.warmup_iterations > self.decay_iterations
        ):
            problems.append(
                f"warmup_iterations: {self.warmup_iterations} is larger than decay_iterations "
                f"({self.decay_iterations}); warmup must end before the decay does"
            )
        _fail(*problems)
        return self


class OptimizerConfig(Section):
    weight_decay: Float = Field(0.01, ge=0, description="AdamW weight decay.")
    beta_1: Float = Field(0.9, ge=0, lt=1, description="AdamW beta 1.")
    beta_2: Float = Field(0.999, ge=0, lt=1, description="AdamW beta 2.")
    gradient_norm_clipping: Float = Field(1.0, ge=0, description="Clip the global gradient norm to this (0 = off).")
    learning_rate: LearningRateConfig = Field(default_factory=LearningRateConfig, description="Learning-rate schedule.")


class PretrainedConfig(Section):
    format: Literal["llama", "huggingface"] = Field("llama", description="Checkpoint format of the pretrained model.")
    path: str = Field(..., min_length=1, description="Pretrained model: a local directory or a hub id.")
    model_weights: bool = Field(True, description="Load the weights (no = same architecture, random weights).")
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none", description="QLoRA: load the frozen base in 4-bit NF4 or 8-bit (bitsandbytes, CUDA; LoRA only)."
    )


class TransformerConfig(Section):
    use_flash_attention: bool = Field(
        True, description="Use flash-attention 2 when installed and on CUDA (else SDPA, with a log line)."
    )


class PeftConfig(Section):
    type: Literal["none", "lora"] = Field("none", description="Parameter-efficient finetuning: none or lora.")
    rank: Int = Field(8, ge=1, description="LoRA rank r of the adapter matrices.")
    alpha: Float = Field(16.0, gt=0, description="LoRA alpha: adapters are scaled by alpha / rank.")
    dropout: Float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA adapters' input.")
    target_modules: str | list[str] = Field(
        "all-linear",
        description="Modules that get adapters: 'all-linear' (every decoder linear, never the LM head) "
        "or a list of module names (e.g. [q_proj, v_proj]).",
    )

    @field_validator("target_modules", mode="before")
    @classmethod
    def _names(cls, v: Any) -> Any:
        """ "q_proj, v_proj" (a text box) -> [q_proj, v_proj]; "all-linear" stays; an empty list is an error."""
        if isinstance(v, str) and v.strip() != "all-linear":
            v = [name for name in v.replace(",", " ").split() if name]
        if isinstance(v, list) and not v:
            raise ValueError("is empty; give module names (e.g. [q_proj, v_proj]) or all-linear")
        return v


class BaseModelConfig(Section):
    transformer: TransformerConfig = Field(default_factory=TransformerConfig, description="Transformer options.")
    peft: PeftConfig = Field(default_factory=PeftConfig, description="LoRA adapters instead of full finetuning.")
    cross_entropy_impl: Literal["fused", "torch"] = Field(
        "fused", description="Loss: fused (chunked, logits only at trained positions) or torch (plain reference)."
    )


class MultiStageConfig(Section):
    zero_stage: Literal[0, 1, 2, 3] = Field(
        3, description="ZeRO stage: 0 = replicate, 1/2 = shard optimizer+gradients, 3 = also shard weights (FSDP)."
    )
    activation_checkpointing: bool = Field(
        False, description="Recompute each decoder layer's activations in backward (less memory, ~1/3 more compute)."
    )


class DistributedConfig(Section):
    timeout: Float = Field(600.0, gt=0, description="Seconds a collective may wait before the run fails.")
    training_dtype: Annotated[Literal["bf16", "fp32", "fp16"], BeforeValidator(_dtype_alias)] = Field(
        "fp32", description="Compute dtype: bf16, fp32 or fp16."
    )
    seed: Int = Field(1234, description="Seed of weight init (model_weights: no) and dropout.")


class ModelConfig(Section):
    base_model: BaseModelConfig = Field(default_factory=BaseModelConfig, description="Model architecture options.")
    multi_stage: MultiStageConfig = Field(default_factory=MultiStageConfig, description="Sharding (ZeRO/FSDP).")
    distributed: DistributedConfig = Field(default_factory=DistributedConfig, description="Distributed settings.")


class RunConfig(Section):
    experiment_dir: str = Field(
        "runs/experiment", min_length=1, description="Directory for config, events, checkpoints and exports."
    )
    num_processes: Int = Field(1, ge=1, description="Processes the studio launches (headless: the launcher decides).")
    resume: Literal["auto", "force"] = Field(
        "auto", description="auto: resume only if the checkpoint's config matches; force: resume despite changes."
    )
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list, description="Experiment trackers that also get the logged scalars and the config."
    )


# Older Fast-LLM locations, accepted and moved: old dotted path -> new dotted path.
LEGACY_KEYS = {
    "batch.truncate_documents": "data.truncate_documents",
    "batch.use_loss_masking_spans": "data.sampling.use_loss_masking_spans",
}


class TrainConfig(Section):
    """The train YAML (the guide's Step 4)."""

    training: TrainingConfig = Field(
        default_factory=TrainingConfig, description="Iterations, logs, evaluations, checkpoints."
    )
    batch: BatchConfig = Field(default_factory=BatchConfig, description="Batch shape.")
    data: DataConfig = Field(..., description="Datasets and sampling.")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig, description="AdamW and learning rate.")
    pretrained: PretrainedConfig = Field(..., description="Model to start from.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Model and distributed options.")
    run: RunConfig = Field(default_factory=RunConfig, description="Where the run writes.")

    @model_validator(mode="before")
    @classmethod
    def _legacy(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data, problems = _move_legacy(data)
            _fail(*problems)
        return data

    @model_validator(mode="after")
    def _consistent(self):
        problems = []
        procs = self.run.num_processes
        per_step = self.batch.micro_batch_size * procs
        if self.batch.batch_size % per_step:
            problems.append(
                f"batch.batch_size: {self.batch.batch_size} is not divisible by batch.micro_batch_size "
                f"({self.batch.micro_batch_size}) x run.num_processes ({procs}) = {per_step}"
            )
        val = self.training.evaluations.validation
        if val.interval > 0 and val.iterations > 0 and self.data.datasets.validation is None:
            problems.append(
                "training.evaluations.validation.interval: validation is on but "
                "data.datasets.validation is not set; add it or set the interval to 0"
            )
        peft = self.model.base_model.peft
        if self.pretrained.quantization != "none" and peft.type != "lora":
            problems.append(
                f"pretrained.quantization: {self.pretrained.quantization} needs model.base_model.peft.type: lora "
                "(a quantized base cannot be trained directly)"
            )
        problems += _dpo_problems(self)
        if self.training.test_iters > 0 and self.data.datasets.test is None:
            problems.append("training.test_iters: is > 0 but data.datasets.test is not set")
        lr = self.optimizer.learning_rate
        if (
            lr.decay_style != "constant"
            and lr.decay_iterations is None
            and lr.warmup_iterations > self.training.train_iters
        ):
            problems.append(
                f"optimizer.learning_rate.warmup_iterations: {lr.warmup_iterations} is larger than "
                f"the decay (training.train_iters = {self.training.train_iters})"
            )
        _fail(*problems)
        return self


def _dpo_problems(cfg: TrainConfig) -> list[str]:
    """Settings that cannot go with training.objective: dpo (pairs are packed whole, answers alone trained)."""
    if cfg.training.objective != "dpo":
        return []
    d, problems = cfg.training.dpo, []
    if d.reference == "adapters_off" and cfg.model.base_model.peft.type != "lora":
        problems.append(
            "training.dpo.reference: adapters_off needs model.base_model.peft.type: lora (the base with its adapters "
            "disabled is the reference); use precompute for full finetuning"
        )
    if d.loss == "simpo" and d.reference not in ("auto", "none"):
        problems.append(f"training.dpo.reference: simpo is reference-free; set none (or auto), not {d.reference}")
    if not cfg.data.sampling.use_loss_masking_spans:
        problems.append(
            "data.sampling.use_loss_masking_spans: no would sum the prompt's log-probs into each answer's; "
            "DPO needs yes"
        )
    if cfg.batch.cross_document_attention:
        problems.append("batch.cross_document_attention: the chosen answer would see the rejected one; DPO needs no")
    if cfg.data.truncate_documents:
        problems.append("data.truncate_documents: a pair is packed whole, never cut; set no (longer pairs are skipped)")
    return problems


def quantized_sharding_problem(cfg: TrainConfig, world_size: int, where: str = "the world size") -> str | None:
    """Why a 4/8-bit base cannot run under FSDP sharding over ``world_size`` processes, or None when it can.

    FSDP2 shards and unshards bitsandbytes' ``Params4bit`` as plain tensors and loses their ``quant_state``
    (accelerate#3874, open): the forward would fail or compute garbage. One process, or DDP (zero_stage 0/1: every
    process holds the whole quantized base), works.

    >>> from types import SimpleNamespace as NS
    >>> cfg = NS(pretrained=NS(quantization="4bit"), model=NS(multi_stage=NS(zero_stage=3)))
    >>> quantized_sharding_problem(cfg, 1) is None, quantized_sharding_problem(cfg, 8)[:62]
    (True, 'pretrained.quantization: 4bit cannot be sharded by FSDP over 8')
    """
    quantization = cfg.pretrained.quantization
    if quantization == "none" or world_size <= 1 or int(cfg.model.multi_stage.zero_stage) < 2:
        return None
    return (
        f"pretrained.quantization: {quantization} cannot be sharded by FSDP over {world_size} processes ({where}; "
        f"model.multi_stage.zero_stage: {cfg.model.multi_stage.zero_stage}): FSDP2 turns the quantized weights into "
        "plain tensors and loses their quantization state (accelerate#3874). Use model.multi_stage.zero_stage=0 "
        "(DDP: each GPU holds the whole quantized base), or one process, or pretrained.quantization=none with "
        "zero_stage 3 (LoRA on a sharded bf16/fp32 base)"
    )


def gradient_accumulation_steps(cfg: TrainConfig, world_size: int) -> int:
    """batch_size / (micro_batch_size * world_size); call check_world_size first."""
    return cfg.batch.batch_size // (cfg.batch.micro_batch_size * world_size)


def check_world_size(cfg: TrainConfig, world_size: int) -> int:
    """Check the batch against the launcher's real world size; return the gradient accumulation steps.

    >>> cfg = load_train_config("assets/configs/guide_train.yaml", ["batch.batch_size=32", "batch.micro_batch_size=1"])
    >>> check_world_size(cfg, 8)
    4
    """
    problem = quantized_sharding_problem(cfg, world_size, "the launcher's")
    if problem:
        raise ConfigError([problem])
    per_step = cfg.batch.micro_batch_size * world_size
    if world_size < 1 or cfg.batch.batch_size % per_step:
        raise ConfigError(
            [
                f"batch.batch_size: {cfg.batch.batch_size} is not divisible by batch.micro_batch_size "
                f"({cfg.batch.micro_batch_size}) x world size ({world_size}) = {per_step}; change "
                f"batch_size or the number of processes"
            ]
        )
    return gradient_accumulation_steps(cfg, world_size)


# ----------------------------------------------------------------------------------------------------------------
# Prepare config


class PrepareDatasetConfig(Section):
    path: str = Field(
        ..., min_length=1, description="Dataset: a hub id, a save_to_disk directory, or a .jsonl/.json/.parquet file."
    )
    split: str = Field("train", description="Split to load from the dataset.")
    trust_remote_code: bool = Field(False, description="Allow the dataset's own loading script to run.")
    field: str = Field("text", description="Column with the text (guide form, with loss_masking_spans).")
    loss_masking_spans: str | None = Field(
        None, description="Column with inclusive character spans NOT trained (set = the guide's text+spans form)."
    )
    conversations_field: str | None = Field(
        None, description="Column with the conversation (null = 'conversations', then 'messages')."
    )
    data_files: Any = Field(None, description="Files passed to datasets.load_dataset (text, list, or split -> files).")
    name: str | None = Field(None, description="Dataset configuration name passed to datasets.load_dataset.")

    @field_validator("data_files")
    @classmethod
    def _data_files(cls, v: Any) -> Any:
        def files(x):
            return isinstance(x, str) or (isinstance(x, list) and all(isinstance(i, str) for i in x))

        if (
            v is None
            or files(v)
            or (isinstance(v, dict) and all(isinstance(k, str) and files(x) for k, x in v.items()))
        ):
            return v
        raise ValueError(f"expected a file, a list of files or a mapping split -> files, got {v!r}")


class TokenizerConfig(Section):
    path: str = Field(..., min_length=1, description="Tokenizer: a local directory or a hub id.")


class MaskingConfig(Section):
    mode: Literal["auto", "delimiters"] = Field(
        "auto", description="auto = assistant spans from the chat template; delimiters = between the two strings."
    )
    start_delimiter: str | None = Field(None, description="Text that opens a trained span (mode: delimiters).")
    end_delimiter: str | None = Field(None, description="Text that closes a trained span (mode: delimiters).")

    @model_validator(mode="after")
    def _delimiters(self):
        if self.mode == "delimiters":
            _fail(
                *[
                    f"{k}: required (non-empty) when mode is 'delimiters'"
                    for k in ("start_delimiter", "end_delimiter")
                    if not getattr(self, k)
                ]
            )
        return self


class ChatConfig(Section):
    template: str | None = Field(
        None, description="Chat template: null = the tokenizer's own, a file path, or Jinja text."
    )
    masking: MaskingConfig = Field(default_factory=MaskingConfig, description="How the trained spans are found.")
    train_on: Literal["all", "last"] = Field("all", description="Train on all assistant turns or only the last one.")
    train_on_eot: bool = Field(True, description="Train the end-of-turn marker after each assistant reply.")
    final_eot: Literal["append", "leave"] = Field(
        "append",
        description="A final reply the template leaves open (no end-of-turn marker): append the template's "
        "between-turns marker and train it, or leave it open.",
    )
    train_on_tool_calls: bool = Field(
        True, description="Train assistant turns that call tools (no = they stay masked context)."
    )
    reasoning: Literal["as_rendered", "every_turn"] = Field(
        "as_rendered",
        description="Reasoning traces: as_rendered = train what the template writes (Qwen3-family templates drop "
        "the reasoning of turns before the last user message); every_turn = each assistant turn whose reasoning "
        "the template drops becomes its own document, earlier turns as masked context (needs masking.mode: auto).",
    )

    @model_validator(mode="after")
    def _every_turn_needs_turns(self):
        if self.reasoning == "every_turn" and self.masking.mode == "delimiters":
            _fail(
                "reasoning: every_turn needs masking.mode: auto (delimiter spans are not tied to messages, so which "
                "turns' reasoning the template drops is not known and no document would be made); set "
                "reasoning: as_rendered or masking.mode: auto"
            )
        return self

    def to_masking(self) -> dict:
        """Keyword arguments for `backend.chat.Masking(**cfg.chat.to_masking())`."""
        m = self.masking
        return {
            "mode": m.mode,
            "start_delimiter": m.start_delimiter,
            "end_delimiter": m.end_delimiter,
            "train_on": self.train_on,
            "train_on_eot": self.train_on_eot,
            "final_eot": self.final_eot,
            "train_on_tool_calls": self.train_on_tool_calls,
            "reasoning": self.reasoning,
        }


class ReportConfig(Section):
    sequence_length: Int | None = Field(4096, ge=1, description="Count documents longer than this (null = no count).")
    examples: Int = Field(3, ge=0, description="Example rows shown per problem in the prepare report.")
    max_skipped_share: Float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="Warn loudly (summary and prepare_report.json) when more than this share of input rows is skipped.",
    )


class LongDocumentsConfig(Section):
    mode: Literal["keep", "split_turns"] = Field(
        "keep",
        description="Conversations longer than sequence_length: keep = one document as today (training skips or "
        "cuts it per data.truncate_documents); split_turns = several documents cut at turn boundaries, earlier "
        "turns as masked context.",
    )
    sequence_length: Int = Field(
        4096, ge=2, description="Longest document written with split_turns (set it to batch.sequence_length)."
    )


class PrepareConfig(Section):
    """The prepare YAML (the guide's Step 3, plus the one-step chat form)."""

    output_path: str = Field(..., min_length=1, description="Directory for the prepared dataset.")
    loading_workers: Int = Field(1, ge=1, description="Processes loading the dataset.")
    tokenize_workers: Int = Field(1, ge=1, description="Processes rendering and tokenizing.")
    saving_workers: Int = Field(1, ge=1, description="Processes writing shards.")
    seed: Int = Field(1234, description="Seed of the split shuffle.")
    dataset: PrepareDatasetConfig = Field(..., description="Source dataset.")
    tokenizer: TokenizerConfig = Field(..., description="Tokenizer (and its chat template).")
    splits: dict[str, Float] = Field(
        default_factory=lambda: {"training": 0.998, "validation": 0.002},
        description="Split name -> fraction of documents; fractions sum to 1.",
    )
    chat: ChatConfig = Field(default_factory=ChatConfig, description="One-step form: conversations -> trained spans.")
    report: ReportConfig = Field(default_factory=ReportConfig, description="Prepare report options.")
    long_documents: LongDocumentsConfig = Field(
        default_factory=LongDocumentsConfig, description="What to do with conversations longer than a sequence."
    )

    @field_validator("splits")
    @classmethod
    def _splits(cls, v: dict[str, float]) -> dict[str, float]:
        problems = [f"{k}: must be >= 0, got {x}" for k, x in v.items() if x < 0]
        if not v:
            problems.append("at least one split is required, e.g. training: 1.0")
        elif not problems and not math.isclose(sum(v.values()), 1.0, abs_tol=1e-6):
            problems.append(f"fractions must sum to 1, got {sum(v.values()):.6g}")
        _fail(*problems)
        return v


# ----------------------------------------------------------------------------------------------------------------
# Schema walking (used by error messages, field_description, the CLI help and the studio)


def _unwrap(ann: Any) -> Any:
    """Optional[Section] / Annotated[...] -> the Section class or the plain type."""
    while typing.get_origin(ann) is Annotated:
        ann = typing.get_args(ann)[0]
    if typing.get_origin(ann) in (Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(args) == 1:
            return _unwrap(args[0])
    return ann


def _is_section(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def _section_at(cls: type[BaseModel], parts: list) -> type[BaseModel] | None:
    for p in parts:
        f = cls.model_fields.get(p) if _is_section(cls) else None
        if f is None:
            return None
        cls = _unwrap(f.annotation)
    return cls if _is_section(cls) else None


def iter_fields(cls: type[BaseModel], prefix: str = ""):
    """Yield (dotted_path, FieldInfo) for every leaf key, in YAML order."""
    for name, f in cls.model_fields.items():
        t = _unwrap(f.annotation)
        if _is_section(t):
            yield from iter_fields(t, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", f


def field_description(cls: type[BaseModel], path: str) -> str:
    """One-line description of a dotted key: field_description(TrainConfig, "batch.batch_size")."""
    parts = path.split(".")
    description = ""
    for i, p in enumerate(parts):
        if not _is_section(cls) or p not in cls.model_fields:
            if i > 0 and typing.get_origin(cls) is dict:  # a key inside a mapping (e.g. splits.training)
                return description
            raise KeyError(f"{path}: unknown key")
        f = cls.model_fields[p]
        description = f.description or ""
        cls = _unwrap(f.annotation)
    return description


def _leaf_index(cls: type[BaseModel]) -> dict[str, list[str]]:
    index: dict[str, list[str]] = {}
    for name, f in cls.model_fields.items():
        t = _unwrap(f.annotation)
        index.setdefault(name, [])
        if _is_section(t):
            for k, paths in _leaf_index(t).items():
                index.setdefault(k, []).extend(f"{name}.{p}" for p in paths)
        index[name].insert(0, name)
    return index


# ----------------------------------------------------------------------------------------------------------------
# Errors: pydantic's -> "<yaml.path>: <message>" in plain words


def _fmt(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


def _join(loc) -> str:
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _unknown_key(root: type[BaseModel], loc: tuple) -> str:
    parent = _section_at(root, list(loc[:-1]))
    key = str(loc[-1])
    if parent is None:
        return "unknown key"
    valid = list(parent.model_fields)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        return f"unknown key; did you mean '{close[0]}'?"
    elsewhere = [p for p in _leaf_index(root).get(key, []) if p != _join(loc)]
    if elsewhere:
        return f"unknown key here; it belongs at {' or '.join(elsewhere)}"
    return f"unknown key; valid keys here: {', '.join(valid)}"


_TYPE_WORDS = {
    "float": "a number",
    "int": "a whole number",
    "bool": "yes/no (true/false)",
    "string": "text",
    "dict": "a section of key: value lines",
    "model": "a section of key: value lines",
}


def _message(root: type[BaseModel], e: dict) -> list[tuple[tuple, str]]:
    t, loc, got = e["type"], tuple(e["loc"]), e.get("input")
    ctx = e.get("ctx") or {}
    if t == "extra_forbidden":
        return [(loc, _unknown_key(root, loc))]
    if t == "missing":
        return [(loc, "required key is missing")]
    if t == "value_error":  # ours: one or more "relative.key: message" lines
        out = []
        for line in str(ctx.get("error", e["msg"])).split("\n"):
            key, sep, text = line.partition(": ")
            if sep and " " not in key:
                out.append((loc + tuple(key.split(".")), text))
            else:
                out.append((loc, line))
        return out
    if t == "literal_error":
        return [(loc, f"expected one of {ctx.get('expected', '')}, got {_fmt(got)}")]
    if t in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[t]
        bound = next(iter(ctx.values()), "")
        return [(loc, f"must be {op} {bound}, got {_fmt(got)}")]
    if t in ("string_too_short",):
        return [(loc, "must not be empty")]
    if t == "finite_number":
        return [(loc, f"expected a finite number, got {_fmt(got)}")]
    if t == "int_from_float":
        return [(loc, f"expected a whole number, got {_fmt(got)}")]
    for kind, words in _TYPE_WORDS.items():
        if t.startswith(kind + "_") or t == kind + "_type":
            hint = (
                " (YAML reads yes/no/on/off as booleans: quote it)"
                if isinstance(got, bool) and kind == "string"
                else ""
            )
            return [(loc, f"expected {words}, got {_fmt(got)}{hint}")]
    return [(loc, f"{e['msg']}, got {_fmt(got)}")]


def _problems(root: type[BaseModel], err: ValidationError) -> list[str]:
    out = []
    for e in err.errors():
        for loc, msg in _message(root, e):
            line = f"{_join(loc) or '(top level)'}: {msg}"
            if line not in out:
                out.append(line)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses duplicate keys (plain safe_load keeps the last one silently)."""


def _construct_mapping(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError([f"file not found: {path} (current directory: {Path.cwd()})"], str(path))
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        what = " ".join(str(x) for x in (getattr(exc, "context", None), getattr(exc, "problem", None)) if x) or str(exc)
        raise ConfigError([f"{where}: YAML syntax error: {what}"], str(path)) from None


def _get_path(d: dict, parts: list[str]) -> tuple[bool, Any]:
    for p in parts:
        if not isinstance(d, dict) or p not in d:
            return False, None
        d = d[p]
    return True, d


def _move_legacy(raw: dict) -> tuple[dict, list[str]]:
    """Move batch.truncate_documents / batch.use_loss_masking_spans to their data.* places (a copy)."""
    batch = raw.get("batch")
    if not isinstance(batch, dict) or not any(k.split(".")[1] in batch for k in LEGACY_KEYS):
        return raw, []
    raw = copy.deepcopy(raw)
    problems = []
    for old, new in LEGACY_KEYS.items():
        key = old.split(".")[1]
        if key not in raw["batch"]:
            continue
        value = raw["batch"].pop(key)
        parts = new.split(".")
        present, current = _get_path(raw, parts)
        if present and current != value:
            problems.append(
                f"{old}: {value!r} conflicts with {new}: {current!r}; {old} is the older location "
                f"of {new}, keep only {new}"
            )
            continue
        d = raw
        for p in parts[:-1]:
            if not isinstance(d.get(p, {}), dict):
                break
            d = d.setdefault(p, {})
        else:
            d[parts[-1]] = value
    return raw, problems


def _apply_overrides(raw: dict, overrides, root: type[BaseModel]) -> tuple[dict, list[str]]:
    raw = copy.deepcopy(raw)
    problems = []
    for item in overrides:
        key, sep, text = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"override {item!r}: expected key=value, e.g. training.train_iters=100")
            continue
        if root is TrainConfig and key in LEGACY_KEYS:  # an override of an old location sets the new one
            key = LEGACY_KEYS[key]
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            problems.append(f"{key}: override value {text!r} is not valid YAML ({getattr(exc, 'problem', exc)})")
            continue
        parts = key.split(".")
        d = raw
        for i, p in enumerate(parts[:-1]):
            if d.get(p) is None:
                d[p] = {}
            if not isinstance(d[p], dict):
                problems.append(f"{'.'.join(parts[: i + 1])}: is {d[p]!r}, not a section; cannot set {key}")
                break
            d = d[p]
        else:
            d[parts[-1]] = value
    return raw, problems


def _load(cls: type[BaseModel], path_or_dict, overrides) -> Any:
    source = None
    if isinstance(path_or_dict, (str, Path)):
        source = str(path_or_dict)
        raw = _read_yaml(Path(path_or_dict))
    elif isinstance(path_or_dict, BaseModel):
        raw = path_or_dict.model_dump(mode="json")
    else:
        raw = path_or_dict
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"(top level): expected a mapping of sections, got {_fmt(raw)}"], source)
    raw, problems = _apply_overrides(raw, overrides or (), cls)
    if cls is TrainConfig:
        raw, legacy = _move_legacy(raw)
        problems += legacy
        if legacy:  # keep validating the rest so that every problem shows at once
            for old in LEGACY_KEYS:
                raw.get("batch", {}).pop(old.split(".")[1], None)
    try:
        cfg = cls.model_validate(raw)
    except ValidationError as err:
        problems += _problems(cls, err)
        cfg = None
    if problems:
        raise ConfigError(problems, source)
    return cfg


def load_prepare_config(path_or_dict, overrides=()) -> PrepareConfig:
    """Load and validate a prepare YAML (path) or dict, with `a.b.c=value` overrides; raises ConfigError."""
    return _load(PrepareConfig, path_or_dict, overrides)


def load_train_config(path_or_dict, overrides=()) -> TrainConfig:
    """Load and validate a train YAML (path) or dict, with `a.b.c=value` overrides; raises ConfigError."""
    return _load(TrainConfig, path_or_dict, overrides)


# ----------------------------------------------------------------------------------------------------------------
# Dump, hash, dotted access


def dump_yaml(cfg: BaseModel) -> str:
    """Nested YAML of the resolved config, in field order; loads back to an equal config."""
    return yaml.safe_dump(
        cfg.model_dump(mode="json"), sort_keys=False, default_flow_style=False, allow_unicode=True, width=120
    )


def config_hash(cfg: BaseModel) -> str:
    """16 hex digits of sha256 over canonical JSON (sorted keys): same values -> same hash, whatever the key order."""
    text = json.dumps(cfg.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def get_field(cfg: BaseModel, path: str) -> Any:
    """get_field(cfg, "optimizer.learning_rate.base") -> 2e-05 (mapping keys allowed: "splits.training")."""
    obj: Any = cfg
    for p in path.split("."):
        if isinstance(obj, BaseModel) and p in type(obj).model_fields:
            obj = getattr(obj, p)
        elif isinstance(obj, dict) and p in obj:
            obj = obj[p]
        else:
            raise KeyError(f"{path}: unknown key '{p}'")
    return obj


def set_field(cfg: BaseModel, path: str, value: Any) -> BaseModel:
    """A new validated config with one dotted key changed; raises ConfigError (names the key) if invalid."""
    raw = cfg.model_dump(mode="json")
    parts = path.split(".")
    d = raw
    for p in parts[:-1]:
        if d.get(p) is None:
            d[p] = {}
        d = d[p]
    d[parts[-1]] = value
    return _load(type(cfg), raw, ())
