"""Parity with transformers: tiny random Llama / Mistral / Qwen2 models, both directions, fp32 logits to 1e-4."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cubelm.model.config import ModelConfig, read_config_json  # noqa: E402
from cubelm.model.hf_io import load_model, save_model  # noqa: E402
from cubelm.model.transformer import build_model  # noqa: E402

BASE = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=3, max_position_embeddings=256)

CASES = {
    "llama-mha-untied": ("llama", dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)),
    "llama-gqa-tied": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "llama-mqa-bias": ("llama", dict(num_attention_heads=4, num_key_value_heads=1, attention_bias=True,
                                     mlp_bias=True)),
    "llama3-rope-scaling": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                                          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                        "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": 64})),
    "mistral-gqa-window": ("mistral", dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
                                           head_dim=24)),
    "qwen2-gqa-tied": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2-mqa-untied": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False)),
}


def _hf_model(model_type: str, kw: dict):
    classes = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
               "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
               "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}
    cfg_cls, model_cls = classes[model_type]
    extra = {}
    if "rope_scaling" in kw:
        kw = dict(kw)
        extra["rope_parameters"] = {**kw.pop("rope_scaling"), "rope_theta": kw.pop("rope_theta")}
    cfg = cfg_cls(**BASE, **kw, **extra, attn_implementation="eager")
    torch.manual_seed(0)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # HF zero-inits biases and ones norms: randomize them so they are really tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _ids(batch=2, length=21, seed=1):
    return torch.randint(0, BASE["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", CASES)
def test_hf_to_cubelm_logits(case, tmp_path):
    model_type, kw = CASES[case]
    hf = _hf_model(model_type, kw)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    ids = _ids()
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert ours.config.model_type == model_type


@pytest.mark.parametrize("case", ["llama-gqa-tied", "mistral-gqa-window", "qwen2-mqa-untied", "llama3-rope-scaling"])
def test_cubelm_to_hf_logits(case, tmp_path):
    model_type, kw = CASES[case]
    cfg = ModelConfig(model_type=model_type, **BASE, **kw)
    ours = build_model(cfg, seed=3).eval()
    save_model(ours, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(hf).__name__.lower().startswith(model_type.replace("2", ""))
    ids = _ids(seed=2)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)
    assert read_config_json(tmp_path) == cfg.replace(torch_dtype="float32")


def test_sharded_checkpoint_from_transformers(tmp_path):
    hf = _hf_model("llama", CASES["llama-gqa-tied"][1])
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = load_model(tmp_path)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_sharded_save_roundtrip(tmp_path):
    cfg = ModelConfig(**BASE, num_attention_heads=4, num_key_value_heads=2)
    ours = build_model(cfg, seed=5).eval()
    save_model(ours, tmp_path, max_shard_bytes=50_000)
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    again = load_model(tmp_path)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(again(ids), ours(ids))
