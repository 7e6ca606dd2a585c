"""Compression that changes the architecture, stored as cubelm extensions of ``config.json``.

Two methods change the module tree rather than the numbers in it; both are written by ``save_model`` and rebuilt
by ``load_model`` (hence ``LLM`` and ``cubelm serve``) before the weights are assigned:

- ``"cubelm_low_rank": {"model.layers.0.mlp.down_proj": 64, ...}`` — each named projection is a ``LowRankLinear``
  of that rank: ``nn.Sequential(Linear(in, r, bias=False), Linear(r, out))``, so its tensors are
  ``<name>.0.weight`` (r, in), ``<name>.1.weight`` (out, r) and ``<name>.1.bias`` if the projection had a bias
  (``cubelm compress lowrank``).
- ``"cubelm_shared_layers": [0, 0, 1, 1]`` — decoder layer i uses weight set ``groups[i]``; a set's tensors are
  stored once, under the first layer that uses it (``model.layers.0.*``, ``model.layers.2.*``; the other layers'
  keys are absent). On load the later layers hold the same norm, MLP and q/k/v/o modules as the first one; each
  layer keeps its own ``Attention`` (its ``layer_idx``, so the KV cache stays per layer) (``cubelm compress share``).

Everything else in the directory is standard Hugging Face; transformers cannot load these two extensions (it
would miss the tensors), which is why they sit under ``cubelm_`` keys rather than pretending to be standard.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from cubelm.errors import CubelmError
from cubelm.model.seam import find_linears, replace_module

LOW_RANK_KEY = "cubelm_low_rank"
SHARED_KEY = "cubelm_shared_layers"
_SHARED_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_SHARED_LAYER = ("input_layernorm", "post_attention_layernorm", "mlp")


class LowRankLinear(nn.Sequential):
    """``x -> B(A x)``: A (rank, in) without bias, B (out, rank) with the projection's bias. Stands where an
    ``nn.Linear`` was (same call, same ``in_features`` / ``out_features``), so LoRA and the engine wrap it."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool, *, device=None, dtype=None):
        super().__init__(nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype),
                         nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype))
        self.in_features, self.out_features, self.rank = in_features, out_features, rank

    def dense_weight(self) -> torch.Tensor:
        """B @ A, (out, in): the matrix this module multiplies by (for analysis; the forward never forms it)."""
        return self[1].weight @ self[0].weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


# ---- reading -------------------------------------------------------------------------------------------------
def read_extensions(model_dir: str | Path, num_layers: int) -> dict:
    """The cubelm architecture extensions of ``model_dir/config.json``, validated; {} for a standard model."""
    path = Path(model_dir) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}  # read_config_json reports an unreadable config.json with its own message
    ext = {k: raw[k] for k in (LOW_RANK_KEY, SHARED_KEY) if raw.get(k) is not None}
    ranks = ext.get(LOW_RANK_KEY, {})
    if not isinstance(ranks, dict) or not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                                              and v >= 1 for k, v in ranks.items()):
        raise CubelmError(f"{path}: {LOW_RANK_KEY} must map projection names to ranks >= 1, got {ranks!r:.200}")
    if SHARED_KEY in ext:
        check_groups(ext[SHARED_KEY], num_layers, where=f"{path}: {SHARED_KEY}")
    return ext


def check_groups(groups, num_layers: int, *, where: str) -> list[int]:
    """Groups must number the weight sets 0, 1, ... in order of first use, one entry per layer."""
    if not isinstance(groups, list) or len(groups) != num_layers or \
            not all(isinstance(g, int) and not isinstance(g, bool) for g in groups):
        raise CubelmError(f"{where} must list one weight-set index per decoder layer ({num_layers}), got {groups!r}")
    seen = -1
    for g in groups:
        if g > seen + 1 or g < 0:
            raise CubelmError(f"{where} must number weight sets 0, 1, ... in order of first use, got {groups}")
        seen = max(seen, g)
    return groups


# ---- building ------------------------------------------------------------------------------------------------
def apply_extensions(model: nn.Module, ext: dict) -> nn.Module:
    """Rebuild the module tree ``ext`` describes (on whatever device the model is, meta included); the tensors of
    new modules are uninitialized: the caller assigns the checkpoint's."""
    if ranks := ext.get(LOW_RANK_KEY):
        have = dict(find_linears(model))
        for name, rank in ranks.items():
            linear = have.get(name)
            if not isinstance(linear, nn.Linear):
                raise CubelmError(f"{LOW_RANK_KEY} names {name!r}, which is not a projection of this model")
            w = linear.weight
            replace_module(model, name, LowRankLinear(linear.in_features, linear.out_features, rank,
                                                      linear.bias is not None, device=w.device, dtype=w.dtype))
    if groups := ext.get(SHARED_KEY):
        tie_shared_layers(model, groups)
    return model


def first_layers(groups: list[int]) -> list[int]:
    """For each layer, the index of the first layer of its weight set (where the set is stored)."""
    first: dict[int, int] = {}
    return [first.setdefault(g, i) for i, g in enumerate(groups)]


def tie_shared_layers(model: nn.Module, groups: list[int]) -> None:
    """Make every layer hold its set's first layer's norm, MLP and projection modules (the same objects)."""
    layers = model.model.layers
    for i, src in enumerate(first_layers(groups)):
        if src == i:
            continue
        for attr in _SHARED_LAYER:
            setattr(layers[i], attr, getattr(layers[src], attr))
        for attr in _SHARED_ATTN:
            setattr(layers[i].self_attn, attr, getattr(layers[src].self_attn, attr))


# ---- describing (what save_model writes) ---------------------------------------------------------------------
def shared_groups(model: nn.Module) -> list[int] | None:
    """The weight-set index of each decoder layer, from module identity; None when no two layers share."""
    layers = list(model.model.layers)
    groups, owners = [], []  # owners[g] = the first layer of set g
    for layer in layers:
        g = next((g for g, owner in enumerate(owners) if owner.mlp is layer.mlp), None)
        if g is None:
            g = len(owners)
            owners.append(layer)
        groups.append(g)
    return groups if len(owners) < len(layers) else None


def describe_extensions(model: nn.Module) -> dict:
    """The ``config.json`` entries for this model's extensions ({} for a standard model)."""
    ext: dict = {}
    ranks = {name: mod.rank for name, mod in model.named_modules() if isinstance(mod, LowRankLinear)}
    if ranks:
        ext[LOW_RANK_KEY] = ranks
    if (groups := shared_groups(model)) is not None:
        ext[SHARED_KEY] = groups
    return ext


def stored_keys(keys, ext: dict) -> list[str]:
    """The state-dict keys a checkpoint holds: a shared set's tensors only under its first layer."""
    groups = ext.get(SHARED_KEY)
    if not groups:
        return list(keys)
    dropped = tuple(f"model.layers.{i}." for i, src in enumerate(first_layers(groups)) if src != i)
    return [k for k in keys if not k.startswith(dropped)] if dropped else list(keys)


def expand_shared_keys(state: dict, ext: dict) -> dict:
    """The inverse of ``stored_keys`` for a strict ``load_state_dict``: every layer of a shared set gets its set's
    tensors under its own names (the same tensors: loading copies them into the one shared module)."""
    groups = ext.get(SHARED_KEY)
    if not groups:
        return state
    out = dict(state)
    for i, src in enumerate(first_layers(groups)):
        if src != i:
            prefix = f"model.layers.{src}."
            out.update({f"model.layers.{i}.{k[len(prefix):]}": v for k, v in state.items() if k.startswith(prefix)})
    return out


# ---- writing a compressed copy of a model directory ----------------------------------------------------------
def save_compressed(model: nn.Module, src_dir: str | Path, out_dir: str | Path) -> Path:
    """``save_model`` (config.json with the extensions, model.safetensors), then every other file of the source
    directory (tokenizer, generation_config.json, training summary) copied as is."""
    import shutil

    from cubelm.model.hf_io import save_model
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if out_dir.resolve() == src_dir.resolve():
        raise CubelmError(f"--out {out_dir} is the source directory; write the compressed model elsewhere")
    save_model(model, out_dir)
    for f in src_dir.iterdir():
        if f.is_file() and not f.name.startswith("model") and f.name != "config.json":
            shutil.copy2(f, out_dir / f.name)
    return out_dir


def load_float_model(src_dir: str | Path) -> nn.Module:
    """The model of ``src_dir`` in its checkpoint dtype, refusing ahead-of-time quantized directories (their
    projections hold int8/int4 codes: compress the float source, then quantize)."""
    from cubelm.compress.quantized_io import read_quantization_config
    from cubelm.model.hf_io import load_model
    if read_quantization_config(src_dir) is not None:
        raise CubelmError(f"{src_dir} is quantized; compress its float source, then quantize the result")
    return load_model(src_dir, dtype=None)


def weights_bytes(model_dir: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(model_dir).glob("model*.safetensors"))
