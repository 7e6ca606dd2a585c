"""W8A8 emulation speed: the exact int8 matmul paths and a W8A8 layer against the float layer, same run, interleaved.

    python benchmarks/w8a8_matmul.py --rows 256 --k 688 --n 256 --rounds 5

Peers, each timed for the same (rows, K) x (K, N) product, in rounds A B C D A B C D ...:

- ``fp32``: the float matmul of fp32 operands (what the float model does);
- ``int8 fp32-chunks``: ``cubelm.compress.w8a8.int8_matmul`` default, the int8 codes as float32 in chunks of at
  most 1,024 inputs (exact, module docstring);
- ``int8 _int_mm``: ``torch._int_mm`` (int8 x int8 -> int32), when the build has it;
- ``W8A8Linear``: the whole layer (per-token quantization of the activations + the exact matmul + rescale).

Medians and ratios to ``fp32``; the host's ISA is printed because it decides what the float and integer paths
cost. The emulation exists for accuracy, not speed: this says by how much it is slower.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _time(fn, reps: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    from cubelm.compress.w8a8 import W8A8Linear, int8_matmul, int_mm_available
    from cubelm.systems.host import describe_host, host_info
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=256, help="activation rows (tokens)")
    ap.add_argument("--k", type=int, default=688, help="inputs")
    ap.add_argument("--n", type=int, default=256, help="outputs")
    ap.add_argument("--reps", type=int, default=5, help="calls per timing")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.rows, a.k, generator=g)
    w = torch.randn(a.n, a.k, generator=g) * 0.02
    qa = torch.randint(-127, 128, (a.rows, a.k), dtype=torch.int8, generator=g)
    qb = torch.randint(-127, 128, (a.k, a.n), dtype=torch.int8, generator=g)
    layer = W8A8Linear(w)
    wt = w.t().contiguous()
    peers = {"fp32": lambda: x @ wt, "int8 fp32-chunks": lambda: int8_matmul(qa, qb),
             "W8A8Linear": lambda: layer(x)}
    if int_mm_available():
        peers["int8 _int_mm"] = lambda: int8_matmul(qa, qb, use_int_mm=True)
        assert torch.equal(int8_matmul(qa, qb, use_int_mm=True), int8_matmul(qa, qb))
    times: dict[str, list[float]] = {k: [] for k in peers}
    for _ in range(a.rounds):
        for name, fn in peers.items():
            times[name].append(_time(fn, a.reps))
    print(f"host: {describe_host(host_info())}")
    print(f"({a.rows} x {a.k}) @ ({a.k} x {a.n}), {a.rounds} interleaved rounds of {a.reps} calls, medians")
    base = statistics.median(times["fp32"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:18} {med * 1e3:9.3f} ms  {med / base:7.2f}x fp32")


if __name__ == "__main__":
    main()
