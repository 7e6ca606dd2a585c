"""Load benchmark for ``cubelm serve`` (§6.3.2, §6.3.3): streaming requests, Poisson arrivals or fixed concurrency.

Definitions follow vLLM's ``bench serve``: TTFT = time to the first streamed token; ITL = gaps between streamed
chunks; TPOT = (latency - TTFT) / (output tokens - 1) per request; E2E = request latency; throughput = completed
requests (and output tokens) per second of the run. ``--sweep`` runs the whole protocol and checks the goals:

1. unloaded: one request at a time (the baseline TTFT);
2. peak: every request at once (``rate=inf``), whose request rate is the peak throughput;
3. Poisson arrivals at 1/4, 1/2 and 3/4 of the peak (goal: p99 TTFT at 1/2 of peak <= 3x the unloaded TTFT);
4. 256 concurrent streams (goal: zero errors).

    python benchmarks/serve_load.py --sweep                        # starts `cubelm serve` itself (see --model)
    python benchmarks/serve_load.py --base-url http://127.0.0.1:8000 --rate 4 --num-prompts 200
    python benchmarks/serve_load.py --sweep --max-batch-delay-ms 0,20   # the batch-delay trade-off

Without ``--model`` and without a default model in the store, it builds a tiny randomly initialized model with a
tokenizer trained on a few lines (the numbers then measure the serving stack, not text quality).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n", "class Stack:\n    def __init__(self):",
           "for i in range(10):", "with open(path) as f:", "def quicksort(xs):\n    if len(xs) < 2:"]


@dataclass
class Result:
    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str = ""


async def one_request(client: httpx.AsyncClient, base: str, prompt: str, max_tokens: int) -> Result:
    body = {"model": None, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    last, r = None, Result(ok=False)
    try:
        async with client.stream("POST", f"{base}/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                return Result(ok=False, error=f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return Result(ok=False, error=chunk["error"]["message"])
                if chunk.get("usage"):
                    r.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    now = time.perf_counter()
                    if last is None:
                        r.ttft = now - t0
                    else:
                        r.itl.append(now - last)
                    last = now
        r.latency, r.ok = time.perf_counter() - t0, True
    except (httpx.HTTPError, OSError) as e:
        r.error = f"{type(e).__name__}: {e}"
    return r


async def run_load(base: str, num_prompts: int, max_tokens: int, rate: float, max_concurrency: int | None,
                   seed: int = 0) -> dict:
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=60), limits=limits) as client:
        async def limited(p):
            if sem is None:
                return await one_request(client, base, p, max_tokens)
            async with sem:
                return await one_request(client, base, p, max_tokens)

        tasks, t0 = [], time.perf_counter()
        for i in range(num_prompts):
            tasks.append(asyncio.create_task(limited(PROMPTS[i % len(PROMPTS)])))
            if rate != float("inf"):
                await asyncio.sleep(rng.expovariate(rate))  # Poisson process: exponential gaps
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    return summarize(results, duration, rate, max_concurrency)


def summarize(results: list[Result], duration: float, rate: float, max_concurrency: int | None) -> dict:
    ok = [r for r in results if r.ok]
    pct = lambda xs, q: float(np.percentile(xs, q)) * 1000 if xs else float("nan")  # noqa: E731 - ms
    ttft = [r.ttft for r in ok]
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itl = [x for r in ok for x in r.itl]
    e2e = [r.latency for r in ok]
    out_tokens = sum(r.output_tokens for r in ok)
    return {"rate": rate, "max_concurrency": max_concurrency, "completed": len(ok), "failed": len(results) - len(ok),
            "errors": sorted({r.error for r in results if not r.ok})[:3], "duration_s": duration,
            "req_per_s": len(ok) / duration, "output_tok_per_s": out_tokens / duration,
            "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99), "tpot_p50_ms": pct(tpot, 50),
            "tpot_p99_ms": pct(tpot, 99), "itl_p50_ms": pct(itl, 50), "itl_p99_ms": pct(itl, 99),
            "e2e_p50_ms": pct(e2e, 50), "e2e_p99_ms": pct(e2e, 99)}


HEADER = ("| load | done | failed | req/s | out tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | ITL p50 / p99 ms "
          "| E2E p50 / p99 ms |\n|---|---|---|---|---|---|---|---|---|")


def row(label: str, s: dict) -> str:
    return (f"| {label} | {s['completed']} | {s['failed']} | {s['req_per_s']:.2f} | {s['output_tok_per_s']:.0f} | "
            f"{s['ttft_p50_ms']:.0f} / {s['ttft_p99_ms']:.0f} | {s['tpot_p50_ms']:.1f} / {s['tpot_p99_ms']:.1f} | "
            f"{s['itl_p50_ms']:.1f} / {s['itl_p99_ms']:.1f} | {s['e2e_p50_ms']:.0f} / {s['e2e_p99_ms']:.0f} |")


# ---- the server under test -------------------------------------------------------------------------------------
def default_or_tiny_model(workdir: Path) -> tuple[Path, str]:
    from cubelm.store import is_complete_model_dir, model_path
    if is_complete_model_dir(model_path()):
        return model_path(), "the default model (cubelm build-default)"
    from cubelm.data.tokenizer import TokenizerConfig, train_tokenizer
    train_tokenizer(PROMPTS * 40 + ["def add(a, b):\n    return a + b\n"] * 40,
                    TokenizerConfig(vocab_size=320)).save(workdir / "tok")
    subprocess.run([sys.executable, "-m", "cubelm", "model", "init", "--preset", "tiny", "--out",
                    str(workdir / "m"), "--tokenizer", str(workdir / "tok")], check=True, capture_output=True)
    return workdir / "m", "a randomly initialized tiny preset (3.0M params, 320-token BPE trained here)"


def start_server(model: Path, delay_ms: float, extra: list[str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "cubelm", "serve", "--model", str(model), "--port", str(port), "--log-level",
           "warning", "--max-batch-delay-ms", str(delay_ms), *extra]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{base}/ready", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not become ready")


def sweep(base: str, args) -> list[tuple[str, dict]]:
    out = []
    run = lambda **kw: asyncio.run(run_load(base, max_tokens=args.max_tokens, **kw))  # noqa: E731
    run(num_prompts=4, rate=float("inf"), max_concurrency=4)  # warm-up
    unloaded = run(num_prompts=10, rate=float("inf"), max_concurrency=1)
    out.append(("unloaded (concurrency 1)", unloaded))
    peak = run(num_prompts=args.num_prompts, rate=float("inf"), max_concurrency=None)
    out.append((f"peak (all {args.num_prompts} at once)", peak))
    for frac in (0.25, 0.5, 0.75):
        rate = frac * peak["req_per_s"]
        out.append((f"Poisson {rate:.2f} req/s ({frac:g} x peak)",
                    run(num_prompts=args.num_prompts, rate=rate, max_concurrency=None)))
    out.append(("256 concurrent streams", run(num_prompts=256, rate=float("inf"), max_concurrency=256)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", help="an already running server; default: start `cubelm serve`")
    ap.add_argument("--model", help="model directory for the started server")
    ap.add_argument("--sweep", action="store_true", help="the whole protocol (see the module docstring)")
    ap.add_argument("--rate", type=float, default=float("inf"), help="Poisson arrival rate, req/s (inf = all at once)")
    ap.add_argument("--max-concurrency", type=int, help="at most this many requests in flight")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32, help="output tokens per request (EOS ignored)")
    ap.add_argument("--max-batch-delay-ms", default="0", help="comma list; one started server per value")
    ap.add_argument("--server-arg", action="append", default=[], help="extra flag for the started server")
    ap.add_argument("--out", help="also write the results as JSON here")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        targets = [(None, args.base_url)] if args.base_url else []
        what = "the server at " + args.base_url if args.base_url else ""
        if not targets:
            model, what = (Path(args.model), args.model) if args.model else default_or_tiny_model(Path(tmp))
            targets = [(float(d), None) for d in args.max_batch_delay_ms.split(",")]
        print(f"model: {what}; {args.max_tokens} output tokens per request, greedy, EOS ignored\n")
        for delay, base in targets:
            proc = None
            if base is None:
                proc, base = start_server(model, delay, args.server_arg)
            try:
                rows = sweep(base, args) if args.sweep else [
                    (f"rate {args.rate}, concurrency {args.max_concurrency}",
                     asyncio.run(run_load(base, args.num_prompts, args.max_tokens, args.rate, args.max_concurrency)))]
            finally:
                if proc is not None:
                    proc.terminate()
                    proc.wait(60)
            print(f"### --max-batch-delay-ms {delay:g}\n" if delay is not None else "", end="")
            print(HEADER)
            for label, s in rows:
                print(row(label, s))
            report[str(delay)] = rows
            if args.sweep:
                unloaded, half = rows[0][1], rows[3][1]
                ok = half["ttft_p99_ms"] <= 3 * unloaded["ttft_p50_ms"]
                print(f"\ngoal TTFT: p99 at 1/2 peak {half['ttft_p99_ms']:.0f} ms vs 3 x unloaded p50 "
                      f"{3 * unloaded['ttft_p50_ms']:.0f} ms: {'met' if ok else 'NOT met'}; goal 256 streams: "
                      f"{rows[-1][1]['failed']} errors ({'met' if rows[-1][1]['failed'] == 0 else 'NOT met'})\n")
            for _, s in rows:
                if s["errors"]:
                    print("errors:", s["errors"])
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
