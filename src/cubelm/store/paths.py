"""The local model store's layout under ``$CUBELM_HOME`` (default ``~/.cache/cubelm``)::

    models/default/                   a model built here (``cubelm build-default``): a plain directory
    models/<name>@<digest>/           a pulled model, immutable; <digest> = sha256 of its canonical manifest
    models/<name> -> <name>@<digest>  the latest pull of <name>: a relative symlink, replaced atomically
    models/.<name>@<digest>.partial/  a download in progress (resumed by the next pull), renamed when verified
    models/.locks/<name>@<digest>.lock  flock'ed by the process downloading that model

The symlink is relative so the store can be mounted at another path (a volume shared by pods). Readers resolve the
symlink once and load the immutable ``@digest`` directory, so a concurrent pull that moves the ref never changes
files under a running server.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from cubelm.errors import CubelmError

DEFAULT_MODEL_NAME = "default"
INSTRUCT_ADAPTER_NAME = "default-instruct"
MANIFEST_NAME = "manifest.json"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def cubelm_home() -> Path:
    return Path(os.environ.get("CUBELM_HOME") or Path.home() / ".cache" / "cubelm")


def models_dir() -> Path:
    return cubelm_home() / "models"


def model_path(name: str = DEFAULT_MODEL_NAME) -> Path:
    return models_dir() / name


def is_complete_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (
        (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file())


def check_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name) or name.endswith(".partial"):
        raise CubelmError(f"model name {name!r} is not valid: use letters, digits, '.', '_' and '-' (at most 128, "
                          f"starting with a letter or digit), e.g. --name tiny-chat")
    return name


def version_dir(name: str, digest: str) -> Path:
    return models_dir() / f"{name}@{digest}"


def partial_dir(name: str, digest: str) -> Path:
    return models_dir() / f".{name}@{digest}.partial"


def lock_path(name: str, digest: str) -> Path:
    return models_dir() / ".locks" / f"{name}@{digest}.lock"


def check_ref_free(name: str) -> None:
    """``models/<name>`` must be ours to move: a symlink or nothing (a directory built here is left alone)."""
    ref = model_path(name)
    if ref.exists() and not ref.is_symlink():
        raise CubelmError(f"{ref} is a directory that cubelm pull does not manage (built or copied there); pull "
                          f"with another --name, or move it away")


def set_ref(name: str, digest: str) -> Path:
    """Point ``models/<name>`` at ``<name>@<digest>``: a new symlink renamed over the old one (atomic)."""
    check_ref_free(name)
    ref = model_path(name)
    tmp = ref.with_name(f".{name}.ref-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(f"{name}@{digest}", tmp)
    os.replace(tmp, ref)
    return ref


def ref_digest(name: str) -> str | None:
    ref = model_path(name)
    if not ref.is_symlink():
        return None
    target = os.readlink(ref)
    return target.partition("@")[2] or None


def split_version(dirname: str) -> tuple[str, str | None]:
    """``tiny@ab12...`` -> (``tiny``, ``ab12...``); a plain directory name -> (name, None)."""
    name, sep, digest = dirname.partition("@")
    return (name, digest) if sep and re.fullmatch(r"[0-9a-f]{64}", digest) else (dirname, None)
