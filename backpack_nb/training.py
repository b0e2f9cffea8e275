"""The training loop: one function, :func:`train`, behind train.py and the notebooks.

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
(the seed's layout plus lr, tokens_seen, elapsed_s) and ``run.json`` (config, versions, data).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import math
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from backpack_nb import checkpoint as ckpt_io
from backpack_nb import data as data_mod
from backpack_nb import senses
from backpack_nb import tokenizer as tokenizer_mod
from backpack_nb.errors import UserError
from backpack_nb.models import ModelConfig, build_model
from backpack_nb.models.flops import mean_distinct_tokens, train_flops
from backpack_nb.console import show_bars
from backpack_nb.optim import clip_grad_norm_, make_optimizer
from backpack_nb.params import TrainConfig, model_shape_keys
from backpack_nb.paths import project_root, resolve_in_root

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "backpack_nb.checkpoint/1"
LOG_NAME = "training_log.json"
RUN_NAME = "run.json"
LOG_KEYS = ("iterations", "train_loss", "val_loss", "lr", "tokens_seen", "elapsed_s")
# Offsets that give evaluation its own fixed generators, far from the training seed's.
_EVAL_SEED_OFFSET = {"train": 1_000_003, "val": 2_000_003}

EvalCallback = Callable[[dict], Any]


# --- devices and processes ----------------------------------------------------------------


@dataclass
class Runtime:
    """Where this process trains and how it fits in the job."""

    device: torch.device
    dtype: str  # the autocast dtype actually used (may differ from the one asked for)
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    owns_process_group: bool = False  # we initialised torch.distributed, so we tear it down
    warnings: list[str] = field(default_factory=list)

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def ddp(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=getattr(torch, self.dtype))

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        if self.master:
            log.warning(message)


def resolve_device(cfg: TrainConfig, local_rank: int = 0,
                   world_size: int = 1) -> tuple[torch.device, str, list[str]]:
    """The device and autocast dtype to use for ``cfg``, with the warnings explaining any
    fallback. ``strict_device`` turns a fallback into a UserError."""
    notes: list[str] = []

    def fallback(problem: str, instead: str, fix: str) -> None:
        if cfg.strict_device:
            raise UserError(f"{problem}, and --strict_device forbids falling back; {fix}, "
                            "or drop --strict_device")
        notes.append(f"{problem}: {instead}; {fix} to silence this")

    want = cfg.device
    if want.startswith("cuda"):
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "no visible GPU"
            fallback(f"--device {want}: CUDA is not available here (torch {torch.__version__}, "
                     f"{build})", "training on the CPU instead (much slower)",
                     "pass --device cpu")
            device = torch.device("cpu")
        elif world_size > 1:
            device = torch.device("cuda", local_rank)  # torchrun gives each process its GPU
        else:
            device = torch.device(want)
            if (device.index or 0) >= torch.cuda.device_count():
                raise UserError(f"--device {want}: only {torch.cuda.device_count()} CUDA "
                                "device(s) here; use --device cuda or cuda:0")
    elif want == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            fallback("--device mps: Apple MPS is not available here",
                     "training on the CPU instead", "pass --device cpu")
            device = torch.device("cpu")
        else:
            device = torch.device("mps")
    else:
        device = torch.device("cpu")

    dtype = cfg.dtype
    if device.type == "cpu" and dtype == "float16":
        # CPU autocast to fp16 is slow and loses precision for nothing; fp32 is the safe choice.
        fallback("--dtype float16 is for GPUs", "on the CPU training runs in float32",
                 "pass --dtype float32 (or bfloat16)")
        dtype = "float32"
    elif device.type == "cuda" and dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        fallback(f"--dtype bfloat16: {torch.cuda.get_device_name(device)} has no bfloat16 "
                 "support", "using float16 with a gradient scaler", "pass --dtype float16")
        dtype = "float16"
    return device, dtype, notes


def _dist_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) as torchrun sets them; (0, 0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 0, 1
    return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"])), world


def _setup_runtime(cfg: TrainConfig) -> Runtime:
    rank, local_rank, world = _dist_env()
    device, dtype, notes = resolve_device(cfg, local_rank, world)
    rt = Runtime(device=device, dtype=dtype, rank=rank, local_rank=local_rank, world_size=world)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        rt.owns_process_group = True
    for note in notes:
        rt.warn(note)
    if device.type == "cuda":
        # TF32 matmuls: the float32 parts run on tensor cores, at no visible cost to the loss.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return rt


def _prepare_data(cfg: TrainConfig, rt: Runtime, data_dir: Path) -> None:
    """Prepare the dataset on first use, once per machine (local rank 0). The other processes
    wait for its meta.json (the dataset folder appears atomically, complete) rather than at a
    collective: a first preparation can outlast NCCL's timeout, and if rank 0 fails torchrun
    stops them all."""
    def prepare() -> None:
        data_mod.ensure_prepared(
            data_dir, source=cfg.data_source or None, langs=cfg.languages, form=cfg.data_form,
            block_size=cfg.block_size, seed=cfg.seed, encoding=cfg.encoding,
            progress=rt.master)

    if rt.local_rank != 0:
        while not (data_dir / "meta.json").exists():
            time.sleep(1.0)
    prepare()  # on the others: only checks that the dataset fits this run


# --- data, schedule -------------------------------------------------------------------------


class BatchSampler:
    """Random windows of ``block_size + 1`` tokens from a 1-D token memmap, drawn by a seeded
    ``torch.Generator``. Every process draws the same global batch (batch_size x world_size
    starts) and keeps its own slice, so the sampler's state is the same on every rank and
    one saved state resumes them all."""

    def __init__(self, tokens: np.ndarray, *, block_size: int, batch_size: int, seed: int,
                 device: torch.device, rank: int = 0, world_size: int = 1, name: str = "train"):
        if len(tokens) <= block_size + 1:
            raise UserError(f"the {name} split has {len(tokens)} tokens, too few for "
                            f"block_size {block_size}; use a smaller --block_size or more data")
        self.tokens = tokens
        self.block_size, self.batch_size = block_size, batch_size
        self.rank, self.world_size = rank, world_size
        self.device = device
        self.generator = torch.Generator().manual_seed(seed)
        self.batches_drawn = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: (batch_size, block_size) int64 on the device; y is x shifted by one."""
        T, B = self.block_size, self.batch_size
        starts = torch.randint(len(self.tokens) - T - 1, (B * self.world_size,),
                               generator=self.generator)[self.rank * B:(self.rank + 1) * B]
        self.batches_drawn += 1
        windows = np.stack([self.tokens[s:s + T + 1] for s in starts.tolist()]).astype(np.int64)
        batch = torch.from_numpy(windows)  # (B, T+1)
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        else:
            batch = batch.to(self.device)
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "batches_drawn": self.batches_drawn,
                "world_size": self.world_size, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.batches_drawn = int(state["batches_drawn"])


class WarmupCosineSchedule:
    """Linear warmup to ``learning_rate``, cosine decay to ``min_lr`` at ``lr_decay_iters``,
    then flat. A pure function of the iteration: its state is only where it is, so a resume
    may change warmup/decay settings and the new ones apply from there on."""

    def __init__(self, cfg: TrainConfig):
        self.learning_rate, self.min_lr = cfg.learning_rate, cfg.min_lr
        self.warmup_iters, self.lr_decay_iters = cfg.warmup_iters, cfg.lr_decay_iters
        self.last_iter = 0

    def lr(self, it: int) -> float:
        if it < self.warmup_iters:
            return self.learning_rate * (it + 1) / (self.warmup_iters + 1)
        if it >= self.lr_decay_iters:
            return self.min_lr
        span = max(self.lr_decay_iters - self.warmup_iters, 1)
        ratio = (it - self.warmup_iters) / span
        return self.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (self.learning_rate - self.min_lr)

    def step_to(self, it: int, optimizer: torch.optim.Optimizer) -> float:
        self.last_iter = it
        lr = self.lr(it)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict[str, Any]:
        return {"last_iter": self.last_iter, "learning_rate": self.learning_rate,
                "min_lr": self.min_lr, "warmup_iters": self.warmup_iters,
                "lr_decay_iters": self.lr_decay_iters}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_iter = int(state["last_iter"])


def new_training_log() -> dict[str, list]:
    """The training_log.json layout: the seed's keys plus lr, tokens_seen and elapsed_s."""
    return {**{k: [] for k in LOG_KEYS}, "top_activating_words": []}


# --- throughput --------------------------------------------------------------------------------


def flops_per_token(model: torch.nn.Module, cfg: TrainConfig, distinct_tokens: float) -> float:
    """Useful training FLOPs per token, for MFU: :func:`backpack_nb.models.flops.train_flops`
    (the count the benchmark uses: matmul weights, causal attention and mixing, the sense
    network once per distinct token of a micro-batch) divided by the micro-batch's tokens."""
    step = train_flops(model, cfg.batch_size, cfg.block_size, distinct_tokens)
    return step["total"] / (cfg.batch_size * cfg.block_size)


# Dense bf16/fp16 tensor-core peaks (FLOP/s) by GPU name; fp32 uses TF32 at half of these.
_GPU_PEAKS = [("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12),
              ("A10G", 70e12), ("L4", 121e12), ("4090", 165e12), ("3090", 71e12),
              ("V100", 125e12), ("T4", 65e12)]
_cpu_peak: float | None = None


def peak_flops(device: torch.device, dtype: str) -> float | None:
    """Peak FLOP/s for MFU: a table for known GPUs; on the CPU a float32 matmul measured in
    this process (no table fits all CPUs). None where unknown."""
    global _cpu_peak
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in _GPU_PEAKS:
            if key in name:
                return peak if dtype != "float32" else peak / 2
        return None
    if device.type != "cpu":
        return None
    if _cpu_peak is None:
        g = torch.Generator().manual_seed(0)  # never the global RNG: a resume must not shift it
        a, b = torch.randn(1024, 1024, generator=g), torch.randn(1024, 1024, generator=g)
        a @ b  # warm up the kernel
        t0, reps = time.perf_counter(), 8
        for _ in range(reps):
            a @ b
        _cpu_peak = reps * 2 * 1024**3 / (time.perf_counter() - t0)
    return _cpu_peak


# --- progress display -------------------------------------------------------------------------


class _Progress:
    """A tqdm bar in terminals and notebooks, plain lines when output goes to a file."""

    def __init__(self, enabled: bool, total: int, initial: int, desc: str):
        self.enabled = enabled
        self.bar = None
        if show_bars(enabled):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)
        self.total = total

    def update(self, iter_num: int, info: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(info, refresh=False)
            self.bar.update(iter_num - self.bar.n)
        else:
            print(f"iter {iter_num}/{self.total} | {info}", flush=True)

    def line(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --- signals ----------------------------------------------------------------------------------


class Aborted(KeyboardInterrupt):
    """A second SIGTERM/SIGINT: stop at once, without saving the current step."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class TrainingDiverged(UserError):
    """The loss or the weights became NaN or infinite; nothing was saved after that."""


class _StopRequest:
    """SIGTERM/SIGINT ask the loop to stop after the current step; a second one aborts."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            self.restore()
            raise Aborted(signum)
        self.signum = signum
        print(f"\nreceived {signal.Signals(signum).name}: finishing this step, saving, then "
              "stopping (send it again to abort without saving)", file=sys.stderr, flush=True)


# --- the loop --------------------------------------------------------------------------------


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _git_commit() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=project_root(), capture_output=True,
                                 text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def _check_resumable(state: dict, path: Path, cfg: TrainConfig, data_hash: str,
                     vocab_size: int) -> None:
    """A checkpoint resumes only into the same model shape and the same dataset; the
    schedule (max_iters, intervals, learning rates) may change."""
    saved = state["config"]
    # sparse_table changes the optimizer state's layout, so it is fixed for a run too
    keys = dict.fromkeys(model_shape_keys(saved.get("model_type", "backpack"))
                         + model_shape_keys(cfg.model_type) + ("sparse_table",))
    problems = [f"{k}: checkpoint has {saved.get(k)!r}, this run has {getattr(cfg, k)!r}"
                for k in keys if saved.get(k, False) != getattr(cfg, k)]
    if state["model_config"]["vocab_size"] != vocab_size:
        problems.append(f"vocab_size: checkpoint has {state['model_config']['vocab_size']}, "
                        f"the dataset has {vocab_size}")
    if state["data"]["meta_hash"] != data_hash:
        problems.append(f"dataset: checkpoint was trained on {state['data']['data_dir']} "
                        f"(meta hash {state['data']['meta_hash'][:12]}), this run reads "
                        f"{cfg.data_dir} (meta hash {data_hash[:12]})")
    if problems:
        raise UserError(
            f"cannot resume from {path}: it does not match this run's model shape or data:\n"
            + "\n".join(f"  - {p}" for p in problems)
            + "\nResume with the checkpoint's values (the same --config and shape options), "
              "or start a new run in another --out_dir."
        )


# Top-level entries of a training checkpoint, and the nested ones read before loading.
_STATE_LAYOUT = {
    "model": dict, "model_type": str, "model_config": dict, "config": dict, "optimizer": dict,
    "scaler": dict, "schedule": dict, "sampler": dict, "rng": list, "progress": dict,
    "training_log": dict, "probe_words": list, "tokenizer": dict, "data": dict, "history": dict,
}
_NESTED_KEYS = {
    "model_config": ("vocab_size",), "data": ("data_dir", "meta_hash"),
    "sampler": ("generator", "batches_drawn", "world_size"), "schedule": ("last_iter",),
    "progress": ("iter_num", "best_val_loss", "tokens_seen", "elapsed_s"),
    "history": ("resumed_at",),
}


def _check_layout(state: dict, path: Path) -> None:
    """Every entry a resume reads is there, of the right kind (a checkpoint cut short by a
    bug, edited by hand, or a best.pt copied over ckpt.pt is refused with a clear message)."""
    missing = [k for k in _STATE_LAYOUT if k not in state]
    wrong = [f"{k} is a {type(state[k]).__name__}, not a {t.__name__}"
             for k, t in _STATE_LAYOUT.items() if k in state and not isinstance(state[k], t)]
    for k, nested in _NESTED_KEYS.items():
        if isinstance(state.get(k), dict):
            missing += [f"{k}.{n}" for n in nested if n not in state[k]]
    if missing or wrong:
        hint = (" (it looks like a best.pt, which keeps the weights only and cannot be resumed)"
                if {"optimizer", "sampler", "progress"} <= set(missing) else "")
        raise UserError(f"checkpoint {path} is incomplete{hint}: "
                        + "; ".join(([f"missing {', '.join(missing)}"] if missing else []) + wrong))


def _check_weights_fit(weights: dict, model: torch.nn.Module, path: Path) -> None:
    """The checkpoint's weights have exactly this model's names and shapes."""
    got = ckpt_io.clean_state_dict(weights)
    expected = model.state_dict()
    problems = [f"missing {k}" for k in expected if k not in got]
    problems += [f"unexpected {k}" for k in got if k not in expected]
    for k, v in expected.items():
        if k in got and not isinstance(got[k], torch.Tensor):
            problems.append(f"{k} is not a tensor")
        elif k in got and tuple(got[k].shape) != tuple(v.shape):
            problems.append(f"{k} has shape {tuple(got[k].shape)}, the model {tuple(v.shape)}")
    if problems:
        more = f" and {len(problems) - 4} more" if len(problems) > 4 else ""
        raise UserError(f"checkpoint {path} does not fit this run's model: "
                        f"{'; '.join(problems[:4])}{more}")


def _check_token_ids(splits: dict[str, np.ndarray], vocab_size: int, data_dir: Path) -> None:
    for split, tokens in splits.items():
        data_mod.check_token_ids(tokens, vocab_size, data_dir / f"{split}.bin")


def _all_finite(model: torch.nn.Module) -> bool:
    return bool(torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all())


def train(cfg: TrainConfig, *, callback: EvalCallback | None = None) -> dict[str, Any]:
    """Train (or resume) the run described by ``cfg``. ``callback(record)`` is called on rank 0
    after each evaluation with the eval record (iteration, train_loss, val_loss, lr,
    tokens_seen, elapsed_s, best_val_loss, improved, top_activating_words), e.g. for a live
    plot. Returns a summary dict; raises UserError for bad input and never calls sys.exit."""
    rt = _setup_runtime(cfg)
    stop = _StopRequest()
    try:
        stop.install()
        # one trainer at a time in a run folder (rank 0 writes, so rank 0 holds it)
        with ckpt_io.run_lock(resolve_in_root(cfg.out_dir), enabled=rt.master):
            trainer = Trainer(cfg, rt, callback=callback)
            result = trainer.run(stop)
            if rt.ddp:
                # Leave together: a rank that tears gloo down while its peer is still writing
                # the final checkpoint can abort ("terminate called without an active
                # exception").
                dist.barrier()
        return result
    finally:
        stop.restore()
        if rt.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()


class Trainer:
    """One run: data, model, optimizer, scaler, schedule, sampler, log and RNGs. Its
    :meth:`state_dict` is the checkpoint and :meth:`load_state_dict` resumes from one."""

    def __init__(self, cfg: TrainConfig, rt: Runtime, *, callback: EvalCallback | None = None):
        self.cfg, self.rt, self.callback = cfg, rt, callback
        self.out_dir = resolve_in_root(cfg.out_dir)
        existing = ckpt_io.existing_checkpoints(self.out_dir)
        if cfg.init_from == "scratch" and existing and not cfg.overwrite:
            raise UserError(
                f"{self.out_dir} already holds a run ({', '.join(p.name for p in existing)}); "
                "continue it with --init_from resume, pick another --out_dir, or pass "
                "--overwrite to replace it"
            )
        if cfg.init_from == "resume":
            ckpt_io.require_checkpoint(self.out_dir)  # before the data and the model: fail fast

        # Data: prepared on first use (by rank 0), then the compact-vocabulary tokenizer.
        self.data_dir = data_mod.resolve_data_dir(cfg.data_dir)
        _prepare_data(cfg, rt, self.data_dir)
        self.meta = data_mod.load_meta(self.data_dir)
        self.data_hash = data_mod.meta_hash(self.data_dir)
        self.tok = tokenizer_mod.load(self.data_dir)
        self.splits = {split: data_mod.load_tokens(self.data_dir, split)
                       for split in ("train", "val")}
        _check_token_ids(self.splits, self.tok.vocab_size, self.data_dir)

        if cfg.init_from == "scratch" and cfg.overwrite and rt.master:
            for name in (ckpt_io.CKPT_NAME, ckpt_io.PREV_NAME, ckpt_io.BEST_NAME, LOG_NAME):
                (self.out_dir / name).unlink(missing_ok=True)  # never resume the replaced run

        torch.manual_seed(cfg.seed + rt.rank)  # same weights (DDP syncs them), own dropout
        self.model_config = ModelConfig.from_params(cfg.to_dict(), self.tok.vocab_size)
        self.raw_model = build_model(cfg.model_type, self.model_config).to(rt.device)
        self.optimizer = make_optimizer(
            self.raw_model, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
            weight_decay=cfg.weight_decay, sparse_table=cfg.sparse_table)
        self.scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == "float16")
        self.schedule = WarmupCosineSchedule(cfg)
        self.sampler = BatchSampler(
            self.splits["train"], block_size=cfg.block_size, batch_size=cfg.batch_size,
            seed=cfg.seed, device=rt.device, rank=rt.rank, world_size=rt.world_size)
        self.log = new_training_log()
        self.progress = {"iter_num": 0, "best_val_loss": float("inf"), "best_iter": None,
                         "tokens_seen": 0, "elapsed_s": 0.0, "last_eval_iter": None}
        self.history = {"started_at": _now(), "resumed_at": []}
        self.probe_words: list[str] = list(cfg.probe_words)

        self.raw_model.set_activation_checkpointing(cfg.activation_checkpointing)
        self.model: torch.nn.Module = self.raw_model
        self.compiled = cfg.compile if cfg.compile is not None else rt.device.type == "cuda"
        if self.compiled:
            self.model = torch.compile(self.raw_model)
        self.eval_model = self.model  # evaluation skips DDP's gradient hooks
        if rt.ddp:
            self.model = DDP(self.model,
                             device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)

        self.tokens_per_iter = (cfg.batch_size * cfg.block_size
                                * cfg.gradient_accumulation_steps * rt.world_size)
        # the sense network's share depends on how many distinct tokens a batch holds
        self.distinct_tokens = mean_distinct_tokens(self.splits["train"], cfg.batch_size,
                                                    cfg.block_size)
        self.flops_per_token = flops_per_token(self.raw_model, cfg, self.distinct_tokens)
        self.peak_flops = peak_flops(rt.device, rt.dtype)

        # Non-finite losses since the last check, counted on the device (no sync per step).
        self._nonfinite = torch.zeros((), dtype=torch.int32, device=rt.device)
        self._checked_iter = 0
        self.resumed_from: Path | None = None
        if cfg.init_from == "resume":  # last: it restores the RNGs
            _, self.resumed_from = ckpt_io.load_checkpoint(self.out_dir, accept=self._resume)
            self.history["resumed_at"].append(_now())
        if cfg.model_type == "backpack" and not self.probe_words:
            val_by_lang = {lang: data_mod.load_tokens(self.data_dir, "val", lang)
                           for lang in self.meta["langs"]}
            self.probe_words = senses.frequent_content_words(
                self.splits["train"], self.tok, val_by_lang, cfg.probe_words_per_language)

    # -- checkpoint state ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint: tensors and plain Python values only (weights_only-loadable).
        Collective under DDP (every rank's RNG state is gathered)."""
        rng = [ckpt_io.rng_state()]
        if self.rt.ddp:  # ranks differ (per-rank dropout seeds): keep all of them
            rng = [None] * self.rt.world_size
            dist.all_gather_object(rng, ckpt_io.rng_state())
        return {
            "format": CHECKPOINT_FORMAT,
            "model_type": self.cfg.model_type,
            "model": self.raw_model.state_dict(),  # the bare model: no _orig_mod./module.
            "model_config": self.model_config.to_dict(),
            "config": self.cfg.to_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "schedule": self.schedule.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": rng,
            "iter_num": self.progress["iter_num"],
            "best_val_loss": self.progress["best_val_loss"],
            "progress": dict(self.progress),
            "training_log": self.log,
            "probe_words": list(self.probe_words),
            "tokenizer": self.tok.state_dict(),
            "data": {"data_dir": str(self.data_dir), "meta_hash": self.data_hash,
                     "langs": list(self.meta["langs"]), "encoding": self.meta["encoding"]},
            "history": self.history,
            "saved_at": _now(),
        }

    def _resume(self, state: dict[str, Any], path: Path) -> None:
        """Continue from ``state`` if it fits this run; otherwise a UserError naming ``path``
        and the problem (load_checkpoint then tries ckpt.prev.pt, which, if it fits, replaces
        everything this call may have loaded)."""
        _check_layout(state, path)
        _check_resumable(state, path, self.cfg, self.data_hash, self.tok.vocab_size)
        _check_weights_fit(state["model"], self.raw_model, path)
        try:
            self.load_state_dict(state)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as exc:
            first = (str(exc).strip().splitlines() or [""])[0]
            raise UserError(f"checkpoint {path} is damaged ({type(exc).__name__}: {first}); "
                            "it cannot be resumed") from None
        self._checked_iter = self.progress["iter_num"]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint made by :meth:`state_dict` (already checked to match).
        The config stays this run's own: schedule keys may have changed."""
        self.raw_model.load_state_dict(ckpt_io.clean_state_dict(state["model"]))
        self.optimizer.load_state_dict(state["optimizer"])  # moves the moments to the device
        self.scaler.load_state_dict(state["scaler"])
        self.schedule.load_state_dict(state["schedule"])
        self.sampler.load_state_dict(state["sampler"])
        self.log = state["training_log"]
        self.progress.update(state["progress"])
        self.history = {**state["history"], "resumed_at": list(state["history"]["resumed_at"])}
        self.probe_words = list(self.cfg.probe_words) or list(state["probe_words"])
        saved_world = state["sampler"]["world_size"]
        if saved_world != self.rt.world_size:
            self.rt.warn(f"resuming a {saved_world}-process run with {self.rt.world_size} "
                         "processes: training continues, but not bit-exactly")
        if self.rt.rank < len(state["rng"]):
            ckpt_io.set_rng_state(state["rng"][self.rt.rank])

    def save(self, *, best: bool = False) -> None:
        """ckpt.pt (previous kept as ckpt.prev.pt) and, for a new best, best.pt (weights and
        what evaluation needs, no optimizer). Rank 0 writes; all ranks must call it."""
        t0 = time.perf_counter()
        if not _all_finite(self.raw_model):  # every rank: the weights are the same on all
            raise TrainingDiverged(self._diverged("the weights hold NaN or infinite values"))
        state = self.state_dict()
        if not self.rt.master:
            return
        if best:
            # best.pt before ckpt.pt: a crash between the two resumes from the older ckpt.pt,
            # which replays this evaluation and writes the same best.pt again. The other order
            # could leave a best.pt older than the best_iter that ckpt.pt records.
            keep = ("format", "model_type", "model", "model_config", "config", "iter_num",
                    "best_val_loss", "probe_words", "tokenizer", "data", "saved_at")
            ckpt_io.save_checkpoint({k: state[k] for k in keep}, self.out_dir,
                                    ckpt_io.BEST_NAME)
        path = ckpt_io.save_checkpoint(state, self.out_dir)
        self.display.line(
            f"saved {path.name}{' and best.pt' if best else ''} at iteration "
            f"{self.progress['iter_num']} ({path.stat().st_size / 2**20:.1f} MiB, "
            f"{time.perf_counter() - t0:.2f} s)")

    # -- evaluation and steps ----------------------------------------------------------------

    @torch.no_grad()
    def estimate_loss(self) -> dict[str, float]:
        """Mean loss over ``eval_iters`` batches of each split. The same fixed batches at every
        evaluation (a smoother curve), drawn from their own generators (evaluating never
        changes the training run); under DDP the ranks share the batches out."""
        cfg, rt = self.cfg, self.rt
        self.eval_model.eval()
        losses = {}
        for split, tokens in self.splits.items():
            fixed = BatchSampler(tokens, block_size=cfg.block_size, batch_size=cfg.batch_size,
                                 seed=cfg.seed + _EVAL_SEED_OFFSET[split], device=rt.device,
                                 name=split)
            total = torch.zeros((), dtype=torch.float64, device=rt.device)
            for k in range(cfg.eval_iters):
                x, y = fixed.next_batch()
                if k % rt.world_size == rt.rank:
                    with rt.autocast():
                        _, loss = self.eval_model(x, y)
                    total += loss.double()
            if rt.ddp:
                dist.all_reduce(total)
            losses[split] = total.item() / cfg.eval_iters
        self.eval_model.train()
        return losses

    def evaluate(self, lr: float) -> None:
        """Evaluate at the current iteration: append to the log, write training_log.json,
        call the callback, and save when the val loss improved."""
        it = self.progress["iter_num"]
        losses = self.estimate_loss()
        self.progress["last_eval_iter"] = it
        self.progress["elapsed_s"] = self._elapsed()
        improved = losses["val"] < self.progress["best_val_loss"]
        if improved:
            self.progress["best_val_loss"], self.progress["best_iter"] = losses["val"], it
        record = {"iteration": it, "train_loss": losses["train"], "val_loss": losses["val"],
                  "lr": lr, "tokens_seen": self.progress["tokens_seen"],
                  "elapsed_s": round(self.progress["elapsed_s"], 3)}
        for key, value in zip(LOG_KEYS, record.values()):
            self.log[key].append(value)
        words = None
        if self.rt.master:
            if self.cfg.model_type == "backpack":
                words = senses.probe_records(self.raw_model, self.tok, self.probe_words,
                                             self.cfg.sense_top_k)
                self.log["top_activating_words"].append({"iteration": it, "words": words})
            ckpt_io.write_json(self.out_dir / LOG_NAME, self.log)
            self.display.line(f"eval {it}: train loss {losses['train']:.4f}, val loss "
                              f"{losses['val']:.4f}{' (best)' if improved else ''}")
            if self.callback is not None:
                self.callback({**record, "best_val_loss": self.progress["best_val_loss"],
                               "improved": improved, "top_activating_words": words})
        if improved and it > 0:
            self.save(best=True)
            self.last_saved = it

    def train_step(self) -> torch.Tensor:
        """One optimizer step over gradient_accumulation_steps micro-batches; returns the
        last micro-batch's loss (scaled down by the accumulation)."""
        cfg = self.cfg
        accum = cfg.gradient_accumulation_steps
        for micro in range(accum):
            x, y = self.sampler.next_batch()
            # Under DDP, all-reduce gradients once per step, on the last micro-batch.
            skip_sync = self.rt.ddp and micro < accum - 1
            with self.model.no_sync() if skip_sync else contextlib.nullcontext():
                with self.rt.autocast():
                    _, loss = self.model(x, y)
                    loss = loss / accum
                self._nonfinite += (~torch.isfinite(loss.detach())).to(torch.int32)
                self.scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            clip_grad_norm_(self.raw_model.parameters(), cfg.grad_clip)  # sparse-aware
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.progress["iter_num"] += 1
        self.progress["tokens_seen"] += self.tokens_per_iter
        return loss

    # -- the loop ------------------------------------------------------------------------------

    def _check_finite(self) -> None:
        """Raise TrainingDiverged if a loss since the last check was NaN or infinite (one
        sync; called before evaluating, saving and printing a loss). In float16 the gradient
        scaler has skipped those steps: warn and go on."""
        count = self._nonfinite
        if self.rt.ddp:  # all ranks decide together, or the others would hang
            count = count.clone()
            dist.all_reduce(count)
        n = int(count.item())
        it = self.progress["iter_num"]
        if n and not self.scaler.is_enabled():
            raise TrainingDiverged(self._diverged(
                f"the training loss became NaN or infinite ({n} micro-batch(es) between "
                f"iteration {self._checked_iter} and {it})"))
        if n:
            self.rt.warn(f"{n} micro-batch(es) between iteration {self._checked_iter} and {it} "
                         "had a non-finite float16 loss; the gradient scaler skipped those "
                         f"steps (scale now {self.scaler.get_scale():g})")
            self._nonfinite.zero_()
        self._checked_iter = it

    def _diverged(self, what: str) -> str:
        ckpt = self.out_dir / ckpt_io.CKPT_NAME
        kept = (f"{ckpt} (iteration {self.last_saved}) is intact" if self.last_saved > 0
                and ckpt.exists() else "no checkpoint was written")
        return (f"{what}; stopped without evaluating or saving, so {kept}. Lower "
                f"--learning_rate (now {self.cfg.learning_rate:g}), raise --warmup_iters or "
                f"set --grad_clip (now {self.cfg.grad_clip:g}), or train in float32, then "
                "continue with --init_from resume")

    def _elapsed(self) -> float:
        return self._elapsed_base + time.perf_counter() - self._t_run

    def _stop_reason(self, stop: _StopRequest) -> str | None:
        it = self.progress["iter_num"]
        reason = None
        if stop.signum is not None:
            reason = signal.Signals(stop.signum).name
        elif self.cfg.stop_after is not None and it >= self.cfg.stop_after:
            reason = "stop_after"
        if self.rt.ddp:  # all ranks must stop at the same step, or the others hang
            flag = torch.tensor([1 if reason else 0], device=self.rt.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and not reason:
                reason = "peer"  # another rank got the signal
        return reason

    def run(self, stop: _StopRequest) -> dict[str, Any]:
        """Train to ``max_iters`` (or until stopped) and return a summary."""
        cfg, rt, prog = self.cfg, self.rt, self.progress
        run_info = self._run_info()
        # A resumed session that trains no step (max_iters already reached) keeps the
        # throughput the earlier sessions measured instead of replacing it with nothing.
        earlier = {}
        if cfg.init_from == "resume" and (self.out_dir / RUN_NAME).exists():
            try:
                old = json.loads((self.out_dir / RUN_NAME).read_text(encoding="utf-8"))
                earlier = {k: old.get(k) for k in ("tokens_per_s", "mfu")}
            except (OSError, ValueError):
                earlier = {}
        stale: list[Path] = []
        if rt.master:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            stale = ckpt_io.remove_stale_temps(self.out_dir)  # left by a crash mid-save
            ckpt_io.write_json(self.out_dir / RUN_NAME, {**run_info, "status": "running"})
        self.display = _Progress(rt.master, cfg.max_iters, prog["iter_num"], cfg.run_name)
        if stale:
            self.display.line(f"removed {len(stale)} temporary file(s) left by an interrupted "
                              f"save: {', '.join(p.name for p in stale)}")
        params = run_info["parameters"]
        parts = ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in params.items() if k != "total")
        self.display.line(
            f"{cfg.model_type}: {params['total'] / 1e6:.2f}M parameters ({parts}); vocab "
            f"{self.tok.vocab_size:,}; {rt.device} {rt.dtype}{' compiled' if self.compiled else ''}"
            f"{', activation checkpointing' if cfg.activation_checkpointing else ''}"
            f"; {rt.world_size} process(es); {self.tokens_per_iter:,} tokens/iteration")
        if self.resumed_from is not None:
            self.display.line(f"resumed at iteration {prog['iter_num']} from "
                              f"{self.resumed_from.name} (best val loss "
                              f"{prog['best_val_loss']:.4f})")
        if prog["iter_num"] >= cfg.max_iters:
            self.display.line(f"iteration {prog['iter_num']} already reaches max_iters "
                              f"{cfg.max_iters}: nothing to train (raise --max_iters to continue)")

        self.model.train()
        self.last_saved = prog["iter_num"] if cfg.init_from == "resume" else -1
        self._t_run, self._elapsed_base = time.perf_counter(), prog["elapsed_s"]
        # Throughput counts optimizer steps only (not evaluation or saving); the GPU is
        # synced at each log line by loss.item(), so the time up to it covers queued work.
        # The run's figure leaves out the first window (compilation, CUDA warm-up) when
        # there is a later one.
        window_dt, window_iters = 0.0, 0
        windows: list[tuple[float, int]] = []  # (seconds, tokens) per log window
        stopped: str | None = None
        while True:
            it = prog["iter_num"]
            lr = self.schedule.step_to(it, self.optimizer)
            done = it >= cfg.max_iters
            stopped = None if done else self._stop_reason(stop)  # `done` agrees on all ranks
            # A stop saves at once and leaves a due evaluation to the resume, which runs it
            # (evaluation never touches the training RNGs, so the run stays bit-exact).
            evaluate = (not stopped and (it % cfg.eval_interval == 0 or done)
                        and it != prog["last_eval_iter"])
            save = it > 0 and it != self.last_saved and (
                done or stopped or it % cfg.checkpoint_interval == 0)
            if evaluate or save:
                self._check_finite()
            if evaluate:
                self.evaluate(lr)  # saves ckpt.pt and best.pt on an improvement
            if save and it != self.last_saved:
                self.save()
                self.last_saved = it
            if done or stopped:
                break

            t_step = time.perf_counter()
            loss = self.train_step()
            log_now = prog["iter_num"] % cfg.log_interval == 0 or prog["iter_num"] == cfg.max_iters
            if log_now:
                loss_value = loss.item() * cfg.gradient_accumulation_steps  # syncs the GPU
                self._check_finite()
            window_dt += time.perf_counter() - t_step
            window_iters += 1
            if log_now:
                windows.append((window_dt, window_iters * self.tokens_per_iter))
                tok_s = window_iters * self.tokens_per_iter / window_dt
                mfu = self.flops_per_token * tok_s / self.peak_flops if self.peak_flops else None
                self.display.update(prog["iter_num"], f"loss {loss_value:.4f} | lr {lr:.2e} | "
                                    f"{tok_s:,.0f} tok/s | mfu "
                                    f"{f'{100 * mfu:.1f}%' if mfu else '-'}")
                window_dt, window_iters = 0.0, 0
        self.display.close()

        prog["elapsed_s"] = self._elapsed()
        steady = windows[1:] or windows
        seconds = sum(w[0] for w in steady)
        tok_s = sum(w[1] for w in steady) / seconds if seconds else None
        mfu = self.flops_per_token * tok_s / self.peak_flops if (tok_s and self.peak_flops) else None
        if tok_s is None:  # no step this session: keep the last measured rate
            tok_s, mfu = earlier.get("tokens_per_s"), earlier.get("mfu")
        result = {
            "out_dir": str(self.out_dir), "iter_num": prog["iter_num"],
            "best_val_loss": prog["best_val_loss"], "best_iter": prog["best_iter"],
            "stopped": stopped, "tokens_seen": prog["tokens_seen"],
            "tokens_per_s": tok_s, "mfu": mfu, "device": str(rt.device), "dtype": rt.dtype,
            "world_size": rt.world_size, "parameters": params,
            "warnings": list(rt.warnings), "training_log": self.log,
        }
        if rt.master:
            ckpt_io.write_json(self.out_dir / RUN_NAME, {
                **run_info, "status": "interrupted" if stopped else "finished",
                "stopped_by": stopped, "ended_at": _now(), "iterations": prog["iter_num"],
                "tokens_seen": prog["tokens_seen"], "tokens_per_s": tok_s, "mfu": mfu})
            if stopped:
                print(f"stopped at iteration {prog['iter_num']} ({stopped}); checkpoint in "
                      f"{self.out_dir / ckpt_io.CKPT_NAME}; continue with --init_from resume",
                      flush=True)
        return result

    def _run_info(self) -> dict[str, Any]:
        """run.json: what ran, on what, from which code and data."""
        cfg, rt = self.cfg, self.rt
        cuda = rt.device.type == "cuda"
        return {
            "run_name": cfg.run_name, "model_type": cfg.model_type,
            "config": cfg.to_dict(), "model_config": self.model_config.to_dict(),
            "parameters": self.raw_model.num_parameters(by_part=True),
            "git": _git_commit() if rt.master else None,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "cuda": torch.version.cuda,
                         "cudnn": torch.backends.cudnn.version() if cuda else None,
                         "numpy": np.__version__},
            "device": {"requested": cfg.device, "used": str(rt.device),
                       "name": torch.cuda.get_device_name(rt.device) if cuda
                       else platform.processor() or platform.machine(),
                       "dtype_requested": cfg.dtype, "dtype_used": rt.dtype,
                       "world_size": rt.world_size,
                       "backend": dist.get_backend() if rt.ddp else None},
            "dataset": {"data_dir": str(self.data_dir), "meta_hash": self.data_hash,
                        "vocab_size": self.tok.vocab_size, "langs": self.meta["langs"],
                        "encoding": self.meta["encoding"],
                        "tokens": {k: len(v) for k, v in self.splits.items()}},
            "effective_batch": {"sequences": self.tokens_per_iter // cfg.block_size,
                                "tokens": self.tokens_per_iter},
            "probe_words": self.probe_words,
            "compiled": self.compiled, "distinct_tokens_per_batch": self.distinct_tokens,
            "flops_per_token": self.flops_per_token, "peak_flops": self.peak_flops,
            **self.history, "warnings": rt.warnings,
        }
