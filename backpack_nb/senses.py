"""Reading a Backpack's senses: the words each sense of a word promotes and suppresses.

Sense l of token x is the vector C(x)_l; its effect on the output is ``E C(x)_l`` (V scores,
no norm, no softmax), so its *top* words are the largest entries and its *bottom* words the
smallest. Words are looked up in their mid-sentence form (with a leading space), the form in
which most words occur in running text and the one a BPE vocabulary keeps as a single token.
"""

from __future__ import annotations

import html

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError
from .models.intervention import Intervention, occurrences
from .spelling import where

# Frequent function words that a "length >= 4 letters" filter lets through; probing them
# shows grammar rather than meaning. Other languages rely on the length filter alone.
_STOPWORDS: dict[str, set[str]] = {lang: set(words.split()) for lang, words in {
    "en": "that this with have which there their would these about should other could those "
          "where being also been were will from they what more than into only when such very "
          "some must over make because after before while most them then just like does made "
          "same well even here many much both each your upon shall therefore however",
    "fr": "dans pour nous avec cette sont plus être mais leur comme tous aussi ainsi elle "
          "très bien faire leurs votre notre avons entre alors donc sans dont même autres "
          "parce depuis toutes encore avait quand ceux celle celui sera sous vers fait était "
          "peut doit deux tout toute vous elles dire",
}.items()}


def _unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def mid_sentence_form(word: str) -> str:
    """``vote`` -> `` vote``: the form with a leading space."""
    word = word.strip()
    return " " + word


@torch.no_grad()
def sense_words(model: nn.Module, tok, word: str, top: int = 10, exact: bool = False) -> "SenseTable":
    """For each token of ``word``'s mid-sentence form (or of ``word`` exactly as given, with
    ``exact``) and each sense l: the ``top`` tokens with the largest and the smallest entries
    of ``E C(x)_l``, as rows ``{"token": str, "sense": l, "top": [...], "bottom": [...]}``
    (a :class:`SenseTable`, which renders as a table in a notebook). A word of several
    tokens gives k rows per token. Runs in eval mode (the sense network has dropout) and
    puts the model back in the mode it was in."""
    bare = _unwrap(model)
    ids = word_token_ids(tok, word, exact)
    device = bare.wte.weight.device
    was_training = bare.training
    bare.eval()
    try:
        scores = bare.sense_logits(torch.tensor(ids, dtype=torch.long, device=device))  # (n, k, V)
    finally:
        bare.train(was_training)
    scores = scores.float()
    k = min(top, scores.shape[-1])
    top_ids = scores.topk(k, dim=-1).indices.tolist()  # (n, senses, k)
    bottom_ids = scores.topk(k, dim=-1, largest=False).indices.tolist()
    out = []
    for i, token_id in enumerate(ids):
        for l in range(scores.shape[1]):
            out.append({
                "token": tok.token_str(token_id),
                "sense": l,
                "top": [tok.token_str(t) for t in top_ids[i][l]],
                "bottom": [tok.token_str(t) for t in bottom_ids[i][l]],
            })
    return SenseTable(out, word if exact else mid_sentence_form(word))


def probe_records(model: nn.Module, tok, words: list[str], top: int = 10) -> list[dict]:
    """The ``words`` list of one ``top_activating_words`` entry of training_log.json:
    ``{"probe": " vote", "token": " vote", "sense": l, "top": [...], "bottom": [...]}`` for
    every probe word, token and sense."""
    return [{"probe": mid_sentence_form(w), **rec}
            for w in words for rec in sense_words(model, tok, w, top)]


def frequent_content_words(
    train_tokens: np.ndarray,
    tok,
    lang_tokens: dict[str, np.ndarray],
    per_language: int,
    *,
    max_tokens: int = 10_000_000,
    min_letters: int = 4,
) -> list[str]:
    """Default probe words: for each language, the ``per_language`` most frequent training
    tokens that are whole content words in mid-sentence form (a leading space, then at least
    ``min_letters`` letters, not a listed function word, and rarely followed by more letters
    of the same word). ``lang_tokens`` (held-out text of each language) decides which
    language a word belongs to: the one where it is relatively most frequent. Returned
    without the leading space, in language order."""
    V = tok.vocab_size
    sample = np.asarray(train_tokens[:max_tokens], dtype=np.int64)
    counts = np.bincount(sample, minlength=V)
    strings = [tok.token_str(i) for i in range(V)]
    # A token followed by letters is usually a word piece (" Parl" + "iament"), not a word.
    continues = np.array([bool(s) and s[0].isalpha() for s in strings])
    followed = np.bincount(sample[:-1], weights=continues[sample[1:]], minlength=V)
    rates = {lang: np.bincount(np.asarray(t, dtype=np.int64), minlength=V) / max(len(t), 1)
             for lang, t in lang_tokens.items()}
    langs = list(lang_tokens)
    chosen: dict[str, list[str]] = {lang: [] for lang in langs}
    for i in np.argsort(-counts, kind="stable"):
        if counts[i] == 0 or all(len(v) >= per_language for v in chosen.values()):
            break
        s = strings[i]
        word = s[1:]
        if not (s.startswith(" ") and len(word) >= min_letters and word.isalpha()):
            continue
        if followed[i] > 0.1 * counts[i]:
            continue
        lang = max(langs, key=lambda l: rates[l][i])
        if word.lower() in _STOPWORDS.get(lang, ()) or len(chosen[lang]) >= per_language:
            continue
        chosen[lang].append(word)
    return [w for lang in langs for w in chosen[lang]]


# ----------------------------------------------------------------------------------------
# a sense report's parameters (notebooks 04_senses and 05_compare)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _example(name: str, value: list | int) -> str:
    """``name`` set to ``value`` as the place that runs the notebook takes it: its
    parameters cell in JupyterLab, else ``-p`` (the report runner's and papermill's)."""
    if where() == "notebook":
        return f"{name} = {value!r}"
    return f'-p {name} "[{", ".join(value)}]"' if isinstance(value, list) else f"-p {name} {value}"


def _word_list_problem(name: str, value) -> str | None:
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
        return f"{name} {value!r}: give a non-empty list of words ({_example(name, ['vote', 'loi'])})"
    blank = [w for w in value if not isinstance(w, str) or not w.strip()]
    if blank:
        return f"{name}: {blank[0]!r} is not a word; give words such as {_example(name, ['vote', 'loi'])}"
    return None


def check_report_parameters(*, words, top, n_senses: int | None = None, heatmap_senses=None,
                            browser_words=None, reweight_sense=None, reweight_factor=None) -> None:
    """Refuse a sense report's parameters before anything is drawn, naming every problem in
    one :class:`UserError` (a report runner's ``-p`` value arrives as YAML read it): ``words``
    (and ``browser_words`` unless None) a non-empty list of words, ``top`` a whole number
    >= 1, ``heatmap_senses`` None or senses of the model, ``reweight_sense`` a sense of the
    model, ``reweight_factor`` a finite number >= 0. The sense checks need ``n_senses``."""
    problems = [p for p in (_word_list_problem("words", words),
                            None if browser_words is None else _word_list_problem("browser_words", browser_words))
                if p]
    if not _is_int(top) or top < 1:
        problems.append(f"top {top!r}: the number of top and bottom words per sense is a whole "
                        f"number >= 1 ({_example('top', 8)})")
    if n_senses is not None:
        valid = f"0..{n_senses - 1}"
        if heatmap_senses is not None and (
                not isinstance(heatmap_senses, (list, tuple)) or not heatmap_senses
                or not all(_is_int(l) and 0 <= l < n_senses for l in heatmap_senses)):
            problems.append(f"heatmap_senses {heatmap_senses!r}: a non-empty list of senses in {valid} "
                            f"(this model has {n_senses}), or null for the first four")
        if reweight_sense is not None and not (_is_int(reweight_sense) and 0 <= reweight_sense < n_senses):
            problems.append(f"reweight_sense {reweight_sense!r}: a sense in {valid} (this model has {n_senses})")
    if reweight_factor is not None and (isinstance(reweight_factor, bool) or not isinstance(reweight_factor, (int, float))
                                        or not np.isfinite(reweight_factor) or reweight_factor < 0):
        problems.append(f"reweight_factor {reweight_factor!r}: a finite number >= 0 (0 removes the sense, "
                        "1 changes nothing)")
    if problems:
        raise UserError("; ".join(problems))


# ----------------------------------------------------------------------------------------
# tables that read well in a notebook and in a terminal


def token_label(token: str) -> str:
    """A token as every table, the widget and every figure show it: a space as ``␣`` (the
    leading space is what tells " vote" from "vote", and HTML and tick labels swallow it),
    other invisible characters as Python escapes (``\\n``, ``\\xa0``), everything else as
    is, so the ``\\xNN`` of a partial UTF-8 byte (:meth:`Tokenizer.token_str`) keeps its
    one backslash."""
    return "".join("\N{OPEN BOX}" if ch == " " else ch if ch.isprintable() else repr(ch)[1:-1] for ch in token)


# One line per sense, read from the left: Jupyter's tables right-align cells and wrap them
# (its <code> wraps too: pre-wrap), and size columns from their first row, so that each
# table of a report had widths of its own. Every sense table has the same columns instead:
# fixed widths for the token and the sense, the rest of the page shared by the two word lists;
# a list longer than its column ends in "…" (its title holds it whole).
_CELL = "text-align:left;white-space:nowrap;overflow:hidden;text-overflow:ellipsis;padding:3px 6px"
_SENSE_TABLE = "table-layout:fixed;width:100%;border-collapse:collapse;font-size:12px"
_SENSE_COLS = ("9em", "4.5em", "auto", "auto")  # token, sense, top words, bottom words


def tokens_html(tokens: list[str]) -> str:
    """Tokens as HTML, each in its own ``<code>`` (see :func:`token_label`)."""
    return " ".join(f"<code>{html.escape(token_label(t))}</code>" for t in tokens)


# Jupyter's <code> wraps (pre-wrap: a token breaks after its "-" or "/") and keeps its own colour.
_SENSE_STYLE = "<style>table.sense-table code {white-space: nowrap; color: inherit}</style>"


class SenseTable(list):
    """Rows of :func:`sense_words` (``{"token", "sense", "top", "bottom"}``): a list that
    renders as an HTML table in a notebook and as aligned text in a terminal or report,
    one line per sense."""

    def __init__(self, rows, word: str = ""):
        super().__init__(rows)
        self.word = word

    def __str__(self) -> str:
        head = f"senses of {self.word!r}" if self.word else "senses"
        width = max([len(token_label(r["token"])) for r in self] + [5])
        lines = [head]
        for r in self:
            lines.append(f"{token_label(r['token']):>{width}} sense {r['sense']:>2} | top: "
                         f"{' '.join(token_label(t) for t in r['top'])}")
            lines.append(f"{'':>{width}}          | bottom: {' '.join(token_label(t) for t in r['bottom'])}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        def words(tokens: list[str], extra: str = "") -> str:
            whole = html.escape(" ".join(token_label(t) for t in tokens), quote=True)
            return f"<td style='{_CELL}{extra}' title='{whole}'>{tokens_html(tokens)}</td>"

        rows = "".join(
            f"<tr><td style='{_CELL}' title='{html.escape(token_label(r['token']), quote=True)}'>"
            f"{tokens_html([r['token']])}</td><td style='{_CELL}'>{r['sense']}</td>"
            f"{words(r['top'])}{words(r['bottom'], ';color:#888')}</tr>"
            for r in self
        )
        title = (f"<caption style='text-align:left'>senses of <b>{html.escape(self.word)}</b></caption>"
                 if self.word else "")
        cols = "".join(f"<col style='width:{w}'>" for w in _SENSE_COLS)
        head = "".join(f"<th style='{_CELL}'>{h}</th>" for h in
                       ("token", "sense", "top words (promoted)", "bottom words (suppressed)"))
        return (f"{_SENSE_STYLE}<table class='sense-table' style='{_SENSE_TABLE}'>{title}<colgroup>{cols}</colgroup>"
                f"<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")


# ----------------------------------------------------------------------------------------
# comparing senses


def word_token_ids(tok, word: str, exact: bool = False) -> list[int]:
    """Token ids of ``word`` in its mid-sentence form (or exactly as given); an empty word
    is an error."""
    if not word.strip() and not exact:
        raise UserError("give a word to look up (an empty string has no senses)")
    ids = tok.encode(word if exact else mid_sentence_form(word))
    if not ids:
        raise UserError(f"{word!r} encodes to no tokens")
    return ids


@torch.no_grad()
def word_senses(model: nn.Module, tok, word: str, exact: bool = False) -> torch.Tensor:
    """(k, d) sense vectors of a word: its token's, or the mean over its tokens when the
    word takes several."""
    bare = _unwrap(model)
    ids = word_token_ids(tok, word, exact)
    was_training = bare.training
    bare.eval()
    try:
        senses = bare.sense_vectors(torch.tensor([ids], device=bare.wte.weight.device))[0]  # (n, k, d)
    finally:
        bare.train(was_training)
    return senses.float().mean(0)  # (k, d)


def sense_similarity(model: nn.Module, tok, word_a: str, word_b: str, exact: bool = False) -> np.ndarray:
    """k x k cosine similarities: entry [l, m] compares sense l of ``word_a`` with sense m of
    ``word_b``."""
    a = F.normalize(word_senses(model, tok, word_a, exact), dim=-1)
    b = F.normalize(word_senses(model, tok, word_b, exact), dim=-1)
    return (a @ b.T).cpu().numpy()


DEFAULT_PAIRS = (("vote", "vote"), ("law", "loi"), ("Parliament", "Parlement"), ("Commission", "Commission"),
                 ("President", "Président"), ("report", "rapport"), ("question", "question"), ("countries", "pays"))


def cross_lingual_pairs(model: nn.Module, tok, pairs=DEFAULT_PAIRS) -> list[dict]:
    """How well the senses of translation pairs (en, fr) align. Sense l is made by the same
    slice of the sense network for every word, so sense l of "law" and sense l of "loi"
    should agree when the model has learnt that they mean the same. Per pair:
    ``alignment`` (mean cosine of same-index senses, the one number), ``best_match`` (mean
    over senses of the best cosine with any sense of the other word), ``baseline`` (the same
    alignment against the other pairs' French words: what chance looks like here), the
    tokens used, ``same_tokens`` (True when both words are the same tokens, as vote/vote:
    their alignment is 1 by construction and says nothing) and the k x k matrix."""
    sims = {(a, b): sense_similarity(model, tok, a, b) for a, b in pairs}
    out = []
    for a, b in pairs:
        s = sims[a, b]
        others = [np.diag(sense_similarity(model, tok, a, b2)).mean() for a2, b2 in pairs if b2 != b]
        out.append({
            "en": a, "fr": b,
            "en_tokens": [tok.token_str(t) for t in word_token_ids(tok, a)],
            "fr_tokens": [tok.token_str(t) for t in word_token_ids(tok, b)],
            "same_tokens": word_token_ids(tok, a) == word_token_ids(tok, b),
            "alignment": float(np.diag(s).mean()),
            "best_match": float(s.max(1).mean()),
            "baseline": float(np.mean(others)) if others else float("nan"),
            "matrix": s,
        })
    return out


def alignment_figure(rows: list[dict]):
    """Heatmap: one row per pair, one column per sense, the same-index cosine; each row's
    label gives the pair's alignment (the row's mean) and its chance level."""
    from . import plots  # matplotlib: kept out of `import backpack_nb.senses` (the widget and training import it)

    m = np.stack([np.diag(r["matrix"]) for r in rows])
    labels = [f"{r['en']} / {r['fr']}: {r['alignment']:+.2f} (chance {r['baseline']:+.2f})" for r in rows]
    return plots.heatmap(m, labels, [str(l) for l in range(m.shape[1])],
                         title="cosine of sense l (en) with sense l (fr)", cmap="RdBu_r", vmin=-1, vmax=1,
                         xlabel="sense l")


# ----------------------------------------------------------------------------------------
# contextualization and the reweighting intervention


@torch.no_grad()
def contextualization_heatmap(model: nn.Module, tok, sentence: str, senses=None):
    """(figure, alpha (k, T, T), token strings) of the contextualization weights of a
    sentence: row i is the predicting position, column j the token whose senses it mixes."""
    from . import plots  # matplotlib, only when a figure is drawn

    bare = _unwrap(model)
    ids = tok.encode(sentence)[: bare.config.block_size]
    if not ids:
        raise UserError("give a non-empty sentence")
    was_training = bare.training
    bare.eval()
    try:
        alpha = bare.contextualization(torch.tensor([ids], device=bare.wte.weight.device))[0].float().cpu().numpy()
    finally:
        bare.train(was_training)
    tokens = [tok.token_str(t) for t in ids]
    title = f"contextualization weights of {len(ids)} tokens: {tok.decode(ids)!r}"
    fig = plots.alpha_heatmaps(alpha, [token_label(t) for t in tokens], senses, title=title)
    return fig, alpha, tokens


@torch.no_grad()
def next_token_logits(model: nn.Module, idx: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (V,) of the token after ``idx`` (1, T) from the Backpack equation, with the
    sense vectors optionally scaled: ``scale`` (T, k) multiplies C(x_j)_l. Exactly
    ``E sum_j sum_l alpha_l[T-1, j] scale[j, l] C(x_j)_l``
    (:class:`~backpack_nb.models.intervention.Intervention` with those weights)."""
    steer = Intervention() if scale is None else Intervention(sense_weights=lambda ids: scale[None])
    return steer.next_token_logits(_unwrap(model), idx)[0]  # (V,)


def reweight(model: nn.Module, tok, prompt: str, word: str, sense: int, factor: float, top: int = 10,
             exact: bool = False) -> dict:
    """The paper's intervention: scale sense ``sense`` of ``word`` by ``factor`` wherever the
    word occurs in ``prompt`` (every token of each occurrence of its token sequence) and
    compare the next-token distribution before and after: a thin case of
    :class:`~backpack_nb.models.intervention.Intervention`.
    Returns the positions changed, top tokens before/after with probabilities, and
    KL(before || after) in nats. ``factor`` 1 changes nothing; 0 removes that sense."""
    bare = _unwrap(model)
    k = bare.config.n_senses
    if not 0 <= sense < k:
        raise UserError(f"sense must be in 0..{k - 1}, got {sense}")
    ids = tok.encode(prompt)[-bare.config.block_size :]
    if not ids:
        raise UserError("give a non-empty prompt")
    hits = occurrences(word_token_ids(tok, word, exact))
    idx = torch.tensor([ids], device=bare.wte.weight.device)
    positions = hits(idx)[0].nonzero().flatten().tolist()
    steer = Intervention.scaling(hits, sense, factor, k)
    was_training = bare.training
    bare.eval()
    try:
        with torch.no_grad():
            before = Intervention().next_token_logits(bare, idx)[0].float()
            after = steer.next_token_logits(bare, idx)[0].float()
    finally:
        bare.train(was_training)
    p, q = before.log_softmax(-1), after.log_softmax(-1)
    kl = float((p.exp() * (p - q)).sum())

    def top_tokens(logp: torch.Tensor) -> list[tuple[str, float]]:
        vals, where = logp.exp().topk(top)
        return [(tok.token_str(i), float(v)) for v, i in zip(vals.tolist(), where.tolist())]

    return {
        "prompt": prompt, "word": word, "sense": sense, "factor": factor,
        "positions": positions, "tokens": [tok.token_str(t) for t in ids],
        "before": top_tokens(p), "after": top_tokens(q), "kl": kl,
        "logits_before": before, "logits_after": after,
    }


@torch.no_grad()
def continuations(model: nn.Module, tok, prompt: str, word: str, sense: int, factor: float,
                  max_new_tokens: int = 12, exact: bool = False) -> tuple[str, str]:
    """Greedy continuations of ``prompt`` unchanged and with sense ``sense`` of ``word``
    scaled by ``factor`` (at every occurrence, in the prompt and in the generated text):
    the reweighting of :func:`reweight` carried through generation."""
    bare = _unwrap(model)
    if not 0 <= sense < bare.config.n_senses:
        raise UserError(f"sense must be in 0..{bare.config.n_senses - 1}, got {sense}")
    ids = tok.encode(prompt)[-bare.config.block_size:]
    if not ids:
        raise UserError("give a non-empty prompt")
    idx = torch.tensor([ids], device=bare.wte.weight.device)
    steer = Intervention.scaling(occurrences(word_token_ids(tok, word, exact)), sense, factor,
                                 bare.config.n_senses)
    was_training = bare.training
    bare.eval()
    try:
        texts = [tok.decode(bare.generate(idx, max_new_tokens, temperature=0, intervention=i)[0, len(ids):].tolist())
                 for i in (None, steer)]
    finally:
        bare.train(was_training)
    return texts[0], texts[1]
