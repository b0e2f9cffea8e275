"""GPU check of the seed configuration: step time and peak memory on CUDA.

For each model (Backpack with the sense network, Transformer) at the seed's shape (6 layers,
6 heads, 384 wide, 16 senses, block 512, batch 32, dropout 0.1) it runs AdamW training steps
under float16 autocast with a GradScaler, optionally compiled, and reports ms/step, tokens/s
and ``torch.cuda.max_memory_allocated`` at the given vocabulary sizes. A 16 GB T4 has
15.0 GiB usable: the verdict column says whether the peak would fit.

    python benchmarks/gpu_check.py --vocab 13034 100277 --steps 20 --compile

Needs CUDA; on a CPU-only machine it says so and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: sys.path[0] is this folder; import from the root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch

from backpack_nb.models import ModelConfig, build_model

from benchmarks.batches import zipf_batches

T4_USABLE_GIB = 15.0  # 16 GB card, about 15 GiB visible to PyTorch


def run(model_type: str, V: int, args: argparse.Namespace) -> dict:
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cfg = ModelConfig(vocab_size=V, block_size=512, n_layer=6, n_head=6, n_embd=384,
                      n_senses=16 if model_type == "backpack" else 1, dropout=0.1, bias=False,
                      sense_source=args.sense_source)
    model = build_model(model_type, cfg).to(dev)
    n_params = model.num_parameters(by_part=False)
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=3e-4, betas=(0.9, 0.95), fused=cuda)
    scaler = torch.amp.GradScaler(dev.type, enabled=args.dtype == "float16" and cuda)
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    step_model = torch.compile(model) if args.compile else model
    # Zipf-distributed ids, like text (a few thousand types per batch)
    batches = [b.to(dev) for b in zipf_batches(V, args.batch, 512, 4)]

    def step(i: int) -> float:
        xy = batches[i % len(batches)]
        with torch.autocast(dev.type, dtype=dtype):
            _, loss = step_model(xy[:, :-1], xy[:, 1:])
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    for i in range(args.warmup):
        first_loss = float(step(i))
    if cuda:
        torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(args.steps):
        loss = step(i)
    if cuda:
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / args.steps * 1000
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    row = {
        "model": model_type, "V": V, "params": n_params, "dtype": args.dtype, "compile": args.compile,
        "batch": args.batch, "ms_per_step": round(ms, 2),
        "tokens_per_s": round(args.batch * 512 / ms * 1000),
        "peak_GiB": round(peak, 3), "fits_T4": peak <= T4_USABLE_GIB,
        "first_loss": round(first_loss, 3), "last_loss": round(float(loss), 3),
        "warmup_s": round(warm_s, 1), "scaler_scale": scaler.get_scale() if scaler.is_enabled() else None,
    }
    del model, step_model, opt
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, nargs="+", default=[13034, 100277])
    ap.add_argument("--models", nargs="+", default=["backpack", "transformer"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--sense_source", default="network", choices=["network", "table"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cuda", help="cuda (the point of this check) or cpu (a smoke run)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; this check needs a GPU", file=sys.stderr)
        raise SystemExit(2)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    rows = []
    for V in args.vocab:
        for m in args.models:
            row = run(m, V, args)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'model':<12}{'V':>8}{'params':>13}{'ms/step':>9}{'tok/s':>10}{'peak GiB':>10}  T4 (15 GiB)")
    for r in rows:
        print(f"{r['model']:<12}{r['V']:>8,}{r['params']:>13,}{r['ms_per_step']:>9.1f}{r['tokens_per_s']:>10,}"
              f"{r['peak_GiB']:>10.2f}  {'fits' if r['fits_T4'] else 'DOES NOT FIT'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
