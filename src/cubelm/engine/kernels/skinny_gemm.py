"""Python side of ``skinny_gemm.c``: the few-row GEMM of decode steps over the blocked weight layout."""

from __future__ import annotations

import ctypes

import torch

from cubelm.engine import kernels

MAX_ROWS = 8  # above this MKL's batched GEMM is as fast or faster (measured on the base preset's shapes)
_fn = None


def available() -> bool:
    global _fn
    if _fn is None:
        _fn = kernels.function("skinny_gemm", "skinny_gemm", [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4 +
                               [ctypes.c_int])
    return _fn is not None


def skinny_gemm(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """x (M, K) fp32 contiguous, blocks (P, K, Nb) -> (M, P * Nb) = x @ W.T where W.T = blocks as columns."""
    P, K, Nb = blocks.shape
    y = torch.empty(x.shape[0], P * Nb, dtype=x.dtype, device=x.device)
    _fn(x.data_ptr(), blocks.data_ptr(), y.data_ptr(), x.shape[0], K, P, Nb, torch.get_num_threads())
    return y


_many = None


def many_rows_available() -> bool:
    """Whether ``blocked_gemm.c`` (the register-blocked GEMM for more than MAX_ROWS rows) could be built."""
    global _many
    if _many is None:
        _many = kernels.function("blocked_gemm", "blocked_gemm", [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4 +
                                 [ctypes.c_int]) or False
    return _many is not False


_strip: int | None | bool = False


def strip_width() -> int | None:
    """The block width both kernels read without repacking (16 columns with AVX2, 32 with AVX-512: two vector
    registers), or None when they are not built. blocked_gemm.c copies any wider block into strips of this width for
    every 256-row slice it multiplies, a copy at DRAM speed that does not overlap the arithmetic (measured on base's
    shapes: 17-44% of its time at 64-16 rows); weights stored as one-strip blocks skip it, and skinny_gemm.c reads
    several of them side by side as it read one wide block."""
    global _strip
    if _strip is False:
        _strip = None
        if available() and many_rows_available():
            a = kernels.function("skinny_gemm", "skinny_gemm_strip", [])
            b = kernels.function("blocked_gemm", "blocked_gemm_strip", [])
            if a is not None and b is not None and a() == b():
                _strip = int(a())
    return _strip


def blocked_gemm(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Same contract as ``skinny_gemm`` for any number of rows (batched decode, prompt chunks)."""
    P, K, Nb = blocks.shape
    y = torch.empty(x.shape[0], P * Nb, dtype=x.dtype, device=x.device)
    if _many(x.data_ptr(), blocks.data_ptr(), y.data_ptr(), x.shape[0], K, P, Nb, torch.get_num_threads()):
        raise MemoryError("blocked_gemm: cannot allocate its packing buffer")
    return y
