"""``cubelm model init`` (random weights from a preset, HF format) and ``cubelm model info``."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from cubelm.cli import opt
from cubelm.errors import CubelmError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass(slots=True, kw_only=True)
class InitOptions:
    preset: str = opt("tiny", help="preset name (tiny, small, base, llama-2-7b, ...)")
    out: str = opt(help="output directory", metavar="DIR")
    seed: int = opt(0, help="initialization seed")
    vocab_size: int | None = opt(None, help="override the preset's vocabulary size (e.g. to match a tokenizer)")
    tokenizer: str | None = opt(None, help="directory whose tokenizer files are copied in (sets vocab and special ids)")


@dataclass(slots=True, kw_only=True)
class InfoOptions:
    model: str = opt(help="preset name, model directory or config.json")
    json: bool = opt(False, help="print JSON")


def run_init(o: InitOptions) -> int:
    from cubelm.model.config import preset
    from cubelm.model.hf_io import save_model
    from cubelm.model.transformer import build_model

    overrides = {} if o.vocab_size is None else {"vocab_size": o.vocab_size}
    if o.tokenizer:
        overrides |= _tokenizer_overrides(Path(o.tokenizer))
    cfg = preset(o.preset, **overrides)
    if cfg.num_params() > 2e9:
        raise CubelmError(f"preset {o.preset} has {cfg.num_params():,} parameters; random init of models that "
                          f"large is not useful here (use it with 'cubelm plan')")
    out = Path(o.out)
    save_model(build_model(cfg, seed=o.seed), out)
    if o.tokenizer:
        for name in _TOKENIZER_FILES:
            if (Path(o.tokenizer) / name).is_file():
                shutil.copyfile(Path(o.tokenizer) / name, out / name)
    print(f"wrote {out} ({cfg.num_params():,} parameters, preset {o.preset})")
    return 0


def _tokenizer_overrides(tok_dir: Path) -> dict:
    from cubelm.data.tokenizer import load_tokenizer
    tok = load_tokenizer(tok_dir)
    return {"vocab_size": tok.vocab_size, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id}


def run_info(o: InfoOptions) -> int:
    from cubelm.model.config import param_count_str, resolve_config
    cfg = resolve_config(o.model)
    info = cfg.to_hf_dict() | {"num_params": cfg.num_params(),
                               "num_params_without_embeddings": cfg.num_params(include_embeddings=False)}
    if o.json:
        print(json.dumps(info, indent=2))
        return 0
    for k, v in info.items():
        print(f"{k:32s} {v}")
    print(f"{'size':32s} {param_count_str(cfg.num_params())}")
    return 0
