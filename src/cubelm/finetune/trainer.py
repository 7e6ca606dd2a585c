"""``FinetuneTrainer``: ``cubelm train``'s ``Trainer`` (or ``ParallelTrainer`` under torchrun) with fine-tuning plugged
in through its hooks — one loop, progress bar, metrics.jsonl, curves.png, evaluation, atomic checkpoints and exact
resume for pretraining and fine-tuning alike.

What the hooks change:

- data (``_setup_data``): the base model's tokenizer and config; instruct rows rendered with its chat template,
  batches of whole examples (``cubelm.finetune.batches``), the whole validation split evaluated each time;
- the model (``_build_model``): the base loaded from ``--model``, then ``apply_lora`` / ``apply_qlora`` (frozen base,
  adapters trainable) or everything trainable (``full``); the optimizer sees what requires grad;
- checkpoints (``_write_checkpoint`` / ``_load``): adapter + optimizer state for LoRA/QLoRA
  (``cubelm.finetune.checkpoint``), the ``cubelm train`` format for full fine-tuning;
- export: a peft adapter directory ``OUT/adapter`` (LoRA/QLoRA) or an HF model ``OUT/model`` with the tokenizer;
- the loss is ``cubelm train``'s masked cross-entropy: the batches mark only answer tokens as targets.

Before the first step the held-out loss of the untouched base is evaluated (step 0 in metrics.jsonl), so every run
reports before and after.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from cubelm.errors import CubelmError
from cubelm.finetune.recipe import FinetuneConfig
from cubelm.parallel.config import ParallelConfig
from cubelm.parallel.trainer import ParallelTrainer
from cubelm.train.config import TrainConfig
from cubelm.train.loop import Trainer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "added_tokens.json")


class FinetuneMixin:
    ft: FinetuneConfig

    # ---- data ------------------------------------------------------------------------------------------------
    def _setup_data(self) -> None:
        from cubelm.data.tokenizer import load_tokenizer
        from cubelm.finetune.batches import ExampleSampler
        from cubelm.finetune.data import build_instruct_data
        from cubelm.model.config import read_config_json
        cfg, ft = self.cfg, self.ft
        self.base_dir = Path(ft.model)
        self.tokenizer_dir = self.base_dir
        self.tokenizer = load_tokenizer(self.base_dir)
        self.model_config = read_config_json(self.base_dir)
        if cfg.seq_len > self.model_config.max_position_embeddings:
            raise CubelmError(f"--seq-len {cfg.seq_len} is beyond the model's context "
                              f"({self.model_config.max_position_embeddings} positions); lower it")
        data = build_instruct_data(ft.data, self.tokenizer, max_len=cfg.seq_len + 1, val_fraction=ft.val_fraction,
                                   max_val_examples=ft.max_val_examples, truncate=ft.truncate)
        self.data_report = data.report
        self.log(f"[cubelm] data: {data.report.summary()}")
        pad = next(i for i in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id, 0) if i is not None)
        self.train_batches = ExampleSampler(data.train, pad_id=pad, seed=cfg.seed)
        self.val_batches = ExampleSampler(data.val, pad_id=pad, shuffle=False, wrap=False)

    def _num_eval_batches(self) -> int:
        return math.ceil(len(self.val_batches) / self.cfg.micro_batch_size)  # the whole validation split

    def _tokens_in(self, first_sample: int, end_sample: int) -> int:
        return self.train_batches.num_tokens(first_sample, end_sample)

    # ---- model -----------------------------------------------------------------------------------------------
    def _build_model(self) -> torch.nn.Module:
        from cubelm.finetune.lora import num_trainable
        from cubelm.model.hf_io import load_model
        model = load_model(self.base_dir, device=self.device, dtype=torch.float32).train()
        if self.ft.method == "lora":
            from cubelm.finetune.lora import apply_lora
            apply_lora(model, self.ft.lora)
        elif self.ft.method == "qlora":
            from cubelm.finetune.qlora import apply_qlora
            apply_qlora(model, self.ft.lora)
        self.num_trainable = num_trainable(model)
        return model

    def run_config(self) -> dict:
        return {**self.cfg.to_dict(), "finetune": self.ft.to_dict()}

    def _before_training(self) -> None:
        if self.state.step == 0:  # the base model's held-out loss, as step 0 of the curves
            record = self.evaluate()
            self._write_metrics(record)
            self.log(f"[cubelm] step 0 (base model): held-out answer loss {record['val_loss']:.4f} over "
                     f"{record['val_tokens']:,} tokens")

    def sample(self, prompt: str | None = None, max_new_tokens: int = 64) -> str:
        """A greedy answer to the first held-out prompt, rendered as in training."""
        from cubelm.engine.params import SamplingParams
        from cubelm.engine.reference import generate_tokens
        example = self.val_batches.examples[0]
        ids = example.ids[:example.prompt_len].tolist()
        self.model.eval()
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
        out = list(generate_tokens(self.model, ids, params, eos_token_ids=[self.tokenizer.eos_token_id]))
        self.model.train()
        return self.tokenizer.decode(ids[-24:]) + self.tokenizer.decode(out)

    # ---- checkpoints and export ------------------------------------------------------------------------------
    def _tokenizer_files(self) -> dict[str, Path]:
        return {name: self.base_dir / name for name in TOKENIZER_FILES if (self.base_dir / name).is_file()}

    def _write_checkpoint(self) -> Path:
        if not self.ft.uses_adapter:
            return super()._write_checkpoint()
        from cubelm.finetune.checkpoint import save_trainable_checkpoint
        return save_trainable_checkpoint(self.ckpt_root, self.model, self.optimizer, self.state, self.run_config(),
                                         self.ft.lora, is_main=self.is_main, base_model=str(self.base_dir))

    def _load(self, path: Path):
        if not self.ft.uses_adapter:
            return super()._load(path)
        from cubelm.finetune.checkpoint import load_trainable_checkpoint
        return load_trainable_checkpoint(path, self.model, self.optimizer)

    def _generation_config(self) -> dict:
        from cubelm.model.hf_io import read_generation_config
        return read_generation_config(self.base_dir)

    def export(self, out: Path | None = None) -> Path:
        """``OUT/adapter`` (peft format) for LoRA/QLoRA, ``OUT/model`` (HF, with the tokenizer) for full."""
        if not self.ft.uses_adapter:
            return super().export(out)
        from cubelm.finetune.adapter import write_adapter
        from cubelm.finetune.checkpoint import gather_trainable
        out = out or self.out_dir / "adapter"
        weights, _ = gather_trainable(self.model, self.optimizer)  # collective under FSDP2
        if self.is_main:
            write_adapter(weights, self.ft.lora, out, base_model_name_or_path=str(self.base_dir.resolve()))
            summary = {"step": self.state.step, "best_val_loss": self.state.best_val_loss,
                       "trainable_parameters": self.num_trainable, "data": self.data_report.to_dict(),
                       "train_config": self.run_config()}
            (out / "training_summary.json").write_text(json.dumps(summary, indent=2))
        return out

    def write_data_report(self) -> None:
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "data_report.json").write_text(json.dumps(self.data_report.to_dict(), indent=2))


class FinetuneTrainer(FinetuneMixin, Trainer):
    def __init__(self, cfg: TrainConfig, ft: FinetuneConfig, out_dir: str | Path, *, resume: bool = False, log=None):
        self.ft = ft
        super().__init__(cfg, ft.model, out_dir, resume=resume, log=log)
        self.write_data_report()


class ParallelFinetuneTrainer(FinetuneMixin, ParallelTrainer):
    """Data parallel only (DDP or FSDP2): the adapter layers wrap the projections that TP and PP would split."""

    can_sample = False

    def __init__(self, cfg: TrainConfig, ft: FinetuneConfig, parallel: ParallelConfig, out_dir: str | Path, *,
                 resume: bool = False, log=None):
        if parallel.tp > 1 or parallel.pp > 1:
            raise CubelmError("cubelm finetune runs data parallel only (--dp-mode ddp or fsdp); tensor and "
                              "pipeline parallel are for cubelm train")
        if ft.method == "qlora" and parallel.dp_mode == "fsdp":
            raise CubelmError("--method qlora does not shard its 4-bit base with FSDP2 here; use --dp-mode ddp")
        self.ft = ft
        super().__init__(cfg, parallel, ft.model, out_dir, resume=resume, log=log)
        self.write_data_report()
