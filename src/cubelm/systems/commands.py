"""``cubelm plan`` and ``cubelm flops``: options and run functions (light: no torch, the planner never needs it).

    cubelm plan --model llama-2-7b --dtype float16 --context 4096 --batch 1 --device-memory 24GiB
    cubelm plan --model llama-2-7b --mode full
    cubelm plan --model llama-2-7b --mode full --dtype bf16 --batch 8 --dp 8 --dp-mode fsdp   # per-rank estimate
    cubelm plan --model llama-2-7b --mode full --tp 4 --pp 2 --schedule 1f1b --microbatches 8
    cubelm flops --m 4096 --k 4096 --n 4096
    cubelm flops --model llama-2-7b --context 4096 --json
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from cubelm.cli import opt
from cubelm.errors import CubelmError
from cubelm.model.config import ModelConfig, param_count_str, resolve_config
from cubelm.systems.flops import MatmulCost, matmul_cost, model_flops
from cubelm.systems.memory import MODES, canonical_dtype, gib, parse_bytes
from cubelm.systems.plan import plan_memory
from cubelm.systems.parallel_memory import PP_SCHEDULES, ParallelLayout, per_rank_memory


def _check_positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value <= 0:
            raise CubelmError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")


def load_config(spec: str) -> ModelConfig:
    """``resolve_config`` that also turns a config.json with wrongly typed fields into a CubelmError."""
    try:
        return resolve_config(spec)
    except (TypeError, ValueError, AttributeError) as e:
        raise CubelmError(f"{spec}: config.json has a field of the wrong type ({e}); fix the file") from None


def print_table(rows: list[tuple[str, ...]], header: tuple[str, ...], *, right: set[int]) -> None:
    """Columns padded to their widest cell; columns in ``right`` (numbers) right-aligned; the last one free."""
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    for r in [header, *rows]:
        cells = [cell.rjust(w) if c in right else cell.ljust(w) for c, (cell, w) in enumerate(zip(r, widths))]
        print("  ".join(cells[:-1] + [r[-1]]).rstrip())


# ---- cubelm plan ------------------------------------------------------------------------------------------------
@dataclass(slots=True, kw_only=True)
class PlanOptions:
    model: str = opt(help="preset name (e.g. llama-2-7b), model directory or config.json", metavar="SPEC")
    dtype: str = opt("float16", help="compute/storage dtype: float32, float16, bfloat16, fp8, int8, int4, nf4")
    context: int = opt(4096, help="tokens per sequence (prompt + generated, or training sequence length)")
    batch: int = opt(1, help="sequences at once")
    mode: str = opt("inference", choices=MODES, help="inference, full (AdamW) training, LoRA or QLoRA fine-tuning")
    lora_rank: int = opt(8, help="LoRA rank r (adapters on q,k,v,o,gate,up,down)")
    activation_checkpointing: bool = opt(False, help="keep only layer inputs and recompute in backward")
    attention: str = opt("sdpa", choices=("sdpa", "naive"), help="sdpa never stores the s×s scores; naive does")
    kv_dtype: str | None = opt(None, help="KV cache dtype (default: --dtype, or float16 for int8/int4/nf4 weights)")
    block_size: int = opt(16, help="tokens per paged KV block, for the pool shown with --device-memory")
    device_memory: str | None = opt(None, metavar="SIZE",
                                    help="budget to check against: bytes or 24GiB, 80GB, 512MiB (GB=1e9, GiB=2^30)")
    json_output: bool = opt(False, flag="--json", help="print the plan as JSON")
    dp: int = opt(1, help="with --mode full: data-parallel degree, for a per-rank estimate (--batch is global)")
    dp_mode: str = opt("fsdp", choices=("ddp", "fsdp"), help="ddp replicates training states, fsdp shards them")
    tp: int = opt(1, help="tensor-parallel degree")
    pp: int = opt(1, help="pipeline-parallel degree")
    schedule: str = opt("1f1b", choices=PP_SCHEDULES, help="pipeline schedule (sets micro-batches in flight)")
    microbatches: int = opt(1, help="pipeline micro-batches per step")
    virtual_stages: int = opt(1, help="pipeline stages per rank")

    @property
    def layout(self) -> ParallelLayout | None:
        if self.dp * self.tp * self.pp == 1:
            return None
        return ParallelLayout(dp=self.dp, dp_mode=self.dp_mode, tp=self.tp, pp=self.pp, schedule=self.schedule,
                              microbatches=self.microbatches, virtual_stages=self.virtual_stages)

    def __post_init__(self) -> None:
        _check_positive(context=self.context, batch=self.batch, lora_rank=self.lora_rank, block_size=self.block_size,
                        dp=self.dp, tp=self.tp, pp=self.pp, microbatches=self.microbatches,
                        virtual_stages=self.virtual_stages)
        if self.layout is not None and self.mode != "full":
            raise CubelmError("--dp/--tp/--pp estimate per-rank training memory; add --mode full")
        canonical_dtype(self.dtype)
        if self.kv_dtype is not None:
            canonical_dtype(self.kv_dtype)
        if self.device_memory is not None:
            parse_bytes(self.device_memory)


def run_plan(o: PlanOptions) -> int:
    cfg = load_config(o.model)
    plan = plan_memory(cfg, model=o.model, mode=o.mode, dtype=o.dtype, context=o.context, batch=o.batch,
                       lora_rank=o.lora_rank, activation_checkpointing=o.activation_checkpointing,
                       attention=o.attention, kv_dtype=o.kv_dtype, block_size=o.block_size,
                       device_memory=None if o.device_memory is None else parse_bytes(o.device_memory))
    rank = None if o.layout is None else per_rank_memory(cfg, o.layout, dtype=plan.dtype, context=o.context,
                                                          batch=o.batch,
                                                          activation_checkpointing=o.activation_checkpointing)
    if o.json_output:
        print(json.dumps(plan.to_dict() | ({"per_rank": rank.to_dict()} if rank else {}), indent=2))
        return 0
    n = cfg.num_params()
    print(f"cubelm plan: {o.model} ({n:,} params, {param_count_str(n)}), mode {plan.mode}, dtype {plan.dtype}, "
          f"context {o.context}, batch {o.batch}")
    rows = plan.rows()
    cut = rows.index(("", "", "", "", ""))
    print_table(rows[:cut], ("component", "bytes", "GB", "GiB", "note"), right={1, 2, 3})
    print("\nfor reference (not in the total):")
    print_table(rows[cut + 1:], ("line", "bytes", "GB", "GiB", "note"), right={1, 2, 3})
    for note in plan.notes:
        print(f"note: {note}")
    if rank is not None:
        _print_rank(rank)
    return 0


def _print_rank(r) -> None:
    lay = r.layout
    print(f"\nper rank ({lay.world} ranks: dp {lay.dp} {lay.dp_mode} × tp {lay.tp} × pp {lay.pp}"
          + (f" {lay.schedule}, {lay.microbatches} micro-batches, {lay.in_flight()} in flight" if lay.pp > 1 else "")
          + "), busiest rank:")
    rows = [("parameters computed with", f"{r.params:,}", "", "TP slice of this rank's stages"),
            ("training states", f"{r.states:,}", gib(r.states), "/dp under fsdp"),
            ("gathered layer weights", f"{r.gathered:,}", gib(r.gathered), "fsdp: two layers unsharded"),
            ("activations", f"{r.activations:,}", gib(r.activations), "local batch, TP/SP shards"),
            ("total", f"{r.total:,}", gib(r.total), "")]
    print_table(rows, ("component", "bytes", "GiB", "note"), right={1, 2})


# ---- cubelm flops -------------------------------------------------------------------------------------------------
@dataclass(slots=True, kw_only=True)
class FlopsOptions:
    m: int | None = opt(None, help="rows of A in an (m×k)·(k×n) matmul")
    k: int | None = opt(None, help="inner dimension of the matmul")
    n: int | None = opt(None, help="columns of B")
    model: str | None = opt(None, metavar="SPEC", help="preset, model directory or config.json for per-token FLOPs")
    context: int = opt(4096, help="tokens per sequence: prefill length, and the decode position")
    batch: int = opt(1, help="sequences at once")
    json_output: bool = opt(False, flag="--json", help="print JSON")

    def __post_init__(self) -> None:
        dims = (self.m, self.k, self.n)
        if any(d is not None for d in dims) and None in dims:
            raise CubelmError("give all of --m, --k and --n for a matmul")
        if self.m is None and self.model is None:
            raise CubelmError("nothing to count: pass --m M --k K --n N, or --model SPEC [--context S]")
        _check_positive(m=self.m, k=self.k, n=self.n, context=self.context, batch=self.batch)


def run_flops(o: FlopsOptions) -> int:
    out: dict = {}
    if o.m is not None:
        out["matmul"] = matmul_cost(o.m, o.k, o.n)
    if o.model is not None:
        out["model"] = model_flops(load_config(o.model), o.context, o.batch)
    if o.json_output:
        print(json.dumps({key: value.to_dict() for key, value in out.items()}, indent=2))
        return 0
    if "matmul" in out:
        _print_matmul(out["matmul"])
    if "model" in out:
        gap = "\n" if "matmul" in out else ""
        print(f"{gap}{o.model}: FLOPs at context {o.context}, batch {o.batch} (1 multiply-add = 2 FLOPs)")
        rows = [(label, f"{v:,}", _scaled(v), note) for label, v, note in out["model"].rows()]
        print_table(rows, ("quantity", "count", "", "formula"), right={1, 2})
    return 0


def _print_matmul(c: MatmulCost) -> None:
    print(f"matmul ({c.m}×{c.k}) · ({c.k}×{c.n})")
    rows = [("multiplications", f"{c.multiplications:,}", _scaled(c.multiplications), "m·n·k"),
            ("additions", f"{c.additions:,}", _scaled(c.additions), "m·n·(k−1)"),
            ("FLOPs", f"{c.flops:,}", _scaled(c.flops), "2·m·n·k (multiply-add = 2 FLOPs)")]
    print_table(rows, ("quantity", "count", "", "formula"), right={1, 2})


def _scaled(v: int) -> str:
    for unit, div in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if v >= div:
            return f"{v / div:.2f} {unit}"
    return str(v)
