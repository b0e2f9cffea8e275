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

Crash guarantees (tests/test_reliability.py kills training with SIGKILL at random moments):
``ckpt.pt`` always names a complete checkpoint once the first one is written (the previous one
becomes ``ckpt.prev.pt`` through a hard link, so there is no moment without ``ckpt.pt``);
temporary files a crash leaves behind are removed by :func:`remove_stale_temps` when training
starts again; a write that fails (disk full, no permission) raises a :class:`UserError` naming
the file and leaves the file it would have replaced untouched.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
import random
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch

from backpack_nb.errors import UserError

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

log = logging.getLogger(__name__)

CKPT_NAME = "ckpt.pt"
PREV_NAME = "ckpt.prev.pt"
BEST_NAME = "best.pt"
# Files training writes with atomic_write; a crash may leave a ".<name>.*.tmp" beside each.
RUN_FILES = (CKPT_NAME, PREV_NAME, BEST_NAME, "training_log.json", "run.json")

# Test hook: with BACKPACK_NB_TEST_SLOW_SAVE=<seconds>, every *.pt write pauses twice (once
# part-way through the temporary file, once when it is complete but not yet renamed), printing
# a "slow-save:" line on stderr before each pause and one when the file is in place, so a test
# can land a SIGKILL inside a save and tell afterwards where it landed.
SLOW_SAVE_ENV = "BACKPACK_NB_TEST_SLOW_SAVE"
_SLOW_SAVE_AFTER = 1 << 16  # bytes of the temporary file written before the first pause

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
    file is complete, just before the rename (used to keep the old file under another name).
    An OSError (disk full, file too large, no permission) becomes a UserError naming the file;
    the file it would have replaced is untouched and the temporary file removed."""
    path = Path(path)
    pause = _slow_save_seconds(path)
    tmp: str | None = None
    writer: _Writer | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual open() mode
        with os.fdopen(fd, "wb") as f:
            writer = _Writer(f, pause, path.name)
            write(writer)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        if pause:
            _slow_save_mark(f"{path.name} complete, pausing {pause:g} s before the rename")
            time.sleep(pause)
        os.replace(tmp, path)
        tmp = None
    except BaseException as exc:
        # When a write fails (ENOSPC, EFBIG) or is interrupted (a second signal), torch.save's
        # zip writer raises its own RuntimeError over it on the way out; the first is the one
        # worth telling.
        if writer is not None and writer.error is not None and writer.error is not exc:
            exc = writer.error
        if isinstance(exc, OSError):
            raise UserError(_write_error(path, exc)) from exc
        raise exc
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    _fsync_dir(path.parent)
    if pause:
        _slow_save_mark(f"{path.name} in place")
    return path


def _write_error(path: Path, exc: OSError) -> str:
    what = exc.strerror or type(exc).__name__
    kept = (f"the existing {path.name} is untouched" if path.exists()
            else f"no {path.name} was written")
    return (f"could not write {path} ({what}); {kept}. Free disk space or fix the "
            f"permissions of {path.parent} (or choose another --out_dir), then run again")


def _slow_save_seconds(path: Path) -> float:
    if not path.name.endswith(".pt"):
        return 0.0
    try:
        return max(float(os.environ.get(SLOW_SAVE_ENV) or 0.0), 0.0)
    except ValueError:
        return 0.0


def _slow_save_mark(message: str) -> None:
    print(f"slow-save: {message}", file=sys.stderr, flush=True)


class _Writer:
    """The temporary file as ``write`` sees it: passes writes through, remembers the exception
    of a failed or interrupted one (torch.save hides it behind its own error) and, for the
    slow-save hook, pauses once part-way."""

    def __init__(self, f: io.BufferedWriter, pause: float, name: str):
        self._f, self._pause, self._name = f, pause, name
        self._written = 0
        self.error: BaseException | None = None

    def write(self, data: bytes) -> int:
        try:
            n = self._f.write(data)
            self._written += len(data)
            if self._pause and self._written >= _SLOW_SAVE_AFTER:
                pause, self._pause = self._pause, 0.0
                self._f.flush()  # the partial temporary file is on disk while we wait
                _slow_save_mark(f"{self._name} part-written ({self._written} bytes), pausing "
                                f"{pause:g} s")
                time.sleep(pause)
        except BaseException as exc:
            self.error = exc
            raise
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


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


@contextlib.contextmanager
def run_lock(out_dir: str | os.PathLike, enabled: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on the run folder while one trainer writes into it, so that a
    second trainer started on the same ``out_dir`` (a notebook re-run beside a batch run,
    two shells) stops with an error instead of both writing the same checkpoints. The lock
    is ``flock`` on the folder itself: no file is left behind, and the kernel drops it when
    the process dies, even by SIGKILL. Folders created only to be locked are removed again
    if they stay empty (a run that fails on bad input leaves nothing)."""
    if not enabled or fcntl is None:  # no flock (not POSIX): unprotected, as before
        yield
        return
    out_dir = Path(out_dir)
    created = []
    d = out_dir
    while not d.exists():
        created.append(d)
        d = d.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(out_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"{out_dir} is in use by another training run{_running_run(out_dir)}; wait "
                "for it to finish or stop it (Ctrl-C or SIGTERM saves a checkpoint), or choose "
                "another --out_dir") from None
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
        for d in created:  # deepest first
            try:
                d.rmdir()
            except OSError:  # not empty: the run wrote into it
                break


def _running_run(out_dir: Path) -> str:
    """`` (run 'x', started ...)`` from the folder's run.json, when it says."""
    import json

    try:
        info = json.loads((out_dir / "run.json").read_text(encoding="utf-8"))
        return f" (run {info.get('run_name')!r}, started {info.get('started_at')})"
    except (OSError, ValueError, AttributeError):
        return ""


# --- save / load -------------------------------------------------------------------------------


def save_checkpoint(state: Mapping[str, Any], out_dir: str | os.PathLike,
                    name: str = CKPT_NAME, *, keep_previous: bool = True) -> Path:
    """Write ``state`` to ``out_dir/name`` atomically. With ``keep_previous`` the file it
    replaces becomes ``ckpt.prev.pt`` (only for ``ckpt.pt``): if the new one is ever found
    damaged, the previous good one is still there."""
    out_dir = Path(out_dir)
    target = out_dir / name

    def keep_old() -> None:
        # Runs after the new file is fully on disk, before it is renamed over ckpt.pt.
        if keep_previous and name == CKPT_NAME and target.exists():
            _keep_as(target, out_dir / PREV_NAME)

    return atomic_write(target, lambda f: torch.save(dict(state), f), before_replace=keep_old)


def _keep_as(src: Path, dst: Path) -> None:
    """Give ``src``'s file the name ``dst`` too (a hard link renamed over ``dst``), leaving
    ``src`` in place: a crash at any moment leaves a complete ``ckpt.pt``. Where hard links
    are not supported, ``src`` is renamed instead; a crash before the new file is renamed then
    leaves ckpt.prev.pt alone, which :func:`load_checkpoint` falls back to."""
    if dst.exists() and os.path.samefile(src, dst):
        return  # a crash after the last link left both names on one file: already kept
    link = dst.with_name(f".{dst.name}.{os.getpid()}.link.tmp")
    link.unlink(missing_ok=True)
    try:
        os.link(src, link)
    except OSError:
        os.replace(src, dst)
        return
    os.replace(link, dst)
    link.unlink(missing_ok=True)  # rename() between two links to one file leaves both names


def remove_stale_temps(out_dir: str | os.PathLike) -> list[Path]:
    """Remove the temporary files a crash left in ``out_dir`` (``.ckpt.pt.*.tmp`` and the
    like, for the files training writes); returns what was removed. Call it only where no
    other process is writing these files (training does, on start)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    removed = []
    for p in out_dir.glob(".*.tmp"):
        if p.is_file() and any(p.name.startswith(f".{n}.") for n in RUN_FILES):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load one checkpoint file onto the CPU with ``weights_only=True``; a missing, truncated,
    foreign or code-carrying file is a UserError naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": our message says it
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message begins by suggesting weights_only=False: never the advice to give.
        found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n|$)", str(exc))
        detail = found.group(1) if found else "objects other than tensors"
        if detail.startswith(("Unsupported operand", "String is too long")):
            raise UserError(f"checkpoint {path} is unreadable (neither a torch zip archive nor "
                            f"a pickle of tensors: {detail}); it may be truncated or not a "
                            "backpack_nb checkpoint") from None
        raise UserError(
            f"checkpoint {path} holds pickled objects that are not tensors or plain values "
            f"({detail}); refused to load it, since unpickling it could run code. Use a "
            "checkpoint written by backpack_nb's train.py") from None
    except Exception as exc:  # zip/pickle errors come in many types; all mean "unreadable"
        raise UserError(_unreadable(path, exc)) from None
    if not isinstance(state, dict) or "model" not in state:
        raise UserError(f"checkpoint {path} holds no model weights; it is not a "
                        "backpack_nb checkpoint")
    return state


def _unreadable(path: Path, exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (f"checkpoint {path} is unreadable ({first}); it may be truncated or not a "
            "backpack_nb checkpoint")


def existing_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """The resumable checkpoints in ``out_dir`` (ckpt.pt, ckpt.prev.pt), newest role first."""
    out_dir = Path(out_dir)
    return [p for p in (out_dir / CKPT_NAME, out_dir / PREV_NAME) if p.exists()]


def require_checkpoint(out_dir: str | os.PathLike) -> None:
    """A UserError unless ``out_dir`` holds ckpt.pt or ckpt.prev.pt (cheap: checks names)."""
    if not existing_checkpoints(out_dir):
        raise UserError(
            f"--init_from resume: no checkpoint in {out_dir} (neither {CKPT_NAME} nor "
            f"{PREV_NAME}); check --out_dir, or start with --init_from scratch"
        )


def load_checkpoint(out_dir: str | os.PathLike,
                    accept: Callable[[dict[str, Any], Path], None] | None = None
                    ) -> tuple[dict[str, Any], Path]:
    """Load ``out_dir/ckpt.pt``, or ``ckpt.prev.pt`` with a warning when ckpt.pt is missing,
    unreadable or refused by ``accept(state, path)`` (which raises a UserError for a
    checkpoint this run cannot use, and may apply the one it accepts). Returns the state and
    the file it came from; when neither is usable, one UserError names each file's problem."""
    out_dir = Path(out_dir)
    require_checkpoint(out_dir)
    ckpt, prev = out_dir / CKPT_NAME, out_dir / PREV_NAME
    failures: list[UserError] = []
    for path in (ckpt, prev):
        if path == prev and not prev.exists():
            break
        try:
            state = read_checkpoint(path)
            if accept is not None:
                accept(state, path)
        except UserError as exc:
            failures.append(exc)
            continue
        if failures:
            log.warning("%s; resuming from the previous checkpoint %s instead",
                        failures[0], path.name)
        return state, path
    if len(failures) == 1:
        raise failures[0]
    first, second = (str(e) for e in failures)
    if first.replace(str(ckpt), "") == second.replace(str(prev), ""):
        raise UserError(f"{first}\n({prev.name} has the same problem)")
    raise UserError(f"no usable checkpoint in {out_dir}:\n  - "
                    + "\n  - ".join(m.replace("\n", "\n    ") for m in (first, second)))


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
