"""CPU bf16 autocast at float32 speed, for tests.

`torch.autocast("cpu", torch.bfloat16)` decides which ops run in bf16 (its real policy: convolutions and
matrix products take bf16 inputs and give bf16 outputs, everything downstream sees that dtype; inside an
`autocast(enabled=False)` region nothing changes). On CPUs without bf16 instructions the bf16 kernels are
emulated and far slower than float32 (measured here, CPU time: a 256-channel 3x3 convolution 110x, a
matrix product 25x), which would put a golden run in bf16 at over an hour. `Bf16Kernels` runs those
functions on their inputs rounded to bf16, in float32, and rounds the result to bf16: the arithmetic of a
GPU's bf16 tensor cores (exact products, float32 sums, bf16 output); only the order of the sums differs.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# The functions whose products CPU autocast runs in bf16 (its lower-precision list, as the model calls them).
_GEMMS = {F.conv2d, F.conv_transpose2d, F.linear, F.scaled_dot_product_attention, torch.matmul, torch.mm,
          torch.bmm, torch.baddbmm, torch.addmm, torch.einsum, torch.Tensor.matmul, torch.Tensor.__matmul__}


def _is_float(x) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype in (torch.float32, torch.bfloat16)


def _round(value):
    """Float tensors (also inside lists) rounded to bf16 and held in float32."""
    if isinstance(value, (list, tuple)):
        return type(value)(_round(v) for v in value)
    return value.to(torch.bfloat16).float() if _is_float(value) else value


class Bf16Kernels(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _GEMMS or not torch.is_autocast_enabled("cpu"):
            return func(*args, **kwargs)
        with torch.autocast("cpu", enabled=False):
            out = func(*_round(args), **{key: _round(value) for key, value in kwargs.items()})
        return out.to(torch.bfloat16)


@contextlib.contextmanager
def cpu_bf16_autocast():
    """CPU bf16 autocast with float32-accumulating kernels (see the module docstring)."""
    with torch.autocast("cpu", dtype=torch.bfloat16), Bf16Kernels():
        yield
