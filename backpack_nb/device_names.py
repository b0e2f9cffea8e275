"""The device and dtype names a setting may hold, checked without torch (the configuration
checks them; :mod:`backpack_nb.devices` decides what a name becomes on this machine)."""

from __future__ import annotations

import re

DTYPES = ("float32", "bfloat16", "float16")
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?|mps)$")


def device_problem(device: str) -> str | None:
    """Why ``device`` is not a device name (None when it is one)."""
    if _DEVICE.match(device):
        return None
    return f"device: {device!r} is not one of cpu, cuda, cuda:N, mps"
