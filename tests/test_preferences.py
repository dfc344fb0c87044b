"""Blind A/B votes: the order drawn, the TRL preference rows written, ties apart, concurrent appends, the summary."""

from __future__ import annotations

import json
import random
import threading

import pytest

from adapters import Message
from serve.preferences import BlindPair, PairSummary, PreferenceLog, blind_order, vote_row

PROMPT = (Message("system", "Answer briefly."), Message("user", "Color of cat?"))


def pair(a: str = "colors", b: str = "sizes") -> BlindPair:
    return BlindPair(PROMPT, (a, b), (f"answer of {a}", f"answer of {b}"))


def test_blind_order_shows_both_orders_and_keeps_the_pair():
    rng = random.Random(0)
    orders = [blind_order("colors", "json*0.5+sizes", rng) for _ in range(200)]
    assert set(orders) == {("colors", "json*0.5+sizes"), ("json*0.5+sizes", "colors")}
    first = sum(o[0] == "colors" for o in orders)
    # A fair coin: 200 draws land within 4.5 standard deviations (sqrt(200)/2 ~ 7.1) of 100.
    assert abs(first - 100) < 4.5 * 7.1


def test_blind_order_refuses_a_missing_adapter():
    with pytest.raises(ValueError, match="choose two"):
        blind_order("colors", " ", random.Random(0))


def test_a_vote_is_a_trl_conversational_preference_row():
    row = vote_row(pair(), "B", time="2026-01-01T00:00:00+00:00")
    assert row["prompt"] == [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Color of cat?"}]
    assert row["chosen"] == [{"role": "assistant", "content": "answer of sizes"}]
    assert row["rejected"] == [{"role": "assistant", "content": "answer of colors"}]
    assert (row["chosen_adapter"], row["rejected_adapter"]) == ("sizes", "colors")
    assert row["time"] == "2026-01-01T00:00:00+00:00"
    a = vote_row(pair(), "A")
    assert (a["chosen_adapter"], a["chosen"][0]["content"]) == ("colors", "answer of colors")


def test_an_unknown_choice_is_refused_by_name():
    with pytest.raises(ValueError, match="'C' is not one of A, B, tie"):
        vote_row(pair(), "C")


def test_ties_go_to_their_own_file_and_never_into_the_pairs(tmp_path):
    log = PreferenceLog(tmp_path / "votes" / "prefs.jsonl")
    log.record(pair(), "A")
    log.record(pair(), "tie")
    assert log.ties_path == tmp_path / "votes" / "prefs.ties.jsonl"
    pairs = [json.loads(line) for line in log.path.read_text().splitlines()]
    ties = [json.loads(line) for line in log.ties_path.read_text().splitlines()]
    assert len(pairs) == 1 and "chosen" in pairs[0]
    assert len(ties) == 1 and "chosen" not in ties[0] and ties[0]["adapters"] == ["colors", "sizes"]


def test_summary_counts_wins_losses_and_ties_per_pair_whatever_the_order_shown(tmp_path):
    log = PreferenceLog(tmp_path / "prefs.jsonl")
    log.record(pair("colors", "sizes"), "A")  # colors wins
    log.record(pair("sizes", "colors"), "A")  # sizes wins
    log.record(pair("sizes", "colors"), "B")  # colors wins
    log.record(pair("sizes", "colors"), "tie")
    log.record(pair("base", "colors"), "B")  # colors beats base
    assert log.summary() == [PairSummary("base", "colors", 0, 1, 0), PairSummary("colors", "sizes", 2, 1, 1)]
    assert log.summary()[1].votes == 4


def test_a_missing_file_has_no_votes(tmp_path):
    assert PreferenceLog(tmp_path / "none.jsonl").summary() == []


def test_a_bad_line_is_named_with_its_file_and_line(tmp_path):
    log = PreferenceLog(tmp_path / "prefs.jsonl")
    log.record(pair(), "A")
    with log.path.open("a") as f:
        f.write('{"prompt": [], "chosen": []}\n')
    with pytest.raises(ValueError, match=r"prefs.jsonl line 2: no field 'rejected'"):
        log.summary()
    log.path.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"prefs.jsonl line 1: not JSON"):
        log.preferences()


def test_concurrent_votes_each_land_as_one_whole_line(tmp_path):
    log = PreferenceLog(tmp_path / "prefs.jsonl")
    # Answers far larger than a pipe buffer or a page, so an unlocked split write would interleave.
    big = BlindPair(PROMPT, ("colors", "sizes"), ("x" * 200_000, "y" * 200_000))
    threads = [threading.Thread(target=lambda: [log.record(big, "AB"[i % 2]) for i in range(6)]) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = log.preferences()
    assert len(rows) == 48
    assert all(len(r["chosen"][0]["content"]) == 200_000 for r in rows)
    assert log.summary() == [PairSummary("colors", "sizes", 24, 24, 0)]
