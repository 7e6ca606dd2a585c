"""Shared test fixtures. Tests are CPU-only and offline: HF_HUB_OFFLINE is forced before transformers loads."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402 - after the environment is set


@pytest.fixture(scope="session")
def hf_layouts(tmp_path_factory) -> dict:
    """Mistral-, Llama-3- and Qwen2-style model directories (tests/hf_layouts.py), built once per session."""
    pytest.importorskip("transformers")
    from hf_layouts import LAYOUTS, build_layout
    root = tmp_path_factory.mktemp("hf_layouts")
    return {kind: build_layout(kind, root / kind) for kind in LAYOUTS}
