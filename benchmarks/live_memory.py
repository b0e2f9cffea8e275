"""Live tensor storage during a training step, traced op by op, and what was live at the peak.

:class:`LiveMemory` is a dispatch mode: it sees every op's outputs after autograd (forward,
backward and optimizer alike), counts each storage once however many views share it, and
drops it when the storage is freed. It works on real tensors and on fake ones, so the memory
of a large configuration can be accounted without having that memory.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

# What a storage holds, in the order a later, more specific finding overrides an earlier one.
KINDS = ("weights", "gradients", "optimizer state", "activations", "weight copies", "logits",
         "temporaries")


class _Block:
    """One tensor storage: its size and what it holds."""

    __slots__ = ("nbytes", "kind", "ref", "__weakref__")

    def __init__(self, nbytes: int, kind: str) -> None:
        self.nbytes, self.kind = nbytes, kind


class LiveMemory(TorchDispatchMode):
    """Bytes of live tensor storage while a training step runs, and what was live at the
    peak: ``weights`` (registered), ``gradients`` and ``optimizer state`` (tagged after the
    backward and the optimizer step), ``activations`` (saved for backward, via
    :meth:`saved_tensors`), ``weight copies`` (autocast's low-precision copies of weights),
    ``logits`` (any other tensor with a vocabulary-sized last dimension: logits chunks,
    their gradients) and ``temporaries`` (the rest).

    Works on real tensors and on fake ones (``FakeTensorMode``: shapes only, so the seed
    configuration is traced in seconds without its memory). Every op's outputs are seen
    after autograd, so forward, backward and optimizer are all counted; a storage is counted
    once however many views share it, and leaves the count when it is freed."""

    def __init__(self, vocab_size: int | None = None, round_to: int = 1) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.round_to = round_to  # CUDA's allocator hands out multiples of 512 bytes
        self._blocks: WeakIdKeyDictionary = WeakIdKeyDictionary()  # storage -> _Block
        self._live: dict[int, _Block] = {}
        self.current = 0
        self.peak = 0
        self.at_peak: list[_Block] = []
        self.phase = "setup"  # set by the caller: "forward", "backward", "optimizer"
        self.phase_peaks: dict[str, int] = {}
        self.peak_phase = self.phase

    # -- bookkeeping ---------------------------------------------------------------------

    def register(self, tensor: torch.Tensor, kind: str) -> None:
        """Count ``tensor`` (made before tracing began) as ``kind``."""
        for block in self._track(tensor):
            block.kind = kind

    def tag(self, tensors: Iterable[torch.Tensor], kind: str) -> None:
        """Relabel ``tensors`` (already counted) as ``kind``."""
        for t in tensors:
            for block in self._track(t):
                block.kind = kind

    def reset_peak(self) -> None:
        self.peak, self.at_peak = self.current, list(self._live.values())
        self.peak_phase, self.phase_peaks = self.phase, {}

    def by_kind(self, blocks: Sequence[_Block] | None = None) -> dict[str, int]:
        """Bytes by kind among ``blocks`` (default: those live at the peak)."""
        out = dict.fromkeys(KINDS, 0)
        for b in self.at_peak if blocks is None else blocks:
            out[b.kind] += b.nbytes
        return out

    def _storages(self, t: torch.Tensor) -> list[torch.UntypedStorage]:
        if t.is_sparse:
            return [s for part in (t._indices(), t._values()) for s in self._storages(part)]
        if t.layout != torch.strided:
            return []
        return [t.untyped_storage()]

    def _track(self, t: torch.Tensor) -> list[_Block]:
        blocks = []
        for st in self._storages(t):
            block = self._blocks.get(st)
            if block is None:
                nbytes = -(-st.nbytes() // self.round_to) * self.round_to
                block = _Block(nbytes, self._kind_of_new(t))
                key = id(block)
                # the count follows the storage's life: freed storage leaves it
                block.ref = weakref.ref(st, lambda _, key=key: self._free(key))
                self._blocks[st] = block
                self._live[key] = block
                self.current += block.nbytes
                if self.current > self.phase_peaks.get(self.phase, 0):
                    self.phase_peaks[self.phase] = self.current
                if self.current > self.peak:
                    self.peak, self.at_peak = self.current, list(self._live.values())
                    self.peak_phase = self.phase
            blocks.append(block)
        return blocks

    def _kind_of_new(self, t: torch.Tensor) -> str:
        if self.vocab_size and t.dim() >= 1 and t.shape[-1] == self.vocab_size:
            return "logits"
        return "temporaries"

    def _free(self, key: int) -> None:
        block = self._live.pop(key, None)
        if block is not None:
            self.current -= block.nbytes

    # -- hooks -----------------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        copy_of_weight = (func is torch.ops.aten._to_copy.default
                          and self._kind(args[0]) == "weights")
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                for block in self._track(t):
                    if copy_of_weight:
                        block.kind = "weight copies"
        return out

    def _kind(self, t: Any) -> str | None:
        if not isinstance(t, torch.Tensor):
            return None
        st = self._storages(t)
        block = self._blocks.get(st[0]) if st else None
        return None if block is None else block.kind

    def saved_tensors(self) -> contextlib.AbstractContextManager:
        """A context in which tensors saved for backward are counted as ``activations``
        (unless they are weights, weight copies or logits)."""

        def pack(t: torch.Tensor) -> torch.Tensor:
            for block in self._track(t):
                if block.kind == "temporaries":
                    block.kind = "activations"
            # detach: the same storage, without the reference cycle that saving the output
            # of an op as itself would make
            return t.detach()

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
