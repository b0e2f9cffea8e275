"""Benchmarks of backpack_nb, outside the library: one command per question, run from the root.

    python -m benchmarks.speed [--quick] [--threads 1] ...  training-step time, MFU, the levers
    python -m benchmarks.memory [--config NAME] ...         peak training memory, part by part
    python -m benchmarks.data [--copies 20]                 data preparation rate
    python -m benchmarks.curves [--tiny]                    loss curves with the levers on / off
    bash benchmarks/device_check.sh                         the prepared GPU measurement
    python -m benchmarks.gpu_summary DIR                    its report

Each command prints a table and writes JSON (``--json``; by default under the outputs root,
``bench/<section>.json``). The shape measured is the seed's (``params/train_europarl_scratch.yaml``)
and every training step is the trainer's own (``backpack_nb.training.step.optimizer_step``).
Times are compared as ratios within one run: this kind of machine is shared and noisy.
"""
