"""An adapter's files read and checked against the served model: what it targets, its ranks and its shapes.

Every reason an adapter cannot be served is a ``CubelmError`` naming the adapter and the problem (the server
answers 400, ``cubelm serve`` exits 2): not peft's format, unreadable tensors, non-finite values, a module the
model lacks (or cubelm does not adapt when serving: only the seven projections of the decoder layers), a rank
above ``--max-lora-rank``, a rank that disagrees with ``adapter_config.json``, or shapes from another model.

The tensors are kept as the layers use them: ``A`` (r, in) and ``s B^T`` (r, out), the scale folded into B once
at load so a step multiplies by nothing extra.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from cubelm.errors import CubelmError
from cubelm.model.seam import PROJECTIONS

Shapes = dict[str, tuple[int, int]]  # qualified module name -> (in_features, out_features)


@dataclass(slots=True)
class AdapterWeights:
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (A (r, in), s * B^T (r, out))
    max_rank: int

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.modules.values())


def shapes_from_config(cfg) -> Shapes:
    """The served projections of a model described by its ``ModelConfig`` (no weights needed: startup checks)."""
    h, inter, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    per_layer = {"self_attn.q_proj": (h, q), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
                 "self_attn.o_proj": (q, h), "mlp.gate_proj": (h, inter), "mlp.up_proj": (h, inter),
                 "mlp.down_proj": (inter, h)}
    return {f"model.layers.{i}.{name}": shape for i in range(cfg.num_hidden_layers)
            for name, shape in per_layer.items()}


def fingerprint(path: str | Path) -> tuple[int, int]:
    """(size, mtime) of the weights file: a re-read must find the file that was validated (the cache salt of
    the adapter's K/V assumes its weights never change)."""
    from cubelm.finetune.adapter import WEIGHTS_NAME
    st = os.stat(Path(path) / WEIGHTS_NAME)
    return st.st_size, st.st_mtime_ns


def read_adapter(path: str | Path, shapes: Shapes, max_lora_rank: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> AdapterWeights:
    from cubelm.finetune.adapter import read_adapter_config, read_adapter_tensors
    cfg = read_adapter_config(path)
    tensors = read_adapter_tensors(path)
    if not tensors:
        raise CubelmError(f"adapter {path} holds no LoRA weights")
    _check_targets(path, cfg, tensors, shapes)
    modules, max_rank = {}, 0
    for name, parts in tensors.items():
        a, b = parts["lora_A"], parts["lora_B"]
        r = _check_shapes(path, name, a, b, shapes[name], cfg.rank_for(name), max_lora_rank)
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise CubelmError(f"adapter {path}: {name} has non-finite values (NaN or inf); the file is corrupt")
        bt = (b.double() * cfg.scale_for(name)).T  # scale in float64, rounded once to the serving dtype
        modules[name] = (a.to(device=device, dtype=dtype).contiguous(), bt.to(device=device, dtype=dtype).contiguous())
        max_rank = max(max_rank, r)
    return AdapterWeights(modules, max_rank)


def _check_targets(path, cfg, tensors: dict, shapes: Shapes) -> None:
    served = sorted({n.rsplit(".", 1)[-1] for n in shapes}, key=PROJECTIONS.index)
    if not isinstance(cfg.target_modules, str):
        lacking = [t for t in cfg.target_modules if t not in served]
        if lacking:
            raise CubelmError(f"adapter {path} targets {', '.join(lacking)}, which this model lacks or cubelm does "
                              f"not serve adapters on; it serves {', '.join(served)}")
    unknown = sorted(n for n in tensors if n not in shapes)
    if unknown:
        raise CubelmError(f"adapter {path} has weights for modules this model lacks: {', '.join(unknown[:3])}"
                          + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
                          + f" (it has {len(shapes) // len(served)} layers of {', '.join(served)})")


def _check_shapes(path, name: str, a: torch.Tensor, b: torch.Tensor, shape: tuple[int, int], cfg_rank: int,
                  max_lora_rank: int) -> int:
    in_f, out_f = shape
    r = a.shape[0] if a.dim() == 2 else -1
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_f or b.shape[0] != out_f or b.shape[1] != r:
        raise CubelmError(f"adapter {path}: {name} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, but this "
                          f"model needs (r, {in_f}) and ({out_f}, r): the adapter was trained for another model")
    if not a.is_floating_point() or not b.is_floating_point():
        raise CubelmError(f"adapter {path}: {name} is stored as {a.dtype}/{b.dtype}, not floating point")
    if r != cfg_rank:
        raise CubelmError(f"adapter {path}: {name} has rank {r} but adapter_config.json says {cfg_rank}")
    if r > max_lora_rank:
        raise CubelmError(f"adapter {path}: {name} has rank {r}, above --max-lora-rank {max_lora_rank}; raise "
                          f"--max-lora-rank to at least {r}")
    return r
