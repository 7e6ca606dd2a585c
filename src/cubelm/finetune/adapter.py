"""Adapters on disk in peft's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor keys are peft's for a causal LM: ``base_model.model.<module>.lora_A.weight`` (r x in) and ``...lora_B.weight``
(out x r), where ``<module>`` is the checkpoint name of the projection (``model.layers.0.self_attn.q_proj``), so
``peft.PeftModel.from_pretrained(transformers_model, dir)`` loads what cubelm writes and cubelm loads what peft
writes. What cubelm does not implement (DoRA, trained biases, ``modules_to_save``, ``layers_to_transform``) is
refused with a message naming the field rather than silently dropped. Files are written under a temporary name and
renamed, as model checkpoints are.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cubelm.errors import CubelmError
from cubelm.finetune.config import LoraConfig
from cubelm.finetune.lora import LoRALinear, apply_lora, lora_layers
from cubelm.model.hf_io import atomic_write

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


def read_adapter_config(path: str | Path) -> LoraConfig:
    path = Path(path)
    file = path / CONFIG_NAME
    if not file.is_file():
        raise CubelmError(f"{path} is not an adapter directory: no {CONFIG_NAME} (expected peft's layout: "
                          f"{CONFIG_NAME} + {WEIGHTS_NAME})")
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CubelmError(f"{file} is not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("peft_type", "LORA") != "LORA":
        raise CubelmError(f"{file}: only LoRA adapters are supported, got peft_type {raw.get('peft_type')!r}")
    unsupported = {"use_dora": False, "bias": "none", "modules_to_save": None, "layers_to_transform": None,
                   "fan_in_fan_out": False}
    for key, off in unsupported.items():
        if raw.get(key, off) not in (off, [], {}):
            raise CubelmError(f"{file}: {key}={raw[key]!r} is not supported by cubelm (it needs {key}={off!r})")
    targets = raw.get("target_modules")
    if targets is None:
        raise CubelmError(f"{file} names no target_modules")
    try:
        return LoraConfig(r=raw.get("r", 8), lora_alpha=raw.get("lora_alpha", 8),
                          lora_dropout=raw.get("lora_dropout", 0.0) or 0.0,
                          target_modules=targets if isinstance(targets, str) else tuple(targets),
                          use_rslora=bool(raw.get("use_rslora", False)), rank_pattern=raw.get("rank_pattern") or {},
                          alpha_pattern=raw.get("alpha_pattern") or {})
    except CubelmError as e:
        raise CubelmError(f"{file}: {e}") from None


def read_adapter_tensors(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """``{module name: {"lora_A": (r, in), "lora_B": (out, r)}}`` from ``adapter_model.safetensors``."""
    file = Path(path) / WEIGHTS_NAME
    if not file.is_file():
        raise CubelmError(f"no {WEIGHTS_NAME} in {path}" + (" (adapter_model.bin is a pickle: re-save it with "
                                                            "safe_serialization=True)" if (Path(path) /
                                                            "adapter_model.bin").exists() else ""))
    try:
        flat = load_file(file)
    except (SafetensorError, OSError, ValueError) as e:
        raise CubelmError(f"{file} is not a readable safetensors file ({e})") from None
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        name = key.removeprefix(PREFIX)
        for part in ("lora_A", "lora_B"):
            for suffix in (f".{part}.weight", f".{part}.default.weight"):
                if name.endswith(suffix):
                    out.setdefault(name[:-len(suffix)], {})[part] = tensor
                    break
            else:
                continue
            break
        else:
            raise CubelmError(f"{file}: unexpected tensor {key!r} (cubelm reads LoRA A/B matrices only)")
    incomplete = [n for n, parts in out.items() if set(parts) != {"lora_A", "lora_B"}]
    if incomplete:
        raise CubelmError(f"{file}: {incomplete[0]} has lora_A or lora_B but not both")
    return out


def save_adapter(model: torch.nn.Module, cfg: LoraConfig, out_dir: str | Path, *,
                 base_model_name_or_path: str | None = None) -> Path:
    """Write the adapters of ``model`` (after ``apply_lora``) in peft's format."""
    tensors = {}
    for name, layer in lora_layers(model):
        tensors[f"{name}.lora_A.weight"] = layer.lora_A.weight
        tensors[f"{name}.lora_B.weight"] = layer.lora_B.weight
    return write_adapter(tensors, cfg, out_dir, base_model_name_or_path=base_model_name_or_path)


def write_adapter(tensors: dict[str, torch.Tensor], cfg: LoraConfig, out_dir: str | Path, *,
                  base_model_name_or_path: str | None = None) -> Path:
    """Write adapter tensors keyed by parameter name (``model.layers.0.self_attn.q_proj.lora_A.weight``), e.g.
    gathered from a sharded model, in peft's format."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {PREFIX + name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    if not tensors:
        raise CubelmError("the model has no LoRA layers to save; apply_lora first")
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
              "r": cfg.r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
              "target_modules": cfg.target_modules if isinstance(cfg.target_modules, str)
              else list(cfg.target_modules), "use_rslora": cfg.use_rslora, "rank_pattern": cfg.rank_pattern,
              "alpha_pattern": cfg.alpha_pattern, "bias": "none", "fan_in_fan_out": False,
              "modules_to_save": None, "init_lora_weights": True, "inference_mode": True, "use_dora": False,
              "layers_to_transform": None, "layers_pattern": None, "revision": None}
    atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(out / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
    return out


@torch.no_grad()
def load_adapter(model: torch.nn.Module, path: str | Path) -> LoraConfig:
    """Apply the adapter at ``path`` to ``model`` (frozen base, adapters trainable) with its trained weights."""
    cfg = read_adapter_config(path)
    tensors = read_adapter_tensors(path)
    apply_lora(model, cfg)
    layers = dict(lora_layers(model))
    missing, unexpected = sorted(set(layers) - set(tensors)), sorted(set(tensors) - set(layers))
    if missing or unexpected:
        raise CubelmError(f"adapter {path} does not fit this model: "
                          + (f"no weights for {missing[:3]}; " if missing else "")
                          + (f"weights for modules the model lacks: {unexpected[:3]}" if unexpected else ""))
    for name, layer in layers.items():
        _copy(layer, tensors[name], name, path)
    return cfg


def _copy(layer: LoRALinear, parts: dict[str, torch.Tensor], name: str, path) -> None:
    for part, param in (("lora_A", layer.lora_A.weight), ("lora_B", layer.lora_B.weight)):
        tensor = parts[part]
        if tuple(tensor.shape) != tuple(param.shape):
            raise CubelmError(f"adapter {path}: {name}.{part} has shape {tuple(tensor.shape)} but this model and "
                              f"rank need {tuple(param.shape)}")
        param.copy_(tensor.to(param.dtype))

