"""Fine-tuning data: rows from a JSONL file or the built-in ``stdlib-instruct`` set → tokenized train/val examples.

    --data rows.jsonl                   # chat, Alpaca or prompt/completion rows (``cubelm.finetune.render``)
    --data stdlib-instruct              # docstring → function source, from the running interpreter's stdlib
    --data stdlib-instruct:json,email   # only those modules (and their submodules)

The validation split is deterministic and by group: a JSONL row's group is its own text (duplicates stay on one
side); a stdlib-instruct example's group is its module (``json.decoder``), so whole modules are held out of
training, which is what the held-out quality table measures. Rows that cannot be used are counted by reason and
skipped; rows longer than the context are dropped (or cut, with ``truncate``) and counted; no usable row at all is
an error. ``DataReport`` says what happened (printed, and written to ``OUT/data_report.json``).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cubelm.errors import CubelmError
from cubelm.finetune.render import Conversation, Example, RowError, fit, parse_row, tokenize

STDLIB_INSTRUCT = "stdlib-instruct"


@dataclass(slots=True)
class DataReport:
    source: str
    rows: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> rows
    truncated: int = 0
    train_examples: int = 0
    val_examples: int = 0
    train_tokens: int = 0
    train_answer_tokens: int = 0
    val_answer_tokens: int = 0
    val_groups: list[str] = field(default_factory=list)  # held-out modules (stdlib-instruct)

    def summary(self) -> str:
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())) or "none"
        held = f" from {len(self.val_groups)} held-out modules" if self.source.startswith(STDLIB_INSTRUCT) else ""
        return (f"{self.source}: {self.rows:,} rows -> train {self.train_examples:,} examples ({self.train_tokens:,} "
                f"tokens, {self.train_answer_tokens:,} answer tokens), validation {self.val_examples:,}{held} "
                f"({self.val_answer_tokens:,} answer tokens); skipped: {skipped}; truncated: {self.truncated}")

    def to_dict(self) -> dict:
        return {"source": self.source, "rows": self.rows, "skipped": dict(self.skipped), "truncated": self.truncated,
                "train_examples": self.train_examples, "val_examples": self.val_examples,
                "train_tokens": self.train_tokens, "train_answer_tokens": self.train_answer_tokens,
                "val_answer_tokens": self.val_answer_tokens, "val_groups": self.val_groups}


@dataclass(slots=True)
class InstructData:
    train: list[Example]
    val: list[Example]
    report: DataReport


def build_instruct_data(source: str, tokenizer, *, max_len: int, val_fraction: float, max_val_examples: int = 0,
                        truncate: bool = False) -> InstructData:
    """Read, render, tokenize and split. ``max_len`` counts tokens per example (the context + 1 target)."""
    report = DataReport(source)
    usable: list[tuple[str, str, Example]] = []  # (row id, group, example)
    for row_id, group, row in iter_rows(source):
        report.rows += 1
        try:
            if isinstance(row, RowError):
                raise row
            conv = row if isinstance(row, Conversation) else parse_row(row)
            _check_template(conv, tokenizer, source, row_id)
            example = tokenize(conv, tokenizer)
            fitted = fit(example, max_len, truncate=truncate)
        except RowError as e:
            report.skipped[e.reason] += 1
            continue
        report.truncated += fitted is not example
        usable.append((row_id, group, fitted))
    if not usable:
        raise CubelmError(_no_rows_message(report, max_len))
    train, val = _split(usable, val_fraction, max_val_examples, report)
    report.train_examples, report.val_examples = len(train), len(val)
    report.train_tokens = sum(len(e.ids) for e in train)
    report.train_answer_tokens = sum(e.num_answer_tokens for e in train)
    report.val_answer_tokens = sum(e.num_answer_tokens for e in val)
    return InstructData(train, val, report)


def _check_template(conv: Conversation, tokenizer, source: str, row_id: str) -> None:
    if conv.needs_template and tokenizer.chat_template is None:
        raise CubelmError(f"{source} has chat or Alpaca rows (the first: {row_id}), which are rendered with the "
                          f"model's chat template, but the tokenizer in {tokenizer.name} has none (no "
                          f"chat_template.jinja, no chat_template in tokenizer_config.json); add one, or write the "
                          f"rows as {{\"prompt\": ..., \"completion\": ...}} (plain text)")


def _no_rows_message(report: DataReport, max_len: int) -> str:
    if not report.rows:
        return f"{report.source} has no rows; give a JSONL file with one JSON object per line"
    reasons = ", ".join(f"{k} {v}" for k, v in report.skipped.most_common())
    long = report.skipped.get("too_long", 0) + report.skipped.get("prompt_too_long", 0)
    hint = f"; {long} do not fit {max_len} tokens: raise --seq-len (or add --truncate)" if long else ""
    return (f"no usable rows in {report.source}: {report.rows} read, all skipped ({reasons}){hint}; a row is "
            f'{{"messages": [..., {{"role": "assistant", "content": ...}}]}}, {{"instruction", "input", "output"}} '
            f'or {{"prompt", "completion"}}, with a non-empty answer')


def _split(usable, val_fraction: float, max_val_examples: int, report: DataReport):
    from cubelm.data.pack import split_by_hash
    digest = {g: hashlib.sha256(g.encode()).hexdigest() for g in {group for _, group, _ in usable}}
    val_digests = split_by_hash(list(digest.values()), val_fraction)
    if not val_digests:
        raise CubelmError(f"{report.source} has one usable row (or one module): validation needs a second one")
    train = [e for _, g, e in usable if digest[g] not in val_digests]
    val = [(row_id, e) for row_id, g, e in usable if digest[g] in val_digests]
    report.val_groups = sorted(g for g, d in digest.items() if d in val_digests)
    if max_val_examples and len(val) > max_val_examples:  # a spread over the held-out groups, in a fixed order
        keep = set(sorted(range(len(val)), key=lambda i: hashlib.sha256(val[i][0].encode()).digest())
                   [:max_val_examples])
        val = [item for i, item in enumerate(val) if i in keep]
    return train, [e for _, e in val]


# ---- sources ------------------------------------------------------------------------------------------------
def iter_rows(source: str) -> Iterator[tuple[str, str, object]]:
    """(row id, split group, JSON record or ``Conversation`` or ``RowError``) in a fixed order."""
    if source == STDLIB_INSTRUCT or source.startswith(STDLIB_INSTRUCT + ":"):
        modules = [m for m in source.partition(":")[2].split(",") if m]
        return _stdlib_rows(modules)
    path = Path(source)
    if path.suffix != ".jsonl":
        raise CubelmError(f"--data {source!r}: give a .jsonl file of instruct rows, or {STDLIB_INSTRUCT} "
                          f"(optionally {STDLIB_INSTRUCT}:MODULE,MODULE)")
    if not path.is_file():
        raise CubelmError(f"--data {source}: no such file")
    return _jsonl_rows(path)


def _jsonl_rows(path: Path) -> Iterator[tuple[str, str, object]]:
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            row_id = f"{path.name}:{line_no}"
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                record = RowError("bad_json")
            yield row_id, raw.strip().decode("utf-8", "replace"), record


def module_name(rel_path: str) -> str:
    """``json/decoder.py`` → ``json.decoder``; ``json/__init__.py`` → ``json``."""
    parts = rel_path.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _stdlib_rows(modules: list[str]) -> Iterator[tuple[str, str, object]]:
    from cubelm.data.instruct import to_messages
    records = _cached_stdlib_records() if not modules else _stdlib_records(modules)
    for row_id, module, example in records:
        yield row_id, module, Conversation(messages=tuple(to_messages(example)))


def _stdlib_records(modules: list[str]) -> Iterator[tuple[str, str, object]]:
    """(row id, module, ``InstructExample``) parsed from the stdlib files of ``modules`` (all when empty)."""
    from cubelm.data.sources import stdlib_files, stdlib_root
    from cubelm.data.stdlib_instruct import examples_from_source
    root, seen = stdlib_root(), set()
    for path in stdlib_files():
        rel = path.relative_to(root).as_posix()
        module = module_name(rel)
        if modules and not any(module == m or module.startswith(m + ".") for m in modules):
            continue
        seen.add(module.split(".")[0])
        try:
            text = path.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for name, example in examples_from_source(text):
            yield f"{rel}:{name}", module, example
    unknown = [m for m in modules if m.split(".")[0] not in seen]
    if unknown:
        raise CubelmError(f"{STDLIB_INSTRUCT}: no standard-library module {', '.join(unknown)}")


def _cached_stdlib_records() -> list[tuple[str, str, object]]:
    """The whole set, parsed once per interpreter (``ast`` over ~1,800 files takes 15-45 s on 2 busy cores) and kept
    in ``$CUBELM_HOME/cache``: it is a pure function of the standard library's files."""
    import os
    import sys

    from cubelm.data.instruct import InstructExample
    from cubelm.data.sources import stdlib_root
    from cubelm.store import cubelm_home
    key = hashlib.sha256(f"{sys.version}|{stdlib_root()}|v1".encode()).hexdigest()[:16]
    cache = cubelm_home() / "cache" / f"stdlib-instruct-{key}.jsonl"
    if cache.is_file():
        rows = [json.loads(line) for line in cache.read_text(encoding="utf-8").splitlines()]
        return [(r["id"], r["module"], InstructExample.from_dict(r)) for r in rows]
    records = list(_stdlib_records([]))
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f"{cache.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps({"id": i, "module": m, **e.to_dict()}) + "\n" for i, m, e in records),
                   encoding="utf-8")
    os.replace(tmp, cache)  # atomic: concurrent ranks write the same content
    return records
