"""BERT-family encoder forward without padding in the dense layers (the "remove padding" trick of
FasterTransformer / ByteTransformer, applied to a transformers ``BertModel``'s own modules and weights).

A batch of texts of different lengths is right-padded to (B, T). In a BERT layer almost all the compute is in the
dense projections (QKV, output, the 4x MLP), which act on each token independently: run them on the real tokens
only, packed as (N, H) with N = the sum of the lengths, and go back to the padded (B, T) layout only for the
attention scores, which need it. On CPU an encoder is compute-bound from a few dozen tokens on, so every pad token
in a dense layer costs as much as a real one; with texts of mixed lengths the padded forward wasted up to half of
its time. The result equals the padded forward (same weights, same ops per real token; checked in
tests/test_embeddings.py); pad positions come back as zeros.

Used when the model has BERT's module layout (BertModel, RobertaModel, XLMRobertaModel, ... with absolute
positions); anything else runs the model's own forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def supports_unpadded(model) -> bool:
    cfg = model.config
    try:
        layer = model.encoder.layer[0]
        parts = (model.embeddings, layer.attention.self.query, layer.attention.self.key, layer.attention.self.value,
                 layer.attention.output.dense, layer.attention.output.LayerNorm, layer.intermediate.dense,
                 layer.intermediate.intermediate_act_fn, layer.output.dense, layer.output.LayerNorm)
    except (AttributeError, IndexError, TypeError):
        return False
    return (all(p is not None for p in parts) and not getattr(cfg, "is_decoder", False)
            and getattr(cfg, "position_embedding_type", "absolute") == "absolute")


class UnpaddedBert:
    def __init__(self, model):
        self.model = model
        self.num_heads = model.config.num_attention_heads
        # one (3H, H) projection per layer instead of three: one GEMM over the packed tokens
        self.qkv = []
        for layer in model.encoder.layer:
            s = layer.attention.self
            self.qkv.append((torch.cat([s.query.weight, s.key.weight, s.value.weight]).detach(),
                             torch.cat([s.query.bias, s.key.bias, s.value.bias]).detach()))

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask (B, T), right-padded -> last hidden states (B, T, H), zeros at pad positions."""
        B, T = ids.shape
        real = mask.reshape(-1).nonzero().squeeze(1)  # (N,) flat indices of real tokens
        x = self.model.embeddings(input_ids=ids).reshape(B * T, -1)[real]  # (N, H)
        H = x.shape[-1]
        key_mask = mask.bool()[:, None, None, :]  # (B, 1, 1, T): attend to real keys only
        for layer, (w_qkv, b_qkv) in zip(self.model.encoder.layer, self.qkv):
            qkv = F.linear(x, w_qkv, b_qkv)  # (N, 3H)
            padded = x.new_zeros(B * T, 3 * H).index_copy_(0, real, qkv)
            q, k, v = padded.view(B, T, 3, self.num_heads, H // self.num_heads).permute(2, 0, 3, 1, 4)  # (B,nh,T,d)
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # pad queries: computed, dropped
            ctx = ctx.transpose(1, 2).reshape(B * T, H)[real]  # (N, H)
            att = layer.attention.output
            x = att.LayerNorm(att.dense(ctx) + x)
            mlp = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(x))
            x = layer.output.LayerNorm(layer.output.dense(mlp) + x)
        return x.new_zeros(B * T, H).index_copy_(0, real, x).view(B, T, H)
