"""``LLMEngine``: requests in, tokens out, one ``step()`` at a time (schedule -> run -> sample -> postprocess).

    engine = LLMEngine.from_model_dir("model/", EngineConfig(kv_cache_memory="1GiB"))
    engine.add_request("r1", "def fibonacci(n):", SamplingParams(max_tokens=64))
    while engine.has_unfinished_requests():
        for out in engine.step(): ...

The offline ``LLM`` and the async server loop are thin layers over this class.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch

from cubelm.engine.block_manager import BlockManager
from cubelm.engine.config import EngineConfig, plan_pool
from cubelm.engine.detokenize import IncrementalDetokenizer
from cubelm.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from cubelm.engine.params import SamplingParams
from cubelm.engine.runner import ModelRunner
from cubelm.engine.sampler import sample_batch
from cubelm.engine.scheduler import Scheduler
from cubelm.engine.sequence import Sequence
from cubelm.errors import CubelmError


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    metrics: RequestMetrics
    emitted: list[int] = field(default_factory=list)  # text chars already streamed, per sequence

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


class LLMEngine:
    def __init__(self, model, tokenizer, config: EngineConfig | None = None, *, log=None, draft_model=None):
        self.config = config = config or EngineConfig()
        cfg = model.config
        self.max_model_len = min(config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.pool = plan_pool(cfg, config, next(model.parameters()), self.max_model_len)
        if config.decode_layout:  # NOTE: in place: the engine owns the model it is given (inference only from now)
            from cubelm.engine.decode_layout import apply_decode_layout
            apply_decode_layout(model)
            if draft_model is not None:
                apply_decode_layout(draft_model)
        self.model, self.tokenizer = model.eval(), tokenizer
        (log or _stderr)(self.pool.describe())
        self.block_manager = BlockManager(self.pool.num_blocks, config.block_size,
                                          enable_prefix_caching=config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=config.max_num_batched_tokens,
                                   lookahead=self._num_draft_tokens if config.speculative is not None else None)
        self.runner = ModelRunner(model, self.pool.num_blocks, config.block_size, compile_model=config.compile_decode)
        self.eos_token_ids = frozenset(cfg.eos_token_ids or ([tokenizer.eos_token_id] if tokenizer else []))
        self.requests: dict[str, Request] = {}
        self.generator = torch.Generator(device=self.runner.device).manual_seed(config.seed)
        self.num_generated_tokens = self.num_prompt_tokens = 0
        self.proposer = None
        self.spec_proposed = self.spec_accepted = 0
        if config.speculative is not None:
            self.proposer = self._build_proposer(config.speculative, draft_model)

    def _build_proposer(self, spec, draft_model):
        from cubelm.engine.speculative import DraftProposer, NgramProposer
        if spec.method == "ngram":
            return NgramProposer(spec)
        if draft_model is None:
            from cubelm.model.hf_io import load_model
            param = next(self.model.parameters())
            draft_model = load_model(spec.draft_model, device=param.device, dtype=param.dtype)
            if self.config.decode_layout:
                from cubelm.engine.decode_layout import apply_decode_layout
                apply_decode_layout(draft_model)
        return DraftProposer(draft_model.eval(), self.model.config, self.pool.num_blocks, self.config.block_size,
                             self.generator)

    @classmethod
    def from_model_dir(cls, model_dir, config: EngineConfig | None = None, *, device="cpu", dtype="auto", log=None):
        from cubelm.data.tokenizer import load_tokenizer
        from cubelm.model.hf_io import load_model
        return cls(load_model(model_dir, device=device, dtype=dtype), load_tokenizer(model_dir), config, log=log)

    # ---- requests ------------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None
                    ) -> Request:
        params = params or SamplingParams()
        if request_id in self.requests:
            raise CubelmError(f"request id {request_id!r} is already in use")
        text, ids = (prompt, self.tokenizer.encode(prompt)) if isinstance(prompt, str) else (None, list(prompt))
        self._validate(ids, params)
        seqs = []
        for i in range(params.n):
            seq = Sequence(request_id, i, ids, params, self.eos_token_ids, parent=seqs[0] if seqs else None)
            if params.seed is not None:
                seq.generator = torch.Generator(device=self.runner.device).manual_seed(params.seed + i)
            if self.tokenizer is not None:
                seq.detok = IncrementalDetokenizer(
                    lambda t, skip=params.skip_special_tokens: self.tokenizer.decode(t, skip_special_tokens=skip))
            seqs.append(seq)
            self.scheduler.add(seq)
        req = Request(request_id, text, ids, params, seqs, RequestMetrics(time.monotonic()), [0] * params.n)
        self.requests[request_id] = req
        self.num_prompt_tokens += len(ids)
        return req

    def _validate(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise CubelmError("prompt is empty: it must contain at least one token")
        vocab = self.model.config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise CubelmError(f"prompt token ids must be in [0, {vocab}), got {min(ids)}..{max(ids)}")
        if len(ids) >= self.max_model_len:
            raise CubelmError(f"prompt has {len(ids)} tokens but the context length is {self.max_model_len}; "
                              f"shorten the prompt")
        needed = min(len(ids) + params.max_tokens, self.max_model_len)
        if needed > self.pool.num_tokens:
            raise CubelmError(f"prompt ({len(ids)}) + max_tokens ({params.max_tokens}) needs {needed} KV slots but "
                              f"the cache holds {self.pool.num_tokens}; raise kv_cache_memory or lower max_tokens")

    def abort_request(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is not None:
            for seq in req.seqs:
                self._finish(seq, "abort")

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work()

    # ---- the step ------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        for seq in batch.preempted:
            if self.proposer is not None:
                self.proposer.forget(seq)
        if not batch:
            return []
        spec = self._propose(batch) if self.proposer is not None else {}
        logits, offsets = self.runner.run(batch.seqs, batch.num_new_tokens, full=frozenset(spec))
        now = time.monotonic()
        to_sample, rows, touched = [], [], {}
        for row, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            if row in spec:
                rows_m = logits[offsets[row]:offsets[row] + n]
                self._verify(seq, *spec[row], rows_m, now)
                touched[seq.request_id] = self.requests.get(seq.request_id)
                continue
            seq.num_computed_tokens += n
            self.block_manager.commit(seq)
            if seq.num_computed_tokens == seq.num_tokens:
                to_sample.append(seq)
                rows.append(offsets[row])
        if to_sample:
            tokens, logprobs = sample_batch(logits[rows], to_sample, self.generator)
            for seq, token, lp in zip(to_sample, tokens, logprobs):
                self._append_token(seq, token, lp, now)
                touched[seq.request_id] = self.requests.get(seq.request_id)
        for req in touched.values():
            if req is not None and req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
        return [self._output(r) for r in touched.values() if r is not None]

    # ---- speculative decoding ------------------------------------------------------------------------------
    def _num_draft_tokens(self, seq: Sequence) -> int:
        from cubelm.engine.speculative import num_draft_tokens
        return num_draft_tokens(seq, self.config.speculative.num_speculative_tokens, self.max_model_len)

    def _propose(self, batch) -> dict[int, tuple[list[int], object]]:
        """Drafts for the lookahead slots the scheduler reserved (true decodes only); they join the batch as extra
        query tokens to verify. A proposer may return fewer drafts than slots: the spare slots stay unused."""
        rows = [row for row, k in enumerate(batch.num_lookahead_tokens) if k > 0]
        if not rows:
            return {}
        proposals = self.proposer.propose([batch.seqs[r] for r in rows], [batch.num_lookahead_tokens[r] for r in rows])
        spec = {}
        for row, (drafts, q) in zip(rows, proposals):
            batch.num_lookahead_tokens[row] = 0  # the drafts become new tokens: num_tokens stays within the budget
            if drafts:
                batch.seqs[row].token_ids.extend(drafts)
                batch.num_new_tokens[row] += len(drafts)
                spec[row] = (drafts, q)
        return spec

    def _verify(self, seq: Sequence, drafts: list[int], q, logits: torch.Tensor, now: float) -> None:
        from cubelm.engine.speculative import target_probs, verify
        computed = seq.num_computed_tokens
        del seq.token_ids[len(seq.token_ids) - len(drafts):]
        accepted, token = verify(drafts, q, target_probs(logits, seq), seq.generator or self.generator)
        self.spec_proposed += len(drafts)
        self.spec_accepted += accepted
        for tok in drafts[:accepted] + [token]:
            self._append_token(seq, tok, None, now)
            if seq.is_finished:
                return
        # K/V are valid for the last token and the accepted drafts; the new token is not computed yet
        seq.num_computed_tokens = computed + accepted + 1
        self.block_manager.commit(seq)
        if hasattr(self.proposer, "rollback"):
            self.proposer.rollback(seq, seq.num_computed_tokens)

    def _append_token(self, seq: Sequence, token: int, lp, now: float) -> None:
        p, req = seq.params, self.requests[seq.request_id]
        self.num_generated_tokens += 1
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = now
        req.metrics.last_token_time = now
        req.metrics.token_times.append(now)
        if token in p.stop_token_ids or (not p.ignore_eos and token in seq.eos_token_ids):
            stop_reason = token if token in p.stop_token_ids else None
            return self._finish(seq, "stop", stop_reason)
        seq.token_ids.append(token)
        if lp is not None:
            seq.logprobs.append(lp)
            seq.cumulative_logprob += lp.logprob
        if seq.detok is not None:
            before = len(seq.text)
            seq.text += seq.detok.add(token)
            if p.stop and self._check_stop_strings(seq, before):
                return
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            self._finish(seq, "length")

    def _check_stop_strings(self, seq: Sequence, before: int) -> bool:
        longest = max(map(len, seq.params.stop))
        start = max(0, before - longest + 1)  # a stop string may straddle the old/new text boundary
        hits = [(seq.text.find(s, start), s) for s in seq.params.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return False
        idx, stop = min(hits)
        seq.text = seq.text[:idx]
        self._finish(seq, "stop", stop)
        return True

    def _finish(self, seq: Sequence, reason: str, stop_reason=None) -> None:
        self.scheduler.finish(seq, reason, stop_reason)
        if self.proposer is not None:
            self.proposer.forget(seq)
        req = self.requests.get(seq.request_id)
        if req is not None and req.finished:
            req.metrics.finished_time = time.monotonic()

    def _output(self, req: Request, *, delta: bool = False) -> RequestOutput:
        outs = []
        for seq in req.seqs:
            outs.append(CompletionOutput(
                seq.index, self.visible_text(seq), seq.output_token_ids,
                seq.cumulative_logprob if seq.params.logprobs is not None else None,
                list(seq.logprobs) if seq.params.logprobs is not None else None, seq.finish_reason, seq.stop_reason))
        if req.finished:
            self.requests.pop(req.request_id, None)
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, req.finished,
                             req.seqs[0].num_cached_tokens, req.metrics)

    @staticmethod
    def visible_text(seq: Sequence) -> str:
        """Text safe to show now: while running, hold back a tail that could still grow into a stop string."""
        if seq.is_finished or not seq.params.stop:
            return seq.text
        hold = max(map(len, seq.params.stop)) - 1
        return seq.text[:len(seq.text) - hold] if hold else seq.text

    # ---- introspection -------------------------------------------------------------------------------------
    def stats(self) -> dict:
        bm = self.block_manager
        return {"num_requests_running": len(self.scheduler.running), "num_requests_waiting": len(self.scheduler.waiting),
                "kv_cache_usage_perc": bm.usage(), "prefix_cache_queries": bm.prefix_queries,
                "prefix_cache_hits": bm.prefix_hits, "num_preemptions": self.scheduler.num_preemptions,
                "prompt_tokens": self.num_prompt_tokens, "generation_tokens": self.num_generated_tokens,
                "spec_decode_num_draft_tokens": self.spec_proposed,
                "spec_decode_num_accepted_tokens": self.spec_accepted}

    @property
    def spec_acceptance_rate(self) -> float | None:
        return self.spec_accepted / self.spec_proposed if self.spec_proposed else None


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)
