"""Load benchmark of an OpenAI-compatible server (``cubelm bench serve``), after vLLM's ``vllm bench serve`` (§6.3.2).

Prompts are token ids: windows of real text (the standard library's ``.py`` files, tokenized by the server's
``/tokenize`` or a local tokenizer) or uniformly random ids, with input and output lengths drawn uniformly from
``[len * (1 - range_ratio), len * (1 + range_ratio)]`` as vLLM's random dataset does. Requests arrive as a gamma
process: gaps ~ Gamma(shape=burstiness, scale=1 / (rate * burstiness)), so the mean rate is ``rate`` and the gaps'
coefficient of variation is 1 / sqrt(burstiness) (burstiness 1 = Poisson; rate inf = all at once). Each request is
a streaming ``/v1/completions`` call timed per streamed chunk. The metric definitions are vLLM's:

- TTFT: request sent → first token chunk; ITL: the gaps between consecutive token chunks;
- E2EL: request sent → last token chunk; TPOT: (E2EL − TTFT) / (output tokens − 1), per request;
- throughput: completed requests, output tokens and input + output tokens per second of the whole run;
- goodput: completed requests per second whose TTFT, TPOT and E2EL are all within the given SLOs.

``--max-concurrency`` caps requests in flight on the client; as in vLLM, a request's clock starts when it is sent,
so time spent waiting for a slot is not in its TTFT.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field

import numpy as np

from cubelm.errors import CubelmError

METRICS = ("ttft", "tpot", "itl", "e2el")


@dataclass(slots=True)
class BenchRequest:
    prompt_ids: list[int] | str  # token ids (exact lengths), or text (its length then comes from usage)
    output_len: int  # max_tokens (all of them with ignore_eos)


@dataclass(slots=True)
class RequestOutput:
    success: bool = False
    prompt_len: int = 0
    output_len: int = 0  # usage.completion_tokens, else the token chunks counted
    ttft: float = 0.0  # seconds
    latency: float = 0.0  # E2EL, seconds
    itl: list[float] = field(default_factory=list)
    start: float = 0.0  # when it was sent, seconds after the run's start
    error: str = ""


# ---- workload ---------------------------------------------------------------------------------------------------
def arrival_offsets(num: int, rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """Send times (s from the start) of ``num`` requests: the first at 0, then gamma gaps of mean 1/rate."""
    if rate == math.inf:
        return np.zeros(num)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=max(num - 1, 0))
    return np.concatenate([[0.0], np.cumsum(gaps)])


def sample_lengths(num: int, length: int, range_ratio: float, rng: np.random.Generator) -> np.ndarray:
    """vLLM's random-dataset lengths: integers uniform in [floor(len·(1−r)), ceil(len·(1+r))], at least 1."""
    low = max(1, math.floor(length * (1 - range_ratio)))
    high = max(low, math.ceil(length * (1 + range_ratio)))
    return rng.integers(low, high + 1, size=num)


def random_prompts(input_lens, vocab_ids: np.ndarray, rng: np.random.Generator) -> list[list[int]]:
    return [rng.choice(vocab_ids, size=int(n)).tolist() for n in input_lens]


def corpus_prompts(input_lens, encode, rng: np.random.Generator, *, chunk_chars: int = 16_000) -> list[list[int]]:
    """Windows of ``input_lens[i]`` tokens at random offsets in a pool of tokenized stdlib text. ``encode(text)``
    gives token ids (the server's /tokenize or a local tokenizer); the pool grows one file slice at a time until
    it holds 4x the longest prompt and enough tokens for distinct windows (bounded to keep start-up short)."""
    from cubelm.data.sources import stdlib_files
    files = stdlib_files()
    if not files:
        raise CubelmError("no standard-library .py files found for the corpus dataset; use --dataset random")
    longest = int(max(input_lens))
    target = min(max(4 * longest, int(sum(input_lens))), 200_000)
    pool: list[int] = []
    for i in rng.permutation(len(files)):
        text = files[i].read_text(encoding="utf-8", errors="replace")[:chunk_chars]
        if text.strip():
            pool.extend(encode(text))
        if len(pool) >= target:
            break
    if len(pool) <= longest:
        raise CubelmError(f"the corpus gave {len(pool)} tokens, fewer than --input-len needs ({longest})")
    starts = rng.integers(0, len(pool) - longest, size=len(input_lens))
    return [pool[s:s + int(n)] for s, n in zip(starts, input_lens)]


# ---- one request ------------------------------------------------------------------------------------------------
def _is_token_chunk(chunk: dict) -> bool:
    """A chunk that carries generated text (cubelm's explicit finish chunk, text "" + finish_reason, does not)."""
    choices = chunk.get("choices") or []
    return bool(choices) and (bool(choices[0].get("text")) or choices[0].get("finish_reason") is None)


async def send_request(client, url: str, body: dict, prompt_len: int, t_zero: float) -> RequestOutput:
    out = RequestOutput(prompt_len=prompt_len)
    chunks, st = 0, time.perf_counter()
    out.start, last = st - t_zero, st
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                out.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200].decode(errors='replace')}"
                return out
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out.error = str(chunk["error"].get("message", chunk["error"]))[:200]
                    return out
                if _is_token_chunk(chunk):
                    now = time.perf_counter()
                    if chunks == 0:
                        out.ttft = now - st
                    else:
                        out.itl.append(now - last)
                    last, chunks = now, chunks + 1
                elif chunk.get("usage"):
                    out.output_len = int(chunk["usage"].get("completion_tokens") or 0)
                    out.prompt_len = int(chunk["usage"].get("prompt_tokens") or prompt_len)
    except Exception as e:  # noqa: BLE001 - any transport failure is this request's error, not the run's
        out.error = f"{type(e).__name__}: {e}"[:200]
        return out
    if chunks == 0:
        out.error = "no token chunk received"
        return out
    out.latency, out.success = last - st, True
    out.output_len = out.output_len or chunks
    return out


def request_body(model: str, req: BenchRequest, ignore_eos: bool) -> dict:
    return {"model": model, "prompt": req.prompt_ids, "max_tokens": req.output_len, "temperature": 0.0,
            "ignore_eos": ignore_eos, "stream": True, "stream_options": {"include_usage": True}}


async def run_requests(client, url: str, model: str, requests: list[BenchRequest], offsets: np.ndarray, *,
                       max_concurrency: int | None, ignore_eos: bool) -> tuple[list[RequestOutput], float]:
    """Send ``requests[i]`` at ``offsets[i]`` (absolute, so sleeps do not drift); (outputs, duration in s)."""
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    t_zero = time.perf_counter()

    async def one(req: BenchRequest, at: float) -> RequestOutput:
        delay = t_zero + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        body = request_body(model, req, ignore_eos)
        n = 0 if isinstance(req.prompt_ids, str) else len(req.prompt_ids)
        if sem is None:
            return await send_request(client, url, body, n, t_zero)
        async with sem:
            return await send_request(client, url, body, n, t_zero)

    outputs = await asyncio.gather(*(one(r, float(t)) for r, t in zip(requests, offsets)))
    return list(outputs), time.perf_counter() - t_zero


# ---- metrics ----------------------------------------------------------------------------------------------------
def parse_goodput(specs: list[str]) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` or ``["ttft:500,tpot:50"]`` (both vLLM's --goodput and the issue's --slo) →
    ``{"ttft": 500.0, "tpot": 50.0}`` in ms."""
    slos: dict[str, float] = {}
    for item in (p for s in specs for p in s.replace(",", " ").split()):
        name, sep, value = item.partition(":")
        if not sep or name not in ("ttft", "tpot", "e2el"):
            raise CubelmError(f"--goodput/--slo takes NAME:MS with NAME in ttft, tpot, e2el; got {item!r}")
        try:
            slos[name] = float(value)
        except ValueError:
            raise CubelmError(f"--goodput/--slo {item!r}: {value!r} is not a number of milliseconds") from None
        if slos[name] <= 0:
            raise CubelmError(f"--goodput/--slo {item!r}: the SLO must be positive")
    return slos


def _pword(p: float) -> str:
    return str(int(p)) if int(p) == p else str(p)


def compute_metrics(outputs: list[RequestOutput], duration: float, *, percentile_metrics=METRICS,
                    percentiles=(99.0,), goodput: dict[str, float] | None = None) -> dict:
    """vLLM's result fields (``request_throughput``, ``mean_ttft_ms``, ``p99_itl_ms``, ...) from raw timings."""
    ok = [o for o in outputs if o.success]
    tpots = [(o.latency - o.ttft) / (o.output_len - 1) if o.output_len > 1 else 0.0 for o in ok]
    values = {"ttft": [o.ttft for o in ok], "tpot": [t for o, t in zip(ok, tpots) if o.output_len > 1],
              "itl": [x for o in ok for x in o.itl], "e2el": [o.latency for o in ok]}
    total_in, total_out = sum(o.prompt_len for o in ok), sum(o.output_len for o in ok)
    good = len(ok)
    if goodput:  # a request is good when every metric named is within its SLO (TPOT 0 for one-token outputs)
        per_req = {"ttft": values["ttft"], "tpot": tpots, "e2el": values["e2el"]}
        good = sum(all(per_req[m][i] * 1000 <= slo for m, slo in goodput.items()) for i in range(len(ok)))
    result = {"duration": duration, "completed": len(ok), "failed": len(outputs) - len(ok),
              "total_input_tokens": total_in, "total_output_tokens": total_out,
              "request_throughput": len(ok) / duration, "request_goodput": good / duration if goodput else None,
              "output_throughput": total_out / duration, "total_token_throughput": (total_in + total_out) / duration,
              **peak_rates(ok)}
    for m in METRICS:
        xs = np.asarray(values[m] or [0.0]) * 1000  # vLLM reports 0 for an empty metric
        result[f"mean_{m}_ms"], result[f"median_{m}_ms"] = float(xs.mean()), float(np.median(xs))
        result[f"std_{m}_ms"] = float(xs.std())
        if m in percentile_metrics:
            for p in percentiles:
                result[f"p{_pword(p)}_{m}_ms"] = float(np.percentile(xs, p))
    return result


def peak_rates(ok: list[RequestOutput]) -> dict:
    """The most output tokens streamed in one 1-s bin and the most requests in flight at once."""
    if not ok:
        return {"max_output_tokens_per_s": 0.0, "max_concurrent_requests": 0}
    times = np.concatenate([o.start + o.ttft + np.concatenate([[0.0], np.cumsum(o.itl)]) for o in ok])
    per_s = np.bincount(times.astype(int))
    events = sorted([(o.start, 1) for o in ok] + [(o.start + o.latency, -1) for o in ok], key=lambda e: (e[0], e[1]))
    in_flight = np.cumsum([d for _, d in events])
    return {"max_output_tokens_per_s": float(per_s.max()), "max_concurrent_requests": int(in_flight.max())}


def add_cost(result: dict, hourly_price: float | None) -> dict:
    """USD per 1M output (and input + output) tokens for one replica at ``hourly_price`` USD/h, at the measured
    throughput: a run below saturation pays for idle time, so the cost falls as the load rises to the capacity."""
    if hourly_price is None:
        return result
    per_1m = lambda tok_s: hourly_price / (tok_s * 3600) * 1e6 if tok_s > 0 else None  # noqa: E731
    return {**result, "hourly_price_usd": hourly_price,
            "cost_per_1m_output_tokens_usd": per_1m(result["output_throughput"]),
            "cost_per_1m_total_tokens_usd": per_1m(result["total_token_throughput"])}
