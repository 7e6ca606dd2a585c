"""``cubelm finetune``: full, LoRA or QLoRA fine-tuning of an HF-format model on instruct data.

    cubelm finetune --data stdlib-instruct --out runs/ft                       # LoRA on the default model
    cubelm finetune --model DIR --data rows.jsonl --method full --out runs/full
    cubelm finetune --data rows.jsonl --out runs/ft --lora-r 16 --lora-alpha 32 --target-modules q_proj,v_proj
    cubelm finetune --data rows.jsonl --out runs/ft --nproc 2 --dp-mode fsdp  # FSDP2: frozen base sharded too
    cubelm finetune --data rows.jsonl --out runs/ft --resume                   # continues exactly

LoRA flags carry peft's names and defaults. The run directory gets metrics.jsonl, curves.png, data_report.json,
checkpoints/ and, at the end, ``adapter/`` (peft format; ``PeftModel.from_pretrained(base, OUT/adapter)`` loads it)
or ``model/`` (full fine-tuning: an HF model with the base's tokenizer).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from cubelm.cli import opt
from cubelm.errors import CubelmError

PROJECTIONS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # = cubelm.model.seam.PROJECTIONS
_REGEX_CHARS = re.compile(r"[\\*()\[\]|^$?+]")
TRAIN_FLAGS = ("micro_batch_size", "grad_accum", "max_steps", "lr", "min_lr", "warmup_steps", "weight_decay",
               "grad_clip", "precision", "eval_interval", "checkpoint_interval", "keep_last", "seed", "device",
               "stop_after")  # TrainConfig fields; None = fine-tuning's default


@dataclass(slots=True, kw_only=True)
class FinetuneOptions:
    model: str = opt("default", help="base model: an HF-format directory, or 'default' (the default model in the "
                                     "model store, built by cubelm build-default)", metavar="DIR|default")
    data: str = opt(help="instruct rows: a .jsonl file of chat {messages}, Alpaca {instruction, input, output} or "
                         "{prompt, completion} rows, or stdlib-instruct[:MODULE,...] (docstring -> function source)",
                    metavar="SRC")
    method: str = opt("lora", choices=["full", "lora", "qlora"],
                      help="full (every weight), lora (frozen base + low-rank adapters) or qlora (4-bit NF4 base)")
    out: str = opt(help="run directory: checkpoints/, metrics.jsonl, curves.png, adapter/ or model/", metavar="DIR")
    lora_r: int = opt(8, help="LoRA rank r (peft: r)")
    lora_alpha: int = opt(8, help="LoRA alpha: the update is scaled by alpha / r (alpha / sqrt(r) with --use-rslora)")
    lora_dropout: float = opt(0.0, help="dropout on the adapter's input")
    target_modules: str = opt(PROJECTIONS, help="projections that get adapters: comma-separated names, all-linear, "
                                                "or a regex over qualified module names (peft's rule)")
    use_rslora: bool = opt(False, help="rank-stabilized LoRA: scale alpha / sqrt(r)")
    seq_len: int | None = opt(None, help="longest example in tokens; longer ones are dropped (see --truncate) "
                                         "(default: 512, or the model's context if shorter)")
    truncate: bool = opt(False, help="cut examples longer than --seq-len instead of dropping them")
    micro_batch_size: int | None = opt(None, help="examples per forward/backward, global: data-parallel ranks split "
                                                  "them (default: 8)")
    grad_accum: int | None = opt(None, help="micro-batches accumulated per optimizer step (default: 1)")
    max_steps: int | None = opt(None, help="optimizer steps in the whole run (default: 300)")
    lr: float | None = opt(None, help="peak learning rate (default: 2e-3 for lora/qlora, 1e-4 for full)")
    min_lr: float | None = opt(None, help="final learning rate of the cosine schedule (default: lr / 10)")
    warmup_steps: int | None = opt(None, help="linear warmup steps (default: 10)")
    weight_decay: float | None = opt(None, help="AdamW weight decay on matrices (default: 0)")
    grad_clip: float | None = opt(None, help="clip the global gradient norm to this (default: 1.0)")
    precision: str | None = opt(None, choices=["fp32", "bf16"], help="fp32 (default) or bf16 autocast")
    val_fraction: float = opt(0.05, help="share of rows (JSONL) or of modules (stdlib-instruct) held out for "
                                         "validation")
    max_val_examples: int = opt(256, help="evaluate on at most this many held-out examples (0 = all)")
    eval_interval: int | None = opt(None, help="evaluate the held-out answer loss every N steps (default: 100)")
    checkpoint_interval: int | None = opt(None, help="checkpoint every N steps (default: 100)")
    keep_last: int | None = opt(None, help="checkpoints to keep (the best one is always kept)")
    seed: int | None = opt(None, help="seed for adapter initialization and data order")
    device: str | None = opt(None, help="torch device: cpu, cuda, ...")
    stop_after: int | None = opt(None, help="stop this invocation after N steps (resume later with --resume)")
    resume: bool = opt(False, help="continue exactly from the latest checkpoint in --out")
    progress: bool = opt(True, help="show a progress bar")
    nproc: int = opt(1, help="launch this many local ranks under torchrun (data parallel)")
    dp_mode: str = opt("fsdp", choices=["ddp", "fsdp"], help="data parallel: ddp (replicate) or fsdp (FSDP2: shard "
                                                             "the frozen base, adapters and optimizer state)")
    dist_timeout: float = opt(300.0, help="seconds a collective may wait before the job fails (a hung rank)")


def lora_config(o: FinetuneOptions):
    from cubelm.finetune.config import LoraConfig
    return LoraConfig(r=o.lora_r, lora_alpha=o.lora_alpha, lora_dropout=o.lora_dropout,
                      target_modules=parse_target_modules(o.target_modules), use_rslora=o.use_rslora)


def parse_target_modules(value: str) -> tuple[str, ...] | str:
    """Names (``q_proj,v_proj``), ``all-linear`` (every projection, not the output head, as peft), or a regex."""
    if value.strip() == "all-linear":
        return tuple(PROJECTIONS.split(","))
    if _REGEX_CHARS.search(value):
        try:
            re.compile(value)
        except re.error as e:
            raise CubelmError(f"--target-modules {value!r} is not a valid regex ({e})") from None
        return value
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    if not names:
        raise CubelmError("--target-modules is empty; name projections, e.g. q_proj,v_proj")
    return names


def check_targets(model_dir, lora) -> None:
    """Every named target must exist in the model (peft accepts a list as long as one name matches; a typo that
    silently adapts fewer layers is worse than an error)."""
    import torch

    from cubelm.model.config import read_config_json
    from cubelm.model.transformer import CausalLM
    if isinstance(lora.target_modules, str):
        return  # a regex: apply_lora says so if it matches nothing
    with torch.device("meta"):
        model = CausalLM(read_config_json(model_dir))
    have = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if hasattr(mod, "in_features")}
    lacking = [t for t in lora.target_modules if t not in have]
    if lacking:
        raise CubelmError(f"--target-modules {', '.join(lacking)}: the model has no such projection; it has "
                          f"{', '.join(sorted(have))}")


def _configs(o: FinetuneOptions):
    from cubelm.engine.commands import resolve_model_dir
    from cubelm.finetune.recipe import TRAIN_DEFAULTS, FinetuneConfig, finetune_train_config
    from cubelm.model.config import read_config_json
    model_dir = resolve_model_dir(None if o.model == "default" else o.model).resolve()
    context = read_config_json(model_dir).max_position_embeddings
    lora = lora_config(o) if o.method != "full" else None
    if lora is not None:
        check_targets(model_dir, lora)
    ft = FinetuneConfig(model=str(model_dir), data=o.data, method=o.method, val_fraction=o.val_fraction,
                        max_val_examples=o.max_val_examples, truncate=o.truncate, **({"lora": lora} if lora else {}))
    train = finetune_train_config(o.method, preset=str(model_dir),
                                  seq_len=o.seq_len or min(TRAIN_DEFAULTS["seq_len"], context),
                                  **{name: getattr(o, name) for name in TRAIN_FLAGS})
    return ft, train


def run_finetune(o: FinetuneOptions) -> int:
    if o.nproc < 1:
        raise CubelmError(f"--nproc must be >= 1, got {o.nproc}")
    ft, cfg = _configs(o)
    from cubelm.parallel.config import ParallelConfig
    parallel = ParallelConfig(dp_mode=o.dp_mode, timeout_s=o.dist_timeout)
    if o.nproc > 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        from cubelm.parallel.launch import launch_local, options_to_argv
        return launch_local(o.nproc, ["finetune", *options_to_argv(o, skip=("nproc",))])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from cubelm.finetune.trainer import ParallelFinetuneTrainer
        trainer = ParallelFinetuneTrainer(cfg, ft, parallel, o.out, resume=o.resume)
    else:
        from cubelm.finetune.trainer import FinetuneTrainer
        trainer = FinetuneTrainer(cfg, ft, o.out, resume=o.resume)
    if not trainer.is_main:
        trainer.run(progress=False)
        return 0
    total = trainer.model_config.num_params()
    print(f"[cubelm] fine-tuning {ft.model} ({ft.method}: {trainer.num_trainable:,} of {total:,} parameters "
          f"trainable) for {cfg.max_steps} steps of {cfg.micro_batch_size * cfg.grad_accum} examples", flush=True)
    out = trainer.run(progress=o.progress)
    print(f"[cubelm] done at step {trainer.state.step}: {out}")
    return 0
