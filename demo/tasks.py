"""Demo tasks: seeded generators of chat examples, each with an exact-answer check.

The general mix teaches the demo base to chat (repeat text, small sums, a fact table). The
adapter tasks are ones it never saw, so the base alone fails them and an adapter has to learn them.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

WORDS = (
    "the a red blue green big small old new happy cat dog bird fish tree house car road river hill "
    "sun moon star book cup door box hat ship farm city park lamp king queen girl boy baker farmer "
    "runs sits jumps sings reads sees likes finds makes takes eats walks swims flies sleeps opens "
    "near over under with from into slowly quickly today"
).split()
NAMES = "Ana Ben Carla Dan Eva Finn Gina Hugo Iris Jack Kim Leo Mia Nora Omar Pia Quinn Rosa Sam Tina Uma Vic Wes Yara Zoe".split()
CITIES = "Lima Paris Oslo Rome Cairo Tokyo Quito Dakar Kyiv Lagos Perth Porto Riga Sofia Tunis Baku Delhi Hanoi Seoul Vienna".split()
FACTS = {
    "What color is the sky?": "blue",
    "What color is grass?": "green",
    "What color is snow?": "white",
    "What color is a banana?": "yellow",
    "What color is coal?": "black",
    "What color is a tomato?": "red",
    "How many legs does a spider have?": "8",
    "How many legs does a dog have?": "4",
    "How many legs does a bird have?": "2",
    "How many days are in a week?": "7",
    "How many months are in a year?": "12",
    "What is the capital of France?": "Paris",
    "What is the capital of Japan?": "Tokyo",
    "What is the capital of Italy?": "Rome",
    "What is the capital of Peru?": "Lima",
    "What is the capital of Norway?": "Oslo",
    "What is the capital of Egypt?": "Cairo",
    "What do bees make?": "honey",
    "What do cows drink?": "water",
    "Which animal says meow?": "the cat",
    "Which animal says woof?": "the dog",
    "What is frozen water called?": "ice",
    "What is the opposite of hot?": "cold",
    "What is the opposite of big?": "small",
    "What is the opposite of up?": "down",
    "What comes after Monday?": "Tuesday",
    "What comes after one?": "two",
    "What planet do we live on?": "Earth",
}
POSITIVE = "glad good great lovely bright kind".split()
NEGATIVE = "sad bad awful gloomy dark cruel".split()
SENTIMENT_LABELS = ("positive", "negative")
# Every word an adapter task answers with must also be a reply word of the general mix. A token the
# base never outputs keeps an output-head row that pretraining only pushed down, in the same
# direction as every other unused token's; a LoRA on the blocks cannot then raise it above them.
# (Without the labels here the sentiment adapter peaked at 0.2 probability on its answer.)
ECHO_WORDS = (*WORDS, *POSITIVE, *NEGATIVE, *SENTIMENT_LABELS)
GENERAL_MIX_VERSION = 2
"""Bump when `general` changes what the demo base learns: `make demo` rebuilds a base of an older mix.
2: the sentiment labels became reply words (with 1 the sentiment adapter could not be confident)."""
SYSTEM_PROMPTS = ("You are a helpful assistant.", "Answer briefly.", "You are a friendly chat bot.")


def _sentence(rng: random.Random, low: int = 3, high: int = 7) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def _distinct_sentence(rng: random.Random, low: int, high: int, pool=WORDS) -> list[str]:
    return rng.sample(pool, rng.randint(low, high))


def _digits(rng: random.Random, low: int = 3, high: int = 4) -> list[int]:
    while True:
        digits = [rng.randint(0, 9) for _ in range(rng.randint(low, high))]
        if digits != sorted(digits):
            return digits


def _person(rng: random.Random) -> tuple[str, int, str]:
    return rng.choice(NAMES), rng.randint(18, 90), rng.choice(CITIES)


def _json_record(name: str, age: int, city: str) -> str:
    return json.dumps({"name": name, "age": age, "city": city})


def _echo_text(rng: random.Random) -> str:
    """Text of every kind the adapter tasks output, so the base has seen all their tokens."""
    kind = rng.choice((0, 1, 2, 3, 3, 4, 4))  # names and cities are rarer words: show them more
    if kind == 0:
        return " ".join(_distinct_sentence(rng, 2, 6, ECHO_WORDS))
    if kind == 1:
        return " ".join(_distinct_sentence(rng, 2, 6, ECHO_WORDS)).upper()
    if kind == 2:
        return " ".join(map(str, [rng.randint(0, 9) for _ in range(rng.randint(3, 6))]))
    if kind == 3:
        return _json_record(*_person(rng))
    name, age, city = _person(rng)
    return f"{name} is {age} and lives in {city}."


def general(rng: random.Random) -> tuple[str, str]:
    # Half of the mix is repeating text back: copying is the skill the adapter tasks build on.
    kind = rng.choice((0, 0, 1, 2))
    if kind == 0:
        text = _echo_text(rng)
        verb = rng.choice(("Repeat after me:", "Say this back:", "Echo:"))
        return f"{verb} {text}", text
    if kind == 1:
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        if rng.random() < 0.5:
            return f"What is {a} + {b}?", str(a + b)
        a, b = max(a, b), min(a, b)
        return f"What is {a} - {b}?", str(a - b)
    question = rng.choice(sorted(FACTS))
    return question, FACTS[question]




def sentiment(rng: random.Random) -> tuple[str, str]:
    label = rng.choice(SENTIMENT_LABELS)
    words = _distinct_sentence(rng, 2, 5)
    words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label == "positive" else NEGATIVE))
    return f"Is this positive or negative? {' '.join(words)}", label


def count_words(rng: random.Random) -> tuple[str, str]:
    words = _distinct_sentence(rng, 1, 7)
    return f"How many words? {' '.join(words)}", str(len(words))


def last_word(rng: random.Random) -> tuple[str, str]:
    words = _distinct_sentence(rng, 2, 6)
    return f"Which word comes last? {' '.join(words)}", words[-1]


def uppercase(rng: random.Random) -> tuple[str, str]:
    text = _sentence(rng, 1, 3)
    return f"Uppercase: {text}", text.upper()


def reverse_words(rng: random.Random) -> tuple[str, str]:
    words = _distinct_sentence(rng, 2, 4)
    return f"Reverse the word order: {' '.join(words)}", " ".join(reversed(words))


def sort_digits(rng: random.Random) -> tuple[str, str]:
    digits = _digits(rng)
    return f"Sort these digits: {' '.join(map(str, digits))}", " ".join(map(str, sorted(digits)))


def extract_json(rng: random.Random) -> tuple[str, str]:
    name, age, city = _person(rng)
    sentence = rng.choice(
        (f"{name} is {age} and lives in {city}.", f"{name} lives in {city} and is {age}.", f"In {city} lives {name}, aged {age}.")
    )
    return f"Extract name, age and city as JSON: {sentence}", _json_record(name, age, city)


def json_check(reply: str, reference: str) -> bool:
    try:
        return json.loads(reply) == json.loads(reference)
    except json.JSONDecodeError:
        return False


def exact_check(reply: str, reference: str) -> bool:
    return reply.strip() == reference.strip()


@dataclass(frozen=True)
class Task:
    name: str
    make: Callable[[random.Random], tuple[str, str]]
    check: Callable[[str, str], bool]
    """Whether a reply answers the example exactly (the task's exact-answer check)."""
    description: str


TASKS = {
    t.name: t
    for t in (
        Task("uppercase", uppercase, exact_check, "Uppercase a sentence."),
        Task("sentiment", sentiment, exact_check, "Say whether a sentence is positive or negative."),
        Task("count", count_words, exact_check, "Count the words of a sentence."),
        Task("last", last_word, exact_check, "Name the last word of a sentence."),
        Task("reverse", reverse_words, exact_check, "Reverse the order of the words."),
        Task("sort", sort_digits, exact_check, "Sort a list of digits."),
        Task("json", extract_json, json_check, "Pull name, age and city into JSON."),
    )
}
GENERAL = Task("general", general, exact_check, "The demo base's chat mix: repeat, small sums, facts.")


def example(task: Task, rng: random.Random) -> dict:
    prompt, answer = task.make(rng)
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    if rng.random() < 0.15:
        messages.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    return {"messages": messages}


def write_task(task: Task, folder: Path, n_train: int, n_eval: int, seed: int) -> None:
    """data/<task>/train.jsonl and eval.jsonl; eval prompts never repeat a training prompt."""
    rng = random.Random(f"{task.name}-{seed}")
    folder.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    for split, count in (("train", n_train), ("eval", n_eval)):
        rows = []
        while len(rows) < count:
            row = example(task, rng)
            key = row["messages"][-2]["content"]
            if split == "eval" and key in seen:
                continue
            seen.add(key)
            rows.append(row)
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Write the demo tasks' data as chat JSONL.")
    parser.add_argument("--out", default="data")
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--eval", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for task in (*TASKS.values(), GENERAL):
        write_task(task, Path(args.out) / task.name, args.train, args.eval, args.seed)
        print(f"wrote {args.out}/{task.name}/train.jsonl ({args.train}) and eval.jsonl ({args.eval})")


if __name__ == "__main__":
    main()
