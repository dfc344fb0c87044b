"""Constrained decoding for the API's `response_format`: a JSON object, or JSON that follows a schema.

xgrammar compiles the format against the base's tokenizer once per distinct schema (its
compiler caches), in the request's own thread when the engine prepares it; each request then gets
its own matcher, which the decode loop asks for the allowed tokens of that row before picking
and tells the token picked. Constrained rows and free rows share one batch: a mask touches its
own row's logits only. bench/grammar.py measured xgrammar against llguidance, the other
maintained CPU library; docs/performance.md#constrained-decoding has the figures.

The JSON is compact, as Python's `json.dumps` writes it (`", "` and `": "` between items, no
other whitespace), after at most one leading space or newline (a sentencepiece tokenizer's first
piece of a reply is usually `▁{`). Free whitespace would let a small model spend its whole token
budget on spaces inside a valid prefix. Once the JSON is complete only the request's stop tokens
are allowed, so the reply ends there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


ANY_OBJECT = '{"type": "object"}'
"""`{"type": "json_object"}`: any JSON object, as OpenAI's JSON mode promises."""


@dataclass(frozen=True)
class ResponseFormat:
    type: Literal["json_object", "json_schema"]
    schema: str | None = None
    """With json_schema: the schema, as JSON text."""

    def schema_text(self) -> str:
        return self.schema if self.type == "json_schema" and self.schema is not None else ANY_OBJECT


class GrammarError(ValueError):
    """A response format that cannot be compiled, or a token that breaks its grammar."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class Grammars:
    """Compiles response formats for one tokenizer; makes each request's matcher."""

    def __init__(self, tokenizer, vocab_size: int):
        import xgrammar as xgr  # imported on the first constrained request: a server may never see one

        self._xgr = xgr
        self.vocab_size = vocab_size
        """The logits' width (the model's vocabulary, which may be padded past the tokenizer's)."""
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        # One thread: compiling runs in a request's thread, beside the decode loop's own.
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=True)
        self._lead = xgr.Grammar.from_ebnf('root ::= [ \\n]?')

    def compile(self, fmt: ResponseFormat):
        """The compiled grammar for `fmt`; GrammarError naming the schema when xgrammar refuses it."""
        text = fmt.schema_text()
        try:
            grammar = self._xgr.Grammar.from_json_schema(text, any_whitespace=False, strict_mode=True)
            return self._compiler.compile_grammar(self._xgr.Grammar.concat(self._lead, grammar))
        except Exception as err:  # xgrammar raises RuntimeError/ValueError with its own reason
            raise GrammarError(f"response_format.json_schema.schema: cannot be compiled to a grammar: {err}",
                               "response_format.json_schema.schema") from err

    def constraint(self, compiled, stop_ids: frozenset[int]) -> "Constraint":
        return Constraint(self._xgr, compiled, stop_ids, self.vocab_size)


class Constraint:
    """One request's grammar state: which tokens may come next, advanced token by token."""

    def __init__(self, xgr, compiled, stop_ids: frozenset[int], vocab_size: int):
        self._xgr = xgr
        # The reply's own stop tokens (its adapter's end of turn too), so that the complete JSON
        # is followed by the token that ends this reply and no other.
        self._matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=sorted(stop_ids))
        self._mask = xgr.allocate_token_bitmask(1, vocab_size)

    def restrict(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` ([vocab], float32, on the CPU) with every token the grammar forbids at -inf."""
        logits = logits.clone()
        self._matcher.fill_next_token_bitmask(self._mask)
        self._xgr.apply_token_bitmask_inplace(logits.view(1, -1), self._mask)
        return logits

    def accept(self, token: int) -> None:
        if not self._matcher.accept_token(token):
            raise GrammarError(f"response_format: token {token} breaks the grammar", "response_format")

    def complete(self) -> bool:
        """The JSON is complete and a stop token was accepted."""
        return self._matcher.is_terminated()
