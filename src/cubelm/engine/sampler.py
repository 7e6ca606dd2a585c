"""The engine's batched sampler: per-row temperature, top-k/p, min-p, penalties, seeds and logprobs.

Greedy rows take an argmax; the rest are filtered in one vectorized pass. A row with a seed samples with its own
``torch.Generator``, so a seeded request draws the same tokens whatever else shares the batch. Logprobs are
those of the raw model distribution (before temperature and penalties), as vLLM reports them by default.
Every row goes through ``cubelm.engine.sampling``'s numerically safe path, so no parameter value the API accepts
can make a row NaN and fail the whole batch.
"""

from __future__ import annotations

from collections import Counter

import torch

from cubelm.engine.sampling import finite_logits, sample_probs
from cubelm.engine.sequence import Sequence, TokenLogprob


def apply_penalties(logits: torch.Tensor, seq: Sequence) -> None:
    """In place on one row (V,). Repetition: CTRL/HF style over prompt + output; presence/frequency: OpenAI
    style over the output only."""
    p = seq.params
    if p.repetition_penalty != 1:
        ids = torch.tensor(sorted(set(seq.token_ids)), device=logits.device)
        picked = logits[ids]
        logits[ids] = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
    if p.presence_penalty or p.frequency_penalty:
        counts = Counter(seq.output_token_ids)
        if counts:
            ids = torch.tensor(list(counts), device=logits.device)
            freq = torch.tensor(list(counts.values()), dtype=logits.dtype, device=logits.device)
            logits[ids] -= p.presence_penalty + p.frequency_penalty * freq


def _suppress_stops(logits: torch.Tensor, seq: Sequence) -> None:
    if seq.num_output_tokens < seq.params.min_tokens:
        stops = set(seq.params.stop_token_ids) | (set() if seq.params.ignore_eos else set(seq.eos_token_ids))
        if stops:
            logits[list(stops)] = float("-inf")


def sample_batch(logits: torch.Tensor, seqs: list[Sequence], generator: torch.Generator | None = None
                 ) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits (B, V) -> one token id per sequence (and its logprob record when the request asked for one)."""
    logits = logits.float()
    want_logprobs = [s.params.logprobs is not None for s in seqs]
    raw = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None
    if any(s.params.has_penalties or s.params.min_tokens for s in seqs):
        logits = logits.clone()
        for row, seq in enumerate(seqs):
            apply_penalties(logits[row], seq)
            _suppress_stops(logits[row], seq)
    greedy = [i for i, s in enumerate(seqs) if s.params.greedy]
    rand = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if not rand and raw is None:  # the common all-greedy step: no row selection, one argmax, one host sync
        return finite_logits(logits).argmax(-1).tolist(), [None] * len(seqs)
    tokens = torch.empty(len(seqs), dtype=torch.long, device=logits.device)
    if greedy:
        tokens[greedy] = finite_logits(logits[greedy]).argmax(-1)
    if rand:
        tokens[rand] = _sample_rows(logits[rand], [seqs[i] for i in rand], generator)
    token_list = tokens.tolist()  # NOTE: the step's one host sync: stop checks need the ids
    records = [None] * len(seqs)
    if raw is not None:
        for row, seq in enumerate(seqs):
            if want_logprobs[row]:
                records[row] = _logprob_record(raw[row], token_list[row], seq.params.logprobs)
    return token_list, records


def _sample_rows(logits: torch.Tensor, seqs: list[Sequence], generator) -> torch.Tensor:
    dev = logits.device
    temp = torch.tensor([s.params.temperature for s in seqs], device=dev).unsqueeze(-1)
    top_k = torch.tensor([min(s.params.top_k, logits.shape[-1]) for s in seqs], device=dev)  # int64-safe
    top_p = torch.tensor([s.params.top_p for s in seqs], device=dev)
    min_p = torch.tensor([s.params.min_p for s in seqs], device=dev)
    probs = sample_probs(logits, temp, top_k, top_p, min_p)
    out = torch.empty(len(seqs), dtype=torch.long, device=dev)
    unseeded = [i for i, s in enumerate(seqs) if s.generator is None]
    if unseeded:
        out[unseeded] = torch.multinomial(probs[unseeded], 1, generator=generator).squeeze(-1)
    for i, seq in enumerate(seqs):
        if seq.generator is not None:
            out[i] = torch.multinomial(probs[i], 1, generator=seq.generator)[0]
    return out


def _logprob_record(row: torch.Tensor, token_id: int, k: int) -> TokenLogprob:
    top = {}
    if k:
        values, ids = torch.topk(row, min(k, row.shape[-1]))
        top = dict(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token_id, float(row[token_id]), top)
