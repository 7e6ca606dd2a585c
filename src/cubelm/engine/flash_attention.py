"""FlashAttention (book ch. 11, Algorithm 1) in plain PyTorch: tiled attention with the online softmax.

``flash_attention(q, k, v)`` computes exact softmax attention over tiles of Q (``block_q`` rows) and of K/V
(``block_k`` rows), keeping per query row only a running max ``m``, a running sum ``l`` and an unnormalized
output accumulator, so no tensor larger than a ``block_q x block_k`` score tile (per head) is ever allocated:
memory is O(N) in the sequence length instead of the O(N^2) of ``naive_attention``. It is a readable reference
of the algorithm, not a fast kernel — a Python loop over tiles is slower than PyTorch's fused SDPA on CPU
(see ``benchmarks/flash_attention.py``), so the production path keeps using SDPA.

``online_softmax_attention(scores, values)`` is the streaming softmax of §11.1 for one query row; it reproduces
the book's worked example::

    python -c "import torch; from cubelm.engine.flash_attention import online_softmax_attention as f; \
print(f(torch.tensor([[1., 3.], [0., 2.]]), torch.tensor([[[1., 0.], [0., 2.]], [[-1., 1.], [3., 1.]]])))"

Notes on the book's text (checked against Dao et al. 2022 and Milakov & Gimelshein 2018):
- The worked example's equations print a comma where a product is meant: ``l <- (a + 1) + (a + 1), b`` is
  ``(a + 1) + (a + 1) * b`` (and ``z^blk = [a, , 2]`` is ``[a, 2]``); the boxed numbers are right.
- Its ``l ~ 1.55300179`` is the sum of exponentials *relative to the running max* m = 3, i.e.
  ``sum_j exp(s_j - 3)``; the softmax denominator itself is ``e^3 * l ~ 31.19``.
- Algorithm 1 (FA1) loops K/V tiles outside and Q tiles inside, re-normalizing O_i by ``l`` after every tile
  (line 12). We loop Q tiles outside (FA2 order, same arithmetic) and divide by ``l`` once at the end, as the
  z/l form of §11.1 does: it is exact, needs fewer divisions, and lets causal attention skip whole K/V tiles.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def online_softmax_attention(scores: Tensor, values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Streaming softmax-weighted sum for one query row, one block of keys at a time (book §11.1).

    ``scores`` is (num_blocks, block) and ``values`` (num_blocks, block, d). Returns ``(o, ell, m)``: the output
    (d,), the running sum ``ell = sum_j exp(s_j - m)`` and the running max ``m`` after the last block.
    """
    m = torch.tensor(float("-inf"), dtype=torch.float64)
    ell = torch.tensor(0.0, dtype=torch.float64)
    z = torch.zeros(values.shape[-1], dtype=torch.float64)  # unnormalized output sum_j exp(s_j - m) v_j
    for s_blk, v_blk in zip(scores.double(), values.double()):
        m_blk = s_blk.max()
        p = torch.exp(s_blk - m_blk)  # (block,)
        m_new = torch.maximum(m, m_blk)
        old, new = torch.exp(m - m_new), torch.exp(m_blk - m_new)  # rescale both sides to the new max
        ell = ell * old + p.sum() * new
        z = z * old + (p @ v_blk) * new
        m = m_new
    return z / ell, ell, m


def naive_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, scale: float | None = None) -> Tensor:
    """Textbook attention that materializes the (B, Hq, Tq, Tk) score matrix; the O(N^2)-memory baseline."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, Hq, Tk, D)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, Hq, Tq, Tk)
    if causal:
        scores = scores.masked_fill(~causal_mask(q.shape[2], k.shape[2], q.device, k.shape[2] - q.shape[2]),
                                    float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v


def causal_mask(num_q: int, num_k: int, device: torch.device | None = None, q_start: int = 0,
                k_start: int = 0) -> Tensor:
    """Bool (num_q, num_k) mask, True where query row i (absolute position q_start + i) may see key column j
    (absolute position k_start + j).

    NOTE: for a whole Tq x Tk attention pass ``q_start = Tk - Tq``: queries are the *last* Tq positions (bottom-
    right alignment, the last query sees every key), which is what a decode or chunked-prefill step over a KV
    cache needs. SDPA's ``is_causal`` aligns top-left instead when Tq != Tk.
    """
    q_pos = torch.arange(q_start, q_start + num_q, device=device)[:, None]
    k_pos = torch.arange(k_start, k_start + num_k, device=device)[None, :]
    return k_pos <= q_pos


def flash_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, block_q: int = 64,
                    block_k: int = 64, scale: float | None = None) -> Tensor:
    """Exact attention by tiles with the online softmax; never allocates more than a score tile per head.

    q is (B, Hq, Tq, D), k and v are (B, Hkv, Tk, D) with Hq a multiple of Hkv (GQA/MQA; query head h reads
    KV head h // (Hq // Hkv), as ``repeat_interleave`` would, but K/V are never repeated). Scores, the running
    statistics and the output accumulator are fp32 whatever the input dtype. Returns (B, Hq, Tq, D).
    """
    batch, num_q_heads, num_q, head_dim = q.shape
    num_kv_heads, num_k = k.shape[1], k.shape[2]
    if num_q_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of KV heads ({num_kv_heads})")
    group = num_q_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    # (B, Hkv, G, Tq, D): the G query heads that share one KV head sit next to each other.
    q_grouped = q.reshape(batch, num_kv_heads, group, num_q, head_dim)  # a view unless q is oddly strided
    out = torch.empty(batch, num_kv_heads, group, num_q, v.shape[-1], dtype=q.dtype, device=q.device)
    for q_start in range(0, num_q, block_q):
        q_end = min(q_start + block_q, num_q)
        out[:, :, :, q_start:q_end] = _query_tile(q_grouped[:, :, :, q_start:q_end], k, v, q_start,
                                                  causal=causal, block_k=block_k, scale=scale,
                                                  offset=num_k - num_q).to(q.dtype)
    return out.view(batch, num_q_heads, num_q, -1)


def _query_tile(q_tile: Tensor, k: Tensor, v: Tensor, q_start: int, *, causal: bool, block_k: int,
                scale: float, offset: int) -> Tensor:
    """One Q tile (B, Hkv, G, bq, D) against all K/V tiles it can see; returns its output (B, Hkv, G, bq, Dv)."""
    batch, num_kv_heads, group, rows, head_dim = q_tile.shape
    # Fold the G query heads into the row axis so each tile is one batched matmul against the shared K tile:
    # (B, Hkv, G*bq, D). Pre-scaling Q (a tile) is cheaper than scaling every score tile.
    q_rows = (q_tile.float() * scale).reshape(batch, num_kv_heads, group * rows, head_dim)
    m = q_rows.new_full((batch, num_kv_heads, group * rows, 1), float("-inf"))  # running row max
    ell = q_rows.new_zeros((batch, num_kv_heads, group * rows, 1))  # running sum of exp(s - m)
    acc = q_rows.new_zeros((batch, num_kv_heads, group * rows, v.shape[-1]))  # sum of exp(s - m) v, unnormalized
    last_pos = q_start + rows - 1 + offset  # absolute position of the tile's last query
    num_k = k.shape[2] if not causal else min(k.shape[2], max(last_pos + 1, 0))  # later K/V tiles: fully masked
    # Only when Tq > Tk can a row sit before every key and stay at m = -inf; otherwise key 0 is seen at once.
    guard = causal and q_start + offset < 0
    for k_start in range(0, num_k, block_k):
        k_end = min(k_start + block_k, num_k)
        scores = q_rows @ k[:, :, k_start:k_end].float().transpose(-2, -1)  # (B, Hkv, G*bq, bk)
        if causal and k_end - 1 > q_start + offset:  # the tile crosses the diagonal: mask its upper part
            mask = causal_mask(rows, k_end - k_start, q_tile.device, q_start + offset, k_start)
            scores = scores.masked_fill(~mask.repeat(group, 1), float("-inf"))  # (G*bq, bk) rows match q_rows
        m, ell, acc = _online_update(scores, v[:, :, k_start:k_end].float(), m, ell, acc, guard)
    # Rows that saw no key (a query before every cached key, only when Tq > Tk) have ell = 0: output 0, not NaN.
    out = acc / torch.where(ell > 0, ell, torch.ones_like(ell))
    return out.view(batch, num_kv_heads, group, rows, -1)


def _online_update(scores: Tensor, v_tile: Tensor, m: Tensor, ell: Tensor, acc: Tensor,
                   guard: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Merge one score tile into the running (m, ell, acc) — Algorithm 1 lines 10-13, unnormalized (§11.1)."""
    m_new = torch.maximum(m, scores.amax(dim=-1, keepdim=True))  # (..., rows, 1)
    shift = m_new
    if guard:  # NOTE: a row masked in every tile so far has m_new = -inf; shift by 0 so exp(-inf + inf) != NaN.
        shift = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
    p = torch.exp(scores - shift)  # (..., rows, bk); masked entries become exactly 0
    alpha = torch.exp(m - shift)  # (..., rows, 1): rescales what was accumulated against the old max
    return m_new, ell.mul_(alpha).add_(p.sum(dim=-1, keepdim=True)), acc.mul_(alpha).add_(p @ v_tile)
