"""Canonical, length-limited Huffman coding of integer symbol streams (Deep Compression's last stage).

    lengths = code_lengths(np.bincount(symbols, minlength=alphabet))
    data = encode(symbols, lengths)                   # bytes, MSB-first, the last byte zero-padded
    assert (decode(data, lengths, len(symbols)) == symbols).all()

Canonical: the code is determined by the code lengths alone (symbols sorted by (length, value) get consecutive
codes, each length step shifting left), so a stream is stored as one length byte per alphabet symbol plus the
bits; no tree. Length-limited to ``MAX_CODE_LENGTH`` bits so the decoder's lookup table (indexed by the next
``max length`` bits) stays small: if the optimal code is deeper, the counts are halved (rounding up, never to 0)
and the code rebuilt, as zlib's builders do; the result is still a prefix code, slightly longer than optimal
only for streams with extremely skewed counts.

Edge cases: an empty stream is zero bytes and all-zero lengths; a stream of one distinct symbol gets the one-bit
code ``0`` (a Huffman tree needs two leaves; one bit per symbol keeps the decoder uniform).

The encoder is vectorized (numpy, in chunks); the decoder looks up the symbol and its length for the
``max length``-bit window at every bit position (vectorized, in chunks), then follows the chain of code
boundaries in a Python loop over the symbols (~0.2-0.5 µs each).
"""

from __future__ import annotations

import heapq

import numpy as np

from cubelm.errors import CubelmError

MAX_CODE_LENGTH = 20  # lookup table of 2^20 entries at most; windows are read from 32-bit words (<= 24 bits)
_CHUNK = 1 << 20  # symbols (encode) / bit positions (decode) per vectorized chunk


def code_lengths(counts: np.ndarray, max_length: int = MAX_CODE_LENGTH) -> np.ndarray:
    """Huffman code length (uint8) of each symbol from its count; 0 for symbols that never occur."""
    counts = np.asarray(counts, dtype=np.int64)
    if (counts < 0).any():
        raise CubelmError("symbol counts must be non-negative")
    used = np.flatnonzero(counts)
    lengths = np.zeros(len(counts), dtype=np.uint8)
    if len(used) == 0:
        return lengths
    if len(used) == 1:
        lengths[used[0]] = 1
        return lengths
    if len(used) > 2 ** max_length:
        raise CubelmError(f"{len(used)} distinct symbols do not fit codes of at most {max_length} bits")
    weights = counts[used]
    while True:
        depth = _tree_depths(weights)
        if depth.max() <= max_length:
            lengths[used] = depth
            return lengths
        weights = (weights + 1) // 2  # flatten the distribution, keep every symbol (>= 1)


def _tree_depths(weights: np.ndarray) -> np.ndarray:
    """Depth of each leaf of a Huffman tree over ``weights`` (at least two)."""
    heap = [(int(w), i, i) for i, w in enumerate(weights)]  # (weight, tie-break, node id)
    heapq.heapify(heap)
    parent = list(range(len(weights)))  # node id -> parent id; leaves are 0..n-1, inner nodes follow
    next_id = len(weights)
    while len(heap) > 1:
        w1, _, a = heapq.heappop(heap)
        w2, _, b = heapq.heappop(heap)
        parent.append(next_id)  # the new node's own slot (the root keeps pointing at itself)
        parent[a] = parent[b] = next_id
        heapq.heappush(heap, (w1 + w2, next_id, next_id))
        next_id += 1
    depth = np.zeros(next_id, dtype=np.int64)
    for node in range(next_id - 2, -1, -1):  # parents have larger ids: fill from the root down
        depth[node] = depth[parent[node]] + 1
    return depth[:len(weights)]


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """The canonical code (int64, right-aligned in ``lengths[s]`` bits) of every symbol with a length."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(len(lengths), dtype=np.int64)
    order = sorted(np.flatnonzero(lengths).tolist(), key=lambda s: (lengths[s], s))
    code, prev = 0, 0
    for i, s in enumerate(order):
        code = (code + (i > 0)) << (int(lengths[s]) - prev)
        codes[s], prev = code, int(lengths[s])
    if order and code >= (1 << prev):
        raise CubelmError("code lengths do not form a prefix code (Kraft sum above 1)")
    return codes


def encode(symbols: np.ndarray, lengths: np.ndarray) -> bytes:
    """The bits of ``symbols``' codes, most significant bit first, packed into bytes (last byte zero-padded)."""
    symbols = np.asarray(symbols, dtype=np.int64)
    if len(symbols) == 0:
        return b""
    lengths = np.asarray(lengths, dtype=np.int64)
    if symbols.min() < 0 or symbols.max() >= len(lengths) or (lengths[symbols] == 0).any():
        raise CubelmError("a symbol has no code (outside the alphabet or counted 0 when the code was built)")
    codes = canonical_codes(lengths)
    pieces = []
    for start in range(0, len(symbols), _CHUNK):
        s = symbols[start:start + _CHUNK]
        n, c = lengths[s], codes[s]
        owner = np.repeat(np.arange(len(s)), n)  # which symbol each output bit belongs to
        pos = np.arange(len(owner)) - np.repeat(np.cumsum(n) - n, n)  # bit index inside its code, MSB first
        pieces.append(((c[owner] >> (n[owner] - 1 - pos)) & 1).astype(np.uint8))
    return np.packbits(np.concatenate(pieces)).tobytes()


def decode(data: bytes, lengths: np.ndarray, count: int) -> np.ndarray:
    """``count`` symbols (int64) from ``data`` coded with ``lengths``; a stream that ends early or holds a bit
    pattern that is no code raises ``CubelmError``."""
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    width = int(lengths.max()) if len(lengths) else 0
    if width == 0 or width > 24:
        raise CubelmError(f"Huffman stream: bad code lengths (longest {width} bits)")
    table_sym, table_len = _lookup_table(lengths, width)
    raw = np.frombuffer(data, dtype=np.uint8)
    nbits = len(raw) * 8
    padded = np.concatenate([raw, np.zeros(8, dtype=np.uint8)]).astype(np.uint32)
    out: list[int] = []
    k, p = 0, 0
    for c0 in range(0, nbits, _CHUNK):
        pos = np.arange(c0, min(c0 + _CHUNK, nbits))
        b = pos >> 3
        word = (padded[b] << 24) | (padded[b + 1] << 16) | (padded[b + 2] << 8) | padded[b + 3]
        window = (word >> (32 - width - (pos & 7)).astype(np.uint32)) & ((1 << width) - 1)
        syms, lens = table_sym[window].tolist(), table_len[window].tolist()
        end = c0 + len(syms)
        while k < count and p < end:
            i = p - c0
            step = lens[i]
            if step == 0:
                raise CubelmError(f"corrupt Huffman stream: no code at bit {p}")
            out.append(syms[i])
            p += step
            k += 1
        if k == count:
            break
    if k < count or p > nbits:
        raise CubelmError(f"truncated Huffman stream: {k if k < count else count - 1} of {count} symbols decoded")
    return np.asarray(out, dtype=np.int64)


def _lookup_table(lengths: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """For every ``width``-bit window: the symbol whose code starts it and that code's length (0: no code)."""
    codes = canonical_codes(lengths)
    table_sym = np.zeros(1 << width, dtype=np.int64)
    table_len = np.zeros(1 << width, dtype=np.int64)
    for s in np.flatnonzero(lengths):
        n = int(lengths[s])
        lo = int(codes[s]) << (width - n)  # every window that starts with this code
        table_sym[lo:lo + (1 << (width - n))] = s
        table_len[lo:lo + (1 << (width - n))] = n
    return table_sym, table_len
