"""Speculative decoding (§10.9.2): a cheap proposer guesses k tokens, the target verifies them in one forward.

Proposers: ``DraftProposer`` (a smaller cubelm model with the same tokenizer; its K/V live in a second paged pool
that uses the *same* block tables and slots as the target, so no second allocator is needed) and
``NgramProposer`` (draft-free prompt lookup: find the latest earlier occurrence of the sequence's last n-gram
and propose what followed it). Drafts are only proposed into lookahead slots the scheduler reserved (counted in
the step's token budget, backed by KV blocks) for true decodes; ``num_draft_tokens`` caps how many per sequence.

Verification (Leviathan et al. 2023; Chen et al. 2023): with target distribution p and proposal distribution q,
accept draft token x with probability min(1, p(x) / q(x)); at the first rejection sample from
norm(max(0, p − q)); if all k are accepted, sample a bonus token from p. The output distribution is exactly p.
Greedy is the special case p = one-hot(argmax): accept while the draft equals the target's argmax, so greedy
speculative output equals greedy output token for token. n-gram proposals are deterministic (q is one-hot).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cubelm.engine.sampling import finite_logits, sample_probs
from cubelm.engine.sequence import Sequence
from cubelm.errors import CubelmError


@dataclass(slots=True, kw_only=True)
class SpeculativeConfig:
    method: str = "draft"  # "draft" | "ngram"
    num_speculative_tokens: int = 4
    draft_model: str | None = None  # model directory, for method "draft"
    ngram_max: int = 4
    ngram_min: int = 1

    def __post_init__(self) -> None:
        if self.method not in ("draft", "ngram"):
            raise CubelmError(f"speculative method must be 'draft' or 'ngram', got {self.method!r}")
        if self.num_speculative_tokens < 1:
            raise CubelmError(f"num_speculative_tokens must be >= 1, got {self.num_speculative_tokens}")
        if self.method == "draft" and not self.draft_model:
            raise CubelmError("speculative method 'draft' needs draft_model (a model directory)")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise CubelmError(f"need 1 <= ngram_min <= ngram_max, got {self.ngram_min}, {self.ngram_max}")


def num_draft_tokens(seq: Sequence, k: int, max_model_len: int) -> int:
    """How many drafts a decode of ``seq`` may verify: at most ``k``, never past ``max_tokens`` or the context, and
    none when the sampled token depends on per-token state the verifier does not replay (logprobs, penalties,
    ``min_tokens``) or before the first output token."""
    p = seq.params
    if seq.num_output_tokens == 0 or p.logprobs is not None or p.has_penalties or p.min_tokens:
        return 0
    return max(0, min(k, p.max_tokens - seq.num_output_tokens - 1, max_model_len - seq.num_tokens - 1))


def target_probs(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """The distribution the sampler would draw from, rows (m, V); one-hot for greedy."""
    p = seq.params
    logits = logits.float()
    if p.greedy:
        return torch.nn.functional.one_hot(finite_logits(logits).argmax(-1), logits.shape[-1]).float()
    return sample_probs(logits, p.temperature, min(p.top_k, logits.shape[-1]), p.top_p, p.min_p)


def _draw(probs: torch.Tensor, generator) -> int:
    return int(torch.multinomial(probs, 1, generator=generator)[0])


def verify(drafts: list[int], q: torch.Tensor | None, p: torch.Tensor, generator) -> tuple[int, int]:
    """Accept a prefix of ``drafts`` against target rows ``p`` (len(drafts) + 1, V); ``q`` rows are the proposal
    distributions (None = deterministic proposals). Returns (number accepted, the next token)."""
    for j, x in enumerate(drafts):
        qx = 1.0 if q is None else float(q[j, x])
        px = float(p[j, x])
        if px >= qx or (px > 0 and float(torch.rand((), generator=generator)) < px / qx):
            continue
        residual = p[j].clone()
        if q is None:
            residual[x] = 0.0
        else:
            residual = torch.clamp(residual - q[j], min=0.0)
        if float(residual.sum()) <= 0:  # p == q numerically: any draw from p is exact
            residual = p[j]
        return j, _draw(residual / residual.sum(), generator)
    return len(drafts), _draw(p[len(drafts)], generator)


class NgramProposer:
    def __init__(self, config: SpeculativeConfig):
        self.config = config

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[tuple[list[int], torch.Tensor | None]]:
        return [(self._lookup(s.token_ids, k), None) for s, k in zip(seqs, ks)]

    def _lookup(self, tokens: list[int], k: int) -> list[int]:
        for n in range(self.config.ngram_max, self.config.ngram_min - 1, -1):
            if len(tokens) <= n:
                continue
            tail = tokens[-n:]
            for start in range(len(tokens) - n - 1, -1, -1):  # the latest earlier occurrence
                if tokens[start:start + n] == tail:
                    return tokens[start + n:start + n + k]
        return []

    def forget(self, seq: Sequence) -> None:
        pass


class DraftProposer:
    def __init__(self, draft_model, target_config, num_blocks: int, block_size: int, generator, *,
                 kv_cache_dtype: str = "auto"):
        from cubelm.engine.runner import ModelRunner
        if draft_model.config.vocab_size != target_config.vocab_size:
            raise CubelmError(f"draft vocabulary {draft_model.config.vocab_size} differs from the target's "
                              f"{target_config.vocab_size}; the draft must share the tokenizer")
        # the draft's pool mirrors the target's block ids (same tables), in the same storage format
        self.runner = ModelRunner(draft_model, num_blocks, block_size, kv_cache_dtype=kv_cache_dtype)
        self.generator = generator
        self.computed: dict[int, tuple[int, int]] = {}  # id(seq) -> (num_preemptions seen, draft tokens computed)

    def forget(self, seq: Sequence) -> None:
        self.computed.pop(id(seq), None)

    def _start(self, seq: Sequence) -> int:
        seen, done = self.computed.get(id(seq), (seq.num_preemptions, 0))
        return done if seen == seq.num_preemptions else 0  # preempted: its blocks (and our K/V) are gone

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[tuple[list[int], torch.Tensor | None]]:
        drafts = [[] for _ in seqs]
        probs = [[] for _ in seqs]
        starts = [self._start(s) for s in seqs]
        active = [i for i, k in enumerate(ks) if k > 0]
        tokens = {i: list(seqs[i].token_ids) for i in active}
        for _ in range(max(ks, default=0)):
            active = [i for i in active if len(drafts[i]) < ks[i]]
            if not active:
                break
            views = [_View(seqs[i], tokens[i]) for i in active]
            num_new = [len(tokens[i]) - starts[i] for i in active]
            logits, offsets = self.runner.run(views, num_new, starts=[starts[i] for i in active])
            for row, i in enumerate(active):
                q = target_probs(logits[offsets[row]:offsets[row] + 1], seqs[i])[0]
                x = int(q.argmax()) if seqs[i].params.greedy else _draw(q, seqs[i].generator or self.generator)
                starts[i] = len(tokens[i])
                tokens[i].append(x)
                drafts[i].append(x)
                probs[i].append(q)
        for i, seq in enumerate(seqs):
            self.computed[id(seq)] = (seq.num_preemptions, starts[i])
        return [(d, torch.stack(p) if p and not s.params.greedy else None) for d, p, s in zip(drafts, probs, seqs)]

    def rollback(self, seq: Sequence, valid: int) -> None:
        seen, done = self.computed.get(id(seq), (seq.num_preemptions, 0))
        self.computed[id(seq)] = (seen, min(done, valid))


@dataclass(slots=True)
class _View:
    """A sequence seen with tentative extra tokens (the draft's own proposals), sharing its block table."""
    seq: Sequence
    token_ids: list[int]

    @property
    def block_table(self) -> list[int]:
        return self.seq.block_table
