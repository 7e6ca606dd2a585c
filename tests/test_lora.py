"""LoRA against peft on tiny random transformers models: the same logits both ways, merging, r(d+k) parameters."""

import peft  # pinned in the test extra: a missing install must fail here, not skip
import pytest
import torch
from lora_helpers import randomize_adapters, save_hf_base

from cubelm.finetune.adapter import load_adapter, save_adapter
from cubelm.finetune.config import LoraConfig
from cubelm.finetune.lora import apply_lora, lora_layers, merge_lora, num_trainable
from cubelm.model.hf_io import load_model


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def base(request, tmp_path_factory):
    return save_hf_base(request.param, tmp_path_factory.mktemp(request.param), hidden=64, intermediate=96)


IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))


def test_cubelm_adapter_loads_in_peft_with_the_same_logits(base, tmp_path):
    path, cls_model = base
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj", "down_proj"))
    ours = apply_lora(load_model(path), cfg)
    randomize_adapters(ours)
    save_adapter(ours, cfg, tmp_path / "adapter", base_model_name_or_path=str(path))
    hf = peft.PeftModel.from_pretrained(cls_model.from_pretrained(path), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), hf(IDS).logits, atol=1e-4, rtol=1e-4)


def test_peft_adapter_loads_in_cubelm_and_merges(base, tmp_path):
    path, cls_model = base
    hf = peft.get_peft_model(cls_model.from_pretrained(path), peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "gate_proj"], use_rslora=True))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    hf.save_pretrained(tmp_path / "peft")
    ours = load_model(path)
    load_adapter(ours, tmp_path / "peft")
    with torch.no_grad():
        want = hf.eval()(IDS).logits
        unmerged = ours(IDS)
        torch.testing.assert_close(unmerged, want, atol=1e-4, rtol=1e-4)
        merged = merge_lora(ours)
        assert not lora_layers(merged)
        torch.testing.assert_close(merged(IDS), unmerged, atol=1e-5, rtol=1e-5)


def test_trainable_parameters_are_r_times_d_plus_k(base):
    path, _ = base
    model = load_model(path)
    cfg = LoraConfig(r=4)
    apply_lora(model, cfg)
    expected = sum(4 * (layer.in_features + layer.out_features) for _, layer in lora_layers(model))
    assert num_trainable(model) == expected
    assert len(lora_layers(model)) == 7 * model.config.num_hidden_layers
