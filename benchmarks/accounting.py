"""The peak memory of a training step, part by part, traced on fake tensors.

:func:`trace_memory` runs real training steps of the library's models (forward under
autocast, backward, clipping, AdamW) inside :class:`~benchmarks.live_memory.LiveMemory`, on
fake tensors by default: shapes only, so the seed configuration (6 layers, 384 wide, block
512, batch 32, float16) is accounted in seconds on a laptop. The CPU stands in for CUDA: the
memory-efficient attention kernel and CUDA autocast's float32 ops are patched in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import textwrap
from collections.abc import Sequence
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode

from backpack_nb import optim
from backpack_nb.models import LOSS_CHUNK_ROWS, BackpackLM, ModelConfig, build_model

from benchmarks.common import GiB
from benchmarks.live_memory import KINDS, LiveMemory

T4_BUDGET_GIB = 14.0
"""What a training step may peak at (``torch.cuda.max_memory_allocated``) on a 16 GB T4:
PyTorch sees 14.75 GiB of it, and the CUDA context, cuBLAS workspaces and allocator
fragmentation take some of that."""


def _efficient_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False):
    """What CUDA runs for ``scaled_dot_product_attention`` here (the memory-efficient kernel:
    it saves q, k, v, the output and a logsumexp, never the T x T weights), callable on the
    CPU and on fake tensors, with CUDA autocast's cast of q, k, v to the low precision."""
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, attn_mask, True, dropout_p, is_causal, scale=scale)[0]


class _CudaAutocastFloat32Ops(TorchFunctionMode):
    """CUDA autocast runs some ops in float32 (their inputs cast up, the cast recorded by
    autograd) that CPU autocast, which stands in for it in the trace, leaves in float16. The
    ones the models call under autocast: the Backpack's sum over senses, softmax,
    log-softmax, layer norm (a no-op here: its input is the fp32 residual stream)."""

    FLOAT32_OPS = {torch.sum, torch.Tensor.sum, torch.softmax, torch.Tensor.softmax, F.softmax,
                   torch.log_softmax, torch.Tensor.log_softmax, F.log_softmax, F.layer_norm,
                   F.cross_entropy}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func in self.FLOAT32_OPS and torch.is_autocast_enabled("cpu") and args
                and isinstance(args[0], torch.Tensor)
                and args[0].dtype in (torch.float16, torch.bfloat16)):
            args = (args[0].float(), *args[1:])
        return func(*args, **kwargs)


@dataclasses.dataclass(frozen=True)
class MemoryCase:
    """One configuration whose training step is traced."""

    model: str  # "backpack" or "transformer"
    vocab_size: int
    batch_size: int = 32
    block_size: int = 512
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    n_senses: int = 16
    dropout: float = 0.1
    sense_source: str = "network"
    chunked: bool = True
    chunk_rows: int = LOSS_CHUNK_ROWS
    dtype: str = "float16"  # autocast dtype, or "float32" for none
    attention: str = "cuda"  # "cuda": the memory-efficient SDPA kernel; "cpu": as on the CPU
    optimizer: str = "fused"  # "fused" AdamW, or "sparse" (table: SparseAdam for the table)
    checkpointing: bool = False
    distinct_tokens: int | None = None  # U; None: every token of the batch distinct (bound)

    def model_config(self) -> ModelConfig:
        return ModelConfig(vocab_size=self.vocab_size, block_size=self.block_size,
                           n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd,
                           n_senses=self.n_senses, dropout=self.dropout, bias=False,
                           sense_source=self.sense_source)

    @property
    def label(self) -> str:
        parts = [self.model]
        if self.model == "backpack" and self.sense_source == "table":
            parts.append("table+" + ("SparseAdam" if self.optimizer == "sparse" else "AdamW"))
        if not self.chunked:
            parts.append("full-logits")
        if self.checkpointing:
            parts.append("checkpointed")
        return "/".join(parts)


def trace_memory(case: MemoryCase, *, real: bool = False, steps: int = 2) -> dict[str, Any]:
    """Trace ``steps`` training steps of ``case`` (forward under autocast, backward,
    clipping, AdamW; the peak is the step's peak with the optimizer state of the previous
    step alive) with :class:`LiveMemory`, on fake tensors (or real ones with ``real``).
    Returns the peak, its parts, the parameter count and the U used."""
    config = case.model_config()
    U = case.distinct_tokens or min(case.vocab_size, case.batch_size * case.block_size)
    fake = contextlib.nullcontext() if real else FakeTensorMode()
    tracker = LiveMemory(case.vocab_size, round_to=512 if case.attention == "cuda" else 1)
    with fake:
        torch.manual_seed(0)
        model = build_model(case.model, config).train()
        n_params = model.num_parameters(by_part=False)
        if case.checkpointing:
            model.set_activation_checkpointing(True)
        if isinstance(model, BackpackLM):
            model.mixing = "sdpa" if case.attention == "cuda" else "auto"
            if not real:  # torch.unique has no fake kernel (its size is data): supply U
                def distinct(idx: torch.Tensor, U: int = U):
                    return torch.arange(U, device=idx.device), torch.zeros_like(idx)
                model._distinct_tokens = distinct
        if case.optimizer == "sparse":
            opt = optim.make_optimizer(model, lr=1e-4, sparse_table=True)
        else:
            opt = torch.optim.AdamW(model.param_groups(0.1), lr=1e-4, fused=True)
        params = list(model.parameters())
        for p in params:
            tracker.register(p, "weights")
        gen = torch.Generator().manual_seed(0)
        xy = torch.randint(0, U, (case.batch_size, case.block_size + 1), generator=gen)
        x, y = xy[:, :-1], xy[:, 1:]
        if real:
            U = len(torch.unique(x))
        autocast = (torch.autocast("cpu", dtype=getattr(torch, case.dtype))
                    if case.dtype != "float32" else contextlib.nullcontext())
        cuda_like = contextlib.ExitStack()
        if case.attention == "cuda":
            cuda_like.enter_context(
                mock.patch.object(F, "scaled_dot_product_attention", _efficient_sdpa))
            cuda_like.enter_context(_CudaAutocastFloat32Ops())
        with tracker, tracker.saved_tensors(), cuda_like:
            for _ in range(steps):
                tracker.phase = "forward"
                with autocast:
                    _, loss = model(x, y, chunked_loss=case.chunked,
                                    loss_chunk_rows=case.chunk_rows)
                tracker.phase = "backward"
                loss.backward()
                del loss
                tracker.tag((p.grad for p in params if p.grad is not None), "gradients")
                tracker.phase = "optimizer"
                optim.clip_grad_norm_(params, 1.0)
                opt.step()
                tracker.tag((t for s in opt.state.values() for t in s.values()
                             if isinstance(t, torch.Tensor)), "optimizer state")
                opt.zero_grad(set_to_none=True)
    parts = tracker.by_kind()
    return {"case": dataclasses.asdict(case), "label": case.label, "params": n_params,
            "distinct_tokens": U, "peak_bytes": tracker.peak, "parts": parts,
            "peak_phase": tracker.peak_phase, "phase_peaks": dict(tracker.phase_peaks),
            "weights_bytes": parts["weights"]}


def memory_cases(params: dict[str, Any], vocab_sizes: Sequence[int],
                 batch_size: int | None = None) -> list[MemoryCase]:
    """The cases printed for a params file: both default models (network senses, chunked
    CE, its autocast dtype) and, as information, the table with dense and sparse updates,
    full logits, and activation checkpointing."""
    shape = dict(batch_size=batch_size or params.get("batch_size", 32),
                 block_size=params.get("block_size", 512), n_layer=params.get("n_layer", 6),
                 n_head=params.get("n_head", 6), n_embd=params.get("n_embd", 384),
                 n_senses=params.get("n_senses", 16), dropout=params.get("dropout", 0.1))
    dtype = params.get("dtype", "float16")
    if dtype not in ("float16", "bfloat16", "float32"):
        dtype = "float16"
    cases = []
    for V in vocab_sizes:
        base = dict(vocab_size=V, dtype=dtype, **shape)
        cases += [
            MemoryCase("transformer", **base),
            MemoryCase("backpack", **base),
            MemoryCase("transformer", chunked=False, **base),
            MemoryCase("backpack", chunked=False, **base),
            MemoryCase("backpack", sense_source="table", **base),
            MemoryCase("backpack", sense_source="table", optimizer="sparse", **base),
            MemoryCase("backpack", checkpointing=True, **base),
        ]
    return cases


def format_memory(results: list[dict[str, Any]], budget_gib: float = T4_BUDGET_GIB) -> str:
    """One table per vocabulary size (GiB by part at the peak), notes, and a T4 verdict for
    each default model at the largest vocabulary."""
    lines = []
    by_v: dict[int, list[dict]] = {}
    for r in results:
        by_v.setdefault(r["case"]["vocab_size"], []).append(r)
    largest = max(by_v)
    for V, rows in by_v.items():
        c = rows[0]["case"]
        lines.append(f"\nV = {V:,}: batch {c['batch_size']} x block {c['block_size']}, "
                     f"{c['dtype']} autocast, fused AdamW, U = {rows[0]['distinct_tokens']:,} "
                     "distinct tokens a batch (bound: all distinct); GiB live at the peak")
        width = max(22, *(len(r["label"]) + 2 for r in rows))
        lines.append(f"{'part':<18}" + "".join(f"{r['label']:>{width}}" for r in rows))
        for kind in KINDS:
            lines.append(f"{kind:<18}" + "".join(
                f"{r['parts'][kind] / GiB:>{width}.2f}" for r in rows))
        lines.append(f"{'peak':<18}" + "".join(f"{r['peak_bytes'] / GiB:>{width}.2f}"
                                                for r in rows))
        lines.append(f"{'  reached in':<18}" + "".join(f"{r['peak_phase']:>{width}}"
                                                        for r in rows))
        for phase in ("backward", "optimizer"):
            lines.append(f"{'  peak in ' + phase:<18}" + "".join(
                f"{r['phase_peaks'].get(phase, 0) / GiB:>{width}.2f}" for r in rows))
        lines.append(f"{'params':<18}" + "".join(f"{r['params'] / 1e6:>{width - 1}.1f}M"
                                                  for r in rows))
        lines.append(f"{'fits 16 GB T4':<18}" + "".join(
            f"{'yes' if r['peak_bytes'] / GiB <= budget_gib else 'no':>{width}}" for r in rows))
    notes = (
        "notes: weights, gradients and optimizer state are fp32 (4 bytes a parameter each; "
        "AdamW keeps two moments); activations are the tensors saved for backward, float16 "
        "under autocast; logits are the vocabulary-sized buffers of the loss (one chunk of "
        f"{LOSS_CHUNK_ROWS} rows when chunked). table+SparseAdam: the table's gradient is "
        "sparse (U rows) but SparseAdam still keeps dense moments (2 x V x k*d fp32), so its "
        "optimizer state equals AdamW's; it saves the dense gradient, which is alive only in "
        "backward and in the optimizer step (see 'peak in optimizer').")
    lines += ["", *textwrap.wrap(notes, 100)]
    lines.append(f"budget: {budget_gib} GiB for the step's allocator peak (a 16 GB T4 "
                 "shows PyTorch 14.75 GiB; the CUDA context and fragmentation take the rest)")
    for r in by_v[largest]:
        c = r["case"]
        if c["sense_source"] == "network" and c["chunked"] and not c["checkpointing"]:
            gib = r["peak_bytes"] / GiB
            verdict = (f"FITS ({gib:.1f} GiB of 16)" if gib <= budget_gib else
                       f"DOES NOT FIT ({gib:.1f} GiB needed, {budget_gib} GiB usable of 16)")
            lines.append(f"VERDICT {c['model']}: {verdict}")
    return "\n".join(lines)
