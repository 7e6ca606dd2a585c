"""What this machine is, measured at run time: the CPU's vector ISA as torch and ``/proc/cpuinfo`` report it, and
the memory read bandwidth a large reduction reaches. Benchmarks print both next to their results, because the
hosts differ between runs (AVX2-only vs AVX-512 with bf16/VNNI) and decode speed is bounded by bandwidth."""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16")


def cpu_flags() -> set[str]:
    try:
        line = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
    except (OSError, StopIteration):
        return set()
    return set(line.split(":", 1)[1].split())


def host_info() -> dict:
    import torch
    flags = cpu_flags()
    return {"machine": platform.machine(), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "isa_flags": [f for f in ISA_FLAGS if f in flags], "threads": torch.get_num_threads()}


def describe_host(info: dict) -> str:
    return (f"{info['machine']}, torch {info['torch']} (CPU capability {info['cpu_capability']}), flags: "
            f"{' '.join(info['isa_flags']) or 'unknown'}, {info['threads']} threads")


def read_bandwidth(gib: float = 1.0, reps: int = 5) -> float:
    """Bytes/s of a sum over a ``gib`` GiB fp32 tensor (median of ``reps``): the read rate decode steps compete for."""
    import torch
    x = torch.ones(int(gib * 2**30) // 4)
    x.sum()  # touch the pages
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return x.numel() * 4 / statistics.median(times)
