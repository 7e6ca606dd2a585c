"""The engine's weight layout: 128-column blocks (the layout before) vs blocks one strip wide (the one the engine
uses when the kernels are built), through the same native GEMMs, on a preset's four decoder shapes.

    python benchmarks/gemm_layout.py --preset base --rows 1,2,4,8,16,36,64 --rounds 7

For each row count the script multiplies ``--layers`` distinct layers' weights (so they come from DRAM, as in a
decode step) in both layouts, alternating old / new each round, and prints median GFLOP/s and new / old. Up to 8
rows run ``skinny_gemm.c``, more ``blocked_gemm.c``, as ``BlockedLinear`` does. The two layouts give equal
numbers bit for bit (tests/test_decode_layout.py); this measures only their speed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cubelm.engine.kernels import skinny_gemm
from cubelm.model.config import ModelConfig, preset
from cubelm.systems.host import describe_host, host_info


def blocks(w: torch.Tensor, width: int) -> torch.Tensor:
    """(N, K) weight -> (P, K, width) tile-major blocks, as BlockedLinear stores them."""
    n, k = w.shape
    return w.T.contiguous().view(k, n // width, width).permute(1, 0, 2).contiguous()


def shapes(cfg: ModelConfig) -> list[tuple[int, int]]:
    """(out, in) of a decoder layer's fused q/k/v, o_proj, fused gate/up, down_proj."""
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    h, i = cfg.hidden_size, cfg.intermediate_size
    return [(q + 2 * kv, h), (h, q), (2 * i, h), (h, i)]


def gflops(weights: list[torch.Tensor], rows: int) -> float:
    gemm = skinny_gemm.skinny_gemm if rows <= skinny_gemm.MAX_ROWS else skinny_gemm.blocked_gemm
    xs = {b.shape[1]: torch.randn(rows, b.shape[1]) for b in weights}
    flop = 0
    t0 = time.perf_counter()
    for b in weights:
        gemm(xs[b.shape[1]], b)
        flop += 2 * rows * b.shape[0] * b.shape[1] * b.shape[2]
    return flop / (time.perf_counter() - t0) / 1e9


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="base", help="model preset whose decoder shapes are measured")
    ap.add_argument("--rows", default="1,2,4,8,16,36,64", help="comma-separated row counts (decode batch sizes)")
    ap.add_argument("--layers", type=int, default=12, help="distinct layers' weights (enough to exceed the caches)")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved old/new measurements per row count")
    a = ap.parse_args(argv)
    strip = skinny_gemm.strip_width()
    if strip is None:
        raise SystemExit("gemm_layout: the native kernels are not built here (no C compiler, or CUBELM_KERNELS=0)")
    print(f"host: {describe_host(host_info())}; strip width {strip} columns", flush=True)
    cfg = preset(a.preset)
    torch.manual_seed(0)
    old, new = [], []
    for _ in range(a.layers):
        for n, k in shapes(cfg):
            w = torch.randn(n, k)
            old.append(blocks(w, 128 if n % 128 == 0 else 64))
            new.append(blocks(w, strip))
    print("| rows | 128-column blocks GFLOP/s | one-strip blocks GFLOP/s | new / old |\n|---|---|---|---|")
    for rows in (int(r) for r in a.rows.split(",")):
        o, n = [], []
        gflops(old, rows), gflops(new, rows)  # warm-up: the first call builds or loads the kernels
        for _ in range(a.rounds):
            o.append(gflops(old, rows))
            n.append(gflops(new, rows))
        mo, mn = statistics.median(o), statistics.median(n)
        print(f"| {rows} | {mo:.1f} | {mn:.1f} | {mn / mo:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
