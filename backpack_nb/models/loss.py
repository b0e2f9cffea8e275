"""Cross-entropy of a linear head without materializing all the logits.

The language-model loss is ``cross_entropy(h @ W.T, targets)`` with h (N, d) the final hidden
states of N = B*T positions and W (V, d) the tied embedding. The full logits, N x V in fp32
plus their gradient, dominate memory at real vocabularies (about 12 GiB at batch 32, block
512, V = 50k). Here rows are processed ``chunk_rows`` at a time: forward keeps only one
chunk of logits alive and saves a per-row logsumexp; backward recomputes each chunk's softmax
from it. The result equals ``F.cross_entropy`` (mean over the rows whose target is not
``ignore_index``) in value and gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_CHUNK_ROWS = 1024  # ~ 1024 x V fp32 logits alive at a time: 0.4 GiB at V = 100k


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    chunk_rows: int = LOSS_CHUNK_ROWS,
) -> torch.Tensor:
    """Mean cross-entropy of ``h @ weight.T`` against ``targets`` over non-ignored rows.

    h: (N, d) or (B, T, d); weight: (V, d); targets: (N,) or (B, T). Returns a scalar.
    Under autocast the two matmuls run in the autocast dtype and the softmax in float32.
    A batch with no counted rows gives 0 (``F.cross_entropy`` would give nan).
    """
    h = h.reshape(-1, h.shape[-1])  # (N, d)
    targets = targets.reshape(-1)  # (N,)
    device_type = h.device.type
    if torch.is_autocast_enabled(device_type):
        # The Function turns autocast off inside, so apply its matmul dtype here, where the
        # casts are recorded by autograd and the fp32 master weights get their gradient.
        dtype = torch.get_autocast_dtype(device_type)
        h, weight = h.to(dtype), weight.to(dtype)
    return _ChunkedLinearCrossEntropy.apply(h, weight, targets, ignore_index, chunk_rows)


def full_logits_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain reference: all logits, then ``F.cross_entropy``. Returns (logits, loss)."""
    logits = F.linear(h, weight)  # (..., V)
    loss = F.cross_entropy(
        logits.to(torch.promote_types(logits.dtype, torch.float32)).reshape(-1, logits.shape[-1]),
        targets.reshape(-1), ignore_index=ignore_index
    )
    return logits, loss


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    # torch.compile (dynamo) traces this Function, forward and backward, as it traces any
    # autograd.Function made of torch ops: the chunk loop has a static trip count (N and
    # chunk_rows are known at trace time), so it unrolls. No compiler.disable is needed.

    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index: int, chunk_rows: int):
        n_rows = h.shape[0]
        acc = torch.promote_types(h.dtype, torch.float32)  # fp32, or fp64 for exact tests
        counted = targets != ignore_index  # (N,)
        safe_targets = torch.where(counted, targets, 0)  # a valid index for gather
        lse = torch.empty(n_rows, device=h.device, dtype=acc)  # (N,)
        target_logit = torch.empty(n_rows, device=h.device, dtype=acc)  # (N,)
        with torch.autocast(h.device.type, enabled=False):
            for start in range(0, n_rows, chunk_rows):
                rows = slice(start, start + chunk_rows)
                logits = (h[rows] @ weight.T).to(acc)  # (n, V), fp32 for the logsumexp
                target_logit[rows] = logits.gather(1, safe_targets[rows, None]).squeeze(1)
                # logsumexp, in place on the chunk (torch.logsumexp allocates two more)
                row_max = logits.amax(dim=-1, keepdim=True)  # (n, 1)
                lse[rows] = logits.sub_(row_max).exp_().sum(dim=-1).log_() + row_max.squeeze(1)
        n_counted = counted.sum()
        loss = ((lse - target_logit) * counted).sum() / n_counted.clamp(min=1)
        ctx.save_for_backward(h, weight, safe_targets, counted, lse, n_counted)
        ctx.chunk_rows = chunk_rows
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        h, weight, safe_targets, counted, lse, n_counted = ctx.saved_tensors
        # d loss / d logits = (softmax - onehot(target)) / n_counted on counted rows, else 0.
        acc = lse.dtype
        row_scale = counted.to(acc) * (grad_loss.to(acc) / n_counted.clamp(min=1))  # (N,)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:  # accumulated over chunks in fp32 even under autocast
            grad_w = torch.zeros(weight.shape, device=weight.device, dtype=acc)
        with torch.autocast(h.device.type, enabled=False):
            for start in range(0, h.shape[0], ctx.chunk_rows):
                rows = slice(start, start + ctx.chunk_rows)
                # In place from here on: a fresh (n, V) buffer per op costs as much as the op.
                grad_logits = (h[rows] @ weight.T).to(acc)  # logits, (n, V)
                grad_logits.sub_(lse[rows, None]).exp_()  # softmax
                grad_logits.scatter_add_(
                    1, safe_targets[rows, None], torch.full_like(lse[rows, None], -1.0)
                )
                grad_logits = grad_logits.mul_(row_scale[rows, None]).to(h.dtype)  # (n, V)
                if grad_h is not None:
                    grad_h[rows] = grad_logits @ weight  # (n, d)
                if grad_w is not None and h.dtype == acc:
                    grad_w.addmm_(grad_logits.T, h[rows])  # (V, d), in place: no temporary
                elif grad_w is not None:
                    grad_w += (grad_logits.T @ h[rows]).to(acc)  # (V, d)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None
