"""``cubelm compress prune``: magnitude, 2:4, attention-head or MLP-neuron pruning of a model directory.

    cubelm compress prune --model DIR --out OUT --method magnitude --sparsity 0.5 --scope global
    cubelm compress prune --model DIR --out OUT --method 2:4
    cubelm compress prune --model DIR --out OUT --method heads --sparsity 0.34      # or --count N per layer
    cubelm compress prune --model DIR --out OUT --method neurons --sparsity 0.5 --recover-steps 200 --data DATA
    cubelm compress prune ... --iterations 4 --recover-steps 50 --data DATA        # S/4, recover, S/2, recover, ...

OUT is a standard HF model directory (``config.json``, ``model.safetensors``, the source's tokenizer files and
generation config) plus ``pruning.json`` (what was asked, what was measured). Magnitude and 2:4 keep the shapes:
the zeros are stored, the file keeps its size. Heads and neurons remove rows and columns: ``config.json``'s
``num_attention_heads`` / ``num_key_value_heads`` / ``intermediate_size`` shrink with the file.

Recovery (``--recover-steps N --data SRC``) fine-tunes every weight for N steps after each pruning round with
``cubelm train``'s loop (``cubelm.compress.recover``); unstructured masks are kept through it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from cubelm.cli import opt
from cubelm.errors import CubelmError

METHODS = ("magnitude", "2:4", "heads", "neurons")


@dataclass(slots=True, kw_only=True)
class PruneOptions:
    model: str | None = opt(None, help="model directory (HF format); default: the default model", metavar="DIR")
    out: str = opt(help="output model directory (created; files of the same name are replaced)", metavar="DIR")
    method: str = opt(help="magnitude (unstructured: smallest |w| zeroed), 2:4 (in every 4 consecutive inputs of a "
                           "row keep the 2 largest |w|), heads (remove attention heads) or neurons (remove MLP "
                           "neurons). magnitude and 2:4 prune the decoder projections only: the embedding and the "
                           "output head stay dense", metavar="magnitude|2:4|heads|neurons")
    sparsity: float | None = opt(None, help="share removed, in [0, 1): of the projection weights (magnitude), of "
                                            "each layer's query heads (heads) or MLP neurons (neurons); 2:4 is "
                                            "0.5 by construction (default: 0.5)")
    scope: str | None = opt(None, help="magnitude: layer (each projection pruned to --sparsity) or global (one "
                                       "|w| threshold over every decoder projection) (default: layer)",
                            metavar="layer|global")
    count: int | None = opt(None, help="heads / neurons: how many query heads / MLP neurons each layer loses, "
                                       "instead of --sparsity")
    head_unit: str = opt("auto", help="heads: query (the same number of query heads from every KV group; every KV "
                                      "head stays), group (whole KV groups with their query heads; the KV cache "
                                      "shrinks too) or auto (query for GQA/MQA, group for MHA)",
                         metavar="auto|query|group")
    iterations: int = opt(1, help="prune in K rounds (to S·i/K at round i), recovering after each (needs "
                                  "--recover-steps)")
    recover_steps: int = opt(0, help="fine-tune every surviving weight this many steps after each round "
                                     "(0 = no recovery)")
    data: str | None = opt(None, help="recovery data: a packed directory from 'cubelm data prepare' (continued "
                                      "pretraining; default: the model's training data, from its "
                                      "training_summary.json) or instruct rows as cubelm finetune --data takes "
                                      "(full fine-tuning on the answers)", metavar="SRC")
    recover_lr: float = opt(1e-4, help="recovery peak learning rate (cosine to a tenth, AdamW, no weight decay)")
    seq_len: int = opt(256, help="recovery: tokens per sequence (packed data) or longest example (instruct rows)")
    micro_batch_size: int = opt(8, help="recovery: sequences per optimizer step")
    work_dir: str | None = opt(None, help="recovery run directory (metrics.jsonl, curves.png, checkpoints/) kept "
                                          "there; default: a temporary directory, deleted", metavar="DIR")
    seed: int = opt(0, help="recovery data order")
    device: str = opt("cpu", help="torch device for pruning and recovery: cpu, cuda, ...")

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise CubelmError(f"unknown --method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.sparsity is not None:
            from cubelm.compress.prune import check_sparsity
            check_sparsity(self.sparsity)
        if self.method == "2:4" and self.sparsity not in (None, 0.5):
            raise CubelmError(f"--method 2:4 removes 2 of every 4 weights: its sparsity is 0.5, not {self.sparsity}")
        if self.scope is not None and self.scope not in ("layer", "global"):
            raise CubelmError(f"--scope must be layer or global, got {self.scope!r}")
        if self.scope == "global" and self.method != "magnitude":
            raise CubelmError(f"--scope global is for --method magnitude; {self.method} prunes every layer alike")
        if self.count is not None and self.method not in ("heads", "neurons"):
            raise CubelmError("--count is for --method heads or neurons; use --sparsity")
        if self.count is not None and self.sparsity is not None:
            raise CubelmError("give --sparsity or --count, not both")
        if self.count is not None and self.count < 0:
            raise CubelmError(f"--count must be >= 0, got {self.count}")
        if self.iterations < 1 or self.recover_steps < 0:
            raise CubelmError(f"--iterations must be >= 1 and --recover-steps >= 0, got {self.iterations} and "
                              f"{self.recover_steps}")
        if self.iterations > 1 and self.method == "2:4":
            raise CubelmError("--method 2:4 prunes in one round (its pattern has no intermediate step); drop "
                              "--iterations")
        if self.iterations > 1 and not self.recover_steps:
            raise CubelmError("--iterations above 1 needs --recover-steps: rounds without recovery in between are "
                              "one-shot pruning")
        if self.recover_steps and (self.recover_lr <= 0 or self.seq_len < 2 or self.micro_batch_size < 1):
            raise CubelmError("--recover-lr must be > 0, --seq-len >= 2 and --micro-batch-size >= 1")


@dataclass(slots=True, kw_only=True)
class PruneSpec:
    """What to prune, resolved against the source model: the final target and how many rounds to get there."""
    method: str
    sparsity: float
    scope: str = "layer"
    count: int | None = None  # heads / neurons removed per layer at the end (resolved from sparsity if None)
    head_unit: str = "auto"
    iterations: int = 1


def resolve_spec(o: PruneOptions, model) -> PruneSpec:
    """Validate counts against the model before any work (more heads than exist is an error here, not later)."""
    from cubelm.compress.structured import heads_to_remove, neurons_to_remove, resolve_head_unit
    sparsity = 0.5 if o.sparsity is None else o.sparsity
    spec = PruneSpec(method=o.method, sparsity=sparsity, scope=o.scope or "layer", head_unit=o.head_unit,
                     iterations=o.iterations)
    cfg = model.config
    if o.method == "heads":
        spec.head_unit = resolve_head_unit(o.head_unit, cfg.num_attention_heads, cfg.num_key_value_heads)
        spec.count = heads_to_remove(cfg.num_attention_heads, cfg.num_key_value_heads, spec.head_unit,
                                     sparsity, o.count)
    elif o.method == "neurons":
        spec.count = neurons_to_remove(cfg.intermediate_size, sparsity, o.count)
    return spec


def prune_round(model, spec: PruneSpec, round_index: int, masks: dict | None, original_config):
    """Round ``round_index`` (1-based) of ``spec``: returns (model, masks). Unstructured rounds prune in place to
    ``sparsity·i/K``; structured ones return a smaller model with ``count·i/K`` (whole units) removed in all."""
    from cubelm.compress import prune, structured
    from cubelm.compress.structured import round_half_down
    fraction = round_index / spec.iterations
    if spec.method == "magnitude":
        masks = prune.magnitude_masks(model, spec.sparsity * fraction, spec.scope, previous=masks)
    elif spec.method == "2:4":
        masks = prune.semi_structured_masks(model)
    if masks is not None:
        prune.apply_masks(model, masks)
        return model, masks
    if spec.method == "heads":
        H0, KV0 = original_config.num_attention_heads, original_config.num_key_value_heads
        step = KV0 if spec.head_unit == "query" else H0 // KV0
        target = round_half_down(spec.count // step * fraction) * step  # heads removed from the original by this round
        count = target - (H0 - model.config.num_attention_heads)
        if count > 0:
            model = structured.prune_heads(model, structured.plan_heads(model, count=count, unit=spec.head_unit))
    else:
        target = round_half_down(spec.count * fraction)
        count = target - (original_config.intermediate_size - model.config.intermediate_size)
        if count > 0:
            model = structured.prune_neurons(model, structured.plan_neurons(model, count=count))
    return model, None


def save_pruned(model, src_dir: Path, out_dir: Path, summary: dict) -> Path:
    """``out_dir`` as an HF model directory in the source's dtype, with the source's other files (tokenizer,
    generation config, ...) and ``pruning.json``."""
    from cubelm.model.hf_io import DTYPES, read_generation_config, save_model
    dtype = DTYPES.get(model.config.torch_dtype)
    save_model(model, out_dir, dtype=dtype, generation_config=read_generation_config(src_dir))
    for f in src_dir.iterdir():
        if f.is_file() and not f.name.startswith("model") and f.name not in ("config.json", "generation_config.json",
                                                                              "pruning.json"):
            shutil.copy2(f, out_dir / f.name)
    (out_dir / "pruning.json").write_text(json.dumps(summary, indent=2) + "\n")
    return out_dir


def _disk_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in model_dir.glob("model*.safetensors"))


def run_prune(o: PruneOptions) -> int:
    import torch

    from cubelm.compress.prune import sparsity_report
    from cubelm.engine.commands import resolve_model_dir
    from cubelm.model.hf_io import load_model, resolve_device
    src = resolve_model_dir(o.model)
    out = Path(o.out)
    if out.resolve() == src.resolve():
        raise CubelmError(f"--out {out} is the source directory; write the pruned model elsewhere")
    device = resolve_device(o.device)
    model = load_model(src, device=device, dtype=torch.float32)
    spec = resolve_spec(o, model)
    recovery = None
    if o.recover_steps:
        from cubelm.compress.recover import Recovery
        recovery = Recovery.from_options(o, src)
    original, masks, rounds = model.config, None, []
    for i in range(1, spec.iterations + 1):
        model, masks = prune_round(model, spec, i, masks, original)
        record = {"params": sum(p.numel() for p in model.parameters()),
                  "projection_sparsity": sparsity_report(model)["total"]}
        if recovery is not None:
            model = recovery.run(model, masks, i)
            record |= recovery.last
        rounds.append(record)
        if recovery is not None:
            print(f"[cubelm] round {i}/{spec.iterations}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float)
                                                                        else f"{k} {v}" for k, v in record.items()))
    report = sparsity_report(model)
    summary = {"source": str(src.resolve()), "spec": asdict(spec), "recover_steps": o.recover_steps,
               "data": recovery.data if recovery else None, "rounds": rounds,
               "params_before": original.num_params(), "params_after": model.config.num_params(),
               "projection_sparsity": report["total"], "per_layer_sparsity": report["per_layer"]}
    save_pruned(model.cpu(), src, out, summary)
    print(f"[cubelm] {src} -> {out}: {o.method}, {_what_changed(original, model.config, report['total'])}, "
          f"parameters {original.num_params():,} -> {model.config.num_params():,}, weights on disk "
          f"{_disk_bytes(src) / 2**20:.2f} -> {_disk_bytes(out) / 2**20:.2f} MiB")
    return 0


def _what_changed(before, after, zeros: float) -> str:
    if after.num_attention_heads != before.num_attention_heads:
        return (f"attention heads per layer {before.num_attention_heads} -> {after.num_attention_heads} "
                f"(KV heads {before.num_key_value_heads} -> {after.num_key_value_heads})")
    if after.intermediate_size != before.intermediate_size:
        return f"MLP neurons per layer {before.intermediate_size} -> {after.intermediate_size}"
    return f"zeros in the decoder projections {zeros:.2%} (embedding and output head dense)"
