"""``cubelm eval bpb``: a model's bits per byte on held-out text vs gzip -9 and a unigram baseline."""

from __future__ import annotations

import json
from dataclasses import dataclass

from cubelm.cli import opt


@dataclass(slots=True, kw_only=True)
class BpbOptions:
    model: str | None = opt(None, help="model directory; default: the default model")
    source: str = opt("package:tqdm", help="held-out text: package:NAME (an installed package's .py files) or a path")
    max_bytes: int = opt(200_000, help="stop adding documents after this many bytes")
    train_data: str | None = opt(None, help="packed training data for the unigram baseline (default: from the "
                                            "model's training_summary.json when present)")
    context: int = opt(256, help="tokens per scoring window")
    json: bool = opt(False, help="print JSON")


def run_bpb(o: BpbOptions) -> int:
    from pathlib import Path

    from cubelm.engine.commands import resolve_model_dir
    from cubelm.eval.bpb import evaluate_bpb, held_out_package, held_out_path
    model_dir = resolve_model_dir(o.model)
    held = (held_out_package(o.source.removeprefix("package:"), o.max_bytes) if o.source.startswith("package:")
            else held_out_path(o.source, o.max_bytes))
    train_data = o.train_data
    summary = Path(model_dir) / "training_summary.json"
    if train_data is None and summary.is_file():
        candidate = json.loads(summary.read_text()).get("data")
        train_data = candidate if candidate and Path(candidate, "meta.json").is_file() else None
    result = evaluate_bpb(model_dir, held, train_data=train_data, context=o.context)
    if o.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"held-out: {result['held_out']}: {result['num_documents']} documents, {result['num_bytes']:,} bytes")
    print(f"  model      {result['model_bpb']:.4f} bits/byte")
    print(f"  gzip -9    {result['gzip9_bpb']:.4f} bits/byte")
    if "unigram_bpb" in result:
        print(f"  unigram    {result['unigram_bpb']:.4f} bits/byte")
    print(f"  model beats gzip -9: {'yes' if result['beats_gzip'] else 'no'}")
    return 0
