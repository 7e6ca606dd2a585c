"""`cubelm rag ingest` / `cubelm rag query` end to end: a directory -> chunks -> vectors -> index -> cited hits.

The pipeline is driven with a hashing bag-of-words embedder built here (lexical, deterministic, any dimension),
so these tests need nothing from ``cubelm.rag.embedder``; the last test runs the real all-MiniLM-L6-v2 and is
skipped until that module is merged.
"""

import json
import zlib

import numpy as np
import pytest

from helpers import assert_clean_error, cli_in_process

ALPHA = '''"""Alpha module."""

import math


def frobnicate(values):
    """Planted fact: the zebra census counted forty two zebras."""
    return sum(values) * 42


def unrelated(x):
    """Compute a square root for the geometry helpers."""
    return math.sqrt(x)
'''
NOTES = "Release notes.\n\nThe teapot service brews oolong tea at ninety degrees.\n"


class HashEmbedder:
    """Hashed bag of lowercase words -> L2-normalized vector (a real, if lexical, embedding for tests)."""
    prompts = {"query": "", "passage": ""}
    prompts_used: set = set()

    def __init__(self, name: str, dim: int) -> None:
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
        self.name, self.dim, self.max_tokens = name, dim, 128
        self.tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
        self.tokenizer.normalizer = normalizers.Lowercase()
        self.tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()

    def encode(self, texts, *, prompt_name=None, dimensions=None, normalize=True):
        import torch
        HashEmbedder.prompts_used.add(prompt_name)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        out[:, 0] = 1e-3  # no all-zero vector for a text without words
        for i, text in enumerate(texts):
            for word, _ in self.tokenizer.pre_tokenizer.pre_tokenize_str(text.lower()):
                out[i, zlib.crc32(word.encode()) % self.dim] += 1.0
        return torch.from_numpy(out / np.linalg.norm(out, axis=1, keepdims=True))


@pytest.fixture
def hash_embedders(monkeypatch):
    from cubelm.rag import commands
    monkeypatch.setattr(commands, "_load_embedder", lambda name, device: HashEmbedder(name, int(name.split("-")[1])))


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "src" / "pkg").mkdir(parents=True)
    (tmp_path / "src" / "pkg" / "alpha.py").write_text(ALPHA)
    (tmp_path / "src" / "notes.md").write_text(NOTES)
    (tmp_path / "src" / "tests").mkdir()
    (tmp_path / "src" / "tests" / "test_zebra.py").write_text("def test_zebra():\n    assert 'zebra census'\n")
    return tmp_path / "src"


def query(capsys, index, text, *extra):
    r = cli_in_process(capsys, "rag", "query", "--index", index, text, "-k", "3", "--json", *extra)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize("index_type", ["flat", "hnsw", "binary"])
def test_ingest_then_query_cites_file_lines(tmp_path, corpus, capsys, hash_embedders, index_type):
    index = tmp_path / "index"
    r = cli_in_process(capsys, "rag", "ingest", "--source", corpus, "--index", index, "--embedder", "hash-256",
                       "--index-type", index_type, "--max-tokens", "40", "--overlap", "4")
    assert r.returncode == 0, r.stderr
    assert "from 2 files" in r.stdout  # tests/ is skipped
    HashEmbedder.prompts_used.clear()
    hits = query(capsys, index, "how many zebras did the census count")
    assert HashEmbedder.prompts_used == {"query"}  # the model's query prompt for queries (passage for chunks)
    top = hits[0]
    lines = ALPHA.splitlines()
    start = next(i for i, line in enumerate(lines, 1) if line.startswith("def frobnicate"))
    assert top["id"] == f"pkg/alpha.py:{start}-{start + 2}" and top["metadata"]["name"] == "frobnicate"
    assert top["text"] == "\n".join(lines[start - 1:start + 2]) + "\n"
    assert query(capsys, index, "zebras", "--where", "source=notes.md")[0]["metadata"]["source"] == "notes.md"
    r = cli_in_process(capsys, "rag", "query", "--index", index, "oolong tea")
    assert r.returncode == 0 and r.stdout.splitlines()[0].split()[2].startswith("notes.md:")

    # re-ingest after an edit: the file's old chunks are replaced, not left behind
    (corpus / "pkg" / "alpha.py").write_text(ALPHA.replace("forty two zebras", "seven giraffes"))
    r = cli_in_process(capsys, "rag", "ingest", "--source", corpus, "--index", index, "--embedder", "hash-256",
                       "--max-tokens", "40", "--overlap", "4")
    assert r.returncode == 0, r.stderr
    from cubelm.rag.store import open_store
    store = open_store(index)
    texts = [h.text for h in store.search(np.eye(256, dtype=np.float32)[:1] + 1e-3, store.count())[0]]
    assert not any("forty two zebras" in t for t in texts) and any("seven giraffes" in t for t in texts)
    assert store.info["embedder"] == "hash-256" and store.info["dim"] == 256


def test_embedder_mismatch_is_a_clean_error(tmp_path, corpus, capsys, hash_embedders):
    index = tmp_path / "index"
    assert cli_in_process(capsys, "rag", "ingest", "--source", corpus, "--index", index,
                          "--embedder", "hash-64").returncode == 0
    r = cli_in_process(capsys, "rag", "query", "--index", index, "zebra", "--embedder", "hash-32")
    assert_clean_error(r, "32-dim", "64-dim")
    r = cli_in_process(capsys, "rag", "ingest", "--source", corpus, "--index", index, "--embedder", "hash-32")
    assert_clean_error(r, "64-dim")
    r = cli_in_process(capsys, "rag", "ingest", "--source", tmp_path / "nowhere", "--index", index,
                       "--embedder", "hash-64")
    assert_clean_error(r, "not a directory")
    r = cli_in_process(capsys, "rag", "query", "--index", index, "zebra", "--where", "source")
    assert_clean_error(r, "KEY=VALUE")


def test_real_embedder_planted_fact(tmp_path, corpus, capsys):
    try:
        import cubelm.rag.embedder  # noqa: F401
    except ImportError:
        pytest.skip("embedder not merged")
    index = tmp_path / "index"
    r = cli_in_process(capsys, "rag", "ingest", "--source", corpus, "--index", index,
                       "--embedder", "all-minilm-l6-v2", "--index-type", "hnsw")
    assert r.returncode == 0, r.stderr
    hits = query(capsys, index, "How many zebras were counted in the census?")
    assert hits[0]["metadata"]["name"] == "frobnicate" and hits[0]["id"].startswith("pkg/alpha.py:")
