"""The cleaning report: how many documents each rule removed, with a few examples each.

Invariant (checked by ``CleanReport.check``): ``kept + sum(removed.values()) == read``: every document read is
either kept or removed for exactly one reason (the first rule it fails). ``cubelm data prepare`` writes the
report as ``report.json`` (for programs) and ``report.txt`` (for people) into its output directory.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

SNIPPET_CHARS = 80


def snippet(text: str, limit: int = SNIPPET_CHARS) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


@dataclass(slots=True, kw_only=True)
class CleanReport:
    source: str
    config: dict
    num_examples: int = 3
    read: int = 0
    kept: int = 0
    chars_read: int = 0
    chars_kept: int = 0
    removed: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[dict]] = field(default_factory=dict)
    source_sha256: str = ""

    def add_read(self, num_chars: int) -> None:
        self.read += 1
        self.chars_read += num_chars

    def add_kept(self, num_chars: int) -> None:
        self.kept += 1
        self.chars_kept += num_chars

    def add_removed(self, reason: str, doc_id: str, text: str, detail: str = "") -> None:
        self.removed[reason] = self.removed.get(reason, 0) + 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < self.num_examples:
            examples.append({"id": doc_id, "snippet": snippet(text), "detail": detail})

    def check(self) -> None:
        # NOTE: a broken invariant is a bug in cubelm, not a user mistake, hence AssertionError.
        total = self.kept + sum(self.removed.values())
        assert total == self.read, f"report does not add up: kept {self.kept} + removed {total - self.kept} != read {self.read}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("num_examples")
        d["removed"] = dict(sorted(self.removed.items()))
        d["examples"] = dict(sorted(self.examples.items()))
        return d

    def to_text(self) -> str:
        pct = (lambda n: f"{100 * n / self.read:5.1f}%") if self.read else (lambda n: "    -")
        lines = [f"cleaning report for {self.source}",
                 f"  read     {self.read:>9,} documents  {self.chars_read:>13,} chars",
                 f"  kept     {self.kept:>9,} documents  {self.chars_kept:>13,} chars  {pct(self.kept)}"]
        for reason, count in sorted(self.removed.items()):
            lines.append(f"  removed  {count:>9,}  {pct(count)}  {reason}")
            for ex in self.examples.get(reason, []):
                detail = f" ({ex['detail']})" if ex["detail"] else ""
                lines.append(f"      {ex['id']}{detail}: {ex['snippet']!r}")
        lines.append(f"  source sha256 {self.source_sha256}")
        return "\n".join(lines) + "\n"

    def write(self, out_dir: Path) -> None:
        self.check()
        (out_dir / "report.json").write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")
        (out_dir / "report.txt").write_text(self.to_text())
