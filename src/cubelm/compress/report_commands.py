"""``cubelm compress report --model DIR --out OUT``: the table, the PNG and the book's claims checked against them.

Writes ``OUT/report.json`` (every figure and round), ``OUT/report.md`` (the table) and ``OUT/report.png`` (size
on disk vs held-out bits per byte, marker area proportional to batch-1 decode tok/s), and prints the table and the
claims (§10.8, §17.4.2) with what this run measured for each.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from cubelm.cli import opt
from cubelm.errors import CubelmError


@dataclass(slots=True, kw_only=True)
class ReportOptions:
    model: str | None = opt(None, help="float model directory (HF format); default: the default model")
    out: str = opt(help="output directory: one subdirectory per method, report.json, report.md, report.png",
                   metavar="DIR")
    methods: str = opt("all", help="comma-separated subset of: int8, int4, magnitude, magnitude-recovered, "
                                   "2:4-recovered, heads, neurons-recovered, lowrank, share, w8a8, deep, distill "
                                   "(the original is always measured)")
    source: str = opt("package:tqdm", help="held-out text: package:NAME or a path (as cubelm eval bpb)")
    max_bytes: int = opt(200_000, help="held-out bytes to score")
    data: str | None = opt(None, help="recovery data for the pruning rows (default: the model's training data)",
                           metavar="SRC")
    recover_steps: int = opt(100, help="recovery fine-tuning steps of the *-recovered pruning rows")
    lowrank_energy: float = opt(0.9, help="low-rank row: kept singular-value energy")
    share_groups: int = opt(2, help="layer-sharing row: number of weight sets")
    distill_student: str = opt("nano", help="distillation row: the student preset (same tokenizer as the model)")
    distill_steps: int = opt(150, help="distillation row: training steps of 16 x 128 tokens")
    calib: int = opt(64, help="W8A8 rows: calibration sequences (SmoothQuant, outlier report)")
    calib_len: int = opt(256, help="W8A8 rows: tokens per calibration sequence")
    rounds: int = opt(3, help="interleaved speed rounds (medians reported)")
    batch: int = opt(16, help="batched-throughput row: sequences decoded together")
    prompt_tokens: int = opt(64, help="prompt tokens per sequence in the speed runs (seeded random ids)")
    new_tokens: int = opt(64, help="tokens generated per sequence in the speed runs")
    reuse: bool = opt(False, help="reuse the methods' outputs, sizes and quality saved by an earlier report in --out "
                                  "(speed is always measured again)")
    speed: bool = opt(True, help="measure decode speed (off: sizes and quality only)")
    seed: int = opt(0, help="recovery data order and prompt ids")
    json: bool = opt(False, help="print report.json instead of the table")

    def __post_init__(self) -> None:
        from cubelm.compress.report import check_methods
        check_methods(self.methods)
        if not 0 < self.lowrank_energy <= 1:
            raise CubelmError(f"--lowrank-energy must be in (0, 1], got {self.lowrank_energy}")
        for name in ("rounds", "batch", "prompt_tokens", "share_groups", "calib", "distill_steps"):
            if getattr(self, name) < 1:
                raise CubelmError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.new_tokens < 2 or self.recover_steps < 0 or self.calib_len < 2:
            raise CubelmError("--new-tokens and --calib-len must be >= 2 and --recover-steps >= 0")


def run_report(o: ReportOptions) -> int:
    from cubelm.compress.report import build_rows, measure_quality, measure_speed
    from cubelm.engine.commands import resolve_model_dir
    from cubelm.eval.bpb import held_out_package, held_out_path
    from cubelm.systems.host import describe_host, host_info
    src, out = resolve_model_dir(o.model), Path(o.out)
    if out.resolve() == src.resolve():
        raise CubelmError(f"--out {out} is the source directory; write the report elsewhere")
    held = (held_out_package(o.source.removeprefix("package:"), o.max_bytes) if o.source.startswith("package:")
            else held_out_path(o.source, o.max_bytes))
    out.mkdir(parents=True, exist_ok=True)
    rows = build_rows(src, out, o)
    measure_quality(rows, held, out)
    if o.speed:
        measure_speed(rows, o)
    source_bpb = rows[0].bpb
    report = {"model": str(src), "host": describe_host(host_info()), "held_out": held.name,
              "held_out_bytes": held.num_bytes,
              "speed": {"rounds": o.rounds, "batch": o.batch, "prompt_tokens": o.prompt_tokens,
                        "new_tokens": o.new_tokens} if o.speed else None,
              "rows": [r.as_dict(source_bpb) for r in rows]}
    report["claims"] = claims(report["rows"])
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    md = table(report)
    (out / "report.md").write_text(md + "\n\n" + "\n".join(f"- {c}" for c in report["claims"]) + "\n")
    png = plot(report, out / "report.png")
    if o.json:
        print(json.dumps(report, indent=2))
        return 0
    print(md)
    print()
    for c in report["claims"]:
        print(f"- {c}")
    print(f"[cubelm] wrote {out / 'report.json'}, {out / 'report.md'}{', ' + str(png) if png else ''}")
    return 0


def table(report: dict) -> str:
    rows = report["rows"]
    base = rows[0]
    lines = [f"model {report['model']} ({rows[0]['params']}); held out: {report['held_out']}, "
             f"{report['held_out_bytes']:,} bytes; {report['host']}"]
    if report["speed"]:
        s = report["speed"]
        lines.append(f"speed: cubelm engine, {s['rounds']} interleaved rounds (medians); batch 1 and batch "
                     f"{s['batch']}, {s['prompt_tokens']} + {s['new_tokens']} tokens per sequence; ratios vs the "
                     f"original row of this run")
    lines += ["", "| method | parameters | bytes on disk | size | bits/byte | Δ | batch-1 tok/s | batch "
              f"{report['speed']['batch'] if report['speed'] else '-'} tok/s |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        size = f"{base['bytes'] / r['bytes']:.2f}× smaller" if r["bytes"] and r is not base else "1×"
        delta = "—" if r is base or r["delta_pct"] is None else f"{r['delta_pct']:+.2f}%"
        lines.append(f"| {r['method']} | {r['params']} | {r['bytes']:,} | {size} | "
                     f"{r['bpb']:.4f} | {delta} | {_speed(r, base, 'decode_tok_s')} | "
                     f"{_speed(r, base, 'batched_tok_s')} |")
    return "\n".join(lines)


def _speed(r: dict, base: dict, key: str) -> str:
    if r[key] is None:
        return "—"
    if r is base or not base[key]:
        return f"{r[key]:.0f}"
    return f"{r[key]:.0f} ({r[key] / base[key]:.2f}×)"


def claims(rows: list[dict]) -> list[str]:
    """The book's claims (§10.8, §17.4.2) and the anchors', each with what this run measured."""
    by = {r["method"]: r for r in rows}
    base = rows[0]
    out = []

    def ratio(r, key):
        return r[key] / base[key] if r.get(key) and base.get(key) else None

    if (r := by.get("int8 weight-only")):
        sp = ratio(r, "decode_tok_s")
        out.append(f"int8 weight-only is nearly free in quality (target Δ ≤ 1%): Δ {r['delta_pct']:+.3f}%, "
                   f"{base['bytes'] / r['bytes']:.2f}× smaller" + (f", batch-1 decode {sp:.2f}× (decode reads the "
                                                                   f"weights: fewer bytes, faster)" if sp else ""))
    w8 = [by[k] for k in ("W8A8 LLM.int8()", "W8A8 SmoothQuant") if k in by]
    if w8:
        out.append("activation outliers handled by LLM.int8() / SmoothQuant (target Δ ≤ 2%): "
                   + ", ".join(f"{r['method']} Δ {r['delta_pct']:+.3f}%" for r in w8)
                   + (f" (plain W8A8 Δ {by['W8A8']['delta_pct']:+.3f}%)" if "W8A8" in by else ""))
    for key in ("prune 2:4", "prune magnitude"):
        for r in (r for r in rows if r["method"].startswith(key)):
            sp = ratio(r, "decode_tok_s")
            if sp:
                out.append(f"{r['method']} ({r['params']}): decode {sp:.2f}× the dense model and the same bytes "
                           f"on disk — on a CPU without sparse kernels (or sparse tensor cores for 2:4) zeros "
                           f"are multiplied like any weight; Δ {r['delta_pct']:+.2f}%")
                break
    for r in rows:
        if r["method"].startswith(("prune neurons", "prune heads")):
            sp = ratio(r, "decode_tok_s")
            out.append(f"structured pruning ({r['method']}, {r['params']}) shrinks the shapes: "
                       f"{base['bytes'] / r['bytes']:.2f}× smaller" + (f", decode {sp:.2f}×" if sp else "")
                       + f", Δ {r['delta_pct']:+.2f}%")
    if (r := by.get("Deep Compression")):
        red = base["bytes"] / r["bytes"]
        out.append(f"Deep Compression (Han et al.: 9–13× without loss, with retraining): {red:.1f}× "
                   f"{'≥' if red >= 8 else '<'} 8× at Δ {r['delta_pct']:+.2f}% without retraining; the container is "
                   f"for storage and transfer: the engine runs the decoded dense model")
    if (r := by.get("low rank (SVD)")):
        sp = ratio(r, "decode_tok_s")
        out.append(f"low rank ({r['params']}): {base['bytes'] / r['bytes']:.2f}× smaller, Δ {r['delta_pct']:+.2f}%"
                   + (f", decode {sp:.2f}×" + (" (two thinner GEMMs per projection)" if sp >= 1 else
                                              " — factorized projections run the module path: the native decode "
                                              "step takes dense and int8/int4 projections only") if sp else ""))
    if (r := by.get("layer sharing")):
        out.append(f"parameter sharing without retraining ({r['params']}): {base['bytes'] / r['bytes']:.2f}× smaller "
                   f"but Δ {r['delta_pct']:+.1f}% — ALBERT shares from the start of training; the FLOPs per token "
                   f"are unchanged")
    return out


def plot(report: dict, png: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in report["rows"] if r["bytes"] and r["bpb"] is not None]
    speeds = [r["decode_tok_s"] for r in rows if r["decode_tok_s"]]
    ref = statistics.median(speeds) if speeds else 1.0
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for r in rows:
        area = 120 * (r["decode_tok_s"] / ref) if r["decode_tok_s"] else 30
        ax.scatter(r["bytes"] / 2**20, r["bpb"], s=area, alpha=0.6,
                   marker="o" if r["decode_tok_s"] else "x")
        ax.annotate(r["method"], (r["bytes"] / 2**20, r["bpb"]), fontsize=8, xytext=(4, 4),
                    textcoords="offset points")
    ax.axhline(report["rows"][0]["bpb"], color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("bytes on disk (MiB, log)")
    ax.set_ylabel("held-out bits per byte")
    ax.set_title(f"compression of {Path(report['model']).name}: marker area ∝ batch-1 decode tok/s "
                 f"(x = no engine path)", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
