"""Checkpoints (save / resume / keep-N) and Hugging Face exports of a training run.

Layout under ``run.experiment_dir``::

    checkpoints/step_000100/          one resumable checkpoint (accelerator.save_state)
        model.safetensors | pytorch_model_fsdp_0/    model (one file, or DCP shards under FSDP)
        optimizer.bin     | optimizer_0/             AdamW moments (sharded under FSDP)
        random_states_<rank>.pkl                     python/numpy/torch RNG of every rank
        meta.json                                    {"step": 100, "world_size": 2, "config_hash": "...", ...}
        config.yaml                                  the resolved config the run had
        COMPLETE                                     written last: a directory without it is ignored
    export/step_000100/, export/final/  HF directories: config.json, model.safetensors (or shards of
                                        training.export.max_shard_size + model.safetensors.index.json), tokenizer
                                        files, chat_template.jinja, generation_config.json (eos = end-of-turn ids);
                                        weights in training.export.dtype (default: the training dtype);
                                        training.export.keep prunes old step_* exports, final is always kept

Both are written into ``<name>.tmp`` and renamed when whole, so a crash leaves either nothing or a ``.tmp``
that is ignored and cleaned. The learning-rate schedule is a pure function of the step (see
``backend.train.lr_at``), so the step in ``meta.json`` is the scheduler's whole state; the step also fixes the
data position, because the packed sampler derives its rows from the step number.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import sys
import time
from pathlib import Path

COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def step_dir_name(step: int) -> str:
    """``100 -> "step_000100"``."""
    return f"step_{step:06d}"


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def list_checkpoints(checkpoints_dir) -> list[tuple[int, Path, bool]]:
    """``[(step, path, complete), ...]`` sorted by step; ``.tmp`` directories are not listed."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child, (child / COMPLETE).is_file()))
    return sorted(found)


def latest_complete(checkpoints_dir, warn=_warn) -> Path | None:
    """The newest checkpoint directory that has its ``COMPLETE`` marker, or None.

    Newer directories without the marker (a save cut short by a kill) are skipped with a warning.
    """
    for _step, path, complete in reversed(list_checkpoints(checkpoints_dir)):
        if complete:
            return path
        warn(f"ignoring incomplete checkpoint {path} (no {COMPLETE} marker: its save was interrupted)")
    return None


def read_meta(checkpoint_dir) -> dict:
    return json.loads((Path(checkpoint_dir) / "meta.json").read_text())


def _tied_names(models) -> set[str]:
    """Names of parameters that share storage with another parameter of the same model (tied embeddings): the
    copies safetensors drops on save and ``tie_weights`` restores on load."""
    names = set()
    for model in models:
        by_storage: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            by_storage.setdefault(p.data_ptr(), []).append(name)
        names |= {n for group in by_storage.values() if len(group) > 1 for n in group}
    return names


class _TiedWeightsNotice(logging.Filter):
    """Drops accelerate's "Removed shared tensor {...} while saving" when every name in it is a tied weight: on
    every checkpoint of a model with tied embeddings it reads like a fault, and it is not one. Any other shared
    tensor still warns."""

    def __init__(self, tied: set[str]):
        super().__init__()
        self.tied = tied

    def filter(self, record: logging.LogRecord) -> bool:
        found = re.search(r"Removed shared tensor \{([^}]*)\}", record.getMessage())  # after "[RANK 0] "
        if not found:
            return True
        names = set(re.findall(r"'([^']+)'", found.group(1)))
        # accelerate names keys as saved (a prepared model's may carry a wrapper's "module." / "_orig_mod.")
        bare = {n.replace("module.", "").replace("_orig_mod.", "") for n in names}
        return not (names and bare <= {n.replace("module.", "") for n in self.tied})


@contextlib.contextmanager
def _quiet_tied_weights(models):
    log = logging.getLogger("accelerate.utils.other")
    notice = _TiedWeightsNotice(_tied_names(models))
    log.addFilter(notice)
    try:
        yield
    finally:
        log.removeFilter(notice)


def save_checkpoint(
    accelerator,
    checkpoints_dir,
    step: int,
    config_yaml: str,
    keep: int | None = None,
    meta: dict | None = None,
    save_state=None,
) -> Path:
    """Save a resumable checkpoint of everything ``accelerator.prepare`` saw (a collective: call on every rank).

    Returns ``checkpoints/step_XXXXXX``. Keeps the newest ``keep`` complete checkpoints (None or 0: all).
    ``save_state(dir)`` replaces ``accelerator.save_state`` (LoRA: adapters + optimizer only, backend/lora.py).
    """
    root = Path(checkpoints_dir)
    final = root / step_dir_name(step)
    tmp = root / (final.name + ".tmp")
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # leftover of an interrupted save
    accelerator.wait_for_everyone()
    # save_state writes model + optimizer (as DCP shards under FSDP: every rank writes its own part) and each
    # rank's RNG state; it is a collective, so every rank calls it with the same directory.
    with _quiet_tied_weights(getattr(accelerator, "_models", [])):
        (save_state or accelerator.save_state)(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        info = {
            "step": int(step),
            "world_size": accelerator.num_processes,
            "time": time.time(),
            "distributed_type": str(accelerator.distributed_type),
            **(meta or {}),
        }
        (tmp / "meta.json").write_text(json.dumps(info, indent=1))
        (tmp / "config.yaml").write_text(config_yaml)
        if final.exists():  # an older incomplete save of the same step (resumed from before it)
            shutil.rmtree(final)
        tmp.rename(final)
        (final / COMPLETE).write_text(f"{time.time()}\n")  # last: only now is the checkpoint usable
        if keep:
            complete = [path for _, path, ok in list_checkpoints(root) if ok]
            for old in complete[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, checkpoint_dir, load_state=None) -> dict:
    """Restore model, optimizer and RNG from ``checkpoint_dir`` (a collective); returns its ``meta.json``.
    ``load_state(dir)`` replaces ``accelerator.load_state`` (LoRA, backend/lora.py)."""
    checkpoint_dir = Path(checkpoint_dir)
    meta = read_meta(checkpoint_dir)
    if meta.get("world_size") not in (None, accelerator.num_processes) and not accelerator.is_fsdp2:
        _warn(
            f"{checkpoint_dir} was saved by {meta['world_size']} processes, resuming with {accelerator.num_processes}"
        )
    (load_state or accelerator.load_state)(str(checkpoint_dir))
    return meta


# ------------------------------------------------------------------------------------------------------ export


def export_generation_config(generation, tokenizer):
    """The generation_config an export ships: a copy of the training model's with the KV cache back on
    (training turns it off, backend.modeling), eos = the chat template's end-of-turn id(s) then the tokenizer's
    eos, a pad id, and the tokenizer's bos; the base model's sampling settings are kept as they were."""
    import copy

    from backend.chat import eot_token_ids

    generation = copy.deepcopy(generation)
    generation.use_cache = True
    eos = eot_token_ids(tokenizer)  # the one place that knows a template's end-of-turn ids
    if not eos:  # no end-of-turn special token and no eos: keep the base model's setting
        eos = generation.eos_token_id if isinstance(generation.eos_token_id, list) else [generation.eos_token_id]
    generation.eos_token_id = eos if len(eos) > 1 else eos[0]
    if tokenizer.bos_token_id is not None:
        generation.bos_token_id = tokenizer.bos_token_id
    if generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    return generation


def export_dtype(cfg) -> str:
    """Dtype of exported weights: training.export.dtype, else the training dtype (bf16 runs export bf16)."""
    return cfg.training.export.dtype or cfg.model.distributed.training_dtype


def _cast_state_dict(state_dict: dict, dtype) -> dict:
    """Floating-point tensors to ``dtype`` (the fp32 master weights of a bf16 run export as bf16: half the disk)."""
    from backend.modeling import as_dtype

    dtype = as_dtype(dtype)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}


def _record_dtype(model_dir: Path, dtype) -> None:
    """save_pretrained writes the dtype of the (fp32) model into config.json: write the exported one instead."""
    from backend.modeling import as_dtype

    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = str(as_dtype(dtype)).split(".")[1]
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def prune_exports(export_dir, keep: int | None) -> list[Path]:
    """Delete all but the newest ``keep`` intermediate exports (``export/step_XXXXXX``); ``final`` is never
    touched. None keeps all. Returns the deleted directories."""
    if keep is None:
        return []
    root = Path(export_dir)
    steps = sorted(
        (int(m.group(1)), child)
        for child in (root.iterdir() if root.is_dir() else [])
        if (m := _STEP_DIR.match(child.name)) and child.is_dir()
    )
    doomed = [path for _, path in steps[: max(0, len(steps) - keep)]]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def export_hf(
    accelerator,
    model,
    tokenizer,
    export_dir,
    name: str,
    dtype: str | None = None,
    max_shard_size: str = "5GB",
    state_dict: dict | None = None,
    before_rename=None,
) -> Path:
    """Write ``export_dir/<name>`` as a Hugging Face model directory (a collective: call on every rank).

    ``AutoModelForCausalLM.from_pretrained(path)`` + ``AutoTokenizer.from_pretrained(path)`` load it; its
    generation_config stops on the end-of-turn token(s), so ``generate`` ends replies like the chat template.
    Weights in ``dtype`` (None: as trained, fp32), in safetensors shards of at most ``max_shard_size`` (an index
    file lists them when there are several).

    ``state_dict``: weights already gathered on rank 0 (LoRA's merged model, backend/lora.py); ``model`` is then a
    plain model of the same class, for its config and save_pretrained. ``before_rename(tmp_dir)`` (main process)
    adds files that must appear together with the export (LoRA's adapter/).
    """
    export_dir = Path(export_dir)
    final = export_dir / name
    tmp = export_dir / (name + ".tmp")
    # get_state_dict gathers the full weights from the FSDP shards: a collective, every rank must call it.
    if state_dict is None:
        state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        unwrapped = accelerator.unwrap_model(model)
        if getattr(unwrapped.config, "tie_word_embeddings", False):
            # FSDP's gathered state dict holds tied weights as separate tensors, so save_pretrained cannot see
            # the tie and would write lm_head.weight a second time; drop the tied copies as one process does.
            for tied in getattr(unwrapped, "_tied_weights_keys", None) or {}:
                state_dict.pop(tied, None)
        # training runs with use_cache=False (packed rows); an exported model is for generation, where the
        # KV cache is what makes decoding fast
        use_cache, unwrapped.config.use_cache = unwrapped.config.use_cache, True
        if dtype is not None:
            state_dict = _cast_state_dict(state_dict, dtype)
        unwrapped.save_pretrained(tmp, state_dict=state_dict, is_main_process=True, max_shard_size=max_shard_size)
        unwrapped.config.use_cache = use_cache
        if dtype is not None:
            _record_dtype(tmp, dtype)
        tokenizer.save_pretrained(tmp)  # includes chat_template.jinja (the prepared data's, see train.py)
        export_generation_config(unwrapped.generation_config, tokenizer).save_pretrained(tmp)
        if before_rename is not None:
            before_rename(tmp)
        # replace by renames: killed at any point, either the old or the new export is complete on disk
        old = export_dir / (name + ".old")
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
