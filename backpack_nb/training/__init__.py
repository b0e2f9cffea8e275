"""Training: :func:`train` behind train.py and the notebooks.

What it guarantees:

- **Resumable, bit-exactly.** Everything that decides the next step (weights, AdamW moments,
  gradient scaler, schedule position, the data sampler's generator, every RNG) is in
  ``ckpt.pt``; on the CPU an interrupted and resumed run logs exactly what an uninterrupted
  one logs. Evaluation draws from a fixed-seed generator and never touches the training RNGs.
- **Interruptible.** SIGTERM (a preempted spot VM) or Ctrl-C finishes the current step, saves
  and returns (an evaluation due at that step is left to the resume); a second signal aborts.
- **Crash-safe.** A kill at any moment (even mid-save) loses at most the steps since the last
  checkpoint; a resume falls back from a damaged or foreign ``ckpt.pt`` to ``ckpt.prev.pt``.
- **Never saves NaN.** A non-finite loss (float32/bfloat16) or non-finite weights stop the run
  before anything is evaluated or saved; the last good checkpoint stays as it was. In float16
  the gradient scaler skips such steps, as it is meant to, and the run goes on.
- **Same code on 1 CPU or N GPUs.** Under ``torchrun`` it runs DDP (NCCL on CUDA, gloo on CPU);
  every process draws the same global batch and takes its slice, so the effective batch is
  batch_size x gradient_accumulation_steps x processes, and only rank 0 writes files.

Files in ``out_dir``: ``ckpt.pt`` (+ ``ckpt.prev.pt``), ``best.pt``, ``training_log.json``
(the seed's layout plus lr, tokens_seen, elapsed_s) and ``run.json`` (config, versions, data);
with a ``logger``, live curves in ``tensorboard/`` or ``wandb/`` (+ ``wandb_run.json``).

- **Never destroys a run by mistake.** With ``overwrite`` nothing in ``out_dir`` changes until
  the new run's first save; a new run that fails or is stopped before it leaves the earlier
  run as it was, resumable.
- **Interruptible evaluation.** A signal during an evaluation abandons it between two batches
  (:mod:`.estimate`); the resume runs it again in full.

The modules: :mod:`.loop` (the Trainer and train), :mod:`.setup` (the run folder's checks and
the data, resolved once before the Trainer), :mod:`.step` (one optimizer step, which the
benchmarks call too), :mod:`.batches`, :mod:`.schedule`, :mod:`.estimate` (the loss estimate),
:mod:`.meters` (FLOPs, peak, throughput, progress bar), :mod:`.records` (training_log.json,
run.json), :mod:`.loggers` (TensorBoard, W&B), :mod:`.rng` (every RNG's state) and
:mod:`.runtime` (device, DDP, signals).
"""

from .batches import BatchSampler
from .loop import Trainer, TrainingDiverged, train
from .meters import flops_per_token, peak_flops
from .records import LOG_KEYS, LOG_NAME, RUN_NAME, new_training_log
from .runtime import Aborted, Runtime
from .schedule import WarmupCosineSchedule

__all__ = ["Aborted", "BatchSampler", "LOG_KEYS", "LOG_NAME", "RUN_NAME", "Runtime", "Trainer",
           "TrainingDiverged", "WarmupCosineSchedule", "flops_per_token", "new_training_log",
           "peak_flops", "train"]
