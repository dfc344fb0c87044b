"""The promotion gate: a new version of a served adapter goes live only if it does about as well
as the live one on its own golden prompts.

When the store's link for a served name moves to a new version (a retrain published it), the
registry keeps serving the live version and hands the new one here (`PromotionGate.submit`). A
thread of its own replays the new version's golden prompts (`AdapterCard.golden`) through the
engine, greedily, on both versions side by side, and scores each answer by exact match. If the
new version scores below the live one by more than the margin, or any of its replies failed
(its check is incomplete), the live one stays live (the store's link flips back) and the new
one is served only as `name@candidate`; otherwise it goes live. A version whose card has no
golden prompts goes live unchecked (the report says so). Each decision is kept in a
`GateReport`, written beside the name in the store. docs/versions.md
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Callable, Sequence

from adapters.card import GoldenPrompt
from adapters.cli import Range, opt
from adapters.metric import is_exact_match
from serve.engine import ChatRequest, ChatResult, SamplingParams
from serve.registry import AdapterEntry, AdapterRegistry, UnknownAdapterError

log = logging.getLogger(__name__)
MARGIN_RANGE = Range(0, 1, high_open=False)
SPARE_TOKENS = 8
"""Tokens a golden reply may take beyond its expected reply's length (as training's eval allows)."""
GATE_TIMEOUT_S = 600.0
"""How long the gate waits for its replies; past it the new version is held back."""

PROMOTED, HELD, UNCHECKED, REJECTED = "promoted", "held", "promoted unchecked", "rejected"
"""A GateReport's verdicts: live after the check, kept as the candidate, live without golden prompts
to check, not servable at all (the registry's checks refused it; the live version stays)."""


@dataclass(frozen=True)
class GateSettings:
    """Whether new versions of a served adapter are checked before they go live, and how strictly."""

    enabled: bool = opt(True, "Check a new version of a served adapter on its golden prompts before it goes live "
                              "(docs/versions.md); --no-gate makes a new version live as soon as it is published.",
                        flag="--gate")
    margin: float = opt(0.05, "How far below the live version's exact match a new version may score on its golden "
                              "prompts and still go live (absolute, 0 to 1).", flag="--gate-margin", range=MARGIN_RANGE)

    def __post_init__(self) -> None:
        if not MARGIN_RANGE.holds(self.margin):
            raise ValueError(f"gate margin must be {MARGIN_RANGE.text}, got {self.margin}")


@dataclass(frozen=True)
class RegressedPrompt:
    """A golden prompt the live version answered right and the new version wrong."""

    prompt: str
    """The prompt's last user turn."""
    expected: str
    live_answer: str
    candidate_answer: str


@dataclass(frozen=True)
class GateReport:
    """One decision of the gate, as the Adapters tab and GET /v1/adapters/{name}/versions show it."""

    name: str
    live_version: str
    candidate_version: str
    verdict: str
    """One of PROMOTED, HELD, UNCHECKED, REJECTED."""
    margin: float
    prompts: int
    """Golden prompts replayed (0: none on the new version's card)."""
    live_score: float | None = None
    """Exact match of the live version on them; None when nothing was replayed."""
    candidate_score: float | None = None
    regressed: tuple[RegressedPrompt, ...] = ()
    reason: str = ""
    decided_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> "GateReport":
        data = json.loads(text)
        data["regressed"] = tuple(RegressedPrompt(**r) for r in data.get("regressed", ()))
        return cls(**data)


@dataclass(frozen=True)
class Scores:
    live: float
    candidate: float
    regressed: tuple[RegressedPrompt, ...]
    errors: tuple[str, ...]
    """Why replies failed (a version that would not load, a reply cut by shutdown), once each."""
    candidate_failed: int = 0
    """The new version's replies that failed: its check is incomplete, so it is held back."""


def golden_requests(spec: str, golden: Sequence[GoldenPrompt], count_tokens: Callable[[str], int]) -> list[ChatRequest]:
    """Greedy requests for the golden prompts on one adapter (`spec`: 'name@version'), each with
    room for its expected reply and a few tokens more."""
    return [ChatRequest(spec, g.prompt(), SamplingParams(temperature=0.0, max_new_tokens=count_tokens(g.expected) + SPARE_TOKENS))
            for g in golden]


def score(golden: Sequence[GoldenPrompt], live: Sequence[ChatResult], candidate: Sequence[ChatResult]) -> Scores:
    """Both versions' exact match on the golden prompts, and the prompts where the new one lost.
    A failed reply counts as a miss."""
    hits = [(not lv.error and is_exact_match(lv.text, g.expected), not cd.error and is_exact_match(cd.text, g.expected))
            for g, lv, cd in zip(golden, live, candidate)]
    regressed = tuple(RegressedPrompt(_last_user(g), g.expected, lv.text, cd.text)
                      for g, lv, cd, (hit_live, hit_new) in zip(golden, live, candidate, hits) if hit_live and not hit_new)
    errors = tuple(dict.fromkeys(r.error for r in (*live, *candidate) if r.error))
    n = len(golden)
    failed = sum(1 for r in candidate if r.error)
    return Scores(sum(h for h, _ in hits) / n, sum(h for _, h in hits) / n, regressed, errors, failed)


def _last_user(golden: GoldenPrompt) -> str:
    return next((m["content"] for m in reversed(golden.messages) if m["role"] == "user"), "")


def holds_back(scores: Scores, margin: float) -> bool:
    """The new version scores below the live one by more than the margin."""
    return scores.candidate < scores.live - margin


class PromotionGate:
    """Decides, one new version at a time in its own thread, whether it goes live (module docstring).

    generate: results for requests in order, within a timeout (`Service.generate_in_turn`, which
    keeps them inside the server's queue bound; `Engine.generate` runs them all at once);
    count_tokens: the base tokenizer's token count of a text. Requests for the name keep resolving to the live version
    until the decision, which the registry applies under its lock (`AdapterRegistry.make_live`,
    `AdapterRegistry.hold_back`).
    """

    def __init__(self, registry: AdapterRegistry, generate: Callable[..., list[ChatResult]],
                 count_tokens: Callable[[str], int], settings: GateSettings = GateSettings()):
        self.registry, self.settings = registry, settings
        self._generate, self._count_tokens = generate, count_tokens
        self._jobs: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self._idle = threading.Condition()
        self._busy = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="promotion-gate", daemon=True)
        self._thread.start()

    def submit(self, name: str, version: str) -> None:
        """Check `version` of `name` when the jobs before it are done (the registry's hook: returns at once)."""
        with self._idle:
            self._busy += 1
        self._jobs.put((name, version))

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every submitted version is decided; False when `timeout` passed first."""
        with self._idle:
            return self._idle.wait_for(lambda: self._busy == 0, timeout)

    def report(self, name: str) -> GateReport | None:
        """The last decision about `name`, as kept in the store (it survives a restart)."""
        text = self.registry.store.read_note(name)
        return GateReport.from_json(text) if text else None

    def close(self, timeout: float = 30.0) -> None:
        """Stop deciding; a check still running is abandoned, its version left where the store has it."""
        self._stop.set()
        self._jobs.put(None)
        self._thread.join(timeout)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None and not self._stop.is_set():
            try:
                self.decide(*job)
            except Exception:  # applying a verdict failed (the store's disk): logged, the gate goes on
                log.exception("promotion gate: the verdict on %s@%s could not be applied", *job)
            finally:
                self.registry.finish_gate(*job)
                with self._idle:
                    self._busy -= 1
                    self._idle.notify_all()

    def decide(self, name: str, version: str) -> GateReport | None:
        """Check one new version against the live one and apply the verdict; None when abandoned
        (the server is closing, or the name is no longer served)."""
        live = self.registry.live_entry(name)
        if live is None or live.path.name == version or self.registry.store.version_folder(name, version) is None:
            return None  # no longer served, made live meanwhile (a promote), or pruned
        try:
            candidate = self.registry.resolve(f"{name}@{version}")
        except UnknownAdapterError as err:
            return self._apply(self._rejected(name, live, version, f"not servable: {err.reason or err}"))
        try:
            report = self.evaluate(live, candidate)
        except Exception as err:  # a defect of the check: the live version stays, and the report says why
            log.exception("promotion gate: checking %s@%s failed", name, version)
            report = self._rejected(name, live, version, f"could not be checked: {type(err).__name__}: {err}")
        return None if report is None else self._apply(report)

    def evaluate(self, live: AdapterEntry, candidate: AdapterEntry) -> GateReport | None:
        """The report on `candidate` against `live` (not applied); None when the server closed mid-check."""
        golden = candidate.card.golden if candidate.card else []
        base = dict(name=live.name, live_version=live.path.name, candidate_version=candidate.path.name,
                    margin=self.settings.margin, prompts=len(golden))
        if not golden:
            return GateReport(verdict=UNCHECKED, reason="its card has no golden prompts", **base)
        scores = self._replay(live, candidate, golden)
        if scores is None:
            return None
        verdict = HELD if scores.candidate_failed or holds_back(scores, self.settings.margin) else PROMOTED
        reason = "; ".join(scores.errors)
        return GateReport(verdict=verdict, live_score=scores.live, candidate_score=scores.candidate,
                          regressed=scores.regressed, reason=reason, **base)

    def _replay(self, live: AdapterEntry, candidate: AdapterEntry, golden: Sequence[GoldenPrompt]) -> Scores | None:
        """Both versions' replies to the golden prompts, each prompt's two requests side by side so
        they share decode steps (`generate` runs them a few places at a time, in order)."""
        pairs = zip(golden_requests(f"{live.name}@{live.path.name}", golden, self._count_tokens),
                    golden_requests(f"{candidate.name}@{candidate.path.name}", golden, self._count_tokens))
        requests = [request for pair in pairs for request in pair]
        try:
            results = self._generate(requests, timeout=GATE_TIMEOUT_S)
        except TimeoutError:
            results = [ChatResult(r.adapter, error=f"no reply within {GATE_TIMEOUT_S:.0f} s") for r in requests]
        if self._stop.is_set():
            return None  # replies cut short by shutdown decide nothing
        return score(golden, results[0::2], results[1::2])

    def _rejected(self, name: str, live: AdapterEntry, version: str, reason: str) -> GateReport:
        return GateReport(name, live.path.name, version, REJECTED, self.settings.margin, 0, reason=reason)

    def _apply(self, report: GateReport) -> GateReport:
        """Make the verdict true in the registry and the store, then keep the report."""
        if report.verdict in (PROMOTED, UNCHECKED):
            self.registry.make_live(report.name, report.candidate_version)
        else:
            self.registry.hold_back(report.name, report.candidate_version, keep_candidate=report.verdict == HELD)
        self.registry.store.write_note(report.name, report.to_json())
        log.info("promotion gate: %s@%s %s (live %s: %s vs %s)", report.name, report.candidate_version, report.verdict,
                 report.live_version, report.candidate_score, report.live_score)
        return report
