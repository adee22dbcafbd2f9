"""Memory plan before launch: will this training config fit on these GPUs, and if not, what is the smallest change?

    python -m backend.plan TRAIN.yaml [--gpus N] [--gpu-memory GB] [--model-config DIR] [key=value ...]
    from backend.plan import plan_memory; plan = plan_memory(cfg, world_size=8, gpu_memory_gb=80); print(plan.table())

Reads only the model's config.json (no weights, no torch for Llama-family models), so the studio can call it as a
field changes. Every figure is bytes PER GPU at the steady state of training (optimizer state exists, step 2 on).
GB here means GiB (2**30 bytes): an "80 GB" H100 holds 80 GiB.

Notation: N parameters, W = world size, b = bytes of the compute dtype (bf16/fp16 2, fp32 4), T = tokens per
micro-batch (micro_batch_size x sequence_length), h hidden, q = heads x head_dim, kv = kv_heads x head_dim,
i intermediate, V vocabulary, P_layer parameters of one decoder layer, P_tail = final norm + LM head (the embedding
when tied): accelerate 1.15's FSDP2 unit that stays gathered from its forward to its backward, K = trained positions of
a micro-batch (the fused loss runs the LM head only there; the plan takes K = T, the worst case).

How this repository trains (backend/distributed.py, backend/train.py, backend/loss.py), and so what is counted:

parameters   sharded: the fp32 master copy, 4N/W under FSDP2 (zero_stage 2/3 with W > 1), 4N otherwise (DDP and one
             process replicate it; zero_stage 1 is DDP here: nothing of it is sharded).
             gathered: the compute copy. zero_stage 3 (reshard after forward): accelerate 1.15 makes each decoder
             layer a unit, the embedding another (resharded after its forward), [final norm, LM head] a third kept
             gathered from its forward to its backward with its all-gather buffer held too, and the root holds no
             parameter. At both peaks (the loss, the start of the backward) no layer is gathered: b x 2 P_tail
             (LoRA: + one decoder layer's b-byte copy, which the fake step finds still alive at the loss).
             zero_stage 2 keeps every layer gathered from forward to backward: b x N. Without FSDP and
             with mixed precision, autocast caches a b-byte copy of every Linear weight for the forward and backward
             of a micro-batch: b x (linear parameters). fp32 without FSDP: 0.
gradients    fp32 like the master, sharded as it is: 4N/W under FSDP2 (reduce-scattered every micro-batch, so no
             unsharded accumulation), 4N otherwise.
optimizer    AdamW: two fp32 moments, 8 bytes per trained parameter, sharded as the parameters are.
activations  saved for backward, per decoder layer per token (measured op by op on transformers' Llama and
             pinned by tests/test_plan.py):
                 RMSNorm x2      4h (the fp32 input of pow) + r h (normalized, cast back) + the Linear input
                                  (r h when r = b, else one b-byte autocast copy per Linear reading it: 3 + 2)
                 attention       b (3q + 2kv) + 4 heads: q, k, v, the attention output, the o_proj input, the
                                  fp32 log-sum-exp
                 MLP             4 b i: gate, silu(gate), up, their product
             r is the residual stream's dtype: 4 when the master weights are the compute weights (one process
             or DDP under autocast, or fp32), b under FSDP2 mixed precision. Times T and the layer count.
             With model.multi_stage.activation_checkpointing each layer keeps only its input (r h per token)
             and one layer at a time is recomputed in backward (its full activations, counted once).
             Outside the layers: the final norm (4h + r h per token), token ids, cos/sin (8 x head_dim per token).
             LoRA: frozen norms and Linears do not save their inputs for a weight gradient; under mixed precision
             each adapted projection keeps its own b-byte copy of its input (PEFT casts it to the fp32 adapter,
             autocast casts it back), so 3 + 2 copies per layer like autocast's, less one r h per norm, plus b x
             rank per token for each adapted Linear (the output of A). Not under FSDP2: it gathers the adapters in
             the compute dtype, PEFT's cast is a no-op and the adapters share the one input they read. QLoRA's
             residual stream is fp32 (r = 4: PEFT upcasts the norms). With model.base_model.peft.dropout > 0
             (PEFT: lora_A(dropout(x))), each adapted Linear saves a dropped-out b-byte copy of its input (the 3 + 2
             copies per layer under FSDP2 too; in one process it replaces the autocast copy) and native_dropout's
             1-byte mask: 5 h + q + i more per token per layer.
logits / CE  training.objective: dpo reads each answer's log-probability (backend.preference.document_logps): the LM
             head on the K trained positions, its input saved (K h r), the (K, V) logits (b-byte under autocast, then
             an fp32 copy) and log_softmax's fp32 output, saved for backward: K h r + 4 K V saved, + (4 + b) K V more
             during the forward under mixed precision. The precomputed reference costs no GPU memory in training (a
             float64 per document on the host); adapters_off runs a no-grad forward first (nothing saved, less than
             the policy's transient).
             the fused loss (cross_entropy_impl: fused) saves dL/dhidden (K h b) and dL/dW_lm_head (V h, in the
             LM head's compute dtype) for backward; at the end of its forward it holds the fp32 sum of dL/dW (added
             in place, addmm_) and that copy ((4 + b) V h) and one chunk of logits (c x V fp32, c =
             FUSED_CHUNK_ELEMENTS // V rows: 128 MiB) plus its b-byte copy (the product is b-byte under autocast). No
             dL/dW when the LM head is frozen (LoRA). cross_entropy_impl: torch holds the full logits: T V (b + 4 + 4).
comm         FSDP2: at the start of the backward, the LM head's gradient reduce-scattered in fp32 by its unit (4 V h
             input + 4 V h / W output; the loss's saved dL/dW has become it, only dL/dhidden is still saved), or
             later one layer's unsharded gradient (b, plus its fp32 copy for the fp32 reduction), the larger;
             the layers' backward temporaries come after the LM head's buffers are freed (0 at that peak).
             DDP: gradient buckets, a second copy of the gradients
             (4N). One process: 0.
backward     gradient temporaries of the layer being differentiated: taken as one layer's activations (an upper
             estimate), plus one layer's recompute under activation checkpointing. LoRA (measured on the real step,
             tests/test_plan_fake_step.py): frozen layers compute no weight gradient; without checkpointing the
             backward's peak is the final norm's fp32 backward (5 x 4 T h), with it one recomputed layer at its
             forward transient.
layer transient  LoRA: the forward's peak is inside the last layer's MLP, where PEFT casts the down projection's
             input (the product, b T i, which no frozen Linear saves) to fp32 for its adapter (4 T i under mixed
             precision) while the MLP's input, the residual and the attention output are still referenced (4 b T h).
             Under FSDP2 (adapters gathered in the compute dtype) and in fp32 there is no cast: the adapter saves the
             product itself (an activation), and the transient is the 4 b T h alone. QLoRA: 4 r T h, the residual
             stream is fp32; the product too (4 T i), cast to b by bitsandbytes for the base (b T i). LoRA dropout:
             the dropped-out fp32 copy of the cast input, 4 T i more (without the cast: the product, b T i, which
             the adapter no longer saves).

optimizer step  the foreach AdamW (CUDA's default) makes an fp32 temporary of the whole second moment: 4 bytes per
             trained parameter, sharded as the parameters are.

peak = the largest of three phases (MemoryPlan.phases):
       forward   parameters (sharded + gathered) + optimizer + activations + the loss's forward transient or
                 (LoRA) the layer transient, the larger
       backward  parameters (sharded + gathered) + optimizer + activations + logits/CE saved + comm + backward
       step      parameters (sharded) + optimizer + gradients + the optimizer step's temporary
       Gradients are added to the forward and backward only when a step has several micro-batches per GPU (they are
       set to None after each step, so the first micro-batch's forward has none). fits when peak <= 90% of the GPU
       memory: the rest is the CUDA context, cuBLAS/NCCL workspaces and allocator fragmentation.

Quantized frozen base (QLoRA, pretrained.quantization): 4bit = NF4 with double quantization, 0.5 byte per weight
plus the quantization constants (an 8-bit absmax per 64 weights and an fp32 scale per 256 of those: 1/64 +
4/16384 byte per weight); 8bit = 1 byte per weight plus an fp32 scale per output row. Only the decoder Linears are
quantized; embeddings, norms and the LM head stay in the compute dtype; a dequantized copy of the largest Linear
is a transient of the forward/backward.

Host RAM at load: full finetuning, and LoRA under FSDP with several processes: rank 0 alone materializes the fp32
model (FSDP2 shards and casts it), other ranks hold none. LoRA otherwise: every process loads the frozen base
(backend.lora.load_lora_model) in the training dtype; a 4-bit base is
quantized shard by shard onto the GPU, so one safetensors shard of the stored bf16 checkpoint: min(2 N, 5 GB).
QLoRA: PEFT's prepare_model_for_kbit_training upcasts every parameter that is not quantized (embeddings, norms, LM
head) to fp32.
Disk: a checkpoint is the fp32 parameters and the optimizer state of the trained parameters (12 bytes each);
an export is every parameter in training.export.dtype (default: the training dtype). LoRA checkpoints hold the
adapters only; LoRA exports are the adapters plus, with export.merge, the merged model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

GIB = 2**30
USABLE_FRACTION = 0.9  # of the GPU memory: the rest is CUDA context, workspaces, fragmentation
FUSED_CHUNK_ELEMENTS = 2**25  # backend.loss.FUSED_CHUNK_ELEMENTS (not imported: that module needs torch)
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
CHECKPOINT_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size of a released checkpoint ("5GB")
QUANT_BYTES = {"4bit": 0.5 + 1 / 64 + 4 / (64 * 256), "8bit": 1.0}
LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3"}
ROOT = Path(__file__).resolve().parent.parent
MODEL_CONFIGS = ROOT / "assets" / "model_configs"  # config.json of the models the docs name, by hub id

__all__ = ["ModelShape", "MemoryPlan", "model_shape", "plan_memory", "disk_estimate", "main"]


# ----------------------------------------------------------------------------------------------------------------
# The model's shape, from config.json


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a decoder-only transformer; `num_params` is exact."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    attention_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: an RMSNorm over head_dim on q and k
    num_params_override: int | None = None  # exact count for architectures the formulas below do not describe
    source: str = dataclasses.field(default="", compare=False)  # set when the config is not the model's own copy

    @property
    def q(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of each Linear in one decoder layer: q, k, v, o, gate, up, down (what LoRA all-linear adapts)."""
        h, q, kv, i = self.hidden, self.q, self.kv, self.intermediate
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]

    @property
    def layer_linear_params(self) -> int:
        return sum(a * b for a, b in self.linears())

    @property
    def layer_params(self) -> int:
        bias = (self.q + 2 * self.kv) * self.attention_bias + (2 * self.intermediate + self.hidden) * self.mlp_bias
        return self.layer_linear_params + bias + 2 * self.hidden + 2 * self.head_dim * self.qk_norm

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tied else self.vocab * self.hidden

    @property
    def root_params(self) -> int:
        """The FSDP root unit: embeddings, final norm, LM head."""
        return self.embedding_params + self.hidden + self.lm_head_params

    @property
    def num_params(self) -> int:
        if self.num_params_override is not None:
            return self.num_params_override
        return self.root_params + self.layers * self.layer_params


def _config_dir(path: str | Path) -> Path | None:
    p = Path(path)
    if (p / "config.json").is_file():
        return p
    if p.name == "config.json" and p.is_file():
        return p.parent
    return None


def shipped_config(name: str | Path) -> Path | None:
    """The config.json this repository ships for hub id `name` (assets/model_configs/<id>/config.json), or None.

    >>> shipped_config("meta-llama/Llama-3.1-8B").relative_to(MODEL_CONFIGS).as_posix()
    'meta-llama/Llama-3.1-8B/config.json'
    >>> shipped_config("someone/unknown-model") is None
    True
    """
    path = MODEL_CONFIGS / str(name) / "config.json"
    return path if str(name) and ".." not in str(name) and path.is_file() else None


def model_shape(path: str | Path) -> ModelShape:
    """Shape of the model at `path`: a directory holding config.json, the file itself, or a hub id (its config from
    the local Hugging Face cache or the hub; when the hub cannot be reached, decided in seconds by
    backend.hub.require_hub, or refuses the config (a gated model without a token), the copy shipped in
    assets/model_configs/, and then `.source` says so). Llama-family models are read from the JSON alone; anything
    else is built on the meta device (needs torch and transformers; no weights) to count its parameters exactly."""
    local = _config_dir(path)
    source = ""
    if local is not None:
        raw = json.loads((local / "config.json").read_text(encoding="utf-8"))
    else:
        try:
            from transformers import AutoConfig

            from backend.hub import require_hub

            require_hub(str(path), "pretrained.path")
            raw = AutoConfig.from_pretrained(str(path)).to_dict()
        except Exception as e:  # noqa: BLE001 - any failure means the same thing to the user
            shipped = shipped_config(path)
            if shipped is None:
                raise FileNotFoundError(
                    f"pretrained.path {path}: no config.json here, and it could not be read from the Hugging Face "
                    f"hub or its cache ({e}). Pass --model-config DIR (a directory with the model's config.json) or "
                    "download the model first."
                ) from None
            raw = json.loads(shipped.read_text(encoding="utf-8"))
            reason = str(e).split(". ")[0]
            source = f"the config.json shipped in {shipped.relative_to(ROOT)} (the hub gave none: {reason})"
    raw = {**raw, **raw.get("text_config", {})}  # multimodal wrappers keep the decoder under text_config
    try:
        h, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
        shape = ModelShape(
            hidden=h,
            layers=int(raw["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or h // heads),
            intermediate=int(raw["intermediate_size"]),
            vocab=int(raw["vocab_size"]),
            tied=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", raw.get("model_type") == "qwen2")),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            qk_norm=raw.get("model_type") == "qwen3",
        )
    except KeyError as e:
        raise ValueError(f"pretrained.path {path}: config.json has no {e.args[0]!r}; not a decoder-only LM?") from None
    if raw.get("model_type") not in LLAMA_LIKE:
        shape = dataclasses.replace(shape, num_params_override=_count_on_meta(raw))
    return dataclasses.replace(shape, source=source)


def _count_on_meta(raw: dict) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**{k: v for k, v in raw.items() if k != "text_config"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------------
# Disk


def _export_dtype(cfg) -> str:
    return cfg.training.export.dtype or cfg.model.distributed.training_dtype


def _adapter_params(shape: ModelShape, cfg) -> int:
    """LoRA parameters: rank x (in + out) for each adapted Linear of each layer."""
    peft = cfg.model.base_model.peft
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    targets = names if peft.target_modules == "all-linear" else [n for n in names if n in peft.target_modules]
    per_layer = sum(peft.rank * (a + b) for n, (a, b) in zip(names, shape.linears(), strict=True) if n in targets)
    return per_layer * shape.layers


def disk_estimate(cfg, num_params: int, trainable_params: int | None = None) -> dict:
    """Disk that checkpoints and exports of this run will take at most (the newest `keep` of each).

    checkpoint_bytes: one checkpoint (fp32 trained parameters + AdamW moments: 12 bytes each; for LoRA the frozen
    base is not saved). export_bytes: one export (every parameter in the export dtype; LoRA: adapters, plus the
    merged model when export.merge). total_bytes: kept checkpoints x checkpoint_bytes + kept exports x export_bytes.
    """
    t = cfg.training
    lora = cfg.model.base_model.peft.type == "lora"
    trained = trainable_params if trainable_params is not None else num_params
    checkpoint = 12 * trained
    export_one = DTYPE_BYTES[_export_dtype(cfg)] * num_params
    if lora:
        export_one = DTYPE_BYTES[_export_dtype(cfg)] * trained + (export_one if t.export.merge else 0)
    # train.py saves every checkpoint.interval steps and at the end; exports every export.interval steps (not
    # at the end) plus the final one
    saves = math.ceil(t.train_iters / t.checkpoint.interval) if t.checkpoint.interval else 1
    checkpoints_kept = min(t.checkpoint.keep, max(1, saves))
    intermediate = (t.train_iters - 1) // t.export.interval if t.export.interval and t.train_iters else 0
    exports_kept = min(intermediate, t.export.keep) if t.export.keep is not None else intermediate
    final = export_one
    if lora and not t.export.merge:  # the merged model is written at the end in any case
        final += DTYPE_BYTES[_export_dtype(cfg)] * num_params
    return {
        "checkpoint_bytes": checkpoint,
        "export_bytes": export_one,
        "checkpoints_kept": checkpoints_kept,
        "exports_kept": exports_kept + 1,
        "total_bytes": checkpoints_kept * checkpoint + exports_kept * export_one + final,
    }


# ----------------------------------------------------------------------------------------------------------------
# The plan


@dataclasses.dataclass
class MemoryPlan:
    """Bytes per GPU of each part (see the module docstring for each formula)."""

    world_size: int
    num_params: int
    trainable_params: int
    params_sharded: int
    params_gathered: int
    gradients: int
    optimizer: int
    activations: int  # with the config's activation_checkpointing
    activations_checkpointed: int
    activations_full: int
    loss_forward: int  # logits / CE transient during the loss forward
    loss_saved: int  # what the loss keeps for backward
    comm: int
    backward: int  # gradient temporaries of one layer (+ its recompute with checkpointing)
    host_ram_bytes: int
    disk: dict
    checkpointing: bool
    zero_stage: int
    sharded: bool
    tokens: int  # per micro-batch
    loss_backward: int | None = None  # what the loss still holds at the backward's peak (None: loss_saved)
    accumulation: int = 1  # micro-batches per optimizer step on one GPU: gradients live from the second one on
    layer_transient: int = 0  # LoRA: what a layer's forward holds beyond what it saves (its MLP, PEFT's fp32 cast)
    optimizer_step: int = 0  # the foreach AdamW's fp32 temporary of the whole second moment, at the step
    gpu_memory_bytes: int | None = None
    suggestions: list[str] = dataclasses.field(default_factory=list)
    model_source: str = ""  # where the model's config came from when it was not the model's own (ModelShape.source)
    objective: str = "sft"  # training.objective: dpo holds the trained positions' full logits (no fused loss)

    @property
    def _loss_note(self) -> str:
        if self.objective == "dpo":
            return "DPO: log-probs of every answer token (full logits of the trained positions)"
        return "fused loss: chunked LM head"

    @property
    def static_bytes(self) -> int:
        return self.params_sharded + self.params_gathered + self.gradients + self.optimizer

    @property
    def phases(self) -> dict[str, int]:
        """Bytes held at the peak of each phase of a step: the end of the forward (inside the loss), the start of
        the backward, the optimizer step. Gradients exist in the forward and backward only when an earlier
        micro-batch of the step made them (set_to_none after each step)."""
        held = self.params_sharded + self.optimizer + (self.gradients if self.accumulation > 1 else 0)
        compute = held + self.params_gathered + self.activations
        return {
            "forward": compute + max(self.loss_forward, self.layer_transient),
            "backward": compute
            + (self.loss_saved if self.loss_backward is None else self.loss_backward)
            + self.comm
            + self.backward,
            "optimizer step": self.params_sharded + self.optimizer + self.gradients + self.optimizer_step,
        }

    @property
    def peak_phase(self) -> str:
        phases = self.phases
        return max(phases, key=phases.get)

    @property
    def peak_bytes(self) -> int:
        return max(self.phases.values())

    @property
    def fits(self) -> bool | None:
        if self.gpu_memory_bytes is None:
            return None
        return self.peak_bytes <= USABLE_FRACTION * self.gpu_memory_bytes

    @property
    def suggestion(self) -> str | None:
        return self.suggestions[0] if self.suggestions else None

    def parts(self) -> list[tuple[str, int, str]]:
        """(name, bytes, how) in display order."""
        ckpt = "on" if self.checkpointing else "off"
        where = f"/ {self.world_size} GPUs" if self.sharded else "replicated"
        lora = self.trainable_params < self.num_params
        copy = (
            (
                "zero_stage 3: the LM head's unit and its all-gather buffer"
                + (", and one decoder layer still gathered at the loss" if lora else "")
                if self.zero_stage == 3
                else "zero_stage 2: every layer"
            )
            if self.sharded
            else "autocast casts of the trained weights"
        )
        comm = "reduce-scatter of one unit's gradient" if self.sharded else "gradient buckets"
        comm = comm if self.comm else "none: one process"
        return [
            (
                "parameters (frozen base + fp32 adapters)" if lora else "parameters (fp32 master)",
                self.params_sharded,
                where,
            ),
            ("parameters (gathered compute copy)", self.params_gathered, copy),
            ("gradients", self.gradients, f"fp32, trained parameters, {where}"),
            ("optimizer state", self.optimizer, f"AdamW 2 x fp32, {where}"),
            (f"activations (checkpointing {ckpt})", self.activations, f"{self.tokens:,} tokens per micro-batch"),
            ("logits / cross-entropy", max(self.loss_forward, self.loss_saved), self._loss_note),
            ("communication buffers", self.comm, comm),
            ("backward temporaries", self.backward, self._backward_note),
            ("optimizer step temporaries", self.optimizer_step, "foreach AdamW: fp32 copy of the second moment"),
        ] + ([("layer forward transient", self.layer_transient, self._transient_note)] if self.layer_transient else [])

    @property
    def _backward_note(self) -> str:
        if self.sharded:  # _plan: the backward's peak is the LM head unit's reduce-scatter (comm)
            return "none at the LM head's reduce-scatter (the layers' come later)"
        if not self.layer_transient:  # full finetuning
            return "one layer and its recompute" if self.checkpointing else "one layer"
        if self.checkpointing:
            return "one recomputed layer and its forward transient"
        return "the final norm's fp32 backward (frozen layers: no weight gradients)"

    @property
    def _transient_note(self) -> str:
        if self.sharded:  # FSDP2 gathers the adapters in the compute dtype: PEFT casts nothing
            return "LoRA: the hidden-size values around the last layer's MLP"
        return "LoRA: the MLP's down input and PEFT's fp32 cast of it"

    def _host_where(self) -> str:
        if self.trainable_params < self.num_params and not self.sharded:  # LoRA without FSDP: every process loads
            return "per process (LoRA without FSDP: every process loads the frozen base)"
        return "on rank 0, none on the others"

    def lines(self) -> list[str]:
        out = [
            f"memory plan per GPU: {self.num_params:,} parameters ({self.trainable_params:,} trained), "
            f"{self.world_size} GPU{'s' if self.world_size != 1 else ''}, zero_stage {self.zero_stage}"
        ]
        if self.model_source:
            out.append(f"  model config: {self.model_source}")
        out += [f"  {name:38s} {_gib(b):>9s}  {how}" for name, b, how in self.parts()]
        out.append(f"  {'peak':38s} {_gib(self.peak_bytes):>9s}  at the {self.peak_phase}")
        out.append(
            f"  activations: {_gib(self.activations_full)} without checkpointing, "
            f"{_gib(self.activations_checkpointed)} with"
        )
        out.append(f"  host RAM at load: {_gib(self.host_ram_bytes)} {self._host_where()}")
        d = self.disk
        out.append(
            f"  disk: {_gib(d['checkpoint_bytes'])} per checkpoint (x{d['checkpoints_kept']} kept), "
            f"{_gib(d['export_bytes'])} per export (x{d['exports_kept']}), {_gib(d['total_bytes'])} in all"
        )
        if self.gpu_memory_bytes is not None:
            usable = USABLE_FRACTION * self.gpu_memory_bytes
            verdict = "FITS" if self.fits else "DOES NOT FIT"
            out.append(
                f"  {verdict} in {_gib(self.gpu_memory_bytes)} per GPU ({_gib(usable)} usable: "
                f"{USABLE_FRACTION:.0%}, the rest is CUDA context, workspaces, fragmentation)"
            )
            if not self.fits:
                out.append(
                    f"  smallest change that fits: {self.suggestion}"
                    if self.suggestion
                    else "  no single change found that fits"
                )
        return out

    def table(self) -> str:
        """Markdown table (the studio's Config tab)."""
        unit, size = ("GiB", GIB) if self.peak_bytes >= GIB else ("MiB", 2**20)
        rows = [f"| part | {unit} per GPU | how |", "|---|---:|---|"]
        rows += [f"| {name} | {b / size:.2f} | {how} |" for name, b, how in self.parts()]
        rows.append(f"| **peak** | **{self.peak_bytes / size:.2f}** | at the {self.peak_phase} |")
        head = "\n".join(self.lines()[-2:]) if self.gpu_memory_bytes is not None and not self.fits else ""
        if self.gpu_memory_bytes is not None and self.fits:
            head = self.lines()[-1]
        d = self.disk
        tail = (
            f"\n\nActivations: {self.activations_full / GIB:.2f} GiB without checkpointing, "
            f"{self.activations_checkpointed / GIB:.2f} GiB with. Host RAM at load: "
            f"{self.host_ram_bytes / GIB:.1f} GiB {self._host_where()}. Disk: {d['total_bytes'] / GIB:.1f} GiB "
            f"({d['checkpoint_bytes'] / GIB:.1f} GiB per checkpoint, {d['export_bytes'] / GIB:.1f} GiB per export)."
        )
        if self.model_source:
            tail += f" Model config: {self.model_source}."
        return (head.strip() + "\n\n" if head else "") + "\n".join(rows) + tail


def _gib(b: float) -> str:
    return f"{b / GIB:.2f} GiB" if b >= GIB / 4 or b == 0 else f"{b / 2**20:.1f} MiB"


def _activation_parts(
    shape: ModelShape,
    tokens: int,
    b: int,
    r: int,
    lora_rank: int | None,
    peft_cast: bool = True,
    dropout: bool = False,
) -> tuple[int, int, int]:
    """(per decoder layer, per layer with checkpointing, outside the layers) saved bytes for `tokens` tokens."""
    h, q, kv, i = shape.hidden, shape.q, shape.kv, shape.intermediate
    # one b-byte copy of the normalized input per Linear reading it: autocast's cast when the residual stream is
    # wider than the compute dtype, and PEFT's (it casts each adapter's input to the fp32 adapter, autocast casts
    # it back) for every adapted projection when peft_cast (mixed precision with fp32 adapters: not under FSDP2,
    # whose gathered adapters are already in the compute dtype). LoRA dropout: each adapter reads its own dropped-out
    # copy (b bytes: of the normalized input where nothing else copies it, else in place of the cast) and saves a
    # 1-byte mask of it (native_dropout's bool mask)
    copies = r != b or (lora_rank is not None and (peft_cast or dropout))

    def norm(linears_reading: int) -> int:
        normalized = 0 if lora_rank is not None else r * h  # saved for the (trained) norm weight's gradient
        linear_input = linears_reading * b * h if copies else r * h
        return 4 * h + 4 + normalized + linear_input

    per_token = norm(3) + norm(2) + b * (3 * q + 2 * kv) + 4 * shape.heads + 4 * b * i
    if lora_rank is not None:
        per_token += 7 * b * lora_rank
        per_token += (5 * h + q + i) if dropout else 0  # the masks: q, k, v, gate, up read h; o reads q; down i
    outside = tokens * (8 + 4 * h + 4 + r * h + 8 * shape.head_dim)
    return tokens * per_token, tokens * r * h, outside


def plan_memory(cfg, world_size: int, gpu_memory_gb: float | None = None, shape: ModelShape | None = None):
    """The memory plan of `cfg` (a TrainConfig) on `world_size` GPUs; fits/suggestions when gpu_memory_gb is given.

    `shape` defaults to model_shape(cfg.pretrained.path)."""
    shape = shape or model_shape(cfg.pretrained.path)
    plan = _plan(cfg, world_size, shape)
    plan.model_source = shape.source
    if gpu_memory_gb is not None:
        plan.gpu_memory_bytes = int(gpu_memory_gb * GIB)
        if not plan.fits:
            plan.suggestions = _suggestions(cfg, world_size, shape, plan.gpu_memory_bytes)
    return plan


def _plan(cfg, world: int, shape: ModelShape) -> MemoryPlan:
    dtype = cfg.model.distributed.training_dtype
    b = DTYPE_BYTES[dtype]
    mixed = dtype != "fp32"
    stage = int(cfg.model.multi_stage.zero_stage)
    ckpt = bool(cfg.model.multi_stage.activation_checkpointing)
    fsdp = stage >= 2 and world > 1
    ddp = not fsdp and world > 1
    peft, quant = cfg.model.base_model.peft, cfg.pretrained.quantization
    lora = peft.type == "lora"
    tokens = cfg.batch.micro_batch_size * cfg.batch.sequence_length
    n = shape.num_params
    L = shape.layers
    shard = world if fsdp else 1
    # accelerate 1.15's FSDP2 units: each decoder layer, the embedding (resharded after forward), and the tail
    # [final norm, LM head] (tied: + the embedding), gathered from its forward to its backward with its all-gather
    # buffer held as well (2 x b per parameter); the root holds nothing
    tail = (shape.lm_head_params or shape.embedding_params) + shape.hidden

    if lora:
        trained = _adapter_params(shape, cfg)
        decoder_linear = L * shape.layer_linear_params
        # the unquantized base is loaded in the training dtype, or fp32 under multi-process FSDP (backend/lora.py);
        # QLoRA keeps the decoder Linears quantized and upcasts the rest to fp32 (prepare_model_for_kbit_training)
        other_bytes = 4 if (quant != "none" or fsdp) else b
        base_bytes = other_bytes * (n - decoder_linear)
        base_bytes += decoder_linear * (QUANT_BYTES[quant] if quant != "none" else other_bytes)
        if quant == "8bit":
            base_bytes += 4 * L * sum(out for _, out in shape.linears())
        params_sharded = (base_bytes + 4 * trained) // shard
        # compute copy: autocast's b-byte cast of each adapter (fp32 masters); FSDP gathers layer by layer
        params_gathered = b * trained if mixed else 0
        if fsdp:
            per_layer_bytes = base_bytes // max(1, L) + 4 * trained // max(1, L)
            params_gathered = (0 if stage == 3 else L * per_layer_bytes) + 2 * b * tail
            if stage == 3:
                # measured on the fake step (LoRA r8, FSDP x 8, 2 and 32 layers' widths): one decoder layer's b-byte
                # all-gather output is still alive at the loss under a frozen base, though not in full finetuning;
                # why FSDP2 keeps it is not established, so it is counted (the plan was 4-7% low without it)
                params_gathered += b * shape.layer_params
        if quant != "none":  # dequantized copy of the largest Linear, forward and backward
            params_gathered += b * max(a * c for a, c in shape.linears())
        r = 4 if quant != "none" else b  # QLoRA: the upcast fp32 norms make the residual stream fp32
    else:
        trained = n
        params_sharded = 4 * n // shard
        if fsdp:
            params_gathered = 2 * b * tail if stage == 3 else b * n
        else:
            params_gathered = b * (L * shape.layer_linear_params + shape.lm_head_params) if mixed else 0
            if mixed and shape.tied:
                params_gathered += b * shape.embedding_params  # the tied LM head's cast
        r = b if fsdp else 4
    gradients = 4 * trained // shard
    optimizer = 8 * trained // shard

    # PEFT casts each adapter's input to lora_A.weight.dtype: the fp32 adapters under autocast (one process, DDP);
    # FSDP2 gathers them in its param_dtype, the compute dtype, so there the cast is a no-op and each adapter reads
    # (and saves) its input itself
    peft_cast = lora and mixed and not fsdp
    dropout = lora and peft.dropout > 0
    layer, layer_ckpt, outside = _activation_parts(shape, tokens, b, r, peft.rank if lora else None, peft_cast, dropout)
    activations_full = L * layer + outside
    activations_ckpt = L * layer_ckpt + outside
    activations = activations_ckpt if ckpt else activations_full
    backward = layer * (2 if ckpt else 1)
    layer_transient = 0
    if lora:
        # measured on the real step (tests/fake_step.py: PEFT on the 8B widths, fake tensors): the forward's peak is
        # inside the last layer's MLP, where the down projection's input (the product, b T i, saved by no frozen
        # Linear) is cast to fp32 for its adapter (PEFT, 4 T i) while the hidden-size values around it are still
        # referenced (the MLP's input, the residual, the attention block's output: 4 b T h). Without PEFT's cast
        # (FSDP2, fp32) the adapter saves the product itself (counted in the activations) and makes no copy.
        # QLoRA: those hidden-size values are fp32 (r = 4: the upcast norms, and bitsandbytes returns its output in
        # its input's dtype), and so is the product, which bitsandbytes casts to b for the base (4 + b T i again)
        # A frozen layer computes no weight gradient in backward: without checkpointing the backward's peak is the
        # final norm's fp32 backward (5 x 4 T h) before any layer has freed its activations; with checkpointing it
        # is one recomputed layer at that same transient
        # LoRA dropout (PEFT: lora_A(dropout(x)) on the cast input): the dropped-out fp32 copy beside the cast (4 T
        # i more); without the cast the adapter saves the dropped copy, and the product becomes transient (b T i)
        product = (b + 4 + 4 * dropout) if peft_cast else (b if dropout else 0)
        layer_transient = tokens * shape.intermediate * product + 4 * r * tokens * shape.hidden
        backward = layer + layer_transient if ckpt else 5 * 4 * tokens * shape.hidden

    head_trained = not lora  # LoRA never adapts the LM head: no dL/dW
    w_bytes = b if fsdp or lora else 4  # the LM head weight as the loss sees it
    vh = shape.vocab * shape.hidden
    if cfg.training.objective == "dpo":
        # backend.preference.document_logps: the LM head on the K trained positions (its input saved, K h r), their
        # logits (b-byte under autocast, then the fp32 copy) and log_softmax's fp32 output, saved for backward
        k = tokens  # worst case: every position trained
        loss_saved = k * shape.hidden * r + k * shape.vocab * 4
        loss_forward = loss_saved + k * shape.vocab * (4 if mixed else 0) + (k * shape.vocab * b if mixed else 0)
    elif cfg.model.base_model.cross_entropy_impl == "fused":
        chunk = min(tokens, max(1, FUSED_CHUNK_ELEMENTS // shape.vocab))
        k = tokens  # worst case: every position trained
        loss_saved = k * shape.hidden * r + (vh * w_bytes if head_trained else 0)
        # dL/dW: the fp32 sum (addmm_ in place) and, at the end, its w_bytes copy that backward gets
        loss_forward = (
            k * shape.hidden * r + ((4 + w_bytes) * vh if head_trained else 0) + chunk * shape.vocab * (4 + b)
        )
    else:
        loss_saved = loss_forward = tokens * shape.vocab * (b + 4 + 4)

    if fsdp:
        # the LM head's gradient, reduce-scattered in fp32 by its unit at the start of the backward (the input and
        # this rank's output), or later one layer's (b + 4 per parameter), whichever is larger. By then the loss's
        # saved dL/dW has become that gradient: only dL/dhidden is still saved
        per_layer_trained = shape.layer_params if not lora else trained // max(1, L)
        comm = max((4 * vh + 4 * vh // world) if head_trained else 0, per_layer_trained * (b + 4))
        backward = 0  # the layers' own backward comes later, once the LM head's buffers are freed
    elif ddp:
        comm = 4 * trained
    else:
        comm = 0

    if lora and fsdp:  # rank 0 reads the fp32 base, the others get their shards (scaling.load_model_for_rank)
        host = 4 * n
    elif lora:  # per process: every rank loads the base
        # QLoRA quantizes the checkpoint shard by shard onto the GPU: the host holds one shard of the stored bf16
        # checkpoint at a time (transformers' shards are at most 5 GB; a small model is one shard of 2 N bytes)
        host = (base_bytes if quant == "none" else min(2 * n, CHECKPOINT_SHARD_BYTES)) + 4 * trained
    else:
        host = 4 * n
    return MemoryPlan(
        world_size=world,
        num_params=n,
        trainable_params=trained,
        params_sharded=int(params_sharded),
        params_gathered=int(params_gathered),
        gradients=int(gradients),
        optimizer=int(optimizer),
        activations=int(activations),
        activations_checkpointed=int(activations_ckpt),
        activations_full=int(activations_full),
        loss_forward=int(loss_forward),
        loss_saved=int(loss_saved),
        layer_transient=int(layer_transient),
        comm=int(comm),
        backward=int(backward),
        host_ram_bytes=int(host),
        disk=disk_estimate(cfg, n, trained if lora else None),
        checkpointing=ckpt,
        zero_stage=stage,
        sharded=fsdp,
        tokens=tokens,
        # FSDP: at the LM head unit's reduce-scatter the saved dL/dW has become the gradient (comm); dL/dhidden stays
        loss_backward=tokens * shape.hidden * r
        if fsdp and cfg.model.base_model.cross_entropy_impl == "fused" and cfg.training.objective != "dpo"
        else None,
        objective=cfg.training.objective,
        accumulation=max(1, cfg.batch.batch_size // (cfg.batch.micro_batch_size * world)),
        optimizer_step=4 * trained // shard,
    )


def _suggestions(cfg, world: int, shape: ModelShape, gpu_bytes: int) -> list[str]:
    """Changes that make the plan fit, smallest first: activation checkpointing, zero_stage 3, micro_batch_size 1,
    more GPUs, a shorter sequence; when no single change is enough, checkpointing together with each other one."""
    from backend.config import set_field

    def fits(c, w) -> bool:
        return _plan(c, w, shape).peak_bytes <= USABLE_FRACTION * gpu_bytes

    def singles(c, prefix: str) -> list[str]:
        out, stage = [], c.model.multi_stage.zero_stage
        if world > 1 and stage < 3 and fits(set_field(c, "model.multi_stage.zero_stage", 3), world):
            out.append(f"{prefix}model.multi_stage.zero_stage=3")
        if c.batch.micro_batch_size > 1 and fits(set_field(c, "batch.micro_batch_size", 1), world):
            out.append(f"{prefix}batch.micro_batch_size=1")
        sharded = c if stage >= 2 else set_field(c, "model.multi_stage.zero_stage", 3)
        more = next((w for w in range(world + 1, 64 * world + 1) if fits(sharded, w)), None)
        if more is not None:
            extra = "" if sharded is c else "model.multi_stage.zero_stage=3 and "
            out.append(f"{prefix}{extra}{more} GPUs (--gpus {more})")
        seq = c.batch.sequence_length
        while seq > 128:
            seq //= 2
            if fits(set_field(c, "batch.sequence_length", seq), world):
                out.append(f"{prefix}batch.sequence_length={seq}")
                break
        return out

    if cfg.model.multi_stage.activation_checkpointing:
        return singles(cfg, "")
    ckpt = set_field(cfg, "model.multi_stage.activation_checkpointing", True)
    first = ["model.multi_stage.activation_checkpointing=yes"] if fits(ckpt, world) else []
    return first + singles(cfg, "") or singles(ckpt, "model.multi_stage.activation_checkpointing=yes and ")


# ----------------------------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when it fits (or no --gpu-memory), 1 when it does not, 2 on a bad config or model path."""
    from backend.config import ConfigError, load_train_config

    parser = argparse.ArgumentParser(
        prog="python -m backend.plan",
        description="Per-GPU memory plan of a training config, before launch.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="How this repository trains" + __doc__.partition("How this repository trains")[2],
    )
    parser.add_argument("config", metavar="TRAIN.yaml")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override a key (value read as YAML)")
    parser.add_argument("--gpus", type=int, default=None, help="world size (default: run.num_processes)")
    parser.add_argument("--gpu-memory", type=float, default=None, metavar="GB", help="memory of one GPU, GiB")
    parser.add_argument(
        "--model-config", default=None, metavar="DIR", help="directory with config.json (default: pretrained.path)"
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_train_config(args.config, args.overrides)
        shape = model_shape(args.model_config or cfg.pretrained.path)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    world = args.gpus or cfg.run.num_processes
    if world < 1:
        print("error: --gpus must be >= 1", file=sys.stderr)
        return 2
    plan = plan_memory(cfg, world, args.gpu_memory, shape)
    if args.json:
        d = dataclasses.asdict(plan)
        d.update(peak_bytes=plan.peak_bytes, fits=plan.fits, suggestion=plan.suggestion)
        print(json.dumps(d, indent=2))
    else:
        print("\n".join(plan.lines()))
    return 1 if plan.fits is False else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
