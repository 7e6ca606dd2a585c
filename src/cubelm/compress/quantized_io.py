"""Ahead-of-time quantized model directories: ``cubelm quantize`` writes them, ``load_model`` / ``LLM`` read them.

    cubelm quantize --model ~/.cache/cubelm/models/default --method int4 --group-size 32 --out /tmp/default-int4
    python -c 'from cubelm import LLM; LLM("/tmp/default-int4")'       # loads and runs without re-quantizing

The directory is a Hugging Face-shaped model directory:

- ``config.json``: the source model's, plus a ``quantization_config`` block::

      {"quant_method": "cubelm", "method": "int4", "bits": 4, "group_size": 32, "symmetric": true,
       "layout": "...", "include_head": false, "format_version": 1}

  (``quant_method`` names the format's owner, as transformers' loaders expect; other tools will not load it.)
- ``model.safetensors``: every float tensor of the source (embeddings, norms, the output head unless
  ``include_head``) under its own name, and for each quantized projection ``P`` (``model.layers.N.self_attn.
  q_proj``, ..., ``mlp.down_proj``, and ``lm_head`` if ``include_head``) the tensors ``P.qweight`` (int8
  ``(out, in)`` or packed int4 uint8 ``(out, 16·ceil(in/32))``), ``P.scales`` (fp32 ``(out,)`` or
  ``(out, ceil(in/g))``) and ``P.bias`` if it has one. The format of these is ``cubelm.compress.quantize``'s.
- every other file of the source directory (tokenizer, generation_config.json, ...) copied as is.

Loading builds the model on the meta device, puts a ``QuantLinear`` holding the stored tensors where each
projection is, assigns the float tensors and fuses q/k/v and gate/up; the outputs are identical to quantizing the
source model at load (``LLM(source, quantization=...)``), a test checks it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from cubelm.cli import opt
from cubelm.compress.quantize import (DEFAULT_GROUP_SIZE, FORMAT_NAME, METHODS, QuantizedWeight, check_hidden_size,
                                      check_method, quantization_config, quantize_weight)
from cubelm.errors import CubelmError


def read_quantization_config(model_dir: str | Path) -> dict | None:
    """The ``quantization_config`` of ``model_dir/config.json`` if it is cubelm's, None for a float model."""
    path = Path(model_dir) / "config.json"
    try:
        qc = json.loads(path.read_text()).get("quantization_config")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None  # read_config_json reports an unreadable config.json with its own message
    if qc is None:
        return None
    if not isinstance(qc, dict) or qc.get("quant_method") != FORMAT_NAME:
        raise CubelmError(f"{path}: quantization_config {qc!r} is not cubelm's (quant_method {FORMAT_NAME!r}); "
                          f"cubelm loads float checkpoints and its own int8/int4 format")
    check_method(qc.get("method"), qc.get("group_size"))
    return qc


def save_quantized(src_dir: str | Path, out_dir: str | Path, method: str, group_size: int | None = None,
                   include_head: bool = False) -> Path:
    from safetensors.torch import save_file

    from cubelm.compress.quantized_linear import quantization_targets
    from cubelm.model.hf_io import WEIGHTS_NAME, _write_json, atomic_write, load_model
    from cubelm.model.seam import find_linears
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    check_method(method, group_size)
    if out_dir.resolve() == src_dir.resolve():
        raise CubelmError(f"--out {out_dir} is the source directory; write the quantized model elsewhere")
    if read_quantization_config(src_dir) is not None:
        raise CubelmError(f"{src_dir} is already quantized; quantize its float source instead")
    model = load_model(src_dir, dtype=None)  # the checkpoint's own dtype for the float tensors kept as they are
    if json.loads((src_dir / "config.json").read_text()).keys() & {"cubelm_low_rank", "cubelm_shared_layers"}:
        raise CubelmError(f"{src_dir} has low-rank or shared layers (cubelm_low_rank / cubelm_shared_layers), "
                          f"which the quantized format does not store; quantize a dense model")
    check_hidden_size(method, group_size, model.config.hidden_size)
    state = {k: v for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # re-tied on load (or quantized below)
    for name, linear in find_linears(model, quantization_targets(include_head)):
        state.pop(f"{name}.weight", None)
        q = quantize_weight(linear.weight, method, group_size)
        state[f"{name}.qweight"], state[f"{name}.scales"] = q.qweight, q.scales
        if linear.bias is not None:
            state[f"{name}.bias"] = state.pop(f"{name}.bias")
    state = {k: v.detach().contiguous() for k, v in state.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in src_dir.iterdir():  # tokenizer, generation config, notes: everything but the weights and config
        if f.is_file() and not f.name.startswith("model") and f.name != "config.json":
            shutil.copy2(f, out_dir / f.name)
    atomic_write(out_dir / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    cfg = json.loads((src_dir / "config.json").read_text())
    _write_json(out_dir / "config.json", cfg | {"quantization_config": quantization_config(method, group_size,
                                                                                              include_head)})
    return out_dir


def load_quantized_model(model_dir: str | Path, qc: dict, *, device="cpu", dtype="auto"):
    """The model of a quantized directory, its projections ``QuantLinear`` (fused), float tensors in ``dtype``."""
    from cubelm.compress.quantized_linear import QuantLinear, fuse_quantized, quantization_targets
    from cubelm.model.config import read_config_json
    from cubelm.model.hf_io import load_state_dict, resolve_dtype
    from cubelm.model.layers import rope_inv_freq
    from cubelm.model.seam import find_linears, replace_module
    from cubelm.model.transformer import CausalLM
    model_dir = Path(model_dir)
    cfg = read_config_json(model_dir)
    dtype = resolve_dtype(dtype, device)
    state = load_state_dict(model_dir)
    method, group_size = qc["method"], qc.get("group_size")
    with torch.device("meta"):
        model = CausalLM(cfg)
    for name, linear in find_linears(model, quantization_targets(bool(qc.get("include_head")))):
        try:
            qweight, scales = state.pop(f"{name}.qweight"), state.pop(f"{name}.scales")
        except KeyError:
            raise CubelmError(f"{model_dir}: {name}.qweight / {name}.scales missing from the quantized "
                              f"checkpoint; re-run cubelm quantize") from None
        q = QuantizedWeight(method, qweight.to(device), scales.to(device=device, dtype=torch.float32),
                            linear.in_features, group_size)
        if q.out_features != linear.out_features:
            raise CubelmError(f"{model_dir}: {name}.qweight has {q.out_features} rows but config.json implies "
                              f"{linear.out_features}")
        bias = state.pop(f"{name}.bias", None)
        replace_module(model, name, QuantLinear(q, None if bias is None else bias.to(device=device, dtype=dtype)))
    quantized = tuple(f"{name}." for name, mod in model.named_modules() if isinstance(mod, QuantLinear))
    expected = {k for k in model.state_dict() if not k.startswith(quantized)}
    if cfg.tie_word_embeddings and not qc.get("include_head"):
        expected.discard("lm_head.weight")
    missing = sorted(expected - set(state))
    if missing:
        raise CubelmError(f"{model_dir}: tensors missing from the quantized checkpoint: {missing[:3]}")
    model.load_state_dict({k: state[k].to(device=device, dtype=dtype) for k in expected}, strict=False, assign=True)
    if not qc.get("include_head"):
        model.tie_weights()
    model.model.rotary_emb.inv_freq = rope_inv_freq(cfg).to(device)
    fuse_quantized(model)
    return model.eval()


@dataclass(slots=True, kw_only=True)
class QuantizeOptions:
    model: str | None = opt(None, help="float model directory (HF format); default: the default model")
    method: str = opt(help="weight format: int8 (per-row scales) or int4 (per-group scales)", choices=METHODS)
    group_size: int = opt(DEFAULT_GROUP_SIZE, help="int4: inputs per scale, 32, 64 or 128 (must divide the "
                                                   "hidden size); ignored for int8")
    include_head: bool = opt(False, help="quantize the output head too (default: keep it in float)")
    out: str = opt(help="output directory (created; files of the same name are replaced)", metavar="DIR")


def run_quantize(o: QuantizeOptions) -> int:
    from cubelm.engine.commands import resolve_model_dir
    src = resolve_model_dir(o.model)
    group = o.group_size if o.method == "int4" else None
    out = save_quantized(src, o.out, o.method, group, o.include_head)
    size = sum(f.stat().st_size for f in out.glob("model*.safetensors"))
    src_size = sum(f.stat().st_size for f in src.glob("model*.safetensors"))
    print(f"[cubelm] {src} -> {out}: {o.method}{f' g={group}' if group else ''}, weights {src_size / 2**20:.1f} "
          f"-> {size / 2**20:.1f} MiB")
    return 0
