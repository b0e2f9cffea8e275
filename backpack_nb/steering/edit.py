"""Knowledge editing (paper §6.3, Table 6): replace an association r of a word by a, by
editing every sense of every token of the word. With E_r, E_a the output embeddings of the
first token of r and of a (each with its leading space), every sense C of the word becomes

    C~ = C - (C.E_r / |E_r|^2) E_r + (C.E_r / |E_a|^2) E_a,

so what C said about r it now says about a: C~.E_r = (C.E_r)(E_a.E_r)/|E_a|^2, and the part of
C orthogonal to both E_r and E_a is unchanged. The paper shows samples only; measured here,
over prompts that mention the word: p(a) and p(r) for the next token before and after, per
prompt and on average, and the loss on held-out text before and after (an edit should leave
text that is not about the word alone).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from ..models.intervention import Intervention, has_senses
from .words import read_data, word


def edited_senses(model: nn.Module, tokens: Sequence[int], r: int, a: int) -> dict[int, torch.Tensor]:
    """The edited (k, d) sense block of each token in ``tokens``: r's component of every sense
    moved onto a (the formula above)."""
    E = model.wte.weight.detach()
    E_r, E_a = E[r], E[a]  # (d,)
    ids = torch.tensor(sorted(set(tokens)), device=E.device)
    senses = model.senses_of_tokens(ids).detach().view(len(ids), model.config.n_senses, -1)  # (n, k, d)
    along = senses @ E_r  # (n, k): C.E_r
    edited = (senses - (along / (E_r @ E_r))[..., None] * E_r
              + (along / (E_a @ E_a))[..., None] * E_a)
    return {int(t): block for t, block in zip(ids.tolist(), edited)}


def first_token(tok, text: str, what: str) -> int:
    """The first token of ``text`` in its mid-sentence form; it must be a real token."""
    w = word(tok, text)
    if not w.usable:
        raise UserError(f"{what} {text!r}: {w.skipped}")
    return w.ids[0]


def load_edit(name: str, edits: str = "edits", flag: str = "--edit") -> dict:
    """One named edit (``word``, ``from``, ``to``, ``prompts``) of an edits data file."""
    data = read_data(edits, "--edits", {})
    choices = sorted(k for k, v in data.items() if isinstance(v, dict))
    entry = data.get(name)
    if not isinstance(entry, dict):
        raise UserError(f"{flag} {name!r}: not in {data['path']}; it has {', '.join(choices)}")
    for key, kind in (("word", str), ("from", str), ("to", str), ("prompts", list)):
        if not isinstance(entry.get(key), kind) or not entry[key]:
            raise UserError(f"{flag} {name!r} in {data['path']}: {key!r} must be a non-empty {kind.__name__}")
    return {"name": name, **entry}


@torch.no_grad()
def heldout_loss(model: nn.Module, tokens: np.ndarray, steer: Intervention | None,
                 batch_size: int = 8) -> float:
    """Mean next-token loss (nats per token) over ``tokens`` cut into windows of
    ``block_size + 1``, with ``steer`` or without."""
    T = model.config.block_size
    n = (len(tokens) - 1) // T
    if n < 1:
        raise UserError(f"held-out text of {len(tokens)} tokens is shorter than one window of "
                        f"{T + 1}; give more text")
    device = model.wte.weight.device
    windows = torch.from_numpy(np.asarray(tokens[: n * T + 1], dtype=np.int64))
    total = 0.0
    for start in range(0, n, batch_size):
        rows = range(start, min(n, start + batch_size))
        x = torch.stack([windows[i * T:(i + 1) * T] for i in rows]).to(device)
        y = torch.stack([windows[i * T + 1:(i + 1) * T + 1] for i in rows]).to(device)
        logits = (steer or Intervention()).logits(model, x)
        total += float(F.cross_entropy(logits.flatten(0, 1).double(), y.flatten(), reduction="sum"))
    return total / (n * T)


@torch.no_grad()
def run_edit(model: nn.Module, tok, word_text: str, from_text: str, to_text: str,
             prompts: Sequence[str], heldout: np.ndarray | None = None, name: str = "") -> dict:
    """Edit ``word_text`` from ``from_text`` to ``to_text`` and measure it (the ``edit`` of
    the ``steering`` section: issue 25's names). ``prompts`` should mention the word;
    ``heldout``: token ids of unrelated text (None: no held-out loss)."""
    if not has_senses(model):
        raise UserError("knowledge editing edits senses: it needs a Backpack, not a Transformer")
    w = word(tok, word_text)
    if not w.usable:
        raise UserError(f"word {word_text!r}: {w.skipped}")
    r, a = first_token(tok, from_text, "from"), first_token(tok, to_text, "to")
    if r == a:
        raise UserError(f"from {from_text!r} and to {to_text!r} start with the same token "
                        f"{tok.token_str(r)!r}; the edit would change nothing")
    steer = Intervention(sense_blocks=edited_senses(model, w.ids, r, a))
    per_prompt = []
    device = model.wte.weight.device
    for prompt in prompts:
        ids = tok.encode(prompt)[-model.config.block_size:]
        if not ids:
            raise UserError("an edit prompt is empty")
        idx = torch.tensor([ids], device=device)
        before = Intervention().next_token_logits(model, idx)[0].double().log_softmax(-1).exp()
        after = steer.next_token_logits(model, idx)[0].double().log_softmax(-1).exp()
        per_prompt.append({"prompt": prompt, "mentions_word": bool(set(w.ids) & set(ids)),
                           "p_from_before": float(before[r]), "p_from_after": float(after[r]),
                           "p_to_before": float(before[a]), "p_to_after": float(after[a])})
    mean = {key: float(np.mean([p[key] for p in per_prompt]))
            for key in ("p_from_before", "p_from_after", "p_to_before", "p_to_after")}
    result = {"name": name, "word": word_text, "tokens": list(w.tokens), "from": from_text,
              "to": to_text, "from_token": tok.token_str(r), "to_token": tok.token_str(a),
              "prompts": list(prompts), **mean, "per_prompt": per_prompt}
    if heldout is not None:
        result["heldout_tokens"] = int(len(heldout))
        result["heldout_loss_before"] = heldout_loss(model, heldout, None)
        result["heldout_loss_after"] = heldout_loss(model, heldout, steer)
    return result
