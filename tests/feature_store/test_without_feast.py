"""The feature store's parts that need no Feast: the prompt preamble, and the one-line errors that name the
``feature-store`` extra where it is not installed (the main test environment)."""

import importlib.util

import pytest

from cubelm.rag.features import preamble
from helpers import assert_clean_error, cli_in_process

no_feast = pytest.mark.skipif(importlib.util.find_spec("feast") is not None,
                              reason="Feast is installed: test_features.py covers the real store")


def test_preamble_states_the_features_and_what_to_do_with_them():
    text = preamble({"user_id": "u1", "preferred_language": "French", "expertise": "beginner",
                     "recent_topics": ["sql", "git"], "question_count": 4})
    for fact in ("preferred language: French", "expertise: beginner", "recent topics: sql, git",
                 "questions asked so far: 4", "answer in French", "avoid jargon"):
        assert fact in text, text
    assert preamble({"user_id": "u9", "preferred_language": None, "expertise": None, "recent_topics": None,
                     "question_count": None}) is None  # an unknown user: no preamble, the prompt is unchanged
    assert preamble({"question_count": 0}) == "About the user (from the feature store): questions asked so far: 0."


@no_feast
def test_features_verbs_name_the_extra(tmp_path, capsys):
    for args in (("demo", "--repo", tmp_path / "r"), ("get", "--repo", tmp_path / "r", "--user", "u1")):
        assert_clean_error(cli_in_process(capsys, "features", *args), "pip install 'cubelm[feature-store]'")


@no_feast
def test_serve_feature_store_names_the_extra(tmp_path, capsys):
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    from helpers import make_tiny_model_dir
    model = make_tiny_model_dir(tmp_path)
    assert_clean_error(cli_in_process(capsys, "serve", "--model", model, "--feature-store", tmp_path / "repo"),
                       "feature-store")
