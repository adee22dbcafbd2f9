"""Exports sized for 8B (backend/checkpoint.py): the training dtype, sharded safetensors, keep-N pruning.

- a bf16 run exports bf16 weights (config.json says bfloat16) that transformers loads as bf16; training.export.keep
  leaves the newest N step exports and the final one;
- a tiny max_shard_size writes several shards plus an index, and they load back to the same weights;
- prune_exports never touches `final` or unrelated directories.
"""

import json

import torch
from safetensors import safe_open

from backend import ASSETS, TINY_MODEL
from backend.checkpoint import export_hf, prune_exports
from backend.events import read_events
from backend.modeling import load_model, load_tokenizer


def safetensors_dtypes(model_dir) -> set:
    dtypes = set()
    for f in model_dir.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            dtypes |= {st.get_slice(k).get_dtype() for k in st.keys()}  # noqa: SIM118  (safe_open has no iterator)
    return dtypes


def test_bf16_run_exports_bf16_and_keeps_the_newest(data, tmp_path):
    from transformers import AutoModelForCausalLM

    from backend.train import train

    run_dir = tmp_path / "exp"
    values = {
        "data.datasets.training.path": data / "fast_llm_config_training.yaml",
        "data.datasets.validation": "null",
        "training.evaluations.validation.interval": 0,
        "run.experiment_dir": run_dir,
        "batch.sequence_length": 128,
        "batch.batch_size": 2,
        "batch.micro_batch_size": 2,
        "training.train_iters": 4,
        "training.checkpoint.interval": 0,
        "training.export.interval": 1,
        "training.export.keep": 2,
        "model.distributed.training_dtype": "bf16",
    }
    train(ASSETS / "configs" / "tiny_train.yaml", [f"{k}={v}" for k, v in values.items()])
    exports = run_dir / "export"
    # exports at steps 1, 2, 3 and final; keep 2 removed step 1
    assert sorted(p.name for p in exports.iterdir()) == ["final", "step_000002", "step_000003"]
    events, _ = read_events(run_dir / "events.jsonl")
    assert [e["step"] for e in events if e["event"] == "export"] == [1, 2, 3, 4]
    final = exports / "final"
    assert safetensors_dtypes(final) == {"BF16"}
    assert json.loads((final / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.dtype == torch.bfloat16
    # the bf16 export is the trained fp32 weights rounded, not the initial ones
    initial = load_model(TINY_MODEL)
    assert not torch.equal(model.model.embed_tokens.weight, initial.model.embed_tokens.weight.to(torch.bfloat16))


def test_small_max_shard_size_writes_shards_that_load(tmp_path):
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    model = load_model(TINY_MODEL)
    path = export_hf(Accelerator(cpu=True), model, load_tokenizer(TINY_MODEL), tmp_path, "final", "fp32", "300KB")
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) >= 3, [p.name for p in path.iterdir()]
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    loaded = AutoModelForCausalLM.from_pretrained(path)
    reference = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # still tied


def test_prune_exports_keeps_newest_and_final(tmp_path):
    for name in ["step_000001", "step_000010", "step_000002", "final", "step_000003.tmp", "notes"]:
        (tmp_path / name).mkdir()
    assert prune_exports(tmp_path, None) == []
    removed = prune_exports(tmp_path, 1)
    assert sorted(p.name for p in removed) == ["step_000001", "step_000002"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final", "notes", "step_000003.tmp", "step_000010"]
    prune_exports(tmp_path, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final", "notes", "step_000003.tmp"]
