"""Hugging Face format on disk, both ways: ``config.json`` + ``model.safetensors`` + ``generation_config.json``.

Reading accepts a single ``model.safetensors`` or a sharded ``model.safetensors.index.json``; it never unpickles
(``pytorch_model.bin`` is refused with a hint), so loading an untrusted directory cannot run code. Writing
produces what ``transformers.AutoModelForCausalLM.from_pretrained`` loads; each file is written to a temporary
name and renamed, so a crash never leaves a half-written file under the real name. Models whose module tree was
changed by compression (low-rank projections, shared decoder layers) are saved and loaded through cubelm's
``config.json`` extensions (``cubelm.compress.architecture``).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cubelm.errors import CubelmError
from cubelm.model.config import ModelConfig, read_config_json
from cubelm.model.transformer import CausalLM

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "consolidated.00.pth")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(name: str | torch.dtype | None, device: torch.device | str = "cpu") -> torch.dtype:
    """``auto`` is float32 on CPU (16-bit matmuls are slow without bf16 hardware) and bfloat16 on CUDA."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise CubelmError(f"unknown dtype {name!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of CPUs with bf16 dot-product instructions


def inference_dtype(name: str | torch.dtype | None, device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype the engine computes in. ``auto``: bfloat16 on CUDA and on CPUs that report bf16 instructions
    (avx512_bf16 or AMX; bf16 GEMMs there run ~2x fp32 and read half the bytes), float32 on other CPUs, where bf16
    matmuls are emulated (~100x slower than fp32, measured on AVX2 hosts). An explicit bfloat16 on such a CPU warns
    and runs float32, unless ``CUBELM_FORCE_BF16=1`` (to measure or test the bf16 path there)."""
    device = torch.device(device)
    if isinstance(name, str) and name in ("auto", "bfloat16", "bf16") and device.type == "cpu":
        from cubelm.systems.host import cpu_flags
        has_bf16 = any(flag in cpu_flags() for flag in BF16_CPU_FLAGS)
        if name == "auto":
            return torch.bfloat16 if has_bf16 else torch.float32
        if not has_bf16 and os.environ.get("CUBELM_FORCE_BF16") != "1":
            import sys
            print("cubelm: warning: this CPU reports no bf16 instructions (avx512_bf16 or amx_bf16), where bfloat16 "
                  "matmuls run ~100x slower than float32: using float32 (CUBELM_FORCE_BF16=1 keeps bfloat16)",
                  file=sys.stderr)
            return torch.float32
    return resolve_dtype(name, device)


def resolve_device(name: str | torch.device) -> torch.device:
    """A torch device from a user's string, with an error that says what would work."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise CubelmError(f"unknown device {name!r}; use cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CubelmError(f"--device {name} was asked for but no CUDA device is available; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise CubelmError(f"device {name!r} is not supported; use cpu or cuda[:N]")
    return device


def _weight_files(model_dir: Path) -> list[Path]:
    single, index = model_dir / WEIGHTS_NAME, model_dir / INDEX_NAME
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CubelmError(f"{index} is malformed ({e}); it must hold a 'weight_map'") from None
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise CubelmError(f"{index} names shard {f.name}, which is missing from {model_dir}")
        return files
    pickled = [n for n in _PICKLE_NAMES if (model_dir / n).exists()]
    if pickled or list(model_dir.glob("*.bin")):
        name = pickled[0] if pickled else next(model_dir.glob("*.bin")).name
        raise CubelmError(f"{model_dir / name} is a pickle checkpoint; cubelm loads only safetensors (pickle can run "
                          f"code). Convert it: load with transformers, then save_pretrained(safe_serialization=True)")
    raise CubelmError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {model_dir}; is this a model directory?")


def load_state_dict(model_dir: str | Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in _weight_files(Path(model_dir)):
        try:
            state.update(load_file(f))
        except (SafetensorError, OSError, ValueError) as e:
            raise CubelmError(f"{f} is not a readable safetensors file ({e}); re-save or re-download it") from None
    return state


def load_model(model_dir: str | Path, *, device: str | torch.device = "cpu",
               dtype: str | torch.dtype | None = "auto") -> CausalLM:
    """Build the model on the meta device, then assign the checkpoint's tensors (no double allocation)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CubelmError(f"model directory {model_dir} does not exist")
    cfg = read_config_json(model_dir)
    from cubelm.compress.quantized_io import load_quantized_model, read_quantization_config
    if (qc := read_quantization_config(model_dir)) is not None:  # `cubelm quantize` output: int8/int4 projections
        return load_quantized_model(model_dir, qc, device=device, dtype=dtype)
    from cubelm.compress.architecture import apply_extensions, read_extensions, stored_keys
    ext = read_extensions(model_dir, cfg.num_hidden_layers)  # low-rank projections, shared layers (cubelm's)
    dtype = resolve_dtype(dtype, device)
    state = load_state_dict(model_dir)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = apply_extensions(CausalLM(cfg), ext)
    full = model.state_dict()
    expected = {k: full[k] for k in stored_keys(full, ext) if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    unexpected = [k for k in unexpected if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise CubelmError(f"{model_dir}: weights do not match config.json (missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]}{'...' if len(missing) + len(unexpected) > 6 else ''})")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CubelmError(f"{model_dir}: {k} has shape {tuple(state[k].shape)} but config.json implies "
                              f"{tuple(v.shape)}")
    state = {k: state[k].to(device=device, dtype=dtype) for k in expected}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    # Non-persistent buffers (RoPE frequencies) are still on meta: recompute them for real.
    from cubelm.model.layers import rope_inv_freq
    model.model.rotary_emb.inv_freq = rope_inv_freq(cfg).to(device)
    return model.eval()


def read_generation_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CubelmError(f"{path} is not valid JSON ({e})") from None


def stop_token_ids(model_dir: str | Path, tokenizer_eos_id: int | None = None) -> list[int]:
    """The ids that end generation: ``generation_config.json``'s ``eos_token_id`` (an int or a list; Llama-3 lists
    ``<|end_of_text|>``, ``<|eom_id|>`` and ``<|eot_id|>``), else ``config.json``'s, plus the tokenizer's EOS."""
    model_dir = Path(model_dir)
    gen = read_generation_config(model_dir)
    source, value = "generation_config.json", gen.get("eos_token_id") if isinstance(gen, dict) else None
    if value is None:
        from cubelm.model.config import read_config_json
        source, value = "config.json", read_config_json(model_dir).eos_token_id
    values = value if isinstance(value, list) else [] if value is None else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise CubelmError(f"{model_dir / source}: eos_token_id must be a token id or a list of token ids, "
                          f"got {value!r}")
    ids = list(dict.fromkeys(values))
    if tokenizer_eos_id is not None and tokenizer_eos_id not in ids:
        ids.append(tokenizer_eos_id)
    return ids


def atomic_write(path: Path, write) -> None:
    """``write(tmp)`` to a temporary file next to ``path``, then rename it into place: readers see the old file or
    the whole new one, never a torn one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_json(path: Path, data: dict) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n"))


def save_model(model: CausalLM, model_dir: str | Path, *, dtype: torch.dtype | None = None,
               generation_config: dict | None = None, max_shard_bytes: int | None = None) -> Path:
    """Write config.json, model.safetensors (sharded with an index above ``max_shard_bytes``), generation_config.json."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    cfg: ModelConfig = model.config
    from cubelm.compress.architecture import describe_extensions, stored_keys
    ext = describe_extensions(model)  # low-rank projections, shared layers: cubelm's config.json extensions
    full = model.state_dict()
    state = {k: full[k].detach().to("cpu", dtype=dtype or full[k].dtype).contiguous() for k in stored_keys(full, ext)}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # safetensors refuses shared storage; HF re-ties on load
    saved_dtype = next(iter(state.values())).dtype
    cfg_dict = cfg.to_hf_dict() | {"torch_dtype": str(saved_dtype).removeprefix("torch.")} | ext
    shards = _split_shards(state, max_shard_bytes)
    for stale in [model_dir / INDEX_NAME, model_dir / WEIGHTS_NAME, *model_dir.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        atomic_write(model_dir / WEIGHTS_NAME, lambda tmp: save_file(shards[0], tmp, metadata={"format": "pt"}))
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            atomic_write(model_dir / name, lambda tmp, s=shard: save_file(s, tmp, metadata={"format": "pt"}))
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        _write_json(model_dir / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    _write_json(model_dir / "config.json", cfg_dict)
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}
    _write_json(model_dir / "generation_config.json", gen | (generation_config or {}))
    return model_dir


def _split_shards(state: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    if not max_bytes:
        return [state]
    shards, current, size = [], {}, 0
    for k, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k], size = t, size + nbytes
    return shards + [current] if current else shards
