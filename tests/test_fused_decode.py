"""The fused decode kernels (``kernels/decode_ops.c``) and ``FusedDecoderLayer`` compute what the eager model does."""

import copy

import pytest
import torch
import torch.nn.functional as F

from cubelm.engine.decode_layout import apply_decode_layout
from cubelm.engine.fused_decode import FusedDecoderLayer, NativeRMSNorm, apply_fused_layers
from cubelm.engine.kernels import decode_ops
from cubelm.model.config import ModelConfig
from cubelm.model.layers import RMSNorm, RotaryEmbedding, apply_rope
from cubelm.model.transformer import build_model

needs_kernels = pytest.mark.skipif(not decode_ops.available(),
                                   reason="native kernels unavailable (no C compiler, or CUBELM_KERNELS=0)")
TOL = dict(rtol=1e-5, atol=1e-6)


def _strided(rows, cols, g):
    """A (rows, cols) view whose rows are further apart than cols (a column slice of a wider output)."""
    return torch.randn(rows, cols + 7, generator=g)[:, 3:3 + cols]


@needs_kernels
@pytest.mark.parametrize("rows", [1, 3, 70])  # 70: the rows are split over threads
@pytest.mark.parametrize("dim", [384, 100])
def test_rms_norm_and_add_rms_norm(rows, dim):
    g = torch.Generator().manual_seed(rows + dim)
    norm = RMSNorm(dim, eps=1e-5)
    norm.weight.data.normal_(generator=g)
    x = _strided(rows, dim, g) * 3
    torch.testing.assert_close(decode_ops.rms_norm(x, norm.weight.data, norm.eps), norm(x).detach(), **TOL)
    residual, delta = torch.randn(rows, dim, generator=g), _strided(rows, dim, g)
    want_x = residual + delta
    got = decode_ops.add_rms_norm(residual, delta, norm.weight.data, norm.eps)
    torch.testing.assert_close(residual, want_x, rtol=0, atol=0)  # the add is in place and exact
    torch.testing.assert_close(got, norm(want_x).detach(), **TOL)


@needs_kernels
@pytest.mark.parametrize("rows", [1, 5, 80])
def test_rope_in_place_on_a_fused_qkv_output(rows):
    Hq, Hkv, D = 6, 2, 64
    cfg = ModelConfig(vocab_size=32, hidden_size=Hq * D, num_attention_heads=Hq, num_key_value_heads=Hkv,
                      intermediate_size=64, num_hidden_layers=1, rope_theta=10000.0)
    g = torch.Generator().manual_seed(rows)
    positions = torch.randint(0, 4000, (1, rows), generator=g)
    cos, sin = RotaryEmbedding(cfg)(positions, torch.float32)
    qkv = torch.randn(rows, (Hq + 2 * Hkv) * D, generator=g)
    q = qkv[:, :Hq * D].reshape(1, rows, Hq, D)
    k = qkv[:, Hq * D:(Hq + Hkv) * D].reshape(1, rows, Hkv, D)
    want_q, want_k, want_v = apply_rope(q, cos, sin), apply_rope(k, cos, sin), qkv[:, (Hq + Hkv) * D:].clone()
    decode_ops.rope_(qkv[:, :(Hq + Hkv) * D], cos.reshape(rows, D), sin.reshape(rows, D), D)
    torch.testing.assert_close(qkv[:, :Hq * D].reshape(1, rows, Hq, D), want_q, **TOL)
    torch.testing.assert_close(qkv[:, Hq * D:(Hq + Hkv) * D].reshape(1, rows, Hkv, D), want_k, **TOL)
    assert torch.equal(qkv[:, (Hq + Hkv) * D:], want_v)  # v is not rotated


@needs_kernels
@pytest.mark.parametrize("rows", [1, 4, 100])
def test_silu_mul(rows):
    g = torch.Generator().manual_seed(rows)
    gu = torch.randn(rows, 2 * 1000, generator=g) * 6
    gate, up = gu[:, :1000], gu[:, 1000:]
    torch.testing.assert_close(decode_ops.silu_mul(gate, up), F.silu(gate) * up, **TOL)


def _cfg(**kw):
    return ModelConfig(**{**dict(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128), **kw})


@needs_kernels
@pytest.mark.parametrize("layout", [True, False])  # fused projections (one GEMM for q/k/v) or plain nn.Linear
@pytest.mark.parametrize("bias", [False, True])
def test_fused_layers_give_the_eager_logits(layout, bias):
    model = build_model(_cfg(attention_bias=bias, mlp_bias=bias), seed=0).eval()
    fused = copy.deepcopy(model)
    fused = apply_decode_layout(fused) if layout else apply_fused_layers(fused)
    assert all(type(layer) is FusedDecoderLayer for layer in fused.model.layers)
    assert type(fused.model.norm) is NativeRMSNorm
    norms = {k for k in model.state_dict() if "norm" in k}  # same names: the layers keep their submodules
    assert norms and fused.state_dict().keys() >= norms
    for length in (1, 2, 9, 40):
        ids = torch.randint(0, 128, (2, length), generator=torch.Generator().manual_seed(length))
        with torch.inference_mode():
            torch.testing.assert_close(fused(ids), model(ids), atol=2e-5, rtol=1e-5)


def test_other_dtypes_take_the_eager_path():
    model = build_model(_cfg(), seed=0).eval()
    fused = apply_fused_layers(copy.deepcopy(model)).double()
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(fused(ids), model.double()(ids), rtol=0, atol=0)


def test_engine_greedy_tokens_same_fused_or_eager():
    """The engine with the fused layers (decode layout on) gives the greedy tokens of the eager model (layout off),
    through prefill chunks, decode steps and a mixed batch."""
    from cubelm.engine.config import EngineConfig
    from cubelm.engine.llm_engine import LLMEngine
    from cubelm.engine.params import SamplingParams
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 128, (int(n),), generator=g).tolist() for n in (5, 17, 40, 2)]
    outs = []
    for layout in (True, False):
        engine = LLMEngine(build_model(_cfg(), seed=1).eval(), None,
                           EngineConfig(decode_layout=layout, num_blocks=64, max_num_batched_tokens=32),
                           log=lambda m: None)
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
        got = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                got[out.request_id] = out.outputs[0].token_ids
        outs.append([got[str(i)] for i in range(len(prompts))])
    assert outs[0] == outs[1]


@needs_kernels
@pytest.mark.parametrize("kw", [dict(), dict(attention_bias=True, mlp_bias=True), dict(sliding_window=6),
                                dict(num_key_value_heads=4, head_dim=32), dict(kv_cache_dtype="int8")])
def test_native_step_equals_the_module_path(kw):
    """Decode steps through the one-call native step give the tokens and logprobs of the module path, for 1..14
    rows (up to 8: the few-row GEMM, above: the register-blocked one), with biases, a sliding window, without GQA
    and with an int8 KV pool (the native write quantizes as the PyTorch path does, bit for bit), over contexts that
    span several blocks."""
    from cubelm.engine.config import EngineConfig
    from cubelm.engine.llm_engine import LLMEngine
    from cubelm.engine.params import SamplingParams
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 128, (int(n),), generator=g).tolist()
               for n in (3, 11, 20, 7, 2, 9, 30, 5, 4, 13, 6, 16, 8, 10)]
    runs, kw = [], dict(kw)
    engine_kw = {k: kw.pop(k) for k in ("kv_cache_dtype",) if k in kw}
    for native in (True, False):
        engine = LLMEngine(build_model(_cfg(**kw), seed=2).eval(), None,
                           EngineConfig(num_blocks=128, block_size=4, max_num_batched_tokens=64, **engine_kw),
                           log=lambda m: None)
        step, rows = engine.runner.native_step, []
        assert step is not None
        if native:  # count the rows of each native call
            engine.runner.native_step = type("Counting", (), {"max_rows": step.max_rows, "__call__": staticmethod(
                lambda ids, pos, meta: rows.append(ids.shape[1]) or step(ids, pos, meta))})()
        else:
            engine.runner.native_step = None
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3))
        got = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                got.setdefault(out.request_id, []).extend(out.outputs[0].logprobs)
        runs.append((got, rows))
        if native:
            pools = (engine.runner.kv_pool.k.clone(), engine.runner.kv_pool.k_scale.clone()) if engine_kw else ()
    (native, rows), (plain, _) = runs
    assert rows and max(rows) == 14 and min(rows) < 8
    assert native.keys() == plain.keys()
    if engine_kw:  # the pools hold the same codes and scales
        for native_t, plain_t in zip(pools, (engine.runner.kv_pool.k, engine.runner.kv_pool.k_scale)):
            assert torch.equal(native_t, plain_t)
    for rid in native:
        assert [r.token_id for r in native[rid]] == [r.token_id for r in plain[rid]]
        for a, b in zip(native[rid], plain[rid]):
            assert a.top.keys() == b.top.keys()
            assert max(abs(a.top[t] - b.top[t]) for t in a.top) < 1e-4


@pytest.mark.parametrize("flags,want", [({"avx2", "fma"}, torch.float32), ({"avx512f", "avx512_bf16"}, torch.bfloat16),
                                        ({"amx_bf16", "amx_tile"}, torch.bfloat16)])
def test_auto_dtype_follows_the_cpu(monkeypatch, capsys, flags, want):
    from cubelm.model import hf_io
    from cubelm.systems import host
    monkeypatch.setattr(host, "cpu_flags", lambda: flags)
    assert hf_io.inference_dtype("auto", "cpu") == want
    assert hf_io.inference_dtype("float32", "cpu") == torch.float32
    monkeypatch.delenv("CUBELM_FORCE_BF16", raising=False)
    if want == torch.float32:  # bf16 asked for on a CPU without it: a warning, and float32
        assert hf_io.inference_dtype("bfloat16", "cpu") == torch.float32
        err = capsys.readouterr().err
        assert err.startswith("cubelm: warning: ") and "no bf16 instructions" in err and err.count("\n") == 1
        monkeypatch.setenv("CUBELM_FORCE_BF16", "1")
    assert hf_io.inference_dtype("bfloat16", "cpu") == torch.bfloat16
