"""``AsyncLLM``: the engine in a background thread, with an asyncio interface (submit, stream, abort).

One thread owns the engine: it applies queued submissions and aborts between steps, runs ``step()`` while work
exists, and hands each request's outputs to that request's asyncio queue on the caller's event loop. A client that
stops iterating (disconnect, cancellation) aborts its request, which frees its KV blocks at the next step
boundary. ``max_batch_delay_ms`` is the adaptive batcher's knob (§6.1.3): when the engine is idle and a request
arrives, wait up to that long for more arrivals before the first step, trading a little latency for bigger batches.

A request the engine failed raises ``RequestFailed`` to its client only. If the loop itself dies (a bug, or
``EngineBroken``), the error and its traceback are logged, every open stream gets ``EngineDead``, every later
``submit`` raises ``EngineDead`` at once (nobody waits on a dead thread), and ``error`` tells the server to report
unhealthy and exit for its supervisor to restart it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator

from cubelm.engine.llm_engine import LLMEngine
from cubelm.engine.outputs import RequestOutput
from cubelm.engine.params import SamplingParams
from cubelm.errors import CubelmError

log = logging.getLogger("cubelm.engine")


class AsyncLLM:
    def __init__(self, engine: LLMEngine, *, max_batch_delay_ms: float = 0.0, max_waiting: int | None = None):
        self.engine = engine
        self.max_batch_delay = max_batch_delay_ms / 1000
        self.max_waiting = max_waiting
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._wake = threading.Event()
        self._stop = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="cubelm-engine", daemon=True)
        self._thread.start()

    # ---- client side (event loop) ----------------------------------------------------------------------------
    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None, lora_request=None) -> AsyncIterator[RequestOutput]:
        """Yield ``RequestOutput``s (deltas or one final, per ``params.output_kind``) until finished. Leaving the
        loop early aborts the request."""
        request_id = request_id or f"req-{next(self._ids)}"
        stream = self.submit(prompt, params, request_id, lora_request=lora_request)
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            if request_id in self._streams:  # not finished: the client went away
                self.abort(request_id)

    def submit(self, prompt, params, request_id: str, lora_request=None) -> asyncio.Queue:
        if self.error is not None:
            raise EngineDead(f"the engine failed ({type(self.error).__name__}: {self.error}); this server "
                             f"accepts no more requests and is restarting")
        if self._stop:
            raise CubelmError("the engine is shutting down")
        if self.max_waiting is not None and len(self._streams) >= self.max_waiting:
            raise QueueFull(f"{len(self._streams)} requests in flight; the admission limit is {self.max_waiting}")
        # Validate here, in the caller, so bad input raises to the client instead of inside the engine thread.
        self.engine_validate(prompt, params or SamplingParams())
        if lora_request is not None:  # resolved (registered, read) here too: a bad adapter raises to this caller
            lora_request = self.engine._adapter(lora_request)
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        if self.error is not None:  # died between the check above and now: its sweep may have missed this stream
            self._streams.pop(request_id, None)
            raise EngineDead(f"the engine failed ({type(self.error).__name__}: {self.error})")
        self._commands.put(("add", request_id, prompt, params, lora_request))
        self._wake.set()
        return stream

    def engine_validate(self, prompt, params: SamplingParams) -> list[int]:
        if isinstance(prompt, str):
            prompt = self.engine.tokenizer.encode(prompt, add_special_tokens=True)
        ids = list(prompt)
        self.engine._validate(ids, params)
        return ids

    def abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self._commands.put(("abort", request_id))
        self._wake.set()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)

    # ---- engine side (thread) --------------------------------------------------------------------------------
    def _apply_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, request_id, prompt, params, lora_request = cmd
                if request_id not in self._streams:
                    continue  # aborted before it was admitted
                try:
                    self.engine.add_request(request_id, prompt, params, lora_request=lora_request)
                except Exception as e:  # noqa: BLE001 - delivered to the client that sent it
                    self._deliver(request_id, e, final=True)
            else:
                self.engine.abort_request(cmd[1])

    def _loop(self) -> None:
        try:
            while not self._stop:
                was_idle = not self.engine.has_unfinished_requests()
                self._apply_commands()
                if not self.engine.has_unfinished_requests():
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                if was_idle and self.max_batch_delay:
                    time.sleep(self.max_batch_delay)  # gather more arrivals into the first batch
                    self._apply_commands()
                for out in self.engine.step():
                    item = RequestFailed(f"generation failed: {out.error}") if out.error else out
                    self._deliver(out.request_id, item, final=out.finished)
        except BaseException as e:  # the engine is broken: fail every open stream rather than hang it
            log.critical("the engine loop died: %s: %s", type(e).__name__, e, exc_info=e)
            self.error = e
            for request_id in list(self._streams):
                self._deliver(request_id, EngineDead(f"the engine failed: {type(e).__name__}: {e}"), final=True)

    def _deliver(self, request_id: str, item, final: bool) -> None:
        entry = self._streams.get(request_id)
        if entry is None:
            return
        if final:
            self._streams.pop(request_id, None)
        loop, stream = entry
        try:
            loop.call_soon_threadsafe(stream.put_nowait, item)
        except RuntimeError:  # the client's loop is closed
            pass


class QueueFull(CubelmError):
    """Too many requests in flight (the server answers 503)."""


class RequestFailed(RuntimeError):
    """The engine failed this request (and only this one); the message says why."""


class EngineDead(RuntimeError):
    """The engine loop has died; no request can be served (the server answers 503 and restarts)."""
