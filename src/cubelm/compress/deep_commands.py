"""``cubelm compress deep``: Deep Compression of a model directory, bytes on disk at each stage, and the decoded
model's held-out bits per byte.

    cubelm compress deep --model DIR --out OUT --sparsity 0.5 --bits 5

OUT is a standard HF model directory whose ``model.safetensors`` holds the weights *decoded from* the Huffman
file (so ``LLM``, ``cubelm serve`` and transformers run the compressed model as it would be shipped), plus
``deep_compression/``: ``1_pruned.cdc``, ``2_quantized.cdc``, ``3_huffman.cdc`` (each stage written in the format
of ``cubelm.compress.deep_compression``, so every size in the report is a file's size) and ``report.json``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from cubelm.cli import opt
from cubelm.errors import CubelmError

STAGE_FILES = {"pruned": "1_pruned.cdc", "quantized": "2_quantized.cdc", "huffman": "3_huffman.cdc"}


@dataclass(slots=True, kw_only=True)
class DeepOptions:
    model: str | None = opt(None, help="float model directory (HF format); default: the default model")
    out: str = opt(help="output directory: the decoded HF model + deep_compression/ (stage files, report)",
                   metavar="DIR")
    sparsity: float = opt(0.5, help="share of each pruned weight matrix set to zero (smallest |w| first), [0, 1)")
    bits: int = opt(5, help="bits per shared-weight index: a k-means codebook of 2^bits values per matrix (1..8)")
    index_bits: int = opt(5, help="bits per relative-position symbol before Huffman coding (2..8)")
    iterations: int = opt(10, help="Lloyd iterations of each k-means")
    prune: str = opt("projections", help="which matrices are pruned: the decoder projections, or all 2-D weights "
                                         "(embedding, untied head) as in the paper", choices=("projections", "all"))
    eval: bool = opt(True, help="held-out bits per byte of the source, the pruned and the decoded model")
    source: str = opt("package:tqdm", help="held-out text: package:NAME or a path (as cubelm eval bpb)")
    max_bytes: int = opt(200_000, help="held-out bytes to score")
    json: bool = opt(False, help="print the report as JSON")

    def __post_init__(self) -> None:
        from cubelm.compress.deep_compression import check_settings
        check_settings(self.sparsity, self.bits, self.index_bits, self.iterations, self.prune)


def run_deep(o: DeepOptions) -> int:
    report = deep_compress_dir(o)
    if o.json:
        print(json.dumps(report, indent=2))
        return 0
    print(format_report(report))
    return 0


def deep_compress_dir(o: DeepOptions) -> dict:
    from cubelm.compress.deep_compression import DeepConfig, deep_compress, read_container, write_container
    from cubelm.compress.quantized_io import read_quantization_config
    from cubelm.engine.commands import resolve_model_dir
    from cubelm.model.hf_io import load_model, save_model
    from cubelm.model.seam import find_linears
    src, out = resolve_model_dir(o.model), Path(o.out)
    if out.resolve() == src.resolve():
        raise CubelmError(f"--out {out} is the source directory; write the compressed model elsewhere")
    if read_quantization_config(src) is not None:
        raise CubelmError(f"{src} is weight-quantized; Deep Compression starts from its float source")
    cfg = DeepConfig(sparsity=o.sparsity, bits=o.bits, index_bits=o.index_bits, iterations=o.iterations,
                     prune=o.prune)
    model = load_model(src, dtype="float32")
    state = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # one matrix, stored once (as in model.safetensors)
    prune_names = {f"{name}.weight" for name, _ in find_linears(model)}
    settings = {"sparsity": o.sparsity, "bits": o.bits, "index_bits": o.index_bits, "iterations": o.iterations,
                "prune": o.prune, "source_model": str(src)}
    stages = deep_compress(state, cfg, prune_names)
    files = {s: out / "deep_compression" / name for s, name in STAGE_FILES.items()}
    sizes = {s: write_container(stages[s], files[s], s, settings) for s in STAGE_FILES}
    decoded = read_container(files["huffman"])  # what the shipped file holds, not what is in memory
    held = _held_out(o) if o.eval else None
    report = {"model": str(src), "out": str(out), "settings": settings, "stages": {}}
    if held is not None:
        report["held_out"] = {"name": held.name, "num_bytes": held.num_bytes}
        report["stages"]["dense"] = {"bpb": _bpb(model, src, held)}
    if held is not None:
        pruned = read_container(files["pruned"])
        report["stages"]["pruned"] = {"bpb": _bpb(_with(model, pruned), src, held)}
    _with(model, decoded)
    save_model(model, out)
    # tokenizer, generation config, training summary: all but the weights, the config and the source's own
    # measurements (eval.json scores the source, not this model)
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith("model") and f.name not in ("config.json", "eval.json"):
            shutil.copy2(f, out / f.name)
    if held is not None:
        report["stages"]["huffman"] = {"bpb": _bpb(model, src, held)}
    dense = (out / "model.safetensors").stat().st_size  # fp32, every tensor once: the baseline
    report["stages"].setdefault("dense", {})["bytes"] = dense
    compressed = [t for t in stages["huffman"] if t["kind"] != "raw"]
    n_weights = sum(_numel(t["shape"]) for t in compressed)
    for s in STAGE_FILES:
        weight_bytes = sum(len(b) for t in stages[s] if t["kind"] != "raw" for b in t["blobs"].values())
        report["stages"].setdefault(s, {}).update(
            bytes=sizes[s], file=str(files[s]), ratio=dense / sizes[s], bits_per_weight=8 * weight_bytes / n_weights)
    report["stages"]["dense"].update(ratio=1.0, bits_per_weight=32.0, file=str(out / "model.safetensors"))
    report["compressed_weights"] = {"tensors": len(compressed), "numel": n_weights,
                                    "nonzeros": sum(t["nnz"] for t in compressed)}
    report["total_reduction"] = dense / sizes["huffman"]
    (out / "deep_compression" / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _with(model, tensors):
    """Load ``tensors`` into ``model`` in place (the tied head follows the embedding) and return it."""
    import torch
    with torch.no_grad():
        for name, t in tensors.items():
            model.get_parameter(name).copy_(t)
    return model


def _held_out(o: DeepOptions):
    from cubelm.eval.bpb import held_out_package, held_out_path
    return (held_out_package(o.source.removeprefix("package:"), o.max_bytes) if o.source.startswith("package:")
            else held_out_path(o.source, o.max_bytes))


def _bpb(model, model_dir: Path, held) -> float:
    from cubelm.data.tokenizer import load_tokenizer
    from cubelm.eval.bpb import model_bpb
    return model_bpb(model, load_tokenizer(model_dir), held.texts)


def format_report(r: dict) -> str:
    s = r["settings"]
    w = r["compressed_weights"]
    lines = [f"Deep Compression of {r['model']} -> {r['out']}",
             f"  {w['tensors']} weight matrices, {w['numel']:,} weights, {w['nonzeros']:,} kept; pruned: {s['prune']} "
             f"at {s['sparsity']:g}; {s['bits']}-bit codebooks ({1 << s['bits']} shared values per matrix, linear "
             f"init, {s['iterations']} Lloyd iterations); relative positions in {s['index_bits']}-bit symbols"]
    if "held_out" in r:
        lines.append(f"  held-out: {r['held_out']['name']}, {r['held_out']['num_bytes']:,} bytes")
    lines.append(f"  {'stage':22} {'bytes on disk':>14} {'reduction':>10} {'bits/weight':>12} {'bits/byte':>10}")
    base = r["stages"]["dense"].get("bpb")
    names = {"dense": "dense fp32", "pruned": "pruned (sparse fp32)", "quantized": "+ k-means (packed)",
             "huffman": "+ Huffman"}
    for key, label in names.items():
        st = r["stages"][key]
        if key == "quantized":
            bpb = "= Huffman" if base is not None else ""
        elif "bpb" in st:
            bpb = f"{st['bpb']:.4f}" + (f" ({100 * (st['bpb'] - base) / base:+.2f}%)" if key != "dense" else "")
        else:
            bpb = ""
        lines.append(f"  {label:22} {st['bytes']:>14,} {st['ratio']:>9.2f}x {st['bits_per_weight']:>12.2f} {bpb:>10}")
    lines.append(f"  total reduction {r['total_reduction']:.2f}x; the decoded model (from 3_huffman.cdc) is "
                 f"{r['out']}/model.safetensors")
    return "\n".join(lines)
