"""The OpenAI-compatible HTTP API: `GET /v1/models` and `POST /v1/chat/completions` (SSE streaming too).

`model` is an adapter name, or 'base'. Every error under /v1 uses OpenAI's shape,
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
import secrets
import time
import uuid
from dataclasses import dataclass, fields
from functools import partial
from typing import Annotated, Literal

import anyio
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError
from starlette.requests import ClientDisconnect

from adapters import Message
from adapters.cli import AT_LEAST_ONE, opt
from serve.engine import SEED_RANGE, ChatResult, RequestError, SamplingParams
from serve.registry import UnknownAdapterError
from serve.service import BusyError, Service

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


def _valid_text(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:  # only a lone surrogate cannot be encoded
        raise PydanticCustomError("lone_surrogate", "contains a lone UTF-16 surrogate at character {at}, which is "
                                  "not valid Unicode: send the whole pair, or U+FFFD", {"at": err.start}) from err
    return value


Text = Annotated[str, AfterValidator(_valid_text)]
"""A string that is valid Unicode (JSON's \\uXXXX escapes can spell half a surrogate pair)."""


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True)

    role: Literal["system", "user", "assistant"]
    content: Text


class ChatCompletionRequest(BaseModel):
    # strict: `"stream": "yes"` or `"max_tokens": "8"` is a client bug to report, not to guess at;
    # allow_inf_nan: Python's json reads NaN and 1e999, which no sampler can use.
    model_config = ConfigDict(strict=True, allow_inf_nan=False)

    model: Text
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    max_tokens: int | None = Field(None, gt=0)
    max_completion_tokens: int | None = Field(None, gt=0)
    stop: list[Text] | None = None
    seed: int | None = Field(None, ge=0, lt=SEED_RANGE)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, value):
        """OpenAI takes one stop string or a list of them."""
        return [value] if isinstance(value, str) else value

    def params(self) -> SamplingParams:
        limit = self.max_completion_tokens or self.max_tokens or 256
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, max_new_tokens=limit,
                              seed=self.seed, stop=tuple(self.stop or ()))


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


def build_api(service: Service, api_key: str | None = None, limits: ApiLimits = ApiLimits()) -> FastAPI:
    """The FastAPI app holding the /v1 routes (the UI is mounted on it afterwards, at /)."""
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
        created = int(time.time())
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "loraswap"}
                                           for name in service.model_names()]}

    @router.post("/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        body = parse_request(await read_body(request, limits.max_body_bytes), limits)
        if body.model not in service.model_names():
            raise _unknown_model(body.model, service.model_names())
        stream = await _submit(service, body)
        if stream.result is not None and stream.result.error:  # refused before it ran: a plain error, streaming or not
            raise _engine_error(stream.result)
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if body.stream:
            return StreamingResponse(_sse(stream, completion_id, body.model), media_type="text/event-stream")
        result = await _wait(stream, request)
        if result is None:
            return Response(status_code=CLIENT_CLOSED)
        if result.error:
            raise _engine_error(result)
        return _completion(result, completion_id, body.model)

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
    return app


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


def parse_request(raw: bytes, limits: ApiLimits) -> ChatCompletionRequest:
    """The body as a checked request, or a 400 naming what is wrong with it."""
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
        body = ChatCompletionRequest.model_validate(data)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        raise invalid(first["msg"], field_name(first["loc"]) or None) from err
    check_limits(body, limits)
    return body


def field_name(loc: tuple) -> str:
    """('messages', 0, 'content') -> 'messages[0].content', as OpenAI names fields."""
    name = ""
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else f".{part}" if name else str(part)
    return name


def check_limits(body: ChatCompletionRequest, limits: ApiLimits) -> None:
    if len(body.messages) > limits.max_messages:
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


async def _submit(service: Service, body: ChatCompletionRequest):
    """Queue the request; preparing it (template, tokenizer) runs in a worker thread, off the event loop."""
    try:
        params = body.params()
    except ValueError as err:  # the request's fields passed the schema, the engine's own checks are the backstop
        raise invalid(str(err), getattr(err, "param", None)) from err
    messages = [Message(m.role, m.content) for m in body.messages]
    try:
        return await anyio.to_thread.run_sync(partial(service.chat, body.model, messages, params))
    except UnknownAdapterError as err:  # removed from the store since the check above
        raise _unknown_model(body.model, err.available) from err
    except RequestError as err:
        raise invalid(str(err), err.param, err.code) from err
    except BusyError as err:
        raise ApiError(429, str(err), "server_busy", "server_busy") from err


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


def _completion(result: ChatResult, completion_id: str, model: str) -> dict:
    return {
        "id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text}, "finish_reason": result.finish_reason}],
        "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.new_tokens,
                  "total_tokens": result.prompt_tokens + result.new_tokens},
    }


async def _sse(stream, completion_id: str, model: str):
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`. An engine error
    arrives as an `{"error": ...}` event before [DONE]. A client that hangs up cancels this
    generator (Starlette watches for the disconnect), and so the generation."""
    created = int(time.time())

    def chunk(delta: dict, finish: str | None = None) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(body)}\n\n"

    pieces = iter(stream)
    try:
        yield chunk({"role": "assistant", "content": ""})
        # abandon_on_cancel: a departed client's task ends now; the thread's wait ends at the cancel below
        while (piece := await anyio.to_thread.run_sync(next, pieces, None, abandon_on_cancel=True)) is not None:
            yield chunk({"content": piece})
        result = stream.result
        yield f"data: {json.dumps(_engine_error(result).body())}\n\n" if result.error else chunk({}, result.finish_reason)
        yield "data: [DONE]\n\n"
    except Exception:  # the 200 is sent already: say so in the stream, and log why
        log.exception("streaming %s failed", completion_id)
        error = ApiError(500, "internal server error: the server's log has the details", "server_error", "server_error")
        yield f"data: {json.dumps(error.body())}\n\n"
    finally:
        stream.cancel()  # a client that hangs up stops its generation
