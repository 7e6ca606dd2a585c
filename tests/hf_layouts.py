"""Model directories laid out as three real model families ship them, built offline for the tests.

Each builder trains a small BPE with the ``tokenizers`` library on the inline corpus below and writes what the family's
Hub repository holds: ``tokenizer.json`` (the family's normalizer, pre-tokenizer, decoder, post-processor and added
tokens), ``tokenizer_config.json`` (its fields and chat template), ``special_tokens_map.json``, and, for the
transformers-5 layout, ``chat_template.jinja``; then a tiny random transformers model of that family (hidden 64,
2 layers, the tokenizer's vocabulary) saved with ``save_pretrained`` next to it, with the family's
``generation_config.json``.

- ``mistral``: Mistral-7B-Instruct-v0.2 style SentencePiece BPE: Metaspace, byte fallback (``<0x00>``..``<0xFF>``
  at ids 3..258), ``<s>`` added by a TemplateProcessing post-processor, the ``[INST]`` template.
- ``llama3``: Llama-3.1-8B-Instruct style byte-level BPE: ``<|begin_of_text|>`` from the post-processor, header
  tokens, ``<|eot_id|>``, the template in ``tokenizer_config.json``, ``eos_token_id`` a list in generation_config.
- ``qwen2``: Qwen2.5-Instruct style byte-level BPE with an NFC normalizer, the ChatML template in
  ``chat_template.jinja``, non-special added tokens (``<tool_call>``), ``eos_token_id`` a list.

The chat templates are the families' published template text (data; the long ones in ``tests/data/chat_templates``).
"""

from __future__ import annotations

import json
from pathlib import Path

TEMPLATES = Path(__file__).with_name("data") / "chat_templates"
CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the sun.",
    "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 0\n",
    "Hello world! How are you today? I am fine, thank you. What is the capital of France?",
    "for i in range(10):\n    print(i * i)  # squares\n",
    "A model predicts the next token; a tokenizer turns text into tokens and tokens back into text.",
    "Paris is the capital of France. Berlin is the capital of Germany. Rome is the capital of Italy.",
    "naïve café résumé über straße — “quoted” text, 3.14159 and 2718 numbers.",
    "You are a helpful assistant. Answer the question briefly and politely.",
    "if x > 0 and y < 10:\n\treturn {'x': x, \"y\": y}\nelse:\n\traise ValueError('bad')\n",
] * 20

MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

LLAMA3_TEMPLATE = (TEMPLATES / "llama3.jinja").read_text(encoding="utf-8")

QWEN2_TEMPLATE = (TEMPLATES / "qwen2.jinja").read_text(encoding="utf-8")

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
# (content, special): Qwen2.5 marks the tool-call and FIM tokens as non-special added tokens
QWEN2_ADDED = [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
               ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
               ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True),
               ("<|vision_end|>", True), ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
               ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
               ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False)]

LAYOUTS = ("mistral", "llama3", "qwen2")


def _write(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _added(content: str, special: bool) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": special}


def _sentencepiece_bpe():
    """Train on words (split at ▁), then lay the vocabulary out as Llama/Mistral do: <unk> <s> </s>, 256 byte
    tokens, then the learned pieces; encoding runs Metaspace without splitting (SentencePiece style)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    # the alphabet is printable ASCII and ▁, as in Llama/Mistral's vocabularies: other characters (é, ß, “, —, emoji,
    # CJK) go through byte fallback. NOTE: given explicitly, with limit_alphabet equal to its size: a limit alone
    # keeps the most frequent characters and breaks ties in hash-map order, which differs between processes.
    alphabet = [chr(c) for c in range(32, 127)] + ["▁"]
    trainer_tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=420, initial_alphabet=alphabet,
                                                                limit_alphabet=len(alphabet),
                                                                special_tokens=["<unk>", "<s>", "</s>"],
                                                                show_progress=False))
    learned = json.loads(trainer_tok.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1, right=0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tok.post_processor = processors.TemplateProcessing(single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1",
                                                       special_tokens=[("<s>", 1)])
    return tok


def _byte_level_bpe(pattern: str, *, nfc: bool, trim_offsets: bool, vocab_size: int, ignore_merges: bool):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=trim_offsets, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if ignore_merges:
        learned = json.loads(tok.to_str())["model"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
        tok.model = models.BPE(vocab=learned["vocab"], merges=merges, ignore_merges=True)
    return tok


def _tokenizer_files(out: Path, tok, config: dict, special_map: dict) -> None:
    tok.save(str(out / "tokenizer.json"))
    data = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    added = {str(a["id"]): _added(a["content"], a["special"]) for a in data["added_tokens"]}
    _write(out / "tokenizer_config.json", {"added_tokens_decoder": added, **config})
    _write(out / "special_tokens_map.json", special_map)


def _mistral_tokenizer(out: Path) -> tuple[int, dict]:
    tok = _sentencepiece_bpe()
    config = {"add_bos_token": True, "add_eos_token": False, "additional_special_tokens": [], "bos_token": "<s>",
              "chat_template": MISTRAL_TEMPLATE, "clean_up_tokenization_spaces": False, "eos_token": "</s>",
              "legacy": False, "model_max_length": 1000000000000000019884624838656, "pad_token": None,
              "sp_model_kwargs": {}, "spaces_between_special_tokens": False, "tokenizer_class": "LlamaTokenizer",
              "unk_token": "<unk>", "use_default_system_prompt": False}
    special_map = {name: {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
                   for name, t in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"))}
    _tokenizer_files(out, tok, config, special_map)
    return tok.get_vocab_size(), {"bos_token_id": 1, "eos_token_id": 2}


def _llama3_tokenizer(out: Path) -> tuple[int, dict]:
    from tokenizers import AddedToken, processors

    tok = _byte_level_bpe(LLAMA3_PATTERN, nfc=False, trim_offsets=True, vocab_size=500, ignore_merges=True)
    base = tok.get_vocab_size()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIALS])
    bos = base  # <|begin_of_text|>
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
        processors.TemplateProcessing(single="<|begin_of_text|>:0 $A:0",
                                      pair="<|begin_of_text|>:0 $A:0 <|begin_of_text|>:1 $B:1",
                                      special_tokens=[("<|begin_of_text|>", bos)])])
    config = {"bos_token": "<|begin_of_text|>", "chat_template": LLAMA3_TEMPLATE, "clean_up_tokenization_spaces": True,
              "eos_token": "<|eot_id|>", "model_input_names": ["input_ids", "attention_mask"],
              "model_max_length": 131072, "tokenizer_class": "PreTrainedTokenizerFast"}
    special_map = {"bos_token": {"content": "<|begin_of_text|>", "lstrip": False, "normalized": False,
                                 "rstrip": False, "single_word": False},
                   "eos_token": {"content": "<|eot_id|>", "lstrip": False, "normalized": False, "rstrip": False,
                                 "single_word": False}}
    _tokenizer_files(out, tok, config, special_map)
    eot, eom, end = (base + LLAMA3_SPECIALS.index(t) for t in ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"))
    return tok.get_vocab_size(), {"bos_token_id": bos, "eos_token_id": [end, eom, eot]}


def _qwen2_tokenizer(out: Path) -> tuple[int, dict]:
    from tokenizers import AddedToken, processors

    tok = _byte_level_bpe(QWEN2_PATTERN, nfc=True, trim_offsets=False, vocab_size=480, ignore_merges=False)
    base = tok.get_vocab_size()
    tok.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in QWEN2_ADDED])
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    names = [t for t, _ in QWEN2_ADDED]
    endoftext, im_end = base + names.index("<|endoftext|>"), base + names.index("<|im_end|>")
    special = [t for t, s in QWEN2_ADDED if s and t != "<|endoftext|>"]
    config = {"add_bos_token": False, "add_prefix_space": False, "additional_special_tokens": special,
              "bos_token": None, "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
              "model_max_length": 131072, "pad_token": "<|endoftext|>", "split_special_tokens": False,
              "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}
    special_map = {"additional_special_tokens": special,
                   "eos_token": {"content": "<|im_end|>", "lstrip": False, "normalized": False, "rstrip": False,
                                 "single_word": False},
                   "pad_token": {"content": "<|endoftext|>", "lstrip": False, "normalized": False, "rstrip": False,
                                 "single_word": False}}
    _tokenizer_files(out, tok, config, special_map)
    (out / "chat_template.jinja").write_text(QWEN2_TEMPLATE, encoding="utf-8")  # transformers 5 layout
    return tok.get_vocab_size(), {"bos_token_id": endoftext, "eos_token_id": [im_end, endoftext],
                                  "pad_token_id": endoftext}


def _model(kind: str, vocab_size: int, ids: dict, seed: int):
    import torch
    import transformers

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=ids["bos_token_id"], attn_implementation="eager")
    eos = ids["eos_token_id"]
    if kind == "mistral":
        cfg = transformers.MistralConfig(**common, eos_token_id=eos, sliding_window=None, rope_theta=1000000.0)
        cls = transformers.MistralForCausalLM
    elif kind == "llama3":
        cfg = transformers.LlamaConfig(**common, eos_token_id=eos[-1], rope_theta=500000.0)
        cls = transformers.LlamaForCausalLM
    else:
        cfg = transformers.Qwen2Config(**common, eos_token_id=eos[0], tie_word_embeddings=True,
                                       rope_theta=1000000.0, rms_norm_eps=1e-6)
        cls = transformers.Qwen2ForCausalLM
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)  # spread logits: no near-ties for greedy
    return model


def build_layout(kind: str, out: Path, seed: int = 0) -> Path:
    """Write the ``kind`` model directory into ``out`` (created) and return it."""
    out.mkdir(parents=True, exist_ok=True)
    vocab_size, ids = {"mistral": _mistral_tokenizer, "llama3": _llama3_tokenizer, "qwen2": _qwen2_tokenizer}[kind](out)
    model = _model(kind, vocab_size, ids, seed)
    model.generation_config = _generation_config(kind, ids)
    model.save_pretrained(out)
    return out


def _generation_config(kind: str, ids: dict):
    import transformers

    extra = {"mistral": {}, "llama3": {"do_sample": True, "temperature": 0.6, "top_p": 0.9},
             "qwen2": {"do_sample": True, "repetition_penalty": 1.05, "temperature": 0.7, "top_p": 0.8, "top_k": 20}}
    return transformers.GenerationConfig(**ids, **extra[kind])


def rewrite_weights(src: Path, out: Path, edit) -> Path:
    """A copy of the directory ``src`` whose transformers model went through ``edit(model)`` (in place)."""
    import shutil

    import transformers

    shutil.copytree(src, out)
    model = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    edit(model)
    model.save_pretrained(out)
    return out
