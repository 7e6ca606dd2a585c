"""The int8 KV cache (``kv_cache_dtype="int8"``) against the model-dtype pool: quantization error bound, paged
attention within a stated tolerance, the native kernel against the PyTorch path on the same int8 pool, the
engine's greedy tokens (with prefix caching, preemption, speculative decoding and adapters), and the planner."""

import copy

import pytest
import torch
import torch.nn.functional as F

from cubelm.engine.config import EngineConfig, plan_pool
from cubelm.engine.kernels import paged_decode
from cubelm.engine.kv_cache import KVPool, dequantize_int8, quantize_int8
from cubelm.engine.llm_engine import LLMEngine
from cubelm.engine.paged_attention import PagedAttention, PagedMetadata, PrefillChunk
from cubelm.engine.params import SamplingParams
from cubelm.errors import CubelmError
from cubelm.model.config import ModelConfig
from cubelm.model.transformer import build_model
from cubelm.systems.memory import kv_cache_bytes_per_token

needs_kernel = pytest.mark.skipif(not paged_decode.available(), reason="no C compiler (or CUBELM_KERNELS=0): "
                                                                       "the kernel cannot be built")
VOCAB = 320
CFG = ModelConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, eos_token_id=2)


# ---- quantization ----------------------------------------------------------------------------------------
def test_round_trip_error_is_at_most_half_a_step():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 4, 64, generator=g) * torch.logspace(-6, 3, 500)[:, None, None]  # rows of every magnitude
    x[7, 2] = 0  # an all-zero row
    x[9, 1, 5] = 1e4  # one outlier channel: only its own row pays for it
    codes, scales = quantize_int8(x)
    assert codes.dtype == torch.int8 and scales.dtype == torch.float32 and scales.shape == (500, 4)
    assert int(codes.abs().max()) == 127 and int(codes.min()) >= -127
    back = dequantize_int8(codes, scales)
    bound = x.abs().amax(-1, keepdim=True) / 254  # scale / 2
    assert ((back - x).abs() <= bound * (1 + 1e-5)).all()
    assert (back[7, 2] == 0).all() and torch.equal(back[9, 0], dequantize_int8(*quantize_int8(x[9, 0])))
    # bf16 input, dequantized to bf16: the same codes, then one rounding to bf16
    codes16, scales16 = quantize_int8(x.bfloat16())
    back16 = dequantize_int8(codes16, scales16, torch.bfloat16)
    assert back16.dtype == torch.bfloat16
    torch.testing.assert_close(back16.float(), dequantize_int8(codes16, scales16), rtol=2 ** -8, atol=0)


# ---- paged attention, layer level ------------------------------------------------------------------------
def _filled_pools(num_slots=4000, Hkv=2, D=64, seed=0):
    """An fp32 pool and an int8 pool holding the same random K/V (one layer)."""
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(num_slots, Hkv, D, generator=g), torch.randn(num_slots, Hkv, D, generator=g)
    pools = {}
    for kind in ("auto", "int8"):
        pool = KVPool(1, num_slots, Hkv, D, dtype=torch.float32, device="cpu", kv_cache_dtype=kind)
        pool.write(0, torch.arange(num_slots), k, v)  # what each layer does with its new tokens
        pools[kind] = (pool, PagedAttention(pool, num_heads=Hkv * 3, block_size=16))
    return pools


def _decode_meta(S=12, bs=16, num_blocks=249, seed=1, window=None):
    """Tables over blocks 0..248 of the 250-block pool (the last slot takes the step's scratch write)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 300, (S,), generator=g)
    max_blocks = -(-int(lens.max()) // bs)
    tables = torch.randperm(num_blocks, generator=g)[:S * max_blocks].view(S, max_blocks).contiguous()
    pos = torch.arange(max_blocks * bs)
    mask = pos < lens[:, None]
    if window is not None:
        mask &= pos > lens[:, None] - 1 - window
    return dict(decode_tables=tables, decode_lens=lens, decode_blocks=tables.flatten(),
                decode_mask=mask[:, None, None, :])


def _attend_decodes(attn, q, meta, use_kernel):
    """Attention of decode rows only, reading the pool (the write of the step goes to a scratch slot)."""
    S = q.shape[0]
    attn.meta = PagedMetadata(slot_mapping=torch.full((S,), attn.k_cache.shape[1] - 1), num_decodes=S, **meta)
    attn.use_kernel = use_kernel
    Hkv, D = attn.k_cache.shape[2:]
    zeros = torch.zeros(1, S, Hkv, D)
    return attn(0, q[None], zeros, zeros)[0]


def test_int8_attention_is_close_to_fp32():
    """Stated tolerance: random unit-variance K/V, head_dim 64; the output error of int8 vs fp32 attention is
    below 1% of the output's scale (measured ~0.2%)."""
    pools = _filled_pools()
    meta = _decode_meta()
    q = torch.randn(12, 6, 64, generator=torch.Generator().manual_seed(2))
    ref = _attend_decodes(pools["auto"][1], q, meta, use_kernel=False)
    got = _attend_decodes(pools["int8"][1], q, meta, use_kernel=False)
    err = (got - ref).abs().max() / ref.abs().max()
    assert 0 < err < 0.01


@needs_kernel
@pytest.mark.parametrize("window", [None, 40])
def test_kernel_matches_the_pytorch_path_on_int8(window):
    pools = _filled_pools()
    pool, attn = pools["int8"]
    assert attn.use_kernel and pool.k.dtype == torch.int8
    meta = _decode_meta(window=window)
    attn.sliding_window = window
    q = torch.randn(12, 6, 64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(_attend_decodes(attn, q, meta, True), _attend_decodes(attn, q, meta, False),
                               atol=1e-5, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("S,Hq,Hkv,D", [(1, 4, 2, 64), (20, 12, 4, 64), (17, 6, 1, 128), (9, 4, 2, 24)])
def test_kernel_int8_equals_fp32_kernel_on_the_dequantized_pool(S, Hq, Hkv, D):
    """Every shape path of the C code (task per head / per sequence, D = 64, 128, generic): the int8 kernel gives
    what the fp32 kernel gives on the dequantized cache."""
    g = torch.Generator().manual_seed(S + D)
    bs, num_blocks = 4, 1000
    kc, ks = quantize_int8(torch.randn(num_blocks * bs, Hkv, D, generator=g) * 3)
    vc, vs = quantize_int8(torch.randn(num_blocks * bs, Hkv, D, generator=g))
    lens = torch.randint(1, 90, (S,), generator=g)
    lens[0] = 1
    max_blocks = -(-int(lens.max()) // bs)
    tables = torch.randperm(num_blocks, generator=g)[:S * max_blocks].view(S, max_blocks).contiguous()
    q = torch.randn(S, Hq, D, generator=g)
    got = paged_decode.paged_decode_attention(q, kc, vc, tables, lens, bs, None, ks, vs)
    ref = paged_decode.paged_decode_attention(q, dequantize_int8(kc, ks), dequantize_int8(vc, vs), tables, lens, bs)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_graph_branch_equals_the_buffered_gather(monkeypatch):
    """Inside torch.compile the gathers take no out= buffers; that branch (run eagerly here) gives the same."""
    attn = _filled_pools()["int8"][1]
    meta = _decode_meta()
    q = torch.randn(12, 6, 64, generator=torch.Generator().manual_seed(5))
    eager = _attend_decodes(attn, q, meta, use_kernel=False)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.testing.assert_close(_attend_decodes(attn, q, meta, use_kernel=True), eager, atol=1e-6, rtol=1e-6)


def test_prefill_chunk_reads_the_dequantized_pool():
    """A prompt chunk's attention on the int8 pool equals causal SDPA over the dequantized K/V."""
    pools = _filled_pools(num_slots=256)
    pool, attn = pools["int8"]
    g = torch.Generator().manual_seed(4)
    slots = torch.randperm(255, generator=g)[:50]  # a 50-token context scattered over the pool
    k_new, v_new, q = (torch.randn(1, 10, 2, 64, generator=g), torch.randn(1, 10, 2, 64, generator=g),
                       torch.randn(1, 10, 6, 64, generator=g))
    attn.meta = PagedMetadata(slot_mapping=slots[40:], prefills=[PrefillChunk(0, 10, slots)])
    got = attn(0, q, k_new, v_new)[0]  # (10, Hq, D)
    k = dequantize_int8(pool.k[0][slots], pool.k_scale[0][slots]).transpose(0, 1)[None]  # (1, Hkv, 50, D)
    v = dequantize_int8(pool.v[0][slots], pool.v_scale[0][slots]).transpose(0, 1)[None]
    mask = torch.ones(10, 50, dtype=torch.bool).tril(40)
    ref = F.scaled_dot_product_attention(q[0].transpose(0, 1)[None], k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(got, ref[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
    assert (dequantize_int8(pool.k[0][slots[40:]], pool.k_scale[0][slots[40:]]) - k_new[0]).abs().max() < 0.05


# ---- the engine ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    m = build_model(CFG, seed=0).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(p.numel()))  # spread logits: no near-ties
    return m


def prompts(count, seed, lo=3, hi=60):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(count)]


def run(model, ps, max_tokens=24, *, draft=None, use_kernel=True, logits=None, **cfg):
    """Greedy outputs of ``ps``; ``logits`` (a dict) receives each sampled step's logits by (request id, tokens
    before the step)."""
    engine = LLMEngine(copy.deepcopy(model), None, EngineConfig(**{"num_blocks": 256, "block_size": 4, **cfg}),
                       log=lambda m: None, draft_model=copy.deepcopy(draft) if draft is not None else None)
    engine.runner.attn.use_kernel &= use_kernel
    if logits is not None:
        forward = engine.runner.run

        def recording(seqs, num_new, **kwargs):
            out, offsets = forward(seqs, num_new, **kwargs)
            for seq, n, row in zip(seqs, num_new, offsets):
                if seq.num_computed_tokens + n == len(seq.token_ids):  # the step samples from this row
                    logits[seq.request_id, len(seq.token_ids)] = out[row].clone()
            return out, offsets

        engine.runner.run = recording
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for i, p in enumerate(ps):
        engine.add_request(str(i), p, params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    engine.block_manager.check_whole()
    return [done[str(i)] for i in range(len(ps))], engine


def test_engine_int8_logits_close_to_fp32_and_tokens_differ_only_at_near_ties(model):
    """Stated agreement. Over each sequence's common prefix (same context in both runs) the int8 logits are within
    0.2 logit standard deviations of fp32's (measured <= 0.12 on this head_dim-16 model); where greedy tokens part,
    fp32's margin between the two tokens is below the int8 logit error of that step (a near-tie, not a bug)."""
    ps = prompts(8, seed=1)
    ref_logits, int8_logits = {}, {}
    ref, _ = run(model, ps, kv_cache_dtype="auto", logits=ref_logits)
    got, engine = run(model, ps, kv_cache_dtype="int8", logits=int8_logits)
    assert engine.runner.k_cache.dtype == torch.int8
    num_equal = 0
    for i, (p, a, b) in enumerate(zip(ps, ref, got)):
        split = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        num_equal += split == len(a)
        for j in range(min(split + 1, len(a))):
            la, lb = ref_logits[str(i), len(p) + j], int8_logits[str(i), len(p) + j]
            err = (la - lb).abs().max()
            assert 0 < err < 0.2 * la.std()
            if j == split:
                assert la[a[j]] - la[b[j]] <= 2 * err
    assert num_equal >= 4  # measured 5 of 8 sequences identical for all 24 tokens
    assert run(model, ps, kv_cache_dtype="int8", use_kernel=False)[0] == got  # kernel and gather path agree


def test_int8_with_prefix_cache_preemption_and_speculation(model):
    shared = prompts(1, seed=5, lo=40, hi=41)[0]
    ps = [shared + p for p in prompts(4, seed=6, lo=1, hi=20)] + prompts(2, seed=7)
    base, _ = run(model, ps, 20, kv_cache_dtype="int8", enable_prefix_caching=False)
    # a budget of 48 tokens admits the prompts over several steps, so later ones find earlier ones' blocks
    cached, engine = run(model, ps, 20, kv_cache_dtype="int8", max_num_batched_tokens=48)
    assert engine.block_manager.prefix_hits > 0
    tiny, engine = run(model, ps, 20, kv_cache_dtype="int8", num_blocks=30, max_num_batched_tokens=32)
    assert engine.scheduler.num_preemptions > 0
    from cubelm.engine.speculative import SpeculativeConfig
    spec, engine = run(model, ps, 20, draft=model, kv_cache_dtype="int8",
                       speculative=SpeculativeConfig(method="draft", draft_model="x", num_speculative_tokens=3))
    assert engine.spec_proposed > 0 and engine.proposer.runner.k_cache.dtype == torch.int8
    assert base == cached == tiny == spec


def test_int8_with_adapters_equals_each_request_alone_on_its_merged_model(tmp_path):
    from cubelm.engine.lora import LoRARequest
    from cubelm.model.hf_io import load_model
    from lora_helpers import ADAPTERS, make_adapter, make_model_dir, merged_model
    base = make_model_dir(tmp_path)
    adapter = make_adapter(base, tmp_path / "all7", ADAPTERS["all7"], seed=1)
    ps = prompts(2, seed=9, lo=5, hi=30)
    ps = [[min(t, 159) for t in p] for p in ps]  # lora_helpers' vocabulary is 160
    want = [run(merged_model(base, a), [p], 12, kv_cache_dtype="int8")[0][0] for p in ps for a in (None, adapter)]
    engine = LLMEngine(load_model(base), None, EngineConfig(num_blocks=128, block_size=4, kv_cache_dtype="int8",
                                                            enable_lora=True, max_loras=1), log=lambda m: None)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    for i, (p, a) in enumerate((p, a) for p in ps for a in (None, adapter)):
        engine.add_request(str(i), p, params, lora_request=LoRARequest("a", str(a)) if a else None)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    assert [done[str(i)] for i in range(4)] == want and want[0] != want[1]


# ---- planner and configuration ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_planner_gives_int8_more_blocks_for_the_same_budget(dtype):
    param = torch.zeros(1, dtype=dtype)
    D = CFG.head_dim
    ratio = param.element_size() * D / (D + 4)  # per cached row: D values vs D codes + an fp32 scale
    auto = plan_pool(CFG, EngineConfig(kv_cache_memory="64MiB", max_num_seqs=10_000), param, 512)
    int8 = plan_pool(CFG, EngineConfig(kv_cache_memory="64MiB", max_num_seqs=10_000, kv_cache_dtype="int8"),
                     param, 512)
    assert int8.bytes_per_block == 16 * kv_cache_bytes_per_token(CFG, "int8") == 16 * 2 * 2 * 2 * (D + 4)
    assert int8.num_blocks == pytest.approx(auto.num_blocks * ratio, rel=1e-3)
    assert "int8 + fp32 scales" in int8.describe() and "int8" not in auto.describe()
    # what the planner counts is what the pool allocates
    pool = KVPool(CFG.num_hidden_layers, 10 * 16, CFG.num_key_value_heads, CFG.head_dim, dtype=dtype, device="cpu",
                  kv_cache_dtype="int8")
    assert pool.nbytes == 10 * int8.bytes_per_block


@pytest.mark.parametrize("bad", ["fp8", "INT8", "float16", None])
def test_bad_kv_cache_dtype_is_a_one_line_error(bad):
    with pytest.raises(CubelmError, match="kv_cache_dtype must be one of auto, int8") as e:
        EngineConfig(kv_cache_dtype=bad)
    assert "\n" not in str(e.value)
