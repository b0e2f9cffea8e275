"""The files a run keeps beside its checkpoints: ``training_log.json`` (one entry per
evaluation: the seed's layout plus lr, tokens_seen, elapsed_s) and ``run.json`` (what ran, on
what, from which code and data, and how fast)."""

from __future__ import annotations

import datetime
import json
import platform
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backpack_nb.paths import project_root

LOG_NAME = "training_log.json"
RUN_NAME = "run.json"
# An evaluation's entries in training_log.json, each a list with one value per evaluation.
LOG_KEYS = ("iterations", "train_loss", "val_loss", "lr", "tokens_seen", "elapsed_s")


def new_training_log() -> dict[str, list]:
    """The training_log.json layout: the seed's keys plus lr, tokens_seen and elapsed_s."""
    return {**{k: [] for k in LOG_KEYS}, "top_activating_words": []}


def append_evaluation(log: dict[str, list], entry: dict[str, Any]) -> None:
    """Add one evaluation (a value for every key of :data:`LOG_KEYS`) to the log."""
    for key in LOG_KEYS:
        log[key].append(entry[key])


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def git_commit() -> dict[str, Any]:
    """The checkout's commit and whether it has uncommitted changes (None where unknown)."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=project_root(), capture_output=True,
                                 text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def versions(device: torch.device) -> dict[str, Any]:
    cuda = device.type == "cuda"
    return {"python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
            "numpy": np.__version__}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def earlier_throughput(out_dir: Path) -> dict[str, Any]:
    """tokens_per_s and mfu from an earlier session's run.json (empty when there is none): a
    resumed session that trains no step keeps them instead of replacing them with nothing."""
    try:
        old = json.loads((out_dir / RUN_NAME).read_text(encoding="utf-8"))
        return {k: old.get(k) for k in ("tokens_per_s", "mfu")}
    except (OSError, ValueError, AttributeError):
        return {}
