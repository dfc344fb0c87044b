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


def encode_prompt(tokenizer, messages: Sequence[Message], template: str | None = None) -> list[int]:
    """Token ids of a conversation followed by the assistant's turn opening (what `generate` sees)."""
    text = render(tokenizer, messages, add_generation_prompt=True, template=template)
    # The template already writes BOS where the model wants it; adding special tokens here
    # would put a second one in front.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def assistant_spans(tokenizer, messages: Sequence[Message]) -> tuple[str, list[tuple[int, int]]]:
    """The whole conversation's text and the character spans of each assistant reply.

    A span starts after the assistant turn's opening and ends where the next turn would start,
    so it covers the end-of-turn marker: the model must learn to stop.
    """
    full = render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message.role != "assistant":
            continue
        start = len(render(tokenizer, messages[:i], add_generation_prompt=True))
        end = len(render(tokenizer, messages[: i + 1], add_generation_prompt=False))
        prefix = render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not full.startswith(prefix) or start > end:
            raise ValueError(
                "the chat template does not render conversations prefix by prefix; "
                "assistant tokens cannot be located for the loss mask"
            )
        spans.append((start, end))
    return full, spans


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
