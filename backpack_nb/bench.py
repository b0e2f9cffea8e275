"""Benchmarks, measured as ratios within one run (this kind of machine is shared and noisy).

    python -m backpack_nb.bench [speed] [--quick] [--json PATH]
    python -m backpack_nb.bench memory [--config train_europarl_scratch] [--rss-check]
    python -m backpack_nb.bench data [--copies 20]

``speed`` times training steps (forward, backward, gradient clipping, AdamW) of the Backpack,
the Transformer baseline and a straightforward nanoGPT-style GPT of the same architecture,
interleaved round by round so that all of them see the same machine load, next to a float32
matmul peak measured in the same rounds. The reference configuration is the seed's model
shape (6 layers, 6 heads, 384 wide, 16 senses) at block 256, batch 4, V = 16,000, on token
batches with a Zipf frequency profile (a batch of 1,024 tokens has about 550 distinct ones,
as real Europarl batches do). Without ``--quick`` it also times one variant per performance
lever (senses per position, SDPA mixing, full logits, for-each AdamW, torch.compile,
activation checkpointing, the sense table with dense and sparse updates).

``memory`` accounts the peak training memory of a configuration (by default the seed's: 6
layers, 384 wide, block 512, batch 32, float16 autocast, AdamW) part by part, from the real
models traced on fake tensors (:class:`LiveMemory`), and says whether each fits a 16 GB T4.
``--rss-check`` compares the same accounting in float32 with the peak RSS of real CPU steps.

``data`` times :func:`backpack_nb.data.prepare` end to end against a bare tiktoken
``encode_ordinary_batch`` over the same text.

Each section prints a table and writes JSON (``--json``; by default under the outputs root,
``bench/<section>.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from backpack_nb import optim
from backpack_nb.errors import UserError, exit_on_user_error
from backpack_nb.models import BackpackLM, ModelConfig, build_model
from backpack_nb.models.flops import train_flops
from backpack_nb.models.init import init_gpt_
from backpack_nb.models.loss import LOSS_CHUNK_ROWS
from backpack_nb.paths import outputs_root

GiB = 2**30
MiB = 2**20

# =========================================================================================
# token batches


def zipf_batches(vocab_size: int, batch_size: int, block_size: int, n: int,
                 seed: int = 0) -> list[torch.Tensor]:
    """``n`` batches (B, T + 1) of token ids drawn from a Zipf(1) profile over the
    vocabulary, like text: at B*T = 1,024 about 550 distinct ids, as in real Europarl
    batches of the same size (520-555 measured on the sample)."""
    gen = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, vocab_size + 1, dtype=torch.float64)
    probs = 1.0 / ranks
    probs /= probs.sum()
    return [torch.multinomial(probs, batch_size * (block_size + 1), replacement=True,
                              generator=gen).view(batch_size, block_size + 1)
            for _ in range(n)]


def europarl_batches(batch_size: int, block_size: int, n: int, seed: int = 0,
                     langs: Sequence[str] = ("en", "fr")) -> tuple[list[torch.Tensor], int]:
    """``n`` batches of real Europarl text (the sample in ``langs``, prepared into a
    temporary folder) and the compact vocabulary size. Batches of 4 x 256 hold about 530
    distinct tokens of mixed en+fr text, about 450 of English alone (one language repeats
    more)."""
    from backpack_nb import data

    source = os.environ.get("EUROPARL_SOURCE") or str(Path(__file__).resolve().parents[2]
                                                      / "shared" / "europarl")
    if not (Path(source) / "raw").is_dir():
        raise UserError(f"no Europarl sample at {source}: set EUROPARL_SOURCE, or use --data zipf")
    with tempfile.TemporaryDirectory() as tmp:
        out = data.prepare(source, Path(tmp) / "ep",
                           data.PrepareConfig(block_size=block_size, langs=tuple(langs)),
                           progress=False)
        vocab = data.load_meta(out)["vocab_size"]
        tokens = torch.from_numpy(data.load_tokens(out, "train").astype("int64"))
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        starts = torch.randint(0, len(tokens) - block_size - 1, (batch_size,), generator=gen)
        batches.append(torch.stack([tokens[s:s + block_size + 1] for s in starts.tolist()]))
    return batches, vocab


# =========================================================================================
# useful FLOPs


def matmul_gflops(n: int = 2048, reps: int = 3, device: str = "cpu",
                  dtype: torch.dtype = torch.float32) -> float:
    """Best-of-``reps`` GFLOP/s of an n x n float32 matmul: the roofline for MFU here."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device, dtype)
    b = torch.randn(n, n, generator=gen).to(device, dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def _sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# =========================================================================================
# the straightforward baseline


class NanoGPT(nn.Module):
    """A straightforward nanoGPT-style GPT (after karpathy/nanoGPT's model.py, rewritten): the
    architecture of :class:`~backpack_nb.models.GPT` (pre-LN, tanh GELU, SDPA causal
    attention, tied head, same init), trained the plain way: all logits, then
    ``F.cross_entropy``. The speed reference for the Transformer baseline."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        d = config.n_embd
        self.wte = nn.Embedding(config.vocab_size, d)
        self.wpe = nn.Embedding(config.block_size, d)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(_NanoBlock(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(d, bias=config.bias)
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        init_gpt_(self)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, **_: Any):
        T = idx.shape[1]
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(T, device=idx.device)))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    def param_groups(self, weight_decay: float) -> list[dict]:
        params = list(self.parameters())
        return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


class _NanoAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.dropout = config.n_head, config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))


class _NanoMLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class _NanoBlock(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = _NanoAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = _NanoMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


# =========================================================================================
# speed


@dataclasses.dataclass(frozen=True)
class Variant:
    """One timed training setup: a model and the performance switches it runs with."""

    name: str
    model: str  # "backpack", "transformer", "nanogpt" or "backpack-table"
    lever: str = ""  # what this row isolates ("" for the three main rows)
    base: str = ""  # the row it is compared with
    dedup: bool = True
    mixing: str = "auto"
    chunked: bool = True
    optimizer: str = "fused"  # "fused" or "foreach" AdamW, or "sparse" (table only)
    compile: bool = False
    checkpointing: bool = False


MAIN = [Variant("backpack", "backpack"), Variant("transformer", "transformer"),
        Variant("nanogpt", "nanogpt")]
LEVERS = [
    Variant("backpack/plain", "backpack", "all levers off (straightforward)", "backpack",
            dedup=False, mixing="sdpa", chunked=False, optimizer="foreach"),
    Variant("transformer/plain", "transformer", "all levers off (straightforward)",
            "transformer", chunked=False, optimizer="foreach"),
    Variant("backpack/per-position-senses", "backpack", "senses once per distinct token",
            "backpack", dedup=False),
    Variant("backpack/sdpa-mixing", "backpack", "mixing: causal blocks instead of SDPA",
            "backpack", mixing="sdpa"),
    Variant("backpack/einsum-mixing", "backpack", "mixing: causal blocks instead of einsum",
            "backpack", mixing="einsum"),
    Variant("backpack/full-logits", "backpack", "chunked CE, grads in forward", "backpack",
            chunked=False),
    Variant("transformer/full-logits", "transformer", "chunked CE, grads in forward",
            "transformer", chunked=False),
    Variant("backpack/foreach-adamw", "backpack", "fused AdamW", "backpack",
            optimizer="foreach"),
    Variant("transformer/foreach-adamw", "transformer", "fused AdamW", "transformer",
            optimizer="foreach"),
    Variant("backpack/compiled", "backpack", "torch.compile", "backpack", compile=True),
    Variant("transformer/compiled", "transformer", "torch.compile", "transformer",
            compile=True),
    Variant("backpack/checkpointed", "backpack", "activation checkpointing (cost)",
            "backpack", checkpointing=True),
    Variant("transformer/checkpointed", "transformer", "activation checkpointing (cost)",
            "transformer", checkpointing=True),
    Variant("backpack-table/dense", "backpack-table", "sense table, dense AdamW", "backpack"),
    Variant("backpack-table/sparse", "backpack-table", "sense table, sparse updates",
            "backpack-table/dense", optimizer="sparse"),
]


@dataclasses.dataclass
class SpeedSetup:
    """The model shape, batch and measurement plan of a speed run."""

    vocab_size: int = 16_000
    block_size: int = 256
    batch_size: int = 4
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    n_senses: int = 16
    dropout: float = 0.0
    rounds: int = 7
    warmup: int = 1
    data: str = "zipf"  # or "europarl", "europarl-en"
    device: str = "cpu"
    threads: int = 0  # 0: torch's default

    def model_config(self, model: str) -> ModelConfig:
        return ModelConfig(vocab_size=self.vocab_size, block_size=self.block_size,
                           n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd,
                           n_senses=self.n_senses, dropout=self.dropout, bias=False,
                           sense_source="table" if model == "backpack-table" else "network")


SPEED_PRESETS = {
    "reference": SpeedSetup(),
    "quick": SpeedSetup(rounds=3),
    # seconds, for tests: the code paths, not the numbers
    "tiny": SpeedSetup(vocab_size=512, block_size=32, batch_size=2, n_layer=2, n_head=2,
                       n_embd=64, n_senses=4, rounds=2, threads=1),
}


class _Runner:
    """A model, its optimizer and one training step, for one :class:`Variant`."""

    def __init__(self, variant: Variant, setup: SpeedSetup, batches: list[torch.Tensor]):
        self.variant = variant
        self.device = torch.device(setup.device)
        # (x, y) contiguous, on the device, as a data loader delivers them
        self.batches = [(b[:, :-1].contiguous().to(self.device),
                         b[:, 1:].contiguous().to(self.device)) for b in batches]
        torch.manual_seed(0)
        config = setup.model_config(variant.model)
        if variant.model == "nanogpt":
            model = NanoGPT(config)
        else:
            model = build_model("transformer" if variant.model == "transformer" else "backpack",
                                config)
        if isinstance(model, BackpackLM):
            model.dedup_senses, model.mixing = variant.dedup, variant.mixing
        if variant.checkpointing:
            model.set_activation_checkpointing(True)
        self.model = model.to(self.device).train()
        if variant.optimizer == "sparse":
            self.opt = optim.make_optimizer(model, lr=1e-4, sparse_table=True)
        else:
            self.opt = torch.optim.AdamW(model.param_groups(0.1), lr=1e-4, betas=(0.9, 0.95),
                                         fused=True if variant.optimizer == "fused" else None)
        self.forward = torch.compile(model) if variant.compile else model
        self.kwargs = {} if variant.model == "nanogpt" else {"chunked_loss": variant.chunked}
        self.params = list(model.parameters())
        self.i = 0

    def step(self) -> None:
        x, y = self.batches[self.i % len(self.batches)]
        self.i += 1
        _, loss = self.forward(x, y, **self.kwargs)
        loss.backward()
        if self.variant.optimizer == "sparse":
            optim.clip_grad_norm_(self.params, 1.0)
        else:
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def timed_step(self) -> float:
        _sync(self.device)
        t0 = time.perf_counter()
        self.step()
        _sync(self.device)
        return time.perf_counter() - t0

    def peak_bytes(self) -> int | None:
        """Peak memory of one step: CUDA's allocator peak, or on the CPU the peak of live
        tensor storage traced by :class:`LiveMemory` (None for a compiled model, whose
        kernels the trace does not see)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.step()
            return torch.cuda.max_memory_allocated()
        if self.variant.compile:
            return None
        tracker = LiveMemory()
        for p in self.params:
            tracker.register(p, "weights")
        for state in self.opt.state.values():
            for t in state.values():
                if isinstance(t, torch.Tensor):
                    tracker.register(t, "optimizer state")
        with tracker, tracker.saved_tensors():
            self.step()
        return tracker.peak


def run_speed(setup: SpeedSetup, variants: Sequence[Variant], *, log=print) -> dict[str, Any]:
    """Time ``variants`` interleaved (each round runs each variant once, in a rotating
    order, plus a matmul peak) and return rows with ms/step, tokens/s, useful FLOPs, MFU
    against the measured peak and peak memory, and the headline ratios."""
    threads_before = torch.get_num_threads()
    if setup.threads:
        torch.set_num_threads(setup.threads)
    try:
        return _run_speed(setup, variants, log)
    finally:
        torch.set_num_threads(threads_before)


def _run_speed(setup: SpeedSetup, variants: Sequence[Variant], log) -> dict[str, Any]:
    if setup.data == "europarl":
        batches, vocab = europarl_batches(setup.batch_size, setup.block_size, 4)
        setup = dataclasses.replace(setup, vocab_size=vocab)
    elif setup.data == "europarl-en":
        # English windows; the model keeps the reference V (the ids fit: V_en < V)
        batches, vocab = europarl_batches(setup.batch_size, setup.block_size, 4, langs=("en",))
        setup = dataclasses.replace(setup, vocab_size=max(vocab, setup.vocab_size))
    else:
        batches = zipf_batches(setup.vocab_size, setup.batch_size, setup.block_size, 4)
    distinct = statistics.mean(len(torch.unique(b[:, :-1])) for b in batches)
    log(f"config: {setup.n_layer} layers, {setup.n_head} heads, d {setup.n_embd}, "
        f"{setup.n_senses} senses, block {setup.block_size}, batch {setup.batch_size}, "
        f"V {setup.vocab_size:,}, dropout {setup.dropout}; {setup.data} batches "
        f"({distinct:.0f} distinct tokens a batch on average); {setup.device}, "
        f"{torch.get_num_threads()} threads, float32, torch {torch.__version__}")

    runners: dict[str, _Runner] = {}
    compile_s: dict[str, float] = {}
    for v in variants:
        runners[v.name] = _Runner(v, setup, batches)
        t0 = time.perf_counter()
        # warm-up; a compiled model sees every batch (a new U recompiles once, as dynamic)
        for _ in range(max(setup.warmup, len(batches) if v.compile else 0)):
            runners[v.name].step()
        if v.compile:
            compile_s[v.name] = time.perf_counter() - t0
    load = os.getloadavg()[0]
    log(f"timing {len(variants)} variants x {setup.rounds} rounds, interleaved "
        f"(load average {load:.1f} on {os.cpu_count()} cores) ...")
    if load > 0.5 and torch.get_num_threads() > 1:
        log("warning: other processes are running; with several threads every op waits for "
            "a descheduled thread and times blow up unevenly. --threads 1 gives stable ratios.")
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    peaks: list[float] = []
    names = [v.name for v in variants]
    for r in range(setup.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            times[name].append(runners[name].timed_step())
        peaks.append(matmul_gflops(device=setup.device))
    peak_gflops = statistics.median(peaks)

    rows = []
    for v in variants:
        runner = runners[v.name]
        ms = statistics.median(times[v.name]) * 1000
        flops = train_flops(runner.model, setup.batch_size, setup.block_size, distinct)
        mem = runner.peak_bytes()
        rows.append({
            "variant": v.name, "model": v.model, "lever": v.lever, "base": v.base,
            "ms_per_step": round(ms, 1),
            "ms_all": [round(t * 1000, 1) for t in times[v.name]],
            "tokens_per_s": round(setup.batch_size * setup.block_size / ms * 1000),
            "useful_gflop": round(flops["total"] / 1e9, 2),
            "gflop_by_part": {k: round(f / 1e9, 2) for k, f in flops.items()},
            "mfu": round(flops["total"] / (ms / 1000) / (peak_gflops * 1e9), 4),
            "peak_mib": None if mem is None else round(mem / MiB, 1),
            "params": sum(p.numel() for p in runner.params),
            **({"compile_s": round(compile_s[v.name], 1)} if v.name in compile_s else {}),
        })
    by_name = {row["variant"]: row for row in rows}

    def paired(a: str, b: str) -> float | None:
        """Median over rounds of time(a) / time(b): both measured in the same round."""
        if a not in times or b not in times:
            return None
        return round(statistics.median(x / y for x, y in zip(times[a], times[b])), 3)

    ratios: dict[str, Any] = {}
    if "backpack" in by_name and "transformer" in by_name:
        ratios["backpack_over_transformer"] = paired("backpack", "transformer")
        ratios["flop_floor"] = round(by_name["backpack"]["useful_gflop"]
                                     / by_name["transformer"]["useful_gflop"], 3)
    if "transformer" in by_name and "nanogpt" in by_name:
        ratios["transformer_over_nanogpt"] = paired("transformer", "nanogpt")
    if "backpack/plain" in by_name and "transformer/plain" in by_name:
        ratios["plain_backpack_over_plain_transformer"] = paired("backpack/plain",
                                                                 "transformer/plain")
    for row in rows:
        if row["base"]:
            row["time_vs_base"] = paired(row["variant"], row["base"])
    return {"section": "speed", "setup": dataclasses.asdict(setup),
            "threads": torch.get_num_threads(), "load_average": [load, os.getloadavg()[0]],
            "distinct_tokens": distinct, "peak_gflops": round(peak_gflops, 1),
            "peak_gflops_all": [round(p, 1) for p in peaks], "rows": rows, "ratios": ratios}


def format_speed(result: dict[str, Any]) -> str:
    s = result["setup"]
    lines = [f"config: {s['n_layer']}L/{s['n_head']}H/d{s['n_embd']}/k{s['n_senses']}, "
             f"block {s['block_size']}, batch {s['batch_size']}, V {s['vocab_size']:,}, "
             f"{s['data']} batches ({result['distinct_tokens']:.0f} distinct tokens a batch); "
             f"{result['threads']} threads; matmul peak {result['peak_gflops']:.0f} GFLOP/s "
             f"(fp32, measured each round, median); load average "
             f"{result['load_average'][0]:.1f} -> {result['load_average'][1]:.1f}"]
    head = (f"{'variant':<30}{'ms/step':>9}{'tokens/s':>10}{'GFLOP':>8}{'MFU':>7}"
            f"{'peak MiB':>10}{'vs base':>9}  lever")
    lines += [head, "-" * len(head)]
    for r in result["rows"]:
        mem = "-" if r["peak_mib"] is None else f"{r['peak_mib']:,.0f}"
        vs = f"{r['time_vs_base']:.2f}x" if r.get("time_vs_base") else ""
        lever = r["lever"] + (f" (cold compile {r['compile_s']:.0f} s)" if "compile_s" in r else "")
        lines.append(f"{r['variant']:<30}{r['ms_per_step']:>9.0f}{r['tokens_per_s']:>10,}"
                     f"{r['useful_gflop']:>8.1f}{r['mfu']:>7.0%}{mem:>10}{vs:>9}  {lever}")
    q = result["ratios"]
    lines.append("")
    if "backpack_over_transformer" in q:
        lines.append(f"Backpack / Transformer step time: {q['backpack_over_transformer']:.2f} "
                     f"(FLOP floor {q['flop_floor']:.2f}, so {q['backpack_over_transformer'] / q['flop_floor']:.2f}x "
                     "the floor; goal <= 1.35, which needs a floor below it: few distinct tokens a batch)")
    if "plain_backpack_over_plain_transformer" in q:
        lines.append("  straightforward versions (all levers off): "
                     f"{q['plain_backpack_over_plain_transformer']:.2f}")
    if "transformer_over_nanogpt" in q:
        lines.append(f"Transformer / nanoGPT-style step time: {q['transformer_over_nanogpt']:.2f} "
                     "(goal <= 1.00)")
    mfu = {r["variant"]: r["mfu"] for r in result["rows"]}
    if "backpack" in mfu and "transformer" in mfu:
        lines.append(f"MFU (useful FLOPs / measured fp32 matmul peak): transformer "
                     f"{mfu['transformer']:.0%}, backpack {mfu['backpack']:.0%}"
                     + (f", nanogpt {mfu['nanogpt']:.0%}" if "nanogpt" in mfu else "")
                     + " (goal: transformer >= 70%)")
    lines.append("ratios are medians over rounds of times measured in the same round; "
                 "ms/step are medians; 'vs base': the variant's time over its base's (for a "
                 "lever switched off, the lever's speed-up)")
    return "\n".join(lines)


# =========================================================================================
# memory: live tensor storage, traced


class _Block:
    """One tensor storage: its size and what it holds."""

    __slots__ = ("nbytes", "kind", "ref", "__weakref__")

    def __init__(self, nbytes: int, kind: str) -> None:
        self.nbytes, self.kind = nbytes, kind


# What a storage holds, in the order a later, more specific finding overrides an earlier one.
KINDS = ("weights", "gradients", "optimizer state", "activations", "weight copies", "logits",
         "temporaries")


class LiveMemory(TorchDispatchMode):
    """Bytes of live tensor storage while a training step runs, and what was live at the
    peak: ``weights`` (registered), ``gradients`` and ``optimizer state`` (tagged after the
    backward and the optimizer step), ``activations`` (saved for backward, via
    :meth:`saved_tensors`), ``weight copies`` (autocast's low-precision copies of weights),
    ``logits`` (any other tensor with a vocabulary-sized last dimension: logits chunks,
    their gradients) and ``temporaries`` (the rest).

    Works on real tensors and on fake ones (``FakeTensorMode``: shapes only, so the seed
    configuration is traced in seconds without its memory). Every op's outputs are seen
    after autograd, so forward, backward and optimizer are all counted; a storage is counted
    once however many views share it, and leaves the count when it is freed."""

    def __init__(self, vocab_size: int | None = None, round_to: int = 1) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.round_to = round_to  # CUDA's allocator hands out multiples of 512 bytes
        self._blocks: WeakIdKeyDictionary = WeakIdKeyDictionary()  # storage -> _Block
        self._live: dict[int, _Block] = {}
        self.current = 0
        self.peak = 0
        self.at_peak: list[_Block] = []
        self.phase = "setup"  # set by the caller: "forward", "backward", "optimizer"
        self.phase_peaks: dict[str, int] = {}
        self.peak_phase = self.phase

    # -- bookkeeping ---------------------------------------------------------------------

    def register(self, tensor: torch.Tensor, kind: str) -> None:
        """Count ``tensor`` (made before tracing began) as ``kind``."""
        for block in self._track(tensor):
            block.kind = kind

    def tag(self, tensors: Iterator[torch.Tensor], kind: str) -> None:
        for t in tensors:
            for block in self._track(t):
                block.kind = kind

    def reset_peak(self) -> None:
        self.peak, self.at_peak = self.current, list(self._live.values())
        self.peak_phase, self.phase_peaks = self.phase, {}

    def by_kind(self, blocks: Sequence[_Block] | None = None) -> dict[str, int]:
        """Bytes by kind among ``blocks`` (default: those live at the peak)."""
        out = dict.fromkeys(KINDS, 0)
        for b in self.at_peak if blocks is None else blocks:
            out[b.kind] += b.nbytes
        return out

    def _storages(self, t: torch.Tensor) -> list[torch.UntypedStorage]:
        if t.is_sparse:
            return [s for part in (t._indices(), t._values()) for s in self._storages(part)]
        if t.layout != torch.strided:
            return []
        return [t.untyped_storage()]

    def _track(self, t: torch.Tensor) -> list[_Block]:
        blocks = []
        for st in self._storages(t):
            block = self._blocks.get(st)
            if block is None:
                nbytes = -(-st.nbytes() // self.round_to) * self.round_to
                block = _Block(nbytes, self._kind_of_new(t))
                key = id(block)
                block.ref = weakref.ref(st, lambda _, key=key: self._free(key))
                self._blocks[st] = block
                self._live[key] = block
                self.current += block.nbytes
                if self.current > self.phase_peaks.get(self.phase, 0):
                    self.phase_peaks[self.phase] = self.current
                if self.current > self.peak:
                    self.peak, self.at_peak = self.current, list(self._live.values())
                    self.peak_phase = self.phase
            blocks.append(block)
        return blocks

    def _kind_of_new(self, t: torch.Tensor) -> str:
        if self.vocab_size and t.dim() >= 1 and t.shape[-1] == self.vocab_size:
            return "logits"
        return "temporaries"

    def _free(self, key: int) -> None:
        block = self._live.pop(key, None)
        if block is not None:
            self.current -= block.nbytes

    # -- hooks -----------------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        copy_of_weight = (func is torch.ops.aten._to_copy.default
                          and self._kind(args[0]) == "weights")
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                for block in self._track(t):
                    if copy_of_weight:
                        block.kind = "weight copies"
        return out

    def _kind(self, t: Any) -> str | None:
        if not isinstance(t, torch.Tensor):
            return None
        st = self._storages(t)
        block = self._blocks.get(st[0]) if st else None
        return None if block is None else block.kind

    def saved_tensors(self) -> contextlib.AbstractContextManager:
        """A context in which tensors saved for backward are counted as ``activations``
        (unless they are weights, weight copies or logits)."""

        def pack(t: torch.Tensor) -> torch.Tensor:
            for block in self._track(t):
                if block.kind == "temporaries":
                    block.kind = "activations"
            # detach: the same storage, without the reference cycle that saving the output
            # of an op as itself would make
            return t.detach()

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


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
    from torch._subclasses.fake_tensor import FakeTensorMode

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


T4_BUDGET_GIB = 14.0
"""What a training step may peak at (``torch.cuda.max_memory_allocated``) on a 16 GB T4:
PyTorch sees 14.75 GiB of it, and the CUDA context, cuBLAS workspaces and allocator
fragmentation take some of that."""


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


# -- the RSS cross-check ------------------------------------------------------------------


def _rss_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def rss_step(model: str, vocab_size: int, batch_size: int, block_size: int,
             steps: int = 2) -> dict[str, Any]:
    """Real float32 CPU training steps (fused AdamW, Zipf batch); peak RSS above the
    RSS before the model was built. Run in a fresh process (:func:`rss_check`): the peak
    RSS of a process only grows."""
    xy = zipf_batches(vocab_size, batch_size, block_size, 1)[0]
    U = len(torch.unique(xy[:, :-1]))
    torch.ones(64, 64) @ torch.ones(64, 64)  # load the math libraries before the baseline
    before = _rss_kib()
    torch.manual_seed(0)
    m = build_model(model, ModelConfig(vocab_size=vocab_size, block_size=block_size,
                                       dropout=0.1)).train()
    opt = torch.optim.AdamW(m.param_groups(0.1), lr=1e-4, fused=True)
    t0 = time.perf_counter()
    for _ in range(steps):
        _, loss = m(xy[:, :-1], xy[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"model": model, "vocab_size": vocab_size, "batch_size": batch_size,
            "block_size": block_size, "distinct_tokens": U,
            "rss_peak_bytes": (peak - before) * 1024,
            "s_per_step": round((time.perf_counter() - t0) / steps, 1)}


def rss_check(models: Sequence[str], vocab_size: int, batch_sizes: Sequence[int],
              block_size: int, target_batch: int, *, log=print) -> dict[str, Any]:
    """For each model and batch size: the peak RSS of real fp32 CPU steps (a fresh process
    each) next to the traced accounting of the same step (fake tensors, float32, the CPU's
    attention kernels, the batch's own U); then both extrapolated linearly in the batch to
    ``target_batch`` (a real step there takes minutes here), next to the accounting traced
    directly at ``target_batch``."""
    rows = []
    for model in models:
        for b in batch_sizes:
            cmd = [sys.executable, "-m", "backpack_nb.bench", "_rss", "--model", model,
                   "--vocab", str(vocab_size), "--batch", str(b), "--block", str(block_size)]
            log(f"  real step: {model}, batch {b} x {block_size}, V {vocab_size:,} ...")
            # A fixed mmap threshold: freed tensors go back to the OS, so RSS follows live
            # memory instead of glibc's heap retention (about 8% more RSS without it).
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
            real = json.loads(proc.stdout.strip().splitlines()[-1])
            traced = trace_memory(MemoryCase(model, vocab_size, batch_size=b,
                                             block_size=block_size, dtype="float32",
                                             attention="cpu",
                                             distinct_tokens=real["distinct_tokens"]))
            rows.append({**real, "traced_peak_bytes": traced["peak_bytes"],
                         "traced_parts": traced["parts"],
                         "rss_over_traced": round(real["rss_peak_bytes"]
                                                  / traced["peak_bytes"], 3)})
    target_U = len(torch.unique(zipf_batches(vocab_size, target_batch, block_size, 1)[0]))
    extrapolated = {}
    for model in models:
        rs = [r for r in rows if r["model"] == model]
        if len(rs) < 2:
            continue
        a, b = rs[0], rs[-1]
        per_seq = {key: (b[key] - a[key]) / (b["batch_size"] - a["batch_size"])
                   for key in ("rss_peak_bytes", "traced_peak_bytes")}
        direct = trace_memory(MemoryCase(model, vocab_size, batch_size=target_batch,
                                         block_size=block_size, dtype="float32",
                                         attention="cpu", distinct_tokens=target_U))
        extrapolated[model] = {
            "batch_size": target_batch, "distinct_tokens": target_U,
            "rss_bytes": b["rss_peak_bytes"] + per_seq["rss_peak_bytes"]
            * (target_batch - b["batch_size"]),
            "traced_linear_bytes": b["traced_peak_bytes"] + per_seq["traced_peak_bytes"]
            * (target_batch - b["batch_size"]),
            "traced_bytes": direct["peak_bytes"],
        }
    return {"rows": rows, "extrapolated": extrapolated}


def format_rss(check: dict[str, Any]) -> str:
    rows = check["rows"]
    lines = ["\nCPU cross-check: real float32 steps (peak RSS above the pre-model RSS) vs the "
             "traced accounting of the same step (float32, CPU kernels, the batch's U)",
             f"{'model':<12}{'batch':>6}{'U':>7}{'RSS GiB':>9}{'traced GiB':>11}{'RSS/traced':>11}"
             f"{'activations GiB':>16}{'s/step':>8}"]
    for r in rows:
        lines.append(f"{r['model']:<12}{r['batch_size']:>6}{r['distinct_tokens']:>7,}"
                     f"{r['rss_peak_bytes'] / GiB:>9.2f}{r['traced_peak_bytes'] / GiB:>11.2f}"
                     f"{r['rss_over_traced']:>11.2f}"
                     f"{r['traced_parts']['activations'] / GiB:>16.2f}{r['s_per_step']:>8}")
    for model, e in check["extrapolated"].items():
        lines.append(f"{model} at batch {e['batch_size']} (linear in the batch from the two "
                     f"real steps): RSS {e['rss_bytes'] / GiB:.2f} GiB, traced "
                     f"{e['traced_linear_bytes'] / GiB:.2f} GiB; traced directly at batch "
                     f"{e['batch_size']} (U {e['distinct_tokens']:,}): "
                     f"{e['traced_bytes'] / GiB:.2f} GiB")
    return "\n".join(lines)


# =========================================================================================
# data preparation throughput


def build_corpus(sample: Path, dest: Path, copies: int) -> None:
    """``copies`` copies of the raw en+fr sample days under new day names (real text, more
    days): ep-00-01-17.txt -> ep-00-01-17-c003.txt."""
    for lang in ("en", "fr"):
        src = sample / "raw" / "txt" / lang
        out = dest / "txt" / lang
        out.mkdir(parents=True)
        for c in range(copies):
            for f in sorted(src.glob("ep-*.txt")):
                shutil.copyfile(f, out / f"{f.stem}-c{c:03d}.txt")


def run_data(sample: Path, copies: int = 20, repeats: int = 3, *, log=print) -> dict[str, Any]:
    """Best-of-``repeats`` seconds of ``data.prepare`` (read, clean, split, encode, compact,
    write) and of a bare ``encode_ordinary_batch`` over the same cleaned documents, both on
    the same threads."""
    from backpack_nb import data
    from backpack_nb.tokenizer import get_encoding

    if not (sample / "raw" / "txt" / "en").is_dir():
        raise UserError(f"no Europarl sample at {sample}: pass --sample or set EUROPARL_SOURCE")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_corpus(sample, tmp / "src", copies)
        cfg = data.PrepareConfig(langs=("en", "fr"))
        files = data.read_source([tmp / "src"], "raw", cfg.langs)
        docs = [t for u in data.collect_units(files, cfg) for t in u.texts.values()]
        mib = sum(len(t.encode()) for t in docs) / MiB
        enc = get_encoding("cl100k_base")
        threads = min(8, os.cpu_count() or 1)  # what data.prepare uses
        log(f"text: {mib:.1f} MiB of cleaned en+fr documents ({len(docs)}), {threads} threads")
        prep, bare = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            data.prepare(tmp / "src", tmp / "out", cfg, overwrite=True, progress=False)
            prep.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            enc.encode_ordinary_batch(docs, num_threads=threads)
            bare.append(time.perf_counter() - t0)
    return {"section": "data", "mib": round(mib, 2), "documents": len(docs), "threads": threads,
            "prepare_s": round(min(prep), 4), "encode_s": round(min(bare), 4),
            "prepare_mib_s": round(mib / min(prep), 1), "encode_mib_s": round(mib / min(bare), 1),
            "rate_ratio": round(min(bare) / min(prep), 3)}


def format_data(r: dict[str, Any]) -> str:
    return "\n".join([
        f"prepare (end to end):        {r['prepare_s']:6.2f} s  {r['prepare_mib_s']:6.1f} MiB/s",
        f"encode_ordinary_batch alone: {r['encode_s']:6.2f} s  {r['encode_mib_s']:6.1f} MiB/s",
        f"prepare rate / bare encode rate: {r['rate_ratio']:.2f} (goal >= 0.80; best of runs)",
    ])


# =========================================================================================
# command line


def _write_json(result: Any, path: str | None, section: str) -> Path:
    out = Path(path) if path else outputs_root() / "bench" / f"{section}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out)
    return out


def _default_sample() -> Path:
    env = os.environ.get("EUROPARL_SOURCE")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "europarl"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m backpack_nb.bench",
                                     description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="section", metavar="{speed,memory,data}")
    sp = sub.add_parser("speed", help="training-step time, MFU and ratios (the default)")
    for p in (parser, sp):
        p.add_argument("--quick", action="store_true",
                       help="the three main models only, fewer rounds (under a minute)")
        p.add_argument("--tiny", action="store_true", help="a tiny shape, for tests (seconds)")
        p.add_argument("--rounds", type=int, help="timed rounds (default 7; 3 with --quick)")
        p.add_argument("--data", choices=["zipf", "europarl", "europarl-en"], default="zipf",
                       help="token batches: Zipf(1) over V (about 550 distinct a batch, like "
                       "en+fr Europarl), the en+fr sample (its compact V), or English windows "
                       "only (about 450 distinct, at the reference V)")
        p.add_argument("--threads", type=int, help="torch threads (default: torch's; 1 with "
                       "--tiny)")
        p.add_argument("--device", default="cpu", help="cpu, or cuda (ms/step, MFU against "
                       "the fp32 matmul peak, torch.cuda.max_memory_allocated)")
        p.add_argument("--only", nargs="+", metavar="VARIANT", help="time only these variants")
        p.add_argument("--json", help="where to write the JSON (default outputs/bench/)")
    mp = sub.add_parser("memory", help="peak training memory accounting, T4 verdicts")
    mp.add_argument("--config", default="train_europarl_scratch",
                    help="name under params/ or a .yaml path (shape, batch, dtype)")
    mp.add_argument("--vocab", type=int, nargs="+", default=[50_257, 100_277])
    mp.add_argument("--batch", type=int, help="override the config's batch size")
    mp.add_argument("--rss-check", action="store_true",
                    help="also run real fp32 CPU steps and compare their peak RSS (minutes)")
    mp.add_argument("--rss-batch", type=int, nargs="+", default=[4, 8])
    mp.add_argument("--rss-vocab", type=int, default=100_277)
    mp.add_argument("--json")
    dp = sub.add_parser("data", help="data preparation throughput vs bare tiktoken")
    dp.add_argument("--sample", type=Path, default=None, help="the Europarl sample folder")
    dp.add_argument("--copies", type=int, default=20)
    dp.add_argument("--repeats", type=int, default=3)
    dp.add_argument("--json")
    rp = sub.add_parser("_rss")  # internal: one real step in this fresh process
    rp.add_argument("--model", required=True)
    rp.add_argument("--vocab", type=int, required=True)
    rp.add_argument("--batch", type=int, required=True)
    rp.add_argument("--block", type=int, required=True)
    args = parser.parse_args(argv)
    try:
        _run(args)
    except UserError as exc:
        exit_on_user_error(exc)


def _run(args: argparse.Namespace) -> None:
    section = args.section or "speed"
    if section == "_rss":
        print(json.dumps(rss_step(args.model, args.vocab, args.batch, args.block)))
        return
    if section == "speed":
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device here; use --device cpu")
        preset = "tiny" if args.tiny else "quick" if args.quick else "reference"
        setup = dataclasses.replace(SPEED_PRESETS[preset], data=args.data, device=args.device)
        if args.threads is not None:
            setup = dataclasses.replace(setup, threads=args.threads)
        if args.rounds:
            setup = dataclasses.replace(setup, rounds=args.rounds)
        variants = MAIN if args.quick else MAIN + LEVERS
        if args.only:
            known = {v.name: v for v in MAIN + LEVERS}
            unknown = [n for n in args.only if n not in known]
            if unknown:
                raise UserError(f"unknown variant(s) {', '.join(unknown)}: use some of "
                                f"{', '.join(known)}")
            variants = [known[n] for n in args.only]
        result = run_speed(setup, variants)
        print(format_speed(result))
    elif section == "memory":
        from backpack_nb.models.__main__ import load_params

        params = load_params(args.config)
        cases = memory_cases(params, args.vocab, args.batch)
        print(f"memory accounting of {args.config}: traced on fake tensors (the real models, "
              "no memory used); CUDA's memory-efficient attention; float32 master weights")
        results = [trace_memory(c) for c in cases]
        print(format_memory(results))
        result: dict[str, Any] = {"section": "memory", "config": args.config,
                                  "budget_gib": T4_BUDGET_GIB, "cases": results}
        if args.rss_check:
            check = rss_check(["transformer", "backpack"], args.rss_vocab, args.rss_batch,
                              params.get("block_size", 512),
                              args.batch or params.get("batch_size", 32))
            print(format_rss(check))
            result["rss_check"] = check
    else:
        result = run_data(args.sample or _default_sample(), args.copies, args.repeats)
        print(format_data(result))
    print(f"wrote {_write_json(result, args.json, section)}")


if __name__ == "__main__":
    main()
