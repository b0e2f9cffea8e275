"""Live tensor storage during a training step, traced op by op (after autograd: forward,
backward, optimizer), each storage counted once; on real or fake tensors (``FakeTensorMode``)."""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

# What a storage holds, in the order a later, more specific finding overrides an earlier one.
KINDS = ("weights", "gradients", "optimizer state", "activations", "weight copies", "logits",
         "temporaries")


@dataclasses.dataclass(eq=False)
class _Block:  # one tensor storage: its size, what it holds, a weak reference to it
    nbytes: int
    kind: str
    ref: Any = None


class LiveMemory(TorchDispatchMode):
    """Bytes of live storage, and what was live at the peak by :data:`KINDS` (weights,
    gradients, optimizer state: tagged by the caller; activations: saved for backward, in
    :meth:`saved_tensors`; logits: a last dimension of V). Each :attr:`phase`'s peak is kept."""

    def __init__(self, vocab_size: int | None = None, round_to: int = 1) -> None:
        super().__init__()
        self.vocab_size, self.round_to = vocab_size, round_to  # CUDA's: 512-byte multiples
        self._blocks: WeakIdKeyDictionary = WeakIdKeyDictionary()  # storage -> _Block
        self._live: dict[int, _Block] = {}  # id(block) -> block, while its storage lives
        self.current = self.peak = 0
        self.at_peak: list[_Block] = []
        self.phase = self.peak_phase = "setup"
        self.phase_peaks: dict[str, int] = {}

    def tag(self, tensors: Iterable[torch.Tensor], kind: str) -> None:
        """Label ``tensors`` as ``kind`` (counted if new: weights made before tracing)."""
        for t in tensors:
            for block in self._track(t):
                block.kind = kind

    def by_kind(self) -> dict[str, int]:
        """Bytes by kind among the storages live at the peak."""
        return {kind: sum(b.nbytes for b in self.at_peak if b.kind == kind) for kind in KINDS}

    def _storages(self, t: torch.Tensor) -> list[torch.UntypedStorage]:
        if t.is_sparse:
            return [s for part in (t._indices(), t._values()) for s in self._storages(part)]
        return [t.untyped_storage()] if t.layout == torch.strided else []

    def _track(self, t: torch.Tensor) -> list[_Block]:
        blocks = []
        for st in self._storages(t):
            block = self._blocks.get(st)
            if block is None:
                nbytes = -(-st.nbytes() // self.round_to) * self.round_to
                logits = self.vocab_size and t.dim() >= 1 and t.shape[-1] == self.vocab_size
                block = _Block(nbytes, "logits" if logits else "temporaries")
                key = id(block)
                # the count follows the storage's life: freed storage leaves it
                block.ref = weakref.ref(st, lambda _, key=key: self._free(key))
                self._blocks[st] = self._live[key] = block
                self.current += block.nbytes
                if self.current > self.phase_peaks.get(self.phase, 0):
                    self.phase_peaks[self.phase] = self.current
                if self.current > self.peak:
                    self.peak, self.at_peak = self.current, list(self._live.values())
                    self.peak_phase = self.phase
            blocks.append(block)
        return blocks

    def _free(self, key: int) -> None:  # its storage was freed
        self.current -= getattr(self._live.pop(key, None), "nbytes", 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        copy_of_weight = (func is torch.ops.aten._to_copy.default
                          and self._kind(args[0]) == "weights")
        for t in (t for t in tree_leaves(out) if isinstance(t, torch.Tensor)):
            for block in self._track(t):
                if copy_of_weight:
                    block.kind = "weight copies"
        return out

    def _kind(self, t: Any) -> str | None:
        st = self._storages(t) if isinstance(t, torch.Tensor) else []
        return getattr(self._blocks.get(st[0]) if st else None, "kind", None)

    def saved_tensors(self) -> contextlib.AbstractContextManager:
        """A context counting tensors saved for backward as ``activations`` (temporaries only)."""

        def pack(t: torch.Tensor) -> torch.Tensor:
            for block in self._track(t):
                if block.kind == "temporaries":
                    block.kind = "activations"
            return t.detach()  # the same storage, without a reference cycle

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
