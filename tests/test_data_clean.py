"""Cleaning: planted exact and near duplicates are found at the stated threshold, filters do what they say, and
the report's counts add up. Reference for near duplicates: the exact Jaccard similarity of the shingle sets."""

import random

import pytest

from cubelm.data.clean import CleanConfig, Cleaner, normalize_text, shingles
from cubelm.data.sources import Document, read_file, resolve_source
from cubelm.errors import CubelmError

WORDS = [f"w{i}" for i in range(500)]


def _text(rng: random.Random, n: int = 300) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "\n"


def _jaccard(a: str, b: str) -> float:
    sa, sb = set(shingles(a)), set(shingles(b))
    return len(sa & sb) / len(sa | sb)


def _mutate(rng: random.Random, text: str, num_changes: int) -> str:
    words = text.split()
    for i in rng.sample(range(len(words)), num_changes):
        words[i] = "changed"
    return " ".join(words) + "\n"


def _clean(docs, **kw):
    cleaner = Cleaner(CleanConfig(**kw), "test")
    kept = [doc.id for doc, _ in cleaner(docs)]
    return kept, cleaner.report


def test_planted_exact_and_near_duplicates_are_removed():
    rng = random.Random(0)
    originals = [_text(rng) for _ in range(20)]
    docs = [Document(f"orig{i}", t) for i, t in enumerate(originals)]
    near = {f"near{i}": _mutate(rng, originals[i], 2) for i in range(5)}  # ~0.95 Jaccard
    far = {f"far{i}": _mutate(rng, originals[10 + i], 60) for i in range(5)}  # ~0.3 Jaccard: not a duplicate
    exact = {f"exact{i}": originals[i] for i in range(3)}
    for i, t in near.items():
        assert _jaccard(t, originals[int(i[4:])]) > 0.9
    for i, t in far.items():
        assert _jaccard(t, originals[10 + int(i[3:])]) < 0.5
    docs += [Document(k, v) for k, v in {**near, **far, **exact}.items()]

    kept, report = _clean(docs, near_dup_threshold=0.8)

    assert set(kept) == {f"orig{i}" for i in range(20)} | set(far)
    assert report.removed == {"exact_duplicate": 3, "near_duplicate": 5}
    assert report.read == len(docs) and report.kept + sum(report.removed.values()) == report.read
    assert {e["id"] for e in report.examples["near_duplicate"]} <= set(near)
    assert "orig" in report.examples["near_duplicate"][0]["detail"]


def test_near_dup_threshold_is_respected_and_zero_disables():
    rng = random.Random(1)
    base = _text(rng)
    variant = _mutate(rng, base, 25)  # exact Jaccard around 0.55-0.7
    similarity = _jaccard(base, variant)
    assert 0.45 < similarity < 0.75
    docs = [Document("a", base), Document("b", variant)]
    assert _clean(docs, near_dup_threshold=0.9)[0] == ["a", "b"]
    assert _clean(docs, near_dup_threshold=0.3)[0] == ["a"]
    assert _clean(docs, near_dup_threshold=0.0)[0] == ["a", "b"]


def test_filters_and_report_counts_add_up():
    rng = random.Random(2)
    docs = [
        Document("good", _text(rng)),
        Document("empty", "  \n\t\n"),
        Document("short", "x = 1\n"),
        Document("symbols", "{}[]();:,.<>=+-*/%&|^~!@#$ " * 20),
        Document("spam", "buy cheap pills now\n" * 50),
        Document("binary", "", error="decode_error: invalid start byte at byte 3"),
        Document("long", _text(rng, 5000)),
    ]
    kept, report = _clean(docs, max_chars=10_000)
    assert kept == ["good"]
    assert report.removed == {"empty": 1, "too_short": 1, "low_alnum": 1, "repeated_lines": 1,
                              "decode_error": 1, "too_long": 1}
    assert report.kept + sum(report.removed.values()) == report.read == len(docs)
    text = report.to_text()
    for reason in report.removed:
        assert reason in text


def test_normalization_strips_controls_keeps_newlines_tabs_and_composes():
    assert normalize_text("a\x00b\x1bc\r\n\td\x7f\x85e") == "abc\n\tde"
    assert normalize_text("e\u0301") == "\u00e9"  # NFD -> NFC


def test_undecodable_file_is_reported_not_raised(tmp_path):
    (tmp_path / "bad.py").write_bytes(b"x = '\xff\xfe'\n")
    doc = read_file(tmp_path / "bad.py", "bad.py")
    assert doc.error.startswith("decode_error")
    kept, report = _clean(resolve_source(str(tmp_path)))
    assert kept == [] and report.removed == {"decode_error": 1}


def test_defaults_keep_normal_stdlib_code():
    # A slice of real standard-library modules: the default filters must not drop ordinary code.
    from cubelm.data.sources import iter_files, stdlib_files, stdlib_root

    files = [p for p in stdlib_files() if p.parent == stdlib_root() and p.stat().st_size > 2000][:60]
    kept, report = _clean(iter_files(files, stdlib_root()))
    assert len(kept) == len(files), report.to_text()


def test_bad_clean_config_is_a_user_error():
    with pytest.raises(CubelmError):
        CleanConfig(near_dup_threshold=1.5)
    with pytest.raises(CubelmError):
        CleanConfig(shingle="chars")
