"""Checkpoints of an adapter run (LoRA, QLoRA): the trainable parameters and their AdamW state, nothing frozen.

``step-000100/`` holds the adapter in peft's format (``adapter_config.json`` + ``adapter_model.safetensors``: the
directory is itself a loadable adapter), ``optimizer.pt`` (the AdamW moments keyed by parameter name, tensors and
numbers only: ``torch.load(weights_only=True)``), ``rng.pt`` and ``trainer_state.json``, written under a temporary
name and renamed when complete, as ``cubelm train``'s (``cubelm.train.checkpoint.finish_checkpoint``). The frozen
base is not saved: a resumed run loads it again from ``--model`` (the run config records which).

Tensors are saved whole (gathered from FSDP2 shards; an adapter is a few MB), keyed by name, so a checkpoint
written by any world size resumes on any other, or in one process: each rank reads the files and keeps its shard.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

from cubelm.errors import CubelmError
from cubelm.finetune.adapter import read_adapter_tensors, write_adapter
from cubelm.finetune.config import LoraConfig
from cubelm.train.checkpoint import (STATE_NAME, TrainerState, _fault_injection_pause, finish_checkpoint,
                                    reading_checkpoint)

OPTIMIZER_NAME = "optimizer.pt"


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on CPU; for a DTensor shard this is a collective (every rank calls it, same order)."""
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().to("cpu").clone()


def _like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as ``param``: this rank's shard of it for a DTensor (no communication: every rank holds
    the whole tensor, read from the same file)."""
    if isinstance(param, DTensor):
        return distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None)
    return full.to(device=param.device, dtype=param.dtype)


def gather_trainable(model, optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Whole trainable weights and optimizer state keyed by parameter name. Collective under FSDP2."""
    params = trainable_parameters(model)
    name_of = {id(p): n for n, p in params.items()}
    weights = {n: _full(p) for n, p in params.items()}
    state = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p in optimizer.state:
                state[name_of[id(p)]] = {k: _full(v) if torch.is_tensor(v) else v
                                         for k, v in sorted(optimizer.state[p].items())}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [name_of[id(p)] for p in g["params"]]}
              for g in optimizer.param_groups]
    return weights, {"state": state, "param_groups": groups}


@torch.no_grad()
def restore_trainable(model, optimizer, weights: dict[str, torch.Tensor], optim_state: dict, where: Path) -> None:
    params = trainable_parameters(model)
    missing, unexpected = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
    if missing or unexpected:
        raise CubelmError(f"checkpoint {where} does not fit this model (missing {missing[:2]}, unexpected "
                          f"{unexpected[:2]}); resume with the same --model, --method and adapter settings")
    for name, p in params.items():
        if tuple(weights[name].shape) != tuple(p.shape):
            raise CubelmError(f"checkpoint {where}: {name} has shape {tuple(weights[name].shape)}, this run's "
                              f"{tuple(p.shape)}; resume with the same adapter settings")
        p.copy_(_like(weights[name], p))
    name_of = {id(p): n for n, p in params.items()}
    current = [[name_of[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    if current != [g["params"] for g in optim_state["param_groups"]]:
        raise CubelmError(f"checkpoint {where}: the optimizer's parameter groups differ from this run's")
    index = {name: i for i, name in enumerate(n for g in current for n in g)}
    state = {index[n]: {k: _like(v, params[n]) if torch.is_tensor(v) and v.dim() else v for k, v in s.items()}
             for n, s in optim_state["state"].items()}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in optim_state["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_trainable_checkpoint(ckpt_root: Path, model, optimizer, state: TrainerState, run_config: dict,
                              lora: LoraConfig, *, is_main: bool, base_model: str,
                              extra_files: dict[str, Path] | None = None) -> Path:
    """Every rank calls it (gathering shards is collective); the main rank writes and renames into place."""
    weights, optim_state = gather_trainable(model, optimizer)
    final = ckpt_root / f"step-{state.step:06d}"
    if is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        tmp = ckpt_root / f"step-{state.step:06d}.tmp-{os.getpid()}"
        write_adapter(weights, lora, tmp, base_model_name_or_path=base_model)
        torch.save(optim_state, tmp / OPTIMIZER_NAME)
        _fault_injection_pause()
        final = finish_checkpoint(ckpt_root, tmp, state, run_config, extra_files)
    if dist.is_initialized():
        dist.barrier()  # nobody reads or prunes checkpoints before this one is in place
    return final


def load_trainable_checkpoint(path: Path, model, optimizer) -> tuple[TrainerState, dict]:
    import json
    with reading_checkpoint(path):
        meta = json.loads((path / STATE_NAME).read_text())
        tensors = read_adapter_tensors(path)
        optim_state = torch.load(path / OPTIMIZER_NAME, weights_only=True, map_location="cpu")
        rng = torch.load(path / "rng.pt", weights_only=True)
    weights = {f"{module}.{part}.weight": t for module, parts in tensors.items() for part, t in parts.items()}
    restore_trainable(model, optimizer, weights, optim_state, path)
    torch.set_rng_state(rng["cpu"])
    return TrainerState(meta["step"], meta["samples"], meta.get("best_val_loss")), meta.get("config", {})
