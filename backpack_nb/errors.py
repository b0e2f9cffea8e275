"""The one exception type for mistakes a user can fix, and how a command ends on one.

Command-line front doors wrap their ``main`` in :func:`command`: a :class:`UserError` prints
its message (which names the problem and the fix) and exits with status 2; Ctrl-C (a
``KeyboardInterrupt``) prints one line and exits with 130, the shell's status for SIGINT.
Library callers and notebooks see the normal exceptions.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, NoReturn, TypeVar

F = TypeVar("F", bound=Callable[..., object])

# 128 + SIGINT: what a shell reports for a command stopped by Ctrl-C
INTERRUPTED_STATUS = 130


class UserError(Exception):
    """Bad input: a missing path, an unknown option, a file that does not match."""


def exit_on_user_error(exc: UserError) -> NoReturn:
    print(f"error: {exc}", file=sys.stderr)
    raise SystemExit(2)


def exit_interrupted(what: str = "") -> NoReturn:
    """One line and status 130 for a command stopped by Ctrl-C. Every command writes its files
    whole or not at all, so an interruption leaves the old file or the new one."""
    detail = f"; {what}" if what else "; nothing is half-written"
    print(f"error: interrupted (Ctrl-C){detail}", file=sys.stderr, flush=True)
    raise SystemExit(INTERRUPTED_STATUS)


def command(main: F) -> F:
    """Wrap a front door's ``main(argv)``: a UserError is one ``error:`` line and exit 2,
    Ctrl-C one line and exit 130, never a traceback."""

    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as exc:
            exit_on_user_error(exc)
        except KeyboardInterrupt:
            exit_interrupted()

    return run  # type: ignore[return-value]
