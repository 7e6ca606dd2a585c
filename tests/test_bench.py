"""``cubelm bench decode``: the figures it reports come from a real greedy decode (the token ids equal the reference
generator's on the same seeded model and prompt), and bad options are one-line errors."""

import json

import torch

from cubelm.cli import main
from helpers import assert_clean_error, cubelm


def test_bench_decode_reports_the_reference_greedy_tokens(capsys):
    from cubelm.engine.params import SamplingParams
    from cubelm.engine.reference import GenerationResult, generate_tokens
    from cubelm.model.config import preset
    from cubelm.model.transformer import build_model

    assert main(["bench", "decode", "--model", "tiny", "--rounds", "2", "--batch", "2", "--prompt-tokens", "12",
                 "--new-tokens", "6", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dtype"] == "float32" and report["batch"] == 2 and len(report["rounds"]) == 2
    assert report["greedy_tokens_agree_across_rounds"]
    for r in report["rounds"]:
        assert r["decode_steps"] == 5 and r["decode_tok_s"] > 0 and r["prefill_s"] > 0
    assert report["read_bandwidth_gb_s"] > 0 and report["fraction_of_bandwidth_bound"] > 0
    assert report["host"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()

    cfg = preset("tiny", eos_token_id=2, bos_token_id=1, pad_token_id=0)
    model = build_model(cfg, seed=0).eval()
    prompt = torch.randint(3, cfg.vocab_size, (12,), generator=torch.Generator().manual_seed(0)).tolist()
    want = list(generate_tokens(model, prompt, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                                GenerationResult([], "length")))
    assert report["token_ids"] == want
    # weights once (tiny ties its embedding to the head, which reads all of it) + K/V of 2 sequences at 15 tokens
    assert cfg.tie_word_embeddings
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    assert report["bytes_per_step"] == cfg.num_params() * 4 + 2 * 15 * kv


def test_untied_input_embedding_counts_only_the_rows_looked_up():
    from cubelm.engine.bench import bytes_per_step
    from cubelm.model.config import preset
    from cubelm.model.transformer import build_model
    cfg = preset("tiny", tie_word_embeddings=False, num_hidden_layers=1)
    model = build_model(cfg, seed=0)
    weights = sum(p.numel() for p in model.parameters()) * 4
    kv = 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    assert bytes_per_step(model, context=10, batch=3) == \
        weights - cfg.vocab_size * cfg.hidden_size * 4 + 3 * cfg.hidden_size * 4 + 3 * 10 * kv


def test_bench_decode_bad_options_are_one_line_errors():
    assert_clean_error(cubelm("bench", "decode", "--model", "nope", "--rounds", "1"),
                       "neither a directory nor a preset")
    assert_clean_error(cubelm("bench", "decode", "--new-tokens", "1"), "--new-tokens must be >= 2")
