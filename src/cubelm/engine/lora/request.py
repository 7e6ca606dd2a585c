"""``LoRARequest``: which adapter a request runs with, shaped like vLLM's ``LoRARequest(name, int_id, path)``.

    LoRARequest("sql", 1, "adapters/sql")      # vLLM's positional order
    LoRARequest("sql", "adapters/sql")         # the id may be left out: the engine assigns its own
    LoRARequest("sql", lora_path="adapters/sql")

The name identifies the adapter inside one engine (``model`` in the server's requests). ``lora_int_id``, when
given, is vLLM's unique id: it must be >= 1 and the same in every request that names this adapter. Cached K/V are
keyed by the engine's own id for each registration, never by this one, so a reused or wrong user id can never
serve one adapter's K/V to another.
"""

from __future__ import annotations

import os
from pathlib import Path

from cubelm.errors import CubelmError


class LoRARequest:
    __slots__ = ("lora_name", "lora_int_id", "lora_path")

    def __init__(self, lora_name: str, lora_int_id: int | str | os.PathLike | None = None,
                 lora_path: str | os.PathLike | None = None):
        if isinstance(lora_int_id, (str, os.PathLike)) and lora_path is None:  # LoRARequest(name, path)
            lora_int_id, lora_path = None, lora_int_id
        if not isinstance(lora_name, str) or not lora_name:
            raise CubelmError(f"lora_name must be a non-empty string, got {lora_name!r}")
        if lora_int_id is not None and (not isinstance(lora_int_id, int) or isinstance(lora_int_id, bool)
                                        or lora_int_id < 1):
            raise CubelmError(f"lora_int_id must be an integer >= 1 (or left out), got {lora_int_id!r}")
        if lora_path is None or str(lora_path) == "":
            raise CubelmError(f"LoRARequest {lora_name!r} needs lora_path (an adapter directory in peft's format)")
        self.lora_name, self.lora_int_id, self.lora_path = lora_name, lora_int_id, str(Path(lora_path))

    def __repr__(self) -> str:
        return f"LoRARequest({self.lora_name!r}, {self.lora_int_id!r}, {self.lora_path!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, LoRARequest) and (self.lora_name, self.lora_int_id, self.lora_path) == (
            other.lora_name, other.lora_int_id, other.lora_path)

    def __hash__(self) -> int:
        return hash((self.lora_name, self.lora_int_id, self.lora_path))
