"""``cubelm compress smoothquant`` (write a smoothed float model) and ``cubelm compress w8a8`` (held-out bits per
byte through a W8A8 model: plain, LLM.int8() or SmoothQuant), plus the calibration text they read.

    cubelm compress smoothquant --model DIR --out OUT [--alpha 0.5] [--calib 256]
    cubelm compress w8a8 --model DIR --method all        # fp32, plain, llm.int8, smoothquant side by side

The smoothed directory is a standard HF model (transformers and ``LLM`` load it; in float it computes what the
source computes) with ``smoothquant.json``: the note that says what was folded, with which alpha and calibration,
the scales, and the outlier channels the calibration found. Its W8A8 quality: ``cubelm compress w8a8 --model OUT
--method smoothquant`` (a smoothed directory is not smoothed twice).

Calibration text (``--calib-source``), never the evaluation text: ``auto`` is the validation split of the data
the model trained on (``training_summary.json``'s ``data``: held out from training, the training distribution,
as the paper calibrates on the Pile's validation set), else the standard library's sources; or a packed data
directory (its ``val.bin``), ``package:NAME``, or a file / directory / glob / ``.jsonl`` as ``cubelm data prepare``
reads them.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from cubelm.cli import opt
from cubelm.errors import CubelmError

NOTE_NAME = "smoothquant.json"
W8A8_CHOICES = ("plain", "llm.int8", "smoothquant", "all")
SMOOTH_GROUPS = ("qkv", "o", "gate_up", "down")  # cubelm.compress.smoothquant.GROUPS (kept torch-free here)


@dataclass(slots=True, kw_only=True)
class CalibrationOptions:
    alpha: float = opt(0.5, help="migration strength: s_j = max|X_j|^alpha / max|W_j|^(1-alpha)")
    calib: int = opt(256, help="calibration sequences")
    calib_len: int = opt(256, help="tokens per calibration sequence")
    calib_source: str = opt("auto", help="calibration text: auto (the training data's validation split, else the "
                                         "stdlib), a packed data dir, package:NAME, or a path/glob/.jsonl")
    threshold: float = opt(6.0, help="outlier magnitude: channels reported as outliers; LLM.int8's float columns")
    smooth: str = opt("qkv,o,gate_up,down", help="inputs to smooth, comma-separated: qkv and gate_up fold into "
                                                 "the norms, o into v_proj's rows, down into up_proj's rows")

    def __post_init__(self) -> None:  # before any heavy import: a bad flag fails at once
        if not 0 <= self.alpha <= 1:
            raise CubelmError(f"--alpha must be in [0, 1] (0: all on the activations, 1: all on the weights), "
                              f"got {self.alpha}")
        if self.calib < 1 or self.calib_len < 2:
            raise CubelmError(f"--calib must be >= 1 sequences and --calib-len >= 2 tokens, got {self.calib} and "
                              f"{self.calib_len}")
        if not self.threshold > 0:
            raise CubelmError(f"--threshold must be a positive magnitude, got {self.threshold}")
        bad = [g for g in self.groups if g not in SMOOTH_GROUPS]
        if bad or not self.groups:
            raise CubelmError(f"--smooth {self.smooth!r}: choose from {', '.join(SMOOTH_GROUPS)} (comma-separated)")

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(g.strip() for g in self.smooth.split(",") if g.strip())


@dataclass(slots=True, kw_only=True)
class SmoothQuantOptions(CalibrationOptions):
    model: str | None = opt(None, help="float model directory (HF format); default: the default model")
    out: str = opt(help="output directory: the smoothed float model + smoothquant.json", metavar="DIR")


@dataclass(slots=True, kw_only=True)
class W8A8Options(CalibrationOptions):
    model: str | None = opt(None, help="model directory (float, or smoothed by compress smoothquant)")
    method: str = opt("all", help="activation quantization to evaluate; all runs the three", choices=W8A8_CHOICES)
    source: str = opt("package:tqdm", help="held-out text: package:NAME or a path (as cubelm eval bpb)")
    max_bytes: int = opt(200_000, help="held-out bytes to score")
    context: int = opt(256, help="tokens per scoring window")
    json: bool = opt(False, help="print JSON")


def calibration_tokens(model_dir: Path, tokenizer, spec: str, num_sequences: int, seq_len: int):
    """``(num_sequences, seq_len)`` token ids from ``spec`` (module docstring), evenly spread over a packed split,
    or the first documents of a text source each after EOS (as in training) concatenated and cut."""
    import numpy as np
    import torch
    packed = _packed_dir(model_dir, spec)
    need = num_sequences * seq_len
    if packed is not None:
        from cubelm.data.packed import PackedData
        val = PackedData(packed).val
        if len(val) < seq_len:
            raise CubelmError(f"{packed}/val.bin has {len(val)} tokens, fewer than --calib-len {seq_len}")
        starts = np.linspace(0, len(val) - seq_len, num_sequences).astype(np.int64)
        return torch.from_numpy(np.stack([np.asarray(val[s:s + seq_len], dtype=np.int64) for s in starts]))
    ids: list[int] = []
    for text in _texts(spec if spec != "auto" else "stdlib"):
        ids += [tokenizer.eos_token_id] + tokenizer.encode(text)
        if len(ids) >= need:
            break
    if len(ids) < seq_len:
        raise CubelmError(f"--calib-source {spec}: only {len(ids)} tokens, fewer than --calib-len {seq_len}")
    n = min(num_sequences, len(ids) // seq_len)
    return torch.tensor(ids[:n * seq_len], dtype=torch.long).view(n, seq_len)


def _packed_dir(model_dir: Path, spec: str) -> Path | None:
    if spec == "auto":
        summary = model_dir / "training_summary.json"
        data = json.loads(summary.read_text()).get("data") if summary.is_file() else None
        return Path(data) if data and Path(data, "meta.json").is_file() else None
    return Path(spec) if Path(spec, "meta.json").is_file() else None


def _texts(spec: str):
    if spec.startswith("package:"):
        from cubelm.eval.bpb import held_out_package
        yield from held_out_package(spec.removeprefix("package:"), max_bytes=10**9).texts
        return
    from cubelm.data.sources import resolve_source
    for doc in resolve_source(spec):
        if doc.error is None and doc.text.strip():
            yield doc.text


def _calibrate(model, model_dir: Path, tokenizer, o: CalibrationOptions) -> tuple[dict, dict]:
    from cubelm.compress.smoothquant import calibrate
    tokens = calibration_tokens(model_dir, tokenizer, o.calib_source, o.calib, o.calib_len)
    where = _packed_dir(model_dir, o.calib_source)
    info = {"source": f"{where}/val.bin" if where else ("stdlib" if o.calib_source == "auto" else o.calib_source),
            "sequences": int(tokens.shape[0]), "tokens_per_sequence": int(tokens.shape[1])}
    return calibrate(model, tokens), info


def run_smoothquant(o: SmoothQuantOptions) -> int:
    from cubelm.compress.smoothquant import apply_smoothing, format_outliers, outlier_report
    from cubelm.data.tokenizer import load_tokenizer
    from cubelm.engine.commands import resolve_model_dir
    from cubelm.model.hf_io import load_model, save_model
    src, out = resolve_model_dir(o.model), Path(o.out)
    if out.resolve() == src.resolve():
        raise CubelmError(f"--out {out} is the source directory; write the smoothed model elsewhere")
    if (src / NOTE_NAME).is_file():
        raise CubelmError(f"{src} is already smoothed ({NOTE_NAME}); smooth its float source instead")
    model = load_model(src, dtype="float32")
    stats, info = _calibrate(model, src, load_tokenizer(src), o)
    report = outlier_report(model, stats, threshold=o.threshold)
    scales = apply_smoothing(model, stats, o.alpha, o.groups)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, out)
    # tokenizer, generation config, training summary: all but the weights, the config and the source's own
    # measurements (eval.json scores the source, not this model)
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith("model") and f.name not in ("config.json", "eval.json"):
            shutil.copy2(f, out / f.name)
    note = {"method": "smoothquant", "alpha": o.alpha, "folded": list(o.groups), "calibration": info,
            "outlier_threshold": o.threshold, "source_model": str(src),
            "float_model": "mathematically equal to the source (the scales are folded, nothing is quantized)",
            "w8a8": f"cubelm compress w8a8 --model {out} --method smoothquant",
            "outliers": report, "scales": {k: [round(float(v), 6) for v in s] for k, s in scales.items()}}
    (out / NOTE_NAME).write_text(json.dumps(note, indent=1) + "\n")
    print(f"[cubelm] calibration: {info['sequences']} x {info['tokens_per_sequence']} tokens of {info['source']}")
    print(f"outlier channels (max |x| over the calibration tokens, > {o.threshold:g}):")
    print(format_outliers(report, o.threshold))
    print(f"[cubelm] {src} -> {out}: smoothed (alpha {o.alpha:g}, {', '.join(o.groups)}), a float model equal to "
          f"the source; W8A8 quality: cubelm compress w8a8 --model {out} --method smoothquant")
    return 0


def evaluate_w8a8(model_dir: Path, o: W8A8Options) -> dict:
    """Held-out bits per byte of the float model and of each requested W8A8 variant, with timings."""
    import copy

    import torch

    from cubelm.compress.smoothquant import apply_smoothing, outlier_report
    from cubelm.compress.w8a8 import apply_w8a8, outlier_summary
    from cubelm.data.tokenizer import load_tokenizer
    from cubelm.eval.bpb import held_out_package, held_out_path, model_bpb
    from cubelm.model.hf_io import load_model
    held = (held_out_package(o.source.removeprefix("package:"), o.max_bytes) if o.source.startswith("package:")
            else held_out_path(o.source, o.max_bytes))
    tokenizer = load_tokenizer(model_dir)
    base = load_model(model_dir, dtype="float32")
    smoothed = (model_dir / NOTE_NAME).is_file()

    def score(model) -> tuple[float, float]:
        t0 = time.perf_counter()
        bpb = model_bpb(model, tokenizer, held.texts, context=o.context)
        return bpb, time.perf_counter() - t0

    fp32, fp32_s = score(base)
    probe = _probe_tokens(tokenizer, held.texts, o.context)
    with torch.no_grad():
        ref_logp = torch.log_softmax(base(probe).float(), dim=-1)
    result = {"model": str(model_dir), "held_out": held.name, "num_bytes": held.num_bytes,
              "fp32": {"bpb": fp32, "seconds": round(fp32_s, 2)}, "smoothed_on_disk": smoothed}
    methods = ("plain", "llm.int8", "smoothquant") if o.method == "all" else (o.method,)
    for method in methods:
        model = copy.deepcopy(base)
        row = {}
        if method == "smoothquant" and not smoothed:
            stats, row["calibration"] = _calibrate(model, model_dir, tokenizer, o)
            row["outliers_before"] = outlier_report(model, stats, threshold=o.threshold)
            apply_smoothing(model, stats, o.alpha, o.groups)
            row["outliers_after"] = outlier_report(model, _calibrate(model, model_dir, tokenizer, o)[0],
                                                   threshold=o.threshold)
        apply_w8a8(model, outlier_threshold=o.threshold if method == "llm.int8" else None)
        row["bpb"], seconds = score(model)
        row["seconds"] = round(seconds, 2)
        row["delta_pct"] = 100 * (row["bpb"] - fp32) / fp32
        with torch.no_grad():  # finer than bits per byte: how far the next-token distributions moved
            logp = torch.log_softmax(model(probe).float(), dim=-1)
        row["kl_nats_per_token"] = float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean())
        if method == "llm.int8":
            row["float_columns"] = outlier_summary(model)
        result[method] = row
    return result


def _probe_tokens(tokenizer, texts: list[str], context: int, windows: int = 16):
    """Up to ``windows`` full windows of the held-out text (documents after EOS, concatenated), for the KL."""
    import torch
    ids: list[int] = []
    for text in texts:
        ids += [tokenizer.eos_token_id] + tokenizer.encode(text)
        if len(ids) >= windows * context:
            break
    n = min(windows, len(ids) // context)
    return torch.tensor(ids[:n * context]).view(n, context) if n else torch.tensor(ids).view(1, -1)


def run_w8a8(o: W8A8Options) -> int:
    from cubelm.compress.smoothquant import format_outliers
    from cubelm.engine.commands import resolve_model_dir
    from cubelm.systems.host import describe_host, host_info
    result = evaluate_w8a8(resolve_model_dir(o.model), o)
    result["int8_matmul"] = "int8 codes in exact float32 chunks of <= 1024 inputs, int32 sums"
    result["host"] = describe_host(host_info())
    if o.json:
        print(json.dumps(result, indent=2))
        return 0
    sq = result.get("smoothquant", {})
    if "outliers_before" in sq:
        print(f"calibration: {sq['calibration']['sequences']} x {sq['calibration']['tokens_per_sequence']} tokens "
              f"of {sq['calibration']['source']}")
        print(f"outlier channels before smoothing (max |x| > {o.threshold:g}):")
        print(format_outliers(sq["outliers_before"], o.threshold))
        print("after smoothing (alpha {:g}):".format(o.alpha))
        print(format_outliers(sq["outliers_after"], o.threshold))
    print(f"held-out: {result['held_out']}, {result['num_bytes']:,} bytes; int8 matmul: {result['int8_matmul']}; "
          f"{result['host']}")
    print(f"  {'model':17} {'bits/byte':>9} {'delta':>8} {'KL vs fp32':>11} {'eval s':>7}")
    print(f"  {'fp32':17} {result['fp32']['bpb']:9.5f} {'':>8} {'':>11} {result['fp32']['seconds']:7.1f}")
    for method in ("plain", "llm.int8", "smoothquant"):
        if method in result:
            r = result[method]
            extra = ""
            if "float_columns" in r:
                fc = r["float_columns"]
                extra = f"  ({fc['mean_float_columns']:.1f} columns per matmul in fp32, {100 * fc['float_share']:.2f}%)"
            print(f"  {'w8a8 ' + method:17} {r['bpb']:9.5f} {r['delta_pct']:+7.3f}% {r['kl_nats_per_token']:11.2e} "
                  f"{r['seconds']:7.1f}{extra}")
    print("  (KL: mean KL(fp32 || W8A8) of the next-token distributions, nats per token, on the first held-out "
          "windows; eval s: the whole held-out pass, the W8A8 matmuls emulated in PyTorch)")
    return 0
