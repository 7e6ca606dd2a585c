"""Tiny models and adapters for the multi-LoRA tests (tests/ is on sys.path)."""

from __future__ import annotations

from pathlib import Path

import torch

from cubelm.finetune.adapter import load_adapter, save_adapter
from cubelm.finetune.config import LoraConfig
from cubelm.finetune.lora import apply_lora, lora_layers, merge_lora
from cubelm.model.config import ModelConfig
from cubelm.model.hf_io import load_model, save_model
from cubelm.model.transformer import build_model

VOCAB = 160
CONFIG = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)

# three adapters that differ in everything an adapter can differ in: targets, ranks per module, alpha, rsLoRA
ADAPTERS = {
    "all7": LoraConfig(r=8, lora_alpha=16),
    "qv": LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj"), use_rslora=True),
    "mixed": LoraConfig(r=16, lora_alpha=32, target_modules=("k_proj", "o_proj", "up_proj", "down_proj"),
                        rank_pattern={"down_proj": 2}, alpha_pattern={"up_proj": 8}),
}


def make_model_dir(root: Path, **overrides) -> Path:
    """A random model with spread-out logits (weights N(0, 0.2)): greedy decoding has no near-ties."""
    model = build_model(ModelConfig(**{**CONFIG, **overrides}), seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    path = root / "base"
    save_model(model, path)
    return path


def make_adapter(model_dir: Path, out: Path, cfg: LoraConfig, seed: int, scale: float = 0.3) -> Path:
    """``apply_lora`` + random B (A keeps its random init) + ``save_adapter``: an adapter that changes outputs."""
    model = apply_lora(load_model(model_dir), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=g) * scale)
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * scale)
    return save_adapter(model, cfg, out)


def merged_model(model_dir: Path, adapter_dir: Path | None):
    """The base model with the adapter folded into its weights (the reference a served adapter must match)."""
    model = load_model(model_dir)
    if adapter_dir is not None:
        load_adapter(model, adapter_dir)
        merge_lora(model)
    return model.eval()


def save_hf_base(kind: str, path: Path, *, hidden: int, intermediate: int):
    """A tiny random transformers model of ``kind`` (llama or qwen2) saved at ``path``; returns (path, its class)."""
    import transformers
    cls_cfg, cls_model = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                          "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[kind]
    cfg = cls_cfg(vocab_size=128, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager")
    torch.manual_seed(0)
    cls_model(cfg).save_pretrained(path)
    return path, cls_model


def randomize_adapters(model, seed=1):
    """Nonzero B for every adapter (a fresh adapter's B is zero, so it would change nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)
