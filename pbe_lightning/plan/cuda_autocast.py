"""CUDA's autocast policy, for a GPU plan computed on the CPU.

A mixed-precision step's memory depends on each op's output dtype, and autocast's per-op
policy differs by device: under CUDA autocast, ``group_norm``, ``layer_norm``, ``softmax``,
upsampling, ``exp``... compute and return float32, where CPU autocast leaves them in bf16 (a
diffusers UNet's norm and upsampling outputs, twice the bytes on a GPU). A GPU step cannot be
faked end to end on a machine without one (fake CUDA tensors run forwards, but in backward
autograd asks the CUDA driver for streams), so the plan runs on fake CPU tensors under CPU
autocast, and this mode gives each op the dtype CUDA autocast would.

It lists no ops: the policy is torch's own. The first time an op is called with a given set
of input dtypes, it is run once more on fake CUDA tensors of the same shapes with CUDA
autocast on (fake: no kernel runs, nothing is allocated) and once on the CPU; where the two
disagree, the op's floating inputs are cast to CUDA's output dtype before the CPU runs it,
as CUDA autocast casts them. Casts CPU autocast already makes (convolutions, matmuls,
attention: the same lists on both) are left to it.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_map

AUTOCAST_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
Policy = torch.dtype | None  # the dtype CUDA casts floating inputs to, or None: as on the CPU


class CudaAutocastPolicy(TorchFunctionMode):
    """Active only while CPU autocast is on. Probes run in ``fake_mode`` alone: the memory
    tracker and FLOP counter around the step do not see them."""

    def __init__(self, fake_mode: FakeTensorMode) -> None:
        super().__init__()
        self.fake_mode = fake_mode
        self.policies: dict[tuple, Policy] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.backward:  # its checkpoint recomputation stays under us
            with self:
                return _backward(*args, **kwargs)
        if not torch.is_autocast_enabled("cpu") or _mutates(func):
            return func(*args, **kwargs)
        dtypes = tuple(t.dtype for t in _tensors(args, kwargs))
        if not any(dtype in AUTOCAST_FLOATS for dtype in dtypes):
            return func(*args, **kwargs)
        key = (func, dtypes, _autocast_dtype())
        if key not in self.policies:
            self.policies[key] = self._probe(func, args, kwargs)
        target = self.policies[key]
        if target is not None:
            args, kwargs = tree_map(lambda x: _cast(x, target), (args, kwargs))
        return func(*args, **kwargs)

    def _probe(self, func, args: tuple, kwargs: dict) -> Policy:
        try:
            with _disable_current_modes(), self.fake_mode, torch.no_grad(), _no_autocast_cache():
                on_cpu = _float_dtypes(func(*args, **kwargs))
                cuda_args = tree_map(_on_fake_cuda, (args, kwargs))
                with _cuda_autocast(_autocast_dtype()), torch.autocast("cpu", enabled=False):
                    on_cuda = _float_dtypes(func(*cuda_args[0], **cuda_args[1]))
        except Exception:  # an op that cannot run on fake CUDA tensors: keep CPU's policy
            return None
        if on_cpu == on_cuda or len(set(on_cuda)) != 1:
            return None
        return on_cuda[0]


def _backward(tensor, gradient=None, retain_graph=None, create_graph=False, inputs=None):
    """``Tensor.backward`` without its torch-function dispatch (which would land here again)."""
    torch.autograd.backward(tensor, gradient, retain_graph, create_graph, inputs=inputs)


def _tensors(args: tuple, kwargs: dict | None = None) -> list[torch.Tensor]:
    """The tensors among the arguments, one list level deep (cheaper than a pytree walk:
    this runs for every torch call of the step)."""
    found = []
    for value in (*args, *(kwargs or {}).values()):
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(v for v in value if isinstance(v, torch.Tensor))
    return found


def _float_dtypes(out) -> list[torch.dtype]:
    outs = out if isinstance(out, (list, tuple)) else (out,)
    return [t.dtype for t in _tensors(outs) if t.is_floating_point()]


def _mutates(func) -> bool:
    """In-place and out= calls keep their tensors' dtypes; autocast leaves them alone too."""
    name = getattr(func, "__name__", "")
    return name.endswith("_") and not name.endswith("__") or name.startswith("__i")


def _cast(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor) and value.dtype in AUTOCAST_FLOATS:
        return value.to(dtype)
    return value


def _on_fake_cuda(value):
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="cuda")
    if isinstance(value, torch.device) and value.type == "cpu":
        return torch.device("cuda")
    if isinstance(value, str) and value == "cpu":
        return "cuda"
    return value


def _autocast_dtype() -> torch.dtype:
    return torch.get_autocast_dtype("cpu")


@contextmanager
def _cuda_autocast(dtype: torch.dtype):
    """CUDA autocast on without ``torch.autocast``'s check for a CUDA device (fake tensors)."""
    was_enabled, was_dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    try:
        yield
    finally:
        torch.set_autocast_enabled("cuda", was_enabled)
        torch.set_autocast_dtype("cuda", was_dtype)


@contextmanager
def _no_autocast_cache():
    """A probe must not leave cast weights in autocast's cache: made under no_grad, they
    would cut the weights' gradients in the real call."""
    was = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(False)
    try:
        yield
    finally:
        torch.set_autocast_cache_enabled(was)
