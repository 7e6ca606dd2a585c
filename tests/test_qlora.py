"""NF4 (4-bit NormalFloat, double-quantized scales) and QLoRA: the paper's code values, error bounds, exact byte
counts against the planner, NF4Linear = F.linear on the dequantized weight (forward and backward), and a QLoRA model
that equals its dequantized-base twin, trains only its adapters, merges to full precision and saves peft files."""

import peft  # pinned in the test extra: a missing install must fail here, not skip
import pytest
import torch
import torch.nn.functional as F
from lora_helpers import randomize_adapters, save_hf_base
from torch import nn

from cubelm.compress.nf4 import NF4_VALUES, NF4Linear, dequantize_nf4, dequantize_scales, quantize_nf4, quantize_scales
from cubelm.errors import CubelmError
from cubelm.finetune.adapter import read_adapter_tensors, save_adapter
from cubelm.finetune.config import LoraConfig
from cubelm.finetune.lora import LoRALinear, apply_lora, lora_layers, merge_lora, num_trainable
from cubelm.finetune.qlora import apply_qlora, dequantize_base, nf4_layers
from cubelm.model.hf_io import load_model, save_model
from cubelm.systems.memory import nf4_base_bytes, nf4_tensor_bytes

# QLoRA paper, Appendix E (= bitsandbytes' NF4 table)
PAPER_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]
IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
ALL = LoraConfig(r=4, lora_alpha=8)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def base(request, tmp_path_factory):
    # hidden 72, intermediate 100, kv 36: no projection is a whole number of 64-blocks, so every tensor pads
    return save_hf_base(request.param, tmp_path_factory.mktemp(request.param), hidden=72, intermediate=100)


def twin_with_dequantized_base(path, qlora_model, cfg):
    """The same model with plain nn.Linear bases holding the dequantized weights and the same adapter weights."""
    twin = apply_lora(load_model(path), cfg)
    ours, theirs = dict(qlora_model.named_modules()), dict(twin.named_modules())
    with torch.no_grad():
        for name, layer in lora_layers(qlora_model):
            other = theirs[name]
            other.base_layer.weight.copy_(layer.base_layer.dequantize())
            other.lora_A.weight.copy_(layer.lora_A.weight)
            other.lora_B.weight.copy_(layer.lora_B.weight)
    assert set(ours) == set(theirs)
    return twin


# ---- the NF4 format ------------------------------------------------------------------------------------------------
def test_nf4_values_are_the_papers_table():
    torch.testing.assert_close(NF4_VALUES, torch.tensor(PAPER_NF4), atol=1e-6, rtol=0)
    assert NF4_VALUES[7] == 0 and NF4_VALUES[0] == -1 and NF4_VALUES[15] == 1
    assert (NF4_VALUES > 0).sum() == 8 and (NF4_VALUES < 0).sum() == 7


def test_nf4_round_trip_of_gaussian_weights():
    sigma = 0.02
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0)) * sigma
    err = (dequantize_nf4(quantize_nf4(w)) - w).abs()
    # NF4 rounds each weight to the nearest of 16 levels spread by N(0,1)'s quantiles: ~0.073 σ on average.
    assert 0.06 < err.mean() / sigma < 0.08
    # the int4 absmax quantizer with the same blocks (15 evenly spaced levels) does worse: NF4 fits the Gaussian
    blocks = w.view(-1, 64)
    absmax = blocks.abs().amax(1, keepdim=True)
    int4 = (torch.round(blocks / absmax * 7) / 7 * absmax).view_as(w)
    assert err.mean() < 0.85 * (int4 - w).abs().mean()


def test_double_quantized_scales_are_within_half_a_step():
    absmax = torch.rand(1000, generator=torch.Generator().manual_seed(1)) * 0.05 + 0.01  # 4 blocks of 256, one partial
    codes, scales, mean = quantize_scales(absmax)
    assert (codes.dtype, codes.shape, scales.dtype, scales.shape) == (torch.int8, (1000,), torch.float32, (4,))
    back = dequantize_scales(codes, scales, mean)
    step = scales.repeat_interleave(256)[:1000] / 127
    assert ((back - absmax).abs() <= step / 2 + 1e-7).all()
    assert ((back - absmax).abs() / absmax).max() < 0.01


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 13), (1, 63), (65,), (3, 65), (17, 300), (2, 3, 11)])
def test_odd_shapes_pad_the_last_block(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    q = quantize_nf4(w)
    back = dequantize_nf4(q)
    assert back.shape == w.shape and back.dtype == torch.float32
    assert q.nbytes == nf4_tensor_bytes(w.numel())
    # every weight lands within half of NF4's widest gap (-1 .. -0.696) times its block's absmax (+1% for the
    # double-quantized scale)
    half_gap = (NF4_VALUES[1:] - NF4_VALUES[:-1]).max() / 2
    flat = F.pad(w.flatten(), (0, -w.numel() % 64)).view(-1, 64)
    bound = (flat.abs().amax(1, keepdim=True) * half_gap * 1.01).expand_as(flat).flatten()[:w.numel()]
    assert ((back - w).abs().flatten() <= bound + 1e-7).all()
    assert torch.equal(dequantize_nf4(quantize_nf4(torch.zeros(shape))), torch.zeros(shape))


def test_exact_bytes_are_4_127_bits_per_weight():
    w = torch.randn(128, 8192)  # 1,048,576 weights = 16,384 blocks of 64 = 64 blocks of 256 scales
    q = quantize_nf4(w)
    assert (q.codes.dtype, q.codes.numel()) == (torch.uint8, 524_288)  # two 4-bit codes per byte
    assert q.nbytes == 524_288 + 16_384 + 64 * 4 + 4 == nf4_tensor_bytes(w.numel())
    assert round(q.nbytes * 8 / w.numel(), 3) == 4.127
    assert nf4_tensor_bytes(1) == 32 + 1 + 4 + 4  # one padded block


def test_nf4_linear_forward_and_backward_are_f_linear_on_the_dequantized_weight():
    lin = nn.Linear(37, 23, bias=True)  # 851 weights: 14 blocks, the last one padded
    layer = NF4Linear.from_linear(lin)
    layer.bias.requires_grad_(True)
    assert layer.weight_codes.dtype == torch.uint8 and not layer.weight_codes.requires_grad
    w = layer.dequantize()
    assert w.shape == (23, 37) and w.dtype == torch.float32
    x = torch.randn(2, 5, 37, requires_grad=True)
    y = layer(x)
    assert torch.equal(y, F.linear(x, w, layer.bias))
    g = torch.randn_like(y)
    y.backward(g)
    x2 = x.detach().clone().requires_grad_(True)
    b2 = layer.bias.detach().clone().requires_grad_(True)
    F.linear(x2, w, b2).backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.bias.grad, b2.grad, rtol=1e-6, atol=1e-6)


def test_nf4_linear_saves_no_full_weight_for_backward():
    layer = NF4Linear.from_linear(nn.Linear(64, 48, bias=False))
    saved = []
    x = torch.randn(3, 7, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        layer(x).sum().backward()
    assert (48, 64) not in saved and (64, 48) not in saved
    ref = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: ref.append(tuple(t.shape)) or t, lambda t: t):
        F.linear(x, layer.dequantize()).sum().backward()
    assert {(48, 64), (64, 48)} & set(ref)  # a plain F.linear on a fresh dequantized weight keeps it alive


def test_nf4_linear_bf16_compute_in_an_fp32_model():
    lin = nn.Linear(40, 24)
    layer = NF4Linear.from_linear(lin, torch.bfloat16)
    assert layer.dequantize().dtype == torch.bfloat16
    x = torch.randn(4, 40)
    y = layer(x)
    assert y.dtype == torch.float32
    assert torch.equal(y, F.linear(x.bfloat16(), layer.dequantize(), layer.bias.bfloat16()).float())
    with pytest.raises(CubelmError, match="floating"):
        NF4Linear(4, 4, compute_dtype=torch.int8)


# ---- QLoRA models --------------------------------------------------------------------------------------------------
def test_qlora_quantizes_only_the_targeted_projections(base):
    path, _ = base
    model = load_model(path)
    embed, head = model.model.embed_tokens.weight.clone(), model.lm_head.weight.clone()
    cfg = LoraConfig(r=4, target_modules=("q_proj", "v_proj", "down_proj"))
    apply_qlora(model, cfg)
    quantized = {name.rsplit(".", 2)[-2] for name, _ in nf4_layers(model)}
    assert quantized == {"q_proj", "v_proj", "down_proj"} and len(nf4_layers(model)) == 6
    assert all(isinstance(layer.base_layer, NF4Linear) for _, layer in lora_layers(model))
    assert isinstance(model.model.layers[0].self_attn.k_proj, nn.Linear)
    assert torch.equal(model.model.embed_tokens.weight, embed) and torch.equal(model.lm_head.weight, head)
    assert num_trainable(model) == sum(4 * (m.in_features + m.out_features) for _, m in lora_layers(model))


def test_qlora_base_bytes_are_what_the_planner_counts(base):
    path, _ = base
    model = apply_qlora(load_model(path), ALL)
    nf4 = sum(layer.nbytes for _, layer in nf4_layers(model))
    assert nf4 == sum(nf4_tensor_bytes(layer.in_features * layer.out_features) for _, layer in nf4_layers(model))
    adapters = {id(p) for _, layer in lora_layers(model) for p in (layer.lora_A.weight, layer.lora_B.weight)}
    codes = {id(layer.weight_codes) for _, layer in nf4_layers(model)}
    rest = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in adapters | codes)
    assert nf4 + rest == nf4_base_bytes(model.config, "float32")


def test_qlora_logits_and_gradients_equal_the_dequantized_base_twin(base):
    path, _ = base
    model = apply_qlora(load_model(path), ALL)
    randomize_adapters(model)
    twin = twin_with_dequantized_base(path, model, ALL)
    targets = IDS[:, 1:]
    logits, want = model(IDS[:, :-1]), twin(IDS[:, :-1])
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)
    F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    F.cross_entropy(want.flatten(0, 1), targets.flatten()).backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {name for name, p in model.named_parameters() if ".lora_" in name}
    assert all(not p.requires_grad for name, p in model.named_parameters() if ".lora_" not in name)
    theirs = dict(twin.named_parameters())
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, theirs[name].grad, atol=1e-5, rtol=1e-4)


def test_merged_qlora_model_is_plain_full_precision_with_the_same_logits(base):
    path, _ = base
    model = apply_qlora(load_model(path), ALL)
    randomize_adapters(model)
    with torch.no_grad():
        unmerged = model(IDS)
        merged = merge_lora(model)
        assert not lora_layers(merged) and not nf4_layers(merged)
        projections = [m for n, m in merged.named_modules() if n.endswith(("_proj",))]
        assert projections and all(type(m) is nn.Linear and m.weight.dtype == torch.float32 for m in projections)
        torch.testing.assert_close(merged(IDS), unmerged, atol=1e-5, rtol=1e-5)


def test_qlora_adapter_is_a_plain_peft_adapter(base, tmp_path):
    path, cls_model = base
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=("q_proj", "k_proj", "up_proj", "o_proj"))
    model = apply_qlora(load_model(path), cfg)
    randomize_adapters(model)
    save_adapter(model, cfg, tmp_path / "adapter", base_model_name_or_path=str(path))
    tensors = read_adapter_tensors(tmp_path / "adapter")
    assert set(tensors) == {name for name, _ in lora_layers(model)}  # no quantization state in the adapter
    # peft on the base QLoRA trained against: the dequantized weights, saved as a plain HF model
    save_model(dequantize_base(_unwrap_lora(load_model(path), model)), tmp_path / "base")
    hf = peft.PeftModel.from_pretrained(cls_model.from_pretrained(tmp_path / "base"), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), hf(IDS).logits, atol=1e-4, rtol=1e-4)


def _unwrap_lora(plain, qlora_model):
    """``plain`` with the NF4 bases of ``qlora_model`` in place of its targeted projections (no adapters)."""
    from cubelm.model.seam import replace_module
    for name, layer in lora_layers(qlora_model):
        replace_module(plain, name, layer.base_layer)
    return plain


def test_qlora_in_bf16_compute(base):
    path, _ = base
    model = apply_qlora(load_model(path), ALL, compute_dtype=torch.bfloat16)
    randomize_adapters(model)
    assert all(layer.lora_A.weight.dtype == torch.bfloat16 for _, layer in lora_layers(model))
    assert model.model.embed_tokens.weight.dtype == torch.float32  # the rest stays as it was
    ref = apply_qlora(load_model(path), ALL)
    with torch.no_grad():
        for (_, mine), (_, theirs) in zip(lora_layers(model), lora_layers(ref)):
            theirs.lora_A.weight.copy_(mine.lora_A.weight)
            theirs.lora_B.weight.copy_(mine.lora_B.weight)
        out, want = model(IDS), ref(IDS)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, want, atol=2e-2 * want.abs().max().item(), rtol=0)
    with pytest.raises(CubelmError, match="compute_dtype"):
        apply_qlora(load_model(path), ALL, compute_dtype=torch.int8)


def test_lora_linear_accepts_an_nf4_base():
    layer = LoRALinear(NF4Linear.from_linear(nn.Linear(20, 12)), r=2, scale=1.0)
    assert layer.lora_A.weight.dtype == torch.float32 and layer(torch.randn(3, 20)).shape == (3, 12)
