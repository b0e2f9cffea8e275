"""Figures a researcher would rather look at than read. Each function returns a matplotlib
Figure (shown inline in a notebook) and :func:`save` writes it as PNG or SVG.

Every figure is laid out for the size an HTML report shows it at: the inline backend draws
at :data:`DPI` pixels per inch and a report's output column is about 1,230 px wide in a
1,280-px window, so a figure at most :data:`PAGE_WIDTH_IN` wide is shown unscaled and its
text keeps the size it was set in (at least :data:`MIN_FONT_PT`). Heatmaps size their cells
from the number of rows and columns (at least :data:`MIN_CELL_IN`), measure their labels, and
thin tick labels that would overlap rather than print them on top of each other.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path

# matplotlib picks a non-interactive backend by itself on a headless machine (papermill,
# CI) and the inline one in a notebook; nothing to force here.
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colorbar import Colorbar
from matplotlib.colors import LogNorm
from matplotlib.backends.backend_agg import RendererAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.legend_handler import HandlerTuple
from matplotlib.lines import Line2D

DPI = 100  # pixels per inch of the inline backend (matplotlib's figure.dpi), so of a report
PAGE_WIDTH_IN = 11.8  # the widest figure a report shows unscaled: 1,200 px with savefig's padding
MIN_FONT_PT = 8  # the smallest text of any figure, tick labels and cell numbers included
TITLE_PT = 11
MIN_CELL_IN = 0.125  # a heatmap cell is at least 12.5 px on a side
TOKEN_CELL_IN = 0.15  # cells labelled with tokens: room for one line of 8-pt text per row
_MARGIN_IN = 0.1
_TICK_PAD_IN = 0.08  # tick mark and the gap to its label
_CBAR_IN = 0.12 + 0.15 + 0.08  # gap, bar, tick marks; its labels are measured


# ---- measuring and fitting text --------------------------------------------------------------


@lru_cache(maxsize=1)
def _renderer() -> RendererAgg:
    """A renderer at the report's DPI, only for measuring text (no figure needed)."""
    return RendererAgg(8, 8, DPI)


def text_size(text: str, size: float = MIN_FONT_PT) -> tuple[float, float]:
    """(width, height) in inches of one line of ``text`` in the default font at ``size``
    points, as matplotlib lays it out (the height is a full line's, as for "lp")."""
    prop = FontProperties(size=size)
    w = _renderer().get_text_width_height_descent(text, prop, ismath=False)[0] if text else 0.0
    _, h, d = _renderer().get_text_width_height_descent("lp", prop, ismath=False)
    return w / DPI, (h + d) / DPI


def _widest(labels: Sequence[str] | None, size: float = MIN_FONT_PT) -> float:
    return max((text_size(str(l), size)[0] for l in labels), default=0.0) if labels is not None else 0.0


def elide(text: str, width_in: float, size: float = MIN_FONT_PT) -> str:
    """``text`` cut to ``width_in`` at ``size`` points, ending in "…" where it was cut."""
    if text_size(text, size)[0] <= width_in:
        return text
    lo, hi = 0, len(text)  # the longest prefix that fits with its "…": lo fits, hi does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if text_size(text[:mid] + "…", size)[0] <= width_in else (lo, mid)
    return text[:lo] + "…"


def wrap(text: str, width_in: float, size: float = TITLE_PT, max_lines: int = 3) -> str:
    """``text`` broken into lines no wider than ``width_in`` at ``size`` points (at word
    boundaries; a word wider than a line is broken inside), at most ``max_lines`` of them,
    the last ending in "…" if text was left out; existing line breaks are kept."""
    out: list[str] = []
    for para in text.split("\n"):
        line = ""
        for word in para.split(" "):
            trial = f"{line} {word}" if line else word
            if text_size(trial, size)[0] <= width_in:
                line = trial
                continue
            if line:
                out.append(line)
            while text_size(word, size)[0] > width_in:  # a URL, a run of digits: break it anywhere
                piece = elide(word, width_in, size)[:-1] or word[0]
                out.append(piece)
                word = word[len(piece):]
            line = word
        out.append(line)
    if len(out) > max_lines:
        out = out[: max_lines - 1] + [elide(out[max_lines - 1] + " …", width_in, size)]
    return "\n".join(out)


def _title_height(title: str, size: float = TITLE_PT) -> float:
    return (title.count("\n") + 1) * text_size("lp", size)[1] * 1.2 + 0.1 if title else 0.0


def thin_ticks(fig: Figure, axes: Sequence[Axes], gap_px: float = 1.0) -> None:
    """Hide tick labels until the shown ones do not overlap: every 2nd, 3rd, ... one, from
    the first. Needs the figure's final size (call it last)."""
    fig.draw_without_rendering()  # lays the tick labels out where they will be drawn
    for ax in axes:
        for axis in (ax.xaxis, ax.yaxis):
            labels = [t for t in axis.get_ticklabels() if t.get_text()]
            boxes = [t.get_window_extent().padded(gap_px / 2) for t in labels]
            step = next((s for s in range(1, len(labels))
                         if not any(a.overlaps(b) for a, b in zip(boxes[::s], boxes[s::s]))), max(len(labels), 1))
            for i, t in enumerate(labels):
                t.set_visible(i % step == 0)


# ---- training curves and bar charts ----------------------------------------------------------


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
    run (at most three to a row) on a shared y axis, each with the other runs' validation loss
    drawn faintly behind it for reference."""
    logs = {name: _log(run) for name, run in runs.items()}
    n = len(logs) if side_by_side else 1
    nrows = math.ceil(n / 3)
    ncols = math.ceil(n / nrows)  # balanced rows: 2 x 2 for four runs, not 3 + 1
    width = 7 if n == 1 else min(PAGE_WIDTH_IN, 1.5 + 3.6 * ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, 3.6 * nrows + 0.4), sharey=True,
                             layout="constrained", squeeze=False)
    # side by side, a colour per model type (as in bpb_bars); overlaid, a colour per run
    colors = ([c for c, _ in _run_styles(list(logs), [None] * len(logs))] if side_by_side
              else [f"C{i}" for i in range(len(logs))])
    flat = list(axes.flat)
    for i, (name, log) in enumerate(logs.items()):
        ax = flat[i if side_by_side else 0]
        color = colors[i]
        others: dict[str, Line2D] = {}  # colour -> the legend's sample of the other runs in that colour
        if side_by_side:
            for j, (other, olog) in enumerate(logs.items()):
                if other != name and olog.get("val_loss"):
                    oxs = olog.get(x) or olog["iterations"]
                    ax.plot(oxs[: len(olog["val_loss"])], olog["val_loss"], "-", color=colors[j], alpha=0.3, lw=1)
                    # the legend's sample a little stronger than the faint line, to tell its colours apart
                    others.setdefault(colors[j], Line2D([], [], color=colors[j], alpha=0.55, lw=1.5))
        xs = log.get(x) or log["iterations"]
        if log.get("train_loss"):
            ax.plot(xs[: len(log["train_loss"])], log["train_loss"], "--", color=color, alpha=0.7, label=f"{name} train")
        if log.get("val_loss"):
            ax.plot(xs[: len(log["val_loss"])], log["val_loss"], "-", color=color, marker="o", ms=3, label=f"{name} val")
        handles, labels = ax.get_legend_handles_labels()
        if others:  # one entry that shows every colour the other runs are drawn in
            handles, labels = [tuple(others.values()), *handles], ["the other runs' val", *labels]
        ax.legend(handles, labels, fontsize=MIN_FONT_PT, handlelength=2.0 + 1.2 * max(len(others) - 1, 0),
                  handler_map={tuple: HandlerTuple(ndivide=None, pad=0.2)})
        if side_by_side:
            ax.set_title(name, fontsize=10)
    for ax in flat[n:]:
        ax.axis("off")
    for ax in flat[:n]:
        ax.set_xlabel("tokens seen" if x == "tokens_seen" else "iteration")
        ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel("cross-entropy (nats/token)")
    if side_by_side:
        fig.suptitle(wrap(title, width - 0.3, 12))
    else:
        axes[0, 0].set_title(wrap(title, width - 1.2, 12))
    return fig


_HATCHES = ("", "//", "..", "xx", "\\\\", "++")
# Every figure of a report: the Backpack blue, the Transformer orange, whatever their order.
MODEL_COLORS = {"backpack": "C0", "transformer": "C1"}


def model_kind(label: str, kind: str | None = None) -> str:
    """The model type a run stands for: ``kind`` when known, else the model named in its
    label ("backpack s1337", "tiny_transformer"), else the label's first word."""
    if kind:
        return kind
    low = str(label).lower()
    return next((m for m in MODEL_COLORS if m in low), str(label).split()[0] if str(label).split() else "")


def _run_styles(names: Sequence[str], kinds: Sequence[str | None]) -> list[tuple[str, str]]:
    """(colour, hatch) per run: the model type's colour (:data:`MODEL_COLORS`; other types
    the next colours of the cycle, in order of appearance), so that several seeds of a model
    share a colour; a hatch per seed (the n-th run of a type gets the n-th hatch)."""
    extra: dict[str, str] = {}
    seen: dict[str, int] = {}
    styles = []
    for name, kind in zip(names, kinds):
        key = model_kind(name, kind)
        if key not in MODEL_COLORS and key not in extra:
            extra[key] = f"C{len(MODEL_COLORS) + len(extra)}"
        n = seen[key] = seen.get(key, -1) + 1
        styles.append((MODEL_COLORS.get(key) or extra[key], _HATCHES[n % len(_HATCHES)]))
    return styles


def figure_legend(fig: Figure, handles: Sequence, labels: Sequence[str]) -> None:
    """A legend under the figure's panels, outside them (never on the bars), as many entries
    to a row as the figure's width holds."""
    widest = _widest(labels) + 0.45  # the swatch and the gap after it
    ncols = max(1, min(len(labels), int((fig.get_figwidth() - 0.4) // widest)))
    fig.legend(handles, labels, loc="outside lower center", ncols=ncols, fontsize=MIN_FONT_PT, frameon=False)


def legend_below(fig: Figure, ax: Axes, n_entries: int | None = None) -> None:
    """The legend of ``ax`` under the plot (:func:`figure_legend`); ``n_entries`` is not
    needed any more (the legend counts its entries) and kept for existing callers."""
    figure_legend(fig, *ax.get_legend_handles_labels())


def bpb_bars(evals: Mapping[str, Mapping], split: str = "val", title: str | None = None) -> Figure:
    """Bits per byte per language (and all) for each run, with the bootstrap 95% interval,
    from ``eval.json`` dicts; each bar's value is written above its interval."""
    names = list(evals)
    langs: list[str] = []
    for ev in evals.values():
        for lang in ev["splits"][split]:
            if lang not in langs:
                langs.append(lang)
    langs.sort(key=lambda l: (l == "all", l))
    # A bar wide enough for its value written across it, unless that makes the figure too wide.
    bar_in = min(text_size("0.000")[0] + 0.1, (PAGE_WIDTH_IN - 1.2) / max(len(langs) * len(names) / 0.8, 1))
    vertical = bar_in < text_size("0.000")[0] + 0.05
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(1.2 + bar_in * len(names) * len(langs) / 0.8, 4.6), layout="constrained")
    xs = np.arange(len(langs))
    styles = _run_styles(names, [evals[n].get("model_type") for n in names])
    top = 0.0
    for i, (name, (color, hatch)) in enumerate(zip(names, styles)):
        s = evals[name]["splits"][split]
        vals = np.array([s[l]["bits_per_byte"] if l in s else np.nan for l in langs])
        lo = [s[l]["bits_per_byte"] - s[l]["bpb_ci95"][0] if l in s else 0 for l in langs]
        hi = np.array([s[l]["bpb_ci95"][1] - s[l]["bits_per_byte"] if l in s else 0 for l in langs])
        at = xs + (i - (len(names) - 1) / 2) * width
        ax.bar(at, vals, width, yerr=[lo, hi], capsize=3, label=name, color=color, hatch=hatch,
               edgecolor="white" if hatch else None)
        for x, v, h in zip(at, vals, hi):
            if np.isfinite(v):  # above the interval's cap, where it cannot sit on a bar or a whisker
                ax.annotate(f"{v:.3f}", (x, v + h), xytext=(0, 3), textcoords="offset points", ha="center",
                            va="bottom", fontsize=MIN_FONT_PT, rotation=90 if vertical else 0)
        top = max(top, np.nanmax(np.append(vals + hi, 0)))
    ax.set_ylim(0, top * (1.2 if vertical else 1.1) or 1)
    ax.set_xticks(xs, langs)
    ax.set_ylabel("bits per byte (lower is better)")
    ax.set_title(wrap(title or f"{split}: bits per byte by language (95% bootstrap interval)",
                      fig.get_figwidth() - 0.9, TITLE_PT), fontsize=TITLE_PT)
    ax.grid(axis="y", alpha=0.3)
    legend_below(fig, ax, len(names))
    return fig


def multisimlex_bars(table, methods: Sequence[str] | None = None, title: str | None = None) -> Figure:
    """Multi-SimLex scores of several runs, one panel per language / pair / retrieval
    direction, each on the axis of its own metric (Spearman rho, or P@1 for a retrieval
    column): a group of bars per method, a bar per run in the report's colours (the Backpack
    blue, the Transformer orange, a hatch per seed) with its bootstrap 95% interval.
    ``table``: :func:`backpack_nb.lexsim.side_by_side` of the runs' results."""
    cols = list(table.columns)
    runs = list(dict.fromkeys(r["model"] for r in table))
    present = list(dict.fromkeys(r["method"] for r in table))
    methods = [m for m in (methods or present) if m in present]
    if not cols or not runs or not methods:
        raise ValueError("no Multi-SimLex scores to draw")
    styles = dict(zip(runs, _run_styles(runs, [None] * len(runs))))
    cells = {(r["model"], r["method"]): r for r in table}
    ncols = 1 if len(cols) == 1 else 2 if len(cols) <= 4 else 3
    nrows = -(-len(cols) // ncols)
    width = min(PAGE_WIDTH_IN, 1.2 + 5.2 * ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, 2.9 * nrows + 1.0), layout="constrained", squeeze=False)
    flat = list(axes.flat)
    bar = 0.8 / len(runs)
    limits: dict[str, list[float]] = {}  # metric -> every drawn end, so one metric shares one scale
    metric_of: list[str] = []
    for ax, col in zip(flat, cols):
        metric = "P@1" if col.endswith("P@1") else "Spearman rho"
        for ri, run in enumerate(runs):
            color, hatch = styles[run]
            for mi, method in enumerate(methods):
                c = cells.get((run, method), {}).get(col)
                if not c or c.get("value") is None or not np.isfinite(c["value"]):
                    continue
                v, (a, b) = c["value"], c["ci95"]
                err = [[max(v - a, 0)], [max(b - v, 0)]] if np.isfinite(a) and np.isfinite(b) else None
                ax.bar(mi + (ri - (len(runs) - 1) / 2) * bar, v, bar, yerr=err, capsize=2, color=color, hatch=hatch,
                       edgecolor="white" if hatch else None, linewidth=0, ecolor="0.15", label=run)
                limits.setdefault(metric, []).extend(x for x in (v, a, b) if np.isfinite(x))
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xticks(range(len(methods)), methods, fontsize=MIN_FONT_PT + 1)
        ax.set_ylabel(metric, fontsize=9)
        ax.set_title(col, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        metric_of.append(metric)
    for ax in flat[len(cols):]:
        ax.axis("off")
    for ax, metric in zip(flat, metric_of):
        ends = limits.get(metric, [0.0])
        lo, hi = min(min(ends), 0.0), max(max(ends), 0.0)
        pad = 0.06 * (hi - lo or 1.0)
        ax.set_ylim(lo - pad, hi + pad)
    handles = {}
    for ax in flat:
        for h, l in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(l, h)
    figure_legend(fig, list(handles.values()), list(handles))
    fig.suptitle(wrap(title or "Multi-SimLex: Spearman rho of the models' similarities with human ratings "
                      "(P@1 for retrieval), 95% bootstrap interval", width - 0.3, TITLE_PT), fontsize=TITLE_PT)
    return fig


# ---- heatmaps ------------------------------------------------------------------------------


def _place(fig: Figure, left: float, bottom: float, width: float, height: float) -> Axes:
    """Axes at a position given in inches from the figure's lower left corner."""
    W, H = fig.get_size_inches()
    return fig.add_axes((left / W, bottom / H, width / W, height / H))


def _colorbar(fig: Figure, im, left: float, bottom: float, height: float, label: str = "") -> Colorbar:
    cax = _place(fig, left + 0.12, bottom, 0.15, height)
    cb = fig.colorbar(im, cax=cax)
    cb.ax.tick_params(labelsize=MIN_FONT_PT)
    if label:
        cb.set_label(label, fontsize=MIN_FONT_PT)
    return cb


def _cbar_width(vmin: float | None, vmax: float | None, label: str = "") -> float:
    ticks = [f"{v:.3f}" for v in (vmin, vmax) if v is not None] or ["-0.000"]
    label_w = text_size(label)[1] + 4 / 72 if label else 0.0  # the rotated label and its pad (4 pt)
    return _CBAR_IN + _widest(["\N{MINUS SIGN}" + t.lstrip("-") for t in ticks]) + label_w


def heatmap(
    matrix: np.ndarray,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    title: str = "",
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    annotate: bool | None = None,
    xlabel: str = "",
    max_width: float = PAGE_WIDTH_IN,
) -> Figure:
    """A labelled heatmap (sense similarities, alpha weights, sense alignment), laid out to
    be read at the report's size: cells of at least :data:`MIN_CELL_IN`, as wide as the
    figure allows up to ``max_width`` inches; the values written in the cells (``annotate``,
    by default whenever the cells are wide enough for them); column labels turned upright
    when they are wider than a cell and thinned when even that overlaps."""
    matrix = np.asarray(matrix, dtype=float)
    rows, cols = matrix.shape
    label_h = text_size("lp")[1]
    cbar_w = _cbar_width(vmin if vmin is not None else np.nanmin(matrix, initial=0),
                         vmax if vmax is not None else np.nanmax(matrix, initial=0))
    # Row labels get what the smallest cells leave (a third of the page at most, 1.5 in at
    # least): a longer label is cut with "…" rather than the cells shrunk below legibility.
    cap = float(np.clip(max_width - 2 * _MARGIN_IN - cbar_w - _TICK_PAD_IN - cols * MIN_CELL_IN, 1.5,
                        max_width / 3))
    if row_labels is not None:
        row_labels = [elide(str(l), cap) for l in row_labels]
    if col_labels is not None:
        col_labels = [elide(str(l), max_width / 6) for l in col_labels]
    row_w = _widest(row_labels) + _TICK_PAD_IN if row_labels is not None else 0.0
    room = max_width - 2 * _MARGIN_IN - row_w - cbar_w
    number_w = text_size("+0.00")[0] + 0.1
    if annotate is None:
        annotate = room / cols >= number_w
    cw = float(np.clip(room / cols, MIN_CELL_IN, 0.6))
    if annotate:
        cw = max(cw, number_w)
    ch = float(np.clip(cw, max(MIN_CELL_IN, label_h + 0.04 if row_labels is not None else 0), 0.4))
    col_w = _widest(col_labels)
    upright = col_labels is not None and col_w > cw - 0.04
    bottom = (_MARGIN_IN + (_TICK_PAD_IN + (col_w if upright else label_h) if col_labels is not None else 0)
              + (text_size("lp", 9)[1] + 0.05 if xlabel else 0))
    axw, axh = cols * cw, rows * ch
    W = 2 * _MARGIN_IN + row_w + axw + cbar_w
    wrapped = wrap(title, W - 2 * _MARGIN_IN)
    H = bottom + axh + _title_height(wrapped) + _MARGIN_IN
    fig = plt.figure(figsize=(W, H), layout="none")
    ax = _place(fig, _MARGIN_IN + row_w, bottom, axw, axh)
    im = ax.imshow(matrix, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    _colorbar(fig, im, _MARGIN_IN + row_w + axw, bottom, axh)
    ax.set_yticks(range(rows), row_labels if row_labels is not None else [""] * rows, fontsize=MIN_FONT_PT)
    ax.set_xticks(range(cols), col_labels if col_labels is not None else [""] * cols, fontsize=MIN_FONT_PT,
                  rotation=90 if upright else 0)
    if xlabel:
        ax.set_xlabel(xlabel, fontsize=9)
    if row_labels is None:
        ax.tick_params(left=False)
    if col_labels is None:
        ax.tick_params(bottom=False)
    if annotate:
        for (r, c), v in np.ndenumerate(matrix):
            if np.isfinite(v):
                lum = np.dot(im.cmap(im.norm(v))[:3], (0.299, 0.587, 0.114))  # dark cell: white text
                ax.text(c, r, f"{v:+.2f}", ha="center", va="center", fontsize=MIN_FONT_PT,
                        color="w" if lum < 0.5 else "k")
    if wrapped:
        fig.text(0.5, 1 - _MARGIN_IN / H, wrapped, ha="center", va="top", fontsize=TITLE_PT)
    thin_ticks(fig, [ax])
    return fig


ALPHA_CMAP = "viridis"  # dark to light: a weight near 0 is dark, never the white of a masked cell


def alpha_norm(alpha: np.ndarray, T: int) -> LogNorm:
    """The colour scale of contextualization weights: logarithmic, from well below a uniform
    weight over the ``T`` tokens (1/T; 0.01 at most, on a 1-2-5 step) to the largest weight
    drawn. Weights spread over a sentence are mostly 0.05-0.2: on a linear scale up to the
    1.0 of the first token they would all sit in the darkest tenth."""
    top = float(np.nanmax(alpha, initial=0.0)) or 1.0
    floor = min(0.01, 0.25 / max(T, 1))
    steps = [m * 10.0 ** e for e in range(-6, 0) for m in (1, 2, 5)]
    vmin = max([s for s in steps if s <= floor], default=steps[0])
    return LogNorm(vmin=min(vmin, top / 10), vmax=top, clip=True)


def alpha_heatmaps(alpha: np.ndarray, tokens: Sequence[str], senses: Sequence[int] | None = None, title: str = "",
                   max_width: float = PAGE_WIDTH_IN) -> Figure:
    """Contextualization weights alpha (k, T, T) of one sentence, one panel per sense:
    row i is the output position, column j the token whose sense it weighs. ``tokens`` are
    the tick labels, as they should be shown. Panels sit side by side as far as
    ``max_width`` allows, with cells of at least :data:`TOKEN_CELL_IN`; a sentence longer
    than a panel that wide holds is drawn as its last tokens (the title says so)."""
    alpha = np.asarray(alpha, dtype=float)
    senses = list(senses) if senses is not None else list(range(alpha.shape[0]))
    T = alpha.shape[-1]
    tokens = [elide(str(t), 1.5) for t in tokens]  # a run of 40 dashes is one token
    label_w = _widest(tokens) + _TICK_PAD_IN
    cbar_w = _cbar_width(0.0, 1.0, "alpha (log scale)")
    gap = 0.25
    room = max_width - 2 * _MARGIN_IN - label_w - cbar_w
    shown = min(T, int(room // TOKEN_CELL_IN))
    first = T - shown
    note = f"the last {shown} of {T} tokens (weights on the {first} before them are not drawn)" if first else ""
    tokens, alpha = tokens[first:], alpha[:, first:, first:]
    label_w = _widest(tokens) + _TICK_PAD_IN
    room = max_width - 2 * _MARGIN_IN - label_w - cbar_w
    norm = alpha_norm(alpha[senses], T)
    # The causal mask: position i never weighs a later token. Those cells are left out of the
    # image (transparent) over a hatched background, so that they cannot pass for a weight near 0.
    masked = np.triu(np.ones((shown, shown), dtype=bool), k=1)
    n = max(len(senses), 1)
    cell = float(np.clip((room / min(n, 4) - gap) / shown, TOKEN_CELL_IN, 0.3))
    panel = shown * cell
    ncols = max(1, min(n, int((room + gap) // (panel + gap))))
    nrows = math.ceil(n / ncols)
    head = text_size("lp", 9)[1] + 0.08  # "sense l" over each panel
    block = head + panel + _TICK_PAD_IN + label_w + 0.15  # one row of panels with its labels
    W = 2 * _MARGIN_IN + label_w + ncols * panel + (ncols - 1) * gap + cbar_w
    key = ("hatched: masked (a position weighs only the tokens up to itself); colour: the weight on a log "
           f"scale, below {norm.vmin:g} drawn as {norm.vmin:g}")
    wrapped = "\n".join(wrap(t, W - 2 * _MARGIN_IN) for t in (title, note, key) if t)
    top = _title_height(wrapped)
    H = _MARGIN_IN + top + nrows * block
    fig = plt.figure(figsize=(W, H), layout="none")
    axes = []
    for i, l in enumerate(senses):
        r, c = divmod(i, ncols)
        x0 = _MARGIN_IN + label_w + c * (panel + gap)
        y0 = H - _MARGIN_IN - top - r * block - head - panel
        ax = _place(fig, x0, y0, panel, panel)
        ax.patch.set(facecolor="white", hatch="////", edgecolor="0.72", linewidth=0)
        im = ax.imshow(np.ma.masked_array(alpha[l], masked), cmap=ALPHA_CMAP, norm=norm, aspect="auto",
                       interpolation="nearest")
        ax.set_title(f"sense {l}", fontsize=9, pad=3)
        ax.set_xticks(range(shown), tokens, rotation=90, fontsize=MIN_FONT_PT)
        ax.set_yticks(range(shown), tokens if c == 0 else [""] * shown, fontsize=MIN_FONT_PT)
        axes.append(ax)
        if i == 0:
            cb = _colorbar(fig, im, _MARGIN_IN + label_w + ncols * panel + (ncols - 1) * gap, y0, panel,
                           "alpha (log scale)")
            ticks = [t for t in (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0) if norm.vmin <= t <= norm.vmax]
            cb.set_ticks(ticks, labels=[f"{t:g}" for t in ticks])
            cb.ax.minorticks_off()  # a log axis labels its minor ticks too, wider than the room measured
    if wrapped:
        fig.text(0.5, 1 - _MARGIN_IN / H, wrapped, ha="center", va="top", fontsize=TITLE_PT)
    thin_ticks(fig, axes)
    return fig


def save(fig: Figure, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write ``fig`` as PNG or SVG (by the suffix), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path
