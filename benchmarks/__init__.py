"""Benchmarks of backpack_nb, outside the library: one command each, run from the repo root.

    python -m benchmarks.speed [--quick] [--tiny] [--threads 1] ...   training-step time, MFU
    python -m benchmarks.memory [--config NAME] [--rss-check] ...     peak training memory
    python -m benchmarks.data [--copies 20]                           data preparation rate
    python benchmarks/gpu_check.py ...          the seed configuration on CUDA
    python benchmarks/compile_memory.py ...     eager against compiled peak memory

Each command prints a table and writes JSON (``--json``; by default under the outputs root,
``bench/<section>.json``). Times are compared as ratios within one run: this kind of machine
is shared and noisy.
"""
