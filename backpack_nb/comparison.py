"""Backpack vs Transformer: which runs to pair, the paired bits-per-byte difference (and its
figure), and what the numbers show, in words.

The 05_compare notebook calls these on the rows of :func:`backpack_nb.results.summary_rows`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from . import dataset, stats
from .loading import load_model
from .errors import UserError
from .evaluation import WindowScores, score_tokens, token_byte_lengths
from .results import run_folder

if TYPE_CHECKING:  # annotations only: matplotlib loads when a figure is drawn
    from matplotlib.figure import Figure

_PAIR_MARKERS = ("o", "s", "D", "^", "v", "P")  # one per pair (seed) in the paired-difference figure


def seed_pairs(rows: Sequence[Mapping]) -> list[tuple[str, str]]:
    """(Backpack label, Transformer label) pairs to compare window by window: runs with the
    same seed, in order; the first of each model when no seeds match."""
    bp = [r for r in rows if r["model_type"] == "backpack"]
    tf = [r for r in rows if r["model_type"] == "transformer"]
    pairs = [(b["run"], t["run"]) for b in bp for t in tf
             if b.get("seed") is not None and b.get("seed") == t.get("seed")]
    return pairs or ([(bp[0]["run"], tf[0]["run"])] if bp and tf else [])


def paired_bpb_difference(runs: Mapping[str, str | Path], a: str, b: str, *, split: str = "val",
                          max_tokens: int | None = None, n_boot: int = 2000, seed: int = 0) -> dict:
    """Bits per byte of run ``a`` minus run ``b`` on the same held-out windows, per language
    and pooled, with a *paired* bootstrap interval (both models scored on the same resampled
    windows, so text difficulty cancels out). Both must share block size and vocabulary."""
    models = {}
    for label in (a, b):
        info = run_folder(runs[label])
        models[label] = load_model(info["checkpoint"])
    (ma, tok, sa), (mb, _, _) = models[a], models[b]
    if ma.config.block_size != mb.config.block_size:
        raise UserError(f"{a} and {b} have different block sizes; a paired comparison needs the same windows")
    ddir = dataset.resolve_data_dir(sa.get("data", {}).get("data_dir", "europarl"))
    meta = dataset.load_meta(ddir)
    lengths = token_byte_lengths(tok)
    per: dict[str, tuple[WindowScores, WindowScores]] = {}
    for lang in meta["langs"]:
        toks = dataset.load_tokens(ddir, split, lang)
        kw = dict(block_size=ma.config.block_size, max_tokens=max_tokens, progress=False)
        per[lang] = (score_tokens(ma, toks, lengths, **kw), score_tokens(mb, toks, lengths, **kw))
    per["all"] = (WindowScores.concat([v[0] for v in per.values()]),
                  WindowScores.concat([v[1] for v in per.values()]))
    # One generator for every language in turn: each interval's draws follow the previous one's.
    rng = np.random.default_rng(seed)
    out = {}
    for lang, (wa, wb) in per.items():
        diff = (wa.nats.sum() - wb.nats.sum()) / math.log(2) / wa.bytes.sum()
        ci = stats.paired_bootstrap_ratio_difference(wa.nats, wb.nats, wa.bytes, n_boot, rng, unit=math.log(2))
        out[lang] = {"difference": float(diff), "ci95": ci, "windows": int(len(wa.nats)),
                     "bpb_a": stats.ratio(wa.nats, wa.bytes, unit=math.log(2)),
                     "bpb_b": stats.ratio(wb.nats, wb.bytes, unit=math.log(2))}
    return out


def paired_difference_figure(paired: Mapping[str, Mapping], title: str | None = None) -> Figure:
    """Backpack minus Transformer bits per byte per language, each with its paired 95%
    bootstrap interval: the differences of a few hundredths of a bit that bars from 0 hide.
    ``paired``: ``{split: {pair: {lang: entry}}}`` (entries of
    :func:`backpack_nb.comparison.paired_bpb_difference`; one panel per split, a marker per
    pair) or ``{pair: {lang: entry}}`` for one split. Left of 0, tinted Backpack blue, the
    Backpack is lower (better); right of it, tinted Transformer orange, the Transformer."""
    # matplotlib only when a figure is drawn (as in backpack_nb.senses): the numbers need none
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D  # matplotlib, as above
    from matplotlib.patches import Patch  # matplotlib, as above

    from .plots import MIN_FONT_PT, MODEL_COLORS, PAGE_WIDTH_IN, TITLE_PT, figure_legend, text_size, wrap  # matplotlib too

    if paired and all("difference" in e for by_lang in paired.values() for e in by_lang.values()):
        paired = {"": paired}  # one split, not named
    splits = [s for s in paired if paired[s]]
    pairs = list(dict.fromkeys(p for s in splits for p in paired[s]))
    langs = sorted({l for s in splits for p in paired[s].values() for l in p}, key=lambda l: (l == "all", l))
    if not pairs or not langs:
        raise ValueError("no paired differences to draw")
    row_in = 0.28 * len(pairs) + 0.12  # each language: one line per pair
    width = min(PAGE_WIDTH_IN, 1.0 + 4.6 * len(splits))
    fig, axes = plt.subplots(1, len(splits), figsize=(width, 1.6 + row_in * len(langs)), sharex=True,
                             sharey=True, layout="constrained", squeeze=False)
    ends = [x for s in splits for p in paired[s].values() for e in p.values() for x in e["ci95"]]
    lo, hi = min(min(ends), 0.0), max(max(ends), 0.0)
    pad = 0.08 * (hi - lo or 1.0)
    # room right of the widest interval for its value ("+0.067")
    room = (hi - lo + 2 * pad) * (text_size("+0.000")[0] + 0.1) / max(width / len(splits) - 1.0, 1.0)
    xlim = (lo - pad, hi + pad + room)
    step = 0.7 / max(len(pairs), 1)
    for ax, split in zip(axes[0], splits):
        ax.axvspan(xlim[0], 0, color=MODEL_COLORS["backpack"], alpha=0.10, lw=0)
        ax.axvspan(0, xlim[1], color=MODEL_COLORS["transformer"], alpha=0.10, lw=0)
        ax.axvline(0, color="k", lw=0.8)
        for pi, pair in enumerate(pairs):
            for li, lang in enumerate(langs):
                e = paired[split].get(pair, {}).get(lang)
                if e is None:
                    continue
                y = li + (pi - (len(pairs) - 1) / 2) * step
                d, (a, b) = e["difference"], e["ci95"]
                ax.errorbar(d, y, xerr=[[d - a], [b - d]], fmt=_PAIR_MARKERS[pi % len(_PAIR_MARKERS)],
                            color="0.15", ms=5, capsize=3, lw=1.2)
                ax.annotate(f"{d:+.3f}", (b, y), xytext=(5, 0), textcoords="offset points", va="center",
                            fontsize=MIN_FONT_PT)
        ax.set_xlim(*xlim)
        ax.set_ylim(len(langs) - 0.5, -0.5)  # the first language on top
        ax.set_yticks(range(len(langs)), langs)
        ax.set_xlabel("Backpack minus Transformer (bits per byte)", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        if split:
            ax.set_title(split, fontsize=10)
    handles = [Line2D([], [], color="0.15", marker=_PAIR_MARKERS[i % len(_PAIR_MARKERS)], ls="", ms=5)
               for i in range(len(pairs))]
    handles += [Patch(color=MODEL_COLORS["backpack"], alpha=0.25), Patch(color=MODEL_COLORS["transformer"], alpha=0.25)]
    labels = [p or "Backpack - Transformer" for p in pairs] + ["< 0: the Backpack is lower", "> 0: the Transformer is lower"]
    figure_legend(fig, handles, labels)
    fig.suptitle(wrap(title or "paired difference per language, Backpack minus Transformer, with the paired "
                      "95% bootstrap interval (same held-out windows for both)", width - 0.3, TITLE_PT),
                 fontsize=TITLE_PT)
    return fig


def findings(rows: Sequence[Mapping], paired: Mapping[str, Mapping] | None = None,
             split: str = "val") -> str:
    """What the numbers show, in words (Markdown), for a Backpack/Transformer comparison.
    ``paired``: :func:`paired_bpb_difference` of one pair ({lang: ...}), or of several
    ({"<backpack> - <transformer>": {lang: ...}}, one pair per seed)."""
    bp = [r for r in rows if r["model_type"] == "backpack"]
    tf = [r for r in rows if r["model_type"] == "transformer"]
    if not bp or not tf:
        return "Only one model type was found; there is nothing to compare."
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    out = []
    pb, pt = mean([r["parameters"].get("total", 0) for r in bp]), mean([r["parameters"].get("total", 0) for r in tf])
    out.append(f"- **Size.** The Backpack has {pb / 1e6:.2f}M parameters against the Transformer's "
               f"{pt / 1e6:.2f}M ({pb / pt:.2f}x): the sense network is the difference; both share the "
               "same embedding, contextualization network shape and training settings.")
    sb = [r["tokens_per_s"] for r in bp if r["tokens_per_s"]]
    st = [r["tokens_per_s"] for r in tf if r["tokens_per_s"]]
    if sb and st:
        out.append(f"- **Speed.** Training ran at {mean(sb):,.0f} tokens/s for the Backpack and "
                   f"{mean(st):,.0f} for the Transformer: the Backpack step costs {mean(st) / mean(sb):.2f}x "
                   "the Transformer's here (the paper reports about 1.4x for the forward pass at GPU scale). "
                   "Rates measured on a shared machine are noisy.")
    vb = [r["bpb"].get(split, {}).get("all") for r in bp]
    vt = [r["bpb"].get(split, {}).get("all") for r in tf]
    if all(vb) and all(vt):
        b, t = mean([v[0] for v in vb]), mean([v[0] for v in vt])
        better = "Backpack" if b < t else "Transformer"
        spread = (f" (per seed: Backpack {', '.join(f'{v[0]:.4f}' for v in vb)}; Transformer "
                  f"{', '.join(f'{v[0]:.4f}' for v in vt)})" if len(vb) > 1 or len(vt) > 1 else "")
        what = "mean bits per byte" if len(vb) > 1 or len(vt) > 1 else "bits per byte"
        out.append(f"- **Held-out text ({split}).** {b:.4f} {what} for the Backpack, {t:.4f} for the "
                   f"Transformer{spread}: the {better} is lower by {abs(b - t):.4f} bpb "
                   f"({100 * abs(b - t) / max(b, t):.1f}%).")
    if paired:
        out += _paired_lines(paired)
    still = [r["run"] for r in rows if r.get("best_iter") is not None and r["best_iter"] == r.get("last_iter")]
    peaked = [f"{r['run']} (best at iteration {r['best_iter']} of {r['last_iter']})" for r in rows
              if r.get("best_iter") is not None and r["best_iter"] != r.get("last_iter")]
    if still or peaked:
        out.append("- **Training length.** "
                   + (f"Validation loss was still falling at the last evaluation for {', '.join(still)}: "
                      "longer training would lower these numbers. " if still else "")
                   + (f"Validation loss had stopped improving for {', '.join(peaked)}: the sample is "
                      "small enough to overfit; the best checkpoint is the one evaluated." if peaked else ""))
    seeds = {r.get("seed") for r in rows}
    out.append("- **Limits.** " + (
        "One seed per model: the intervals cover which held-out windows were drawn, not the "
        "variation between training runs, which at this scale can be as large as the gap."
        if len(seeds) <= 1 else f"{len(seeds)} seeds per model; the spread between seeds shows run-to-run variation.")
        + f" The models are tiny, trained for minutes on {_epochs_text(rows)} of "
          "parliamentary English and French, far from the paper's 100k steps of 512k tokens "
          "on OpenWebText. The ranking at this scale need not hold at scale: the Backpack's "
          "extra parameters (the sense network) need data to pay off, and its sense words "
          "are still noisy here.")
    return "\n".join(out)


def _paired_lines(paired: Mapping[str, Mapping]) -> list[str]:
    """The findings' lines for the paired intervals: one per language (per pair when there
    are several), then which directions every pair resolves."""
    if all("difference" in d for d in paired.values()):  # one pair: {lang: ...}
        paired = {"": paired}
    out = []
    outcome: dict[str, list[str]] = {}  # lang -> per pair: "lower", "higher" or "unresolved"
    for pair, by_lang in paired.items():
        if len(paired) > 1:
            out.append(f"  - paired, {pair}:")
        for lang, d in by_lang.items():
            lo, hi = d["ci95"]
            resolved = lo > 0 or hi < 0
            outcome.setdefault(lang, []).append(
                ("lower" if hi < 0 else "higher") if resolved else "unresolved")
            verdict = ("the interval excludes 0: a real difference on this text" if resolved
                       else "the interval includes 0: no difference this data can resolve")
            out.append(f"{'    ' if len(paired) > 1 else '  '}- {lang}: Backpack minus Transformer "
                       f"{d['difference']:+.4f} bpb, paired 95% interval [{lo:+.4f}, {hi:+.4f}] over "
                       f"{d['windows']} windows; {verdict}.")
    if len(paired) > 1:
        agree = [f"{lang} (Backpack {o[0]})" for lang, o in outcome.items()
                 if len(o) == len(paired) and len(set(o)) == 1 and o[0] != "unresolved"]
        out.append("  - Across seeds: " + (
            f"every pair resolves the same direction for {', '.join(agree)}" if agree
            else "no language has a difference of the same direction resolved in every pair")
            + "; the paired intervals cover the choice of held-out windows, the seeds the "
              "variation between training runs.")
    return out


def _epochs_text(rows: Sequence[Mapping]) -> str:
    r = rows[0]
    if r.get("train_tokens") and r.get("tokens_seen"):
        return (f"{r['tokens_seen']:,} tokens ({r['tokens_seen'] / r['train_tokens']:.1f} passes over "
                f"the {r['train_tokens']:,}-token training split)")
    return "a few hundred thousand tokens"
