"""Config tab handlers: the train YAML <-> form, the memory plan, the prepare YAML of the Data tab's settings."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from studio.common import (
    DEFAULT_TRAIN_YAML,
    DataSettings,
    _chat_section,
    _dataset_section,
    _parse_yaml,
    check_path,
    default_prepare,
    problems_markdown,
)

# =============================================================================================== config tab


def default_train_yaml() -> str:
    from backend.config import dump_yaml, load_train_config

    return dump_yaml(load_train_config(DEFAULT_TRAIN_YAML))


def form_to_train_yaml(yaml_text: str, *values) -> tuple[str, str]:
    """Form values (bindings table order) applied onto the YAML text -> (new YAML text, status markdown).

    On invalid values the YAML is returned with the values written in (so the user sees what they typed) and
    the status lists ConfigError.problems, each naming its key.
    """
    from backend.config import ConfigError, dump_yaml, load_train_config
    from studio.bindings import apply_form_values

    base, err = _parse_yaml(yaml_text, "train")
    if base is None:
        base = {}
    raw = apply_form_values(base, list(values))
    try:
        cfg = load_train_config(raw)
    except ConfigError as e:
        return yaml.safe_dump(raw, sort_keys=False), problems_markdown(e.problems)
    from backend.compat import machine_problems  # QLoRA's CUDA + bitsandbytes, the trackers' packages

    if problems := machine_problems(cfg):
        return dump_yaml(cfg), problems_markdown(problems)
    return dump_yaml(cfg), "✓ valid train config"


def train_yaml_to_form(yaml_text: str) -> tuple[list, str, bool]:
    """YAML text -> (form values in table order, status markdown, valid). Invalid YAML: values are None."""
    from backend.config import ConfigError, load_train_config
    from studio.bindings import TRAIN_FIELDS, form_values_from_config

    raw, err = _parse_yaml(yaml_text, "train")
    if raw is None:
        return [None] * len(TRAIN_FIELDS), err, False
    try:
        cfg = load_train_config(raw)
    except ConfigError as e:
        return [None] * len(TRAIN_FIELDS), problems_markdown(e.problems), False
    return form_values_from_config(cfg), "✓ valid train config", True


PLAN_PENDING = "Memory plan: ⏳ recomputing for the values now in the form…"


def plan_pending() -> str:
    """What the plan box shows while the plan of the current values is computed: never the previous figures."""
    return PLAN_PENDING


def memory_plan_markdown(
    train_yaml: str, gpus: float | None = None, gpu_memory_gb: float | None = None, model_config: str | None = ""
) -> str:
    """The Config tab's memory plan (backend.plan) of the YAML on `gpus` GPUs (None: run.num_processes) of
    `gpu_memory_gb` GiB each: verdict, the smallest change that fits, and the per-GPU table. `model_config`: a local
    directory holding config.json (or the file) to plan instead of ``pretrained.path`` (a model whose weights are
    elsewhere, or a hub id while offline). Never raises."""
    from backend.config import ConfigError, load_train_config, set_field
    from backend.plan import plan_memory

    raw, err = _parse_yaml(train_yaml, "train")
    if raw is None:
        return f"Memory plan: {err}"
    try:
        cfg = load_train_config(raw)
    except ConfigError as e:
        return "Memory plan: the config is not valid yet (see the problems on the left; first: " + (
            f"`{e.problems[0]}`)" if e.problems else ")"
        )
    if model_config and model_config.strip():
        local = Path(model_config.strip()).expanduser()
        local = local.parent if local.name == "config.json" else local
        if not (local / "config.json").is_file():
            return (
                f"Memory plan: model config {model_config.strip()}: no config.json there (looked in {local.resolve()})"
            )
        cfg = set_field(cfg, "pretrained.path", str(local))
    world = int(gpus) if gpus and gpus >= 1 else cfg.run.num_processes
    memory = float(gpu_memory_gb) if gpu_memory_gb and gpu_memory_gb > 0 else None
    try:
        plan = plan_memory(cfg, world, memory)
    except (FileNotFoundError, ValueError) as e:
        return f"Memory plan: {e}"
    verdict = ""
    if plan.fits is not None:
        verdict = (
            f"✓ **Fits**: peak {plan.peak_bytes / 2**30:.1f} GiB per GPU of {memory:g} GiB"
            if plan.fits
            else f"⚠ **Does not fit**: peak {plan.peak_bytes / 2**30:.1f} GiB per GPU of {memory:g} GiB. "
            + (f"Smallest change that fits: `{plan.suggestion}`" if plan.suggestion else "No single change fits.")
        )
    head = (
        f"{plan.num_params:,} parameters ({plan.trainable_params:,} trained) on {world} GPU{'s' if world > 1 else ''}"
    )
    table = plan.table()
    table = table[table.index("| part") :]  # the verdict is written above, in the studio's words
    return "\n\n".join(x for x in (verdict, head, table) if x)


def prepare_yaml_from(train_yaml: str, s: DataSettings) -> tuple[str, str]:
    """The prepare YAML for the Data tab's settings (`prepare_config_of`: the config the preview reads rows with),
    writing where the train YAML reads its datasets.

    output_path = the directory of ``data.datasets.training.path`` (so the two files can never disagree).
    """
    from backend.config import ConfigError, dump_yaml, load_prepare_config, load_train_config

    base = default_prepare()
    raw, err = _parse_yaml(train_yaml, "train")
    if raw is not None:
        try:
            tcfg = load_train_config(raw)
            base["output_path"] = str(Path(tcfg.data.datasets.training.path).parent)
            base.setdefault("report", {})["sequence_length"] = tcfg.batch.sequence_length
        except ConfigError:
            pass
    try:
        base["dataset"] = _dataset_section(s.dataset)
    except Exception:  # an unreadable dataset: the path as typed (the preview says what is wrong)
        base["dataset"]["path"] = (s.dataset or "").strip()
    base["tokenizer"]["path"] = (s.tokenizer or "").strip()
    base["chat"] = _chat_section(s)
    try:
        cfg = load_prepare_config(base)
    except ConfigError as e:
        return yaml.safe_dump(base, sort_keys=False), problems_markdown(e.problems)
    return dump_yaml(cfg), "✓ valid prepare config" + _objective_note(cfg, raw)


def _objective_note(cfg, train_raw) -> str:
    """Preference data prepared for an SFT train config (or the reverse): say which objective the data needs."""
    from studio.common import get_reader

    try:
        pairs = get_reader(cfg).form == "pairs"
    except Exception:  # an unreadable dataset: the Data tab's preview says what is wrong
        return ""
    objective = ((train_raw or {}).get("training") or {}).get("objective", "sft")
    if pairs and objective != "dpo":
        return (
            "\n\n⚠ the dataset holds **preference pairs** (prompt / chosen / rejected): set "
            "`training.objective: dpo` in the train config (the form's *Objective (DPO)* group); training refuses "
            "SFT on pairs, which would train the rejected answers too"
        )
    if not pairs and objective == "dpo":
        return "\n\n⚠ `training.objective: dpo` needs preference pairs (prompt / chosen / rejected columns)"
    return ""


def save_yaml(text: str, path: str) -> str:
    """Write a YAML file atomically; returns a status line."""
    check = check_path(str(Path(path).parent) if path else "", "dir")
    if not path or not check.ok:
        return f"⚠ cannot save: {check.message or 'no path'}"
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, p)
    return f"saved {p.resolve()}"


def load_yaml_file(path: str) -> tuple[str | None, str]:
    p = Path((path or "").strip())
    if not p.is_file():
        return None, f"⚠ no such file: {p.resolve()}"
    return p.read_text(encoding="utf-8"), f"loaded {p.resolve()}"
