"""Cross-entropy of a linear head without materializing all the logits.

The language-model loss is ``cross_entropy(h @ W.T, targets)`` with h (N, d) the final hidden
states of N = B*T positions and W (V, d) the tied embedding. The full logits, N x V in fp32
plus their gradient, dominate memory at real vocabularies (docs/performance.md has the
accounting). Here rows are processed ``chunk_rows`` at a time and only one chunk of logits
is ever alive. The gradients with respect to h and W are computed in the same pass, while
each chunk's softmax is at hand (backward only scales them by the incoming gradient), so the
logits are computed once: no recomputation in backward, and the matmul work equals that of
the plain full-logits loss. The result equals ``F.cross_entropy`` (mean over the rows whose
target is not ``ignore_index``) in value and gradient.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

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
    fused: bool = False,
) -> torch.Tensor:
    """Mean cross-entropy of ``h @ weight.T`` against ``targets`` over non-ignored rows.

    h: (N, d) or (B, T, d); weight: (V, d); targets: (N,) or (B, T). Returns a scalar.
    Under autocast the two matmuls run in the autocast dtype and the softmax in float32;
    the gradients come back in the dtypes of ``h`` and ``weight`` (fp32 master weights get
    an fp32 gradient, accumulated in fp32). A batch with no counted rows gives 0
    (``F.cross_entropy`` would give nan).

    ``fused``: each chunk's softmax, loss and logit gradient in one ``torch.compile``d
    function (:func:`chunk_loss_and_grad`) instead of the eager in-place passes: the eager
    path reads and writes the (rows x V) chunk about a dozen times in float32, which is
    memory-bound on a GPU at large V. Same values (checked in float64); off by default
    until measured on a GPU (``python -m benchmarks.speed`` has the lever).
    """
    h = h.reshape(-1, h.shape[-1])  # (N, d)
    targets = targets.reshape(-1)  # (N,)
    device_type = h.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = torch.promote_types(h.dtype, weight.dtype)
    # Gradients are computed in forward only when a backward can follow.
    needs = (h.requires_grad, weight.requires_grad)
    with_grads = torch.is_grad_enabled() and any(needs)
    return _eager_apply(
        h, weight, targets, ignore_index, chunk_rows, compute_dtype, with_grads and needs[0],
        with_grads and needs[1], fused and with_grads,
    )


@torch.compiler.disable
def _eager_apply(*args):
    # Kept out of torch.compile graphs on purpose. Traced, the chunk loop unrolls and the
    # compiled graph no longer frees each chunk's logits before the next chunk starts, so a
    # compiled step's peak grows by several chunks (measured: docs/performance.md, "Compiled
    # steps and memory"). Eager, only one chunk is alive; the loop is matmul-bound, so
    # compiling it gains nothing.
    return _ChunkedLinearCrossEntropy.apply(*args)


def chunk_loss_and_grad(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                        acc: torch.dtype, out: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of the loss, out of place, for the compiler to fuse: logits (n, V) in the
    compute dtype, targets (n,) valid ids, weights (n,) 1 on counted rows, 0 on ignored ones.
    Returns the row losses (n,) in ``acc`` and the weighted logit gradient (n, V) in ``out``:
    ``weight * (softmax - onehot(target))``. Written so that compiled it is one pass per
    reduction (max, sum of exponentials) and one elementwise pass writing the gradient:
    the softmax is recomputed as exp(z - logsumexp) rather than kept, so no float32 (n, V)
    buffer is written, and the one-hot is a comparison with the column index."""
    z = logits.to(acc)  # (n, V)
    row_max = z.amax(dim=-1, keepdim=True)  # (n, 1)
    lse = row_max.squeeze(1) + torch.exp(z - row_max).sum(dim=-1).log()  # (n,)
    row_loss = lse - z.gather(1, targets[:, None]).squeeze(1)
    onehot = (torch.arange(z.shape[1], device=z.device) == targets[:, None]).to(acc)  # (n, V)
    grad = (torch.exp(z - lse[:, None]) - onehot) * weights[:, None]
    return row_loss, grad.to(out)


@functools.cache
def _fused_chunk() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    # Wrapped on first use (torch.compile costs a second at import), compiled once per chunk
    # shape and dtypes (static: a chunk is chunk_rows x V but for the last). Called from the
    # eager chunk loop, so only one chunk's buffers are alive at a time, as in the eager path.
    return torch.compile(chunk_loss_and_grad, dynamic=False)


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
    # Always applied through _eager_apply: under torch.compile the model's graph breaks
    # there and this runs eagerly (see _eager_apply for why).

    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index: int, chunk_rows: int,
                compute_dtype: torch.dtype, grad_h_needed: bool, grad_w_needed: bool,
                fused: bool = False):
        acc = torch.promote_types(compute_dtype, torch.float32)  # fp32, or fp64 for exact tests
        hc, wc = h.to(compute_dtype), weight.to(compute_dtype)  # no-ops without autocast
        n_rows = hc.shape[0]
        counted = targets != ignore_index  # (N,)
        safe_targets = torch.where(counted, targets, 0)  # a valid index for gather
        weights = counted.to(acc)  # (N,): 1 on counted rows, 0 on ignored ones
        row_loss = torch.empty(n_rows, device=h.device, dtype=acc)  # (N,)
        grad_h = torch.empty(hc.shape, device=h.device, dtype=acc) if grad_h_needed else None
        grad_w = torch.zeros(wc.shape, device=h.device, dtype=acc) if grad_w_needed else None
        with torch.autocast(h.device.type, enabled=False):
            for start in range(0, n_rows, chunk_rows):
                rows = slice(start, start + chunk_rows)
                if fused:
                    row_loss[rows], grad_logits = _fused_chunk()(
                        hc[rows] @ wc.T, safe_targets[rows], weights[rows], acc, compute_dtype)
                else:
                    grad_logits = _ChunkedLinearCrossEntropy._eager_chunk(
                        hc[rows] @ wc.T, safe_targets[rows], weights[rows], row_loss[rows],
                        acc, compute_dtype, grad_h is not None or grad_w is not None)
                if grad_logits is None:
                    continue
                if grad_h is not None:
                    grad_h[rows] = grad_logits @ wc  # (n, d)
                if grad_w is not None and compute_dtype == acc:
                    grad_w.addmm_(grad_logits.T, hc[rows])  # (V, d), in place: no temporary
                elif grad_w is not None:
                    grad_w += (grad_logits.T @ hc[rows]).to(acc)  # (V, d)
        n_counted = counted.sum().clamp(min=1)
        loss = (row_loss * weights).sum() / n_counted
        for grad in (grad_h, grad_w):
            if grad is not None:
                grad.div_(n_counted)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (h.dtype, weight.dtype)
        return loss

    @staticmethod
    def _eager_chunk(logits, targets, weights, row_loss, acc, compute_dtype, with_grad):
        """The eager chunk, in place: fills ``row_loss`` (a view of the chunk's rows) and
        returns the weighted logit gradient in the compute dtype (None without grad)."""
        logits = logits.to(acc)  # (n, V), fp32 for the softmax
        target_logit = logits.gather(1, targets[:, None]).squeeze(1)  # (n,)
        # In place from here on: a fresh (n, V) buffer per op costs as much as the op.
        row_max = logits.amax(dim=-1, keepdim=True)  # (n, 1)
        probs = logits.sub_(row_max).exp_()  # unnormalised softmax, (n, V)
        total = probs.sum(dim=-1)  # (n,)
        row_loss.copy_(total.log() + row_max.squeeze(1) - target_logit)
        if not with_grad:
            return None
        # d row_loss / d logits = softmax - onehot(target), zero on ignored rows; the
        # mean's 1 / n_counted is applied once at the end, in fp32 (scaling the chunk
        # before a float16 matmul would push small probabilities into underflow).
        probs.mul_((weights / total)[:, None])
        probs.scatter_add_(1, targets[:, None], -weights[:, None])
        return probs.to(compute_dtype)  # (n, V)

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        # Out of place (a retained graph may run backward twice); the weight's buffer becomes
        # its .grad, so nothing is wasted.
        gh = (grad_h * grad_loss).to(h_dtype) if grad_h is not None else None
        gw = (grad_w * grad_loss).to(w_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None, None, None, None
