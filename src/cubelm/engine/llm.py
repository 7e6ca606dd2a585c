"""The offline API, shaped like vLLM's: ``LLM(model_dir).generate(prompts, SamplingParams(...))``.

    from cubelm import LLM, SamplingParams
    llm = LLM("~/.cache/cubelm/models/default")
    outs = llm.generate(["def fibonacci(n):", "class Stack:"], SamplingParams(temperature=0, max_tokens=64))
    print(outs[0].outputs[0].text)

Adapters (multi-LoRA), as in vLLM: ``LLM(model_dir, enable_lora=True, max_loras=4)``, then
``llm.generate(prompts, params, lora_request=LoRARequest("sql", "adapters/sql"))``, one request for all prompts
or a list with one per prompt (None = the base model); rows of different adapters share every step.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq

from cubelm.engine.config import EngineConfig
from cubelm.engine.llm_engine import LLMEngine
from cubelm.engine.outputs import OutputAccumulator, RequestOutput
from cubelm.engine.params import SamplingParams
from cubelm.errors import CubelmError


class LLM:
    def __init__(self, model: str | None = None, *, device: str = "cpu", dtype: str = "auto", log=None,
                 **engine_kwargs):
        from cubelm.engine.commands import resolve_model_dir
        self.engine = LLMEngine.from_model_dir(resolve_model_dir(model), EngineConfig(**engine_kwargs),
                                               device=device, dtype=dtype, log=log)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: str | list[int] | Seq[str | list[int]],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 *, lora_request=None, use_tqdm: bool = True) -> list[RequestOutput]:
        """One ``RequestOutput`` per prompt, in prompt order. Prompts are strings or lists of token ids;
        ``lora_request`` is one ``LoRARequest`` for all prompts, or a list with one (or None) per prompt."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise CubelmError(f"got {len(params)} SamplingParams for {len(prompts)} prompts; pass one or one each")
        loras = lora_request if isinstance(lora_request, (list, tuple)) else [lora_request] * len(prompts)
        if len(loras) != len(prompts):
            raise CubelmError(f"got {len(loras)} lora requests for {len(prompts)} prompts; pass one or one each")
        ids = []
        try:
            for prompt, p, lora in zip(prompts, params, loras):
                ids.append(f"offline-{next(self._ids)}")
                self.engine.add_request(ids[-1], prompt, p, lora_request=lora)
        except Exception:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return self._run(ids, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        from tqdm import tqdm
        acc = {i: OutputAccumulator() for i in ids}
        bar = tqdm(total=len(ids), desc="generate", unit="req", disable=not use_tqdm, dynamic_ncols=True)
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                acc[out.request_id].add(out)
                bar.update(out.finished)
            bar.set_postfix(gen_tok=self.engine.num_generated_tokens)
        bar.close()
        return [acc[i].build() for i in ids]
