"""Batch-1 decode through the engine's three CPU paths, interleaved in one run (issue 12, item 1).

    python benchmarks/decode_paths.py --models small,base --rounds 5

* eager: the model's own modules (``decode_layout=False``): ~1,000 ATen ops per step on ``small``;
* fused layers: the decode layout + ``FusedDecoderLayer`` (elementwise work in ``kernels/decode_ops.c``), one
  Python module call per projection (``native_step=False``);
* native step: every layer of a decode step in one native call (``kernels/decode_step.c``), the default.

Each round runs the three on fresh seeded random weights, in rotating order, with the same prompt; the greedy tokens
must agree. Prints the host, the medians, and the ratios against the eager path and against the memory-bandwidth
bound measured in the same run (``cubelm bench decode`` figures, reused).
"""

from __future__ import annotations

import argparse
import statistics
import sys

from cubelm.engine.bench import BenchDecodeOptions, _load, bytes_per_step, measure_round
from cubelm.systems.host import describe_host, host_info, read_bandwidth

PATHS = {"eager": dict(decode_layout=False), "fused layers": dict(native_step=False), "native step": {}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="small,base", help="presets, comma-separated")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()
    print(f"host: {describe_host(host_info())}")
    for name in args.models.split(","):
        o = BenchDecodeOptions(model=name, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens)
        steps = {p: [] for p in PATHS}
        tokens, bandwidths, step_bytes = {}, [], 0.0
        for r in range(args.rounds):
            bandwidths.append(read_bandwidth())
            order = list(PATHS)[r % len(PATHS):] + list(PATHS)[:r % len(PATHS)]
            for path in order:
                model = _load(o)
                step_bytes = step_bytes or bytes_per_step(model, o.prompt_tokens + o.new_tokens / 2, 1)
                res = measure_round(model, o, **PATHS[path])
                steps[path].append(res["step_ms"])
                tokens.setdefault(path, res["token_ids"])
        bound = 1e3 * step_bytes / statistics.median(bandwidths)
        eager = statistics.median(steps["eager"])
        print(f"\n{name}: batch 1, {o.prompt_tokens} + {o.new_tokens} tokens, {args.rounds} interleaved rounds; "
              f"read bandwidth {statistics.median(bandwidths) / 1e9:.1f} GB/s -> bound {bound:.2f} ms/step")
        print(f"  {'path':<14}{'ms/step':>9}{'tok/s':>9}{'vs eager':>10}{'of bound':>10}")
        for path, values in steps.items():
            ms = statistics.median(values)
            print(f"  {path:<14}{ms:9.2f}{1e3 / ms:9.1f}{eager / ms:9.2f}x{bound / ms:10.0%}")
        agree = all(t == tokens["eager"] for t in tokens.values())
        print(f"  greedy tokens agree across paths: {agree}")
        if not agree:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
