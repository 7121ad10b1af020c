"""Tensors that behave like accelerator tensors where it matters, on a CPU-only machine.

A CUDA tensor refuses ``.numpy()`` until it is copied to the host with ``.cpu()``; a
CPU-only test run never sees that, which is how a GPU run could crash at start-up while
every test passed. :class:`OffCpu` is a tensor subclass that keeps its type through every
torch operation and raises exactly like CUDA does on ``.numpy()``; ``.cpu()`` (or
``.to("cpu")``) returns a plain tensor.

The ``meta`` device does not serve: it refuses ``.cpu()`` as well (it has no data), so
correct code fails on it just like broken code.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

MESSAGE = "can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor to host memory first."


def _to_cpu(args: tuple, kwargs: dict) -> bool:
    for a in (*args[1:], *kwargs.values()):
        if isinstance(a, torch.device) and a.type == "cpu" or isinstance(a, str) and a.startswith("cpu"):
            return True
    return False


class OffCpu(torch.Tensor):
    """A tensor that pretends to live on an accelerator (see the module docstring)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.numpy:
            raise TypeError(MESSAGE)
        if func is torch.Tensor.cpu or (func is torch.Tensor.to and _to_cpu(args, kwargs)):
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs).as_subclass(torch.Tensor)
        return super().__torch_function__(func, types, args, kwargs)


def off_cpu(x: Any) -> Any:
    """``x`` with every tensor in it (tensors, tuples, dataclasses) turned into :class:`OffCpu`."""
    if isinstance(x, torch.Tensor):
        return x.as_subclass(OffCpu)
    if isinstance(x, (list, tuple)):
        return type(x)(off_cpu(v) for v in x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.replace(x, **{f.name: off_cpu(getattr(x, f.name)) for f in dataclasses.fields(x)})
    return x
