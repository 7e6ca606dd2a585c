"""Helpers for the architecture-changing compression tests (low-rank, sharing): a model directory whose greedy
continuations are not one repeated token, and the plain no-cache greedy reference."""

import torch


def varied_model_dir(root, std: float = 0.1):
    """A `tiny` model directory (tokenizer included) re-initialized with std 0.1: at the default 0.02 a random
    model's logits are so flat that greedy decoding repeats one token, which would make token equality weak."""
    from helpers import make_tiny_model_dir

    from cubelm.model.hf_io import load_model, save_model
    model_dir = make_tiny_model_dir(root)
    model = load_model(model_dir)
    model.init_weights(seed=3, std=std)
    save_model(model, model_dir)
    return model_dir


def greedy_plain(model, prompt_ids: list[int], n: int) -> list[int]:
    """Greedy tokens from the full forward over the whole sequence at every step (no KV cache, no engine)."""
    ids = list(prompt_ids)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt_ids):]


def greedy_llm(model_dir, prompts: list[list[int]], n: int):
    """(greedy tokens of each prompt from `LLM`, the LLM: its engine model is in the decode layout)."""
    from cubelm import LLM, SamplingParams
    llm = LLM(str(model_dir), num_blocks=64, log=lambda m: None)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], llm
