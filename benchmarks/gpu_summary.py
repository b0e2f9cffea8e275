"""The GPU measurement's report: its goals met or missed, and every table, from one run's files.

    python -m benchmarks.gpu_summary DIR

``DIR`` holds what ``benchmarks/device_check.sh`` wrote: ``speed_13034.json`` and
``speed_100277.json`` (:mod:`benchmarks.speed`: times, MFU, peak memory, syncs a step),
``train.json`` (train.py's own runs) and ``curves.json`` (:mod:`benchmarks.curves`). A
missing file leaves its part out. Prints Markdown.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.curves import format_curves
from benchmarks.speed import format_speed

GOAL_TRAIN = 0.10  # train.py's tokens/s within 10% of the benchmark's


def _load(folder: Path, name: str) -> Any:
    path = folder / name
    return json.loads(path.read_text("utf-8")) if path.exists() else None


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
    speeds = [s for s in (_load(folder, "speed_13034.json"), _load(folder, "speed_100277.json"))
              if s]
    curves = _load(folder, "curves.json")
    parts = [("Goals", [f"- V {s['setup']['vocab_size']:,}: {line}" for s in speeds
                        for line in format_speed(s).splitlines() if "goal" in line])]
    parts += [(f"Speed at V {s['setup']['vocab_size']:,} ({s['setup']['data']} batches)",
               ["```", format_speed(s), "```"]) for s in speeds]
    parts += [("train.py", train_lines(_load(folder, "train.json"), speeds[0] if speeds else None)),
              ("Loss curves with and without the levers",
               ["```", format_curves(curves), "```"] if curves else [])]
    out = ["# GPU measurement"]
    for title, lines in parts:
        if lines:
            out += ["", f"## {title}", "", *lines]
    return "\n".join(out if len(out) > 1 else [*out, "", f"nothing measured in {folder}"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_summary",
                                description=__doc__.split("\n")[0])
    p.add_argument("folder", help="the folder benchmarks/device_check.sh wrote ($OUT)")
    args = p.parse_args(argv)
    folder = Path(args.folder)
    if not folder.is_dir():
        p.error(f"{folder} is not a folder: give the one device_check.sh wrote ($OUT)")
    print(summarize(folder))


if __name__ == "__main__":
    main()
