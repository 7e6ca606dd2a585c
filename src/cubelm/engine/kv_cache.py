"""The paged KV pool's storage: K and V in the model's dtype (``kv_cache_dtype="auto"``) or in int8 with one scale
per token per KV head (``"int8"``), vLLM's option name.

int8 is symmetric absmax quantization of each cached row ``x`` (one token, one KV head, ``head_dim`` values):
``scale = max|x| / 127``, ``code = round(x / scale)`` in [-127, 127], read back as ``code * scale``; the error of
every element is at most ``scale / 2 = max|x| / 254``. Per token and head because K/V outliers sit in a few
channels of a few tokens: a per-tensor or per-block scale would spend the codes of every row on the largest one.

Scales are fp32 whatever the model's dtype: 4 bytes per row of ``head_dim`` codes (6% of the int8 pool at
head_dim 64, 3% at 128); a bf16 scale would add a relative error up to 2^-9 to every element of its row, as much
as the rounding itself, and fp16's range cannot hold the scale of a near-zero row; one format also keeps the
native kernel and the memory planner free of a dtype parameter. So a token costs
``2 x layers x kv_heads x (head_dim + 4)`` bytes, 3.76x fewer than fp32 and 1.88x fewer than bf16 at head_dim 64
(``kv_cache_bytes_per_token(cfg, "int8")`` in ``cubelm.systems.memory``, which sizes the engine's pool).

Attention always sees what the pool holds: with int8 the new tokens' K/V are quantized when written, and prompt
chunks and decodes read them back dequantized (the PyTorch paths gather codes and scales, then dequantize into a
reused buffer; the native decode kernel reads codes and scales straight from the pool).
"""

from __future__ import annotations

import torch

from cubelm.errors import CubelmError

KV_CACHE_DTYPES = ("auto", "int8")


def check_kv_cache_dtype(name: object) -> str:
    if name not in KV_CACHE_DTYPES:
        raise CubelmError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)} (auto = the model's dtype), "
                          f"got {name!r}")
    return name


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the last axis, symmetric absmax: x (..., D) -> codes int8 (..., D), scales fp32 (...)."""
    x = x.float()
    scales = x.abs().amax(-1) / 127
    # an all-zero row has scale 0: divide by the smallest normal instead, its codes are 0 and read back as 0
    codes = torch.round(x / scales.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1))
    return codes.clamp_(-127, 127).to(torch.int8), scales


def dequantize_int8(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """codes (..., D) int8, scales (...) fp32 -> (..., D) in ``dtype``. One fused op: the product is computed in
    fp32 and rounded once to ``dtype`` when it is stored."""
    if out is None:
        out = torch.empty(codes.shape, dtype=dtype, device=codes.device)
    return torch.mul(codes, scales.unsqueeze(-1), out=out)


class KVPool:
    """K and V of every layer, ``(L, num_slots, Hkv, D)``, plus ``(L, num_slots, Hkv)`` fp32 scales for int8."""

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int, *, dtype: torch.dtype,
                 device: torch.device | str, kv_cache_dtype: str = "auto"):
        self.kv_cache_dtype = check_kv_cache_dtype(kv_cache_dtype)
        self.dtype = dtype  # the compute dtype attention reads K/V in
        quantized = kv_cache_dtype == "int8"
        shape = (num_layers, num_slots, num_kv_heads, head_dim)
        store = torch.int8 if quantized else dtype
        self.k = torch.zeros(shape, dtype=store, device=device)
        self.v = torch.zeros(shape, dtype=store, device=device)
        self.k_scale = torch.zeros(shape[:-1], dtype=torch.float32, device=device) if quantized else None
        self.v_scale = torch.zeros(shape[:-1], dtype=torch.float32, device=device) if quantized else None

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v (N, Hkv, D) of N new tokens into ``slots`` (N,) of ``layer``: one ``index_copy_`` per tensor."""
        if self.k_scale is None:
            self.k[layer].index_copy_(0, slots, k)
            self.v[layer].index_copy_(0, slots, v)
            return
        for cache, scales, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            codes, row_scales = quantize_int8(x)
            cache[layer].index_copy_(0, slots, codes)
            scales[layer].index_copy_(0, slots, row_scales)

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    @property
    def nbytes(self) -> int:
        tensors = [self.k, self.v] + ([self.k_scale, self.v_scale] if self.quantized else [])
        return sum(t.numel() * t.element_size() for t in tensors)
