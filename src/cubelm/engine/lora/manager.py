"""``LoRAManager``: which adapters the engine knows (registry), holds in memory (CPU cache, LRU) and runs (slots).

Three tiers, vLLM's: an adapter is *registered* under its name (``--lora-modules``, the server's load route, or
the first ``LoRARequest`` naming it), which reads and validates its files; its weights stay in the *CPU cache*
of ``max_cpu_loras`` adapters, least recently used evicted first and re-read from disk when needed again; and
each step the adapters of the batch's rows are copied into the ``max_loras`` *slots* the layers compute with.
The scheduler never runs sequences of more than ``max_loras`` adapters at once, so a step always finds a slot.

Every registration gets a fresh engine id (``Adapter.lora_id``, >= 1; 0 is the base model), never reused: it
salts the prefix cache's chain hashes, so K/V computed under one adapter are never served to another, to the base,
or to a later adapter loaded under the same name. A re-read must find the very file that was validated (same size
and mtime), else the requests that needed it fail with a clear error and everything else goes on.

Thread safety: the server registers and unregisters from its event loop (file I/O in a worker thread) while the
engine thread activates slots, so the registry and the CPU cache are guarded by a lock; slots are the engine
thread's alone.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from cubelm.engine.lora.layers import BatchedLoRALinear, LoRAContext
from cubelm.engine.lora.request import LoRARequest
from cubelm.engine.lora.weights import AdapterWeights, fingerprint, read_adapter
from cubelm.errors import CubelmError


@dataclass(slots=True, eq=False)
class Adapter:
    """A registered adapter. Requests hold on to it, so one already running finishes even if it is unloaded."""
    name: str
    path: str
    lora_id: int  # the engine's id for this registration: the prefix-cache salt
    user_id: int | None  # LoRARequest.lora_int_id, if one was given
    fingerprint: tuple[int, int]
    max_rank: int


class LoRAManager:
    def __init__(self, layers: dict[str, BatchedLoRALinear], context: LoRAContext, *, max_loras: int,
                 max_lora_rank: int, max_cpu_loras: int):
        self.layers, self.context = layers, context
        self.max_loras, self.max_lora_rank, self.max_cpu_loras = max_loras, max_lora_rank, max_cpu_loras
        self.shapes = {name: (l.in_features, l.out_features) for name, l in layers.items()}
        first = next(iter(layers.values()))
        self.dtype, self.device = first.lora_at.dtype, first.lora_at.device
        self._lock = threading.Lock()
        self._registry: dict[str, Adapter] = {}
        self._cpu: OrderedDict[int, AdapterWeights] = OrderedDict()  # lora_id -> weights; front = least recent
        self._slots: list[Adapter | None] = [None] * max_loras
        self._slot_used = [0] * max_loras  # the step each slot last served (least recent is replaced first)
        self._step = 0
        self._ids = itertools.count(1)

    # ---- registry (any thread) -------------------------------------------------------------------------------
    def register(self, name: str, path: str | Path, user_id: int | None = None) -> Adapter:
        """Read, validate and register the adapter at ``path`` as ``name`` (``CubelmError`` says why not)."""
        path = str(Path(path))
        weights = self._read(path)
        stamp = fingerprint(path)
        with self._lock:
            if name in self._registry:
                raise CubelmError(f"an adapter named {name!r} is already loaded (from {self._registry[name].path}); "
                                  f"unload it first or pick another name")
            adapter = Adapter(name, path, next(self._ids), user_id, stamp, weights.max_rank)
            self._registry[name] = adapter
            self._cache(adapter.lora_id, weights)
        return adapter

    def unregister(self, name: str) -> Adapter | None:
        """Forget ``name`` (None if unknown). Requests already running on it finish; new ones cannot name it."""
        with self._lock:
            adapter = self._registry.pop(name, None)
            if adapter is not None:
                self._cpu.pop(adapter.lora_id, None)
        return adapter

    def get(self, name: str) -> Adapter | None:
        with self._lock:
            return self._registry.get(name)

    def adapters(self) -> list[Adapter]:
        with self._lock:
            return list(self._registry.values())

    def resolve(self, request: LoRARequest | Adapter) -> Adapter:
        """The registered adapter a request runs with, registering it on first sight (offline ``LoRARequest``)."""
        if isinstance(request, Adapter):
            return request
        if not isinstance(request, LoRARequest):
            raise CubelmError(f"lora_request must be a LoRARequest, got {type(request).__name__}")
        adapter = self.get(request.lora_name)
        if adapter is None:
            try:
                return self.register(request.lora_name, request.lora_path, request.lora_int_id)
            except CubelmError:
                adapter = self.get(request.lora_name)  # registered by another thread meanwhile?
                if adapter is None:
                    raise
        if Path(adapter.path) != Path(request.lora_path):
            raise CubelmError(f"adapter {request.lora_name!r} is loaded from {adapter.path}, not "
                              f"{request.lora_path}; one name, one adapter")
        if request.lora_int_id is not None and adapter.user_id not in (None, request.lora_int_id):
            raise CubelmError(f"adapter {request.lora_name!r} has lora_int_id {adapter.user_id}, not "
                              f"{request.lora_int_id}")
        return adapter

    # ---- CPU cache -----------------------------------------------------------------------------------------
    def _read(self, path: str) -> AdapterWeights:
        return read_adapter(path, self.shapes, self.max_lora_rank, dtype=self.dtype, device="cpu")

    def _cache(self, lora_id: int, weights: AdapterWeights) -> None:
        """Caller holds the lock."""
        self._cpu[lora_id] = weights
        self._cpu.move_to_end(lora_id)
        while len(self._cpu) > self.max_cpu_loras:
            self._cpu.popitem(last=False)

    def _weights(self, adapter: Adapter) -> AdapterWeights:
        with self._lock:
            weights = self._cpu.get(adapter.lora_id)
            if weights is not None:
                self._cpu.move_to_end(adapter.lora_id)
                return weights
        try:
            changed = fingerprint(adapter.path) != adapter.fingerprint
        except OSError as e:
            raise CubelmError(f"adapter {adapter.name!r} was evicted from memory and cannot be re-read from "
                              f"{adapter.path}: {e.strerror}") from None
        if changed:
            raise CubelmError(f"adapter {adapter.name!r}: {adapter.path} changed on disk since it was loaded; "
                              f"unload and load it again")
        weights = self._read(adapter.path)
        with self._lock:
            self._cache(adapter.lora_id, weights)
        return weights

    # ---- slots (engine thread) -----------------------------------------------------------------------------
    def activate(self, adapters: list[Adapter | None]) -> tuple[list[int], dict[int, Exception]]:
        """Slots for one step: ``adapters[i]`` is row i's adapter (None = base). Returns each row's slot (-1 =
        base) and, by row, the errors of rows whose adapter could not be loaded (those rows must not run)."""
        self._step += 1
        wanted = {id(a): a for a in adapters if a is not None}
        slot_of: dict[int, int] = {}
        failed: dict[int, Exception] = {}
        for key, adapter in wanted.items():
            try:
                slot_of[key] = self._slot(adapter, wanted)
            except Exception as e:  # noqa: BLE001 - this adapter's requests fail, the rest of the batch runs
                failed[key] = e
        rows = [-1 if a is None else slot_of.get(id(a), -1) for a in adapters]
        return rows, {i: failed[id(a)] for i, a in enumerate(adapters) if a is not None and id(a) in failed}

    def _slot(self, adapter: Adapter, wanted: dict[int, Adapter]) -> int:
        for slot, held in enumerate(self._slots):
            if held is adapter:
                self._slot_used[slot] = self._step
                return slot
        free = [s for s, held in enumerate(self._slots) if held is None or id(held) not in wanted]
        if not free:  # the scheduler admits at most max_loras adapters at once: this is a bug
            raise RuntimeError(f"more than max_loras={self.max_loras} adapters in one step")
        slot = min(free, key=lambda s: (self._slots[s] is not None, self._slot_used[s]))
        weights = self._weights(adapter)
        self._slots[slot] = None  # a failure below leaves the slot empty, never half-written
        with torch.no_grad():
            for name, layer in self.layers.items():
                layer.set_slot(slot, weights.modules.get(name))
        self._slots[slot], self._slot_used[slot] = adapter, self._step
        return slot


def build_lora_manager(model, config) -> LoRAManager:
    """Wrap ``model``'s projections (after the decode layout) for ``config.max_loras`` adapters of rank up to
    ``config.max_lora_rank``; the manager that fills their slots."""
    from cubelm.engine.lora.layers import apply_batched_lora
    context = LoRAContext()
    layers = apply_batched_lora(model, context, config.max_loras, config.max_lora_rank)
    return LoRAManager(layers, context, max_loras=config.max_loras, max_lora_rank=config.max_lora_rank,
                       max_cpu_loras=config.max_cpu_loras)
