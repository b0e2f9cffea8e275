"""An export folder written whole or not at all, and replaced only when it is an earlier export.

:func:`check_out_dir` decides whether a folder may receive an export: a new or empty folder
always, one holding nothing but an earlier export's files (:data:`~.layout.EXPORT_FILES`)
with ``--overwrite``, anything else (a run's checkpoints, a project, a user's file or
sub-folder) never. :func:`write_folder` writes the files into a hidden folder beside the
target, ``.NAME.export-PID-XXXXXX``, and swaps it in: on Linux one ``renameat2`` with
``RENAME_EXCHANGE`` exchanges the two folders atomically, so a kill at any moment leaves the
old export or the new one at NAME. Where the exchange is missing (another system, a file
system without it) the old folder is first renamed aside to ``.NAME.old-PID-XXXXXX``; a kill
between the two renames leaves NAME missing for a moment, and the next export restores it.

The hidden folders carry their writer's process id, so the next export into the same folder
removes those of a process that is gone (a folder of a live one is another export at work).
It only ever removes folders that hold nothing but export files.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
import secrets
import shutil
import signal
import sys
from collections.abc import Mapping
from pathlib import Path

from ..errors import UserError
from ..paths import resolve_in_root
from ..runfiles import pid_alive
from .layout import EXPORT_FILES, TOKENIZER_FILE

# Test hooks: with BACKPACK_NB_TEST_KILL_EXPORT=POINT an export SIGKILLs itself at POINT, as
# a kill landing there would ("partial": one file of the new folder written; "written": all
# written, before the swap; "exchanged": old and new exchanged, before the old is removed;
# "aside": the old moved aside, before the new is renamed in), so a test can check what each
# kill leaves; BACKPACK_NB_TEST_NO_RENAME_EXCHANGE=1 takes the path of a system without
# renameat2.
KILL_AT_ENV = "BACKPACK_NB_TEST_KILL_EXPORT"
NO_EXCHANGE_ENV = "BACKPACK_NB_TEST_NO_RENAME_EXCHANGE"

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# The kernel or the file system cannot exchange: take the two-rename path.
_NO_EXCHANGE = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}
_SHOWN = 5  # entries named in a refusal


def _load_renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.renameat2  # glibc 2.28 and later
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


# --- which folders may receive an export -----------------------------------------------------


def check_out_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """The folder to export into (a link resolved to the folder it names): new, empty, or,
    with ``overwrite``, one holding nothing but an earlier export. Anything else is a
    UserError naming what the folder holds."""
    given = resolve_in_root(out_dir)
    try:
        out = given.resolve()
    except (OSError, RuntimeError) as exc:  # a link loop
        raise UserError(f"OUT_DIR {given} cannot be resolved ({exc}); choose another "
                        "OUT_DIR") from None
    if not out.name:
        raise UserError(f"OUT_DIR {out} is a file system root; choose a new folder")
    remove_leftovers(out)  # first: it may put back the folder a killed export moved aside
    if os.path.lexists(out) and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder; choose a new or empty OUT_DIR")
    if not out.is_dir():
        return out
    try:
        entries = sorted(os.scandir(out), key=lambda e: e.name)
    except OSError as exc:
        raise UserError(f"cannot read the folder {out} ({exc.strerror}); choose another "
                        "OUT_DIR") from None
    if not entries:
        return out
    foreign = [e for e in entries if not _is_export_file(e)]
    only = ("export writes into a new or empty folder, and replaces (--overwrite) only one "
            f"holding nothing but an earlier export ({', '.join(EXPORT_FILES)})")
    if foreign:
        raise UserError(f"{out} holds {_names(foreign)}, which no export writes; {only}. "
                        "Nothing was changed: choose a new or empty OUT_DIR")
    if not any(e.name == TOKENIZER_FILE for e in entries):
        raise UserError(f"{out} holds {_names(entries)} but no {TOKENIZER_FILE}, so it is not "
                        f"an export of this project (a downloaded model?); {only}. Nothing was "
                        "changed: choose a new or empty OUT_DIR")
    if not overwrite:
        raise UserError(f"{out} holds an earlier export; pass --overwrite to replace it, or "
                        "choose a new or empty OUT_DIR")
    return out


def _is_export_file(entry: os.DirEntry) -> bool:
    return entry.name in EXPORT_FILES and entry.is_file(follow_symlinks=False)


def _names(entries: list[os.DirEntry]) -> str:
    def name(e: os.DirEntry) -> str:
        if e.is_symlink():
            return f"{e.name} (a link)"
        return f"{e.name}/" if e.is_dir() else e.name

    shown = ", ".join(name(e) for e in entries[:_SHOWN])
    more = len(entries) - _SHOWN
    return shown + (f" and {more} more" if more > 0 else "")


# --- writing ------------------------------------------------------------------------------------


def write_folder(out_dir: str | os.PathLike, files: Mapping[str, bytes], *,
                 overwrite: bool = False) -> Path:
    """Write ``files`` (name -> bytes) as the folder ``out_dir``, whole or not at all: into a
    hidden folder beside it, then swapped in (see the module's docstring). The target is
    checked by :func:`check_out_dir` before and again just before the swap. An OSError (a
    read-only or full disk) is a UserError saying that nothing changed."""
    out = check_out_dir(out_dir, overwrite)
    tmp = out.parent / f".{out.name}.export-{os.getpid()}-{secrets.token_hex(3)}"
    remove = tmp  # after a swap: the old folder; before it: the partial new one
    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]  # deepest first
    try:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            for name, data in files.items():
                _write_file(tmp / name, data)
                _test_kill("partial")
            _fsync_dir(tmp)
            _test_kill("written")
            check_out_dir(out, overwrite)  # it may have changed while we wrote
            remove = _swap_in(tmp, out)
        except OSError as exc:
            raise UserError(_write_error(out, exc)) from None
    except BaseException:
        _remove_export(remove)
        _remove_empty(made)  # the folders made for an export that failed
        raise
    _remove_export(remove)
    _fsync_dir(out.parent)
    return out


def _swap_in(tmp: Path, out: Path) -> Path | None:
    """Put the complete folder ``tmp`` at ``out``; the path of what is to be removed (the
    old folder), or None."""
    if not os.path.lexists(out):
        os.rename(tmp, out)  # fails on a folder someone filled meanwhile: nothing lost
        return None
    if _exchange(tmp, out):
        _test_kill("exchanged")
        return tmp
    aside = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(3)}"
    os.rename(out, aside)
    _test_kill("aside")
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(aside, out)
        raise
    return aside


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        try:
            folder.rmdir()
        except OSError:  # not empty (another writer), or never made
            return


def _exchange(a: Path, b: Path) -> bool:
    """Exchange two folders atomically; False where the system cannot."""
    if _renameat2 is None or os.environ.get(NO_EXCHANGE_ENV):
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NO_EXCHANGE:
        return False
    raise OSError(err, os.strerror(err), str(b))


def _write_file(path: Path, data: bytes) -> None:
    # open() gives the usual mode (0666 less the umask), as every other file of the project
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the renames are still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_error(out: Path, exc: OSError) -> str:
    what = exc.strerror or type(exc).__name__
    kept = ("the folder there is untouched" if os.path.lexists(out) else "nothing was written")
    return (f"could not write the export {out} ({what}); {kept}. Free disk space or fix the "
            f"permissions of {out.parent}, or choose another OUT_DIR, then run again")


# --- leftovers of a killed export ---------------------------------------------------------------


def remove_leftovers(out: Path) -> list[Path]:
    """Remove the hidden folders a killed export into ``out`` left beside it (those whose
    process is gone and that hold nothing but export files); where ``out`` itself is missing
    because the kill fell between the two renames, put the old folder back. The folders
    removed or restored."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(export|old)-(\d+)-[0-9a-f]+")
    found: dict[str, list[Path]] = {"old": [], "export": []}
    try:
        names = sorted(os.listdir(out.parent))
    except OSError:
        return []
    for name in names:
        m = pattern.fullmatch(name)
        path = out.parent / name
        if m and not pid_alive(int(m.group(2))) and _holds_only_export_files(path):
            found[m.group(1)].append(path)
    done = []
    for path in found["old"]:
        try:
            if not os.path.lexists(out):
                os.rename(path, out)  # the old export, as it was before the killed swap
            else:
                _remove_export(path)
        except OSError:  # left for a later run; the export is refused or written beside it
            continue
        done.append(path)
    for path in found["export"]:
        _remove_export(path)
        done.append(path)
    return done


def _holds_only_export_files(folder: Path) -> bool:
    if folder.is_symlink() or not folder.is_dir():
        return False
    try:
        with os.scandir(folder) as entries:
            return all(_is_export_file(e) for e in entries)
    except OSError:
        return False


def _remove_export(folder: Path | None) -> None:
    """Remove a hidden folder this module made (only export files in it)."""
    if folder is not None and _holds_only_export_files(folder):
        shutil.rmtree(folder, ignore_errors=True)


# --- test hook ----------------------------------------------------------------------------------


def _test_kill(point: str) -> None:
    if os.environ.get(KILL_AT_ENV) == point:
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
