"""Showing Multi-SimLex results: one model's or several models' scores as a table (text in a
terminal, HTML in a notebook) and as grouped bars, and, for a Backpack, which sense carries
the similarity of a word pair (notebook 04).

Cells are Spearman's rho (P@1 for a retrieval column) with the bootstrap 95% interval;
``sN`` names the sense ``sense_best`` chose on the selection half.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import paths
from ..errors import UserError
from ..senses import _unwrap, token_label, tokens_html, word_senses, word_token_ids
from ..tokenizer import Tokenizer
from .benchmark import EUROPARL_CODES, MultiSimLex, _has_files, load_multisimlex, normalize_word
from .representations import has_senses

if TYPE_CHECKING:  # annotations only: matplotlib loads when a figure is drawn
    from matplotlib.figure import Figure


def _columns(results: Mapping[str, dict]) -> list[tuple[str, str, str]]:
    """(section, key, label) of every score column present in any result."""
    cols: list[tuple[str, str, str]] = []
    for r in results.values():
        for section in ("monolingual", "crosslingual"):
            for key in r.get(section, {}):
                cols.append((section, key, key))
        for key in r.get("retrieval", {}):
            cols.append(("retrieval", key, f"{key} P@1"))
    return list(dict.fromkeys(cols))


def _cell(r: dict, section: str, key: str, method: str) -> dict | None:
    return r.get(section, {}).get(key, {}).get("methods", {}).get(method)


class LexsimTable(list):
    """Rows ``{"model", "method", <column>: {"value", "ci95", "n", ...}}`` of one or several
    models' Multi-SimLex results; renders as aligned text and as an HTML table."""

    def __init__(self, rows: Sequence[dict], columns: list[str], coverage: list[str]) -> None:
        super().__init__(rows)
        self.columns = columns
        self.coverage = coverage

    @staticmethod
    def _fmt(c: dict | None, ci: bool = True) -> str:
        if not c or c.get("value") is None or not math.isfinite(c["value"]):
            return "-"
        text = f"{c['value']:+.3f}"
        if ci and all(math.isfinite(v) for v in c["ci95"]):
            text += f" [{c['ci95'][0]:+.2f},{c['ci95'][1]:+.2f}]"
        if "sense" in c:
            text += f" s{c['sense']}"
        if "p_at_5" in c:
            text += f" @5 {c['p_at_5']:.2f}"
        if "p_at_1_spelt_differently" in c:
            text += f" other {c['p_at_1_spelt_differently']:.2f}"
        return text

    def __str__(self) -> str:
        widths = [max([len(c)] + [len(self._fmt(r.get(c))) for r in self]) + 2 for c in self.columns]
        mw = max([len("model")] + [len(str(r["model"])) for r in self]) + 2  # "backpack s1337"
        head = f"{'model':<{mw}}{'method':<12}" + "".join(f"{c:>{w}}" for c, w in zip(self.columns, widths))
        lines = list(self.coverage) + [head]
        for r in self:
            lines.append(f"{r['model']:<{mw}}{r['method']:<12}"
                         + "".join(f"{self._fmt(r.get(c)):>{w}}" for c, w in zip(self.columns, widths)))
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        esc = html.escape
        left = "text-align:left;white-space:nowrap"  # one line per row: Jupyter right-aligns and wraps cells
        head = "".join(f"<th>{esc(c)}</th>" for c in ["model", "method", *self.columns])
        body = "".join(
            "<tr>" + f"<td style='{left}'>{esc(r['model'])}</td><td style='{left}'><code>{esc(r['method'])}</code></td>"
            + "".join(f"<td style='text-align:right;white-space:nowrap'>{esc(self._fmt(r.get(c)))}</td>"
                      for c in self.columns) + "</tr>"
            for r in self
        )
        cov = "<br>".join(esc(c) for c in self.coverage)
        return (f"<table class='lexsim-table'><caption style='text-align:left'>{cov}</caption>"
                f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def _coverage_lines(results: Mapping[str, dict]) -> list[str]:
    lines, seen = [], set()
    for name, r in results.items():
        parts = []
        for section in ("monolingual", "crosslingual"):
            for key, e in r.get(section, {}).items():
                parts.append(f"{key} {e['covered']}/{e['pairs']} pairs ({e['multi_token']} multi-token)")
        for key, e in r.get("retrieval", {}).items():
            parts.append(f"{key} {e['queries']} queries ({e['identical']} spelt alike) x {e['candidates']} candidates")
        text = "; ".join(parts)
        if text in seen:
            continue
        seen.add(text)
        who = f"{name}: " if len(results) > 1 else ""
        lines.append(f"{who}coverage (words seen >= {r['min_count']} times in {r['count_tokens']:,} training tokens): {text}")
    langs = next(iter(results.values()))["languages"] if results else {}
    if langs.get("not_in_corpus") or langs.get("not_in_run"):
        lines.append(f"not scored: {', '.join(langs.get('not_in_run', []))} (Europarl, not in this run); "
                     f"{', '.join(langs.get('not_in_corpus', []))} (not in Europarl)")
    lines.append("cells: Spearman rho, or for a -> column P@1, with [bootstrap 95% interval]; sN: the sense sense_best chose "
                 "on the selection half (its score is on the other half); @5: P@5; other: P@1 of the queries not spelt "
                 "like their translation")
    return lines


def side_by_side(results: Mapping[str, dict], methods: Sequence[str] | None = None) -> LexsimTable:
    """One table of several models' results (``{"backpack": result, "transformer": ...}``,
    each from :func:`evaluate_lexsim` or an eval.json's ``lexsim``): a row per model and
    method, a column per language, language pair and retrieval direction."""
    cols = _columns(results)
    rows = []
    for name, r in results.items():
        wanted = [m for m in r.get("methods", []) if methods is None or m in methods]
        for m in wanted:
            row = {"model": name, "method": m}
            for section, key, label in cols:
                c = _cell(r, section, key, m)
                if c is None:
                    continue
                value = c.get("spearman", c.get("p_at_1"))
                row[label] = {**{k: v for k, v in c.items() if k not in ("spearman", "p_at_1")}, "value": value}
            rows.append(row)
    return LexsimTable(rows, [label for _, _, label in cols], _coverage_lines(results))


def format_table(result: dict, name: str | None = None) -> str:
    """The text table of one model's result."""
    return str(side_by_side({name or result.get("model_type", "model"): result}))


def comparison_figure(results: Mapping[str, dict], methods: Sequence[str] = ("embedding", "sense_mean", "sense_best", "random"),
                      title: str = "Multi-SimLex: Spearman rho (P@1 for retrieval), 95% bootstrap interval") -> Figure:
    """Grouped bars: a group per language / pair / retrieval direction, a bar per model and
    method (those of ``methods`` the model has), with the bootstrap interval."""
    # matplotlib only when a figure is asked for: evaluate.py --lexsim never draws.
    import matplotlib.pyplot as plt

    from .. import plots  # matplotlib too

    table = side_by_side(results, methods)
    # Models with the same vocabulary and width draw the same random control: show it once.
    seen_random: list[dict] = []
    for r in list(table):
        if r["method"] == "random":
            cells = {c: r.get(c) for c in table.columns}
            if cells in seen_random:
                table.remove(r)
            else:
                seen_random.append(cells)
    series = [(r["model"], r["method"]) for r in table]
    cols = table.columns
    width = 0.8 / max(len(series), 1)
    # No wider than a report shows unscaled (plots.PAGE_WIDTH_IN): a wider figure is shrunk
    # on the page, and its legend with it.
    fig_w = min(plots.PAGE_WIDTH_IN, 1.5 + 0.3 * len(series) * len(cols))
    fig, ax = plt.subplots(figsize=(fig_w, 5), layout="constrained")
    xs = np.arange(len(cols))
    models = list(dict.fromkeys(m for m, _ in series))
    hatches = {m: h for m, h in zip(methods, ["", "//", "xx", "..", "--", "oo"])}
    for i, (row, (model_name, method)) in enumerate(zip(table, series)):
        vals = np.array([row[c]["value"] if c in row and row[c]["value"] is not None else np.nan for c in cols], dtype=float)
        lo = np.array([row[c]["ci95"][0] if c in row else np.nan for c in cols], dtype=float)
        hi = np.array([row[c]["ci95"][1] if c in row else np.nan for c in cols], dtype=float)
        err = np.nan_to_num(np.stack([vals - lo, hi - vals]), nan=0.0).clip(min=0)
        color = "0.7" if method == "random" else f"C{models.index(model_name)}"
        ax.bar(xs + (i - (len(series) - 1) / 2) * width, vals, width, yerr=err, capsize=2, color=color,
               hatch=hatches.get(method, ""), edgecolor="k", linewidth=0.4,
               label="random (chance)" if method == "random" and len(seen_random) == 1 else f"{model_name} {method}")
    ax.axhline(0, color="k", linewidth=0.6)
    ax.set_xticks(xs, cols)
    plots.thin_ticks(fig, [ax])
    ax.set_ylabel("Spearman rho / P@1")
    ax.set_title(plots.wrap(title, fig_w - 0.9, 10), fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    plots.legend_below(fig, ax, len(series))
    return fig


@torch.no_grad()
def pair_senses(model: nn.Module, tok: Tokenizer, pairs: Sequence[tuple[str, str]] | None = None, *,
                source: str | os.PathLike | MultiSimLex | None = None, lang: str = "en", n: int = 8,
                top: int = 5) -> PairSenseTable:
    """For each word pair: the cosine of sense l of the first word with sense l of the
    second, for every l, next to the embedding cosine and the Multi-SimLex rating; the
    *carrier* is the sense with the highest cosine, shown with the words it promotes for
    the first word (top entries of ``E C(x)_l``). Without ``pairs``: the ``n`` highest-rated
    Multi-SimLex pairs of ``lang`` whose words are single tokens."""
    bare = _unwrap(model)
    if not has_senses(bare):
        raise UserError("pair_senses needs a Backpack (a Transformer has no sense vectors)")
    bench = None
    if pairs is None or source is not None:
        bench = source if isinstance(source, MultiSimLex) else load_multisimlex(source)
    elif os.environ.get("MULTISIMLEX_SOURCE") or _has_files(paths.data_root() / "multisimlex"):
        bench = load_multisimlex()  # only for the ratings of the pairs given: never fetched for that
    gold: dict[tuple[str, str], float] = {}
    if bench is not None:
        col = {v: k for k, v in EUROPARL_CODES.items()}.get(lang)
        if col not in bench.languages:
            raise UserError(f"Multi-SimLex has no language {lang!r}; use one of {', '.join(EUROPARL_CODES.values())}")
        for a, b, g in zip(*bench.words[col], bench.scores[col]):
            a, b = normalize_word(a), normalize_word(b)
            if a and b and math.isfinite(g):
                gold.setdefault((a, b), float(g))
                gold.setdefault((b, a), float(g))
    if pairs is None:
        ranked = sorted({(a, b): g for (a, b), g in gold.items() if a < b}.items(), key=lambda kv: -kv[1])
        pairs = [p for p, _ in ranked if len(word_token_ids(tok, p[0])) == 1 and len(word_token_ids(tok, p[1])) == 1][:n]
    E = bare.wte.weight
    rows = []
    for a, b in pairs:
        sa, sb = word_senses(bare, tok, a), word_senses(bare, tok, b)  # (k, d) each
        cos = F.cosine_similarity(sa, sb, dim=-1).cpu().numpy()  # (k,)
        ea = E[word_token_ids(tok, a)].float().mean(0)
        eb = E[word_token_ids(tok, b)].float().mean(0)
        carrier = int(np.argmax(cos))
        promoted = (E.float() @ sa[carrier].float().to(E.device)).topk(top).indices.tolist()
        rows.append({"word_1": a, "word_2": b, "gold": gold.get((normalize_word(a), normalize_word(b)), float("nan")),
                     "embedding": float(F.cosine_similarity(ea, eb, dim=0)), "senses": cos.astype(float),
                     "sense_mean": float(F.cosine_similarity(sa.mean(0), sb.mean(0), dim=0)),
                     "carrier": carrier, "carrier_words": [tok.token_str(t) for t in promoted]})
    return PairSenseTable(rows)


class PairSenseTable(list):
    """Rows of :func:`pair_senses`; text in a terminal, HTML in a notebook, and
    :meth:`figure` for a heatmap (pairs x senses)."""

    def __str__(self) -> str:
        lines = [f"{'pair':<28}{'gold':>6}{'emb':>7}{'mean':>7}  per-sense cosine (carrier *) | carrier's top words"]
        for r in self:
            cells = " ".join(f"{c:+.2f}{'*' if l == r['carrier'] else ' '}" for l, c in enumerate(r["senses"]))
            lines.append(f"{r['word_1'] + ' / ' + r['word_2']:<28}{r['gold']:>6.2f}{r['embedding']:>+7.2f}{r['sense_mean']:>+7.2f}  "
                         f"{cells} | {' '.join(token_label(t) for t in r['carrier_words'])}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        esc = html.escape
        k = len(self[0]["senses"]) if self else 0
        heads = ["pair", "gold", "embedding", "sense mean", *[f"s{l}" for l in range(k)], "carrier's top words"]
        head = "".join(f"<th style='text-align:{'left' if h in (heads[0], heads[-1]) else 'right'}'>{h}</th>" for h in heads)
        body = ""
        left, num = "text-align:left;white-space:nowrap", "text-align:right;white-space:nowrap"
        for r in self:
            cells = "".join(f"<td style='{num};{'font-weight:bold;background:#ffe9a8' if l == r['carrier'] else ''}'>{c:+.2f}</td>"
                            for l, c in enumerate(r["senses"]))
            body += (f"<tr><td style='{left}'>{esc(r['word_1'])} / {esc(r['word_2'])}</td><td style='{num}'>{r['gold']:.2f}</td>"
                     f"<td style='{num}'>{r['embedding']:+.2f}</td><td style='{num}'>{r['sense_mean']:+.2f}</td>{cells}"
                     f"<td style='{left}'>{tokens_html(r['carrier_words'])}</td></tr>")
        return f"<table class='pair-sense-table'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def figure(self, title: str = "cosine of sense l of word 1 with sense l of word 2") -> Figure:
        from .. import plots  # matplotlib: only when a figure is asked for

        m = np.stack([r["senses"] for r in self])
        labels = [f"{r['word_1']} / {r['word_2']} (gold {r['gold']:.1f})" for r in self]
        return plots.heatmap(m, labels, [str(l) for l in range(m.shape[1])], title=title, cmap="RdBu_r",
                             vmin=-1, vmax=1, xlabel="sense l")

