"""Peak training memory of a configuration, part by part, and whether it fits a 16 GB T4.

Two trainer steps of a params file's models (default the seed's), traced on fake tensors
(seconds) with CUDA's memory-efficient attention and autocast's float32 ops patched in."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
from collections.abc import Iterator, Sequence
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode

from backpack_nb import optim
from backpack_nb.devices import autocast
from backpack_nb.models import LOSS_CHUNK_ROWS, BackpackLM, ModelConfig, build_model
from backpack_nb.training.step import optimizer_step

from benchmarks.common import DTYPES, GiB, new_parser, run_main, seed_params
from benchmarks.live_memory import KINDS, LiveMemory

# a step's allocator peak on a 16 GB T4: 14.75 GiB seen, less context, workspaces, fragments
T4_BUDGET_GIB = 14.0


def _efficient_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False):
    """CUDA's memory-efficient attention (no T x T weights saved), autocast, on CPU and fake."""
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, attn_mask, True, dropout_p, is_causal, scale=scale)[0]


class _CudaAutocastFloat32Ops(TorchFunctionMode):
    """The ops CUDA autocast runs in float32 (inputs cast up) and CPU autocast would not."""

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
    """One traced configuration: a params file's values (shape, batch, dropout), a model, V."""

    model: str  # "backpack" or "transformer"
    vocab_size: int
    params: dict[str, Any] = dataclasses.field(default_factory=seed_params)
    sense_source: str = "network"
    chunked: bool = True
    chunk_rows: int = LOSS_CHUNK_ROWS
    dtype: str = "float16"  # autocast dtype, or "float32" for none
    attention: str = "cuda"  # "cuda": the memory-efficient SDPA kernel; "cpu": as on the CPU
    optimizer: str = "fused"  # "fused" AdamW, or "sparse" (table: SparseAdam for the table)
    checkpointing: bool = False
    distinct_tokens: int | None = None  # U; None: every token of the batch distinct (bound)

    @property
    def label(self) -> str:
        table = "table+" + ("SparseAdam" if self.optimizer == "sparse" else "AdamW")
        return "/".join([self.model] + [table] * (self.sense_source == "table")
                        + ["full-logits"] * (not self.chunked)
                        + ["checkpointed"] * self.checkpointing)


def trace_memory(case: MemoryCase, *, real: bool = False, steps: int = 2) -> dict[str, Any]:
    """Trace ``steps`` steps of ``case`` (from the second, the optimizer state is alive) on
    fake tensors (real with ``real``): the peak, its parts, the parameter count and U."""
    config = ModelConfig.from_params({**case.params, "sense_source": case.sense_source},
                                     case.vocab_size)
    B, T = case.params["batch_size"], config.block_size
    U = case.distinct_tokens or min(case.vocab_size, B * T)
    tracker = LiveMemory(case.vocab_size, round_to=512 if case.attention == "cuda" else 1)
    with contextlib.nullcontext() if real else FakeTensorMode():
        torch.manual_seed(0)
        model = build_model(case.model, config).train()
        n_params = model.num_parameters(by_part=False)
        model.set_activation_checkpointing(case.checkpointing)
        if isinstance(model, BackpackLM) and not real:
            # torch.unique has no fake kernel (its size is data): U supplied where it is found
            model._distinct_tokens = lambda idx: (torch.arange(U), torch.zeros_like(idx))
        opt = optim.make_optimizer(model, lr=1e-4, sparse_table=case.optimizer == "sparse")
        tracker.tag(model.parameters(), "weights")
        xy = torch.randint(0, U, (B, T + 1), generator=torch.Generator().manual_seed(0))
        x, y = xy[:, :-1], xy[:, 1:]
        U = len(torch.unique(x)) if real else U
        kwargs = {"chunked_loss": case.chunked, "loss_chunk_rows": case.chunk_rows}

        @contextlib.contextmanager
        def forward() -> Iterator[None]:  # the step's autocast: the forward pass
            tracker.phase = "forward"
            with autocast(torch.device("cpu"), case.dtype):
                yield
            tracker.phase = "backward"

        def params_to_clip() -> list[torch.Tensor]:  # asked for after the backward
            tracker.phase = "optimizer"
            tracker.tag((p.grad for p in model.parameters() if p.grad is not None), "gradients")
            return list(model.parameters())

        scaler = torch.amp.GradScaler("cpu", enabled=False)
        cuda_like = contextlib.ExitStack()  # CUDA's attention kernel and autocast's fp32 ops
        if case.attention == "cuda":
            cuda_like.enter_context(mock.patch.object(F, "scaled_dot_product_attention",
                                                      _efficient_sdpa))
            cuda_like.enter_context(_CudaAutocastFloat32Ops())
        with tracker, tracker.saved_tensors(), cuda_like:
            for _ in range(steps):
                optimizer_step(model, opt, scaler, lambda: (x, y, kwargs), autocast=forward,
                               params=params_to_clip)
                tracker.tag((t for s in opt.state.values() for t in s.values()
                             if isinstance(t, torch.Tensor)), "optimizer state")
    case_values = {k: v for k, v in dataclasses.asdict(case).items() if k != "params"}
    return {"case": {**case_values, **config.to_dict(), "batch_size": B},
            "label": case.label, "params": n_params, "distinct_tokens": U,
            "peak_bytes": tracker.peak, "parts": tracker.by_kind(),
            "peak_phase": tracker.peak_phase, "phase_peaks": dict(tracker.phase_peaks)}


def memory_cases(params: dict[str, Any], vocab_sizes: Sequence[int],
                 distinct_tokens: int | None = None) -> list[MemoryCase]:
    """Both default models of a params file and, as information, full logits, the sense
    table (dense and sparse updates) and activation checkpointing."""
    dtype = params.get("dtype", "float16")
    case = functools.partial(MemoryCase, params=params, distinct_tokens=distinct_tokens,
                             dtype=dtype if dtype in DTYPES else "float16")
    return [c for V in vocab_sizes for c in (
        case("transformer", V), case("backpack", V), case("transformer", V, chunked=False),
        case("backpack", V, chunked=False), case("backpack", V, sense_source="table"),
        case("backpack", V, sense_source="table", optimizer="sparse"),
        case("backpack", V, checkpointing=True))]


def format_memory(results: list[dict[str, Any]], budget_gib: float = T4_BUDGET_GIB) -> str:
    """A table per V (GiB by part at the peak) and each default model's T4 verdict."""
    lines, by_v = [], {}
    for r in results:
        by_v.setdefault(r["case"]["vocab_size"], []).append(r)
    for V, rows in by_v.items():
        c = rows[0]["case"]
        lines.append(f"\nV = {V:,}: batch {c['batch_size']} x block {c['block_size']}, "
                     f"{c['dtype']} autocast, fused AdamW, U = {rows[0]['distinct_tokens']:,} "
                     "distinct tokens a batch; GiB live at the peak")
        width = max(22, *(len(r["label"]) + 2 for r in rows))

        def row(name: str, cell: Any) -> None:
            lines.append(f"{name:<18}" + "".join(f"{cell(r):>{width}}" for r in rows))

        for kind in KINDS:
            row(kind, lambda r: f"{r['parts'][kind] / GiB:.2f}")
        row("peak", lambda r: f"{r['peak_bytes'] / GiB:.2f}")
        row("  reached in", lambda r: r["peak_phase"])
        for phase in ("backward", "optimizer"):
            row(f"  peak in {phase}", lambda r: f"{r['phase_peaks'].get(phase, 0) / GiB:.2f}")
        row("params", lambda r: f"{r['params'] / 1e6:.1f}M")
        row("fits 16 GB T4", lambda r: "yes" if r["peak_bytes"] / GiB <= budget_gib else "no")
    lines += ["", "weights, gradients, optimizer state: fp32; activations: saved for backward; "
              f"logits: vocabulary-sized buffers (one chunk of {LOSS_CHUNK_ROWS} rows when "
              "chunked)", f"budget: {budget_gib} GiB for the step's allocator peak on a 16 GB T4"]
    for r in by_v[max(by_v)]:
        c, gib = r["case"], r["peak_bytes"] / GiB
        if c["sense_source"] == "network" and c["chunked"] and not c["checkpointing"]:
            lines.append(f"VERDICT {c['model']}: " + (
                f"FITS ({gib:.1f} GiB of 16)" if gib <= budget_gib else
                f"DOES NOT FIT ({gib:.1f} GiB needed, {budget_gib} GiB usable of 16)"))
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = new_parser("memory", __doc__)
    add = p.add_argument
    add("--config", default="train_europarl_scratch",
        help="name under params/ or a .yaml path (shape, batch, dtype)")
    add("--vocab", type=int, nargs="+", default=[50_257, 100_277])
    add("--distinct", type=int, metavar="U", help="distinct tokens a batch (default: every "
        "token distinct, the bound; a Zipf batch of 32 x 512 holds about 6,500)")
    return p


def run_memory(config: str, vocab_sizes: Sequence[int],
               distinct: int | None = None) -> dict[str, Any]:
    """The traced cases of a params file (:func:`memory_cases`) at ``vocab_sizes``."""
    print(f"memory accounting of {config}: traced on fake tensors (the real models, no memory "
          "used); CUDA's memory-efficient attention; float32 master weights")
    return {"section": "memory", "config": config, "budget_gib": T4_BUDGET_GIB,
            "cases": [trace_memory(c) for c in memory_cases(seed_params(config), vocab_sizes,
                                                            distinct)]}


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    run_main(lambda: run_memory(args.config, args.vocab, args.distinct),
             lambda result: format_memory(result["cases"]), args.json, "memory")


if __name__ == "__main__":
    main()
