"""Tokenizers: one interface over any Hugging Face ``tokenizer.json``, and the byte-level BPE cubelm trains.

``load_tokenizer(dir)`` reads a model's tokenizer as transformers 5 does (``cubelm.data.tokenizer_files``): the
``tokenizers`` pipeline from ``tokenizer.json``, special tokens and settings from ``tokenizer_config.json`` & co.,
the chat template from ``chat_template.jinja`` or the config (rendered in a Jinja sandbox by
``cubelm.data.chat_template``). ``encode(text)`` adds no special tokens (data preparation relies on it);
``encode(text, add_special_tokens=True)`` adds what the tokenizer adds to a prompt (Llama's ``<s>``, for
completions); a rendered chat template is encoded without adding any (it writes them itself).

cubelm's own tokenizer is byte-level (GPT-2 style): text is split into bytes mapped to 256 printable symbols, so
any string encodes without an unknown token and ``decode(encode(text)) == text`` exactly, whitespace, indentation
and non-ASCII included. No normalizer runs inside it (cleaning normalizes the corpus), because one would break that
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
CUBELM_SPECIAL_TOKENS = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
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
    """One tokenizer interface over ``tokenizers.Tokenizer``, for tokenizers cubelm trains and any Hugging Face one.

    ``special_tokens`` names the tokenizer's special tokens (``bos_token``, ``eos_token``, ``pad_token``, ...; a
    chat template sees them as variables); without it, a tokenizer holding cubelm's six special tokens gets
    cubelm's names and chat template. ``add_bos_token``/``add_eos_token`` apply only when the backend has no
    post-processor (otherwise the post-processor decides, see ``cubelm.data.tokenizer_files``).
    """

    def __init__(self, backend, *, model_max_length: int = 2048, sha256: str | None = None,
                 special_tokens: dict[str, str] | None = None, chat_template: str | dict[str, str] | None = None,
                 add_bos_token: bool = False, add_eos_token: bool = False, name: str = "this tokenizer") -> None:
        self.backend = backend
        self.model_max_length = model_max_length
        self.sha256 = sha256 or hashlib.sha256(self._json().encode()).hexdigest()
        self.name = name
        ids = [backend.token_to_id(t) for t in SPECIAL_TOKENS]
        self.is_cubelm = None not in ids
        if special_tokens is None:
            special_tokens = dict(CUBELM_SPECIAL_TOKENS) if self.is_cubelm else {}
            chat_template = CHAT_TEMPLATE if self.is_cubelm and chat_template is None else chat_template
        if "pad_token" not in special_tokens and backend.padding:  # transformers takes it from the padding config
            special_tokens = {**special_tokens, "pad_token": backend.padding["pad_token"]}
        self.special_tokens = dict(special_tokens)
        self.chat_template = chat_template
        self.bos_token_id, self.eos_token_id, self.pad_token_id, self.unk_token_id = (
            self.token_to_id(special_tokens.get(f"{n}_token")) for n in ("bos", "eos", "pad", "unk"))
        self.role_token_ids = dict(zip(ROLES, ids[3:])) if self.is_cubelm else {}
        added = backend.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, t in added.items() if t.special)  # what skip_special_tokens drops
        self.byte_fallback_ids = _byte_fallback_ids(backend)
        # a backend without a post-processor gets the config's BOS/EOS around completion prompts
        no_post = backend.post_processor is None
        self._prefix = [self.bos_token_id] if no_post and add_bos_token and self.bos_token_id is not None else []
        self._suffix = [self.eos_token_id] if no_post and add_eos_token and self.eos_token_id is not None else []

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``. ``add_special_tokens=True`` adds what the tokenizer adds to a prompt (Llama's
        ``<s>``), as for completions; the default adds nothing (data preparation, rendered chat templates)."""
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        return self._prefix + ids + self._suffix if add_special_tokens else ids

    def encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool = False) -> list[list[int]]:
        encs = self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [self._prefix + e.ids + self._suffix if add_special_tokens else e.ids for e in encs]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and each token's (start, end) character span in ``text``. A character split across
        several byte tokens gives each of them that character's span."""
        enc = self.backend.encode(text, add_special_tokens=False)
        return enc.ids, [tuple(o) for o in enc.offsets]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; ids outside the vocabulary (a model's padded output rows) decode to nothing."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """The text one token adds after other text (logprob entries show it): SentencePiece's ``▁Paris`` is
        " Paris", whose space a lone ``decode`` drops at the start of a text."""
        alone = self.decode([token_id])
        return self.decode([token_id, token_id])[len(alone):]

    def token_num_bytes(self, token_id: int) -> int:
        """UTF-8 bytes of text the token stands for: 0 for special tokens, 1 for a byte-fallback piece, the raw
        bytes of a byte-level piece (a piece holding part of a character counts its own bytes, not a U+FFFD)."""
        if token_id in self.special_ids:
            return 0
        if token_id in self.byte_fallback_ids:
            return 1
        piece = self.backend.id_to_token(token_id)
        if piece is None:  # beyond the vocabulary (a model's padded rows)
            return 0
        if _is_byte_level(self.backend.decoder):
            return len(piece)  # one character of the byte-to-unicode alphabet per byte
        return len(self.token_text(token_id).encode("utf-8"))

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True, *,
                            tools: list | None = None, documents: list | None = None,
                            chat_template: str | None = None, **kwargs) -> str:
        """The prompt text for ``messages``, rendered as transformers renders it (encode it without adding special
        tokens: the template writes them). ``chat_template`` is a template name or text; ``kwargs`` reach the
        template as variables."""
        from cubelm.data import chat_template as jinja

        if self.chat_template == CHAT_TEMPLATE and chat_template is None and not (tools or documents or kwargs):
            return render_chat(messages, add_generation_prompt)  # cubelm's own: the same text, without Jinja
        templates = self.chat_template
        if chat_template is not None and not (isinstance(templates, dict) and chat_template in templates):
            templates, chat_template = chat_template, None  # the text of a template, not a name
        template = jinja.select_template(templates, name=chat_template, tools=tools, where=self.name)
        return jinja.render(template, messages, add_generation_prompt=add_generation_prompt,
                            special_tokens=self.special_tokens, tools=tools, documents=documents, **kwargs)

    def _json(self) -> str:
        return self.backend.to_str(pretty=True)

    def save(self, out_dir: str | Path) -> Path:
        """Write a tokenizer cubelm trained as a Hugging Face tokenizer directory."""
        if not self.is_cubelm:
            raise CubelmError("only tokenizers cubelm trains can be saved this way; copy the tokenizer files of "
                              "other models as they are")
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


def _is_byte_level(decoder) -> bool:
    """A GPT-2 style byte-level decoder (alone or inside a Sequence): pieces spell bytes, one character each."""
    from tokenizers import decoders
    if isinstance(decoder, decoders.ByteLevel):
        return True
    return isinstance(decoder, decoders.Sequence) and b'"ByteLevel"' in decoder.__getstate__()


def _byte_fallback_ids(backend) -> frozenset[int]:
    """Ids of the ``<0x00>``..``<0xFF>`` pieces a byte-fallback model spells unknown characters with."""
    if not getattr(backend.model, "byte_fallback", False):
        return frozenset()
    ids = (backend.token_to_id(f"<0x{b:02X}>") for b in range(256))
    return frozenset(i for i in ids if i is not None)


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
    """Load the tokenizer of a model or tokenizer directory (any Hugging Face ``tokenizer.json`` with its
    ``tokenizer_config.json`` & co., a directory written by ``Tokenizer.save``), or a ``tokenizer.json`` file."""
    from tokenizers import Tokenizer as Backend

    from cubelm.data.tokenizer_files import find_tokenizer_json, read_settings

    path = Path(path)
    file = find_tokenizer_json(path)
    text = file.read_text(encoding="utf-8")
    try:
        backend = Backend.from_str(text)
    except Exception as e:  # the Rust side raises a bare Exception for malformed JSON
        raise CubelmError(f"{file} is not a valid tokenizer.json ({str(e)[:80]}); copy it again from the model's "
                          "repository or retrain it") from None
    settings = read_settings(file.parent)
    sha = hashlib.sha256(text.encode()).hexdigest()
    if settings is None:  # a bare tokenizer.json: cubelm's tokens if it has them, else no named special tokens
        tok = Tokenizer(backend, sha256=sha, name=str(file.parent))
    else:
        backend.encode_special_tokens = settings.split_special_tokens
        tok = Tokenizer(backend, model_max_length=settings.model_max_length, sha256=sha,
                        special_tokens=settings.special_tokens, chat_template=settings.chat_template,
                        add_bos_token=settings.add_bos_token, add_eos_token=settings.add_eos_token,
                        name=str(file.parent))
    # NOTE: some tokenizer.json files carry the padding/truncation they were last used with (all-MiniLM-L6-v2's
    # pads and truncates every encoding to 128); transformers applies neither unless a call asks for it, so
    # neither do we (after Tokenizer has read the pad token from the padding config).
    backend.no_padding()
    backend.no_truncation()
    return tok


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
