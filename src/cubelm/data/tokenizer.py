"""Byte-level BPE tokenizer: training, saving in Hugging Face format, loading, chat template, statistics.

Byte-level (GPT-2 style): text is split into bytes mapped to 256 printable symbols, so any string encodes
without an unknown token and ``decode(encode(text)) == text`` exactly, whitespace, indentation and non-ASCII
included. No normalizer runs inside the tokenizer (cleaning normalizes the corpus), because one would break that
round trip. Special tokens get ids 0..5 in this order: ``<|bos|> <|eos|> <|pad|> <|user|> <|assistant|>
<|system|>``. A saved directory holds ``tokenizer.json``, ``tokenizer_config.json`` (``PreTrainedTokenizerFast``,
special tokens, ``model_max_length``, a Jinja ``chat_template``) and ``special_tokens_map.json``, so
``transformers.AutoTokenizer.from_pretrained(dir)`` loads it offline; cubelm itself only needs ``tokenizers``.

Train one from the command line: ``cubelm tokenizer train --source stdlib --out /tmp/tok --vocab-size 4096``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cubelm.errors import CubelmError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLES = ("user", "assistant", "system")
SPECIAL_TOKENS = (BOS, EOS, PAD, *(f"<|{role}|>" for role in ROLES))
NUM_BYTE_TOKENS = 256
MIN_VOCAB_SIZE = NUM_BYTE_TOKENS + len(SPECIAL_TOKENS)

# Each turn is <|role|>content<|eos|>; the generation prompt opens an assistant turn. EOS closing each turn means
# a model stops generating at the end of its answer, the same token that ends every packed document.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('chat roles are system, user and assistant') }}{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|eos|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def render_chat(messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """The same text ``CHAT_TEMPLATE`` renders, without needing Jinja."""
    parts = []
    for message in messages:
        if message.get("role") not in ROLES:
            raise CubelmError(f"chat role {message.get('role')!r} is not one of {', '.join(ROLES)}")
        parts.append(f"<|{message['role']}|>{message['content']}{EOS}")
    if add_generation_prompt:
        parts.append("<|assistant|>")
    return "".join(parts)


@dataclass(slots=True, kw_only=True)
class TokenizerConfig:
    vocab_size: int = 4096
    min_frequency: int = 2
    model_max_length: int = 2048

    def __post_init__(self) -> None:
        if self.vocab_size < MIN_VOCAB_SIZE:
            raise CubelmError(f"vocabulary size {self.vocab_size} is too small for {NUM_BYTE_TOKENS} byte tokens + "
                              f"{len(SPECIAL_TOKENS)} special tokens; use --vocab-size {MIN_VOCAB_SIZE} or more")
        if self.vocab_size > 2**32:
            raise CubelmError(f"vocabulary size {self.vocab_size} does not fit uint32 token ids")
        if self.min_frequency < 1 or self.model_max_length < 1:
            raise CubelmError("min_frequency and model_max_length must be positive")


class Tokenizer:
    """A thin wrapper over ``tokenizers.Tokenizer`` with cubelm's special tokens and chat template."""

    def __init__(self, backend, *, model_max_length: int = 2048, sha256: str | None = None) -> None:
        self.backend = backend
        self.model_max_length = model_max_length
        self.sha256 = sha256 or hashlib.sha256(self._json().encode()).hexdigest()
        ids = [backend.token_to_id(t) for t in SPECIAL_TOKENS]
        if None in ids:
            raise CubelmError(f"tokenizer lacks cubelm's special tokens {', '.join(SPECIAL_TOKENS)}; "
                              "train one with 'cubelm tokenizer train'")
        self.bos_token_id, self.eos_token_id, self.pad_token_id = ids[:3]
        self.role_token_ids = dict(zip(ROLES, ids[3:]))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and each token's (start, end) character span in ``text``. A character split across
        several byte tokens gives each of them that character's span."""
        enc = self.backend.encode(text, add_special_tokens=False)
        return enc.ids, [tuple(o) for o in enc.offsets]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        return render_chat(messages, add_generation_prompt)

    def _json(self) -> str:
        return self.backend.to_str(pretty=True)

    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "tokenizer.json").write_text(self._json(), encoding="utf-8")
        special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
                   "additional_special_tokens": list(SPECIAL_TOKENS[3:])}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "unk_token": None,
                  "model_max_length": self.model_max_length, "add_bos_token": False, "add_eos_token": False,
                  "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE}
        _write_json(out / "tokenizer_config.json", config)
        _write_json(out / "special_tokens_map.json", special)
        return out


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _new_backend():
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, processors

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    # trim_offsets=False: a token's span keeps its leading space, so spans tile the text.
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return backend


def train_tokenizer(texts: Iterable[str], config: TokenizerConfig) -> Tokenizer:
    """Train byte-level BPE on a stream of texts (deterministic for the same texts in the same order)."""
    from tokenizers import pre_tokenizers, trainers

    backend = _new_backend()
    trainer = trainers.BpeTrainer(vocab_size=config.vocab_size, min_frequency=config.min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    return Tokenizer(backend, model_max_length=config.model_max_length)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer directory written by ``Tokenizer.save`` (or any compatible ``tokenizer.json``)."""
    from tokenizers import Tokenizer as Backend

    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() or not path.suffix else path
    if not file.is_file():
        raise CubelmError(f"no tokenizer.json in {path}; train one with 'cubelm tokenizer train --out {path}' "
                          "or pass the directory that holds it")
    text = file.read_text(encoding="utf-8")
    try:
        backend = Backend.from_str(text)
    except Exception as e:  # the Rust side raises a bare Exception for malformed JSON
        raise CubelmError(f"{file} is not a valid tokenizer.json ({str(e)[:80]}); retrain it") from None
    config_file = file.parent / "tokenizer_config.json"
    max_len = json.loads(config_file.read_text()).get("model_max_length", 2048) if config_file.is_file() else 2048
    return Tokenizer(backend, model_max_length=int(max_len), sha256=hashlib.sha256(text.encode()).hexdigest())


# ---- statistics -------------------------------------------------------------------------------------------
def token_stats(tokens_per_doc: Sequence[int], num_chars: int, context: int) -> dict:
    """Chars per token and the tokens-per-document distribution; ``fit_context`` counts documents whose tokens
    (plus the EOS that ends them) fit in ``context``."""
    counts = np.asarray(tokens_per_doc, dtype=np.int64)
    total = int(counts.sum())
    if counts.size == 0:
        return {"num_documents": 0, "num_tokens": 0, "chars_per_token": 0.0, "context": context}
    fit = int((counts + 1 <= context).sum())
    return {"num_documents": int(counts.size), "num_tokens": total, "num_chars": num_chars,
            "chars_per_token": round(num_chars / max(total, 1), 4),
            "tokens_per_document": {"p50": int(np.percentile(counts, 50)), "p95": int(np.percentile(counts, 95)),
                                    "max": int(counts.max())},
            "context": context, "fit_context": fit, "fit_context_fraction": round(fit / counts.size, 4)}


def format_stats(stats: dict) -> str:
    if not stats.get("num_documents"):
        return "tokenizer stats: no documents"
    per_doc = stats["tokens_per_document"]
    return (f"tokenizer stats: {stats['num_documents']:,} documents, {stats['num_tokens']:,} tokens, "
            f"{stats['chars_per_token']:.2f} chars/token; tokens/document p50 {per_doc['p50']:,} "
            f"p95 {per_doc['p95']:,} max {per_doc['max']:,}; {stats['fit_context']:,} documents "
            f"({100 * stats['fit_context_fraction']:.1f}%) fit a {stats['context']:,}-token context")
