"""Where progress goes: a tqdm bar in a terminal or a notebook; in a log file (CI, nohup, a
job on a VM), where a bar redrawn with carriage returns is unreadable, a plain line when the
work starts and one every few seconds while it lasts."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from tqdm.auto import tqdm

# Seconds between two plain progress lines: often enough that a log never looks stuck,
# rarely enough that a long evaluation stays readable.
LINE_EVERY_S = 5.0


def in_notebook() -> bool:
    return "ipykernel" in sys.modules


def show_bars(progress: bool = True) -> bool:
    """Whether to draw tqdm bars: asked for, and stderr is a terminal or a notebook."""
    if not progress:
        return False
    return in_notebook() or bool(getattr(sys.stderr, "isatty", lambda: False)())


def progress_bar(total: int | None, desc: str, unit: str, progress: bool = True, *,
                 every: float = LINE_EVERY_S) -> Any:
    """A progress display with tqdm's ``update(n)`` / ``close()``: a tqdm bar where bars
    show, :class:`PlainProgress` lines on stderr where they do not, nothing when
    ``progress`` is False (library callers that report on their own). ``unit="B"`` counts
    bytes (shown in MB / MiB); ``total`` None: unknown (a download without a length)."""
    if show_bars(progress):
        return tqdm(total=total, desc=desc, unit=unit, leave=False, unit_scale=unit == "B")
    return PlainProgress(total, desc, unit, every=every, enabled=progress)


class PlainProgress:
    """Progress as whole lines on stderr: ``desc: 0/480 win`` at the start, then at most one
    line every ``every`` seconds with the share done and the time left, and a last line with
    the total time when the work lasted long enough to get a progress line."""

    def __init__(self, total: int | None, desc: str, unit: str, *, every: float = LINE_EVERY_S,
                 enabled: bool = True, stream: TextIO | None = None):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.enabled = enabled
        self._stream = stream
        self.n = 0
        self._t0 = self._last = time.monotonic()
        self._lines = 0
        self._line(self._amount())

    def _amount(self) -> str:
        """``1,200/4,800 windows``; bytes in MiB; without a total, the count alone."""
        if self.unit == "B":
            n, total, unit = f"{self.n / 2**20:,.1f}", self.total and f"{self.total / 2**20:,.1f}", "MiB"
        else:
            n, total, unit = f"{self.n:,}", self.total and f"{self.total:,}", self.unit
        return f"{n}/{total} {unit}" if self.total else f"{n} {unit}"

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last < self.every or (self.total and self.n >= self.total):
            return
        elapsed = now - self._t0
        if not self.total:
            self._line(f"{self._amount()}, {elapsed:.0f} s")
            return
        done = self.n / self.total
        # the first batches run slow (warm-up, lazy loading): no estimate from them alone
        left = f", about {elapsed * (1 - done) / done:.0f} s left" if done >= 0.05 else ""
        self._line(f"{self._amount()} ({100 * done:.0f}%), {elapsed:.0f} s{left}")

    def close(self) -> None:
        if self._lines > 1 and self.enabled:  # a progress line was printed: say it ended
            self._line(f"{self._amount()} in {time.monotonic() - self._t0:.0f} s")
        self.enabled = False

    def _line(self, text: str) -> None:
        if not self.enabled:
            return
        # sys.stderr as it is now, not at import (tests and notebooks swap it)
        print(f"{self.desc}: {text}", file=self._stream or sys.stderr, flush=True)
        self._lines += 1
        self._last = time.monotonic()

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
