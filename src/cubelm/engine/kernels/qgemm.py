"""Python side of ``qgemm.c``: the few-row GEMM of decode steps over int8 / int4 weights (cubelm's format)."""

from __future__ import annotations

import ctypes

import torch

from cubelm.engine import kernels

MAX_ROWS = 8  # decode; more rows (prefill) are compute-bound and dequantize to a float matmul instead
_fn = None


def available() -> bool:
    global _fn
    if _fn is None:
        _fn = kernels.function("qgemm", "qgemm", [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 +
                               [ctypes.c_int, ctypes.c_int64, ctypes.c_int])
    return _fn is not None


def qgemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int | None,
          out_features: int) -> torch.Tensor:
    """x (M, K) fp32 contiguous; int8 qweight (N, K) + scales (N,), or int4 qweight (N, K/2) + scales (N, K/G)
    -> (M, N) fp32, with each row of x quantized to int8 in blocks of 32 on the way (``qgemm.c``)."""
    M, K = x.shape
    y = torch.empty(M, out_features, dtype=torch.float32, device=x.device)
    if _fn(x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), y.data_ptr(), M, K, out_features, bits,
           group_size or 0, torch.get_num_threads()):
        raise MemoryError("qgemm: cannot allocate the quantized activation rows")
    return y
