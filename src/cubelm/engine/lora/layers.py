"""``BatchedLoRALinear``: one projection serving every active adapter at once, rows of the base included.

Applied from outside through ``cubelm.model.seam`` after the engine's decode layout, so it wraps whatever the
projection is by then (a ``BlockedLinear``, a q/k/v or gate/up ``FusedSlice`` on CPU, ``nn.Linear`` elsewhere)
and the blocked and fused kernels are untouched; the model's ``forward`` gains no branch. Each layer holds
``max_loras`` slots of stacked, zero-padded weights, A (slots, r_max, in) and s B^T (slots, r_max, out), and
reads the step's row->slot mapping from the shared ``LoRAContext`` that the runner sets before each forward
(as the paged attention's metadata), never from ``forward`` arguments.

The low-rank product runs per adapter segment (Punica/S-LoRA's SGMV shape): the runner orders each step's rows
so that the rows of one adapter are contiguous (decodes sorted by slot, then prompt chunks sorted by slot). Steps of
a few rows (decode) go to one native call per projection that does every segment (``kernels/lora_delta.c``: in
PyTorch each segment costs two small GEMMs and their dispatch, more than the arithmetic); steps with prompt chunks
run two GEMMs per segment, ``y[seg] += (x[seg] A_s^T) (s B_s^T)``, at the adapter's own rank for that module (the
padding is never multiplied). Base rows cost nothing. Measured against a per-row gathered product (BGMV: each
row's A and B gathered, two batched matmuls) in ``benchmarks/multi_lora.py --kernels``: the gather copies
r x (in + out) weights per row, which on CPU costs more than the products themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from cubelm.engine.kernels import lora_delta
from cubelm.model.seam import PROJECTIONS, find_linears, replace_module


@dataclass(slots=True)
class LoRAContext:
    """The step's rows by adapter: ``segments`` = (slot, first row, end row) of every run of adapter rows in the
    flat batch (base rows are in no segment), also as an int64 (n, 3) tensor for the kernel. Shared by all the
    layers; the runner sets it every step."""
    segments: list[tuple[int, int, int]] = field(default_factory=list)
    segment_tensor: torch.Tensor | None = None

    def set(self, segments: list[tuple[int, int, int]]) -> None:
        self.segments = segments
        self.segment_tensor = torch.tensor(segments, dtype=torch.int64).view(-1, 3) if segments else None


class BatchedLoRALinear(nn.Module):
    def __init__(self, base_layer: nn.Module, context: LoRAContext, max_loras: int, max_rank: int,
                 *, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.base_layer, self.context = base_layer, context
        self.in_features, self.out_features = in_features, out_features
        padded = -(-max_rank // lora_delta.RANK_MULTIPLE) * lora_delta.RANK_MULTIPLE
        # A^T (slots, in, r_pad) and s B^T (slots, r_pad, out): both factors row-major in the order they are read
        self.register_buffer("lora_at", torch.zeros(max_loras, in_features, padded, dtype=dtype, device=device))
        self.register_buffer("lora_bt", torch.zeros(max_loras, padded, out_features, dtype=dtype, device=device))
        self.ranks = [0] * max_loras  # rank of each slot's adapter on this module; 0 = the adapter leaves it alone
        self.rank_tensor = torch.zeros(max_loras, dtype=torch.int64)  # the same, for the kernel
        self._factors: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * max_loras  # per slot, at rank r
        self.use_kernel = lora_delta.supports(self.lora_at)

    def set_slot(self, slot: int, weights: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Put one adapter's (A, s B^T) in ``slot``, or nothing (the adapter does not target this module)."""
        self.ranks[slot], self.rank_tensor[slot], self._factors[slot] = 0, 0, None
        if weights is None:
            return
        a, bt = weights
        r = a.shape[0]
        self.lora_at[slot].zero_()
        self.lora_bt[slot].zero_()
        self.lora_at[slot, :, :r].copy_(a.T)
        self.lora_bt[slot, :r].copy_(bt)
        self._factors[slot] = (self.lora_at[slot, :, :r], self.lora_bt[slot, :r])
        self.ranks[slot], self.rank_tensor[slot] = r, r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        segments = self.context.segments
        if not segments:
            return y
        # NOTE: in place into the base output, which this call owns: a fresh tensor, or this projection's own
        # columns of the fused q/k/v (gate/up) output, disjoint from its siblings' columns
        x2, y2 = x.reshape(-1, self.in_features), y.view(-1, self.out_features)
        if self.use_kernel and x2.shape[0] <= lora_delta.MAX_ROWS and not torch.compiler.is_compiling():
            lora_delta.lora_delta(x2 if x2.stride(1) == 1 else x2.contiguous(), y2, self.lora_at, self.lora_bt,
                                  self.context.segment_tensor, self.rank_tensor)
            return y
        factors = self._factors
        for slot, start, end in segments:
            if factors[slot] is not None:
                at, bt = factors[slot]
                y2[start:end].addmm_(x2[start:end] @ at, bt)
        return y

    def extra_repr(self) -> str:
        slots, padded = self.lora_at.shape[0], self.lora_at.shape[2]
        return f"in_features={self.in_features}, out_features={self.out_features}, slots={slots}, padded_rank={padded}"


def apply_batched_lora(model: nn.Module, context: LoRAContext, max_loras: int, max_rank: int
                       ) -> dict[str, BatchedLoRALinear]:
    """Wrap the seven projections of every decoder layer (whatever they are now) in ``BatchedLoRALinear``;
    returns them by qualified name, the names adapter files use."""
    param = next(model.parameters())
    hidden, cfg = model.config.hidden_size, model.config
    sizes = {"q_proj": (hidden, cfg.q_size), "k_proj": (hidden, cfg.kv_size), "v_proj": (hidden, cfg.kv_size),
             "o_proj": (cfg.q_size, hidden), "gate_proj": (hidden, cfg.intermediate_size),
             "up_proj": (hidden, cfg.intermediate_size), "down_proj": (cfg.intermediate_size, hidden)}
    layers = {}
    for name, base in find_linears(model, PROJECTIONS):
        if not name.startswith("model.layers.") or isinstance(base, BatchedLoRALinear) or ".base_layer" in name:
            continue
        in_f, out_f = sizes[name.rsplit(".", 1)[-1]]
        layer = BatchedLoRALinear(base, context, max_loras, max_rank, in_features=in_f, out_features=out_f,
                                  dtype=param.dtype, device=param.device)
        replace_module(model, name, layer)
        layers[name] = layer
    return layers
