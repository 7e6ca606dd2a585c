"""Data parallelism applied to a built model: DDP (replicate + all-reduce) or FSDP2 (ZeRO-3-like sharding).

DDP keeps a full copy of weights, gradients and optimizer state per rank and all-reduces gradients in buckets
during backward. FSDP2 (``fully_shard``) keeps 1/dp of each parameter (a ``DTensor`` sharded on dim 0), all-gathers
a layer's weights just before its forward/backward and reduce-scatters its gradients, so each rank holds and
updates only its shard of weights, gradients and AdamW moments.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh


def apply_ddp(module: nn.Module, dp_mesh: DeviceMesh) -> nn.Module:
    """Wrap in ``DistributedDataParallel`` over the dp group; returns the wrapper (call it for the forward)."""
    from torch.nn.parallel import DistributedDataParallel
    device_ids = [torch.cuda.current_device()] if dp_mesh.device_type == "cuda" else None
    return DistributedDataParallel(module, process_group=dp_mesh.get_group(), device_ids=device_ids)


def mixed_precision_policy(precision: str, backend: str):
    """bf16 compute with fp32 gradient reduction on NCCL; None (plain fp32) on gloo, whose CPU collectives and
    kernels gain nothing from bf16 and whose bf16 reductions lose bits."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    if precision == "bf16" and backend == "nccl":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def apply_fsdp(module: nn.Module, dp_mesh: DeviceMesh, mp_policy=None, *, reshard_after_forward: bool = True) -> nn.Module:
    """``fully_shard`` each decoder layer (one all-gather per layer), then the root (embeddings, norm, head).

    Works on a whole ``CausalLM`` and on a pipeline stage module (layers in ``model.layers``, list or dict).
    Returns the same module object, now an ``FSDPModule``.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp_policy = mp_policy or MixedPrecisionPolicy()
    layers = module.model.layers
    for layer in (layers.values() if isinstance(layers, nn.ModuleDict) else layers):
        fully_shard(layer, mesh=dp_mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    # NOTE: the root is not resharded after forward: backward needs its weights again at once (lm_head first).
    fully_shard(module, mesh=dp_mesh, mp_policy=mp_policy, reshard_after_forward=False)
    return module
