"""The inference graph's cost (book §6.2.4): a chat through the router vs the same grounded chat sent to the LLM
service directly, and where the router's time goes, hop by hop.

    CUBELM_HOME=/work/demo-home python benchmarks/inference_graph.py             # the default model, ~2 min
    python benchmarks/inference_graph.py --model DIR --source src/cubelm --rounds 5 --max-tokens 32

Starts the three services as ``cubelm`` processes on loopback (encoder: all-MiniLM-L6-v2; LLM: ``--model``;
router over an index ingested from ``--source``), then, in every round and for every question, times A = the
router end to end (embed -> search -> LLM) and B = the LLM service alone with the messages the router builds
(the client embeds, searches and grounds first, untimed; each request has its own system line, so that neither
path reuses the other's prompt from the LLM's prefix cache), interleaved A B A B because the host is shared.
Reported: medians (and means) over all requests, the ratio A/B (per round, then the median) and the graph's
overhead (A - B), plus the router's own per-hop means from its ``/metrics`` (``cubelm:router_hop_latency_seconds``:
a histogram, so means, which outliers on a shared host inflate).
Generation length is fixed (``ignore_eos``), greedy.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUESTIONS = ["How does the server drain on SIGTERM?", "Which metrics does the embedding batcher export?",
             "How are API keys compared?", "What does the rate limiter do with a Redis URL?",
             "How is a request body size limited?", "How are server-sent events sent to the client?"]


def start(*args: str, port: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cubelm", *args, "--port", str(port), "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})


def histogram(base: str, name: str) -> tuple[float, float]:
    """(sum, count) of a histogram over all its series."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families
    out = [0.0, 0.0]
    for fam in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=10).text):
        for s in fam.samples:
            if s.name in (name + "_sum", name + "_count"):
                out[s.name.endswith("_count")] += s.value
    return out[0], out[1]


def hop_means(base: str) -> dict[str, tuple[float, float]]:
    """hop -> (sum seconds, count) of the router's hop-latency histogram."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families
    out: dict[str, list[float]] = {}
    for fam in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=10).text):
        for s in fam.samples:
            if s.name.startswith("cubelm:router_hop_latency_seconds_") and s.name.endswith(("_sum", "_count")):
                out.setdefault(s.labels["hop"], [0.0, 0.0])[s.name.endswith("_count")] += s.value
    return {h: (v[0], v[1]) for h, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="LLM model directory (default: the model store's default)")
    ap.add_argument("--source", default=str(Path(__file__).resolve().parents[1] / "src" / "cubelm" / "serve"),
                    help="directory to ingest into the router's index")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("--max-context-tokens", type=int, default=500,
                    help="the router's bound on the grounded prompt (estimated tokens: keep it well under the "
                         "model's context, the default model's is 1024 real tokens)")
    args = ap.parse_args()

    import httpx

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers import free_port, wait_ready

    from cubelm.rag.prompt import DEFAULT_SYSTEM, grounded_messages
    from cubelm.rag.store import open_store
    from cubelm.systems.host import describe_host, host_info

    tmp = Path(tempfile.mkdtemp(prefix="cubelm-graph-"))
    ingest = subprocess.run([sys.executable, "-m", "cubelm", "rag", "ingest", "--source", args.source, "--index",
                             str(tmp / "index")], capture_output=True, text=True, env={**os.environ,
                                                                                       "HF_HUB_OFFLINE": "1"})
    assert ingest.returncode == 0, ingest.stderr
    print(ingest.stdout.strip())
    ports = {name: free_port() for name in ("encoder", "llm", "router")}
    base = {name: f"http://127.0.0.1:{p}" for name, p in ports.items()}
    procs = {"encoder": start("serve", "--task", "embed", "--model", "all-minilm-l6-v2", port=ports["encoder"]),
             "llm": start("serve", *(["--model", args.model] if args.model else []), "--served-model-name", "m",
                          port=ports["llm"])}
    try:
        for name, p in procs.items():
            wait_ready(base[name], p, timeout=300)
        procs["router"] = start("rag", "router", "--embed-url", base["encoder"], "--llm-url", base["llm"], "--index",
                                str(tmp / "index"), "-k", str(args.k), "--max-context-tokens",
                                str(args.max_context_tokens), port=ports["router"])
        wait_ready(base["router"], procs["router"])
        store = open_store(tmp / "index", create=False)
        client = httpx.Client(timeout=600)
        params = {"model": "m", "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True}

        def hits_of(q: str):
            r = client.post(f"{base['encoder']}/v1/embeddings", json={"input": [q]})
            return store.search([r.json()["data"][0]["embedding"]], args.k)[0]

        # NOTE: every request gets its own system line, so neither path finds the other's prompt in the LLM's
        # prefix cache (B right after A with the same messages would skip its prefill); the router puts the
        # client's system message after its grounding instruction, and so does the direct path here
        def routed(q: str, n: int) -> list[dict]:
            return [{"role": "system", "content": f"Request {n}."}, {"role": "user", "content": q}]

        def direct_messages(q: str, n: int) -> list[dict]:
            return grounded_messages(q, hits[q], system=f"{DEFAULT_SYSTEM}\n\nRequest {n}.",
                                     max_context_tokens=args.max_context_tokens)

        def timed(url: str, messages: list[dict]) -> float:
            t0 = time.perf_counter()
            r = client.post(url, json={**params, "messages": messages})
            assert r.status_code == 200, r.text
            return time.perf_counter() - t0

        hits = {q: hits_of(q) for q in QUESTIONS}
        timed(f"{base['router']}/v1/chat/completions", routed(QUESTIONS[0], -1))  # warm-up
        timed(f"{base['llm']}/v1/chat/completions", direct_messages(QUESTIONS[0], -2))
        before = hop_means(base["router"])
        enc_before = histogram(base["encoder"], "cubelm:embedding_request_latency_seconds")
        graph, direct, ratios = [], [], []
        n = 0
        for _ in range(args.rounds):
            a_round, b_round = [], []
            for q in QUESTIONS:
                b_messages = direct_messages(q, n + 1)
                a_round.append(timed(f"{base['router']}/v1/chat/completions", routed(q, n)))
                b_round.append(timed(f"{base['llm']}/v1/chat/completions", b_messages))
                n += 2
            graph += a_round
            direct += b_round
            ratios.append(statistics.median(a_round) / statistics.median(b_round))
        after = hop_means(base["router"])
        enc_after = histogram(base["encoder"], "cubelm:embedding_request_latency_seconds")
    finally:
        for p in procs.values():
            p.kill()
            p.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"host: {describe_host(host_info())}")
    print(f"{len(QUESTIONS)} questions x {args.rounds} rounds, k={args.k} (at most {args.max_context_tokens} estimated "
          f"prompt tokens), {args.max_tokens} tokens generated, greedy")
    a, b = statistics.median(graph), statistics.median(direct)
    print("| path | median ms | mean ms |\n|---|---:|---:|")
    print(f"| router (embed -> search -> LLM) | {a * 1e3:.1f} | {statistics.mean(graph) * 1e3:.1f} |")
    print(f"| LLM alone, same messages | {b * 1e3:.1f} | {statistics.mean(direct) * 1e3:.1f} |")
    print(f"graph / direct: {statistics.median(ratios):.3f} (median of per-round ratios); overhead "
          f"{(a - b) * 1e3:.1f} ms")
    print("| hop | mean ms | calls |\n|---|---:|---:|")
    for hop in ("embed", "search", "tokenize", "llm"):
        s = after.get(hop, (0, 0))[0] - before.get(hop, (0, 0))[0]
        n = after.get(hop, (0, 0))[1] - before.get(hop, (0, 0))[1]
        print(f"| {hop} | {s / max(n, 1) * 1e3:.1f} | {n:.0f} |")
    s, n = enc_after[0] - enc_before[0], enc_after[1] - enc_before[1]  # the router's calls only
    print(f"| (embed, inside the encoder service) | {s / max(n, 1) * 1e3:.1f} | {n:.0f} |")


if __name__ == "__main__":
    main()
