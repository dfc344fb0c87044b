"""Blind A/B votes between two adapters (or mixes), kept as preference data for training.

Compare's blind mode shows two answers to one prompt in an order `blind_order` draws, with the
adapters' names hidden; the user picks A, B or a tie, and only then are the names shown. A
preference is appended to a JSONL file in TRL's conversational preference format (what its DPO,
ORPO and reward trainers read: `prompt` is the conversation so far, `chosen` and `rejected` one
assistant message each), with three metadata fields TRL ignores: `chosen_adapter`,
`rejected_adapter` and `time` (UTC, ISO 8601). A tie is no preference pair, so it goes to a file
of its own beside it (`<stem>.ties.jsonl`) and never into the training data.

Several UI sessions vote at once, and more than one server may share a file: each vote is one
`write` of one whole line on a file opened for appending, under a thread lock and an exclusive
`flock`, so lines never interleave.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator

from adapters import Message

CHOICES = ("A", "B", "tie")
"""What a vote may say: the first answer shown is better, the second is, or neither."""

@dataclass(frozen=True)
class BlindPair:
    """Two answers to one prompt, in the order shown: `adapters[0]` wrote `answers[0]` (shown as A)."""

    prompt: tuple[Message, ...]
    adapters: tuple[str, str]
    answers: tuple[str, str]

    def __post_init__(self) -> None:
        if len(self.adapters) != 2 or len(self.answers) != 2:
            raise ValueError(f"a blind pair holds two adapters and two answers, got {len(self.adapters)} and {len(self.answers)}")
        if not self.prompt:
            raise ValueError("a blind pair needs the prompt it answers")


@dataclass(frozen=True)
class PairSummary:
    """Votes between two adapters; `first` sorts before `second`."""

    first: str
    second: str
    first_wins: int
    second_wins: int
    ties: int

    @property
    def votes(self) -> int:
        return self.first_wins + self.second_wins + self.ties


def blind_order(first: str, second: str, rng: random.Random) -> tuple[str, str]:
    """The two adapters in the order their answers are shown, drawn by `rng` (a fair coin)."""
    if not first.strip() or not second.strip():
        raise ValueError("blind A/B: choose two adapters (or mixes)")
    return (first, second) if rng.random() < 0.5 else (second, first)


def _messages(prompt: Iterable[Message]) -> list[dict]:
    return [{"role": m.role, "content": m.content} for m in prompt]


def _reply(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def vote_row(pair: BlindPair, choice: str, time: str | None = None) -> dict:
    """The line a vote appends: a TRL preference row for A or B, a tie row for a tie."""
    if choice not in CHOICES:
        raise ValueError(f"vote: {choice!r} is not one of {', '.join(CHOICES)}")
    time = time or _now()
    if choice == "tie":
        return {"prompt": _messages(pair.prompt), "completions": [_reply(a) for a in pair.answers],
                "adapters": list(pair.adapters), "time": time}
    won = 0 if choice == "A" else 1
    return {"prompt": _messages(pair.prompt), "chosen": _reply(pair.answers[won]), "rejected": _reply(pair.answers[1 - won]),
            "chosen_adapter": pair.adapters[won], "rejected_adapter": pair.adapters[1 - won], "time": time}


class PreferenceLog:
    """The preference file and its ties file: append votes, read them back, count them per pair."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.ties_path = self.path.with_name(f"{self.path.stem}.ties.jsonl")
        self._lock = threading.Lock()

    def record(self, pair: BlindPair, choice: str) -> dict:
        """Append one vote (see `vote_row`) and return the row written."""
        row = vote_row(pair, choice)
        self._append(self.ties_path if choice == "tie" else self.path, row)
        return row

    def _append(self, path: Path, row: dict) -> None:
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # another process appending to the same file
                written = os.write(fd, line)
                if written != len(line):  # a full disk: say so rather than leave half a line unnoticed
                    raise OSError(f"{path}: wrote {written} of {len(line)} bytes of a vote")
            finally:
                os.close(fd)

    def preferences(self) -> list[dict]:
        """Every preference row, in the order voted. ValueError names the file, line and field of a bad one."""
        return list(_read(self.path, ("prompt", "chosen", "rejected", "chosen_adapter", "rejected_adapter")))

    def ties(self) -> list[dict]:
        return list(_read(self.ties_path, ("prompt", "completions", "adapters")))

    def summary(self) -> list[PairSummary]:
        """Wins, losses and ties per adapter pair, pairs in name order."""
        counts: dict[tuple[str, str], list[int]] = {}
        for row in self.preferences():
            won, lost = row["chosen_adapter"], row["rejected_adapter"]
            key = tuple(sorted((won, lost)))
            counts.setdefault(key, [0, 0, 0])[0 if won == key[0] else 1] += 1
        for row in self.ties():
            key = tuple(sorted(row["adapters"]))
            counts.setdefault(key, [0, 0, 0])[2] += 1
        return [PairSummary(a, b, *counts[(a, b)]) for a, b in sorted(counts)]


def _read(path: Path, fields: tuple[str, ...]) -> Iterator[dict]:
    if not path.is_file():
        return
    with path.open(encoding="utf-8") as lines:
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} line {n}: not JSON ({err.msg})") from err
            missing = [f for f in fields if not isinstance(row, dict) or f not in row]
            if missing:
                raise ValueError(f"{path} line {n}: no field {missing[0]!r}")
            yield row
