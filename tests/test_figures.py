"""Figures and tables read at the size an HTML report shows them.

A report shows a figure as the inline backend drew it (100 px per inch, cropped to its tight
bounding box) and shrinks anything wider than its output column (about 1,230 px in a 1,280-px
window; 1,200 here). At that size: no text under 8 pt, titles and labels inside the figure,
no tick labels on top of each other, heatmap cells of at least 12 px, legends off the bars;
for any number of senses k from 1 to 64 and sentences up to the block size. Tables show one
line per sense and every token the same way (senses.token_label) in tables, widget and
figures; a static report says where the live widget would be.

Every test here fails on f3defa5: its alignment heatmap at k = 4 had 7-px cells with 6-pt
numbers, its contextualization title stopped at 60 characters, its bits-per-byte legend sat
on the bars, its Multi-SimLex chart and side-by-side loss curves were wider than the page (so
shrunk to 5-6 pt text), and its tables and widget showed tokens as repr() strings.
"""

from __future__ import annotations

import html
import json
import re
from html.parser import HTMLParser

import matplotlib

matplotlib.use("Agg")  # before pyplot: the tests draw off-screen

import matplotlib.pyplot as plt
import nbformat
import numpy as np
import pytest
from matplotlib.patches import Rectangle
from matplotlib.text import Text

from backpack_nb import plots, reports
from backpack_nb import senses as S
from backpack_nb import widgets
from backpack_nb.loading import load_model
from backpack_nb.lexsim import PairSenseTable, comparison_figure
from conftest import ROOT

HTML_DPI = 100  # the inline backend's figure.dpi: pixels per inch in a report
PAGE_PX = 1200  # a report's output column; a wider figure is scaled down to it
MIN_PT = 8
MIN_CELL_PX = 12
SENSE_COUNTS = (1, 4, 16, 64)
SENTENCE = "The European Parliament adopted the report on the common agricultural policy."


# ---- measuring a figure as the report shows it -------------------------------------------------


def shown_scale(fig) -> float:
    """How much the report shrinks ``fig``: its saved width (tight box, 0.1 in padding, as
    the inline backend saves it) against the page's output column."""
    fig.set_dpi(HTML_DPI)
    fig.canvas.draw()
    box = fig.get_tightbbox(fig.canvas.get_renderer()).padded(0.1)
    return min(1.0, PAGE_PX / (box.width * HTML_DPI))


def drawn_texts(fig) -> list[Text]:
    """Every piece of text the figure draws (titles, labels, tick labels, cell numbers,
    legends, colorbar labels)."""
    out = list(fig.texts) + [t for leg in fig.legends for t in leg.get_texts()]
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        out += [ax.title, ax._left_title, ax._right_title] + list(ax.texts)
        if ax.get_legend():
            out += ax.get_legend().get_texts()
        if ax.axison:
            for axis in (ax.xaxis, ax.yaxis):
                out += [axis.label, axis.get_offset_text()] + shown_ticklabels(axis)
    return [t for t in out if t.get_visible() and t.get_text().strip()]


def shown_ticklabels(axis) -> list[Text]:
    """The tick labels drawn: those of ticks inside the view (a locator also returns
    ticks beyond it, which are not drawn) that are visible and not empty."""
    locs = axis.get_majorticklocs()
    lo, hi = sorted(axis.get_view_interval())
    eps = 1e-9 * max(abs(hi - lo), 1)
    return [label for tick, loc in zip(axis.get_major_ticks(len(locs)), locs) if lo - eps <= loc <= hi + eps
            for label in (tick.label1, tick.label2) if label.get_visible() and label.get_text().strip()]


def _overlapping(boxes) -> list[tuple[int, int]]:
    a = np.array([[b.x0, b.y0, b.x1, b.y1] for b in boxes])
    if len(a) < 2:
        return []
    ox = (a[:, None, 0] < a[None, :, 2] - 0.5) & (a[None, :, 0] < a[:, None, 2] - 0.5)
    oy = (a[:, None, 1] < a[None, :, 3] - 0.5) & (a[None, :, 1] < a[:, None, 3] - 0.5)
    i, j = np.nonzero(np.triu(ox & oy, 1))
    return list(zip(i.tolist(), j.tolist()))


def legibility_problems(fig) -> list[str]:
    """What a reader of the report cannot read in ``fig`` (empty when it is fine)."""
    scale = shown_scale(fig)
    r = fig.canvas.get_renderer()
    W, H = fig.bbox.width, fig.bbox.height
    problems = []
    for t in drawn_texts(fig):
        shown = t.get_fontsize() * scale
        if shown < MIN_PT - 1e-6:
            problems.append(f"{t.get_text()[:30]!r} is {shown:.1f} pt as shown")
        b = t.get_window_extent(r)
        if b.x0 < -1 or b.y0 < -1 or b.x1 > W + 1 or b.y1 > H + 1:
            problems.append(f"{t.get_text()[:30]!r} is cut by the figure's edge ({b} in {W:.0f}x{H:.0f})")
    for ax in fig.axes:
        if not (ax.get_visible() and ax.axison):
            continue
        for axis in (ax.xaxis, ax.yaxis):
            labels = shown_ticklabels(axis)
            for i, j in _overlapping([t.get_window_extent(r) for t in labels]):
                problems.append(f"tick labels {labels[i].get_text()!r} and {labels[j].get_text()!r} overlap")
        for im in ax.get_images():
            (x0, y0), (x1, y1) = ax.transData.transform([(0, 0), (1, 1)])
            w, h = abs(x1 - x0) * scale, abs(y1 - y0) * scale
            if min(w, h) < MIN_CELL_PX:
                problems.append(f"heatmap cells are {w:.1f} x {h:.1f} px as shown")
    return problems


def assert_legible(fig) -> None:
    problems = legibility_problems(fig)
    plt.close(fig)
    assert not problems, "\n".join(problems[:12])


# ---- inputs ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bp(tiny_backpack_run):
    model, tok, _ = load_model(tiny_backpack_run["out_dir"] / "ckpt.pt")
    return model, tok


def _alignment_rows(k: int, rng) -> list[dict]:
    return [{"en": a, "fr": b, "alignment": rng.uniform(-1, 1), "baseline": rng.uniform(-0.2, 0.2),
             "matrix": rng.uniform(-1, 1, (k, k))} for a, b in S.DEFAULT_PAIRS]


def _alpha(k: int, T: int, rng) -> np.ndarray:
    a = np.tril(rng.uniform(0, 1, (k, T, T)))
    return a / a.sum(-1, keepdims=True)


def _sentence_tokens(T: int) -> list[str]:
    words = SENTENCE.split()
    return [("\N{OPEN BOX}" if i else "") + words[i % len(words)] for i in range(T)]  # as token_label shows them


def _eval(kind: str, base: float) -> dict:
    langs = {"en": base + 0.15, "fr": base - 0.15, "all": base}
    return {"model_type": kind, "splits": {"val": {
        l: {"bits_per_byte": v, "bpb_ci95": [v - 0.06, v + 0.06]} for l, v in langs.items()}}}


def _lexsim_result(rng, with_senses: bool) -> dict:
    methods = ["embedding", "sense_mean", "sense_best", "random"] if with_senses else ["embedding", "random"]

    def cells(kind: str) -> dict:
        out = {}
        for m in methods:
            v = float(rng.uniform(-0.1, 0.3))
            out[m] = {kind: v, "ci95": [v - 0.12, v + 0.12], "n": 200, **({"sense": 3} if m == "sense_best" else {})}
        return {"methods": out}

    cover = {"covered": 250, "pairs": 1888, "multi_token": 40}
    return {"methods": methods, "min_count": 5, "count_tokens": 1_000_000, "languages": {},
            "monolingual": {l: {**cover, **cells("spearman")} for l in ("en", "fr")},
            "crosslingual": {"en-fr": {**cover, **cells("spearman")}},
            "retrieval": {"en->fr": {"queries": 300, "identical": 40, "candidates": 300, **cells("p_at_1")}}}


# ---- figures -----------------------------------------------------------------------------


@pytest.mark.parametrize("k", SENSE_COUNTS)
def test_alignment_heatmap_reads_at_any_k(k):
    assert_legible(S.alignment_figure(_alignment_rows(k, np.random.default_rng(k))))


@pytest.mark.parametrize("k", SENSE_COUNTS)
def test_pair_sense_heatmap_reads_at_any_k(k):
    rng = np.random.default_rng(k)
    rows = PairSenseTable([{"word_1": w1, "word_2": w2, "gold": 5.8, "senses": rng.uniform(-1, 1, k)}
                           for w1, w2 in [("difficult", "hard"), ("automobile", "car"), ("big", "large")] * 3])
    assert_legible(rows.figure())


@pytest.mark.parametrize("k", [k if k < 16 else pytest.param(k, marks=pytest.mark.slow)
                               for k in SENSE_COUNTS])  # a panel per sense: seconds from 16 on
def test_contextualization_panels_read_at_any_k(k):
    T = 14
    title = f"contextualization weights of {T} tokens: {SENTENCE!r}"
    assert_legible(plots.alpha_heatmaps(_alpha(k, T, np.random.default_rng(k)), _sentence_tokens(T), title=title))


def test_contextualization_of_a_block_sized_sentence(bp):
    """The tiny model's whole block (64 tokens), and the seed's (512): every cell and token
    label legible; what does not fit is said in the title, not cut off."""
    model, tok = bp
    long = " ".join([SENTENCE] * 12)
    fig, alpha, tokens = S.contextualization_heatmap(model, tok, long)
    assert len(tokens) == model.config.block_size and alpha.shape[-1] == len(tokens)
    assert_legible(fig)
    fig = plots.alpha_heatmaps(_alpha(4, 512, np.random.default_rng(0)), _sentence_tokens(512),
                               title="contextualization weights of 512 tokens: " + repr(long))
    title = " ".join(t.get_text() for t in fig.texts)
    shown = len(fig.axes[0].get_xticks())
    assert f"the last {shown} of 512 tokens" in title.replace("\n", " ")
    assert_legible(fig)


def test_contextualization_title_is_not_cut(bp):
    """f3defa5 printed the first 60 characters: "...the common agr"."""
    model, tok = bp
    fig, _, _ = S.contextualization_heatmap(model, tok, SENTENCE)
    title = " ".join(t.get_text() for t in fig.texts).replace("\n", " ")
    assert "common agricultural policy." in title
    assert_legible(fig)


def test_bpb_bars_legend_off_the_bars():
    evals = {f"{kind} s{seed}": _eval(kind, base) for seed in (1337, 2024)
             for kind, base in (("backpack", 1.82), ("transformer", 1.87))}
    fig = plots.bpb_bars(evals, "val")
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    legends = fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    bars = [p for ax in fig.axes for p in ax.patches if isinstance(p, Rectangle) and p.get_height() > 0]
    assert legends and len(bars) == 12
    for leg in legends:
        box = leg.get_window_extent(r)
        assert not any(box.overlaps(b.get_window_extent(r)) for b in bars), "the legend covers a bar"
    values = [t for t in fig.axes[0].texts if re.fullmatch(r"\d\.\d{3}", t.get_text())]
    assert len(values) == 12 and not _overlapping([t.get_window_extent(r) for t in values])
    assert_legible(fig)


def test_multisimlex_chart_legend_reads_at_page_size():
    """Two seeds of each model, every method (9 series, 4 columns, as in the CPU report)."""
    rng = np.random.default_rng(0)
    results = {f"{kind} s{seed}": _lexsim_result(rng, kind == "backpack")
               for seed in (1337, 2024) for kind in ("backpack", "transformer")}
    assert_legible(comparison_figure(results))


def test_side_by_side_loss_curves_fit_the_page():
    logs = {f"{kind} s{seed}": {"iterations": [0, 100, 200], "train_loss": [9.0, 6.0, 5.0], "val_loss": [9.1, 6.2, 5.3]}
            for seed in (1337, 2024) for kind in ("backpack", "transformer")}
    assert_legible(plots.loss_curves(logs, title="train (dashed) and validation (solid) loss, one panel per run",
                                     side_by_side=True))


# ---- tables, widget, static report -------------------------------------------------------------


class _Cells(HTMLParser):
    """The text and style of every <td> of an HTML table, by row."""

    def __init__(self):
        super().__init__()
        self.rows: list[list[tuple[str, str]]] = []
        self._td: list | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag == "td":
            self._td = [dict(attrs).get("style") or "", ""]
        elif tag == "br" and self._td is not None:
            self._td[1] += "\n"

    def handle_endtag(self, tag):
        if tag == "td" and self._td is not None:
            self.rows[-1].append(tuple(self._td))
            self._td = None

    def handle_data(self, data):
        if self._td is not None:
            self._td[1] += data


def cells(page: str) -> list[list[tuple[str, str]]]:
    p = _Cells()
    p.feed(page)
    return [r for r in p.rows if r]


def _byte_word(tok) -> str:
    """A word whose tokens are bytes that are not whole characters (shown as \\xNN)."""
    for word in ("ǂ", "ꙮ", "ȸ", "⁂"):  # glyphs the figure font has
        if any("\\x" in tok.token_str(t) for t in tok.encode(" " + word)):
            return word
    pytest.fail("no test word spells into partial UTF-8 bytes with this vocabulary")


def test_token_label():
    assert S.token_label(" Parliament") == "\N{OPEN BOX}Parliament"
    assert S.token_label("\\xcc") == "\\xcc"  # token_str's partial byte keeps its one backslash
    assert S.token_label("\n\xa0") == "\\n\\xa0"


def test_sense_table_one_line_per_sense(bp):
    model, tok = bp
    rows = S.sense_words(model, tok, "Parliament", top=8)
    body = cells(rows._repr_html_())
    assert len(body) == model.config.n_senses
    for row, r in zip(body, rows):
        for style, text in row:  # Jupyter right-aligns and wraps table cells unless told
            assert "nowrap" in style and "text-align:left" in style.replace(" ", "")
            assert "\n" not in text
        assert row[0][1] == S.token_label(r["token"]) == "\N{OPEN BOX}Parliament"
        assert row[2][1].split(" ") == [S.token_label(t) for t in r["top"]]


def test_tokens_shown_alike_in_tables_widget_and_figures(bp):
    model, tok = bp
    word = _byte_word(tok)
    labels = [S.token_label(tok.token_str(t)) for t in tok.encode(" " + word)]
    assert any(l.startswith("\\x") for l in labels) and not any("\\\\" in l for l in labels)
    table = [row[0][1] for row in cells(S.sense_words(model, tok, word)._repr_html_())]
    w = widgets.SenseBrowser(model, tok, words=[word], word=word, prompt=f"The {word} and the")
    shown = [row[0][1] for row in cells(w.table.value)]
    assert table == shown == [l for l in labels for _ in range(model.config.n_senses)]
    fig, _, tokens = S.contextualization_heatmap(model, tok, f"The {word} and the")
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    plt.close(fig)
    assert ticks == [S.token_label(t) for t in tokens] and set(labels) <= set(ticks)
    # the widget's prediction table: the same tokens as reweight() ranks them, spaces shown
    r = S.reweight(model, tok, w.prompt.value, word, 0, 1.0, top=w.top)
    predicted = [row[0][1].rsplit(" ", 1)[0] for row in cells(w.prediction.value)]
    assert predicted == [S.token_label(t) for t, _ in r["before"]]
    assert any(p.startswith("\N{OPEN BOX}") for p in predicted)


def test_static_report_notes_where_the_widget_is(bp, tmp_path, monkeypatch):
    """nbconvert's HTML has no kernel: a widget view renders as an empty box. The browser
    publishes a one-line note first, which its live style hides."""
    model, tok = bp
    published = []
    monkeypatch.setattr(widgets, "display", lambda obj, raw=False: published.append(obj))
    w = widgets.SenseBrowser(model, tok, words=["vote"])
    w._ipython_display_()
    assert "application/vnd.jupyter.widget-view+json" in published[-1]
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("browser", outputs=[
        nbformat.v4.new_output("display_data", data=bundle) for bundle in published])]
    path = tmp_path / "widget.ipynb"
    nbformat.write(nb, path)
    page = reports.render_html(path).read_text(encoding="utf-8")
    assert html.escape(widgets.STATIC_NOTE) in page
    assert "JupyterLab" in widgets.STATIC_NOTE and "\n" not in widgets.STATIC_NOTE
    live = w.children[0].value  # the style that reaches the page only when the widget renders
    assert re.search(r"\.bnb-static-note\s*\{\s*display:\s*none", live)


def test_compare_report_prints_its_title_once():
    """The notebook's first cell is the title block; the parameters add a line, not a
    second heading ("## Backpack vs Transformer: compare_cpu" under "# Backpack vs Transformer")."""
    nb = json.loads((ROOT / "notebooks" / "05_compare.ipynb").read_text(encoding="utf-8"))
    code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    assert not [src for src in code if re.search(r"Markdown\(\s*f?[\"']#", src)]
    headings = [line for c in nb["cells"] if c["cell_type"] == "markdown"
                for line in "".join(c["source"]).splitlines() if line.startswith("# ")]
    assert headings == ["# Backpack vs Transformer"]
