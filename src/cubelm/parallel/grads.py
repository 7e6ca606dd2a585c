"""Global gradient-norm clipping when gradients are spread over ranks (DTensor shards, pipeline stages)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def clip_grad_norm_(params, max_norm: float, pp_group=None) -> torch.Tensor:
    """The norm of all gradients of the *whole* model, then every gradient scaled by min(1, max_norm / norm).

    DTensor gradients (FSDP shards, TP slices) are grouped by mesh and reduced by DTensor; plain ones (DDP,
    replicated) are local; pipeline ranks hold disjoint parameters, so their squared norms are summed over pp.
    """
    params = [p for p in params if p.grad is not None]
    groups: dict = {}
    for p in params:
        key = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
        groups.setdefault(key, []).append(p)
    sq = torch.zeros((), dtype=torch.float32)
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], 2.0)
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        sq = sq + norm.float().cpu() ** 2
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dist.all_reduce(sq, group=pp_group)
    total = sq.sqrt()
    for group in groups.values():
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total.to(group[0].device))
    return total
