"""What the loop measures and shows: useful FLOPs, the hardware's peak, throughput and MFU
over log windows, and the progress bar (plain lines when output goes to a file)."""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from backpack_nb.console import show_bars
from backpack_nb.models.flops import train_flops
from backpack_nb.params import TrainConfig


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
_cpu_peak: float | None = None


def peak_flops(device: torch.device, dtype: str) -> float | None:
    """Peak FLOP/s for MFU: a table for known GPUs; on the CPU a float32 matmul measured in
    this process (no table fits all CPUs). None where unknown."""
    global _cpu_peak
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in _GPU_PEAKS:
            if key in name:
                return peak if dtype != "float32" else peak / 2
        return None
    if device.type != "cpu":
        return None
    if _cpu_peak is None:
        g = torch.Generator().manual_seed(0)  # never the global RNG: a resume must not shift it
        a, b = torch.randn(1024, 1024, generator=g), torch.randn(1024, 1024, generator=g)
        a @ b  # warm up the kernel
        t0, reps = time.perf_counter(), 8
        for _ in range(reps):
            a @ b
        _cpu_peak = reps * 2 * 1024**3 / (time.perf_counter() - t0)
    return _cpu_peak


class Throughput:
    """Tokens per second and MFU of the optimizer steps alone (not evaluation or saving),
    per log window. The GPU is synced at each log line (by ``loss.item()``), so a window's
    time covers the work it queued. The run's figure leaves out the first window
    (compilation, CUDA warm-up) when there is a later one."""

    def __init__(self, tokens_per_iter: int, flops_per_token: float, peak_flops: float | None):
        self.tokens_per_iter = tokens_per_iter
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.windows: list[tuple[float, int]] = []  # (seconds, tokens) per log window
        self._seconds, self._iters = 0.0, 0

    def add_step(self, seconds: float) -> None:
        self._seconds += seconds
        self._iters += 1

    def end_window(self) -> tuple[float, float | None]:
        """Close the current window: its tokens/s and MFU."""
        tokens = self._iters * self.tokens_per_iter
        self.windows.append((self._seconds, tokens))
        tok_s = tokens / self._seconds
        self._seconds, self._iters = 0.0, 0
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
