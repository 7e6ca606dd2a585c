"""Checkpoints you can trust: atomic, self-describing, loadable without pickle code execution.

A checkpoint is a directory ``checkpoints/step-000140/`` holding an HF-format model (``config.json`` +
``model.safetensors``) and ``optimizer.pt`` (tensors and numbers only: ``torch.load(weights_only=True)``) —
or, from a distributed run, a sharded ``dcp/`` directory (``torch.distributed.checkpoint``, see
``cubelm.parallel.checkpoint``) that loads on any world size — plus ``rng.pt`` and ``trainer_state.json`` (step, samples consumed, best validation loss, the training config).
It is written under a temporary name and renamed into place only once complete and fsynced, so a process killed
mid-write leaves the previous checkpoint untouched; leftover temporaries are swept on the next start.
The last ``keep_last`` checkpoints and the best one (``best.json``) are kept.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from cubelm.errors import CubelmError
from cubelm.fsync import fsync_tree

STATE_NAME = "trainer_state.json"  # written last: its presence marks a complete checkpoint


@dataclass(slots=True)
class TrainerState:
    step: int  # optimizer steps completed
    samples: int  # training samples consumed (the data-loader position)
    best_val_loss: float | None = None


def _fault_injection_pause() -> None:
    # Tests kill a real trainer while a checkpoint is being written; this widens that window on request.
    seconds = float(os.environ.get("CUBELM_FAULT_CHECKPOINT_SLEEP", "0") or 0)
    if seconds:
        import time
        time.sleep(seconds)


def save_checkpoint(ckpt_root: Path, model, optimizer, state: TrainerState, train_config: dict,
                    extra_files: dict[str, Path] | None = None) -> Path:
    from cubelm.model.hf_io import save_model

    ckpt_root.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_root / f"step-{state.step:06d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    _fault_injection_pause()
    return finish_checkpoint(ckpt_root, tmp, state, train_config, extra_files)


def finish_checkpoint(ckpt_root: Path, tmp: Path, state: TrainerState, train_config: dict,
                      extra_files: dict[str, Path] | None = None) -> Path:
    """Add RNG, extra files and the trainer state to the weights in ``tmp``, fsync, rename into place.

    Shared by the single-process format (safetensors + optimizer.pt) and the sharded one (``dcp/``)."""
    final = ckpt_root / f"step-{state.step:06d}"
    torch.save({"cpu": torch.get_rng_state(),
                **({"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {})}, tmp / "rng.pt")
    for name, src in (extra_files or {}).items():
        if src.is_file():
            shutil.copyfile(src, tmp / name)
    (tmp / STATE_NAME).write_text(json.dumps({"step": state.step, "samples": state.samples,
                                              "best_val_loss": state.best_val_loss, "config": train_config},
                                             indent=2))
    fsync_tree(tmp)
    if final.exists():  # re-saving the same step (a resumed run): move the old one out of the way first
        old = final.with_name(final.name + f".old-{os.getpid()}")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    if not ckpt_root.is_dir():
        return []
    done = [p for p in ckpt_root.glob("step-*") if p.is_dir() and "." not in p.name and (p / STATE_NAME).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def sweep_incomplete(ckpt_root: Path) -> list[Path]:
    """Remove temporaries left by a killed writer; return what was removed."""
    stale = [p for p in ckpt_root.glob("step-*.*") if p.is_dir()] if ckpt_root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def mark_best(ckpt_root: Path, step: int, val_loss: float) -> None:
    tmp = ckpt_root / "best.json.tmp"
    tmp.write_text(json.dumps({"step": step, "val_loss": val_loss}))
    os.replace(tmp, ckpt_root / "best.json")


def best_step(ckpt_root: Path) -> int | None:
    try:
        return int(json.loads((ckpt_root / "best.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return None


def prune(ckpt_root: Path, keep_last: int) -> None:
    keep_best = best_step(ckpt_root)
    for p in list_checkpoints(ckpt_root)[:-keep_last]:
        if int(p.name.split("-")[1]) != keep_best:
            shutil.rmtree(p, ignore_errors=True)


def saved_config(path: Path) -> dict:
    """The training config a checkpoint recorded; {} if unreadable (loading it then says what is wrong)."""
    try:
        return json.loads((path / STATE_NAME).read_text()).get("config", {})
    except (OSError, ValueError, AttributeError):
        return {}


def is_sharded(path: Path) -> bool:
    """Written by a distributed run: a ``dcp/`` directory of shards (``cubelm.parallel.checkpoint``)."""
    return (path / "dcp").is_dir()



@contextmanager
def reading_checkpoint(path: Path):
    """What a torn or corrupt checkpoint raises while its files are read becomes one ``CubelmError`` that names it
    and says what to do (a killed run must never end in a traceback on resume)."""
    try:
        yield
    except CubelmError as e:
        raise CubelmError(f"checkpoint {path} is corrupt: {e}; delete it to resume from an earlier one") from None
    except (OSError, ValueError, RuntimeError, KeyError, EOFError, pickle.UnpicklingError) as e:
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        raise CubelmError(f"checkpoint {path} is corrupt or incomplete ({type(e).__name__}: {first_line}); "
                          f"delete it to resume from an earlier one") from None


def load_checkpoint(path: Path, model, optimizer) -> tuple[TrainerState, dict]:
    """Restore model, optimizer and RNG in place from a single-process checkpoint; return the trainer state and
    the saved training config."""
    from cubelm.model.hf_io import load_state_dict

    if is_sharded(path):
        raise CubelmError(f"{path} is a sharded checkpoint from a distributed run; load it with "
                          f"cubelm.parallel.checkpoint.load_sharded_checkpoint (cubelm train --resume does)")
    with reading_checkpoint(path):
        meta = json.loads((path / STATE_NAME).read_text())
        model_state = load_state_dict(path)
        opt_state = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
        rng = torch.load(path / "rng.pt", weights_only=True)
    if model.config.tie_word_embeddings:
        model_state["lm_head.weight"] = model_state["model.embed_tokens.weight"]
    from cubelm.compress.architecture import describe_extensions, expand_shared_keys
    model_state = expand_shared_keys(model_state, describe_extensions(model))  # shared layers: stored once
    try:
        model.load_state_dict(model_state, strict=True)
        optimizer.load_state_dict(opt_state)
    except (RuntimeError, ValueError, KeyError) as e:
        raise CubelmError(f"checkpoint {path} does not fit this model/optimizer ({str(e).splitlines()[0]}); "
                          f"resume with the same preset and data") from None
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return TrainerState(meta["step"], meta["samples"], meta.get("best_val_loss")), meta.get("config", {})
