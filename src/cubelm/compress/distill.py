"""Knowledge distillation: train a smaller student on a teacher's soft targets, with ``cubelm train``'s loop.

    cubelm compress distill --teacher DIR --student nano --data stdlib --out OUT [--baseline]

Loss per token (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network")::

    α·T²·KL(p_T ‖ q_T) + (1 − α)·CE(student, next token)
    p_T = softmax(teacher_logits / T),  q_T = softmax(student_logits / T)

The teacher runs on the fly, in eval mode under ``no_grad``, on exactly the batch the student sees: its logits are
never stored (a stored (tokens × vocab) tensor would be 4096 floats per token). Tokens whose target is masked
(instruct prompts, ``-100``) count in neither term.

Everything but the loss is ``cubelm.train.loop.Trainer``: the batches (``WindowSampler``), AdamW and the warmup +
cosine schedule, gradient clipping, evaluation, atomic checkpoints with exact ``--resume``, HF export. The student
is a preset built with the teacher's vocabulary and special tokens (another depth / width), or a model directory
(its weights if it has them: a pruned or factorized teacher, say, else a random init from its config.json); its
tokenizer, and the data's, must be the teacher's. ``ScratchTrainer`` is the same student trained by the same loop
on the next-token loss alone (the baseline: same data order, steps and seed); with α = 0 the two are the same run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from cubelm.errors import CubelmError
from cubelm.model.config import PRESETS
from cubelm.train.batches import IGNORE_INDEX
from cubelm.train.loop import Trainer, lm_loss

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


# ---- the loss -------------------------------------------------------------------------------------------------
@dataclass(slots=True)
class DistillLoss:
    total: torch.Tensor  # what backward() sees
    kl: torch.Tensor  # mean KL(p_T ‖ q_T) per target token, in nats, at temperature T (not scaled by T²)
    ce: torch.Tensor  # mean next-token cross-entropy of the student (nats)


def check_alpha_temperature(alpha: float, temperature: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise CubelmError(f"--alpha must be in [0, 1] (the weight of the teacher's KL term), got {alpha}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise CubelmError(f"--temperature must be a positive number (1 = the teacher's own distribution, 2-4 "
                          f"usual), got {temperature}")


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
               temperature: float) -> torch.Tensor:
    """Mean over target tokens of sum_v p_T(v)·(log p_T(v) − log q_T(v)); logits (B, T, V), targets (B, T)."""
    valid = (targets != IGNORE_INDEX).flatten()  # (N,)
    log_q = F.log_softmax(student_logits.float().flatten(0, 1) / temperature, dim=-1)  # (N, V), fp32 like lm_loss
    log_p = F.log_softmax(teacher_logits.float().flatten(0, 1) / temperature, dim=-1)
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1)  # (N,); p·log p is finite: log_softmax never gives -inf
    per_token = torch.where(valid, per_token, torch.zeros_like(per_token))  # masked rows never reach the sum
    return per_token.sum() / valid.sum().clamp(min=1)


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, *,
                 alpha: float, temperature: float) -> DistillLoss:
    kl = distill_kl(student_logits, teacher_logits, targets, temperature)
    ce = lm_loss(student_logits, targets)
    # NOTE: T². The soft targets' gradient w.r.t. a student logit is (q_T − p_T)/T, and for T large against the
    # logit gaps q_T − p_T itself shrinks as 1/T, so the KL term's gradients scale as 1/T² (Hinton et al. 2015,
    # §2). Multiplying by T² keeps them on the CE term's scale whatever T is, so α alone sets the mix.
    total = alpha * temperature ** 2 * kl + (1.0 - alpha) * ce
    return DistillLoss(total, kl, ce)


# ---- teacher / student / data compatibility ----------------------------------------------------------------------
def tokenizer_vocab(directory: str | Path) -> dict[str, int]:
    """token -> id of the tokenizer in ``directory`` (added tokens included)."""
    from cubelm.data.tokenizer import load_tokenizer
    return load_tokenizer(directory).backend.get_vocab(with_added_tokens=True)


def check_same_tokenizer(teacher_dir: Path, other_dir: Path, what: str) -> None:
    """``other_dir``'s tokenizer must map every token to the teacher's id: the student's logits are read against
    the teacher's position by position."""
    mine, theirs = tokenizer_vocab(teacher_dir), tokenizer_vocab(other_dir)
    if mine == theirs:
        return
    if len(mine) != len(theirs):
        detail = f"{len(theirs):,} tokens vs the teacher's {len(mine):,}"
    else:
        differ = sum(1 for tok, i in theirs.items() if mine.get(tok) != i)
        detail = f"same size ({len(mine):,}) but {differ:,} tokens with another id"
    raise CubelmError(f"{what} ({other_dir}) has another tokenizer than the teacher {teacher_dir} ({detail}); "
                      f"distillation compares the two models token by token: use the teacher's tokenizer")


def resolve_teacher(teacher: str | None) -> Path:
    from cubelm.engine.commands import resolve_model_dir
    path = resolve_model_dir(teacher)
    if not (path / "tokenizer.json").is_file():
        raise CubelmError(f"teacher {path} has no tokenizer.json; the student and the data need the teacher's "
                          f"tokenizer")
    return path


def student_config(spec: str, teacher_dir: Path, seq_len: int):
    """The student's ``ModelConfig``: a preset with the teacher's vocabulary size and special-token ids, or a model
    directory's (same vocabulary size and tokenizer as the teacher)."""
    from cubelm.model.config import preset, read_config_json
    teacher = read_config_json(teacher_dir)
    if spec in PRESETS:
        cfg = preset(spec, vocab_size=teacher.vocab_size, bos_token_id=teacher.bos_token_id,
                     eos_token_id=teacher.eos_token_id, pad_token_id=teacher.pad_token_id)
    elif Path(spec).is_dir():
        cfg = read_config_json(spec)
        if cfg.vocab_size != teacher.vocab_size:
            raise CubelmError(f"student {spec} has a vocabulary of {cfg.vocab_size:,} tokens, the teacher "
                              f"{teacher.vocab_size:,}: distillation needs the teacher's tokenizer")
        if (Path(spec) / "tokenizer.json").is_file():
            check_same_tokenizer(teacher_dir, Path(spec), "the student")
    else:
        raise CubelmError(f"--student {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a model directory")
    return cfg.replace(max_position_embeddings=max(cfg.max_position_embeddings, seq_len))


def has_weights(model_dir: Path) -> bool:
    return (model_dir / "model.safetensors").is_file() or (model_dir / "model.safetensors.index.json").is_file()


# ---- the trainers ------------------------------------------------------------------------------------------------
class _StudentMixin:
    """What the distilled and the scratch student share: the student model, the teacher (loaded for the validation
    KL and its own validation loss, so both runs report against the same reference), the teacher's tokenizer files
    in the export, and the final export into ``model_out``. Put before ``Trainer``."""

    can_sample = False  # a text sample per evaluation is noise next to the KL and bits-per-byte figures

    def __init__(self, cfg, data_dir, out_dir, *, teacher: Path, student: str, model_out: Path | None = None,
                 temperature: float = 2.0, teacher_dtype: torch.dtype = torch.float32, resume: bool = False,
                 log=None):
        self.teacher_dir, self.student_spec = Path(teacher), student
        self.temperature, self.teacher_dtype = temperature, teacher_dtype
        self.model_out, self.evals = model_out, []
        super().__init__(cfg, data_dir, out_dir, resume=resume, log=log)

    def _setup_data(self) -> None:
        super()._setup_data()
        check_same_tokenizer(self.teacher_dir, self.tokenizer_dir, "the data")
        self.model_config = student_config(self.student_spec, self.teacher_dir, self.cfg.seq_len)

    def _build_model(self) -> torch.nn.Module:
        spec = Path(self.student_spec)
        if self.student_spec in PRESETS or not has_weights(spec):
            return super()._build_model()  # random init from model_config and the seed
        from cubelm.compress.quantized_io import read_quantization_config
        from cubelm.model.hf_io import load_model
        if read_quantization_config(spec) is not None:
            raise CubelmError(f"student {spec} is int8/int4-quantized; distil into its float source and quantize "
                              f"after")
        model = load_model(spec, device=self.device, dtype=torch.float32).train()
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def _setup_model(self) -> None:
        super()._setup_model()
        from cubelm.model.hf_io import load_model
        self.teacher = load_model(self.teacher_dir, device=self.device, dtype=self.teacher_dtype).eval()
        self.teacher.requires_grad_(False)

    def run_config(self) -> dict:
        return super().run_config() | {"teacher": str(self.teacher_dir.resolve()), "student": self.student_spec,
                                       "temperature": self.temperature}

    def _tokenizer_files(self) -> dict[str, Path]:
        return {name: self.teacher_dir / name for name in TOKENIZER_FILES if (self.teacher_dir / name).is_file()}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """``Trainer.evaluate`` plus, on the same validation windows, the KL to the teacher at T and the teacher's
        own loss and bits per byte (the floor the student is pulled toward)."""
        record = super().evaluate()
        self.model.eval()
        kl_sum, teacher_nats, tokens, nbytes = 0.0, 0.0, 0, 0
        for i in range(self._num_eval_batches()):
            x, y = self.val_batches.batch(i * self.cfg.micro_batch_size, self.cfg.micro_batch_size, device=self.device)
            with self._autocast():
                student, teacher = self.model(x), self.teacher(x)
            valid = y.flatten() != IGNORE_INDEX
            n = int(valid.sum())
            kl_sum += float(distill_kl(student, teacher, y, self.temperature)) * n
            teacher_nats += float(lm_loss(teacher, y, reduction="none")[valid].sum())
            tokens, nbytes = tokens + n, nbytes + int(self.token_bytes[y.flatten()[valid]].sum())
        self.model.train()
        from cubelm.eval.bpb import bits_per_byte
        record |= {"val_kl": kl_sum / max(1, tokens), "teacher_val_loss": teacher_nats / max(1, tokens),
                   "teacher_val_bpb": bits_per_byte(teacher_nats, nbytes)}
        self.evals.append(record)
        return record

    def export(self, out: Path | None = None) -> Path:
        return super().export(out or self.model_out)


class DistillTrainer(_StudentMixin, Trainer):
    """``Trainer`` with the distillation loss: ``DistillTrainer(cfg, data_dir, run_dir, teacher=..., student=...,
    alpha=..., temperature=...)``."""

    def __init__(self, *args, alpha: float = 0.5, temperature: float = 2.0, **kwargs):
        check_alpha_temperature(alpha, temperature)
        self.alpha = alpha
        self._parts: list[tuple[torch.Tensor, torch.Tensor]] = []  # (kl, ce) of this step's micro-batches
        super().__init__(*args, temperature=temperature, **kwargs)

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # the teacher's logits: on the fly, no graph, never kept past this micro-batch
            teacher_logits = self.teacher(x)
        loss = distill_loss(self.forward(x), teacher_logits, y, alpha=self.alpha, temperature=self.temperature)
        self._parts.append((loss.kl.detach(), loss.ce.detach()))
        return loss.total

    def train_step(self) -> dict:
        record = super().train_step()
        kl, ce = (torch.stack(p).mean().item() for p in zip(*self._parts))
        self._parts.clear()
        return record | {"kl": kl, "ce": ce}

    def run_config(self) -> dict:
        return super().run_config() | {"alpha": self.alpha}


class ScratchTrainer(_StudentMixin, Trainer):
    """The baseline: the same student, data order, schedule and seed, trained on the next-token loss alone."""


# ---- data --------------------------------------------------------------------------------------------------------
def resolve_data(data: str | None, teacher_dir: Path, work_dir: Path, log=print) -> Path:
    """A packed directory for training: ``data`` if it is one (``cubelm data prepare`` output), else the corpus
    ``data`` names (stdlib, a path, hf:NAME) packed into ``work_dir/data`` with the teacher's tokenizer. Default:
    the data the teacher trained on (its training_summary.json), else the stdlib."""
    from cubelm.compress.recover import default_data, is_packed
    if data is None:
        data = default_data(teacher_dir) or "stdlib"
    if is_packed(data):
        return Path(data).resolve()
    target = work_dir / "data"
    if not (target / "meta.json").is_file():
        from cubelm.data.clean import CleanConfig
        from cubelm.data.prepare import PrepareConfig, prepare
        from cubelm.data.sources import resolve_source
        from cubelm.data.tokenizer import TokenizerConfig
        log(f"[cubelm] packing {data} with the teacher's tokenizer into {target}")
        prepare(resolve_source(data), target, PrepareConfig(clean=CleanConfig(), tokenizer=TokenizerConfig(),
                                                            tokenizer_dir=str(teacher_dir)), log=lambda *a: None)
    return target
