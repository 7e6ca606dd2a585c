"""The packed token format the trainer reads, and its validating reader ``PackedData``.

A packed directory (written by ``cubelm data prepare``) holds:

- ``train.bin`` / ``val.bin``: flat little-endian arrays of token ids (``uint16`` when the vocabulary has at
  most 65,536 entries, else ``uint32``); documents are concatenated, each one followed by the EOS id, no BOS;
- ``train.mask.bin`` / ``val.mask.bin`` (instruct data only): one ``uint8`` per token, 1 where the token counts
  in the loss, 0 for prompt tokens;
- ``meta.json``: dtype, vocab size, token and document counts per split, special-token ids, tokenizer and source
  hashes, and the statistics of the run; ``tokenizer/`` (the tokenizer the ids belong to);
- ``report.json`` / ``report.txt`` (the cleaning report) and ``documents.jsonl`` (the cleaned documents).

The split is by document (a hash of its content), so no validation document appears in training. Check a
directory: ``cubelm data info --dir DIR``; from Python: ``PackedData(DIR).train[:100]``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cubelm.errors import CubelmError

FORMAT = "cubelm-packed-v1"
SPLITS = ("train", "val")
REQUIRED_META = ("format", "dtype", "vocab_size", "num_tokens", "num_documents", "bos_token_id", "eos_token_id",
                 "pad_token_id", "tokenizer_sha256", "source_sha256")


def token_dtype(vocab_size: int) -> np.dtype:
    # uint16 halves the disk and page-cache footprint of every corpus with a vocabulary up to 65,536.
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def shard_path(directory: Path, split: str, mask: bool = False) -> Path:
    return directory / (f"{split}.mask.bin" if mask else f"{split}.bin")


def write_meta(directory: Path, meta: dict) -> None:
    # Written last and atomically (temp file + rename): a directory with meta.json is a complete one.
    tmp = directory / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    tmp.replace(directory / "meta.json")


class PackedData:
    """Read-only memmaps of a packed directory: ``train``, ``val``, ``train_mask``/``val_mask`` (or None),
    ``meta``. Raises ``CubelmError`` if meta.json is missing or a shard does not match it."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.meta = self._read_meta()
        self.dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        self.train = self._open("train", mask=False)
        self.val = self._open("val", mask=False)
        self.has_mask = bool(self.meta.get("has_mask"))
        self.train_mask = self._open("train", mask=True) if self.has_mask else None
        self.val_mask = self._open("val", mask=True) if self.has_mask else None

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def eos_token_id(self) -> int:
        return int(self.meta["eos_token_id"])

    @property
    def tokenizer_dir(self) -> Path:
        return self.dir / "tokenizer"

    def load_tokenizer(self):
        from cubelm.data.tokenizer import load_tokenizer

        return load_tokenizer(self.tokenizer_dir)

    def _read_meta(self) -> dict:
        path = self.dir / "meta.json"
        if not path.is_file():
            raise CubelmError(f"no meta.json in {self.dir}; prepare the data first with "
                              f"'cubelm data prepare --out {self.dir}'")
        try:
            meta = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CubelmError(f"{path} is corrupt; re-run 'cubelm data prepare --out {self.dir}'") from None
        missing = [k for k in REQUIRED_META if k not in meta]
        if missing or meta.get("format") != FORMAT or meta["dtype"] not in ("uint16", "uint32"):
            raise CubelmError(f"{path} is not a {FORMAT} file (missing {', '.join(missing) or 'nothing'}, "
                              f"format {meta.get('format')!r}); re-run 'cubelm data prepare --out {self.dir}'")
        return meta

    def _open(self, split: str, *, mask: bool) -> np.ndarray:
        path = shard_path(self.dir, split, mask)
        dtype = np.dtype(np.uint8) if mask else self.dtype
        expected = int(self.meta["num_tokens"][split])
        fix = f"re-run 'cubelm data prepare --out {self.dir}'"
        if not path.is_file():
            raise CubelmError(f"shard {path} is missing; {fix}")
        size = path.stat().st_size
        if size % dtype.itemsize:
            raise CubelmError(f"shard {path} is corrupt: {size} bytes is not a multiple of {dtype.itemsize} "
                              f"({self.meta['dtype'] if not mask else 'uint8'}); {fix}")
        if size // dtype.itemsize != expected:
            raise CubelmError(f"shard {path} is truncated or corrupt: {size // dtype.itemsize} tokens, "
                              f"meta.json says {expected}; {fix}")
        if expected == 0:  # mmap cannot map an empty file
            return np.zeros(0, dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r")

    def summary(self) -> str:
        m = self.meta
        mask = " with loss masks" if self.has_mask else ""
        return (f"{self.dir}: {m['num_tokens']['train']:,} train / {m['num_tokens']['val']:,} val tokens "
                f"({m['num_documents']['train']:,} / {m['num_documents']['val']:,} documents){mask}, "
                f"{m['dtype']}, vocab {m['vocab_size']:,}, tokenizer sha256 {m['tokenizer_sha256'][:12]}…, "
                f"source sha256 {m['source_sha256'][:12]}…")
