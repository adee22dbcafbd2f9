"""The trainer's real step on fake tensors: what one GPU holds at the 8B width, with no GPU and no memory allocated.

    python -m tests.fake_step [--layers 2] [--world 8] [--checkpointing]      # prints the peak and its parts
    python -m tests.fake_step --lora 8 [--layers 2] [--checkpointing]          # LoRA rank 8 on one process
    python -m tests.fake_step --lora 8 --lora-dropout 0.1                        # with PEFT's dropout on its inputs

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

LoRA on one process (`lora_step_peak`): PEFT moves the adapters it makes with `Module.to`, which cannot swap fake
parameters ("Couldn't swap Linear.weight"), so the base is made fake and `wrap_lora` runs outside the fake mode (the
adapters are real fp32 tensors, a few MiB, counted like the rest); `prepare` places nothing for the same reason; and
MemTracker refuses a frozen parameter, so `LiveBytes` counts the storages alive itself. LoRA dropout: torch's dropout
takes native_dropout (an output and a bool mask, the mask saved) only on CUDA; on the CPU it multiplies by a noise
tensor of the input's dtype, a 4-byte mask for PEFT's fp32 input. The probe runs CUDA's path (`_cuda_dropout`) so
that it saves what a GPU saves.
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


def _packed_row():
    """(one collated row of three documents filling SEQUENCE tokens, every token trained; its trained count).
    sdpa_packed's document plan is computed here on the real batch and reused by the fake forward."""
    import numpy as np

    import backend.attention as packed_attention
    from backend.packing import Piece, collate

    class Documents:
        lengths = [1000, 1500, SEQUENCE - 2500]

        def document(self, i, begin=0, end=None):
            n = self.lengths[i]
            return np.arange(n) % 1000 + 1, np.ones(n, dtype=bool)

    rows = [[Piece(0, 0, 1000), Piece(1, 0, 1500), Piece(2, 0, SEQUENCE - 2500)]]
    batch = collate(rows, Documents(), SEQUENCE)
    packed_attention._chunk_plan(SEQUENCE, batch["cu_seq_lens_q"], None)
    return batch, int((batch["labels"][:, 1:] != -100).sum())


def _answer(func, args, kept: int):
    """What a fake tensor cannot say (module docstring): nonzero's size (every target trained) and scalars (1);
    NotImplemented for every other op."""
    if func is torch.ops.aten.nonzero.default:
        return torch.empty((kept, args[0].dim()), dtype=torch.long, device=args[0].device)
    if func is torch.ops.aten._local_scalar_dense.default:
        return 1
    return NotImplemented


def _phased(accelerator, close_phase):
    """Make accelerator.backward close the "forward" phase before it and the "backward" phase after it; returns the
    function that restores it."""
    backward = accelerator.backward

    def phased_backward(loss, **kwargs):
        close_phase("forward")
        backward(loss, **kwargs)
        close_phase("backward")

    accelerator.backward = phased_backward
    return lambda: setattr(accelerator, "backward", backward)


def fake_step_peak(cfg, world: int, layers: int) -> dict:
    """{"peak": bytes, "peak_phase": name, "phases": {"forward" | "backward" | "optimizer step": {category: bytes,
    "Total": bytes}}} of one GPU at the peaks of the second train_step of `cfg`
    (a TrainConfig; full finetuning, zero_stage 3) with `layers` layers of the 8B widths on `world` fake ranks."""
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import LlamaConfig, LlamaForCausalLM

    import backend.train as train_module
    from backend.distributed import build_accelerator
    from backend.modeling import prepare_for_packed_training, register_attention
    from backend.scaling import enable_activation_checkpointing

    if world < 2 or cfg.model.base_model.peft.type != "none":
        raise ValueError("fake_step_peak measures full finetuning under FSDP (world >= 2); LoRA: lora_step_peak")
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

        batch, kept = _packed_row()

        class Answers(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = _answer(func, args, kept)
                return func(*args, **(kwargs or {})) if out is NotImplemented else out

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

                restore = _phased(accelerator, close_phase)
                with tracker:
                    train_module.train_step(model, optimizer, accelerator, [batch], impl, clip=1.0)
                    close_phase("optimizer step")
                restore()
        finally:
            train_module._to_device = to_device
        peak_phase = max(phases, key=lambda name: phases[name]["Total"])
        return {"peak": phases[peak_phase]["Total"], "peak_phase": peak_phase, "phases": phases}
    finally:
        dist.destroy_process_group()


class LiveBytes:
    """A dispatch mode counting the bytes of every storage alive, with the peak since `restart()` and what made it.

    torch's MemTracker cannot follow a LoRA model: it hooks the gradient of every parameter, and a frozen base
    parameter has none ("cannot register a hook on a tensor that doesn't require gradient"). A storage's Python
    object lives as long as the storage itself (PyObject preservation, fake storages too), so a finalizer on it
    says when its bytes are freed. A storage an op grows in place (`resize_`, an `out=` tensor too small) is
    counted at its new size: every op's outputs are looked at, the tensors it was given included. Tensors made
    before the mode (parameters, gradients, optimizer state) are counted with `track`. Answers nonzero and scalars
    as the FSDP probe does (`_answer`). `where()` names what runs (lora_step_peak: the innermost module), kept with
    each peak as `peak_where`.
    """

    def __init__(self, kept: int):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = _answer(func, args, kept)
                if out is NotImplemented:
                    out = func(*args, **(kwargs or {}))
                    outer.track(out, func.__name__)
                return out

        self.mode = Mode()
        self.live: dict[int, tuple[int, str]] = {}
        self.total = self.peak = 0
        self.peak_parts: dict[str, int] = {}
        self.where = lambda: ""
        self.peak_where = ""

    def track(self, value, made_by: str) -> None:
        import weakref

        from torch.utils._pytree import tree_flatten

        for t in tree_flatten(value)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = id(storage)
            n = storage.nbytes()
            if key in self.live:  # grown in place (resize_, out=): the storage keeps the name of what made it
                before, what = self.live[key]
                if n == before:
                    continue
                self.live[key] = (n, what)
                self.total += n - before
            else:
                self.live[key] = (n, f"{made_by} {str(t.dtype).removeprefix('torch.')}")
                self.total += n
                weakref.finalize(storage, self._free, key)
            if self.total > self.peak:
                self.peak, self.peak_parts, self.peak_where = self.total, self._parts(), self.where()

    def _parts(self) -> dict[str, int]:
        parts: dict[str, int] = {}
        for size, what in self.live.values():
            parts[what] = parts.get(what, 0) + size
        return parts

    def _free(self, key: int) -> None:
        self.total -= self.live.pop(key)[0]

    def restart(self) -> tuple[int, dict, str]:
        """(peak, {what made it: bytes}, where) since the last restart; the next peak starts from what is alive now
        (and its parts, so a phase that adds nothing to them still says what it holds)."""
        out = self.peak, self.peak_parts, self.peak_where
        self.peak, self.peak_parts, self.peak_where = self.total, self._parts(), self.where()
        return out


def _cuda_dropout(dropout):
    """F.dropout as on CUDA: at::dropout's fused kernel, native_dropout (bool mask), for 0 < p < 1 in training."""

    def cuda_dropout(input, p=0.5, training=True, inplace=False):
        if training and 0 < p < 1 and not inplace:
            return torch.native_dropout(input, p, training)[0]
        return dropout(input, p, training, inplace)

    return cuda_dropout


def lora_step_peak(cfg, layers: int) -> dict:
    """fake_step_peak's result for a LoRA `cfg` on one process (no FSDP): the frozen base in the training dtype made
    under FakeTensorMode, the real `backend.lora.wrap_lora` on it (PEFT; its adapters are real fp32 tensors, a few
    MiB, so PEFT can move them), the trainer's Accelerator (autocast), `train_step` under LiveBytes. "phases" hold
    {"Total": bytes, what made them: bytes} at each phase's peak; "Total" counts every storage alive. "where": the
    innermost module running at each phase's peak ("base_model.model.model.layers.1.mlp.down_proj"; "" outside
    every module: the loss)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import LlamaConfig, LlamaForCausalLM

    import backend.train as train_module
    from backend.distributed import build_accelerator
    from backend.lora import wrap_lora
    from backend.modeling import DTYPES, prepare_for_packed_training, register_attention
    from backend.scaling import enable_activation_checkpointing

    if cfg.model.base_model.peft.type != "lora":
        raise ValueError("lora_step_peak measures LoRA; full finetuning: fake_step_peak")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):  # one process, no process group
        os.environ.pop(name, None)
    accelerator = build_accelerator(cfg)
    register_attention("sdpa_packed")
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    config = LlamaConfig(**LLAMA_8B, num_hidden_layers=layers, use_cache=False)
    config._attn_implementation = "sdpa_packed"
    default = torch.get_default_dtype()
    with fake:  # backend.lora.load_lora_model: the unquantized base in the training dtype on one process
        torch.set_default_dtype(DTYPES[cfg.model.distributed.training_dtype])
        try:
            base = prepare_for_packed_training(LlamaForCausalLM(config))
        finally:
            torch.set_default_dtype(default)
    model = wrap_lora(base, cfg)  # outside the fake mode: PEFT's .to() cannot swap fake parameters
    if cfg.model.multi_stage.activation_checkpointing:
        enable_activation_checkpointing(model)
    optimizer = torch.optim.AdamW(train_module.param_groups(model, cfg.optimizer.weight_decay), lr=1e-5)
    # the model is where it was made ("cpu"): prepare's .to() would have to swap fake parameters
    model, optimizer = accelerator.prepare(model, optimizer, device_placement=[False, False])
    batch, kept = _packed_row()
    impl = cfg.model.base_model.cross_entropy_impl
    live = LiveBytes(kept)
    to_device, dropout = train_module._to_device, torch.nn.functional.dropout
    train_module._to_device = lambda mb, device: mb  # the batch stays on "cpu" (module docstring)
    torch.nn.functional.dropout = _cuda_dropout(dropout)  # PEFT's lora_dropout: CUDA's mask (module docstring)
    phases, where = {}, {}
    # the innermost module running, kept with each peak: a stack of names pushed and popped by global hooks
    names = {id(module): name for name, module in model.named_modules()}
    running: list[str] = []

    def leave(module, args, output) -> None:  # None: a value would replace the output; always_call: a recompute
        # that checkpointing stops early (StopRecomputationError) leaves its module too
        running.pop()

    hooks = [
        torch.nn.modules.module.register_module_forward_pre_hook(lambda m, a: running.append(names.get(id(m), ""))),
        torch.nn.modules.module.register_module_forward_hook(leave, always_call=True),
    ]
    live.where = lambda: next((name for name in reversed(running) if name), "")

    def close_phase(name: str) -> None:
        peak, parts, where[name] = live.restart()
        phases[name] = {"Total": peak, **parts}

    try:
        live.track([list(model.parameters()), list(model.buffers())], "parameters")
        with fake, live.mode:
            train_module.train_step(model, optimizer, accelerator, [batch], impl, clip=1.0)  # state made
            live.track([list(state.values()) for state in optimizer.optimizer.state.values()], "optimizer state")
            live.restart()
            restore = _phased(accelerator, close_phase)
            try:
                train_module.train_step(model, optimizer, accelerator, [batch], impl, clip=1.0)
                close_phase("optimizer step")
            finally:
                restore()
    finally:
        train_module._to_device, torch.nn.functional.dropout = to_device, dropout
        for hook in hooks:
            hook.remove()
    peak_phase = max(phases, key=lambda name: phases[name]["Total"])
    return {"peak": phases[peak_phase]["Total"], "peak_phase": peak_phase, "phases": phases, "where": where}


def probe_config(world: int, checkpointing: bool, lora_rank: int = 0, lora_dropout: float = 0.0):
    """The guide's 8B config as the probes run it: one packed row of 4,096 tokens per rank and step; LoRA (on one
    process, zero_stage 0, PEFT's dropout lora_dropout) when lora_rank > 0."""
    from backend import ROOT
    from backend.config import load_train_config

    overrides = [
        f"batch.batch_size={world}",
        f"run.num_processes={world}",
        f"model.multi_stage.activation_checkpointing={'yes' if checkpointing else 'no'}",
    ]
    if lora_rank:
        overrides += ["model.base_model.peft.type=lora", f"model.base_model.peft.rank={lora_rank}"]
        overrides += ["model.multi_stage.zero_stage=0", f"model.base_model.peft.dropout={lora_dropout}"]
    return load_train_config(ROOT / "assets" / "configs" / "llama31_8b_magpie_train.yaml", overrides)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--lora", type=int, default=0, metavar="RANK", help="LoRA of this rank on one process")
    parser.add_argument("--lora-dropout", type=float, default=0.0, metavar="P", help="PEFT's dropout (with --lora)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON (tests/test_plan_fake_step.py)")
    args = parser.parse_args()
    if args.lora:
        result = lora_step_peak(probe_config(1, args.checkpointing, args.lora, args.lora_dropout), args.layers)
    else:
        result = fake_step_peak(probe_config(args.world, args.checkpointing), args.world, args.layers)
    if args.json:
        import json

        print(json.dumps(result))
        return
    for name, parts in result["phases"].items():
        big = {k: round(v / 2**30, 2) for k, v in sorted(parts.items(), key=lambda kv: -kv[1]) if v >= 2**24}
        at = f" in {result['where'][name] or 'no module'}" if "where" in result else ""
        print(f"{name}: {parts['Total'] / 2**30:.2f} GiB{at}", big)


if __name__ == "__main__":
    main()
