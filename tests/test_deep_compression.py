"""Deep Compression: Huffman decode ∘ encode = identity (skewed streams, length-limited codes, edge cases), the
relative-position and bit-packing codecs, k-means weight sharing (codebook size, values, zeros), the three stage
files decoding to what each stage means, `cubelm compress deep` round trip through LLM, bad input."""

import json

import numpy as np
import pytest
import torch

from cubelm.compress import huffman
from cubelm.compress.deep_compression import (DeepConfig, deep_compress, gap_symbols, kmeans_1d, magnitude_mask,
                                              pack_bits, positions_from_gaps, read_container, unpack_bits,
                                              write_container)
from cubelm.errors import CubelmError
from cubelm.model.config import ModelConfig
from cubelm.model.seam import find_linears
from cubelm.model.transformer import build_model


def _round_trip(symbols, alphabet, max_length=huffman.MAX_CODE_LENGTH):
    lengths = huffman.code_lengths(np.bincount(symbols, minlength=alphabet), max_length)
    data = huffman.encode(symbols, lengths)
    assert np.array_equal(huffman.decode(data, lengths, len(symbols)), symbols)
    return lengths, data


@pytest.mark.parametrize("alphabet", [2, 7, 32, 256])
def test_huffman_round_trip_on_skewed_streams(alphabet):
    rng = np.random.default_rng(alphabet)
    for symbols in (np.minimum(rng.geometric(0.35, 5000) - 1, alphabet - 1),  # geometric: the gap streams
                    np.minimum(rng.zipf(1.6, 3000) - 1, alphabet - 1),  # heavy tail
                    rng.integers(0, alphabet, 2000)):  # uniform
        lengths, data = _round_trip(symbols, alphabet)
        counts = np.bincount(symbols, minlength=alphabet)
        p = counts[counts > 0] / len(symbols)
        entropy = float(-(p * np.log2(p)).sum())
        bits = float((counts * lengths).sum())
        assert entropy * len(symbols) <= bits + 1e-6 <= (entropy + 1) * len(symbols) + 1e-6  # Huffman's bounds
        assert len(data) == -(-int(bits) // 8)


def test_huffman_edge_cases():
    _, data = _round_trip(np.zeros(0, dtype=np.int64), 4)  # empty
    assert data == b""
    for n in (1, 9, 1000):  # one distinct symbol: the one-bit code 0
        lengths, data = _round_trip(np.full(n, 3), 8)
        assert lengths.tolist() == [0, 0, 0, 1, 0, 0, 0, 0] and data == bytes(-(-n // 8))
    _round_trip(np.array([0, 1, 1, 1]), 2)
    _round_trip(np.array([5]), 6)


def test_huffman_length_limit():
    fib = [1, 1]
    while len(fib) < 30:
        fib.append(fib[-1] + fib[-2])
    counts = np.array(fib)
    assert huffman.code_lengths(counts, max_length=64).max() == 29  # Fibonacci counts: the deepest possible tree
    limited = huffman.code_lengths(counts, max_length=8)
    assert limited.max() <= 8 and (2.0 ** -limited.astype(float)).sum() <= 1  # still a prefix code (Kraft)
    symbols = np.repeat(np.arange(30), np.minimum(counts, 50))
    _round_trip(symbols, 30, max_length=8)


def test_huffman_rejects_bad_streams():
    symbols = np.array([0, 1, 2, 2, 2, 1])
    lengths = huffman.code_lengths(np.bincount(symbols))
    data = huffman.encode(symbols, lengths)
    with pytest.raises(CubelmError, match="truncated"):
        huffman.decode(data, lengths, 40)
    with pytest.raises(CubelmError, match="no code"):
        huffman.encode(np.array([3]), lengths)
    one = huffman.code_lengths(np.array([0, 4]))  # only the code "0" exists: a 1 bit is no code
    with pytest.raises(CubelmError, match="corrupt"):
        huffman.decode(b"\xff", one, 3)


@pytest.mark.parametrize("index_bits", [2, 5, 8])
def test_relative_positions_round_trip(index_bits):
    rng = np.random.default_rng(index_bits)
    for positions in (np.array([0, 1, 2]), np.array([700]), np.array([], dtype=np.int64),
                      np.sort(rng.choice(5000, 600, replace=False)), np.array([3, 3 + 2 ** index_bits, 999])):
        symbols = gap_symbols(positions, index_bits)
        assert symbols.max(initial=0) < 2 ** index_bits
        assert np.array_equal(positions_from_gaps(symbols, index_bits), positions)
    values = rng.integers(0, 2 ** index_bits, 77)
    assert np.array_equal(unpack_bits(pack_bits(values, index_bits), index_bits, 77), values)
    assert len(pack_bits(values, index_bits)) == -(-77 * index_bits // 8)


def test_kmeans_codebook():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(20_000, generator=g) * 0.02
    for bits in (1, 4, 8):
        k = 2 ** bits
        codebook, idx = kmeans_1d(v, k, iterations=10)
        assert codebook.numel() == k and torch.all(codebook[1:] >= codebook[:-1]) and idx.max() < k
        assert codebook[0] >= v.min() and codebook[-1] <= v.max()
        init, init_idx = kmeans_1d(v, k, iterations=0)  # the linear init over [min, max]
        assert torch.allclose(init, torch.linspace(float(v.min()), float(v.max()), k))
        mse = ((codebook.double()[idx] - v.double()) ** 2).mean()
        assert mse <= ((init.double()[init_idx] - v.double()) ** 2).mean()  # Lloyd only improves
    assert torch.equal(magnitude_mask(torch.tensor([[3.0, -1.0], [0.5, 2.0]]), 0.5),
                       torch.tensor([[True, False], [False, True]]))


def _model():
    return build_model(ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True), seed=3)


@pytest.mark.parametrize("bits,prune", [(4, "projections"), (8, "all")])
def test_stage_files_decode_to_their_stage(tmp_path, bits, prune):
    model = _model()
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    projections = {f"{n}.weight" for n, _ in find_linears(model)}
    cfg = DeepConfig(sparsity=0.6, bits=bits, index_bits=3, prune=prune)  # 3-bit gaps: escapes occur
    stages = deep_compress(state, cfg, projections)
    decoded, sizes = {}, {}
    for stage in ("pruned", "quantized", "huffman"):
        sizes[stage] = write_container(stages[stage], tmp_path / f"{stage}.cdc", stage, {})
        decoded[stage] = read_container(tmp_path / f"{stage}.cdc")
    assert sizes["pruned"] > sizes["quantized"] > sizes["huffman"]
    for name, w in state.items():
        if w.dim() == 1:  # norms: raw fp32 in every stage
            assert all(torch.equal(decoded[s][name], w) for s in decoded)
            continue
        pruned_here = prune == "all" or name in projections
        mask = magnitude_mask(w, 0.6) if pruned_here else torch.ones_like(w, dtype=torch.bool)
        assert int((~mask).sum()) == round(0.6 * w.numel()) if pruned_here else mask.all()
        assert torch.equal(decoded["pruned"][name], w * mask)  # stage 1: exactly the masked weights
        assert torch.equal(decoded["quantized"][name], decoded["huffman"][name])  # Huffman is lossless
        codebook = torch.from_numpy(np.frombuffer(_blob(tmp_path / "huffman.cdc", name, "codebook"), "<f4").copy())
        out = decoded["huffman"][name]
        assert codebook.numel() <= 2 ** bits
        assert torch.equal(out[~mask], torch.zeros(int((~mask).sum())))  # zeros stay zero
        assert torch.isin(out[mask], codebook).all()  # every kept weight is a codebook value
        assert len(torch.unique(out[mask])) <= 2 ** bits
        assert (out[mask] - w[mask]).abs().max() <= (w.max() - w.min()) / 2 ** bits  # within a linear-init cell


def _blob(path, name, key):
    raw = path.read_bytes()
    size = int.from_bytes(raw[8:12], "little")
    entry = next(t for t in json.loads(raw[12:12 + size])["tensors"] if t["name"] == name)
    offset, n = entry["blobs"][key]
    return raw[12 + size + offset:12 + size + offset + n]


def test_read_container_rejects_other_files(tmp_path):
    (tmp_path / "x.cdc").write_bytes(b"not a container at all")
    with pytest.raises(CubelmError, match="not a cubelm Deep Compression file"):
        read_container(tmp_path / "x.cdc")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from helpers import make_tiny_model_dir
    root = tmp_path_factory.mktemp("deep")
    (root / "held.txt").write_text("def add(a, b):\n    return a + b\n" * 30)
    return make_tiny_model_dir(root)


def _cli(capsys, *args):
    from helpers import cli_in_process
    return cli_in_process(capsys, *args)


def test_cli_deep_round_trip(model_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    from cubelm import LLM, SamplingParams
    from cubelm.compress.deep_commands import format_report
    out = tmp_path / "deep"
    r = _cli(capsys, "compress", "deep", "--model", model_dir, "--out", out, "--sparsity", 0.5, "--bits", 4,
             "--source", model_dir.parent / "held.txt", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    st = report["stages"]
    assert st["dense"]["bytes"] > st["pruned"]["bytes"] > st["quantized"]["bytes"] > st["huffman"]["bytes"]
    assert st["huffman"]["bytes"] == (out / "deep_compression" / "3_huffman.cdc").stat().st_size
    assert report["total_reduction"] == pytest.approx(st["dense"]["bytes"] / st["huffman"]["bytes"])
    assert report["total_reduction"] > 8  # 4-bit codes, half the projections gone
    assert all(np.isfinite(st[s]["bpb"]) for s in ("dense", "pruned", "huffman"))
    saved = load_file(out / "model.safetensors")  # the HF directory holds the weights decoded from the file
    decoded = read_container(out / "deep_compression" / "3_huffman.cdc")
    assert saved.keys() == decoded.keys() and all(torch.equal(saved[k], decoded[k]) for k in saved)
    outs = LLM(str(out), num_blocks=32, log=lambda m: None).generate(
        ["def add("], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert len(outs[0].outputs[0].token_ids) == 5
    text = format_report(report)  # what the command prints without --json
    assert "+ Huffman" in text and f"{st['huffman']['bytes']:,}" in text and "total reduction" in text


def test_cli_deep_bad_input(model_dir, tmp_path, capsys):
    from helpers import assert_clean_error, cubelm
    assert_clean_error(cubelm("compress", "deep", "--model", model_dir, "--out", tmp_path / "x", "--bits", 9),
                       "--bits")  # one real process: what a user sees
    for flag, value in (("--bits", 0), ("--sparsity", 1.0), ("--sparsity", -0.1), ("--index-bits", 1)):
        assert_clean_error(_cli(capsys, "compress", "deep", "--model", model_dir, "--out", tmp_path / "x", flag,
                                value), flag)
    assert_clean_error(_cli(capsys, "compress", "deep", "--model", model_dir, "--out", model_dir), "source")
