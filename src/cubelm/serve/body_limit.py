"""A request-body size limit (413) in front of the app, so no client can make the server parse gigabytes.

A declared ``Content-Length`` over the limit is refused before any byte of the body is read. A body without one
(chunked transfer) is read up to the limit, then refused, or replayed to the app; after the replay, ``receive``
is the client's own again, so disconnect detection keeps working.
"""

from __future__ import annotations

import json

from cubelm.serve.errors import error_body


class BodyLimit:
    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit() or int(declared) > self.max_bytes:
                return await self._refuse(scope, send)
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before sending its body
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(scope, send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope, send) -> None:
        message = f"the request body is larger than this server's limit of {self.max_bytes:,} bytes " \
                  f"(--max-request-bytes)"
        v2 = scope["path"] == "/v2" or scope["path"].startswith("/v2/")  # KServe V2's error shape
        body = json.dumps({"error": message} if v2 else error_body(message, "invalid_request_error",
                                                                   code="request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
