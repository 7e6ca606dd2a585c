"""Weight-only int8 and int4 quantization of linear layers: the format, the quantizer and the dequantizer.

Inference reads every weight once per decode step, so a decode step costs (about) the bytes of the weights
(book §10.2-10.5); storing them in 8 or 4 bits cuts those bytes 4x or ~6.4x against fp32. Activations stay in
floating point in the model (weights are easy to quantize, activations have outliers, §10.8.1); the native
kernel (``cubelm.engine.kernels.qgemm``) quantizes each activation row on the fly, in blocks of 32, to use the
CPU's integer dot products, and a block's scale follows its own outliers.

Formats, for a weight ``W`` of shape ``(out, in)`` (PyTorch's ``nn.Linear`` layout):

- **int8** (``method="int8"``): symmetric, one scale per output channel (row).
  ``scales[n] = max_k |W[n, k]| / 127``, ``qweight[n, k] = round(W[n, k] / scales[n])`` in [-127, 127], int8
  ``(out, in)``; ``scales`` fp32 ``(out,)``. ``W ≈ qweight * scales[:, None]``; error at most half a step,
  ``scales[n] / 2``. 8 bits + 32/in bits per weight.
- **int4** (``method="int4"``, ``group_size`` g in {32, 64, 128}): symmetric, one scale per group of g
  consecutive inputs of a row. g must divide the model's hidden size (the input of most projections); a row whose
  length g does not divide (``tiny``'s MLP intermediate size 688 = 21·32 + 16) ends with a shorter group, and its
  packed codes are padded with zero weights to whole 32-input blocks. As in llama.cpp's Q4_0, the scale carries
  the sign of the group's largest-magnitude weight ``m``: ``scales[n, j] = m / -8``, so ``m`` itself maps to -8
  exactly and all 16 codes -8..7 are used (a plain ``absmax / 7`` leaves one unused);
  ``q = clamp(round(W / scale), -8, 7)``. Error at most half a step except a weight of the opposite sign and the
  same magnitude as ``m``, clamped to 7 (one step).
  Packing: ``qweight`` uint8 ``(out, 16 · ceil(in / 32))``; each aligned block of 32 inputs becomes 16 bytes where
  byte j holds ``q[j] + 8`` in its low nibble and ``q[j + 16] + 8`` in its high nibble (one 16-byte load then
  unpacks to the block's 32 values in order with two masks and a shift). ``scales`` fp32 ``(out, ceil(in / g))``.
  4 + 32/g bits per weight: 5 at g = 32, 4.25 at g = 128.

Why symmetric (no zero point): trained weights are close to zero-mean within a row and within a group, so an
offset buys little range; without it the integer dot product of the codes with the quantized activations *is*
the result up to one multiplication by the scales (an asymmetric code would add a ``zero · sum(x)`` correction
per group and one more stored number per group). The quality targets hold symmetric (docs/benchmarks.md).

On disk (``cubelm quantize``, ``cubelm.compress.quantized_io``) each quantized projection ``P`` of the checkpoint
is stored as ``P.qweight`` and ``P.scales`` (and ``P.bias`` if it has one) in ``model.safetensors``, and
``config.json`` gains a ``quantization_config`` block (see ``quantization_config``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cubelm.errors import CubelmError

METHODS = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 32  # best quality of the three; ~10% slower decode than 128 (docs/benchmarks.md)
BLOCK = 32  # inputs per packed int4 block and per activation-quantization block of the kernels
FORMAT_NAME = "cubelm"  # quantization_config.quant_method


def check_method(method: str, group_size: int | None = None) -> None:
    """One-line errors for an unknown method or group size (the hidden size: ``check_hidden_size``)."""
    if method not in METHODS:
        raise CubelmError(f"unknown quantization {method!r}; choose one of {', '.join(METHODS)}")
    if method == "int4" and group_size not in GROUP_SIZES:
        raise CubelmError(f"int4 group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size!r}")


def check_hidden_size(method: str, group_size: int | None, hidden_size: int) -> None:
    if method == "int4" and hidden_size % group_size:
        fits = [str(g) for g in GROUP_SIZES if hidden_size % g == 0]
        raise CubelmError(f"int4 group size {group_size} does not divide the model's hidden size {hidden_size}; "
                          + (f"choose {' or '.join(fits)}" if fits else "use int8"))


@dataclass(frozen=True, slots=True)
class QuantizedWeight:
    """One ``(out, in)`` weight in cubelm's int8 or int4 format (module docstring)."""

    method: str
    qweight: torch.Tensor  # int8 (out, in) | uint8 (out, in / 2)
    scales: torch.Tensor  # fp32 (out,) | (out, in / group_size)
    in_features: int
    group_size: int | None = None  # int4 only

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def nbytes(self) -> int:
        return self.qweight.numel() * self.qweight.element_size() + self.scales.numel() * 4

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.method == "int8":
            return (self.qweight.to(torch.float32) * self.scales[:, None]).to(dtype)
        q = unpack_int4(self.qweight).to(torch.float32)  # (out, 32 * blocks)
        q = torch.nn.functional.pad(q, (0, self.scales.shape[1] * self.group_size - q.shape[1]))
        w = q.view(self.out_features, -1, self.group_size) * self.scales[:, :, None]
        return w.view(self.out_features, -1)[:, :self.in_features].to(dtype)


def quantize_weight(weight: torch.Tensor, method: str, group_size: int | None = None) -> QuantizedWeight:
    """Quantize a 2-D weight ``(out, in)`` (any float dtype) to ``method``; computed in fp32."""
    check_method(method, group_size)
    if weight.dim() != 2:
        raise CubelmError(f"only 2-D weights can be quantized, got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    w = weight.detach().to(torch.float32)
    if method == "int8":
        scales = w.abs().amax(dim=1) / 127
        q = torch.round(w / torch.where(scales > 0, scales, 1)[:, None]).clamp_(-127, 127).to(torch.int8)
        return QuantizedWeight("int8", q.contiguous(), scales.contiguous(), in_features)
    num_groups = -(-in_features // group_size)
    # NOTE: a row whose length is not a multiple of the group size (the MLP intermediate size of `tiny`, 688) ends
    # with a shorter group, padded with zero weights (code 0) to whole 32-input blocks; the kernels' activation
    # blocks are padded with zeros too, so the padding never contributes
    padded = torch.nn.functional.pad(w, (0, num_groups * group_size - in_features))
    groups = padded.view(out_features, num_groups, group_size)
    idx = groups.abs().argmax(dim=2, keepdim=True)
    scales = groups.gather(2, idx).squeeze(2) / -8  # signed: the largest magnitude maps to -8 exactly
    safe = torch.where(scales != 0, scales, 1)
    q = torch.round(groups / safe[:, :, None]).clamp_(-8, 7).to(torch.int8).view(out_features, -1)
    return QuantizedWeight("int4", pack_int4(q[:, :_blocks(in_features) * BLOCK]), scales.contiguous(), in_features,
                           group_size)


def _blocks(in_features: int) -> int:
    return -(-in_features // BLOCK)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7], ``(out, 32 * blocks)`` -> uint8 ``(out, 16 * blocks)`` (module docstring)."""
    out_features, in_features = q.shape
    codes = (q.to(torch.int16) + 8).to(torch.uint8).view(out_features, in_features // BLOCK, 2, BLOCK // 2)
    return (codes[:, :, 0] | (codes[:, :, 1] << 4)).reshape(out_features, in_features // 2).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 ``(out, 16 * blocks)`` -> int8 codes in [-8, 7], ``(out, 32 * blocks)``."""
    out_features = packed.shape[0]
    blocks = packed.view(out_features, -1, BLOCK // 2)
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=2)  # (out, blocks, 2, 16): low nibbles first
    return (codes.to(torch.int8) - 8).view(out_features, -1)


def quantize_activations(x: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """What the native kernel does to its input rows: each row cut into blocks of ``block`` (the last one may be
    shorter), each block symmetric int8 against its own absmax. Returns codes int8 ``(M, K)`` and scales fp32
    ``(M, ceil(K / block))``; ``x ≈ codes * scales`` per block. The kernel tests use it as their reference."""
    M, K = x.shape
    nb = -(-K // block)
    padded = torch.nn.functional.pad(x.to(torch.float32), (0, nb * block - K)).view(M, nb, block)
    amax = padded.abs().amax(dim=2)
    # NOTE: the same two float operations as the C code (inverse scale 127 / amax, then x * inverse), so the
    # codes are identical, not merely close
    inv = torch.where(amax > 0, 127 / torch.where(amax > 0, amax, 1), 0)
    codes = torch.round(padded * inv[:, :, None]).clamp_(-127, 127).to(torch.int8).view(M, nb * block)[:, :K]
    return codes.contiguous(), amax / 127


def quantization_config(method: str, group_size: int | None, include_head: bool) -> dict:
    """The ``quantization_config`` block of a quantized directory's config.json."""
    return {"quant_method": FORMAT_NAME, "method": method, "bits": 8 if method == "int8" else 4,
            "group_size": group_size if method == "int4" else None, "symmetric": True,
            "layout": "int8 rows, fp32 scale per row" if method == "int8" else
            "int4 q4_0-style nibbles (byte j of each 32-input block: q[j]+8 low, q[j+16]+8 high), fp32 scale per "
            "group, signed",
            "include_head": include_head, "format_version": 1}
