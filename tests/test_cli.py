"""The command line: every verb builds, and bad input is a one-line error with exit code 2 (no traceback)."""

import argparse
import json

import pytest

from cubelm.cli import VERBS, build_parser
from helpers import assert_clean_error, cubelm




def test_every_verb_builds_and_has_help():
    parser = build_parser(all_verbs=True)
    text = parser.format_help()
    for verb in VERBS:
        assert verb.name.split()[0] in text
    for action in parser._subparsers._group_actions[0].choices.values():
        for a in action._actions:
            if a.dest not in ("help",) and a.option_strings:
                assert a.help, f"flag {a.option_strings} has no help"


def test_every_verbs_help_renders():
    """argparse %-formats each flag's help when --help prints it: a literal '%' in a help text (e.g. '70 % of the
    request') crashed `cubelm autoscale simulate --help` with a TypeError."""
    def parsers(p):
        yield p
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub in a.choices.values():
                    yield from parsers(sub)

    seen = 0
    for p in parsers(build_parser(all_verbs=True)):
        assert p.format_help()
        seen += 1
    assert seen > len(VERBS)


def test_help_lists_verbs():
    r = cubelm("--help")
    assert r.returncode == 0 and "generate" in r.stdout and "plan" in r.stdout and "train" in r.stdout


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from cubelm.data.tokenizer import TokenizerConfig, train_tokenizer
    d = tmp_path_factory.mktemp("model")
    tok = train_tokenizer(["def f(x):\n    return x + 1\n" * 50, "class A:\n    pass\n" * 50],
                          TokenizerConfig(vocab_size=300))
    tok.save(d / "tok")
    r = cubelm("model", "init", "--preset", "tiny", "--out", str(d / "m"), "--tokenizer", str(d / "tok"))
    assert r.returncode == 0, r.stderr
    return d / "m"


def test_generate_cli_greedy_and_seeded(model_dir):
    greedy = [cubelm("generate", "--model", str(model_dir), "--prompt", "def f(", "--temperature", "0",
                     "--max-new-tokens", "12", "--ignore-eos") for _ in range(2)]
    assert all(r.returncode == 0 for r in greedy), greedy[0].stderr
    assert greedy[0].stdout == greedy[1].stdout and greedy[0].stdout.startswith("def f(")
    assert "tok/s" in greedy[0].stderr  # diagnostics on stderr, text on stdout
    seeded = [cubelm("generate", "--model", str(model_dir), "--prompt", "def f(", "--seed", str(s),
                     "--max-new-tokens", "16", "--ignore-eos").stdout for s in (7, 7, 8)]
    assert seeded[0] == seeded[1] and seeded[0] != seeded[2]


def test_generate_matches_library(model_dir):
    from cubelm.data.tokenizer import load_tokenizer
    from cubelm.engine.params import SamplingParams
    from cubelm.engine.reference import generate_tokens
    from cubelm.model.hf_io import load_model
    tok = load_tokenizer(model_dir)
    ids = list(generate_tokens(load_model(model_dir), tok.encode("class A"),
                               SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)))
    r = cubelm("generate", "--model", str(model_dir), "--prompt", "class A", "--temperature", "0",
               "--max-new-tokens", "10", "--ignore-eos")
    assert r.stdout == "class A" + tok.decode(ids) + "\n"


def test_bad_inputs(model_dir, tmp_path):
    assert_clean_error(cubelm("plan", "--model", "llama-9000"), "unknown preset" if False else "llama-9000")
    assert_clean_error(cubelm("model", "init", "--preset", "gpt-5", "--out", str(tmp_path / "x")), "unknown preset")
    assert_clean_error(cubelm("generate", "--model", str(tmp_path / "absent"), "--prompt", "x"), "does not exist")
    assert_clean_error(cubelm("generate", "--model", str(model_dir), "--prompt", ""), "empty")

    no_config = tmp_path / "no_config"
    no_config.mkdir()
    assert_clean_error(cubelm("generate", "--model", str(no_config), "--prompt", "x"), "config.json")

    import shutil
    malformed = tmp_path / "malformed"
    shutil.copytree(model_dir, malformed)
    (malformed / "config.json").write_text("{not json")
    assert_clean_error(cubelm("generate", "--model", str(malformed), "--prompt", "x"), "not valid JSON")

    gpt2 = tmp_path / "gpt2"
    shutil.copytree(model_dir, gpt2)
    cfg = json.loads((gpt2 / "config.json").read_text()) | {"model_type": "gpt2"}
    (gpt2 / "config.json").write_text(json.dumps(cfg))
    assert_clean_error(cubelm("generate", "--model", str(gpt2), "--prompt", "x"), "gpt2", "not supported")

    pickled = tmp_path / "pickled"
    shutil.copytree(model_dir, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    assert_clean_error(cubelm("generate", "--model", str(pickled), "--prompt", "x"), "safetensors", "pickle")

    garbage = tmp_path / "garbage"
    shutil.copytree(model_dir, garbage)
    (garbage / "model.safetensors").write_bytes(b"\x00" * 64)
    assert_clean_error(cubelm("generate", "--model", str(garbage), "--prompt", "x"), "safetensors")

    assert_clean_error(cubelm("generate", "--model", str(model_dir), "--prompt", "x", "--top-p", "0"), "top_p")


def test_serve_device_and_dtype_are_checked_before_loading(model_dir):
    r = cubelm("serve", "--model", str(model_dir), "--device", "cuda:0" if not _cuda() else "tpu")
    assert_clean_error(r, "device")
    assert_clean_error(cubelm("serve", "--model", str(model_dir), "--dtype", "float8"), "dtype", "float32")


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()
