"""The side-by-side harness's own logic (benchmarks/engine_peers.py, peer_table.py), without any peer installed:
medians, cubelm/peer ratios and greedy agreement on given samples, and the vocabulary written for CTranslate2's
converter (ids map to ``t<id>`` and back through transformers' fast tokenizer)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from peer_table import agreement, format_table, summarize  # noqa: E402

WHERE = dict(workload="decode", model="small", engine="llama.cpp")


def test_summarize_pairs_each_peer_precision_with_its_cubelm_rounds():
    ids = [5, 9, 7, 7]
    samples = {
        "cubelm fp32": [{"tok_s": 100.0, "tokens": ids}, {"tok_s": 300.0, "tokens": ids}, {"tok_s": 120.0,
                                                                                           "tokens": ids}],
        "peer fp32": [{"tok_s": 200.0, "tokens": ids}, {"tok_s": 240.0, "tokens": ids}, {"tok_s": 10.0,
                                                                                        "tokens": ids}],
        "peer q8_0": [{"tok_s": 400.0, "tokens": [5, 9, 8, 7]}] * 3,
    }
    fp32, q8 = summarize(samples, {"fp32": "fp32", "q8_0": "fp32"}, WHERE)
    # medians: cubelm 120, peer fp32 200, peer q8_0 400; ratio is cubelm / peer
    assert (fp32.tok_s, fp32.cubelm_tok_s, fp32.cubelm_dtype) == (200.0, 120.0, "fp32")
    assert fp32.ratio == pytest.approx(0.6) and fp32.greedy == "yes"
    assert q8.ratio == pytest.approx(0.3) and q8.greedy == "no: first 2 of 4 equal"
    table = format_table([fp32, q8])
    assert "| decode | small | llama.cpp | q8_0 | 400.0 | 120.0 (fp32) | 0.30× | no: first 2 of 4 equal |" in table


def test_agreement_counts_requests_and_length_differences():
    assert agreement({"outputs": [[1, 2], [3]]}, {"outputs": [[1, 2], [3]]}) == "yes"
    assert agreement({"outputs": [[1, 2], [3], [4]]}, {"outputs": [[1, 2], [9], [4]]}) == "2/3 requests equal"
    # a peer that stopped early agrees on a prefix only: not "yes"
    assert agreement({"tokens": [1, 2, 3]}, {"tokens": [1, 2]}) == "no: first 2 of 3 equal"


def test_word_level_vocabulary_round_trips_ids(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from peer_convert import word_level_tokenizer
    (tmp_path / "tokenizer.json").write_text(json.dumps(word_level_tokenizer(300)))
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), unk_token="<unk>",
                                  bos_token="<s>", eos_token="</s>")
    assert len(tok) == 300 and (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    assert tok.convert_tokens_to_ids(["t3", "t299", "t17"]) == [3, 299, 17]
    assert tok("t3 t299 t17", add_special_tokens=False)["input_ids"] == [3, 299, 17]


def test_peers_are_paired_with_cubelm_at_equal_precision_when_it_has_that_dtype(monkeypatch):
    import engine_peers
    from cubelm.engine import bench
    avx2 = {"isa_flags": ["avx2", "fma"]}
    monkeypatch.setattr(bench, "DTYPES", {"fp32": "float32", "bf16": "bfloat16"})
    support = engine_peers.cubelm_dtype_support(["fp32", "bf16", "int8"], avx2)
    assert support["fp32"] is None and "no bf16 hardware" in support["bf16"] and "unsupported" in support["int8"]
    assert engine_peers._cubelm_pair("q8_0", "decode", support) == "fp32"  # no int8 in this cubelm: vs fp32
    monkeypatch.setattr(bench, "DTYPES", {"fp32": "float32", "int8": "int8"})
    support = engine_peers.cubelm_dtype_support(["fp32", "int8"], {"isa_flags": ["avx512_bf16"]})
    assert engine_peers._cubelm_pair("q8_0", "decode", support) == "int8"
    assert engine_peers._cubelm_pair("int8", "decode", support) == "int8"
    assert engine_peers._cubelm_pair("fp32", "decode", support) == "fp32"
    # the offline workload loads cubelm through load_model (fp32/bf16 only): int8 peers are compared with fp32
    assert engine_peers._cubelm_pair("int8", "throughput", support) == "fp32"


def test_vllm_rounds_start_with_an_empty_prefix_cache():
    """Every round sends the same prompts to the one vLLM ``LLM`` the worker keeps: a round must not find them in its
    prefix cache (cubelm builds a fresh engine per round). The LLM's surface the worker uses, recorded."""
    from peer_workers import VllmWorker

    class Out:
        def __init__(self, n):
            self.outputs = [type("C", (), {"token_ids": list(range(n))})()]

    class RecordingLLM:
        def __init__(self, resets):
            self.calls, self.resets = [], resets

        def reset_prefix_cache(self):
            self.calls.append("reset")
            return self.resets

        def generate(self, prompts, params, use_tqdm):
            self.calls.append("generate")
            return [Out(3) for _ in prompts]

    worker = VllmWorker.__new__(VllmWorker)
    worker.models = {"fp32": RecordingLLM(True)}
    worker._params = lambda n, **kw: n
    for _ in range(2):
        assert worker.throughput("fp32", [([1, 2], 3), ([4], 3)])["outputs"] == [[0, 1, 2]] * 2
    assert worker.models["fp32"].calls == ["reset", "generate"] * 2
    worker.models = {"fp32": RecordingLLM(False)}  # a cache it could not reset: the round is not timed
    with pytest.raises(RuntimeError, match="prefix cache"):
        worker.throughput("fp32", [([1], 1)])
