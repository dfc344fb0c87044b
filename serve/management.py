"""Adapters loaded and unloaded over HTTP while the server runs, in vLLM's shapes, but confined.

`POST /v1/load_lora_adapter {"lora_name", "lora_path"}` and `POST /v1/unload_lora_adapter
{"lora_name"}` take and answer what vLLM's do (vllm/entrypoints/serve/lora/: a 200 with the text
"Success: LoRA adapter 'x' added successfully.", errors in OpenAI's shape), so a router that
manages vLLM's adapters (llm-d, the production stack's LoRA controller) manages ours. Unlike
vLLM's, which opens any path the server can read:

- they sit behind the API key, and answer only with `--allow-runtime-loading`;
- `lora_path` must resolve, symlinks and '..' followed, to a folder inside the adapter roots (the
  store and `--adapter-roots`); anything else is a 403 saying why;
- the folder is checked as the store's are (`adapters.compat.check_adapter`) before it is served;
- unloading stops serving it and frees its weights; nothing on disk is touched.

A runtime load lives in the registry beside the store's adapters, so no scan of the store removes
it (serve/registry.py). Its weights load on its first request, as a store adapter's do. docs/fleet.md

The versions of the store's adapters are managed here too, behind the same key (docs/versions.md):
`GET /v1/adapters/{name}/versions`, `POST /v1/adapters/{name}/promote` (optional body
{"version": ...}; default the candidate) and `POST /v1/adapters/{name}/rollback`.
"""

from __future__ import annotations

import os
import threading
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from adapters.cli import opt
from adapters.store import AdapterNameError, check_name
from serve.api import ERROR_STATUSES, ApiError, documented, invalid, parse_body, read_body
from serve.gate import GateReport
from serve.registry import BASE_NAME, AdapterEntry, NoVersionError, UnknownAdapterError
from serve.service import Service, VersionPointers, VersionRow

ENABLE_FLAG = "--allow-runtime-loading"
VERSIONS_FOLDER = ".versions"
"""The one hidden folder a runtime load may read from: the store's published versions, which never change."""


@dataclass(frozen=True)
class FleetSettings:
    """How the server takes part in a fleet: a router loading adapters onto it and reading its metrics."""

    allow_runtime_loading: bool = opt(False, "Answer POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's "
                                             "runtime LoRA loading), behind the API key; lora_path must lie inside the "
                                             "adapter store or an --adapter-roots folder.")
    adapter_roots: tuple[str, ...] = opt((), "A folder, besides the adapter store, whose subfolders a runtime load may "
                                             "read; repeat the flag for several.", action="append", metavar="DIR")
    open_metrics: bool = opt(False, "Serve /metrics without the API key, for scrapers that send none (the Gateway "
                                    "API endpoint picker); its labels name every adapter (docs/fleet.md).")

    def __post_init__(self) -> None:
        for root in self.adapter_roots:
            if not Path(root).is_dir():
                raise ValueError(f"--adapter-roots {root}: not a folder")


class PathRefused(Exception):
    """A lora_path that names no folder a runtime load may read: a 403, with the reason."""


@dataclass(frozen=True)
class AdapterRoots:
    """The folders a runtime load may read adapters from, as real paths (symlinks resolved)."""

    roots: tuple[Path, ...]

    @classmethod
    def of(cls, store: Path, extra: Sequence[str]) -> "AdapterRoots":
        return cls(tuple(Path(os.path.realpath(root)) for root in (store, *extra)))

    def confine(self, given: str) -> Path:
        """The real folder `given` names (relative: to the store), if it lies inside a root.

        Symlinks and '..' are resolved before comparing, so neither leads out. Hidden folders
        are refused (the store's .staging holds adapters still being written), except the
        store's published versions. PathRefused says why; ValueError for text that is no path.
        """
        if "\x00" in given:
            raise ValueError("contains a NUL byte")
        given.encode("utf-8")  # UnicodeEncodeError (a ValueError) for a lone surrogate
        path = Path(given) if os.path.isabs(given) else self.roots[0] / given
        real = Path(os.path.realpath(path))
        root = next((r for r in self.roots if r in real.parents), None)
        if root is None:
            raise PathRefused(f"{given} resolves to {real}, which is not inside the adapter roots "
                              f"({', '.join(map(str, self.roots))}); a runtime load reads only folders inside "
                              "them (--adapter-roots adds one)")
        hidden = [p for p in real.relative_to(root).parts if p.startswith(".") and p != VERSIONS_FOLDER]
        if hidden:
            raise PathRefused(f"{given} lies in the hidden folder {hidden[0]!r} of {root}, which holds no servable "
                              "adapter (the store's .staging holds ones still being written)")
        return real


class LoadLoRAAdapterRequest(BaseModel):
    """vLLM's body (vllm/entrypoints/serve/lora/protocol.py), with its later `load_inplace`."""

    # extra="ignore": vLLM ignores fields it does not know (is_3d_lora_weight); strict: a number is no name.
    model_config = ConfigDict(strict=True, extra="ignore")

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)
    load_inplace: bool = False


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None
    """Accepted as vLLM accepts it; adapters are found by name, here as there."""


def add_adapter_routes(router: APIRouter, service: Service, authorize: Callable[[Request], None],
                       settings: FleetSettings, max_body_bytes: int) -> None:
    """The load and unload routes, and the version routes (`add_version_routes`), on the /v1 router
    (add them before its catch-all route)."""
    roots = AdapterRoots.of(service.registry.store.root, settings.adapter_roots)
    one_at_a_time = threading.Lock()  # a load's checks and its registration happen as one step

    async def parsed(request: Request, model: type[BaseModel]) -> BaseModel:
        authorize(request)
        if not settings.allow_runtime_loading:
            raise _disabled()
        return parse_body(await read_body(request, max_body_bytes), model)

    @router.post("/load_lora_adapter", **_documented(LoadLoRAAdapterRequest))
    async def load_lora_adapter(request: Request):
        body = await parsed(request, LoadLoRAAdapterRequest)
        name = await anyio.to_thread.run_sync(partial(load_adapter, service, roots, one_at_a_time, body))
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @router.post("/unload_lora_adapter", **_documented(UnloadLoRAAdapterRequest))
    async def unload_lora_adapter(request: Request):
        body = await parsed(request, UnloadLoRAAdapterRequest)
        name = await anyio.to_thread.run_sync(partial(unload_adapter, service, one_at_a_time, body))
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    add_version_routes(router, service, authorize, max_body_bytes)


MANAGEMENT_STATUSES = {**ERROR_STATUSES, 403: "lora_path leads outside the adapter roots",
                       404: "runtime loading is off, or no such adapter or folder"}


def _documented(body: type[BaseModel]) -> dict:
    """The route's body, its plain-text answer and its errors for /openapi.json (the handler reads
    the body itself)."""
    route = documented(None, None, statuses=MANAGEMENT_STATUSES)
    route["responses"][200] = {"description": "vLLM's success sentence",
                               "content": {"text/plain": {"schema": {"type": "string"}}}}
    schema = {"application/json": {"schema": body.model_json_schema()}}
    route["openapi_extra"] = {"requestBody": {"required": True, "content": schema}}
    return route


def _disabled() -> ApiError:
    # 404, as vLLM answers when VLLM_ALLOW_RUNTIME_LORA_UPDATING is unset (it registers no route),
    # so a router probing for the feature reads it as absent; a 403 would suggest another key helps.
    return ApiError(404, f"runtime adapter loading is off: start the server with {ENABLE_FLAG} (vLLM's "
                         "VLLM_ALLOW_RUNTIME_LORA_UPDATING) to load and unload adapters over the API",
                    "invalid_request_error", "runtime_loading_disabled")


def load_adapter(service: Service, roots: AdapterRoots, lock: threading.Lock, body: LoadLoRAAdapterRequest) -> str:
    """Check and serve one runtime load (in a worker thread: the check reads the weights). Returns
    its name; ApiError says why not: 400 a bad name or one served already, 403 a path outside the
    roots, 404 no folder there, 400 an adapter the checker refuses, with its reason."""
    name = _valid_name(body.lora_name)
    with lock:
        _check_name_free(service, name, body.load_inplace)
        folder = _confined_folder(roots, body.lora_path)
        outcome = service.load_runtime_adapter(name, folder, replace=body.load_inplace)
    if not isinstance(outcome, AdapterEntry):
        raise invalid(f"the adapter in {body.lora_path} cannot be served on this base: {outcome.reason}", "lora_path",
                      "adapter_rejected")
    return name


def _valid_name(name: str) -> str:
    try:
        return check_name(name)
    except AdapterNameError as err:
        raise invalid(str(err), "lora_name", "invalid_adapter_name") from err


def _check_name_free(service: Service, name: str, inplace: bool) -> None:
    runtime = name in service.registry.runtime_names()
    if runtime and not inplace:
        raise invalid(f"The lora adapter '{name}' has already been loaded. If you want to load the adapter in place, "
                      "set 'load_inplace' to True.", "lora_name", "adapter_already_loaded")
    if not runtime and name in service.model_names():
        raise invalid(f"The lora adapter '{name}' is served from the adapter store already; load it under another "
                      "lora_name", "lora_name", "adapter_already_loaded")


def _confined_folder(roots: AdapterRoots, given: str) -> Path:
    try:
        folder = roots.confine(given)
    except PathRefused as err:
        raise ApiError(403, f"lora_path: {err}", "permission_error", "lora_path_outside_roots", "lora_path") from err
    except ValueError as err:
        raise invalid(f"not a path: {err}", "lora_path") from err
    if not folder.is_dir():
        raise ApiError(404, f"lora_path: no adapter folder at {given}", "invalid_request_error", "adapter_not_found",
                       "lora_path")
    return folder


def unload_adapter(service: Service, lock: threading.Lock, body: UnloadLoRAAdapterRequest) -> str:
    """Stop serving one runtime load; ApiError 404 for a name that is none, 400 for a store adapter."""
    name = body.lora_name
    with lock:
        entry = service.unload_runtime_adapter(name)
    if entry is not None:
        return name
    if name == BASE_NAME:
        raise invalid("'base' is the base model, not an adapter", "lora_name", "invalid_adapter_name")
    if name in service.model_names():
        # Unloading it here would last only until the store's next scan registered it again.
        raise invalid(f"The lora adapter '{name}' is served from the adapter store, not loaded at runtime: remove it "
                      "from the store to stop serving it", "lora_name", "adapter_in_store")
    raise ApiError(404, f"The lora adapter '{name}' cannot be found.", "invalid_request_error", "adapter_not_found",
                   "lora_name")


def model_cards(service: Service, created: int) -> list[dict]:
    """vLLM's ModelCard for each model: 'base', whose root is the base's folder or hub id, then
    each adapter, whose root is its folder and whose parent is 'base'."""
    context = getattr(service.base.model.config, "max_position_embeddings", None)

    def card(name: str, root: str, parent: str | None) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "loraswap", "root": root,
                "parent": parent, "max_model_len": context}

    return [card(BASE_NAME, service.config.base, None),
            *(card(entry.name, str(entry.path), BASE_NAME) for entry in service.registry.servable())]


# -- versions: list, promote, roll back (docs/versions.md) ---------------------------------

class PromoteRequest(BaseModel):
    """POST /v1/adapters/{name}/promote's optional body: the version to make live (default: the candidate)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    version: str | None = Field(default=None, min_length=1)


class PointersAnswer(BaseModel):
    """Where a name's pointers stand: its live version, its candidate, what a rollback returns to."""

    name: str
    live: str | None
    candidate: str | None
    rollback_target: str | None


class VersionsAnswer(PointersAnswer):
    versions: list[VersionRow]
    """Oldest first, each with its card's metrics."""
    gate: GateReport | None
    """The promotion gate's last decision about the name; null when it decided none."""


VERSION_STATUSES = {**ERROR_STATUSES, 404: "no such adapter in the store, or no such version of it",
                    409: "nothing to promote or roll back to: no candidate, or no earlier version"}
NO_VERSION_ERRORS = {"candidate": (409, "no_candidate", "version"), "previous": (409, "no_previous_version", None),
                     "version": (404, "version_not_found", "version"), "rejected": (400, "adapter_rejected", "version")}
"""NoVersionError.what -> (status, code, the field at fault)."""


def add_version_routes(router: APIRouter, service: Service, authorize: Callable[[Request], None],
                       max_body_bytes: int) -> None:
    """GET /v1/adapters/{name}/versions, POST .../promote and .../rollback, behind the API key."""

    @router.get("/adapters/{name}/versions", **documented(None, VersionsAnswer, statuses=VERSION_STATUSES))
    async def adapter_versions(name: str, request: Request):
        authorize(request)
        return await anyio.to_thread.run_sync(partial(_answer, versions_answer, service, name))

    @router.post("/adapters/{name}/promote", **_optional_body(PromoteRequest))
    async def promote_adapter(name: str, request: Request):
        authorize(request)
        raw = await read_body(request, max_body_bytes)
        version = parse_body(raw, PromoteRequest).version if raw.strip() else None
        moved = partial(service.promote, name, version)
        return await anyio.to_thread.run_sync(partial(_answer, _pointers_answer, moved, name))

    @router.post("/adapters/{name}/rollback", **documented(None, PointersAnswer, statuses=VERSION_STATUSES))
    async def rollback_adapter(name: str, request: Request):
        authorize(request)
        moved = partial(service.rollback, name)
        return await anyio.to_thread.run_sync(partial(_answer, _pointers_answer, moved, name))


def _optional_body(body: type[BaseModel]) -> dict:
    route = documented(None, PointersAnswer, statuses=VERSION_STATUSES)
    schema = {"application/json": {"schema": body.model_json_schema()}}
    route["openapi_extra"] = {"requestBody": {"required": False, "content": schema}}
    return route


def versions_answer(service: Service, name: str) -> dict:
    """GET .../versions' answer: the pointers, every stored version and the last gate report."""
    rows = service.versions(name)
    pointers = service.pointers(name)
    return VersionsAnswer(**asdict(pointers), versions=rows, gate=service.gate_report(name)).model_dump(mode="json")


def _pointers_answer(moved: Callable[[], VersionPointers], name: str) -> dict:
    return PointersAnswer(**asdict(moved())).model_dump(mode="json")


def _answer(build: Callable, *args) -> dict:
    """`build(*args)`, with the registry's errors as the API's: 404 an unknown name or version,
    409 nothing to move to, 400 a version the checks refuse."""
    try:
        return build(*args)
    except UnknownAdapterError as err:
        raise ApiError(404, f"name: {err}", "invalid_request_error", "adapter_not_found", "name") from err
    except NoVersionError as err:
        status, code, param = NO_VERSION_ERRORS[err.what]
        raise ApiError(status, str(err), "invalid_request_error", code, param) from err
