"""Python side of ``paged_decode.c``: argument checks and the ctypes call (see the C file for the algorithm)."""

from __future__ import annotations

import ctypes

import torch

from cubelm.engine import kernels

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p
_fn = None


def available() -> bool:
    global _fn
    if _fn is None:
        _fn = kernels.function("paged_decode", "paged_decode_attention", [_ptr] * 6 + [_i64] * 7 +
                               [ctypes.c_float, ctypes.c_int])
    return _fn is not None


def supports(q: torch.Tensor) -> bool:
    return q.device.type == "cpu" and q.dtype == torch.float32 and available()


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, block_size: int, sliding_window: int | None = None,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """q (S, Hq, D); caches (num_slots, Hkv, D); block_tables (S, max_blocks) int64; context_lens (S,) int64.
    Returns (S, Hq, D): each sequence's query attending to its first ``context_lens[s]`` positions."""
    S, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    q = q.contiguous()
    for t in (k_cache, v_cache, block_tables, context_lens):
        assert t.is_contiguous() and t.device.type == "cpu"
    assert block_tables.dtype == context_lens.dtype == torch.int64 and k_cache.dtype == torch.float32
    out = torch.empty_like(q) if out is None else out
    failed = _fn(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(),
                 context_lens.data_ptr(), out.data_ptr(), S, Hq, Hkv, D, block_tables.shape[1], block_size,
                 sliding_window or 0, D ** -0.5, torch.get_num_threads())
    if failed:
        raise MemoryError("paged_decode_attention: out of memory for its score buffers")
    return out
