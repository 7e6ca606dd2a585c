"""``cubelm data prepare`` end to end on a small synthetic corpus: byte-identical shards across runs, a document
split with no leakage, shards that decode back to the cleaned documents, and one-line errors (exit 2, no
traceback) for bad input, through a real ``python -m cubelm`` subprocess."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cubelm.data.packed import PackedData
from cubelm.errors import CubelmError

NAMES = ["alpha", "beta", "gamma", "delta", "total", "count", "items", "value", "result", "index"]


def _module(rng: random.Random, i: int) -> str:
    lines = [f'"""Module {i}: helpers for {rng.choice(NAMES)} — naïve café 🐍."""\n']
    for j in range(rng.randint(2, 6)):
        a, b = rng.sample(NAMES, 2)
        lines.append(f"def f{i}_{j}({a}, {b}=None):\n    \"\"\"Combine {a} and {b}.\"\"\"\n"
                     f"    if {b} is None:\n        return {a}\n\treturn {a} + {b} * {rng.randint(0, 99)}\n")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for i in range(60):
        (root / f"pkg{i % 3}").mkdir(exist_ok=True)
        (root / f"pkg{i % 3}" / f"mod{i}.py").write_text(_module(rng, i))
    (root / "pkg0" / "copy.py").write_text((root / "pkg0" / "mod0.py").read_text())  # exact duplicate
    (root / "pkg1" / "empty.py").write_text("")
    return root


def _cubelm(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "cubelm", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def _prepare(corpus: Path, out: Path, *extra: str) -> None:
    result = _cubelm("data", "prepare", "--source", str(corpus), "--out", str(out), "--vocab-size", "300",
                     "--val-fraction", "0.2", *extra)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory) -> tuple[Path, Path]:
    a, b = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    _prepare(corpus, a)
    _prepare(corpus, b)
    return a, b


def test_rerun_gives_byte_identical_outputs(prepared):
    a, b = prepared
    for name in ("train.bin", "val.bin", "meta.json", "tokenizer/tokenizer.json", "report.json",
                 "documents.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_meta_report_and_shards_agree(prepared):
    data = PackedData(prepared[0])
    meta, report = data.meta, json.loads((prepared[0] / "report.json").read_text())
    assert report["removed"] == {"empty": 1, "exact_duplicate": 1}
    assert report["kept"] + sum(report["removed"].values()) == report["read"] == 62
    assert meta["dtype"] == "uint16" and data.train.dtype == np.uint16 and meta["vocab_size"] == 300
    assert (meta["bos_token_id"], meta["eos_token_id"], meta["pad_token_id"]) == (0, 1, 2)
    assert meta["num_documents"]["train"] + meta["num_documents"]["val"] == report["kept"]
    assert meta["num_documents"]["val"] > 0 and data.train_mask is None
    assert int((data.train == 1).sum()) == meta["num_documents"]["train"]  # one EOS ends every document
    assert data.train[-1] == data.val[-1] == 1
    assert meta["tokenizer_sha256"] == data.load_tokenizer().sha256


def _split_docs(ids: np.ndarray, tok) -> list[str]:
    ends = np.flatnonzero(ids == tok.eos_token_id)
    return [tok.decode(ids[s:e]) for s, e in zip(np.r_[0, ends[:-1] + 1], ends)]


def test_shards_decode_to_the_cleaned_documents_and_val_never_in_train(prepared):
    data = PackedData(prepared[0])
    tok = data.load_tokenizer()
    train, val = _split_docs(data.train, tok), _split_docs(data.val, tok)
    cleaned = [json.loads(line)["text"] for line in (prepared[0] / "documents.jsonl").open()]
    assert sorted(train + val) == sorted(cleaned)
    assert not set(train) & set(val)


def test_corrupt_or_truncated_shards_are_detected(prepared, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(prepared[0], bad)
    with open(bad / "train.bin", "ab") as f:
        f.write(b"\x00")  # odd byte count for uint16
    with pytest.raises(CubelmError, match="not a multiple"):
        PackedData(bad)
    with open(bad / "train.bin", "r+b") as f:
        f.truncate((bad / "train.bin").stat().st_size - 3)
    with pytest.raises(CubelmError, match="truncated"):
        PackedData(bad)
    (bad / "meta.json").unlink()
    with pytest.raises(CubelmError, match="no meta.json"):
        PackedData(bad)


def _assert_one_line_error(result: subprocess.CompletedProcess, needle: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cubelm: error:") and needle in lines[0], result.stderr


def test_bad_inputs_exit_2_with_one_line(corpus, prepared, tmp_path):
    _assert_one_line_error(_cubelm("data", "prepare", "--source", str(tmp_path / "nope"), "--out",
                                   str(tmp_path / "o1")), "does not exist")
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "a.txt").write_text("hi\n")
    _assert_one_line_error(_cubelm("data", "prepare", "--source", str(tmp_path / "tiny"), "--out",
                                   str(tmp_path / "o2")), "no documents left after cleaning")
    _assert_one_line_error(_cubelm("data", "prepare", "--source", str(corpus), "--out", str(tmp_path / "o3"),
                                   "--vocab-size", "100"), "too small")
    _assert_one_line_error(_cubelm("tokenizer", "train", "--source", str(corpus), "--out", str(tmp_path / "o4"),
                                   "--vocab-size", "261"), "too small")
    bad = tmp_path / "corrupt"
    bad.mkdir()
    for name in ("meta.json", "val.bin"):
        (bad / name).write_bytes((prepared[0] / name).read_bytes())
    (bad / "train.bin").write_bytes((prepared[0] / "train.bin").read_bytes()[:-2])
    _assert_one_line_error(_cubelm("data", "info", "--dir", str(bad)), "truncated")
    _assert_one_line_error(_cubelm("data", "prepare", "--source", str(corpus), "--out", str(tmp_path / "o5"),
                                   "--tokenizer", str(tmp_path)), "no tokenizer.json")


def test_tokenizer_train_cli_prints_stats(corpus, tmp_path):
    result = _cubelm("tokenizer", "train", "--source", str(corpus), "--out", str(tmp_path / "tok"),
                     "--vocab-size", "300", "--context", "64")
    assert result.returncode == 0, result.stderr
    assert "chars/token" in result.stdout and "fit a 64-token context" in result.stdout
    stats = json.loads((tmp_path / "tok" / "stats.json").read_text())
    assert stats["vocab_size"] == 300 and stats["num_documents"] == 60
    assert not list((tmp_path / "tok").glob("*.tmp.jsonl"))


def test_prepare_with_existing_tokenizer_matches(corpus, prepared, tmp_path):
    _prepare(corpus, tmp_path / "reuse", "--tokenizer", str(prepared[0] / "tokenizer"))
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "reuse" / name).read_bytes() == (prepared[0] / name).read_bytes()
