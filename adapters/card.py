"""`card.json`: what an adapter is, what it was trained on, and how well it does.

A card is strict JSON: every number in it is finite. It is refused when written with an inf or
NaN (which Python's json would write as bare `NaN`, which no other JSON reader accepts) and when
read with one, so a card that reads is a card whose metrics mean something.

A card may carry `examples` (a few prompts of its eval set, for the UI's clickable examples) and
`golden` prompts (a sample of its eval set with the expected replies, which the server's promotion
gate replays: docs/versions.md). Cards written before either read with both empty.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from adapters.chat import ROLES, Message

CARD_FILE = "card.json"
CARD_VERSION = 1


@dataclass
class BaseInfo:
    path: str
    fingerprint: str
    architecture: str
    quantization: str
    """'nf4-double-quant' (QLoRA) or 'none' (plain LoRA)."""


@dataclass
class LoraInfo:
    r: int
    alpha: float
    dropout: float
    target_modules: list[str]
    last_layers: int | None
    trainable_params: int
    total_params: int

    @property
    def trainable_share(self) -> float:
        return self.trainable_params / self.total_params


@dataclass
class DatasetInfo:
    path: str
    sha256: str
    bytes: int
    train_examples: int
    eval_examples: int
    eval_source: str
    """The eval file's path, or 'held-out fraction 0.1 of <path>'."""
    dropped_too_long: int = 0
    """Training examples dropped as too long: over max_length tokens, or lines over max_line_bytes."""


@dataclass
class TrainingInfo:
    epochs: float
    steps: int
    learning_rate: float
    batch_size: int
    """Examples per optimizer step (micro-batch x accumulation x processes)."""
    max_length: int
    seed: int
    duration_s: float
    tokens_per_s: float
    """Real (non-padding) tokens processed per second of training steps (evals between epochs left out)."""
    train_loss: float
    eval_loss: float | None
    history: list[dict] = field(default_factory=list)
    """One entry per logged step or eval: {'step', 'train_loss'} or {'step', 'eval_loss'}."""
    peak_memory_mb: float | None = None
    """Peak memory of the run: allocated GPU memory, or the process's peak RSS on the CPU."""
    base_products: str | None = None
    """The dtype of the frozen base's products where it was not the compute dtype ('bfloat16':
    `--bf16-base-products`, the default on a CPU with AMX); None: the compute dtype."""


@dataclass
class MetricInfo:
    name: str
    """'exact_match': the stripped reply equals the reference reply."""
    base: float
    """The base alone on the eval set."""
    adapter: float
    """The base with this adapter on the same eval set."""
    eval_examples: int
    stop_rate: float | None = None
    """Share of the adapter's eval replies that ended on a stop token, not at the token limit
    (None on cards written before it was recorded)."""
    base_stop_rate: float | None = None
    """The same share for the base alone on the same eval set (None on older cards)."""


@dataclass
class StopRowsInfo:
    """How the base stood with its stop tokens before training, and which of their rows the
    adapter trains (peft's `trainable_token_indices`; docs/training.md#stop-rows)."""

    base_probability: dict[str, float]
    """Stop token id (a JSON key, so a string) -> the base's mean probability of it at the reply
    ends of the probed training examples where it is the next token."""
    threshold: float
    """Stop tokens below this probability get their rows trained unless the run says otherwise."""
    setting: str
    """'auto' (trained where below the threshold), 'on' or 'off' (`--[no-]train-stop-rows`)."""
    trained_token_ids: list[int] = field(default_factory=list)
    """The stop tokens whose output rows (and tied input rows) the adapter holds; empty: none."""
    adapter_probability: dict[str, float] = field(default_factory=dict)
    """The same mean probabilities with the trained adapter, at the same positions."""
    probed_examples: int = 0


@dataclass
class ChatInfo:
    """How the adapter's replies end: what the decode loops stop on for its requests."""

    stop_token_ids: list[int]
    """The base's stop tokens and the end-of-turn token of the adapter's chat template, sorted."""
    end_of_turn: str | None = None
    """The special token its chat template writes after an assistant reply (None: none)."""


@dataclass
class ExamplePrompt:
    """A prompt the chat can send as it is: what its eval set asks, and its system prompt if any."""

    user: str
    system: str | None = None


@dataclass
class GoldenPrompt:
    """One eval prompt with the reply it expects, scored by exact match (`adapters.metric`)."""

    messages: list[dict[str, str]]
    """The conversation before the reply: {'role', 'content'} each, ending on a user turn."""
    expected: str

    def prompt(self) -> tuple[Message, ...]:
        return tuple(Message(m["role"], m["content"]) for m in self.messages)


@dataclass
class AdapterCard:
    name: str
    task: str
    created_at: str
    base: BaseInfo
    lora: LoraInfo
    dataset: DatasetInfo
    training: TrainingInfo
    metric: MetricInfo | None
    versions: dict[str, str]
    card_version: int = CARD_VERSION
    chat: ChatInfo | None = None
    """None on cards written before stop tokens were recorded."""
    stop_rows: StopRowsInfo | None = None
    """None on cards written before the stop tokens were probed."""
    examples: list[ExamplePrompt] = field(default_factory=list)
    """A few prompts of the eval set, for the UI's clickable examples (empty on older cards)."""
    golden: list[GoldenPrompt] = field(default_factory=list)
    """A sample of the eval set with the expected replies: what the promotion gate replays
    (empty on older cards; a version without them passes the gate unchecked)."""

    def to_dict(self) -> dict:
        data = asdict(self)
        data["lora"]["trainable_share"] = self.lora.trainable_share
        return data

    def write(self, folder: Path) -> None:
        """Write card.json; ValueError naming the field, before anything is written, for an inf or NaN."""
        data = self.to_dict()
        bad = next(non_finite_fields(data), None)
        if bad is not None:
            raise ValueError(f"adapter card {self.name!r}: {bad[0]} is {bad[1]}; a card holds only finite numbers")
        (folder / CARD_FILE).write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")

    @classmethod
    def from_dict(cls, data: dict) -> "AdapterCard":
        parts = {"base": BaseInfo, "lora": LoraInfo, "dataset": DatasetInfo, "training": TrainingInfo}
        kwargs = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        for key, kind in parts.items():
            kwargs[key] = _build(kind, data[key])
        if data.get("metric") is not None:
            kwargs["metric"] = _build(MetricInfo, data["metric"])
        if data.get("chat") is not None:
            kwargs["chat"] = _build(ChatInfo, data["chat"])
        if data.get("stop_rows") is not None:
            kwargs["stop_rows"] = _build(StopRowsInfo, data["stop_rows"])
        kwargs["examples"] = [_example(e, f"examples[{i}]") for i, e in enumerate(_list(data, "examples"))]
        kwargs["golden"] = [_golden(g, f"golden[{i}]") for i, g in enumerate(_list(data, "golden"))]
        return cls(**kwargs)


def _list(data: dict, key: str) -> list:
    value = data.get(key) or []
    if not isinstance(value, list):
        raise ValueError(f"{key}: expected a list, got {type(value).__name__}")
    return value


def _text(value, where: str, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected a string, got {type(value).__name__}")
    return value


def _example(data, where: str) -> ExamplePrompt:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected an object with 'user' (and 'system'), got {type(data).__name__}")
    return ExamplePrompt(_text(data.get("user"), f"{where}.user"), _text(data.get("system"), f"{where}.system", True))


def _golden(data, where: str) -> GoldenPrompt:
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list) or not data["messages"]:
        raise ValueError(f"{where}: expected an object with a non-empty 'messages' list and 'expected'")
    messages = []
    for i, message in enumerate(data["messages"]):
        at = f"{where}.messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ValueError(f"{at}: expected {{'role': one of {list(ROLES)}, 'content': text}}")
        messages.append({"role": message["role"], "content": _text(message.get("content"), f"{at}.content")})
    return GoldenPrompt(messages, _text(data.get("expected"), f"{where}.expected"))


def _build(kind, data: dict):
    names = {f.name for f in fields(kind)}
    return kind(**{k: v for k, v in data.items() if k in names})


def non_finite_fields(data, where: str = ""):
    """(dotted path, value) of every inf or NaN float in nested dicts and lists."""
    if isinstance(data, float) and not math.isfinite(data):
        yield where or "value", data
    elif isinstance(data, dict):
        for key, value in data.items():
            yield from non_finite_fields(value, f"{where}.{key}" if where else str(key))
    elif isinstance(data, (list, tuple)):
        for i, value in enumerate(data):
            yield from non_finite_fields(value, f"{where}[{i}]")


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not strict JSON (a card holds only finite numbers)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 is valid JSON syntax, but reads as inf
        raise ValueError(f"{text} is out of a float's range (a card holds only finite numbers)")
    return value


def parse_strict_json(text: str):
    """json.loads that refuses NaN, Infinity and -Infinity, and numbers too large for a float."""
    return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)


def read_card(folder: Path) -> AdapterCard:
    """The card in an adapter folder; ValueError naming the file when it is unreadable or not strict JSON."""
    path = Path(folder) / CARD_FILE
    try:
        return AdapterCard.from_dict(parse_strict_json(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as err:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{path}: unreadable adapter card: {err}") from err
