"""Sampling is numerically safe for every value the API accepts: no NaN row, no exception, the most likely token
always survives; out-of-range values are refused by ``SamplingParams`` with the parameter's name."""

import math

import pytest
import torch

from cubelm.engine.params import SamplingParams
from cubelm.engine.sampler import sample_batch
from cubelm.engine.sampling import filter_logits, sample, sample_probs
from cubelm.engine.sequence import Sequence

V = 50
EXTREME = [
    dict(temperature=1.0, top_p=1.8e-176), dict(temperature=1.0, top_p=5e-324), dict(temperature=1e-300),
    dict(temperature=5e-324, top_p=0.5), dict(temperature=1.0001e-5), dict(temperature=1e300),
    dict(temperature=1.0, min_p=5e-324), dict(temperature=1.0, min_p=1.0), dict(temperature=1.0, top_k=10**30),
    dict(temperature=0.7, repetition_penalty=1e-300), dict(temperature=0.7, repetition_penalty=1e300),
    dict(temperature=1.0, presence_penalty=-2, frequency_penalty=2, top_k=1, top_p=1e-300, min_p=1.0),
    dict(temperature=2.0, logprobs=20, seed=2**63 - 1), dict(temperature=0, logprobs=20, seed=-2**63),
]


def logits_rows(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, V, generator=g) * 5
    x[0, 3] = 1e30  # one huge logit
    return x


@pytest.mark.parametrize("kw", EXTREME, ids=[",".join(f"{k}={v:g}" for k, v in kw.items()) for kw in EXTREME])
def test_extreme_but_valid_params_sample_a_valid_token(kw):
    params = SamplingParams(max_tokens=8, **kw)
    seqs = [Sequence("r", i, [1, 2, 3, 4, 5, 6], params) for i in range(3)]
    for s in seqs:
        s.token_ids += [7, 8, 9]  # output tokens, so that presence/frequency penalties apply
    logits = logits_rows(3)
    tokens, records = sample_batch(logits, seqs, torch.Generator().manual_seed(1))
    assert all(0 <= t < V for t in tokens)
    if kw.get("top_p", 1) < 1e-30 or kw.get("min_p") == 1.0 or params.greedy:
        # nothing but the most likely (penalized) token may survive: the row's argmax
        if not params.has_penalties:
            assert tokens == logits.argmax(-1).tolist()
    for r in records:
        assert r is None or (math.isfinite(r.logprob) or r.logprob == -math.inf)


def test_probabilities_are_always_a_distribution():
    logits = logits_rows(4)
    logits[1] = float("nan")  # a model that emits NaN: the row falls back to a one-hot, the batch survives
    logits[2, :10] = float("inf")
    logits[3] = float("-inf")
    probs = sample_probs(logits, torch.tensor([1e-300, 1.0, 1e300, 1.0]), torch.tensor([0, 5, 0, 0]),
                         torch.tensor([1e-30, 1.0, 0.5, 1.0]), torch.tensor([0.0, 0.0, 1.0, 0.0]))
    assert torch.isfinite(probs).all() and torch.allclose(probs.sum(-1), torch.ones(4))
    assert int(probs[0].argmax()) == 3  # temperature clamped, top_p underflow keeps the first token
    assert torch.multinomial(probs, 1).shape == (4, 1)


def test_filter_keeps_the_most_likely_token_for_any_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    for top_p in (1.8e-176, 5e-324, 1e-45, 0.0):  # 0.0 is what tiny values become in float32
        kept = ~torch.isinf(filter_logits(logits, 0, top_p))
        assert kept.tolist() == [[True, False, False, False, False]]


def test_reference_sample_takes_the_engine_params():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    assert int(sample(logits, SamplingParams(temperature=1e-300))) == 0  # below SAMPLING_EPS: greedy
    g = torch.Generator().manual_seed(0)
    assert {int(sample(logits, SamplingParams(temperature=1.0, top_k=2), g)) for _ in range(200)} == {0, 1}


@pytest.mark.parametrize("kwargs, name", [
    (dict(temperature=float("inf")), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=float("nan")), "top_p"), (dict(min_p=float("inf")), "min_p"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty"), (dict(seed=2**63), "seed"),
    (dict(seed=-2**63 - 1), "seed"), (dict(n=10**6), "n"), (dict(n=True), "n"), (dict(logprobs=21), "logprobs"),
    (dict(top_k=1.5), "top_k"), (dict(max_tokens=2.0), "max_tokens"), (dict(output_kind="x"), "output_kind"),
    (dict(temperature="1"), "temperature")])
def test_out_of_range_values_are_refused_by_name(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_seed_for_wraps_into_torch_range():
    p = SamplingParams(seed=2**63 - 1, n=3)
    for i in range(3):
        torch.Generator().manual_seed(p.seed_for(i))  # must not raise
    assert SamplingParams(seed=-1).seed_for(0) == 2**64 - 1
