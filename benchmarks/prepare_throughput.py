"""Europarl preparation throughput, end to end, next to a bare tiktoken batch encode.

The sample is small (1.7 MiB for en+fr), so it is replicated ``--copies`` times under new
day names into a temporary raw corpus (real text, more days). Both numbers come from the
same run on the same text:

- ``prepare``: ``backpack_nb.data.prepare`` (read, clean, split, encode, compact, write);
- ``encode_ordinary_batch``: tiktoken alone over the same cleaned documents, both cores.

    .venv/bin/python benchmarks/prepare_throughput.py --copies 20
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from backpack_nb import data
from backpack_nb.tokenizer import get_encoding


def build_corpus(sample: Path, dest: Path, copies: int) -> None:
    for lang in ("en", "fr"):
        src = sample / "raw" / "txt" / lang
        out = dest / "txt" / lang
        out.mkdir(parents=True)
        for c in range(copies):
            for f in sorted(src.glob("ep-*.txt")):
                # ep-00-01-17.txt -> ep-00-01-17-c003.txt: a distinct "day" per copy
                shutil.copyfile(f, out / f"{f.stem}-c{c:03d}.txt")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, default=20)
    ap.add_argument("--sample", default=os.environ.get("EUROPARL_SOURCE", "../shared/europarl"))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_corpus(Path(args.sample), tmp / "src", args.copies)
        cfg = data.PrepareConfig(langs=("en", "fr"))
        files = data.read_source([tmp / "src"], "raw", cfg.langs)
        docs = [t for u in data.collect_units(files, cfg) for t in u.texts.values()]
        mib = sum(len(t.encode()) for t in docs) / 2**20
        enc = get_encoding("cl100k_base")
        threads = min(8, os.cpu_count() or 1)
        best_prep = best_enc = float("inf")
        for r in range(args.repeats):
            t0 = time.perf_counter()
            data.prepare(tmp / "src", tmp / "out", cfg, overwrite=True, progress=False)
            best_prep = min(best_prep, time.perf_counter() - t0)
            t0 = time.perf_counter()
            enc.encode_ordinary_batch(docs, num_threads=threads)
            best_enc = min(best_enc, time.perf_counter() - t0)
        print(f"text: {mib:.1f} MiB of cleaned en+fr documents ({len(docs)} documents), {threads} threads, best of {args.repeats}")
        print(f"prepare (end to end):        {best_prep:6.2f} s  {mib / best_prep:6.1f} MiB/s")
        print(f"encode_ordinary_batch alone: {best_enc:6.2f} s  {mib / best_enc:6.1f} MiB/s")
        print(f"ratio prepare / bare encode: {best_prep / best_enc:.2f}x the time")


if __name__ == "__main__":
    main()
