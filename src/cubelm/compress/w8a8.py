"""W8A8: int8 weights (one scale per output channel) times int8 activations (one scale per token), int32 sums.

    from cubelm.compress.w8a8 import apply_w8a8
    apply_w8a8(model)                          # plain W8A8 on every decoder projection, in place
    apply_w8a8(model, outlier_threshold=6.0)   # LLM.int8(): input columns with some |x| > 6 stay in float

Weight-only quantization (``cubelm.compress.quantize``) keeps activations in float; here both operands of each
projection's matmul are int8 (book §10.8): ``y[t, n] ≈ sx[t] · sw[n] · Σ_k qx[t, k] · qw[n, k]`` with
``sw[n] = max_k |W[n, k]| / 127`` (static, per output channel) and ``sx[t] = max_k |x[t, k]| / 127`` (dynamic,
computed for each token as it arrives). The sum is an exact int32 integer; the only errors are the two roundings.

Why it is hard (§10.8.1): a token's scale follows its largest entry, and trained transformers have a few input
*channels* (the same k for every token) whose values are 10-100x the others. One such channel sets ``sx[t]`` for
every token, and the ordinary channels are rounded onto a few codes. Two fixes:

- **LLM.int8()** (Dettmers et al. 2022), ``outlier_threshold``: the columns ``k`` where some token has
  ``|x[t, k]| > threshold`` (6.0 in the paper) are taken out; that slice of the matmul runs in float on both sides
  (the paper's ``X_f16 W_f16`` over the outlier dimensions; fp32 here), the rest in int8 x int8 with per-token
  scales computed without the outliers. The columns are found per call (dynamic), so the layer never needs
  calibration, but it keeps the float weight next to the int8 one (any column may turn out to be an outlier;
  bitsandbytes' inference mode instead dequantizes the int8 columns, which loses the weight side's precision
  where a column's weights are small next to the rest of their row). ``outlier_stats`` counts the float columns.
- **SmoothQuant** (Xiao et al. 2023): ``cubelm.compress.smoothquant`` divides the outlier channels by a scale
  folded into the previous layer and multiplies the weight columns by it, then this plain W8A8 applies.

The integer matmul is exact either way: ``torch._int_mm`` (int8 x int8 -> int32), or the int8 codes as float32
in chunks of at most ``EXACT_FP32_K`` = 1,024 inputs, the chunks' partial sums added in int32. Why float32 is exact
there: every product is an integer of magnitude at most 127² = 16,129, so every partial sum a BLAS forms, in any
order and with or without FMA, is an integer of magnitude at most K · 16,129 < 2^24 for K ≤ 1,040, and float32
represents all integers below 2^24, so no operation rounds. The float path is the default: PyTorch 2.13's
``_int_mm`` on CPU is as fast for some shapes and up to 8x slower for others (``benchmarks/w8a8_matmul.py`` on a
2-core AVX2 host: 256x688x256 both 2.5x the fp32 matmul; 2048x256x688 2.3x vs 18x); ``use_int_mm=True`` selects
it, and a test checks both against an int64 reference.
This module is about accuracy: the emulation quantizes the activations in PyTorch on every call and is slower than
the float model (the speed of int8 arithmetic is the native kernels' business, ``cubelm.engine.kernels.qgemm``).
"""

from __future__ import annotations

import torch
from torch import nn

from cubelm.errors import CubelmError
from cubelm.model.seam import PROJECTIONS, find_linears, replace_module

METHODS = ("plain", "llm.int8", "smoothquant")
DEFAULT_THRESHOLD = 6.0  # LLM.int8()'s outlier magnitude

EXACT_FP32_K = 1024  # inputs per float32 chunk of an exact int8 matmul (bound: 2^24 / 127² = 1,040)

_INT_MM_OK: dict[str, bool] = {}


def int_mm_available(device: torch.device | str = "cpu") -> bool:
    """Whether ``torch._int_mm`` runs (and is right) on ``device``: probed once per device type."""
    kind = torch.device(device).type
    if kind not in _INT_MM_OK:
        try:
            a = torch.tensor([[127, -127, 3]], dtype=torch.int8, device=device)
            b = torch.tensor([[127], [127], [-1]], dtype=torch.int8, device=device)
            _INT_MM_OK[kind] = int(torch._int_mm(a, b).item()) == -3
        except (AttributeError, RuntimeError, NotImplementedError):
            _INT_MM_OK[kind] = False
    return _INT_MM_OK[kind]


def int8_matmul(a: torch.Tensor, b: torch.Tensor, *, use_int_mm: bool = False) -> torch.Tensor:
    """Exact ``a @ b`` of int8 ``(M, K)`` and int8 ``(K, N)`` as int32 ``(M, N)`` (module docstring)."""
    if use_int_mm and int_mm_available(a.device):
        return torch._int_mm(a.contiguous(), b)
    K = a.shape[1]
    acc = None
    for k0 in range(0, K, EXACT_FP32_K):
        part = (a[:, k0:k0 + EXACT_FP32_K].to(torch.float32) @ b[k0:k0 + EXACT_FP32_K].to(torch.float32))
        part = part.to(torch.int32)  # an exact integer below 2^24: the conversion is exact too
        acc = part if acc is None else acc + part
    return acc if acc is not None else torch.zeros(a.shape[0], b.shape[1], dtype=torch.int32, device=a.device)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of fp32 ``x (M, K)`` -> int8 codes ``(M, K)`` and scales ``(M,)``: ``x ≈ codes * scales[:, None]``,
    symmetric, the row's absmax mapped to ±127 (an all-zero row gets scale 0 and codes 0)."""
    amax = x.abs().amax(dim=1)
    scale = amax / 127
    codes = torch.round(x / torch.where(amax > 0, scale, 1)[:, None]).clamp_(-127, 127).to(torch.int8)
    return codes, scale


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``W (N, K)`` -> int8 codes ``(N, K)`` and fp32 scales ``(N,)``, one per output channel (row)."""
    return quantize_per_token(weight.detach().to(torch.float32))


class W8A8Linear(nn.Module):
    """``y = x W^T + b`` with int8 weights and dynamically int8-quantized activation rows (module docstring).

    ``outlier_threshold`` None: plain W8A8; a number: LLM.int8()'s decomposition at that magnitude."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 outlier_threshold: float | None = None):
        super().__init__()
        if outlier_threshold is not None and not outlier_threshold > 0:
            raise CubelmError(f"the outlier threshold must be a positive magnitude, got {outlier_threshold!r}")
        self.out_features, self.in_features = weight.shape
        codes, scales = quantize_per_channel(weight)
        # NOTE: stored transposed (K, N) and contiguous: the right operand of _int_mm, read once per call
        self.register_buffer("qweight_t", codes.t().contiguous())
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())
        # LLM.int8 only: the float weight, (N, K), read for the outlier columns
        self.register_buffer("weight", None if outlier_threshold is None else
                             weight.detach().to(torch.float32).clone())
        self.outlier_threshold = outlier_threshold
        self.outlier_stats = {"calls": 0, "float_columns": 0}  # LLM.int8: columns sent to fp32, summed over calls

    @classmethod
    def from_linear(cls, linear: nn.Linear, outlier_threshold: float | None = None) -> W8A8Linear:
        return cls(linear.weight, linear.bias, outlier_threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(torch.float32)
        y = None
        if self.outlier_threshold is not None:
            cols = (x2.abs() > self.outlier_threshold).any(dim=0)  # (K,) bool: this call's outlier columns
            if bool(cols.any()):
                self.outlier_stats["float_columns"] += int(cols.sum())
                y = x2[:, cols] @ self.weight[:, cols].t()  # (M, n_out) @ (n_out, N): the float slice
                x2 = x2.masked_fill(cols, 0.0)  # the int8 part quantizes without them (their codes are 0)
            self.outlier_stats["calls"] += 1
        codes, sx = quantize_per_token(x2)
        acc = int8_matmul(codes, self.qweight_t)  # (M, N) int32, exact
        out = acc.to(torch.float32) * sx[:, None] * self.scales
        out = out if y is None else out + y
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype).view(*lead, self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        return (self.qweight_t.t().to(torch.float32) * self.scales[:, None])

    def extra_repr(self) -> str:
        mode = "plain" if self.outlier_threshold is None else f"llm.int8 threshold={self.outlier_threshold:g}"
        return f"in_features={self.in_features}, out_features={self.out_features}, {mode}"


def apply_w8a8(model: nn.Module, outlier_threshold: float | None = None,
               targets: tuple[str, ...] = PROJECTIONS) -> nn.Module:
    """Replace the decoder's projections (``nn.Linear``) with ``W8A8Linear`` in place; the output head stays in
    float, as in the weight-only path (its rows are the vocabulary, and it runs once per token, after the last
    norm). Inference only. For SmoothQuant, smooth first (``cubelm.compress.smoothquant.apply_smoothing``)."""
    replaced = 0
    for name, mod in find_linears(model, targets):
        if isinstance(mod, nn.Linear):
            replace_module(model, name, W8A8Linear.from_linear(mod, outlier_threshold))
            replaced += 1
    if not replaced:
        raise CubelmError("the model has no float projection to quantize (already quantized? load its float "
                          "source)")
    return model


def outlier_summary(model: nn.Module) -> dict:
    """LLM.int8: the mean number of input columns per call that ran in fp32, over all W8A8 layers that saw any."""
    layers = [m for m in model.modules() if isinstance(m, W8A8Linear) and m.outlier_stats["calls"]]
    calls = sum(m.outlier_stats["calls"] for m in layers)
    cols = sum(m.outlier_stats["float_columns"] for m in layers)
    widths = sum(m.in_features * m.outlier_stats["calls"] for m in layers)
    return {"calls": calls, "mean_float_columns": cols / max(1, calls), "float_share": cols / max(1, widths)}
