"""``cubelm lora merge``: a peft adapter folded into its base gives a plain HF directory that transformers loads with
the logits of base + adapter under peft; bad input is a one-line error with exit code 2.

One error case runs ``python -m cubelm`` in a subprocess (the real exit code); the others call ``cubelm.cli.main``
in-process, the same parser and error path without an interpreter start each (~4 s on a loaded 2-core host).
"""

import json
import subprocess

import peft  # pinned in the test extra: a missing install must fail here, not skip
import pytest
import torch
import transformers
from helpers import assert_clean_error, cubelm
from hf_layouts import build_layout

from cubelm.cli import main

IDS = torch.randint(0, 200, (2, 11), generator=torch.Generator().manual_seed(5))



@pytest.fixture
def cli(capsys):
    """``cubelm ARGS`` in this process: (exit code, stdout, stderr)."""
    def run(*args):
        capsys.readouterr()  # drop what came before (transformers' progress bars)
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)
    return run



def peft_adapter(base, out, seed=0, **lora):
    """A peft adapter with random (nonzero) B on ``base``, saved to ``out``; returns the PeftModel."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base),
                                peft.LoraConfig(**{"r": 4, "lora_alpha": 8, **lora}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(out)
    return model.eval()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    base = build_layout("qwen2", root / "base")  # q/k/v biases, tied embeddings, chat_template.jinja
    cfg = transformers.Qwen2Config(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(root / "other")  # the same family, another width
    return root, base, root / "other"


def test_merged_directory_loads_in_transformers_with_base_plus_adapter_logits(dirs, cli):
    root, base, _ = dirs
    hf = peft_adapter(base, root / "adapter", target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"],
                      use_rslora=True)
    r = cli("lora", "merge", "--model", base, "--adapter", root / "adapter", "--out", root / "m")
    assert r.returncode == 0, r.stderr
    assert "merged 10 adapted projections" in r.stdout
    merged = root / "m"
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        assert (merged / name).is_file()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        assert (merged / name).read_bytes() == (base / name).read_bytes()
    assert json.loads((merged / "generation_config.json").read_text())["eos_token_id"] == \
        json.loads((base / "generation_config.json").read_text())["eos_token_id"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    assert not any("lora" in name for name, _ in loaded.named_parameters())
    with torch.no_grad():
        want = hf(IDS).logits
        torch.testing.assert_close(loaded(IDS).logits, want, atol=1e-5, rtol=1e-5)
        assert (want - transformers.AutoModelForCausalLM.from_pretrained(base)(IDS).logits).abs().max() > 1e-2


def test_bad_inputs_are_one_line_errors(dirs, cli, tmp_path):
    root, base, other = dirs
    args = ("lora", "merge", "--model", str(base), "--out", str(tmp_path / "out"))
    assert_clean_error(cubelm(*args, "--adapter", str(tmp_path / "absent")), "does not exist")

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text("{not json")
    assert_clean_error(cli(*args, "--adapter", str(corrupt)), "not valid JSON")
    peft_adapter(base, tmp_path / "torn", target_modules=["q_proj"])
    (tmp_path / "torn" / "adapter_model.safetensors").write_bytes(b"\x00" * 16)
    assert_clean_error(cli(*args, "--adapter", str(tmp_path / "torn")), "not a readable safetensors file")

    peft_adapter(other, tmp_path / "foreign", target_modules=["q_proj", "up_proj"])
    assert_clean_error(cli(*args, "--adapter", str(tmp_path / "foreign")), "has shape (4, 48)")

    peft_adapter(base, tmp_path / "gpt2", target_modules=["q_proj"])
    cfg = json.loads((tmp_path / "gpt2" / "adapter_config.json").read_text())
    (tmp_path / "gpt2" / "adapter_config.json").write_text(json.dumps(cfg | {"target_modules": ["c_attn"]}))
    assert_clean_error(cli(*args, "--adapter", str(tmp_path / "gpt2")), "c_attn", "match no projection")

    assert_clean_error(cli("lora", "merge", "--model", base, "--adapter", tmp_path / "gpt2", "--out", base),
                       "is the model directory")
    assert not (tmp_path / "out").exists()  # nothing written on any error


def test_generate_with_an_adapter_equals_the_merged_model(dirs, cli, tmp_path):
    """``cubelm generate --adapter A --chat``: the prompt goes through the model's chat template and the adapter is
    folded in, so greedy text equals that of the merged directory; without a template ``--chat`` is an error."""
    root, base, _ = dirs
    peft_adapter(base, tmp_path / "adapter", seed=3, target_modules=["q_proj", "v_proj", "down_proj"])
    r = cli("lora", "merge", "--model", base, "--adapter", tmp_path / "adapter", "--out", tmp_path / "m")
    assert r.returncode == 0, r.stderr
    common = ("--prompt", "Write a function.", "--chat", "--temperature", "0", "--max-new-tokens", "12",
              "--ignore-eos")
    with_adapter = cli("generate", "--model", base, "--adapter", tmp_path / "adapter", *common)
    merged = cli("generate", "--model", tmp_path / "m", *common)
    plain = cli("generate", "--model", base, *common)
    assert with_adapter.returncode == merged.returncode == plain.returncode == 0, with_adapter.stderr
    assert with_adapter.stdout == merged.stdout and with_adapter.stdout != plain.stdout
    assert "Write a function." not in with_adapter.stdout  # a chat answer, not a continuation of the prompt

    assert_clean_error(cli("generate", "--model", base, "--adapter", tmp_path / "absent", "--prompt", "x"),
                       "--adapter", "not a directory")
    no_template = tmp_path / "no-template"
    no_template.mkdir()
    for f in base.iterdir():
        if f.name != "chat_template.jinja":
            (no_template / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((no_template / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert_clean_error(cli("generate", "--model", no_template, "--prompt", "x", "--chat"), "no chat template")
