"""Worker for tests/test_plan.py: one real training step, measuring the bytes each part of backend.plan predicts.

    python -m tests.plan_worker CONFIG.yaml [key=value ...]                         # one process
    python -m accelerate.commands.launch --config_file A.yaml --num_processes 2 -m tests.plan_worker CONFIG.yaml

Builds the model, optimizer and Accelerator with the trainer's own functions (build_accelerator, load_model,
param_groups, accelerator.prepare), collates one packed micro-batch per step with backend.packing.collate and runs
trained_token_loss + backward + optimizer.step, once without and once with activation checkpointing (non-reentrant,
per decoder layer). Each rank writes run.experiment_dir/measured{rank}.json with bytes of this rank's local tensors:
params (parameter storage, the local shard under FSDP2), gradients (after backward), optimizer (AdamW state after
the step), saved_full / saved_checkpointed (tensors autograd saved for backward during the forward, each storage
counted once, parameters excluded, via torch.autograd.graph.saved_tensors_hooks), trained (targets in the
micro-batch).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script by accelerate launch

import numpy as np  # noqa: E402
import torch  # noqa: E402

from backend.config import load_train_config  # noqa: E402
from backend.distributed import build_accelerator, close_distributed  # noqa: E402
from backend.loss import trained_token_loss  # noqa: E402
from backend.modeling import load_model, select_attention  # noqa: E402
from backend.packing import collate  # noqa: E402
from backend.train import param_groups  # noqa: E402


class _Documents:
    """Random token documents, every token trained (so the fused loss keeps ~every position)."""

    def __init__(self, lengths, vocab, seed):
        rng = np.random.default_rng(seed)
        self.docs = [rng.integers(1, vocab, n) for n in lengths]

    def document(self, d):
        return self.docs[d], np.ones(len(self.docs[d]), dtype=bool)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        t = _local(t)
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_train_config(args.config, args.overrides)
    accelerator = build_accelerator(cfg)
    rank = accelerator.process_index

    torch.manual_seed(cfg.model.distributed.seed)
    attn, _ = select_attention(cfg.model.base_model.transformer.use_flash_attention, accelerator.device)
    model = load_model(cfg.pretrained.path, "fp32", attn, random_init=not cfg.pretrained.model_weights)
    vocab = model.config.vocab_size
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optimizer.weight_decay), lr=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()

    b = cfg.batch
    L = b.sequence_length
    lengths = [L // 4, L // 2, L // 4 - 8] * b.micro_batch_size  # 3 documents and 8 padding tokens per row
    data = _Documents(lengths, vocab, seed=rank)
    rows = [[(3 * r + j, 0, lengths[3 * r + j]) for j in range(3)] for r in range(b.micro_batch_size)]
    mb = {k: v.to(accelerator.device) if hasattr(v, "to") else v for k, v in collate(rows, data, L).items()}

    out = {"trained": mb["num_trained"], "world_size": accelerator.num_processes}
    for name, checkpointing in (("full", False), ("checkpointed", True)):
        if checkpointing:
            accelerator.unwrap_model(model).gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        saved = {}

        def pack(t, saved=saved):
            base = t if t._base is None else t._base  # a Linear saves weight.t(), a view of the parameter
            if not isinstance(base, torch.nn.Parameter):  # parameters are the params part, not activations
                s = _local(t).untyped_storage()
                saved[s.data_ptr()] = s.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), accelerator.autocast():
            loss_sum, _ = trained_token_loss(model, mb, cfg.model.base_model.cross_entropy_impl)
        out[f"saved_{name}"] = sum(saved.values())
        accelerator.backward(loss_sum / max(1, mb["num_trained"]))
        out["gradients"] = _bytes(p.grad for p in model.parameters() if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    out["params"] = _bytes(model.parameters())
    out["optimizer"] = _bytes(
        v for state in optimizer.state.values() for k, v in state.items() if torch.is_tensor(v) and k != "step"
    )
    path = Path(cfg.run.experiment_dir) / f"measured{rank}.json"
    path.write_text(json.dumps(out))
    accelerator.wait_for_everyone()  # every rank's file is written before any rank leaves the group
    accelerator.end_training()
    del model, optimizer, loss_sum, mb  # the loss's autograd graph holds the FSDP state too
    close_distributed(accelerator)  # as backend.train does: the group must not die at interpreter exit


if __name__ == "__main__":
    main()
