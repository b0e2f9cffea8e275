"""Benchmarks of backpack_nb, outside the library, one command per question (``python -m
benchmarks.X --help``): ``speed`` (step time, MFU, levers), ``memory`` (peak memory by part),
``data`` (preparation rate), ``curves`` (levers on / off), ``generate``; ``device_check.sh`` (the
GPU measurement) and ``gpu_summary`` (its report). Each prints a table and writes JSON."""
