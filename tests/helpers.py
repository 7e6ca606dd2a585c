"""Test helpers shared across test modules (tests/ is on sys.path: pytest rootdir conftest)."""


def make_tiny_model_dir(root, corpus=None, vocab_size: int = 320):
    """A `tiny`-preset model directory with random weights and a tokenizer trained here (offline, ~2 s)."""
    import subprocess
    import sys

    from cubelm.data.tokenizer import TokenizerConfig, train_tokenizer
    corpus = corpus or ["def add(a, b):\n    return a + b\n", "class Point:\n    x: int = 0\n",
                        "héllo wörld ✓ 日本語"] * 40
    train_tokenizer(corpus, TokenizerConfig(vocab_size=vocab_size)).save(root / "tok")
    r = subprocess.run([sys.executable, "-m", "cubelm", "model", "init", "--preset", "tiny", "--out", str(root / "m"),
                        "--tokenizer", str(root / "tok")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return root / "m"
