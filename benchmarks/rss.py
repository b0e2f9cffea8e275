"""The CPU cross-check of the memory accounting: real float32 training steps, peak RSS.

:func:`rss_check` runs each real step in a fresh process (the peak RSS of a process only
grows), ``python -m benchmarks.rss --model M --vocab V --batch B --block T``, which prints
one JSON line; it is an internal entry of ``python -m benchmarks.memory --rss-check``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from backpack_nb.models import ModelConfig, build_model

from benchmarks.accounting import MemoryCase, trace_memory
from benchmarks.batches import zipf_batches
from benchmarks.common import GiB

REPO_ROOT = Path(__file__).resolve().parents[1]  # where `python -m benchmarks.rss` imports


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
              block_size: int, target_batch: int, *,
              log: Callable[[str], Any] = print) -> dict[str, Any]:
    """For each model and batch size: the peak RSS of real fp32 CPU steps (a fresh process
    each) next to the traced accounting of the same step (fake tensors, float32, the CPU's
    attention kernels, the batch's own U); then both extrapolated linearly in the batch to
    ``target_batch`` (a real step there takes minutes here), next to the accounting traced
    directly at ``target_batch``."""
    rows = []
    for model in models:
        for b in batch_sizes:
            cmd = [sys.executable, "-m", "benchmarks.rss", "--model", model,
                   "--vocab", str(vocab_size), "--batch", str(b), "--block", str(block_size)]
            log(f"  real step: {model}, batch {b} x {block_size}, V {vocab_size:,} ...")
            # A fixed mmap threshold: freed tensors go back to the OS, so RSS follows live
            # memory instead of glibc's heap retention (about 8% more RSS without it).
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env,
                                  cwd=REPO_ROOT)
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


def main(argv: Sequence[str] | None = None) -> None:
    """One real step in this fresh process; its result as one JSON line on stdout."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rss",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--vocab", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--block", type=int, required=True)
    args = parser.parse_args(argv)
    print(json.dumps(rss_step(args.model, args.vocab, args.batch, args.block)))


if __name__ == "__main__":
    main()

