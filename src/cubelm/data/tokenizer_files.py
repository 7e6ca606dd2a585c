"""Reading a Hugging Face tokenizer directory the way transformers 5 reads it, without transformers.

The files and what they decide:

- ``tokenizer.json``: the whole ``tokenizers`` pipeline (normalizer, pre-tokenizer, model, decoder, post-processor)
  and the added tokens, with their ``special`` flags (what ``skip_special_tokens`` drops). Required.
- ``tokenizer_config.json``: the named special tokens (``bos_token``, ``eos_token``, ``unk_token``, ``pad_token``,
  ... as strings or AddedToken objects, plus model-specific ``*_token`` entries), ``model_max_length``,
  ``split_special_tokens``, ``add_bos_token``/``add_eos_token`` and ``chat_template`` (a string or a list of
  ``{"name", "template"}``).
- ``special_tokens_map.json``: older layout; read, and it overrides the config's tokens, only when
  ``tokenizer_config.json`` has no ``added_tokens_decoder`` (as transformers does).
- ``chat_template.jinja`` (transformers 5) and ``additional_chat_templates/NAME.jinja``: when present they replace
  the config's ``chat_template``.

Which special tokens a prompt gets is the post-processor's call (Llama's TemplateProcessing adds ``<s>``, a
ByteLevel one adds nothing), as in transformers 5. Only a ``tokenizer.json`` without a post-processor falls back to
the config's ``add_bos_token``/``add_eos_token`` (transformers 5 ignores them; 4.x and SentencePiece honour them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from cubelm.errors import CubelmError

# The named special tokens transformers knows; a chat template sees each one that is set, as a string.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
TEMPLATE_FILE, TEMPLATE_DIR = "chat_template.jinja", "additional_chat_templates"
# Tokenizer formats cubelm does not read, and what they are, for the error that says so.
_OTHER_FORMATS = {"tokenizer.model": "a SentencePiece model", "tekken.json": "a Mistral tekken vocabulary",
                  "vocab.json": "a GPT-2 style vocab.json/merges.txt", "vocab.txt": "a WordPiece vocab.txt",
                  "tiktoken.model": "a tiktoken vocabulary"}


@dataclass(slots=True, kw_only=True)
class TokenizerSettings:
    """What ``tokenizer_config.json`` & co. say beyond ``tokenizer.json``."""

    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token -> "<s>", ... (set ones only)
    chat_template: str | dict[str, str] | None = None
    add_bos_token: bool = False  # used only when tokenizer.json has no post-processor
    add_eos_token: bool = False
    model_max_length: int = 2048
    split_special_tokens: bool = False  # True: "<s>" in text is plain text, never the special token


def find_tokenizer_json(path: Path) -> Path:
    """The tokenizer.json for a directory (or the file itself), else an error that says what is there instead."""
    file = path / "tokenizer.json" if path.is_dir() or not path.suffix else path
    if file.is_file():
        return file
    if not path.exists():
        raise CubelmError(f"no tokenizer.json: {path} does not exist")
    found = [f"{name} ({what})" for name, what in _OTHER_FORMATS.items() if (path / name).is_file()]
    if found:
        raise CubelmError(
            f"no tokenizer.json in {path}; it has {', '.join(found)}, which cubelm does not read. Convert it once "
            f"with transformers: AutoTokenizer.from_pretrained('{path}').save_pretrained('{path}')")
    raise CubelmError(f"no tokenizer.json in {path}: a model directory needs its tokenizer files (tokenizer.json, "
                      f"tokenizer_config.json); copy them from the model's repository, or train one with "
                      f"'cubelm tokenizer train --out {path}'")


def read_settings(directory: Path) -> TokenizerSettings | None:
    """The settings beside a tokenizer.json, or None when there is neither a config nor a template file."""
    config = _read_json(directory / "tokenizer_config.json")
    templates = _template_files(directory)
    if config is None and not templates:
        return None
    config = dict(config or {})
    special_map = _read_json(directory / "special_tokens_map.json")
    if special_map and "added_tokens_decoder" not in config:
        config.update(special_map)
    special = {}
    for key, value in config.items():
        token = _token_text(value)
        if token is not None and (key in SPECIAL_TOKEN_NAMES or (key.endswith("_token") and isinstance(value, str))):
            special[key] = token
    if isinstance(config.get("extra_special_tokens"), dict):
        special.update({k: t for k, v in config["extra_special_tokens"].items() if (t := _token_text(v))})
    max_len = config.get("model_max_length")
    return TokenizerSettings(
        special_tokens=special, chat_template=templates or _config_template(config.get("chat_template"), directory),
        add_bos_token=config.get("add_bos_token") is True, add_eos_token=config.get("add_eos_token") is True,
        model_max_length=int(max_len) if isinstance(max_len, (int, float)) and max_len > 0 else 2048,
        split_special_tokens=config.get("split_special_tokens") is True)


def _token_text(value) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):  # a serialized AddedToken
        return value["content"]
    return None


def _template_files(directory: Path) -> str | dict[str, str] | None:
    templates = {}
    if (directory / TEMPLATE_FILE).is_file():
        templates["default"] = (directory / TEMPLATE_FILE).read_text(encoding="utf-8")
    if (directory / TEMPLATE_DIR).is_dir():
        for f in sorted((directory / TEMPLATE_DIR).glob("*.jinja")):
            templates[f.name.removesuffix(".jinja")] = f.read_text(encoding="utf-8")
    if list(templates) == ["default"]:
        return templates["default"]
    return templates or None


def _config_template(value, directory: Path) -> str | dict[str, str] | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, dict) and {"name", "template"} <= t.keys() for t in value):
        return {t["name"]: t["template"] for t in value}
    if isinstance(value, dict) and all(isinstance(t, str) for t in value.values()):
        return dict(value)
    raise CubelmError(f"{directory / 'tokenizer_config.json'}: chat_template must be a string or a list of "
                      f"{{\"name\": ..., \"template\": ...}} objects, got {type(value).__name__}")


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CubelmError(f"{path} is not valid JSON ({e}); fix it or copy it again from the model's repository"
                          ) from None
    if not isinstance(data, dict):
        raise CubelmError(f"{path} must hold a JSON object")
    return data
