"""Shared fixtures of the distributed tests: a tiny corpus + model config, and torchrun launches.

Each torchrun launch costs 10-20 s, so a launch runs many checks (``worker.py`` via ``dist_helpers.torchrun``)
and the tests read its results.
"""

import json
import os
import sysconfig
from pathlib import Path

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "distributed: runs torch.distributed jobs on CPU under torchrun "
                                       "(select with -m distributed, skip with -m 'not distributed')")


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/distributed/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.distributed)


@pytest.fixture(scope="session")
def dist_data(tmp_path_factory) -> Path:
    from cubelm.data.clean import CleanConfig
    from cubelm.data.prepare import PrepareConfig, prepare
    from cubelm.data.sources import resolve_source
    from cubelm.data.tokenizer import TokenizerConfig
    root = tmp_path_factory.mktemp("dist-data")
    corpus = resolve_source(str(Path(sysconfig.get_paths()["stdlib"]) / "json"))
    prepare(corpus, root, PrepareConfig(clean=CleanConfig(), tokenizer=TokenizerConfig(vocab_size=300),
                                        val_fraction=0.2), log=lambda *a: None)
    return root


@pytest.fixture(scope="session")
def dist_instruct_data(tmp_path_factory, dist_data) -> Path:
    """Instruct examples (docstring -> source) from the stdlib ``json`` package: the loss covers only response
    tokens, so data-parallel ranks hold different numbers of target tokens."""
    from cubelm.data.clean import CleanConfig
    from cubelm.data.prepare import PrepareConfig, prepare
    from cubelm.data.sources import resolve_source
    from cubelm.data.stdlib_instruct import examples_from_source
    from cubelm.data.tokenizer import TokenizerConfig
    root = tmp_path_factory.mktemp("dist-instruct")
    examples = [ex for f in sorted((Path(sysconfig.get_paths()["stdlib"]) / "json").glob("*.py"))
                for _, ex in examples_from_source(f.read_text())]
    jsonl = root / "examples.jsonl"
    jsonl.write_text("".join(json.dumps({"instruction": e.instruction, "input": e.input, "output": e.output}) + "\n"
                             for e in examples))
    prepare(resolve_source(str(jsonl), instruct=True), root / "data",
            PrepareConfig(clean=CleanConfig(), tokenizer=TokenizerConfig(vocab_size=300),
                          tokenizer_dir=str(dist_data / "tokenizer"), val_fraction=0.2), log=lambda *a: None)
    return root / "data"


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory) -> str:
    """hidden 64, 4 layers, 4 query / 2 KV heads (GQA), untied: every parallelism applies."""
    from cubelm.model.config import ModelConfig
    cfg = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    path = tmp_path_factory.mktemp("dist-model") / "config.json"
    path.write_text(json.dumps(cfg.to_hf_dict()))
    return str(path)


@pytest.fixture(scope="session")
def train_kw(tiny_config) -> dict:
    return dict(preset=tiny_config, seq_len=32, micro_batch_size=8, max_steps=10, warmup_steps=2, lr=1e-3,
                min_lr=1e-4, eval_batches=1)


@pytest.fixture(scope="session")
def dist_base_model(tmp_path_factory, dist_data, tiny_config) -> Path:
    """A base model for fine-tuning: the tiny config with seeded random weights and the corpus tokenizer (which has
    cubelm's chat template)."""
    import shutil

    from cubelm.model.config import read_config_json
    from cubelm.model.hf_io import save_model
    from cubelm.model.transformer import build_model
    path = tmp_path_factory.mktemp("dist-base")
    save_model(build_model(read_config_json(tiny_config), seed=0), path)
    for f in (dist_data / "tokenizer").iterdir():
        shutil.copyfile(f, path / f.name)
    return path


@pytest.fixture(scope="session")
def finetune_kw(dist_base_model) -> dict:
    """(FinetuneConfig fields, TrainConfig overrides) of the distributed fine-tuning checks."""
    return (dict(model=str(dist_base_model), data="stdlib-instruct:json", method="lora", val_fraction=0.3,
                 truncate=True),
            dict(seq_len=256, micro_batch_size=4, max_steps=10, warmup_steps=2, lr=1e-2))
