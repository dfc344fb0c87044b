"""Chat formatting shared by training and serving.

Training and serving must turn a conversation into exactly the same tokens, so both call
`render` and `encode_chat` from here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

# Used when a base's tokenizer has no chat template. Each turn is a role marker, a space, the
# content, then the EOS token: generation stops on EOS without extra stop strings, and the
# markers are plain text, so no token has to be added (and no embedding resized). The space
# (rather than a newline) lets sentencepiece tokenizers start the reply with a word piece
# ("▁the"), the same piece the word has everywhere else.
FALLBACK_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|> ' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: str
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


def render(tokenizer, messages: Sequence[Message], add_generation_prompt: bool, template: str | None = None) -> str:
    """The conversation as text, through `template` or else the tokenizer's chat template."""
    return tokenizer.apply_chat_template(
        [m.as_dict() for m in messages],
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        chat_template=template,
    )


def render_template(template: str, messages: Sequence[Message], add_generation_prompt: bool,
                    special_tokens: Mapping[str, str]) -> str:
    """What `render` gives for a tokenizer whose special tokens are `special_tokens`, with no tokenizer.

    It runs the renderer `tokenizer.apply_chat_template` runs (transformers' sandboxed jinja
    environment), so a template can be checked where no tokenizer is loaded. Raises whatever
    the template raises.
    """
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(
        [[m.as_dict() for m in messages]],
        chat_template=template,
        add_generation_prompt=add_generation_prompt,
        **special_tokens,
    )
    return rendered[0]


END_OF_TURN_PROBE = "Zq7 probe reply"
"""The assistant's text in the conversation `end_of_turn_token` renders: text no template writes itself."""


def end_of_turn_token(tokenizer, template: str | None = None) -> str | None:
    """The special token a chat template writes right after an assistant reply (`<|eot_id|>`,
    `<|im_end|>`, `<|end|>`, `<end_of_turn>`, or EOS for templates that close a turn with it).

    Found by rendering a user turn and an assistant turn and reading what follows the reply;
    None when the template writes no special token there (only whitespace may come between).
    ValueError, naming the template's own message, when it refuses a user/assistant exchange.
    """
    messages = (Message("user", "Hello"), Message("assistant", END_OF_TURN_PROBE))
    try:
        text = render(tokenizer, messages, add_generation_prompt=False, template=template)
    except Exception as err:  # jinja's TemplateError, or the template's own raise_exception
        raise ValueError(f"the chat template refuses a plain user/assistant exchange: {type(err).__name__}: {err}") from err
    at = text.rfind(END_OF_TURN_PROBE)
    if at < 0:
        return None
    after = text[at + len(END_OF_TURN_PROBE) :].lstrip()
    specials = {str(t) for t in tokenizer.all_special_tokens}
    specials.update(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
    matches = [t for t in specials if t and after.startswith(t)]
    return max(matches, key=len) if matches else None


def encode_prompt(tokenizer, messages: Sequence[Message], template: str | None = None) -> list[int]:
    """Token ids of a conversation followed by the assistant's turn opening (what `generate` sees)."""
    text = render(tokenizer, messages, add_generation_prompt=True, template=template)
    # The template already writes BOS where the model wants it; adding special tokens here
    # would put a second one in front.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def assistant_spans(tokenizer, messages: Sequence[Message]) -> tuple[str, list[tuple[int, int]]]:
    """The whole conversation's text and the character spans of each assistant reply.

    A span starts after the assistant turn's opening and ends where the next turn would start,
    so it covers the end-of-turn marker: the model must learn to stop. ValueError saying which
    rule failed when the template refuses the conversation, or renders it so that the replies
    cannot be located (its text for the first turns is not a prefix of its text for all of them).
    """
    full = _render_or_explain(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message.role != "assistant":
            continue
        opening = _render_or_explain(tokenizer, messages[:i], add_generation_prompt=True)
        prefix = _render_or_explain(tokenizer, messages[: i + 1], add_generation_prompt=False)
        start, end = len(opening), len(prefix)
        for name, part in (("the turns before it with the assistant's opening", opening), ("the turns up to it", prefix)):
            if not full.startswith(part):
                raise ValueError(
                    f"the chat template renders {name} (assistant reply {i}) as text that is not a prefix of "
                    f"the whole conversation, so the reply cannot be located for the loss mask; the template "
                    f"must render a conversation turn by turn, never rewriting earlier turns (first difference at "
                    f"character {_first_difference(full, part)}: {part[_first_difference(full, part):][:40]!r})"
                )
        spans.append((start, end))
    return full, spans


def _render_or_explain(tokenizer, messages: Sequence[Message], add_generation_prompt: bool) -> str:
    try:
        return render(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    except Exception as err:  # jinja's TemplateError, or the template's own raise_exception
        roles = ", ".join(m.role for m in messages) or "none"
        raise ValueError(f"the chat template refuses a conversation with roles [{roles}]: "
                         f"{type(err).__name__}: {err}") from err


def _first_difference(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def encode_chat(tokenizer, messages: Sequence[Message]) -> tuple[list[int], list[bool]]:
    """Token ids of a whole conversation and, per token, whether it belongs to an assistant reply."""
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = []
    for start, end in enc["offset_mapping"]:
        # A token counts as the assistant's when it starts inside a reply span.
        mask.append(any(s <= start < e for s, e in spans) and end > start)
    return enc["input_ids"], mask


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts as one batch padded on the left, so every reply starts at the same column.

    Returns input_ids and attention_mask, both [batch, longest prompt].
    """
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids, mask
