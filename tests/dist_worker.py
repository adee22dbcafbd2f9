"""Worker for tests/test_distributed.py: a few optimizer steps of a tiny random Llama, the way backend.train steps.

Takes a training config like backend.train (model.multi_stage.zero_stage, model.base_model.cross_entropy_impl,
model.distributed.*; results go to run.experiment_dir) and is launched by backend.launch.train_command:

    python -m tests.dist_worker CONFIG.yaml [key=value ...]                        # one process, the reference
    python -m accelerate.commands.launch --config_file A.yaml --num_processes 2 -m tests.dist_worker CONFIG.yaml

Every step uses the same global batch of 4 packed rows (built from the step number), split across ranks as the
trainer splits it: rank r gets rows [r*4/W, (r+1)*4/W), one row per micro-batch, so ranks see different
trained-token counts (and rank 1 gets a micro-batch with no trained token in step 1). Each rank writes
run.experiment_dir/rank{r}.json: {"losses": [...], "grad_norms": [...], "is_sharded": bool, "describe": {...}};
rank 0 also writes run.experiment_dir/weights.pt, the full state dict gathered with accelerator.get_state_dict.
"""

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script by torchrun/accelerate

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from backend import IGNORE_INDEX  # noqa: E402
from backend.config import load_train_config  # noqa: E402
from backend.distributed import build_accelerator, describe, is_sharded  # noqa: E402
from backend.loss import global_trained_count, loss_scale, trained_token_loss  # noqa: E402

ROWS, L, V = 4, 16, 101


def global_batch(step: int) -> dict:
    """4 rows of L tokens: 1-3 documents per row, trained tail of each document, padding at the end."""
    g = torch.Generator().manual_seed(1000 + step)
    input_ids = torch.zeros(ROWS, L, dtype=torch.long)
    labels = torch.full((ROWS, L), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros(ROWS, L, dtype=torch.long)
    for b in range(ROWS):
        pos = 0
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            n = int(torch.randint(2, 7, (1,), generator=g))
            if pos + n > L:
                break
            toks = torch.randint(1, V, (n,), generator=g)
            input_ids[b, pos : pos + n] = toks
            position_ids[b, pos : pos + n] = torch.arange(n)
            first_trained = int(torch.randint(1, n + 1, (1,), generator=g))
            labels[b, pos + first_trained : pos + n] = toks[first_trained:]
            pos += n
    if step == 1:
        labels[2] = IGNORE_INDEX  # rank 1's first micro-batch (2 ranks) trains nothing: ranks must stay in step
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    cfg = load_train_config(args.config, args.overrides)
    impl = cfg.model.base_model.cross_entropy_impl
    accelerator = build_accelerator(cfg)
    rank, world = accelerator.process_index, accelerator.num_processes

    torch.manual_seed(0)  # same initial weights on every rank
    config = LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        use_cache=False,
    )
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)  # FSDP2 fully_shard happens here
    model.train()

    losses, grad_norms = [], []
    for step in range(args.steps):
        batch = global_batch(step)
        per_rank = ROWS // world
        rows = range(rank * per_rank, (rank + 1) * per_rank)
        micro_batches = [{k: v[r : r + 1].to(accelerator.device) for k, v in batch.items()} for r in rows]
        counts = [int((mb["labels"][:, 1:] != IGNORE_INDEX).sum()) for mb in micro_batches]
        total = global_trained_count(accelerator, counts)  # all-reduce: every rank calls it
        scale = loss_scale(total, world)
        local_sum = 0.0
        for i, mb in enumerate(micro_batches):
            # as backend.train: gradients are reduced across ranks only on the step's last micro-batch
            last = i == len(micro_batches) - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(model):
                loss_sum, n = trained_token_loss(model, mb, impl=impl)
                accelerator.backward(loss_sum * scale)  # gradient_accumulation_steps=1: no extra division
            local_sum += float(loss_sum.detach())
        step_sum = accelerator.reduce(torch.tensor([local_sum], dtype=torch.float64), reduction="sum")
        losses.append(float(step_sum) / total)
        grad_norms.append(float(accelerator.clip_grad_norm_(model.parameters(), 1e9)))
        optimizer.step()
        optimizer.zero_grad()

    sharded = is_sharded(model)
    state = accelerator.get_state_dict(model)  # collective: gathers the full weights (rank 0 keeps them)
    out = Path(cfg.run.experiment_dir)
    if accelerator.is_main_process:
        torch.save({k: v.detach().cpu().float() for k, v in state.items()}, out / "weights.pt")
    info = {
        "losses": losses,
        "grad_norms": grad_norms,
        "is_sharded": sharded,
        "describe": describe(accelerator),
        "last_step_counts": counts,
        "world_env": os.environ.get("WORLD_SIZE"),
        "impl": impl,
    }
    tmp = out / f"rank{rank}.json.tmp"
    tmp.write_text(json.dumps(info))
    tmp.rename(out / f"rank{rank}.json")
    accelerator.end_training()


if __name__ == "__main__":
    main()
