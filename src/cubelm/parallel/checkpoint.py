"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP), and the full-state HF export.

Every rank writes only what it holds (its FSDP shards, TP slices, pipeline stages) into ``step-N/dcp/``; tensors
are keyed by Hugging Face names (optimizer state flattened per parameter: ``state.<fqn>.exp_avg``), so loading
reshards onto any other layout — another dp / tp / pp degree, or a single process without a process group.
The export gathers full tensors (``full_state_dict``), pipeline stages are collected over the pp group, and
rank 0 writes an ordinary HF directory that transformers loads.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from cubelm.errors import CubelmError
from cubelm.train.checkpoint import STATE_NAME, TrainerState, finish_checkpoint

_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def _state(model, optimizer) -> dict:
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
    return {"model": model_sd, "optim": optim_sd}


def save_sharded_checkpoint(ckpt_root: Path, model, optimizer, state: TrainerState, train_config: dict,
                            extra_files: dict[str, Path] | None = None) -> Path:
    """Collective: every rank calls it. Rank 0 finishes the directory and renames it into place atomically."""
    main = dist.get_rank() == 0
    tmp = ckpt_root / f"step-{state.step:06d}.tmp-dcp"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    dcp.save(_state(model, optimizer), checkpoint_id=str(tmp / "dcp"))  # ends with a collective: all shards written
    final = ckpt_root / f"step-{state.step:06d}"
    if main:
        final = finish_checkpoint(ckpt_root, tmp, state, train_config, extra_files)
    dist.barrier()
    return final


def load_sharded_checkpoint(path: Path, model, optimizer) -> tuple[TrainerState, dict]:
    """Load into whatever layout ``model`` has now (plain, DDP, FSDP2, TP, pipeline stages)."""
    try:
        meta = json.loads((path / STATE_NAME).read_text())
        sd = _state(model, optimizer)
        with warnings.catch_warnings():  # no process group is fine: a single process reads every shard
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(sd, checkpoint_id=str(path / "dcp"), no_dist=not dist.is_initialized())
        rng = torch.load(path / "rng.pt", weights_only=True)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        raise CubelmError(f"sharded checkpoint {path} cannot be loaded into this model ({type(e).__name__}: "
                          f"{first_line}); resume with the same preset and data, or delete it") from None
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"], options=_OPTIONS)
    torch.set_rng_state(rng["cpu"])
    return TrainerState(meta["step"], meta["samples"], meta.get("best_val_loss")), meta.get("config", {})


def gather_full_state(model, pp_group=None) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU tensors of every parameter, on every rank; pipeline stages merged over ``pp_group``.

    NOTE: each rank briefly holds the whole model: fine up to a few B params on CPU RAM; for more, write the
    export from DCP offline (``torch.distributed.checkpoint.format_utils.dcp_to_torch_save``).
    """
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    full = {k: v.detach().cpu() for k, v in full.items()}
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        parts: list = [None] * dist.get_world_size(pp_group)
        dist.all_gather_object(parts, full, group=pp_group)
        full = {k: v for part in parts for k, v in part.items()}
    return full
