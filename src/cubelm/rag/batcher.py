"""Adaptive (dynamic) batching of embedding requests (book §6.1.3; Triton's dynamic batcher, TF-Serving's).

Requests put their inputs (token ids) on one queue and wait on a future per input. A worker thread forms a batch
when ``max_batch_size`` inputs are queued or ``max_delay_ms`` has passed since the oldest queued input arrived,
runs ONE forward over it, and routes each row of the result to its input's future. The delay bounds the latency
paid for waiting; under load it is rarely paid at all, because inputs queue up while a forward runs and the next
batch is full (or due) as soon as the worker is free. ``max_delay_ms=0`` still batches whatever queued meanwhile.

Padding by length buckets: inputs fall in buckets of ``BUCKET`` tokens and a batch is padded to the bucket of its
longest input (fewer distinct shapes than every length). When a batch is formed, the oldest input always goes in
(no starvation) and the rest are taken from the nearest buckets first (arrival order within a bucket), so a deep
queue yields batches of similar lengths: on CPU an encoder is compute-bound from a few dozen tokens on, and every
pad token costs as much as a real one. NOTE: the book (§6.1.3) recommends powers of 2; that is GPU advice (tile
and warp alignment, fewer compiled shapes). Padding lengths to powers of 2 wasted up to half of each forward here
(measured: 0.64x batch-1 throughput on 5-60-word texts), and batch sizes need not be powers of 2 on CPU, where
oneDNN/MKL GEMMs handle any M; so buckets are 8 tokens wide and a batch takes what is queued. ``max_batch_tokens`` caps
inputs x padded length, which bounds a forward's memory (attention is O(T^2) per input).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from cubelm.errors import CubelmError


class QueueFull(Exception):
    """More inputs waiting than the batcher accepts (the caller answers 503)."""


@dataclass(slots=True)
class _Item:
    ids: list[int]
    prompt_length: int
    bucket: int
    seq: int  # arrival order
    enqueued: float
    future: Future = field(default_factory=Future)


@dataclass(slots=True)
class BatchInfo:
    size: int
    padded_tokens: int  # size x padded length: the compute the forward paid for
    real_tokens: int
    queue_seconds: list[float]  # per input, arrival -> forward start
    forward_seconds: float


BUCKET = 8  # tokens per length bucket


def bucket_length(n: int, max_tokens: int) -> int:
    """n rounded up to a multiple of BUCKET, capped at max_tokens (and never below n)."""
    return max(n, min(-(-n // BUCKET) * BUCKET, max_tokens))


class AdaptiveBatcher:
    """``forward(batch_ids, prompt_lengths, pad_to) -> (n, d) tensor`` batched over concurrent callers."""

    def __init__(self, forward: Callable[[list[list[int]], list[int], int], torch.Tensor], *, max_tokens: int,
                 max_batch_size: int = 32, max_delay_ms: float = 5.0, max_batch_tokens: int = 16384,
                 max_queue: int = 8192, on_batch: Callable[[BatchInfo], None] | None = None):
        if max_batch_size < 1 or max_delay_ms < 0 or max_batch_tokens < max_tokens or max_queue < 1:
            raise CubelmError(f"batcher: max_batch_size >= 1, max_delay_ms >= 0, max_batch_tokens >= the model's "
                              f"max tokens ({max_tokens}) and max_queue >= 1 are required; got {max_batch_size}, "
                              f"{max_delay_ms}, {max_batch_tokens}, {max_queue}")
        self.forward, self.max_tokens = forward, max_tokens
        self.max_batch_size, self.max_delay = max_batch_size, max_delay_ms / 1000.0
        self.max_batch_tokens, self.max_queue, self.on_batch = max_batch_tokens, max_queue, on_batch
        self.num_forwards = self.num_inputs = 0
        self._queue: list[_Item] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="cubelm-embed-batcher", daemon=True)
        self._worker.start()

    # ---- callers --------------------------------------------------------------------------------------------
    def submit(self, batch: list[list[int]], prompt_lengths: list[int] | None = None) -> list[Future]:
        """Queue inputs; one future per input, resolved with its (d,) vector. Thread-safe."""
        now = time.monotonic()
        plens = prompt_lengths or [0] * len(batch)
        with self._cv:
            if self._closed:
                raise QueueFull("the batcher is shut down")
            if len(self._queue) + len(batch) > self.max_queue:
                raise QueueFull(f"{len(self._queue)} inputs are waiting to be embedded (at most {self.max_queue})")
            items = [_Item(ids, p, bucket_length(len(ids), self.max_tokens), next(self._seq), now)
                     for ids, p in zip(batch, plens)]
            was_empty = not self._queue
            self._queue.extend(items)
            if was_empty or len(self._queue) >= self.max_batch_size:  # only then can the worker's plan change
                self._cv.notify()
        return [it.future for it in items]

    async def embed(self, batch: list[list[int]], prompt_lengths: list[int] | None = None) -> torch.Tensor:
        """The (n, d) vectors of ``batch``, awaited from asyncio (cancelling cancels the queued inputs)."""
        futures = self.submit(batch, prompt_lengths)
        try:
            rows = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        return torch.stack(rows)

    def embed_sync(self, batch: list[list[int]], prompt_lengths: list[int] | None = None) -> torch.Tensor:
        return torch.stack([f.result() for f in self.submit(batch, prompt_lengths)])

    @property
    def num_queued(self) -> int:
        return len(self._queue)

    def shutdown(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._worker.join(timeout=30)

    # ---- worker ---------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if not self._queue:  # closed and drained
                    return
                deadline = self._queue[0].enqueued + self.max_delay
                while len(self._queue) < self.max_batch_size and not self._closed:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cv.wait(remaining)
                batch = self._take()
            if batch:
                self._run_batch(batch)

    def _take(self) -> list[_Item]:
        """Remove and return the next batch (called with the lock held). Cancelled inputs are dropped."""
        self._queue = [it for it in self._queue if not it.future.cancelled()]
        if not self._queue:
            return []
        oldest = self._queue[0]
        # nearest buckets first, then arrival order
        candidates = sorted(self._queue[1:], key=lambda it: (abs(it.bucket - oldest.bucket), it.seq))
        batch, width = [oldest], oldest.bucket
        for it in candidates:
            if len(batch) >= self.max_batch_size:
                break
            w = max(width, it.bucket)
            if (len(batch) + 1) * w <= self.max_batch_tokens:
                batch.append(it)
                width = w
        chosen = {id(it) for it in batch}
        self._queue = [it for it in self._queue if id(it) not in chosen]
        return batch

    def _run_batch(self, batch: list[_Item]) -> None:
        batch = [it for it in batch if it.future.set_running_or_notify_cancel()]
        if not batch:
            return
        start = time.monotonic()
        width = max(it.bucket for it in batch)
        try:
            vectors = self.forward([it.ids for it in batch], [it.prompt_length for it in batch], width)
        except BaseException as e:  # noqa: BLE001 - the inputs' callers get the error; the worker lives on
            for it in batch:
                it.future.set_exception(e)
            return
        self.num_forwards += 1
        self.num_inputs += len(batch)
        for it, row in zip(batch, vectors):
            it.future.set_result(row)
        if self.on_batch is not None:
            self.on_batch(BatchInfo(size=len(batch), padded_tokens=len(batch) * width,
                                    real_tokens=sum(len(it.ids) for it in batch),
                                    queue_seconds=[start - it.enqueued for it in batch],
                                    forward_seconds=time.monotonic() - start))
