"""Worker for tests/test_distributed.py and tests/test_train_step.py: a few optimizer steps of a tiny random Llama
through the trainer's own step (backend.train.train_step) on the trainer's own batches (PackedSampler + collate).

Takes a training config like backend.train (batch.*, model.multi_stage.zero_stage, model.base_model.*,
model.distributed.*; results go to run.experiment_dir) and is launched by backend.launch.train_command:

    python -m tests.dist_worker CONFIG.yaml [key=value ...] [--untied]                 # one process, the reference
    python -m accelerate.commands.launch --config_file A.yaml --num_processes 2 -m tests.dist_worker CONFIG.yaml

The data is 60 random documents of 2-12 tokens (a third with nothing trained, the rest with a random trained tail),
packed by backend.packing.PackedSampler into rows of batch.sequence_length; step s takes global rows
[s * batch_size, (s + 1) * batch_size), rank r its share, cut into micro-batches of batch.micro_batch_size, exactly
as backend.train does; so ranks and micro-batches see different trained-token counts. The model is what the 8B
config trains, in small: attention from model.base_model.transformer.use_flash_attention (sdpa_packed on CPU),
tied or untied embeddings (--untied), autocast to model.distributed.training_dtype, the configured cross-entropy.
Each rank writes run.experiment_dir/rank{r}.json: {"losses", "grad_norms", "trained_tokens", "local_counts",
"is_sharded", "describe", "attention",
"unsharded_units" (per step), "fsdp_warnings"}; rank 0 also writes weights.pt (the full state dict, gathered).
"""

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script by torchrun/accelerate

import numpy as np  # noqa: E402
import torch  # noqa: E402

from backend.config import load_train_config  # noqa: E402
from backend.distributed import build_accelerator, close_distributed, describe, is_sharded  # noqa: E402
from backend.modeling import register_attention, select_attention  # noqa: E402
from backend.packing import PackedSampler, collate  # noqa: E402
from backend.train import train_step  # noqa: E402
from tests import tiny  # noqa: E402

V = 101


class MemoryDocuments:
    """Random documents in memory with TokenDataset's `document(i) -> (tokens, trained)`."""

    def __init__(self, n=60, seed=0):
        rng = np.random.default_rng(seed)
        self.lengths = rng.integers(2, 13, n).astype(np.int64)
        self.docs = []
        for i, length in enumerate(self.lengths):
            tokens = rng.integers(1, V, length).astype(np.int64)
            trained = np.zeros(length, bool)
            if i % 3:  # a third of the documents train nothing
                trained[int(rng.integers(1, length)) :] = True
            self.docs.append((tokens, trained))

    def document(self, i, begin=0, end=None):
        tokens, trained = self.docs[i]
        return tokens[begin:end], trained[begin:end]


def tiny_llama(attn: str, tied: bool):
    """tests.tiny's model over this worker's vocabulary, with ``attn`` registered (same weights on every rank)."""
    register_attention(attn)
    return tiny.tiny_llama(V, attn=attn, tied=tied)


def unsharded_units(model) -> list[str]:
    """Names of the FSDP2 units whose parameters are not sharded now (after a step: none should be)."""
    from torch.distributed.fsdp import FSDPModule

    out = []
    for name, module in model.named_modules():
        if isinstance(module, FSDPModule):
            for group in module._get_fsdp_state()._fsdp_param_groups:
                if not group.is_sharded:
                    out.append(name or "<root>")
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--untied", action="store_true", help="separate LM head, as Llama-3.1-8B")
    args = parser.parse_args()
    torch.set_num_threads(1)

    cfg = load_train_config(args.config, args.overrides)
    b = cfg.batch
    accelerator = build_accelerator(cfg)
    rank, world = accelerator.process_index, accelerator.num_processes
    attn, _ = select_attention(cfg.model.base_model.transformer.use_flash_attention, accelerator.device)
    model = tiny_llama(attn, tied=not args.untied)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)  # FSDP2 fully_shard happens here
    model.train()

    data = MemoryDocuments()
    sampler = PackedSampler(data.lengths, b.sequence_length, seed=cfg.data.sampling.seed)
    info = {"losses": [], "grad_norms": [], "trained_tokens": [], "local_counts": [], "unsharded_units": []}
    caught = warnings.catch_warnings(record=True)
    seen_warnings = caught.__enter__()
    warnings.simplefilter("always")
    for step in range(args.steps):
        micro_batches = [
            collate(rows, data, b.sequence_length, b.cross_document_attention)
            for rows in sampler.micro_batches(step, b.batch_size, b.micro_batch_size, rank, world)
        ]
        result = train_step(
            model, optimizer, accelerator, micro_batches, cfg.model.base_model.cross_entropy_impl, clip=0.0
        )
        assert result.stepped, result
        info["losses"].append(result.loss)
        info["grad_norms"].append(result.grad_norm)
        info["trained_tokens"].append(result.trained_tokens)
        info["local_counts"].append([mb["num_trained"] for mb in micro_batches])
        info["unsharded_units"].append(unsharded_units(model))  # every FSDP unit sharded again after a step
    caught.__exit__(None, None, None)
    info["fsdp_warnings"] = [str(w.message) for w in seen_warnings if "fsdp" in str(w.filename).lower()]

    info["is_sharded"] = is_sharded(model)
    info["describe"] = describe(accelerator)
    info["attention"] = attn
    info["world_env"] = os.environ.get("WORLD_SIZE")
    state = accelerator.get_state_dict(model)  # collective: gathers the full weights (rank 0 keeps them)
    out = Path(cfg.run.experiment_dir)
    if accelerator.is_main_process:
        torch.save({k: v.detach().cpu().float() for k, v in state.items()}, out / "weights.pt")
    tmp = out / f"rank{rank}.json.tmp"
    tmp.write_text(json.dumps(info))
    tmp.rename(out / f"rank{rank}.json")
    # rank 0 writes weights.pt after the last collective: every rank waits for it here, so that no rank tears
    # its gloo connections down while another is still in the group (a rank then aborts at exit, exit -6)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    del model, optimizer, state
    close_distributed(accelerator)  # as backend.train does: the group must not die at interpreter exit


if __name__ == "__main__":
    main()
