"""The training loop: one ``Trainer`` that builds the model from a preset and packed data, trains with AdamW,
evaluates (loss, perplexity, bits per byte), samples, checkpoints atomically and exports HF format.

Exact resume: the only state besides weights and optimizer moments is the step counter and the number of samples
consumed (batches are a pure function of that counter, see ``batches.py``); fp32 on CPU resumes bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cubelm.errors import CubelmError
from cubelm.train.batches import IGNORE_INDEX, WindowSampler
from cubelm.train.checkpoint import (TrainerState, is_sharded, list_checkpoints, load_checkpoint, mark_best, prune,
                                     save_checkpoint, saved_config, sweep_incomplete)
from cubelm.train.config import TrainConfig
from cubelm.eval.bpb import bits_per_byte
from cubelm.train.metrics import MetricsLog, plot_curves
from cubelm.train.optim import build_optimizer, lr_at, set_lr


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy in fp32 over (B, T, V) logits; targets == -100 are ignored (masked prompt tokens). The mean
    of a batch without a single target token (a window that is all prompt) is 0 with zero gradients, not NaN."""
    flat = targets.flatten()
    loss = F.cross_entropy(logits.float().flatten(0, 1), flat, ignore_index=IGNORE_INDEX,
                           reduction="sum" if reduction == "mean" else reduction)
    return loss / (flat != IGNORE_INDEX).sum().clamp(min=1) if reduction == "mean" else loss


def token_byte_lengths(tokenizer, vocab_size: int) -> torch.Tensor:
    """UTF-8 bytes each token stands for (0 for special tokens): the denominator of bits per byte."""
    return torch.tensor([tokenizer.token_num_bytes(i) for i in range(vocab_size)], dtype=torch.int64)


class Trainer:
    is_main = True  # the process that logs, writes metrics and exports (rank 0 in a distributed run)
    can_sample = True

    def __init__(self, cfg: TrainConfig, data_dir: str | Path, out_dir: str | Path, *, resume: bool = False,
                 log=None):
        self.cfg, self.out_dir = cfg, Path(out_dir)
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.data_dir = Path(data_dir)
        self.device = torch.device(cfg.device)
        self._setup_data()
        torch.manual_seed(cfg.seed)
        self._setup_model()
        self.token_bytes = token_byte_lengths(self.tokenizer, self.model_config.vocab_size).to(self.device)
        self.ckpt_root = self.out_dir / "checkpoints"
        self.state = TrainerState(step=0, samples=0)
        if resume:
            self._resume()
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl",
                                  truncate_after_step=self.state.step if resume else None) if self.is_main else None

    # ---- hooks: what a subclass (fine-tuning, parallelism) overrides; the loop below stays one ----------------
    def _setup_data(self) -> None:
        """Set ``tokenizer``, ``tokenizer_dir``, ``model_config``, ``train_batches`` and ``val_batches``."""
        from cubelm.data.packed import PackedData
        from cubelm.data.tokenizer import load_tokenizer
        from cubelm.model.config import resolve_config

        cfg = self.cfg
        data = PackedData(self.data_dir)
        self.tokenizer_dir = self.data_dir / "tokenizer"
        self.tokenizer = load_tokenizer(self.tokenizer_dir)
        meta = data.meta
        base = resolve_config(cfg.preset)  # a preset name, or a config.json / model directory
        self.model_config = base.replace(
            vocab_size=int(meta["vocab_size"]), bos_token_id=meta.get("bos_token_id"),
            eos_token_id=meta.get("eos_token_id"), pad_token_id=meta.get("pad_token_id"),
            max_position_embeddings=max(base.max_position_embeddings, cfg.seq_len))
        self.train_batches = WindowSampler(data.train, cfg.seq_len, mask=data.train_mask, seed=cfg.seed)
        self.val_batches = WindowSampler(data.val, cfg.seq_len, mask=data.val_mask, shuffle=False)

    def _build_model(self) -> torch.nn.Module:
        """The model before any wrapping (compile, DDP, FSDP): fp32 master weights from the seed. The optimizer
        trains the parameters that require grad, so this is also where a subclass chooses them."""
        from cubelm.model.transformer import build_model
        return build_model(self.model_config, device=self.device, seed=self.cfg.seed)

    def run_config(self) -> dict:
        """The settings a checkpoint records and ``--resume`` checks against."""
        return self.cfg.to_dict()

    def _num_eval_batches(self) -> int:
        return self.cfg.eval_batches

    def _tokens_in(self, first_sample: int, end_sample: int) -> int:
        """Training tokens in global samples [first_sample, end_sample): for tokens/s."""
        return (end_sample - first_sample) * self.cfg.seq_len

    def _before_training(self) -> None:
        """Called once by ``run`` before the first step of this invocation."""

    def _generation_config(self) -> dict:
        """Sampling defaults written into the exported ``generation_config.json``."""
        return {"do_sample": True, "temperature": 0.8, "top_k": 50}

    def _setup_model(self) -> None:
        """Set ``model`` (what holds the weights), ``forward`` (what to call) and ``optimizer``."""
        cfg = self.cfg
        self.model = self._build_model()
        if cfg.activation_checkpointing:
            from cubelm.train.activation_checkpointing import apply_activation_checkpointing
            apply_activation_checkpointing(self.model)
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        self.optimizer = build_optimizer(self.model, cfg)

    def _resume(self) -> None:
        removed = sweep_incomplete(self.ckpt_root) if self.is_main else []
        if removed:
            self.log(f"[cubelm] removed {len(removed)} incomplete checkpoint(s) left by a killed run")
        ckpts = list_checkpoints(self.ckpt_root)
        if not ckpts:
            self.log(f"[cubelm] --resume: no checkpoint in {self.ckpt_root}; starting from step 0")
            return
        self._check_same_config(saved_config(ckpts[-1]))  # before loading: other settings may not even fit
        self.state, saved = self._load(ckpts[-1])
        self._check_same_config(saved)
        self.log(f"[cubelm] resumed from {ckpts[-1]} at step {self.state.step}")

    def _check_same_config(self, saved: dict) -> None:
        changed = {k: (saved[k], v) for k, v in self.run_config().items()
                   if k in saved and saved[k] != v and k not in ("stop_after", "eval_interval", "sample_interval",
                                                                 "checkpoint_interval", "keep_last", "compile",
                                                                 "checkpoint_alpha")}
        if changed:
            raise CubelmError(f"--resume with a different config changes {changed} (saved, now); resume with "
                              f"the original settings or train into a new --out")

    def _load(self, path: Path) -> tuple[TrainerState, dict]:
        if is_sharded(path):  # from a distributed run: the shards load on any world size, this one included
            from cubelm.parallel.checkpoint import load_sharded_checkpoint
            return load_sharded_checkpoint(path, self.model, self.optimizer)
        return load_checkpoint(path, self.model, self.optimizer)

    def _autocast(self):
        if self.cfg.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training objective of one micro-batch (next-token cross-entropy; distillation adds a teacher term)."""
        return lm_loss(self.forward(x), y)

    def train_step(self) -> dict:
        cfg, step = self.cfg, self.state.step
        lr = lr_at(step, cfg)
        set_lr(self.optimizer, lr)
        total = torch.zeros((), device=self.device)
        for _ in range(cfg.grad_accum):
            x, y = self.train_batches.batch(self.state.samples, cfg.micro_batch_size, device=self.device)
            self.state.samples += cfg.micro_batch_size
            with self._autocast():
                loss = self._loss(x, y)
            (loss / cfg.grad_accum).backward()
            total += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        return {"kind": "train", "step": self.state.step, "loss": (total / cfg.grad_accum).item(), "lr": lr,
                "grad_norm": float(grad_norm)}

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.model.eval()
        loss_sum, tokens, nbytes = 0.0, 0, 0
        for i in range(self._num_eval_batches()):
            x, y = self.val_batches.batch(i * self.cfg.micro_batch_size, self.cfg.micro_batch_size, device=self.device)
            with self._autocast():
                losses = lm_loss(self.model(x), y, reduction="none")
            valid = y.flatten() != IGNORE_INDEX
            loss_sum += float(losses[valid].sum())
            tokens += int(valid.sum())
            nbytes += int(self.token_bytes[y.flatten()[valid]].sum())
        self.model.train()
        val_loss = loss_sum / max(1, tokens)
        return {"kind": "eval", "step": self.state.step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50)),
                "val_bpb": bits_per_byte(loss_sum, nbytes), "val_tokens": tokens}

    def sample(self, prompt: str = "def ", max_new_tokens: int = 64) -> str:
        from cubelm.engine.params import SamplingParams
        from cubelm.engine.reference import generate_tokens
        self.model.eval()
        ids = self.tokenizer.encode(prompt)
        gen = SamplingParams(temperature=0.8, top_k=50, seed=0, max_tokens=max_new_tokens)
        out = list(generate_tokens(self.model, ids, gen))
        self.model.train()
        return prompt + self.tokenizer.decode(out)

    def save(self, eval_record: dict | None = None) -> Path:
        if eval_record and (self.state.best_val_loss is None or eval_record["val_loss"] < self.state.best_val_loss):
            self.state.best_val_loss = eval_record["val_loss"]
            is_best = True
        else:
            is_best = False
        path = self._write_checkpoint()
        if is_best and self.is_main:
            mark_best(self.ckpt_root, self.state.step, eval_record["val_loss"])
        if self.is_main:
            prune(self.ckpt_root, self.cfg.keep_last)
        return path

    def _write_checkpoint(self) -> Path:
        return save_checkpoint(self.ckpt_root, self.model, self.optimizer, self.state, self.run_config(),
                               extra_files=self._tokenizer_files())

    def _tokenizer_files(self) -> dict[str, Path]:
        return {p.name: p for p in self.tokenizer_dir.glob("*.json")}

    def run(self, progress: bool = True) -> Path:
        """Train to ``max_steps`` (or ``stop_after`` more steps); return the exported HF model directory."""
        from tqdm import tqdm
        cfg = self.cfg
        self.model.train()
        end = cfg.max_steps if cfg.stop_after is None else min(cfg.max_steps, self.state.step + cfg.stop_after)
        bar = tqdm(total=cfg.max_steps, initial=self.state.step, disable=not (progress and self.is_main), file=sys.stderr,
                   unit="step", dynamic_ncols=True)
        self._before_training()
        t_last, tokens_since = time.perf_counter(), 0
        while self.state.step < end:
            first_sample = self.state.samples
            rec = self.train_step()
            tokens_since += self._tokens_in(first_sample, self.state.samples)
            now = time.perf_counter()
            rec["tokens_per_s"] = tokens_since / max(now - t_last, 1e-9)
            t_last, tokens_since = now, 0
            self._write_metrics(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}")
            step = self.state.step
            eval_rec = None
            if step % cfg.eval_interval == 0 or step == cfg.max_steps:
                eval_rec = self.evaluate()
                sample_every = cfg.sample_interval or cfg.eval_interval
                if self.can_sample and (step % sample_every == 0 or step == cfg.max_steps):
                    eval_rec["sample"] = self.sample()
                self._write_metrics(eval_rec)
                if self.is_main:
                        bar.write(f"[cubelm] step {step}: val loss {eval_rec['val_loss']:.4f}, ppl "
                              f"{eval_rec['val_ppl']:.1f}, bits/byte {eval_rec['val_bpb']:.4f}"
                              + (f"\n{eval_rec['sample']}" if 'sample' in eval_rec else ""))
                t_last = time.perf_counter()  # do not charge eval time to training throughput
            if step % cfg.checkpoint_interval == 0 or step == end:
                self.save(eval_rec)
                self._write_spectral()
                t_last = time.perf_counter()
        bar.close()
        if self.is_main:
            plot_curves(self.metrics.records(), self.out_dir / "curves.png")
        return self.export() if self.state.step >= cfg.max_steps else self.ckpt_root

    def export(self, out: Path | None = None) -> Path:
        """The final model in HF format (weights + tokenizer), ready for ``cubelm generate`` and transformers."""
        from cubelm.model.hf_io import save_model
        out = out or self.out_dir / "model"
        model = self._full_model()
        if model is None:  # not the main rank of a distributed run: rank 0 writes
            return out
        save_model(model, out, generation_config=self._generation_config())
        for name, src in self._tokenizer_files().items():
            shutil.copyfile(src, out / name)
        summary = {"step": self.state.step, "best_val_loss": self.state.best_val_loss,
                   "train_config": self.run_config(), "data": str(self.data_dir)}
        (out / "training_summary.json").write_text(json.dumps(summary, indent=2))
        return out

    def _full_model(self):
        """The whole model as one plain ``CausalLM`` on this process, or None where another rank exports."""
        return self.model

    @torch.no_grad()
    def _write_spectral(self) -> None:
        """At a checkpoint: the mean power-law alpha of the projections (all, and per decoder layer; 2-6 is
        weightwatcher's "well trained") as a ``{"kind": "spectral"}`` record, with the seconds it took (one
        float64 SVD per projection: ~1 s for the tiny preset, a few hundred checkpoint-free steps apart). Single
        process only: a distributed run's weights are sharded (DTensors) or replicated on every rank."""
        import torch.distributed as dist
        if not (self.cfg.checkpoint_alpha and self.is_main) or (dist.is_available() and dist.is_initialized()):
            return
        from cubelm.compress.spectral import alpha_summary
        start = time.perf_counter()
        record = {"kind": "spectral", "step": self.state.step} | alpha_summary(self.model)
        self._write_metrics(record | {"seconds": round(time.perf_counter() - start, 3)})

    def _write_metrics(self, record: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(record)
