"""Figures a researcher would rather look at than read. Each function returns a matplotlib
Figure (shown inline in a notebook) and :func:`save` writes it as PNG or SVG."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

# matplotlib picks a non-interactive backend by itself on a headless machine (papermill,
# CI) and the inline one in a notebook; nothing to force here.
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure


def _log(run: Mapping | str | os.PathLike) -> Mapping:
    """A training log: the dict itself, a run folder, or a training_log.json path."""
    if isinstance(run, Mapping):
        return run
    path = Path(run)
    if path.is_dir():
        path = path / "training_log.json"
    return json.loads(path.read_text(encoding="utf-8"))


def loss_curves(runs: Mapping[str, Mapping | str | os.PathLike], title: str = "loss", x: str = "iterations",
                side_by_side: bool = False) -> Figure:
    """Train (dashed) and val (solid) loss of one or several runs; ``x`` is ``iterations``
    or ``tokens_seen``. All runs on one set of axes, or with ``side_by_side`` one panel per
    run on a shared y axis, each with the other runs' validation loss drawn faintly behind
    it for reference."""
    logs = {name: _log(run) for name, run in runs.items()}
    n = len(logs) if side_by_side else 1
    fig, axes = plt.subplots(1, n, figsize=(7, 4) if n == 1 else (1.5 + 3.3 * n, 4), sharey=True,
                             constrained_layout=True, squeeze=False)
    # side by side, a colour per model type (as in bpb_bars); overlaid, a colour per run
    colors = ([c for c, _ in _run_styles(list(logs), [None] * len(logs))] if side_by_side
              else [f"C{i}" for i in range(len(logs))])
    for i, (name, log) in enumerate(logs.items()):
        ax = axes[0, i if side_by_side else 0]
        color = colors[i]
        if side_by_side:
            others = [(j, olog) for j, (other, olog) in enumerate(logs.items())
                      if other != name and olog.get("val_loss")]
            for n_other, (j, olog) in enumerate(others):
                oxs = olog.get(x) or olog["iterations"]
                ax.plot(oxs[: len(olog["val_loss"])], olog["val_loss"], "-", color=colors[j], alpha=0.25, lw=1,
                        label="the other runs' val" if n_other == 0 else None)
        xs = log.get(x) or log["iterations"]
        if log.get("train_loss"):
            ax.plot(xs[: len(log["train_loss"])], log["train_loss"], "--", color=color, alpha=0.7, label=f"{name} train")
        if log.get("val_loss"):
            ax.plot(xs[: len(log["val_loss"])], log["val_loss"], "-", color=color, marker="o", ms=3, label=f"{name} val")
        if side_by_side:
            ax.set_title(name, fontsize=10)
    for ax in axes[0]:
        ax.set_xlabel("tokens seen" if x == "tokens_seen" else "iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7 if side_by_side else 8)
    axes[0, 0].set_ylabel("cross-entropy (nats/token)")
    if side_by_side:
        fig.suptitle(title)
    else:
        axes[0, 0].set_title(title)
    return fig


_HATCHES = ("", "//", "..", "xx", "\\\\", "++")


def _run_styles(names: Sequence[str], kinds: Sequence[str | None]) -> list[tuple[str, str]]:
    """(colour, hatch) per run: one colour per model type (the label's first word when the
    type is unknown), so that several seeds of a model share a colour; a hatch per seed."""
    groups: dict[str, int] = {}
    seen: dict[str, int] = {}
    styles = []
    for name, kind in zip(names, kinds):
        key = kind or str(name).split()[0]
        groups.setdefault(key, len(groups))
        n = seen[key] = seen.get(key, -1) + 1
        styles.append((f"C{groups[key]}", _HATCHES[n % len(_HATCHES)]))
    return styles


def bpb_bars(evals: Mapping[str, Mapping], split: str = "val", title: str | None = None) -> Figure:
    """Bits per byte per language (and all) for each run, with the bootstrap 95% interval,
    from ``eval.json`` dicts."""
    names = list(evals)
    langs: list[str] = []
    for ev in evals.values():
        for lang in ev["splits"][split]:
            if lang not in langs:
                langs.append(lang)
    langs.sort(key=lambda l: (l == "all", l))
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(langs), 4), constrained_layout=True)
    xs = np.arange(len(langs))
    styles = _run_styles(names, [evals[n].get("model_type") for n in names])
    for i, (name, (color, hatch)) in enumerate(zip(names, styles)):
        s = evals[name]["splits"][split]
        vals = [s[l]["bits_per_byte"] if l in s else np.nan for l in langs]
        lo = [s[l]["bits_per_byte"] - s[l]["bpb_ci95"][0] if l in s else 0 for l in langs]
        hi = [s[l]["bpb_ci95"][1] - s[l]["bits_per_byte"] if l in s else 0 for l in langs]
        bars = ax.bar(xs + (i - (len(names) - 1) / 2) * width, vals, width, yerr=[lo, hi], capsize=3, label=name,
                      color=color, hatch=hatch, edgecolor="white" if hatch else None)
        ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
    ax.set_xticks(xs, langs)
    ax.set_ylabel("bits per byte (lower is better)")
    ax.set_title(title or f"{split}: bits per byte by language (95% bootstrap interval)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def heatmap(
    matrix: np.ndarray,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    title: str = "",
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    annotate: bool | None = None,
) -> Figure:
    """A labelled heatmap (sense similarities, alpha weights, sense alignment)."""
    matrix = np.asarray(matrix, dtype=float)
    rows, cols = matrix.shape
    fig, ax = plt.subplots(figsize=(min(2 + 0.45 * cols, 14), min(1.5 + 0.4 * rows, 12)), constrained_layout=True)
    im = ax.imshow(matrix, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    fig.colorbar(im, ax=ax, shrink=0.8)
    if row_labels is not None:
        ax.set_yticks(range(rows), row_labels, fontsize=8)
    if col_labels is not None:
        ax.set_xticks(range(cols), col_labels, fontsize=8, rotation=60, ha="right")
    if annotate if annotate is not None else rows * cols <= 144:
        for (r, c), v in np.ndenumerate(matrix):
            if np.isfinite(v):
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if v < np.nanmean(matrix) else "k")
    ax.set_title(title)
    return fig


def alpha_heatmaps(alpha: np.ndarray, tokens: Sequence[str], senses: Sequence[int] | None = None, title: str = "") -> Figure:
    """Contextualization weights alpha (k, T, T) of one sentence, one panel per sense:
    row i is the output position, column j the token whose sense it weighs."""
    alpha = np.asarray(alpha, dtype=float)
    senses = list(senses) if senses is not None else list(range(alpha.shape[0]))
    ncols = min(4, len(senses))
    nrows = (len(senses) + ncols - 1) // ncols
    T = alpha.shape[-1]
    side = max(2.5, 0.28 * T)
    fig, axes = plt.subplots(nrows, ncols, figsize=(side * ncols, side * nrows), squeeze=False, constrained_layout=True)
    for ax, l in zip(axes.flat, senses):
        ax.imshow(alpha[l], cmap="magma", vmin=0, vmax=1)
        ax.set_title(f"sense {l}", fontsize=9)
        ax.set_xticks(range(T), tokens, rotation=90, fontsize=6)
        ax.set_yticks(range(T), tokens, fontsize=6)
    for ax in list(axes.flat)[len(senses) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    return fig


def save(fig: Figure, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write ``fig`` as PNG or SVG (by the suffix), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path
