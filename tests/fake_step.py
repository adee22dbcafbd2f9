"""The trainer's real step on fake tensors: what one GPU holds at the 8B width, with no GPU and no memory allocated.

    python -m tests.fake_step [--layers 2] [--world 8] [--checkpointing]      # prints the peak and its parts

`backend.train.train_step` runs on a random Llama of Llama-3.1-8B's widths (hidden 4,096, 32 heads, 8 KV heads, MLP
14,336, vocabulary 128,256) with `layers` decoder layers, made under `FakeTensorMode` (shapes and dtypes, no data),
prepared by the trainer's own Accelerator (backend.distributed.build_accelerator: FSDP2 through accelerate 1.15's
units, bf16 mixed precision) over a fake process group of `world` ranks (torch's `fake` backend: collectives return
at once, FSDP2 really shards), one packed row of 4,096 tokens per rank, sdpa_packed attention and the fused loss.
`torch.distributed._tools.fsdp2_mem_tracker.FSDPMemTracker` records the bytes alive per category; the second step
is measured (the optimizer state exists, as in the plan's steady state).

What has to be worked around (FACTS.md, "Measured without a GPU"):
- accelerate maps optimizer parameters by `data_ptr()`, 0 for every fake tensor: `id()` stands in during prepare;
- prepare runs outside the fake mode (the device mesh needs real rank tensors);
- `nonzero` and `.item()` have no answer on fake tensors: a dispatch mode answers them (every target trained, and
  1 for every scalar: the loss value is meaningless here, only the bytes count); sdpa_packed's document plan is
  computed on the real batch first and reused by the fake forward;
- the batch stays on "cpu" where the fake parameters are (fake tensors tell "cpu" from "cpu:0").
"""

from __future__ import annotations

import os

import torch

LLAMA_8B = {
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 14336,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
}
SEQUENCE = 4096


def fake_step_peak(cfg, world: int, layers: int) -> dict:
    """{"peak": bytes, "peak_phase": name, "phases": {"forward" | "backward" | "optimizer step": {category: bytes,
    "Total": bytes}}} of one GPU at the peaks of the second train_step of `cfg`
    (a TrainConfig; full finetuning, zero_stage 3) with `layers` layers of the 8B widths on `world` fake ranks."""
    import numpy as np
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import LlamaConfig, LlamaForCausalLM

    import backend.attention as packed_attention
    import backend.train as train_module
    from backend.distributed import build_accelerator
    from backend.modeling import prepare_for_packed_training, register_attention
    from backend.packing import Piece, collate
    from backend.scaling import enable_activation_checkpointing

    if world < 2 or cfg.model.base_model.peft.type != "none":
        # LoRA on one rank (MemTracker) is not done: PEFT moves its fake adapters with Module._apply, which cannot
        # swap fake parameters ("Couldn't swap Linear.weight"), also with swap_module_params_on_conversion
        raise NotImplementedError("fake_step_peak measures full finetuning under FSDP (world >= 2) only")
    os.environ.update(RANK="0", WORLD_SIZE=str(world), LOCAL_RANK="0", LOCAL_WORLD_SIZE=str(world))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29999")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        accelerator = build_accelerator(cfg)
        register_attention("sdpa_packed")
        fake = FakeTensorMode(allow_non_fake_inputs=True)
        config = LlamaConfig(**LLAMA_8B, num_hidden_layers=layers, use_cache=False)
        config._attn_implementation = "sdpa_packed"
        with fake:
            model = prepare_for_packed_training(LlamaForCausalLM(config))
        if cfg.model.multi_stage.activation_checkpointing:
            enable_activation_checkpointing(model)
        opt = cfg.optimizer
        optimizer = torch.optim.AdamW(train_module.param_groups(model, opt.weight_decay), lr=1e-5)
        saved_data_ptr = FakeTensor.__dict__.get("data_ptr")
        FakeTensor.data_ptr = lambda self: id(self)  # accelerate's parameter map: see the module docstring
        try:
            model, optimizer = accelerator.prepare(model, optimizer)
        finally:
            if saved_data_ptr is None:
                del FakeTensor.data_ptr
            else:
                FakeTensor.data_ptr = saved_data_ptr

        class Documents:  # three documents filling one row of 4,096 tokens, every token trained
            lengths = [1000, 1500, SEQUENCE - 2500]

            def document(self, i, begin=0, end=None):
                n = self.lengths[i]
                return np.arange(n) % 1000 + 1, np.ones(n, dtype=bool)

        rows = [[Piece(0, 0, 1000), Piece(1, 0, 1500), Piece(2, 0, SEQUENCE - 2500)]]
        batch = collate(rows, Documents(), SEQUENCE)
        kept = int((batch["labels"][:, 1:] != -100).sum())
        packed_attention._chunk_plan(SEQUENCE, batch["cu_seq_lens_q"], None)  # real plan, reused by the fake forward

        class Answers(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten.nonzero.default:
                    return torch.empty((kept, args[0].dim()), dtype=torch.long, device=args[0].device)
                if func is torch.ops.aten._local_scalar_dense.default:
                    return 1
                return func(*args, **(kwargs or {}))

        to_device = train_module._to_device
        train_module._to_device = lambda mb, device: mb  # the batch stays on "cpu" (module docstring)
        try:
            with fake, Answers():
                impl = cfg.model.base_model.cross_entropy_impl
                train_module.train_step(model, optimizer, accelerator, [batch], impl, clip=1.0)  # state made
                tracker = FSDPMemTracker(mod=model, optm=getattr(optimizer, "optimizer", optimizer))
                phases = {}

                def close_phase(name: str) -> None:  # the peak since the last phase ended, then start afresh
                    (parts,) = tracker.get_tracker_snapshot("peak").values()
                    phases[name] = {str(k).split(".")[-1]: v for k, v in parts.items()}
                    tracker._peak_mem, tracker._peak_mem_snap = {}, {}

                backward = accelerator.backward

                def phased_backward(loss, **kwargs):
                    close_phase("forward")
                    backward(loss, **kwargs)
                    close_phase("backward")

                accelerator.backward = phased_backward
                with tracker:
                    train_module.train_step(model, optimizer, accelerator, [batch], impl, clip=1.0)
                    close_phase("optimizer step")
                accelerator.backward = backward
        finally:
            train_module._to_device = to_device
        peak_phase = max(phases, key=lambda name: phases[name]["Total"])
        return {"peak": phases[peak_phase]["Total"], "peak_phase": peak_phase, "phases": phases}
    finally:
        dist.destroy_process_group()


def main() -> None:
    import argparse

    from backend import ROOT
    from backend.config import load_train_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the result as JSON (tests/test_plan_fake_step.py)")
    args = parser.parse_args()
    cfg = load_train_config(
        ROOT / "assets" / "configs" / "llama31_8b_magpie_train.yaml",
        [
            f"batch.batch_size={args.world}",
            f"run.num_processes={args.world}",
            f"model.multi_stage.activation_checkpointing={'yes' if args.checkpointing else 'no'}",
        ],
    )
    result = fake_step_peak(cfg, args.world, args.layers)
    if args.json:
        import json

        print(json.dumps(result))
        return
    for name, parts in result["phases"].items():
        print(f"{name}: {parts['Total'] / 2**30:.2f} GiB", {k: round(v / 2**30, 2) for k, v in parts.items() if v})


if __name__ == "__main__":
    main()
