"""Load benchmark for ``cubelm serve`` (§6.3.2, §6.3.3): streaming requests, Poisson arrivals or fixed concurrency.

The client and the metrics are ``cubelm bench serve``'s (``cubelm.eval.serve_bench``, vLLM's definitions: TTFT =
time to the first streamed token; ITL = gaps between streamed chunks; TPOT = (latency - TTFT) / (output tokens - 1)
per request; E2E = request latency; throughput = completed requests (and output tokens) per second of the run);
this script adds a protocol around them, starting the server itself. ``--sweep`` runs it and checks the goals:

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
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n", "class Stack:\n    def __init__(self):",
           "for i in range(10):", "with open(path) as f:", "def quicksort(xs):\n    if len(xs) < 2:"]


def run_load(base: str, num_prompts: int, max_tokens: int, rate: float, max_concurrency: int | None,
             seed: int = 0) -> dict:
    """One run through ``cubelm bench serve``'s client and metrics (``cubelm.eval.serve_bench``): Poisson arrivals
    at ``rate`` (inf = all at once), the text prompts above in turn."""
    from cubelm.eval.serve_bench import BenchRequest, arrival_offsets, compute_metrics, run_requests

    async def go():
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(600, connect=60), limits=limits) as c:
            model = (await c.get("/v1/models")).json()["data"][0]["id"]
            reqs = [BenchRequest(PROMPTS[i % len(PROMPTS)], max_tokens) for i in range(num_prompts)]
            offsets = arrival_offsets(num_prompts, rate, 1.0, np.random.default_rng(seed))
            return await run_requests(c, "/v1/completions", model, reqs, offsets, max_concurrency=max_concurrency,
                                      ignore_eos=True)

    outputs, duration = asyncio.run(go())
    r = compute_metrics(outputs, duration, percentiles=(50, 99))
    return {**r, "rate": rate, "max_concurrency": max_concurrency,
            "errors": sorted({o.error for o in outputs if not o.success})[:3]}


HEADER = ("| load | done | failed | req/s | out tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | ITL p50 / p99 ms "
          "| E2E p50 / p99 ms |\n|---|---|---|---|---|---|---|---|---|")


def row(label: str, s: dict) -> str:
    return (f"| {label} | {s['completed']} | {s['failed']} | {s['request_throughput']:.2f} | "
            f"{s['output_throughput']:.0f} | {s['p50_ttft_ms']:.0f} / {s['p99_ttft_ms']:.0f} | "
            f"{s['p50_tpot_ms']:.1f} / {s['p99_tpot_ms']:.1f} | {s['p50_itl_ms']:.1f} / {s['p99_itl_ms']:.1f} | "
            f"{s['p50_e2el_ms']:.0f} / {s['p99_e2el_ms']:.0f} |")


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
    run = lambda **kw: run_load(base, max_tokens=args.max_tokens, **kw)  # noqa: E731
    run(num_prompts=4, rate=float("inf"), max_concurrency=4)  # warm-up
    unloaded = run(num_prompts=10, rate=float("inf"), max_concurrency=1)
    out.append(("unloaded (concurrency 1)", unloaded))
    peak = run(num_prompts=args.num_prompts, rate=float("inf"), max_concurrency=None)
    out.append((f"peak (all {args.num_prompts} at once)", peak))
    for frac in (0.25, 0.5, 0.75):
        rate = frac * peak["request_throughput"]
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
                     run_load(base, args.num_prompts, args.max_tokens, args.rate, args.max_concurrency))]
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
                ok = half["p99_ttft_ms"] <= 3 * unloaded["p50_ttft_ms"]
                print(f"\ngoal TTFT: p99 at 1/2 peak {half['p99_ttft_ms']:.0f} ms vs 3 x unloaded p50 "
                      f"{3 * unloaded['p50_ttft_ms']:.0f} ms: {'met' if ok else 'NOT met'}; goal 256 streams: "
                      f"{rows[-1][1]['failed']} errors ({'met' if rows[-1][1]['failed'] == 0 else 'NOT met'})\n")
            for _, s in rows:
                if s["errors"]:
                    print("errors:", s["errors"])
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
