"""The one exception type for mistakes a user can fix.

Command-line front doors catch :class:`UserError`, print its message (which names the
problem and the fix) and exit with status 2; library callers and notebooks see a normal
exception with the same message.
"""

from __future__ import annotations

import sys
from typing import NoReturn


class UserError(Exception):
    """Bad input: a missing path, an unknown option, a file that does not match."""


def exit_on_user_error(exc: UserError) -> NoReturn:
    print(f"error: {exc}", file=sys.stderr)
    raise SystemExit(2)
