"""Deep Compression (Han, Mao and Dally, 2016): magnitude pruning -> k-means weight sharing -> Huffman coding,
each stage written in one documented container format, and the decoder that rebuilds the dense weights.

    stages = deep_compress(state, DeepConfig(sparsity=0.5, bits=5), prune_names)   # stage -> tensor records
    write_container(stages["huffman"], "model.cdc", "huffman", settings={})
    dense = read_container("model.cdc")      # name -> fp32 tensor, zeros where pruned, codebook values elsewhere

``cubelm compress deep`` (``cubelm.compress.deep_commands``) runs it on a model directory.

Per 2-D weight (every projection, the embedding, an untied output head); 1-D tensors (norms) stay fp32:

1. **Prune**: the ``sparsity`` share of smallest-|w| weights of the tensor become 0 (exact count, ties by position).
   By default only the decoder projections are pruned (the embedding's rows are tokens), as ``cubelm.compress.
   prune`` does; ``prune="all"`` prunes every 2-D weight as the paper does.
2. **Share** (k-means): the nonzero weights of the tensor are clustered into ``2^bits`` centroids, initialized
   linearly over [min, max] (the paper's best init: it keeps the rare large weights, which matter), then Lloyd
   iterations on the nonzero weights; each weight is replaced by its centroid's index. The paper then fine-tunes
   the centroids with the summed gradients of their weights; that retraining is not done here.
3. **Huffman**: the centroid indices and the position stream are Huffman-coded (``cubelm.compress.huffman``), one
   code per stream per tensor.

Positions: relative, as in the paper: in row-major order, each nonzero stores the number of zeros since the
previous nonzero, in ``index_bits``-bit symbols; a gap too large for ``2^index_bits - 1`` uses the escape symbol
``E = 2^index_bits - 1`` = "skip E positions, no weight here" (the paper inserts a filler zero weight instead; the
escape needs no codebook entry). A tensor without zeros has ``layout: dense`` and no position stream.

Container (``.cdc``), little-endian::

    b"CUBELMDC" | uint32 header length | header (UTF-8 JSON) | payload

Header: ``{"format": "cubelm-deep-compression", "version": 1, "stage": "pruned" | "quantized" | "huffman",
"settings": {...}, "tensors": [...]}``; each tensor: ``name``, ``shape``, ``kind`` (``raw`` or the stage),
``layout`` (``dense`` | ``relative``), ``nnz``, ``num_gap_symbols``, ``bits``, ``index_bits`` and ``blobs``: name
-> [offset, nbytes] into the payload. Blobs by kind:

- ``raw``: ``data`` fp32 values.
- ``pruned``: ``values`` fp32 nonzeros; ``gaps`` the position symbols packed ``index_bits`` each, MSB first.
- ``quantized``: ``codebook`` 2^bits fp32; ``indices`` packed ``bits`` each; ``gaps`` as above.
- ``huffman``: ``codebook``; ``index_lengths`` (2^bits uint8 canonical code lengths) and ``indices`` (the bits);
  ``gap_lengths`` (2^index_bits uint8) and ``gaps``.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cubelm.compress import huffman
from cubelm.compress.prune import keep_largest
from cubelm.errors import CubelmError

MAGIC = b"CUBELMDC"
FORMAT = "cubelm-deep-compression"
STAGES = ("pruned", "quantized", "huffman")
PRUNE_SCOPES = ("projections", "all")


@dataclass(slots=True, kw_only=True)
class DeepConfig:
    sparsity: float = 0.5
    bits: int = 5
    index_bits: int = 5  # the paper's relative-index width for fully connected layers
    iterations: int = 10
    prune: str = "projections"

    def __post_init__(self) -> None:
        check_settings(self.sparsity, self.bits, self.index_bits, self.iterations, self.prune)


def check_settings(sparsity: float, bits: int, index_bits: int, iterations: int, prune: str) -> None:
    if not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise CubelmError(f"--sparsity must be in [0, 1) (the share of weights removed), got {sparsity!r}")
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise CubelmError(f"--bits must be 1..8 (a codebook of 2^bits shared values; the paper uses 4-8), "
                          f"got {bits!r}")
    if not isinstance(index_bits, int) or not 2 <= index_bits <= 8:
        raise CubelmError(f"--index-bits must be 2..8 (bits per relative position), got {index_bits!r}")
    if not isinstance(iterations, int) or iterations < 0:
        raise CubelmError(f"--iterations must be >= 0 Lloyd iterations, got {iterations!r}")
    if prune not in PRUNE_SCOPES:
        raise CubelmError(f"--prune must be one of {', '.join(PRUNE_SCOPES)}, got {prune!r}")


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True = kept: exactly ``round(sparsity · n)`` smallest-|w| entries dropped, ties broken by position (the
    pruning of ``cubelm compress prune --method magnitude``, one matrix at a time)."""
    return keep_largest(weight.detach().abs().float(), round(sparsity * weight.numel()))


def kmeans_1d(values: torch.Tensor, k: int, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on scalars: ``k`` centroids (fp32, sorted) initialized linearly over [min, max], and each
    value's centroid index (int64).

    In 1-D, with sorted centroids, each cluster is a contiguous run of the sorted values cut at the midpoints
    between centroids; so the values are sorted once, and an iteration is a binary search of the k - 1 midpoints
    and k differences of a prefix sum: O(k log n), not O(n)."""
    v = values.detach().double().flatten()
    if v.numel() == 0:
        return torch.zeros(k), torch.zeros(0, dtype=torch.long)
    sorted_v, order = v.sort()
    prefix = torch.cat([torch.zeros(1, dtype=torch.float64), sorted_v.cumsum(0)])
    centroids = torch.linspace(float(sorted_v[0]), float(sorted_v[-1]), k, dtype=torch.float64)
    for _ in range(iterations):
        edges = _edges(sorted_v, centroids)
        counts = edges[1:] - edges[:-1]
        sums = prefix[edges[1:]] - prefix[edges[:-1]]
        updated = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)  # an empty cluster keeps its value
        if torch.equal(updated, centroids):
            break
        centroids = updated.sort().values
    edges = _edges(sorted_v, centroids)
    idx = torch.empty_like(order)
    idx[order] = torch.repeat_interleave(torch.arange(k), edges[1:] - edges[:-1])
    return centroids.float(), idx


def _edges(sorted_v: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Cluster boundaries in the sorted values: cluster j is ``sorted_v[edges[j]:edges[j + 1]]`` (the nearest
    centroid; a value exactly at a midpoint goes to the lower one)."""
    cuts = torch.searchsorted(sorted_v, (centroids[1:] + centroids[:-1]) / 2, right=True)
    return torch.cat([torch.zeros(1, dtype=torch.long), cuts, torch.tensor([sorted_v.numel()])])


def gap_symbols(positions: np.ndarray, index_bits: int) -> np.ndarray:
    """Row-major positions of the nonzeros -> relative-position symbols with escapes (module docstring)."""
    escape = (1 << index_bits) - 1
    gaps = np.diff(np.concatenate([[-1], positions])) - 1  # zeros skipped before each nonzero
    reps = gaps // escape + 1  # escapes, then the remainder
    symbols = np.full(int(reps.sum()), escape, dtype=np.int64)
    symbols[np.cumsum(reps) - 1] = gaps % escape
    return symbols


def positions_from_gaps(symbols: np.ndarray, index_bits: int) -> np.ndarray:
    escape = (1 << index_bits) - 1
    step = np.where(symbols == escape, escape, symbols + 1)
    return (np.cumsum(step) - 1)[symbols != escape]


def pack_bits(values: np.ndarray, width: int) -> bytes:
    """Unsigned ints of ``width`` bits each, MSB first, zero-padded to a byte."""
    shifts = np.arange(width - 1, -1, -1, dtype=np.int64)
    return np.packbits(((np.asarray(values, dtype=np.int64)[:, None] >> shifts) & 1).astype(np.uint8)).tobytes()


def unpack_bits(data: bytes, width: int, count: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    if len(bits) < count * width:
        raise CubelmError(f"packed stream too short: {len(bits)} bits for {count} values of {width} bits")
    return bits[:count * width].reshape(count, width).astype(np.int64) @ (1 << np.arange(width - 1, -1, -1))


def _f32(t) -> bytes:
    return np.ascontiguousarray(np.asarray(t, dtype="<f4")).tobytes()


def compress_tensor(weight: torch.Tensor, cfg: DeepConfig, prune: bool) -> dict[str, dict]:
    """The three stage records of one 2-D weight (``{"pruned": rec, "quantized": rec, "huffman": rec}``), each a
    header entry with its blobs as bytes (``write_container`` lays them out)."""
    w = weight.detach().float().cpu()
    mask = magnitude_mask(w, cfg.sparsity) if prune and cfg.sparsity > 0 else torch.ones_like(w, dtype=torch.bool)
    flat_mask = mask.flatten().numpy()
    positions = np.flatnonzero(flat_mask)
    values = w.flatten()[torch.from_numpy(positions)]
    dense = len(positions) == w.numel()
    gaps = None if dense else gap_symbols(positions, cfg.index_bits)
    k = 1 << cfg.bits
    codebook, idx = kmeans_1d(values, k, cfg.iterations)
    base = {"shape": list(w.shape), "layout": "dense" if dense else "relative", "nnz": int(len(positions)),
            "num_gap_symbols": 0 if dense else int(len(gaps)), "bits": cfg.bits, "index_bits": cfg.index_bits}
    gap_blob = {} if dense else {"gaps": pack_bits(gaps, cfg.index_bits)}
    idx_np = idx.numpy()
    records = {"pruned": base | {"kind": "pruned", "blobs": {"values": _f32(values)} | gap_blob},
               "quantized": base | {"kind": "quantized", "blobs": {"codebook": _f32(codebook),
                                                                    "indices": pack_bits(idx_np, cfg.bits)} | gap_blob}}
    idx_len = huffman.code_lengths(np.bincount(idx_np, minlength=k))
    blobs = {"codebook": _f32(codebook), "index_lengths": idx_len.tobytes(),
             "indices": huffman.encode(idx_np, idx_len)}
    if not dense:
        gap_len = huffman.code_lengths(np.bincount(gaps, minlength=1 << cfg.index_bits))
        blobs |= {"gap_lengths": gap_len.tobytes(), "gaps": huffman.encode(gaps, gap_len)}
    records["huffman"] = base | {"kind": "huffman", "blobs": blobs}
    return records


def deep_compress(state: dict[str, torch.Tensor], cfg: DeepConfig, prune_names: set[str]) -> dict[str, list[dict]]:
    """Stage -> tensor records for every tensor of ``state``: 2-D weights compressed (pruned if their name is in
    ``prune_names``, or always with ``prune="all"``), the rest raw fp32."""
    stages: dict[str, list[dict]] = {s: [] for s in STAGES}
    for name, t in state.items():
        if t.dim() != 2:
            raw = {"name": name, "shape": list(t.shape), "kind": "raw", "blobs": {"data": _f32(t.detach().float())}}
            for s in STAGES:
                stages[s].append(raw)
            continue
        records = compress_tensor(t, cfg, prune=cfg.prune == "all" or name in prune_names)
        for s in STAGES:
            stages[s].append({"name": name} | records[s])
    return stages


def write_container(records: list[dict], path: str | Path, stage: str, settings: dict) -> int:
    """Write one stage's records (module docstring); returns the file's size in bytes."""
    payload, entries, offset = [], [], 0
    for rec in records:
        blobs = {}
        for key, blob in rec["blobs"].items():
            blobs[key] = [offset, len(blob)]
            payload.append(blob)
            offset += len(blob)
        entries.append({k: v for k, v in rec.items() if k != "blobs"} | {"blobs": blobs})
    header = json.dumps({"format": FORMAT, "version": 1, "stage": stage, "settings": settings,
                         "tensors": entries}, separators=(",", ":")).encode()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(MAGIC + struct.pack("<I", len(header)) + header)
        for blob in payload:
            f.write(blob)
    return path.stat().st_size


def read_container(path: str | Path) -> dict[str, torch.Tensor]:
    """Decode any stage's file to dense fp32 tensors by name."""
    raw = Path(path).read_bytes()
    if raw[:8] != MAGIC or len(raw) < 12:
        raise CubelmError(f"{path} is not a cubelm Deep Compression file (magic {raw[:8]!r})")
    (size,) = struct.unpack("<I", raw[8:12])
    try:
        header = json.loads(raw[12:12 + size])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CubelmError(f"{path}: unreadable header ({e})") from None
    if header.get("format") != FORMAT or header.get("version") != 1:
        raise CubelmError(f"{path}: format {header.get('format')!r} v{header.get('version')} is not "
                          f"{FORMAT} v1")
    payload = memoryview(raw)[12 + size:]
    return {t["name"]: decode_tensor(t, payload) for t in header["tensors"]}


def decode_tensor(entry: dict, payload) -> torch.Tensor:
    def blob(key):
        offset, n = entry["blobs"][key]
        if offset + n > len(payload):
            raise CubelmError(f"{entry['name']}: blob {key} lies past the end of the file (truncated?)")
        return bytes(payload[offset:offset + n])

    shape, kind = entry["shape"], entry["kind"]
    numel = int(np.prod(shape)) if shape else 1
    if kind == "raw":
        return torch.from_numpy(np.frombuffer(blob("data"), dtype="<f4").copy()).view(shape)
    nnz, bits, index_bits = entry["nnz"], entry["bits"], entry["index_bits"]
    if kind == "pruned":
        values = np.frombuffer(blob("values"), dtype="<f4")
    elif kind in ("quantized", "huffman"):
        codebook = np.frombuffer(blob("codebook"), dtype="<f4")
        idx = (unpack_bits(blob("indices"), bits, nnz) if kind == "quantized"
               else huffman.decode(blob("indices"), np.frombuffer(blob("index_lengths"), np.uint8), nnz))
        values = codebook[idx]
    else:
        raise CubelmError(f"{entry['name']}: unknown tensor kind {kind!r}")
    if entry["layout"] == "dense":
        positions = np.arange(numel)
    else:
        count = entry["num_gap_symbols"]
        symbols = (huffman.decode(blob("gaps"), np.frombuffer(blob("gap_lengths"), np.uint8), count)
                   if kind == "huffman" else unpack_bits(blob("gaps"), index_bits, count))
        positions = positions_from_gaps(symbols, index_bits)
    if len(positions) != nnz or len(values) != nnz or (nnz and positions[-1] >= numel):
        raise CubelmError(f"{entry['name']}: {len(positions)} positions / {len(values)} values for {nnz} nonzeros "
                          f"of {numel} (corrupt file)")
    out = np.zeros(numel, dtype=np.float32)
    out[positions] = values
    return torch.from_numpy(out).view(shape)
