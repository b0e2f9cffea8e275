"""The comparison report's last figures and tables, as docs/comparison_cpu.html and 04_senses
show them at 1,280 px (issue 26): tables one line per row, every sense table with the same
column widths, one colour scheme (the Backpack blue, the Transformer orange, a hatch per
seed) in every figure, one metric per axis, the paired bits-per-byte differences drawn with
their intervals, a legend sample for each colour it stands for, and contextualization
weights whose masked cells cannot pass for small weights.

Each test here fails on 535162e. The browser test needs Debian's chromium and playwright
(skipped without them; .ci/run installs both)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: the tests draw off-screen

import matplotlib.pyplot as plt
import nbformat
import numpy as np
import pytest
from matplotlib.colors import to_rgb
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from backpack_nb import comparison, lexsim, plots, reports, results
from backpack_nb import senses as S
from conftest import ROOT
from test_figures import _alpha, _lexsim_result, _sentence_tokens, assert_legible, cells

CHROMIUM = Path("/usr/bin/chromium")
BLUE, ORANGE = to_rgb("C0"), to_rgb("C1")


# ---- inputs ---------------------------------------------------------------------------------


def _row(run: str, kind: str, seed: int, bpb: float) -> dict:
    parts = {"embedding": 1_670_000, "positions": 20_000, "blocks": 790_000}
    if kind == "backpack":
        parts |= {"alpha_qk": 30_000, "sense_network": 1_250_000}
    ci = lambda v: (v, [round(v - 0.115, 3), round(v + 0.135, 3)])  # noqa: E731
    return {"run": run, "model_type": kind, "seed": seed, "parameters": {"total": sum(parts.values()), **parts},
            "iterations": 2000, "tokens_seen": 2_048_000, "elapsed_s": 642.0, "tokens_per_s": 3728.0,
            "best_val_loss": 5.2956, "bpb": {s: {"en": ci(bpb + 0.2), "fr": ci(bpb - 0.15), "all": ci(bpb)}
                                              for s in ("val", "test")}}


def _rows() -> list[dict]:
    return [_row(f"{kind} s{seed}", kind, seed, 1.82 + 0.05 * (kind == "transformer"))
            for seed in (1337, 2024) for kind in ("backpack", "transformer")]


def _sense_table(word: str, n: int, long: bool) -> S.SenseTable:
    """A sense table of ``n`` senses; ``long``: word lists as long as the CPU report's longest."""
    words = ([" Commission", " points", " questions", " rapport", " report", " conclusions", " institutions", " aides"]
             if long else [" a", ",", " the", ".", " of", " in", " to", " et"])
    return S.SenseTable([{"token": f" {word}", "sense": l, "top": words, "bottom": words[::-1]} for l in range(n)],
                        f" {word}")


def _paired() -> dict:
    def e(d: float) -> dict:
        return {"difference": d, "ci95": [d - 0.025, d + 0.024], "windows": 81, "bpb_a": 1.8, "bpb_b": 1.8 - d}
    return {split: {f"backpack s{seed} - transformer s{seed}": {"en": e(0.067), "fr": e(-0.156), "all": e(-0.05 + 0.004 * i)}
                    for i, seed in enumerate((1337, 2024))} for split in ("val", "test")}


def _lexsim_results() -> dict:
    rng = np.random.default_rng(0)
    return {f"{kind} s{seed}": _lexsim_result(rng, kind == "backpack")
            for seed in (1337, 2024) for kind in ("backpack", "transformer")}


# ---- tables ---------------------------------------------------------------------------------


def test_results_tables_keep_each_row_on_one_line():
    """535162e's table put the parameter parts and each interval under their numbers (<br>)
    and let Jupyter wrap the rest: rows of 2-3 lines."""
    page = results.summary_html(_rows())
    assert "<br" not in page
    tables = re.findall(r"<table.*?</table>", page, re.S)
    assert len(tables) == 2  # the runs, then bits per byte
    for table in tables:
        for tag in re.findall(r"<t[dh](?:\s[^>]*)?>", table):
            assert "white-space:nowrap" in tag, tag
    # every number of the old table is still there: parameters by part, intervals, time
    text = re.sub(r"<[^>]+>", " ", page)
    for needle in ("3.76M", "1.67M", "0.02M", "0.79M", "0.03M", "1.25M", "2.48M", "10.7 min", "3,728",
                   "5.2956", "2.0200", "[1.905, 2.155]", "1.8200", "[1.705, 1.955]"):
        assert needle in text, needle
    first = cells(tables[0])
    assert [c[1] for c in first[1]][:3] == ["transformer s1337", "2.48M", "1.67M"] and first[1][5][1] == "-"


def test_sense_tables_share_their_column_widths():
    """Each table sized its columns from its own first row: the word lists moved from one
    table to the next."""
    a, b = (_sense_table("Parliament", 4, long=True)._repr_html_(), _sense_table("vote", 16, long=False)._repr_html_())
    cols = [re.search(r"<colgroup>.*?</colgroup>", t).group(0) for t in (a, b)]
    assert cols[0] == cols[1] and cols[0].count("<col ") == 4
    for t in (a, b):
        assert re.search(r"<table class='sense-table' style='[^']*table-layout:fixed;width:100%", t)
        assert re.search(r"table\.sense-table code \{white-space: nowrap", t)  # Jupyter's <code> wraps
        for row in cells(t):
            assert all("white-space:nowrap" in style and "text-overflow:ellipsis" in style for style, _ in row)
        # a list cut short by its column is whole in the cell's title
        assert "title='␣Commission ␣points ␣questions" in a


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing (apt-get install -y chromium)")
def test_report_tables_one_line_per_row_at_1280_px(tmp_path):
    """The tables as nbconvert renders a report, measured in Chromium at 1,280 px: every row
    one line high, no table wider than the output column, and the sense tables' columns
    equally wide whatever their words."""
    sync_playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright").sync_playwright
    html = [results.summary_html(_rows()), _sense_table("Parliament", 16, long=True)._repr_html_(),
            _sense_table("vote", 16, long=False)._repr_html_()]
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x", outputs=[nbformat.v4.new_output(
        "display_data", data={"text/html": h, "text/plain": "table"})]) for h in html]
    nbformat.write(nb, tmp_path / "tables.ipynb")
    page = reports.render_html(tmp_path / "tables.ipynb", exclude_input=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        try:
            tab = browser.new_page(viewport={"width": 1280, "height": 900})
            tab.goto(page.as_uri())
            tables = tab.evaluate("""() => [...document.querySelectorAll('table')].map(t => ({
                cls: t.className, width: t.getBoundingClientRect().width,
                column: t.closest('.jp-OutputArea-output').getBoundingClientRect().width,
                line: Math.max(...[...t.querySelectorAll('td')].map(c => parseFloat(getComputedStyle(c).fontSize))),
                rows: [...t.querySelectorAll('tbody tr')].map(r => r.getBoundingClientRect().height),
                cols: [...t.querySelector('tbody tr').children].map(c => c.getBoundingClientRect().width)}))""")
        finally:
            browser.close()
    assert [t["cls"] for t in tables] == ["bnb-summary", "bnb-summary bnb-bpb", "sense-table", "sense-table"]
    for t in tables:
        assert t["width"] <= t["column"] + 0.5, f"{t['cls']} is {t['width']} px in a {t['column']} px column"
        # one line of text and the cell's padding; a second line would add another line's height
        assert max(t["rows"]) < 1.6 * t["line"] + 8, f"{t['cls']}: rows of {max(t['rows'])} px"
    assert tables[2]["cols"] == tables[3]["cols"]


# ---- one colour scheme, one metric per axis ---------------------------------------------------


def _bar_styles(fig) -> dict[str, set]:
    """label -> {(colour, hatch)} of the bars drawn for it."""
    out: dict[str, set] = {}
    for ax in fig.axes:
        for container in ax.containers:
            for bar in getattr(container, "patches", []):
                if isinstance(bar, Rectangle) and bar.get_label() and not bar.get_label().startswith("_"):
                    out.setdefault(bar.get_label(), set()).add((to_rgb(bar.get_facecolor()), bar.get_hatch() or ""))
                elif isinstance(bar, Rectangle):
                    out.setdefault(container.get_label(), set()).add((to_rgb(bar.get_facecolor()), bar.get_hatch() or ""))
    return out


def _check_scheme(styles: dict[str, set]) -> None:
    for label, drawn in styles.items():
        colours = {c for c, _ in drawn}
        assert colours == {BLUE if label.startswith("backpack") else ORANGE}, (label, colours)
        assert len({h for _, h in drawn}) == 1, (label, drawn)
    hatches = {label: next(iter(drawn))[1] for label, drawn in styles.items()}
    for kind in ("backpack", "transformer"):
        seeds = [hatches[f"{kind} s{seed}"] for seed in (1337, 2024)]
        assert len(set(seeds)) == 2, f"{kind}: the two seeds drawn alike"


def test_run_styles_blue_backpack_orange_transformer_in_any_order():
    """Runs whose evaluation does not say the model type: read off the name, in any order."""
    names = ["transformer s1", "backpack s1", "transformer s2", "tiny_backpack"]
    evals = {name: {"splits": {"val": {l: {"bits_per_byte": 1.8, "bpb_ci95": [1.7, 1.9]}
                                       for l in ("en", "fr", "all")}}} for name in names}
    fig = plots.bpb_bars(evals, "val")
    styles = _bar_styles(fig)
    plt.close(fig)
    assert all(len(drawn) == 1 for drawn in styles.values()), styles
    (t1,), (b1,), (t2,), (b2,) = (styles[name] for name in names)
    assert (t1[0], b1[0], t2[0], b2[0]) == (ORANGE, BLUE, ORANGE, BLUE)
    assert t1[1] != t2[1] and b1[1] != b2[1]  # a hatch per run of a type


def test_multisimlex_chart_uses_the_report_colours_and_one_metric_per_axis():
    """535162e coloured the second seed's runs green and red and put Spearman rho and P@1 on
    one axis ("Spearman rho / P@1")."""
    table = lexsim.side_by_side(_lexsim_results())
    fig = plots.multisimlex_bars(table, methods=("embedding", "sense_mean", "sense_best", "random"))
    panels = [ax for ax in fig.axes if ax.axison]
    assert [ax.get_title() for ax in panels] == table.columns == ["en", "fr", "en-fr", "en->fr P@1"]
    for ax in panels:
        assert ax.get_ylabel() == ("P@1" if ax.get_title().endswith("P@1") else "Spearman rho")
    _check_scheme(_bar_styles(fig))
    assert_legible(fig)


def test_bpb_bars_use_the_report_colours_with_the_transformer_first():
    evals = {f"{kind} s{seed}": {"model_type": kind, "splits": {"val": {
        l: {"bits_per_byte": 1.8, "bpb_ci95": [1.7, 1.9]} for l in ("en", "fr", "all")}}}
             for seed in (1337, 2024) for kind in ("transformer", "backpack")}
    fig = plots.bpb_bars(evals, "val")
    _check_scheme(_bar_styles(fig))
    plt.close(fig)


def test_loss_curves_legend_shows_every_colour_of_the_other_runs():
    """535162e's entry "the other runs' val" showed one colour (the first other run's) for
    faint lines drawn in blue and orange."""
    logs = {f"{kind} s{seed}": {"iterations": [0, 100, 200], "train_loss": [9.0, 6.0, 5.0], "val_loss": [9.1, 6.2, 5.3]}
            for seed in (1337, 2024) for kind in ("backpack", "transformer")}
    fig = plots.loss_curves(logs, title="loss", side_by_side=True)
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    for ax in fig.axes:
        if not ax.get_legend():
            continue
        legend = ax.get_legend()
        entry = next(t for t in legend.get_texts() if t.get_text() == "the other runs' val")
        y = entry.get_window_extent(r)
        samples = [line for line in legend.findobj(Line2D) if line.get_xydata().size
                   and y.y0 - 1 <= line.get_window_extent(r).y0 <= y.y1 + 1 and line.get_visible()]
        assert {to_rgb(line.get_color()) for line in samples} == {BLUE, ORANGE}, ax.get_title()
    assert_legible(fig)


# ---- the bits-per-byte differences ------------------------------------------------------------


def test_paired_differences_are_drawn_with_their_intervals():
    """535162e drew bits per byte only as bars from 0 to about 2: the 0.05-bit differences
    the report discusses were a few pixels."""
    paired = _paired()
    fig = comparison.paired_difference_figure(paired)
    panels = [ax for ax in fig.axes if ax.axison]
    assert [ax.get_title() for ax in panels] == ["val", "test"]
    for ax, split in zip(panels, paired):
        lo, hi = ax.get_xlim()
        assert lo < 0 < hi and hi - lo < 0.5  # the scale of the differences, 0 in view
        ends = sorted(x for line in ax.collections for seg in line.get_segments() for x in seg[:, 0])
        want = sorted(x for d in paired[split].values() for e in d.values() for x in e["ci95"])
        assert np.allclose(ends, want)
        values = {t.get_text() for t in ax.texts}
        assert {f"{e['difference']:+.3f}" for d in paired[split].values() for e in d.values()} <= values
    assert_legible(fig)


def test_compare_notebook_draws_the_paired_differences_and_the_new_charts():
    nb = json.loads((ROOT / "notebooks" / "05_compare.ipynb").read_text(encoding="utf-8"))
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    assert "comparison.paired_difference_figure(paired)" in code
    assert "plots.multisimlex_bars(" in code and "comparison_figure" not in code


# ---- contextualization weights ---------------------------------------------------------------


def _pixel(fig, ax, row: int, col: int) -> np.ndarray:
    fig.canvas.draw()
    x, y = ax.transData.transform((col, row))
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3] / 255.0
    return image[int(round(fig.bbox.height - y)), int(round(x))]


def test_contextualization_masked_cells_differ_from_small_weights():
    """535162e drew the masked triangle and weights near 0 in the same black."""
    T = 12
    alpha = _alpha(1, T, np.random.default_rng(0))
    alpha[0, 5, :5] = 1e-6  # a row whose weight sits on itself: near-zero cells beside the mask
    alpha[0, 5, 5] = 1 - 5e-6
    fig = plots.alpha_heatmaps(alpha, _sentence_tokens(T), title="t")
    ax = fig.axes[0]
    small, masked = _pixel(fig, ax, 5, 2), [_pixel(fig, ax, 5, 9), _pixel(fig, ax, 2, 10)]
    for m in masked:
        assert np.abs(m - small).max() > 0.5, (m, small)
    assert min(m.mean() for m in masked) > 0.6  # light: white and a pale hatch
    plt.close(fig)


def test_contextualization_typical_weights_are_readable():
    """Over a sentence most weights are 0.05-0.2; on 535162e's linear scale up to 1 they were
    all within the darkest fifth of magma."""
    T = 14
    fig = plots.alpha_heatmaps(_alpha(4, T, np.random.default_rng(1)), _sentence_tokens(T), title="t")
    im = fig.axes[0].get_images()[0]
    colours = [np.array(im.cmap(im.norm(v))[:3]) for v in (0.05, 0.1, 0.2)]
    luminance = [float(np.dot(c, (0.299, 0.587, 0.114))) for c in colours]
    assert min(luminance) > 0.2, luminance  # not near-black
    steps = [float(np.linalg.norm(b - a)) for a, b in zip(colours, colours[1:])]
    assert min(steps) > 0.12, steps  # and told apart
    assert_legible(fig)
