"""What the loop measures and shows: useful FLOPs, the peak of the hardware a run shares,
throughput and MFU over log windows, and the progress bar (plain lines when output goes to a
file)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from backpack_nb.console import show_bars
from backpack_nb.models.flops import train_flops
from backpack_nb.params import TrainConfig

from .runtime import Runtime


def flops_per_token(model: torch.nn.Module, cfg: TrainConfig, distinct_tokens: float) -> float:
    """Useful training FLOPs per token, for MFU: :func:`backpack_nb.models.flops.train_flops`
    (the count the benchmark uses: matmul weights, causal attention and mixing, the sense
    network once per distinct token of a micro-batch) divided by the micro-batch's tokens."""
    step = train_flops(model, cfg.batch_size, cfg.block_size, distinct_tokens)
    return step["total"] / (cfg.batch_size * cfg.block_size)


# Dense bf16/fp16 tensor-core peaks (FLOP/s) by GPU name; fp32 uses TF32 at half of these.
_GPU_PEAKS = [("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12),
              ("A10G", 70e12), ("L4", 121e12), ("4090", 165e12), ("3090", 71e12),
              ("V100", 125e12), ("T4", 65e12)]
_core_peak: list[float] = []  # one CPU core's matmul peak, measured once per process


def machine_cores() -> int:
    """The physical CPU cores this process may run on (hyperthreads of one core count once:
    they share its matmul units)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # macOS: no affinity masks, no sysfs
        return os.cpu_count() or 1
    try:
        return len({Path(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list")
                    .read_text().strip() for c in cpus})
    except OSError:  # no sysfs topology (a container may hide it): count logical CPUs
        return len(cpus)


def _measure_core_peak() -> float:
    """One core's float32 matmul FLOP/s: the fastest of the calls made in a quarter second
    (at least 4). One thread, the fastest call: a multi-threaded measurement on a busy
    machine stalls at every call on its slowest thread, and would put the peak below what
    the training itself reaches."""
    n = 1024
    g = torch.Generator().manual_seed(0)  # never the global RNG: a resume must not shift it
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a @ b  # warm up the kernel
        t_end, best, calls = time.perf_counter() + 0.25, float("inf"), 0
        while calls < 4 or time.perf_counter() < t_end:
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
            calls += 1
        return 2 * n**3 / best
    finally:
        torch.set_num_threads(before)


def peak_flops(device: torch.device, dtype: str) -> float | None:
    """Peak FLOP/s of one device: a table for known GPUs; on the CPU the whole machine's,
    one core's float32 matmul peak (measured: no table fits all CPUs) times its cores.
    None where unknown."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in _GPU_PEAKS:
            if key in name:
                return peak if dtype != "float32" else peak / 2
        return None
    if device.type != "cpu":
        return None
    if not _core_peak:
        _core_peak.append(_measure_core_peak())
    return _core_peak[0] * machine_cores()


def run_peak_flops(rt: Runtime) -> tuple[float | None, str]:
    """The peak of the hardware the whole run shares, MFU's denominator, and what it is.

    MFU divides the useful FLOP/s of all ranks by it. Each GPU process has a device of its
    own: one device's peak times the processes. The ranks on one machine share its CPU: its
    peak counts once per machine, however many ranks it runs (measured by rank 0 while the
    others wait, so that no measurement competes with another rank's, and sent to them).
    """
    if rt.device.type == "cpu":
        if rt.ddp:
            box = [peak_flops(rt.device, rt.dtype) if rt.rank == 0 else None]
            dist.broadcast_object_list(box, src=0)
            unit = box[0]
        else:
            unit = peak_flops(rt.device, rt.dtype)
        machines = max(1, rt.world_size // rt.local_world_size)
        return unit * machines, (f"{machines} machine(s) of {machine_cores()} CPU cores, "
                                 "one core's float32 matmul peak measured")
    unit = peak_flops(rt.device, rt.dtype)
    if unit is None:
        name = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else str(rt.device)
        return None, f"{rt.world_size} x {name} (peak unknown: no MFU)"
    return unit * rt.world_size, f"{rt.world_size} x {gpu_peak_name(rt.device, rt.dtype)}"


def gpu_peak_name(device: torch.device, dtype: str) -> str:
    """What :func:`peak_flops` took for a GPU: ``NVIDIA H200 (fp16/bf16 dense)``."""
    return (f"{torch.cuda.get_device_name(device)} "
            f"({'TF32' if dtype == 'float32' else 'fp16/bf16'} dense)")


class Throughput:
    """Tokens per second and MFU of training, per log window: the wall time between two log
    lines, less the time spent evaluating and saving (:meth:`pause`). Everything else counts:
    under DDP a rank that waits for a slower one waits on the clock. The GPU is synced at
    each log line (by ``loss.item()``), so a window's time covers the work it queued. The
    run's figure leaves out the first window (compilation, CUDA warm-up) when there is a
    later one."""

    def __init__(self, tokens_per_iter: int, flops_per_token: float, peak_flops: float | None):
        self.tokens_per_iter = tokens_per_iter
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.windows: list[tuple[float, int]] = []  # (seconds, tokens) per log window
        self.begin()

    def begin(self) -> None:
        """Start a window now (the loop starts)."""
        self._start, self._paused, self._iters = time.perf_counter(), 0.0, 0

    def pause(self, seconds: float) -> None:
        """Leave ``seconds`` (an evaluation, a save) out of the current window."""
        self._paused += seconds

    def add_step(self) -> None:
        self._iters += 1

    def end_window(self) -> tuple[float, float | None]:
        """Close the current window (and start the next): its tokens/s and MFU."""
        now = time.perf_counter()
        seconds = max(now - self._start - self._paused, 1e-9)
        tokens = self._iters * self.tokens_per_iter
        self.windows.append((seconds, tokens))
        self._start, self._paused, self._iters = now, 0.0, 0
        tok_s = tokens / seconds
        return tok_s, self.mfu(tok_s)

    def mfu(self, tok_s: float | None) -> float | None:
        """Useful FLOP/s over the peak (None where either is unknown)."""
        return self.flops_per_token * tok_s / self.peak_flops if (tok_s and self.peak_flops) else None

    def summary(self) -> tuple[float | None, float | None]:
        """The run's tokens/s and MFU (None when no window closed)."""
        steady = self.windows[1:] or self.windows
        seconds = sum(w[0] for w in steady)
        tok_s = sum(w[1] for w in steady) / seconds if seconds else None
        return tok_s, self.mfu(tok_s)


class Progress:
    """A tqdm bar in terminals and notebooks, plain lines when output goes to a file."""

    def __init__(self, enabled: bool, total: int, initial: int, desc: str):
        self.enabled = enabled
        self.bar = None
        if show_bars(enabled):
            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)
        self.total = total

    def update(self, iter_num: int, info: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(info, refresh=False)
            self.bar.update(iter_num - self.bar.n)
        else:
            print(f"iter {iter_num}/{self.total} | {info}", flush=True)

    def line(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
