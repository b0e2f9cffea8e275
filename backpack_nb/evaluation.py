"""Held-out loss, perplexity and bits per byte, overall and per language.

Bits per byte is the number to compare across tokenizers and languages: the total negative
log-likelihood of a text in nats, divided by ln 2 and by the text's UTF-8 bytes. A token's
bytes are its tiktoken bytes; ``<|endoftext|>`` separators count as zero bytes (they are not
text) but their prediction still costs nats, as it would for any model of this data.

The text is cut into windows of ``block_size`` predictions. By default the windows do not
overlap (stride = block_size); a smaller ``stride`` gives each scored token more context, the
sliding-window evaluation: every window after the first scores only its last ``stride``
tokens. Scores are kept per window, so a bootstrap over windows gives a 95% interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .tokenizer import Tokenizer


def token_byte_lengths(tok: Tokenizer) -> np.ndarray:
    """UTF-8 bytes of each compact token; special tokens count 0 (they are not text)."""
    lengths = np.array([len(tok.token_bytes(i)) for i in range(tok.vocab_size)], dtype=np.int64)
    lengths[list(tok.special_ids.values())] = 0
    return lengths


@dataclass
class WindowScores:
    """Per-window totals of one evaluated token sequence."""

    nats: np.ndarray  # (n_windows,) summed negative log-likelihood
    tokens: np.ndarray  # (n_windows,) scored tokens
    bytes: np.ndarray  # (n_windows,) UTF-8 bytes of the scored tokens

    @staticmethod
    def concat(parts: list["WindowScores"]) -> "WindowScores":
        return WindowScores(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("nats", "tokens", "bytes")))

    def summary(self, n_boot: int = 1000, seed: int = 0) -> dict:
        """loss (nats/token), ppl, bits_per_byte with a bootstrap 95% interval over windows."""
        nats, toks, nbytes = self.nats.sum(), self.tokens.sum(), self.bytes.sum()
        loss = float(nats / toks) if toks else float("nan")
        bpb = float(nats / math.log(2) / nbytes) if nbytes else float("nan")
        ci = [float("nan"), float("nan")]
        if len(self.nats) > 1 and nbytes:
            rng = np.random.default_rng(seed)
            picks = rng.integers(0, len(self.nats), size=(n_boot, len(self.nats)))
            boot = self.nats[picks].sum(1) / math.log(2) / np.maximum(self.bytes[picks].sum(1), 1)
            ci = [float(x) for x in np.percentile(boot, [2.5, 97.5])]
        return {
            "loss": loss,
            "ppl": float(math.exp(loss)) if toks else float("nan"),
            "bits_per_byte": bpb,
            "bpb_ci95": ci,
            "tokens": int(toks),
            "bytes": int(nbytes),
            "windows": int(len(self.nats)),
        }


def windows(n_tokens: int, block_size: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """(start, length, first_scored) of each window over a sequence of ``n_tokens``: inputs
    ``[start, start + length)`` predict the tokens one position later; predictions at index
    ``>= first_scored`` within the window are scored. Every token after the first is scored
    exactly once."""
    stride = stride or block_size
    if not 0 < stride <= block_size:
        raise ValueError(f"stride must be in 1..block_size ({block_size}), got {stride}")
    n_pred = n_tokens - 1
    out: list[tuple[int, int, int]] = []
    if n_pred <= 0:
        return out
    out.append((0, min(block_size, n_pred), 0))
    scored_to = out[0][1]  # predictions [0, scored_to) done
    while scored_to < n_pred:
        end = min(scored_to + stride, n_pred)  # score predictions [scored_to, end)
        start = max(0, end - block_size)
        out.append((start, end - start, scored_to - start))
        scored_to = end
    return out


def _token_nll(model: torch.nn.Module, idx: torch.Tensor, targets: torch.Tensor, chunk_rows: int = 2048) -> torch.Tensor:
    """Per-token negative log-likelihood (B, T) in float32, the logits made chunk by chunk."""
    h = model.hidden_states(idx)  # (B, T, d)
    E = model.wte.weight  # (V, d)
    flat_h, flat_t = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    out = torch.empty(flat_t.shape, dtype=torch.float32, device=idx.device)
    for s in range(0, flat_h.shape[0], chunk_rows):
        logits = (flat_h[s : s + chunk_rows] @ E.T).float()  # (rows, V)
        out[s : s + chunk_rows] = torch.logsumexp(logits, -1) - logits.gather(1, flat_t[s : s + chunk_rows, None])[:, 0]
    return out.view(targets.shape)


@torch.no_grad()
def score_tokens(
    model: torch.nn.Module,
    tokens: np.ndarray,
    byte_lengths: np.ndarray,
    *,
    block_size: int,
    stride: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    desc: str = "eval",
    progress: bool = True,
) -> WindowScores:
    """Score a token sequence (``max_tokens`` caps it) window by window; deterministic."""
    was_training = model.training
    model.eval()
    tokens = np.asarray(tokens[: max_tokens if max_tokens else len(tokens)], dtype=np.int64)
    wins = windows(len(tokens), block_size, stride)
    nats = np.zeros(len(wins))
    counts = np.zeros(len(wins), dtype=np.int64)
    nbytes = np.zeros(len(wins), dtype=np.int64)
    device = torch.device(device)
    # Equal-length windows batch together (all but possibly the first and last).
    groups: dict[int, list[int]] = {}
    for w, (_, length, _) in enumerate(wins):
        groups.setdefault(length, []).append(w)
    bar = tqdm(total=len(wins), desc=desc, unit="win", disable=not progress, leave=False)
    try:
        for length, members in groups.items():
            for b in range(0, len(members), batch_size):
                batch = members[b : b + batch_size]
                x = np.stack([tokens[wins[w][0] : wins[w][0] + length] for w in batch])
                y = np.stack([tokens[wins[w][0] + 1 : wins[w][0] + length + 1] for w in batch])
                xt = torch.from_numpy(x).to(device)
                yt = torch.from_numpy(y).to(device)
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    nll = _token_nll(model, xt, yt).double().cpu().numpy()  # (b, length)
                for row, w in enumerate(batch):
                    first = wins[w][2]
                    nats[w] = nll[row, first:].sum()
                    counts[w] = length - first
                    nbytes[w] = byte_lengths[y[row, first:]].sum()
                bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    return WindowScores(nats, counts, nbytes)
