"""eval.json: which file an evaluation may write to, and how its sections are merged.

evaluate.py, ``python -m backpack_nb.lexsim`` and ``python -m backpack_nb.steering`` write their results as sections of an
``eval.json`` (``--out`` elsewhere). A path the user gives is written only when it is new or
already an evaluation: a checkpoint, a params file, a run's ``run.json`` or
``training_log.json`` is never replaced by one. Both commands call :func:`eval_json_path`
before any model is loaded, so a refused ``--out`` costs nothing and changes nothing, and
write with :func:`merge_eval_json`, whose failures name ``--out``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from . import paths
from .errors import UserError
from .runfiles import write_json


def eval_json_path(out: str | os.PathLike, flag_prefix: str = "") -> Path:
    """The file ``out`` names (a relative path is taken from the project root); refused when
    writing there is impossible (a folder, a path through a file) or would replace a file
    that is not an evaluation (a checkpoint, run.json, a params file). Messages name the
    setting as ``{flag_prefix}out`` (``--out`` on a command line)."""
    flag = f"{flag_prefix}out"
    target = paths.resolve_in_root(out)
    if target.is_dir():
        raise UserError(f"{flag} {target} is a folder; give a file path such as "
                        f"{target / 'eval.json'}")
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {target} is inside {parent}, which is a file; choose another "
                        f"{flag}")
    if (target.exists() or target.is_symlink()) and not is_eval_json(target):
        raise UserError(f"{flag} {target} exists and is not an evaluation (eval.json) file, so "
                        f"it is left alone; choose another {flag}")
    return target


def is_eval_json(path: Path) -> bool:
    """An existing file an evaluation may rewrite: a JSON object that is an evaluation (a
    ``splits``, ``lexsim`` or ``steering`` section). A run's run.json or training_log.json is
    not one."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(content, dict) and any(key in content for key in ("splits", "lexsim", "steering"))


def merge_eval_json(target: Path, model_path: Path, sections: dict, flag_prefix: str = "") -> None:
    """Write ``sections`` into ``target`` atomically, keeping the sections already there
    (``splits``, ``lexsim``...) when that file belongs to the same checkpoint. A failed write
    names the setting ``{flag_prefix}out`` as the other place to write to."""
    write_json(target, {**sections_of(target, model_path), **sections}, flag=f"{flag_prefix}out")


def sections_of(target: Path, model_path: Path) -> dict:
    """The sections ``target`` holds when it is an evaluation of ``model_path`` (else none)."""
    try:
        previous = json.loads(target.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    if not isinstance(previous, dict) or previous.get("checkpoint") != str(model_path):
        return {}
    return previous
