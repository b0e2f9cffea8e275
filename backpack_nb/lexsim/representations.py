"""Word representations and how often words occur in the training data.

Every representation is a named *method*; :func:`word_vectors` gives each word one unit
vector per method:

- ``embedding``: the word's row of the tied input embedding E (both models);
- ``random``: the same lookup in a random Gaussian matrix over the same tokens (chance);
- ``sense_0`` .. ``sense_{k-1}``: one Backpack sense vector C(x)_l alone;
- ``sense_mean``: the mean of the k sense vectors.

A word is looked up in its mid-sentence form (leading space); a word of several tokens (or a
phrase, ``papier peint``) is the mean over its tokens.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..senses import _unwrap, word_token_ids
from ..tokenizer import Tokenizer


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


def has_senses(model: nn.Module) -> bool:
    """Whether the model has Backpack sense vectors (a Transformer has none)."""
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
def word_vectors(model: nn.Module, tok: Tokenizer, words: Sequence[str], *, random_seed: int = 0,
                 chunk: int = 2048) -> WordVectors:
    """Every method's vector of every word (mid-sentence form; mean over a word's tokens),
    normalised to unit length. The ``random`` control draws one Gaussian vector per distinct
    token (seeded, in token-id order), so it sees the same tokenization as the model."""
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
    """The ``sense_l`` methods among ``methods``, in sense order."""
    return sorted((m for m in methods if re.fullmatch(r"sense_\d+", m)), key=lambda m: int(m.split("_")[1]))

