"""NF4: QLoRA's 4-bit NormalFloat weights with double-quantized block scales, and ``NF4Linear`` that computes with them.

The format (Dettmers et al. 2023, "QLoRA", §3; book ch. 5):

- **NF4 codes.** Pretrained weights are roughly N(0, σ). The 16 code values are quantiles of N(0, 1) normalized to
  [-1, 1]: 8 on the positive side and 7 on the negative side, plus an exact 0 (an asymmetric split, so that zero —
  the padding value, and common in weights — is representable). Each value is the quantile at evenly spaced
  probabilities from 1 - δ down to 1/2, δ = (1/30 + 1/32) / 2 keeping the outermost quantile finite.
  ``nf4_code_values()`` computes them; a test checks them against the table the paper publishes.
- **Blocks of 64.** The flattened weight is cut into blocks of 64 (the last one zero-padded); each block is divided
  by its absmax (so it lies in [-1, 1]) and each weight becomes the index of the nearest code value. Two 4-bit
  indices share a byte, the first one in the high nibble.
- **Double quantization.** One fp32 absmax per 64 weights costs 32/64 = 0.5 bits per weight; QLoRA quantizes those
  scales again: subtract their mean (they are all positive, centering uses the 8-bit range on both signs), cut them
  into blocks of 256, and store each as an 8-bit code against its block's fp32 absmax. Cost: 8/64 + 32/(64·256)
  = 0.127 bits per weight, so 4.127 bits in all (plus 4 bytes for the mean, once per tensor).
  The 8-bit codes here are symmetric linear integers (-127..127, scale = block absmax / 127); bitsandbytes stores
  the same 8 bits in its "dynamic" 8-bit float map. The bytes are identical; the linear code's error is at most
  half a step, absmax/254 of each 256-scale block, far below NF4's own rounding.

Dequantization rebuilds the weight in fp32 (table lookup × scale) and casts it to the layer's ``compute_dtype``
(fp32 on CPU, bf16 where asked); ``NF4Linear`` does that on every matmul and multiplies with ``F.linear``. Its
autograd function saves nothing for backward and dequantizes again there, so training keeps no full-precision copy
of a frozen weight alive between forward and backward (a plain ``F.linear(x, dequantize())`` would save one per
layer, which is exactly the memory QLoRA exists to avoid).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cubelm.errors import CubelmError
from cubelm.systems.memory import NF4_BLOCK, NF4_SCALE_BLOCK, nf4_tensor_bytes

BLOCK_SIZE = NF4_BLOCK  # 64 weights per absmax (QLoRA's NF4 block)
SCALE_BLOCK_SIZE = NF4_SCALE_BLOCK  # 256 absmaxes per fp32 scale in the double quantization
_INT8_MAX = 127
_QUANT_CHUNK = 1 << 14  # blocks encoded at a time: bounds the int64 index temporaries of a large matrix


def nf4_code_values() -> torch.Tensor:
    """The 16 NF4 values, ascending, fp32; index 7 is exactly 0, indices 0 and 15 are -1 and 1."""
    delta = (1 / 30 + 1 / 32) / 2
    hi = 1 - delta
    positive = torch.special.ndtri(torch.linspace(hi, 0.5, 9, dtype=torch.float64)[:-1])  # 8 values > 0
    negative = -torch.special.ndtri(torch.linspace(hi, 0.5, 8, dtype=torch.float64)[:-1])  # 7 values < 0
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return (values / values.abs().max()).to(torch.float32)


NF4_VALUES = nf4_code_values()
# encode: nearest code value = the bucket between consecutive midpoints
_MIDPOINTS = (NF4_VALUES[1:] + NF4_VALUES[:-1]) / 2
# decode: every packed byte -> its two values (high nibble first), one gather per byte instead of two
_BYTE_PAIRS = torch.stack([NF4_VALUES.repeat_interleave(16), NF4_VALUES.repeat(16)], dim=1)


@dataclass(frozen=True, slots=True)
class NF4Weight:
    """One tensor in NF4 with double-quantized scales; ``shape`` is the original tensor's."""

    codes: torch.Tensor  # uint8 (blocks · block_size / 2,): two 4-bit code indices per byte
    absmax_codes: torch.Tensor  # int8 (blocks,): each block's absmax, centered, against its 256-block scale
    absmax_scales: torch.Tensor  # float32 (ceil(blocks / scale_block_size),)
    absmax_mean: torch.Tensor  # float32 (): the mean subtracted from the absmaxes before their quantization
    shape: tuple[int, ...]
    block_size: int = BLOCK_SIZE
    scale_block_size: int = SCALE_BLOCK_SIZE

    @property
    def numel(self) -> int:
        return _numel(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes actually stored (equals ``cubelm.systems.memory.nf4_tensor_bytes`` for the same sizes)."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.absmax_codes, self.absmax_scales,
                                                          self.absmax_mean))


def quantize_nf4(weight: torch.Tensor, block_size: int = BLOCK_SIZE,
                 scale_block_size: int = SCALE_BLOCK_SIZE) -> NF4Weight:
    """Any floating tensor -> ``NF4Weight`` (codes chosen against the exact fp32 absmax, as bitsandbytes does)."""
    if not weight.is_floating_point():
        raise CubelmError(f"NF4 quantizes floating-point weights, got {weight.dtype}")
    if block_size < 2 or block_size % 2 or scale_block_size < 1:
        raise CubelmError(f"NF4 needs an even block_size >= 2 and scale_block_size >= 1, got {block_size} and "
                          f"{scale_block_size}")
    if weight.numel() == 0:
        raise CubelmError("cannot quantize an empty tensor")
    blocks = _pad_to(weight.detach().reshape(-1).float(), block_size).view(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    codes = torch.cat([_encode(blocks[i:i + _QUANT_CHUNK], absmax[i:i + _QUANT_CHUNK])
                       for i in range(0, blocks.shape[0], _QUANT_CHUNK)])
    absmax_codes, absmax_scales, absmax_mean = quantize_scales(absmax, scale_block_size)
    return NF4Weight(codes=codes, absmax_codes=absmax_codes, absmax_scales=absmax_scales, absmax_mean=absmax_mean,
                     shape=tuple(weight.shape), block_size=block_size, scale_block_size=scale_block_size)


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``NF4Weight`` -> a tensor of ``q.shape`` in ``dtype`` (computed in fp32, cast once)."""
    return _dequantize(q.codes, q.absmax_codes, q.absmax_scales, q.absmax_mean, q.shape, q.block_size,
                       q.scale_block_size, dtype)


def quantize_scales(absmax: torch.Tensor, block_size: int = SCALE_BLOCK_SIZE
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization of the fp32 block absmaxes: (int8 codes, fp32 scale per ``block_size``, fp32 mean)."""
    mean = absmax.mean()
    blocks = _pad_to(absmax - mean, block_size).view(-1, block_size)
    scales = blocks.abs().amax(dim=1)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-equal block codes as zeros
    codes = torch.round(blocks / safe[:, None] * _INT8_MAX).to(torch.int8)
    return codes.reshape(-1)[:absmax.numel()].clone(), scales, mean


def dequantize_scales(codes: torch.Tensor, scales: torch.Tensor, mean: torch.Tensor,
                      block_size: int = SCALE_BLOCK_SIZE) -> torch.Tensor:
    """The fp32 block absmaxes back from their int8 codes."""
    blocks = _pad_to(codes.float(), block_size).view(-1, block_size)
    return (blocks * (scales / _INT8_MAX)[:, None]).reshape(-1)[:codes.numel()] + mean


class NF4Linear(nn.Module):
    """A frozen linear layer stored in NF4; ``forward`` dequantizes to ``compute_dtype`` and calls ``F.linear``.

    The input is cast to ``compute_dtype`` and the output back to the input's dtype (as bitsandbytes' Linear4bit
    does), so an fp32 model can hold a bf16-compute NF4 layer. The packed codes are a (frozen, uint8) parameter, so
    device moves and ``parameters()`` see the layer; the scales are buffers. The bias, if any, stays as it was.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 compute_dtype: torch.dtype = torch.float32, *, block_size: int = BLOCK_SIZE,
                 scale_block_size: int = SCALE_BLOCK_SIZE, device: torch.device | str | None = None):
        super().__init__()
        if not compute_dtype.is_floating_point:
            raise CubelmError(f"compute_dtype must be a floating dtype (float32, bfloat16, float16), "
                              f"got {compute_dtype}")
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype, self.block_size, self.scale_block_size = compute_dtype, block_size, scale_block_size
        blocks = -(-in_features * out_features // block_size)
        self.weight_codes = nn.Parameter(torch.zeros(blocks * block_size // 2, dtype=torch.uint8, device=device),
                                         requires_grad=False)
        self.register_buffer("absmax_codes", torch.zeros(blocks, dtype=torch.int8, device=device))
        self.register_buffer("absmax_scales", torch.zeros(-(-blocks // scale_block_size), device=device))
        self.register_buffer("absmax_mean", torch.zeros((), device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype | None = None, *,
                    block_size: int = BLOCK_SIZE, scale_block_size: int = SCALE_BLOCK_SIZE) -> "NF4Linear":
        """Quantize ``linear``'s weight (its bias is kept as is). ``compute_dtype`` defaults to the weight's dtype."""
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, compute_dtype or w.dtype,
                    block_size=block_size, scale_block_size=scale_block_size, device="meta")
        q = quantize_nf4(w, block_size, scale_block_size)
        layer.weight_codes = nn.Parameter(q.codes, requires_grad=False)
        layer.absmax_codes, layer.absmax_scales, layer.absmax_mean = q.absmax_codes, q.absmax_scales, q.absmax_mean
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def quantized(self) -> NF4Weight:
        return NF4Weight(codes=self.weight_codes.data, absmax_codes=self.absmax_codes, absmax_scales=self.absmax_scales,
                         absmax_mean=self.absmax_mean, shape=(self.out_features, self.in_features),
                         block_size=self.block_size, scale_block_size=self.scale_block_size)

    def dequantize(self) -> torch.Tensor:
        """The weight (out_features, in_features) in ``compute_dtype``."""
        return dequantize_nf4(self.quantized(), self.compute_dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the quantized weight (codes, 8-bit scales, fp32 scales, mean); the bias not included."""
        return self.quantized().nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return _NF4Matmul.apply(x.to(self.compute_dtype), bias, self).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"compute_dtype={self.compute_dtype}, block_size={self.block_size}/{self.scale_block_size}")


class _NF4Matmul(torch.autograd.Function):
    """y = x Wᵀ + b with W rebuilt from NF4 in forward and again in backward: nothing of size W is saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, layer: NF4Linear) -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantize(), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_x = grad @ ctx.layer.dequantize() if ctx.needs_input_grad[0] else None  # (..., out) @ (out, in)
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return grad_x, grad_bias, None


# ---- helpers ---------------------------------------------------------------------------------------------------
def _encode(blocks: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """(n, block) fp32 + their absmax -> packed uint8 (n · block / 2,)."""
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))  # an all-zero block codes as exact zeros
    idx = torch.bucketize(blocks / safe[:, None], _MIDPOINTS.to(blocks.device)).to(torch.uint8).reshape(-1, 2)
    return (idx[:, 0] << 4) | idx[:, 1]


def _dequantize(codes, absmax_codes, absmax_scales, absmax_mean, shape, block_size, scale_block_size,
                dtype) -> torch.Tensor:
    absmax = dequantize_scales(absmax_codes, absmax_scales, absmax_mean, scale_block_size)
    # index_select rather than advanced indexing: the same gather, ~2x faster on CPU
    values = _BYTE_PAIRS.to(codes.device).index_select(0, codes.int()).view(-1, block_size)  # (blocks, block)
    values.mul_(absmax[:, None])
    return values.view(-1)[:_numel(shape)].view(shape).to(dtype)


def _pad_to(flat: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = -flat.numel() % multiple
    return F.pad(flat, (0, pad)) if pad else flat


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


__all__ = ["BLOCK_SIZE", "SCALE_BLOCK_SIZE", "NF4_VALUES", "NF4Weight", "NF4Linear", "nf4_code_values",
           "quantize_nf4", "dequantize_nf4", "quantize_scales", "dequantize_scales", "nf4_tensor_bytes"]
