"""Where things live, independent of the current directory.

The project root is the folder that holds ``pyproject.toml`` and ``backpack_nb/``; a notebook
running in ``notebooks/`` and ``train.py`` run from anywhere resolve ``params/``, ``data/``,
``out/`` and ``outputs/`` the same way. Two environment variables move the bulky roots
(the tests point them at temporary folders):

- ``BACKPACK_NB_DATA``: prepared datasets and downloads (default ``<root>/data``)
- ``BACKPACK_NB_OUTPUTS``: executed notebooks and reports (default ``<root>/outputs``)

A relative path a user gives (``--model_path``, ``--out_dir``, ``--start FILE:...``) is
taken from the project root too (:func:`resolve_in_root`). When it is missing there but
exists under the current directory, :func:`missing_message` says so and gives the full path
to pass, instead of a bare "does not exist".
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


def elsewhere_hint(given: str | os.PathLike) -> str:
    """When a relative ``given`` path is missing under the project root but exists under the
    current directory, the sentence that says so (to append to a "does not exist" message);
    else ``""``. Users who run a command from another folder expect the shell's rule."""
    p = Path(given).expanduser()
    if p.is_absolute():
        return ""
    root = project_root()
    here = Path.cwd() / p
    if (root / p).exists() or not here.exists() or here.resolve() == (root / p).resolve():
        return ""
    return (f". Relative paths are taken from the project root ({root}), not from the current "
            f"directory; {given} exists in the current directory: pass its full path "
            f"{here.resolve()}")


def missing_message(given: str | os.PathLike, what: str) -> str:
    """``"<what> <resolved path> does not exist"``, with :func:`elsewhere_hint`'s sentence
    when it applies."""
    return f"{what} {resolve_in_root(given)} does not exist{elsewhere_hint(given)}"
