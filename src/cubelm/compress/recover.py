"""Recovery fine-tuning after pruning: ``cubelm train``'s loop on the pruned model, with the pruning mask kept.

Two kinds of data, two trainers, one mechanism:

- a packed directory (``cubelm data prepare``, e.g. the default model's own training data) -> continued
  pretraining with ``cubelm.train.loop.Trainer`` (next-token loss on every token, the objective bits per byte
  measures);
- instruct rows (what ``cubelm finetune --data`` takes) -> full fine-tuning with ``cubelm.finetune``'s
  ``FinetuneTrainer`` (loss on the answers).

``_RecoveryMixin`` plugs into either through the trainer hooks: the model is the pruned one (not a preset or the
source directory), every weight trains (AdamW, no weight decay: decay would only pull survivors toward the zeros),
and for magnitude / 2:4 pruning the mask is kept twice over: gradient hooks zero the pruned entries' gradients
(so the Adam moments and the clipped norm see survivors only, and a zero weight with zero moments stays zero), and an
optimizer post-step hook multiplies by the mask again (so nothing, not even a numerical slip, brings one back).
Structured pruning needs no mask: the heads / neurons are gone from the shapes.

The held-out loss before the first step (the pruned model) and at the end are kept in ``last``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from cubelm.errors import CubelmError


class _RecoveryMixin:
    """Put before a trainer class: ``Class(model, masks, *trainer_args)``."""

    can_sample = False  # a text sample per evaluation is noise in a recovery run

    def __init__(self, pruned_model, masks, *args, **kwargs):
        self.pruned_model, self.masks, self.evals = pruned_model, masks, []
        super().__init__(*args, **kwargs)

    def _setup_data(self) -> None:
        super()._setup_data()
        if self.model_config.vocab_size != self.pruned_model.config.vocab_size:
            raise CubelmError(f"the recovery data has a vocabulary of {self.model_config.vocab_size} tokens, the "
                              f"model {self.pruned_model.config.vocab_size}: tokenize it with the model's tokenizer")
        self.model_config = self.pruned_model.config  # the pruned shapes, not the source's

    def _build_model(self) -> torch.nn.Module:
        from cubelm.compress.prune import mask_gradients
        model = self.pruned_model.to(device=self.device, dtype=torch.float32).train()
        for p in model.parameters():
            p.requires_grad_(True)
        if self.masks:
            mask_gradients(model, self.masks)
        self.num_trainable = sum(p.numel() for p in model.parameters())
        return model

    def _setup_model(self) -> None:
        super()._setup_model()
        if self.masks:
            from cubelm.compress.prune import apply_masks
            self.optimizer.register_step_post_hook(lambda *_: apply_masks(self.model, self.masks))

    def _before_training(self) -> None:
        if self.state.step == 0:  # the pruned model before any recovery step, as step 0 of the curves
            self._write_metrics(self.evaluate())

    def _write_metrics(self, record: dict) -> None:
        if record.get("kind") == "eval":
            self.evals.append(record)
        super()._write_metrics(record)

    def export(self, out: Path | None = None) -> Path:
        return self.out_dir  # the caller saves the model with the source's files


def _pretrain_recovery():
    from cubelm.train.loop import Trainer

    class PretrainRecovery(_RecoveryMixin, Trainer):
        pass
    return PretrainRecovery


def _finetune_recovery():
    from cubelm.finetune.trainer import FinetuneTrainer

    class FinetuneRecovery(_RecoveryMixin, FinetuneTrainer):
        pass
    return FinetuneRecovery


def is_packed(data: str) -> bool:
    return (Path(data) / "meta.json").is_file()


def default_data(model_dir: Path) -> str | None:
    """The packed data the model trained on, from its ``training_summary.json`` (``cubelm train`` writes it)."""
    summary = model_dir / "training_summary.json"
    if not summary.is_file():
        return None
    data = json.loads(summary.read_text()).get("data")
    return data if isinstance(data, str) and is_packed(data) else None


def check_same_tokenizer(model_dir: Path, data: str) -> None:
    mine, theirs = model_dir / "tokenizer.json", Path(data) / "tokenizer" / "tokenizer.json"
    if mine.is_file() and theirs.is_file() and mine.read_bytes() != theirs.read_bytes():
        raise CubelmError(f"{data} was tokenized with another tokenizer than {model_dir}'s; prepare the recovery "
                          f"data with the model's tokenizer (cubelm data prepare --tokenizer {model_dir})")


class Recovery:
    """Runs one recovery per pruning round: ``model = recovery.run(model, masks, round_index)``."""

    def __init__(self, src: Path, data: str, *, steps: int, lr: float, seq_len: int, micro_batch_size: int,
                 seed: int = 0, device: str = "cpu", work_dir: str | None = None, eval_batches: int = 8,
                 log=None):
        self.src, self.data, self.steps, self.lr = Path(src), data, steps, lr
        self.seq_len, self.micro_batch_size, self.seed, self.device = seq_len, micro_batch_size, seed, device
        self.work_dir, self.eval_batches, self.log = work_dir, eval_batches, log or (lambda msg: None)
        self.last: dict = {}
        if is_packed(data):
            check_same_tokenizer(self.src, data)
            self.data = str(Path(data).resolve())
        elif not (data.startswith("stdlib-instruct") or Path(data).is_file()):
            raise CubelmError(f"--data {data}: neither a packed directory (with meta.json, from cubelm data prepare) "
                              f"nor a .jsonl file of instruct rows nor stdlib-instruct")

    @classmethod
    def from_options(cls, o, src: Path) -> "Recovery":
        data = o.data or default_data(src)
        if data is None:
            raise CubelmError(f"--recover-steps needs --data: {src} has no training_summary.json naming its "
                              f"training data; pass a packed directory or instruct rows")
        return cls(src, data, steps=o.recover_steps, lr=o.recover_lr, seq_len=o.seq_len,
                   micro_batch_size=o.micro_batch_size, seed=o.seed, device=o.device, work_dir=o.work_dir)

    def _train_config(self):
        from cubelm.train.config import TrainConfig
        n = self.steps
        return TrainConfig(preset=str(self.src), seq_len=self.seq_len, micro_batch_size=self.micro_batch_size,
                           max_steps=n, lr=self.lr, min_lr=self.lr / 10, warmup_steps=min(10, n // 10),
                           weight_decay=0.0, eval_interval=n, checkpoint_interval=n, keep_last=1, seed=self.seed,
                           device=self.device, eval_batches=self.eval_batches)  # instruct rows: every one

    def run(self, model, masks: dict | None, round_index: int = 1):
        """``model`` after ``steps`` of training with ``masks`` kept (returned in eval mode)."""
        from cubelm.finetune.recipe import FinetuneConfig
        packed = is_packed(self.data)
        root = Path(self.work_dir) if self.work_dir else Path(tempfile.mkdtemp(prefix="cubelm-recover-"))
        out = root / f"round-{round_index}"
        try:
            cfg = self._train_config()
            if packed:
                trainer = _pretrain_recovery()(model, masks, cfg, self.data, out, log=self.log)
            else:
                ft = FinetuneConfig(model=str(self.src), data=self.data, method="full")
                trainer = _finetune_recovery()(model, masks, cfg, ft, out, log=self.log)
            trainer.run(progress=False)
        finally:
            if not self.work_dir:
                shutil.rmtree(root, ignore_errors=True)
        first, final = trainer.evals[0], trainer.evals[-1]
        self.last = {"val_loss_pruned": first["val_loss"], "val_loss_recovered": final["val_loss"],
                     "recover_steps": trainer.state.step}
        return trainer.model.eval()
