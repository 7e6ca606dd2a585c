"""``LLMEngine``: requests in, tokens out, one ``step()`` at a time (schedule -> run -> sample -> postprocess).

    engine = LLMEngine.from_model_dir("model/", EngineConfig(kv_cache_memory="1GiB"))
    engine.add_request("r1", "def fibonacci(n):", SamplingParams(max_tokens=64))
    while engine.has_unfinished_requests():
        for out in engine.step(): ...

The offline ``LLM`` and the async server loop are thin layers over this class.

Fault isolation: one request must never hurt another. An exception while post-processing one sequence (sampling,
detokenizing, stop checks) fails that request only (``finish_reason`` "error", ``RequestOutput.error`` set, its
blocks freed). A failed model forward cannot be pinned on one request, so it fails the requests of that batch and
the engine goes on; only ``MAX_FAILED_STEPS`` failed forwards in a row mean the engine itself is broken
(``EngineBroken``), which the async loop reports so that the server turns unhealthy.

Multi-LoRA (``enable_lora``): a request may name an adapter (``lora_request``); rows of different adapters and of
the base model run in the same step (``cubelm.engine.lora``). An adapter that cannot be re-read when its turn
comes fails its own requests before the forward; the rest of the batch runs.
"""

from __future__ import annotations

import logging
import sys
import time

import torch

from cubelm.engine.block_manager import BlockManager
from cubelm.engine.config import EngineConfig, plan_pool
from cubelm.engine.detokenize import IncrementalDetokenizer
from cubelm.engine.outputs import Request, RequestMetrics, RequestOutput
from cubelm.engine.params import SamplingParams
from cubelm.engine.runner import ModelRunner
from cubelm.engine.sampler import sample_batch
from cubelm.engine.scheduler import Scheduler
from cubelm.engine.sequence import Sequence
from cubelm.errors import CubelmError

log = logging.getLogger("cubelm.engine")
MAX_FAILED_STEPS = 3


class EngineBroken(RuntimeError):
    """Model forwards keep failing whatever the batch: the engine cannot serve anything any more."""


class LLMEngine:
    def __init__(self, model, tokenizer, config: EngineConfig | None = None, *, log=None, draft_model=None):
        self.config = config = config or EngineConfig()
        cfg = model.config
        self.max_model_len = min(config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        if config.quantization is not None:  # before the decode layout, which then leaves the quantized ones alone
            from cubelm.compress.quantized_linear import apply_weight_quantization
            apply_weight_quantization(model, config.quantization, config.quantization_group_size,
                                      include_head=config.quantize_head)
        self.pool = plan_pool(cfg, config, next(model.parameters()), self.max_model_len)
        if config.decode_layout:  # NOTE: in place: the engine owns the model it is given (inference only from now)
            from cubelm.engine.decode_layout import apply_decode_layout
            apply_decode_layout(model)
            if draft_model is not None:
                apply_decode_layout(draft_model)
        self.lora_manager = None
        if config.enable_lora:  # after the decode layout: the adapters wrap the blocked and fused projections
            from cubelm.engine.lora.manager import build_lora_manager
            self.lora_manager = build_lora_manager(model, config)
        self.model, self.tokenizer = model.eval(), tokenizer
        (log or _stderr)(self.pool.describe())
        self.block_manager = BlockManager(self.pool.num_blocks, config.block_size,
                                          enable_prefix_caching=config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=config.max_num_batched_tokens,
                                   lookahead=self._num_draft_tokens if config.speculative is not None else None,
                                   max_loras=config.max_loras if config.enable_lora else None)
        self.runner = ModelRunner(model, self.pool.num_blocks, config.block_size, compile_model=config.compile_decode,
                                  lora_context=self.lora_manager.context if self.lora_manager else None,
                                  native_step=config.native_step, kv_cache_dtype=config.kv_cache_dtype)
        # from_model_dir sets generation_config.json's list; built directly: config.json's plus the tokenizer's
        tok_eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_token_ids = frozenset(cfg.eos_token_ids) | ({tok_eos} if tok_eos is not None else set())
        self.requests: dict[str, Request] = {}
        self.generator = torch.Generator(device=self.runner.device).manual_seed(config.seed)
        self.num_generated_tokens = self.num_prompt_tokens = 0
        self.num_failed_steps = 0  # model forwards failed in a row
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
                             self.generator, kv_cache_dtype=self.config.kv_cache_dtype)

    @classmethod
    def from_model_dir(cls, model_dir, config: EngineConfig | None = None, *, device="cpu", dtype="auto", log=None):
        from cubelm.data.tokenizer import load_tokenizer
        from cubelm.model.hf_io import inference_dtype, load_model, stop_token_ids
        tokenizer = load_tokenizer(model_dir)
        dtype = inference_dtype(dtype, device)  # auto: bf16 where the CPU has bf16 instructions
        engine = cls(load_model(model_dir, device=device, dtype=dtype), tokenizer, config, log=log)
        engine.eos_token_ids = frozenset(stop_token_ids(model_dir, tokenizer.eos_token_id))
        return engine

    # ---- requests ------------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    lora_request=None) -> Request:
        """``lora_request``: a ``LoRARequest`` (or an adapter the server resolved), None for the base model."""
        params = params or SamplingParams()
        if request_id in self.requests:
            raise CubelmError(f"request id {request_id!r} is already in use")
        adapter = self._adapter(lora_request)
        text, ids = ((prompt, self.tokenizer.encode(prompt, add_special_tokens=True)) if isinstance(prompt, str)
                     else (None, list(prompt)))
        self._validate(ids, params)
        seqs = []
        for i in range(params.n):
            seq = Sequence(request_id, i, ids, params, self.eos_token_ids, parent=seqs[0] if seqs else None,
                           lora=adapter)
            if params.seed is not None:
                seq.generator = torch.Generator(device=self.runner.device).manual_seed(params.seed_for(i))
            if self.tokenizer is not None:
                seq.detok = IncrementalDetokenizer.for_tokenizer(self.tokenizer, ids,
                                                                 skip_special_tokens=params.skip_special_tokens)
            seqs.append(seq)
            self.scheduler.add(seq)
        req = Request(request_id, text, ids, params, seqs, RequestMetrics(time.monotonic()))
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

    def _adapter(self, lora_request):
        if lora_request is None:
            return None
        if self.lora_manager is None:
            raise CubelmError("this engine serves no adapters: create it with enable_lora=True (cubelm serve: "
                              "--lora-modules or --enable-runtime-lora)")
        return self.lora_manager.resolve(lora_request)

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
        touched: dict[str, Request] = {}
        lora_slots = self._lora_slots(batch, touched) if self.lora_manager is not None else None
        if not batch:
            return self._outputs(touched)
        try:
            spec = self._propose(batch) if self.proposer is not None else {}
            logits, offsets = self.runner.run(batch.seqs, batch.num_new_tokens, full=frozenset(spec),
                                              lora_slots=lora_slots)
        except Exception as e:  # noqa: BLE001 - not attributable to one request: fail this batch, keep the rest
            self._forward_failed(e)
            for seq in batch.seqs:
                self._fail(seq.request_id, e, touched)
            return self._outputs(touched)
        self.num_failed_steps = 0
        now = time.monotonic()
        to_sample, rows = [], []
        for row, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            req = touched[seq.request_id] = self.requests.get(seq.request_id)
            if req is None or seq.is_finished:  # aborted, or its request failed earlier in this step
                continue
            try:
                if row in spec:
                    self._verify(seq, *spec[row], logits[offsets[row]:offsets[row] + n], now)
                    continue
                seq.num_computed_tokens += n
                self.block_manager.commit(seq)
            except Exception as e:  # noqa: BLE001 - this request's problem only
                self._fail(seq.request_id, e, touched)
                continue
            if seq.num_computed_tokens == seq.num_tokens:
                to_sample.append(seq)
                rows.append(offsets[row])
        for seq, token, lp in self._sample(logits, rows, to_sample, touched):
            if seq.is_finished:  # a sibling (n > 1) failed its request a moment ago
                continue
            try:
                self._append_token(seq, token, lp, now)
            except Exception as e:  # noqa: BLE001
                self._fail(seq.request_id, e, touched)
        for req in touched.values():
            if req is not None and req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
        return self._outputs(touched)

    def _lora_slots(self, batch, touched: dict) -> list[int]:
        """Each row's adapter slot; rows whose adapter cannot be loaded fail their requests and leave the batch."""
        slots, failed = self.lora_manager.activate([seq.lora for seq in batch.seqs])
        for row, error in failed.items():
            self._fail(batch.seqs[row].request_id, error, touched)
        batch.drop(failed)
        return [slot for row, slot in enumerate(slots) if row not in failed]

    def _sample(self, logits, rows: list[int], seqs: list[Sequence], touched: dict):
        """(seq, token, logprob) for each sequence to sample. One vectorized call; if it raises, row by row so
        only the requests whose rows fail are failed."""
        if not seqs:
            return []
        try:
            return list(zip(seqs, *sample_batch(logits[rows], seqs, self.generator)))
        except Exception:  # noqa: BLE001 - find the culprit rows below
            pass
        out = []
        for row, seq in zip(rows, seqs):
            try:
                tokens, lps = sample_batch(logits[row:row + 1], [seq], self.generator)
                out.append((seq, tokens[0], lps[0]))
            except Exception as e:  # noqa: BLE001
                self._fail(seq.request_id, e, touched)
        return out

    def _forward_failed(self, error: Exception) -> None:
        self.num_failed_steps += 1
        log.error("model forward failed (%d in a row); failing the batch's requests", self.num_failed_steps,
                  exc_info=error)
        if self.num_failed_steps >= MAX_FAILED_STEPS:
            raise EngineBroken(f"{self.num_failed_steps} model forwards failed in a row; last: "
                               f"{type(error).__name__}: {error}") from error

    def _fail(self, request_id: str, error: Exception, touched: dict) -> None:
        """End every sequence of the request with finish_reason "error" and free its blocks."""
        req = self.requests.get(request_id)
        if req is None:
            return
        if req.error is None:
            log.error("request %s failed: %s: %s", request_id, type(error).__name__, error, exc_info=error)
            req.error = f"{type(error).__name__}: {error}"
        for seq in req.seqs:
            self._finish(seq, "error")
        touched[request_id] = req

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
            if not self._flush_text(seq):
                self._finish(seq, "stop", stop_reason)
            return
        seq.token_ids.append(token)
        if lp is not None:
            seq.logprobs.append(lp)
            seq.cumulative_logprob += lp.logprob
        if seq.detok is not None:
            before = len(seq.pending_text)
            seq.pending_text += seq.detok.add(token)
            if p.stop and self._check_stop_strings(seq, before):
                return
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            if not self._flush_text(seq):
                self._finish(seq, "length")

    def _flush_text(self, seq: Sequence) -> bool:
        """At the end, the text the detokenizer held back (an unfinished character) joins; True if it completed a
        stop string (which finishes the sequence)."""
        if seq.detok is None:
            return False
        before = len(seq.pending_text)
        seq.pending_text += seq.detok.flush()
        return bool(seq.params.stop) and len(seq.pending_text) > before and self._check_stop_strings(seq, before)

    def _check_stop_strings(self, seq: Sequence, before: int) -> bool:
        """Search the pending text only: released text is at least (longest stop - 1) characters behind the end,
        so no stop string can start in it."""
        longest = max(map(len, seq.params.stop))
        start = max(0, before - longest + 1)  # a stop string may straddle the old/new text boundary
        hits = [(seq.pending_text.find(s, start), s) for s in seq.params.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return False
        idx, stop = min(hits)
        seq.pending_text = seq.pending_text[:idx]
        self._finish(seq, "stop", stop)
        return True

    def _finish(self, seq: Sequence, reason: str, stop_reason=None) -> None:
        if seq.is_finished:
            return
        self.scheduler.finish(seq, reason, stop_reason)
        if self.proposer is not None:
            self.proposer.forget(seq)
        req = self.requests.get(seq.request_id)
        if req is not None and req.finished:
            req.metrics.finished_time = time.monotonic()

    def _outputs(self, touched: dict[str, Request | None]) -> list[RequestOutput]:
        outs = []
        for req in touched.values():
            if req is None:
                continue
            for seq in req.seqs:  # running: hold back a tail that could still grow into a stop string
                seq.release_text(0 if seq.is_finished or not seq.params.stop else max(map(len, seq.params.stop)) - 1)
            if req.finished or (req.params.output_kind == "delta" and any(
                    s.num_output_tokens > s.num_emitted_tokens or len(s.text_chunks) > s.num_emitted_chunks
                    for s in req.seqs)):
                outs.append(req.output())
            if req.finished:
                self.requests.pop(req.request_id, None)
        return outs

    # ---- introspection -------------------------------------------------------------------------------------
    def stats(self) -> dict:
        bm, sched = self.block_manager, self.scheduler
        return {"num_requests_running": len(sched.running), "num_requests_waiting": len(sched.waiting),
                "kv_cache_usage_perc": bm.usage(), "prefix_cache_queries": bm.prefix_queries,
                "prefix_cache_hits": bm.prefix_hits, "num_preemptions": sched.num_preemptions,
                "prompt_tokens": self.num_prompt_tokens, "generation_tokens": self.num_generated_tokens,
                "spec_decode_num_draft_tokens": self.spec_proposed,
                "spec_decode_num_accepted_tokens": self.spec_accepted}

    @property
    def spec_acceptance_rate(self) -> float | None:
        return self.spec_accepted / self.spec_proposed if self.spec_proposed else None


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)
