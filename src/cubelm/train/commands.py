"""``cubelm train`` (a recipe plus overrides, on packed data) and ``cubelm build-default``."""

from __future__ import annotations

from dataclasses import dataclass

from cubelm.cli import opt


@dataclass(slots=True, kw_only=True)
class TrainOptions:
    data: str = opt(help="packed data directory written by 'cubelm data prepare'", metavar="DIR")
    out: str = opt(help="run directory: checkpoints/, metrics.jsonl, curves.png, model/", metavar="DIR")
    recipe: str = opt("tiny", help="training recipe: tiny, small, base (presets + hyperparameters)")
    preset: str | None = opt(None, help="model preset (overrides the recipe's)")
    seq_len: int | None = opt(None, help="tokens per training sequence")
    micro_batch_size: int | None = opt(None, help="sequences per forward/backward")
    grad_accum: int | None = opt(None, help="micro-batches accumulated per optimizer step")
    max_steps: int | None = opt(None, help="optimizer steps in the whole run (sets the LR schedule)")
    lr: float | None = opt(None, help="peak learning rate")
    min_lr: float | None = opt(None, help="final learning rate of the cosine schedule")
    warmup_steps: int | None = opt(None, help="linear warmup steps")
    weight_decay: float | None = opt(None, help="AdamW weight decay (matrices only)")
    grad_clip: float | None = opt(None, help="clip the global gradient norm to this")
    precision: str | None = opt(None, help="fp32 (default; right for CPUs without bf16 hardware) or bf16 autocast",
                                choices=["fp32", "bf16"])
    activation_checkpointing: bool | None = opt(None, help="recompute each layer's activations in backward")
    compile: bool | None = opt(None, help="torch.compile the model (a cold compile takes 15-60 s)")
    eval_interval: int | None = opt(None, help="evaluate (loss, perplexity, bits/byte) every N steps")
    eval_batches: int | None = opt(None, help="validation micro-batches per evaluation")
    checkpoint_interval: int | None = opt(None, help="checkpoint every N steps")
    keep_last: int | None = opt(None, help="checkpoints to keep (the best one is always kept)")
    seed: int | None = opt(None, help="seed for initialization and data order")
    device: str | None = opt(None, help="torch device: cpu, cuda, ...")
    stop_after: int | None = opt(None, help="stop this invocation after N steps (resume later with --resume)")
    resume: bool = opt(False, help="continue exactly from the latest checkpoint in --out")
    progress: bool = opt(True, help="show a progress bar")


@dataclass(slots=True, kw_only=True)
class BuildDefaultOptions:
    force: bool = opt(False, help="rebuild even if the default model exists")
    max_steps: int | None = opt(None, help="override the tiny recipe's steps (fewer = faster, worse)")
    work_dir: str | None = opt(None, help="where data and checkpoints go (default: $CUBELM_HOME/runs/default)")


def _train_config(o: TrainOptions):
    from dataclasses import fields

    from cubelm.train.config import recipe
    overrides = {f.name: getattr(o, f.name) for f in fields(o)
                 if f.name not in ("data", "out", "recipe", "resume", "progress")}
    return recipe(o.recipe, **overrides)


def run_train(o: TrainOptions) -> int:
    from cubelm.train.loop import Trainer
    cfg = _train_config(o)
    trainer = Trainer(cfg, o.data, o.out, resume=o.resume)
    print(f"[cubelm] training {cfg.preset} ({trainer.model_config.num_params():,} params) for {cfg.max_steps} "
          f"steps of {cfg.tokens_per_step:,} tokens", flush=True)
    out = trainer.run(progress=o.progress)
    print(f"[cubelm] done at step {trainer.state.step}: {out}")
    return 0


def run_build_default(o: BuildDefaultOptions) -> int:
    from cubelm.train.default_model import build_default_model
    path = build_default_model(force=o.force, max_steps=o.max_steps, work_dir=o.work_dir)
    print(path)
    return 0
