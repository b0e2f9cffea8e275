"""Optimizers for the models: AdamW, and sparse row-wise updates for a Backpack sense table.

A Backpack with ``sense_source = "table"`` holds a V x k*d table (665M parameters at
V = 100,277). Dense AdamW gives it a dense gradient and updates every row every step: weights,
gradient and two moments are 16 bytes a parameter, 10 GiB for the table alone. With sparse
updates (:func:`make_optimizer` with ``sparse_table=True``) the table's lookup produces a
sparse gradient holding only the rows of the batch's distinct tokens, and ``SparseAdam``
updates only those rows; AdamW keeps training everything else.

The trade-off, in one place:

- memory: the table's gradient is U x k*d instead of V x k*d (U = distinct tokens of a batch);
  ``SparseAdam`` still keeps *dense* moments (2 x V x k*d fp32), so the table costs 12 bytes a
  parameter instead of 16;
- time: only U rows are read and written per step, instead of V;
- semantics: "lazy" Adam: a row's moments decay only on the steps its token appears (rare
  tokens keep stale momentum), and there is no weight decay on the table (``SparseAdam`` has
  none). The rest of the model is trained exactly as with :func:`torch.optim.AdamW`;
- checkpoints: the optimizer state has another layout (``{"dense": ..., "sparse": ...}``), so
  a run cannot switch between dense and sparse table updates on resume.

``torch.nn.utils.clip_grad_norm_`` rejects sparse gradients; :func:`clip_grad_norm_` here
handles both and equals it on dense ones.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from backpack_nb.models import LanguageModel


def fused_available(device: torch.device) -> bool:
    """Whether ``AdamW(fused=True)`` runs on ``device`` (CUDA, and CPU since torch 2.4).
    On CPU the fused kernel is several times faster than the default for-each one
    (measured by ``python -m benchmarks.speed``)."""
    return device.type in ("cuda", "cpu")


def set_sparse_table(model: nn.Module, enabled: bool = True) -> None:
    """Make a table Backpack's sense lookup produce sparse (row-wise) gradients, or dense
    ones again. Changes nothing else: same weights, same forward, same state_dict."""
    table = getattr(model, "sense_table", None)
    if not isinstance(table, nn.Embedding):
        raise ValueError("sparse table updates need a Backpack with sense_source 'table'")
    table.sparse = enabled


def make_optimizer(
    model: LanguageModel,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.95),
    weight_decay: float = 0.1,
    eps: float = 1e-8,
    fused: bool | None = None,
    sparse_table: bool = False,
) -> "torch.optim.AdamW | SparseTableAdamW":
    """AdamW over ``model.param_groups(weight_decay)`` (fused where available unless
    ``fused=False``); with ``sparse_table`` (a table Backpack only) the sense table gets
    sparse gradients and ``SparseAdam`` instead (see the module docstring for the cost)."""
    device = next(model.parameters()).device
    if fused is None:
        fused = fused_available(device)
    if not sparse_table:
        return torch.optim.AdamW(model.param_groups(weight_decay), lr=lr, betas=betas, eps=eps,
                                 fused=fused or None)
    set_sparse_table(model, True)
    table = model.sense_table.weight
    groups = [{**g, "params": [p for p in g["params"] if p is not table]}
              for g in model.param_groups(weight_decay)]
    dense = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps,
                              fused=fused or None)
    sparse = torch.optim.SparseAdam([table], lr=lr, betas=betas, eps=eps)
    return SparseTableAdamW(dense, sparse)


class SparseTableAdamW:
    """AdamW for the dense parameters and SparseAdam for the sense table, driven as one
    optimizer: ``param_groups`` (both, so a learning-rate schedule sets every group),
    ``step``, ``zero_grad``, ``state_dict`` / ``load_state_dict``. ``torch.amp.GradScaler``
    works with it (it unscales sparse gradients too)."""

    def __init__(self, dense: torch.optim.Optimizer, sparse: torch.optim.Optimizer) -> None:
        self.dense, self.sparse = dense, sparse

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.dense.param_groups + self.sparse.param_groups

    @property
    def state(self) -> dict:
        return {**self.dense.state, **self.sparse.state}

    def step(self, closure=None):
        loss = self.dense.step(closure)
        self.sparse.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.dense.zero_grad(set_to_none=set_to_none)
        self.sparse.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"dense": self.dense.state_dict(), "sparse": self.sparse.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"dense", "sparse"}:
            raise ValueError("not a sparse-table optimizer state (was the run trained with "
                             "dense table updates?)")
        self.dense.load_state_dict(state["dense"])
        self.sparse.load_state_dict(state["sparse"])


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale all gradients so that their joint 2-norm is at most ``max_norm``; returns the
    norm before clipping. Like ``torch.nn.utils.clip_grad_norm_``, but sparse gradients (a
    sparse sense table) count too; they are coalesced in place (duplicates summed)."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.tensor(0.0)
    for p in params:
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
    dense = [p.grad for p in params if not p.grad.is_sparse]
    sparse = [p.grad for p in params if p.grad.is_sparse]
    device = params[0].grad.device
    acc = torch.float32
    for p in params:
        acc = torch.promote_types(acc, p.grad.dtype)
    norms = [torch.linalg.vector_norm(g._values(), dtype=acc) for g in sparse]
    if dense:
        norms.append(torch.nn.utils.get_total_norm(dense).to(acc))
    total = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    if dense:
        torch._foreach_mul_(dense, coef)
    for g in sparse:
        g._values().mul_(coef.to(g.dtype))
    return total
