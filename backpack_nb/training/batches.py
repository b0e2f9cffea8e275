"""Training batches: random windows of a token file, drawn by a seeded generator whose state
is part of the checkpoint, the same on every DDP rank."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from backpack_nb.errors import UserError
from backpack_nb.models.mixing import Distinct, distinct_tokens


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``; to CUDA through pinned memory, so the copy overlaps the
    step already running there."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class BatchSampler:
    """Random windows of ``block_size + 1`` tokens from a 1-D token memmap, drawn by a seeded
    ``torch.Generator``. Every process draws the same global batch (batch_size x world_size
    starts) and keeps its own slice, so the sampler's state is the same on every rank and
    one saved state resumes them all."""

    def __init__(self, tokens: np.ndarray, *, block_size: int, batch_size: int, seed: int,
                 device: torch.device, rank: int = 0, world_size: int = 1, name: str = "train"):
        if len(tokens) <= block_size + 1:
            raise UserError(f"the {name} split has {len(tokens)} tokens, too few for "
                            f"block_size {block_size}; use a smaller --block_size or more data")
        self.tokens = tokens
        self.block_size, self.batch_size = block_size, batch_size
        self.rank, self.world_size = rank, world_size
        self.device = device
        self.generator = torch.Generator().manual_seed(seed)
        self.batches_drawn = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: (batch_size, block_size) int64 on the device; y is x shifted by one."""
        return self._to_device(self._draw())

    def next_batch_with_distinct(self) -> tuple[torch.Tensor, torch.Tensor, Distinct]:
        """x, y and x's distinct tokens (:func:`~backpack_nb.models.mixing.distinct_tokens`,
        bucketed), found here on the host and sent along: the Backpack's step then has no
        device sync. Draws the same batches as :meth:`next_batch`."""
        windows = self._draw()  # (B, T+1) on the host
        types, where = distinct_tokens(windows[:, :-1])
        x, y = self._to_device(windows)
        return x, y, (to_device(types, self.device), to_device(where, self.device))

    def _draw(self) -> torch.Tensor:
        T, B = self.block_size, self.batch_size
        starts = torch.randint(len(self.tokens) - T - 1, (B * self.world_size,),
                               generator=self.generator)[self.rank * B:(self.rank + 1) * B]
        self.batches_drawn += 1
        windows = np.stack([self.tokens[s:s + T + 1] for s in starts.tolist()]).astype(np.int64)
        return torch.from_numpy(windows)  # (B, T+1)

    def _to_device(self, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = to_device(windows, self.device)
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "batches_drawn": self.batches_drawn,
                "world_size": self.world_size, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.batches_drawn = int(state["batches_drawn"])
