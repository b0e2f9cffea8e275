"""Browse a Backpack's senses interactively (ipywidgets).

``SenseBrowser(model, tok)`` shows, for a word typed or picked from a list of frequent words,
the top and bottom words of every sense (the chosen one highlighted), the similarity of its
senses with a second word's, and the reweighting intervention: a slider scales the chosen
sense wherever the word occurs in a prompt, and the next-token prediction and a short greedy
continuation (next to the unchanged one) update. Everything
reacts to changes without re-running cells. The displayed parts are HTML widgets whose
``value`` tests can read.
"""

from __future__ import annotations

import html

import ipywidgets as W
import numpy as np
from IPython.display import display

from . import senses as S
from .errors import UserError

# A live widget hides the static-report note (see SenseBrowser._ipython_display_): this style
# only reaches the page when the widget is rendered, which a static HTML report never does.
_STYLE = """<style>
.bnb-table {border-collapse: collapse; font-size: 12px}
.bnb-table td, .bnb-table th {padding: 2px 6px; border-bottom: 1px solid #ddd; text-align: left;
  white-space: nowrap}
.bnb-table tr.chosen {background: #fff3c4}
.bnb-table code {background: none; white-space: nowrap; color: inherit}
.bnb-static-note {display: none}
</style>"""

STATIC_NOTE = ("interactive widget (SenseBrowser): open this notebook in JupyterLab and run it; "
               "a static report cannot show it")


def _esc(token: str) -> str:
    """A token as HTML, shown as in every table and figure (senses.token_label)."""
    return html.escape(S.token_label(token))


class SenseBrowser(W.VBox):
    """A word box (with frequent words to pick from), a sense selector, the sense table, a
    second word for similarity, and a reweighting slider with its effect on a prompt."""

    def __init__(self, model, tok, words: list[str] | None = None, word: str | None = None,
                 other: str = "", prompt: str = "The Parliament adopted the", top: int = 8):
        self.model, self.tok, self.top = model, tok, top
        bare = S._unwrap(model)
        self.k = bare.config.n_senses
        words = list(words or [])
        first = word or (words[0] if words else "vote")
        self.word = W.Combobox(value=first, options=words, description="word", ensure_option=False,
                               continuous_update=False, placeholder="type a word")
        self.sense = W.Dropdown(options=list(range(self.k)), value=0, description="sense")
        self.other = W.Text(value=other, description="compare", placeholder="second word", continuous_update=False)
        self.prompt = W.Text(value=prompt, description="prompt", continuous_update=False,
                             layout=W.Layout(width="60%"))
        self.factor = W.FloatSlider(value=1.0, min=0.0, max=3.0, step=0.1, description="scale",
                                    continuous_update=False)
        self.table = W.HTML()
        self.similarity = W.HTML()
        self.prediction = W.HTML()
        self.continuation = W.HTML()
        self.new_tokens = W.BoundedIntText(value=12, min=1, max=64, description="continue",
                                           layout=W.Layout(width="160px"))
        for control in (self.word, self.sense):
            control.observe(self._refresh_all, names="value")
        self.other.observe(self._refresh_similarity, names="value")
        for control in (self.prompt, self.factor, self.new_tokens):
            control.observe(self._refresh_prediction, names="value")
        super().__init__([
            W.HTML(_STYLE + "<b>Sense browser</b>: the words each sense promotes (top) and suppresses (bottom)"),
            W.HBox([self.word, self.sense]), self.table,
            W.HBox([self.other]), self.similarity,
            W.HBox([self.prompt, self.factor, self.new_tokens]), self.prediction, self.continuation,
        ])
        self._refresh_all()

    def _ipython_display_(self) -> None:
        """The widget, after a one-line note for where it cannot be shown: nbconvert's HTML
        has no live kernel and shows a widget as an empty box. The widget's own style hides
        the note wherever it does render."""
        display({"text/plain": STATIC_NOTE,
                 "text/html": f"<div class='bnb-static-note' style='color:#666;font-style:italic'>"
                              f"{html.escape(STATIC_NOTE)}</div>"}, raw=True)
        display(self._repr_mimebundle_(), raw=True)

    # -- rendering -------------------------------------------------------------------------

    def _error(self, exc: Exception) -> str:
        return f"<span style='color:#b00'>{html.escape(str(exc))}</span>"

    def _refresh_all(self, _change=None) -> None:
        self._refresh_table()
        self._refresh_similarity()
        self._refresh_prediction()

    def _refresh_table(self) -> None:
        try:
            rows = S.sense_words(self.model, self.tok, self.word.value, top=self.top)
        except UserError as exc:
            self.table.value = self._error(exc)
            return
        body = []
        for r in rows:
            cls = " class='chosen'" if r["sense"] == self.sense.value else ""
            top = " ".join(f"<code>{_esc(t)}</code>" for t in r["top"])
            bottom = " ".join(f"<code>{_esc(t)}</code>" for t in r["bottom"])
            body.append(f"<tr{cls}><td><code>{_esc(r['token'])}</code></td><td>{r['sense']}</td>"
                        f"<td>{top}</td><td style='color:#888'>{bottom}</td></tr>")
        self.table.value = ("<table class='bnb-table'><tr><th>token</th><th>sense</th><th>top</th>"
                            f"<th>bottom</th></tr>{''.join(body)}</table>")

    def _refresh_similarity(self, _change=None) -> None:
        other = self.other.value.strip()
        if not other:
            self.similarity.value = "<i>type a second word to compare its senses</i>"
            return
        try:
            sim = S.sense_similarity(self.model, self.tok, self.word.value, other)
        except UserError as exc:
            self.similarity.value = self._error(exc)
            return
        l = self.sense.value
        row = sim[l]
        cells = "".join(f"<td style='background:rgba(200,60,40,{max(v, 0):.2f})'>{v:+.2f}</td>" for v in row)
        self.similarity.value = (
            f"cosine of sense {l} of <b>{html.escape(self.word.value)}</b> with each sense of "
            f"<b>{html.escape(other)}</b> (same-index mean {np.diag(sim).mean():+.2f}):"
            f"<table class='bnb-table'><tr>{''.join(f'<th>{m}</th>' for m in range(len(row)))}</tr><tr>{cells}</tr></table>")

    def _refresh_prediction(self, _change=None) -> None:
        try:
            r = S.reweight(self.model, self.tok, self.prompt.value, self.word.value, self.sense.value,
                           self.factor.value, top=self.top)
        except UserError as exc:
            self.prediction.value = self._error(exc)
            return
        if not r["positions"]:
            note = f"<i>{html.escape(self.word.value)!s} does not occur in the prompt: nothing to scale</i>"
        else:
            note = f"sense {r['sense']} of the word at positions {r['positions']} scaled by {r['factor']:.1f}; KL {r['kl']:.4f} nats"
        rows = "".join(
            f"<tr><td><code>{_esc(b[0])}</code> {b[1]:.3f}</td><td><code>{_esc(a[0])}</code> {a[1]:.3f}</td></tr>"
            for b, a in zip(r["before"], r["after"]))
        self.prediction.value = (f"{note}<table class='bnb-table'><tr><th>next token before</th>"
                                 f"<th>after</th></tr>{rows}</table>")
        plain, steered = S.continuations(self.model, self.tok, self.prompt.value, self.word.value,
                                         self.sense.value, self.factor.value, self.new_tokens.value)
        self.continuation.value = (
            "<table class='bnb-table'><tr><th>continuation (greedy), unchanged</th>"
            f"<th>with sense {r['sense']} scaled by {r['factor']:.1f}</th></tr><tr>"
            f"<td>{html.escape(plain)}</td><td>{html.escape(steered)}</td></tr></table>")
