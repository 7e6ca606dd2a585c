"""Running the app under uvicorn with a graceful drain on SIGTERM (what Kubernetes sends before it kills a pod).

uvicorn on its own closes the listening socket at the first SIGTERM, so ``/ready`` could never say 503, and it
re-raises the signal on exit, so the process ends with -15 instead of 0. Here the first SIGTERM (or Ctrl-C) starts
a drain instead: ``/ready`` answers 503 so the load balancer stops sending traffic, new work gets 503, in-flight
requests run to completion for up to ``--shutdown-timeout`` seconds (the rest end with a clear error), then uvicorn
shuts down normally and the process exits 0. A second Ctrl-C forces the exit. When the engine loop dies, the
same drain starts by itself (its streams have already failed, so it is quick) and ``cubelm serve`` exits 1.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import uvicorn

ENGINE_FAILURE_GRACE_S = 2.0


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state, shutdown_timeout: float):
        super().__init__(config)
        self.state, self.shutdown_timeout = state, shutdown_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Future | None = None

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        # NOTE: runs as a signal handler; it only schedules work on the loop. Not recording the signal in
        # self._captured_signals keeps uvicorn from re-raising it at exit (which would make the exit code -15).
        if self._loop is None or self.should_exit:
            self.force_exit = self.should_exit = True
        elif self._drain_task is None:
            self._loop.call_soon_threadsafe(self._start_drain, signal.Signals(sig).name)
        elif sig == signal.SIGINT:
            self.force_exit = self.should_exit = True

    def _start_drain(self, name: str) -> None:
        if self._drain_task is None:
            print(f"[cubelm] {name}: draining {self.state.in_flight} in-flight request(s) for up to "
                  f"{self.shutdown_timeout:g} s; /ready now answers 503", file=sys.stderr, flush=True)
            self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        await self.state.drain(self.shutdown_timeout)
        if self.state.engine_error is not None:
            # keep answering 503 (with Retry-After) a moment, so readiness probes and clients see a clear refusal
            # and the load balancer drops this pod before its connections start being refused
            await asyncio.sleep(min(self.shutdown_timeout, ENGINE_FAILURE_GRACE_S))
        print("[cubelm] drained; shutting down", file=sys.stderr, flush=True)
        self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.state.load_error is not None:
            return True
        if self.state.engine_error is not None and self._drain_task is None:
            self._start_drain("engine failure")
        return await super().on_tick(counter)
