"""Compile a benchmark variant under watch: a time cap, and a fallback to eager made visible.

``torch.compile`` has two silent ways to waste a short GPU lease: a compile that takes many
minutes, and dynamo's recompile limit, past which a function quietly runs eagerly (a warning
in the log, nothing else). :func:`guarded_warmup` runs a variant's warm-up steps (where it
compiles) under an alarm, with the limit made an error, and reports what dynamo did;
:func:`graphs_compiled`, counted around each timed step, shows a recompile while timing.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch._dynamo.utils import counters


class CompileOverCap(Exception):
    """A variant's warm-up (its compilation) ran past the cap."""


def graphs_compiled() -> int:
    """Graphs dynamo has compiled since the last warm-up started (a running count)."""
    return int(counters["stats"]["unique_graphs"])


def guarded_warmup(step: Callable[[], Any], n_steps: int, *, compiled: bool,
                   cap_s: float = 0.0) -> dict[str, Any]:
    """Run ``step`` ``n_steps`` times; for a compiled variant under a ``cap_s`` alarm (main
    thread only; 0: none) and with dynamo's recompile limit made an error. Returns
    ``{"status": "ok" | "over cap" | "recompile limit" | "error", "seconds", "message"}`` and
    for a compiled variant ``"graphs", "graph_breaks", "break_reasons"``; a status other
    than "ok" means the variant must not be timed."""
    if compiled:
        counters.clear()
    config = torch._dynamo.config
    # "fail_on_cache_limit_hit" before torch 2.7
    flag = next((n for n in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit")
                 if hasattr(config, n)), None)
    fail_before = getattr(config, flag) if flag else None
    alarm = compiled and cap_s > 0 and threading.current_thread() is threading.main_thread()
    fired: list[bool] = []  # the compiler may wrap CompileOverCap in its own exception

    def fire(signum, frame):
        fired.append(True)
        raise CompileOverCap(f"over the {cap_s:.0f} s cap")

    previous = signal.signal(signal.SIGALRM, fire) if alarm else None
    status, message, t0 = "ok", "", time.perf_counter()
    try:
        if compiled and flag:
            setattr(config, flag, True)
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, cap_s)
        for _ in range(n_steps):
            step()
    except Exception as exc:  # noqa: BLE001 - reported, and the variant dropped
        text = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        if fired:
            status, message = "over cap", f"compiling ran over the {cap_s:g} s cap"
        elif any(w in f"{type(exc).__name__} {exc}" for w in ("LimitHit", "recompile_limit",
                                                               "cache_limit")):
            status, message = "recompile limit", text
        else:
            status, message = "error", text
    finally:
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        if flag:
            setattr(config, flag, fail_before)
    report: dict[str, Any] = {"status": status, "seconds": round(time.perf_counter() - t0, 1),
                              "message": message}
    if compiled:
        breaks = counters["graph_break"]
        report.update(graphs=graphs_compiled(), graph_breaks=int(sum(breaks.values())),
                      break_reasons={r.split("\n")[0][:120]: int(n) for r, n in breaks.items()})
    return report


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
