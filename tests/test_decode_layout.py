"""The engine's blocked decode weight layout computes the same logits as the model it was applied to."""

import copy

import pytest
import torch

from cubelm.engine.decode_layout import BlockedLinear, FusedSlice, apply_decode_layout
from cubelm.model.config import ModelConfig
from cubelm.model.transformer import build_model


@pytest.mark.parametrize("parts", [1, 2, 3, 4])
@pytest.mark.parametrize("bias", [False, True])
def test_same_logits_for_one_and_many_tokens(parts, bias):
    cfg = ModelConfig(vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
                      num_key_value_heads=2, max_position_embeddings=64, attention_bias=bias, mlp_bias=bias)
    model = build_model(cfg, seed=0).eval()
    blocked = apply_decode_layout(copy.deepcopy(model), parts=parts)
    assert isinstance(blocked.lm_head, BlockedLinear)
    assert isinstance(blocked.model.layers[0].mlp.up_proj, FusedSlice)
    for length in (1, 13):
        ids = torch.randint(0, 96, (2, length), generator=torch.Generator().manual_seed(length))
        with torch.inference_mode():
            want, got = model(ids), blocked(ids)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
