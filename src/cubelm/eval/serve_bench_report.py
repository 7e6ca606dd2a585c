"""Reports of ``cubelm bench serve``: vLLM's text block per run, a markdown table across rates, the JSON file name,
and a PNG (latency distributions per rate; throughput and p99 latency against the offered rate)."""

from __future__ import annotations

import math
from pathlib import Path

from cubelm.eval.serve_bench import METRICS

_TITLES = {"ttft": ("Time to First Token", "TTFT"), "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
           "itl": ("Inter-token Latency", "ITL"), "e2el": ("End-to-end Latency", "E2EL")}


def format_result(r: dict, percentile_metrics, percentiles) -> str:
    """The block ``vllm bench serve`` prints, same labels, plus goodput and cost when asked for."""
    lines = ["{s:{c}^50}".format(s=f" Serving Benchmark Result ({_rate(r['request_rate'])} req/s) ", c="=")]
    row = lambda label, value: lines.append(f"{label:<40}{value:<10}")  # noqa: E731
    row("Successful requests:", r["completed"])
    row("Failed requests:", r["failed"])
    row("Benchmark duration (s):", f"{r['duration']:.2f}")
    row("Total input tokens:", r["total_input_tokens"])
    row("Total generated tokens:", r["total_output_tokens"])
    row("Request throughput (req/s):", f"{r['request_throughput']:.2f}")
    if r.get("request_goodput") is not None:
        row("Request goodput (req/s):", f"{r['request_goodput']:.2f}")
    row("Output token throughput (tok/s):", f"{r['output_throughput']:.2f}")
    row("Peak output token throughput (tok/s):", f"{r['max_output_tokens_per_s']:.2f}")
    row("Peak concurrent requests:", r["max_concurrent_requests"])
    row("Total Token throughput (tok/s):", f"{r['total_token_throughput']:.2f}")
    if r.get("cost_per_1m_output_tokens_usd") is not None:
        row("Price (USD per replica-hour):", f"{r['hourly_price_usd']:g}")
        row("Cost per 1M output tokens (USD):", f"{r['cost_per_1m_output_tokens_usd']:.4f}")
        row("Cost per 1M total tokens (USD):", f"{r['cost_per_1m_total_tokens_usd']:.4f}")
    for m in percentile_metrics:
        title, short = _TITLES[m]
        lines.append("{s:{c}^50}".format(s=title, c="-"))
        row(f"Mean {short} (ms):", f"{r[f'mean_{m}_ms']:.2f}")
        row(f"Median {short} (ms):", f"{r[f'median_{m}_ms']:.2f}")
        for p in percentiles:
            pw = str(int(p)) if int(p) == p else str(p)
            row(f"P{pw} {short} (ms):", f"{r[f'p{pw}_{m}_ms']:.2f}")
    lines.append("=" * 50)
    if r.get("errors"):
        lines.append("errors (first 3 kinds): " + "; ".join(sorted(set(r["errors"]))[:3]))
    return "\n".join(lines)


def _rate(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def markdown_table(results: list[dict]) -> str:
    """One row per run: what docs/benchmarks.md shows (means / medians / p99 in ms, cost when priced)."""
    priced = any(r.get("cost_per_1m_output_tokens_usd") is not None for r in results)
    good = any(r.get("request_goodput") is not None for r in results)
    head = ["rate (req/s)", "done / failed", "req/s", *(["goodput req/s"] if good else []), "out tok/s",
            "total tok/s", *(f"{_TITLES[m][1]} mean / median / p99 ms" for m in METRICS),
            *(["$ / 1M out tok", "$ / 1M total tok"] if priced else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [_rate(r["request_rate"]), f"{r['completed']} / {r['failed']}", f"{r['request_throughput']:.2f}",
                 *([f"{r['request_goodput']:.2f}" if r.get("request_goodput") is not None else "-"] if good else []),
                 f"{r['output_throughput']:.0f}", f"{r['total_token_throughput']:.0f}"]
        for m in METRICS:
            p99 = r.get(f"p99_{m}_ms")
            cells.append(f"{r[f'mean_{m}_ms']:.1f} / {r[f'median_{m}_ms']:.1f} / "
                         + (f"{p99:.1f}" if p99 is not None else "-"))
        if priced:
            cells += [f"{r['cost_per_1m_output_tokens_usd']:.3f}", f"{r['cost_per_1m_total_tokens_usd']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def result_filename(r: dict, date: str) -> str:
    """vLLM's ``{backend}-{rate}qps[-concurrency{n}]-{model}-{date}.json``."""
    conc = f"-concurrency{r['max_concurrency']}" if r.get("max_concurrency") else ""
    model = str(r["model_id"]).split("/")[-1]
    return f"openai-{_rate(r['request_rate'])}qps{conc}-{model}-{date}.json"


def plot_results(results: list[dict], path: str | Path) -> Path:
    """Left: TTFT and E2EL CDFs per rate. Right: output throughput and p99 TTFT / E2EL against the offered rate
    (inf drawn at the achieved request rate)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=80)
    for i, r in enumerate(results):
        color = f"C{i}"
        for key, style in (("ttfts", "--"), ("e2els", "-")):
            xs = np.sort(np.asarray(r.get(key) or [0.0]) * 1000)
            ax1.plot(xs, np.arange(1, len(xs) + 1) / len(xs), style, color=color,
                     label=f"{key[:-1].upper()} @ {_rate(r['request_rate'])} req/s")
    ax1.set(xscale="log", xlabel="ms", ylabel="fraction of requests", title="latency CDF (TTFT dashed, E2EL solid)")
    ax1.legend(fontsize=6)
    x = [r["request_throughput"] if math.isinf(r["request_rate"]) else r["request_rate"] for r in results]
    order = np.argsort(x)
    xs = np.asarray(x)[order]
    ax2.plot(xs, [results[i]["output_throughput"] for i in order], "o-", color="C0", label="output tok/s")
    ax2.set(xlabel="offered request rate (req/s; inf at its achieved rate)", ylabel="output tok/s",
            title="throughput and p99 latency vs load")
    tw = ax2.twinx()
    for m, c in (("ttft", "C3"), ("e2el", "C1")):
        if f"p99_{m}_ms" in results[0]:
            tw.plot(xs, [results[i][f"p99_{m}_ms"] for i in order], "s--", color=c, label=f"p99 {m.upper()} ms")
    tw.set_ylabel("ms")
    h1, l1 = ax2.get_legend_handles_labels()
    h2, l2 = tw.get_legend_handles_labels()
    ax2.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper left")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
