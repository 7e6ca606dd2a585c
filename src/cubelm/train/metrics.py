"""Training metrics: one JSON object per line (``metrics.jsonl``) and a PNG of the curves (matplotlib)."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    def __init__(self, path: Path, *, truncate_after_step: int | None = None):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after_step is not None and path.exists():
            # a resumed run rewrites the steps after its checkpoint: drop the killed run's lines for them
            kept = [line for line in path.read_text().splitlines() if _step(line) <= truncate_after_step]
            path.write_text("".join(line + "\n" for line in kept))
        elif truncate_after_step is None:
            path.write_text("")

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def _step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 0


def plot_curves(records: list[dict], png: Path) -> Path | None:
    """Train loss, validation loss and learning rate against step. Returns None if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("kind") == "eval"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        ax1.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax1.plot(*zip(*val), "o-", label="val loss")
    ax1.set_xlabel("step"), ax1.set_ylabel("loss (nats/token)"), ax1.legend(), ax1.grid(alpha=0.3)
    lrs = [(r["step"], r["lr"]) for r in records if r.get("kind") == "train"]
    if lrs:
        ax2.plot(*zip(*lrs))
    ax2.set_xlabel("step"), ax2.set_ylabel("learning rate"), ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png
