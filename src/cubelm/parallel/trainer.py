"""``ParallelTrainer``: the single-process ``Trainer`` with parallelism plugged in through its hooks.

Same loop, schedule, batches and checkpoints cadence; what changes: the model is built exactly as in a single
process (same seed, same init), then split into pipeline stages, sharded with TP, and wrapped with DDP or FSDP2
from outside; each data-parallel rank reads ``micro_batch_size / dp`` distinct sequences of every global
micro-batch; checkpoints are sharded (DCP); rank 0 logs, writes metrics and exports.

    torchrun --nproc-per-node 2 -m cubelm train --data DIR --out RUN --dp-mode fsdp
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from cubelm.errors import CubelmError
from cubelm.parallel.config import ParallelConfig
from cubelm.parallel.grads import clip_grad_norm_
from cubelm.parallel.mesh import backend_for, build_mesh, init_distributed
from cubelm.train.batches import IGNORE_INDEX
from cubelm.train.config import TrainConfig
from cubelm.train.loop import Trainer, lm_loss
from cubelm.train.optim import build_optimizer, lr_at, set_lr


class PipelineLoss:
    """The schedule's loss_fn: per micro-batch cross-entropy times ``scale``. ``reduction="mean"`` for training on
    unmasked data (the schedule divides gradients by the number of pipeline micro-batches, which averages the
    means), ``"sum"`` for eval and for masked training, where ``scale`` carries the token weighting."""

    def __init__(self):
        self.scale, self.reduction = 1.0, "mean"

    def __call__(self, logits, targets):
        return lm_loss(logits, targets, reduction=self.reduction) * self.scale


class ParallelTrainer(Trainer):
    can_sample = False  # sample from the exported model instead (cubelm generate)

    def __init__(self, cfg: TrainConfig, parallel: ParallelConfig, data_dir, out_dir, *, resume: bool = False,
                 log=None):
        device = torch.device(cfg.device)
        init_distributed(device, parallel.timeout_s)
        self.mesh = build_mesh(parallel, device)
        self.parallel = self.mesh.parallel
        self.rank = dist.get_rank()
        self.is_main = self.rank == 0
        if cfg.micro_batch_size % self.parallel.dp:
            raise CubelmError(f"--micro-batch-size {cfg.micro_batch_size} (global) must divide by dp "
                              f"{self.parallel.dp}")
        self.local_batch = cfg.micro_batch_size // self.parallel.dp
        if self.parallel.pp > 1 and self.local_batch % self.parallel.microbatches:
            raise CubelmError(f"each dp rank's {self.local_batch} sequences per micro-step must split into "
                              f"{self.parallel.microbatches} pipeline micro-batches; change --micro-batch-size or "
                              f"--microbatches")
        quiet = lambda msg: None  # noqa: E731 - only rank 0 talks
        log = log or (lambda msg: print(msg, file=sys.stderr))
        super().__init__(cfg, data_dir, out_dir, resume=resume, log=log if self.is_main else quiet)

    # ---- building -----------------------------------------------------------------------------------------
    def _setup_model(self) -> None:
        cfg, parallel, mesh = self.cfg, self.parallel, self.mesh
        model = self._build_model()  # identical on every rank (same seed)
        if parallel.tp > 1:
            from cubelm.parallel.tensor_parallel import check_tp_divisible
            check_tp_divisible(self.model_config, parallel.tp, cfg.seq_len if parallel.sequence_parallel else None)
        if parallel.pp > 1:
            self._setup_pipeline(model)
        else:
            self.model = self.forward = self._parallelize(model)
            if parallel.dp > 1 and parallel.dp_mode == "ddp":
                from cubelm.parallel.data_parallel import apply_ddp
                self.forward = apply_ddp(model, mesh.mesh["dp"])
        self.optimizer = build_optimizer(self.model, cfg)

    def _parallelize(self, module):
        """TP, then activation checkpointing, then FSDP (torchtitan's order); DDP wraps later, at the call site."""
        cfg, parallel, mesh = self.cfg, self.parallel, self.mesh
        if parallel.tp > 1:
            from cubelm.parallel.tensor_parallel import apply_tp
            apply_tp(module, mesh.mesh["tp"], sequence_parallel=parallel.sequence_parallel)
        if cfg.activation_checkpointing:
            from types import SimpleNamespace

            from cubelm.train.activation_checkpointing import apply_activation_checkpointing
            layers = module.model.layers  # a ModuleDict (by layer index) in a pipeline stage
            layers = list(layers.values()) if isinstance(layers, torch.nn.ModuleDict) else layers
            apply_activation_checkpointing(SimpleNamespace(model=SimpleNamespace(layers=layers)))
        if parallel.dp > 1 and parallel.dp_mode == "fsdp":
            from cubelm.parallel.data_parallel import apply_fsdp, mixed_precision_policy
            apply_fsdp(module, mesh.mesh["dp"], mixed_precision_policy(cfg.precision, backend_for(self.device)))
        return module

    def _setup_pipeline(self, model) -> None:
        from cubelm.parallel.pipeline import build_schedule, local_container, split_model, stages_of_rank
        parallel, mesh = self.parallel, self.mesh
        stage_ids = stages_of_rank(mesh.pp_rank, parallel)
        stages = [self._parallelize(s) for s in split_model(model, parallel, mesh.pp_rank)]
        self.has_first, self.has_last = 0 in stage_ids, parallel.num_stages - 1 in stage_ids
        self.model = local_container(model, stages)
        run = stages
        if parallel.dp > 1 and parallel.dp_mode == "ddp":
            from cubelm.parallel.data_parallel import apply_ddp
            run = [apply_ddp(s, mesh.mesh["dp"]) for s in stages]
        self.loss_fn = PipelineLoss()
        self.schedule = build_schedule(parallel, run, stage_ids, mesh.group("pp"), self.device, self.loss_fn)
        self.forward = None

    # ---- one optimizer step --------------------------------------------------------------------------------
    def train_step(self) -> dict:
        cfg, step = self.cfg, self.state.step
        _maybe_die(self.rank, step)
        lr = lr_at(step, cfg)
        set_lr(self.optimizer, lr)
        total = torch.zeros((), device=self.device)
        for i in range(cfg.grad_accum):
            x, y = self.train_batches.batch(self.state.samples, self.local_batch, rank=self.mesh.dp_rank,
                                            world=self.parallel.dp, device=self.device)
            self.state.samples += cfg.micro_batch_size
            total += self._forward_backward(x, y, last=i == cfg.grad_accum - 1)
        pp_group = self.mesh.group("pp") if self.parallel.pp > 1 else None
        grad_norm = clip_grad_norm_(self.model.parameters(), cfg.grad_clip, pp_group)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        loss = self._global_mean(total / cfg.grad_accum)
        return {"kind": "train", "step": self.state.step, "loss": loss, "lr": lr, "grad_norm": float(grad_norm)}

    def _forward_backward(self, x, y, *, last: bool) -> torch.Tensor:
        """One micro-step; returns this rank's share of the micro-batch loss (``_global_mean`` combines them)."""
        scale = 1.0 / self.cfg.grad_accum
        weight = self._token_weight(y)
        if self.parallel.pp > 1:
            if weight is None:
                self.loss_fn.scale, self.loss_fn.reduction = scale, "mean"
            else:  # the schedule divides by the number of pipeline micro-batches: multiply it back
                self.loss_fn.scale, self.loss_fn.reduction = scale * weight * self.parallel.microbatches, "sum"
            losses: list = []
            self._pipeline_step(self.schedule.step, x, y, losses)
            if not losses:
                return torch.zeros((), device=self.device)
            return torch.stack(losses).mean().detach() / scale
        # DDP: all-reduce gradients only in the last micro-step's backward
        sync = self.forward.no_sync() if (not last and hasattr(self.forward, "no_sync")) else _null()
        with sync:
            with self._autocast():
                logits = self.forward(x)
                loss = lm_loss(logits, y) if weight is None else lm_loss(logits, y, reduction="sum") * weight
            (loss * scale).backward()
        return loss.detach()

    def _token_weight(self, y: torch.Tensor) -> float | None:
        """For masked data (instruct sets), the factor that turns this rank's summed loss into its share of the
        mean over the whole micro-batch's target tokens: ``dp / tokens in the micro-batch``. Data-parallel
        averaging then gives exactly the single-process loss; averaging per-rank means would not, since ranks hold
        different numbers of unmasked tokens. None for unmasked data, where every rank holds the same count."""
        if getattr(self.train_batches, "mask", None) is None:
            return None
        count = (y != IGNORE_INDEX).sum().to(torch.float64)
        if self.parallel.dp > 1:
            dist.all_reduce(count, group=self.mesh.group("dp"))
        return self.parallel.dp / max(1.0, float(count))

    def _pipeline_step(self, fn, x, y, losses: list) -> None:
        args = (x,) if self.has_first else ()
        kwargs = {"target": y, "losses": losses} if self.has_last else {}
        with self._autocast():
            fn(*args, **kwargs)

    def _reports_loss(self) -> bool:
        """One rank per data-parallel replica contributes the loss: the last stage's holder, tp rank 0."""
        return (self.parallel.pp == 1 or self.has_last) and self.mesh.tp_rank == 0

    def _global_mean(self, local: torch.Tensor) -> float:
        t = (local.float().cpu() if self._reports_loss() else torch.zeros(())) / self.parallel.dp
        t = t.to(self.device)
        dist.all_reduce(t)
        return float(t)

    # ---- evaluation -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        if self.parallel.pp == 1:
            return super().evaluate()  # every rank runs the same batches (FSDP/TP need all ranks in the forward)
        import math

        from cubelm.eval.bpb import bits_per_byte
        self.model.eval()
        self.loss_fn.scale, self.loss_fn.reduction = 1.0, "sum"
        loss_sum, tokens, nbytes = torch.zeros((), device=self.device), 0, 0
        for i in range(self._num_eval_batches()):
            x, y = self.val_batches.batch(i * self.cfg.micro_batch_size, self.local_batch, rank=self.mesh.dp_rank,
                                          world=self.parallel.dp, device=self.device)
            losses: list = []
            self._pipeline_step(self.schedule.eval, x, y, losses)
            if losses and self._reports_loss():
                loss_sum += torch.stack(losses).sum()
            valid = y.flatten() != IGNORE_INDEX
            tokens += int(valid.sum())
            nbytes += int(self.token_bytes[y.flatten()[valid]].sum())
        self.model.train()
        copies = self.parallel.pp * self.parallel.tp
        counts = torch.tensor([float(loss_sum), tokens / copies, nbytes / copies], dtype=torch.float64,
                              device=self.device)
        dist.all_reduce(counts)  # every (dp, pp, tp) rank counted its tokens: divide the pp·tp duplicates out
        loss_sum, tokens, nbytes = float(counts[0]), round(float(counts[1])), round(float(counts[2]))
        val_loss = loss_sum / max(1, tokens)
        return {"kind": "eval", "step": self.state.step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50)),
                "val_bpb": bits_per_byte(loss_sum, nbytes), "val_tokens": tokens}

    # ---- checkpoints and export -------------------------------------------------------------------------------
    def _write_checkpoint(self) -> Path:
        from cubelm.parallel.checkpoint import save_sharded_checkpoint
        return save_sharded_checkpoint(self.ckpt_root, self.model, self.optimizer, self.state, self.run_config(),
                                       extra_files=self._tokenizer_files())

    def _load(self, path: Path):
        from cubelm.parallel.checkpoint import load_sharded_checkpoint
        from cubelm.train.checkpoint import is_sharded
        if not is_sharded(path):
            raise CubelmError(f"{path} was written by a single-process run; resume it without --nproc/torchrun, "
                              f"or start the distributed run in a new --out")
        return load_sharded_checkpoint(path, self.model, self.optimizer)

    def _full_model(self):
        from cubelm.model.transformer import CausalLM
        from cubelm.parallel.checkpoint import gather_full_state
        full = gather_full_state(self.model, self.mesh.group("pp") if self.parallel.pp > 1 else None)
        if not self.is_main:
            return None
        model = CausalLM(self.model_config)
        if self.model_config.tie_word_embeddings:
            full.setdefault("lm_head.weight", full["model.embed_tokens.weight"])
        model.load_state_dict(full, strict=True)
        return model


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _maybe_die(rank: int, step: int) -> None:
    """Fault injection for tests: CUBELM_FAULT_KILL="RANK:STEP" SIGKILLs that rank before that step;
    CUBELM_FAULT_HANG="RANK:STEP" makes it stop answering (sleep) instead."""
    here = [str(rank), str(step)]
    if os.environ.get("CUBELM_FAULT_KILL", "").split(":") == here:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("CUBELM_FAULT_HANG", "").split(":") == here:
        import time
        time.sleep(3600)
