"""One compression report: every method of ``cubelm.compress`` on the same model, held-out text and engine.

Each method writes its real output (an HF model directory, a quantized directory or a Deep Compression container)
under ``OUT/<row>/``; every row is then measured the same way: bytes on disk of what the method ships, held-out
bits per byte, batch-1 decode tok/s and batched throughput in cubelm's engine. The speed rounds are interleaved
(every row once per round, rows in the same order, medians over rounds) because the machine is shared and noisy:
the ratios between rows within a run are the figures to read, not absolute tok/s from another session.

W8A8 rows are quality only: the integer matmul is emulated (``cubelm.compress.w8a8``), so the engine has no W8A8
path to time, and nothing is written (the bytes shown are the per-channel int8 layout, i.e. the int8 row's file).
"""

from __future__ import annotations

import json
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from cubelm.errors import CubelmError


@dataclass(slots=True, kw_only=True)
class Row:
    name: str
    params: str
    model_dir: Path | None = None  # what the engine loads and bits per byte is measured on
    bytes: int | None = None  # what the method ships on disk
    bpb: float | None = None
    engine: bool = True  # False: no engine path (W8A8 is emulated)
    note: str = ""
    method_key: str = ""  # the METHODS entry that produced the row
    decode: list[float] = field(default_factory=list)  # batch-1 tok/s per round
    batched: list[float] = field(default_factory=list)  # throughput tok/s per round

    def as_dict(self, source_bpb: float | None) -> dict:
        def med(v):
            return statistics.median(v) if v else None
        return {"method": self.name, "params": self.params, "bytes": self.bytes, "bpb": self.bpb,
                "delta_pct": (100 * (self.bpb - source_bpb) / source_bpb
                              if self.bpb is not None and source_bpb else None),
                "decode_tok_s": med(self.decode), "batched_tok_s": med(self.batched),
                "decode_rounds": self.decode, "batched_rounds": self.batched, "note": self.note,
                "model_dir": str(self.model_dir) if self.model_dir else None}


def weights_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in Path(model_dir).glob("model*.safetensors"))


# --- the methods: each builds its output under ``out`` and returns the rows it produced ----------------------------

def _original(src: Path, out: Path, o) -> list[Row]:
    return [Row(name="original", params=_dtype_of(src), model_dir=src, bytes=weights_bytes(src))]


def _quantized(method: str, group: int | None):
    def build(src: Path, out: Path, o) -> list[Row]:
        from cubelm.compress.quantized_io import save_quantized
        d = save_quantized(src, out, method, group, include_head=False)
        return [Row(name=f"{method} weight-only", params=f"{'per-row scales' if group is None else f'g={group}'}, "
                                                          f"head fp32", model_dir=d, bytes=weights_bytes(d))]
    return build


def _prune(method: str, recover: bool, **kwargs):
    def build(src: Path, out: Path, o) -> list[Row]:
        from contextlib import redirect_stdout
        from io import StringIO

        from cubelm.compress.prune_commands import PruneOptions, run_prune
        steps = o.recover_steps if recover else 0
        with redirect_stdout(StringIO()):  # the report prints its own table
            run_prune(PruneOptions(model=str(src), out=str(out), method=method, recover_steps=steps,
                                   data=o.data, seed=o.seed, **kwargs))
        what = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in kwargs.items())
        params = (what or "2 of every 4 inputs zero") + (f", recovery {steps} steps" if steps else ", no recovery")
        return [Row(name=f"prune {method}" + (" + recovery" if steps else ""), params=params, model_dir=out,
                    bytes=weights_bytes(out),
                    note="zeros stored densely" if method in ("magnitude", "2:4") else "shapes shrink")]
    return build


def _lowrank(src: Path, out: Path, o) -> list[Row]:
    from cubelm.compress.architecture import load_float_model, save_compressed
    from cubelm.compress.lowrank import apply_low_rank
    model = load_float_model(src)
    decisions = apply_low_rank(model, energy=o.lowrank_energy)
    save_compressed(model, src, out)
    n = sum(d.factorized for d in decisions)
    return [Row(name="low rank (SVD)", params=f"energy {o.lowrank_energy:g}, {n} of {len(decisions)} projections "
                                               f"factorized",
                model_dir=out, bytes=weights_bytes(out))]


def _share(src: Path, out: Path, o) -> list[Row]:
    from cubelm.compress.architecture import load_float_model, save_compressed
    from cubelm.compress.share import apply_sharing, layer_groups
    model = load_float_model(src)
    groups = layer_groups(model.config.num_hidden_layers, groups=o.share_groups)
    apply_sharing(model, groups, "first")
    save_compressed(model, src, out)
    return [Row(name="layer sharing", params=f"{o.share_groups} weight sets {groups}, no retraining",
                model_dir=out, bytes=weights_bytes(out))]


def _w8a8(src: Path, out: Path, o) -> list[Row]:
    from cubelm.compress.w8a8_commands import W8A8Options, evaluate_w8a8
    from cubelm.compress.quantized_io import save_quantized
    layout = save_quantized(src, out / "int8-layout", "int8", None, include_head=False)
    size = weights_bytes(layout)
    shutil.rmtree(layout)
    r = evaluate_w8a8(src, W8A8Options(model=str(src), method="all", source=o.source, max_bytes=o.max_bytes,
                                       calib=o.calib, calib_len=o.calib_len))
    rows = []
    for key, name, params in (("plain", "W8A8", "per-token int8 activations"),
                              ("llm.int8", "W8A8 LLM.int8()", "outlier columns |x| > 6 in fp32"),
                              ("smoothquant", "W8A8 SmoothQuant", "alpha 0.5")):
        extra = ""
        if key == "llm.int8" and "float_columns" in r[key]:
            extra = f" ({100 * r[key]['float_columns']['float_share']:.1f}% of columns fp32)"
        rows.append(Row(name=name, params=params + extra, bytes=size, bpb=r[key]["bpb"], engine=False,
                        note="emulated int8 matmul: quality only; bytes = the per-row int8 layout"))
    return rows


def _deep(src: Path, out: Path, o) -> list[Row]:
    from cubelm.compress.deep_commands import DeepOptions, deep_compress_dir
    r = deep_compress_dir(DeepOptions(model=str(src), out=str(out), eval=False))
    huff = r["stages"]["huffman"]
    return [Row(name="Deep Compression", params=f"prune 0.5 -> k-means 5 bits -> Huffman "
                                                f"({r['total_reduction']:.1f}x)",
                model_dir=out, bytes=huff["bytes"],
                note="bytes = the Huffman container; speed = the decoded dense model")]


def _distill(src: Path, out: Path, o) -> list[Row]:
    from contextlib import redirect_stdout
    from io import StringIO

    from cubelm.compress.distill_commands import DistillOptions, run_distill
    with redirect_stdout(StringIO()):
        run_distill(DistillOptions(teacher=str(src), student=o.distill_student, out=str(out), data=o.data,
                                   max_steps=o.distill_steps, seq_len=128, micro_batch_size=16, seed=o.seed,
                                   progress=False))
    from cubelm.model.hf_io import read_config_json
    n = read_config_json(out).num_params()
    return [Row(name="distilled student", params=f"{o.distill_student} ({n:,} parameters), {o.distill_steps} steps "
                                                 f"x 2,048 tokens, α 0.5, T 2",
                model_dir=out, bytes=weights_bytes(out), note="a smaller model trained against the original's logits")]


METHODS: dict[str, Callable] = {
    "original": _original,
    "int8": _quantized("int8", None),
    "int4": _quantized("int4", 32),
    "magnitude": _prune("magnitude", False, sparsity=0.5),
    "magnitude-recovered": _prune("magnitude", True, sparsity=0.5),
    "2:4-recovered": _prune("2:4", True),
    "heads": _prune("heads", False, sparsity=0.5),
    "neurons-recovered": _prune("neurons", True, sparsity=0.5),
    "lowrank": _lowrank,
    "share": _share,
    "w8a8": _w8a8,
    "deep": _deep,
    "distill": _distill,
}


def check_methods(spec: str) -> list[str]:
    names = list(METHODS) if spec == "all" else [m.strip() for m in spec.split(",") if m.strip()]
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        raise CubelmError(f"unknown method(s) {', '.join(bad) or repr(spec)}; choose from all or "
                          f"{', '.join(METHODS)} (comma-separated)")
    return ["original"] + [m for m in names if m != "original"]  # the reference row always comes first


def _dtype_of(src: Path) -> str:
    from cubelm.model.hf_io import read_config_json
    cfg = read_config_json(src)
    return f"{cfg.torch_dtype or 'float32'}, {cfg.num_params():,} parameters"


# --- measurement ----------------------------------------------------------------------------------------------------

def build_rows(src: Path, out: Path, o, log=print) -> list[Row]:
    """Run each method into ``out/<method>/``; with ``o.reuse``, a method whose rows were saved by an earlier report
    (``out/<method>.rows.json``, its outputs still there) is not run again."""
    rows: list[Row] = []
    for name in check_methods(o.methods):
        target = out / name.replace(":", "_")
        saved = _saved_rows(out, name) if o.reuse else None
        if saved is not None:
            log(f"[cubelm] report: {name}: reusing {target}")
        else:
            log(f"[cubelm] report: {name} ...")
            if name != "original" and target.exists():
                shutil.rmtree(target)
        for row in saved if saved is not None else METHODS[name](src, target, o):
            row.method_key = name
            if any((r.name, r.params) == (row.name, row.params) for r in rows):
                shutil.rmtree(target)  # e.g. magnitude-recovered with --recover-steps 0: the magnitude row again
                continue
            rows.append(row)
    return rows


def _saved_rows(out: Path, method: str) -> list[Row] | None:
    path = out / f"{method.replace(':', '_')}.rows.json"
    if not path.is_file():
        return None
    rows = []
    for d in json.loads(path.read_text()):
        d["model_dir"] = Path(d["model_dir"]) if d["model_dir"] else None
        if d["model_dir"] is not None and not d["model_dir"].is_dir():
            return None
        rows.append(Row(**d))
    return rows


def measure_quality(rows: list[Row], held, out: Path, log=print) -> None:
    """Held-out bits per byte of every row that has a model; each method's rows are then saved for ``--reuse``
    (sizes and quality only: speed is measured afresh in every report, interleaved)."""
    from cubelm.data.tokenizer import load_tokenizer
    from cubelm.eval.bpb import model_bpb
    from cubelm.model.hf_io import load_model
    for r in rows:
        if r.bpb is None and r.model_dir is not None:
            r.bpb = model_bpb(load_model(r.model_dir), load_tokenizer(r.model_dir), held.texts)
            log(f"[cubelm] report: {r.name}: {r.bpb:.4f} bits per byte")
    for key in dict.fromkeys(r.method_key for r in rows):
        keep = [{"name": r.name, "params": r.params, "model_dir": str(r.model_dir) if r.model_dir else None,
                 "bytes": r.bytes, "bpb": r.bpb, "engine": r.engine, "note": r.note}
                for r in rows if r.method_key == key]
        (out / f"{key.replace(':', '_')}.rows.json").write_text(json.dumps(keep, indent=2) + "\n")


def measure_speed(rows: list[Row], o, log=print) -> None:
    """``o.rounds`` interleaved rounds: in each, every engine row decodes batch 1 and then the batched workload,
    each on freshly loaded weights (the engine lays them out for decode in place)."""
    from cubelm.engine.bench import BenchDecodeOptions, measure_round
    from cubelm.model.hf_io import load_model
    single = BenchDecodeOptions(model="x", batch=1, prompt_tokens=o.prompt_tokens, new_tokens=o.new_tokens,
                                seed=o.seed)
    batched = BenchDecodeOptions(model="x", batch=o.batch, prompt_tokens=o.prompt_tokens,
                                 new_tokens=o.new_tokens, seed=o.seed)
    for i in range(o.rounds):
        for r in rows:
            if not r.engine or r.model_dir is None:
                continue
            r.decode.append(measure_round(load_model(r.model_dir), single)["decode_tok_s"])
            res = measure_round(load_model(r.model_dir), batched)
            # throughput of the whole workload: prefill included, as a server sees it
            r.batched.append(o.batch * o.new_tokens / (res["prefill_s"] + res["decode_s"]))
        log(f"[cubelm] report: speed round {i + 1}/{o.rounds} done")
