"""Where this process trains and how it fits in the job: device, precision, DDP rank, and the
signals that ask it to stop."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist

from backpack_nb.devices import autocast, resolve_device
from backpack_nb.params import TrainConfig

log = logging.getLogger("backpack_nb.training")


@dataclass
class Runtime:
    """Where this process trains and how it fits in the job."""

    device: torch.device
    dtype: str  # the autocast dtype actually used (may differ from the one asked for)
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1  # the processes on this machine (they share its CPU)
    owns_process_group: bool = False  # we initialised torch.distributed, so we tear it down
    warnings: list[str] = field(default_factory=list)

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def ddp(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.dtype)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        if self.master:
            log.warning(message)


def dist_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) as torchrun sets them; (0, 0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 0, 1
    return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"])), world


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """Resolve the device (the one rule of :mod:`backpack_nb.devices`) and, under torchrun,
    join the process group (NCCL on CUDA, gloo on the CPU)."""
    rank, local_rank, world = dist_env()
    device, dtype, notes = resolve_device(cfg.device, cfg.dtype, strict=cfg.strict_device,
                                          local_rank=local_rank, world_size=world)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world)) if world > 1 else 1
    rt = Runtime(device=device, dtype=dtype, rank=rank, local_rank=local_rank, world_size=world,
                 local_world_size=local_world)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        rt.owns_process_group = True
    for note in notes:
        rt.warn(note)
    if device.type == "cuda":
        # TF32 matmuls: the float32 parts run on tensor cores, at no visible cost to the loss.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return rt


class Aborted(KeyboardInterrupt):
    """A second SIGTERM/SIGINT: stop at once, without saving the current step."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopRequest:
    """SIGTERM/SIGINT ask the loop to stop: after the current step, or at once during an
    evaluation (:mod:`.estimate` abandons it); the loop then saves. A second signal aborts.
    ``plan()`` says what the first signal will do now (the trainer sets it; the line the
    handler prints must not promise a save that will not happen)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._pending: tuple[Any, torch.Tensor] | None = None  # the flag exchange under way
        self._group: Any = None  # a gloo group for the flag: never a device sync, even on NCCL
        self.plan: Callable[[], str] = lambda: ("finishing this step, saving, then stopping "
                                                "(send it again to abort without saving)")

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def reason(self, rt: Runtime, *, stop_after: bool = False) -> str | None:
        """Why to stop now (the signal's name, ``stop_after``, or ``peer`` when another rank
        got the signal), or None. Under DDP every rank must ask at the same points; a signal
        then stops them all together, one call after the first rank saw it, without blocking
        the host: each call starts an asynchronous all-reduce of this rank's signal flag (on
        the CPU) and reads the one the call before started, finished in the meantime.
        ``stop_after`` is the same on every rank and needs no collective."""
        local = signal.Signals(self.signum).name if self.signum is not None else None
        if not rt.ddp:
            return local or ("stop_after" if stop_after else None)
        agreed = False
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            agreed = bool(flag.item())
        if self._group is None:  # every rank gets here at the same call
            self._group = dist.new_group(backend="gloo")
        flag = torch.tensor([1 if local else 0], dtype=torch.int32)
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group,
                                         async_op=True), flag)
        if agreed:
            return local or "peer"
        return "stop_after" if stop_after else None

    def settle(self) -> None:
        """Wait for the last flag exchange (every rank, before the process group goes)."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            self.restore()
            raise Aborted(signum)
        self.signum = signum
        print(f"\nreceived {signal.Signals(signum).name}: {self.plan()}", file=sys.stderr,
              flush=True)
