"""CLI verbs of ``cubelm.data``: ``data prepare``, ``data info`` and ``tokenizer train``.

Options are dataclasses turned into flags by ``cubelm.cli``; this module imports nothing heavy at module level
(the pipeline modules load inside the run functions), so ``cubelm --help`` stays fast.

    cubelm data prepare --source stdlib --out data/stdlib --vocab-size 4096
    cubelm data prepare --source stdlib-instruct --out data/instruct --tokenizer data/stdlib/tokenizer
    cubelm data info --dir data/stdlib
    cubelm tokenizer train --source stdlib --out tok --vocab-size 4096
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from cubelm.cli import opt
from cubelm.errors import CubelmError

_SOURCE_HELP = ("stdlib (the interpreter's standard library), stdlib-instruct (docstring -> function source), "
                "a file, directory or quoted glob, a .jsonl file, or hf:NAME[:SPLIT]")


@dataclass(slots=True, kw_only=True)
class _SourceOptions:
    source: str = opt("stdlib", help=f"Corpus: {_SOURCE_HELP}", metavar="SOURCE")
    text_field: str = opt("text", help="Field holding the text in .jsonl / hf: records")
    instruct: bool = opt(False, help="Read .jsonl records as {instruction, input, output} (loss-masked prompts)")
    template: str = opt("alpaca", help="Prompt template for instruct data", choices=["alpaca", "chat"])
    min_chars: int = opt(16, help="Drop documents shorter than this many characters")
    max_chars: int = opt(2_000_000, help="Drop documents longer than this many characters")
    min_alnum_fraction: float = opt(0.25, help="Drop documents whose non-space characters are less alphanumeric")
    max_repeated_line_fraction: float = opt(0.9, help="Drop documents with a larger share of repeated lines")
    near_dup_threshold: float = opt(0.8, help="MinHash LSH Jaccard threshold for near duplicates (0 disables)")
    shingle: str = opt("words", help="Near-duplicate shingles: word n-grams or line n-grams",
                       choices=["words", "lines"])
    shingle_size: int = opt(5, help="Shingle length n (words or lines)")
    context: int = opt(1024, help="Context length for the 'documents that fit' statistic")

    def clean_config(self):
        from cubelm.data.clean import CleanConfig

        return CleanConfig(min_chars=self.min_chars, max_chars=self.max_chars,
                           min_alnum_fraction=self.min_alnum_fraction,
                           max_repeated_line_fraction=self.max_repeated_line_fraction,
                           near_dup_threshold=self.near_dup_threshold, shingle=self.shingle,
                           shingle_size=self.shingle_size)

    def corpus(self):
        from cubelm.data.sources import resolve_source

        return resolve_source(self.source, text_field=self.text_field, instruct=self.instruct,
                              template=self.template)


@dataclass(slots=True, kw_only=True)
class PrepareOptions(_SourceOptions):
    out: str = opt(help="Output directory for shards, meta.json, report and tokenizer", metavar="DIR")
    tokenizer: str | None = opt(None, help="Existing tokenizer directory (default: train one into OUT/tokenizer)",
                                metavar="DIR")
    vocab_size: int = opt(4096, help="Vocabulary size of the tokenizer to train")
    model_max_length: int = opt(2048, help="model_max_length written to tokenizer_config.json")
    val_fraction: float = opt(0.01, help="Share of documents (by content hash) held out for validation")

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise CubelmError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        self.clean_config()  # validates the cleaning flags before any work starts
        if self.tokenizer is None:
            self.tokenizer_config()

    def tokenizer_config(self):
        from cubelm.data.tokenizer import TokenizerConfig

        return TokenizerConfig(vocab_size=self.vocab_size, model_max_length=self.model_max_length)


def run_prepare(options: PrepareOptions) -> int:
    from cubelm.data.prepare import PrepareConfig, prepare
    from cubelm.data.tokenizer import TokenizerConfig

    start = time.perf_counter()
    # With --tokenizer the vocabulary comes from that tokenizer, so --vocab-size is not used (nor validated).
    tokenizer_config = options.tokenizer_config() if options.tokenizer is None else TokenizerConfig()
    config = PrepareConfig(clean=options.clean_config(), tokenizer=tokenizer_config,
                           tokenizer_dir=options.tokenizer, val_fraction=options.val_fraction,
                           context=options.context)
    meta = prepare(options.corpus(), options.out, config)
    n = meta["num_tokens"]
    print(f"packed {n['train']:,} train + {n['val']:,} val tokens ({meta['dtype']}) into {options.out} "
          f"in {time.perf_counter() - start:.1f}s")
    return 0


@dataclass(slots=True, kw_only=True)
class InfoOptions:
    dir: str = opt(help="A directory written by 'cubelm data prepare'", metavar="DIR")


def run_info(options: InfoOptions) -> int:
    from cubelm.data.packed import PackedData
    from cubelm.data.tokenizer import format_stats

    data = PackedData(options.dir)
    print(data.summary())
    if "stats" in data.meta:
        print(format_stats(data.meta["stats"]))
    return 0


@dataclass(slots=True, kw_only=True)
class TokenizerTrainOptions(_SourceOptions):
    out: str = opt(help="Directory to save tokenizer.json, tokenizer_config.json, special_tokens_map.json",
                   metavar="DIR")
    vocab_size: int = opt(4096, help="Vocabulary size, including 256 byte tokens and 6 special tokens")
    min_frequency: int = opt(2, help="Minimum pair frequency for a BPE merge")
    model_max_length: int = opt(2048, help="model_max_length written to tokenizer_config.json")

    def __post_init__(self) -> None:
        self.clean_config()
        self.tokenizer_config()

    def tokenizer_config(self):
        from cubelm.data.tokenizer import TokenizerConfig

        return TokenizerConfig(vocab_size=self.vocab_size, min_frequency=self.min_frequency,
                               model_max_length=self.model_max_length)


def run_tokenizer_train(options: TokenizerTrainOptions) -> int:
    from cubelm.data.tokenizer_train import train_from_source

    start = time.perf_counter()
    stats = train_from_source(options.corpus(), Path(options.out), options.clean_config(),
                              options.tokenizer_config(), context=options.context)
    print(f"saved tokenizer ({stats['vocab_size']:,} tokens) to {options.out} "
          f"in {time.perf_counter() - start:.1f}s")
    return 0
