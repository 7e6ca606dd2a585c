"""API keys: where they come from (flags, a file, ``CUBELM_API_KEYS``) and how a request's key is checked.

A key is accepted as ``Authorization: Bearer KEY`` (what the ``openai`` client sends) or ``X-API-Key: KEY``. Keys
are compared in constant time (``hmac.compare_digest`` over SHA-256 digests, against every configured key without
an early exit), so the time a wrong key takes tells an attacker nothing about how much of it was right. With no key
configured the server is open and rate limits fall back to the client's IP.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from cubelm.errors import CubelmError
from cubelm.serve.errors import APIError

ENV_VAR = "CUBELM_API_KEYS"  # comma-separated


def load_api_keys(keys: list[str] | None, key_file: str | None, env: dict[str, str] | None = None) -> list[str]:
    env = os.environ if env is None else env
    out = [k.strip() for k in keys or [] if k.strip()]
    if key_file:
        path = Path(key_file)
        if not path.is_file():
            raise CubelmError(f"--api-key-file {path} does not exist; give a file with one key per line")
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                out.append(line)
    out += [k.strip() for k in env.get(ENV_VAR, "").split(",") if k.strip()]
    return list(dict.fromkeys(out))


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class KeyChecker:
    def __init__(self, keys: list[str]):
        self._digests = [_digest(k) for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def is_valid(self, key: str) -> bool:
        given = _digest(key)
        ok = False
        for d in self._digests:  # NOTE: no early exit: every key is compared, whatever matches
            ok |= hmac.compare_digest(given, d)
        return ok

    def check(self, headers) -> str | None:
        """The request's key if it is valid (None when auth is off); raises a 401 ``APIError`` otherwise."""
        if not self.enabled:
            return None
        key = presented_key(headers)
        if key is None:
            raise APIError(401, "missing API key: send it as 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if not self.is_valid(key):
            raise APIError(401, "incorrect API key provided", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        return key


def presented_key(headers) -> str | None:
    auth = headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    key = headers.get("x-api-key")
    return key.strip() if key and key.strip() else None


def key_id(key: str) -> str:
    """A stable, non-secret name for a key (rate-limit buckets, logs): never store the key itself."""
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]
