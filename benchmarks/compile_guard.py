"""Compile a benchmark variant under watch: a time cap, and a fallback to eager made visible.

``torch.compile`` has two silent ways to waste a short GPU lease: a compile that takes many
minutes, and dynamo's recompile limit, past which a function quietly runs eagerly (a warning
in the log, nothing else). :func:`guarded_warmup` runs a variant's warm-up steps (where it
compiles) under an alarm, with ``fail_on_recompile_limit_hit`` set so the limit raises, and
reports what dynamo did: graphs compiled and graph breaks. :func:`graphs_compiled` counted
around each timed step then shows a recompile while timing (a shape or guard changed).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch


class CompileOverCap(Exception):
    """A variant's warm-up (its compilation) ran past the cap."""


def _dynamo_counts() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values()))}


def _graph_break_reasons() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {reason.split("\n")[0][:120]: int(n) for reason, n in counters["graph_break"].items()}


@contextlib.contextmanager
def _alarm(seconds: float, fired: list[bool]) -> Iterator[None]:
    """Raise CompileOverCap in the main thread after ``seconds`` and note it in ``fired``
    (the compiler may wrap the exception in its own); a no-op off the main thread or for 0."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def fire(signum, frame):
        fired.append(True)
        raise CompileOverCap(f"over the {seconds:.0f} s cap")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def guarded_warmup(step: Callable[[], Any], n_steps: int, *, compiled: bool,
                   cap_s: float = 0.0) -> dict[str, Any]:
    """Run ``step`` ``n_steps`` times; for a compiled variant under a ``cap_s`` alarm and with
    dynamo's recompile limit made an error. Returns ``{"status": "ok" | "over cap" |
    "recompile limit" | "error", "seconds", "graphs", "graph_breaks", "break_reasons",
    "message"}``; a status other than "ok" means the variant must not be timed."""
    from torch._dynamo.utils import counters

    if compiled:
        counters.clear()
    t0 = time.perf_counter()
    status, message = "ok", ""
    config = torch._dynamo.config
    # "fail_on_cache_limit_hit" before torch 2.7
    flag = next((n for n in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit")
                 if hasattr(config, n)), None)
    fail_before = getattr(config, flag) if flag else None
    fired: list[bool] = []
    try:
        if compiled and flag:
            setattr(config, flag, True)
        with _alarm(cap_s if compiled else 0.0, fired):
            for _ in range(n_steps):
                step()
    except Exception as exc:  # noqa: BLE001 - reported, and the variant dropped
        text = str(exc).splitlines()[0][:200] if str(exc) else ""
        if fired:
            status, message = "over cap", f"compiling ran over the {cap_s:g} s cap"
        elif ("LimitHit" in type(exc).__name__ or "recompile_limit" in str(exc)
              or "cache_limit" in str(exc)):
            status, message = "recompile limit", f"{type(exc).__name__}: {text}"
        else:
            status, message = "error", f"{type(exc).__name__}: {text}"
    finally:
        if flag:
            setattr(config, flag, fail_before)
    report: dict[str, Any] = {"status": status, "seconds": round(time.perf_counter() - t0, 1),
                              "message": message}
    if compiled:
        report.update(_dynamo_counts())
        report["break_reasons"] = _graph_break_reasons()
    return report


def graphs_compiled() -> int:
    """Graphs dynamo has compiled since the last warm-up started (a running count)."""
    return _dynamo_counts()["graphs"]


@contextlib.contextmanager
def recompile_limit_at_least(n: int) -> Iterator[None]:
    """Raise dynamo's per-code-object recompile limit to ``n`` for a while (its name since
    torch 2.7; ``cache_size_limit`` before)."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    before = getattr(config, name)
    setattr(config, name, max(before, n))
    try:
        yield
    finally:
        setattr(config, name, before)


def drop_compiled_state() -> None:
    """Forget compiled code after a failed variant, so the next one starts clean."""
    with contextlib.suppress(Exception):
        torch._dynamo.reset()
