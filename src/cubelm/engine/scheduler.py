"""Continuous batching with chunked prefill: one token budget per step, shared by decodes, prompt chunks and
speculative drafts.

Each step first gives every running sequence what it needs (one token for a decode; the next chunk for a prompt
still being prefilled), oldest first, then admits waiting sequences first-come-first-served with whatever budget
is left, splitting long prompts into chunks. So a long prompt never stalls running decodes: they are served
before it in every step. When the KV pool runs out, the youngest running sequence is preempted by recompute
(blocks freed, re-queued at the head of the waiting queue, recomputed later from its prompt + output); a step
that preempted admits nobody.

Speculative decoding (vLLM's lookahead slots): a true decode (its only uncomputed token is the last sampled one)
also gets up to ``lookahead(seq)`` slots for draft tokens, charged to the budget and reserved in the block manager
like any other growth, so drafts can neither overrun the budget nor the pool; the proposer fills at most that
many. A chunk of a sequence that is still recomputing is never a decode, even when it is one token long.

Multi-LoRA (``max_loras``): the running sequences never use more than ``max_loras`` distinct adapters (the slots
the layers hold), so every step, whatever part of the running set it serves, finds its adapters a slot. A waiting
sequence of another adapter waits while the slots are taken; sequences behind it whose adapter is already running
(or the base model) are admitted past it, as vLLM does, rather than leaving the batch half empty.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from cubelm.engine.block_manager import BlockManager
from cubelm.engine.sequence import Sequence, Status


@dataclass(slots=True)
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    num_lookahead_tokens: list[int] = field(default_factory=list)  # slots reserved for drafts, not yet proposed
    preempted: list[Sequence] = field(default_factory=list)

    def add(self, seq: Sequence, n: int, num_lookahead: int = 0) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(n)
        self.num_lookahead_tokens.append(num_lookahead)

    def drop(self, rows) -> None:
        """Take rows out of the batch (their requests failed before the forward)."""
        keep = [i for i in range(len(self.seqs)) if i not in rows]
        self.seqs = [self.seqs[i] for i in keep]
        self.num_new_tokens = [self.num_new_tokens[i] for i in keep]
        self.num_lookahead_tokens = [self.num_lookahead_tokens[i] for i in keep]

    @property
    def num_tokens(self) -> int:
        """What the step charges to the token budget: new tokens plus the reserved lookahead."""
        return sum(self.num_new_tokens) + sum(self.num_lookahead_tokens)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 lookahead: Callable[[Sequence], int] | None = None, max_loras: int | None = None):
        self.block_manager = block_manager
        self.max_loras = max_loras  # distinct adapters among the running sequences at most (None: no adapters)
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.lookahead = lookahead  # speculative decoding: how many drafts a decode of this sequence may verify
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order (a preempted sequence re-enters at the end)
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self._schedule_running(batch, self.max_num_batched_tokens)
        if not batch.preempted:  # the pool is short: admitting now would re-admit the victim and drop its K/V
            self._schedule_waiting(batch, budget)
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.num_uncomputed_tokens, budget)
            # drafts may not take the token a later running sequence needs to advance this step
            num_later = len(self.running) - self.running.index(seq) - 1
            k = self._reserve(seq, n, self._num_lookahead(seq, n, budget - n - num_later), batch)
            if k is not None:
                batch.add(seq, n, k)
                budget -= n + k
        return budget

    def _num_lookahead(self, seq: Sequence, n: int, spare: int) -> int:
        if self.lookahead is None or n != 1 or seq.num_uncomputed_tokens != 1:
            return 0
        return max(0, min(self.lookahead(seq), spare))

    def _reserve(self, seq: Sequence, n: int, k: int, batch: ScheduledBatch) -> int | None:
        """Slots for ``n`` new tokens and up to ``k`` lookahead ones, preempting the youngest unscheduled sequences
        while the pool is short. Drafts are optional: the sequence gives up lookahead rather than preempting
        itself. Returns the lookahead granted, or None if the sequence itself was preempted."""
        while not self.block_manager.can_append(seq, n + k):
            victim = self._youngest_unscheduled(batch, exclude=seq)
            if victim is not None:
                self._preempt(victim, batch)
            elif k > 0:
                k -= 1
            else:
                self._preempt(seq, batch)
                return None
        self.block_manager.append(seq, n + k)
        return k

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        skipped: list[Sequence] = []
        loras = {s.lora_id for s in self.running if s.lora_id} if self.max_loras is not None else set()
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting.popleft()
            if not seq.ready() or self._no_lora_slot(seq, loras):
                skipped.append(seq)
                continue
            if not seq.block_table:
                self.block_manager.allocate_prefix(seq)
            n = min(seq.num_uncomputed_tokens, budget)
            if not self.block_manager.can_append(seq, n):
                self.block_manager.free_seq(seq)  # give back the prefix hits; retry next step (FCFS: nobody overtakes)
                self.waiting.appendleft(seq)
                break
            self.block_manager.append(seq, n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            if seq.lora_id:
                loras.add(seq.lora_id)
            batch.add(seq, n)
            budget -= n
        self.waiting.extendleft(reversed(skipped))

    def _no_lora_slot(self, seq: Sequence, loras: set[int]) -> bool:
        return (self.max_loras is not None and seq.lora_id != 0 and seq.lora_id not in loras
                and len(loras) >= self.max_loras)

    def _youngest_unscheduled(self, batch: ScheduledBatch, exclude: Sequence) -> Sequence | None:
        scheduled = set(map(id, batch.seqs))
        for seq in reversed(self.running):
            if seq is not exclude and id(seq) not in scheduled and seq.status is Status.RUNNING:
                return seq
        return None

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.block_manager.free_seq(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        batch.preempted.append(seq)

    def finish(self, seq: Sequence, reason: str, stop_reason=None) -> None:
        """Mark finished and free its blocks (also used for aborts, from either queue)."""
        if seq.is_finished:
            return
        seq.status, seq.finish_reason, seq.stop_reason = Status.FINISHED, reason, stop_reason
        self.block_manager.free_seq(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
