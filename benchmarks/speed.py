"""Training-step time, MFU and the headline ratios, measured within one run.

Trainer steps of the Backpack, the Transformer and a nanoGPT-style GPT interleaved round by
round beside a float32 matmul peak (MFU's denominator on the CPU; on CUDA the GPU's peak for
the dtype): the seed's shape at block 256, batch 4, V 16,000, dropout 0, and a row per lever.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from backpack_nb.errors import UserError
from backpack_nb.models import ModelConfig, build_model
from backpack_nb.models.flops import train_flops
from backpack_nb.training.meters import gpu_peak_name, peak_flops

from benchmarks.common import (TINY, Levers, MiB, Trainee, check_device, europarl_batches,
                               matmul_gflops, new_parser, run_main, seed_params, timed,
                               zipf_batches)
from benchmarks.compile_guard import (drop_compiled_state, graphs_compiled, guarded_warmup,
                                      recompile_limit_at_least, warmup_caps)
from benchmarks.nanogpt import NanoGPT


@dataclasses.dataclass(frozen=True)
class Variant(Levers):
    """One timed training setup: a model and the performance switches it runs with."""

    name: str
    model: str  # "backpack", "transformer", "nanogpt" or "backpack-table"
    lever: str = ""  # what this row isolates ("" for the three main rows)
    base: str = ""  # the row it is compared with


def _pair(lever: str, what: str, **switches: Any) -> list[Variant]:  # a row for each model
    return [Variant(f"{m}/{lever}", m, what, m, **switches) for m in ("backpack", "transformer")]


MAIN = [Variant(m, m) for m in ("backpack", "transformer", "nanogpt")]
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
    """``reference`` (the CPU plan), ``quick``, ``seed`` (its training, for a GPU) or ``tiny``."""
    seed = seed_params()
    if name == "seed":  # its batch 32 x 512, dropout 0.1 and float16, at the sample's V
        return SpeedSetup(seed, vocab_size=13_034, dtype=seed["dtype"], rounds=5)
    cpu = {**seed, "block_size": 256, "batch_size": 4, "dropout": 0.0}
    if name == "tiny":
        return SpeedSetup({**cpu, **TINY, "n_embd": 64}, vocab_size=512, rounds=2, threads=1)
    return SpeedSetup(cpu, rounds=3 if name == "quick" else 7)


class _Runner(Trainee):
    """The model of one :class:`Variant`, trained with its switches."""

    def __init__(self, variant: Variant, setup: SpeedSetup, batches: list[torch.Tensor]):
        torch.manual_seed(0)
        config = setup.model_config(variant.model)
        model = (NanoGPT(config) if variant.model == "nanogpt" else
                 build_model("backpack" if variant.model.startswith("backpack") else
                             "transformer", config))
        super().__init__(model, batches, setup.device, setup.dtype,
                         dataclasses.replace(variant, compile=variant.compile or setup.compile_all))
        self.compile_report: dict[str, Any] = {}  # its warm-up's, for a compiled variant

    def timed_step(self) -> float:
        return timed(self.step, self.device)[0]

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
    try:  # dynamo's recompile limit counts per code object: 8 serve one model, not a dozen
        with recompile_limit_at_least(8 * len(variants)):
            return _run_speed(setup, variants, log)
    finally:
        torch.set_num_threads(threads_before)


def _batches(setup: SpeedSetup) -> tuple[list[torch.Tensor], SpeedSetup]:
    """The batches of ``setup.data``, and the setup with the vocabulary they need."""
    B, T = setup.params["batch_size"], setup.params["block_size"]
    if setup.data == "zipf":
        return zipf_batches(setup.vocab_size, B, T, 4), setup
    en = setup.data == "europarl-en"  # English keeps the reference V (ids fit: V_en < V)
    batches, vocab = europarl_batches(B, T, 4, langs=("en",) if en else ("en", "fr"))
    return batches, dataclasses.replace(setup, vocab_size=max(vocab, setup.vocab_size) if en
                                        else vocab)


def _warm_up(setup: SpeedSetup, variants: Sequence[Variant], batches: list[torch.Tensor],
             log: Callable[[str], Any]) -> tuple[dict[str, _Runner], dict[str, dict]]:
    """A runner per variant, warmed up (compiled: every batch, guarded); those dropped, why."""
    runners, dropped = {}, {}
    # a sixth of the budget kept for timing, profiling and memory
    next_cap = warmup_caps(setup.compile_cap_s, setup.budget_s, share=5 / 6)
    for v in variants:
        if (cap := next_cap()) is None:
            dropped[v.name] = {"status": "no time left",
                               "message": "the --budget ran out before its warm-up"}
            log(f"{v.name}: dropped, no time left in the --budget")
            continue
        runner = _Runner(v, setup, batches)
        report = guarded_warmup(runner.step, len(batches) if runner.compiled else 1,
                                compiled=runner.compiled, cap_s=cap)
        if report["status"] != "ok":
            log(f"{v.name}: dropped, {report['status']} ({report['message']})")
            dropped[v.name] = report
            del runner
            drop_compiled_state()  # the next variant starts clean
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
    recompiled, peaks = dict.fromkeys(names, 0), []
    for r in range(setup.rounds):
        k = r % max(1, len(names))  # a rotating order: none always first (cold) or last
        for name in names[k:] + names[:k]:
            before = graphs_compiled()
            times[name].append(runners[name].timed_step())
            recompiled[name] += graphs_compiled() - before
        peaks.append(matmul_gflops(device=setup.device))
    peak_gflops, device = statistics.median(peaks), torch.device(setup.device)
    # MFU's denominator: a GPU's dense peak for the dtype (by name), else the measured fp32 peak
    named = peak_flops(device, setup.dtype) if device.type == "cuda" else None
    mfu_peak, peak_of = ((named / 1e9, f"{gpu_peak_name(device, setup.dtype)} peak") if named
                         else (peak_gflops, "measured fp32 matmul peak"))
    B, T = setup.params["batch_size"], setup.params["block_size"]
    rows = []
    for v in (v for v in variants if v.name in runners):
        runner, ms = runners[v.name], statistics.median(times[v.name]) * 1000
        flops, mem = train_flops(runner.model, B, T, distinct)["total"], runner.peak_bytes()
        rows.append({
            "variant": v.name, "model": v.model, "lever": v.lever, "base": v.base,
            "ms_per_step": round(ms, 1), "ms_all": [round(t * 1000, 1) for t in times[v.name]],
            "tokens_per_s": round(B * T / ms * 1000),
            "useful_gflop": round(flops / 1e9, 2),
            "mfu": round(flops / (ms / 1000) / (mfu_peak * 1e9), 4),
            "peak_mib": None if mem is None else round(mem / MiB, 1),
            "syncs_per_step": runner.count_syncs(),
            "params": sum(p.numel() for p in runner.model.parameters()),
            **({"compile": {**runner.compile_report, "graphs_while_timing": recompiled[v.name]}}
               if runner.compiled else {}),
        })
    return {"section": "speed", "setup": setup.describe(), "threads": torch.get_num_threads(),
            "load_average": [load, os.getloadavg()[0]], "distinct_tokens": distinct,
            "torch": torch.__version__, "peak_gflops": round(peak_gflops, 1),
            "mfu_peak_gflops": round(mfu_peak, 1), "mfu_peak_of": peak_of,
            "peak_gflops_all": [round(p, 1) for p in peaks], "rows": rows, "dropped": dropped,
            "ratios": _ratios(rows, times)}


def _ratios(rows: list[dict[str, Any]], times: dict[str, list[float]]) -> dict[str, Any]:
    """The headline ratios, and each lever row's time over its base's (set on the row)."""
    by_name = {row["variant"]: row for row in rows}

    def paired(a: str, b: str) -> float | None:  # the median of per-round ratios
        return (round(statistics.median(x / y for x, y in zip(times[a], times[b])), 3)
                if a in times and b in times else None)

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
    s, q, load = result["setup"], result["ratios"], result["load_average"]
    head = (f"{'variant':<30}{'ms/step':>9}{'tokens/s':>10}{'GFLOP':>8}{'MFU':>7}"
            f"{'peak MiB':>10}{'vs base':>9}  lever")
    lines = [f"config: {s['n_layer']}L/{s['n_head']}H/d{s['n_embd']}/k{s['n_senses']}, "
             f"block {s['block_size']}, batch {s['batch_size']}, V {s['vocab_size']:,}, "
             f"{s['data']} batches ({result['distinct_tokens']:.0f} distinct tokens a batch); "
             f"{result['threads']} threads; matmul peak {result['peak_gflops']:.0f} GFLOP/s "
             f"(fp32, measured each round, median); load average {load[0]:.1f} -> {load[1]:.1f}",
             head, "-" * len(head)]
    for r in result["rows"]:
        c, ms = r.get("compile"), r["ms_per_step"]
        mem = "-" if r["peak_mib"] is None else f"{r['peak_mib']:,.0f}"
        vs = f"{r['time_vs_base']:.2f}x" if r.get("time_vs_base") else ""
        lever = r["lever"] + (f" (compiled in {c['seconds']:.0f} s)" if c else "")
        lines.append(f"{r['variant']:<30}{ms:>9.{1 if ms < 100 else 0}f}{r['tokens_per_s']:>10,}"
                     f"{r['useful_gflop']:>8.1f}{r['mfu']:>7.0%}{mem:>10}{vs:>9}  {lever}")
        if r.get("syncs_per_step") is not None:
            lines.append(f"  {r['syncs_per_step']} host synchronisation(s) a step")
        if c and c.get("graphs_while_timing"):
            lines.append(f"  {c['graphs_while_timing']} graph(s) compiled while timing "
                         "(a recompile: its times include it)")
    lines += [f"{name}: not timed, {d['status']} ({d['message']})"
              for name, d in result.get("dropped", {}).items()] + [""]
    met = {True: "met", False: "MISSED"}
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
        "speed", __doc__, device="cpu, or cuda", threads="torch threads (default torch's; 1 with "
        "--tiny)", dtype="autocast dtype (float16: CUDA only); default float32, the seed's with "
        "--seed-config", compile_cap="drop a compiled variant whose warm-up takes longer",
        budget="variants whose warm-up would start after 5/6 of this are dropped (named)")
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
    given = {field: getattr(args, flag) for flag, field in (
        ("dtype", "dtype"), ("threads", "threads"), ("rounds", "rounds"), ("vocab", "vocab_size"))
        if getattr(args, flag) is not None}
    setup = dataclasses.replace(setup, data=args.data, device=args.device, budget_s=args.budget,
                                compile_all=args.compile_all, compile_cap_s=args.compile_cap,
                                **given)
    check_device(setup.device, setup.dtype, args.compile_cap, args.budget)
    if args.vocab is not None and (args.data == "europarl" or args.vocab < 2):
        raise UserError("--vocab sets the vocabulary of --data zipf or europarl-en (at "
                        "least 2); europarl batches bring their own")
    if not args.only:
        return setup, MAIN if args.quick else MAIN + LEVERS
    known = {v.name: v for v in MAIN + LEVERS}
    if unknown := [n for n in args.only if n not in known]:
        raise UserError(f"unknown variant(s) {', '.join(unknown)}: use some of {', '.join(known)}")
    return setup, [known[n] for n in args.only]


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    run_main(lambda: run_speed(*setup_and_variants(args)), format_speed, args.json, "speed")


if __name__ == "__main__":
    main()
