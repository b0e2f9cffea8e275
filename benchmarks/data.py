"""Europarl preparation throughput, end to end, next to a bare tiktoken batch encode.

:func:`backpack_nb.data.prepare` on ``--copies`` copies of the Europarl sample."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from backpack_nb import data
from backpack_nb.errors import UserError
from backpack_nb.europarl import read_source
from backpack_nb.tokenizer import get_encoding

from benchmarks.common import MiB, default_europarl_source, new_parser, run_main


def build_corpus(sample: Path, dest: Path, copies: int) -> None:
    """``copies`` copies of the raw en+fr sample's days under new names (ep-...-c003.txt)."""
    for lang in ("en", "fr"):
        (out := dest / "txt" / lang).mkdir(parents=True)
        for c in range(copies):
            for f in sorted((sample / "raw" / "txt" / lang).glob("ep-*.txt")):
                shutil.copyfile(f, out / f"{f.stem}-c{c:03d}.txt")


def run_data(sample: Path, copies: int = 20, repeats: int = 3, *,
             log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Best-of-``repeats`` seconds of ``data.prepare`` (read, clean, split, encode, compact,
    write) and of a bare ``encode_ordinary_batch`` of its cleaned documents, same threads."""
    if not (sample / "raw" / "txt" / "en").is_dir():
        raise UserError(f"no Europarl sample at {sample}: set EUROPARL_SOURCE")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_corpus(sample, tmp / "src", copies)
        cfg = data.PrepareConfig(langs=("en", "fr"))
        files = read_source([tmp / "src"], "raw", cfg.langs)
        docs = [t for u in data.collect_units(files, cfg) for t in u.texts.values()]
        mib = sum(len(t.encode()) for t in docs) / MiB
        enc = get_encoding("cl100k_base")
        threads = min(8, os.cpu_count() or 1)  # what data.prepare uses
        log(f"text: {mib:.1f} MiB of cleaned en+fr documents ({len(docs)}), {threads} threads")
        prep, bare = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            data.prepare(tmp / "src", tmp / "out", cfg, overwrite=True, progress=False)
            prep.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            enc.encode_ordinary_batch(docs, num_threads=threads)
            bare.append(time.perf_counter() - t0)
    return {"section": "data", "mib": round(mib, 2), "documents": len(docs), "threads": threads,
            "prepare_s": round(min(prep), 4), "encode_s": round(min(bare), 4),
            "prepare_mib_s": round(mib / min(prep), 1), "encode_mib_s": round(mib / min(bare), 1),
            "rate_ratio": round(min(bare) / min(prep), 3)}


def format_data(r: dict[str, Any]) -> str:
    return "\n".join([
        f"prepare (end to end):        {r['prepare_s']:6.2f} s  {r['prepare_mib_s']:6.1f} MiB/s",
        f"encode_ordinary_batch alone: {r['encode_s']:6.2f} s  {r['encode_mib_s']:6.1f} MiB/s",
        f"prepare rate / bare encode rate: {r['rate_ratio']:.2f} (goal >= 0.80; best of runs)",
    ])


def parser() -> argparse.ArgumentParser:
    p = new_parser("data", __doc__)
    p.add_argument("--copies", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    run_main(lambda: run_data(default_europarl_source(), args.copies, args.repeats),
             format_data, args.json, "data")


if __name__ == "__main__":
    main()
