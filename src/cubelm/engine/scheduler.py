"""Continuous batching with chunked prefill: one token budget per step, shared by decodes and prompt chunks.

Each step first gives every running sequence what it needs (one token for a decode; the next chunk for a prompt
still being prefilled), oldest first, then admits waiting sequences first-come-first-served with whatever budget
is left, splitting long prompts into chunks. So a long prompt never stalls running decodes: they are served
before it in every step. When the KV pool runs out, the youngest running sequence is preempted by recompute
(blocks freed, re-queued at the head of the waiting queue, recomputed later from its prompt + output).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from cubelm.engine.block_manager import BlockManager
from cubelm.engine.sequence import Sequence, Status


@dataclass(slots=True)
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    def add(self, seq: Sequence, n: int) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(n)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in arrival order
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self._schedule_running(batch, self.max_num_batched_tokens)
        self._schedule_waiting(batch, budget)
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.num_uncomputed_tokens, budget)
            while not self.block_manager.can_append(seq, n):
                victim = self._youngest_unscheduled(batch, exclude=seq)
                self._preempt(victim or seq, batch)
                if victim is None:
                    break
            if seq.status is Status.RUNNING:
                self.block_manager.append(seq, n)
                batch.add(seq, n)
                budget -= n
        return budget

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        skipped: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting.popleft()
            if not seq.ready():
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
            batch.add(seq, n)
            budget -= n
        self.waiting.extendleft(reversed(skipped))

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
