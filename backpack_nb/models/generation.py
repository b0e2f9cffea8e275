"""Generation: the prompt runs once, then each new token costs one position.

:func:`decode` is the loop behind :meth:`LanguageModel.generate` and
:func:`backpack_nb.sampling.sample_text`: next-token logits from a *decoder*, one token picked
by :func:`next_tokens`, appended, and again. The decoders:

- :class:`TransformerDecoder`: one :class:`KVCache` per block, so a new token runs through
  the blocks alone, attending to the cached keys and values of the columns before it.
- :class:`BackpackDecoder`: the same cache for the contextualization network, plus the alpha
  heads' keys and the (unweighted) senses of every column. A token's senses depend on the
  token alone, so each distinct token's are computed once (:class:`SenseCache`); a new token
  then adds one row of alpha, over the context and itself.
- :class:`UncachedDecoder`: the whole context through the model for every token, as nanoGPT
  does. The reference the cached decoders are tested against (float64, to 1e-10).

Rows (prompts) of different lengths are left-padded: row b's tokens start at column
``starts[b]``, its positions count from 0 there, and no real position attends to padding, so
each row gets what it would get alone. The model sees at most ``block_size`` tokens, with
positions from 0, as the uncached model does on the cropped context. Positions are learned,
so once a row is longer than that every cached key changes at every step: from then on each
step recomputes the last ``block_size`` columns (exact, at the uncached cost; the Backpack
still reuses its senses).

A Backpack can be steered while it generates
(:class:`~backpack_nb.models.intervention.Intervention`): sense weights for every position,
recomputed from the tokens so far at every step, and edited sense blocks.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from backpack_nb.models.intervention import Intervention


class KVCache:
    """Keys and values of the columns seen so far, for one attention layer (or the Backpack's
    alpha keys and senses): buffers of ``capacity`` columns, allocated by the first
    :meth:`extend` after a :meth:`reset` (so they take the dtype autocast gives)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.length = 0
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def reset(self) -> None:
        self.length = 0

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append n columns, k (B, H, n, dk) and v (B, H, n, dv); return those of every column
        so far, (B, H, L, dk) and (B, H, L, dv)."""
        B, H, n = k.shape[:3]
        end = self.length + n
        if end > self.capacity:
            raise ValueError(f"{end} columns do not fit a cache of {self.capacity}")
        if self.length == 0 and not (self.k is not None and self.k.shape[:2] == (B, H)
                                     and self.k.dtype == k.dtype and self.k.device == k.device
                                     and self.v.dtype == v.dtype):
            self.k = k.new_empty(B, H, self.capacity, k.shape[-1])
            self.v = v.new_empty(B, H, self.capacity, v.shape[-1])
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


# -- decoders --------------------------------------------------------------------------------


class Decoder:
    """Next-token logits (B, V) of rows of token ids (B, W) that grow one column at a time:
    :meth:`start` with the prompts (row b's tokens from column ``starts[b]``), then
    :meth:`advance` after each appended column."""

    def __init__(self, model: nn.Module, intervention: Intervention | None = None) -> None:
        self.model = model
        self.block_size: int = model.config.block_size
        self.intervention = intervention
        self.starts: list[int] = []  # each row's first column
        self.offset = 0  # the first visible column

    def start(self, ids: torch.Tensor, starts: Sequence[int],
              max_new_tokens: int | None = None) -> torch.Tensor:
        """Logits after the prompts; ``max_new_tokens`` (if known) sizes the caches."""
        self.starts = list(starts)
        longest = ids.shape[1] - min(self.starts) + (max_new_tokens or self.block_size)
        self._new_caches(min(self.block_size, longest))
        return self._recompute(ids)

    def advance(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] - min(self.starts) <= self.block_size:  # every row still fits
            return self._run(ids, self.offset, 1)
        return self._recompute(ids)

    def _recompute(self, ids: torch.Tensor) -> torch.Tensor:
        """Every visible column: the last ``block_size`` (and none that is padding in every
        row), from an empty cache."""
        self.offset = max(min(self.starts), ids.shape[1] - self.block_size)
        self._reset()
        return self._run(ids, self.offset, ids.shape[1] - self.offset)

    def _new_caches(self, columns: int) -> None:
        """Caches for up to ``columns`` visible columns."""

    def _reset(self) -> None:
        """Empty the caches."""

    def _run(self, ids: torch.Tensor, offset: int, n: int) -> torch.Tensor:
        """Logits (B, V) after the last of the ``n`` new columns of ``ids[:, offset:]``."""
        raise NotImplementedError

    def _layout(self, offset: int, L: int, n: int, device: torch.device):
        """Positions of the last n of L visible columns ((n,), or (B, n) with padding), which
        columns each may attend ((B, 1, n, L) bool, None without padding) and which columns
        are each row's own ((B, L) bool, None without padding)."""
        cols = torch.arange(L - n, L, device=device)  # (n,)
        starts = [max(0, s - offset) for s in self.starts]
        if not any(starts):
            return cols, None, None
        first = torch.tensor(starts, device=device)[:, None]  # (B, 1)
        positions = (cols - first).clamp(min=0)  # (B, n): 0 at each row's first token
        keys = torch.arange(L, device=device)  # (L,)
        own = keys >= first  # (B, L)
        # a padding column attends to itself, so that its (unused) values stay finite
        mask = (keys <= cols[:, None]) & (own[:, None, :] | (keys == cols[:, None]))  # (B, n, L)
        return positions, mask[:, None], own


class TransformerDecoder(Decoder):
    """A GPT with one key/value cache per block."""

    def __init__(self, model: nn.Module, intervention: Intervention | None = None) -> None:
        if intervention is not None:
            intervention.check(model, generating=True)  # a Transformer has no senses
        super().__init__(model, intervention)

    def _new_caches(self, columns: int) -> None:
        self.cache = [KVCache(columns) for _ in self.model.transformer.h]

    def _reset(self) -> None:
        for kv in self.cache:
            kv.reset()

    def _run(self, ids: torch.Tensor, offset: int, n: int) -> torch.Tensor:
        m = self.model
        positions, mask, _ = self._layout(offset, ids.shape[1] - offset, n, ids.device)
        h = m.transformer(m.wte(ids[:, -n:]), positions=positions, cache=self.cache, mask=mask)
        return F.linear(h[:, -1], m.wte.weight)  # (B, d) -> (B, V)


class BackpackDecoder(TransformerDecoder):
    """A Backpack: the contextualization network's key/value caches, the alpha heads' keys
    and the senses of every visible column (unweighted: an intervention's weights, which may
    change at every step, enter alpha), and each distinct token's senses computed once.

    The new row of alpha weighs the senses of every visible column. Summed by position, that
    reads B k L d numbers; when the distinct tokens met so far (U) are no more than the
    columns (L), alpha is first summed per token (a token met twice is weighed once with the
    sum of its alphas) and the sum reads the k U d senses of the tokens instead: the same
    value, summed in another order."""

    sum_by: str = "auto"
    """``"token"``, ``"position"``, or ``"auto"``: by token when U <= L."""

    def _new_caches(self, columns: int) -> None:
        super()._new_caches(columns)
        self.alpha = KVCache(columns)  # alpha keys (B, k, L, d/k), senses (B, k, L, d)
        self.where: torch.Tensor | None = None  # (B, columns): each column's row of senses
        steer = self.intervention
        self.senses = SenseCache(self.model, steer.sense_blocks if steer else {})

    def _reset(self) -> None:
        super()._reset()
        self.alpha.reset()

    def _run(self, ids: torch.Tensor, offset: int, n: int) -> torch.Tensor:
        m, B, L = self.model, ids.shape[0], ids.shape[1] - offset
        positions, mask, own = self._layout(offset, L, n, ids.device)
        new = ids[:, -n:]  # (B, n)
        h = m.transformer(m.wte(new), positions=positions, cache=self.cache, mask=mask)
        q, key = m.alpha_heads(h)  # 2 x (B, k, n, d/k)
        where, senses = self.senses(new)  # (B, n), (B, k, n, d)
        keys, values = self.alpha.extend(key, senses)  # (B, k, L, d/k), (B, k, L, d)
        if self.where is None:
            self.where = where.new_empty(B, self.alpha.capacity)
        self.where[:, L - n:L] = where
        # one row of alpha: the last position's weights over every visible column
        scores = q[:, :, -1:] @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, k, 1, L)
        if own is not None:
            scores = scores.masked_fill(~own[:, None, None, :], float("-inf"))
        alpha = scores.softmax(dim=-1)[:, :, 0]  # (B, k, L)
        if self.intervention is not None:
            weights = self.intervention.weights(ids, self.starts, m.config.n_senses)  # (B, W, k)
            if weights is not None:
                alpha = alpha * weights[:, offset:].transpose(1, 2).to(alpha.dtype)
        U = self.senses.count
        if self.sum_by == "token" or (self.sum_by == "auto" and U <= L):
            columns = self.where[:, None, :L].expand(-1, alpha.shape[1], -1)  # (B, k, L)
            per_token = alpha.new_zeros(*alpha.shape[:2], U).scatter_add_(2, columns, alpha)
            o = (per_token.transpose(0, 1) @ self.senses.table()).sum(dim=0)  # (k, B, d) -> (B, d)
        else:
            o = (alpha[:, :, None] @ values).sum(dim=1)[:, 0]  # (B, k, 1, d) -> (B, d)
        return F.linear(o, m.wte.weight)  # (B, V)


class SenseCache:
    """C(x) of the tokens met so far, each computed once (edited blocks in place of the
    computed ones), stored sense-major: :meth:`table` (k, U, d)."""

    def __init__(self, model: nn.Module, blocks: Mapping[int, torch.Tensor]) -> None:
        self.model, self.blocks = model, blocks
        device = model.wte.weight.device
        self.slot = torch.full((model.config.vocab_size,), -1, dtype=torch.long, device=device)
        self.rows: torch.Tensor | None = None  # (k, capacity, d), the first `count` used
        self.count = 0

    @torch.compiler.disable  # data-dependent (which tokens are new): eager under torch.compile
    def __call__(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, n) -> their rows of the table (B, n) and senses (B, k, n, d)."""
        slots = self.slot[ids]  # (B, n)
        missing = slots < 0
        if missing.any():
            self._add(torch.unique(ids[missing]))
            slots = self.slot[ids]
        return slots, self.table()[:, slots].transpose(0, 1)  # (k, B, n, d) -> (B, k, n, d)

    def table(self) -> torch.Tensor:
        return self.rows[:, : self.count]  # (k, U, d)

    def _add(self, tokens: torch.Tensor) -> None:
        senses = self.model.senses_of_tokens(tokens)  # (u, k*d)
        for i, token in enumerate(tokens.tolist()):
            if token in self.blocks:
                senses[i] = self.blocks[token].reshape(-1).to(senses.dtype)
        k = self.model.config.n_senses
        senses = senses.view(len(tokens), k, -1).transpose(0, 1)  # (k, u, d)
        end = self.count + len(tokens)
        if self.rows is None:
            self.rows = senses.new_empty(k, max(64, end), senses.shape[-1])
        elif end > self.rows.shape[1]:  # grow by doubling: each sense is copied O(1) times
            grown = self.rows.new_empty(k, max(2 * self.rows.shape[1], end), self.rows.shape[-1])
            grown[:, : self.count] = self.table()
            self.rows = grown
        self.rows[:, self.count:end] = senses
        self.slot[tokens] = torch.arange(self.count, end, device=self.slot.device)
        self.count = end


class UncachedDecoder(Decoder):
    """The whole visible context of each row through the model at every step: the reference.
    Rows with prompts of different lengths run in groups of equal length."""

    def advance(self, ids: torch.Tensor) -> torch.Tensor:
        return self._recompute(ids)

    def _run(self, ids: torch.Tensor, offset: int, n: int) -> torch.Tensor:
        W = ids.shape[1]
        out = None
        for start in sorted(set(self.starts)):
            rows = [b for b, s in enumerate(self.starts) if s == start]
            context = ids[rows, max(start, W - self.block_size):]  # (G, <= block_size)
            logits = self._logits(ids[rows, start:], context)  # (G, V)
            if out is None:
                out = logits.new_empty(ids.shape[0], logits.shape[-1])
            out[rows] = logits
        return out

    def _logits(self, text: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Next-token logits (G, V) of the visible ``context`` (G, T), the end of ``text``."""
        steer = self.intervention
        if steer is None or steer.is_empty:
            return self.model(context)[0][:, -1]
        return F.linear(steer.hidden_states(self.model, context, text)[:, -1], self.model.wte.weight)


# -- choosing the next token -----------------------------------------------------------------


def next_tokens(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Logits (B, V) -> the next token of each row (B,). ``temperature`` 0: the most likely;
    else sampled from softmax(logits / temperature), among the ``top_k`` most likely and,
    of those, the smallest set whose probability reaches ``top_p`` (nucleus sampling, as
    ``transformers`` defines it), with ``generator`` (None: torch's global one)."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = ordered.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # the mass of the more likely tokens
        drop = torch.empty_like(before, dtype=torch.bool).scatter_(1, order, before >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))  # the most likely always stays
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]  # (B,)


_COMPILED: dict[type, Callable] = {}


def compiled(decoder: Decoder) -> Decoder:
    """``decoder`` with its step compiled by ``torch.compile``: one compiled function per
    decoder class, shared by every instance. The sizes that change at every step (the visible
    columns, the distinct tokens met) turn dynamic at their first change (torch's automatic
    dynamic shapes), so a generation compiles a handful of graphs once, not one per token; a
    new batch size or prompt length may add a few. The sense cache stays eager (which tokens
    are new is data-dependent)."""
    cls = type(decoder)
    if cls not in _COMPILED:
        _COMPILED[cls] = torch.compile(cls._run)
    decoder._run = functools.partial(_COMPILED[cls], decoder)
    return decoder


@torch.no_grad()
def decode(model: nn.Module, ids: torch.Tensor, max_new_tokens: int, *,
           starts: Sequence[int] | None = None, temperature: float = 1.0,
           top_k: int | None = None, top_p: float = 1.0,
           generator: torch.Generator | None = None, use_cache: bool = True,
           intervention: Intervention | None = None,
           until: Callable[[torch.Tensor], torch.Tensor] | None = None,
           compile: bool = False,
           ) -> tuple[torch.Tensor, list[int | None]]:
    """Append up to ``max_new_tokens`` tokens to ``ids`` (B, W) -> (ids (B, W + new), ends).

    ``starts``: where each row's tokens begin (left padding before; default 0). ``until``:
    ids so far (B, W') -> (B,) bool, True for rows that are done; a row's end (its length
    W' when it was first done, None if never) is in ``ends``, and generation stops when every
    row is done (the columns of rows done earlier are filler). ``use_cache=False`` runs the
    uncached reference. ``compile``: the cached step through ``torch.compile``
    (:func:`compiled`). The rest: :func:`next_tokens` and :class:`Intervention`.
    """
    starts = [0] * ids.shape[0] if starts is None else list(starts)
    if use_cache:
        decoder = model.decoder(intervention)
        if compile:
            decoder = compiled(decoder)
    else:
        if intervention is not None:
            intervention.check(model, generating=True)
        decoder = UncachedDecoder(model, intervention)
    ends: list[int | None] = [None] * ids.shape[0]
    logits = decoder.start(ids, starts, max_new_tokens)
    for step in range(max_new_tokens):
        token = next_tokens(logits, temperature, top_k, top_p, generator)  # (B,)
        ids = torch.cat((ids, token[:, None]), dim=1)
        if until is not None:
            for b in until(ids).nonzero().flatten().tolist():
                ends[b] = ends[b] or ids.shape[1]
            if all(ends):
                break
        if step + 1 < max_new_tokens:
            logits = decoder.advance(ids)
    return ids, ends
