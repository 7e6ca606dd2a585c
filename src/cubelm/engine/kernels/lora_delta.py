"""Python side of ``lora_delta.c``: every adapter's low-rank delta of a few-row step in one call (multi-LoRA)."""

from __future__ import annotations

import ctypes

import torch

from cubelm.engine import kernels

RANK_MULTIPLE = 16  # the kernel reads ranks in passes of 16: the padded rank of the stacked weights is a multiple
MAX_ROWS = 64  # above this (prompt chunks) MKL's GEMMs per adapter are faster; measured in benchmarks/multi_lora.py
PARALLEL_MACS = 1 << 20  # below this much work a second thread costs more to wake and join than it saves
_i64, _ptr = ctypes.c_int64, ctypes.c_void_p
_fn = None


def available() -> bool:
    global _fn
    if _fn is None:
        _fn = kernels.function("lora_delta", "lora_delta", [_ptr, _i64, _ptr, _i64, _ptr, _ptr, _ptr, _i64, _ptr] +
                               [_i64] * 3 + [ctypes.c_int])
    return _fn is not None


def supports(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.float32 and available()


def lora_delta(x: torch.Tensor, y: torch.Tensor, at: torch.Tensor, bt: torch.Tensor, segments: torch.Tensor,
               ranks: torch.Tensor) -> None:
    """y (M, N) += per segment (slot, start, end): x[start:end] @ at[slot][:, :r] @ bt[slot][:r], in place.

    x (M, K) and y (M, N) with unit column stride; at (S, K, R), bt (S, R, N) contiguous; segments (n, 3) and
    ranks (S,) int64 contiguous."""
    S, K, R = at.shape
    N = bt.shape[2]
    assert x.stride(1) == 1 and y.stride(1) == 1 and at.is_contiguous() and bt.is_contiguous()
    assert segments.dtype == ranks.dtype == torch.int64 and segments.is_contiguous() and ranks.is_contiguous()
    threads = torch.get_num_threads() if x.shape[0] * R * (K + N) >= PARALLEL_MACS else 1
    failed = _fn(x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), at.data_ptr(), bt.data_ptr(),
                 segments.data_ptr(), segments.shape[0], ranks.data_ptr(), K, N, R, threads)
    if failed:
        raise ValueError(f"lora_delta: the padded rank {R} is not a multiple of {RANK_MULTIPLE}")
