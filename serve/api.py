"""The OpenAI-compatible HTTP API: `GET /v1/models` and `POST /v1/chat/completions` (SSE streaming too).

`model` is an adapter name, or 'base'. Errors use OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`: an unknown model is a 404 that lists the
available ones, a busy server a 429, a bad request a 400, a missing or wrong key a 401.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, ValidationError

from adapters import Message
from serve.engine import SamplingParams
from serve.service import BusyError, Service


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        headers = {"Retry-After": "1"} if self.status == 429 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(BaseModel):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    max_tokens: int | None = Field(None, gt=0)
    max_completion_tokens: int | None = Field(None, gt=0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1)
    stream: bool = False

    def params(self) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        limit = self.max_completion_tokens or self.max_tokens or 256
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, max_new_tokens=limit,
                              seed=self.seed, stop=stop)


def build_api(service: Service, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="loraswap", description="OpenAI-compatible chat completions over QLoRA adapters")

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, err: ApiError):
        return err.response()

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(given.encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "invalid_request_error", "invalid_api_key")

    @app.get("/v1/models")
    def list_models(request: Request):
        authorize(request)
        created = int(time.time())
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "loraswap"}
                                           for name in service.model_names()]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        body = await _parse(request)
        if body.model not in service.model_names():
            available = service.model_names()
            raise ApiError(404, f"The model '{body.model}' does not exist; available: {', '.join(available)}",
                           "invalid_request_error", "model_not_found", "model")
        try:
            stream = service.chat(body.model, [Message(m.role, m.content) for m in body.messages], body.params())
        except BusyError as err:
            raise ApiError(429, str(err), "server_busy", "server_busy") from err
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if body.stream:
            return StreamingResponse(_sse(stream, completion_id, body.model), media_type="text/event-stream")
        result = await _wait(stream)
        if result.error:
            raise _engine_error(result.error)
        return {
            "id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": body.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text}, "finish_reason": result.finish_reason}],
            "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.new_tokens,
                      "total_tokens": result.prompt_tokens + result.new_tokens},
        }

    return app


async def _parse(request: Request) -> ChatCompletionRequest:
    try:
        return ChatCompletionRequest.model_validate(await request.json())
    except json.JSONDecodeError as err:
        raise ApiError(400, f"request body is not JSON: {err}", "invalid_request_error") from err
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(p) for p in first["loc"])
        raise ApiError(400, f"{param}: {first['msg']}", "invalid_request_error", param=param) from err


async def _wait(stream):
    import anyio

    return await anyio.to_thread.run_sync(stream.wait)


def _engine_error(message: str) -> ApiError:
    if "unknown adapter" in message:
        return ApiError(404, message, "invalid_request_error", "model_not_found", "model")
    if "context" in message:
        return ApiError(400, message, "invalid_request_error", "context_length_exceeded", "messages")
    return ApiError(500, message, "server_error")


def _sse(stream, completion_id: str, model: str):
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
    created = int(time.time())

    def chunk(delta: dict, finish: str | None = None) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        for piece in stream:
            yield chunk({"content": piece})
        result = stream.result
        if result.error:
            error = _engine_error(result.error)
            yield f"data: {json.dumps({'error': {'message': error.message, 'type': error.type, 'code': error.code}})}\n\n"
        else:
            yield chunk({}, result.finish_reason)
        yield "data: [DONE]\n\n"
    finally:
        stream.cancel()  # a client that hangs up stops its generation
