"""The data format both sides read: three JSONL formats as chat conversations, checked line by
line, with a bad line named by file, line number and field.

Training tokenizes these examples (`train.data`); the eval matrix scores replies to them
(`experiments.matrix`). Formats, one JSON object a line:

    chat        {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    alpaca      {"instruction": "...", "input": "..." (optional), "output": "..."}
    completion  {"prompt": "...", "completion": "..."}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from adapters.chat import ROLES, Message

FORMATS = {
    "chat": ("messages",),
    "alpaca": ("instruction", "output"),
    "completion": ("prompt", "completion"),
}


class DataError(ValueError):
    """Bad task data, located by file, line and field."""

    def __init__(self, path: Path | str, message: str, line: int | None = None, field: str | None = None):
        self.path, self.line, self.field = str(path), line, field
        where = self.path + (f":{line}" if line is not None else "")
        what = f" field '{field}':" if field else ""
        super().__init__(f"{where}:{what} {message}")


@dataclass(frozen=True)
class Example:
    messages: tuple[Message, ...]
    line: int
    """1-based line number in the source file."""

    @property
    def prompt(self) -> tuple[Message, ...]:
        """Everything before the last assistant reply."""
        return self.messages[:-1]

    @property
    def reference(self) -> str:
        return self.messages[-1].content


def _text(record: dict, key: str, path, line: int, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise DataError(path, f"expected a string, got {type(value).__name__}", line, key)
    if required and not value.strip():
        raise DataError(path, "is empty", line, key)
    return value


def _chat_messages(record: dict, path, line: int) -> tuple[Message, ...]:
    raw = record["messages"]
    if not isinstance(raw, list) or not raw:
        raise DataError(path, "expected a non-empty list of {role, content}", line, "messages")
    messages = []
    for i, item in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(item, dict):
            raise DataError(path, "expected an object with role and content", line, where)
        role = item.get("role")
        if role not in ROLES:
            raise DataError(path, f"role {role!r} is not one of {list(ROLES)}", line, where + ".role")
        messages.append(Message(role, _content(item, path, line, where)))
    _check_order(messages, path, line)
    return tuple(messages)


def _content(item: dict, path, line: int, where: str) -> str:
    content = item.get("content")
    if not isinstance(content, str):
        raise DataError(path, f"expected a string, got {type(content).__name__}", line, where + ".content")
    if not content.strip():
        raise DataError(path, "is empty", line, where + ".content")
    return content


def _check_order(messages: list[Message], path, line: int) -> None:
    """An optional system turn, then user and assistant alternating, ending on the assistant."""
    turns = messages[1:] if messages[0].role == "system" else messages
    offset = len(messages) - len(turns)
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.role != expected:
            raise DataError(
                path, f"expected role {expected!r} here, got {message.role!r}", line, f"messages[{i + offset}].role"
            )
    if not turns or turns[-1].role != "assistant":
        raise DataError(path, "the conversation must end with an assistant reply", line, "messages")


def parse_record(record: object, path, line: int) -> Example:
    """One JSONL record in any of the known formats, as a chat conversation."""
    if not isinstance(record, dict):
        raise DataError(path, f"expected a JSON object, got {type(record).__name__}", line)
    if "messages" in record:
        return Example(_chat_messages(record, path, line), line)
    if "instruction" in record or "output" in record:
        instruction = _text(record, "instruction", path, line)
        extra = _text(record, "input", path, line, required=False)
        user = instruction + ("\n\n" + extra if extra.strip() else "")
        output = _text(record, "output", path, line)
        return Example((Message("user", user), Message("assistant", output)), line)
    if "prompt" in record or "completion" in record:
        prompt = _text(record, "prompt", path, line)
        completion = _text(record, "completion", path, line)
        return Example((Message("user", prompt), Message("assistant", completion)), line)
    known = "; ".join(f"{name}: {', '.join(keys)}" for name, keys in FORMATS.items())
    raise DataError(path, f"keys {sorted(record)} match no known format ({known})", line)


DEFAULT_MAX_LINE_BYTES = 2**20
_SKIP_CHUNK = 2**16
"""Bytes read at a time while skipping the rest of an over-long line."""


@dataclass
class ReadExamples:
    examples: list[Example]
    long_lines: list[int]
    """Lines over max_line_bytes, dropped unread (1-based)."""


def load_examples(path: Path | str, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> list[Example]:
    """Every example in a JSONL file; DataError at the first bad or over-long line, before anything is trained."""
    return read_examples(path, max_line_bytes, on_long="error").examples


def read_examples(path: Path | str, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, on_long: str = "error") -> ReadExamples:
    """Every example in a JSONL file, read line by line with at most max_line_bytes + 1 bytes in memory
    per line: a line over the limit is never parsed, and is dropped (on_long='drop', line numbers kept)
    or rejected with a DataError naming file and line. Any other bad line is a DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    examples, long_lines = [], []
    with path.open("rb") as handle:
        for number, raw in enumerate(_bounded_lines(handle, max_line_bytes), start=1):
            if raw is None:
                if on_long == "error":
                    raise DataError(path, f"line longer than max_line_bytes={max_line_bytes} bytes; "
                                          "raise --max-line-bytes or use --on-long drop", number)
                long_lines.append(number)
                continue
            if raw.strip():
                examples.append(parse_record(_decode_json(raw, path, number), path, number))
    if not examples:
        raise DataError(path, "no examples: the dataset is empty" if not long_lines else
                        f"no examples left: every line is longer than max_line_bytes={max_line_bytes} bytes")
    return ReadExamples(examples, long_lines)


def _bounded_lines(handle, limit: int) -> Iterator[bytes | None]:
    """Each line of a binary file (newline included), or None for a line over `limit` bytes
    (newline excluded), whose rest is skipped in small chunks instead of read whole."""
    while True:
        raw = handle.readline(limit + 1)
        if not raw:
            return
        if len(raw) <= limit or raw.endswith(b"\n"):  # at most `limit` bytes before the newline
            yield raw
            continue
        while raw and not raw.endswith(b"\n"):
            raw = handle.readline(_SKIP_CHUNK)
        yield None


def _decode_json(raw: bytes, path: Path, number: int) -> object:
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise DataError(path, f"not valid UTF-8 (byte {err.start + 1})", number) from None
    except json.JSONDecodeError as err:
        raise DataError(path, f"invalid JSON: {err.msg} (column {err.colno})", number) from None
