"""A prepared dataset, read: where it is, its ``meta.json``, its token files, its tokenizer.

:mod:`backpack_nb.data` writes a dataset folder (``train.bin``, ``val.bin``, ``test.bin``, the
per-language ``val_<lang>.bin`` / ``test_<lang>.bin`` and ``meta.json``); everything that reads
one (training, evaluation, lexsim, the notebooks) goes through this module.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import shlex
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import paths
from .errors import UserError
from .model_source import INIT_FROM, PRETRAINED_ENCODING
from .params import TrainConfig, config_from_argv, named_data_dir
from .tokenizer import Tokenizer

META_KEYS = ("encoding", "vocab_size", "dtype", "langs", "splits", "base_ids")
# Files only a training run's folder holds (checkpoint.RUN_FILES; named here, as this module
# sits below the checkpoint code).
RUN_FOLDER_FILES = ("run.json", "ckpt.pt", "best.pt", "training_log.json")

def resolve_data_dir(data_dir: str | os.PathLike) -> Path:
    """``europarl`` (a bare name, as in the seed's ``--data_dir europarl``) is a folder of
    the data root; anything with a slash, or absolute, is a path from the project root."""
    s = str(data_dir)
    if os.sep in s or "/" in s or s.startswith("."):
        return paths.resolve_in_root(s)
    return paths.data_root() / s



def available_datasets() -> list[str]:
    """The prepared datasets in the data root, by name."""
    root = paths.data_root()
    if not root.is_dir():
        return []
    return sorted(d.name for d in root.iterdir() if (d / "meta.json").is_file())


def run_folder_problem(folder: Path, flag: str = "--data_dir") -> str | None:
    """When ``folder`` is a training run's folder (a checkpoint, run.json) given where a
    dataset belongs: the message that says so and names the dataset that run was trained on
    (from its run.json); else None."""
    if not folder.is_dir() or (folder / "meta.json").is_file():
        return None
    held = [name for name in RUN_FOLDER_FILES if (folder / name).is_file()]
    if not held:
        return None
    try:
        trained_on = json.loads((folder / "run.json").read_text(encoding="utf-8"))["config"]["data_dir"]
    except (OSError, ValueError, KeyError, TypeError):
        trained_on = None
    use = (f"its run was trained on {trained_on!r} ({resolve_data_dir(trained_on)}): pass "
           f"{flag} {shlex.quote(str(trained_on))}" if isinstance(trained_on, str) and trained_on
           else f"pass the dataset folder it was trained on (data_dir in its run.json) as {flag}")
    return (f"{flag} {folder} is a training run's folder (it holds {', '.join(held)}), not a "
            f"prepared dataset; {use}")


def require_existing(data_dir: str, *, flag: str = "--data_dir",
                     prepare_args: str = "") -> None:
    """A UserError unless ``data_dir`` is a prepared dataset: it names what exists (with a
    "did you mean") and the ``data prepare`` command that would create it (``prepare_args``:
    the settings to prepare it with). For a name or path the user typed, where preparing on
    first use would turn a typo into a new dataset (and a 1.5 GB download)."""
    folder = resolve_data_dir(data_dir)
    if (folder / "meta.json").is_file():
        return
    if problem := run_folder_problem(folder, flag):
        raise UserError(problem)
    names = available_datasets()
    close = difflib.get_close_matches(str(data_dir), names, n=1)
    have = (f"prepared datasets in {paths.data_root()}: {', '.join(names)}" if names
            else f"no dataset is prepared in {paths.data_root()} yet")
    command = " ".join(["python -m backpack_nb.data prepare --out", shlex.quote(str(data_dir)),
                        prepare_args]).strip()
    raise UserError(
        f"{flag} {data_dir}: no prepared dataset at {folder}"
        + (f" (did you mean {close[0]!r}?)" if close else "")
        + f"; {have}; to create it: {command}")


def require_typed_dataset(cfg: TrainConfig, named: Any, flag: str = "--data_dir") -> None:
    """A dataset is prepared on first use only when it is the one the params file names
    (``named``): a data_dir typed on a command line must exist, or a typo would prepare (and
    download) a second dataset."""
    if cfg.data_dir != str(named):
        require_existing(cfg.data_dir, flag=flag, prepare_args=prepare_args(cfg))


def prepare_args(cfg: TrainConfig) -> str:
    """The ``python -m backpack_nb.data prepare`` options that make ``cfg``'s dataset."""
    args = [f"--langs {cfg.languages}", f"--form {cfg.data_form}"]
    pretrained = cfg.init_from not in INIT_FROM  # a fine-tune reads the model's own ids
    if pretrained and cfg.encoding.split(":")[0] != PRETRAINED_ENCODING:
        args.append(f"--encoding {PRETRAINED_ENCODING}")
    elif cfg.encoding != TrainConfig.encoding:
        args.append(f"--encoding {cfg.encoding}")
    if pretrained:
        args.append("--full_vocab")
    if cfg.block_size > 1024:  # the preparation's floor for val/test follows block_size
        args.append(f"--block_size {cfg.block_size}")
    if cfg.data_source:
        args.append(f"--source {cfg.data_source}")
    return " ".join(args)


def train_config(argv: Sequence[str] | None) -> TrainConfig:
    """train.py's configuration from its command line (:func:`backpack_nb.params.
    config_from_argv`), with a typed ``--data_dir`` that must exist unless it is the one the
    params file names (see :func:`require_typed_dataset`)."""
    cfg = config_from_argv(argv)
    named = named_data_dir(argv)
    if named is not None:
        require_typed_dataset(cfg, named)
    return cfg


def load_meta(data_dir: str | os.PathLike, *, flag: str = "--data_dir") -> dict:
    """``meta.json`` of a prepared dataset (a bare name is looked up in the data root);
    ``flag``: how the command that asked names the dataset, for its messages."""
    path = resolve_data_dir(data_dir) / "meta.json"
    if path.parent.is_file():
        raise UserError(f"{path.parent} is a file, not a prepared dataset's folder; give the "
                        "folder that `python -m backpack_nb.data prepare` wrote")
    if problem := run_folder_problem(path.parent, flag):
        raise UserError(problem)
    if not path.is_file():
        raise UserError(
            f"{data_dir} is not a prepared dataset (no meta.json); prepare it with "
            f"`python -m backpack_nb.data prepare --out {data_dir}`"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is damaged ({exc}); prepare the dataset again with --overwrite") from exc
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; prepare the dataset again with --overwrite")
    return meta


def meta_hash(data_dir: str | os.PathLike) -> str:
    """SHA-256 naming the exact dataset (vocabulary, split, source file hashes): the same
    source prepared twice with the same settings gets the same hash (timings and the
    source's path are left out)."""
    meta = load_meta(data_dir)
    stable = {k: v for k, v in meta.items() if k not in ("prepare_seconds", "source")}
    return hashlib.sha256(json.dumps(stable, sort_keys=True).encode("utf-8")).hexdigest()


def load_tokens(data_dir: str | os.PathLike, split: str, lang: str | None = None) -> np.memmap:
    """Token ids of a split (all languages, or one), as a read-only memmap."""
    meta = load_meta(data_dir)
    if split not in ("train", "val", "test"):
        raise UserError(f"unknown split {split!r}; use train, val or test")
    if lang is not None and lang not in meta["langs"]:
        raise UserError(f"{data_dir} has no language {lang!r}; it has {', '.join(meta['langs'])}")
    if lang is not None and split == "train":
        raise UserError("per-language token files exist for val and test only")
    name = f"{split}.bin" if lang is None else f"{split}_{lang}.bin"
    path = resolve_data_dir(data_dir) / name
    expected = meta["splits"][split]["tokens"] if lang is None else meta["splits"][split]["langs"][lang]["tokens"]
    itemsize = np.dtype(meta["dtype"]).itemsize
    if not path.is_file() or path.stat().st_size != expected * itemsize:
        have = path.stat().st_size if path.is_file() else "no file"
        raise UserError(
            f"{path} does not match meta.json ({expected} tokens x {itemsize} bytes expected, "
            f"found {have} bytes); prepare the dataset again with --overwrite"
        )
    return np.memmap(path, dtype=meta["dtype"], mode="r")


def check_token_ids(tokens: np.ndarray, vocab_size: int, path: str | os.PathLike) -> None:
    """Token ids beyond the vocabulary mean a damaged .bin of the right size, or a meta.json
    from another preparation: one clear error here instead of an index error later."""
    top = int(tokens.max()) if len(tokens) else -1
    if top >= vocab_size:
        raise UserError(
            f"{path} holds token id {top}, outside the vocabulary of {vocab_size} tokens in "
            "meta.json: the file is damaged or meta.json belongs to another preparation; "
            "prepare the dataset again with --overwrite")



def load_tokenizer(data_dir: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a prepared dataset (its encoding and compact vocabulary)."""
    meta = load_meta(resolve_data_dir(data_dir))
    return Tokenizer(meta["encoding"], meta["base_ids"])


def check_same_vocabulary(tok: Tokenizer, meta: dict, data_dir: Path, model_path: Path) -> None:
    """A model scores only the data of its own vocabulary: the same encoding and the same
    ids (compact, or the encoding's own for a pretrained model), or ids would mean other
    tokens."""
    # the encoding by name: gpt2 read from a snapshot folder ("gpt2:/path") is still gpt2
    same_encoding = meta["encoding"].split(":")[0] == tok.encoding_name.split(":")[0]
    if not same_encoding or list(meta["base_ids"]) != tok.base_ids.tolist():
        raise UserError(
            f"{data_dir} was prepared with another tokenizer or vocabulary ({meta['encoding']}, "
            f"{meta['vocab_size']} tokens) than checkpoint {model_path} ({tok.encoding_name}, "
            f"{tok.vocab_size} tokens); evaluate on the data the model was trained on "
            "(--data_dir, or the config it was trained with)"
        )
