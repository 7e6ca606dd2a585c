"""``cubelm compress distill``: train a student on a teacher's soft targets (``cubelm.compress.distill``).

    cubelm compress distill --teacher DIR --student nano --data stdlib --out OUT
    cubelm compress distill --student nano --out OUT --max-steps 300 --baseline   # + the scratch student, compared
    cubelm compress distill --student DIR --out OUT --alpha 0.9 --temperature 4 --work-dir RUN   # keep the run

OUT is a standard HF model directory (``config.json``, ``model.safetensors``, the teacher's tokenizer files,
``training_summary.json``) plus ``distillation.json`` (settings, throughput, the final evaluation: validation
loss, bits per byte, KL to the teacher). ``--baseline`` also trains the same student from scratch (next-token
loss only; same data, data order, steps and seed) and prints the held-out bits per byte of the teacher, the
distilled and the scratch student (``cubelm.eval.bpb``, on text neither trained on: tqdm's sources by default).
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cubelm.cli import opt
from cubelm.errors import CubelmError


@dataclass(slots=True, kw_only=True)
class DistillOptions:
    teacher: str | None = opt(None, help="teacher model directory (HF format); default: the default model",
                              metavar="DIR")
    student: str = opt(help="student: a preset (nano, tiny, small, ...; built with the teacher's vocabulary and "
                            "special tokens) or a model directory (trained from its weights when it has them, else "
                            "from a random init of its config.json); its tokenizer must be the teacher's",
                       metavar="PRESET|DIR")
    out: str = opt(help="output: the student as an HF model directory (config.json, model.safetensors, the "
                        "teacher's tokenizer files, distillation.json)", metavar="DIR")
    data: str | None = opt(None, help="training data: a packed directory from 'cubelm data prepare' (tokenized with "
                                      "the teacher's tokenizer) or a corpus (stdlib, a path, hf:NAME) packed into "
                                      "the work directory with the teacher's tokenizer; default: the teacher's "
                                      "training data (from its training_summary.json), else stdlib", metavar="SRC")
    alpha: float = opt(0.5, help="weight of the teacher term in [0, 1]: loss = α·T²·KL(teacher‖student at T) + "
                                 "(1−α)·CE; 1 = soft targets only, 0 = plain next-token training")
    temperature: float = opt(2.0, help="softmax temperature T of both models in the KL term (> 0; above 1 the "
                                       "teacher's less likely tokens weigh more)")
    max_steps: int | None = opt(None, help="optimizer steps; sets the LR schedule (default: 500)")
    tokens: int | None = opt(None, help="training tokens instead of --max-steps: steps = ceil(tokens / "
                                        "(micro-batch-size × seq-len))")
    micro_batch_size: int = opt(16, help="sequences per optimizer step")
    seq_len: int = opt(256, help="tokens per training sequence")
    lr: float = opt(3e-3, help="peak learning rate (linear warmup, then cosine to a tenth)")
    warmup_steps: int | None = opt(None, help="linear warmup steps (default: a tenth of the steps, at most 40)")
    weight_decay: float = opt(0.1, help="AdamW weight decay (matrices only)")
    eval_interval: int | None = opt(None, help="evaluate (validation loss, bits/byte, KL to the teacher) every N "
                                               "steps (default: at the end only)")
    eval_batches: int = opt(8, help="validation micro-batches per evaluation")
    checkpoint_interval: int | None = opt(None, help="checkpoint every N steps (default: at the end only)")
    seed: int = opt(1337, help="seed of the student's initialization and of the data order")
    device: str = opt("cpu", help="torch device: cpu, cuda, ...")
    dtype: str = opt("float32", choices=["float32", "bfloat16"],
                     help="compute dtype: float32, or bfloat16 (autocast for both models, teacher weights in bf16, "
                          "the student's master weights fp32; slow on CPUs without bf16 instructions)")
    work_dir: str | None = opt(None, help="run directory (checkpoints/, metrics.jsonl, curves.png; packed data when "
                                          "--data is a corpus) kept there; default: a temporary directory, deleted",
                               metavar="DIR")
    resume: bool = opt(False, help="continue from the latest checkpoint in --work-dir")
    baseline: bool = opt(False, help="also train the student from scratch (next-token loss; same data, steps, seed) "
                                     "and compare held-out bits per byte: teacher, distilled, scratch")
    held_out: str = opt("package:tqdm", help="--baseline: held-out text, package:NAME (an installed package's .py "
                                             "files) or a path")
    max_bytes: int = opt(200_000, help="--baseline: stop adding held-out documents after this many bytes")
    progress: bool = opt(True, help="show a progress bar")

    def __post_init__(self) -> None:
        from cubelm.compress.distill import check_alpha_temperature
        from cubelm.model.config import PRESETS
        check_alpha_temperature(self.alpha, self.temperature)
        if self.student not in PRESETS and not Path(self.student).is_dir():
            raise CubelmError(f"--student {self.student!r}: unknown preset (choose one of {', '.join(PRESETS)}) and "
                              f"not a model directory")
        if self.max_steps is not None and self.tokens is not None:
            raise CubelmError("give --max-steps or --tokens, not both")
        for name in ("micro_batch_size", "seq_len", "eval_batches", "max_bytes"):
            if getattr(self, name) < 1:
                raise CubelmError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.tokens is not None and self.tokens < 1 or self.max_steps is not None and self.max_steps < 1:
            raise CubelmError("--max-steps and --tokens must be >= 1")
        if self.lr <= 0:
            raise CubelmError(f"--lr must be > 0, got {self.lr}")
        if self.resume and self.work_dir is None:
            raise CubelmError("--resume needs --work-dir (the run directory the checkpoints are in)")

    @property
    def steps(self) -> int:
        if self.tokens is not None:
            return math.ceil(self.tokens / (self.micro_batch_size * self.seq_len))
        return 500 if self.max_steps is None else self.max_steps

    def train_config(self):
        from cubelm.train.config import TrainConfig
        n = self.steps
        warmup = min(40, n // 10) if self.warmup_steps is None else self.warmup_steps
        return TrainConfig(preset=self.student, seq_len=self.seq_len, micro_batch_size=self.micro_batch_size,
                           max_steps=n, lr=self.lr, min_lr=self.lr / 10, warmup_steps=warmup,
                           weight_decay=self.weight_decay, precision="bf16" if self.dtype == "bfloat16" else "fp32",
                           eval_interval=self.eval_interval or n, eval_batches=self.eval_batches,
                           checkpoint_interval=self.checkpoint_interval or n, keep_last=1, seed=self.seed,
                           device=self.device, checkpoint_alpha=False)


def train_student(kind: str, o: DistillOptions, teacher: Path, data: Path, run_dir: Path, model_out: Path) -> dict:
    """Train the ``distilled`` or ``scratch`` student into ``model_out``; its summary (throughput, last eval)."""
    import torch

    from cubelm.compress.distill import DistillTrainer, ScratchTrainer
    common = dict(teacher=teacher, student=o.student, model_out=model_out, temperature=o.temperature,
                  teacher_dtype=torch.bfloat16 if o.dtype == "bfloat16" else torch.float32, resume=o.resume)
    cfg = o.train_config()
    if kind == "distilled":
        trainer = DistillTrainer(cfg, data, run_dir, alpha=o.alpha, **common)
    else:
        trainer = ScratchTrainer(cfg, data, run_dir, **common)
    print(f"[cubelm] {kind} student {o.student} ({trainer.model_config.num_params():,} parameters) for "
          f"{cfg.max_steps} steps of {cfg.tokens_per_step:,} tokens" + (f" (α {o.alpha}, T {o.temperature})"
                                                                       if kind == "distilled" else ""), flush=True)
    start = time.perf_counter()
    trainer.run(progress=o.progress)
    steps = [r for r in trainer.metrics.records() if r.get("kind") == "train"]
    final = trainer.evals[-1] if trainer.evals else trainer.evaluate()
    return {"params": trainer.model_config.num_params(), "steps": trainer.state.step,
            "tokens": trainer.state.step * cfg.tokens_per_step, "seconds": round(time.perf_counter() - start, 1),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps) if steps else None,
            "final_eval": {k: v for k, v in final.items() if k != "sample"}}


def held_out_bpb(model_dirs: dict[str, Path], tokenizer_dir: Path, source: str, max_bytes: int) -> dict:
    """Bits per byte of each model on the same held-out text (``cubelm.eval.bpb``)."""
    from cubelm.data.tokenizer import load_tokenizer
    from cubelm.eval.bpb import held_out_package, held_out_path, model_bpb
    from cubelm.model.hf_io import load_model
    held = (held_out_package(source.removeprefix("package:"), max_bytes) if source.startswith("package:")
            else held_out_path(source, max_bytes))
    tokenizer = load_tokenizer(tokenizer_dir)
    scores = {name: model_bpb(load_model(path), tokenizer, held.texts) for name, path in model_dirs.items()}
    return {"held_out": held.name, "num_bytes": held.num_bytes, "bpb": scores}


def format_comparison(summary: dict) -> str:
    c, teacher = summary["comparison"], summary["teacher_params"]
    rows = [("teacher", teacher, c["bpb"]["teacher"], summary["distilled"]["final_eval"]["teacher_val_bpb"], None,
             None)]
    for kind in ("distilled", "scratch"):
        s = summary[kind]
        rows.append((f"{kind} student", s["params"], c["bpb"][kind], s["final_eval"]["val_bpb"],
                     s["final_eval"]["val_kl"], s["tokens_per_s"]))
    lines = [f"held-out: {c['held_out']}, {c['num_bytes']:,} bytes; students: {summary['student']}, "
             f"{summary['distilled']['steps']} steps, {summary['distilled']['tokens']:,} tokens each, seed "
             f"{summary['seed']}; α {summary['alpha']}, T {summary['temperature']}",
             "| model | parameters | held-out bits/byte | val bits/byte | val KL to teacher (T) | train tok/s |",
             "|---|---|---|---|---|---|"]
    for name, params, bpb, val_bpb, kl, tps in rows:
        lines.append(f"| {name} | {params:,} | {bpb:.4f} | {val_bpb:.4f} | {'' if kl is None else f'{kl:.4f}'} | "
                     f"{'' if tps is None else f'{tps:,.0f}'} |")
    d, s = c["bpb"]["distilled"], c["bpb"]["scratch"]
    lines.append(f"distilled vs scratch: {d - s:+.4f} bits/byte ({(d - s) / s:+.2%}); gap to the teacher closed: "
                 f"{(s - d) / (s - c['bpb']['teacher']):.1%}" if s != c["bpb"]["teacher"] else "")
    return "\n".join(lines)


def run_distill(o: DistillOptions) -> int:
    from cubelm.compress.distill import resolve_data, resolve_teacher
    from cubelm.model.config import read_config_json
    from cubelm.model.hf_io import resolve_device
    resolve_device(o.device)  # before any packing or loading
    teacher = resolve_teacher(o.teacher)
    out = Path(o.out)
    if out.resolve() == teacher.resolve():
        raise CubelmError(f"--out {out} is the teacher's directory; write the student elsewhere")
    work = Path(o.work_dir) if o.work_dir else Path(tempfile.mkdtemp(prefix="cubelm-distill-"))
    try:
        data = resolve_data(o.data, teacher, work)
        summary = {"teacher": str(teacher.resolve()), "teacher_params": read_config_json(teacher).num_params(),
                   "student": o.student, "alpha": o.alpha, "temperature": o.temperature, "seed": o.seed,
                   "data": str(data), "distilled": train_student("distilled", o, teacher, data, work / "distill",
                                                                 out)}
        if o.baseline:
            scratch_dir = work / "scratch" / "model"
            summary["scratch"] = train_student("scratch", o, teacher, data, work / "scratch", scratch_dir)
            summary["comparison"] = held_out_bpb({"teacher": teacher, "distilled": out, "scratch": scratch_dir},
                                                 teacher, o.held_out, o.max_bytes)
        (out / "distillation.json").write_text(json.dumps(summary, indent=2) + "\n")
    finally:
        if not o.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    e = summary["distilled"]["final_eval"]
    print(f"[cubelm] {teacher} -> {out}: {summary['teacher_params']:,} -> {summary['distilled']['params']:,} "
          f"parameters; validation: loss {e['val_loss']:.4f}, {e['val_bpb']:.4f} bits/byte (teacher "
          f"{e['teacher_val_bpb']:.4f}), KL to the teacher at T={o.temperature} {e['val_kl']:.4f}")
    if o.baseline:
        print(format_comparison(summary))
    return 0
