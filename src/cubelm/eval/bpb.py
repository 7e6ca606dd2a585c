"""Bits per byte (BPB) of a model on held-out text, and the baselines a reader needs to judge it.

BPB = total negative log-likelihood in bits / UTF-8 bytes of the text (the tokenizer covers every byte, so this
is a tokenizer-independent compression rate, §3.1.1). Baselines on the same bytes: ``gzip -9`` (each document
compressed on its own, as the model sees each on its own) and a unigram token model estimated on the training
shard (the entropy floor of a model that ignores context).
"""

from __future__ import annotations

import gzip
import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cubelm.errors import CubelmError


def bits_per_byte(loss_sum_nats: float, num_bytes: int) -> float:
    """The one BPB definition (training's validation, ``cubelm eval bpb``): summed NLL in nats -> bits / bytes."""
    return loss_sum_nats / math.log(2) / max(1, num_bytes)


@dataclass(slots=True)
class HeldOut:
    name: str
    texts: list[str]

    @property
    def num_bytes(self) -> int:
        return sum(len(t.encode("utf-8")) for t in self.texts)


def held_out_package(package: str, max_bytes: int = 200_000) -> HeldOut:
    """The .py sources of an installed third-party package (not in the stdlib training corpus), in sorted order."""
    import importlib.util
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CubelmError(f"package {package!r} is not installed as a package directory; pick another "
                          f"(e.g. tqdm) or pass a path")
    root = Path(next(iter(spec.submodule_search_locations)))
    if str(root).startswith(sysconfig.get_paths()["stdlib"]) and "site-packages" not in str(root):
        raise CubelmError(f"{package} is part of the standard library, which the default model trained on")
    return _collect(f"{package} ({root})", sorted(root.rglob("*.py")), max_bytes)


def held_out_path(path: str, max_bytes: int = 200_000) -> HeldOut:
    p = Path(path)
    if not p.exists():
        raise CubelmError(f"{path} does not exist; pass a file, a directory or package:NAME")
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in (".py", ".txt",
                                                                                                   ".md"))
    return _collect(str(p), files, max_bytes)


def _collect(name: str, files: list[Path], max_bytes: int) -> HeldOut:
    texts, total = [], 0
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        texts.append(text)
        total += len(text.encode("utf-8"))
        if total >= max_bytes:
            break
    if not texts:
        raise CubelmError(f"no readable text files in {name}")
    return HeldOut(name, texts)


def gzip_bpb(texts: list[str]) -> float:
    raw = [t.encode("utf-8") for t in texts]
    return sum(len(gzip.compress(b, compresslevel=9)) for b in raw) * 8 / sum(len(b) for b in raw)


def unigram_bpb(texts: list[str], tokenizer, train_tokens: np.ndarray) -> float:
    """Cross-entropy of add-one-smoothed unigram token frequencies from the training data."""
    counts = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=tokenizer.vocab_size) + 1.0
    logp = np.log(counts / counts.sum())
    nats = sum(-logp[np.asarray(tokenizer.encode(t), dtype=np.int64)].sum() for t in texts)
    return bits_per_byte(float(nats), sum(len(t.encode("utf-8")) for t in texts))


@torch.no_grad()
def model_bpb(model, tokenizer, texts: list[str], *, context: int = 256, batch_size: int = 8) -> float:
    """Each document scored on its own, preceded by EOS (the separator it followed in training), in
    non-overlapping windows of ``context`` tokens that each see the previous window's last token."""
    device = next(model.parameters()).device
    if tokenizer.eos_token_id is None:
        raise CubelmError("bits per byte scores each document after the EOS that separated documents in training, "
                          "but this tokenizer has no EOS token (eos_token in tokenizer_config.json)")
    windows = []
    for text in texts:
        ids = [tokenizer.eos_token_id] + tokenizer.encode(text)
        for start in range(0, len(ids) - 1, context):
            windows.append(ids[start:start + context + 1])
    nats = 0.0
    model.eval()
    for i in range(0, len(windows), batch_size):
        chunk = windows[i:i + batch_size]
        width = max(len(w) for w in chunk)
        x = torch.full((len(chunk), width - 1), tokenizer.eos_token_id, dtype=torch.long)
        y = torch.full((len(chunk), width - 1), -100, dtype=torch.long)
        for j, w in enumerate(chunk):
            x[j, :len(w) - 1] = torch.tensor(w[:-1])
            y[j, :len(w) - 1] = torch.tensor(w[1:])
        logits = model(x.to(device)).float()
        nats += float(F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten(), ignore_index=-100,
                                      reduction="sum"))
    return bits_per_byte(nats, sum(len(t.encode("utf-8")) for t in texts))


def evaluate_bpb(model_dir: str | Path, held_out: HeldOut, *, train_data: str | Path | None = None,
                 context: int = 256) -> dict:
    from cubelm.data.tokenizer import load_tokenizer
    from cubelm.model.hf_io import load_model
    model = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir)
    result = {"held_out": held_out.name, "num_documents": len(held_out.texts), "num_bytes": held_out.num_bytes,
              "model_bpb": model_bpb(model, tokenizer, held_out.texts, context=context),
              "gzip9_bpb": gzip_bpb(held_out.texts)}
    if train_data is not None:
        from cubelm.data.packed import PackedData
        result["unigram_bpb"] = unigram_bpb(held_out.texts, tokenizer, PackedData(train_data).train)
    result["beats_gzip"] = result["model_bpb"] < result["gzip9_bpb"]
    return result
