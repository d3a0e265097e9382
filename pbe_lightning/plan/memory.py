"""Live tensor bytes by category while a training step runs, and their peak.

The peak is what ``torch.cuda.max_memory_allocated`` reports: the most bytes held at once by
tensors on the device, each allocation rounded up to the CUDA caching allocator's 512-byte
blocks. It is not ``nvidia-smi``'s figure, which adds the CUDA context, the allocator's cached
but unused blocks and the libraries' own memory (see ``HEADROOM_GIB`` in ``report.py``).

Why not torch's ``torch.distributed._tools.mem_tracker.MemTracker`` (torch 2.14), which tracks
the same storages the same way: it registers a gradient hook on every parameter of each module
it sees run, which raises on frozen parameters (``requires_grad=False``: our VAE and CLIP
tower); it refuses a root module called twice in one context (the steps of a training loop);
and it snapshots every running module at every op, which is slow on an SD-sized model.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

CUDA_BLOCK = 512  # the CUDA caching allocator rounds every allocation up to this

WEIGHTS_TRAINABLE = "weights (trainable)"
WEIGHTS_FROZEN = "weights (frozen)"
BUFFERS = "buffers"
GRADIENTS = "gradients"
DDP_BUCKETS = "DDP gradient buckets"
OPTIMIZER = "optimizer state"
EMA = "EMA weights"
ACTIVATIONS = "activations + temporaries"
CATEGORIES = (
    WEIGHTS_TRAINABLE,
    WEIGHTS_FROZEN,
    BUFFERS,
    GRADIENTS,
    DDP_BUCKETS,
    OPTIMIZER,
    EMA,
    ACTIVATIONS,
)


class LiveMemory(TorchDispatchMode):
    """Counts every storage created under it (and those handed to :meth:`track`) until freed.

    Works on real and on fake tensors (``FakeTensorMode``): only sizes are read. New storages
    get the current :attr:`category` (set with :meth:`labelled`); the peak keeps the bytes per
    category and the :attr:`phase` at which it happened.
    """

    def __init__(self, block: int = 1) -> None:
        super().__init__()
        self.block = block
        self.category = ACTIVATIONS
        self.phase = "start"
        self.live = dict.fromkeys(CATEGORIES, 0)
        self.peak = 0
        self.peak_live = dict(self.live)
        self.peak_phase = self.phase
        self.phase_peaks: dict[str, int] = {}
        self._storages = WeakIdKeyDictionary()  # storage -> [bytes, category]

    @property
    def total(self) -> int:
        return sum(self.live.values())

    def _rounded(self, nbytes: int) -> int:
        return -(-nbytes // self.block) * self.block

    def _add(self, tensor: torch.Tensor, category: str, relabel: bool = False) -> None:
        storage = tensor.untyped_storage()
        entry = self._storages.get(storage)
        if entry is not None:
            if relabel and entry[1] != category:
                self.live[entry[1]] -= entry[0]  # a known storage in a new role (a gradient)
                self.live[category] += entry[0]
                entry[1] = category
            return
        nbytes = self._rounded(storage.nbytes())
        entry = [nbytes, category]
        self._storages[storage] = entry
        weakref.finalize(storage, self._free, entry)
        self.live[category] += nbytes
        self._update_peak()

    def _free(self, entry: list) -> None:
        self.live[entry[1]] -= entry[0]

    def _update_peak(self) -> None:
        total = self.total
        self.phase_peaks[self.phase] = max(self.phase_peaks.get(self.phase, 0), total)
        if total > self.peak:
            self.peak, self.peak_live, self.peak_phase = total, dict(self.live), self.phase

    def track(self, tensors: Iterable[torch.Tensor], category: str) -> None:
        """Count tensors that exist already (weights, states), or move them to ``category``."""
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor):
                self._add(tensor, category, relabel=True)

    @contextmanager
    def labelled(self, category: str, phase: str | None = None) -> Iterator[None]:
        """New storages belong to ``category`` (and the peak names ``phase``) inside."""
        previous = self.category, self.phase
        self.category, self.phase = category, phase or self.phase
        try:
            yield
        finally:
            self.category, self.phase = previous

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self._add(out, self.category)
        elif isinstance(out, (list, tuple)):
            for leaf in tree_leaves(out):
                if isinstance(leaf, torch.Tensor):
                    self._add(leaf, self.category)
        return out
