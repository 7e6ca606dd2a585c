"""``cubelm lora merge``: fold a LoRA adapter (peft's format) into its base model and write a plain HF model.

    cubelm lora merge --model BASE_DIR --adapter ADAPTER_DIR --out MERGED_DIR [--dtype auto]

The merged directory is what ``transformers.AutoModelForCausalLM.from_pretrained`` and ``cubelm generate/serve``
load with no peft at all: ``config.json`` (the base's, with the written dtype), ``model.safetensors`` with
W + s·B·A in every adapted projection, ``generation_config.json`` (the base's) and the base's tokenizer files. The
merge runs in float32 whatever the checkpoint dtype, then the weights are written in ``--dtype`` (auto: the base's).
Light module: torch is imported inside ``run_merge``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from cubelm.cli import opt
from cubelm.errors import CubelmError

# Everything a Hugging Face tokenizer directory may hold; the ones present are copied as they are.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")
TOKENIZER_DIRS = ("additional_chat_templates",)
_SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(slots=True, kw_only=True)
class MergeOptions:
    model: str = opt(help="base model directory (HF format: config.json + model.safetensors)", metavar="DIR")
    adapter: str = opt(help="LoRA adapter directory in peft's format (adapter_config.json + "
                            "adapter_model.safetensors)", metavar="DIR")
    out: str = opt(help="directory to write the merged model to (new or empty unless --overwrite)", metavar="DIR")
    dtype: str = opt("auto", choices=_SAVE_DTYPES,
                     help="dtype of the written weights; auto keeps the base checkpoint's (the merge is float32)")
    overwrite: bool = opt(False, help="write into --out even if it already holds files")


def run_merge(o: MergeOptions) -> int:
    base, adapter, out = Path(o.model), Path(o.adapter), Path(o.out)
    _check_paths(base, adapter, out, o.overwrite)
    from cubelm.finetune.adapter import load_adapter, read_adapter_config, read_adapter_tensors
    from cubelm.finetune.lora import lora_layers, merge_lora
    from cubelm.model.hf_io import DTYPES, load_model, read_generation_config, save_model

    read_adapter_config(adapter)  # a bad adapter fails before the (larger) model is read
    read_adapter_tensors(adapter)
    model = load_model(base, dtype="float32")
    cfg = load_adapter(model, adapter)
    adapted = [name for name, _ in lora_layers(model)]
    if model.config.tie_word_embeddings and any(name.rsplit(".", 1)[-1] == "lm_head" for name in adapted):
        raise CubelmError(f"{adapter} adapts lm_head, which {base} ties to the input embedding: merged, the two would "
                          f"differ, and a tied checkpoint stores only one; merge a model with untied embeddings")
    merge_lora(model)
    dtype_name = _base_dtype(base) if o.dtype == "auto" else o.dtype
    save_model(model, out, dtype=DTYPES[dtype_name], generation_config=read_generation_config(base))
    _keep_base_config(base, out, dtype_name)
    copied = _copy_tokenizer(base, out)
    print(f"merged {len(adapted)} adapted projections (r={cfg.r}, "
          f"{'rsLoRA' if cfg.use_rslora else 'alpha/r'} scale) into {out} ({dtype_name}"
          f"{', tokenizer: ' + ', '.join(copied) if copied else ', no tokenizer files in the base'})")
    return 0


def _check_paths(base: Path, adapter: Path, out: Path, overwrite: bool) -> None:
    if not (base / "config.json").is_file():
        raise CubelmError(f"--model {base} is not a model directory (no config.json)")
    if not adapter.is_dir():
        raise CubelmError(f"--adapter {adapter} does not exist; pass a peft adapter directory (adapter_config.json "
                          f"+ adapter_model.safetensors)")
    resolved = out.resolve()
    if resolved in (base.resolve(), adapter.resolve()):
        raise CubelmError(f"--out {out} is the {'model' if resolved == base.resolve() else 'adapter'} directory; "
                          f"write the merged model to a new directory")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise CubelmError(f"--out {out} already exists and is not an empty directory; choose a new one or pass "
                          f"--overwrite")


def _base_dtype(base: Path) -> str:
    """The dtype the base checkpoint declares (float32 if it names none cubelm writes)."""
    raw = json.loads((base / "config.json").read_text())
    name = str(raw.get("torch_dtype") or raw.get("dtype") or "float32").removeprefix("torch.")
    return name if name in _SAVE_DTYPES else "float32"


def _keep_base_config(base: Path, out: Path, dtype_name: str) -> None:
    """The merged model has the base's architecture: keep its config.json (fields cubelm does not model
    included), only with the dtype of the written weights."""
    raw = json.loads((base / "config.json").read_text())
    for key in [k for k in ("torch_dtype", "dtype") if k in raw] or ["torch_dtype"]:  # 4.x / 5.x spelling
        raw[key] = dtype_name
    tmp = out / ".config.json.tmp"
    tmp.write_text(json.dumps(raw, indent=2) + "\n")
    tmp.replace(out / "config.json")


def _copy_tokenizer(base: Path, out: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (base / name).is_file():
            shutil.copyfile(base / name, out / name)
            copied.append(name)
    for name in TOKENIZER_DIRS:
        if (base / name).is_dir():
            shutil.copytree(base / name, out / name, dirs_exist_ok=True)
            copied.append(name + "/")
    return copied
