"""Token-level compare: how much more likely an adapter made each token of its answer than the base did.

For an answer the adapter generated with its log-probabilities (`SamplingParams(logprobs=k)`),
the base scores the very same tokens after the very same messages (`Engine.score("base", ...)`,
teacher-forced). Each token's shift is `adapter logprob - base logprob` in nats: positive where
the adapter pushed the answer towards that token, negative where the base liked it better. The
HTML colours each token by its shift and shows, on hover, both log-probabilities and the base's
own likeliest token at that position. Nothing here imports gradio; the UI only places the HTML.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Callable, Sequence

from adapters import Message
from serve.engine import TokenLogprob

Scorer = Callable[..., Sequence[TokenLogprob]]
"""`Engine.score`: (adapter, messages, reply_tokens, top=...) -> one TokenLogprob per reply token."""
Decoder = Callable[[list[int]], str]
"""Token ids to text, as the tokenizer's `decode(ids, skip_special_tokens=True)`."""

GAIN = (22, 163, 74)
"""Green: the adapter made the token more likely than the base did."""
LOSS = (220, 38, 38)
"""Red: the base found the token more likely than the adapter."""


@dataclass(frozen=True)
class TokenShift:
    """One answer token under the adapter and under the base."""

    text: str
    """The token's share of the decoded answer (a leading space included)."""
    adapter_logprob: float
    base_logprob: float
    base_top: str | None = None
    """The base's likeliest token at this position, decoded; None when the scorer gave no alternatives."""
    base_top_logprob: float | None = None

    @property
    def shift(self) -> float:
        return self.adapter_logprob - self.base_logprob


def token_texts(ids: Sequence[int], decode: Decoder) -> list[str]:
    """Each token's share of the decoded text. Decoding one token alone loses what depends on its
    neighbours (sentencepiece's leading space, a character split over byte tokens), so each share
    is what decoding one more token adds; where that is not an extension (a half character), the
    token is decoded alone."""
    texts, before = [], ""
    for i, token in enumerate(ids):
        after = decode(list(ids[: i + 1]))
        texts.append(after[len(before):] if after.startswith(before) else decode([token]))
        before = after
    return texts


def token_shifts(adapter: Sequence[TokenLogprob], base: Sequence[TokenLogprob], decode: Decoder) -> list[TokenShift]:
    """Pair the adapter's and the base's log-probabilities of the same tokens."""
    if len(adapter) != len(base):
        raise ValueError(f"token view: the adapter gave {len(adapter)} log-probabilities, the base {len(base)}")
    for i, (a, b) in enumerate(zip(adapter, base)):
        if a.token != b.token:
            raise ValueError(f"token view: token {i} is {a.token} in the answer but the base scored {b.token}")
    texts = token_texts([a.token for a in adapter], decode)
    shifts = []
    for text, a, b in zip(texts, adapter, base):
        top, top_lp = (decode([b.top[0][0]]), b.top[0][1]) if b.top else (None, None)
        shifts.append(TokenShift(text, a.logprob, b.logprob, top, top_lp))
    return shifts


def compare_with_base(score: Scorer, messages: Sequence[Message], answer: Sequence[TokenLogprob] | None,
                      decode: Decoder) -> list[TokenShift]:
    """The shifts of an answer: `answer` is its generation's own log-probabilities (ChatResult.logprobs),
    the base's come from `score` on the same messages and tokens. ValueError when the answer has none."""
    if answer is None:
        raise ValueError("token view: the answer carries no log-probabilities (generate it with logprobs set)")
    tokens = [t.token for t in answer]
    base = score("base", list(messages), tokens, top=1) if tokens else ()
    return token_shifts(answer, base, decode)


def shade(shift: float) -> str:
    """The background for a shift: green for a gain, red for a loss, as opaque as 1 - 1/ratio of the
    two probabilities (a token made twice as likely: 0.5; ten times: 0.9; an equal one: clear)."""
    if not math.isfinite(shift):
        return f"rgba({','.join(map(str, LOSS if shift < 0 else GAIN))},1)"
    alpha = 1 - math.exp(-abs(shift))
    red, green, blue = GAIN if shift > 0 else LOSS
    return f"rgba({red},{green},{blue},{alpha:.2f})"


def _hover(s: TokenShift) -> str:
    said = f"adapter {s.adapter_logprob:.2f}, base {s.base_logprob:.2f} (shift {s.shift:+.2f} nats)"
    if s.base_top is not None:
        said += f"; base's top choice: {s.base_top!r} ({s.base_top_logprob:.2f})"
    return said


def render(shifts: Sequence[TokenShift]) -> str:
    """The answer as HTML, one span per token (class `tok`, its shift in `data-shift`), every text escaped."""
    spans = "".join(f"<span class='tok' data-shift='{s.shift:.3f}' style='background:{shade(s.shift)}' "
                    f"title='{html.escape(_hover(s), quote=True)}'>{html.escape(s.text)}</span>" for s in shifts)
    legend = ("<small>green: the adapter made the token more likely than the base; red: less; "
              "hover a token for both log-probabilities and the base's own choice</small>")
    return f"<div class='token-view' style='white-space:pre-wrap'>{spans}</div>{legend}"
