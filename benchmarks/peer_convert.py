"""Model files for ``benchmarks/engine_peers.py``: the seeded random presets in HF format, and their conversions for
each peer (GGUF with llama.cpp's own converter, CTranslate2 with ``ct2-transformers-converter``), each created once
under the harness's work directory and reused. The converters run with the peer's python, as their users do.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent


class PeerError(RuntimeError):
    """A peer that could not be set up or failed a round; the message becomes the table row's reason."""


def prepare_model(work: Path, name: str, seed: int) -> Path:
    """The seeded random preset in HF format, created once per (preset, seed) and reused by later runs."""
    from cubelm.model.config import preset
    from cubelm.model.hf_io import save_model
    from cubelm.model.transformer import build_model
    out = work / f"{name}-seed{seed}" / "hf"
    if not (out / "config.json").is_file():
        cfg = preset(name, eos_token_id=2, bos_token_id=1, pad_token_id=0)
        save_model(build_model(cfg, seed=seed), out)
    return out


def vocab_size(hf_dir: Path) -> int:
    return json.loads((hf_dir / "config.json").read_text())["vocab_size"]


def _linked_copy(hf_dir: Path, dst: Path) -> Path:
    """A directory with the model's files symlinked, to which a peer's converter-specific tokenizer is added."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in hf_dir.iterdir():
        if not (dst / f.name).exists():
            (dst / f.name).symlink_to(f.resolve())
    return dst


def word_level_tokenizer(vocab: int) -> dict:
    """tokenizer.json with exactly the model's vocabulary (``t<id>``; 0-2 are <unk> <s> </s>): CTranslate2's converter
    copies the vocabulary from it, and the CTranslate2 worker feeds ``t<id>`` strings."""
    names = ["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(3, vocab)]
    special = [{"id": i, "content": names[i], "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True} for i in range(3)]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": special, "normalizer": None,
            "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None, "decoder": None,
            "model": {"type": "WordLevel", "vocab": {n: i for i, n in enumerate(names)}, "unk_token": "<unk>"}}


def _run(cmd: list[str], what: str, env: dict | None = None) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        raise PeerError(f"{what} failed: {' | '.join(tail)}")


def convert_ct2(py: str, hf_dir: Path, quantization: str) -> Path:
    out = hf_dir.parent / f"ct2-{quantization}"
    if (out / "model.bin").is_file():
        return out
    src = _linked_copy(hf_dir, hf_dir.parent / "ct2-src")
    (src / "tokenizer.json").write_text(json.dumps(word_level_tokenizer(vocab_size(hf_dir))))
    (src / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}))
    converter = str(Path(py).parent / "ct2-transformers-converter")
    _run([converter, "--model", str(src), "--output_dir", str(out), "--quantization", quantization, "--force"],
         f"ct2-transformers-converter --quantization {quantization}")
    return out


def convert_gguf(py: str, llamacpp_src: Path, hf_dir: Path, outtype: str) -> Path:
    out = hf_dir.parent / f"model-{outtype}.gguf"
    if out.is_file():
        return out
    script = llamacpp_src / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise PeerError(f"{script} not found (unpack the llama-cpp-python sdist and pass --llamacpp-src)")
    src = _linked_copy(hf_dir, hf_dir.parent / "gguf-src")
    if not (src / "tokenizer.model").is_file():
        _run([py, str(HERE / "peer_workers.py"), "write-spm", "--vocab-size", str(vocab_size(hf_dir)), "--out",
              str(src / "tokenizer.model")], "writing the SentencePiece vocabulary")
    tmp = out.with_suffix(".tmp")
    _run([py, str(script), str(src), "--outfile", str(tmp), "--outtype", outtype], f"convert_hf_to_gguf {outtype}",
         env={"PYTHONPATH": str(script.parent / "gguf-py"), "HF_HUB_OFFLINE": "1"})
    tmp.rename(out)
    return out
