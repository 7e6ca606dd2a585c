"""Adapters in the server (multi-LoRA): ``--lora-modules`` checked at startup, model cards, and the runtime routes.

``cubelm serve --lora-modules sql=adapters/sql --lora-modules chat=adapters/chat --max-loras 2`` serves the base
model and both adapters; a request whose ``model`` is ``sql`` runs on that adapter, in the same batches as every
other request. Each adapter is read and checked against the model's ``config.json`` before the server starts, so a
missing or corrupt adapter, a rank above ``--max-lora-rank`` or a module the model lacks is a one-line error and
exit 2, not a server that fails later. With ``--enable-runtime-lora``, ``POST /v1/load_lora_adapter`` and ``POST
/v1/unload_lora_adapter`` (vLLM's routes, behind the API key) change the set while serving; without it they do not
exist (404).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from cubelm.errors import CubelmError
from cubelm.serve.errors import APIError
from cubelm.serve.openapi import errors
from cubelm.serve.protocol import DeletedModel, LoadLoRAAdapterRequest, ModelCard, UnloadLoRAAdapterRequest, now_s


def parse_lora_modules(specs: list[str]) -> dict[str, str]:
    """``["NAME=PATH", ...]`` -> {name: path}; a malformed or repeated name is a ``CubelmError``."""
    modules: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise CubelmError(f"--lora-modules takes NAME=PATH (an adapter directory), got {spec!r}")
        if name in modules:
            raise CubelmError(f"--lora-modules names {name!r} twice; each adapter needs its own name")
        modules[name] = path
    return modules


def check_lora_modules(modules: dict[str, str], model_dir: str | Path, served_model_name: str,
                       max_lora_rank: int) -> None:
    """Read and check every adapter against the model's config (no weights loaded): ``CubelmError`` says why not."""
    from cubelm.engine.lora.weights import read_adapter, shapes_from_config
    from cubelm.model.config import read_config_json
    if served_model_name in modules:
        raise CubelmError(f"--lora-modules name {served_model_name!r} is the base model's name; pick another")
    shapes = shapes_from_config(read_config_json(model_dir))
    for name, path in modules.items():
        try:
            read_adapter(path, shapes, max_lora_rank)
        except CubelmError as e:
            raise CubelmError(f"--lora-modules {name}: {e}") from None


def model_card(state, adapter=None) -> ModelCard:
    if adapter is None:
        return ModelCard(id=state.model_name, created=now_s(), root=str(state.options.model),
                         max_model_len=state.engine.max_model_len)
    return ModelCard(id=adapter.name, created=now_s(), root=adapter.path, parent=state.model_name,
                     max_model_len=state.engine.max_model_len)


def add_lora_routes(app, state, client_id) -> None:
    from fastapi import Depends  # the web stack only here: ServeOptions parses --lora-modules without it

    @app.post("/v1/load_lora_adapter", summary="Load a LoRA adapter; requests then name it as their model",
              response_model=ModelCard, responses=errors(400, 401, 413, 503))
    async def load_lora_adapter(req: LoadLoRAAdapterRequest, _: str = Depends(client_id)):
        state.check_available()
        manager = state.engine.lora_manager
        if req.lora_name == state.model_name or manager.get(req.lora_name) is not None:
            raise APIError(400, f"the name {req.lora_name!r} is already taken (by "
                                f"{'the base model' if req.lora_name == state.model_name else 'a loaded adapter'}); "
                                f"unload it first or pick another name", param="lora_name")
        try:  # reading and checking the files is blocking I/O: off the event loop
            adapter = await asyncio.to_thread(manager.register, req.lora_name, req.lora_path)
        except CubelmError as e:
            raise APIError(400, str(e), param="lora_name" if "already loaded" in str(e) else "lora_path") from None
        except OSError as e:
            raise APIError(400, f"cannot read the adapter at {req.lora_path}: {e.strerror or e}",
                           param="lora_path") from None
        return model_card(state, adapter)

    @app.post("/v1/unload_lora_adapter", summary="Unload a LoRA adapter (requests already running on it finish)",
              response_model=DeletedModel, responses=errors(400, 401, 404, 413, 503))
    async def unload_lora_adapter(req: UnloadLoRAAdapterRequest, _: str = Depends(client_id)):
        state.check_available()
        if state.engine.lora_manager.unregister(req.lora_name) is None:
            raise APIError(404, f"no adapter named {req.lora_name!r} is loaded (see GET /v1/models)",
                           param="lora_name", code="model_not_found")
        return DeletedModel(id=req.lora_name, deleted=True)
