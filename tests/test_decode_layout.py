"""The engine's blocked decode weight layout computes the same logits as the model it was applied to."""

import copy

import pytest
import torch

from cubelm.engine.decode_layout import BlockedLinear, FusedSlice, apply_decode_layout
from cubelm.engine.kernels import skinny_gemm
from cubelm.model.config import ModelConfig
from cubelm.model.transformer import build_model


@pytest.mark.parametrize("block", [None, 8, 12, 96])
@pytest.mark.parametrize("bias", [False, True])
def test_same_logits_for_one_and_many_tokens(block, bias):
    cfg = ModelConfig(vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
                      num_key_value_heads=2, max_position_embeddings=64, attention_bias=bias, mlp_bias=bias)
    model = build_model(cfg, seed=0).eval()
    blocked = apply_decode_layout(copy.deepcopy(model), block=block)
    assert isinstance(blocked.lm_head, BlockedLinear)
    assert isinstance(blocked.model.layers[0].mlp.up_proj, FusedSlice)
    for length in (1, 3, 5, 13):  # 2 and 6 rows: the few-row kernel; 10, 26: the many-row kernel (or the bmm)
        ids = torch.randint(0, 96, (2, length), generator=torch.Generator().manual_seed(length))
        with torch.inference_mode():
            want, got = model(ids), blocked(ids)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not skinny_gemm.available(), reason="no C compiler: the kernel cannot be built")
@pytest.mark.parametrize("rows", range(1, 10))
@pytest.mark.parametrize("K,N,block", [(64, 256, 128), (48, 96, 96), (200, 3 * 70, 70), (33, 640, 64)])
def test_skinny_gemm_matches_matmul(rows, K, N, block):
    g = torch.Generator().manual_seed(rows * 7 + K)
    w, x = torch.randn(N, K, generator=g), torch.randn(rows, K, generator=g)
    blocks = w.T.contiguous().view(K, N // block, block).permute(1, 0, 2).contiguous()
    torch.testing.assert_close(skinny_gemm.skinny_gemm(x, blocks), x @ w.T, atol=1e-4, rtol=1e-5)


@pytest.mark.skipif(not skinny_gemm.many_rows_available(), reason="no C compiler: the kernel cannot be built")
@pytest.mark.parametrize("rows", [9, 13, 96, 97, 200])  # micro-tile leftovers (6-row panels), 96-row task chunks
@pytest.mark.parametrize("K,N,block", [(64, 256, 128), (300, 3 * 40, 40), (33, 640, 64), (600, 96, 96)])
def test_blocked_gemm_matches_matmul(rows, K, N, block):
    """The many-row kernel: strips of 16/32 columns plus leftover columns (40, 96 on AVX-512), K in several
    256-deep chunks (300, 600), every row count left over by the 6-row micro-tile."""
    g = torch.Generator().manual_seed(rows * 7 + K)
    w, x = torch.randn(N, K, generator=g), torch.randn(rows, K, generator=g)
    blocks = w.T.contiguous().view(K, N // block, block).permute(1, 0, 2).contiguous()
    torch.testing.assert_close(skinny_gemm.blocked_gemm(x, blocks), x @ w.T, atol=1e-4, rtol=1e-5)


def test_layout_is_cpu_only():
    """On any other device the model is left as it is (the engine and `cubelm generate` apply it everywhere)."""
    cfg = ModelConfig(vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=6,
                      max_position_embeddings=64)
    from cubelm.model.transformer import CausalLM
    with torch.device("meta"):
        model = CausalLM(cfg)
    assert apply_decode_layout(model) is model
    assert not any(isinstance(m, (BlockedLinear, FusedSlice)) for m in model.modules())


NO_STRIPS = ("native kernels unavailable (no C compiler, or CUBELM_KERNELS=0): without them the layout keeps "
             "128-column blocks, which the tests above cover")

@pytest.mark.skipif(not skinny_gemm.strip_width(), reason=NO_STRIPS)
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 14, 36, 97])
def test_one_strip_blocks_give_the_wide_blocks_numbers_exactly(rows):
    """The engine's layout when the kernels are built: blocks one strip wide (no repacking in blocked_gemm.c,
    several side by side in skinny_gemm.c). Same sums in the same order as 128-column blocks: equal bit for bit,
    including a block count that is not a multiple of the few-row kernel's 8 (or 4) blocks per task."""
    strip = skinny_gemm.strip_width()
    g = torch.Generator().manual_seed(rows)
    for K, N in [(96, 1280), (300, 11 * 128), (40, 3 * 128)]:
        w, x = torch.randn(N, K, generator=g), torch.randn(rows, K, generator=g)
        wide, narrow = (w.T.contiguous().view(K, N // b, b).permute(1, 0, 2).contiguous() for b in (128, strip))
        gemm = skinny_gemm.skinny_gemm if rows <= skinny_gemm.MAX_ROWS else skinny_gemm.blocked_gemm
        assert torch.equal(gemm(x, narrow), gemm(x, wide))
        torch.testing.assert_close(gemm(x, narrow), x @ w.T, atol=1e-4, rtol=1e-5)


@pytest.mark.skipif(not skinny_gemm.strip_width(), reason=NO_STRIPS)
def test_engine_layout_uses_one_strip_blocks():
    cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      max_position_embeddings=64)
    blocked = apply_decode_layout(build_model(cfg, seed=0).eval())
    strip = skinny_gemm.strip_width()
    assert blocked.lm_head.weight_blocks.shape == (128 // strip, 64, strip)
    assert blocked.model.layers[0].mlp.down_proj.weight_blocks.shape[2] == strip
