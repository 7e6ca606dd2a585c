"""The paged engine against references: transformers, the contiguous-cache generator, cache/pool settings."""

import pytest
import torch

from cubelm.engine.config import EngineConfig
from cubelm.engine.llm_engine import LLMEngine
from cubelm.engine.params import SamplingParams
from cubelm.engine.reference import generate_tokens
from cubelm.model.hf_io import load_model

transformers = pytest.importorskip("transformers")
VOCAB = 320


@pytest.fixture(scope="module")
def hf_model_dir(tmp_path_factory):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="eager")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)  # spread logits: no near-ties for greedy
    path = tmp_path_factory.mktemp("llama")
    hf.save_pretrained(path)
    return path, hf


@pytest.fixture(scope="module")
def model(hf_model_dir):
    return load_model(hf_model_dir[0])


def prompts(count=10, seed=0, lo=3, hi=60):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(count)]


def run(model, ps, params, *, draft=None, probe=None, **cfg):
    engine = LLMEngine(model, None, EngineConfig(**{"num_blocks": 256, "block_size": 4, **cfg}), log=lambda m: None,
                       draft_model=draft)
    params = params if isinstance(params, list) else [params] * len(ps)
    for i, (p, sp) in enumerate(zip(ps, params)):
        engine.add_request(str(i), p, sp)
    batch_tokens = record_batch_tokens(engine)
    if probe is not None:
        probe(engine)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    engine.block_manager.check_whole()
    assert max(batch_tokens) <= engine.config.max_num_batched_tokens
    return [done[str(i)] for i in range(len(ps))], engine


def record_batch_tokens(engine) -> list[int]:
    """Tokens the target model runs in each step (prompt chunks, decodes and the drafts they verify)."""
    sizes, run_model = [], engine.runner.run

    def recording(seqs, num_new, **kwargs):
        sizes.append(sum(num_new))
        return run_model(seqs, num_new, **kwargs)

    engine.runner.run = recording
    return sizes


GREEDY = SamplingParams(temperature=0, max_tokens=24)


def test_greedy_batch_matches_transformers_and_reference(hf_model_dir, model):
    _, hf = hf_model_dir
    ps = prompts(10)
    outs, _ = run(model, ps, GREEDY, max_num_batched_tokens=64)
    for p, out in zip(ps, outs):
        ids = torch.tensor([p])
        with torch.no_grad():
            expected = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24,
                                   pad_token_id=0)[0, len(p):].tolist()
        if expected and expected[-1] == 2:
            expected = expected[:-1]
        assert out.outputs[0].token_ids == expected
        ref = list(generate_tokens(model, p, SamplingParams(temperature=0, max_tokens=24)))
        assert out.outputs[0].token_ids == ref


def test_prefix_cache_and_preemption_do_not_change_outputs(model):
    shared = prompts(1, seed=5, lo=40, hi=41)[0]
    ps = [shared + p for p in prompts(8, seed=6, lo=1, hi=20)] + prompts(4, seed=7)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    base, _ = run(model, ps, params, enable_prefix_caching=False)
    # a budget of 48 tokens admits the prompts over several steps, so later ones find earlier ones' blocks
    cached, engine = run(model, ps, params, enable_prefix_caching=True, max_num_batched_tokens=48)
    assert engine.block_manager.prefix_hits > 0
    tiny, engine = run(model, ps, params, num_blocks=40, max_num_batched_tokens=32)
    assert engine.scheduler.num_preemptions > 0
    for a, b, c in zip(base, cached, tiny):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids == c.outputs[0].token_ids


def test_seeded_request_is_batch_invariant(model):
    target = prompts(1, seed=11)[0]
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=32, ignore_eos=True)
    alone, _ = run(model, [target], params)
    others = prompts(16, seed=12)
    mixed, _ = run(model, others[:8] + [target] + others[8:],
                   [SamplingParams(temperature=0.8, max_tokens=20)] * 8 + [params] +
                   [SamplingParams(temperature=0, max_tokens=40)] * 8)
    assert mixed[8].outputs[0].token_ids == alone[0].outputs[0].token_ids


def test_chunked_prefill_does_not_stall_decodes(model):
    engine = LLMEngine(model, None, EngineConfig(num_blocks=256, block_size=4, max_num_batched_tokens=16),
                       log=lambda m: None)
    engine.add_request("short", [5, 6, 7], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    engine.step()  # prefill the short one
    engine.add_request("long", list(range(3, 203)), SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    batch_tokens = record_batch_tokens(engine)
    for _ in range(5):  # while the 200-token prompt is chunked in, the running decode advances every step
        before = len(engine.requests["short"].seqs[0].output_token_ids)
        engine.step()
        assert len(engine.requests["short"].seqs[0].output_token_ids) == before + 1
    # the decode and a 15-token chunk of the prompt: the budget is used in full and never exceeded
    assert batch_tokens == [16] * 5


def test_n_best_share_prompt_blocks_and_seeds(model):
    p = prompts(1, seed=3, lo=30, hi=31)[0]
    outs, engine = run(model, [p], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True))
    assert len(outs[0].outputs) == 3 and engine.block_manager.prefix_hits >= 2 * (len(p) // 4 * 4 - 4)
    texts = [o.token_ids for o in outs[0].outputs]
    assert len({tuple(t) for t in texts}) > 1
    again, _ = run(model, [p], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True))
    assert [o.token_ids for o in again[0].outputs] == texts


def test_logprobs_and_stop_tokens(model):
    p = prompts(1, seed=9)[0]
    free, _ = run(model, [p], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3))
    toks = free[0].outputs[0].token_ids
    lps = free[0].outputs[0].logprobs
    assert len(lps) == 12 and all(len(lp.top) == 3 and lp.token_id == t for lp, t in zip(lps, toks))
    assert all(lp.logprob == max(lp.top.values()) for lp in lps)  # greedy picks the top token
    stopped, _ = run(model, [p], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                stop_token_ids=[toks[4]]))
    out = stopped[0].outputs[0]
    assert out.token_ids == toks[:toks.index(toks[4])] and out.finish_reason == "stop"
    assert out.stop_reason == toks[4]
    length, _ = run(model, [p], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert length[0].outputs[0].finish_reason == "length" and len(length[0].outputs[0].token_ids) == 5


def test_abort_frees_blocks(model):
    engine = LLMEngine(model, None, EngineConfig(num_blocks=64, block_size=4), log=lambda m: None)
    for i, p in enumerate(prompts(6)):
        engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    for i in range(6):
        engine.abort_request(str(i))
    assert not engine.has_unfinished_requests()
    engine.block_manager.check_whole()


@pytest.mark.parametrize("kwargs, name", [
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(stop=[3]), "stop"), (dict(n=0), "n"), (dict(min_p=2), "min_p")])
def test_bad_sampling_params(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_prompt_longer_than_context(model):
    engine = LLMEngine(model, None, EngineConfig(num_blocks=256, block_size=4), log=lambda m: None)
    with pytest.raises(ValueError, match="context length"):
        engine.add_request("x", [5] * 600, SamplingParams())


@pytest.fixture(scope="module")
def draft_model(tmp_path_factory):
    from cubelm.model.config import ModelConfig
    from cubelm.model.transformer import build_model
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512, eos_token_id=2)
    return build_model(cfg, seed=4).eval()


def run_spec(model, ps, params, spec, draft=None, **cfg):
    from cubelm.engine.speculative import SpeculativeConfig
    return run(model, ps, params, draft=draft, speculative=SpeculativeConfig(**spec), **cfg)


def watch_recompute_chunks_of_one(engine, counts: list[int]) -> None:
    """Per step, count the 1-token chunks of sequences that have output but are still recomputing (after a
    preemption): they look like decodes but are not."""
    schedule = engine.scheduler.schedule

    def watching():
        batch = schedule()
        counts.append(sum(n == 1 < s.num_uncomputed_tokens and s.num_output_tokens > 0
                          for s, n in zip(batch.seqs, batch.num_new_tokens)))
        return batch

    engine.scheduler.schedule = watching


def test_speculative_greedy_is_exact(model, draft_model):
    ps = prompts(6, seed=21)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    plain, _ = run(model, ps, params)
    # a draft that agrees with the target: the target itself (all accepted) and a random small model (mostly not)
    for draft in (model, draft_model):
        spec, engine = run_spec(model, ps, params, dict(method="draft", draft_model="x", num_speculative_tokens=3),
                                draft=draft)
        assert [o.outputs[0].token_ids for o in spec] == [o.outputs[0].token_ids for o in plain]
        assert engine.spec_proposed > 0
        if draft is model:
            assert engine.spec_acceptance_rate == 1.0
    # repetitive prompts so that prompt lookup finds n-grams
    rep = [p[:8] * 4 for p in ps]
    plain, _ = run(model, rep, params)
    spec, engine = run_spec(model, rep, params, dict(method="ngram", num_speculative_tokens=4))
    assert [o.outputs[0].token_ids for o in spec] == [o.outputs[0].token_ids for o in plain]
    assert engine.spec_proposed > 0


def test_speculative_with_preemption_and_tiny_pool(model, draft_model):
    ps = prompts(8, seed=23)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    plain, _ = run(model, ps, params)
    # run() also checks that no step runs more tokens than the budget, drafts included (they used to bypass it)
    spec, engine = run_spec(model, ps, params, dict(method="draft", draft_model="x", num_speculative_tokens=4),
                            draft=draft_model, num_blocks=40, max_num_batched_tokens=32)
    assert engine.scheduler.num_preemptions > 0 and engine.spec_proposed > 0
    assert [o.outputs[0].token_ids for o in spec] == [o.outputs[0].token_ids for o in plain]


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_speculative_skips_one_token_chunks_of_a_recompute(model, draft_model, method):
    # budget 2: the old request decodes one token per step (logprobs: never speculative), so once the young one is
    # preempted it recomputes in 1-token chunks; drafts there were verified at the wrong positions
    old = prompts(1, seed=1, lo=5, hi=6)[0]
    young = (prompts(1, seed=2, lo=3, hi=4)[0] * 3)[:9]  # repetitive: n-gram lookup finds proposals
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0),
              SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)]
    plain, _ = run(model, [old, young], params)
    chunks = []
    spec, engine = run_spec(model, [old, young], params, dict(method=method, draft_model="x", num_speculative_tokens=2),
                            draft=draft_model if method == "draft" else None, num_blocks=10, max_num_batched_tokens=2,
                            enable_prefix_caching=False, probe=lambda e: watch_recompute_chunks_of_one(e, chunks))
    assert engine.scheduler.num_preemptions > 0 and sum(chunks) > 0 and engine.spec_proposed > 0
    assert [o.outputs[0].token_ids for o in spec] == [o.outputs[0].token_ids for o in plain]


def test_rejection_sampling_preserves_the_target_distribution():
    from cubelm.engine.speculative import verify
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    counts = torch.zeros(4)
    n = 20000
    for _ in range(n):
        x = int(torch.multinomial(q[0], 1, generator=g))
        accepted, token = verify([x], q, p, g)
        counts[x if accepted else token] += 1
    torch.testing.assert_close(counts / n, p[0], atol=0.012, rtol=0)
