"""Token-level compare: token texts, shifts against a fake base scorer, colours and escaping."""

from __future__ import annotations

import math
import re

import pytest

from adapters import Message
from serve.engine import TokenLogprob
from serve.token_view import TokenShift, compare_with_base, render, shade, token_shifts, token_texts

VOCAB = {1: "▁the", 2: "▁cat", 3: "<b>", 4: "'\"&", 5: "▁red"}


def decode(ids: list[int]) -> str:
    """A sentencepiece-like decoder: '▁' is a space, and the text's leading space is dropped."""
    return "".join(VOCAB[i] for i in ids).replace("▁", " ").lstrip(" ")


def test_token_texts_keep_the_spaces_a_lone_decode_drops():
    assert decode([2]) == "cat"  # alone, the space is gone
    assert token_texts([1, 2, 5], decode) == ["the", " cat", " red"]
    assert "".join(token_texts([1, 2, 5], decode)) == decode([1, 2, 5])


def test_a_half_character_falls_back_to_the_token_alone():
    def halves(ids):  # decoding token 9 after 8 rewrites the text before it (a completed character)
        return {(8,): "\ufffd", (8, 9): "é", (9,): "?"}[tuple(ids)]

    assert token_texts([8, 9], halves) == ["\ufffd", "?"]


def test_shifts_are_adapter_minus_base_with_the_base_top_choice():
    adapter = (TokenLogprob(1, -0.1), TokenLogprob(5, -0.2))
    base = (TokenLogprob(1, -0.1, ((1, -0.1),)), TokenLogprob(5, -3.0, ((2, -0.5), (5, -3.0))))
    shifts = token_shifts(adapter, base, decode)
    assert [s.text for s in shifts] == ["the", " red"]
    assert shifts[0].shift == pytest.approx(0.0)
    assert shifts[1].shift == pytest.approx(2.8)
    assert (shifts[1].base_top, shifts[1].base_top_logprob) == ("cat", -0.5)


def test_compare_with_base_scores_the_same_tokens_after_the_same_messages():
    calls = []

    def score(adapter, messages, tokens, top=1):
        calls.append((adapter, messages, tokens, top))
        return tuple(TokenLogprob(t, -1.0, ((2, -0.5),)) for t in tokens)

    messages = [Message("user", "Color of cat?")]
    shifts = compare_with_base(score, messages, (TokenLogprob(5, -0.25),), decode)
    assert calls == [("base", messages, [5], 1)]
    assert shifts == [TokenShift(" red".lstrip(), -0.25, -1.0, "cat", -0.5)]


def test_mismatched_scores_are_refused_naming_the_token():
    with pytest.raises(ValueError, match="token 0 is 1 in the answer but the base scored 2"):
        token_shifts((TokenLogprob(1, -1.0),), (TokenLogprob(2, -1.0),), decode)
    with pytest.raises(ValueError, match="gave 1 log-probabilities, the base 0"):
        token_shifts((TokenLogprob(1, -1.0),), (), decode)
    with pytest.raises(ValueError, match="no log-probabilities"):
        compare_with_base(lambda *a, **k: (), [Message("user", "x")], None, decode)


def test_shade_is_green_for_gains_red_for_losses_and_as_opaque_as_one_minus_the_inverse_ratio():
    assert shade(math.log(2)) == "rgba(22,163,74,0.50)"  # twice as likely under the adapter
    assert shade(-math.log(10)) == "rgba(220,38,38,0.90)"  # ten times less likely
    assert shade(0.0).endswith(",0.00)")
    assert shade(-math.inf) == "rgba(220,38,38,1)"


def test_render_escapes_text_and_hover_and_colours_every_token():
    shifts = [TokenShift("<b>", -0.1, -2.0, "'\"&", -0.3), TokenShift(" x", -3.0, -0.1)]
    out = render(shifts)
    spans = re.findall(r"<span class='tok' data-shift='([^']+)' style='background:([^']+)' title='([^']*)'>(.*?)</span>", out)
    assert len(spans) == 2 and out.count("<span") == 2  # no markup but the spans: the token's own <b> is text
    assert [s[0] for s in spans] == ["1.900", "-2.900"]
    assert spans[0][1].startswith("rgba(22,163,74") and spans[1][1].startswith("rgba(220,38,38")
    assert spans[0][3] == "&lt;b&gt;"  # the token's text, escaped
    assert "base&#x27;s top choice: &#x27;\\&#x27;&quot;&amp;&#x27;" in spans[0][2]  # repr of the top choice, escaped
    assert "'" not in spans[0][2] and '"' not in spans[0][2]
    assert "base's top choice" not in spans[1][2]  # no alternatives given: nothing claimed


# -- against the real engine: the generation's own log-probabilities and Engine.score ---------

def test_the_base_against_itself_shifts_nothing_and_a_trained_adapter_gains_its_answer(tiny_base, two_adapters):
    from serve.engine import SamplingParams
    from serve.ui_logic import token_view_html
    from tests.conftest import start_service

    service = start_service(tiny_base, two_adapters)
    try:
        messages = [Message("user", "Color of cat?")]
        params = SamplingParams(max_new_tokens=8, logprobs=0)
        base, colors = (s.wait(60) for s in service.compare(["base", "colors"], messages, params))
        decode = lambda ids: service.base.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        same = compare_with_base(service.engine.score, messages, base.logprobs, decode)
        # The same float32 model twice: a cached decode step against one teacher-forced forward differ
        # only by summation order, eps (1.2e-7) times logits under 100 over 64-term products: < 1e-4.
        assert len(same) == base.new_tokens and max(abs(s.shift) for s in same) < 1e-4
        gained = compare_with_base(service.engine.score, messages, colors.logprobs, decode)
        assert "red" in "".join(s.text for s in gained)
        answer = [s for s in gained if s.text.strip()][:2]  # the answer's first tokens ('red' may take more than one)
        assert all(s.shift > math.log(2) for s in answer), answer  # trained to say it: far likelier than under the base
        html_view = token_view_html(service, "colors", messages, colors)
        assert html_view.count("<span class='tok'") == colors.new_tokens
    finally:
        service.close()
