"""Does torch.compile change a training step's peak memory? Eager against compiled, real
float32 steps on this CPU, one fresh process each.

    .venv/bin/python benchmarks/compile_memory.py [--models transformer backpack]
        [--vocab 50257] [--batch 8] [--block 512]

Each process builds the model, runs one step (forward, backward; no optimizer) to warm up
(and compile), then resets the peak RSS (``/proc/self/clear_refs``) and measures the
*transient* peak of a second step above the RSS before it: activations, gradients, the
loss's logits chunks, temporaries. Found with it: traced by the compiler, the chunked
cross-entropy's loop no longer freed each chunk before the next (2.18 GiB against 1.03 GiB
eager for the Transformer at V 50,257, batch 8 x 512), and the blocked mixing's writes into
slices became copies; both now run eagerly inside compiled models (``torch.compiler.disable``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: sys.path[0] is this folder; import from the root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch

from backpack_nb.models import ModelConfig, build_model

from benchmarks.batches import zipf_batches
from benchmarks.common import GiB


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def one(mode: str, model_type: str, vocab: int, batch: int, block: int) -> dict:
    xy = zipf_batches(vocab, batch, block, 1)[0]
    x, y = xy[:, :-1].contiguous(), xy[:, 1:].contiguous()
    torch.manual_seed(0)
    model = build_model(model_type, ModelConfig(vocab_size=vocab, block_size=block, dropout=0.0)).train()
    forward = torch.compile(model) if mode == "compiled" else model

    def step() -> None:
        _, loss = forward(x, y)
        loss.backward()
        for p in model.parameters():
            p.grad = None

    t0 = time.perf_counter()
    step()
    warm = time.perf_counter() - t0
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:  # peak RSS := current RSS
        fh.write("5")
    before = _status_bytes("VmRSS:")
    t0 = time.perf_counter()
    step()
    seconds = time.perf_counter() - t0
    return {"mode": mode, "model": model_type, "vocab": vocab, "batch": batch, "block": block,
            "first_step_s": round(warm, 1), "step_s": round(seconds, 2),
            "transient_peak_gib": round((_status_bytes("VmHWM:") - before) / GiB, 3),
            "logits_chunk_gib": round(1024 * vocab * 4 / GiB, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["transformer", "backpack"])
    ap.add_argument("--vocab", type=int, default=50_257)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--block", type=int, default=512)
    ap.add_argument("--one", nargs=2, metavar=("MODE", "MODEL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], args.one[1], args.vocab, args.batch, args.block)))
        return
    # glibc returns freed blocks to the OS at once, so RSS follows live memory
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    root = Path(__file__).resolve().parents[1]
    print(f"{'model':<12}{'mode':<10}{'step s':>8}{'first step s':>14}{'transient peak GiB':>20}")
    for model_type in args.models:
        for mode in ("eager", "compiled"):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--one", mode, model_type,
                   "--vocab", str(args.vocab), "--batch", str(args.batch), "--block", str(args.block)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{model_type:<12}{mode:<10}{r['step_s']:>8}{r['first_step_s']:>14}"
                  f"{r['transient_peak_gib']:>20.3f}", flush=True)
    print(f"(one logits chunk of 1024 rows: {r['logits_chunk_gib']} GiB in float32)")


if __name__ == "__main__":
    main()
