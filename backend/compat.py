"""What a training run checks before it trains: the data fits the model, the tokenizer the data was prepared
with, and the config of the checkpoint it resumes. Every refusal is a ``ConfigError`` (exit code 2 and an
"error" event) that names the key, both sides, and what to do; nothing here reaches a device assert.

    tokenizer, source = data_tokenizer(train_data, cfg.pretrained.path)      # the export ships this tokenizer
    check_data_fits_model({"training": train_data}, model_vocab, cfg.pretrained.path, source)
    check_tokenizers_compatible(tokenizer, source, cfg.pretrained.path)
    check_resume(latest_checkpoint, cfg, data_fingerprint(train_data), log=print0)   # before load_state

Resume rule: a restart in the same ``run.experiment_dir`` continues from the newest checkpoint only when the
settings that decide which rows are trained and how (batch shape, seed, data, model, optimizer, ...) are those
the checkpoint was made with. SAFE_CHANGES (more iterations, intervals, keep, logs, exports, trackers,
evaluations; a training path that holds the same prepared content) are accepted and logged; any other change is
refused unless ``run.resume: force``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

# Keys that may change between a checkpoint and its resume without changing what was trained so far. A prefix
# ending in "." covers a whole section.
SAFE_CHANGES = (
    "training.train_iters",
    "training.test_iters",
    "training.logs.",
    "training.evaluations.",
    "training.checkpoint.",
    "training.export.",
    "data.datasets.validation",
    "data.datasets.test",
    "model.distributed.timeout",
    "model.multi_stage.activation_checkpointing",  # same math, recomputed
    "model.base_model.transformer.use_flash_attention",  # same math, another kernel
    "model.base_model.cross_entropy_impl",  # same loss, another implementation
    "run.",
)


def _flatten(d, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def machine_problems(cfg, world_size: int | None = None) -> list[str]:
    """What this machine cannot run of a valid train config: QLoRA without CUDA/bitsandbytes (or sharded by FSDP over
    ``world_size`` processes; None: run.num_processes), trackers whose package is missing. --validate, train() and
    the studio's Config tab all report these as config problems."""
    from backend.trackers import tracker_problems

    problems = tracker_problems(cfg)
    if cfg.pretrained.quantization != "none":
        from backend.lora import quantization_problems

        problems += quantization_problems(cfg, world_size)
    return problems


def check_machine(cfg, world_size: int | None = None) -> None:
    """Raise ConfigError listing `machine_problems`."""
    from backend.config import ConfigError

    if problems := machine_problems(cfg, world_size):
        raise ConfigError(problems)


def config_changes(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """``[(dotted key, old value, new value), ...]`` for every leaf that differs (missing = None)."""
    a, b = _flatten(old), _flatten(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def is_safe_change(key: str) -> bool:
    return any(key == s or (s.endswith(".") and key.startswith(s)) or key.startswith(s + ".") for s in SAFE_CHANGES)


def data_fingerprint(dataset) -> dict:
    """What identifies a prepared split's content (a re-prepare at the same path changes it)."""
    return {
        "prepare_config_hash": dataset.prepare_config_hash,
        "num_documents": len(dataset),
        "num_tokens": int(dataset.num_tokens),
    }


def check_resume(checkpoint_dir, cfg, data: dict | None = None, log=print) -> list[str]:
    """Compare ``cfg`` (and the training data's fingerprint) with what ``checkpoint_dir`` was saved with.

    Returns the lines logged for accepted changes; raises ConfigError listing every unsafe change, old -> new,
    and the two ways on, unless ``run.resume: force`` (then the changes are logged as forced).
    """
    from backend.config import ConfigError

    checkpoint_dir = Path(checkpoint_dir)
    saved_path = checkpoint_dir / "config.yaml"
    if not saved_path.is_file():
        log(f"resume: {saved_path} is missing, so config changes cannot be checked")
        return []
    old = yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {}
    try:  # a checkpoint of an older version lacks keys added since: they had their defaults' meaning
        from backend.config import TrainConfig

        old = TrainConfig.model_validate(old).model_dump(mode="json")
    except ValueError:  # a key since renamed or removed: compare the raw YAML (every difference is listed)
        pass
    changes = config_changes(old, cfg.model_dump(mode="json"))
    try:
        import json

        saved_data = json.loads((checkpoint_dir / "meta.json").read_text()).get("data")
    except (OSError, ValueError):
        saved_data = None
    if saved_data and data and saved_data != data:
        changes.append(("data.datasets.training (content)", saved_data, data))
    same_data = bool(saved_data and data and saved_data == data)  # moved or renamed, same prepared content

    def safe_change(key: str) -> bool:
        return is_safe_change(key) or (key == "data.datasets.training.path" and same_data)

    unsafe = [c for c in changes if not safe_change(c[0])]
    safe = [c for c in changes if safe_change(c[0])]
    lines = [f"resume: accepted change {k}: {a!r} -> {b!r}" for k, a, b in safe]
    lr = cfg.optimizer.learning_rate
    if any(k == "training.train_iters" for k, _, _ in safe) and lr.decay_iterations is None:
        lines.append(f"resume: the learning-rate schedule now spans training.train_iters = {cfg.training.train_iters}")
    if unsafe and cfg.run.resume == "force":
        lines += [f"resume: FORCED despite change {k}: {a!r} -> {b!r} (run.resume: force)" for k, a, b in unsafe]
    elif unsafe:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in unsafe)
        raise ConfigError(
            [
                f"run.resume: {checkpoint_dir} was saved with other settings, and resuming would continue on "
                f"different rows or another model/optimizer: {listed}. Either start a new run "
                f"(run.experiment_dir=<another directory>), or resume anyway with run.resume=force"
            ]
        )
    for line in lines:
        log(line)
    return lines


# ------------------------------------------------------------------------------------------ data and tokenizer


def data_tokenizer(dataset, fallback_path: str, log=print):
    """``(tokenizer, source)``: the tokenizer (and chat template) ``dataset`` was prepared with.

    Prepare saves it next to the shards (``output_path/tokenizer``); a dataset prepared before that falls back to
    the tokenizer path its descriptor records, then to ``fallback_path`` (pretrained.path), with a log line.
    """
    from backend.modeling import load_tokenizer

    info = dataset.tokenizer_info
    saved = dataset.root / info["saved"] if info.get("saved") else None
    if saved is not None and saved.is_dir():
        return load_tokenizer(str(saved)), str(saved)
    recorded = info.get("path")
    if recorded:
        try:
            tokenizer = load_tokenizer(recorded)
        except (OSError, ValueError):
            tokenizer = None
        if tokenizer is not None:
            log(f"tokenizer: {dataset.descriptor_path} has no saved tokenizer; using its recorded path {recorded}")
            return tokenizer, str(recorded)
    log(f"tokenizer: {dataset.descriptor_path} records no usable tokenizer; using pretrained.path {fallback_path}")
    return load_tokenizer(fallback_path), str(fallback_path)


def max_token_id(dataset) -> int:
    """Largest token id stored in a split (a scan of the memory-mapped shards)."""
    return max((int(np.max(t)) for t in dataset._tokens if len(t)), default=-1)


def check_data_fits_model(datasets: dict, model_vocab: int, model_path: str, tokenizer_source: str) -> None:
    """Every token id of every split < the model's vocabulary (embedding rows), else ConfigError naming both.

    Exact and cheap: a split whose tokenizer has at most ``model_vocab`` tokens cannot hold a larger id; only
    otherwise are its shards scanned.
    """
    from backend.config import ConfigError

    problems = []
    for name, dataset in datasets.items():
        if dataset is None or dataset.vocab_size <= model_vocab:
            continue
        top = max_token_id(dataset)
        if top >= model_vocab:
            problems.append(
                f"data.datasets.{name}.path: {dataset.descriptor_path} holds token id {top}, but the model at "
                f"pretrained.path {model_path} has {model_vocab} embedding rows (ids 0..{model_vocab - 1}); the "
                f"data was tokenized with {tokenizer_source} ({dataset.vocab_size} tokens). Prepare the data with "
                f"the model's tokenizer (tokenizer.path in the prepare YAML) or pick the matching model"
            )
    if problems:
        raise ConfigError(problems)


def check_tokenizers_compatible(data_tok, data_source: str, model_path: str, log=print) -> None:
    """The data's tokenizer and pretrained.path's tokenizer give every shared id the same token.

    The 8B recipe prepares with the Instruct tokenizer and trains the base model: same vocabulary, other chat
    template and eos, which is fine (the export carries the data's). Different vocabularies are not.
    """
    from backend.config import ConfigError
    from backend.modeling import load_tokenizer

    if Path(data_source).resolve() == Path(model_path).resolve():
        return
    from backend.hub import HubUnreachable

    try:
        model_tok = load_tokenizer(model_path)
    except HubUnreachable:  # the hub's fast refusal is the answer, not "no tokenizer to compare"
        raise
    except (OSError, ValueError):
        log(f"tokenizer: pretrained.path {model_path} has no tokenizer to compare with {data_source}")
        return
    a = {i: t for t, i in data_tok.get_vocab().items()}
    b = {i: t for t, i in model_tok.get_vocab().items()}
    differ = sorted(i for i in a.keys() & b.keys() if a[i] != b[i])
    if differ:
        shown = ", ".join(f"id {i} is {a[i]!r} in the data, {b[i]!r} in the model's" for i in differ[:3])
        raise ConfigError(
            [
                f"data.datasets.training.path: the data was tokenized with {data_source}, whose vocabulary differs "
                f"from the tokenizer of pretrained.path {model_path} ({len(differ)} ids differ: {shown}). The model "
                f"would learn those ids with other meanings: prepare with a tokenizer of the model's family "
                f"(tokenizer.path in the prepare YAML) or train the model that matches the data"
            ]
        )


def model_vocab(model_path: str) -> int:
    """Embedding rows of the model at ``model_path``, from its config (no weights loaded)."""
    from transformers import AutoConfig

    from backend.hub import require_hub

    require_hub(str(model_path), "pretrained.path")  # an unreachable hub: seconds, not minutes of retries
    try:
        config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError) as e:
        raise type(e)(f"pretrained.path {model_path}: could not read the model's config ({e})") from e
    config = getattr(config, "get_text_config", lambda: config)()
    return int(config.vocab_size)
