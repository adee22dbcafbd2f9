"""CPU tests of the CUDA-only paths (issue #23): what would reach the kernel, recorded on CPU.

No GPU runs these paths in CI, so each test patches the CUDA op with a recorder that keeps the real op's signature
and its input rules, and checks what the code hands it: dtypes, head counts, keyword arguments, registrations.
- torch_varlen under fp32 master weights + bf16 autocast hands varlen_attn one bf16 dtype (RoPE left q/k fp32);
  fp32 without autocast never reaches it; GQA: enable_gqa where the signature has it, repeated k/v where not;
- QLoRA registers every attention tier with transformers before from_pretrained;
- the fused loss's LM-head gradient under bf16 autocast against fp64;
- a quantized base under FSDP sharding is a config error (run.num_processes and the launcher's world size);
- an fp16 overflow step: skipped by the grad scaler, scale lowered, training goes on;
- the fused loss runs inside the LM head's own call (FSDP2's [norm, LM head] unit hooks fire);
- (gpu) torch_varlen under fp32 master + bf16 autocast on the real kernel.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import backend.attention_varlen as varlen
from backend.loss import trained_token_loss
from backend.modeling import TORCH_VARLEN, register_attention
from backend.packing import PackedSampler, collate
from tests.tiny import tiny_llama

torch.set_num_threads(1)
VOCAB, L = 97, 128


class MemDataset:
    def __init__(self, lengths, seed=0):
        rng = np.random.default_rng(seed)
        self.docs = [(rng.integers(1, VOCAB, n), rng.random(n) < 0.6) for n in lengths]

    def document(self, i):
        return self.docs[i]


def packed_batch(seed=0, rows=2):
    rng = np.random.default_rng(seed)
    lengths = np.maximum(2, rng.lognormal(np.log(30), 0.6, 40).astype(np.int64)).clip(max=L)
    return collate(PackedSampler(lengths, L, seed=seed, window=16).rows(0, rows), MemDataset(lengths, seed), L)


def _reference(q, k, v, cu, scale=None):
    """Causal attention per document in fp32: (T, Hq, D), k/v (T, Hq or Hkv, D) -> (T, Hq, D)."""
    out = []
    for b, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        qs, ks, vs = (t[b:e].transpose(0, 1).float()[None] for t in (q, k, v))
        groups = qs.shape[1] // ks.shape[1]
        out.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=groups > 1))
    return torch.cat([o[0].transpose(0, 1) for o in out]).to(q.dtype)


class Recorder:
    """Stands in for torch.nn.attention.varlen.varlen_attn with the same rules: one dtype for q/k/v, 16-bit only,
    equal head counts unless enable_gqa. Keeps every call's dtypes, shapes and keyword arguments."""

    def __init__(self):
        self.calls = []

    def check(self, q, k, v, kwargs):
        self.calls.append({"dtypes": (q.dtype, k.dtype, v.dtype), "heads": (q.shape[1], k.shape[1]), **kwargs})
        if len({q.dtype, k.dtype, v.dtype}) != 1 or q.dtype not in (torch.bfloat16, torch.float16):
            raise RuntimeError(f"varlen_attn: q/k/v must share one 16-bit dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
        if k.shape[1] != q.shape[1] and not kwargs.get("enable_gqa"):
            raise RuntimeError("varlen_attn: unequal head counts need enable_gqa")


def new_kernel(recorder):
    """torch >= 2.11's signature (window_size, scale, enable_gqa)."""

    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1), enable_gqa=False):  # fmt: skip
        recorder.check(query, key, value, {"window_size": window_size, "enable_gqa": enable_gqa, "scale": scale})
        return _reference(query, key, value, cu_seq_q, scale)

    return varlen_attn


def old_kernel(recorder):
    """torch 2.10's signature: is_causal, no scale, no enable_gqa."""

    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False, return_aux=None):
        recorder.check(query, key, value, {"is_causal": is_causal})
        return _reference(query, key, value, cu_seq_q)

    return varlen_attn


@pytest.fixture
def kernel(monkeypatch):
    """Route torch_varlen to a recorder as if on CUDA; returns a function that installs a kernel maker."""
    monkeypatch.setattr(varlen, "_on_kernel_device", lambda query: True)

    def install(make):
        recorder = Recorder()
        monkeypatch.setattr(varlen, "_kernel", lambda: make(recorder))
        return recorder

    return install


def varlen_model():
    register_attention(TORCH_VARLEN)
    return tiny_llama(VOCAB, attn=TORCH_VARLEN, hidden=64, layers=2, positions=L).train()


def test_fp32_master_under_bf16_autocast_gives_the_kernel_one_bf16_dtype(kernel):
    """One GPU, fp32 master weights, bf16 autocast: RoPE leaves q/k fp32 and v bf16; the kernel must get bf16 x3."""
    recorder = kernel(new_kernel)
    batch = packed_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, count = trained_token_loss(varlen_model(), batch, "fused")
    loss.backward()
    assert recorder.calls and all(c["dtypes"] == (torch.bfloat16,) * 3 for c in recorder.calls)
    assert count > 0 and torch.isfinite(loss)


def test_fp32_without_autocast_never_reaches_the_kernel(kernel):
    recorder = kernel(new_kernel)
    trained_token_loss(varlen_model(), packed_batch(), "fused")
    assert recorder.calls == []  # sdpa_packed took it: the flash kernel has no fp32


def test_gqa_is_passed_to_a_kernel_that_takes_it_and_repeated_for_one_that_does_not(kernel):
    """4 query heads, 2 KV heads: torch >= 2.11 gets enable_gqa and 2 KV heads; 2.10 gets k/v repeated to 4."""
    batch = packed_batch(1)
    new = kernel(new_kernel)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_new, _ = trained_token_loss(varlen_model(), batch, "fused")
    assert new.calls and all(c["enable_gqa"] and c["heads"] == (4, 2) for c in new.calls)
    assert all(c["window_size"] == (-1, 0) for c in new.calls)  # causal
    old = kernel(old_kernel)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_old, _ = trained_token_loss(varlen_model(), batch, "fused")
    assert old.calls and all(c["heads"] == (4, 4) and c["is_causal"] for c in old.calls)
    assert loss_new.item() == pytest.approx(loss_old.item(), rel=1e-2)


@pytest.mark.parametrize("attn", ["sdpa_packed", "torch_varlen", "flash_attention_2"])
def test_qlora_loading_registers_every_attention_tier_before_from_pretrained(attn, monkeypatch):
    """QLoRA loads its base with from_pretrained(attn_implementation=...) itself: our own names (sdpa_packed,
    torch_varlen) must be registered with transformers by then, or a CUDA box without flash-attn gets a ValueError.
    bitsandbytes and CUDA are replaced by a recorder of the from_pretrained call."""
    import transformers
    from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    import backend.lora
    from backend import ASSETS, TINY_MODEL
    from backend.config import load_train_config

    for registry in (AttentionInterface._global_mapping, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping):
        for name in ("sdpa_packed", "torch_varlen"):
            monkeypatch.delitem(registry, name, raising=False)  # as in a fresh process: nothing registered yet
    seen = {}

    def from_pretrained(path, attn_implementation=None, quantization_config=None, **kwargs):
        seen.update(attn=attn_implementation, known=attn_implementation in AttentionInterface._global_mapping)
        config = AutoConfig.from_pretrained(path)
        built = attn_implementation if attn_implementation != "flash_attention_2" else "sdpa"  # no flash-attn here
        return AutoModelForCausalLM.from_config(config, attn_implementation=built)

    monkeypatch.setattr(backend.lora, "check_quantization", lambda cfg, world_size=None: None)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    cfg = load_train_config(
        ASSETS / "configs" / "tiny_train.yaml",
        [f"pretrained.path={TINY_MODEL}", "model.base_model.peft.type=lora", "pretrained.quantization=4bit"],
    )
    model = backend.lora.load_lora_model(cfg, attn)
    assert seen == {"attn": attn, "known": True}
    assert model.get_base_model().config._attn_implementation in (attn, "sdpa")


def test_fused_loss_lm_head_gradient_under_bf16_autocast_matches_fp64():
    """The fused loss sums dL/dW_lm_head over chunks in fp32. Under bf16 autocast a `grad_w += a @ b` rounds each
    chunk's product to bf16 before the sum (relative error ~2e-3 here); addmm_ in fp32 stays near fp64 (~3e-5; the
    rest comes from the bf16 logits of the forward, kept small here by small weights)."""
    from backend.loss import chunked_linear_cross_entropy

    torch.manual_seed(0)
    k, h, v = 512, 64, 300
    hidden, targets = torch.randn(k, h), torch.randint(0, v, (k,))
    weight = (torch.randn(v, h) * 0.01).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked_linear_cross_entropy(hidden, weight, targets, chunk_rows=8).backward()
    w64 = weight.detach().double().requires_grad_()
    F.cross_entropy(hidden.double() @ w64.t(), targets, reduction="sum").backward()
    assert weight.grad.dtype == torch.float32
    error = ((weight.grad.double() - w64.grad).abs().max() / w64.grad.abs().max()).item()
    assert error < 2e-4, error


def test_quantized_base_under_fsdp_sharding_is_a_config_error_that_says_what_works():
    """QLoRA + FSDP over several processes loses the 4-bit quant_state (accelerate#3874): refused when the YAML
    says so (run.num_processes: lora.quantization_problems, run by --validate, the studio and train start) and when
    the launcher's world size says so (check_world_size at train start). The YAML itself still loads: the planner
    plans it for --gpus 1."""
    from backend import ASSETS, TINY_MODEL
    from backend.config import ConfigError, check_world_size, load_train_config
    from backend.lora import quantization_problems

    base = [f"pretrained.path={TINY_MODEL}", "model.base_model.peft.type=lora", "pretrained.quantization=4bit"]
    path = ASSETS / "configs" / "tiny_train.yaml"
    sharded = [*base, "model.multi_stage.zero_stage=3", "batch.batch_size=8", "batch.micro_batch_size=1"]
    (problem,) = quantization_problems(load_train_config(path, [*sharded, "run.num_processes=2"]))
    assert "pretrained.quantization: 4bit cannot be sharded by FSDP over 2 processes" in problem
    assert "zero_stage=0" in problem and "accelerate#3874" in problem
    cfg = load_train_config(path, [*sharded, "run.num_processes=1"])  # one process: fine
    assert "sharded" not in " ".join(quantization_problems(cfg))  # (here: only "needs bitsandbytes / CUDA")
    assert check_world_size(cfg, 1) == 8
    with pytest.raises(ConfigError, match="over 4 processes .the launcher's"):
        check_world_size(cfg, 4)  # headless: accelerate launch --num_processes 4 with this YAML
    ddp = load_train_config(
        path, [*base, "model.multi_stage.zero_stage=0", "batch.batch_size=8", "run.num_processes=2"]
    )
    assert check_world_size(ddp, 2) >= 1  # DDP holds the whole quantized base per process: allowed
    from backend.compat import machine_problems

    launched = load_train_config(path, [*sharded, "run.num_processes=2"])
    assert "sharded by FSDP" not in " ".join(machine_problems(launched, world_size=1))  # python -m backend.train
    assert "over 2 processes (processes launched" in " ".join(machine_problems(launched, world_size=2))
    from backend.compat import check_machine

    for world in (1, 2):  # what train() raises: the problems of the world it runs in (none at 1 on a CUDA machine)
        want = machine_problems(launched, world_size=world)
        if not want:
            assert check_machine(launched, world_size=world) is None
            continue
        with pytest.raises(ConfigError) as e:
            check_machine(launched, world_size=world)
        assert e.value.problems == want


def fp16_on_cpu(monkeypatch, init_scale):
    """(model, optimizer, accelerator): accelerate refuses fp16 on CPU, so its CUDA state is set up by hand on a CPU
    Accelerator: a real torch GradScaler starting at ``init_scale``, the real AcceleratedOptimizer, and
    ``mixed_precision`` "fp16" so that clip_grad_norm_ unscales."""
    from accelerate import Accelerator

    from backend import ASSETS
    from backend.config import load_train_config
    from backend.distributed import build_accelerator
    from tests.dist_worker import tiny_llama as worker_llama

    cfg = load_train_config(ASSETS / "configs" / "tiny_train.yaml", ["model.multi_stage.zero_stage=0"])
    accelerator = build_accelerator(cfg)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    accelerator.native_amp = True
    monkeypatch.setattr(Accelerator, "mixed_precision", property(lambda self: "fp16"))
    model = worker_llama("sdpa_packed", tied=False)
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    return model, optimizer, accelerator


def test_fp16_overflow_step_is_skipped_by_the_scaler_and_lowers_its_scale(monkeypatch):
    """fp16 on CUDA: accelerate's GradScaler scales the loss, clip_grad_norm_ unscales and sees inf, and
    optimizer.step() (scaler.step + scaler.update) skips the update and halves the scale. accelerate refuses fp16 on
    CPU, so its CUDA state is set up by hand on a CPU Accelerator: a real torch GradScaler whose first scale
    overflows, the real AcceleratedOptimizer. The overflow step is no divergence: no update, scale lowered, and
    the next step trains."""
    from backend.train import train_step
    from tests.dist_worker import MemoryDocuments

    model, optimizer, accelerator = fp16_on_cpu(monkeypatch, 2.0**127)  # scaled gradients overflow fp32
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    data = MemoryDocuments()
    sampler = PackedSampler(data.lengths, 16, seed=0)
    batches = [[collate(r, data, 16) for r in sampler.micro_batches(s, 4, 4)] for s in range(2)]
    result = train_step(model, optimizer, accelerator, batches[0], "fused")
    assert result.overflow and not result.stepped and np.isfinite(result.loss) and not np.isfinite(result.grad_norm)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # no update
    assert accelerator.scaler.get_scale() == 2.0**126  # scaler.update() ran: the scale went down
    assert optimizer.step_was_skipped
    for _ in range(8):  # the scale keeps halving until the gradients fit, then the model trains
        result = train_step(model, optimizer, accelerator, batches[1], "fused")
    assert not result.overflow and result.stepped
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fused_loss_runs_the_lm_heads_own_call_so_its_hooks_fire():
    """FSDP2's [final norm, LM head] unit completes (reshards, registers its backward hooks) in the LM head's
    post-forward hook; the fused loss must go through the LM head's call, not around it. Same loss as before."""
    model = tiny_llama(VOCAB, attn="sdpa_packed", hidden=64, layers=2, positions=L).train()
    register_attention("sdpa_packed")
    calls = []
    model.lm_head.register_forward_pre_hook(lambda module, args: calls.append("pre"))
    model.lm_head.register_forward_hook(lambda module, args, out: calls.append(("post", tuple(out.shape))))
    batch = packed_batch(2)
    fused, count = trained_token_loss(model, batch, "fused")
    assert calls == ["pre", ("post", ())]  # one call, returning the 0-dim loss sum
    assert "forward" not in model.lm_head.__dict__  # restored
    reference, count_ref = trained_token_loss(model, batch, "torch")
    assert count == count_ref and fused.item() == pytest.approx(reference.item(), rel=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_varlen_under_fp32_master_and_bf16_autocast_on_gpu():
    """The set-up of bench_gpu's first cases on the real kernel: fp32 weights, bf16 autocast; equals sdpa_packed."""
    pytest.importorskip("torch.nn.attention.varlen")
    batch = {k: v.cuda() if hasattr(v, "cuda") else v for k, v in packed_batch(3).items()}
    losses = []
    for attn in (TORCH_VARLEN, "sdpa_packed"):
        register_attention(attn)
        model = tiny_llama(VOCAB, attn=attn, hidden=64, layers=2, positions=L).train().cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = trained_token_loss(model, batch, "fused")
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=2e-2)


def test_a_step_with_nothing_trained_under_fp16_leaves_the_scaler_ready_for_the_next(monkeypatch):
    """A step whose rows hold no trained token (the training loop skips it) runs no forward and never unscales:
    under fp16 the next step's clip_grad_norm_ would otherwise find the optimizer unscaled since the last
    update() and raise. The next step trains. fp16 set up by hand on a CPU Accelerator (`fp16_on_cpu`)."""
    from backend.loss import IGNORE_INDEX
    from backend.train import train_step
    from tests.dist_worker import MemoryDocuments

    model, optimizer, accelerator = fp16_on_cpu(monkeypatch, 2.0**8)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    data = MemoryDocuments()
    sampler = PackedSampler(data.lengths, 16, seed=0)
    empty = [collate(r, data, 16) for r in sampler.micro_batches(0, 4, 4)]
    for mb in empty:
        mb["labels"][:] = IGNORE_INDEX
        mb["num_trained"] = 0
    result = train_step(model, optimizer, accelerator, empty, "fused")
    assert result.trained_tokens == 0 and not result.stepped and not result.overflow and np.isnan(result.loss)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    result = train_step(
        model, optimizer, accelerator, [collate(r, data, 16) for r in sampler.micro_batches(1, 4, 4)], "fused"
    )
    assert result.stepped and any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
