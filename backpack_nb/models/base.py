"""What every language model here has in common: a tied head, the loss, sampling, counting.

A subclass supplies :meth:`LanguageModel.hidden_states` (the final (B, T, d) vectors whose
dot products with the embedding E are the logits), :meth:`LanguageModel.parameter_parts`
(named groups of modules, for the parameter table) and :meth:`LanguageModel.decoder` (its
cached generation, :mod:`backpack_nb.models.generation`). The rest is shared.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from backpack_nb.model_config import ModelConfig
from backpack_nb.models.generation import Decoder, Intervention, decode
from backpack_nb.models.loss import LOSS_CHUNK_ROWS, full_logits_cross_entropy, linear_cross_entropy
from backpack_nb.models.mixing import Distinct


class LanguageModel(nn.Module):
    """Base of :class:`~backpack_nb.models.GPT` and :class:`~backpack_nb.models.BackpackLM`."""

    config: ModelConfig
    wte: nn.Embedding  # E (V x d): input embedding and, tied, the output head

    # A performance switch, not part of the model (see BackpackLM's for the others).
    fused_loss: bool = False
    """Compute each chunk of the training loss's softmax and logit gradient in one compiled
    function (:func:`~backpack_nb.models.loss.linear_cross_entropy`'s ``fused``)."""

    def hidden_states(self, idx: torch.Tensor, distinct: Distinct | None = None) -> torch.Tensor:
        """(B, T) token ids -> (B, T, d) vectors h with ``logits = h @ E.T``. ``distinct``:
        the batch's distinct tokens, computed ahead (see :meth:`forward`)."""
        raise NotImplementedError

    def parameter_parts(self) -> dict[str, list[nn.Module]]:
        """Named groups of submodules, in display order, covering every parameter."""
        raise NotImplementedError

    # -- the public API -------------------------------------------------------------------

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        all_logits: bool = False,
        ignore_index: int = -100,
        chunked_loss: bool = True,
        loss_chunk_rows: int = LOSS_CHUNK_ROWS,
        distinct: Distinct | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Token ids (B, T) -> ``(logits, loss)``.

        With ``targets`` (B, T): the mean cross-entropy over targets != ``ignore_index``,
        computed chunk by chunk (``loss_chunk_rows`` rows at a time) so the (B*T, V) logits
        never exist; ``logits`` is then None unless ``all_logits``. ``chunked_loss=False``
        computes the plain full-logits loss instead (a reference for tests) and returns the
        logits. Without targets: logits (B, 1, V) of the last position only (all that
        sampling needs), or (B, T, V) with ``all_logits``; loss is None.

        ``distinct``: ``(types, where)`` from :func:`~backpack_nb.models.mixing.distinct_tokens`
        of ``idx``, computed ahead on the host; the Backpack then needs no device sync to find
        them (the Transformer ignores it).
        """
        h = self.hidden_states(idx, distinct)  # (B, T, d)
        E = self.wte.weight  # (V, d)
        if targets is None:
            if not all_logits:
                h = h[:, -1:, :]  # (B, 1, d)
            return F.linear(h, E), None  # (B, T or 1, V)
        if not chunked_loss:
            return full_logits_cross_entropy(h, E, targets, ignore_index=ignore_index)
        loss = linear_cross_entropy(
            h, E, targets, ignore_index=ignore_index, chunk_rows=loss_chunk_rows,
            fused=self.fused_loss,
        )
        return (F.linear(h, E) if all_logits else None), loss

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        *,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        intervention: Intervention | None = None,
        compile: bool = False,
    ) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens to ``idx`` (B, T) -> (B, T + new).

        The model sees the last ``block_size`` tokens. ``temperature=0`` picks the most
        likely token; else ``top_k`` samples among the k most likely and ``top_p`` among the
        smallest set of them whose probability reaches p, drawn with ``generator`` (default:
        torch's global one). The prompt runs once, then each new token one position
        (``use_cache=False``: the whole context every time, the reference).
        ``intervention``: a Backpack's sense weights and edited senses
        (:class:`~backpack_nb.models.generation.Intervention`). Call ``eval()`` first:
        dropout is whatever mode the model is in. ``compile``: the cached step through
        ``torch.compile``. More (prompts of different lengths, stopping):
        :func:`~backpack_nb.models.generation.decode`.
        """
        out, _ = decode(self, idx, max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, generator=generator, use_cache=use_cache,
                        intervention=intervention, compile=compile)
        return out

    def decoder(self, intervention: Intervention | None = None) -> Decoder:
        """The cached decoder :meth:`generate` uses (:mod:`backpack_nb.models.generation`)."""
        raise NotImplementedError

    def num_parameters(self, by_part: bool = True) -> dict[str, int] | int:
        """Parameter count, tied weights once. ``by_part``: a dict from part name (see
        :meth:`parameter_parts`) to count, with the sum under ``"total"``; else the total."""
        seen: set[int] = set()
        counts: dict[str, int] = {}
        for part, modules in self.parameter_parts().items():
            n = 0
            for module in modules:
                for p in module.parameters():
                    if id(p) not in seen:
                        seen.add(id(p))
                        n += p.numel()
            counts[part] = n
        rest = sum(p.numel() for p in self.parameters() if id(p) not in seen)
        if rest:  # a part a subclass forgot to name still counts
            counts["other"] = rest
        counts["total"] = sum(counts.values())
        return counts if by_part else counts["total"]

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute the Transformer blocks' activations in backward instead of storing them
        (for configurations that do not fit otherwise). Same results, bit for bit in
        float64; about a third more compute in the blocks. Not saved in checkpoints."""
        self.transformer.checkpoint_blocks = enabled

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Two AdamW groups: matrices and embeddings (dim >= 2) decay, biases and
        LayerNorm weights do not (decaying them only pulls norms toward 0)."""
        params = [p for p in self.parameters() if p.requires_grad]  # tied weights once
        return [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
