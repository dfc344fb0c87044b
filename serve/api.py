"""The OpenAI-compatible HTTP API: `GET /v1/models`, `POST /v1/chat/completions` and
`POST /v1/completions` (raw prompts), each streaming too (SSE). The request bodies are
serve/api_models.py.

`model` is an adapter name, `name@<version>`, 'base', or a mix in the compact spelling
(`json*0.5+sentiment`: serve/mixes.py; the `adapters` extension field says the same as a list).
Every error under /v1 uses OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, and names the field at fault in `param` and
at the start of `message`:

- 400: the body is not UTF-8, not JSON, nested too deeply, or breaks the schema (a non-finite
  number, `"stream": "yes"`, a seed outside [0, 2**64), a lone UTF-16 surrogate in a string),
  or goes past one of `ApiLimits` (messages, stop strings), or the engine refuses the request
  (a prompt longer than the context);
- 401 a missing or wrong key, 404 an unknown model or path, 405 a wrong method on a /v1 path,
  413 a body over `ApiLimits.max_body_bytes`, 429 a full server, 503 an adapter that failed to
  load, 500 anything unexpected (logged with its traceback).

A lone surrogate is refused rather than replaced with U+FFFD: it means the client's encoder cut a
string inside a character, and a silently changed prompt would hide that bug behind a plausible
reply. A client that leaves stops its generation: a stream's at once, a non-streaming request's
within `DISCONNECT_POLL_S`.
"""

from __future__ import annotations

import json
import logging
import queue
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import anyio
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.requests import ClientDisconnect

from adapters.cli import AT_LEAST_ONE, opt
from serve.api_models import (REQUEST_MODELS, ChatCompletion, ChatCompletionRequest, CompletionRequest, ErrorResponse,
                               TextCompletion)
from serve.api_responses import Chunks, chat_completion, text_completion
from serve.batcher import Stream
from serve.engine import ChatRequest, ChatResult, RequestError
from serve.mixes import is_mix, parse_mix
from serve.registry import UnknownAdapterError
from serve.service import BusyError, Service

if TYPE_CHECKING:
    from serve.management import FleetSettings

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.1
"""How often a non-streaming request checks that its client is still there: the longest a
departed client's generation runs on."""
CLIENT_CLOSED = 499
"""The status logged for a request whose client left before its answer (nginx's convention)."""
_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


@dataclass(frozen=True)
class ApiLimits:
    """Bounds on one request, each refused with a clear error past it."""

    max_body_bytes: int = opt(1 << 20, "Largest API request body in bytes; larger is a 413, judged by Content-Length "
                                       "before reading and by counting while a chunked body streams in.", range=AT_LEAST_ONE)
    max_messages: int = opt(128, "Most messages in one API request.", range=AT_LEAST_ONE)
    max_stop: int = opt(16, "Most stop strings in one API request (OpenAI allows 4; more is harmless, but each is "
                            "searched for at every token).", range=AT_LEAST_ONE)
    max_stop_chars: int = opt(256, "Longest stop string in an API request, in characters.", range=AT_LEAST_ONE)

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 1:
                raise ValueError(f"ApiLimits.{f.name} must be at least 1, got {getattr(self, f.name)}")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str, code: str | None = None, param: str | None = None):
        # A message may quote the client's text; keep it encodable whatever that held.
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        if self.status == 429:
            headers = {"Retry-After": "1", **(headers or {})}
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """A 400 for the client's request, its message starting with the field at fault."""
    return ApiError(400, _named(message, param), "invalid_request_error", code, param)


def _named(message: str, param: str | None) -> str:
    """The message, starting with the field it is about (once: the engine's messages may name it already)."""
    return f"{param}: {message}" if param and not message.startswith(param) else message


class _ApiRoute(APIRoute):
    """A /v1 route: an ApiError becomes its response, a departed client ends the request quietly,
    and anything else becomes an OpenAI-shaped 500, logged with its traceback."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except ApiError as err:
                return err.response()
            except ClientDisconnect:
                return Response(status_code=CLIENT_CLOSED)
            except Exception:
                log.exception("%s %s failed", request.method, request.url.path)
                return ApiError(500, "internal server error: the server's log has the details", "server_error",
                                "server_error").response()

        return guarded


def build_api(service: Service, api_key: str | None = None, limits: ApiLimits = ApiLimits(),
              fleet: FleetSettings | None = None) -> FastAPI:
    """The FastAPI app holding the /v1 routes, /health and /metrics (the UI is mounted on it
    afterwards, at /). fleet: runtime adapter loading and metrics access (off and closed when None)."""
    # Imported here: both build on this module's ApiError and body parsing.
    from serve.management import FleetSettings, add_adapter_routes, model_cards
    from serve.metrics import add_fleet_routes

    fleet = fleet or FleetSettings()
    app = FastAPI(title="loraswap", description="OpenAI-compatible chat completions over QLoRA adapters")
    router = APIRouter(prefix="/v1", route_class=_ApiRoute)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(given.encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "invalid_request_error", "invalid_api_key")

    @router.get("/models")
    def list_models(request: Request):
        authorize(request)
        return {"object": "list", "data": model_cards(service, int(time.time()))}

    @router.post("/chat/completions", **documented("ChatCompletionRequest", ChatCompletion, streams=True))
    async def chat_completions(request: Request):
        authorize(request)
        body = parse_request(await read_body(request, limits.max_body_bytes), limits, ChatCompletionRequest)
        return await _respond(request, service, body, chat=True)

    @router.post("/completions", **documented("CompletionRequest", TextCompletion, streams=True))
    async def completions(request: Request):
        """A raw prompt, continued as it is: no chat template."""
        authorize(request)
        body = parse_request(await read_body(request, limits.max_body_bytes), limits, CompletionRequest)
        return await _respond(request, service, body, chat=False)

    add_adapter_routes(router, service, authorize, fleet, limits.max_body_bytes)  # before the catch-all below

    @router.api_route("", methods=_METHODS, include_in_schema=False)
    @router.api_route("/{path:path}", methods=_METHODS, include_in_schema=False)
    async def no_such_route(request: Request):
        """Under /v1, OpenAI-shaped 404s and 405s (without this route Gradio, mounted at /, would answer)."""
        path = request.scope["path"]
        allowed = sorted({m for r in router.routes if isinstance(r, APIRoute) and r.endpoint is not no_such_route
                          and r.path_regex.match(path) for m in r.methods})
        if allowed:
            return ApiError(405, f"{request.method} is not allowed on {path}; use {', '.join(allowed)}",
                            "invalid_request_error", "method_not_allowed").response({"Allow": ", ".join(allowed)})
        raise ApiError(404, f"no such endpoint: {request.method} {path}", "invalid_request_error", "unknown_url")

    app.include_router(router)
    add_fleet_routes(app, service, authorize, fleet.open_metrics)
    publish_request_models(app)
    return app


ERROR_STATUSES = {400: "the request is malformed or asks what the server cannot do (the field is named)",
                  401: "missing or wrong API key", 404: "unknown model", 413: "request body too large",
                  429: "the server is full, or this address failed to log in too often", 500: "server error",
                  503: "the adapter failed to load"}


def documented(request_model: str | None, ok: type[BaseModel] | None, streams: bool = False,
               statuses: dict[int, str] = ERROR_STATUSES) -> dict:
    """A route's request body and responses for /openapi.json. The handlers read their bodies
    themselves (their own 400s and 413s), so FastAPI cannot infer them: declared here, the body
    by reference to `publish_request_models`' components."""
    responses: dict = {status: {"model": ErrorResponse, "description": why} for status, why in statuses.items()}
    if ok is not None:
        responses[200] = {"model": ok, "description": "the answer"}
        if streams:
            # One event each: `data:` a chunk as JSON (a chunk, an error, or [DONE] at the end).
            event = {"type": "object", "required": ["data"],
                     "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}
            responses[200]["content"] = {"text/event-stream": {"schema": event}}
    extra = {}
    if request_model is not None:
        ref = {"$ref": f"#/components/schemas/{request_model}"}
        extra = {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}
    return {"responses": responses, "openapi_extra": extra}


def publish_request_models(app: FastAPI) -> None:
    """Put the request models' JSON schemas among /openapi.json's components (see `documented`)."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = generate()
            _, defs = models_json_schema([(m, "validation") for m in REQUEST_MODELS],
                                         ref_template="#/components/schemas/{model}")
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
        return app.openapi_schema

    app.openapi = openapi


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or a 413 past `limit` bytes: refused by its Content-Length before any of
    it is read, and for a chunked body as soon as the chunks received pass the limit, so at most
    the limit plus one received chunk is ever held."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise invalid(f"Content-Length is not a number: {declared[:32]!r}")
        if int(declared) > limit:
            raise _too_large(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(limit)
    return bytes(body)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body is larger than {limit} bytes (the server's --max-body-bytes)",
                    "invalid_request_error", "request_too_large")


def parse_request(raw: bytes, limits: ApiLimits, model: type[BaseModel] = ChatCompletionRequest):
    """The body as a checked `model` (a chat or a raw completion request) within `limits`, or a 400
    naming what is wrong with it."""
    body = parse_body(raw, model)
    check_limits(body, limits)
    return body


def parse_body(raw: bytes, model: type[BaseModel]) -> BaseModel:
    """The body as `model` (any request body under /v1), or a 400 naming what is wrong with it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise invalid(f"request body is not UTF-8: byte {err.start} ({raw[err.start:err.start + 1]!r}) {err.reason}") from err
    try:
        data = json.loads(text)
    except RecursionError as err:  # json's parser recurses once per nesting level
        raise invalid("request body is nested too deeply to parse") from err
    except ValueError as err:  # malformed, or an integer longer than Python converts (4300 digits)
        raise invalid(f"request body is not JSON: {err}") from err
    if not isinstance(data, dict):
        raise invalid(f"request body must be a JSON object, not {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        raise invalid(first["msg"], field_name(first["loc"]) or None) from err


def field_name(loc: tuple) -> str:
    """('messages', 0, 'content') -> 'messages[0].content', as OpenAI names fields. pydantic puts
    the member it tried of a union in the path too ('list[TextPart]'): not a field, left out."""
    name = ""
    for part in loc:
        if isinstance(part, str) and not part.isidentifier():
            continue
        name += f"[{part}]" if isinstance(part, int) else f".{part}" if name else str(part)
    return name


def check_limits(body: ChatCompletionRequest | CompletionRequest, limits: ApiLimits) -> None:
    if isinstance(body, ChatCompletionRequest) and len(body.messages) > limits.max_messages:
        raise invalid(f"{len(body.messages)} messages, more than the server's limit of {limits.max_messages} "
                      "(--max-messages)", "messages")
    stops = body.stop or []
    if len(stops) > limits.max_stop:
        raise invalid(f"{len(stops)} stop strings, more than the server's limit of {limits.max_stop} (--max-stop)", "stop")
    for i, stop in enumerate(stops):
        if len(stop) > limits.max_stop_chars:
            raise invalid(f"{len(stop)} characters, more than the server's limit of {limits.max_stop_chars} "
                          "(--max-stop-chars)", f"stop[{i}]")


def _unknown_model(name: str, available: list[str]) -> ApiError:
    return ApiError(404, f"The model '{name}' does not exist; available: {', '.join(available)}",
                    "invalid_request_error", "model_not_found", "model")


async def _respond(request: Request, service: Service, body: ChatCompletionRequest | CompletionRequest,
                   chat: bool) -> Response:
    """Submit every choice of the request together (rows of one batch), then answer or stream them."""
    try:
        requests = body.requests()
    except ValueError as err:  # FieldError, or SamplingParams' own checks (the backstop behind the schema)
        raise invalid(str(err), getattr(err, "param", None)) from err
    streams = await _submit(service, requests)
    refused = next((s.result for s in streams if s.result is not None and s.result.error), None)
    if refused is not None:  # refused before it ran: a plain error, streaming or not
        _cancel(streams)
        raise _engine_error(refused)
    completion_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    prompts = 1 if chat else len(body.prompts())
    if body.stream:
        chunks = Chunks(completion_id, _answering(requests[0]), chat, body.include_usage(), service.base.tokenizer)
        return StreamingResponse(_sse(streams, chunks, prompts), media_type="text/event-stream")
    results = await _wait_all(streams, request)
    if results is None:
        return Response(status_code=CLIENT_CLOSED)
    failed = next((r for r in results if r.error), None)
    if failed is not None:
        raise _engine_error(failed)
    tokenizer = service.base.tokenizer
    if chat:
        return JSONResponse(chat_completion(results, completion_id, _answering(requests[0]), tokenizer))
    return JSONResponse(text_completion(results, completion_id, _answering(requests[0]), tokenizer, prompts))


def _answering(request: ChatRequest) -> str:
    """A reply's `model`: the request's own, a mix in its canonical spelling (`a*0.5+b`)."""
    return parse_mix(request.adapter).spelling() if is_mix(request.adapter) else request.adapter


async def _submit(service: Service, requests: list[ChatRequest]) -> list[Stream]:
    """Queue the requests together; preparing them (template, tokenizer, grammar) runs in a worker
    thread, off the event loop."""
    try:
        return await anyio.to_thread.run_sync(service.submit_all, requests)
    except UnknownAdapterError as err:  # one the store does not serve (a mix names it with the part at fault)
        raise _unknown_model(err.name, err.available) from err
    except RequestError as err:
        raise invalid(str(err), err.param, err.code) from err
    except BusyError as err:
        raise ApiError(429, str(err), "server_busy", "server_busy") from err


def _cancel(streams: list[Stream]) -> None:
    for stream in streams:
        stream.cancel()


async def _wait_all(streams: list[Stream], request: Request) -> list[ChatResult] | None:
    """Every stream's result; None, with all of them cancelled, when the client left first."""
    results = []
    for stream in streams:
        result = await _wait(stream, request)
        if result is None:
            _cancel(streams)
            return None
        results.append(result)
    return results


async def _wait(stream, request: Request) -> ChatResult | None:
    """The stream's result; None, with the generation cancelled, when the client left first."""
    while True:
        try:
            return await anyio.to_thread.run_sync(stream.wait, DISCONNECT_POLL_S)
        except TimeoutError:
            if await request.is_disconnected():
                stream.cancel()
                return None


_ENGINE_ERRORS = {  # ChatResult.error_code -> (status, type, param)
    "model_not_found": (404, "invalid_request_error", "model"),
    "context_length_exceeded": (400, "invalid_request_error", "messages"),
    "invalid_request_error": (400, "invalid_request_error", None),
    "adapter_unavailable": (503, "server_error", "model"),
    "server_error": (500, "server_error", None),
}


def _engine_error(result: ChatResult) -> ApiError:
    """The HTTP error for a request the engine ended with an error, by its error_code (500 when it has none)."""
    code = result.error_code
    status, type_, param = _ENGINE_ERRORS.get(code, _ENGINE_ERRORS["server_error"])
    param = result.error_param or param
    return ApiError(status, _named(result.error, param), type_, code if code in _ENGINE_ERRORS else "server_error", param)


def _event(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


def _pump(index: int, stream: Stream, merged: queue.Queue) -> None:
    """Move one choice's pieces into the request's merged queue; (index, None) when it ends."""
    for piece in stream.pieces():
        merged.put((index, piece))
    merged.put((index, None))


async def _sse(streams: list[Stream], chunks: Chunks, prompts: int):
    """Server-sent events in OpenAI's chunk format, the choices' pieces as they come, ending with
    `data: [DONE]`. A choice's engine error arrives as an `{"error": ...}` event. A client that
    hangs up cancels this generator (Starlette watches for the disconnect), and so the generations."""
    merged: queue.Queue = queue.Queue()
    try:
        for index in range(len(streams)):
            if (start := chunks.start(index)) is not None:
                yield _event(start)
        for index, stream in enumerate(streams):
            threading.Thread(target=_pump, args=(index, stream, merged), daemon=True, name=f"sse-{index}").start()
        running = len(streams)
        while running:
            # abandon_on_cancel: a departed client's task ends now; the pumps end at the cancel below
            index, piece = await anyio.to_thread.run_sync(merged.get, abandon_on_cancel=True)
            if piece is not None:
                yield _event(chunks.piece(index, piece))
                continue
            running -= 1
            result = streams[index].result
            yield _event(_engine_error(result).body() if result.error else chunks.finish(index, result.finish_reason))
        if chunks.include_usage:
            yield _event(chunks.usage([s.result for s in streams], prompts))
        yield "data: [DONE]\n\n"
    except Exception:  # the 200 is sent already: say so in the stream, and log why
        log.exception("streaming %s failed", chunks.completion_id)
        error = ApiError(500, "internal server error: the server's log has the details", "server_error", "server_error")
        yield _event(error.body())
    finally:
        _cancel(streams)  # a client that hangs up stops its generations
