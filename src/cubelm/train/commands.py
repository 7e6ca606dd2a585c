"""``cubelm train`` (a recipe plus overrides, on packed data) and ``cubelm build-default``.

    cubelm train --data DIR --out RUN                                  # one process
    cubelm train --data DIR --out RUN --nproc 2 --dp-mode fsdp         # FSDP2 on 2 local ranks
    cubelm train --data DIR --out RUN --nproc 4 --dp 2 --tp 2          # 2-D mesh: FSDP × tensor parallel
    cubelm train --data DIR --out RUN --nproc 2 --pp 2 --schedule zbv  # pipeline, zero-bubble V schedule
    torchrun --nnodes 2 --node-rank R --master-addr HOST --nproc-per-node 8 -m cubelm train …  # several machines
"""

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
    micro_batch_size: int | None = opt(None, help="sequences per forward/backward, global: data-parallel ranks "
                                                  "split them")
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
    checkpoint_alpha: bool | None = opt(None, help="log each projection's power-law alpha (weightwatcher's "
                                                   "spectral fit) to metrics.jsonl at every checkpoint (default: on)")
    resume: bool = opt(False, help="continue exactly from the latest checkpoint in --out")
    progress: bool = opt(True, help="show a progress bar")
    nproc: int = opt(1, help="launch this many local ranks under torchrun (one machine; for several, run torchrun "
                             "yourself)")
    dp: int | None = opt(None, help="data-parallel degree (default: world size / (tp × pp))")
    dp_mode: str = opt("fsdp", choices=["ddp", "fsdp"], help="data parallel: ddp (replicate, all-reduce) or fsdp "
                                                             "(FSDP2: shard weights, grads, optimizer state)")
    tp: int = opt(1, help="tensor-parallel degree (column/row-parallel linears, sequence-parallel norms)")
    pp: int = opt(1, help="pipeline-parallel degree")
    schedule: str = opt("1f1b", choices=["gpipe", "1f1b", "interleaved-1f1b", "looped-bfs", "interleaved-zb", "zbv",
                                         "dualpipev"], help="pipeline schedule")
    microbatches: int | None = opt(None, help="pipeline micro-batches per micro-step (default: 2 × pp)")
    virtual_stages: int | None = opt(None, help="pipeline stages per rank (default: 1 for gpipe/1f1b, else 2)")
    sequence_parallel: bool = opt(True, help="with --tp: shard the norms' activations along the sequence")
    dist_timeout: float = opt(300.0, help="seconds a collective may wait before the job fails (a hung rank)")


@dataclass(slots=True, kw_only=True)
class BuildDefaultOptions:
    force: bool = opt(False, help="rebuild even if the default model exists")
    max_steps: int | None = opt(None, help="override the tiny recipe's steps (fewer = faster, worse)")
    work_dir: str | None = opt(None, help="where data and checkpoints go (default: $CUBELM_HOME/runs/default)")
    instruct: bool = opt(False, help="also train a LoRA instruct adapter on stdlib-instruct (~3 minutes) into "
                                     "$CUBELM_HOME/models/default-instruct (peft format)")
    instruct_steps: int | None = opt(None, help="override the instruct adapter's steps")


def _train_config(o: TrainOptions):
    from dataclasses import fields

    from cubelm.train.config import recipe
    from cubelm.train.config import TrainConfig
    names = {f.name for f in fields(TrainConfig)}
    overrides = {f.name: getattr(o, f.name) for f in fields(o) if f.name in names}
    return recipe(o.recipe, **overrides)


def _parallel_config(o: TrainOptions):
    from cubelm.parallel.config import ParallelConfig
    return ParallelConfig(dp=o.dp, dp_mode=o.dp_mode, tp=o.tp, pp=o.pp, schedule=o.schedule,
                          microbatches=o.microbatches, virtual_stages=o.virtual_stages,
                          sequence_parallel=o.sequence_parallel, timeout_s=o.dist_timeout)


def run_train(o: TrainOptions) -> int:
    import os

    from cubelm.errors import CubelmError
    cfg, pc = _train_config(o), _parallel_config(o)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if o.nproc < 1:
        raise CubelmError(f"--nproc must be >= 1, got {o.nproc}")
    if o.nproc > 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        from cubelm.parallel.launch import launch_local, options_to_argv
        pc.resolved(o.nproc)  # fail here, not in every rank
        return launch_local(o.nproc, ["train", *options_to_argv(o, skip=("nproc",))])
    if world > 1:
        from cubelm.parallel.trainer import ParallelTrainer
        trainer = ParallelTrainer(cfg, pc, o.data, o.out, resume=o.resume)
    else:
        if (pc.dp or 1) * pc.tp * pc.pp > 1:
            raise CubelmError("--dp/--tp/--pp above 1 need that many processes: add --nproc N or run under torchrun")
        from cubelm.train.loop import Trainer
        trainer = Trainer(cfg, o.data, o.out, resume=o.resume)
    if not trainer.is_main:
        trainer.run(progress=False)
        return 0
    print(f"[cubelm] training {cfg.preset} ({trainer.model_config.num_params():,} params) for {cfg.max_steps} "
          f"steps of {cfg.tokens_per_step:,} tokens", flush=True)
    out = trainer.run(progress=o.progress)
    print(f"[cubelm] done at step {trainer.state.step}: {out}")
    return 0


def run_build_default(o: BuildDefaultOptions) -> int:
    from cubelm.train.default_model import build_default_model, build_instruct_adapter
    path = build_default_model(force=o.force, max_steps=o.max_steps, work_dir=o.work_dir)
    print(path)
    if o.instruct:
        print(build_instruct_adapter(force=o.force, max_steps=o.instruct_steps))
    return 0
