"""The OpenAI request bodies the API takes, as pydantic models: checked strictly, turned into the
engine's requests, and published in /openapi.json so that generated clients and fuzzers see them.

Fields OpenAI defines that this server does not use (`user`, `metadata`, `store`, ...) are
ignored, as OpenAI ignores what it does not know; fields whose meaning it cannot honour
(`tools`, `echo`) are refused with a 400 that says so, never dropped silently.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from adapters import Message
from serve.engine import MAX_LOGPROBS, SEED_RANGE, ChatRequest, SamplingParams
from serve.grammar import ResponseFormat
from serve.mixes import MAX_PARTS, MAX_SCALE, MixError, Part, make_mix

MAX_CHOICES = 8
"""The most choices (`n`) one request may ask for: each is one more row of the batch."""
DEFAULT_MAX_TOKENS = 256
"""A chat reply's budget when the request gives none (the server's own cap applies as well)."""
COMPLETION_MAX_TOKENS = 16
"""A completion's budget when the request gives none: OpenAI's default for /v1/completions."""


class FieldError(ValueError):
    """A request that passed the schema but asks what the server cannot do; `param` names the field."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


def _valid_text(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:  # only a lone surrogate cannot be encoded
        raise PydanticCustomError("lone_surrogate", "contains a lone UTF-16 surrogate at character {at}, which is "
                                  "not valid Unicode: send the whole pair, or U+FFFD", {"at": err.start}) from err
    return value


Text = Annotated[str, AfterValidator(_valid_text)]
"""A string that is valid Unicode (JSON's \\uXXXX escapes can spell half a surrogate pair)."""


class _Strict(BaseModel):
    # strict: `"stream": "yes"` or `"max_tokens": "8"` is a client bug to report, not to guess at;
    # allow_inf_nan: Python's json reads NaN and 1e999, which no sampler can use.
    model_config = ConfigDict(strict=True, allow_inf_nan=False)


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


def _text_parts(value):
    """Content given as parts (what many SDKs send): text parts only, named by position otherwise."""
    if not isinstance(value, list):
        return value
    for j, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            raise PydanticCustomError("content_part", "part [{j}] is of type {kind}; this server takes text parts only "
                                      "(`{{\"type\": \"text\", \"text\": ...}}`)", {"j": j, "kind": json.dumps(kind)})
    return value


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    """'developer' is OpenAI's newer name for a system message, and is read as one."""
    content: Annotated[Text | list[TextPart], Field(union_mode="left_to_right")]

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, value):
        return _text_parts(value)

    def message(self) -> Message:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return Message("system" if self.role == "developer" else self.role, text)


class StreamOptions(_Strict):
    include_usage: bool = False
    """A last chunk, before [DONE], with the whole request's token usage (and `usage: null` on the others)."""


class JsonSchema(_Strict):
    name: Text = Field(min_length=1, max_length=64)
    description: Text | None = None
    schema_: dict = Field(alias="schema")
    strict: bool | None = None
    """Ignored: the schema is always enforced token by token."""


class ResponseFormatBody(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    def format(self) -> ResponseFormat | None:
        if self.type == "text":
            return None
        if self.type == "json_schema" and self.json_schema is None:
            raise FieldError("response_format.json_schema", "type 'json_schema' needs a json_schema object with its schema")
        schema = json.dumps(self.json_schema.schema_) if self.json_schema is not None else None
        return ResponseFormat(self.type, schema if self.type == "json_schema" else None)


class AdapterPart(_Strict):
    """One adapter of a request's mix (the `adapters` extension field)."""

    name: Text = Field(min_length=1, max_length=200)
    """An adapter name, or `name@<version>`."""
    scale: float = Field(1.0, ge=-MAX_SCALE, le=MAX_SCALE)
    """Its strength: the adapter's delta times this (1: as trained)."""


class _Sampling(_Strict):
    """What chat and raw completions share."""

    model: Text
    adapters: list[AdapterPart] | None = Field(None, min_length=1, max_length=MAX_PARTS)
    """An extension: the adapters this request adds to the base, each at its own scale (the same as
    `model: "a*0.5+b"`). With it, `model` is 'base' or that mix's own spelling."""
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    max_tokens: int | None = Field(None, gt=0)
    stop: list[Text] | None = None
    seed: int | None = Field(None, ge=0, lt=SEED_RANGE)
    """With n > 1, choice i samples with seed + i."""
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    ignore_eos: bool = False
    """vLLM's extension: stop tokens do not end the reply; it runs to max_tokens (stop strings still end it)."""
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, value):
        """OpenAI takes one stop string or a list of them."""
        return [value] if isinstance(value, str) else value

    def sampling(self, limit: int, logprobs: int | None) -> list[SamplingParams]:
        """One SamplingParams per choice."""
        seeds = [None] * self.n if self.seed is None else [(self.seed + i) % SEED_RANGE for i in range(self.n)]
        return [SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, max_new_tokens=limit,
                               seed=seed, stop=tuple(self.stop or ()), logprobs=logprobs, ignore_eos=self.ignore_eos)
                for seed in seeds]

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def adapter(self) -> str:
        """What the engine resolves: `model`, or the `adapters` mix in the compact spelling."""
        if self.adapters is None:
            return self.model
        try:
            spelling = make_mix([Part(a.name, a.scale) for a in self.adapters]).spelling()
        except MixError as err:
            raise FieldError(err.param, err.detail) from err
        if self.model not in ("base", spelling):
            raise FieldError("model", f"{self.model!r} disagrees with `adapters` ({spelling!r}): give 'base' or {spelling!r}")
        return spelling


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, gt=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormatBody | None = None
    tools: list | None = None
    tool_choice: object | None = None

    def requests(self) -> list[ChatRequest]:
        """One engine request per choice; FieldError for what the server cannot do."""
        if self.tools:
            raise FieldError("tools", "this server does not call tools; leave `tools` out")
        if self.top_logprobs is not None and not self.logprobs:
            raise FieldError("top_logprobs", "needs `logprobs: true`")
        limit = self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_TOKENS
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        messages = tuple(m.message() for m in self.messages)
        fmt = self.response_format.format() if self.response_format is not None else None
        return [ChatRequest(self.adapter(), messages, p, fmt) for p in self.sampling(limit, logprobs)]


class CompletionRequest(_Sampling):
    prompt: Text | list[Text]
    """One raw prompt, or several (each gets `n` choices); no chat template is applied."""
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: Text | None = None
    best_of: int | None = Field(None, ge=1)

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def requests(self) -> list[ChatRequest]:
        """One engine request per prompt and choice, prompt-major (OpenAI's choice order); FieldError
        for what the server cannot do."""
        prompts = self.prompts()
        if not prompts or any(not p for p in prompts):
            raise FieldError("prompt", "give at least one non-empty prompt")
        if len(prompts) * self.n > MAX_CHOICES:
            raise FieldError("prompt", f"{len(prompts)} prompts x n={self.n} is more than {MAX_CHOICES} choices in one request")
        for name, unsupported in (("echo", self.echo), ("suffix", self.suffix), ("best_of", (self.best_of or 1) > 1)):
            if unsupported:
                raise FieldError(name, "not supported by this server; leave it out")
        params = self.sampling(self.max_tokens or COMPLETION_MAX_TOKENS, self.logprobs)
        adapter = self.adapter()
        return [ChatRequest(adapter, (), p, prompt=text) for text in self.prompts() for p in params]


# -- response bodies, for /openapi.json (the handlers build plain dicts of these shapes) ---------

class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error under /v1, in OpenAI's shape."""

    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobBody(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobBody]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: ChoiceLogprobs | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: CompletionLogprobs | None


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


REQUEST_MODELS = (ChatCompletionRequest, CompletionRequest)
"""The request bodies the handlers parse themselves (to give their own errors), published in
/openapi.json's components under their class names."""
