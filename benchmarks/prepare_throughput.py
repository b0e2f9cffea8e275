"""Europarl preparation throughput, end to end, next to a bare tiktoken batch encode.

A thin front door to ``python -m backpack_nb.bench data`` (the logic lives in
:func:`backpack_nb.bench.run_data`):

    .venv/bin/python benchmarks/prepare_throughput.py --copies 20
"""

from __future__ import annotations

import sys

from backpack_nb.bench import main

if __name__ == "__main__":
    main(["data", *sys.argv[1:]])
