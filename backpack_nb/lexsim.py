"""Word similarity on Multi-SimLex: do a model's word representations rank word pairs as
people do, within a language and across languages?

Multi-SimLex (Vulić et al., Computational Linguistics 46(4), 2020) rates 1,888 concept pairs
for similarity (0-6) in 12 languages, aligned across languages. Six of them are Europarl
languages (ENG en, FRA fr, FIN fi, SPA es, EST et, POL pl); a run is scored in those of its
languages that Multi-SimLex has, and the rest are reported as not in the corpus.

Representations, each a named method (``methods`` of a result):

- ``embedding``: the word's row of the tied input embedding E (both models);
- ``random``: the same lookup in a random Gaussian matrix over the same tokens (chance);
- ``sense_0`` .. ``sense_{k-1}``: one Backpack sense vector C(x)_l alone;
- ``sense_mean``: the mean of the k sense vectors;
- ``sense_best``: the single sense that scores best on one half of the concept pairs (the
  *selection* half), reported on the other half only (the *report* half), so the choice
  never sees the pairs it is scored on. The halves are fixed by a seeded shuffle of the
  concept IDs (of the English query words, for retrieval) before any coverage filter, so a
  concept lands in the same half in every language and for every model.

A word is looked up in its mid-sentence form (leading space), lower-cased, with a
parenthesised note removed (``abikaasa (naine)`` -> ``abikaasa``). A word of several tokens
(or a phrase, ``papier peint``) is the mean over its tokens; each table says how many
covered pairs needed that.

Scores:

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
"""

from __future__ import annotations

import argparse
import csv
import html
import logging
import math
import os
import re
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import data, paths
from .errors import UserError, exit_on_user_error

log = logging.getLogger(__name__)

# Multi-SimLex language columns that are Europarl languages, and their Europarl codes.
EUROPARL_CODES = {"ENG": "en", "FRA": "fr", "FIN": "fi", "SPA": "es", "EST": "et", "POL": "pl"}
MULTISIMLEX_LANGS = ("ARA", "CMN", "CYM", "ENG", "EST", "FIN", "FRA", "HEB", "POL", "RUS", "SPA", "SWA", "YUE")
FILES = ("scores.csv", "translation.csv")
OFFICIAL_URL = "https://multisimlex.com/data/"
DEFAULT_MIN_COUNT = 5
# Methods shown first in tables and figures; sense_l follow in order.
LEAD_METHODS = ("embedding", "random", "sense_mean", "sense_best")


# ----------------------------------------------------------------------------------------
# the benchmark files


def _has_files(folder: Path) -> bool:
    return all((folder / f).is_file() for f in FILES)


def _fetch_official(dest: Path, base_url: str | None = None) -> Path:
    """Download the official scores.csv and translation.csv into ``dest``; a partial file
    never takes the final name."""
    base_url = base_url or OFFICIAL_URL
    dest.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        target = dest / name
        if target.is_file():
            continue
        tmp = target.with_name(name + ".part")
        url = base_url.rstrip("/") + "/" + name
        try:
            with urllib.request.urlopen(url, timeout=30) as resp, open(tmp, "wb") as out:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            tmp.unlink(missing_ok=True)
            raise UserError(
                f"Multi-SimLex is not available locally and could not be fetched from {url} ({exc}). "
                f"Download {' and '.join(FILES)} from https://multisimlex.com/ and pass their folder "
                "with --multisimlex PATH, or set MULTISIMLEX_SOURCE=PATH"
            ) from exc
        os.replace(tmp, target)
    return dest


def resolve_source(source: str | os.PathLike | None = None, *, base_url: str | None = None) -> Path:
    """The folder holding Multi-SimLex's ``scores.csv`` and ``translation.csv``: ``source``
    (``--multisimlex``), else ``MULTISIMLEX_SOURCE``, else ``data/multisimlex`` (under
    BACKPACK_NB_DATA), fetched from the official release on first use."""
    for given, name in ((source, "--multisimlex"), (os.environ.get("MULTISIMLEX_SOURCE") or None, "MULTISIMLEX_SOURCE")):
        if given is None or str(given) == "":
            continue
        folder = paths.resolve_in_root(given)
        if folder.is_file() and folder.name in FILES:  # pointing at one of the two files
            folder = folder.parent
        if not folder.is_dir():
            raise UserError(f"{name} {folder} is not a folder; give the folder holding Multi-SimLex's {' and '.join(FILES)}")
        missing = [f for f in FILES if not (folder / f).is_file()]
        if missing:
            raise UserError(
                f"{name} {folder} lacks {', '.join(missing)}; give the folder holding Multi-SimLex's "
                f"{' and '.join(FILES)} (from https://multisimlex.com/)"
            )
        return folder
    cache = paths.data_root() / "multisimlex"
    return cache if _has_files(cache) else _fetch_official(cache, base_url)


@dataclass
class MultiSimLex:
    """The benchmark: per concept pair its ID, part of speech, and for each language column
    (``ENG``, ``FRA``, ...) the two words and the mean rating."""

    source: Path
    ids: np.ndarray  # (n,) concept-pair IDs
    pos: list[str]
    words: dict[str, tuple[list[str], list[str]]]  # language -> (word 1 of each pair, word 2)
    scores: dict[str, np.ndarray]  # language -> (n,) ratings, NaN where missing

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def languages(self) -> list[str]:
        """Language columns with both words and ratings."""
        return [l for l in MULTISIMLEX_LANGS if l in self.words and l in self.scores]


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = list(reader.fieldnames or [])
    except (UnicodeDecodeError, csv.Error, OSError) as exc:
        raise UserError(f"cannot read Multi-SimLex file {path} ({exc}); {_FIX}") from exc
    return [h.strip() for h in header], [{(k or "").strip(): (v or "") for k, v in r.items()} for r in rows]


_FIX = ("pass the folder holding the official scores.csv and translation.csv with --multisimlex PATH "
        "(or MULTISIMLEX_SOURCE), or delete data/multisimlex to fetch them again")


def load_multisimlex(source: str | os.PathLike | None = None, *, base_url: str | None = None) -> MultiSimLex:
    """Read and check the two files (see :func:`resolve_source` for where they are looked
    for). Every problem found is listed in one :class:`UserError`."""
    folder = resolve_source(source, base_url=base_url)
    s_path, t_path = folder / "scores.csv", folder / "translation.csv"
    s_head, s_rows = _read_csv(s_path)
    t_head, t_rows = _read_csv(t_path)
    problems: list[str] = []
    for path, head, rows in ((s_path, s_head, s_rows), (t_path, t_head, t_rows)):
        if "ID" not in head:
            problems.append(f"{path.name} has no ID column (header: {', '.join(head) or 'empty'})")
        if not rows:
            problems.append(f"{path.name} has no rows")
    langs = [l for l in MULTISIMLEX_LANGS if l in s_head]
    if not any(l in EUROPARL_CODES for l in langs):
        problems.append(f"scores.csv has none of the language columns {', '.join(EUROPARL_CODES)}")
    for l in langs:
        for c in (f"{l} 1", f"{l} 2"):
            if c not in t_head:
                problems.append(f"translation.csv lacks column {c!r} (scores.csv rates {l})")
    if not problems and len(s_rows) != len(t_rows):
        problems.append(f"scores.csv has {len(s_rows)} pairs but translation.csv {len(t_rows)}")
    if problems:
        raise UserError(f"Multi-SimLex at {folder} is malformed:\n  - " + "\n  - ".join(problems) + f"\n{_FIX}")

    ids, bad = [], []
    for i, (s, t) in enumerate(zip(s_rows, t_rows)):
        if s["ID"].strip() != t["ID"].strip():
            bad.append(f"row {i + 2}: ID {s['ID']!r} in scores.csv but {t['ID']!r} in translation.csv")
        try:
            ids.append(int(s["ID"]))
        except ValueError:
            bad.append(f"scores.csv row {i + 2}: ID {s['ID']!r} is not an integer")
    scores: dict[str, np.ndarray] = {}
    for l in langs:
        vals = np.full(len(s_rows), np.nan)
        for i, r in enumerate(s_rows):
            cell = r.get(l, "").strip()
            if not cell:
                continue  # a missing rating: the pair is skipped in this language
            try:
                vals[i] = float(cell)
            except ValueError:
                bad.append(f"scores.csv row {i + 2}: {l} rating {cell!r} is not a number")
                continue
            if not 0 <= vals[i] <= 6:
                bad.append(f"scores.csv row {i + 2}: {l} rating {vals[i]} is outside 0..6")
        scores[l] = vals
    if len(set(ids)) != len(ids):
        bad.append("scores.csv repeats an ID")
    if bad:
        more = f"\n  - ... and {len(bad) - 8} more" if len(bad) > 8 else ""
        raise UserError(f"Multi-SimLex at {folder} is malformed:\n  - " + "\n  - ".join(bad[:8]) + more + f"\n{_FIX}")
    words = {l: ([r[f"{l} 1"] for r in t_rows], [r[f"{l} 2"] for r in t_rows]) for l in langs}
    return MultiSimLex(folder, np.array(ids, dtype=np.int64), [r.get("PoS", "") for r in s_rows], words, scores)


def normalize_word(word: str) -> str:
    """The form looked up: stripped, lower-cased, a parenthesised note removed."""
    return re.sub(r"\s*\([^)]*\)", "", word).strip().lower()


# ----------------------------------------------------------------------------------------
# statistics


def rank_rows(a: np.ndarray) -> np.ndarray:
    """Ranks (1-based) along the last axis, ties given their average rank."""
    a = np.asarray(a, dtype=float)
    flat = a.reshape(-1, a.shape[-1])
    n = flat.shape[1]
    order = np.argsort(flat, axis=1, kind="mergesort")
    s = np.take_along_axis(flat, order, 1)  # (rows, n) sorted
    idx = np.broadcast_to(np.arange(n), s.shape)
    starts = np.ones_like(s, dtype=bool)
    starts[:, 1:] = s[:, 1:] != s[:, :-1]
    ends = np.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    first = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)  # start of each tie group
    last = np.minimum.accumulate(np.where(ends, idx, n - 1)[:, ::-1], axis=1)[:, ::-1]
    ranks = np.empty_like(s)
    np.put_along_axis(ranks, order, (first + last) / 2 + 1, 1)
    return ranks.reshape(a.shape)


def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    x = x - x.mean(-1, keepdims=True)
    y = y - y.mean(-1, keepdims=True)
    den = np.sqrt((x * x).sum(-1) * (y * y).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (x * y).sum(-1) / np.where(den > 0, den, 1), np.nan)


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman's rho: the Pearson correlation of the (tie-averaged) ranks; NaN for fewer
    than two pairs or a constant side."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"spearman needs two 1-d arrays of one length, got {x.shape} and {y.shape}")
    if len(x) < 2:
        return float("nan")
    return float(_pearson_rows(rank_rows(x), rank_rows(y)))


def bootstrap_spearman(x: np.ndarray, y: np.ndarray, n_boot: int = 1000, seed: int = 0) -> list[float]:
    """95% percentile interval of Spearman's rho over pairs resampled with replacement."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3 or n_boot < 1:
        return [float("nan"), float("nan")]
    picks = np.random.default_rng(seed).integers(0, len(x), size=(n_boot, len(x)))
    rho = _pearson_rows(rank_rows(x[picks]), rank_rows(y[picks]))
    rho = rho[np.isfinite(rho)]
    if not len(rho):
        return [float("nan"), float("nan")]
    return [float(v) for v in np.percentile(rho, [2.5, 97.5])]


def _mean(hits: np.ndarray) -> float:
    return float(hits.mean()) if len(hits) else float("nan")


def _bootstrap_mean(hits: np.ndarray, n_boot: int, seed: int) -> list[float]:
    if len(hits) < 2 or n_boot < 1:
        return [float("nan"), float("nan")]
    picks = np.random.default_rng(seed).integers(0, len(hits), size=(n_boot, len(hits)))
    return [float(v) for v in np.percentile(hits[picks].mean(1), [2.5, 97.5])]


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


# ----------------------------------------------------------------------------------------
# word counts in the training data


def corpus_counts(tokens: np.ndarray, sequences: Sequence[Sequence[int]], chunk: int = 1 << 24) -> np.ndarray:
    """How often each token sequence occurs in ``tokens``: a bincount for single tokens, a
    scan from the positions of the first token for longer sequences. (A sequence that is a
    prefix of a longer word counts there too: `` bank`` inside `` banking``.)"""
    n = len(tokens)
    out = np.zeros(len(sequences), dtype=np.int64)
    singles = [i for i, s in enumerate(sequences) if len(s) == 1]
    if singles:
        top = max(sequences[i][0] for i in singles) + 1
        hist = np.zeros(top, dtype=np.int64)
        for s in range(0, n, chunk):
            part = np.asarray(tokens[s : s + chunk], dtype=np.int64)
            hist += np.bincount(part[part < top], minlength=top)
        out[singles] = hist[[sequences[i][0] for i in singles]]
    multi = [i for i, s in enumerate(sequences) if len(s) > 1]
    if multi:
        firsts = np.unique([sequences[i][0] for i in multi])
        hits = np.flatnonzero(np.isin(tokens, firsts))  # (h,) positions of any first token
        hit_tok = np.asarray(tokens[hits], dtype=np.int64)
        order = np.argsort(hit_tok, kind="stable")
        hits, hit_tok = hits[order], hit_tok[order]
        for i in multi:
            seq = sequences[i]
            lo, hi = np.searchsorted(hit_tok, [seq[0], seq[0] + 1])
            cand = hits[lo:hi]
            cand = cand[cand + len(seq) <= n]
            for j in range(1, len(seq)):
                cand = cand[np.asarray(tokens[cand + j]) == seq[j]]
            out[i] = len(cand)
    return out


# ----------------------------------------------------------------------------------------
# word representations


def _unwrap(model: nn.Module) -> nn.Module:
    from .senses import _unwrap as unwrap

    return unwrap(model)


def has_senses(model: nn.Module) -> bool:
    return hasattr(_unwrap(model), "sense_vectors")


@dataclass
class WordVectors:
    """Unit-length vectors of a list of words for each method: ``vectors[method]`` (n, d)."""

    words: list[str]
    token_ids: list[list[int]]
    vectors: dict[str, torch.Tensor]
    index: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.index = {w: i for i, w in enumerate(self.words)}

    @property
    def methods(self) -> list[str]:
        return list(self.vectors)

    def cosine(self, method: str, a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        """Cosine of ``a[i]`` with ``b[i]`` for each i."""
        v = self.vectors[method]
        ia = torch.tensor([self.index[w] for w in a], dtype=torch.long)
        ib = torch.tensor([self.index[w] for w in b], dtype=torch.long)
        return (v[ia] * v[ib]).sum(-1).double().numpy()

    def matrix(self, method: str, a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        """Cosine of every word of ``a`` with every word of ``b``: (len(a), len(b))."""
        v = self.vectors[method]
        va = v[torch.tensor([self.index[w] for w in a], dtype=torch.long)]
        vb = v[torch.tensor([self.index[w] for w in b], dtype=torch.long)]
        return (va @ vb.T).double().numpy()


@torch.no_grad()
def word_vectors(model: nn.Module, tok, words: Sequence[str], *, random_seed: int = 0,
                 chunk: int = 2048) -> WordVectors:
    """Every method's vector of every word (mid-sentence form; mean over a word's tokens),
    normalised to unit length. The ``random`` control draws one Gaussian vector per distinct
    token (seeded, in token-id order), so it sees the same tokenization as the model."""
    from .senses import word_token_ids

    bare = _unwrap(model)
    words = list(dict.fromkeys(words))
    token_ids = [word_token_ids(tok, w) for w in words]
    uniq = sorted({t for ids in token_ids for t in ids})
    pos = {t: i for i, t in enumerate(uniq)}
    flat = torch.tensor([pos[t] for ids in token_ids for t in ids], dtype=torch.long)  # tokens of all words
    owner = torch.tensor([w for w, ids in enumerate(token_ids) for _ in ids], dtype=torch.long)
    n_tok = torch.tensor([len(ids) for ids in token_ids], dtype=torch.float32)

    def per_word(token_vecs: torch.Tensor) -> torch.Tensor:  # (U, ...) -> (n_words, ...) mean over tokens
        out = torch.zeros(len(words), *token_vecs.shape[1:], dtype=torch.float32)
        out.index_add_(0, owner, token_vecs[flat].float())
        return out / n_tok.view(-1, *[1] * (token_vecs.dim() - 1))

    device = bare.wte.weight.device
    ids_t = torch.tensor(uniq, dtype=torch.long, device=device)
    d = bare.wte.weight.shape[1]
    vectors = {"embedding": per_word(bare.wte.weight[ids_t].float().cpu())}
    rng = np.random.default_rng(random_seed)
    vectors["random"] = per_word(torch.from_numpy(rng.standard_normal((len(uniq), d)).astype(np.float32)))
    if has_senses(bare):
        was_training = bare.training
        bare.eval()  # the sense network has dropout
        try:
            senses = torch.cat([bare.sense_vectors(ids_t[s : s + chunk].view(1, -1))[0].float().cpu()
                                for s in range(0, len(uniq), chunk)])  # (U, k, d)
        finally:
            bare.train(was_training)
        per = per_word(senses)  # (n_words, k, d)
        vectors["sense_mean"] = per.mean(1)
        for l in range(per.shape[1]):
            vectors[f"sense_{l}"] = per[:, l]
    return WordVectors(words, token_ids, {m: F.normalize(v, dim=-1) for m, v in vectors.items()})


def sense_methods(methods: Sequence[str]) -> list[str]:
    return sorted((m for m in methods if re.fullmatch(r"sense_\d+", m)), key=lambda m: int(m.split("_")[1]))


# ----------------------------------------------------------------------------------------
# the three scores


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
    out = {m: {"p_at_1": _mean(h1), "p_at_5": _mean(h5), "ci95": _bootstrap_mean(h1, n_boot, seed), "n": len(h1),
               "p_at_1_spelt_differently": _mean(h1[other])} for m, (h1, h5) in hits.items()}
    senses = sense_methods(wv.methods)
    if senses:
        select = np.array([q in halves[0] for q in queries], dtype=bool)
        report = np.array([q in halves[1] for q in queries], dtype=bool)
        p1 = [hits[m][0][select].mean() if select.any() else float("nan") for m in senses]
        l = choose_sense(p1)
        h1, h5 = hits[senses[l]][0][report], hits[senses[l]][1][report]
        out["sense_best"] = {"p_at_1": _mean(h1), "p_at_5": _mean(h5), "ci95": _bootstrap_mean(h1, n_boot, seed),
                             "n": int(len(h1)), "p_at_1_spelt_differently": _mean(h1[other[report]]), "sense": l,
                             "selected_on": int(select.sum()), "selection_p_at_1": float(p1[l])}
    return out


def _train_tokens(data_dir: Path, max_tokens: int | None) -> np.ndarray:
    toks = data.load_tokens(data_dir, "train")
    return toks[:max_tokens] if max_tokens else toks


def evaluate_lexsim(
    model: nn.Module,
    tok,
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
    from .evaluation import check_same_vocabulary

    if not isinstance(min_count, int) or min_count < 1:
        raise UserError(f"min_count must be a positive integer, got {min_count!r}")
    bench = source if isinstance(source, MultiSimLex) else load_multisimlex(source)
    ddir = data.resolve_data_dir(data_dir)
    meta = data.load_meta(ddir)
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


# ----------------------------------------------------------------------------------------
# tables and figures


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

    def __init__(self, rows, columns: list[str], coverage: list[str]):
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
        head = "".join(f"<th>{esc(c)}</th>" for c in ["model", "method", *self.columns])
        body = "".join(
            "<tr>" + f"<td>{esc(r['model'])}</td><td><code>{esc(r['method'])}</code></td>"
            + "".join(f"<td style='text-align:right'>{esc(self._fmt(r.get(c)))}</td>" for c in self.columns) + "</tr>"
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
                      title: str = "Multi-SimLex: Spearman rho (P@1 for retrieval), 95% bootstrap interval"):
    """Grouped bars: a group per language / pair / retrieval direction, a bar per model and
    method (those of ``methods`` the model has), with the bootstrap interval."""
    import matplotlib.pyplot as plt

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
    fig, ax = plt.subplots(figsize=(2 + 0.5 * len(series) * len(cols), 4.2), constrained_layout=True)
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
    ax.set_ylabel("Spearman rho / P@1")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return fig


# ----------------------------------------------------------------------------------------
# which sense carries a pair's similarity (notebook 04)


@torch.no_grad()
def pair_senses(model: nn.Module, tok, pairs: Sequence[tuple[str, str]] | None = None, *,
                source: str | os.PathLike | MultiSimLex | None = None, lang: str = "en", n: int = 8,
                top: int = 5) -> "PairSenseTable":
    """For each word pair: the cosine of sense l of the first word with sense l of the
    second, for every l, next to the embedding cosine and the Multi-SimLex rating; the
    *carrier* is the sense with the highest cosine, shown with the words it promotes for
    the first word (top entries of ``E C(x)_l``). Without ``pairs``: the ``n`` highest-rated
    Multi-SimLex pairs of ``lang`` whose words are single tokens."""
    from .senses import word_senses, word_token_ids

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
                         f"{cells} | {' '.join(repr(t) for t in r['carrier_words'])}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        esc = html.escape
        k = len(self[0]["senses"]) if self else 0
        head = "".join(f"<th>{h}</th>" for h in ["pair", "gold", "embedding", "sense mean", *[f"s{l}" for l in range(k)], "carrier's top words"])
        body = ""
        for r in self:
            cells = "".join(f"<td style='text-align:right;{'font-weight:bold;background:#ffe9a8' if l == r['carrier'] else ''}'>{c:+.2f}</td>"
                            for l, c in enumerate(r["senses"]))
            body += (f"<tr><td>{esc(r['word_1'])} / {esc(r['word_2'])}</td><td>{r['gold']:.2f}</td><td>{r['embedding']:+.2f}</td>"
                     f"<td>{r['sense_mean']:+.2f}</td>{cells}<td>{' '.join(f'<code>{esc(t)}</code>' for t in r['carrier_words'])}</td></tr>")
        return f"<table class='pair-sense-table'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def figure(self, title: str = "cosine of sense l of word 1 with sense l of word 2"):
        from . import plots

        m = np.stack([r["senses"] for r in self])
        labels = [f"{r['word_1']} / {r['word_2']} (gold {r['gold']:.1f})" for r in self]
        return plots.heatmap(m, labels, [f"sense {l}" for l in range(m.shape[1])], title=title, cmap="RdBu_r", vmin=-1, vmax=1)


# ----------------------------------------------------------------------------------------
# checkpoints and the command line


def write_lexsim(model_path: str | os.PathLike, source: str | os.PathLike | MultiSimLex | None = None, *,
                 data_dir: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
                 device: str = "cpu", min_count: int = DEFAULT_MIN_COUNT, n_boot: int = 1000) -> dict:
    """Score a checkpoint and write the result as the ``lexsim`` section of its eval.json
    (``out``, default beside the checkpoint; the other sections are kept when that file
    belongs to the same checkpoint). ``data_dir`` defaults to the data it was trained on."""
    from .evaluation import load_model, merge_eval_json

    if device == "cuda" and not torch.cuda.is_available():
        device = "cpu"
    bench = source if isinstance(source, MultiSimLex) else load_multisimlex(source)  # fail before the model loads
    model_path = paths.resolve_in_root(model_path)
    model, tok, state = load_model(model_path, device)
    ddir = data.resolve_data_dir(data_dir or state.get("data", {}).get("data_dir", "europarl"))
    result = {"model_type": state["model_type"],
              **evaluate_lexsim(model, tok, ddir, bench, min_count=min_count, n_boot=n_boot)}
    target = Path(out) if out else model_path.parent / "eval.json"
    base = {"model_type": state["model_type"], "checkpoint": str(model_path), "data_dir": str(ddir)}
    merge_eval_json(target, model_path, {**base, "lexsim": result})
    return {**result, "path": str(target)}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m backpack_nb.lexsim",
                                 description="Multi-SimLex word similarity of a checkpoint (adds a lexsim section to eval.json).")
    ap.add_argument("--model_path", required=True, help="ckpt.pt or best.pt")
    ap.add_argument("--multisimlex", default=None, metavar="PATH",
                    help="folder with scores.csv and translation.csv (default: MULTISIMLEX_SOURCE, else data/multisimlex, fetched once)")
    ap.add_argument("--data_dir", default=None, help="dataset whose train.bin decides coverage (default: the checkpoint's)")
    ap.add_argument("--min_count", type=int, default=DEFAULT_MIN_COUNT, help="a pair is covered when both words occur this often in train.bin")
    ap.add_argument("--n_boot", type=int, default=1000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="eval.json to update (default: beside the checkpoint)")
    args = ap.parse_args(argv)
    try:
        result = write_lexsim(args.model_path, args.multisimlex, data_dir=args.data_dir, out=args.out,
                              device=args.device, min_count=args.min_count, n_boot=args.n_boot)
    except UserError as exc:
        exit_on_user_error(exc)
    print(format_table(result))
    print(f"wrote the lexsim section of {result['path']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
