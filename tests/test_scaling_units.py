"""One-process checks of backend/scaling.py and the attention tiers (the 2-process ones are in test_scaling.py).

- activation checkpointing: the same loss and gradients (fp32, <= 1e-6) with fewer saved-activation bytes;
- micro_batch_sync: no_sync for DDP only, never under FSDP;
- select_attention: flash-attn, then torch varlen, then sdpa_packed on CUDA; sdpa_packed off CUDA; each with a reason;
- (GPU) torch_varlen equals sdpa_packed, forward and backward.
"""

import contextlib

import numpy as np
import pytest
import torch

from backend.loss import trained_token_loss
from backend.modeling import PACKED_SDPA, TORCH_VARLEN, register_attention, select_attention
from backend.packing import PackedSampler, collate
from backend.scaling import enable_activation_checkpointing, micro_batch_sync
from tests.tiny import tiny_llama

torch.set_num_threads(1)
VOCAB, L = 97, 256


class MemDataset:
    def __init__(self, lengths, seed=0):
        rng = np.random.default_rng(seed)
        self.docs = [(rng.integers(1, VOCAB, n), rng.random(n) < 0.6) for n in lengths]

    def document(self, i):
        return self.docs[i]


def packed_batch(seed=0, rows=2):
    rng = np.random.default_rng(seed)
    lengths = np.maximum(2, rng.lognormal(np.log(40), 0.7, 60).astype(np.int64)).clip(max=L)
    sampler = PackedSampler(lengths, L, seed=seed, window=16)
    return collate(sampler.rows(0, rows), MemDataset(lengths, seed), L)


def model_of(attn=PACKED_SDPA, layers=4, seed=0):
    register_attention(attn)
    return tiny_llama(VOCAB, attn=attn, hidden=64, layers=layers, positions=L, seed=seed).train()


def loss_grads_and_saved_bytes(model, batch):
    """(loss, {name: grad}, bytes of the distinct storages autograd saved from forward for backward)."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = trained_token_loss(model, batch, "fused")
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}, sum(storages.values())


def test_activation_checkpointing_same_loss_and_gradients_fewer_saved_bytes():
    batch = packed_batch()
    off = model_of()
    on = model_of()
    assert enable_activation_checkpointing(on) == 4  # every decoder layer
    loss_off, grads_off, saved_off = loss_grads_and_saved_bytes(off, batch)
    loss_on, grads_on, saved_on = loss_grads_and_saved_bytes(on, batch)
    # non-reentrant checkpointing also keeps each layer's input (B*L, H) fp32 outside any saved-tensor hook: add it
    saved_on += 4 * batch["input_ids"].numel() * on.config.hidden_size * 4
    print(f"\nsaved activations, 4 layers, 2x{L} tokens: off {saved_off:,} bytes, on {saved_on:,} bytes")
    assert loss_on == pytest.approx(loss_off, abs=1e-6)
    assert grads_on.keys() == grads_off.keys()
    for name in grads_off:
        assert torch.allclose(grads_on[name], grads_off[name], rtol=0, atol=1e-6), name
    # the decoder layers' internals are recomputed in backward instead of kept: far fewer saved bytes
    assert saved_on < 0.5 * saved_off, (saved_on, saved_off)


def test_activation_checkpointing_refuses_models_without_support():
    class NoCheckpointing(torch.nn.Module):
        supports_gradient_checkpointing = False

    with pytest.raises(ValueError, match="activation_checkpointing"):
        enable_activation_checkpointing(NoCheckpointing())


class FakeAccelerator:
    def __init__(self, kind, processes):
        from accelerate.utils import DistributedType

        self.distributed_type = getattr(DistributedType, kind)
        self.num_processes = processes
        self.no_sync_calls = 0

    @contextlib.contextmanager
    def no_sync(self, model):
        self.no_sync_calls += 1
        yield


@pytest.mark.parametrize(
    "kind,processes,expected", [("FSDP", 2, 0), ("MULTI_GPU", 2, 3), ("MULTI_CPU", 4, 3), ("NO", 1, 0)]
)
def test_micro_batch_sync_uses_no_sync_for_ddp_only(kind, processes, expected):
    accelerator = FakeAccelerator(kind, processes)
    for i in range(4):  # 4 micro-batches: the last one always synchronizes
        with micro_batch_sync(accelerator, None, last=i == 3):
            pass
    assert accelerator.no_sync_calls == expected


def test_select_attention_three_tiers_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def having(*names):
        return lambda name: name in names

    impl, reason = select_attention(True, "cuda", _has_module=having("flash_attn", "torch.nn.attention.varlen"))
    assert impl == "flash_attention_2" and "flash-attn" in reason
    impl, reason = select_attention(True, "cuda", _has_module=having("torch.nn.attention.varlen"))
    assert impl == TORCH_VARLEN and "not installed" in reason and "torch.nn.attention.varlen" in reason
    impl, reason = select_attention(True, "cuda", _has_module=having())
    assert impl == PACKED_SDPA and "neither" in reason and "torch >= 2.10" in reason
    impl, reason = select_attention(False, "cuda", _has_module=having("flash_attn"))
    assert impl == PACKED_SDPA and "off" in reason


def test_select_attention_off_cuda_and_the_real_probe():
    impl, reason = select_attention(True, "cpu", _has_module=lambda name: True)
    assert impl == PACKED_SDPA and "not CUDA" in reason
    from backend.modeling import _module_available

    assert _module_available("torch") and not _module_available("no_such_package.sub")


def test_torch_varlen_on_cpu_falls_back_to_sdpa_packed():
    """Registered and usable everywhere: off CUDA it is sdpa_packed, so the same loss to the last bit."""
    batch = packed_batch(1)
    a, _, _ = loss_grads_and_saved_bytes(model_of(TORCH_VARLEN), batch)
    b, _, _ = loss_grads_and_saved_bytes(model_of(PACKED_SDPA), batch)
    assert a == b


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_varlen_equals_sdpa_packed_on_gpu():
    pytest.importorskip("torch.nn.attention.varlen")
    batch = {k: v.cuda() if hasattr(v, "cuda") else v for k, v in packed_batch(2, rows=4).items()}
    results = []
    for attn in (TORCH_VARLEN, PACKED_SDPA):
        model = model_of(attn).cuda().to(torch.bfloat16)
        loss, _ = trained_token_loss(model, batch, "fused")
        loss.backward()
        results.append((float(loss), {n: p.grad.float() for n, p in model.named_parameters()}))
    (loss_v, grads_v), (loss_s, grads_s) = results
    assert loss_v == pytest.approx(loss_s, rel=2e-3)
    for name in grads_s:
        scale = grads_s[name].abs().max().item() + 1e-6
        assert (grads_v[name] - grads_s[name]).abs().max().item() <= 3e-2 * scale, name
