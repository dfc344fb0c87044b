"""What the web UI's tabs do, without gradio: the mix builder's spelling, the examples it offers, the
blind A/B session, the token view of an answer. serve/ui.py lays out the components and calls these;
tests call them directly.
"""

from __future__ import annotations

import html
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from adapters import Message
from adapters.cli import opt
from serve.mixes import Part, is_mix, make_mix, parse_mix
from serve.preferences import BlindPair, PreferenceLog, blind_order
from serve.engine import AdapterLoadError, SamplingParams
from serve.registry import BASE_NAME
from serve.service import Timing, divergence
from serve.token_view import compare_with_base, render

MIX_ROWS = 3
"""Adapters the builder offers to mix (the first row included); the API takes more (serve/mixes.py)."""
MAX_EXAMPLES = 8
PREFERENCES_FILE = "preferences.jsonl"


@dataclass(frozen=True)
class UiSettings:
    preferences_path: str | None = opt(None, "JSONL file the blind A/B votes go to, in TRL's preference format (ties "
                                             "beside it in <stem>.ties.jsonl); default: preferences.jsonl in --reports.")
    train_data_roots: tuple[str, ...] = opt(("data",), "A folder the Train tab may read datasets from (uploads go to "
                                                       "<the first>/uploads); repeat the flag for several. An empty "
                                                       "list (train_data_roots: [] in a config file) turns the Train "
                                                       "tab off.", action="append", metavar="DIR")
    train_runs_dir: str = opt("runs", "Where the Train tab's runs keep their logs, progress and checkpoints.")

    def preferences_file(self, reports: str | Path) -> Path:
        """Where votes go: the setting, else beside the eval matrix in the service's reports folder."""
        return Path(self.preferences_path) if self.preferences_path else Path(reports) / PREFERENCES_FILE


def spell_mix(picks: Sequence[tuple[str | None, float]]) -> str:
    """The compact spelling (`json*0.5+sentiment`) of the builder's rows, each an adapter and its
    strength, in order; a row without an adapter, or on the base, adds nothing; no adapter at
    all is the base. MixError (a ValueError) names a row that is wrong (one adapter twice)."""
    parts = [Part(name, round(float(scale), 3)) for name, scale in picks if name and name != BASE_NAME]
    if not parts:
        return BASE_NAME
    return make_mix(parts, "mix").spelling()


def mix_names(spelling: str) -> list[str]:
    """The adapters a spelling names, in order (none for the base)."""
    if spelling == BASE_NAME:
        return []
    if not is_mix(spelling):
        return [spelling]
    return [part.name for part in parse_mix(spelling).parts]


def example_prompts(service, chosen: str | Sequence[str]) -> list[str]:
    """Example prompts for the chosen adapters (their cards'): `chosen` is one spelling or several
    (Compare's columns). For the base alone, every adapter's, so a newcomer sees what each is for."""
    spellings = [chosen] if isinstance(chosen, str) else list(chosen)
    names = [name for spelling in spellings for name in mix_names(spelling)]
    names = names or [n for n in service.model_names() if n != BASE_NAME]
    return list(service.examples(list(dict.fromkeys(names))))[:MAX_EXAMPLES]


def compare_names(picked: Sequence[str], mixes: str) -> list[str]:
    """The Compare columns: the adapters ticked, then each mix written one per line."""
    extra = [line.strip() for line in mixes.splitlines() if line.strip()]
    return list(picked) + [m for m in extra if m not in picked]


def add_mix_line(mixes: str, spelling: str) -> str:
    """The mixes box with `spelling` appended, unless it is already there."""
    lines = [line for line in mixes.splitlines() if line.strip()]
    return "\n".join(lines if spelling in lines else lines + [spelling])


# -- chat and compare ---------------------------------------------------------------------

ADAPTER_HEADERS = ["name", "task", "base", "rank", "alpha", "trainable share", "eval metric (base -> adapter)", "trained",
                   "status"]


def adapter_table(service) -> list[list]:
    """The Adapters tab's registry table: one row per adapter (Service.adapter_rows)."""
    return [[r.name, r.task, r.base, r.rank or "", r.alpha or "", f"{r.trainable_share:.3%}" if r.trainable_share else "",
             r.metric, r.trained, r.status] for r in service.adapter_rows()]


def loss_curve(service, name: str | None) -> str | None:
    """The chosen adapter's loss-curve image, if its folder has one."""
    row = next((r for r in service.adapter_rows() if r.name == name), None)
    return str(row.loss_curve) if row and row.loss_curve else None


def sampling(temperature: float, top_p: float, max_new_tokens: float, seed: float | None = None,
            logprobs: int | None = None) -> SamplingParams:
    """The request's sampling settings from the UI's sliders (gradio hands numbers over as floats)."""
    return SamplingParams(temperature=float(temperature), top_p=float(top_p), max_new_tokens=int(max_new_tokens),
                          seed=None if seed in (None, "") else int(seed), logprobs=logprobs)


def conversation(system: str, turns: list[dict]) -> list[Message]:
    """The messages a chat sends: the system prompt, if any, then the (role, content) turns."""
    prefix = [Message("system", system)] if system.strip() else []
    return prefix + [Message(t["role"], t["content"]) for t in turns]


def labelled(turns: list[dict]) -> list[dict]:
    """The chatbot's view: each reply labelled with the adapter that wrote it."""
    shown = []
    for turn in turns:
        if turn["role"] == "assistant":
            shown.append({"role": "assistant", "content": f"**[{turn['adapter']}]** {turn['content']}"})
        else:
            shown.append({"role": "user", "content": turn["content"]})
    return shown


def marked(answer: str, reference: str | None) -> str:
    """HTML of an answer with the part after its first departure from the reference highlighted."""
    if reference is None:
        return html.escape(answer)
    at = divergence(reference, answer)
    if at is None:
        return html.escape(answer) + " <small>(same as reference)</small>"
    words = answer.split()
    same, rest = " ".join(words[:at]), " ".join(words[at:])
    return f"{html.escape(same)} <mark title='first departure from the reference'>{html.escape(rest) or '(ends here)'}</mark>"


def answer_column(name: str, text: str, timing: Timing, done: bool) -> str:
    """One Compare column: the adapter (or mix), its answer's HTML (`text`, already escaped) and,
    once done, its token count, speed and latency."""
    first = f"{timing.first_token_s:.2f}" if timing.first_token_s is not None else "-"
    stats = (f"{timing.tokens} tokens, {timing.tokens_per_s:.1f} tok/s, first token {first} s, total {timing.total_s:.2f} s"
             if done else "generating...")
    return f"<div class='compare-answer'><h4>{html.escape(name)}</h4><p><small>{stats}</small></p><p>{text}</p></div>"


def blind_answer(side: str, text: str) -> str:
    """One blind answer, under its letter only."""
    return f"<div class='ab-text'><h4>{side}</h4><p>{html.escape(text)}</p></div>"


# -- token view ---------------------------------------------------------------------------

def token_view_html(service, name: str, messages: Sequence[Message], result) -> str:
    """An answer coloured token by token against the base (serve/token_view.py); the base's own
    answer, one that failed, or one the base could not score is shown as plain text with the reason."""
    if result.error:
        return html.escape(result.error)
    if name == BASE_NAME:
        return html.escape(result.text) + " <small>(the base: nothing to compare against)</small>"
    tokenizer = service.base.tokenizer
    try:
        shifts = compare_with_base(service.engine.score, messages, result.logprobs,
                                   lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
    except (ValueError, KeyError, AdapterLoadError) as err:  # a request error, an adapter gone or failing to load
        return html.escape(result.text) + f" <small>(no token view: {html.escape(str(err))})</small>"
    return render(shifts)


# -- blind A/B ----------------------------------------------------------------------------

@dataclass
class BlindSession:
    """One browser session's blind comparison: the pair on screen and whether it was voted on
    (a pair takes one vote; the names are shown once it has)."""

    pair: BlindPair | None = None
    voted: str | None = None
    rng: random.Random = field(default_factory=random.Random)

    def draw(self, first: str, second: str) -> tuple[str, str]:
        """A new comparison's order: which adapter's answer is A and which is B."""
        self.pair, self.voted = None, None
        return blind_order(first, second, self.rng)

    def show(self, prompt: Sequence[Message], order: tuple[str, str], answers: tuple[str, str]) -> None:
        self.pair = BlindPair(tuple(prompt), order, answers)

    def vote(self, log: PreferenceLog, choice: str) -> dict:
        """Record `choice` for the pair on screen; ValueError when there is none or it has its vote."""
        if self.pair is None:
            raise ValueError("get two answers first")
        if self.voted is not None:
            raise ValueError(f"this pair already has its vote ({self.voted}); get two new answers")
        row = log.record(self.pair, choice)
        self.voted = choice
        return row

    def reveal(self) -> str:
        """Markdown naming who wrote A and B, and the vote; empty until voted."""
        if self.pair is None or self.voted is None:
            return ""
        a, b = self.pair.adapters
        verdict = {"A": f"you preferred **A ({a})**", "B": f"you preferred **B ({b})**", "tie": "you called it a **tie**"}
        return f"A was **{a}**, B was **{b}**: {verdict[self.voted]}."


def preference_rows(log: PreferenceLog) -> list[list]:
    """The Adapters tab's vote table: one row per adapter pair."""
    return [[s.first, s.second, s.first_wins, s.second_wins, s.ties, s.votes] for s in log.summary()]


PREFERENCE_HEADERS = ["adapter", "other", "adapter wins", "other wins", "ties", "votes"]


# -- versions and the promotion gate ------------------------------------------------------

VERSION_HEADERS = ["version", "trained", "pointer", "status", "metric (base -> adapter)", "eval examples", "r", "alpha",
                   "learning rate", "golden prompts"]
REGRESSED_HEADERS = ["prompt", "expected", "live answer", "candidate answer"]


def _pointer(row) -> str:
    marks = [label for label, on in (("live", row.live), ("candidate", row.candidate), ("rollback target", row.rollback_target)) if on]
    return ", ".join(marks)


def _metric(row) -> str:
    if row.metric is None or row.adapter_metric is None:
        return "-"
    base = f"{row.base_metric:.3f} -> " if row.base_metric is not None else ""
    return f"{row.metric} {base}{row.adapter_metric:.3f}"


def version_rows(service, name: str) -> list[list]:
    """Every stored version of `name` with its card's numbers side by side (Service.versions), newest first."""
    return [[row.version, row.created_at, _pointer(row), row.status, _metric(row), row.eval_examples or "", row.r or "",
             row.alpha or "", f"{row.learning_rate:g}" if row.learning_rate else "", row.golden]
            for row in reversed(service.versions(name))]


def gate_text(report) -> str:
    """Markdown of the gate's last decision (Service.gate_report); what it says when there is none."""
    if report is None:
        return "The promotion gate has not decided about this adapter (no new version arrived while serving)."
    scores = ""
    if report.live_score is not None and report.candidate_score is not None:
        scores = (f": exact match on {report.prompts} golden prompts, live **{report.live_score:.3f}**, "
                  f"new **{report.candidate_score:.3f}** (margin {report.margin:g})")
    reason = f"\n\n{report.reason}" if report.reason else ""
    return (f"**Gate: {report.verdict}** version `{report.candidate_version}` against live `{report.live_version}`"
            f"{scores}, {report.decided_at}.{reason}")


def regressed_rows(report) -> list[list[str]]:
    """The golden prompts the live version got right and the new one wrong."""
    return [[p.prompt, p.expected, p.live_answer, p.candidate_answer] for p in (report.regressed if report else ())]


def pointers_text(pointers) -> str:
    """Markdown of a name's pointers after a promote or a rollback (Service.VersionPointers)."""
    return (f"**{pointers.name}**: live `{pointers.live or '-'}`, candidate `{pointers.candidate or '-'}`, "
            f"rollback target `{pointers.rollback_target or '-'}`")


@dataclass(frozen=True)
class VersionsView:
    """What the Adapters tab shows for one adapter: its versions, the gate's last word, the versions to promote."""

    rows: list[list]
    gate: str
    regressed: list[list[str]]
    versions: list[str]


def versions_view(service, name: str | None) -> VersionsView:
    """The chosen adapter's versions and gate report (empty when none is chosen); UnknownAdapterError as Service.versions."""
    if not name:
        return VersionsView([], "", [], [])
    rows, report = version_rows(service, name), service.gate_report(name)
    return VersionsView(rows, gate_text(report), regressed_rows(report), [r[0] for r in rows])


def move_pointer(service, name: str | None, version: str | None, action: str) -> str:
    """Promote `version` (None or empty: the candidate) or roll back; where the pointers stand after.
    ValueError without an adapter; Service.promote's and rollback's errors as they raise them."""
    if not name:
        raise ValueError("choose an adapter")
    if action not in ("promote", "rollback"):
        raise ValueError(f"unknown pointer move {action!r}")
    moved = service.promote(name, version or None) if action == "promote" else service.rollback(name)
    return pointers_text(moved)
