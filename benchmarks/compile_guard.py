"""Compile a variant under watch: a time cap, the recompile limit an error, recompiles counted."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable
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
    """Run ``step`` ``n_steps`` times, compiled under a ``cap_s`` alarm (main thread; 0: none) and
    the recompile limit an error: ``status`` ("ok", "over cap", "recompile limit", "error"),
    ``seconds``, ``message`` and, compiled, ``graphs``, ``graph_breaks``, ``break_reasons``."""
    if compiled:
        counters.clear()
    config = torch._dynamo.config
    # "fail_on_cache_limit_hit" before torch 2.7
    flag = next((n for n in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit")
                 if hasattr(config, n)), None)
    strict = config.patch(**{flag: True}) if compiled and flag else contextlib.nullcontext()
    alarm = compiled and cap_s > 0 and threading.current_thread() is threading.main_thread()
    fired: list[bool] = []  # the compiler may wrap CompileOverCap in its own exception

    def fire(signum, frame):
        fired.append(True)
        raise CompileOverCap(f"over the {cap_s:.0f} s cap")

    previous = signal.signal(signal.SIGALRM, fire) if alarm else None
    status, message, t0 = "ok", "", time.perf_counter()
    try:
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, cap_s)
        with strict:
            for _ in range(n_steps):
                step()
    except Exception as exc:  # noqa: BLE001 - reported, and the variant dropped
        text = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        limit = any(w in f"{type(exc).__name__} {exc}"
                    for w in ("LimitHit", "recompile_limit", "cache_limit"))
        status = "over cap" if fired else "recompile limit" if limit else "error"
        message = f"compiling ran over the {cap_s:g} s cap" if fired else text
    finally:
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    report: dict[str, Any] = {"status": status, "seconds": round(time.perf_counter() - t0, 1),
                              "message": message}
    if compiled:
        breaks = counters["graph_break"]
        report.update(graphs=graphs_compiled(), graph_breaks=int(sum(breaks.values())),
                      break_reasons={r.split("\n")[0][:120]: int(n) for r, n in breaks.items()})
    return report


def warmup_caps(cap_s: float, budget_s: float, share: float = 1.0,
                least: float = 5.0) -> Callable[[], float | None]:
    """Each call: the next warm-up's cap (``cap_s`` within ``share`` of ``budget_s``; 0: none),
    None once under ``least`` seconds are left."""
    t0 = time.perf_counter()

    def next_cap() -> float | None:
        if not budget_s:
            return cap_s
        left = budget_s * share - (time.perf_counter() - t0)
        return None if left < least else min(cap_s, left) if cap_s else left

    return next_cap


def recompile_limit_at_least(n: int) -> contextlib.AbstractContextManager:
    """Dynamo's per-code-object recompile limit raised to ``n`` for a while (its name since
    torch 2.7; ``cache_size_limit`` before)."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    return config.patch(**{name: max(getattr(config, name), n)})


def drop_compiled_state() -> None:
    """Forget compiled code after a failed variant, so the next one starts clean."""
    with contextlib.suppress(Exception):
        torch._dynamo.reset()
