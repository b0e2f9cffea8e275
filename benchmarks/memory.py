"""Peak training memory of a configuration, part by part, and whether it fits a 16 GB T4.

    python -m benchmarks.memory [--config train_europarl_scratch] [--vocab 50257 100277]
        [--batch N] [--rss-check] [--rss-batch 4 8] [--rss-vocab 100277] [--json PATH]

By default the seed's configuration (6 layers, 384 wide, block 512, batch 32, float16
autocast, AdamW), traced on fake tensors (:mod:`benchmarks.accounting`). ``--rss-check``
compares the same accounting in float32 with the peak RSS of real CPU steps
(:mod:`benchmarks.rss`, minutes). Writes JSON to ``--json`` (default
``<outputs root>/bench/memory.json``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from backpack_nb.errors import UserError, exit_on_user_error
from backpack_nb.params import read_params_file

from benchmarks.accounting import T4_BUDGET_GIB, format_memory, memory_cases, trace_memory
from benchmarks.common import write_json
from benchmarks.rss import format_rss, rss_check


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory",
                                description=__doc__.split("\n")[0])
    p.add_argument("--config", default="train_europarl_scratch",
                   help="name under params/ or a .yaml path (shape, batch, dtype)")
    p.add_argument("--vocab", type=int, nargs="+", default=[50_257, 100_277])
    p.add_argument("--batch", type=int, help="override the config's batch size")
    p.add_argument("--rss-check", action="store_true",
                   help="also run real fp32 CPU steps and compare their peak RSS (minutes)")
    p.add_argument("--rss-batch", type=int, nargs="+", default=[4, 8])
    p.add_argument("--rss-vocab", type=int, default=100_277)
    p.add_argument("--json", help="where to write the JSON (default outputs/bench/)")
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Print the accounting (and the RSS cross-check) and return the JSON result."""
    params = read_params_file(args.config)
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
    return result


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        result = run(args)
    except UserError as exc:
        exit_on_user_error(exc)
    print(f"wrote {write_json(result, args.json, 'memory')}")


if __name__ == "__main__":
    main()
