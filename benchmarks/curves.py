"""Do the speed levers keep the training loss curve? Short runs with and without them.

    python -m benchmarks.curves [--models backpack transformer] [--steps 200] [--device cuda]
        [--dtype float16] [--tiny] [--json PATH]

For each model it trains three runs from the same initial weights on the same sequence of
real Europarl batches (the prepared sample, its compact vocabulary), at the seed's shape
and batch (32 x 512, dropout 0.1, AdamW at a constant 6e-4 after a 20-step warm-up):

- ``levers``: every speed lever on (torch.compile, the chunked loss, senses once per
  distinct token found on the host, the fused loss chunks, the default mixing kernel);
- ``plain``: every lever off (eager, full logits and ``F.cross_entropy``, senses per
  position, SDPA / einsum mixing);
- ``levers, dropout seed 2``: the first run with other dropout masks: the yardstick.

The runs draw different dropout masks (compiled kernels draw their own), so their losses
never match step for step. The verdict compares the mean loss over the last 50 steps:
levers and plain agree when they differ by at most twice what changing only the dropout
seed moves it, or by 0.02 nats, whichever is larger. A lever that biased training would
shift its curve beyond that.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from backpack_nb.errors import UserError, exit_on_user_error
from backpack_nb.models import BackpackLM, ModelConfig, build_model
from backpack_nb.models.mixing import distinct_tokens

from benchmarks.batches import europarl_batches
from benchmarks.common import amp_step, write_json
from benchmarks.compile_guard import guarded_warmup

TAIL = 50  # the steps whose mean loss the verdict compares
FLOOR_NATS = 0.02


@dataclasses.dataclass(frozen=True)
class CurveSetup:
    steps: int = 200
    batch_size: int = 32
    block_size: int = 512
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    n_senses: int = 16
    dropout: float = 0.1
    lr: float = 6e-4
    warmup: int = 20
    device: str = "cuda"
    dtype: str = "float16"
    compile_cap_s: float = 0.0
    budget_s: float = 0.0  # runs stop starting past this (0: none)


TINY = CurveSetup(steps=60, batch_size=2, block_size=32, n_layer=2, n_head=2, n_embd=32,
                  n_senses=4, lr=3e-3, warmup=4, device="cpu", dtype="float32")

RUNS = {"levers": (True, 1), "plain": (False, 1), "levers, dropout seed 2": (True, 2)}


def train_curve(model_type: str, setup: CurveSetup, batches: list[torch.Tensor], vocab: int,
                levers: bool, dropout_seed: int) -> dict[str, Any]:
    """The per-step training losses of one run (same initial weights for every run)."""
    device = torch.device(setup.device)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=vocab, block_size=setup.block_size, n_layer=setup.n_layer,
                         n_head=setup.n_head, n_embd=setup.n_embd, n_senses=setup.n_senses,
                         dropout=setup.dropout, bias=False)
    model = build_model(model_type, config).to(device).train()
    if isinstance(model, BackpackLM) and not levers:
        model.dedup_senses, model.mixing = False, "sdpa" if device.type == "cuda" else "einsum"
    model.fused_loss = levers
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=setup.lr, betas=(0.9, 0.95),
                            fused=levers and device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=setup.dtype == "float16")
    dtype = None if setup.dtype == "float32" else getattr(torch, setup.dtype)
    params = list(model.parameters())
    forward = torch.compile(model) if levers else model
    distinct = levers and isinstance(model, BackpackLM)
    torch.manual_seed(dropout_seed)  # the dropout masks from here on
    losses: list[float] = []

    def step() -> None:
        i = len(losses)
        batch = batches[i % len(batches)]
        x, y = batch[:, :-1].to(device), batch[:, 1:].to(device)
        kwargs: dict[str, Any] = {"chunked_loss": levers}
        if distinct:
            types, where = distinct_tokens(batch[:, :-1])
            kwargs["distinct"] = (types.to(device), where.to(device))
        for group in opt.param_groups:
            group["lr"] = setup.lr * min(1.0, (i + 1) / setup.warmup)
        losses.append(amp_step(forward, params, opt, scaler, x, y, dtype, **kwargs).item())

    t0 = time.perf_counter()
    first = guarded_warmup(step, 1, compiled=levers, cap_s=setup.compile_cap_s)
    if first["status"] != "ok":
        return {"status": first["status"], "message": first["message"], "losses": []}
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
    difference = abs(tails["levers"] - tails["plain"])
    yardstick = abs(tails["levers"] - tails["levers, dropout seed 2"])
    allowed = max(2 * yardstick, FLOOR_NATS)
    return {"agree": difference <= allowed, "tail_means": {k: round(v, 4) for k, v in tails.items()},
            "levers_minus_plain": round(tails["levers"] - tails["plain"], 4),
            "dropout_seed_effect": round(yardstick, 4), "allowed": round(allowed, 4)}


def run_curves(models: Sequence[str], setup: CurveSetup) -> dict[str, Any]:
    batches, vocab = europarl_batches(setup.batch_size, setup.block_size, 64, seed=1)
    result: dict[str, Any] = {"section": "curves", "setup": dataclasses.asdict(setup),
                              "vocab_size": vocab, "models": {}}
    t_start = time.perf_counter()
    for model_type in models:
        runs = {}
        for name, (levers, seed) in RUNS.items():
            left = setup.budget_s - (time.perf_counter() - t_start)
            if setup.budget_s and left < 10:
                runs[name] = {"status": "no time left", "losses": []}
                print(f"{model_type} {name}: not run, no time left in the --budget")
                continue
            run_setup = setup
            if setup.budget_s:  # its compile may take what is left
                cap = min(setup.compile_cap_s, left) if setup.compile_cap_s else left
                run_setup = dataclasses.replace(setup, compile_cap_s=cap)
            runs[name] = train_curve(model_type, run_setup, batches, vocab, levers, seed)
            r = runs[name]
            tail = statistics.mean(r["losses"][-TAIL:]) if r["losses"] else float("nan")
            first = r["losses"][0] if r["losses"] else float("nan")
            took = f" ({r['seconds']} s)" if "seconds" in r else ""
            print(f"{model_type} {name}: {r['status']}, first loss {first:.3f}, last-{TAIL} "
                  f"mean {tail:.4f}{took}", flush=True)
        result["models"][model_type] = {"runs": runs, "verdict": verdict(runs)}
    return result


def format_curves(result: dict[str, Any]) -> str:
    lines = [f"loss curves, {result['setup']['steps']} steps, Europarl (V {result['vocab_size']:,}), "
             f"{result['setup']['device']} {result['setup']['dtype']}: mean loss of the last {TAIL} steps"]
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


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.curves",
                                description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", choices=["backpack", "transformer"],
                   default=["backpack", "transformer"])
    p.add_argument("--steps", type=int, help=f"steps per run (default 200; {TINY.steps} "
                   "with --tiny)")
    p.add_argument("--device", help="cuda (default) or cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="autocast dtype (default float16; float32 with --tiny)")
    p.add_argument("--compile-cap", type=float, default=0.0, metavar="SECONDS",
                   help="a run whose first step (its compilation) takes longer is dropped")
    p.add_argument("--budget", type=float, default=0.0, metavar="SECONDS",
                   help="runs stop starting when this is spent (0: no limit)")
    p.add_argument("--tiny", action="store_true", help="a tiny shape on the CPU, for tests")
    p.add_argument("--json", help="where to write the JSON (default outputs/bench/)")
    args = p.parse_args(argv)
    try:
        setup = TINY if args.tiny else CurveSetup()
        changes = {k: v for k, v in (("steps", args.steps), ("device", args.device),
                                     ("dtype", args.dtype)) if v is not None}
        setup = dataclasses.replace(setup, compile_cap_s=args.compile_cap,
                                    budget_s=args.budget, **changes)
        if args.compile_cap < 0 or args.budget < 0:
            raise UserError("--compile-cap and --budget are seconds >= 0 (0: none)")
        if setup.steps < TAIL:
            raise UserError(f"--steps {setup.steps}: the verdict needs at least {TAIL}")
        if setup.device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError("no CUDA device here; use --device cpu (or --tiny)")
        if setup.dtype == "float16" and not setup.device.startswith("cuda"):
            raise UserError("--dtype float16 needs CUDA (a gradient scaler); use bfloat16 or float32")
        result = run_curves(args.models, setup)
    except UserError as exc:
        exit_on_user_error(exc)
    print(format_curves(result))
    print(f"wrote {write_json(result, args.json, 'curves')}")


if __name__ == "__main__":
    main()
