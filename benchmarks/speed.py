"""Training-step time, MFU and the headline ratios, measured within one run.

    python -m benchmarks.speed [--quick] [--tiny] [--rounds N] [--data zipf|europarl|europarl-en]
        [--threads N] [--device cpu|cuda] [--dtype float32|bfloat16|float16] [--seed-config]
        [--only VARIANT ...] [--json PATH]

Times training steps (forward, backward, gradient clipping, AdamW) of the Backpack, the
Transformer baseline and a straightforward nanoGPT-style GPT of the same architecture
(:mod:`benchmarks.nanogpt`), interleaved round by round so that all of them see the same
machine load, next to a float32 matmul peak measured in the same rounds. The reference
configuration is the seed's model shape (6 layers, 6 heads, 384 wide, 16 senses) at block
256, batch 4, V = 16,000, on token batches with a Zipf frequency profile (a batch of 1,024
tokens has about 550 distinct ones, as real Europarl batches do). Without ``--quick`` it also
times one variant per performance lever (senses per position, SDPA mixing, full logits,
for-each AdamW, torch.compile, activation checkpointing, the sense table with dense and
sparse updates). Writes JSON to ``--json`` (default ``<outputs root>/bench/speed.json``).

On a GPU (``--device cuda --seed-config``: batch 32 x 512, V 13,034, float16 with a gradient
scaler, as the seed's commands train) MFU is taken against the GPU's dense peak for the dtype
(:func:`backpack_nb.training.meters.peak_flops`, named in the output); on the CPU against the
fp32 matmul peak measured in the same rounds.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from backpack_nb import optim
from backpack_nb.errors import UserError, exit_on_user_error
from backpack_nb.models import BackpackLM, ModelConfig, build_model
from backpack_nb.models.flops import train_flops
from backpack_nb.models.mixing import distinct_tokens
from backpack_nb.training.batches import to_device
from backpack_nb.training.meters import gpu_peak_name, peak_flops

from benchmarks.batches import europarl_batches, zipf_batches
from benchmarks.common import MiB, amp_step, matmul_gflops, sync, write_json
from benchmarks.compile_guard import (drop_compiled_state, graphs_compiled, guarded_warmup,
                                      recompile_limit_at_least)
from benchmarks.gpu_probe import count_syncs, format_top, top_kernels
from benchmarks.live_memory import LiveMemory
from benchmarks.nanogpt import NanoGPT


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
    fused_loss: bool = False  # off by default: its row is the lever switched on
    distinct_on_host: bool = False  # likewise (Backpack): distinct tokens found on the host


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
    Variant("backpack/fused-loss", "backpack", "fused loss chunks (on; off by default)",
            "backpack", fused_loss=True),
    Variant("transformer/fused-loss", "transformer", "fused loss chunks (on; off by default)",
            "transformer", fused_loss=True),
    Variant("backpack/distinct-on-host", "backpack",
            "distinct tokens on the host (on; off by default)", "backpack", distinct_on_host=True),
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
    dtype: str = "float32"  # autocast dtype; float16 adds a GradScaler (CUDA only)
    compile_all: bool = False  # every variant compiled, as train.py runs on CUDA
    compile_cap_s: float = 0.0  # a compiled variant's warm-up past this is dropped (0: none)
    profile: bool = False  # profile the main rows' steps (top kernels) after timing
    budget_s: float = 0.0  # warm-ups stop starting past this (0: none), leaving time to time

    def model_config(self, model: str) -> ModelConfig:
        return ModelConfig(vocab_size=self.vocab_size, block_size=self.block_size,
                           n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd,
                           n_senses=self.n_senses, dropout=self.dropout, bias=False,
                           sense_source="table" if model == "backpack-table" else "network")


SPEED_PRESETS = {
    "reference": SpeedSetup(),
    "quick": SpeedSetup(rounds=3),
    # the seed's configuration as its GPU commands train it (batch 32 x 512, V of the sample)
    "seed": SpeedSetup(vocab_size=13_034, block_size=512, batch_size=32, dropout=0.1,
                       rounds=5, dtype="float16"),
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
        # the host's copy, whose distinct tokens a step finds and sends (as the trainer does)
        self.host_x = [b[:, :-1].contiguous() for b in batches]
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
        if variant.fused_loss:
            model.fused_loss = True
        self.model = model.to(self.device).train()
        if variant.optimizer == "sparse":
            self.opt = optim.make_optimizer(model, lr=1e-4, sparse_table=True)
        else:
            self.opt = torch.optim.AdamW(model.param_groups(0.1), lr=1e-4, betas=(0.9, 0.95),
                                         fused=True if variant.optimizer == "fused" else None)
        self.compiled = variant.compile or setup.compile_all
        self.forward = torch.compile(model) if self.compiled else model
        self.kwargs = {} if variant.model == "nanogpt" else {"chunked_loss": variant.chunked}
        self.params = list(model.parameters())
        self.i = 0
        # as train.py runs it: autocast to the dtype, float16 with a gradient scaler
        self.dtype = None if setup.dtype == "float32" else getattr(torch, setup.dtype)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=setup.dtype == "float16")

    def step(self) -> None:
        x, y = self.batches[self.i % len(self.batches)]
        kwargs = self.kwargs
        if self.variant.distinct_on_host:
            types, where = distinct_tokens(self.host_x[self.i % len(self.batches)])
            kwargs = {**kwargs, "distinct": (to_device(types, self.device),
                                             to_device(where, self.device))}
        self.i += 1
        clip = (optim.clip_grad_norm_ if self.variant.optimizer == "sparse"
                else torch.nn.utils.clip_grad_norm_)
        amp_step(self.forward, self.params, self.opt, self.scaler, x, y, self.dtype,
                 clip=clip, **kwargs)

    def timed_step(self) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        self.step()
        sync(self.device)
        return time.perf_counter() - t0

    def peak_bytes(self) -> int | None:
        """Peak memory of one step: CUDA's allocator peak, or on the CPU the peak of live
        tensor storage traced by :class:`LiveMemory` (None for a compiled model or loss,
        whose kernels the trace does not see)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.step()
            return torch.cuda.max_memory_allocated()
        if self.compiled or self.variant.fused_loss:  # the trace would run it eagerly
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


def run_speed(setup: SpeedSetup, variants: Sequence[Variant], *,
              log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Time ``variants`` interleaved (each round runs each variant once, in a rotating
    order, plus a matmul peak) and return rows with ms/step, tokens/s, useful FLOPs, MFU
    against the measured peak and peak memory, and the headline ratios."""
    threads_before = torch.get_num_threads()
    if setup.threads:
        torch.set_num_threads(setup.threads)
    # Variants share the models' code (forward), and dynamo's recompile limit counts the
    # compilations of one code object: 8 serve one model, not a dozen variants of it.
    try:
        with recompile_limit_at_least(8 * len(variants)):
            return _run_speed(setup, variants, log)
    finally:
        torch.set_num_threads(threads_before)


def _batches(setup: SpeedSetup) -> tuple[list[torch.Tensor], SpeedSetup]:
    """The batches of ``setup.data``, and the setup with the vocabulary they need."""
    if setup.data == "europarl":
        batches, vocab = europarl_batches(setup.batch_size, setup.block_size, 4)
        return batches, dataclasses.replace(setup, vocab_size=vocab)
    if setup.data == "europarl-en":
        # English windows; the model keeps the reference V (the ids fit: V_en < V)
        batches, vocab = europarl_batches(setup.batch_size, setup.block_size, 4, langs=("en",))
        return batches, dataclasses.replace(setup, vocab_size=max(vocab, setup.vocab_size))
    return zipf_batches(setup.vocab_size, setup.batch_size, setup.block_size, 4), setup


def _run_speed(setup: SpeedSetup, variants: Sequence[Variant],
               log: Callable[[str], Any]) -> dict[str, Any]:
    batches, setup = _batches(setup)
    distinct = statistics.mean(len(torch.unique(b[:, :-1])) for b in batches)
    log(f"config: {setup.n_layer} layers, {setup.n_head} heads, d {setup.n_embd}, "
        f"{setup.n_senses} senses, block {setup.block_size}, batch {setup.batch_size}, "
        f"V {setup.vocab_size:,}, dropout {setup.dropout}; {setup.data} batches "
        f"({distinct:.0f} distinct tokens a batch on average); {setup.device}, "
        f"{torch.get_num_threads()} threads, {setup.dtype}, torch {torch.__version__}")

    runners: dict[str, _Runner] = {}
    compile_s: dict[str, float] = {}
    warmups: dict[str, dict[str, Any]] = {}
    dropped: dict[str, dict[str, Any]] = {}
    t_start = time.perf_counter()
    for v in variants:
        cap = setup.compile_cap_s
        if setup.budget_s:  # keep a sixth of the budget for timing, profiling and memory
            left = setup.budget_s * 5 / 6 - (time.perf_counter() - t_start)
            if left < 5:
                dropped[v.name] = {"status": "no time left", "message": "the --budget ran out "
                                   "before its warm-up"}
                log(f"{v.name}: dropped, no time left in the --budget")
                continue
            cap = min(cap, left) if cap else left
        runner = _Runner(v, setup, batches)
        # warm-up; a compiled model sees every batch (a new U recompiles once, as dynamic),
        # under a cap, with dynamo's recompile limit made an error (else a silent eager run)
        steps = max(setup.warmup, len(batches) if runner.compiled else 0)
        report = guarded_warmup(runner.step, steps, compiled=runner.compiled, cap_s=cap)
        if report["status"] != "ok":
            log(f"{v.name}: dropped, {report['status']} ({report['message']})")
            dropped[v.name] = report
            del runner
            drop_compiled_state()
            continue
        runners[v.name] = runner
        if runner.compiled:
            compile_s[v.name] = report["seconds"]
            warmups[v.name] = report
            log(f"{v.name}: compiled in {report['seconds']:.0f} s, {report['graphs']} graph(s), "
                f"{report['graph_breaks']} graph break(s)")
    variants = [v for v in variants if v.name in runners]
    load = os.getloadavg()[0]
    log(f"timing {len(variants)} variants x {setup.rounds} rounds, interleaved "
        f"(load average {load:.1f} on {os.cpu_count()} cores) ...")
    if load > 0.5 and torch.get_num_threads() > 1:
        log("warning: other processes are running; with several threads every op waits for "
            "a descheduled thread and times blow up unevenly. --threads 1 gives stable ratios.")
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    recompiled: dict[str, int] = {v.name: 0 for v in variants}
    peaks: list[float] = []
    names = [v.name for v in variants]
    for r in range(setup.rounds):
        # a rotating order: no variant always runs first (cold caches) or last
        k = r % max(1, len(names))
        order = names[k:] + names[:k]
        for name in order:
            before = graphs_compiled()
            times[name].append(runners[name].timed_step())
            recompiled[name] += graphs_compiled() - before
        peaks.append(matmul_gflops(device=setup.device))
    peak_gflops = statistics.median(peaks)
    # MFU's denominator: on a GPU its dense peak for the dtype (a table by name), elsewhere
    # the fp32 matmul peak measured in the rounds
    device = torch.device(setup.device)
    named = peak_flops(device, setup.dtype) if device.type == "cuda" else None
    mfu_peak = named / 1e9 if named else peak_gflops
    mfu_peak_of = f"{gpu_peak_name(device, setup.dtype)} peak" if named else "measured fp32 matmul peak"

    rows, profiles = [], {}
    for v in variants:
        runner = runners[v.name]
        ms = statistics.median(times[v.name]) * 1000
        if setup.profile and not v.lever:
            profiles[v.name] = top_kernels(runner.step, runner.device)
        flops = train_flops(runner.model, setup.batch_size, setup.block_size, distinct)
        mem = runner.peak_bytes()
        rows.append({
            "variant": v.name, "model": v.model, "lever": v.lever, "base": v.base,
            "ms_per_step": round(ms, 1),
            "ms_all": [round(t * 1000, 1) for t in times[v.name]],
            "tokens_per_s": round(setup.batch_size * setup.block_size / ms * 1000),
            "useful_gflop": round(flops["total"] / 1e9, 2),
            "gflop_by_part": {k: round(f / 1e9, 2) for k, f in flops.items()},
            "mfu": round(flops["total"] / (ms / 1000) / (mfu_peak * 1e9), 4),
            "peak_mib": None if mem is None else round(mem / MiB, 1),
            "syncs_per_step": count_syncs(runner.step, runner.device),
            "params": sum(p.numel() for p in runner.params),
            **({"compile_s": round(compile_s[v.name], 1)} if v.name in compile_s else {}),
            **({"compile": {**warmups[v.name], "graphs_while_timing": recompiled[v.name]}}
               if v.name in warmups else {}),
        })
    return {"section": "speed", "setup": dataclasses.asdict(setup),
            "threads": torch.get_num_threads(), "load_average": [load, os.getloadavg()[0]],
            "distinct_tokens": distinct, "peak_gflops": round(peak_gflops, 1),
            "mfu_peak_gflops": round(mfu_peak, 1), "mfu_peak_of": mfu_peak_of,
            "peak_gflops_all": [round(p, 1) for p in peaks], "rows": rows, "dropped": dropped,
            "profiles": profiles,
            "ratios": _ratios(rows, times)}


def _ratios(rows: list[dict[str, Any]], times: dict[str, list[float]]) -> dict[str, Any]:
    """The headline ratios, and each lever row's time over its base's (set on the row)."""
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
    return ratios


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
        ms = f"{r['ms_per_step']:.1f}" if r["ms_per_step"] < 100 else f"{r['ms_per_step']:.0f}"
        lines.append(f"{r['variant']:<30}{ms:>9}{r['tokens_per_s']:>10,}"
                     f"{r['useful_gflop']:>8.1f}{r['mfu']:>7.0%}{mem:>10}{vs:>9}  {lever}")
    for r in result["rows"]:
        if r.get("syncs_per_step") is not None:
            lines.append(f"{r['variant']}: {r['syncs_per_step']} host synchronisation(s) a step")
    by_name = {r["variant"]: r for r in result["rows"]}
    for name, profile in result.get("profiles", {}).items():
        lines.append(format_top(name, by_name[name]["ms_per_step"], profile))
    for name, report in result.get("dropped", {}).items():
        lines.append(f"{name}: not timed, {report['status']} ({report['message']})")
    for r in result["rows"]:
        if r.get("compile", {}).get("graphs_while_timing"):
            lines.append(f"{r['variant']}: {r['compile']['graphs_while_timing']} graph(s) "
                         "compiled while timing (a recompile: its times include it)")
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
        lines.append(f"MFU (useful FLOPs / {result.get('mfu_peak_of', 'measured fp32 matmul peak')}"
                     f", {result.get('mfu_peak_gflops', result['peak_gflops']):,.0f} GFLOP/s): transformer "
                     f"{mfu['transformer']:.0%}, backpack {mfu['backpack']:.0%}"
                     + (f", nanogpt {mfu['nanogpt']:.0%}" if "nanogpt" in mfu else "")
                     + " (goal: transformer >= 70%)")
    lines.append("ratios are medians over rounds of times measured in the same round; "
                 "ms/step are medians; 'vs base': the variant's time over its base's (for a "
                 "lever switched off, the lever's speed-up)")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed",
                                description=__doc__.split("\n")[0])
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
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="autocast dtype as train.py uses it (float16: with a GradScaler, CUDA "
                   "only); default float32, float16 with --seed-config")
    p.add_argument("--seed-config", action="store_true",
                   help="the seed's GPU configuration: batch 32 x block 512, V 13,034, "
                   "dropout 0.1, float16 (for a GPU)")
    p.add_argument("--vocab", type=int, help="the vocabulary size of Zipf batches (default "
                   "16,000; 13,034 with --seed-config)")
    p.add_argument("--compile-all", action="store_true",
                   help="compile every variant, as train.py does on CUDA")
    p.add_argument("--compile-cap", type=float, default=0.0, metavar="SECONDS",
                   help="drop a compiled variant whose warm-up (its compilation) runs longer; "
                   "dynamo's recompile limit is always an error here (reported, not a silent "
                   "eager run)")
    p.add_argument("--budget", type=float, default=0.0, metavar="SECONDS",
                   help="variants whose warm-up would start after 5/6 of this are dropped "
                   "(named), so a run on a leased GPU ends in time with what it measured")
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile a few steps of each main row: the top kernels "
                   "and their share (on CUDA: kernel time; elsewhere CPU op time)")
    p.add_argument("--only", nargs="+", metavar="VARIANT", help="time only these variants")
    p.add_argument("--json", help="where to write the JSON (default outputs/bench/)")
    return p


def setup_and_variants(args: argparse.Namespace) -> tuple[SpeedSetup, list[Variant]]:
    """The measurement plan the flags ask for (UserError for a device or variant not here)."""
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device here; use --device cpu")
    preset = ("tiny" if args.tiny else "seed" if args.seed_config else "quick" if args.quick
              else "reference")
    setup = dataclasses.replace(SPEED_PRESETS[preset], data=args.data, device=args.device)
    if args.dtype:
        setup = dataclasses.replace(setup, dtype=args.dtype)
    if setup.dtype == "float16" and not setup.device.startswith("cuda"):
        raise UserError(f"--dtype float16 runs with a gradient scaler on CUDA only; on "
                        f"{setup.device} use --dtype bfloat16 or float32")
    if args.threads is not None:
        setup = dataclasses.replace(setup, threads=args.threads)
    if args.rounds:
        setup = dataclasses.replace(setup, rounds=args.rounds)
    if args.vocab is not None:
        if args.data == "europarl" or args.vocab < 2:
            raise UserError("--vocab sets the vocabulary of --data zipf or europarl-en (at "
                            "least 2); europarl batches bring their own")
        setup = dataclasses.replace(setup, vocab_size=args.vocab)
    if args.compile_cap < 0 or args.budget < 0:
        raise UserError("--compile-cap and --budget are seconds >= 0 (0: none)")
    setup = dataclasses.replace(setup, compile_all=args.compile_all,
                                compile_cap_s=args.compile_cap, profile=args.profile,
                                budget_s=args.budget)
    variants = MAIN if args.quick else MAIN + LEVERS
    if args.only:
        known = {v.name: v for v in MAIN + LEVERS}
        unknown = [n for n in args.only if n not in known]
        if unknown:
            raise UserError(f"unknown variant(s) {', '.join(unknown)}: use some of "
                            f"{', '.join(known)}")
        variants = [known[n] for n in args.only]
    return setup, variants


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        result = run_speed(*setup_and_variants(args))
    except UserError as exc:
        exit_on_user_error(exc)
    print(format_speed(result))
    print(f"wrote {write_json(result, args.json, 'speed')}")


if __name__ == "__main__":
    main()
