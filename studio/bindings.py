"""The ONE table that binds Config-tab widgets to TrainConfig fields, by dotted YAML path.

    TRAIN_FIELDS[3] == Binding("batch.sequence_length", "int")
    form_values_from_config(cfg)            -> [300, 1, 8, 2048, ...]     (one value per binding, table order)
    apply_form_values(config_dict, values)  -> the YAML dict with those paths set

Labels and help texts come from the config models' own field descriptions (``backend.config.field_description``),
so the UI, the CLI help and the docs say the same thing. Adding a widget to the form = adding a row here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Binding:
    path: str  # dotted TrainConfig path, e.g. "optimizer.learning_rate.base"
    kind: str  # "int" | "float" | "bool" | "choice" | "text"
    choices: tuple = ()  # for kind == "choice"
    group: str = "Training"  # which accordion/column of the form it sits in


DPO = "Objective (DPO)"
TRAIN_FIELDS: tuple[Binding, ...] = (
    Binding("training.train_iters", "int", group="Schedule"),
    Binding("training.logs.interval", "int", group="Schedule"),
    Binding("batch.micro_batch_size", "int", group="Batch"),
    Binding("batch.batch_size", "int", group="Batch"),
    Binding("batch.sequence_length", "int", group="Batch"),
    Binding("batch.cross_document_attention", "bool", group="Batch"),
    Binding("data.truncate_documents", "bool", group="Batch"),
    Binding("data.sampling.packing", "choice", ("best_fit", "greedy"), group="Batch"),
    Binding("optimizer.learning_rate.base", "float", group="Learning rate"),
    Binding("optimizer.learning_rate.minimum", "float", group="Learning rate"),
    Binding("optimizer.learning_rate.decay_style", "choice", ("cosine", "linear", "constant"), group="Learning rate"),
    Binding("optimizer.learning_rate.warmup_iterations", "int", group="Learning rate"),
    Binding("optimizer.learning_rate.decay_iterations", "int", group="Learning rate"),
    Binding("training.checkpoint.interval", "int", group="Intervals"),
    Binding("training.export.interval", "int", group="Intervals"),
    Binding("training.evaluations.validation.interval", "int", group="Intervals"),
    Binding("training.evaluations.validation.iterations", "int", group="Intervals"),
    Binding("training.evaluations.samples", "int", group="Intervals"),
    Binding("model.distributed.training_dtype", "choice", ("bf16", "fp32", "fp16"), group="Hardware"),
    Binding("model.multi_stage.zero_stage", "choice", (0, 1, 2, 3), group="Hardware"),
    Binding("model.multi_stage.activation_checkpointing", "bool", group="Hardware"),
    Binding("run.num_processes", "int", group="Hardware"),
    Binding("model.base_model.peft.type", "choice", ("none", "lora"), group="LoRA"),
    Binding("model.base_model.peft.rank", "int", group="LoRA"),
    Binding("model.base_model.peft.alpha", "float", group="LoRA"),
    Binding("model.base_model.peft.dropout", "float", group="LoRA"),
    Binding("model.base_model.peft.target_modules", "text", group="LoRA"),
    Binding("pretrained.quantization", "choice", ("none", "4bit", "8bit"), group="LoRA"),
    Binding("training.export.merge", "bool", group="LoRA"),
    Binding("run.experiment_dir", "text", group="Paths"),
    Binding("pretrained.path", "text", group="Paths"),
    Binding("data.datasets.training.path", "text", group="Paths"),
    Binding("data.datasets.validation.path", "text", group="Paths"),
    # preference tuning: the Data tab's preference data needs objective dpo (training refuses SFT on pairs)
    Binding("training.objective", "choice", ("sft", "dpo"), group="Objective (DPO)"),
    Binding("training.dpo.beta", "float", group="Objective (DPO)"),
    Binding("training.dpo.loss", "choice", ("sigmoid", "ipo", "simpo"), group="Objective (DPO)"),
    Binding(
        "training.dpo.reference", "choice", ("auto", "precompute", "adapters_off", "none"), group="Objective (DPO)"
    ),
    Binding("training.dpo.simpo_gamma", "float", group="Objective (DPO)"),
    Binding("training.dpo.share_prompt", "bool", group="Objective (DPO)"),
)

GROUPS: tuple[str, ...] = tuple(dict.fromkeys(b.group for b in TRAIN_FIELDS))


def label_and_info(binding: Binding) -> tuple[str, str]:
    """("sequence_length", "<description from TrainConfig>") for a widget's label and help text."""
    from backend.config import TrainConfig, field_description

    try:
        info = field_description(TrainConfig, binding.path)
    except Exception:  # a path the config does not describe: show the path alone rather than break the page
        info = ""
    return binding.path, info


def _get(tree: Any, path: str) -> Any:
    """Value at a dotted path of a dict tree or a pydantic model; None where a level is missing."""
    node = tree
    for key in path.split("."):
        if node is None:
            return None
        node = node.get(key) if isinstance(node, dict) else getattr(node, key, None)
    return node


def _set(tree: dict, path: str, value: Any) -> None:
    keys = path.split(".")
    node = tree
    for key in keys[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[keys[-1]] = value


def form_values_from_config(cfg) -> list:
    """One plain value per binding, in table order, read from a TrainConfig (or its dict form)."""
    values = []
    for b in TRAIN_FIELDS:
        v = _get(cfg, b.path)
        if hasattr(v, "value") and not isinstance(v, (int, float, str, bool)):  # an Enum
            v = v.value
        if v is not None and b.kind == "text":
            v = ", ".join(map(str, v)) if isinstance(v, list) else str(v)  # target_modules: "q_proj, v_proj"
        values.append(v)
    return values


def coerce(binding: Binding, value: Any) -> Any:
    """Widget value -> YAML value. gr.Number gives floats (3.0) for ints; empty text means "not set".

    A value that cannot be converted is passed through unchanged so that config validation names the key.
    """
    if value is None:
        return None
    if binding.kind == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    if binding.kind == "text":
        value = str(value).strip()
        return value or None
    if binding.kind == "choice" and binding.choices and isinstance(binding.choices[0], int):
        try:
            return int(value)
        except (TypeError, ValueError):
            return value
    return value


def apply_form_values(config_dict: dict, values: list) -> dict:
    """Return a copy of the YAML dict with every bound path set from ``values`` (table order).

    A text field left empty removes nothing and sets nothing (the config's default applies), except for paths
    that exist in the dict already, which are set to None so that the user's clearing is visible in validation.
    """
    import copy

    out = copy.deepcopy(config_dict) if config_dict else {}
    if len(values) != len(TRAIN_FIELDS):
        raise ValueError(f"expected {len(TRAIN_FIELDS)} form values, got {len(values)}")
    for b, v in zip(TRAIN_FIELDS, values, strict=False):
        v = coerce(b, v)
        if v is None and _get(out, b.path) is None:
            continue
        _set(out, b.path, v)
    return out
