"""FlashAttention: peak memory and time of naive vs tiled (cubelm) vs PyTorch SDPA attention as N grows.

    python benchmarks/flash_attention.py                       # N = 512 ... 8192, 2 heads, D = 64, fp32, causal
    python benchmarks/flash_attention.py --sizes 512 1024 --rounds 3 --heads 1

Memory: each (implementation, N) runs once in a fresh subprocess, so its peak resident memory belongs to that
case alone. The child builds seeded q, k, v of shape (1, H, N, D), warms the implementation up on a tiny input
(so library start-up buffers are not counted), reads VmRSS, resets the kernel's high-water mark (``clear_refs``),
runs the case once and reports ``VmHWM - VmRSS before``: what the OS saw, including buffers inside fused kernels
(falls back to ``ru_maxrss`` where ``clear_refs`` is not writable). It then reruns the case under a
TorchDispatchMode that records the largest tensor any op returned: deterministic, but blind to a fused kernel's
internal buffers, so it is shown for naive and tiled only.

Time: in this process, the three implementations run interleaved (naive, tiled, SDPA, naive, tiled, SDPA, ...)
for ``--rounds`` rounds because the machine is shared and noisy; each round times one call (several for small N)
and the table shows medians over rounds. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from cubelm.engine.flash_attention import flash_attention, naive_attention

IMPLS: dict[str, Callable[..., torch.Tensor]] = {
    "naive": lambda q, k, v: naive_attention(q, k, v, causal=True),
    "tiled": lambda q, k, v: flash_attention(q, k, v, causal=True, block_q=64, block_k=64),
    "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
}


class LargestTensor(TorchDispatchMode):
    """Records the byte size of the largest tensor any op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.num_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() * t.element_size() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.num_bytes = max([self.num_bytes, *sizes])
        return out


def make_qkv(num_tokens: int, heads: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, heads, num_tokens, head_dim, generator=gen) for _ in range(3))


def proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_memory(impl: str, num_tokens: int, heads: int, head_dim: int) -> dict:
    """Child process: peak extra RSS of one call, then the largest tensor it allocates."""
    fn = IMPLS[impl]
    fn(*make_qkv(128, heads, head_dim))  # warm-up: kernels, thread pool, allocator arenas
    q, k, v = make_qkv(num_tokens, heads, head_dim)
    # NOTE: reset the high-water mark right before the call: torch's import can leave it above the current RSS
    # (and the OS may drop file-backed library pages under memory pressure), which would inflate a plain
    # ru_maxrss - RSS difference. Without clear_refs we fall back to ru_maxrss (KiB on Linux).
    rss_before = proc_status_kib("VmRSS")
    has_reset = reset_peak_rss()
    fn(q, k, v)
    peak = proc_status_kib("VmHWM") if has_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with LargestTensor() as largest:
        fn(q, k, v)
    return {"peak_mib": max(peak - rss_before, 0) / 1024, "largest_mib": largest.num_bytes / 2**20}


def memory_in_subprocess(impl: str, num_tokens: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--memory-child", impl, "--sizes", str(num_tokens),
           "--heads", str(args.heads), "--head-dim", str(args.head_dim)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def time_interleaved(num_tokens: int, args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    """(median, min) milliseconds per call for each implementation, rounds interleaved A B C A B C ..."""
    q, k, v = make_qkv(num_tokens, args.heads, args.head_dim)
    for fn in IMPLS.values():
        fn(q, k, v)  # warm-up
    samples: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    for _ in range(args.rounds):
        for impl, fn in IMPLS.items():
            calls, start = 0, time.perf_counter()
            while calls == 0 or (time.perf_counter() - start < 0.05 and calls < 20):  # small N: several calls
                fn(q, k, v)
                calls += 1
            samples[impl].append(1e3 * (time.perf_counter() - start) / calls)
    return {impl: (statistics.median(ms), min(ms)) for impl, ms in samples.items()}


def table_row(num_tokens: int, heads: int, memory: dict[str, dict],
              timings: dict[str, tuple[float, float]]) -> str:
    scores_mib = heads * num_tokens * num_tokens * 4 / 2**20  # fp32 (1, H, N, N)
    peak = " | ".join(f"{memory[impl]['peak_mib']:.1f}" for impl in IMPLS)
    times = " | ".join(f"{timings[impl][0]:.1f} ({timings[impl][1]:.1f})" for impl in IMPLS)
    ms = {impl: median for impl, (median, _) in timings.items()}
    return (f"| {num_tokens} | {scores_mib:.0f} | {peak} | {memory['naive']['largest_mib']:.2f} / "
            f"{memory['tiled']['largest_mib']:.2f} | {times} | {ms['tiled'] / ms['sdpa']:.1f}x "
            f"| {ms['naive'] / ms['tiled']:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192],
                        help="sequence lengths N (Tq = Tk = N)")
    parser.add_argument("--heads", type=int, default=2, help="attention heads (batch is 1)")
    parser.add_argument("--head-dim", type=int, default=64, help="head dimension D")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds per N")
    parser.add_argument("--memory-child", choices=list(IMPLS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        print(json.dumps(measure_memory(args.memory_child, args.sizes[0], args.heads, args.head_dim)))
        return
    start = time.perf_counter()
    print(f"causal fp32 attention, batch 1, {args.heads} heads, D={args.head_dim}, tiles 64x64, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, time = median of {args.rounds} "
          f"interleaved rounds (min in parentheses)\n")
    print("| N | score matrix MiB | peak MiB naive | peak MiB tiled | peak MiB SDPA "
          "| largest tensor MiB naive / tiled | ms naive | ms tiled | ms SDPA | tiled ÷ SDPA time "
          "| naive ÷ tiled time |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for num_tokens in args.sizes:
        memory = {impl: memory_in_subprocess(impl, num_tokens, args) for impl in IMPLS}
        print(table_row(num_tokens, args.heads, memory, time_interleaved(num_tokens, args)), flush=True)
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
