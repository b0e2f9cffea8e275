"""Figures of the steering experiments, sized like :mod:`backpack_nb.plots`' (a report's
column): the bias ratio per noun before and after each intervention, one noun's sweep of its
gender sense from 0 to 1 (the paper's Figure 3), and an edit's p(to) and p(from) per prompt.
Topic control draws its own (:func:`backpack_nb.steering.topic.strength_figure`)."""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from ..plots import MIN_FONT_PT, PAGE_WIDTH_IN, TITLE_PT, legend_below

# before, the sense interventions, the projection baseline: one colour each, in every figure
METHODS = {"bias_before": ("unchanged", "#7f7f7f"), "bias_remove": ("Remove (w = 0)", "#1f77b4"),
           "bias_optimize": ("Optimize (fitted w)", "#aec7e8"),
           "bias_project": ("Project (w = 0)", "#ff7f0e"),
           "bias_project_optimize": ("Project, fitted w", "#ffbb78")}


def gender_figure(result: Mapping) -> Figure:
    """Horizontal bars: each noun's bias ratio minus 1 (log scale: ratios of 1.001 and of 7
    both read) unchanged and under each intervention the result holds."""
    rows = result["nouns"]
    methods = [m for m in METHODS if rows and m in rows[0]]
    height = 0.9 + 0.13 * len(rows) * len(methods) ** 0.5 + 0.5
    fig, ax = plt.subplots(figsize=(min(PAGE_WIDTH_IN, 8.5), max(2.5, height)), layout="constrained")
    y = np.arange(len(rows))
    bar = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        label, colour = METHODS[method]
        values = [max(r[method] - 1.0, 1e-9) for r in rows]
        ax.barh(y + (i - (len(methods) - 1) / 2) * bar, values, height=bar, color=colour, label=label)
    ax.set_yticks(y, [r["noun"] for r in rows], fontsize=MIN_FONT_PT)
    ax.invert_yaxis()
    ax.set_xscale("log")
    he, she = (p.strip() for p in result.get("pronouns", (" he", " she")))
    ax.set_xlabel(f"bias ratio - 1: max(p({he})/p({she}), p({she})/p({he})) - 1, mean over the "
                  "test prompts (log scale; 0 = no preference)", fontsize=MIN_FONT_PT + 1)
    sense = result.get("sense")
    ax.set_title(f"gender bias per noun ({result.get('language', '')}; gender sense "
                 f"{sense if sense is not None else '-'})", fontsize=TITLE_PT)
    legend_below(fig, ax)
    return fig


def sweep_figure(sweep: Mapping) -> Figure:
    """The bias ratio as one noun's gender sense is scaled from 0 to 1 (Figure 3)."""
    fig, ax = plt.subplots(figsize=(6, 3.2), layout="constrained")
    ax.plot(sweep["weights"], sweep["bias"], marker="o", color=METHODS["bias_remove"][1])
    ax.axhline(1, color="#7f7f7f", lw=0.8, ls="--")
    ax.set_xlabel(f"weight of sense {sweep['sense']} of {sweep['noun']!r}", fontsize=MIN_FONT_PT + 1)
    ax.set_ylabel("bias ratio (test prompts)", fontsize=MIN_FONT_PT + 1)
    ax.set_title(f"scaling the gender sense of {sweep['noun']!r}", fontsize=TITLE_PT)
    return fig


def edit_figure(result: Mapping) -> Figure:
    """p(to) and p(from) for the token after each prompt: an arrow from before (hollow) to
    after (filled), on a log scale."""
    rows = result["per_prompt"]
    fig, ax = plt.subplots(figsize=(min(PAGE_WIDTH_IN, 8.5), 1.6 + 0.45 * len(rows)), layout="constrained")
    for key, name, colour, shift in (("to", result["to"], "#1f77b4", -0.12),
                                     ("from", result["from"], "#ff7f0e", 0.12)):
        for y, r in enumerate(rows):
            before, after = max(r[f"p_{key}_before"], 1e-12), max(r[f"p_{key}_after"], 1e-12)
            ax.annotate("", (after, y + shift), (before, y + shift),
                        arrowprops=dict(arrowstyle="->", color=colour, lw=1.2))
        ys = np.arange(len(rows)) + shift
        ax.scatter([max(r[f"p_{key}_before"], 1e-12) for r in rows], ys, facecolors="none",
                   edgecolors=colour, label=f"p({name}) before", zorder=3)
        ax.scatter([max(r[f"p_{key}_after"], 1e-12) for r in rows], ys, color=colour,
                   label=f"p({name}) after", zorder=3)
    ax.set_yticks(np.arange(len(rows)), [r["prompt"] for r in rows], fontsize=MIN_FONT_PT)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xscale("log")
    ax.set_xlabel("probability of the next token (log scale)", fontsize=MIN_FONT_PT + 1)
    ax.set_title(f"editing {result['word']!r}: {result['from']} -> {result['to']}", fontsize=TITLE_PT)
    legend_below(fig, ax)
    return fig
