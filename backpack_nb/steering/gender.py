"""Gender bias (paper §6.2, Table 5): how much more a model expects " he" than " she" (or the
reverse) after a prompt about a job noun, and how far editing one sense of the noun, or its
input embedding, removes that preference.

Per noun, the **bias ratio** is the mean over prompts of max(p(he)/p(she), p(she)/p(he)) for
the token right after the prompt (1: no preference). The softmax's normaliser cancels in the
ratio, so it is exp|logit(he) - logit(she)|.

- *Remove*: the gender sense of the noun (every token of it, at its positions only) scaled
  by 0. *Optimize*: a weight w per noun, fitted on the fitting prompts by Nelder-Mead from 1,
  minimising (bias ratio) + |1 - w|, scored on the test prompts. The logits are linear in
  the weight (``models.intervention``), so L(w) = L(0) + w (L(1) - L(0)) exactly: two forward
  passes serve every w the fit tries.
- *Project* (any model, the paper's baseline): the gender direction g = E[she] - E[he] of the
  output embedding removed from the noun's *input* embedding only (the head untied),
  e <- e - (1 - w) (e.g / g.g) g, with w = 0 or fitted as above (forward passes per w).
- The gender sense: given, or found as the sense whose removal most reduces the bias ratio
  on the fitting prompts, averaged over the nouns (:func:`find_gender_sense`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import minimize

from ..console import progress_bar
from ..errors import UserError
from ..models.intervention import Intervention, has_senses, occurrences
from .words import Word, read_data, word


@dataclass(frozen=True)
class GenderSet:
    """Nouns, prompts (``{noun}`` where the noun goes) and the pronoun pair of a data file."""

    path: str
    language: str
    pronouns: tuple[str, str]  # (male, female)
    neutral: str | None
    nouns: tuple[str, ...]
    fitting: tuple[str, ...]
    test: tuple[str, ...]


def load_set(name_or_path: str = "gender_en", flag: str = "--nouns") -> GenderSet:
    data = read_data(name_or_path, flag, {"pronouns": list, "nouns": list, "fitting": list,
                                          "test": list})
    where = f"{flag} {data['path']}"
    if len(data["pronouns"]) != 2 or not all(isinstance(p, str) and p.strip() for p in data["pronouns"]):
        raise UserError(f"{where}: pronouns must be two words, the male one first, e.g. "
                        "[\" he\", \" she\"]")
    for key in ("fitting", "test"):
        bad = [p for p in data[key] if not isinstance(p, str) or p.count("{noun}") != 1]
        if bad or not data[key]:
            raise UserError(f"{where}: every {key} prompt must hold {{noun}} once, got "
                            f"{bad[0] if bad else 'no prompts'!r}")
    nouns = [str(n) for n in data["nouns"] if str(n).strip()]
    if not nouns:
        raise UserError(f"{where}: nouns is empty")
    neutral = data.get("neutral")
    return GenderSet(data["path"], str(data.get("language", "")), tuple(data["pronouns"]),
                     neutral if isinstance(neutral, str) and neutral.strip() else None,
                     tuple(nouns), tuple(data["fitting"]), tuple(data["test"]))


def pronoun_ids(tok, words: Sequence[str]) -> list[int]:
    """The token id of each pronoun (with its leading space); each must be one real token."""
    ids = []
    for text in words:
        w = word(tok, text)
        if not w.usable or len(w.ids) != 1:
            raise UserError(f"the pronoun {text!r} is {len(w.ids)} tokens {w.tokens} in this "
                            "vocabulary; the bias ratio needs each pronoun to be one real token "
                            "(choose another pronoun pair in the --nouns file)")
        ids.append(w.ids[0])
    return ids


# -- the computation -------------------------------------------------------------------------


class NounLost(ValueError):
    """A prompt in which the noun's tokens do not appear (tokenized differently, or cut off)."""


class Prompts:
    """One noun's prompts as a right-padded batch (B, T) with each prompt's last position;
    padding comes after a prompt's end, so a causal model's last real position never sees it.
    A prompt longer than ``block_size`` keeps its last ``block_size`` tokens, as generation
    does."""

    def __init__(self, tok, templates: Sequence[str], noun: Word, device, block_size: int) -> None:
        rows = []
        for template in templates:
            ids = tok.encode(template.format(noun=noun.word.strip()))[-block_size:]
            if not occurrences(noun.ids)(torch.tensor([ids])).any():
                raise NounLost(f"its tokens {list(noun.tokens)} are not in the prompt "
                               f"{template!r} as the model sees it (last {block_size} tokens)")
            rows.append(ids)
        T = max(map(len, rows))
        self.ids = torch.tensor([r + [0] * (T - len(r)) for r in rows], device=device)
        self.last = torch.tensor([len(r) - 1 for r in rows], device=device)

    def logits(self, model: nn.Module, steer: Intervention | None = None) -> torch.Tensor:
        """Next-token logits (B, V) after each prompt, float64."""
        h = model.hidden_states(self.ids) if steer is None else steer.hidden_states(model, self.ids)
        h = h[torch.arange(len(self.ids)), self.last]  # (B, d)
        return F.linear(h, model.wte.weight).double()


def bias_ratio(logits: torch.Tensor, pair: Sequence[int]) -> float:
    """Mean over rows of max(p(a)/p(b), p(b)/p(a)) from logits (B, V)."""
    return float(torch.exp((logits[:, pair[0]] - logits[:, pair[1]]).abs()).mean())


def fit_weight(bias_of_w, xatol: float = 1e-4) -> float:
    """Nelder-Mead from w = 1 on (bias ratio at w) + |1 - w| (the paper's fit), to ``xatol``
    in w."""
    result = minimize(lambda w: bias_of_w(float(w[0])) + abs(1.0 - float(w[0])), x0=[1.0],
                      method="Nelder-Mead", options={"xatol": xatol, "fatol": xatol / 100})
    return float(result.x[0])


def projected(model: nn.Module, noun: Word, pair: Sequence[int], w: float) -> Intervention:
    """The noun's input rows with (1 - w) of the gender direction E[she] - E[he] removed."""
    E = model.wte.weight.detach()
    g = E[pair[1]] - E[pair[0]]  # (d,)
    rows = {}
    for t in set(noun.ids):
        e = E[t]
        rows[t] = e - (1.0 - w) * (e @ g) / (g @ g) * g
    return Intervention(input_rows=rows)


@torch.no_grad()
def sense_gaps(model: nn.Module, prompts: Prompts, noun: Word, pair: Sequence[int]) -> torch.Tensor:
    """What each sense of the noun adds to each prompt's logit gap logit(he) - logit(she) at
    its last position: sum over the noun's positions j of
    alpha_l[last, j] ((E C(x_j)_l)[he] - (E C(x_j)_l)[she]), (B, k) float64. Removing sense l
    subtracts exactly this (the logits are linear in each sense)."""
    ids, rows = prompts.ids, torch.arange(len(prompts.ids))
    alpha = model.contextualization(ids)[rows, :, prompts.last].double()  # (B, k, T)
    E = model.wte.weight.double()
    gap = model.sense_vectors(ids).double() @ (E[pair[0]] - E[pair[1]])  # (B, T, k)
    T = ids.shape[1]
    at = occurrences(noun.ids)(ids) & (torch.arange(T, device=ids.device) <= prompts.last[:, None])
    return torch.einsum("bkt,btk,bt->bk", alpha, gap, at.double())


@torch.no_grad()
def find_gender_sense(model: nn.Module, tok, nouns: Sequence[Word], gset: GenderSet,
                      pair: Sequence[int]) -> tuple[int, list[float]]:
    """The sense whose removal most reduces the bias on the *fitting* prompts (never the test
    prompts): for each sense l, the mean over nouns of (before - after) / (before - 1), the
    bias ratio's reduction as steering.md defines it; returns l and every sense's score.
    (Reading the senses' top words alone, |(E C(noun)_l)[he] - (E C(noun)_l)[she]|, can pick a
    sense whose contextualization weight never reaches the predicted position.)"""
    per_noun = []
    for noun in nouns:
        try:
            fit = Prompts(tok, gset.fitting, noun, model.wte.weight.device, model.config.block_size)
        except NounLost:
            continue
        logits = fit.logits(model)
        g = logits[:, pair[0]] - logits[:, pair[1]]  # (B,)
        before = torch.exp(g.abs()).mean()
        after = torch.exp((g[:, None] - sense_gaps(model, fit, noun, pair)).abs()).mean(0)  # (k,)
        per_noun.append((before - after) / max(float(before) - 1, 1e-12))
    if not per_noun:
        return 0, [0.0] * model.config.n_senses
    scores = torch.stack(per_noun).mean(0)  # (k,)
    return int(scores.argmax()), [float(x) for x in scores]


def mean_prob(logits: torch.Tensor, token: int) -> float:
    return float(logits.log_softmax(-1)[:, token].exp().mean())


def off_target(before: torch.Tensor, after: torch.Tensor, skip: Sequence[int]) -> float:
    """Mean |log p_after - log p_before| over the vocabulary other than ``skip`` and over
    rows (steering.md's off-target measure)."""
    diff = (after.log_softmax(-1) - before.log_softmax(-1)).abs()
    keep = torch.ones(diff.shape[-1], dtype=torch.bool, device=diff.device)
    keep[list(skip)] = False
    return float(diff[:, keep].mean())


@torch.no_grad()
def measure_noun(model: nn.Module, tok, noun: Word, gset: GenderSet, pair: Sequence[int],
                 neutral: int | None, sense: int | None, projection: bool = True) -> dict:
    """Every measure of one noun (the ``nouns`` entries of the result); ``projection``: the
    projection baseline too (a Backpack without a sense gets it regardless)."""
    device = model.wte.weight.device
    T = model.config.block_size
    fit, test = Prompts(tok, gset.fitting, noun, device, T), Prompts(tok, gset.test, noun, device, T)
    row: dict = {"noun": noun.word, "tokens": list(noun.tokens)}
    test_1 = test.logits(model)
    row["bias_before"] = bias_ratio(test_1, pair)
    chosen = test_1  # the logits of the intervention the method picks, for p(they) and off-target
    if sense is not None:
        remove = Intervention.scaling(occurrences(noun.ids), sense, 0.0, model.config.n_senses)
        fit_1, fit_0, test_0 = fit.logits(model), fit.logits(model, remove), test.logits(model, remove)
        w = fit_weight(lambda w: bias_ratio(fit_0 + w * (fit_1 - fit_0), pair))
        chosen = test_0 + w * (test_1 - test_0)
        row.update(bias_remove=bias_ratio(test_0, pair), bias_optimize=bias_ratio(chosen, pair),
                   weight=w)
    if projection or sense is None:
        row["bias_project"] = bias_ratio(test.logits(model, projected(model, noun, pair, 0.0)), pair)
        # a forward pass per w: a fit to 1e-3 takes about half the passes of one to 1e-4
        w_p = fit_weight(lambda w: bias_ratio(fit.logits(model, projected(model, noun, pair, w)), pair),
                         xatol=1e-3)
        project_opt = test.logits(model, projected(model, noun, pair, w_p))
        row.update(bias_project_optimize=bias_ratio(project_opt, pair), weight_project=w_p)
        if sense is None:
            chosen = project_opt
    if neutral is not None:
        row.update(p_they_before=mean_prob(test_1, neutral), p_they_after=mean_prob(chosen, neutral))
    row["off_target"] = off_target(test_1, chosen, pair)
    return row


def reduction(before: float, after: float) -> float:
    """steering.md's reduction: (before - after) / (before - 1)."""
    return (before - after) / (before - 1) if before != 1 else 0.0


def check_sense(model: nn.Module, sense: int | None) -> None:
    """A UserError unless ``sense`` is None or a sense of ``model`` (a Backpack)."""
    if sense is None:
        return
    k = model.config.n_senses if has_senses(model) else 0
    if not 0 <= sense < k:
        raise UserError(f"--sense {sense}: " + (f"a sense in 0..{k - 1} (this model has {k})" if k
                        else "a Transformer has no senses; leave --sense out"))


def run_gender(model: nn.Module, tok, nouns: str = "gender_en", *, sense: int | None = None,
               single_token: bool = False, train_tokens: np.ndarray | None = None,
               projection: bool = True, progress: bool = True) -> dict:
    """The gender-bias protocol on ``model`` (eval mode) with the data file ``nouns``.
    ``sense``: the gender sense (None: found, for a Backpack; a Transformer gets the
    projection baseline only). ``projection``: the projection baseline on a Backpack too. ``train_tokens``: the model's training tokens, to count each
    pronoun in them. The result's names are issue 25's (``gender`` of the ``steering``
    section)."""
    gset = load_set(nouns)
    pair = pronoun_ids(tok, gset.pronouns)
    neutral = pronoun_ids(tok, [gset.neutral])[0] if gset.neutral else None
    backpack = has_senses(model)
    check_sense(model, sense)
    used, skipped = [], {}
    for text in gset.nouns:
        w = word(tok, text)
        if not w.usable:
            skipped[text] = w.skipped
        elif single_token and len(w.ids) > 1:
            skipped[text] = f"{len(w.ids)} tokens {list(w.tokens)} (--single_token)"
        else:
            used.append(w)
    result: dict = {"nouns_file": gset.path, "language": gset.language,
                    "pronouns": list(gset.pronouns), "neutral": gset.neutral}
    with torch.no_grad():
        if backpack and sense is None and used:
            sense, scores = find_gender_sense(model, tok, used, gset, pair)
            result.update(sense_found_by="the largest mean reduction of the bias ratio on the "
                          "fitting prompts when the sense is removed", sense_scores=scores)
            result["sense_score"] = scores[sense]
        elif backpack:
            result["sense_score"] = find_gender_sense(model, tok, used, gset, pair)[1][sense] if used else None
    result["sense"] = sense
    rows = []
    bar = progress_bar(len(used), "gender: nouns", "noun", progress)
    for noun in used:
        try:
            rows.append(measure_noun(model, tok, noun, gset, pair, neutral, sense, projection))
        except NounLost as exc:
            skipped[noun.word] = str(exc)
        bar.update(1)
    bar.close()
    result.update(skipped=skipped, nouns=rows,
                  single_token_nouns=[r["noun"] for r in rows if len(r["tokens"]) == 1])
    keys = ["bias_before", "bias_remove", "bias_optimize", "bias_project", "bias_project_optimize",
            "p_they_before", "p_they_after", "off_target"]
    result["mean"] = {key: float(np.mean([r[key] for r in rows])) for key in keys
                      if rows and key in rows[0]}
    mean = result["mean"]
    if "bias_remove" in mean:
        result["reduction_remove"] = reduction(mean["bias_before"], mean["bias_remove"])
        result["reduction_optimize"] = reduction(mean["bias_before"], mean["bias_optimize"])
    if "bias_project" in mean:
        result["reduction_project"] = reduction(mean["bias_before"], mean["bias_project"])
        result["reduction_project_optimize"] = reduction(mean["bias_before"], mean["bias_project_optimize"])
    if train_tokens is not None:
        ids = pair + ([neutral] if neutral is not None else [])
        words = list(gset.pronouns) + ([gset.neutral] if neutral is not None else [])
        counts = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=max(ids) + 1)
        result["pronoun_counts"] = {w: int(counts[i]) for w, i in zip(words, ids)}
    return result


def sweep(model: nn.Module, tok, noun: str, sense: int, nouns: str = "gender_en",
          weights: Sequence[float] = tuple(np.linspace(0, 1, 21))) -> dict:
    """The bias ratio on the test prompts as one noun's gender sense goes from 0 to 1 (the
    paper's Figure 3): {"noun", "sense", "weights", "bias"}."""
    gset = load_set(nouns)
    pair = pronoun_ids(tok, gset.pronouns)
    w = word(tok, noun)
    if not w.usable:
        raise UserError(f"noun {noun!r}: {w.skipped}")
    test = Prompts(tok, gset.test, w, model.wte.weight.device, model.config.block_size)
    remove = Intervention.scaling(occurrences(w.ids), sense, 0.0, model.config.n_senses)
    with torch.no_grad():
        one, zero = test.logits(model), test.logits(model, remove)
    return {"noun": noun, "sense": sense, "weights": [float(x) for x in weights],
            "bias": [bias_ratio(zero + x * (one - zero), pair) for x in weights]}
