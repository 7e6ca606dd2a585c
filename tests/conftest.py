"""Shared test fixtures. Tests are CPU-only and offline: HF_HUB_OFFLINE is forced before transformers loads."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

