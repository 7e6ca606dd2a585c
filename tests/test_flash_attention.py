"""FlashAttention (book ch. 11): the §11.1 worked example, parity with SDPA, and no N^2-sized tensor.

    python -m pytest tests/test_flash_attention.py -q -o addopts=""
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from cubelm.engine.flash_attention import causal_mask, flash_attention, naive_attention, online_softmax_attention


class OpRecorder(TorchDispatchMode):
    """Records the largest numel of any op output and how many times each op ran."""

    def __init__(self) -> None:
        super().__init__()
        self.max_numel = 0
        self.calls: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls[func.overloadpacket.__name__] += 1
        sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.max_numel = max([self.max_numel, *sizes])
        return out


def sdpa_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    # SDPA's is_causal aligns top-left when Tq != Tk; ours is bottom-right (queries are the newest tokens).
    num_q, num_k = q.shape[2], k.shape[2]
    mask = causal_mask(num_q, num_k, q_start=num_k - num_q) if causal else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def random_qkv(batch: int, q_heads: int, kv_heads: int, num_q: int, num_k: int, head_dim: int,
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, num_q, head_dim, generator=gen)
    k = torch.randn(batch, kv_heads, num_k, head_dim, generator=gen)
    v = torch.randn(batch, kv_heads, num_k, head_dim, generator=gen)
    return q, k, v


def test_book_worked_example() -> None:
    scores = torch.tensor([[1.0, 3.0], [0.0, 2.0]])  # two tiles: [1, 3 | 0, 2]
    values = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[-1.0, 1.0], [3.0, 1.0]]])  # v1, v2 | v3, v4
    o, ell, m = online_softmax_attention(scores, values)
    torch.testing.assert_close(o, torch.tensor([0.76573417, 1.55676994], dtype=torch.float64), rtol=0, atol=1e-8)
    assert abs(ell.item() - 1.55300179) < 1e-8  # relative to the running max: sum_j exp(s_j - 3)
    assert m.item() == 3.0
    plain = torch.softmax(scores.flatten().double(), 0) @ values.reshape(4, 2).double()
    torch.testing.assert_close(o, plain)


def test_book_example_through_tiled_kernel() -> None:
    # Scores are q . k: with q = [1] and k = s (scale 1), two key tiles of 2 reproduce the same output.
    q = torch.ones(1, 1, 1, 1)
    k = torch.tensor([1.0, 3.0, 0.0, 2.0]).view(1, 1, 4, 1)
    v = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 1.0], [3.0, 1.0]]).view(1, 1, 4, 2)
    out = flash_attention(q, k, v, causal=False, block_k=2, scale=1.0)
    torch.testing.assert_close(out.flatten(), torch.tensor([0.76573417, 1.55676994]), rtol=0, atol=1e-6)


SHAPES = [  # (batch, q_heads, kv_heads, Tq, Tk, head_dim, block_q, block_k)
    (1, 1, 1, 128, 128, 64, 64, 64),  # square, divisible, head_dim 64
    (2, 4, 4, 100, 100, 32, 32, 48),  # not divisible by either block size
    (1, 8, 2, 77, 77, 64, 16, 32),  # GQA (4 query heads per KV head)
    (2, 6, 1, 45, 45, 16, 64, 8),  # MQA; one Q tile bigger than the sequence
    (1, 4, 2, 37, 200, 64, 16, 64),  # chunked prefill: 37 new queries over a cache of 200
    (2, 8, 2, 1, 131, 64, 64, 64),  # decode: one query over the whole cache
    (1, 2, 1, 130, 130, 24, 128, 128),  # default-like large tiles, ragged last tile
]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_sdpa_fp32(shape: tuple[int, ...], causal: bool) -> None:
    batch, q_heads, kv_heads, num_q, num_k, head_dim, block_q, block_k = shape
    q, k, v = random_qkv(batch, q_heads, kv_heads, num_q, num_k, head_dim)
    out = flash_attention(q, k, v, causal=causal, block_q=block_q, block_k=block_k)
    torch.testing.assert_close(out, sdpa_reference(q, k, v, causal), rtol=0, atol=1e-5)
    torch.testing.assert_close(naive_attention(q, k, v, causal), sdpa_reference(q, k, v, causal), rtol=0, atol=1e-5)


def test_default_blocks_and_explicit_scale() -> None:
    q, k, v = random_qkv(1, 4, 2, 150, 150, 64, seed=1)
    out = flash_attention(q, k, v, scale=0.05)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.05, enable_gqa=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_accepts_head_transposed_inputs() -> None:
    # Models usually hold (B, T, H, D) and transpose to (B, H, T, D): non-contiguous inputs must work.
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in random_qkv(2, 4, 2, 33, 33, 16, seed=7))
    assert not q.is_contiguous()
    out = flash_attention(q, k, v, block_q=8, block_k=8)
    torch.testing.assert_close(out, sdpa_reference(q, k, v, True), rtol=0, atol=1e-5)


def test_large_scores_are_stable() -> None:
    # Scores around 1e3: without the running max, exp() would overflow to inf in fp32.
    q, k, v = random_qkv(1, 2, 2, 70, 70, 16, seed=2)
    out = flash_attention(q * 40, k * 40, v, block_q=16, block_k=16)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, sdpa_reference(q * 40, k * 40, v, True), rtol=0, atol=1e-5)


def test_low_precision_inputs_accumulate_in_fp32() -> None:
    q, k, v = (t.bfloat16() for t in random_qkv(1, 2, 1, 64, 64, 32, seed=3))
    out = flash_attention(q, k, v, block_q=16, block_k=16)
    assert out.dtype == torch.bfloat16
    ref = sdpa_reference(q.float(), k.float(), v.float(), True)
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=1e-2)


def test_queries_before_every_key_get_zeros_not_nan() -> None:
    # Tq > Tk: the first Tq - Tk queries sit before the first key and see nothing.
    q, k, v = random_qkv(1, 1, 1, 10, 4, 8, seed=4)
    out = flash_attention(q, k, v, block_q=4, block_k=2)
    assert torch.isfinite(out).all()
    assert (out[:, :, :6] == 0).all()
    torch.testing.assert_close(out[:, :, 6:], sdpa_reference(q[:, :, 6:], k, v, True), rtol=0, atol=1e-5)


def test_never_allocates_the_score_matrix() -> None:
    num_tokens, head_dim, block = 1024, 16, 64
    q, k, v = random_qkv(1, 1, 1, num_tokens, num_tokens, head_dim, seed=5)
    with OpRecorder() as tiled:
        flash_attention(q, k, v, block_q=block, block_k=block)
    with OpRecorder() as naive:
        naive_attention(q, k, v)
    assert naive.max_numel >= num_tokens * num_tokens  # the recorder does see the N x N matrix
    # The biggest tensor the tiled path makes is the output (N x D), a Q tile, or one block x block score tile.
    assert tiled.max_numel <= max(num_tokens * head_dim, block * block)
    assert tiled.max_numel * 64 <= num_tokens * num_tokens


def test_causal_skips_fully_masked_tiles() -> None:
    q, k, v = random_qkv(1, 1, 1, 256, 256, 16, seed=6)
    with OpRecorder() as full:
        flash_attention(q, k, v, causal=False, block_q=32, block_k=32)
    with OpRecorder() as causal:
        flash_attention(q, k, v, causal=True, block_q=32, block_k=32)
    tiles = 256 // 32
    # Two matmuls per visited tile (Q K^T and P V): all 8 x 8 tiles vs the 36 on or below the diagonal.
    assert full.calls["matmul"] + full.calls["bmm"] + full.calls["mm"] == 2 * tiles * tiles
    assert causal.calls["matmul"] + causal.calls["bmm"] + causal.calls["mm"] == 2 * tiles * (tiles + 1) // 2


def test_rejects_heads_that_do_not_divide() -> None:
    q, k, v = random_qkv(1, 6, 4, 8, 8, 8)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        flash_attention(q, k, v)
