"""Where things live, independent of the current directory.

The project root is the folder that holds ``pyproject.toml`` and ``backpack_nb/``; a notebook
running in ``notebooks/`` and ``train.py`` run from anywhere resolve ``params/``, ``data/``,
``out/`` and ``outputs/`` the same way. Two environment variables move the bulky roots
(the tests point them at temporary folders):

- ``BACKPACK_NB_DATA``: prepared datasets and downloads (default ``<root>/data``)
- ``BACKPACK_NB_OUTPUTS``: executed notebooks and reports (default ``<root>/outputs``)
"""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def project_root() -> Path:
    """The repository root: the parent of the ``backpack_nb`` package when it holds
    ``pyproject.toml`` (an editable/source checkout), else the current directory."""
    candidate = _PACKAGE_DIR.parent
    if (candidate / "pyproject.toml").is_file():
        return candidate
    return Path.cwd().resolve()


def params_dir() -> Path:
    return project_root() / "params"


def data_root() -> Path:
    env = os.environ.get("BACKPACK_NB_DATA")
    return Path(env).expanduser().resolve() if env else project_root() / "data"


def outputs_root() -> Path:
    env = os.environ.get("BACKPACK_NB_OUTPUTS")
    return Path(env).expanduser().resolve() if env else project_root() / "outputs"


def resolve_in_root(path: str | os.PathLike) -> Path:
    """An absolute path stays as it is; a relative one (``out/backpack_full``) is taken from
    the project root, never from the current directory."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else project_root() / p
