"""Python side of ``decode_ops.c``: the fused elementwise ops of a decoder layer (RMSNorm, residual add + RMSNorm,
in-place RoPE, SiLU * mul) on fp32 CPU rows, one native call each.

Inputs are 2-D row views: any row stride, unit column stride (what slicing a fused projection's output gives).
Callers check ``supports`` and keep the eager PyTorch ops otherwise (other dtypes or devices, no compiler,
``CUBELM_KERNELS=0``, inside ``torch.compile``)."""

from __future__ import annotations

import ctypes

import torch

from cubelm.engine import kernels

PARALLEL_ROWS = 64  # below this many rows a second thread costs more to wake than the rows take
_i64, _ptr, _f32, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
_SIGNATURES = {
    "rmsnorm": [_ptr, _i64, _ptr, _ptr, _i64, _i64, _f32, _int],
    "add_rmsnorm": [_ptr, _i64, _ptr, _i64, _ptr, _ptr, _i64, _i64, _f32, _int],
    "rope": [_ptr, _i64, _i64, _i64, _ptr, _ptr, _i64, _int],
    "silu_mul": [_ptr, _i64, _ptr, _i64, _ptr, _i64, _i64, _int],
}
_fns: dict | None = None


def available() -> bool:
    global _fns
    if _fns is None:
        fns = {name: kernels.function("decode_ops", name, sig) for name, sig in _SIGNATURES.items()}
        _fns = fns if all(fns.values()) else {}
    return bool(_fns)


def supports(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and available()


def rows_view(x: torch.Tensor) -> torch.Tensor:
    """(..., n) -> a 2-D view (rows, n) with unit column stride (a copy only if there is no such view)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(1) == 1 or x2.shape[1] == 1 else x2.contiguous()


def _threads(rows: int) -> int:
    return torch.get_num_threads() if rows >= PARALLEL_ROWS else 1


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rmsnorm(x) * weight as a new contiguous tensor of x's shape."""
    x2 = rows_view(x)
    y = torch.empty(x2.shape, dtype=x.dtype)
    _fns["rmsnorm"](x2.data_ptr(), x2.stride(0), weight.data_ptr(), y.data_ptr(), x2.shape[0], x2.shape[1], eps,
                    _threads(x2.shape[0]))
    return y.view(x.shape)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x += delta`` in place (x must be contiguous: it is the residual stream), then rmsnorm(x) * weight as a
    new tensor."""
    assert x.is_contiguous()
    x2, d2 = x.view(-1, x.shape[-1]), rows_view(delta)
    y = torch.empty(x2.shape, dtype=x.dtype)
    _fns["add_rmsnorm"](x2.data_ptr(), x2.stride(0), d2.data_ptr(), d2.stride(0), weight.data_ptr(), y.data_ptr(),
                        x2.shape[0], x2.shape[1], eps, _threads(x2.shape[0]))
    return y.view(x.shape)


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> None:
    """Rotate-half RoPE in place on x (rows, heads * head_dim) (a row view with unit column stride, e.g. the q and
    k columns of a fused q/k/v output), cos/sin (rows, head_dim) contiguous fp32."""
    assert x.dim() == 2 and x.stride(1) == 1 and cos.is_contiguous() and sin.is_contiguous()
    _fns["rope"](x.data_ptr(), x.stride(0), x.shape[1] // head_dim, head_dim, cos.data_ptr(), sin.data_ptr(),
                 x.shape[0], _threads(x.shape[0]))


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for row views (rows, I) of any row stride -> a new contiguous (rows, I)."""
    y = torch.empty(gate.shape, dtype=gate.dtype)
    _fns["silu_mul"](gate.data_ptr(), gate.stride(0), up.data_ptr(), up.stride(0), y.data_ptr(), gate.shape[0],
                     gate.shape[1], _threads(gate.shape[0]))
    return y
