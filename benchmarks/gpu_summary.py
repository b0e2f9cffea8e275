"""The GPU measurement's report: issue #18's table and goals from one device run's files.

    python -m benchmarks.gpu_summary DIR

``DIR`` holds what ``benchmarks/device_check.sh`` wrote: ``speed_13034.json`` and
``speed_100277.json`` (:mod:`benchmarks.speed`), ``train.json`` (train.py's own runs),
``curves.json`` (:mod:`benchmarks.curves`) and ``memory.json`` (:mod:`benchmarks.memory`, the
CPU accounting). A missing file leaves its part out. Prints Markdown.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

# The seed configuration on an H200 before this work (docs/training.md, gpu_check.py):
# ms/step at batch 32 x 512, float16 + GradScaler + compile, Zipf batches.
EARLIER_MS = {("transformer", 13_034): 13.1, ("backpack", 13_034): 19.6,
              ("transformer", 100_277): 22.0, ("backpack", 100_277): 29.8}
GOAL_MFU = 0.30
GOAL_FLOOR = 1.10
GOAL_TRAIN = 0.10
GIB = 2**30


def _load(folder: Path, name: str) -> Any:
    path = folder / name
    return json.loads(path.read_text("utf-8")) if path.exists() else None


def _rows(speed: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["variant"]: r for r in speed["rows"]}


def main_table(speeds: list[dict[str, Any]]) -> list[str]:
    lines = ["| model | V | batches | ms/step (earlier) | ms/step | useful TFLOP/step | "
             "TFLOP/s | MFU | Backpack / Transformer | FLOP floor | ratio / floor |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for speed in speeds:
        rows, q = _rows(speed), speed["ratios"]
        V, data = speed["setup"]["vocab_size"], speed["setup"]["data"]
        for name in ("transformer", "backpack", "nanogpt"):
            if name not in rows:
                continue
            r = rows[name]
            earlier = EARLIER_MS.get((name, V))
            ratio = floor = over = ""
            if name == "backpack" and q.get("backpack_over_transformer"):
                ratio, floor = f"{q['backpack_over_transformer']:.2f}", f"{q['flop_floor']:.2f}"
                over = f"{q['backpack_over_transformer'] / q['flop_floor']:.2f}"
            label = "nanoGPT-style" if name == "nanogpt" else name.capitalize()
            lines.append(
                f"| {label} | {V:,} | {data} ({speed['distinct_tokens']:,.0f} distinct) | "
                f"{earlier if earlier else '-'} | {r['ms_per_step']:.1f} | "
                f"{r['useful_gflop'] / 1000:.2f} | "
                f"{r['useful_gflop'] / r['ms_per_step']:.0f} | {r['mfu']:.1%} | {ratio} | "
                f"{floor} | {over} |")
    first = speeds[0]
    lines.append(f"\nMFU against {first.get('mfu_peak_of', '?')} "
                 f"({first.get('mfu_peak_gflops', 0) / 1000:,.1f} TFLOP/s); earlier ms/step: "
                 "the README's H200 figures (Zipf batches, before this work).")
    return lines


def lever_table(speeds: list[dict[str, Any]]) -> list[str]:
    lines = ["| lever (switched on) | V | ms/step | base ms/step | time vs base | peak GiB "
             "(base) | syncs a step (base) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for speed in speeds:
        rows = _rows(speed)
        for r in speed["rows"]:
            if not r["base"] or r["base"] not in rows:
                continue
            b = rows[r["base"]]
            mem = (f"{r['peak_mib'] / 1024:.2f} ({b['peak_mib'] / 1024:.2f})"
                   if r.get("peak_mib") and b.get("peak_mib") else "-")
            syncs = (f"{r['syncs_per_step']} ({b['syncs_per_step']})"
                     if r.get("syncs_per_step") is not None else "-")
            lines.append(f"| {r['variant']} | {speed['setup']['vocab_size']:,} | "
                         f"{r['ms_per_step']:.1f} | {b['ms_per_step']:.1f} | "
                         f"{r.get('time_vs_base') or 0:.3f} | {mem} | {syncs} |")
    return lines


def compile_lines(speeds: list[dict[str, Any]]) -> list[str]:
    lines = []
    for speed in speeds:
        V = speed["setup"]["vocab_size"]
        for r in speed["rows"]:
            c = r.get("compile")
            if c:
                extra = (f", {c['graphs_while_timing']} graph(s) compiled WHILE TIMING"
                         if c.get("graphs_while_timing") else "")
                lines.append(f"- V {V:,} {r['variant']}: compiled in {c['seconds']:.0f} s, "
                             f"{c['graphs']} graph(s), {c['graph_breaks']} break(s){extra}")
        for name, report in speed.get("dropped", {}).items():
            lines.append(f"- V {V:,} {name}: NOT TIMED, {report['status']} ({report['message']})")
    return lines


def memory_lines(speed: dict[str, Any] | None, memory: dict[str, Any] | None) -> list[str]:
    if not speed:
        return []
    V = speed["setup"]["vocab_size"]
    rows = _rows(speed)
    accounted = {}
    for case in (memory or {}).get("cases", []):
        if case["case"]["vocab_size"] == V and case["label"] in ("transformer", "backpack"):
            accounted[case["label"]] = case["peak_bytes"] / GIB
    lines = [f"Peak memory at V {V:,}, batch {speed['setup']['batch_size']} "
             "(`torch.cuda.max_memory_allocated` over one step) beside the CPU accounting "
             "(`python -m benchmarks.memory`, batch 32):"]
    if not any(rows.get(n, {}).get("peak_mib") for n in ("backpack", "transformer")):
        return lines + ["- not measured (a compiled step's peak is measured on CUDA only)"]
    for name in ("backpack", "transformer"):
        if name in rows and rows[name].get("peak_mib"):
            gib = rows[name]["peak_mib"] / 1024
            acc = f"{accounted[name]:.2f} GiB accounted" if name in accounted else "no accounting"
            lines.append(f"- {name}: {gib:.2f} GiB measured, {acc}; "
                         f"{'fits' if gib <= 15 else 'DOES NOT FIT'} 15 GiB")
    return lines


def train_lines(train: dict[str, Any] | None, speed: dict[str, Any] | None) -> list[str]:
    if not train:
        return []
    rows = _rows(speed) if speed else {}
    lines = ["train.py's own seed command (tokens/s of its steady log windows) beside the "
             "benchmark's row for the same model:"]
    for model, run in train.items():
        tok = run.get("tokens_per_s")
        bench = rows.get(model, {}).get("tokens_per_s")
        if not tok or not bench:
            lines.append(f"- {model}: {run.get('error') or 'no tokens/s'}")
            continue
        gap = tok / bench - 1
        resumed = run.get("resumed") or {}
        after = (f"; resumed: {resumed.get('status')} at iteration {resumed.get('iterations')}"
                 if resumed.get("status") else "")
        lines.append(f"- {model}: train.py {tok:,.0f} tokens/s, benchmark {bench:,} "
                     f"({gap:+.1%}: {'within' if abs(gap) <= GOAL_TRAIN else 'NOT within'} 10%)"
                     f"; train.py MFU {run.get('mfu') or 0:.1%}{after}")
    return lines


def curve_lines(curves: dict[str, Any] | None) -> list[str]:
    if not curves:
        return []
    from benchmarks.curves import format_curves

    return ["```", format_curves(curves), "```"]


def goal_lines(speeds: list[dict[str, Any]]) -> list[str]:
    lines = []
    for speed in speeds:
        rows, q, V = _rows(speed), speed["ratios"], speed["setup"]["vocab_size"]
        if V == 13_034 and "transformer" in rows:
            mfu = rows["transformer"]["mfu"]
            lines.append(f"- Transformer MFU at V 13,034: {mfu:.1%} "
                         f"({'met' if mfu >= GOAL_MFU else 'MISSED'}, goal >= 30%)")
        if "transformer_over_nanogpt" in q:
            t = q["transformer_over_nanogpt"]
            lines.append(f"- Transformer / nanoGPT-style step time: {t:.3f} "
                         f"({'met' if t <= 1.0 else 'MISSED'}, goal <= 1.00)")
        if q.get("backpack_over_transformer"):
            over = q["backpack_over_transformer"] / q["flop_floor"]
            lines.append(f"- Backpack / Transformer at V {V:,}: {over:.2f}x its FLOP floor "
                         f"({'met' if over <= GOAL_FLOOR else 'MISSED'}, goal <= 1.10)")
    return lines


def profile_lines(speed: dict[str, Any] | None) -> list[str]:
    if not speed or not speed.get("profiles"):
        return []
    from benchmarks.gpu_probe import format_top

    rows = _rows(speed)
    out = ["```"]
    for name, profile in speed["profiles"].items():
        out.append(format_top(name, rows[name]["ms_per_step"], profile))
    return out + ["```"]


def summarize(folder: Path) -> str:
    speeds = [s for s in (_load(folder, "speed_13034.json"), _load(folder, "speed_100277.json"))
              if s]
    by_v = {s["setup"]["vocab_size"]: s for s in speeds}
    big = by_v.get(100_277) or (speeds[-1] if len(speeds) > 1 else None)
    small = by_v.get(13_034) or (speeds[0] if speeds else None)
    out = ["# GPU measurement (issue #18)", ""]
    if speeds:
        s = speeds[0]["setup"]
        out += [f"{s['n_layer']} layers, d {s['n_embd']}, {s['n_senses']} senses, batch "
                f"{s['batch_size']} x {s['block_size']}, dropout {s['dropout']}, {s['dtype']}"
                f"{' + GradScaler' if s['dtype'] == 'float16' else ''}, every variant "
                f"{'compiled' if s.get('compile_all') else 'as its lever says'}; {s['device']}", ""]
        out += main_table(speeds) + ["", "## Goals", ""] + goal_lines(speeds)
        out += ["", "## Levers", ""] + lever_table(speeds)
        out += ["", "## Compilation", ""] + compile_lines(speeds)
    for title, part in (("Memory", memory_lines(big, _load(folder, "memory.json"))),
                        ("train.py", train_lines(_load(folder, "train.json"), small)),
                        ("Loss curves with and without the levers",
                         curve_lines(_load(folder, "curves.json"))),
                        ("Where the time goes (V 13,034)", profile_lines(small))):
        if part:
            out += ["", f"## {title}", ""] + part
    if len(out) == 2:
        out.append(f"nothing measured in {folder}")
    return "\n".join(out)


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
