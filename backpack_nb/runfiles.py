"""Crash-safe files: atomic writes, JSON sidecars, the run lock, downloads, and telling a
dead process's leftovers (:func:`pid_alive`).

A file is written to a temporary file beside it, fsynced and renamed over the old one, so a
reader (or a resume after a crash at any moment) sees either the old file or the new one,
never half of one; an OSError (disk full, no permission) becomes a :class:`UserError` naming
the file. :func:`run_lock` keeps a second trainer out of a folder one is writing to.
:mod:`backpack_nb.checkpoint` writes checkpoints through :func:`atomic_write`.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

from backpack_nb.console import progress_bar
from backpack_nb.errors import UserError

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None


# Test hook: with BACKPACK_NB_TEST_SLOW_SAVE=<seconds>, every *.pt write pauses twice (once
# part-way through the temporary file, once when it is complete but not yet renamed), printing
# a "slow-save:" line on stderr before each pause and one when the file is in place, so a test
# can land a SIGKILL inside a save and tell afterwards where it landed.
SLOW_SAVE_ENV = "BACKPACK_NB_TEST_SLOW_SAVE"
_SLOW_SAVE_AFTER = 1 << 16  # bytes of the temporary file written before the first pause

# Read once: os.umask can only be read by setting it, which is not thread-safe to repeat.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


# --- atomic writes ---------------------------------------------------------------------------


def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], None],
                 *, before_replace: Callable[[], None] | None = None,
                 flag: str | None = "--out_dir") -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it and rename it over
    ``path``; then fsync the folder so the rename itself survives a power cut. A crash leaves
    either the old file or the new one, never half of one. ``before_replace`` runs once the new
    file is complete, just before the rename (used to keep the old file under another name).
    An OSError (disk full, file too large, no permission) becomes a UserError naming the file
    and the fix (see :func:`write_error`; ``flag`` is the option that chose the place); the
    file it would have replaced is untouched and the temporary file removed."""
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
            raise UserError(write_error(path, exc, flag=flag)) from exc
        raise exc
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    _fsync_dir(path.parent)
    if pause:
        _slow_save_mark(f"{path.name} in place")
    return path


def write_error(path: Path, exc: OSError, *, flag: str | None = "--out_dir") -> str:
    """The message for a failed write of ``path``: what failed, that the old file is
    untouched, and the fix for that failure (``flag``: the option that chose the place,
    offered as the other way out)."""
    what = exc.strerror or type(exc).__name__
    if path.is_dir():
        return (f"could not write {path} ({what}): it is a folder, and it is untouched; "
                f"{f'give {flag} a file path' if flag else 'write to a file path'} instead")
    kept = (f"the existing {path.name} is untouched" if path.exists()
            else f"no {path.name} was written")
    fix = _FIXES.get(exc.errno, "Free disk space or fix the permissions of {parent}")
    elsewhere = f" (or choose another {flag})" if flag else " (or write somewhere else)"
    return f"could not write {path} ({what}); {kept}. {fix.format(parent=path.parent)}{elsewhere}, then run again"


# The fix for each way a write fails; any other error gets the two usual causes.
_FIXES = {
    errno.ENOSPC: "Free disk space",
    errno.EDQUOT: "Free disk space (the disk quota is full)",
    errno.EFBIG: "Raise the file size limit (ulimit -f) or free space where the file can grow",
    errno.EACCES: "Fix the permissions of {parent}",
    errno.EPERM: "Fix the permissions of {parent}",
    errno.EROFS: "{parent} is on a read-only file system: remount it writable",
}


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


def write_json(path: str | os.PathLike, obj: Any, *, flag: str | None = "--out_dir") -> Path:
    """Write ``obj`` as indented JSON atomically (training_log.json, run.json); ``flag``: the
    option that chose the place, named in a failure's message (see :func:`atomic_write`)."""
    data = (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    return atomic_write(path, lambda f: f.write(data), flag=flag)


def read_json(path: str | os.PathLike) -> dict:
    """A JSON file as a dict; {} when it does not exist (a run folder's optional files)."""
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


@contextlib.contextmanager
def run_lock(out_dir: str | os.PathLike, enabled: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on the run folder while one trainer writes into it, so that a
    second trainer started on the same ``out_dir`` (a notebook re-run beside a batch run,
    two shells) stops with an error instead of both writing the same checkpoints. The lock
    is ``flock`` on the folder itself: no file is left behind, and the kernel drops it when
    the process dies, even by SIGKILL. Folders created only to be locked are removed again
    if they stay empty (a run that fails on bad input leaves nothing). An ``out_dir`` that
    cannot be a folder (a file, a path through a file, a parent without write permission)
    is a UserError."""
    if not enabled:
        yield
        return
    out_dir = Path(out_dir)
    created = _make_run_folder(out_dir)
    try:
        if fcntl is None:  # no flock (not POSIX): unprotected, as before
            yield
            return
        try:
            fd = os.open(out_dir, os.O_RDONLY)
        except OSError as exc:
            raise UserError(_folder_error(out_dir, exc)) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UserError(
                    f"{out_dir} is in use by another training run{_running_run(out_dir)}; "
                    "wait for it to finish or stop it (Ctrl-C or SIGTERM saves a checkpoint), "
                    "or choose another --out_dir") from None
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
    finally:
        _remove_empty(created)


def _make_run_folder(out_dir: Path) -> list[Path]:
    """Create ``out_dir`` (and missing parents); returns the folders created, deepest first.
    A file where a folder must be, or a folder that cannot be made, is a UserError, checked
    before anything is created."""
    created = []
    d = out_dir
    while not d.exists():
        if d.is_symlink():  # a link to nowhere: mkdir would only say "File exists"
            where = "is" if d == out_dir else f"goes through {d}, which is"
            raise UserError(f"--out_dir {out_dir} {where} {broken_link(d)}; fix or remove the "
                            "link, or choose another --out_dir")
        created.append(d)
        d = d.parent
    if not d.is_dir():
        where = "is a file" if d == out_dir else f"is inside {d}, which is a file"
        raise UserError(f"--out_dir {out_dir} {where}, not a folder; choose another --out_dir "
                        "(a run folder, new or existing)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _remove_empty(created)  # the levels made before the one that failed
        raise UserError(_folder_error(out_dir, exc)) from None
    return created


def _folder_error(out_dir: Path, exc: OSError) -> str:
    what = exc.strerror or type(exc).__name__
    at = f" at {exc.filename}" if exc.filename and Path(exc.filename) != out_dir else ""
    if exc.errno == errno.ELOOP:
        fix = "a symbolic link on the way loops: fix or remove it"
    elif exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free disk space"
    elif exc.errno == errno.EROFS:
        fix = "it is on a read-only file system"
    else:
        fix = "fix the permissions of its parent folder"
    return (f"--out_dir {out_dir}: cannot create or open the run folder ({what}{at}); {fix}, "
            "or choose another --out_dir")


def broken_link(path: Path) -> str:
    """What a symbolic link that leads to nothing is: one in a loop, or one whose target is
    missing ("a symbolic link ...", to follow "X is")."""
    target = os.readlink(path)
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"a symbolic link in a loop (it points to {target}, which leads back to it)"
    return f"a symbolic link to {target}, a path that does not exist"


def _remove_empty(created: list[Path]) -> None:
    for d in created:  # deepest first
        try:
            d.rmdir()
        except OSError:  # not empty (the run wrote into it), or never made
            if d.exists():
                break


def _running_run(out_dir: Path) -> str:
    """`` (run 'x', started ...)`` from the folder's run.json, when it says."""
    try:
        info = json.loads((out_dir / "run.json").read_text(encoding="utf-8"))
        return f" (run {info.get('run_name')!r}, started {info.get('started_at')})"
    except (OSError, ValueError, AttributeError):
        return ""


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` is running on this machine: a file named for a process whose
    pid is gone is a leftover of a killed run, safe to tidy. A pid reused by another process
    reads as alive, which errs on the side of keeping the file."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    except OverflowError:  # no pid is that large
        return False
    return True


def download(url: str, dest: Path, failed: Callable[[BaseException], str], *,
             bar: str | None = None) -> Path:
    """Fetch ``url`` into ``dest`` through a ``.part`` file renamed at the end, so a partial
    file never takes the final name; ``bar`` shows a progress bar with that label. A network
    or disk failure removes the partial file and raises UserError(``failed(exc)``)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as resp, open(tmp, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with progress_bar(total, bar or "download", "B", progress=bar is not None) as shown:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
                    shown.update(len(chunk))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(failed(exc)) from exc
    os.replace(tmp, dest)
    return dest
