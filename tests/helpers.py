"""Test helpers shared across test modules (tests/ is on sys.path: pytest rootdir conftest)."""

import socket
import subprocess
import sys
import time


def cubelm(*args, timeout=180) -> subprocess.CompletedProcess:
    """``python -m cubelm ARGS`` in a subprocess: the real exit code and streams."""
    return subprocess.run([sys.executable, "-m", "cubelm", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base: str, proc: subprocess.Popen | None = None, timeout: float = 60.0) -> None:
    """Until ``base``/ready answers 200; a server process that exits first is an error with its stderr."""
    import httpx
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{proc.stderr.read() if proc.stderr else ''}")
        try:
            if httpx.get(f"{base}/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{base} was not ready within {timeout} s")


def cli_in_process(capsys, *args):
    """``cubelm ARGS`` in this process (the exit code and streams main() produces; no interpreter start-up)."""
    from types import SimpleNamespace

    from cubelm.cli import main
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out, stderr=err)


def assert_clean_error(r, *needles):
    """Exit code 2 and exactly one line, ``cubelm: error: ...``, that contains every needle; no traceback."""
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cubelm: error: "), r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def make_tiny_model_dir(root, corpus=None, vocab_size: int = 320):
    """A `tiny`-preset model directory with random weights and a tokenizer trained here (offline, ~2 s)."""
    from cubelm.data.tokenizer import TokenizerConfig, train_tokenizer
    corpus = corpus or ["def add(a, b):\n    return a + b\n", "class Point:\n    x: int = 0\n",
                        "héllo wörld ✓ 日本語"] * 40
    train_tokenizer(corpus, TokenizerConfig(vocab_size=vocab_size)).save(root / "tok")
    r = subprocess.run([sys.executable, "-m", "cubelm", "model", "init", "--preset", "tiny", "--out", str(root / "m"),
                        "--tokenizer", str(root / "tok")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return root / "m"
