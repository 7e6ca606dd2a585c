"""Inference weight layout for memory-bound decode on CPU, applied to a built model from outside.

Measured here (2 cores, MKL): a one-row GEMM (decode: ``x (1, k) @ W.T``) runs on ONE thread and streams the weights
at ~13 GB/s with PyTorch's row-major ``(out, in)`` layout, and MKL's GEMMs with 2-8 rows stream them at only 9-18
GB/s. ``apply_decode_layout`` replaces every ``nn.Linear`` of the decoder layers and the output head with a
``BlockedLinear`` holding ``W`` tile-major, ``(P, in, B)``: block p holds output columns p*B .. (p+1)*B. With the
native kernels built, B is one strip of two vector registers (16 columns with AVX2, 32 with AVX-512;
``skinny_gemm.strip_width``): up to 8 rows run in ``kernels/skinny_gemm.c``, which streams several blocks side by
side, more rows in ``kernels/blocked_gemm.c``, which reads such blocks as they are (wider ones it must copy into
strips for every 256-row slice, measured 17-44% of its time at 64-16 rows). Without a compiler B is 128 and more
rows run as one batched matmul over the blocks. Outputs are the same numbers up to float summation order.
Projections that read the same input (q/k/v, gate/up) are fused into one ``BlockedLinear`` shared by ``FusedSlice``
views: fewer, larger matmuls, which matters on small models where each call's fixed cost is a large part of a decode
step. The engine applies it to its private model; the model you save or train is never touched (use it only on a
model you will not train or export afterwards)."""

from __future__ import annotations

import torch
from torch import nn

from cubelm.engine.kernels import skinny_gemm
from cubelm.model.seam import replace_module


def _block_width(out_features: int, head: bool = False) -> int:
    strip = skinny_gemm.strip_width()
    if strip and out_features % strip == 0:
        return strip  # what the native GEMMs read without repacking (skinny_gemm.strip_width)
    # the head only ever sees the sampled rows (few): the layout the few-row kernel likes
    for width in (64,) if head else (128, 64):
        if out_features % width == 0 and out_features > width:
            return width
    return out_features


class BlockedLinear(nn.Module):
    """``y = x W^T + b`` with W stored tile-major, ``(P, in, B)``: block p = output columns p*B .. (p+1)*B.

    Up to ``skinny_gemm.MAX_ROWS`` rows (decode) run in the native kernel, which streams each tile once and
    writes the row-major output directly; more rows (batched decode, prompt chunks) in ``kernels/blocked_gemm.c``,
    a register-blocked GEMM over the same layout (5-25% above MKL's batched matmul over the blocks on base's
    shapes, which remains the path without a compiler). Block width: one strip (``skinny_gemm.strip_width``) when
    the kernels are built: against 128-column blocks, measured interleaved on base's shapes with the weights in
    DRAM (2 threads), 1.02-1.17x at 16-64 rows, 1.0-1.5x at 1-4 rows, and the whole 64-request workload 1.07-1.09x;
    batch-1 decode of `small` 1.15x. Without the kernels: 128 columns (the bmm ~6% faster at 1,024 rows than 64),
    the output head 64."""

    def __init__(self, linear: nn.Linear, block: int | None = None):
        super().__init__()
        out_features, in_features = linear.weight.shape
        block = block or _block_width(out_features)
        if out_features % block:
            raise ValueError(f"block width {block} must divide out_features {out_features}")
        self.in_features, self.out_features, self.parts = in_features, out_features, out_features // block
        w = linear.weight.detach()
        # (out, in) -> (in, out) -> (in, P, B) -> (P, in, B)
        self.register_buffer("weight_blocks", w.T.contiguous().view(in_features, self.parts, block)
                             .permute(1, 0, 2).contiguous())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.use_kernel = w.device.type == "cpu" and w.dtype == torch.float32 and skinny_gemm.available()
        # more rows: the register-blocked kernel (kernels/blocked_gemm.c), else one batched matmul over the blocks
        self.use_many_rows_kernel = self.use_kernel and skinny_gemm.many_rows_available()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        rows = x2.shape[0]
        if self.use_kernel and not torch.compiler.is_compiling() and \
                (rows <= skinny_gemm.MAX_ROWS or self.use_many_rows_kernel):
            gemm = skinny_gemm.skinny_gemm if rows <= skinny_gemm.MAX_ROWS else skinny_gemm.blocked_gemm
            y = gemm(x2.contiguous(), self.weight_blocks).view(*lead, self.out_features)
        else:
            y = torch.bmm(x2.unsqueeze(0).expand(self.parts, -1, -1), self.weight_blocks)  # (P, M, B)
            y = y.transpose(0, 1).reshape(*lead, self.out_features)
        return y if self.bias is None else y + self.bias


class _Fused:
    """One matmul for several projections of the same input; remembers the last input it saw (by identity)."""

    def __init__(self, linears: list[nn.Linear], block: int | None):
        fused = nn.Linear(linears[0].in_features, sum(lin.out_features for lin in linears),
                          bias=linears[0].bias is not None, device=linears[0].weight.device,
                          dtype=linears[0].weight.dtype)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([lin.weight for lin in linears]))
            if fused.bias is not None:
                fused.bias.copy_(torch.cat([lin.bias for lin in linears]))
        self.linear = BlockedLinear(fused, block if block and fused.out_features % block == 0 else None)
        self.sizes = [lin.out_features for lin in linears]
        self._input: torch.Tensor | None = None
        self._outputs: tuple[torch.Tensor, ...] = ()

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if x is not self._input:  # NOTE: the first of the projections called on a new input computes all of them
            self._outputs = torch.split(self.linear(x), self.sizes, dim=-1)
            self._input = x
        out = self._outputs[index]
        if index == len(self.sizes) - 1:  # the last consumer: drop the references (no stale activations kept)
            self._input, self._outputs = None, ()
        return out


class FusedSlice(nn.Module):
    """Stands where one of the fused projections was; returns its slice of the fused output."""

    def __init__(self, fused: _Fused, index: int):
        super().__init__()
        self.fused, self.index = fused, index
        if index == 0:
            self.fused_linear = fused.linear  # registered once, so .to() / buffers follow the module tree

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.output(x, self.index)


def _fuse(parent: nn.Module, names: list[str], block: int | None, done: dict) -> None:
    """``done`` maps the ids of linears already fused to their ``_Fused``: layers that share projections
    (``cubelm compress share``) share one fused copy. Factorized projections (``LowRankLinear``) are not
    ``nn.Linear``: they stay unfused, and their two factors become ``BlockedLinear`` below."""
    linears = [getattr(parent, n) for n in names]
    if not all(isinstance(lin, nn.Linear) for lin in linears) or len({lin.bias is None for lin in linears}) != 1:
        return
    key = tuple(id(lin) for lin in linears)
    if key not in done:
        done[key] = (_Fused(linears, block), linears)  # the linears kept alive so their ids stay unique
    for i, n in enumerate(names):
        setattr(parent, n, FusedSlice(done[key][0], i))


def apply_decode_layout(model: nn.Module, block: int | None = None) -> nn.Module:
    """Fuse q/k/v and gate/up, then swap the remaining ``nn.Linear`` modules of the decoder and the head for
    ``BlockedLinear`` (block width ``block`` where it divides the output size, else 128 or 64), and the decoder
    layers for ``FusedDecoderLayer`` (their elementwise work in native kernels: ``cubelm.engine.fused_decode``).
    Idempotent.

    CPU only: on other devices the model is returned unchanged (cuBLAS already streams few-row GEMMs well, and
    the native kernels are CPU code), so callers can apply it whatever the device."""
    param = next(model.parameters(), None)
    if param is not None and param.device.type != "cpu":
        return model
    fused: dict = {}
    for layer in getattr(getattr(model, "model", None), "layers", []):
        _fuse(layer.self_attn, ["q_proj", "k_proj", "v_proj"], block, fused)
        _fuse(layer.mlp, ["gate_proj", "up_proj"], block, fused)
    # every path to a module (remove_duplicate=False): a projection shared by several layers gets one
    # BlockedLinear, put everywhere the linear was
    targets = [(name, mod) for name, mod in model.named_modules(remove_duplicate=False) if isinstance(mod, nn.Linear)]
    blocked: dict[int, BlockedLinear] = {}
    for name, linear in targets:
        width = block if block and linear.out_features % block == 0 else None
        if width is None and name == "lm_head":
            width = _block_width(linear.out_features, head=True)
        if id(linear) not in blocked:
            blocked[id(linear)] = BlockedLinear(linear, width)
        replace_module(model, name, blocked[id(linear)])
    from cubelm.engine.fused_decode import apply_fused_layers  # imports this module: imported late
    return apply_fused_layers(model)
