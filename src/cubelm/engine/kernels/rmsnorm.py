"""Python side of ``rmsnorm.c``: RMSNorm of fp32 rows in one native call (decode steps: a few rows)."""

from __future__ import annotations

import ctypes

import torch

from cubelm.engine import kernels

PARALLEL_ROWS = 64  # below this many rows a second thread costs more to wake than the rows take
_fn = None


def available() -> bool:
    global _fn
    if _fn is None:
        _fn = kernels.function("rmsnorm", "rmsnorm", [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                                      ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                                      ctypes.c_float, ctypes.c_int])
    return _fn is not None


def supports(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and available()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., dim) fp32 with unit last stride, weight (dim,) fp32 contiguous -> a new contiguous tensor."""
    dim = x.shape[-1]
    x2 = x.reshape(-1, dim)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape, dtype=x.dtype)
    threads = torch.get_num_threads() if x2.shape[0] >= PARALLEL_ROWS else 1
    _fn(x2.data_ptr(), x2.stride(0), weight.data_ptr(), y.data_ptr(), x2.shape[0], dim, eps, threads)
    return y.view(x.shape)
