"""Where progress goes: a tqdm bar in a terminal or a notebook, nothing when the output is
a log file (a bar redrawn with carriage returns makes a log unreadable)."""

from __future__ import annotations

import sys


def in_notebook() -> bool:
    return "ipykernel" in sys.modules


def show_bars(progress: bool = True) -> bool:
    """Whether to draw tqdm bars: asked for, and stderr is a terminal or a notebook."""
    if not progress:
        return False
    return in_notebook() or bool(getattr(sys.stderr, "isatty", lambda: False)())
