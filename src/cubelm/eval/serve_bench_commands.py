"""``cubelm bench serve``: options and run function (vLLM's ``vllm bench serve`` flags and metric names).

    CUBELM_HOME=/work/demo-home cubelm serve &                      # the server under test
    cubelm bench serve --request-rate 8 --num-prompts 200           # stdlib text prompts, Poisson arrivals
    cubelm bench serve --request-rate 4,8,inf --goodput ttft:500,tpot:50 --hourly-price 0.40 --save-result
    cubelm bench serve --dataset random --tokenizer ~/.cache/cubelm/models/default --burstiness 0.5
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from cubelm.cli import opt
from cubelm.errors import CubelmError
from cubelm.eval.serve_bench import METRICS

PER_REQUEST = ("ttfts", "itls", "e2els", "start_times", "input_lens", "output_lens", "errors")  # --save-detailed


@dataclass(slots=True, kw_only=True)
class BenchServeOptions:
    base_url: str = opt("http://127.0.0.1:8000", help="the server's URL (OpenAI-compatible, e.g. `cubelm serve`)")
    endpoint: str = opt("/v1/completions", help="completions path on the server (streamed)")
    model: str | None = opt(None, help="model id sent in requests; default: the first one /v1/models lists")
    api_key: str | None = opt(None, help="bearer token for the server; default: $OPENAI_API_KEY when set")
    dataset: str = opt("stdlib", choices=("stdlib", "random"),
                       help="prompts: windows of standard-library source text, or uniformly random token ids")
    tokenizer: str | None = opt(None, help="local tokenizer or model directory; default: the server's /tokenize "
                                           "(stdlib); --dataset random needs it (for the vocabulary)")
    input_len: int = opt(256, help="prompt tokens per request (mean; see --range-ratio)")
    output_len: int = opt(64, help="max_tokens per request (mean; all generated with --ignore-eos)")
    range_ratio: float = opt(0.0, help="lengths uniform in [len*(1-r), len*(1+r)], 0 <= r < 1 (vLLM's random "
                                       "dataset)")
    num_prompts: int = opt(200, help="requests per run")
    num_warmups: int = opt(0, help="requests sent (and not measured) before each run")
    request_rate: str = opt("inf", help="mean arrivals per second (inf = all at once); a comma list runs one "
                                        "benchmark per rate, e.g. 2,4,inf")
    burstiness: float = opt(1.0, help="gamma shape of the gaps: 1 = Poisson, <1 burstier, >1 more regular "
                                      "(CV = 1/sqrt(burstiness))")
    max_concurrency: int | None = opt(None, help="at most this many requests in flight (client side)")
    seed: int = opt(0, help="seed of the arrivals, lengths and prompts")
    ignore_eos: bool = opt(True, help="generate all max_tokens (vLLM's default is off; on keeps lengths fixed)")
    percentile_metrics: str = opt("ttft,tpot,itl,e2el", help="metrics whose percentiles are reported (comma list "
                                                             "of ttft, tpot, itl, e2el)")
    metric_percentiles: str = opt("99", help="percentiles to report, comma list (e.g. 50,90,99)")
    goodput: list[str] = opt([], metavar="NAME:MS", help="SLO for goodput, NAME in ttft, tpot, e2el (repeat the "
                                                          "flag or comma-separate: ttft:500,tpot:50)")
    slo: list[str] = opt([], metavar="NAME:MS", help="the same as --goodput (the issue's name)")
    hourly_price: float | None = opt(None, help="USD per replica-hour: adds cost per 1M output / total tokens")
    save_result: bool = opt(False, help="write each run's JSON (vLLM's fields) and a PNG into --result-dir")
    save_detailed: bool = opt(False, help="also save per-request lengths, TTFTs, ITLs, E2ELs, errors in the JSON")
    result_dir: str = opt(".", help="directory of the JSON files and the PNG")
    result_filename: str | None = opt(None, help="JSON file name for a single rate (default: vLLM's pattern)")
    plot: str | None = opt(None, help="PNG path (default with --save-result: bench-serve-<model>-<date>.png)")
    timeout: float = opt(600.0, help="seconds one request may take")

    def __post_init__(self) -> None:
        for name in ("input_len", "output_len", "num_prompts"):
            if getattr(self, name) < 1:
                raise CubelmError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.num_warmups < 0 or (self.max_concurrency is not None and self.max_concurrency < 1):
            raise CubelmError("--num-warmups must be >= 0 and --max-concurrency >= 1")
        if not 0 <= self.range_ratio < 1:
            raise CubelmError(f"--range-ratio must be in [0, 1), got {self.range_ratio}")
        if not self.burstiness > 0:
            raise CubelmError(f"--burstiness must be > 0, got {self.burstiness}")
        self.rates  # noqa: B018 - validates --request-rate
        self.percentiles  # noqa: B018
        if not set(self.metrics) <= set(METRICS):
            raise CubelmError(f"--percentile-metrics takes {', '.join(METRICS)}; got {self.percentile_metrics!r}")

    @property
    def rates(self) -> list[float]:
        try:
            rates = [float(x) for x in self.request_rate.split(",") if x.strip()]
        except ValueError:
            raise CubelmError(f"--request-rate takes numbers or inf, comma-separated; got {self.request_rate!r}") \
                from None
        if not rates or any(not r > 0 for r in rates):
            raise CubelmError(f"--request-rate must be > 0 (or inf); got {self.request_rate!r}")
        return rates

    @property
    def percentiles(self) -> list[float]:
        try:
            ps = [float(x) for x in self.metric_percentiles.split(",") if x.strip()]
        except ValueError:
            ps = []
        if not ps or any(not 0 < p <= 100 for p in ps):
            raise CubelmError(f"--metric-percentiles takes numbers in (0, 100]; got {self.metric_percentiles!r}")
        return ps

    @property
    def metrics(self) -> list[str]:
        return [m.strip() for m in self.percentile_metrics.split(",") if m.strip()]


def _headers(o: BenchServeOptions) -> dict:
    key = o.api_key or os.environ.get("OPENAI_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def _server_model(o: BenchServeOptions, client) -> str:
    import httpx
    try:
        resp = client.get("/v1/models")
    except httpx.HTTPError as e:
        raise CubelmError(f"cannot reach the server at {o.base_url} ({type(e).__name__}); start it, e.g. "
                          "`cubelm serve`, or pass --base-url") from None
    if resp.status_code in (401, 403):
        raise CubelmError(f"{o.base_url} refused the API key (HTTP {resp.status_code}); pass --api-key")
    if resp.status_code != 200 or not resp.json().get("data"):
        raise CubelmError(f"{o.base_url}/v1/models answered HTTP {resp.status_code}; is it an OpenAI-compatible "
                          "server?")
    return o.model or resp.json()["data"][0]["id"]


def _message(resp) -> str:
    try:
        return str(resp.json()["error"]["message"])[:160]
    except (ValueError, KeyError, TypeError):
        return resp.text[:160]


def _prompts(o: BenchServeOptions, client, model: str, input_lens, rng) -> list[list[int]]:
    import numpy as np

    from cubelm.eval.serve_bench import corpus_prompts, random_prompts
    tok = None
    if o.tokenizer:
        from cubelm.data.tokenizer import load_tokenizer
        tok = load_tokenizer(o.tokenizer)
    if o.dataset == "random":
        if tok is None:
            raise CubelmError("--dataset random needs --tokenizer DIR (the model's directory) for its vocabulary")
        ids = np.setdiff1d(np.arange(tok.vocab_size), np.fromiter(tok.special_ids, int, len(tok.special_ids)))
        return random_prompts(input_lens, ids, rng)
    if tok is not None:
        return corpus_prompts(input_lens, tok.encode, rng)

    def server_encode(text: str) -> list[int]:
        resp = client.post("/tokenize", json={"model": model, "prompt": text, "add_special_tokens": False})
        if resp.status_code != 200:
            raise CubelmError(f"{o.base_url}/tokenize answered HTTP {resp.status_code} ({_message(resp)}); check "
                              "--model, or pass --tokenizer DIR to tokenize locally")
        return resp.json()["tokens"]

    return corpus_prompts(input_lens, server_encode, rng)


def _one_run(o: BenchServeOptions, model: str, requests, rate: float, rng) -> dict:
    import asyncio

    import httpx
    import numpy as np

    from cubelm.eval.serve_bench import arrival_offsets, compute_metrics, run_requests

    async def go():
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=o.base_url, headers=_headers(o), limits=limits,
                                     timeout=httpx.Timeout(o.timeout, connect=60)) as client:
            if o.num_warmups:
                warm = [requests[i % len(requests)] for i in range(o.num_warmups)]
                await run_requests(client, o.endpoint, model, warm, np.zeros(len(warm)),
                                   max_concurrency=o.max_concurrency, ignore_eos=o.ignore_eos)
            offsets = arrival_offsets(len(requests), rate, o.burstiness, rng)
            return await run_requests(client, o.endpoint, model, requests, offsets,
                                      max_concurrency=o.max_concurrency, ignore_eos=o.ignore_eos)

    outputs, duration = asyncio.run(go())
    metrics = compute_metrics(outputs, duration, percentile_metrics=o.metrics, percentiles=o.percentiles,
                              goodput=_slos(o))
    ok = [x for x in outputs if x.success]
    return {**metrics, "ttfts": [x.ttft for x in ok], "itls": [x.itl for x in ok], "e2els": [x.latency for x in ok],
            "start_times": [x.start for x in ok], "input_lens": [x.prompt_len for x in ok],
            "output_lens": [x.output_len for x in ok], "errors": [x.error for x in outputs if not x.success]}


def _test_request(o: BenchServeOptions, model: str, req) -> None:
    """One request before the runs (as vLLM does): a wrong --model, --endpoint or key fails here, in one line."""
    import asyncio

    import httpx
    import numpy as np

    from cubelm.eval.serve_bench import BenchRequest, run_requests

    async def go():
        async with httpx.AsyncClient(base_url=o.base_url, headers=_headers(o), timeout=o.timeout) as client:
            return await run_requests(client, o.endpoint, model, [BenchRequest(req.prompt_ids, 2)], np.zeros(1),
                                      max_concurrency=None, ignore_eos=o.ignore_eos)

    (out,), _ = asyncio.run(go())
    if not out.success:
        raise CubelmError(f"the test request to {o.base_url}{o.endpoint} failed: {out.error}")


def _slos(o: BenchServeOptions) -> dict[str, float] | None:
    from cubelm.eval.serve_bench import parse_goodput
    return parse_goodput(o.goodput + o.slo) or None


def run_bench_serve(o: BenchServeOptions) -> int:
    import datetime
    import json
    import os as _os
    from pathlib import Path

    import numpy as np

    from cubelm.eval.serve_bench import BenchRequest, add_cost, sample_lengths
    from cubelm.eval.serve_bench_report import format_result, markdown_table, plot_results, result_filename
    slos = _slos(o)  # a bad SLO fails before any request
    try:
        import httpx
    except ModuleNotFoundError:
        raise CubelmError("cubelm bench serve needs httpx: pip install 'cubelm[serve]'") from None
    with httpx.Client(base_url=o.base_url, headers=_headers(o), timeout=60) as client:
        model = _server_model(o, client)
        rng = np.random.default_rng(o.seed)
        input_lens = sample_lengths(o.num_prompts, o.input_len, o.range_ratio, rng)
        output_lens = sample_lengths(o.num_prompts, o.output_len, o.range_ratio, rng)
        prompts = _prompts(o, client, model, input_lens, rng)
    requests = [BenchRequest(p, int(n)) for p, n in zip(prompts, output_lens)]
    _test_request(o, model, requests[0])
    date = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    load = round(_os.getloadavg()[0], 2)  # the host is often shared: every result says how loaded it was
    print(f"model {model} at {o.base_url}: {o.num_prompts} prompts ({o.dataset}, input {o.input_len}, output "
          f"{o.output_len}, range ratio {o.range_ratio}), burstiness {o.burstiness}, max concurrency "
          f"{o.max_concurrency or 'none'}, load average {load}")
    results = []
    for rate in o.rates:
        r = _one_run(o, model, requests, rate, np.random.default_rng([o.seed, len(results)]))
        r = add_cost({"date": date, "backend": "openai", "model_id": model, "tokenizer_id": o.tokenizer or "server",
                      "dataset_name": o.dataset, "num_prompts": o.num_prompts, "input_len": o.input_len,
                      "output_len": o.output_len, "range_ratio": o.range_ratio, "request_rate": rate,
                      "burstiness": o.burstiness, "max_concurrency": o.max_concurrency, "goodput_slos": slos,
                      "load_average": load, **r}, o.hourly_price)
        print(format_result(r, o.metrics, o.percentiles))
        results.append(r)
        if o.save_result:
            name = o.result_filename if o.result_filename and len(o.rates) == 1 else result_filename(r, date)
            path = Path(o.result_dir) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            saved = {k: v for k, v in r.items() if o.save_detailed or k not in PER_REQUEST}
            path.write_text(json.dumps({**saved, "request_rate": "inf" if math.isinf(rate) else rate}, indent=1))
            print(f"wrote {path}")
    print()
    print(markdown_table(results))
    plot = o.plot or (str(Path(o.result_dir) / f"bench-serve-{model.split('/')[-1]}-{date}.png")
                      if o.save_result else None)
    if plot:
        print(f"wrote {plot_results(results, plot)}")
    return 0 if all(r["completed"] for r in results) else 1
