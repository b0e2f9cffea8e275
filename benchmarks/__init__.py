"""Benchmarks of backpack_nb, outside the library: one command per question, run from the root
(``python -m benchmarks.X --help``): ``speed`` (training-step time, MFU, the levers),
``memory`` (peak training memory by part), ``data`` (preparation rate), ``curves`` (loss
curves, levers on / off), ``generate`` (generation speed); ``bash benchmarks/device_check.sh``
(the prepared GPU measurement) and ``gpu_summary`` (its report). Each prints a table and
writes JSON (``--json``, default ``<outputs root>/bench/<section>.json``) at the seed's shape
(``params/train_europarl_scratch.yaml``), every training step the trainer's own.
"""
