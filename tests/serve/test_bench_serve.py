"""``cubelm bench serve``: the arrival process, the metric definitions (vLLM's) on hand-made timings, and an end-to-end
run against a tiny-model ``cubelm serve`` checking the JSON it writes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cubelm.errors import CubelmError
from cubelm.eval.serve_bench import (RequestOutput, add_cost, arrival_offsets, compute_metrics, parse_goodput,
                                     sample_lengths)
from helpers import assert_clean_error, cli_in_process


@pytest.mark.parametrize("burstiness", [1.0, 0.25, 4.0])
def test_gamma_arrivals_mean_rate_and_cv(burstiness):
    offsets = arrival_offsets(40_001, 5.0, burstiness, np.random.default_rng(0))
    gaps = np.diff(offsets)
    assert offsets[0] == 0 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(1 / 5.0, rel=0.03)  # the mean rate is --request-rate
    # gamma(shape k): CV = 1/sqrt(k); k = 1 is the Poisson process (exponential gaps, CV 1)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)


def test_infinite_rate_sends_everything_at_once():
    assert np.all(arrival_offsets(7, math.inf, 1.0, np.random.default_rng(0)) == 0)


def test_lengths_follow_vllm_range_ratio():
    rng = np.random.default_rng(0)
    assert set(sample_lengths(50, 10, 0.0, rng)) == {10}
    xs = sample_lengths(5000, 10, 0.5, rng)
    assert xs.min() == 5 and xs.max() == 15  # [floor(10*0.5), ceil(10*1.5)], both ends included
    assert sample_lengths(100, 1, 0.9, rng).min() >= 1


def _outputs():
    a = RequestOutput(success=True, prompt_len=10, output_len=4, ttft=0.1, latency=0.2, itl=[0.02, 0.03, 0.05],
                      start=0.0)
    b = RequestOutput(success=True, prompt_len=20, output_len=1, ttft=0.3, latency=0.3, start=0.1)
    return [a, b, RequestOutput(success=False, prompt_len=5, error="HTTP 500")]


def test_metrics_on_hand_made_timings():
    r = compute_metrics(_outputs(), 2.0, percentiles=(50, 99))
    assert (r["completed"], r["failed"]) == (2, 1)
    assert r["request_throughput"] == pytest.approx(1.0)
    assert r["output_throughput"] == pytest.approx(5 / 2)
    assert r["total_token_throughput"] == pytest.approx((30 + 5) / 2)  # failed requests' tokens do not count
    assert r["mean_ttft_ms"] == pytest.approx(200) and r["median_ttft_ms"] == pytest.approx(200)
    assert r["p99_ttft_ms"] == pytest.approx(100 + 0.99 * 200)  # numpy's linear percentile of [100, 300]
    # TPOT = (E2EL - TTFT) / (output - 1), only for requests with > 1 token
    assert r["mean_tpot_ms"] == pytest.approx(100 / 3) and r["p50_tpot_ms"] == pytest.approx(100 / 3)
    assert r["mean_itl_ms"] == pytest.approx(100 / 3) and r["median_itl_ms"] == pytest.approx(30)
    assert r["mean_e2el_ms"] == pytest.approx(250)
    assert r["request_goodput"] is None
    assert (r["max_concurrent_requests"], r["max_output_tokens_per_s"]) == (2, 5)


def test_goodput_counts_requests_within_every_slo():
    outs = _outputs()
    assert compute_metrics(outs, 2.0, goodput={"ttft": 150})["request_goodput"] == pytest.approx(0.5)  # a only
    # b has one token: its TPOT is 0 for goodput (vLLM), a's 33.3 ms misses 30 ms
    assert compute_metrics(outs, 2.0, goodput={"tpot": 30})["request_goodput"] == pytest.approx(0.5)
    assert compute_metrics(outs, 2.0, goodput={"ttft": 400, "e2el": 300})["request_goodput"] == pytest.approx(1.0)
    assert compute_metrics(outs, 2.0, goodput={"ttft": 400, "e2el": 299})["request_goodput"] == pytest.approx(0.5)
    assert compute_metrics(outs, 2.0, goodput={"ttft": 99, "e2el": 1000})["request_goodput"] == 0


def test_goodput_flag_forms_and_errors():
    assert parse_goodput(["ttft:500,tpot:50"]) == parse_goodput(["ttft:500", "tpot:50"]) == {"ttft": 500, "tpot": 50}
    for bad in (["ttft"], ["itl:5"], ["ttft:x"], ["e2el:-1"]):
        with pytest.raises(CubelmError):
            parse_goodput(bad)


def test_cost_per_million_tokens():
    r = add_cost({"output_throughput": 100.0, "total_token_throughput": 400.0}, 0.36)
    assert r["cost_per_1m_output_tokens_usd"] == pytest.approx(1.0)  # 0.36 $/h / 360,000 tok/h * 1e6
    assert r["cost_per_1m_total_tokens_usd"] == pytest.approx(0.25)


def test_bench_serve_end_to_end(serve_process, model_dir, tmp_path, capsys):
    server = serve_process()
    out = tmp_path / "runs"
    r = cli_in_process(capsys, "bench", "serve", "--base-url", server.base, "--num-prompts", 4, "--input-len", 8,
                       "--output-len", 4, "--request-rate", "inf,50", "--num-warmups", 1, "--goodput",
                       "ttft:60000,tpot:60000", "--hourly-price", 1.0, "--save-result", "--save-detailed",
                       "--result-dir", out, "--metric-percentiles", "50,99")
    assert r.returncode == 0, r.stderr
    files = sorted(out.glob("openai-*qps-m-*.json"))
    assert len(files) == 2 and len(list(out.glob("*.png"))) == 1
    for f in files:
        res = json.loads(f.read_text())
        assert res["request_rate"] in ("inf", 50.0) and res["model_id"] == "m"
        assert (res["completed"], res["failed"]) == (4, 0)
        assert res["input_lens"] == [8] * 4 and res["output_lens"] == [4] * 4  # ignore_eos: every max_token
        assert res["total_output_tokens"] == 16 and res["total_input_tokens"] == 32
        assert res["request_goodput"] == pytest.approx(res["request_throughput"])  # generous SLOs: all good
        for m in ("ttft", "tpot", "itl", "e2el"):
            assert {f"mean_{m}_ms", f"median_{m}_ms", f"p50_{m}_ms", f"p99_{m}_ms"} <= res.keys()
        assert all(0 < t <= e for t, e in zip(res["ttfts"], res["e2els"]))
        assert all(len(itl) <= 3 for itl in res["itls"])
        assert res["cost_per_1m_output_tokens_usd"] == pytest.approx(1e6 / (res["output_throughput"] * 3600))
    assert "Serving Benchmark Result" in r.stdout and "| inf | 4 / 0 |" in r.stdout
    # random token ids need the vocabulary: the model's tokenizer
    r = cli_in_process(capsys, "bench", "serve", "--base-url", server.base, "--num-prompts", 2, "--input-len", 5,
                       "--output-len", 2, "--dataset", "random", "--tokenizer", model_dir)
    assert r.returncode == 0, r.stderr
    r = cli_in_process(capsys, "bench", "serve", "--base-url", server.base, "--dataset", "random")
    assert_clean_error(r, "--tokenizer")
    r = cli_in_process(capsys, "bench", "serve", "--base-url", server.base, "--model", "nope", "--num-prompts", 1)
    assert_clean_error(r, "/tokenize answered HTTP 404", "nope")
    r = cli_in_process(capsys, "bench", "serve", "--base-url", server.base, "--model", "nope", "--num-prompts", 1,
                       "--input-len", 4, "--dataset", "random", "--tokenizer", model_dir)
    assert_clean_error(r, "test request", "404")


@pytest.mark.parametrize("args, needle", [
    (["--range-ratio", "1"], "--range-ratio"), (["--request-rate", "0"], "--request-rate"),
    (["--request-rate", "fast"], "--request-rate"), (["--goodput", "ttft"], "--goodput"),
    (["--percentile-metrics", "ttft,foo"], "--percentile-metrics"), (["--num-prompts", "0"], "--num-prompts"),
    (["--base-url", "http://127.0.0.1:9"], "cannot reach")])
def test_bad_input_is_one_line(capsys, args, needle):
    assert_clean_error(cli_in_process(capsys, "bench", "serve", *args), needle)
