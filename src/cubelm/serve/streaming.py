"""Server-sent events (§6.1.5) and the OpenAI chunk shapes, plus disconnect detection for any response.

A stream is ``data: {chunk}\\n\\n`` events: for chat a first ``role`` delta per choice, then text deltas, then one
explicit chunk per choice carrying only ``finish_reason`` (so clients never have to find it inside a content
chunk), then the ``usage`` chunk (``choices: []``) when ``stream_options.include_usage`` is set, then
``data: [DONE]``. An error after the headers were sent arrives as a ``data: {"error": {...}}`` event followed by
``[DONE]``, which the ``openai`` client raises as an ``APIError``.

The engine emits deltas (new text, token ids and logprobs per step) and already holds back a tail that could
still become a stop string, so text once sent never has to be taken back.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable

from starlette.responses import StreamingResponse

DONE = "data: [DONE]\n\n"


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def wait_disconnect(receive) -> None:
    """Return once the client has gone (ASGI ``http.disconnect``); the request body must already be read."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(work: Awaitable, receive):
    """Run ``work``; if the client disconnects first, cancel it (which aborts its engine requests) and return None."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return None
    return task.result()


class SSEResponse(StreamingResponse):
    """A ``text/event-stream`` response that stops its generator as soon as the client disconnects.

    Starlette only notices a gone client when a write fails, i.e. at the next token; a request still queued
    in the engine would keep its place and later its KV blocks. Watching ``receive`` ends it at once, and the
    generator's ``finally`` aborts the engine request.
    """

    def __init__(self, content):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send) -> None:
        try:
            await until_disconnect(super().__call__(scope, _no_receive, send), receive)
        finally:
            await self.body_iterator.aclose()


async def _no_receive():
    # the parent class would listen for the disconnect itself on old ASGI versions; we already do
    await asyncio.Event().wait()


class ChoiceProgress:
    """What a stream has sent for each choice: characters (for logprob text offsets), tokens, whether it ended."""

    def __init__(self, num_choices: int):
        self.text_len = [0] * num_choices
        self.num_tokens = [0] * num_choices
        self.finished = [False] * num_choices
