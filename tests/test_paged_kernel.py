"""The native paged decode-attention kernel against the PyTorch gather + SDPA path, and the engine with and
without it."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from cubelm.engine import kernels
from cubelm.engine.config import EngineConfig
from cubelm.engine.kernels import paged_decode
from cubelm.engine.llm_engine import LLMEngine
from cubelm.engine.params import SamplingParams
from cubelm.model.config import ModelConfig
from cubelm.model.transformer import build_model

pytestmark = pytest.mark.skipif(not paged_decode.available(), reason="no C compiler: the kernel cannot be built")


def naive(q, kc, vc, tables, lens, bs, window=None):
    """Per sequence: gather its positions one by one, softmax(q k^T / sqrt(D)) v per query head."""
    S, Hq, D = q.shape
    Hkv = kc.shape[1]
    out = torch.empty_like(q)
    for s in range(S):
        n = int(lens[s])
        pos = torch.arange(n)
        if window is not None:
            pos = pos[pos > n - 1 - window]
        slots = tables[s][pos // bs] * bs + pos % bs
        k = kc[slots].repeat_interleave(Hq // Hkv, dim=1).transpose(0, 1)  # (Hq, n, D)
        v = vc[slots].repeat_interleave(Hq // Hkv, dim=1).transpose(0, 1)
        w = torch.softmax((q[s].unsqueeze(1) @ k.transpose(1, 2)) / D ** 0.5, dim=-1)  # (Hq, 1, n)
        out[s] = (w @ v).squeeze(1)
    return out


@pytest.mark.parametrize("S,Hq,Hkv,D,window", [
    (1, 4, 2, 64, None),  # batch 1: one task per KV head
    (3, 8, 8, 32, None),  # MHA
    (20, 12, 4, 64, None),  # GQA, enough sequences for whole-sequence tasks
    (17, 6, 1, 128, None),  # MQA, D = 128
    (9, 4, 2, 24, None),  # an odd head dim (generic path)
    (12, 4, 2, 64, 7),  # sliding window
])
def test_kernel_matches_naive_attention(S, Hq, Hkv, D, window):
    g = torch.Generator().manual_seed(S * 100 + Hq)
    bs, num_blocks = 4, 1000
    kc, vc = torch.randn(num_blocks * bs, Hkv, D, generator=g), torch.randn(num_blocks * bs, Hkv, D, generator=g)
    lens = torch.randint(1, 90, (S,), generator=g)
    lens[0] = 1  # a context of one token
    max_blocks = -(-int(lens.max()) // bs)
    tables = torch.randperm(num_blocks, generator=g)[:S * max_blocks].view(S, max_blocks).contiguous()
    q = torch.randn(S, Hq, D, generator=g)
    got = paged_decode.paged_decode_attention(q, kc, vc, tables, lens, bs, window)
    torch.testing.assert_close(got, naive(q, kc, vc, tables, lens, bs, window), atol=1e-5, rtol=1e-5)


def test_kernel_matches_the_gather_path_inside_sdpa_shapes():
    """Same numbers as the engine's PyTorch path (block gather + masked SDPA) on a realistic batch."""
    g = torch.Generator().manual_seed(3)
    S, Hkv, G, D, bs = 32, 4, 3, 64, 16
    kc, vc = torch.randn(3000 * bs, Hkv, D, generator=g), torch.randn(3000 * bs, Hkv, D, generator=g)
    lens = torch.randint(1, 700, (S,), generator=g)
    max_blocks = -(-int(lens.max()) // bs)
    tables = torch.randperm(3000, generator=g)[:S * max_blocks].view(S, max_blocks).contiguous()
    q = torch.randn(S, Hkv * G, D, generator=g)
    kd = kc.view(-1, bs, Hkv, D)[tables.flatten()].view(S, -1, Hkv, D).transpose(1, 2)
    vd = vc.view(-1, bs, Hkv, D)[tables.flatten()].view(S, -1, Hkv, D).transpose(1, 2)
    mask = (torch.arange(max_blocks * bs) < lens[:, None])[:, None, None, :]
    ref = F.scaled_dot_product_attention(q.view(S, Hkv, G, D), kd, vd, attn_mask=mask).reshape(S, Hkv * G, D)
    torch.testing.assert_close(paged_decode.paged_decode_attention(q, kc, vc, tables, lens, bs), ref,
                               atol=1e-5, rtol=1e-5)


def _run(model, prompts, use_kernel):
    engine = LLMEngine(model, None, EngineConfig(num_blocks=200, block_size=4, max_num_batched_tokens=40),
                       log=lambda m: None)
    engine.runner.attn.use_kernel = use_kernel
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    outs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out.outputs[0].token_ids
    engine.block_manager.check_whole()
    return [outs[str(i)] for i in range(len(prompts))]


def test_engine_outputs_same_with_and_without_kernel():
    cfg = ModelConfig(vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256, sliding_window=24)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 300, (int(n),), generator=g).tolist() for n in torch.randint(2, 50, (9,), generator=g)]
    with_kernel = _run(build_model(cfg, seed=0).eval(), prompts, True)
    without = _run(build_model(cfg, seed=0).eval(), prompts, False)
    assert with_kernel == without


def test_disabled_kernels_fall_back(tmp_path):
    code = ("from cubelm.engine.kernels import paged_decode, load; import torch;"
            "assert load('paged_decode') is None and not paged_decode.supports(torch.zeros(1))")
    env = {"CUBELM_KERNELS": "0", "CUBELM_KERNEL_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    assert not list(tmp_path.iterdir())


def test_build_is_cached_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("CUBELM_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(kernels, "_loaded", {})
    assert kernels.load("paged_decode") is not None
    built = list(tmp_path.glob("paged_decode-*.so"))
    assert len(built) == 1 and not list(tmp_path.glob("*.tmp.so"))
    monkeypatch.setattr(kernels, "_compile", lambda *a: pytest.fail("rebuilt a cached kernel"))
    monkeypatch.setattr(kernels, "_loaded", {})
    assert kernels.load("paged_decode") is not None


def test_unwritable_cache_falls_back(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("CUBELM_KERNEL_CACHE", str(blocker / "kernels"))
    monkeypatch.setattr(kernels, "_loaded", {})
    assert kernels.load("paged_decode") is None
    assert "using the PyTorch path" in capsys.readouterr().err


def test_loading_the_kernels_keeps_subnormals(tmp_path):
    """-ffast-math at link time would add crtfastmath.o, which turns on flush-to-zero for the whole process when
    the library loads; Python, NumPy and torch would then lose every subnormal (seen: hypothesis refusing to run)."""
    code = ("import torch; from cubelm.engine import kernels;"
            "assert all(kernels.load(k) is not None for k in ('paged_decode', 'skinny_gemm'));"
            "assert 5e-324 * 1.0 == 5e-324, 'Python floats flushed';"
            "assert float(torch.tensor(1e-40) * 1.0) > 0, 'torch floats flushed'")
    subprocess.run([sys.executable, "-c", code], env={**os.environ, "CUBELM_KERNEL_CACHE": str(tmp_path)},
                   check=True)
    assert not list(tmp_path.glob("*.o")) and not list(tmp_path.glob("*.tmp.so"))  # no build leftovers
