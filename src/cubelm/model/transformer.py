"""The one decoder-only transformer of cubelm (Llama, Mistral and Qwen2 differ only by config).

Module and parameter names follow Hugging Face checkpoint keys (``model.layers.0.self_attn.q_proj.weight``),
so weight I/O needs no name mapping. Training, the reference generator, the paged engine and parallelism all
use this class; they differ only in the attention backend they pass to ``forward`` and in transforms applied
from outside (``apply_*``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cubelm.model.attention import Attention, AttentionBackend, CausalAttention
from cubelm.model.config import ModelConfig
from cubelm.model.layers import MLP, RMSNorm, RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attn: AttentionBackend):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    """Embeddings, layers and final norm: input ids -> hidden states (HF's ``model.`` prefix)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)

    def forward(self, input_ids, positions, attn: AttentionBackend):
        x = self.embed_tokens(input_ids)  # (B, T, hidden)
        cos, sin = self.rotary_emb(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, attn)
        return self.norm(x)


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                attn: AttentionBackend | None = None) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, vocab). positions default to 0..T-1; attn to plain causal."""
        return self.lm_head(self.hidden_states(input_ids, positions, attn))

    def hidden_states(self, input_ids, positions=None, attn: AttentionBackend | None = None) -> torch.Tensor:
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        if attn is None:
            attn = CausalAttention(self.config.sliding_window)
        return self.model(input_ids, positions, attn)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, seed: int | None = None, std: float = 0.02) -> None:
        """GPT-2 style init: N(0, std), residual output projections scaled by 1/sqrt(2 * layers)."""
        gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        out_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                s = out_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                p.copy_(torch.randn(p.shape, generator=gen) * s)


def build_model(cfg: ModelConfig, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                seed: int | None = 0) -> CausalLM:
    """A randomly initialized model (use ``cubelm.model.hf_io.load_model`` for trained weights)."""
    model = CausalLM(cfg)
    model.init_weights(seed)
    return model.to(device=device, dtype=dtype)
