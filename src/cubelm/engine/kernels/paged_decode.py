"""Python side of ``paged_decode.c``: argument checks and the ctypes call (see the C file for the algorithm)."""

from __future__ import annotations

import ctypes

import torch

from cubelm.engine import kernels

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p
_fn = None
_fn_i8 = None


def available() -> bool:
    global _fn, _fn_i8
    if _fn is None:
        tail = [_i64] * 7 + [ctypes.c_float, ctypes.c_int]
        _fn = kernels.function("paged_decode", "paged_decode_attention", [_ptr] * 6 + tail)
        _fn_i8 = kernels.function("paged_decode", "paged_decode_attention_i8", [_ptr] * 8 + tail)
    return _fn is not None


def supports(q: torch.Tensor) -> bool:
    return q.device.type == "cpu" and q.dtype == torch.float32 and available()


def supports_pool(cache: torch.Tensor, compute_dtype: torch.dtype) -> bool:
    """Whether the kernel can serve a pool stored as ``cache`` (fp32, or int8 codes) read in ``compute_dtype``."""
    return (cache.device.type == "cpu" and compute_dtype == torch.float32 and cache.dtype in (torch.float32, torch.int8)
            and available())


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, block_size: int, sliding_window: int | None = None,
                           k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """q (S, Hq, D) fp32; caches (num_slots, Hkv, D) fp32, or int8 codes with ``k_scale``/``v_scale``
    (num_slots, Hkv) fp32; block_tables (S, max_blocks) int64; context_lens (S,) int64.
    Returns (S, Hq, D): each sequence's query attending to its first ``context_lens[s]`` positions."""
    S, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    q = q.contiguous()
    quantized = k_scale is not None
    tensors = (k_cache, v_cache, block_tables, context_lens) + ((k_scale, v_scale) if quantized else ())
    for t in tensors:
        assert t.is_contiguous() and t.device.type == "cpu"
    assert block_tables.dtype == context_lens.dtype == torch.int64 and q.dtype == torch.float32
    out = torch.empty_like(q) if out is None else out
    tail = (block_tables.data_ptr(), context_lens.data_ptr(), out.data_ptr(), S, Hq, Hkv, D, block_tables.shape[1],
            block_size, sliding_window or 0, D ** -0.5, torch.get_num_threads())
    if quantized:
        assert k_cache.dtype == v_cache.dtype == torch.int8 and k_scale.dtype == v_scale.dtype == torch.float32
        failed = _fn_i8(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), k_scale.data_ptr(), v_scale.data_ptr(),
                        *tail)
    else:
        assert k_cache.dtype == torch.float32
        failed = _fn(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), *tail)
    if failed:
        raise MemoryError("paged_decode_attention: out of memory for its score buffers")
    return out
