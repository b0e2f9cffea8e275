"""Topic control (Hewitt et al., ACL 2023, §6.1 and Appendix D.1): steer a Backpack toward a
topic by scaling up the senses that promote the topic's bag of words, annealed back toward 1
as the topic appears in the text (``../shared/design/steering.md`` section 2).

Read in this order: :func:`read_bags` and :func:`bag_tokens` (a bag's words and the tokens it
is steered on), :func:`sense_scores` (how much each sense of each token promotes the bag),
:func:`bands` and :data:`STRENGTHS` (the weights by score quantile), :func:`annealed_intervention`
(the weights during generation), the metrics (:func:`bag_share`, :func:`distinct_2`,
:func:`fluency_loss`), :func:`run_topic` (the protocol, one JSON-able dict) and
:func:`strength_figure`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn
from matplotlib.figure import Figure

from ..console import progress_bar
from ..errors import UserError
from ..models.generation import SenseCache, decode
from ..models.intervention import Intervention, has_senses
from ..plots import MIN_FONT_PT, figure_legend
from .words import read_data, word

QUANTILES = (0.6, 0.8, 0.95)
"""The score quantiles that split the (token, sense) pairs into the four bands."""

STRENGTHS: dict[int, tuple[float, float, float, float]] = {
    0: (1.0, 1.0, 1.0, 1.0),
    1: (1.0, 1.3, 1.5, 1.5),
    2: (1.0, 1.5, 2.2, 2.2),
    3: (1.0, 3.0, 3.3, 3.3),
}
"""Strength -> the weight delta of each band, indexed by band (0: < q60, 1: q60..q80,
2: q80..q95, 3: > q95). The paper lists them top band first: strength 1 is (1.5, 1.5, 1.3, 1)."""

PAPER_SAMPLES, PAPER_TOKENS = 500, 100  # per topic and strength; tokens per sample
CHUNK_BYTES = 256 * 2**20  # one chunk of sense logits (n, k, V)

Scorer = Callable[[list[str], str], float]


# -- the bags --------------------------------------------------------------------------------


def read_bags(name_or_path: str, flag: str = "bags") -> dict[str, list[str]]:
    """The bags of a topics file (``topics_paper``, ``topics_europarl`` or a path): a mapping
    ``bags`` of topic -> a list of words, or -> language -> a list of words (flattened in
    order, each word once)."""
    data = read_data(name_or_path, flag, {"bags": dict})
    bags: dict[str, list[str]] = {}
    for name, words in data["bags"].items():
        lists = list(words.values()) if isinstance(words, dict) else [words]
        if not lists or not all(isinstance(ws, list) and ws and all(isinstance(w, str) and w.strip()
                                                                    for w in ws) for ws in lists):
            raise UserError(f"{flag} {data['path']}: bag {name!r} must be a non-empty list of words, "
                            "or a mapping of languages to such lists")
        bags[str(name)] = list(dict.fromkeys(w.strip() for ws in lists for w in ws))
    if not bags:
        raise UserError(f"{flag} {data['path']}: 'bags' is empty; give at least one topic")
    return bags


def bag_tokens(tok, words: Sequence[str]) -> tuple[list[int], dict[str, str]]:
    """The token ids of the bag's words that are one real token with a leading space (each
    id once), and the skipped words -> why (``"3 tokens"``, or not in the vocabulary)."""
    ids: list[int] = []
    skipped: dict[str, str] = {}
    for text in words:
        w = word(tok, text)
        if not w.usable:
            skipped[text] = w.skipped
        elif len(w.ids) != 1:
            skipped[text] = f"{len(w.ids)} tokens"
        elif w.ids[0] not in ids:
            ids.append(w.ids[0])
    return ids, skipped


# -- scores and bands ------------------------------------------------------------------------


def _chunks(model: nn.Module, chunk: int | None, desc: str, progress: bool):
    """Token ids (n,) of consecutive chunks of the vocabulary, sized so that their sense
    logits (n, k, V) take about :data:`CHUNK_BYTES`, with a progress display."""
    c = model.config
    itemsize = model.wte.weight.element_size()
    if chunk is not None:
        _check_counts(chunk=chunk)
    n = chunk or max(1, CHUNK_BYTES // (c.n_senses * c.vocab_size * itemsize))
    bar = progress_bar(c.vocab_size, desc, "token", progress)
    try:
        for start in range(0, c.vocab_size, n):
            ids = torch.arange(start, min(start + n, c.vocab_size), device=model.wte.weight.device)
            yield ids
            bar.update(len(ids))
    finally:
        bar.close()


def _eval_no_grad(fn):
    """Run ``fn(model, ...)`` in eval mode without gradients, the model's mode restored."""
    @functools.wraps(fn)
    def wrapped(model, *args, **kwargs):
        training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return fn(model, *args, **kwargs)
        finally:
            model.train(training)
    return wrapped


@_eval_no_grad
def sense_maxima(model: nn.Module, chunk: int | None = None, progress: bool = True) -> torch.Tensor:
    """max over the vocabulary of E C(x)_l for every token x and sense l -> (V, k), in the
    model's dtype: the expensive part of :func:`sense_scores` (V k d V multiply-adds), the
    same for every bag, so compute it once for many bags."""
    out = []
    for ids in _chunks(model, chunk, "sense maxima", progress):
        out.append(model.sense_logits(ids).amax(dim=-1))  # (n, k, V) -> (n, k)
    return torch.cat(out)  # (V, k)


@_eval_no_grad
def sense_scores(model: nn.Module, bag_ids: Sequence[int], chunk: int | None = None,
                 progress: bool = True, maxima: torch.Tensor | None = None) -> torch.Tensor:
    """s(x, l) = b . (E C(x)_l) / max(E C(x)_l) -> (V, k) float32, b the 0/1 indicator of
    ``bag_ids`` over the vocabulary. Chunked over the vocabulary (``chunk`` tokens at a time;
    None: about 256 MB of sense logits), never the whole (V, k, V). ``maxima``: the
    denominators from :func:`sense_maxima`, so that only the cheap numerators are computed."""
    bag = torch.tensor(sorted(set(bag_ids)), dtype=torch.long, device=model.wte.weight.device)
    if len(bag) == 0:
        raise UserError("a bag needs at least one token to score senses against")
    k = model.config.n_senses
    out = []
    if maxima is not None:
        b_E = model.wte.weight[bag].sum(dim=0)  # b . E (d,): b . (E C) = C . (b . E)
        for ids in _chunks(model, chunk, "sense scores", progress):
            senses = model.senses_of_tokens(ids).view(len(ids), k, -1)  # (n, k, d)
            out.append(senses @ b_E / maxima[ids].to(senses))  # (n, k)
    else:
        for ids in _chunks(model, chunk, "sense scores", progress):
            logits = model.sense_logits(ids)  # (n, k, V)
            out.append(logits[..., bag].sum(dim=-1) / logits.amax(dim=-1))  # (n, k)
    return torch.cat(out).float()  # (V, k)


def bands(scores: torch.Tensor) -> tuple[dict[float, float], torch.Tensor]:
    """The thresholds {0.6, 0.8, 0.95 -> the quantile of all scores} and each (token, sense)
    pair's band (V, k): 0 (< q60), 1 (q60..q80), 2 (q80..q95), 3 (> q95); a score equal to a
    threshold goes to the band above it."""
    values = np.quantile(scores.detach().double().cpu().numpy().ravel(), QUANTILES)
    thresholds = {q: float(v) for q, v in zip(QUANTILES, values)}
    edges = torch.tensor(values, dtype=torch.float64, device=scores.device)
    return thresholds, torch.bucketize(scores.double(), edges, right=True)  # (V, k)


def strength_delta(band: torch.Tensor, strength: int) -> torch.Tensor:
    """The weight delta (V, k) float64 of every (token, sense) pair at ``strength``."""
    _check_strengths([strength])
    return torch.tensor(STRENGTHS[strength], dtype=torch.float64, device=band.device)[band]


# -- annealed weights ------------------------------------------------------------------------


class AnnealedWeights:
    """The sense weights of steering.md step 3, as a function of the text so far (G, T):
    for sense l at position j (0 at the row's first token),
    a = sum over positions m of the text of max((E C(x_j)_l)[x_m], 0),
    b = sigmoid(-f a + 6) (1 + j / 100), f = max(delta) / 7.5, and the weight
    b delta[x_j, l] + (1 - b), computed as 1 + b (delta - 1) (exactly 1 where delta is 1).

    Generation calls it with the text grown by a column each step: a is kept for the last
    few texts and only the new columns' terms are added (each distinct token's senses C(x)
    are computed once; (E C(x)_l)[x_m] is C(x)_l . E[x_m], never a whole row of V logits)."""

    keep = 4  # texts remembered: one per group of rows of equal prompt length

    def __init__(self, model: nn.Module, delta: torch.Tensor) -> None:
        V, k = model.config.vocab_size, model.config.n_senses
        if tuple(delta.shape) != (V, k):
            raise UserError(f"delta must have one weight per token and sense, ({V}, {k}); got "
                            f"{tuple(delta.shape)}")
        self.model = model
        self.delta = delta.to(device=model.wte.weight.device, dtype=torch.float64)  # (V, k)
        self.f = float(self.delta.max()) / 7.5
        self.senses = SenseCache(model, {})
        self.texts: list[tuple[torch.Tensor, torch.Tensor]] = []  # (ids (G, T), a (G, T, k))

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        a = self.topic_mass(ids)  # (G, T, k)
        j = torch.arange(ids.shape[1], dtype=torch.float64, device=ids.device)
        b = torch.sigmoid(-self.f * a + 6) * (1 + j / 100)[None, :, None]
        return 1 + b * (self.delta[ids] - 1)  # (G, T, k)

    def topic_mass(self, ids: torch.Tensor) -> torch.Tensor:
        """a (G, T, k) float64 of every position and sense of the texts ``ids`` (G, T)."""
        G, T = ids.shape
        for i, (old, a_old) in enumerate(self.texts):
            if old.shape[0] == G and old.shape[1] <= T and torch.equal(ids[:, :old.shape[1]], old):
                del self.texts[i]
                break
        else:
            old, a_old = ids[:, :0], None
        t = old.shape[1]
        _, C = self.senses(ids)  # (G, k, T, d)
        E = self.model.wte.weight[ids].transpose(1, 2)[:, None]  # (G, 1, d, T)
        new = (C[:, :, t:] @ E).clamp(min=0).sum(dim=-1)  # new positions, every m: (G, k, T - t)
        a = new.transpose(1, 2).double()  # (G, T - t, k)
        if t:
            more = (C[:, :, :t] @ E[..., t:]).clamp(min=0).sum(dim=-1)  # old positions, new m
            a = torch.cat((a_old + more.transpose(1, 2).double(), a), dim=1)
        self.texts = [*self.texts[-(self.keep - 1):], (ids.clone(), a)]
        return a


def annealed_intervention(model: nn.Module, delta: torch.Tensor) -> Intervention:
    """An :class:`Intervention` that scales every sense of every token by its ``delta``
    (V, k), annealed toward 1 as the topic appears (:class:`AnnealedWeights`)."""
    if not has_senses(model):
        raise UserError("topic control scales senses: it needs a Backpack, not a Transformer")
    return Intervention(sense_weights=AnnealedWeights(model, delta))


# -- metrics ---------------------------------------------------------------------------------


def _rows(samples) -> list[list[int]]:
    return samples.tolist() if isinstance(samples, torch.Tensor) else [list(s) for s in samples]


def bag_share(samples, bag_ids: Sequence[int]) -> float:
    """The share of the generated tokens (``samples``: rows of token ids, generated tokens
    only) that are bag tokens (the paper's Toks-in-vocab)."""
    rows, bag = _rows(samples), set(bag_ids)
    total = sum(len(r) for r in rows)
    return sum(t in bag for r in rows for t in r) / total if total else 0.0


def distinct_2(samples) -> float:
    """Distinct bigrams / bigrams, over all samples together (bigrams within a sample)."""
    pairs = [pair for r in _rows(samples) for pair in zip(r, r[1:])]
    return len(set(pairs)) / len(pairs) if pairs else 0.0


@_eval_no_grad
def fluency_loss(model: nn.Module, samples, prompt_len: int, batch_size: int = 32) -> float:
    """The unmodified model's mean cross-entropy (nats per token) on the generated tokens of
    ``samples`` (N, W): prompt (``prompt_len`` columns), then generated tokens. Each token is
    predicted from at most the last ``block_size`` tokens before it, as generation saw it."""
    ids = torch.as_tensor(samples, dtype=torch.long, device=model.wte.weight.device)  # (N, W)
    W, block = ids.shape[1], model.config.block_size
    if not 1 <= prompt_len < W:
        raise UserError(f"prompt_len must be in 1..{W - 1} for samples of {W} tokens, got {prompt_len}")
    total, count = 0.0, 0
    for rows in ids.split(batch_size):
        head = rows[:, :block]  # targets 1..block-1 in one pass
        targets = head[:, 1:].clone()
        targets[:, :prompt_len - 1] = -100
        if (targets != -100).any():
            n = int((targets != -100).sum())
            total += float(model(head[:, :-1], targets)[1]) * n
            count += n
        for t in range(max(block, prompt_len), W):  # past the block: one window per target
            logits = model(rows[:, t - block:t])[0][:, -1]  # (b, V)
            total += float(torch.nn.functional.cross_entropy(logits.double(), rows[:, t], reduction="sum"))
            count += len(rows)
    return total / count


# -- the protocol ----------------------------------------------------------------------------


def _check_strengths(strengths: Sequence[int]) -> None:
    for s in strengths:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s not in STRENGTHS:
            raise UserError(f"strengths: {s!r} is not one of {', '.join(map(str, STRENGTHS))}")


def _check_counts(**counts: int) -> None:
    for name, n in counts.items():
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise UserError(f"{name} must be a whole number >= 1, got {n!r}")


def _generate(model: nn.Module, prompt: list[int], n: int, new: int, batch_size: int, seed: int,
              steer: Intervention | None, desc: str, progress: bool) -> torch.Tensor:
    """``n`` samples (n, P + new) after ``prompt``, ancestral sampling, one generator per call."""
    device = model.wte.weight.device
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    bar = progress_bar(n, desc, "sample", progress)
    try:
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            ids = torch.tensor([prompt] * b, dtype=torch.long, device=device)
            out.append(decode(model, ids, new, temperature=1.0, top_k=None, generator=gen,
                              intervention=steer)[0])
            bar.update(b)
    finally:
        bar.close()
    return torch.cat(out)


def run_topic(model: nn.Module, tok, bags: str = "topics_paper", topics: Sequence[str] | None = None,
              strengths: Sequence[int] = (0, 1, 2, 3), n_samples: int = PAPER_SAMPLES,
              max_new_tokens: int = PAPER_TOKENS, prompt: str | None = None, seed: int = 1337,
              batch_size: int = 25, device: str | torch.device | None = None,
              progress: bool = True, scorers: Mapping[str, Scorer] | None = None) -> dict:
    """The topic-control protocol on a Backpack -> the issue's ``topic`` JSON section.

    For each bag of the topics file ``bags`` (``topics``: the names to run, None all): its
    tokens (:func:`bag_tokens`), the sense scores and bands, then ``n_samples`` samples of
    ``max_new_tokens`` tokens at each of ``strengths``, after ``prompt`` (None: unconditional,
    from the end-of-text token), plain ancestral sampling (temperature 1, no top-k) with a
    generator seeded with ``seed`` for every bag and strength (so strength 0 draws the same
    samples for every bag). Generation runs ``batch_size`` rows at a time on ``device``
    (None: where the model is; else the model is moved there). Strength 0 weighs every sense
    1, so it generates exactly what the unsteered model does and runs without the hook.

    ``scorers``: name -> ``fn(texts, topic) -> float``, the place for the paper's topic
    classifier (``cardiffnlp/tweet-topic-21-multi``: the share of ``texts``, the decoded
    generated parts, assigned ``topic``) or MAUVE against held-out text; each result goes in
    the strength's ``scores``. None are needed: the built-in metrics are offline.
    """
    _check_strengths(strengths)
    _check_counts(n_samples=n_samples, max_new_tokens=max_new_tokens, batch_size=batch_size)
    if not has_senses(model):
        raise UserError("topic control scales senses: it needs a Backpack, not a Transformer")
    if prompt is None:
        if tok.eot_id is None:
            raise UserError("prompt: the vocabulary has no end-of-text token to start unconditional "
                            "samples from; give a prompt")
        prompt_ids = [tok.eot_id]
    else:
        prompt_ids = tok.encode(prompt)
        if not prompt_ids:
            raise UserError("prompt: empty; give some text, or None for unconditional samples")
    all_bags = read_bags(bags)
    names = list(all_bags) if topics is None else list(dict.fromkeys(topics))
    unknown = [t for t in names if t not in all_bags]
    if unknown:
        raise UserError(f"topics: {', '.join(map(repr, unknown))} not in {bags} (it has "
                        f"{', '.join(all_bags)})")
    if device is not None and model.wte.weight.device != torch.device(device):
        model.to(device)
    training = model.training
    model.eval()
    result: dict = {"bags_file": bags, "prompt": prompt, "max_new_tokens": max_new_tokens,
                    "seed": seed, "bags": {}}
    maxima = None
    try:
        for name in names:
            ids, skipped = bag_tokens(tok, all_bags[name])
            entry: dict = {"words": all_bags[name], "tokens": [tok.token_str(i) for i in ids],
                           "token_ids": ids, "skipped": skipped}
            result["bags"][name] = entry
            if not ids:
                entry.update(thresholds=None, strengths={},
                             note="no word of this bag is one real token of the vocabulary (with "
                                  "a leading space), so no sense can be scored against it")
                continue
            if maxima is None:
                maxima = sense_maxima(model, progress=progress)
            thresholds, band = bands(sense_scores(model, ids, maxima=maxima, progress=False))
            entry["thresholds"] = {str(q): v for q, v in thresholds.items()}
            entry["strengths"] = {}
            for s in sorted(set(int(s) for s in strengths)):
                steer = None if s == 0 else annealed_intervention(model, strength_delta(band, s))
                samples = _generate(model, prompt_ids, n_samples, max_new_tokens, batch_size,
                                    seed, steer, f"{name} strength {s}", progress)
                generated = samples[:, len(prompt_ids):]
                texts = [tok.decode(row) for row in generated.tolist()]
                entry["strengths"][str(s)] = out = {
                    "bag_share": bag_share(generated, ids),
                    "fluency_loss": fluency_loss(model, samples, len(prompt_ids), batch_size),
                    "distinct_2": distinct_2(generated),
                    "n_samples": n_samples,
                    "examples": texts[:5],
                }
                if scorers:
                    out["scores"] = {key: float(fn(texts, name)) for key, fn in scorers.items()}
    finally:
        model.train(training)
    return result


def strength_figure(result: Mapping) -> Figure:
    """Bag share (%) and fluency loss against strength, one line per bag, from
    :func:`run_topic`'s result (bags without strengths left out)."""
    fig, (share_ax, loss_ax) = plt.subplots(1, 2, figsize=(9.0, 3.8), layout="constrained")
    handles, labels = [], []
    for i, (name, bag) in enumerate(result["bags"].items()):
        runs = sorted(bag.get("strengths", {}).items(), key=lambda kv: int(kv[0]))
        if not runs:
            continue
        xs = [int(s) for s, _ in runs]
        style = dict(color=f"C{i % 10}", ls=("-", "--", ":")[i // 10 % 3], marker="o", ms=3)
        line, = share_ax.plot(xs, [100 * r["bag_share"] for _, r in runs], **style)
        loss_ax.plot(xs, [r["fluency_loss"] for _, r in runs], **style)
        handles.append(line)
        labels.append(name)
    for ax, ylabel in ((share_ax, "bag tokens among generated (%)"),
                       (loss_ax, "fluency: unsteered loss (nats/token)")):
        ax.set_xlabel("strength")
        ax.set_ylabel(ylabel)
        ax.set_xticks(sorted(STRENGTHS))
        ax.tick_params(labelsize=MIN_FONT_PT)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Topic control ({result.get('bags_file', '')})", fontsize=11)
    if handles:
        figure_legend(fig, handles, labels)
    return fig
