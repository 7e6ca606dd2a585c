"""The default model: cubelm trains it itself, offline, on the running interpreter's standard library.

    cubelm build-default             # ~10 minutes on 2 CPU cores; cached in $CUBELM_HOME/models/default
    cubelm build-default --instruct  # + a LoRA instruct adapter (~3 more minutes): models/default-instruct

Steps: prepare the stdlib corpus (clean, dedup, train a 4,096-token BPE, pack), train the ``tiny`` recipe
(resuming if a previous build was interrupted), score it on held-out third-party code (bits per byte vs gzip -9
and unigram), then install it into the model store atomically (copy to a temporary name, then rename).
The instruct adapter is LoRA on the ``stdlib-instruct`` set (docstring -> function source) rendered with the
model's chat template, in peft's format; it records the base weights' hash and is rebuilt when the base changes.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from cubelm.errors import CubelmError
from cubelm.store import INSTRUCT_ADAPTER_NAME, cubelm_home, is_complete_model_dir, model_path

DEFAULT_VOCAB_SIZE = 4096
HELD_OUT_PACKAGE = "tqdm"  # a cubelm dependency, so always installed; not part of the stdlib corpus
# LoRA on stdlib-instruct sized for at most ~3 minutes on 2 CPU cores (2 min 33 s in a fresh clone; README), on
# examples up to 256 tokens: the context the model was pretrained on
INSTRUCT_RECIPE = dict(seq_len=256, micro_batch_size=8, max_steps=300, lr=3e-3, eval_interval=150,
                       checkpoint_interval=50)
INSTRUCT_LORA = dict(r=16, lora_alpha=32)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_default_model(*, force: bool = False, max_steps: int | None = None, work_dir: str | None = None,
                        log=_log) -> Path:
    target = model_path()
    if is_complete_model_dir(target) and not force:
        log(f"[cubelm] default model: {target} (cached)")
        return target
    work = Path(work_dir) if work_dir else cubelm_home() / "runs" / "default"
    data = work / "data"
    if not (data / "meta.json").is_file():
        log("[cubelm] building the default model, step 1/3: preparing the stdlib corpus (clean, dedup, "
            "tokenizer, pack)")
        _prepare_stdlib(data, log)
    log("[cubelm] step 2/3: training the tiny model (progress below; interrupted builds resume)")
    model_dir = _train(data, work / "train", max_steps, log)
    log("[cubelm] step 3/3: scoring on held-out third-party code")
    _evaluate(model_dir, data, log)
    _install(model_dir, target)
    log(f"[cubelm] default model installed at {target}")
    return target


def _prepare_stdlib(data: Path, log) -> None:
    from cubelm.data.clean import CleanConfig
    from cubelm.data.prepare import PrepareConfig, prepare
    from cubelm.data.sources import resolve_source
    from cubelm.data.tokenizer import TokenizerConfig
    config = PrepareConfig(clean=CleanConfig(), tokenizer=TokenizerConfig(vocab_size=DEFAULT_VOCAB_SIZE))
    prepare(resolve_source("stdlib"), data, config, log=lambda *a: None)
    meta = json.loads((data / "meta.json").read_text())
    log(f"[cubelm] corpus: {meta['num_documents']} documents, {meta['num_tokens']} tokens (report: "
        f"{data / 'report.txt'})")


def _train(data: Path, run: Path, max_steps: int | None, log) -> Path:
    from cubelm.train.config import recipe
    from cubelm.train.loop import Trainer
    cfg = recipe("tiny", max_steps=max_steps)
    try:
        trainer = Trainer(cfg, data, run, resume=True, log=log)
    except CubelmError as e:
        if "different config" not in str(e):
            raise
        log("[cubelm] the previous interrupted build used other settings; starting the training over")
        shutil.rmtree(run)
        trainer = Trainer(cfg, data, run, log=log)
    return trainer.run()


def _evaluate(model_dir: Path, data: Path, log) -> None:
    from cubelm.eval.bpb import evaluate_bpb, held_out_package
    result = evaluate_bpb(model_dir, held_out_package(HELD_OUT_PACKAGE), train_data=data)
    (model_dir / "eval.json").write_text(json.dumps(result, indent=2))
    log(f"[cubelm] held-out {HELD_OUT_PACKAGE}: model {result['model_bpb']:.3f} bits/byte, gzip -9 "
        f"{result['gzip9_bpb']:.3f}, unigram {result['unigram_bpb']:.3f}")


def build_instruct_adapter(*, force: bool = False, max_steps: int | None = None, work_dir: str | None = None,
                           data: str = "stdlib-instruct", log=_log) -> Path:
    """Train (or reuse) the default model's LoRA instruct adapter; install it at models/default-instruct."""
    base, target = model_path(), model_path(INSTRUCT_ADAPTER_NAME)
    if not is_complete_model_dir(base):
        raise CubelmError(f"no default model at {base}; build it first with 'cubelm build-default'")
    base_sha = _weights_sha256(base)
    if not force and _read_json(target / "training_summary.json").get("base_sha256") == base_sha:
        log(f"[cubelm] default instruct adapter: {target} (cached)")
        return target
    work = Path(work_dir) if work_dir else cubelm_home() / "runs" / INSTRUCT_ADAPTER_NAME
    if work.exists() and _read_json(work / "base.json").get("base_sha256") != base_sha:
        shutil.rmtree(work)  # checkpoints of an adapter for other base weights
    log("[cubelm] training the LoRA instruct adapter on stdlib-instruct (progress below; interrupted builds resume)")
    adapter = _train_adapter(base, work, data, max_steps, log)
    summary = _read_json(adapter / "training_summary.json") | {"base_sha256": base_sha}
    (adapter / "training_summary.json").write_text(json.dumps(summary, indent=2))
    _install(adapter, target)
    log(f"[cubelm] default instruct adapter installed at {target}")
    return target


def _train_adapter(base: Path, work: Path, data: str, max_steps: int | None, log) -> Path:
    from cubelm.finetune.config import LoraConfig
    from cubelm.finetune.recipe import FinetuneConfig, finetune_train_config
    from cubelm.finetune.trainer import FinetuneTrainer
    cfg = finetune_train_config("lora", **(INSTRUCT_RECIPE | ({"max_steps": max_steps} if max_steps else {})))
    ft = FinetuneConfig(model=str(base), data=data, lora=LoraConfig(**INSTRUCT_LORA),
                        max_val_examples=64)
    work.mkdir(parents=True, exist_ok=True)
    (work / "base.json").write_text(json.dumps({"base_sha256": _weights_sha256(base)}))  # whose checkpoints these are
    try:
        trainer = FinetuneTrainer(cfg, ft, work / "train", resume=True, log=log)
    except CubelmError as e:
        if "different config" not in str(e):
            raise
        shutil.rmtree(work / "train")
        trainer = FinetuneTrainer(cfg, ft, work / "train", log=log)
    return trainer.run()


def _weights_sha256(model_dir: Path) -> str:
    import hashlib
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        with open(model_dir / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _install(model_dir: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model_dir, tmp)
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)
