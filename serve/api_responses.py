"""The OpenAI response bodies: chat completions, raw completions, their stream chunks, usage and
log-probabilities, built from the engine's results."""

from __future__ import annotations

import time
from collections.abc import Sequence

from serve.batcher import Piece
from serve.engine import ChatResult, TokenLogprob

CONTEXT_TOKENS = 4
"""Tokens decoded before a token to find its own text: enough for a tokenizer's merges of
leading spaces and multi-byte characters to come out as they do in the whole reply."""


def token_text(tokenizer, before: Sequence[int], token: int) -> str:
    """The text `token` adds after `before` (a sentencepiece token's leading space included,
    which decoding it alone would drop)."""
    context = list(before[-CONTEXT_TOKENS:])
    start = tokenizer.decode(context, skip_special_tokens=False)
    return tokenizer.decode(context + [token], skip_special_tokens=False)[len(start):]


def _entry(text: str, logprob: float) -> dict:
    # bytes: the UTF-8 of the text; a token holding part of a character shows it as U+FFFD
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(tokenizer, entries: Sequence[TokenLogprob], before: list[int] | None = None) -> dict:
    """`choices[i].logprobs` of a chat completion: `{"content": [...]}`, one item per reply token.
    before: the reply's tokens ahead of these (a stream's earlier chunks); extended with these."""
    content, before = [], before if before is not None else []
    for e in entries:
        item = _entry(token_text(tokenizer, before, e.token), e.logprob)
        item["top_logprobs"] = [_entry(token_text(tokenizer, before, t), lp) for t, lp in e.top]
        content.append(item)
        before.append(e.token)
    return {"content": content}


def completion_logprobs(tokenizer, entries: Sequence[TokenLogprob], before: list[int] | None = None,
                        offset: int = 0) -> dict:
    """`choices[i].logprobs` of a raw completion: the legacy parallel lists. before and offset: the
    tokens and characters of the text ahead of these (a stream's earlier chunks); `before` is extended."""
    tokens, logprobs, top, offsets = [], [], [], []
    before = before if before is not None else []
    for e in entries:
        text = token_text(tokenizer, before, e.token)
        tokens.append(text)
        logprobs.append(e.logprob)
        top.append({token_text(tokenizer, before, t): lp for t, lp in e.top})
        offsets.append(offset)
        offset += len(text)
        before.append(e.token)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top, "text_offset": offsets}


def usage(results: Sequence[ChatResult], prompts: int) -> dict:
    """Token usage of a request: each distinct prompt counted once (its choices share it)."""
    per_prompt = len(results) // prompts
    prompt_tokens = sum(r.prompt_tokens for r in results[::per_prompt])
    completion_tokens = sum(r.new_tokens for r in results)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(results: Sequence[ChatResult], completion_id: str, model: str, tokenizer) -> dict:
    choices = [{"index": i, "message": {"role": "assistant", "content": r.text}, "finish_reason": r.finish_reason,
                "logprobs": None if r.logprobs is None else chat_logprobs(tokenizer, r.logprobs)}
               for i, r in enumerate(results)]
    return {"id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(results, 1)}


def text_completion(results: Sequence[ChatResult], completion_id: str, model: str, tokenizer, prompts: int) -> dict:
    choices = [{"index": i, "text": r.text, "finish_reason": r.finish_reason,
                "logprobs": None if r.logprobs is None else completion_logprobs(tokenizer, r.logprobs)}
               for i, r in enumerate(results)]
    return {"id": completion_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(results, prompts)}


class Chunks:
    """The stream chunks of one request, chat or raw completion, in OpenAI's shapes; it keeps each
    choice's tokens and text so far, from which a chunk's log-probabilities take their text."""

    def __init__(self, completion_id: str, model: str, chat: bool, include_usage: bool, tokenizer):
        self.completion_id, self.model, self.chat, self.include_usage = completion_id, model, chat, include_usage
        self.tokenizer = tokenizer
        self.created = int(time.time())
        self._tokens: dict[int, list[int]] = {}
        self._chars: dict[int, int] = {}

    def _body(self, choices: list[dict]) -> dict:
        body = {"id": self.completion_id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices}
        if self.include_usage:
            body["usage"] = None  # OpenAI's marker: only the last chunk has the usage
        return body

    def start(self, index: int) -> dict | None:
        """A chat choice's first chunk names the role; a raw completion has none."""
        return self._body([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                            "finish_reason": None}]) if self.chat else None

    def piece(self, index: int, piece: Piece) -> dict:
        choice = {"delta": {"content": piece.text}} if self.chat else {"text": piece.text}
        return self._body([{"index": index, **choice, "logprobs": self._logprobs(index, piece), "finish_reason": None}])

    def _logprobs(self, index: int, piece: Piece) -> dict | None:
        if not piece.logprobs:
            return None
        before = self._tokens.setdefault(index, [])
        if self.chat:
            return chat_logprobs(self.tokenizer, piece.logprobs, before)
        body = completion_logprobs(self.tokenizer, piece.logprobs, before, self._chars.get(index, 0))
        self._chars[index] = self._chars.get(index, 0) + sum(len(t) for t in body["tokens"])  # as unstreamed offsets count
        return body

    def finish(self, index: int, reason: str) -> dict:
        choice = {"delta": {}} if self.chat else {"text": ""}
        return self._body([{"index": index, **choice, "logprobs": None, "finish_reason": reason}])

    def usage(self, results: Sequence[ChatResult], prompts: int) -> dict:
        body = self._body([])
        body["usage"] = usage(results, prompts)
        return body
