"""The process group and the one ``DeviceMesh`` of a job, dims ``("pp", "dp", "tp")`` (outermost first).

tp is innermost so its ranks are neighbours (on GPUs: the same NVLink island), pp outermost (its traffic is
point-to-point and small). Size-1 dims are kept so code can always ask ``mesh["dp"]``.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from cubelm.parallel.config import ParallelConfig


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(device: torch.device, timeout_s: float) -> None:
    """Join the torchrun job (idempotent). ``timeout_s`` bounds every collective: a rank that stops answering
    makes the others raise instead of hanging forever."""
    if dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend_for(device), timeout=datetime.timedelta(seconds=timeout_s))


@dataclass(slots=True)
class MeshInfo:
    mesh: DeviceMesh
    pc: ParallelConfig  # resolved (dp filled in)

    @property
    def dp_rank(self) -> int:
        return self.mesh["dp"].get_local_rank()

    @property
    def pp_rank(self) -> int:
        return self.mesh["pp"].get_local_rank()

    @property
    def tp_rank(self) -> int:
        return self.mesh["tp"].get_local_rank()

    def group(self, dim: str):
        return self.mesh[dim].get_group()


def build_mesh(pc: ParallelConfig, device: torch.device) -> MeshInfo:
    pc = pc.resolved(dist.get_world_size())
    mesh = init_device_mesh(device.type, (pc.pp, pc.dp, pc.tp), mesh_dim_names=("pp", "dp", "tp"))
    return MeshInfo(mesh, pc)
