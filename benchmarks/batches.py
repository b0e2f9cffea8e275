"""Token batches to time training steps on: Zipf-distributed ids, or windows of real Europarl.

What matters for the Backpack is how many *distinct* tokens a batch holds (its sense network
runs once per distinct token), so the synthetic batches follow text's frequency profile."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from backpack_nb import data, dataset
from backpack_nb.errors import UserError

from benchmarks.common import default_europarl_source


def zipf_batches(vocab_size: int, batch_size: int, block_size: int, n: int,
                 seed: int = 0) -> list[torch.Tensor]:
    """``n`` batches (B, T + 1) of token ids drawn from a Zipf(1) profile over the
    vocabulary, like text: at B*T = 1,024 about 550 distinct ids, as in real Europarl
    batches of the same size (520-555 measured on the sample)."""
    gen = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, vocab_size + 1, dtype=torch.float64)
    probs = 1.0 / ranks
    probs /= probs.sum()
    return [torch.multinomial(probs, batch_size * (block_size + 1), replacement=True,
                              generator=gen).view(batch_size, block_size + 1)
            for _ in range(n)]


def europarl_batches(batch_size: int, block_size: int, n: int, seed: int = 0,
                     langs: Sequence[str] = ("en", "fr")) -> tuple[list[torch.Tensor], int]:
    """``n`` batches of real Europarl text (the sample in ``langs``, prepared into a
    temporary folder) and the compact vocabulary size. Batches of 4 x 256 hold about 530
    distinct tokens of mixed en+fr text, about 450 of English alone (one language repeats
    more)."""
    source = default_europarl_source()
    if not (source / "raw").is_dir():
        raise UserError(f"no Europarl sample at {source}: set EUROPARL_SOURCE, or use --data zipf")
    with tempfile.TemporaryDirectory() as tmp:
        out = data.prepare(source, Path(tmp) / "ep",
                           data.PrepareConfig(block_size=block_size, langs=tuple(langs)),
                           progress=False)
        vocab = dataset.load_meta(out)["vocab_size"]
        tokens = torch.from_numpy(dataset.load_tokens(out, "train").astype("int64"))
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        starts = torch.randint(0, len(tokens) - block_size - 1, (batch_size,), generator=gen)
        batches.append(torch.stack([tokens[s:s + block_size + 1] for s in starts.tolist()]))
    return batches, vocab
