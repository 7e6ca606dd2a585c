"""``cubelm generate``: stream a continuation of a prompt from a model directory (reference path).

    cubelm generate --prompt 'def fibonacci(n):'                              # the default model
    cubelm generate --adapter ~/.cache/cubelm/models/default-instruct --chat \
        --prompt 'Return the n-th Fibonacci number.'                          # a LoRA adapter, the chat template
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cubelm.cli import opt
from cubelm.errors import CubelmError


@dataclass(slots=True, kw_only=True)
class GenerateOptions:
    model: str | None = opt(None, help="model directory (HF format); default: the default model in the model store")
    prompt: str = opt(help="text to continue", metavar="TEXT")
    max_new_tokens: int = opt(128, help="maximum number of tokens to generate")
    temperature: float = opt(0.8, help="sampling temperature; 0 means greedy")
    top_k: int = opt(50, help="sample among the k most likely tokens; 0 turns it off")
    top_p: float = opt(1.0, help="nucleus sampling: smallest set of tokens with this total probability; 1 = off")
    seed: int | None = opt(None, help="random seed: the same seed gives the same text")
    ignore_eos: bool = opt(False, help="keep generating after the end-of-sequence token")
    adapter: str | None = opt(None, help="a LoRA adapter directory (peft format: adapter_config.json + "
                                         "adapter_model.safetensors), merged into the model's weights", metavar="DIR")
    chat: bool = opt(False, help="send the prompt as one user message through the model's chat template")
    device: str = opt("cpu", help="torch device: cpu, cuda, cuda:1, ...")
    dtype: str = opt("auto", help="compute dtype: auto (bfloat16 on CUDA and on CPUs with avx512_bf16 or AMX, else "
                                  "float32), float32, bfloat16, float16")
    quantization: str | None = opt(None, choices=["int8", "int4"], help="weight-only quantization at load: int8 "
                                   "(per-row scales) or int4 (per-group scales); not needed for a `cubelm quantize` "
                                   "directory")
    quantization_group_size: int = opt(32, help="int4: inputs per scale (32, 64 or 128, dividing the hidden size)")

    def __post_init__(self) -> None:
        if not self.prompt:
            raise CubelmError("--prompt is empty; give some text to continue, e.g. --prompt 'def fibonacci(n):'")
        if self.quantization is not None:
            from cubelm.compress.quantize import check_method
            check_method(self.quantization, self.quantization_group_size)


def resolve_model_dir(model: str | None) -> Path:
    """``--model``: a directory, a name in the model store (``cubelm models``), or a URL (s3://, gs://, http(s)://,
    file://) pulled through the store first (once per content digest; cubelm.store.pull)."""
    from cubelm.store import is_complete_model_dir, is_remote, model_path, pull_model
    if model is None:
        path = model_path()
        if not is_complete_model_dir(path):
            raise CubelmError(f"no default model at {path}; build it with 'cubelm build-default' or pass --model DIR")
        return path.resolve() if path.is_symlink() else path  # a pulled default: its immutable @digest directory
    if is_remote(model):
        return pull_model(model)
    path = Path(model)
    if not path.is_dir() and "/" not in model and model_path(model).is_dir():
        return model_path(model).resolve()  # the immutable name@digest directory behind a pulled name
    if not path.is_dir():
        raise CubelmError(f"model directory {path} does not exist; pass a directory holding config.json "
                          f"and model.safetensors, a model name from 'cubelm models', or s3://, https:// URL")
    return path


def run_generate(o: GenerateOptions) -> int:
    from cubelm.data.tokenizer import load_tokenizer
    from cubelm.engine.detokenize import IncrementalDetokenizer
    from cubelm.engine.params import SamplingParams
    from cubelm.engine.reference import GenerationResult, generate_tokens
    from cubelm.model.hf_io import inference_dtype, load_model, resolve_device, stop_token_ids

    params = SamplingParams(max_tokens=o.max_new_tokens, temperature=o.temperature, top_k=o.top_k, top_p=o.top_p,
                            seed=o.seed, ignore_eos=o.ignore_eos)
    model_dir = resolve_model_dir(o.model)
    device = resolve_device(o.device)
    t0 = time.perf_counter()
    model = load_model(model_dir, device=device, dtype=inference_dtype(o.dtype, device))
    if o.adapter:
        _merge_adapter(model, o.adapter)
    num_params = sum(p.numel() for p in model.parameters())  # before the decode layout turns weights into buffers
    if o.quantization:  # after the adapter merge (into float weights), before the decode layout
        from cubelm.compress.quantized_linear import apply_weight_quantization
        apply_weight_quantization(model, o.quantization, o.quantization_group_size)
    from cubelm.engine.decode_layout import apply_decode_layout
    apply_decode_layout(model)  # inference only (CPU): same logits, ~1.7x faster one-token steps
    tok = load_tokenizer(model_dir)
    if o.chat:
        if not tok.chat_template:
            raise CubelmError(f"--chat: the tokenizer of {model_dir} has no chat template; drop --chat to continue "
                              f"the prompt as plain text")
        text = tok.apply_chat_template([{"role": "user", "content": o.prompt}], add_generation_prompt=True)
        prompt_ids = tok.encode(text, add_special_tokens=False)  # the template writes the special tokens
    else:
        prompt_ids = tok.encode(o.prompt, add_special_tokens=True)  # a completion: Llama's <s> and the like
    eos = stop_token_ids(model_dir, tok.eos_token_id)  # generation_config.json's, else config.json's, + tokenizer's
    print(f"[cubelm] loaded {model_dir} ({num_params:,} params) in "
          f"{time.perf_counter() - t0:.1f}s; prompt {len(prompt_ids)} tokens", file=sys.stderr)
    detok = IncrementalDetokenizer.for_tokenizer(tok, prompt_ids, skip_special_tokens=False)
    result = GenerationResult([], "length")
    t1 = time.perf_counter()
    sys.stdout.write("" if o.chat else o.prompt)
    for token_id in generate_tokens(model, prompt_ids, params, result, eos_token_ids=eos):
        sys.stdout.write(detok.add(token_id))
        sys.stdout.flush()
    sys.stdout.write(detok.flush() + "\n")
    sys.stdout.flush()
    dt = time.perf_counter() - t1
    n = len(result.token_ids)
    print(f"[cubelm] {n} tokens in {dt:.2f}s ({n / max(dt, 1e-9):.1f} tok/s), finish_reason={result.finish_reason}",
          file=sys.stderr)
    return 0


def _merge_adapter(model, adapter: str) -> None:
    """Apply a peft LoRA adapter and fold it into the weights: one request, one adapter, so the merged model is
    exact and costs nothing per token (the server keeps adapters separate to batch several over one base)."""
    from cubelm.finetune.adapter import load_adapter
    from cubelm.finetune.lora import merge_lora
    if not Path(adapter).is_dir():
        raise CubelmError(f"--adapter {adapter} is not a directory; pass a peft adapter directory "
                          f"(adapter_config.json + adapter_model.safetensors)")
    load_adapter(model, adapter)
    merge_lora(model)
    model.requires_grad_(False)
