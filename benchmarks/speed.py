"""Training-step time, MFU and the headline ratios, measured within one run.

Times training steps (:func:`backpack_nb.training.step.optimizer_step`) of the Backpack, the
Transformer and a nanoGPT-style GPT of the same architecture (:mod:`benchmarks.nanogpt`),
interleaved round by round, beside a float32 matmul peak measured in the same rounds (MFU's
denominator on the CPU; on CUDA the GPU's peak for the dtype): the seed's shape at block 256,
batch 4, V 16,000, dropout 0, and without ``--quick`` a row per performance lever.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from backpack_nb import optim
from backpack_nb.devices import autocast
from backpack_nb.errors import UserError
from backpack_nb.models import BackpackLM, ModelConfig, build_model
from backpack_nb.models.flops import train_flops
from backpack_nb.models.mixing import distinct_tokens
from backpack_nb.training.meters import gpu_peak_name, peak_flops
from backpack_nb.training.step import optimizer_step

from benchmarks.common import (TINY, MiB, check_device, europarl_batches, matmul_gflops, new_parser,
                               run_main, seed_params, sync, zipf_batches)
from benchmarks.compile_guard import (drop_compiled_state, graphs_compiled, guarded_warmup,
                                      recompile_limit_at_least)
from benchmarks.nanogpt import NanoGPT


@dataclasses.dataclass(frozen=True)
class Variant:
    """One timed training setup: a model and the performance switches it runs with."""

    name: str
    model: str  # "backpack", "transformer", "nanogpt" or "backpack-table"
    lever: str = ""  # what this row isolates ("" for the three main rows)
    base: str = ""  # the row it is compared with
    dedup: bool = True
    mixing: str = "sdpa"
    chunked: bool = True
    optimizer: str = "fused"  # "fused" or "foreach" AdamW, or "sparse" (table only)
    compile: bool = False
    checkpointing: bool = False
    fused_loss: bool = False  # off by default: its row is the lever switched on
    distinct_on_host: bool = False  # likewise (Backpack): distinct tokens found on the host


def _pair(lever: str, what: str, **switches: Any) -> list[Variant]:  # a row for each model
    return [Variant(f"{m}/{lever}", m, what, m, **switches) for m in ("backpack", "transformer")]


MAIN = [Variant("backpack", "backpack"), Variant("transformer", "transformer"),
        Variant("nanogpt", "nanogpt")]
LEVERS = [
    Variant("backpack/plain", "backpack", "all levers off (straightforward)", "backpack",
            dedup=False, chunked=False, optimizer="foreach"),
    Variant("transformer/plain", "transformer", "all levers off (straightforward)",
            "transformer", chunked=False, optimizer="foreach"),
    Variant("backpack/per-position-senses", "backpack", "senses once per distinct token",
            "backpack", dedup=False),
    Variant("backpack/einsum-mixing", "backpack", "mixing: SDPA instead of einsum", "backpack",
            mixing="einsum"),
    *_pair("full-logits", "chunked CE, grads in forward", chunked=False),
    *_pair("foreach-adamw", "fused AdamW", optimizer="foreach"),
    *_pair("compiled", "torch.compile", compile=True),
    *_pair("checkpointed", "activation checkpointing (cost)", checkpointing=True),
    *_pair("fused-loss", "fused loss chunks (on; off by default)", fused_loss=True),
    Variant("backpack/distinct-on-host", "backpack",
            "distinct tokens on the host (on; off by default)", "backpack", distinct_on_host=True),
    Variant("backpack-table/dense", "backpack-table", "sense table, dense AdamW", "backpack"),
    Variant("backpack-table/sparse", "backpack-table", "sense table, sparse updates",
            "backpack-table/dense", optimizer="sparse"),
]


@dataclasses.dataclass(frozen=True)
class SpeedSetup:
    """The plan: a params file's values (shape, batch, dropout) at ``vocab_size``, and timing."""

    params: dict[str, Any]
    vocab_size: int = 16_000
    rounds: int = 7
    data: str = "zipf"  # or "europarl", "europarl-en"
    device: str = "cpu"
    threads: int = 0  # 0: torch's default
    dtype: str = "float32"  # autocast dtype; float16 adds a GradScaler (CUDA only)
    compile_all: bool = False  # every variant compiled, as train.py runs on CUDA
    compile_cap_s: float = 0.0  # a compiled variant's warm-up past this is dropped (0: none)
    budget_s: float = 0.0  # warm-ups stop starting past this (0: none), leaving time to time

    def model_config(self, model: str = "backpack") -> ModelConfig:
        source = "table" if model == "backpack-table" else "network"
        return ModelConfig.from_params({**self.params, "sense_source": source}, self.vocab_size)

    def describe(self) -> dict[str, Any]:  # as JSON: the shape's keys beside the rest
        return {**self.model_config().to_dict(), "batch_size": self.params["batch_size"],
                **{k: v for k, v in dataclasses.asdict(self).items() if k != "params"}}


def preset(name: str) -> SpeedSetup:
    """``reference`` (the CPU plan), ``quick``, ``seed`` (the seed's own training, for a GPU)
    or ``tiny`` (seconds, for tests: the code paths, not the numbers)."""
    seed = seed_params()
    if name == "seed":  # its batch 32 x 512, dropout 0.1 and float16, at the sample's V
        return SpeedSetup(seed, vocab_size=13_034, dtype=seed["dtype"], rounds=5)
    cpu = {**seed, "block_size": 256, "batch_size": 4, "dropout": 0.0}
    if name == "tiny":
        return SpeedSetup({**cpu, **TINY, "n_embd": 64}, vocab_size=512, rounds=2, threads=1)
    return SpeedSetup(cpu, rounds=3 if name == "quick" else 7)


class _Runner:
    """A model, its optimizer and its training step, for one :class:`Variant`."""

    def __init__(self, variant: Variant, setup: SpeedSetup, batches: list[torch.Tensor]):
        self.variant, self.device = variant, torch.device(setup.device)
        # x on the host (its distinct tokens are found there, as the trainer does) and
        # (x, y) contiguous on the device, as a data loader delivers them
        self.host_x = [b[:, :-1].contiguous() for b in batches]
        self.batches = [(x.to(self.device), b[:, 1:].contiguous().to(self.device))
                        for x, b in zip(self.host_x, batches)]
        torch.manual_seed(0)
        config = setup.model_config(variant.model)
        model = (NanoGPT(config) if variant.model == "nanogpt" else
                 build_model("backpack" if variant.model.startswith("backpack") else
                             "transformer", config))
        if isinstance(model, BackpackLM):
            model.dedup_senses, model.mixing = variant.dedup, variant.mixing
        if variant.checkpointing:
            model.set_activation_checkpointing(True)
        model.fused_loss = variant.fused_loss
        self.model = model.to(self.device).train()
        self.opt = optim.make_optimizer(model, lr=1e-4, fused=variant.optimizer == "fused",
                                        sparse_table=variant.optimizer == "sparse")
        self.compiled = variant.compile or setup.compile_all
        self.compile_report: dict[str, Any] = {}  # its warm-up's, for a compiled variant
        self.forward = torch.compile(model) if self.compiled else model
        self.kwargs = {} if variant.model == "nanogpt" else {"chunked_loss": variant.chunked}
        self.autocast = functools.partial(autocast, self.device, setup.dtype)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=setup.dtype == "float16")
        self.i = 0

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        i, self.i = self.i % len(self.batches), self.i + 1
        if not self.variant.distinct_on_host:
            return *self.batches[i], self.kwargs
        distinct = tuple(t.to(self.device) for t in distinct_tokens(self.host_x[i]))
        return *self.batches[i], {**self.kwargs, "distinct": distinct}

    def step(self) -> None:
        optimizer_step(self.forward, self.opt, self.scaler, self._next_batch,
                       autocast=self.autocast, params=self.model.parameters)

    def timed_step(self) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        self.step()
        sync(self.device)
        return time.perf_counter() - t0

    def peak_bytes(self) -> int | None:  # CUDA's allocator peak over a step (else None)
        if self.device.type != "cuda":
            return None
        torch.cuda.reset_peak_memory_stats()
        self.timed_step()
        return torch.cuda.max_memory_allocated()

    def count_syncs(self) -> int | None:
        """Host-synchronising CUDA calls in one step (``torch.unique``, ``.item()``...)."""
        if self.device.type != "cuda":
            return None
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                self.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message).lower() for w in caught)


def run_speed(setup: SpeedSetup, variants: Sequence[Variant], *,
              log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Time ``variants`` interleaved (each round runs each once, in a rotating order, plus a
    matmul peak): ms/step, tokens/s, useful FLOPs, MFU, (CUDA) peak memory and syncs a step."""
    threads_before = torch.get_num_threads()
    torch.set_num_threads(setup.threads or threads_before)
    # Variants share the models' code (forward), and dynamo's recompile limit counts the
    # compilations of one code object: 8 serve one model, not a dozen variants of it.
    try:
        with recompile_limit_at_least(8 * len(variants)):
            return _run_speed(setup, variants, log)
    finally:
        torch.set_num_threads(threads_before)


def _batches(setup: SpeedSetup) -> tuple[list[torch.Tensor], SpeedSetup]:
    """The batches of ``setup.data``, and the setup with the vocabulary they need."""
    B, T = setup.params["batch_size"], setup.params["block_size"]
    if setup.data == "zipf":
        return zipf_batches(setup.vocab_size, B, T, 4), setup
    # English windows keep the reference V (the ids fit: V_en < V); en+fr its compact V
    langs = ("en",) if setup.data == "europarl-en" else ("en", "fr")
    batches, vocab = europarl_batches(B, T, 4, langs=langs)
    vocab = max(vocab, setup.vocab_size) if setup.data == "europarl-en" else vocab
    return batches, dataclasses.replace(setup, vocab_size=vocab)


def _warm_up(setup: SpeedSetup, variants: Sequence[Variant], batches: list[torch.Tensor],
             log: Callable[[str], Any]) -> tuple[dict[str, _Runner], dict[str, dict]]:
    """A runner per variant, warmed up (a compiled one sees every batch, under a cap, with
    dynamo's recompile limit an error); the variants dropped, with why."""
    runners, dropped, t_start = {}, {}, time.perf_counter()
    for v in variants:
        cap = setup.compile_cap_s
        if setup.budget_s:  # keep a sixth of the budget for timing, profiling and memory
            left = setup.budget_s * 5 / 6 - (time.perf_counter() - t_start)
            if left < 5:
                dropped[v.name] = {"status": "no time left",
                                   "message": "the --budget ran out before its warm-up"}
                log(f"{v.name}: dropped, no time left in the --budget")
                continue
            cap = min(cap, left) if cap else left
        runner = _Runner(v, setup, batches)
        report = guarded_warmup(runner.step, len(batches) if runner.compiled else 1,
                                compiled=runner.compiled, cap_s=cap)
        if report["status"] != "ok":
            log(f"{v.name}: dropped, {report['status']} ({report['message']})")
            dropped[v.name] = report
            del runner
            drop_compiled_state()
            continue
        runners[v.name] = runner
        if runner.compiled:
            runner.compile_report = report
            log(f"{v.name}: compiled in {report['seconds']:.0f} s, {report['graphs']} graph(s), "
                f"{report['graph_breaks']} graph break(s)")
    return runners, dropped


def _run_speed(setup: SpeedSetup, variants: Sequence[Variant],
               log: Callable[[str], Any]) -> dict[str, Any]:
    batches, setup = _batches(setup)
    distinct = statistics.mean(len(torch.unique(b[:, :-1])) for b in batches)
    log(f"{setup.data} batches ({distinct:.0f} distinct tokens each), V {setup.vocab_size:,}, "
        f"{setup.device} {setup.dtype}, {torch.get_num_threads()} threads")
    runners, dropped = _warm_up(setup, variants, batches, log)
    names = [v.name for v in variants if v.name in runners]
    load = os.getloadavg()[0]
    log(f"timing {len(names)} variants x {setup.rounds} rounds, interleaved (load average "
        f"{load:.1f} on {os.cpu_count()} cores; on a busy machine --threads 1 keeps ratios stable)")
    times: dict[str, list[float]] = {n: [] for n in names}
    recompiled = dict.fromkeys(names, 0)
    peaks: list[float] = []
    for r in range(setup.rounds):
        k = r % max(1, len(names))  # a rotating order: none always first (cold) or last
        for name in names[k:] + names[:k]:
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
    B, T = setup.params["batch_size"], setup.params["block_size"]
    rows = []
    for v in (v for v in variants if v.name in runners):
        runner = runners[v.name]
        ms = statistics.median(times[v.name]) * 1000
        flops = train_flops(runner.model, B, T, distinct)
        mem = runner.peak_bytes()
        rows.append({
            "variant": v.name, "model": v.model, "lever": v.lever, "base": v.base,
            "ms_per_step": round(ms, 1), "ms_all": [round(t * 1000, 1) for t in times[v.name]],
            "tokens_per_s": round(B * T / ms * 1000),
            "useful_gflop": round(flops["total"] / 1e9, 2),
            "mfu": round(flops["total"] / (ms / 1000) / (mfu_peak * 1e9), 4),
            "peak_mib": None if mem is None else round(mem / MiB, 1),
            "syncs_per_step": runner.count_syncs(),
            "params": sum(p.numel() for p in runner.model.parameters()),
            **({"compile": {**runner.compile_report, "graphs_while_timing": recompiled[v.name]}}
               if runner.compiled else {}),
        })
    return {"section": "speed", "setup": setup.describe(), "threads": torch.get_num_threads(),
            "load_average": [load, os.getloadavg()[0]], "distinct_tokens": distinct,
            "torch": torch.__version__,
            "peak_gflops": round(peak_gflops, 1), "mfu_peak_gflops": round(mfu_peak, 1),
            "mfu_peak_of": (f"{gpu_peak_name(device, setup.dtype)} peak" if named
                            else "measured fp32 matmul peak"),
            "peak_gflops_all": [round(p, 1) for p in peaks], "rows": rows, "dropped": dropped,
            "ratios": _ratios(rows, times)}


def _ratios(rows: list[dict[str, Any]], times: dict[str, list[float]]) -> dict[str, Any]:
    """The headline ratios, and each lever row's time over its base's (set on the row)."""
    by_name = {row["variant"]: row for row in rows}

    def paired(a: str, b: str) -> float | None:  # the median of per-round ratios
        if a not in times or b not in times:
            return None
        return round(statistics.median(x / y for x, y in zip(times[a], times[b])), 3)

    ratios: dict[str, Any] = {}
    if "backpack" in by_name and "transformer" in by_name:
        ratio = ratios["backpack_over_transformer"] = paired("backpack", "transformer")
        floor = ratios["flop_floor"] = round(by_name["backpack"]["useful_gflop"]
                                             / by_name["transformer"]["useful_gflop"], 3)
        ratios["over_floor"] = round(ratio / floor, 3)
    if "transformer" in by_name and "nanogpt" in by_name:
        ratios["transformer_over_nanogpt"] = paired("transformer", "nanogpt")
    for row in rows:
        if row["base"]:
            row["time_vs_base"] = paired(row["variant"], row["base"])
    return ratios


def format_speed(result: dict[str, Any]) -> str:
    s, q = result["setup"], result["ratios"]
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
        ms = f"{r['ms_per_step']:.1f}" if r["ms_per_step"] < 100 else f"{r['ms_per_step']:.0f}"
        c = r.get("compile")
        lever = r["lever"] + (f" (compiled in {c['seconds']:.0f} s)" if c else "")
        lines.append(f"{r['variant']:<30}{ms:>9}{r['tokens_per_s']:>10,}"
                     f"{r['useful_gflop']:>8.1f}{r['mfu']:>7.0%}{mem:>10}{vs:>9}  {lever}")
        if r.get("syncs_per_step") is not None:
            lines.append(f"  {r['syncs_per_step']} host synchronisation(s) a step")
        if c and c.get("graphs_while_timing"):
            lines.append(f"  {c['graphs_while_timing']} graph(s) compiled while timing "
                         "(a recompile: its times include it)")
    for name, report in result.get("dropped", {}).items():
        lines.append(f"{name}: not timed, {report['status']} ({report['message']})")
    met = {True: "met", False: "MISSED"}
    lines.append("")
    if "backpack_over_transformer" in q:
        lines.append(f"Backpack / Transformer step time: {q['backpack_over_transformer']:.2f} "
                     f"(FLOP floor {q['flop_floor']:.2f}, so {q['over_floor']:.2f}x the floor; "
                     f"goal <= 1.10x: {met[q['over_floor'] <= 1.10]})")
    if "transformer_over_nanogpt" in q:
        lines.append(f"Transformer / nanoGPT-style step time: {q['transformer_over_nanogpt']:.2f} "
                     f"(goal <= 1.00: {met[q['transformer_over_nanogpt'] <= 1.0]})")
    mfu = [f"{r['variant']} {r['mfu']:.1%}" for r in result["rows"] if not r["lever"]]
    if mfu:
        lines.append(f"MFU (useful FLOPs / {result['mfu_peak_of']}, "
                     f"{result['mfu_peak_gflops']:,.0f} GFLOP/s): {', '.join(mfu)} (goal on a "
                     "GPU at the seed's shape: transformer >= 30%)")
    lines.append("ratios: medians over rounds of times of the same round; ms/step: medians; "
                 "'vs base': the variant's time over its base's")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = new_parser(
        "speed", __doc__, device="cpu, or cuda", threads="torch threads (default: torch's; 1 "
        "with --tiny)", dtype="autocast dtype (float16: with a GradScaler, CUDA only); default "
        "float32, the seed's with --seed-config", compile_cap="drop a compiled variant whose "
        "warm-up takes longer (dynamo's recompile limit is always an error)", budget="variants "
        "whose warm-up would start after 5/6 of this are dropped (named)")
    p.set_defaults(device="cpu")
    add = p.add_argument
    add("--quick", action="store_true", help="the three main models, 3 rounds (minutes)")
    add("--tiny", action="store_true", help="a tiny shape, for tests (seconds)")
    add("--rounds", type=int, help="timed rounds (default 7; 3 with --quick)")
    add("--data", choices=["zipf", "europarl", "europarl-en"], default="zipf",
        help="token batches: Zipf(1) over V (about 550 distinct a batch, like en+fr "
        "Europarl), the en+fr sample (its compact V), or English only (about 450 distinct)")
    add("--seed-config", action="store_true", help="the seed's training (batch 32 x 512, "
        "dropout 0.1, float16) at V 13,034, for a GPU")
    add("--vocab", type=int, help="V of Zipf batches (default 16,000; 13,034 with --seed-config)")
    add("--compile-all", action="store_true", help="compile every variant, as train.py on CUDA")
    add("--only", nargs="+", metavar="VARIANT", help="time only these variants")
    return p


def setup_and_variants(args: argparse.Namespace) -> tuple[SpeedSetup, list[Variant]]:
    """The measurement plan the flags ask for (UserError for a device or variant not here)."""
    setup = preset("tiny" if args.tiny else "seed" if args.seed_config else
                   "quick" if args.quick else "reference")
    changes: dict[str, Any] = {"data": args.data, "device": args.device,
                               "compile_all": args.compile_all,
                               "compile_cap_s": args.compile_cap, "budget_s": args.budget}
    for flag, field in (("dtype", "dtype"), ("threads", "threads"), ("rounds", "rounds"),
                        ("vocab", "vocab_size")):
        if getattr(args, flag) is not None:
            changes[field] = getattr(args, flag)
    setup = dataclasses.replace(setup, **changes)
    check_device(setup.device, setup.dtype, args.compile_cap, args.budget)
    if args.vocab is not None and (args.data == "europarl" or args.vocab < 2):
        raise UserError("--vocab sets the vocabulary of --data zipf or europarl-en (at "
                        "least 2); europarl batches bring their own")
    if not args.only:
        return setup, MAIN if args.quick else MAIN + LEVERS
    known = {v.name: v for v in MAIN + LEVERS}
    unknown = [n for n in args.only if n not in known]
    if unknown:
        raise UserError(f"unknown variant(s) {', '.join(unknown)}: use some of "
                        f"{', '.join(known)}")
    return setup, [known[n] for n in args.only]


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    run_main(lambda: run_speed(*setup_and_variants(args)), format_speed, args.json, "speed")


if __name__ == "__main__":
    main()
