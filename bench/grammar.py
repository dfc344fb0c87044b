"""xgrammar against llguidance on the CPU, for `response_format`'s constrained decoding.

`make bench-grammar`: for each library, the time to prepare a tokenizer, to compile a JSON
schema and `{"type": "json_object"}`, and per decode step to compute the allowed-token mask and
advance the matcher, walking the tokens of a valid answer as a model would emit them. Both
libraries get the grammar the server enforces (serve/grammar.py): an optional leading space or
newline, then compact JSON. Prints each figure and llguidance's time over xgrammar's;
docs/performance.md#constrained-decoding records the run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                   "tags": {"type": "array", "items": {"type": "string"}}, "ok": {"type": "boolean"}},
    "required": ["name", "age", "tags", "ok"],
}
ANSWER = '{"name": "Ada Lovelace", "age": 36, "tags": ["maths", "engines", "notes"], "ok": true}'


@dataclass
class Timing:
    library: str
    grammar: str
    tokenizer_ms: float
    compile_ms: float
    step_us: float
    """Median over the answer's tokens: fill the mask, then accept the token."""
    tokens: int
    allowed_all: bool
    """Every token of the valid answer was allowed by the mask (the check the walk makes)."""


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - start) * 1000


def walk_xgrammar(tokenizer, schema: dict | None, ids: list[int]) -> Timing:
    import xgrammar as xgr

    info, tok_ms = timed(lambda: xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer)))
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    lead = xgr.Grammar.from_ebnf('root ::= [ \\n]?')
    text = json.dumps(schema or {"type": "object"})
    grammar, compile_ms = timed(lambda: compiler.compile_grammar(
        xgr.Grammar.concat(lead, xgr.Grammar.from_json_schema(text, any_whitespace=False))))
    matcher = xgr.GrammarMatcher(grammar)
    mask = xgr.allocate_token_bitmask(1, info.vocab_size)
    steps, allowed = [], True
    for token in ids:
        start = time.perf_counter()
        matcher.fill_next_token_bitmask(mask)
        ok = bool((mask[0, token // 32] >> (token % 32)) & 1)
        matcher.accept_token(token)
        steps.append(time.perf_counter() - start)
        allowed &= ok
    return Timing("xgrammar", "schema" if schema else "json_object", tok_ms, compile_ms,
                  statistics.median(steps) * 1e6, len(ids), allowed)


def walk_llguidance(tokenizer, schema: dict | None, ids: list[int]) -> Timing:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    lltok, tok_ms = timed(lambda: llguidance.hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer)))
    compact = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}
    lark = "start: /[ \\n]?/ obj\nobj: %json " + json.dumps({**(schema or {"type": "object"}), "x-guidance": compact})
    grammar, compile_ms = timed(lambda: llguidance.LLMatcher.grammar_from_lark(lark))
    matcher, match_ms = timed(lambda: llguidance.LLMatcher(lltok, grammar))
    mask = llguidance.torch.allocate_token_bitmask(1, lltok.vocab_size)
    steps, allowed = [], True
    for token in ids:
        start = time.perf_counter()
        llguidance.torch.fill_next_token_bitmask(matcher, mask, 0)
        ok = bool((mask[0, token // 32] >> (token % 32)) & 1)
        matcher.consume_token(token)
        steps.append(time.perf_counter() - start)
        allowed &= ok
    return Timing("llguidance", "schema" if schema else "json_object", tok_ms, compile_ms + match_ms,
                  statistics.median(steps) * 1e6, len(ids), allowed and not matcher.is_error())


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default="models/demo-base", help="A Hugging Face tokenizer folder.")
    parser.add_argument("--json", help="Also write the timings to this file.")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    ids = tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
    rows = []
    for schema in (SCHEMA, None):
        for walk in (walk_xgrammar, walk_llguidance):
            walk(tokenizer, schema, ids)  # warm: first-call setup is not what a server pays per request
            rows.append(walk(tokenizer, schema, ids))
    print(f"tokenizer {args.tokenizer} ({len(tokenizer)} tokens), answer of {len(ids)} tokens")
    print(f"{'library':<11} {'grammar':<12} {'tokenizer ms':>12} {'compile ms':>10} {'step us':>8}  all allowed")
    for r in rows:
        print(f"{r.library:<11} {r.grammar:<12} {r.tokenizer_ms:>12.2f} {r.compile_ms:>10.2f} {r.step_us:>8.1f}  {r.allowed_all}")
    for grammar in ("schema", "json_object"):
        x, ll = (next(r for r in rows if r.library == lib and r.grammar == grammar) for lib in ("xgrammar", "llguidance"))
        print(f"{grammar}: llguidance / xgrammar  compile {ll.compile_ms / x.compile_ms:.2f}x  step {ll.step_us / x.step_us:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tokenizer": args.tokenizer, "vocab": len(tokenizer), "rows": [asdict(r) for r in rows]}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
