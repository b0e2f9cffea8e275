"""Steering a model by editing what it computes, in one object (:class:`Intervention`).

For a Backpack (see ``../shared/design/steering.md``): weights on the senses of every
position, from per-token weights or a function of the text so far, and per-token
replacements of the k x d sense block. Since the logits are linear in each C(x_j)_l,
scaling sense l of the token at position j by w changes position i's logits by exactly
(w - 1) alpha_l[i, j] E C(x_j)_l. For any model (the paper's projection baseline): edited
*input* embedding rows, the output head left as it was (untied for the edit).

The same object serves a forward pass (:meth:`Intervention.logits`, so a held-out loss can
be measured with it), the next-token distribution, and generation
(:func:`~backpack_nb.models.generation.decode` calls :meth:`Intervention.weights` at every
step). No intervention, or weights of 1 everywhere, gives exactly what no intervention does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from backpack_nb.errors import UserError
from backpack_nb.models.mixing import Senses, weighted_sum_of_senses


def has_senses(model: nn.Module) -> bool:
    """A Backpack (a model with sense vectors), not a Transformer."""
    return hasattr(model, "senses_of_tokens")


@dataclass(frozen=True)
class Intervention:
    """How to steer a model; every part is optional.

    ``sense_weights``: token ids so far (G, T), prompt and generated, -> weights (G, T, k):
    sense l of the token at position j enters every output with its alpha times
    ``weights[g, j, l]``. In generation it is called at every step with the whole text so
    far, so the weights of past positions may change as the text grows; rows of a batch
    whose prompts have different lengths are passed in groups of equal length. Past
    ``block_size`` the model uses the weights of the positions it sees (the last
    ``block_size``).

    ``token_weights``: token id -> (k,) weights of that token's senses wherever it occurs
    (multiplied with ``sense_weights`` where both are given).

    ``sense_blocks``: token id -> a (k, d) block that replaces that token's senses C(x)
    wherever it occurs (knowledge editing).

    ``input_rows``: token id -> a (d,) row that replaces that token's *input* embedding (the
    output head keeps E): the projection baseline, for any model. Not in generation.
    """

    sense_weights: Callable[[torch.Tensor], torch.Tensor] | None = None
    token_weights: Mapping[int, torch.Tensor | Sequence[float]] = field(default_factory=dict)
    sense_blocks: Mapping[int, torch.Tensor] = field(default_factory=dict)
    input_rows: Mapping[int, torch.Tensor] = field(default_factory=dict)

    @staticmethod
    def scaling(positions: Callable[[torch.Tensor], torch.Tensor], sense: int | Sequence[int],
                factor: float, k: int) -> "Intervention":
        """Sense(s) ``sense`` scaled by ``factor`` at the positions ``positions`` marks: a
        function of token ids (G, T) -> (G, T) bool (see :func:`occurrences`)."""
        senses = [sense] if isinstance(sense, int) else list(sense)

        def weights(ids: torch.Tensor) -> torch.Tensor:
            out = torch.ones(*ids.shape, k, dtype=torch.float64, device=ids.device)
            hit = positions(ids)[..., None]  # (G, T, 1)
            scaled = torch.tensor(float(factor), dtype=torch.float64, device=ids.device)
            out[..., senses] = torch.where(hit, scaled, out[..., senses])
            return out

        return Intervention(sense_weights=weights)

    @property
    def steers_senses(self) -> bool:
        return self.sense_weights is not None or bool(self.token_weights) or bool(self.sense_blocks)

    @property
    def is_empty(self) -> bool:
        return not self.steers_senses and not self.input_rows

    def check(self, model: nn.Module, generating: bool = False) -> None:
        """A UserError unless ``model`` is one these edits fit (sense edits need a Backpack;
        ``generating``: input-row edits are refused)."""
        if self.steers_senses and not has_senses(model):
            raise UserError("sense interventions need a Backpack: a Transformer has no senses "
                            "(Intervention.input_rows edits its input embedding instead)")
        if generating and self.input_rows:
            raise UserError("Intervention.input_rows applies to forward passes and next-token "
                            "distributions (Intervention.logits), not to generation")
        c = model.config
        k, d, V = getattr(c, "n_senses", 0), c.n_embd, c.vocab_size
        if self.sense_weights is not None and not callable(self.sense_weights):
            raise UserError("Intervention.sense_weights must be a function of the token ids "
                            f"(B, T) returning weights (B, T, {k}), got {self.sense_weights!r}")
        for name, table, shape in (("token_weights", self.token_weights, (k,)),
                                   ("sense_blocks", self.sense_blocks, (k, d)),
                                   ("input_rows", self.input_rows, (d,))):
            for token, value in table.items():
                if not (isinstance(token, int) and 0 <= token < V):
                    raise UserError(f"Intervention.{name}: token id {token!r} is not in 0..{V - 1}")
                got = tuple(torch.as_tensor(value).shape) if isinstance(value, (torch.Tensor, list, tuple)) \
                    else type(value).__name__
                if got != shape:
                    raise UserError(f"Intervention.{name}[{token}] must be a {shape} tensor, got {got}")

    def weights(self, ids: torch.Tensor, starts: Sequence[int], k: int) -> torch.Tensor | None:
        """The weights (B, W, k) of every column of ``ids`` (B, W), whose row b starts at
        column ``starts[b]`` (ones on the padding), float64; None when no part weighs senses."""
        if self.sense_weights is None and not self.token_weights:
            return None
        if not any(starts):
            return self._call(ids, k)
        out = torch.ones(*ids.shape, k, dtype=torch.float64, device=ids.device)  # (B, W, k)
        for start in sorted(set(starts)):
            rows = torch.tensor([b for b, s in enumerate(starts) if s == start], device=ids.device)
            out[rows, start:] = self._call(ids[rows, start:], k)
        return out

    def _call(self, ids: torch.Tensor, k: int) -> torch.Tensor:
        if self.sense_weights is None:
            w = torch.ones(*ids.shape, k, dtype=torch.float64, device=ids.device)
        else:
            w = self.sense_weights(ids)
            if not isinstance(w, torch.Tensor) or tuple(w.shape) != (*ids.shape, k):
                got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
                raise UserError(f"Intervention.sense_weights returned {got} for token ids of shape "
                                f"{tuple(ids.shape)}: it must return one weight per sense, "
                                f"{(*ids.shape, k)}")
            w = w.to(device=ids.device, dtype=torch.float64)
        for token, tw in self.token_weights.items():
            tw = torch.as_tensor(tw, dtype=torch.float64, device=ids.device)
            w = torch.where((ids == token)[..., None], w * tw, w)
        return w

    # -- a forward pass with the edits --------------------------------------------------------

    def hidden_states(self, model: nn.Module, idx: torch.Tensor,
                      text: torch.Tensor | None = None) -> torch.Tensor:
        """The vectors h (B, T, d) whose products with the output embedding E are the logits,
        computed with the edits: the model's own computation
        (:meth:`~backpack_nb.models.BackpackLM.hidden_states`) on edited inputs and senses.
        Without edits (or with weights that are all 1) it *is* the model's own. ``text``:
        the whole text (B, W) whose last T columns ``idx`` is, when the sense weights are a
        function of more than the model sees."""
        self.check(model)
        text = idx if text is None else text
        weights = self.weights(text, [0] * len(text), getattr(model.config, "n_senses", 1))
        if weights is not None:
            weights = weights[:, text.shape[1] - idx.shape[1]:]
        if weights is not None and bool((weights == 1).all()):
            weights = None
        if weights is None and not self.sense_blocks and not self.input_rows:
            return model.hidden_states(idx)
        emb = model.wte(idx)  # (B, T, d)
        for token, row in self.input_rows.items():
            emb = torch.where((idx == token)[..., None], torch.as_tensor(row).to(emb), emb)
        h = model.transformer(emb)
        if not has_senses(model):
            return h
        B, T = idx.shape
        if self.input_rows and model.config.sense_source == "network":
            senses = model.sense_network(emb.reshape(B * T, -1)).view(B, T, model.config.n_senses, -1)
        else:
            senses = model.sense_vectors(idx)  # (B, T, k, d), as the model computes them
        for token, block in self.sense_blocks.items():
            senses = torch.where((idx == token)[..., None, None], block.to(senses), senses)
        if weights is not None:
            senses = senses * weights.to(senses.dtype)[..., None]  # (B, T, k, 1)
        q, key = model.alpha_heads(h)  # 2 x (B, k, T, d/k)
        flat = Senses(senses.reshape(B * T, -1), None, tuple(senses.shape))
        return weighted_sum_of_senses(q, key, flat, model.mixing)  # (B, T, d)

    def logits(self, model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) of every position of ``idx`` (B, T) with the edits."""
        return F.linear(self.hidden_states(model, idx), model.wte.weight)

    def next_token_logits(self, model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) of the token after ``idx`` (B, T) with the edits."""
        return F.linear(self.hidden_states(model, idx)[:, -1], model.wte.weight)


def occurrences(pattern: Sequence[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A positions function for :meth:`Intervention.scaling`: token ids (G, T) -> (G, T)
    bool, True at every token of every occurrence of the token sequence ``pattern``."""
    pattern = list(pattern)
    n = len(pattern)

    def hits(ids: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(ids, dtype=torch.bool)
        if n == 0 or ids.shape[-1] < n:
            return out
        want = torch.tensor(pattern, device=ids.device)
        windows = ids.unfold(-1, n, 1)  # (G, T - n + 1, n)
        start = (windows == want).all(-1)  # (G, T - n + 1)
        for offset in range(n):
            out[..., offset:offset + start.shape[-1]] |= start
        return out

    return hits
