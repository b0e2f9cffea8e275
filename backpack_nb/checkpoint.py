"""Checkpoints that survive a crash at any moment and load without trusting pickle.

A checkpoint is a plain dict of ``state_dict()``s (model, optimizer, scaler, schedule, data
sampler, RNG) plus plain Python values, torchtitan style. It is written to a temporary file in
the same folder, fsynced and renamed over ``ckpt.pt``, so ``ckpt.pt`` is always either the old
or the new complete file; the one it replaces is kept as ``ckpt.prev.pt``. Everything in it is a
tensor or a plain Python type, so ``torch.load(path, weights_only=True, map_location="cpu")``
reads it: resuming never unpickles code and never needs GPU memory for a second copy.

What a training checkpoint holds is defined by ``training.Trainer.state_dict``: ``model``
(bare weights), ``model_type``, ``model_config``, ``config`` (the TrainConfig), ``optimizer``,
``scaler``, ``schedule``, ``sampler``, ``rng`` (one entry per process), ``iter_num``,
``best_val_loss``, ``progress``, ``training_log``, ``probe_words``, ``tokenizer`` (encoding
and compact vocabulary), ``data`` (dataset folder and meta hash) and ``history``. ``best.pt``
keeps the weights and what evaluation needs, without the optimizer.
"""

from __future__ import annotations

import io
import logging
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from backpack_nb.errors import UserError

log = logging.getLogger(__name__)

CKPT_NAME = "ckpt.pt"
PREV_NAME = "ckpt.prev.pt"
BEST_NAME = "best.pt"

# Read once: os.umask can only be read by setting it, which is not thread-safe to repeat.
_UMASK = os.umask(0o022)
os.umask(_UMASK)

# torch.compile wraps the model (keys gain "_orig_mod.") and DDP wraps it again ("module.").
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


# --- atomic writes ---------------------------------------------------------------------------


def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], None],
                 *, before_replace: Callable[[], None] | None = None) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it and rename it over
    ``path``; then fsync the folder so the rename itself survives a power cut. A crash leaves
    either the old file or the new one, never half of one. ``before_replace`` runs once the new
    file is complete, just before the rename (used to keep the old file under another name)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual open() mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (training_log.json, run.json)."""
    import json

    data = (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    return atomic_write(path, lambda f: f.write(data))


# --- save / load -------------------------------------------------------------------------------


def save_checkpoint(state: Mapping[str, Any], out_dir: str | os.PathLike,
                    name: str = CKPT_NAME, *, keep_previous: bool = True) -> Path:
    """Write ``state`` to ``out_dir/name`` atomically. With ``keep_previous`` the file it
    replaces becomes ``ckpt.prev.pt`` (only for ``ckpt.pt``): if the new one is ever found
    damaged, the previous good one is still there."""
    out_dir = Path(out_dir)
    target = out_dir / name

    def keep_old() -> None:
        # Runs after the new file is fully on disk: the old ckpt.pt becomes ckpt.prev.pt by a
        # rename, and a crash before the next rename leaves ckpt.prev.pt to fall back to.
        if keep_previous and name == CKPT_NAME and target.exists():
            os.replace(target, out_dir / PREV_NAME)

    return atomic_write(target, lambda f: torch.save(dict(state), f), before_replace=keep_old)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load one checkpoint file onto the CPU with ``weights_only=True``; a missing, truncated
    or foreign file is a UserError naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip/pickle errors come in many types; all mean "unreadable"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"checkpoint {path} is unreadable ({first}); it may be truncated "
                        "or not a backpack_nb checkpoint") from None
    if not isinstance(state, dict) or "model" not in state:
        raise UserError(f"checkpoint {path} holds no model weights; it is not a "
                        "backpack_nb checkpoint")
    return state


def existing_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """The resumable checkpoints in ``out_dir`` (ckpt.pt, ckpt.prev.pt), newest role first."""
    out_dir = Path(out_dir)
    return [p for p in (out_dir / CKPT_NAME, out_dir / PREV_NAME) if p.exists()]


def load_checkpoint(out_dir: str | os.PathLike) -> tuple[dict[str, Any], Path]:
    """Load ``out_dir/ckpt.pt``, or ``ckpt.prev.pt`` with a warning when ckpt.pt is missing or
    unreadable. Returns the state and the file it came from."""
    out_dir = Path(out_dir)
    ckpt, prev = out_dir / CKPT_NAME, out_dir / PREV_NAME
    if not ckpt.exists() and not prev.exists():
        raise UserError(
            f"--init_from resume: no checkpoint in {out_dir} (neither {CKPT_NAME} nor "
            f"{PREV_NAME}); check --out_dir, or start with --init_from scratch"
        )
    try:
        return read_checkpoint(ckpt), ckpt
    except UserError as exc:
        if not prev.exists():
            raise
        log.warning("%s; resuming from the previous checkpoint %s instead", exc, prev.name)
    return read_checkpoint(prev), prev


def clean_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Model weights with the torch.compile (``_orig_mod.``) and DDP (``module.``) wrapper
    prefixes removed, so a checkpoint loads into a bare model whatever wrapped it."""
    out = {}
    for key, value in state_dict.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        out[key] = value
    return out


# --- random number generators ----------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every global RNG's state as tensors and plain values (weights_only-loadable)."""
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss),
                  "cached_gaussian": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (CUDA only where it was saved and present)."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()),
                     py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        n = min(len(cuda), torch.cuda.device_count())
        for i in range(n):
            torch.cuda.set_rng_state(cuda[i], i)
