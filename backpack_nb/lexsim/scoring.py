"""The three Multi-SimLex scores of a model, and of a checkpoint into its eval.json.

- monolingual: Spearman's rho between gold ratings and cosine similarity, per language, over
  the *covered* pairs: both words' token sequences occur at least ``min_count`` times in the
  dataset's ``train.bin``; with a bootstrap 95% interval over pairs (a Europarl sample covers
  only a few hundred pairs, so intervals matter);
- cross-lingual, for each two run languages A, B: the pairs (word 1 in A, word 2 in B) and
  (word 1 in B, word 2 in A), gold = the mean of the two languages' ratings;
- retrieval (bilingual lexicon induction), A -> B: each covered word of language A with a
  covered translation in B ranks every distinct B word of ``translation.csv`` by cosine;
  precision@1 and @5. Words spelt the same in both languages (``radio``) are the same
  tokens and retrieve themselves: the ``random`` control shows how much that alone gives.

``sense_best`` is the single sense that scores best on one half of the concept pairs (the
*selection* half), reported on the other half only (the *report* half), so the choice never
sees the pairs it is scored on. The halves are fixed by a seeded shuffle of the concept IDs
(of the English query words, for retrieval) before any coverage filter, so a concept lands
in the same half in every language and for every model.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from itertools import combinations
from pathlib import Path

import numpy as np
import torch.nn as nn

from .. import paths
from ..loading import load_model
from ..dataset import check_same_vocabulary, load_meta, load_tokens, resolve_data_dir
from ..devices import resolve_device
from ..errors import UserError
from ..eval_json import eval_json_path, merge_eval_json
from ..stats import bootstrap_mean, bootstrap_spearman, spearman
from ..tokenizer import Tokenizer
from .benchmark import EUROPARL_CODES, MultiSimLex, load_multisimlex, normalize_word
from .representations import WordVectors, corpus_counts, has_senses, sense_methods, word_vectors

log = logging.getLogger(__name__)

DEFAULT_MIN_COUNT = 5
# Methods shown first in tables and figures; sense_l follow in order.
LEAD_METHODS = ("embedding", "random", "sense_mean", "sense_best")


def _mean(hits: np.ndarray) -> float:
    return float(hits.mean()) if len(hits) else float("nan")


def heldout_halves(keys: Sequence, seed: int = 0) -> tuple[set, set]:
    """(selection half, report half) of ``keys`` (concept IDs, query words): a seeded
    shuffle of the sorted distinct keys, cut in two. Independent of any model or coverage."""
    distinct = sorted(set(keys))
    perm = np.random.default_rng(seed).permutation(len(distinct))
    half = len(distinct) // 2
    return {distinct[i] for i in perm[:half]}, {distinct[i] for i in perm[half:]}


def choose_sense(scores: Sequence[float]) -> int:
    """The sense with the highest score (NaN never wins; ties go to the lower index)."""
    s = np.asarray(scores, dtype=float)
    if not np.isfinite(s).any():
        return 0
    return int(np.nanargmax(np.where(np.isfinite(s), s, -np.inf)))


def select_sense(sims: np.ndarray, gold: np.ndarray, select: np.ndarray, report: np.ndarray) -> dict:
    """The held-out best sense. ``sims`` (k, n) is each sense's similarity of n pairs and
    ``gold`` (n,) their ratings; ``select`` and ``report`` are disjoint index arrays (or
    boolean masks). The sense is chosen from ``sims[:, select]`` and ``gold[select]`` alone;
    the report half is used only to score the chosen sense afterwards."""
    select, report = _as_index(select, gold), _as_index(report, gold)
    if np.intersect1d(select, report).size:
        raise ValueError("the selection and report halves share pairs")
    sims, gold = np.asarray(sims, dtype=float), np.asarray(gold, dtype=float)
    per_sense = [spearman(sims[l, select], gold[select]) for l in range(sims.shape[0])]
    sense = choose_sense(per_sense)
    return {"sense": sense, "selection_spearman": per_sense[sense], "selected_on": int(len(select)),
            "report": report}


def _as_index(which: np.ndarray, like: np.ndarray) -> np.ndarray:
    which = np.asarray(which)
    if which.dtype == bool:
        if which.shape != np.shape(like):
            raise ValueError("a mask must have one entry per pair")
        return np.flatnonzero(which)
    return which.astype(np.int64)


def _correlation_block(wv: WordVectors, a: list[str], b: list[str], gold: np.ndarray, keys: np.ndarray,
                       halves: tuple[set, set], *, n_boot: int, seed: int) -> dict:
    """Spearman of every method on the pairs (a[i], b[i]) rated ``gold[i]``; ``keys[i]`` is
    the pair's concept ID, which decides its held-out half."""
    out: dict[str, dict] = {}
    sims = {m: wv.cosine(m, a, b) for m in wv.methods}
    for m, s in sims.items():
        out[m] = {"spearman": spearman(s, gold), "ci95": bootstrap_spearman(s, gold, n_boot, seed), "n": int(len(gold))}
    senses = sense_methods(wv.methods)
    if senses:
        select = np.flatnonzero(np.isin(keys, list(halves[0])))
        report = np.flatnonzero(np.isin(keys, list(halves[1])))
        stack = np.stack([sims[m] for m in senses])  # (k, n)
        pick = select_sense(stack, gold, select, report)
        s, g = stack[pick["sense"], report], gold[report]
        out["sense_best"] = {"spearman": spearman(s, g), "ci95": bootstrap_spearman(s, g, n_boot, seed),
                             "n": int(len(report)), "sense": pick["sense"],
                             "selected_on": pick["selected_on"], "selection_spearman": pick["selection_spearman"]}
    return out


def _ordered(methods: Mapping[str, dict]) -> dict[str, dict]:
    names = [m for m in LEAD_METHODS if m in methods] + sense_methods(methods)
    return {m: methods[m] for m in names + [m for m in methods if m not in names]}


def _retrieval(wv: WordVectors, queries: list[str], gold: dict[str, set[str]], pool: list[str],
               halves: tuple[set, set], *, n_boot: int, seed: int) -> dict:
    """P@1 and P@5 of every method: each query ranks ``pool`` by cosine."""
    pool_index = {w: i for i, w in enumerate(pool)}
    is_gold = np.zeros((len(queries), len(pool)), dtype=bool)
    for qi, q in enumerate(queries):
        is_gold[qi, [pool_index[w] for w in gold[q]]] = True
    # A query whose translation is spelt the same is the same tokens: it finds itself.
    other = np.array([q not in gold[q] for q in queries], dtype=bool)
    hits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for m in wv.methods:
        sims = wv.matrix(m, queries, pool)  # (q, pool)
        top5 = np.argsort(-sims, axis=1, kind="stable")[:, :5]
        g = np.take_along_axis(is_gold, top5, 1)  # (q, 5)
        hits[m] = (g[:, 0].astype(float), g.any(1).astype(float))
    out = {m: {"p_at_1": _mean(h1), "p_at_5": _mean(h5), "ci95": bootstrap_mean(h1, n_boot, seed), "n": len(h1),
               "p_at_1_spelt_differently": _mean(h1[other])} for m, (h1, h5) in hits.items()}
    senses = sense_methods(wv.methods)
    if senses:
        select = np.array([q in halves[0] for q in queries], dtype=bool)
        report = np.array([q in halves[1] for q in queries], dtype=bool)
        p1 = [hits[m][0][select].mean() if select.any() else float("nan") for m in senses]
        l = choose_sense(p1)
        h1, h5 = hits[senses[l]][0][report], hits[senses[l]][1][report]
        out["sense_best"] = {"p_at_1": _mean(h1), "p_at_5": _mean(h5), "ci95": bootstrap_mean(h1, n_boot, seed),
                             "n": int(len(h1)), "p_at_1_spelt_differently": _mean(h1[other[report]]), "sense": l,
                             "selected_on": int(select.sum()), "selection_p_at_1": float(p1[l])}
    return out


def _train_tokens(data_dir: Path, max_tokens: int | None) -> np.ndarray:
    toks = load_tokens(data_dir, "train")
    return toks[:max_tokens] if max_tokens else toks


def evaluate_lexsim(
    model: nn.Module,
    tok: Tokenizer,
    data_dir: str | os.PathLike,
    source: str | os.PathLike | MultiSimLex | None = None,
    *,
    min_count: int = DEFAULT_MIN_COUNT,
    n_boot: int = 1000,
    seed: int = 0,
    langs: Sequence[str] | None = None,
    max_count_tokens: int | None = None,
) -> dict:
    """Multi-SimLex scores of ``model`` (its tokenizer ``tok``; ``data_dir`` the prepared
    dataset it was trained on, whose ``train.bin`` decides coverage). ``source`` is a
    folder, a loaded :class:`MultiSimLex`, or None (see :func:`resolve_source`). ``langs``
    limits the Europarl languages scored (default: all of the dataset's that Multi-SimLex
    has). Returns a JSON-able dict: ``monolingual`` {lang: ...}, ``crosslingual``
    {"en-fr": ...}, ``retrieval`` {"en->fr": ...}, each with coverage and, per method,
    the score, its bootstrap 95% interval and the number of pairs (queries)."""
    if not isinstance(min_count, int) or min_count < 1:
        raise UserError(f"min_count must be a positive integer, got {min_count!r}")
    bench = source if isinstance(source, MultiSimLex) else load_multisimlex(source)
    ddir = resolve_data_dir(data_dir)
    meta = load_meta(ddir)
    check_same_vocabulary(tok, meta, ddir, Path("(the model given)"))
    run_langs = list(meta["langs"]) if langs is None else list(langs)
    bad = [l for l in run_langs if l not in meta["langs"]]
    if bad:
        raise UserError(f"{ddir} has no language {', '.join(bad)}; it has {', '.join(meta['langs'])}")
    to_col = {code: col for col, code in EUROPARL_CODES.items() if col in bench.languages}
    scored = [l for l in run_langs if l in to_col]
    if not scored:
        raise UserError(
            f"none of the dataset's languages ({', '.join(run_langs)}) is in Multi-SimLex, which has "
            f"{', '.join(f'{c} ({col})' for c, col in sorted(to_col.items()))} among Europarl's"
        )

    # Every word of the scored languages, normalised; an empty cell stays "" (not representable).
    forms = {l: tuple([normalize_word(w) for w in col] for col in bench.words[to_col[l]]) for l in scored}
    vocab = sorted({w for l in scored for col in forms[l] for w in col if w})
    wv = word_vectors(model, tok, vocab, random_seed=seed)
    train = _train_tokens(ddir, max_count_tokens)
    counts_arr = corpus_counts(train, wv.token_ids)
    count = dict(zip(wv.words, counts_arr.tolist()))
    n_tokens = {w: len(ids) for w, ids in zip(wv.words, wv.token_ids)}

    def ok(w: str) -> bool:
        return bool(w) and count[w] >= min_count

    halves = heldout_halves(bench.ids.tolist(), seed)
    result: dict = {
        "source": str(bench.source),
        "min_count": min_count,
        "count_tokens": int(len(train)),
        "word_form": "mid-sentence (leading space), lower-cased; several tokens: mean over them",
        "n_boot": n_boot,
        "seed": seed,
        "languages": {
            "scored": scored,
            "not_in_multisimlex": [l for l in run_langs if l not in to_col],
            "not_in_run": [EUROPARL_CODES[c] for c in bench.languages if c in EUROPARL_CODES and EUROPARL_CODES[c] not in scored],
            "not_in_corpus": [c for c in bench.languages if c not in EUROPARL_CODES],
        },
        "methods": list(_ordered({m: {} for m in wv.methods + (["sense_best"] if has_senses(model) else [])})),
        "monolingual": {},
        "crosslingual": {},
        "retrieval": {},
    }

    def block(a: list[str], b: list[str], gold: np.ndarray, keys: np.ndarray) -> dict:
        valid = np.array([bool(x) and bool(y) for x, y in zip(a, b)]) & np.isfinite(gold)
        cov = valid & np.array([ok(x) and ok(y) for x, y in zip(a, b)])
        idx = np.flatnonzero(cov)
        ca, cb = [a[i] for i in idx], [b[i] for i in idx]
        entry = {"pairs": int(valid.sum()), "covered": int(len(idx)),
                 "multi_token": int(sum(n_tokens[x] > 1 or n_tokens[y] > 1 for x, y in zip(ca, cb)))}
        if len(idx) >= 3:
            entry["methods"] = _ordered(_correlation_block(wv, ca, cb, gold[idx], keys[idx], halves, n_boot=n_boot, seed=seed))
        else:
            entry["methods"] = {}
            entry["note"] = f"fewer than 3 covered pairs (min_count {min_count})"
        return entry

    for l in scored:
        w1, w2 = forms[l]
        result["monolingual"][l] = block(w1, w2, bench.scores[to_col[l]], bench.ids)
    for la, lb in combinations(scored, 2):
        (a1, a2), (b1, b2) = forms[la], forms[lb]
        gold = (bench.scores[to_col[la]] + bench.scores[to_col[lb]]) / 2
        result["crosslingual"][f"{la}-{lb}"] = block(a1 + b1, b2 + a2, np.concatenate([gold, gold]),
                                                     np.concatenate([bench.ids, bench.ids]))
        result["retrieval"][f"{la}->{lb}"] = _retrieval_entry(wv, forms[la], forms[lb], ok, n_tokens, seed, n_boot)
    return result


def _retrieval_entry(wv: WordVectors, src: tuple[list[str], list[str]], tgt: tuple[list[str], list[str]],
                     ok, n_tokens: dict[str, int], seed: int, n_boot: int) -> dict:
    gold_all: dict[str, set[str]] = {}
    for s_col, t_col in zip(src, tgt):
        for s, t in zip(s_col, t_col):
            if s and t:
                gold_all.setdefault(s, set()).add(t)
    pool = sorted({t for col in tgt for t in col if t})
    queries = sorted(q for q, ts in gold_all.items() if ok(q) and any(ok(t) for t in ts))
    halves = heldout_halves(list(gold_all), seed)
    entry = {"queries": len(queries), "candidates": len(pool), "words": len(gold_all),
             "identical": int(sum(q in gold_all[q] for q in queries)),
             "multi_token": int(sum(n_tokens[q] > 1 for q in queries))}
    entry["methods"] = _ordered(_retrieval(wv, queries, gold_all, pool, halves, n_boot=n_boot, seed=seed)) if queries else {}
    return entry


def write_lexsim(model_path: str | os.PathLike, source: str | os.PathLike | MultiSimLex | None = None, *,
                 data_dir: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
                 device: str = "cpu", min_count: int = DEFAULT_MIN_COUNT, n_boot: int = 1000,
                 strict_device: bool = False, flag_prefix: str = "") -> dict:
    """Score a checkpoint and write the result as the ``lexsim`` section of its eval.json
    (``out``, default beside the checkpoint; the other sections are kept when that file
    belongs to the same checkpoint). ``data_dir`` defaults to the data it was trained on.
    An ``out`` that exists and is not an evaluation (a checkpoint, a params file, run.json)
    is refused before the model loads; messages name it ``{flag_prefix}out``."""
    target = eval_json_path(out, flag_prefix) if out else None
    device, _, notes = resolve_device(device, strict=strict_device, task="word similarity")
    for note in notes:
        log.warning(note)
    bench = source if isinstance(source, MultiSimLex) else load_multisimlex(source)  # fail before the model loads
    model_path = paths.resolve_in_root(model_path)
    model, tok, state = load_model(model_path, device)
    ddir = resolve_data_dir(data_dir or state.get("data", {}).get("data_dir", "europarl"))
    result = {"model_type": state["model_type"],
              **evaluate_lexsim(model, tok, ddir, bench, min_count=min_count, n_boot=n_boot)}
    target = target or model_path.parent / "eval.json"
    base = {"model_type": state["model_type"], "checkpoint": str(model_path), "data_dir": str(ddir)}
    merge_eval_json(target, model_path, {**base, "lexsim": result}, flag_prefix)
    return {**result, "path": str(target)}


