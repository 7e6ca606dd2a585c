"""The router's HTTP client for one upstream service of the inference graph (§6.2.4): the encoder or the LLM.

Every call goes through ``Upstream.send``, which

- retries only when the request cannot have reached the service (connection refused or connect timeout: a pod
  restarting, a Service with no ready endpoint yet), with a short exponential backoff; a POST that reached the
  service is never sent twice (generation is not idempotent, and a retry would double the load on a slow LLM);
- turns every failure into the ``APIError`` the router answers with, in OpenAI's shape: the service unreachable
  -> 502, its time limit -> 504, its own 503 (loading, draining, queue full) -> 503 with its ``Retry-After``,
  another 5xx -> 502, a 4xx (the request itself is wrong: a context too long, a bad sampling field) -> the
  same status and the service's own message;
- records the hop's latency and outcome in the router's metrics, so that ``/metrics`` shows where the time goes.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx

from cubelm.serve.errors import APIError

RETRY_BACKOFF_S = 0.1  # first wait; doubled per retry


class Upstream:
    def __init__(self, name: str, url: str, *, api_key: str | None, timeout: float, connect_timeout: float,
                 retries: int, metrics, transport: httpx.AsyncBaseTransport | None = None):
        self.name, self.url, self.api_key = name, url.rstrip("/"), api_key
        self.retries, self.metrics = retries, metrics
        # NOTE: no read timeout on a stream's body beyond `timeout` per read: a long generation keeps sending
        self.client = httpx.AsyncClient(base_url=self.url, timeout=httpx.Timeout(timeout, connect=connect_timeout),
                                        limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
                                        transport=transport)  # a test's MockTransport; None = the network

    async def aclose(self) -> None:
        await self.client.aclose()

    def headers(self, forwarded_auth: str | None) -> dict[str, str]:
        """``--*-api-key`` when given, else the client's own ``Authorization`` passed through."""
        if self.api_key:
            return {"Authorization": f"Bearer {self.api_key}"}
        return {"Authorization": forwarded_auth} if forwarded_auth else {}

    async def send(self, method: str, path: str, *, hop: str, json_body=None, auth: str | None = None,
                   stream: bool = False) -> httpx.Response:
        """The service's response with a 2xx status (a stream's body still unread: the caller closes it), or an
        ``APIError``. The hop's latency is recorded here for a non-streamed call (the caller records a stream's)."""
        request = self.client.build_request(method, path, json=json_body, headers=self.headers(auth))
        started = time.monotonic()
        for attempt in range(self.retries + 1):
            try:
                response = await self.client.send(request, stream=stream)
                break
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                if attempt < self.retries:
                    self.metrics.retry(hop)
                    await asyncio.sleep(RETRY_BACKOFF_S * 2**attempt)
                    continue
                self.metrics.hop_done(hop, "unreachable", time.monotonic() - started)
                raise APIError(502, f"the {self.name} service at {self.url} is unreachable ({_reason(e)}) after "
                                    f"{self.retries + 1} attempts", type="server_error",
                               code="upstream_unreachable") from None
            except httpx.TimeoutException as e:
                self.metrics.hop_done(hop, "timeout", time.monotonic() - started)
                raise APIError(504, f"the {self.name} service at {self.url} did not answer in time "
                                    f"({type(e).__name__})", type="server_error", code="upstream_timeout") from None
            except httpx.HTTPError as e:
                self.metrics.hop_done(hop, "error", time.monotonic() - started)
                raise APIError(502, f"the {self.name} service at {self.url} failed: {_reason(e)}",
                               type="server_error", code="upstream_error") from None
        if response.status_code >= 400:
            body = await response.aread()
            await response.aclose()
            self.metrics.hop_done(hop, "error", time.monotonic() - started)
            raise self.relay_error(response.status_code, body, response.headers)
        if not stream:
            self.metrics.hop_done(hop, "ok", time.monotonic() - started)
        return response

    def relay_error(self, status: int, body: bytes, headers) -> APIError:
        message = _error_message(body) or body[:200].decode("utf-8", "replace") or "no body"
        where = f"the {self.name} service answered {status}: {message}"
        if status == 503:
            retry = headers.get("retry-after")
            return APIError(503, where, type="server_unavailable", code="upstream_unavailable",
                            headers={"Retry-After": retry} if retry else None)
        if status >= 500:
            return APIError(502, where, type="server_error", code="upstream_error")
        # the request itself: the client can fix it (401: the key the router forwarded or holds was refused)
        return APIError(status, where, type="invalid_request_error" if status != 401 else "authentication_error",
                        code="upstream_rejected")

    async def ready(self) -> str:
        """``ready``, or why not (``503``, ``unreachable``): the service's own /ready (else /health)."""
        try:
            r = await self.client.get("/ready", timeout=2.0)
            if r.status_code == 404:
                r = await self.client.get("/health", timeout=2.0)
        except httpx.HTTPError as e:
            return f"unreachable ({_reason(e)})"
        return "ready" if r.status_code == 200 else f"not ready ({r.status_code})"


def _reason(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _error_message(body: bytes) -> str | None:
    """The message of an OpenAI-shaped error body (``{"error": {"message": ...}}``; KServe's ``{"error": "..."}``)."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        return str(err.get("message") or "")
    return str(err) if err else None
