"""Weight-only int8 / int4: format error bounds, the native kernel against the scheme's PyTorch reference, quantized
models against their float source, `cubelm quantize` round trip, the engine on quantized weights, bad input."""

import copy
import json

import pytest
import torch

from cubelm.compress.quantize import (pack_int4, quantize_activations, quantize_weight, unpack_int4)
from cubelm.compress.quantized_linear import QuantLinear, apply_weight_quantization
from cubelm.engine.kernels import qgemm
from cubelm.errors import CubelmError
from cubelm.model.config import ModelConfig
from cubelm.model.transformer import build_model

SCHEMES = [("int8", None), ("int4", 32), ("int4", 64), ("int4", 128)]


def _weight(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g)  # rows of different magnitudes


def test_int8_error_at_most_half_a_step():
    w = _weight(37, 70)
    q = quantize_weight(w, "int8")
    assert q.qweight.dtype == torch.int8 and q.qweight.abs().max() <= 127 and q.scales.shape == (37,)
    assert ((q.dequantize() - w).abs() <= q.scales[:, None] / 2 * (1 + 1e-5)).all()
    assert torch.equal(q.qweight.abs().amax(dim=1), torch.full((37,), 127, dtype=torch.int8))  # absmax -> +-127


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("k", [256, 688, 40])  # 688 and 40: a shorter last group (and a partial 32-block for 40)
def test_int4_error_bounds_and_codes(group, k):
    w = _weight(19, k, seed=k)
    q = quantize_weight(w, "int4", group)
    groups = -(-k // group)
    assert q.qweight.dtype == torch.uint8 and q.qweight.shape == (19, 16 * -(-k // 32))
    assert q.scales.shape == (19, groups)
    codes = unpack_int4(q.qweight)[:, :k]
    step = q.scales.abs().repeat_interleave(group, dim=1)[:, :k]
    err = (q.dequantize() - w).abs()
    clamped = codes == 7
    assert (err[~clamped] <= step[~clamped] / 2 * (1 + 1e-5)).all()  # half a step...
    assert (err <= step * (1 + 1e-5)).all()  # ...one step for a +7 clamp (opposite sign, same magnitude as max)
    # each group's largest-magnitude weight maps to -8 exactly (all 16 codes used)
    padded = torch.nn.functional.pad(codes, (0, groups * group - k), value=0).view(19, groups, group)
    assert (padded.min(dim=2).values == -8).all()


def test_pack_unpack_round_trip_and_nibble_order():
    codes = torch.randint(-8, 8, (3, 64), dtype=torch.int8)
    packed = pack_int4(codes)
    assert torch.equal(unpack_int4(packed), codes)
    assert int(packed[0, 0]) == (int(codes[0, 0]) + 8) | ((int(codes[0, 16]) + 8) << 4)  # byte j: inputs j, j + 16


def _scheme_reference(x, q):
    """The kernel's arithmetic in float64: int8 activation blocks of 32 times the dequantized weights."""
    codes, scales = quantize_activations(x)
    xa = codes.double() * scales.double().repeat_interleave(32, dim=1)[:, :x.shape[1]]
    return (xa @ q.dequantize().double().T).float()


@pytest.mark.skipif(not qgemm.available(), reason="no C compiler or CUBELM_KERNELS=0: the kernel cannot be built")
@pytest.mark.parametrize("rows", [1, 2, 5, 8])
@pytest.mark.parametrize("n,k", [(96, 256), (33, 70), (7, 688), (130, 40), (5, 2048)])
@pytest.mark.parametrize("method,group", SCHEMES)
def test_kernel_matches_scheme_reference(rows, n, k, method, group):
    w = _weight(n, k, seed=n + k)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)) * 3
    q = quantize_weight(w, method, group)
    got = qgemm.qgemm(x, q.qweight, q.scales, 8 if method == "int8" else 4, group, n)
    # integer dot products are exact; only the float sum over blocks is rounded
    torch.testing.assert_close(got, _scheme_reference(x, q), atol=1e-4, rtol=1e-5)


def _tiny_cfg(hidden=128, inter=176, bias=False):
    return ModelConfig(vocab_size=128, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       attention_bias=bias, mlp_bias=bias)


def _dequantized_float_model(quantized, model):
    """``model`` with each projection's weight replaced by what ``quantized`` holds, dequantized (float path)."""
    ref = copy.deepcopy(model)
    for (name, mod) in ref.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            q = quantize_weight(mod.weight, quantized[0], quantized[1])
            mod.weight.data.copy_(q.dequantize())
    return ref


@pytest.mark.parametrize("method,group", SCHEMES)
@pytest.mark.parametrize("bias", [False, True])
def test_quantized_model_close_to_float(method, group, bias):
    # intermediate 176 = 5.5 groups of 32: the down projection has a shorter last group
    model = build_model(_tiny_cfg(bias=bias), seed=0).eval()
    quant = apply_weight_quantization(copy.deepcopy(model), method, group)
    assert isinstance(quant.model.layers[0].self_attn.o_proj, QuantLinear)
    same_weights = _dequantized_float_model((method, group), model)
    for length in (1, 4, 13):  # up to 8 rows: the kernel (when built); 26 rows: dequantize + matmul
        ids = torch.randint(0, 128, (2, length), generator=torch.Generator().manual_seed(length))
        with torch.inference_mode():
            want, same, got = model(ids), same_weights(ids), quant(ids)
        scale = want.abs().max()
        # against the same weights in float: only the kernel's int8 activation blocks differ (<= 1/254 of a
        # block's absmax per element); the prefill path is the same float matmul
        tol = 2e-2 if 2 * length <= qgemm.MAX_ROWS and qgemm.available() else 1e-5
        assert (got - same).abs().max() <= tol * scale
        # against the float model: the weight rounding (random weights are a worst case for int4)
        assert (got - want).abs().max() <= (0.03 if method == "int8" else 0.25) * scale


def test_fused_projections_and_head_option():
    model = build_model(_tiny_cfg(), seed=1).eval()
    quant = apply_weight_quantization(copy.deepcopy(model), "int4", 32, include_head=True)
    attn = quant.model.layers[0].self_attn
    assert attn.q_proj.fused.linear.out_features == attn.q_proj.fused.linear.qweight.shape[0] == 128 + 2 * 64
    assert isinstance(quant.lm_head, QuantLinear)
    from cubelm.engine.decode_layout import apply_decode_layout
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        before = quant(ids)
        after = apply_decode_layout(quant)(ids)  # leaves the quantized modules alone
    assert isinstance(quant.lm_head, QuantLinear)
    # the layout also fuses the layers' elementwise work (fused_decode): equal up to float rounding
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


def test_bad_input_errors():
    model = build_model(_tiny_cfg(hidden=48, inter=96), seed=0)
    with pytest.raises(CubelmError, match="unknown quantization 'int3'"):
        apply_weight_quantization(model, "int3")
    with pytest.raises(CubelmError, match="group size must be one of 32, 64, 128"):
        apply_weight_quantization(model, "int4", 48)
    with pytest.raises(CubelmError, match="does not divide the model's hidden size 48"):
        apply_weight_quantization(model, "int4", 32)
    quantized = apply_weight_quantization(build_model(_tiny_cfg(), seed=0), "int8")
    apply_weight_quantization(quantized, "int8")  # the same format again: nothing left to do
    with pytest.raises(CubelmError, match=r"already quantized \(int8\)"):
        apply_weight_quantization(quantized, "int4", 32)
    from cubelm.engine.config import EngineConfig
    with pytest.raises(CubelmError, match="unknown quantization"):
        EngineConfig(quantization="fp8")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from helpers import make_tiny_model_dir
    return make_tiny_model_dir(tmp_path_factory.mktemp("quant"))


def _greedy(llm, n=12):
    from cubelm import SamplingParams
    outs = llm.generate(["def add(", "class Point"], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True),
                        use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("method,group", [("int8", None), ("int4", 32)])
def test_cli_quantize_round_trip_and_engine(model_dir, tmp_path, method, group):
    from helpers import cubelm

    from cubelm import LLM
    from cubelm.model.hf_io import load_model
    out = tmp_path / "q"
    args = ["quantize", "--model", model_dir, "--method", method, "--out", out]
    r = cubelm(*args, *(["--group-size", group] if group else []))
    assert r.returncode == 0, r.stderr
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["method"], qc["group_size"]) == ("cubelm", method, group)
    assert (out / "tokenizer.json").is_file()
    assert (out / "model.safetensors").stat().st_size < (model_dir / "model.safetensors").stat().st_size
    # saved-then-loaded == quantized at load: the same tensors bit for bit, so the same logits (up to the float
    # rounding MKL's and ATen's vector paths vary with the tensors' memory alignment: ~1e-7) and greedy tokens
    loaded = load_model(out)
    at_load = apply_weight_quantization(load_model(model_dir), method, group)
    a, b = loaded.state_dict(), at_load.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, 300, (1, 9))
    with torch.inference_mode():
        torch.testing.assert_close(loaded(ids), at_load(ids), atol=1e-5, rtol=0)
        torch.testing.assert_close(loaded(ids[:, :1]), at_load(ids[:, :1]), atol=1e-5, rtol=0)
    kwargs = dict(num_blocks=64, log=lambda m: None)
    saved_tokens = _greedy(LLM(str(out), **kwargs))
    assert all(len(t) == 12 for t in saved_tokens)
    assert saved_tokens == _greedy(LLM(str(model_dir), quantization=method, quantization_group_size=group or 32,
                                       **kwargs))
    r = cubelm("quantize", "--model", out, "--method", method, "--out", tmp_path / "again")
    assert r.returncode == 2 and "already quantized" in r.stderr


def test_cli_bad_group_size(model_dir, tmp_path):
    from helpers import assert_clean_error, cubelm
    assert_clean_error(cubelm("quantize", "--model", model_dir, "--method", "int4", "--group-size", "48", "--out",
                              tmp_path / "x"), "group size must be one of 32, 64, 128")


def test_bench_decode_quantized_matches_the_reference_generator(capsys):
    from cubelm.cli import main
    from cubelm.engine.params import SamplingParams
    from cubelm.engine.reference import GenerationResult, generate_tokens
    from cubelm.model.config import preset
    assert main(["bench", "decode", "--model", "tiny", "--dtype", "int4", "--group-size", "64", "--rounds", "1",
                 "--prompt-tokens", "12", "--new-tokens", "6", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["dtype"], report["group_size"]) == ("int4", 64)
    cfg = preset("tiny", eos_token_id=2, bos_token_id=1, pad_token_id=0)
    model = apply_weight_quantization(build_model(cfg, seed=0).eval(), "int4", 64)
    prompt = torch.randint(3, cfg.vocab_size, (12,), generator=torch.Generator().manual_seed(0)).tolist()
    want = list(generate_tokens(model, prompt, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                                GenerationResult([], "length")))
    assert report["token_ids"] == want
    # the projections are read as int4 codes + scales, the tied embedding / head stays fp32
    assert report["bytes_per_step"] < cfg.num_params() * 4 * 0.5


@pytest.mark.parametrize("method,group", [("int8", None), ("int4", 64)])
def test_native_step_runs_quantized_layers_like_the_module_path(model_dir, method, group):
    from cubelm import LLM, SamplingParams
    kwargs = dict(num_blocks=64, log=lambda m: None, quantization=method, quantization_group_size=group or 32)
    native, plain = LLM(str(model_dir), **kwargs), LLM(str(model_dir), native_step=False, **kwargs)
    if native.engine.runner.native_step is None:
        pytest.skip("no native step here (no C compiler or CUBELM_KERNELS=0)")
    assert plain.engine.runner.native_step is None
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
    for a, b in zip(native.generate(["def add(", "class Point"], params, use_tqdm=False),
                    plain.generate(["def add(", "class Point"], params, use_tqdm=False)):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            assert abs(la.logprob - lb.logprob) < 1e-4  # the same kernels in the same order: float rounding at most
