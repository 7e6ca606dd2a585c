"""Multi-LoRA in the engine: rows of several adapters and the base model in the same steps give exactly what each
request gives alone on its adapter's merged model; the prefix cache never crosses adapters; the slot limit holds;
bad adapters are refused with the reason; an adapter that vanishes fails its own requests only."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch

from cubelm.engine.config import EngineConfig
from cubelm.engine.decode_layout import apply_decode_layout
from cubelm.engine.llm_engine import LLMEngine
from cubelm.engine.lora import LoRARequest
from cubelm.engine.lora.layers import LoRAContext, apply_batched_lora
from cubelm.engine.params import SamplingParams
from cubelm.engine.runner import _segments
from cubelm.errors import CubelmError
from cubelm.finetune.config import LoraConfig
from cubelm.finetune.lora import LoRALinear
from cubelm.model.hf_io import load_model
from lora_helpers import ADAPTERS, VOCAB, make_adapter, make_model_dir, merged_model

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlora")
    base = make_model_dir(root)
    adapters = {name: make_adapter(base, root / name, cfg, seed=i + 1) for i, (name, cfg) in enumerate(ADAPTERS.items())}
    return base, adapters


def workload(adapters: dict) -> list[tuple[list[int], str | None]]:
    """(prompt, adapter name) pairs: every prompt on every adapter and the base, all starting with the same 9-token
    prefix (two full blocks of 4: a hit across adapters would reuse wrong K/V), plus the same prompt twice."""
    g = torch.Generator().manual_seed(5)
    prefix = torch.randint(3, VOCAB, (9,), generator=g).tolist()
    tails = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (1, 6, 14)]
    names = [None, *adapters]
    return [(prefix + tail, name) for tail in tails for name in names] + [(prefix + tails[1], "qv")]


def engine_run(model, items, adapters, **cfg):
    engine = LLMEngine(model, None, EngineConfig(**{"num_blocks": 128, "block_size": 4, **cfg}), log=lambda m: None)
    for i, (prompt, name) in enumerate(items):
        lora = LoRARequest(name, str(adapters[name])) if name else None
        engine.add_request(str(i), prompt, GREEDY, lora_request=lora)
    done, steps = {}, []
    while engine.has_unfinished_requests():
        batch_loras = {s.lora_id for s in engine.scheduler.running}
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        steps.append(batch_loras | {s.lora_id for s in engine.scheduler.running})
    engine.block_manager.check_whole()
    return [done[str(i)] for i in range(len(items))], engine, steps


@pytest.fixture(scope="module")
def reference(dirs):
    """Each request alone, on an engine without LoRA over its adapter's merged model."""
    base, adapters = dirs
    items = workload(adapters)
    models = {name: merged_model(base, adapters[name] if name else None) for name in [None, *adapters]}
    out = []
    for prompt, name in items:
        tokens, _, _ = engine_run(models[name], [(prompt, None)], adapters, enable_prefix_caching=False)
        out.append(tokens[0])
    # the adapters matter: each changes the greedy continuation of some prompt (else the test would prove nothing)
    for name in adapters:
        assert any(out[i] != out[j] for i, (p, n) in enumerate(items) for j, (q, m) in enumerate(items)
                   if p == q and n == name and m is None)
    return items, out


@pytest.mark.parametrize("decode_layout", [True, False])
@pytest.mark.parametrize("prefix_caching", [True, False])
def test_mixed_batch_equals_each_request_alone_on_its_merged_model(dirs, reference, decode_layout, prefix_caching):
    base, adapters = dirs
    items, want = reference
    model = load_model(base)
    got, engine, _ = engine_run(model, items, adapters, enable_lora=True, max_loras=3, max_lora_rank=16,
                                decode_layout=decode_layout, enable_prefix_caching=prefix_caching)
    assert got == want
    if prefix_caching:  # run it again: now every prompt's prefix is cached, under each adapter separately
        hits_before = engine.block_manager.prefix_hits
        for i, (prompt, name) in enumerate(items):
            lora = LoRARequest(name, str(adapters[name])) if name else None
            engine.add_request(f"again-{i}", prompt, GREEDY, lora_request=lora)
        again = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    again[out.request_id] = out.outputs[0].token_ids
        assert [again[f"again-{i}"] for i in range(len(items))] == want
        assert engine.block_manager.prefix_hits > hits_before


def test_no_more_adapters_at_once_than_slots_and_cpu_cache_evicts(dirs, reference):
    """3 adapters through 2 slots and a CPU cache of 2: requests wait for a slot, adapters are evicted from memory
    and read again, and the outputs do not change."""
    base, adapters = dirs
    items, want = reference
    got, engine, steps = engine_run(load_model(base), items, adapters, enable_lora=True, max_loras=2,
                                    max_cpu_loras=2, max_num_seqs=4)
    assert got == want
    assert max(len(ids - {0}) for ids in steps) <= 2
    assert len(engine.lora_manager._cpu) <= 2


def test_prefix_cache_is_keyed_by_adapter():
    from cubelm.engine.block_manager import BlockManager
    from cubelm.engine.sequence import Sequence

    class Adapter:
        def __init__(self, lora_id):
            self.lora_id = lora_id

    bm = BlockManager(16, 4)
    tokens = list(range(10, 23))

    def admit(lora):
        seq = Sequence("r", 0, tokens, GREEDY, lora=lora)
        bm.allocate_prefix(seq)
        return seq

    first = admit(Adapter(7))
    bm.append(first, first.num_uncomputed_tokens)
    first.num_computed_tokens = first.num_tokens
    bm.commit(first)
    assert admit(None).num_cached_tokens == 0  # the base model: no hit
    assert admit(Adapter(8)).num_cached_tokens == 0  # another adapter: no hit
    assert admit(Adapter(7)).num_cached_tokens == 12  # the same adapter: three full blocks


def _random_adapter(layer, r, g):
    a = torch.randn(r, layer.in_features, generator=g) * 0.3
    b = torch.randn(layer.out_features, r, generator=g) * 0.3
    return a, b


@pytest.mark.parametrize("path", ["kernel", "pytorch"])
@pytest.mark.parametrize("decode_layout", [False, True])
def test_batched_layer_equals_lora_linear_row_by_row(decode_layout, path):
    """Every projection kind (nn.Linear, BlockedLinear, fused q/k/v and gate/up slices), rows of 3 slots and the
    base interleaved (several segments per slot, some longer than the kernel's 4-row tiles), ranks below the padded
    maximum and above one 16-rank pass, a slot that skips a module; the native kernel and the PyTorch path."""
    from cubelm.engine.kernels import lora_delta
    if path == "kernel" and not lora_delta.available():
        pytest.skip("native kernels unavailable (no C compiler, or CUBELM_KERNELS=0); the pytorch case still runs")
    from cubelm.model.config import ModelConfig
    from cubelm.model.transformer import build_model
    cfg = ModelConfig(vocab_size=64, hidden_size=48, intermediate_size=80, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    model = build_model(cfg, seed=0).eval()
    plain = copy.deepcopy(model)
    if decode_layout:
        apply_decode_layout(model)
    context = LoRAContext()
    layers = apply_batched_lora(model, context, max_loras=3, max_rank=20)
    for layer in layers.values():
        layer.use_kernel = path == "kernel"
    g = torch.Generator().manual_seed(0)
    ranks, scales = [20, 3, 5], [0.5, 2.0, 1.0]
    weights = {}
    for name, layer in layers.items():
        for slot, (r, s) in enumerate(zip(ranks, scales)):
            if slot == 2 and name.endswith("v_proj"):
                layer.set_slot(slot, None)  # this adapter does not target v_proj
                continue
            a, b = _random_adapter(layer, r, g)
            weights[name, slot] = (a, b, s)
            layer.set_slot(slot, (a, (b * s).T.contiguous()))
    slots = [-1, 0, 0, 2, 1, -1, 2, 2, 0, 1, 1, -1, 1, 1, 1, 1, 1, 1, 0]
    context.set(_segments(list(range(len(slots))), [1] * len(slots), slots))
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    ref_attn, ref_mlp = plain.model.layers[0].self_attn, plain.model.layers[0].mlp
    with torch.inference_mode():
        for group, ref_group, names, width in ((attn, ref_attn, ("q_proj", "k_proj", "v_proj"), 48),
                                               (attn, ref_attn, ("o_proj",), cfg.q_size),
                                               (mlp, ref_mlp, ("gate_proj", "up_proj"), 48),
                                               (mlp, ref_mlp, ("down_proj",), 80)):
            x = torch.randn(1, len(slots), width, generator=g)
            for proj in names:  # in the model's order: the fused slices share one input
                got = getattr(group, proj)(x)[0]
                qualified = next(n for n in layers if n.endswith(proj))
                for row, slot in enumerate(slots):
                    base = getattr(ref_group, proj)
                    if slot < 0 or (qualified, slot) not in weights:
                        want = base(x[0, row])
                    else:
                        a, b, s = weights[qualified, slot]
                        ref = LoRALinear(base, a.shape[0], s)
                        ref.lora_A.weight.copy_(a)
                        ref.lora_B.weight.copy_(b)
                        want = ref(x[0, row])
                    torch.testing.assert_close(got[row], want, atol=1e-5, rtol=1e-5)


def test_ngram_speculation_with_adapters_is_exact(dirs, reference):
    from cubelm.engine.speculative import SpeculativeConfig
    base, adapters = dirs
    items, want = reference
    got, _, _ = engine_run(load_model(base), items, adapters, enable_lora=True, max_loras=3,
                           speculative=SpeculativeConfig(method="ngram", num_speculative_tokens=3))
    assert got == want


# ---- bad adapters --------------------------------------------------------------------------------------------
def _corrupt(path):
    (path / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")


def _lacking_module(path):
    """An adapter for a model that has a `c_attn` projection (GPT-2 style)."""
    from safetensors.torch import save_file
    save_file({"base_model.model.model.layers.0.self_attn.c_attn.lora_A.weight": torch.zeros(4, 64),
               "base_model.model.model.layers.0.self_attn.c_attn.lora_B.weight": torch.zeros(64, 4)},
              path / "adapter_model.safetensors")


def _nan(path):
    from safetensors.torch import load_file, save_file
    tensors = load_file(path / "adapter_model.safetensors")
    next(iter(tensors.values()))[0, 0] = float("nan")
    save_file(tensors, path / "adapter_model.safetensors")


BAD = [
    ("missing", lambda p: shutil.rmtree(p), "not an adapter directory"),
    ("corrupt", _corrupt, "not a readable safetensors file"),
    ("rank above max", None, "above --max-lora-rank 8"),
    ("module the model lacks", _lacking_module, "modules this model lacks"),
    ("target the model lacks", lambda p: (p / "adapter_config.json").write_text(
        (p / "adapter_config.json").read_text().replace('"q_proj"', '"c_fc"')), "targets c_fc"),
    ("other model's shapes", "wide", "trained for another model"),
    ("non-finite", _nan, "non-finite"),
]


@pytest.mark.parametrize("spoil,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_adapter_is_refused_with_the_reason(dirs, tmp_path, spoil, message):
    base, adapters = dirs
    path = tmp_path / "bad"
    if spoil == "wide":
        make_adapter(make_model_dir(tmp_path, hidden_size=32, intermediate_size=48), path, LoraConfig(r=4), seed=0)
    else:
        shutil.copytree(adapters["mixed" if spoil is None else "all7"], path)
        if spoil is not None:
            spoil(path)
    engine = LLMEngine(load_model(base), None, EngineConfig(num_blocks=64, enable_lora=True, max_lora_rank=8),
                       log=lambda m: None)
    with pytest.raises(CubelmError, match=message):
        engine.add_request("bad", [5, 6, 7], GREEDY, lora_request=LoRARequest("bad", str(path)))
    assert not engine.has_unfinished_requests() and not engine.lora_manager.adapters()
    engine.add_request("ok", [5, 6, 7], GREEDY, lora_request=LoRARequest("ok", str(adapters["qv"])))
    while engine.has_unfinished_requests():
        engine.step()


def test_lora_request_needs_enable_lora_and_one_path_per_name(dirs):
    base, adapters = dirs
    plain = LLMEngine(load_model(base), None, EngineConfig(num_blocks=64), log=lambda m: None)
    with pytest.raises(CubelmError, match="enable_lora=True"):
        plain.add_request("r", [5, 6], GREEDY, lora_request=LoRARequest("a", str(adapters["qv"])))
    engine = LLMEngine(load_model(base), None, EngineConfig(num_blocks=64, enable_lora=True), log=lambda m: None)
    engine.add_request("r1", [5, 6], GREEDY, lora_request=LoRARequest("a", 3, str(adapters["qv"])))
    with pytest.raises(CubelmError, match="one name, one adapter"):
        engine.add_request("r2", [5, 6], GREEDY, lora_request=LoRARequest("a", str(adapters["all7"])))
    with pytest.raises(CubelmError, match="lora_int_id 3"):
        engine.add_request("r3", [5, 6], GREEDY, lora_request=LoRARequest("a", 4, str(adapters["qv"])))
    assert LoRARequest("a", str(adapters["qv"])) == LoRARequest("a", lora_path=str(adapters["qv"]))
    with pytest.raises(CubelmError, match="lora_int_id"):
        LoRARequest("a", 0, "x")
    with pytest.raises(CubelmError, match="compile_decode"):
        EngineConfig(enable_lora=True, compile_decode=True)
    with pytest.raises(CubelmError, match="max_cpu_loras"):
        EngineConfig(enable_lora=True, max_loras=4, max_cpu_loras=2)


def test_adapter_gone_from_disk_fails_its_requests_only(dirs, tmp_path):
    """max_cpu_loras=1: loading `b` evicts `a` from memory; `a`'s files are then deleted, so its next request
    cannot get a slot. It fails with the reason; the base and `b` requests in the same steps finish."""
    base, adapters = dirs
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    shutil.copytree(adapters["all7"], a_dir)
    shutil.copytree(adapters["qv"], b_dir)
    engine = LLMEngine(load_model(base), None, EngineConfig(num_blocks=64, enable_lora=True, max_cpu_loras=1),
                       log=lambda m: None)
    a, b = LoRARequest("a", str(a_dir)), LoRARequest("b", str(b_dir))
    engine.add_request("a", [5, 6, 7], GREEDY, lora_request=a)
    engine.add_request("b", [5, 6, 7], GREEDY, lora_request=b)  # registers b: a leaves the CPU cache
    engine.add_request("base", [5, 6, 7], GREEDY)
    shutil.rmtree(a_dir)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert "cannot be re-read" in done["a"].error and done["a"].outputs[0].finish_reason == "error"
    assert done["b"].error is None and len(done["b"].outputs[0].token_ids) == GREEDY.max_tokens
    assert done["base"].error is None and len(done["base"].outputs[0].token_ids) == GREEDY.max_tokens
    engine.block_manager.check_whole()


def test_offline_llm_generate_with_lora_requests(dirs, reference, tmp_path):
    """``LLM.generate(..., lora_request=...)``: one request for all prompts, or one per prompt."""
    from cubelm.engine.llm import LLM
    base, adapters = dirs
    items, want = reference
    llm = LLM.__new__(LLM)  # the offline API over an engine on this tokenizer-less test model
    import itertools
    llm.engine = LLMEngine(load_model(base), None, EngineConfig(num_blocks=128, block_size=4, enable_lora=True,
                                                                max_loras=3), log=lambda m: None)
    llm._ids = itertools.count()
    loras = [LoRARequest(n, str(adapters[n])) if n else None for _, n in items]
    outs = llm.generate([p for p, _ in items], GREEDY, lora_request=loras, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == want
    qv = [i for i, (_, n) in enumerate(items) if n == "qv"]
    outs = llm.generate([items[i][0] for i in qv], GREEDY, lora_request=LoRARequest("qv", str(adapters["qv"])),
                        use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [want[i] for i in qv]
    with pytest.raises(CubelmError, match="2 lora requests for 3 prompts"):
        llm.generate([[5], [6], [7]], GREEDY, lora_request=[None, None], use_tqdm=False)
