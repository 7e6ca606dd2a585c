"""The local model store: ``$CUBELM_HOME`` (default ``~/.cache/cubelm``) holds ``models/<name>/`` directories.

The default model (the ``tiny`` recipe cubelm trains itself on the standard library) lives at
``models/default``; ``cubelm generate`` without ``--model`` uses it. ``cubelm build-default --instruct`` puts a
LoRA instruct adapter for it (peft format) at ``models/default-instruct``.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL_NAME = "default"
INSTRUCT_ADAPTER_NAME = "default-instruct"


def cubelm_home() -> Path:
    return Path(os.environ.get("CUBELM_HOME") or Path.home() / ".cache" / "cubelm")


def models_dir() -> Path:
    return cubelm_home() / "models"


def model_path(name: str = DEFAULT_MODEL_NAME) -> Path:
    return models_dir() / name


def is_complete_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (
        (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file())
