"""The table of ``benchmarks/engine_peers.py``: medians of interleaved rounds, cubelm/peer ratios, greedy agreement.

Pure functions over the samples the harness collected, so the arithmetic is tested without any peer installed
(tests/test_engine_peers.py). A sample is ``{"tok_s": float, "tokens": [ids]}`` (batch-1 decode) or
``{"tok_s": float, "outputs": [[ids], ...]}`` (the offline workload, one list per request, in request order).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass


@dataclass(slots=True, kw_only=True)
class Row:
    workload: str
    model: str
    engine: str
    precision: str
    tok_s: float | None = None  # the engine's median
    cubelm_dtype: str | None = None  # the cubelm run it was interleaved with
    cubelm_tok_s: float | None = None
    ratio: float | None = None  # cubelm / engine: > 1 means cubelm is faster
    greedy: str = ""
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def agreement(reference: dict, other: dict) -> str:
    """Whether ``other`` produced the reference's greedy tokens: 'yes', or where it diverged / how many agree."""
    if "tokens" in reference:
        ref, got = reference["tokens"], other["tokens"]
        same = next((i for i, (x, y) in enumerate(zip(ref, got)) if x != y), min(len(ref), len(got)))
        if same == len(ref) == len(got):
            return "yes"
        return f"no: first {same} of {len(ref)} equal"
    ref, got = reference["outputs"], other["outputs"]
    equal = sum(x == y for x, y in zip(ref, got))
    return "yes" if equal == len(ref) == len(got) else f"{equal}/{len(ref)} requests equal"


def summarize(samples: dict[str, list[dict]], pairs: dict[str, str], where: dict) -> list[Row]:
    """One row per compared engine precision. ``samples`` maps 'cubelm <dtype>' and 'peer <precision>' to the
    rounds' samples; ``pairs`` maps each peer precision to the cubelm dtype it was interleaved with. Greedy tokens
    are compared on the first round (every round decodes the same prompt)."""
    rows = []
    for precision, dtype in pairs.items():
        peer, ours = samples[f"peer {precision}"], samples[f"cubelm {dtype}"]
        peer_rate = statistics.median(s["tok_s"] for s in peer)
        our_rate = statistics.median(s["tok_s"] for s in ours)
        rows.append(Row(**where, precision=precision, tok_s=peer_rate, cubelm_dtype=dtype, cubelm_tok_s=our_rate,
                        ratio=our_rate / peer_rate, greedy=agreement(ours[0], peer[0])))
    return rows


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:,.1f}"


def format_table(rows: list[Row]) -> str:
    """A Markdown table (pasted as-is into docs/benchmarks.md)."""
    lines = ["| workload | model | engine | precision | tok/s | cubelm tok/s (same rounds) | cubelm / engine "
             "| greedy tokens = cubelm's | note |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ours = "—" if r.cubelm_tok_s is None else f"{r.cubelm_tok_s:,.1f} ({r.cubelm_dtype})"
        ratio = "—" if r.ratio is None else f"{r.ratio:.2f}×"
        lines.append(f"| {r.workload} | {r.model} | {r.engine} | {r.precision} | {_num(r.tok_s)} | {ours} | {ratio} "
                     f"| {r.greedy or '—'} | {r.note} |")
    return "\n".join(lines)
