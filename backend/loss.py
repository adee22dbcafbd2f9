"""Masked cross-entropy over trained tokens, normalized by the global count of trained tokens.

The loss of one optimizer step is the mean cross-entropy over every trained target of every micro-batch on every
rank:

    L = (sum over ranks r, micro-batches m, trained targets t of ce(r, m, t)) / N,    N = global trained count

Each rank runs its micro-batches one by one and only sees its own sums, so the loop does:

    counts  = [micro_batch["num_trained"] ...]                 # or the count returned by trained_token_loss
    N       = global_trained_count(accelerator, counts)        # one all-reduce per optimizer step
    scale   = loss_scale(N, world_size)                        # = world_size / N
    for micro_batch in step:
        loss_sum, n = trained_token_loss(model, micro_batch, impl)
        (loss_sum * scale).backward()                          # gradients accumulate in .grad

Why `world_size / N`: on rank r the accumulated gradient is g_r = scale * grad(S_r), S_r = rank r's sum of CE.
DDP and FSDP *average* gradients over ranks, so the synchronized gradient is
(1 / world_size) * sum_r scale * grad(S_r) = (scale / world_size) * grad(sum_r S_r) = grad(S) / N  exactly.

Why not a per-micro-batch mean: mean(ce over micro-batch m) weights every micro-batch equally, so a micro-batch
with 3 trained tokens counts as much as one with 3,000 (packing and masking make counts vary a lot); and a
micro-batch with no trained token gives 0/0 = NaN. tests/test_loss.py shows both.

`accelerator.backward(loss)` DIVIDES the loss by `accelerator.gradient_accumulation_steps`. Create the Accelerator
with `gradient_accumulation_steps=1` (the default) and skip gradient synchronization on all but the last
micro-batch yourself with `accelerator.no_sync(model)` (DDP, and FSDP2 through set_requires_gradient_sync;
tests/dist_worker.py does this); or, if you set gradient_accumulation_steps=G, multiply the loss by G.

Two implementations, equal to ~1e-6 in fp32 (tested):
- impl="torch": the plain reference. Full logits (1, B*L, V) for every position, then
  `F.cross_entropy(reduction="sum", ignore_index=-100)` on labels shifted left by one within each row.
- impl="fused": the LM head runs only at positions whose next label is trained (transformers' `logits_to_keep`
  with a 1-D index tensor; the LM head is about a third of a small model's step), and the projection and the
  cross-entropy run chunk by chunk in one autograd function, so the full (K, V) fp32 logits never exist: each
  chunk's logits are computed, its loss and its gradients (softmax - onehot) folded into dL/dhidden and dL/dW in
  the forward, and the logits freed (the Liger-kernel scheme; no recomputation in backward). This happens inside
  the model's own forward, in the LM head's own call (its `forward` is replaced for the duration of the call, the
  module and its hooks stay): FSDP2's unit [final norm, LM head] (accelerate 1.15; the embedding is another unit,
  and the root holds no parameters) has unsharded the LM head weight when it is read, its post-forward hook
  completes the unit, and DDP's forward wrapper sees the call. Tested on FSDP2 with 2 gloo processes
  (tests/test_distributed.py: every unit sharded again after each step, no FSDP warning).

Batch layout (from backend.packing.collate), B=2 rows of L=4, two documents in row 0 (labels UNSHIFTED):

    input_ids     [[ 5,  6,  7,  8], [ 9, 10, 11,  0]]
    position_ids  [[ 0,  1,  0,  1], [ 0,  1,  2,  0]]        padding is its own position-0 document
    labels        [[-100, 6, -100, 8], [-100, 10, 11, -100]]  first token of each document is never a target
    targets (labels shifted left by one within the row; logit t predicts label t+1):
                  [[ 6, -100, 8, -100], [10, 11, -100, -100]] -> kept positions (flattened) [0, 2, 4, 5], count 4

The batch is flattened to one row (1, B*L) before the forward: attention is block-diagonal by position_ids
anyway, and transformers only detects packed sequences for SDPA from position_ids reliably on one row.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from backend import IGNORE_INDEX
from backend.modeling import hf_model, model_inputs

# Elements of one chunk's (rows, V) logits in the fused path: 2**25 fp32 = 128 MiB (plus as much for the gradient).
# 128k vocabulary -> 256 rows per chunk; 8k vocabulary -> 4,096 rows.
FUSED_CHUNK_ELEMENTS = 2**25

__all__ = [
    "trained_token_loss",
    "trained_token_losses",
    "shifted_targets",
    "global_trained_count",
    "loss_scale",
    "chunked_linear_cross_entropy",
    "FUSED_CHUNK_ELEMENTS",
]


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Unshifted labels (B, L) -> flat targets (B*L,): target of position t is label t+1 of the same row.

    The last position of each row has no next token in that row and gets IGNORE_INDEX, so flattening the batch
    never makes a row's last token predict the next row's first token.
    """
    pad = torch.full_like(labels[:, :1], IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1).reshape(-1)  # (B*L,)


def trained_token_loss(model: nn.Module, batch: dict, impl: str = "fused") -> tuple[torch.Tensor, int]:
    """Forward one packed micro-batch; return (SUM of CE over trained targets, 0-dim fp32, count of those targets).

    `batch`: {"input_ids": (B, L) long, "labels": (B, L) long UNSHIFTED with IGNORE_INDEX, "position_ids": (B, L)
    restarting per document, + cu_seq_lens_q/k, max_length_q/k for flash-attention}. Tensors on the model's device.
    A micro-batch with no trained target returns a 0.0 loss that still has a grad path through every parameter,
    so every rank runs the same forward/backward collectives.
    """
    targets = shifted_targets(batch["labels"])  # (B*L,)
    kwargs = model_inputs(model, batch)
    if impl == "torch":
        logits = model(**kwargs).logits  # (1, B*L, V), or (B, L, V) when rows cannot be flattened
        logits = logits.reshape(-1, logits.shape[-1])  # (B*L, V)
        loss_sum = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
        count = int((targets != IGNORE_INDEX).sum())
        return loss_sum, count
    if impl != "fused":
        raise ValueError(f"cross_entropy_impl must be 'fused' or 'torch', got {impl!r}")

    trained = targets != IGNORE_INDEX  # (B*L,)
    if kwargs["input_ids"].shape[0] == 1:
        keep = trained.nonzero().squeeze(1)  # (K,) positions in the flattened row
        kept_targets, select = targets[keep], None  # (K,)
    else:
        # Unflattened (B, L): logits_to_keep indexes the sequence dim of every row, so keep the union of the
        # trained columns (K,), then select the trained (row, column) pairs out of the (B*K,) kept positions.
        rows = kwargs["input_ids"].shape[0]
        keep = trained.view(rows, -1).any(0).nonzero().squeeze(1)  # (K,)
        select = trained.view(rows, -1)[:, keep].reshape(-1).nonzero().squeeze(1)  # (N,) into (B*K,)
        kept_targets = targets.view(rows, -1)[:, keep].reshape(-1)[select]  # (N,)
    with _lm_head_computes_loss(hf_model(model), kept_targets, select):
        loss_sum = model(**kwargs, logits_to_keep=keep).logits  # 0-dim: the wrapper returned the CE sum
    return loss_sum.float(), int(kept_targets.numel())


def trained_token_losses(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward one packed batch; return (CE of each trained target (N,) fp32, its flat position (N,) in B*L).

    The per-token view of `trained_token_loss` (impl="torch", same inputs, same shifted targets): the sum of the
    first tensor is that loss sum. Position p of row-major (B, L) predicts label p+1 of its row, so the token a
    loss belongs to is flat index p + 1. The studio's loss view and notebook 04 read the model through this.
    """
    targets = shifted_targets(batch["labels"])  # (B*L,)
    logits = model(**model_inputs(model, batch)).logits  # (1, B*L, V) or (B, L, V)
    logits = logits.reshape(-1, logits.shape[-1])  # (B*L, V)
    positions = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # (N,)
    losses = F.cross_entropy(logits[positions].float(), targets[positions], reduction="none")  # (N,)
    return losses, positions


@contextlib.contextmanager
def _lm_head_computes_loss(inner: nn.Module, targets: torch.Tensor, select: torch.Tensor | None = None):
    """For one forward, `inner.lm_head(hidden (1, K, H))` returns the 0-dim CE sum against `targets` instead of logits.

    The LM head's own `forward` is replaced (an instance attribute over the class's method), not the module: its
    call still goes through nn.Module.__call__, so every hook on it runs. FSDP2 (accelerate 1.15 groups [final norm,
    LM head] into one unit) unshards in the group's pre-forward hook and completes the group, resharding and
    registering its backward hooks, in the post-forward hook of the group's last module, the LM head; a module whose
    forward never runs leaves the group incomplete (torch 2.11 has no fallback for it).
    """
    lm_head = getattr(inner, "lm_head", None)
    if not isinstance(lm_head, nn.Linear):
        raise TypeError(
            f"{type(inner).__name__} has no nn.Linear `lm_head` (found {type(lm_head).__name__}); "
            "set model.base_model.cross_entropy_impl: torch"
        )

    def loss_forward(hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.reshape(-1, hidden.shape[-1])  # (B*K, H)
        if select is not None:
            hidden = hidden[select]  # (N, H): the rows of the reshaped hidden that carry the targets
        # lm_head.weight is read here, inside the call: FSDP2's pre-forward hook has unsharded it
        return chunked_linear_cross_entropy(hidden, lm_head.weight, targets, lm_head.bias)

    previous = lm_head.__dict__.get("forward")  # an instance forward someone else installed, restored after
    lm_head.forward = loss_forward
    try:
        yield
    finally:
        if previous is None:
            del lm_head.forward
        else:
            lm_head.forward = previous


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """sum_k CE(hidden[k] @ weight.T + bias, targets[k]) as a 0-dim fp32 tensor, never holding (K, V) logits.

    hidden (K, H), weight (V, H), targets (K,) all valid class ids. chunk_rows defaults to
    FUSED_CHUNK_ELEMENTS // V. Gradients are computed during the forward when needed (grad mode on and an input
    requires grad), kept, and scaled by the incoming gradient in backward.
    """
    if chunk_rows is None:
        chunk_rows = max(1, FUSED_CHUNK_ELEMENTS // weight.shape[0])
    # ctx.needs_input_grad stays True under torch.no_grad, so the grad mode is read here, outside the Function.
    return _ChunkedLinearCE.apply(hidden, weight, bias, targets, chunk_rows, torch.is_grad_enabled())


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows, grad_enabled):
        need_h, need_w, need_b = (grad_enabled and n for n in ctx.needs_input_grad[:3])
        grad_needed = need_h or need_w or need_b  # False under torch.no_grad (validation): loss only
        k = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        for start in range(0, k, chunk_rows):
            h = hidden[start : start + chunk_rows]  # (c, H)
            t = targets[start : start + chunk_rows]  # (c,)
            logits = F.linear(h, weight, bias).float()  # (c, V) fp32: softmax statistics in full precision
            lse = torch.logsumexp(logits, dim=-1)  # (c,)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if grad_needed:
                # d(sum CE)/d logits = softmax - onehot; reuse the logits buffer.
                grad_logits = logits.sub_(lse[:, None]).exp_()
                grad_logits[torch.arange(t.numel(), device=t.device), t] -= 1.0
                if need_h:
                    grad_h[start : start + chunk_rows] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
                if need_w:
                    # in place into the fp32 sum: under autocast `grad_w += a @ b` would round each chunk's
                    # product to bf16 first (autocast does not touch in-place ops), and no (V, H) temporary
                    with torch.autocast(hidden.device.type, enabled=False):
                        grad_w.addmm_(grad_logits.t(), h.float())
                if need_b:
                    grad_b += grad_logits.sum(0)
            del logits
        ctx.save_for_backward(
            grad_h if need_h else None,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
        )
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = grad_out.float()
        return (
            None if grad_h is None else grad_h * scale.to(grad_h.dtype),
            None if grad_w is None else grad_w * scale.to(grad_w.dtype),
            None if grad_b is None else grad_b * scale.to(grad_b.dtype),
            None,
            None,
            None,
        )


def global_trained_count(accelerator_or_none, local_counts) -> int:
    """Trained targets of one optimizer step: sum over this rank's micro-batches, all-reduced (sum) over ranks.

    A collective when there are several processes: every rank must call it once per optimizer step.
    """
    local = int(sum(int(c) for c in local_counts))
    if accelerator_or_none is None or accelerator_or_none.num_processes <= 1:
        return local
    count = torch.tensor([local], dtype=torch.long, device=accelerator_or_none.device)
    return int(accelerator_or_none.reduce(count, reduction="sum").item())


def loss_scale(global_count: int, world_size: int) -> float:
    """Factor for each micro-batch's loss SUM so the rank-averaged, accumulated gradient is grad(total) / count.

    world_size / global_count (see the module docstring). A step with no trained target at all returns 0.0: its
    gradient is zero, not NaN (the loop may also skip the optimizer step).

    >>> loss_scale(1, 1), loss_scale(8, 2), loss_scale(0, 2)   # one trained token still trains
    (1.0, 0.25, 0.0)
    """
    if global_count <= 0:
        return 0.0
    return float(world_size) / float(global_count)
