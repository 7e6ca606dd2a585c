"""``BatchedLoRALinear``: one projection serving every active adapter at once, rows of the base included.

Applied from outside through ``cubelm.model.seam`` after the engine's decode layout, so it wraps whatever the
projection is by then (a ``BlockedLinear``, a q/k/v or gate/up ``FusedSlice`` on CPU, ``nn.Linear`` elsewhere)
and the blocked and fused kernels are untouched; the model's ``forward`` gains no branch. Each layer holds
``max_loras`` slots of stacked, zero-padded weights, A (slots, r_max, in) and s B^T (slots, r_max, out), and
reads the step's row->slot mapping from the shared ``LoRAContext`` that the runner sets before each forward
(as the paged attention's metadata), never from ``forward`` arguments.

The low-rank product is grouped by slot (Punica/S-LoRA's SGMV shape): the runner orders each step's rows so
that the rows of one adapter are contiguous (decodes sorted by slot, then prompt chunks sorted by slot), and each
segment costs two GEMMs on a slice, ``y[seg] += (x[seg] A_s^T) (s B_s^T)``, at the adapter's own rank for that
module (the padding is never multiplied). Base rows cost nothing. Measured against a per-row gathered product
(BGMV: gather each row's A and B, two batched matmuls) in ``benchmarks/multi_lora.py --kernels``: the gather
copies r x (in + out) weights per row, which on CPU costs more than the products themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from cubelm.model.seam import PROJECTIONS, find_linears, replace_module


@dataclass(slots=True)
class LoRAContext:
    """The step's rows by adapter: ``segments`` = (slot, first row, end row) of every run of adapter rows in the
    flat batch (base rows are in no segment). Shared by all the layers; the runner replaces it every step."""
    segments: list[tuple[int, int, int]] = field(default_factory=list)


class BatchedLoRALinear(nn.Module):
    def __init__(self, base_layer: nn.Module, context: LoRAContext, max_loras: int, max_rank: int,
                 *, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.base_layer, self.context = base_layer, context
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("lora_a", torch.zeros(max_loras, max_rank, in_features, dtype=dtype, device=device))
        self.register_buffer("lora_bt", torch.zeros(max_loras, max_rank, out_features, dtype=dtype, device=device))
        self.ranks = [0] * max_loras  # rank of each slot's adapter on this module; 0 = the adapter leaves it alone

    def set_slot(self, slot: int, weights: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Put one adapter's (A, s B^T) in ``slot``, or nothing (the adapter does not target this module)."""
        if weights is None:
            self.ranks[slot] = 0
            return
        a, bt = weights
        r = a.shape[0]
        self.lora_a[slot, :r].copy_(a)
        self.lora_bt[slot, :r].copy_(bt)
        self.ranks[slot] = r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        segments = self.context.segments
        if not segments:
            return y
        x2, y2 = x.reshape(-1, self.in_features), y.view(-1, self.out_features)
        for slot, start, end in segments:
            r = self.ranks[slot]
            if r:
                # NOTE: in place into the base output, which this call owns: a fresh tensor, or this projection's
                # own columns of the fused q/k/v (gate/up) output, disjoint from its siblings' columns
                y2[start:end].addmm_(x2[start:end] @ self.lora_a[slot, :r].T, self.lora_bt[slot, :r])
        return y

    def extra_repr(self) -> str:
        slots, r_max = self.lora_a.shape[:2]
        return f"in_features={self.in_features}, out_features={self.out_features}, slots={slots}, max_rank={r_max}"


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
