"""Embedding vectors after the model: Matryoshka truncation, L2 normalization, scalar and binary quantization,
and the base64 wire format of OpenAI's embeddings API.

- Matryoshka (book §3.3.2; Kusupati et al. 2022): models trained with a nested loss keep most of their quality in
  the first ``d`` dimensions; truncate, then re-normalize so that dot products are cosines again.
- int8 / uint8: per-dimension calibration range ``[min, max]`` split into 256 buckets (as sentence-transformers'
  ``quantize_embeddings``): ``floor((x - min) / ((max - min) / 255))`` clipped to 0..255, int8 shifted by -128.
  The ranges come from a calibration set of embeddings (the vectors themselves only as a last resort: one vector
  has no range). 4x smaller than float32.
- binary / ubinary: one bit per dimension (``x > 0``), packed 8 per byte, big-endian bit order (numpy
  ``packbits``); binary is the uint8 shifted by -128 to int8 (what faiss' binary indexes and sentence-transformers
  use). 32x smaller; Hamming distance approximates the angle, and rescoring with the float vectors restores most
  of the ranking quality.
"""

from __future__ import annotations

import base64

import numpy as np
import torch

from cubelm.errors import CubelmError

PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")


def truncate_normalize(vectors: torch.Tensor, dimensions: int | None = None, *, normalize: bool = True) -> torch.Tensor:
    """(n, d) -> (n, dimensions): the first ``dimensions`` coordinates, then unit L2 norm (if ``normalize``)."""
    if dimensions is not None:
        check_dimensions(dimensions, vectors.shape[-1])
        vectors = vectors[..., :dimensions]
    if normalize:
        vectors = torch.nn.functional.normalize(vectors, p=2, dim=-1)
    return vectors.contiguous()


def check_dimensions(dimensions: int, dim: int) -> None:
    if not isinstance(dimensions, int) or isinstance(dimensions, bool) or not 1 <= dimensions <= dim:
        raise CubelmError(f"dimensions must be an integer in 1..{dim} (the model's embedding size), got "
                          f"{dimensions!r}")


def quantization_ranges(calibration: np.ndarray | torch.Tensor) -> np.ndarray:
    """(2, d) per-dimension [min; max] of a calibration set of float embeddings (n >= 2)."""
    cal = _as_float_array(calibration)
    if cal.ndim != 2 or cal.shape[0] < 2:
        raise CubelmError(f"int8/uint8 calibration needs at least 2 embeddings as an (n, d) array, got shape "
                          f"{cal.shape}; pass ranges or more calibration embeddings")
    return np.stack([cal.min(axis=0), cal.max(axis=0)])


def quantize_embeddings(embeddings: np.ndarray | torch.Tensor, precision: str, *, ranges: np.ndarray | None = None,
                        calibration: np.ndarray | torch.Tensor | None = None) -> np.ndarray:
    """Quantize float embeddings (n, d) to ``precision`` (see the module docstring).

    int8/uint8 use ``ranges`` (2, d) if given, else the ranges of ``calibration``, else of ``embeddings``
    themselves (which then must hold at least 2 vectors). binary/ubinary return (n, ceil(d / 8)) bytes.
    """
    if precision not in PRECISIONS:
        raise CubelmError(f"precision {precision!r} is not supported; use one of {', '.join(PRECISIONS)}")
    x = _as_float_array(embeddings)
    if precision == "float32":
        return x
    if precision in ("binary", "ubinary"):
        packed = np.packbits(x > 0, axis=-1)
        return packed if precision == "ubinary" else (packed.astype(np.int16) - 128).astype(np.int8)
    if ranges is None:
        ranges = quantization_ranges(calibration if calibration is not None else x)
    ranges = np.asarray(ranges, dtype=np.float32)
    if ranges.shape != (2, x.shape[-1]):
        raise CubelmError(f"ranges must have shape (2, {x.shape[-1]}), got {ranges.shape}")
    start = ranges[0]
    step = (ranges[1] - start) / np.float32(255)
    step = np.where(step == 0, np.float32(1), step)  # a constant dimension: every value in bucket 0
    buckets = np.clip(np.floor((x - start) / step), 0, 255)
    return buckets.astype(np.uint8) if precision == "uint8" else (buckets - 128).astype(np.int8)


def dequantize_int8(codes: np.ndarray, ranges: np.ndarray, precision: str = "int8") -> np.ndarray:
    """Bucket centres of int8/uint8 codes: an approximation of the float vectors (for rescoring or inspection)."""
    ranges = np.asarray(ranges, dtype=np.float32)
    step = (ranges[1] - ranges[0]) / np.float32(255)
    b = codes.astype(np.float32) + (128 if precision == "int8" else 0)
    return ranges[0] + (b + 0.5) * step


def _as_float_array(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise CubelmError(f"embeddings to quantize must be floating point, got {x.dtype}")
    return x.astype(np.float32, copy=False)


def to_base64(vector: torch.Tensor | np.ndarray) -> str:
    """OpenAI's ``encoding_format: base64``: the little-endian float32 bytes of the vector, base64-encoded."""
    arr = vector.detach().cpu().numpy() if isinstance(vector, torch.Tensor) else np.asarray(vector)
    return base64.b64encode(arr.astype("<f4", copy=False).tobytes()).decode("ascii")


def from_base64(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4")
