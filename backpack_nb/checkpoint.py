"""Checkpoints that survive a crash at any moment and load without trusting pickle.

A checkpoint is a plain dict of ``state_dict()``s (model, optimizer, scaler, schedule, data
sampler, RNG) plus plain Python values, torchtitan style. It is written to a temporary file in
the same folder, fsynced and renamed over ``ckpt.pt``, so ``ckpt.pt`` is always either the old
or the new complete file; the one it replaces is kept as ``ckpt.prev.pt``. Everything in it is a
tensor or a plain Python type, so ``torch.load(path, weights_only=True, map_location="cpu")``
reads it: resuming never unpickles code and never needs GPU memory for a second copy.

What a training checkpoint holds is defined here, once (:data:`TRAINING_STATE`): ``model``
(bare weights), ``model_type``, ``model_config``, ``config`` (the TrainConfig), ``optimizer``,
``scaler``, ``schedule``, ``sampler``, ``rng`` (one entry per process), ``progress``,
``training_log``, ``probe_words``, ``tokenizer`` (encoding and compact vocabulary), ``data``
(dataset folder and meta hash), ``history``, and for readers ``format``, ``iter_num``,
``best_val_loss`` and ``saved_at``. ``training.Trainer.state_dict`` fills it through
:func:`training_state`; a resume checks it with :func:`check_resumable`. ``best.pt`` keeps
:data:`BEST_KEYS`: the weights and what evaluation needs, without the optimizer.

Crash guarantees (tests/test_reliability.py kills training with SIGKILL at random moments):
``ckpt.pt`` always names a complete checkpoint once the first one is written (the previous one
becomes ``ckpt.prev.pt`` through a hard link, so there is no moment without ``ckpt.pt``);
temporary files a crash leaves behind are removed by :func:`remove_stale_temps` when training
starts again; a write that fails (disk full, no permission) raises a :class:`UserError` naming
the file and leaves the file it would have replaced untouched.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import math
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from backpack_nb import paths
from backpack_nb.errors import UserError
from backpack_nb.runfiles import atomic_write
from backpack_nb.spelling import setting
from backpack_nb.models import ModelConfig, build_model
from backpack_nb.model_config import model_shape_keys
from backpack_nb.tokenizer import Tokenizer

log = logging.getLogger(__name__)

CKPT_NAME = "ckpt.pt"
PREV_NAME = "ckpt.prev.pt"
BEST_NAME = "best.pt"
# Files training writes with atomic_write; a crash may leave a ".<name>.*.tmp" beside each.
RUN_FILES = (CKPT_NAME, PREV_NAME, BEST_NAME, "training_log.json", "run.json")


# torch.compile wraps the model (keys gain "_orig_mod.") and DDP wraps it again ("module.").
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


# --- what a training checkpoint holds -----------------------------------------------------------

FORMAT = "backpack_nb.checkpoint/1"
# Every entry of a training checkpoint and its type. A resume reads all but the first four.
TRAINING_STATE: dict[str, type | tuple[type, ...]] = {
    "format": str, "iter_num": int, "best_val_loss": float, "saved_at": str,  # for readers
    "model": dict, "model_type": str, "model_config": dict, "config": dict, "optimizer": dict,
    "scaler": dict, "schedule": dict, "sampler": dict, "rng": list, "progress": dict,
    "training_log": dict, "probe_words": list, "tokenizer": dict, "data": dict, "history": dict,
}
_FOR_READERS = ("format", "iter_num", "best_val_loss", "saved_at")


@dataclasses.dataclass
class Progress:
    """Where a run stands: the training loop's state and, field for field, the checkpoint's
    ``progress`` entry."""

    iter_num: int = 0
    best_val_loss: float = math.inf
    best_iter: int | None = None  # the iteration best.pt holds
    tokens_seen: int = 0
    elapsed_s: float = 0.0  # training time of every session so far
    last_eval_iter: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Progress":
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})


# The nested entries a resume reads.
_NESTED_KEYS = {
    "model_config": ("vocab_size",), "data": ("data_dir", "meta_hash"),
    "sampler": ("generator", "batches_drawn", "world_size"), "schedule": ("last_iter",),
    "progress": tuple(f.name for f in dataclasses.fields(Progress)),
    "history": ("resumed_at",),
}
# best.pt: the weights and what evaluation needs.
BEST_KEYS = ("format", "model_type", "model", "model_config", "config", "iter_num",
             "best_val_loss", "probe_words", "tokenizer", "data", "saved_at")


def training_state(**entries: Any) -> dict[str, Any]:
    """A training checkpoint from its entries (every key of :data:`TRAINING_STATE` but
    ``format`` and ``saved_at``, which are added here); a missing or extra entry is a bug."""
    state = {"format": FORMAT, **entries,
             "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if set(state) != set(TRAINING_STATE):
        raise TypeError(f"training_state: missing {sorted(set(TRAINING_STATE) - set(state))}, "
                        f"unexpected {sorted(set(state) - set(TRAINING_STATE))}")
    return state


def best_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """What best.pt keeps of a training checkpoint."""
    return {k: state[k] for k in BEST_KEYS}


def check_layout(state: Mapping[str, Any], path: Path) -> None:
    """Every entry a resume reads is there, of the right kind (a checkpoint cut short by a
    bug, edited by hand, or a best.pt copied over ckpt.pt is refused with a clear message)."""
    layout = {k: t for k, t in TRAINING_STATE.items() if k not in _FOR_READERS}
    missing = [k for k in layout if k not in state]
    wrong = [f"{k} is a {type(state[k]).__name__}, not a {t.__name__}"
             for k, t in layout.items() if k in state and not isinstance(state[k], t)]
    for k, nested in _NESTED_KEYS.items():
        if isinstance(state.get(k), dict):
            missing += [f"{k}.{n}" for n in nested if n not in state[k]]
    if missing or wrong:
        hint = (" (it looks like a best.pt, which keeps the weights only and cannot be resumed)"
                if {"optimizer", "sampler", "progress"} <= set(missing) else "")
        raise UserError(f"checkpoint {path} is incomplete{hint}: "
                        + "; ".join(([f"missing {', '.join(missing)}"] if missing else []) + wrong))


def check_resumable(state: Mapping[str, Any], path: Path, config: Mapping[str, Any],
                    data_hash: str, vocab_size: int) -> None:
    """A checkpoint resumes only into the same model shape and the same dataset (``config``:
    this run's TrainConfig as a dict); the schedule (max_iters, intervals, learning rates)
    may change."""
    saved = state["config"]
    # sparse_table changes the optimizer state's layout, so it is fixed for a run too
    keys = dict.fromkeys(model_shape_keys(saved.get("model_type", "backpack"))
                         + model_shape_keys(config["model_type"]) + ("sparse_table",))
    problems = [f"{k}: checkpoint has {saved.get(k)!r}, this run has {config[k]!r}"
                for k in keys if saved.get(k, False) != config[k]]
    if state["model_config"]["vocab_size"] != vocab_size:
        problems.append(f"vocab_size: checkpoint has {state['model_config']['vocab_size']}, "
                        f"this run's model has {vocab_size}")
    if state["data"]["meta_hash"] != data_hash:
        problems.append(f"dataset: checkpoint was trained on {state['data']['data_dir']} "
                        f"(meta hash {state['data']['meta_hash'][:12]}), this run reads "
                        f"{config['data_dir']} (meta hash {data_hash[:12]})")
    if problems:
        raise UserError(
            f"cannot resume from {path}: it does not match this run's model shape or data:\n"
            + "\n".join(f"  - {p}" for p in problems)
            + "\nResume with the checkpoint's values (the same params file and shape "
              f"settings), or start a new run in another {setting('out_dir')}."
        )


def check_weights_fit(weights: Mapping[str, Any], model: torch.nn.Module, path: Path) -> None:
    """The checkpoint's weights have exactly this model's names and shapes."""
    got = clean_state_dict(weights)
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


def check_finite(tensors: Mapping[str, Any], path: Path, what: str = "weights",
                 fix: str = "") -> None:
    """Every floating-point tensor of ``tensors`` is finite; otherwise a UserError saying that
    ``path`` is damaged, naming the first bad tensor (``fix`` is appended). One pass of
    ``isfinite`` per load: milliseconds for the seed model.

    train.py never saves non-finite weights (``Trainer.save`` refuses), so such a file was
    damaged after it was written (a bit flip, an edit, a copy from elsewhere). A resume reads
    it like any damaged checkpoint and falls back to ckpt.prev.pt; loading it never ends in
    a NaN loss, and so never in the advice for a diverged run (a lower learning rate)."""
    bad = [name for name, t in tensors.items()
           if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())
           and not bool(torch.isfinite(t).all())]
    if not bad:
        return
    first = tensors[bad[0]]
    count = int((~torch.isfinite(first)).sum())
    kind = "NaN" if bool(first.isnan().any()) else "infinite"
    more = f", and {len(bad) - 1} more tensor(s)" if len(bad) > 1 else ""
    raise UserError(f"checkpoint {path} is damaged: its {what} hold non-finite values "
                    f"({count} {kind} value(s) in {bad[0]}{more}); train.py does not save "
                    "them, so the file was damaged after it was written"
                    + (f"; {fix}" if fix else ""))


def optimizer_tensors(optimizer_state: Mapping[str, Any]) -> dict[str, Any]:
    """The tensors of an optimizer's ``state_dict()`` (AdamW's moments) by a readable name
    (``<parameter index>.<entry>``), for :func:`check_finite`."""
    state = optimizer_state.get("state", {}) if isinstance(optimizer_state, Mapping) else {}
    return {f"{index}.{key}": value for index, entry in state.items()
            if isinstance(entry, Mapping) for key, value in entry.items()}


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
    if path.is_dir():
        raise UserError(_folder_message(path))
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    not_torch = _not_a_torch_file(path)
    if not_torch:
        raise UserError(f"checkpoint {path} is unreadable: {not_torch}; give the ckpt.pt or "
                        "best.pt that train.py wrote")
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


# The first bytes of what torch.save writes: a zip archive, or (before torch 1.6, and
# torch.save(..., _use_new_zipfile_serialization=False)) a pickle of protocol 2 or later.
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")


def _not_a_torch_file(path: Path) -> str | None:
    """Why ``path`` cannot be a checkpoint, told from its first bytes: empty, or text (a
    YAML, JSON or log file given by mistake), for which torch.load's own errors ("101",
    "invalid load key") say nothing useful. None when it may be one (torch.load decides)."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as exc:
        return f"cannot open it ({exc.strerror or type(exc).__name__})"
    if not head:
        return "the file is empty"
    if head.startswith(_TORCH_MAGIC):
        return None
    # UTF-8 cut at 512 bytes may end inside a character: ignore only a short tail
    text = head.decode("utf-8", errors="ignore")
    printable = sum(c.isprintable() or c in "\t\r\n" for c in text)
    if len(text.encode("utf-8")) < len(head) - 3 or printable < 0.95 * len(text):
        return None  # binary: torch.load's message about it is as good as any
    first = text.strip().splitlines()[0][:40] if text.strip() else ""
    return f"it is a text file, not a checkpoint (it begins {first!r})"


def _folder_message(path: Path) -> str:
    """A folder given as a checkpoint: name the checkpoints in it (or in the run folders
    inside it, for ``out/``), so the fix is one copy-paste away."""
    inside = _checkpoints_in(path)
    if inside:
        return (f"checkpoint {path} is a folder, not a checkpoint file; it holds "
                f"{', '.join(p.name for p in inside)}: pass one of them, for example "
                f"{inside[0]}")
    runs = [(d, found) for d in sorted(path.iterdir()) if d.is_dir()
            for found in [_checkpoints_in(d)] if found][:6]
    if runs:
        listed = "; ".join(f"{d} ({', '.join(p.name for p in found)})" for d, found in runs)
        return (f"checkpoint {path} is a folder of run folders, not a checkpoint file; the "
                f"checkpoints inside: {listed}. Pass one file, for example {runs[0][1][0]}")
    return (f"checkpoint {path} is a folder with no checkpoint (.pt file) in it; pass the "
            "ckpt.pt or best.pt of a run folder")


def _checkpoints_in(folder: Path) -> list[Path]:
    """The .pt files in ``folder``, the ones train.py writes first (ckpt.pt, best.pt,
    ckpt.prev.pt), then the rest by name; hidden temporary files left out."""
    try:
        found = [p for p in folder.glob("*.pt") if p.is_file() and not p.name.startswith(".")]
    except OSError:
        return []
    order = {name: i for i, name in enumerate((CKPT_NAME, BEST_NAME, PREV_NAME))}
    return sorted(found, key=lambda p: (order.get(p.name, len(order)), p.name))


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
            f"{setting('init_from', 'resume')}: no checkpoint in {out_dir} (neither {CKPT_NAME} "
            f"nor {PREV_NAME}); check {setting('out_dir')}, or start with "
            f"{setting('init_from', 'scratch')}"
        )


def resume_hint(out_dir: str | os.PathLike) -> str:
    """How to go on after a stopped run in ``out_dir``: resume from its checkpoint, or, when
    none was written yet (stopped in the first evaluation), start it again; never a resume
    that would only fail for want of a checkpoint."""
    found = existing_checkpoints(out_dir)
    if found:
        return f"checkpoint in {found[0]}; continue with {setting('init_from', 'resume')}"
    return ("no checkpoint was written yet, so there is nothing to resume: run the same "
            "command again to start over")


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


def load_run_model(model_path: str | os.PathLike, device: str | torch.device = "cpu",
                   model_type: str | None = None) -> tuple[torch.nn.Module, Tokenizer, dict]:
    """The model (in eval mode, on ``device``), tokenizer and checkpoint dict of a ``ckpt.pt``
    or ``best.pt``. The shape comes from the checkpoint; ``model_type``, when given, must match
    it. :func:`backpack_nb.loading.load_model` also takes a pretrained model."""
    path = paths.resolve_in_root(model_path)
    if not path.exists():
        raise UserError(paths.missing_message(model_path, "checkpoint"))
    state = read_checkpoint(path)
    missing = [k for k in ("model_type", "model_config", "tokenizer") if k not in state]
    if missing:
        raise UserError(f"checkpoint {path} lacks {', '.join(missing)}; it was not written by backpack_nb's train.py")
    check_model_type(model_type, state["model_type"], path)
    if not isinstance(state["model"], Mapping):
        raise UserError(f"checkpoint {path} holds no model weights (its model entry is a "
                        f"{type(state['model']).__name__}); it is not a backpack_nb checkpoint")
    weights = clean_state_dict(state["model"])
    others = [p.name for p in _checkpoints_in(path.parent) if p.name != path.name]
    check_finite(weights, path, fix="use another checkpoint" + (
        f" of the run ({', '.join(others)} beside it)" if others else ""))
    model = build_model(state["model_type"], ModelConfig.from_dict(state["model_config"]))
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise UserError(f"checkpoint {path} does not fit its own model config ({str(exc).splitlines()[0]})") from exc
    model.to(device).eval()
    return model, Tokenizer.from_state_dict(state["tokenizer"]), state


def check_model_type(asked: str | None, held: str, path: str | os.PathLike) -> None:
    if asked is not None and asked != held:
        raise UserError(f"--model_type {asked} does not match checkpoint {path}, which holds a "
                        f"{held}; pass --model_type {held} (or another checkpoint)")
