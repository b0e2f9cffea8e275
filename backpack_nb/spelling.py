"""How a message names a training setting, in the words of the place where it is read.

One hint ("continue with --init_from resume") is read in three places: train.py's terminal
(``--init_from resume``), the report runner's (``-p init_from resume``; the runner sets
:data:`RUNNER_ENV` for the kernels it starts) and a notebook opened in JupyterLab (its
parameters cell: ``init_from = 'resume'``). :func:`setting` spells one setting for the place
the code runs in; :func:`runner_spelling` rewrites a whole message written for train.py (a
UserError relayed from a notebook, the params file's validation) for the runner.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from typing import Any

from .params import TrainConfig

RUNNER_ENV = "BACKPACK_NB_REPORT"  # "1" in the kernels python -m backpack_nb.reports starts


def where() -> str:
    """``runner`` (a kernel the report runner started), ``notebook`` (a Jupyter kernel) or
    ``cli`` (train.py, a script, tests)."""
    if os.environ.get(RUNNER_ENV):
        return "runner"
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return "notebook" if type(shell).__name__ == "ZMQInteractiveShell" else "cli"


def setting(key: str, value: Any = None) -> str:
    """``key`` set to ``value`` (just the setting when None; True for a switch) as the place
    the code runs in takes it: ``--init_from resume``, ``-p init_from resume`` or
    ``init_from = 'resume'``."""
    place = where()
    if place == "notebook":
        return key if value is None else f"{key} = {value!r}"
    text = "" if value is None else (str(value).lower() if isinstance(value, bool) else str(value))
    if place == "runner":
        return f"-p {key}" + (f" {text}" if text else "")
    return f"--{key}" + ("" if value is None or value is True else f" {text}")


_FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9_]*)(?:\s+(true|false)\b)?")
_BOOL_KEYS = {f.name for f in dataclasses.fields(TrainConfig) if "bool" in str(f.type)}


def runner_spelling(message: str) -> str:
    """``message`` with train.py's flags for training settings spelled as this runner takes
    them: ``--init_from resume`` -> ``-p init_from resume``, ``--overwrite`` -> ``-p overwrite
    true``, a flag naming a problem (``--compile: expected ...``) -> ``-p compile:``. Hints from
    a notebook or the params file's validation are written for train.py. Left alone: backquoted
    text (a whole command) and flags after "prepare" in a clause (``backpack_nb.data``'s)."""
    keys = set(TrainConfig.keys())

    def flag(m: re.Match) -> str:
        key, value = m.group(1), m.group(2)
        if key not in keys:
            return m.group(0)
        if key in _BOOL_KEYS and not m.string.startswith(":", m.end(1)):
            return f"-p {key} {value or 'true'}"
        return f"-p {key}" + (f" {value}" if value else "")

    parts = message.split("`")
    for i in range(0, len(parts), 2):  # the even parts are outside backquotes
        clauses = []
        for clause in re.split(r"([;\n])", parts[i]):
            cut = clause.find("prepare")
            cut = len(clause) if cut < 0 else cut
            clauses.append(_FLAG.sub(flag, clause[:cut]) + clause[cut:])
        parts[i] = "".join(clauses)
    return "`".join(parts)
