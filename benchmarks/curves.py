"""Do the speed levers keep the training loss curve? Short runs with and without them.

Three trainer runs of each model from the same weights on the same Europarl batches at the
seed's shape (AdamW 6e-4, 20 warm-up steps): ``levers`` (all on), ``plain`` (all off) and
``levers, dropout seed 2``: levers and plain agree when their last 50 steps' mean losses
differ by at most twice what the dropout seed moves them, or 0.02 nats.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from backpack_nb.errors import UserError
from backpack_nb.models import ModelConfig, build_model

from benchmarks.common import (TINY, Levers, Trainee, check_device, europarl_batches, new_parser,
                               run_main, seed_params)
from benchmarks.compile_guard import guarded_warmup, warmup_caps

TAIL = 50  # the steps whose mean loss the verdict compares
FLOOR_NATS = 0.02
RUNS = {"levers": (True, 1), "plain": (False, 1), "levers, dropout seed 2": (True, 2)}


@dataclasses.dataclass(frozen=True)
class CurveSetup:
    params: dict[str, Any]  # a params file's: the model shape, batch_size, dropout
    steps: int = 200
    lr: float = 6e-4
    warmup: int = 20
    device: str = "cuda"
    dtype: str = "float16"  # the seed's (its params file's)
    compile_cap_s: float = 0.0
    budget_s: float = 0.0  # runs stop starting past this (0: none)


def train_curve(model_type: str, setup: CurveSetup, batches: list[torch.Tensor], vocab: int,
                levers: bool, dropout_seed: int) -> dict[str, Any]:
    """The per-step training losses of one run (same initial weights for every run)."""
    torch.manual_seed(0)
    model = build_model(model_type, ModelConfig.from_params(setup.params, vocab))
    plain = Levers(optimizer="foreach", dedup=False, mixing="einsum", chunked=False)
    on = Levers(compile=True, fused_loss=True, distinct_on_host=True,
                optimizer="fused" if setup.device.startswith("cuda") else "foreach")
    trainee = Trainee(model, batches, setup.device, setup.dtype, on if levers else plain, setup.lr)
    torch.manual_seed(dropout_seed)  # the dropout masks from here on
    losses: list[float] = []

    def step() -> None:
        for group in trainee.opt.param_groups:
            group["lr"] = setup.lr * min(1.0, (len(losses) + 1) / setup.warmup)
        losses.append(trainee.step().item())

    t0 = time.perf_counter()
    first = guarded_warmup(step, 1, compiled=levers, cap_s=setup.compile_cap_s)
    if first["status"] != "ok":
        return {**first, "losses": []}  # with its seconds
    while len(losses) < setup.steps:
        step()
    return {"status": "ok", "losses": [round(v, 5) for v in losses],
            "seconds": round(time.perf_counter() - t0, 1), "first_step": first}


def verdict(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Levers against plain, measured against the dropout-seed yardstick (see the module)."""
    tails = {name: statistics.mean(r["losses"][-TAIL:]) for name, r in runs.items()
             if r["status"] == "ok" and r["losses"]}
    if len(tails) < 3:
        return {"agree": None, "why": "a run did not finish", "tail_means": tails}
    yardstick = abs(tails["levers"] - tails["levers, dropout seed 2"])
    difference, allowed = abs(tails["levers"] - tails["plain"]), max(2 * yardstick, FLOOR_NATS)
    return {"agree": difference <= allowed,
            "tail_means": {k: round(v, 4) for k, v in tails.items()},
            "levers_minus_plain": round(tails["levers"] - tails["plain"], 4),
            "dropout_seed_effect": round(yardstick, 4), "allowed": round(allowed, 4)}


def run_curves(models: Sequence[str], setup: CurveSetup) -> dict[str, Any]:
    p = setup.params
    batches, vocab = europarl_batches(p["batch_size"], p["block_size"], 64, seed=1)
    result: dict[str, Any] = {"section": "curves", "setup": dataclasses.asdict(setup),
                              "vocab_size": vocab, "models": {}}
    next_cap = warmup_caps(setup.compile_cap_s, setup.budget_s, least=10)
    for model_type in models:
        runs = {}
        for name, (levers, seed) in RUNS.items():
            if (cap := next_cap()) is None:
                runs[name] = {"status": "no time left", "losses": [], "seconds": 0}
                print(f"{model_type} {name}: not run, no time left in the --budget")
                continue
            r = runs[name] = train_curve(model_type, dataclasses.replace(setup, compile_cap_s=cap),
                                         batches, vocab, levers, seed)
            losses = r["losses"] or [float("nan")]
            print(f"{model_type} {name}: {r['status']}, first loss {losses[0]:.3f}, last-{TAIL} "
                  f"mean {statistics.mean(losses[-TAIL:]):.4f} ({r['seconds']} s)", flush=True)
        result["models"][model_type] = {"runs": runs, "verdict": verdict(runs)}
    return result


def format_curves(result: dict[str, Any]) -> str:
    s = result["setup"]
    lines = [f"loss curves, {s['steps']} steps, Europarl (V {result['vocab_size']:,}), "
             f"{s['device']} {s['dtype']}: mean loss of the last {TAIL} steps"]
    for model_type, entry in result["models"].items():
        v = entry["verdict"]
        if v["agree"] is None:
            lines.append(f"  {model_type}: {v['why']}")
            continue
        t = v["tail_means"]
        lines.append(f"  {model_type}: levers {t['levers']:.4f}, plain {t['plain']:.4f} "
                     f"(difference {v['levers_minus_plain']:+.4f}); another dropout seed moves "
                     f"it {v['dropout_seed_effect']:.4f}, so up to {v['allowed']:.4f} is noise: "
                     f"{'agree' if v['agree'] else 'DIFFER'}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = new_parser("curves", __doc__, device="cuda (default) or cpu", dtype="autocast dtype "
                   "(default the seed's float16; float32 with --tiny)", compile_cap="a run whose "
                   "first step (its compilation) takes longer is dropped",
                   budget="runs stop starting when this is spent (0: no limit)")
    add = p.add_argument
    add("--models", nargs="+", choices=(both := ["backpack", "transformer"]), default=both)
    add("--steps", type=int, help="steps per run (default 200; 60 with --tiny)")
    add("--tiny", action="store_true", help="a tiny shape on the CPU, for tests")
    return p


def setup_of(args: argparse.Namespace) -> CurveSetup:
    """The plan the flags ask for (UserError for one this machine cannot run)."""
    seed = seed_params()
    setup = (CurveSetup({**seed, **TINY}, steps=60, lr=3e-3, warmup=4, device="cpu",
                        dtype="float32") if args.tiny else CurveSetup(seed, dtype=seed["dtype"]))
    changes = {k: v for k, v in (("steps", args.steps), ("device", args.device),
                                 ("dtype", args.dtype)) if v is not None}
    setup = dataclasses.replace(setup, compile_cap_s=args.compile_cap, budget_s=args.budget,
                                **changes)
    if setup.steps < TAIL:
        raise UserError(f"--steps {setup.steps}: the verdict needs at least {TAIL}")
    check_device(setup.device, setup.dtype, args.compile_cap, args.budget)
    return setup


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    run_main(lambda: run_curves(args.models, setup_of(args)), format_curves, args.json, "curves")


if __name__ == "__main__":
    main()
