"""The GPU measurement's report: its goals met or missed, and every table, from one run's files.

``DIR``: what ``benchmarks/device_check.sh`` wrote (speed_13034.json, speed_100277.json,
train.json, curves.json, generate.json); a missing file leaves its part out. Prints Markdown."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.curves import format_curves
from benchmarks.generate import format_generate
from benchmarks.speed import format_speed

GOAL_TRAIN = 0.10  # train.py's tokens/s within 10% of the benchmark's


def _load(path: Path) -> Any:
    return json.loads(path.read_text("utf-8")) if path.exists() else None


def collect_train(runs: Path) -> dict[str, Any]:
    """Each model's first train.py run under ``runs`` (<model>.scratch.json), its resumption."""
    out = {}
    for m in ("backpack", "transformer"):
        info = _load(runs / f"{m}.scratch.json") or {}
        out[m] = {k: info.get(k) for k in ("tokens_per_s", "mfu", "compiled", "peak_flops_of",
                                           "distinct_tokens_per_batch", "iterations")}
        out[m]["error"] = None if info else f"train.py wrote no run.json for {m}"
        after = _load(runs / m / "run.json") or {}
        out[m]["resumed"] = {k: after.get(k) for k in ("status", "iterations", "resumed_at")}
    return out


def train_lines(train: dict[str, Any] | None, speed: dict[str, Any] | None) -> list[str]:
    if not train:
        return []
    rows = {r["variant"]: r for r in speed["rows"]} if speed else {}
    lines = ["train.py's own seed command (tokens/s of its steady log windows) beside the "
             "benchmark's row for the same model:"]
    for model, run in train.items():
        tok, bench = run.get("tokens_per_s"), rows.get(model, {}).get("tokens_per_s")
        if not tok or not bench:
            lines.append(f"- {model}: {run.get('error') or 'no tokens/s'}")
            continue
        gap, resumed = tok / bench - 1, run.get("resumed") or {}
        after = (f"; resumed: {resumed.get('status')} at iteration {resumed.get('iterations')}"
                 if resumed.get("status") else "")
        lines.append(f"- {model}: train.py {tok:,.0f} tokens/s, benchmark {bench:,} "
                     f"({gap:+.1%}: {'within' if abs(gap) <= GOAL_TRAIN else 'NOT within'} 10%)"
                     f"; train.py MFU {run.get('mfu') or 0:.1%}{after}")
    return lines


def summarize(folder: Path) -> str:
    speeds = [s for s in (_load(folder / f"speed_{v}.json") for v in (13034, 100277)) if s]
    curves, generate = _load(folder / "curves.json"), _load(folder / "generate.json")
    parts = [("Goals", [f"- V {s['setup']['vocab_size']:,}: {line}" for s in speeds
                        for line in format_speed(s).splitlines() if "goal" in line])]
    parts += [(f"Speed at V {s['setup']['vocab_size']:,} ({s['setup']['data']} batches)",
               ["```", format_speed(s), "```"]) for s in speeds]
    parts += [("train.py", train_lines(_load(folder / "train.json"),
                                       speeds[0] if speeds else None)),
              ("Loss curves with and without the levers",
               ["```", format_curves(curves), "```"] if curves else []),
              ("Generation", [format_generate(generate)] if generate else [])]
    out = ["# GPU measurement"]
    for title, lines in parts:
        if lines:
            out += ["", f"## {title}", "", *lines]
    return "\n".join(out if len(out) > 1 else [*out, "", f"nothing measured in {folder}"])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_summary",
                                description=__doc__.split("\n")[0])
    p.add_argument("folder", type=Path, help="the folder device_check.sh wrote ($OUT)")
    p.add_argument("--train-runs", type=Path, metavar="RUNS", help="first write "
                   "FOLDER/train.json from the train.py runs under RUNS")
    p.add_argument("--collect-only", action="store_true", help="write train.json, print nothing")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    if not args.folder.is_dir():
        p.error(f"{args.folder} is not a folder: give the one device_check.sh wrote ($OUT)")
    if args.train_runs:
        (args.folder / "train.json").write_text(json.dumps(collect_train(args.train_runs),
                                                           indent=1))
    if not args.collect_only:
        print(summarize(args.folder))


if __name__ == "__main__":
    main()
