"""Native CPU kernels, compiled on first use with the machine's C compiler and loaded with ``ctypes``.

Each kernel is one C file next to this module (it may ``#include`` another). ``load(name)`` compiles it once per
machine into ``$CUBELM_KERNEL_CACHE`` (default ``~/.cache/cubelm/kernels``) as ``<name>-<hash>.so`` with ``-O3
-march=native -fopenmp`` (the hash covers every kernel source, the flags and the CPU's feature flags, so a cache
shared between different machines never loads code built for another CPU), writing to a temporary file and renaming
it into place so that concurrent first uses are safe. When there is no compiler, or ``CUBELM_KERNELS=0``, ``load``
returns ``None`` and callers keep their pure-PyTorch path: kernels are an optimization, never a requirement.

Compiling and linking are two steps on purpose: ``-ffast-math`` on the link line makes gcc (before 13) add
``crtfastmath.o``, whose constructor sets flush-to-zero/denormals-are-zero for the *whole process* as soon as the
library loads: every later float operation in Python, NumPy and PyTorch would silently lose subnormals. So
``-ffast-math`` only reaches the compile step.

OpenMP: the library links ``libgomp.so.1``; loaded into a process that already has PyTorch's copy, the dynamic
linker resolves that soname to it, so kernels and ATen share one thread pool.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-std=c11"]  # compile step only
_LINK_FLAGS = ["-shared", "-fopenmp"]
_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}


def enabled() -> bool:
    return os.environ.get("CUBELM_KERNELS", "1") not in ("0", "false", "no")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def cache_dir() -> Path:
    return Path(os.environ.get("CUBELM_KERNEL_CACHE") or Path.home() / ".cache" / "cubelm" / "kernels")


def _compile(src: Path, out: Path) -> str | None:
    """Compile ``src`` to ``out`` atomically; returns an error message or None."""
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        return "no C compiler found (set CC, or install gcc)"
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.stem + ".", suffix=".tmp.so", dir=out.parent)
    os.close(fd)
    obj = tmp.removesuffix(".so") + ".o"
    try:
        for cmd in ([cc, *_FLAGS, "-c", str(src), "-o", obj], [cc, *_LINK_FLAGS, obj, "-o", tmp, "-lm"]):
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                return f"{cc} failed: {proc.stderr.strip()[-500:]}"
        os.replace(tmp, out)
        return None
    finally:
        for leftover in (tmp, obj):
            if os.path.exists(leftover):
                os.unlink(leftover)


def load(name: str) -> ctypes.CDLL | None:
    """The compiled library for ``<name>.c``, or None (no compiler, disabled, or the build failed)."""
    if not enabled():
        return None
    with _lock:
        if name in _loaded:
            return _loaded[name]
        src = Path(__file__).with_name(f"{name}.c")
        flags = " ".join(_FLAGS + _LINK_FLAGS).encode()
        # every kernel source, not only this one: a kernel may #include others (decode_step.c does)
        sources = b"".join(p.read_bytes() for p in sorted(src.parent.glob("*.c")))
        key = hashlib.sha256(src.read_bytes() + sources + flags + _cpu_flags().encode()).hexdigest()[:16]
        lib_path = cache_dir() / f"{name}-{key}.so"
        lib = None
        try:
            error = None if lib_path.exists() else _compile(src, lib_path)
        except OSError as exc:  # unwritable cache directory, compiler vanished mid-run, ...
            error = f"cannot build into {lib_path.parent}: {exc}"
        if error is None:
            try:
                lib = ctypes.CDLL(str(lib_path))
            except OSError as exc:
                error = str(exc)
        if error is not None:
            print(f"cubelm: kernel {name!r} unavailable, using the PyTorch path: {error}", file=sys.stderr)
        _loaded[name] = lib
        return lib


def function(name: str, symbol: str, argtypes: list, restype=ctypes.c_int):
    """``symbol`` of kernel ``name`` with its ctypes signature set, or None when the kernel is unavailable."""
    lib = load(name)
    if lib is None:
        return None
    fn = getattr(lib, symbol)
    fn.argtypes, fn.restype = argtypes, restype
    return fn
