"""`cubelm compress report`: every method on one model, each row measured against the files the method wrote."""

import json

import pytest
from compress_helpers import varied_model_dir
from helpers import assert_clean_error, cli_in_process


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    src = varied_model_dir(root)
    held = root / "held.py"
    held.write_text("def area(w, h):\n    return w * h\n\n\nclass Box:\n    size = 3\n" * 4)
    from cubelm.cli import main
    from cubelm.compress.report import METHODS
    methods = ",".join(m for m in METHODS if m != "distill")  # distillation trains a student: tests/test_distill.py
    code = main(["compress", "report", "--model", str(src), "--out", str(root / "out"), "--source", str(held),
                 "--methods", methods, "--recover-steps", "0", "--calib", "4", "--calib-len", "32", "--rounds", "1",
                 "--batch", "2", "--prompt-tokens", "8", "--new-tokens", "6"])
    assert code == 0
    return src, held, root / "out", json.loads((root / "out" / "report.json").read_text())


def test_report_rows_are_the_methods_outputs(report):
    from cubelm.data.tokenizer import load_tokenizer
    from cubelm.eval.bpb import held_out_path, model_bpb
    from cubelm.model.hf_io import load_model
    src, held, out, rep = report
    rows = {r["method"]: r for r in rep["rows"]}
    # every method ran once (magnitude-recovered with 0 recovery steps is the magnitude row: dropped)
    assert list(rows) == ["original", "int8 weight-only", "int4 weight-only", "prune magnitude", "prune 2:4",
                          "prune heads", "prune neurons", "low rank (SVD)", "layer sharing", "W8A8",
                          "W8A8 LLM.int8()", "W8A8 SmoothQuant", "Deep Compression"]
    # bits per byte is the model's own on the held-out text, and deltas are relative to the original row
    texts = held_out_path(str(held)).texts
    for name in ("original", "prune magnitude", "Deep Compression"):
        d = rows[name]["model_dir"]
        assert rows[name]["bpb"] == pytest.approx(model_bpb(load_model(d), load_tokenizer(d), texts), rel=1e-6)
    base = rows["original"]["bpb"]
    for r in rep["rows"][1:]:
        assert r["delta_pct"] == pytest.approx(100 * (r["bpb"] - base) / base)
    # bytes on disk: what each method ships
    assert rows["original"]["bytes"] == (src / "model.safetensors").stat().st_size
    assert rows["int8 weight-only"]["bytes"] < rows["original"]["bytes"] / 3
    assert rows["int4 weight-only"]["bytes"] < rows["int8 weight-only"]["bytes"]
    assert rows["prune magnitude"]["bytes"] == rows["original"]["bytes"]  # zeros stored densely
    assert rows["prune neurons"]["bytes"] < rows["original"]["bytes"]  # shapes shrink
    deep = out / "deep" / "deep_compression" / "3_huffman.cdc"
    assert rows["Deep Compression"]["bytes"] == deep.stat().st_size
    assert rows["original"]["bytes"] / rows["Deep Compression"]["bytes"] > 8
    # the pruned directory really holds half zeros in its projections
    pruned = load_model(rows["prune magnitude"]["model_dir"])
    w = pruned.model.layers[0].mlp.down_proj.weight
    assert float((w == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    # speed: every engine row was timed, W8A8 (emulated) has no engine path
    for r in rep["rows"]:
        timed = not r["method"].startswith("W8A8")
        assert (r["decode_tok_s"] is not None and r["decode_tok_s"] > 0) == timed, r
        assert (r["batched_tok_s"] is not None) == timed


def test_report_files_and_claims(report):
    _, _, out, rep = report
    md = (out / "report.md").read_text()
    assert "| Deep Compression |" in md and "bits/byte" in md
    assert (out / "report.png").stat().st_size > 10_000
    claims = " ".join(rep["claims"])
    assert "int8 weight-only" in claims and "Deep Compression" in claims and "2:4" in claims
    assert "CPU capability" in rep["host"]  # the report records the host it ran on


def test_report_reuse_keeps_outputs(report):
    """--reuse takes each method's saved rows (sizes, quality) and files instead of running it again."""
    from cubelm.cli import main
    src, held, out, rep = report
    stamp = (out / "deep" / "model.safetensors").stat().st_mtime_ns
    assert main(["compress", "report", "--model", str(src), "--out", str(out), "--source", str(held),
                 "--methods", "int8,deep", "--reuse", "--no-speed"]) == 0
    again = json.loads((out / "report.json").read_text())
    assert (out / "deep" / "model.safetensors").stat().st_mtime_ns == stamp
    before = {r["method"]: (r["bytes"], r["bpb"]) for r in rep["rows"]}
    assert {r["method"]: (r["bytes"], r["bpb"]) for r in again["rows"]} == {
        k: before[k] for k in ("original", "int8 weight-only", "Deep Compression")}


@pytest.mark.parametrize("args, needle", [
    (["--methods", "int8,bogus"], "unknown method"),
    (["--lowrank-energy", "1.5"], "--lowrank-energy"),
    (["--rounds", "0"], "--rounds"),
])
def test_report_bad_input(capsys, tmp_path, args, needle):
    r = cli_in_process(capsys, "compress", "report", "--model", str(tmp_path), "--out", str(tmp_path / "o"), *args)
    assert_clean_error(r, needle)
