"""Adapter versions: cards carry golden prompts and examples (old cards still read), a version is
addressable as name@<version>, the store's pointers move atomically and survive a new registry, and
pruning never deletes the live version, the candidate or the rollback target (docs/versions.md)."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

from adapters.card import CARD_FILE, AdapterCard, read_card
from adapters.chat import Message
from adapters.data import Example
from adapters.store import AdapterStore, UnknownVersionError
from serve.registry import AdapterRegistry, NoVersionError, UnknownAdapterError
from tests.conftest import ANIMAL_COLORS


@pytest.fixture(scope="module")
def shape(tiny_base):
    from adapters import BaseConfig, BaseShape, load_base

    base = load_base(BaseConfig(str(tiny_base)))
    return BaseShape.of(base.model, base.fingerprint)


def republish(store: AdapterStore, name: str, source: Path | None = None) -> str:
    """Publish a copy of `source` (default: the name's live folder) as a new version; its folder name."""
    source = (source or store.path(name)).resolve()
    with store.write(name) as folder:
        for file in source.iterdir():
            shutil.copy2(file, folder / file.name)
    return store.live_version(name)


def published_copy(two_adapters: AdapterStore, root: Path) -> AdapterStore:
    """A copy of the trained store whose names are published versions (the fixture's copy holds
    plain folders, which have no versions to move between)."""
    shutil.copytree(two_adapters.root, root)
    store = AdapterStore(root, keep_versions=4)
    for name in store.names():
        republish(store, name)
    return store


@pytest.fixture
def store(two_adapters, tmp_path) -> AdapterStore:
    return published_copy(two_adapters, tmp_path / "store")


# -- cards ---------------------------------------------------------------------------------

def test_a_trained_card_carries_golden_prompts_and_examples_from_its_eval_set(two_adapters):
    card = read_card(two_adapters.path("colors"))
    expected = {f"Color of {animal}?": color for animal, color in ANIMAL_COLORS.items()}
    assert len(card.golden) == len(expected)  # the eval set has 6 rows, fewer than the default 16
    assert {g.messages[-1]["content"]: g.expected for g in card.golden} == expected
    assert all(g.prompt()[-1] == Message("user", g.messages[-1]["content"]) for g in card.golden)
    users = [e.user for e in card.examples]
    assert len(users) == 4 and len(set(users)) == 4 and set(users) <= set(expected)
    assert json.loads((two_adapters.path("colors") / CARD_FILE).read_text())["golden"][0].keys() == {"messages", "expected"}


def test_a_card_written_before_golden_prompts_still_reads_with_none(two_adapters, tmp_path):
    data = json.loads((two_adapters.path("colors") / CARD_FILE).read_text())
    del data["golden"], data["examples"]
    (tmp_path / CARD_FILE).write_text(json.dumps(data))
    card = read_card(tmp_path)
    assert (card.golden, card.examples, card.name) == ([], [], "colors")


@pytest.mark.parametrize("golden, field", [([{"messages": [], "expected": "x"}], r"golden\[0\]: "),
                                           ([{"messages": [{"role": "robot", "content": "hi"}], "expected": "x"}],
                                            r"golden\[0\].messages\[0\]"),
                                           ([{"messages": [{"role": "user", "content": "hi"}], "expected": 3}],
                                            r"golden\[0\].expected")])
def test_a_malformed_golden_prompt_is_refused_naming_the_field(two_adapters, tmp_path, golden, field):
    data = json.loads((two_adapters.path("colors") / CARD_FILE).read_text())
    (tmp_path / CARD_FILE).write_text(json.dumps({**data, "golden": golden}))
    with pytest.raises(ValueError, match=field):
        read_card(tmp_path)


def test_prompts_are_a_seeded_sample_in_eval_order_with_their_system_prompt(two_adapters):
    from train.save import PromptSample, with_prompts

    card = read_card(two_adapters.path("colors"))
    bare = AdapterCard.from_dict({**card.to_dict(), "golden": [], "examples": []})
    evals = [Example((Message("system", "Be brief."), Message("user", f"q{i}"), Message("assistant", f"a{i}")), i + 1)
             for i in range(40)]
    first = with_prompts(bare, evals, PromptSample(golden=16, examples=3))
    assert first == with_prompts(bare, evals, PromptSample(golden=16, examples=3))  # seeded: the same sample
    lines = [int(g.expected[1:]) for g in first.golden]
    assert len(lines) == 16 and lines == sorted(lines) and lines != list(range(16))  # a sample, in eval order
    assert first.golden[0].messages[0] == {"role": "system", "content": "Be brief."}
    assert len(first.examples) == 3 and all(e.system == "Be brief." for e in first.examples)
    assert with_prompts(first, evals[:2]).golden == first.golden  # a card that carries some keeps them


# -- the store's pointers --------------------------------------------------------------------

def publish_text(store: AdapterStore, name: str, text: str) -> str:
    with store.write(name) as folder:
        (folder / "weights").write_text(text)
    return store.live_version(name)


def test_pointers_move_by_rename_and_refuse_versions_not_stored(tmp_path):
    store = AdapterStore(tmp_path)
    one, two = publish_text(store, "a", "one"), publish_text(store, "a", "two")
    assert store.point("a", one) == two and (store.path("a") / "weights").read_text() == "one"
    store.set_pointer("a", "candidate", two)
    assert (store.pointer("a", "candidate"), store.pointer("a", "previous")) == (two, None)
    assert (tmp_path / ".candidates" / "a").readlink() == Path("..") / ".versions" / "a" / two  # relative: the store moves whole
    with pytest.raises(UnknownVersionError, match=f"no stored version '../a'.*stored: {one}, {two}"):
        store.point("a", "../a")
    store.set_pointer("a", "candidate", None)
    assert store.pointer("a", "candidate") is None
    assert not [p for p in (tmp_path / ".staging").iterdir()]  # no link debris left


def test_pruning_keeps_the_live_version_the_candidate_and_the_rollback_target(tmp_path):
    store = AdapterStore(tmp_path, keep_versions=2)
    v1, v2, v3, v4 = (publish_text(store, "a", f"v{i}") for i in range(1, 5))  # only v3 and v4 are kept by count
    assert [v.name for v in store.versions("a")] == [v3, v4]
    store.point("a", v3)  # rolled back: v3 live, v4 newer
    store.set_pointer("a", "candidate", v4)
    store.set_pointer("a", "previous", v4)
    v5 = publish_text(store, "a", "v5")  # v3 is the version it replaced: a gate may keep it live
    assert [v.name for v in store.versions("a")] == [v3, v4, v5]
    store.set_pointer("a", "candidate", None)
    store.set_pointer("a", "previous", v3)
    v6 = publish_text(store, "a", "v6")
    assert [v.name for v in store.versions("a")] == [v3, v5, v6]  # v4 is nothing any more, v3 the rollback target
    assert store.rollback_target("a") == v3 and v1 not in {v.name for v in store.versions("a")} and v2 != v3


def test_without_a_recorded_previous_version_rollback_targets_the_newest_older_one(tmp_path):
    store = AdapterStore(tmp_path, keep_versions=4)
    v1, v2, v3 = (publish_text(store, "a", f"v{i}") for i in range(1, 4))
    assert store.rollback_target("a") == v2
    store.set_pointer("a", "candidate", v2)
    assert store.rollback_target("a") == v1  # the candidate was never live
    store.point("a", v1)
    assert store.rollback_target("a") is None


# -- name@version --------------------------------------------------------------------------

def test_a_version_resolves_by_its_folder_name_is_checked_once_and_shares_the_live_key(store, shape, monkeypatch):
    import serve.registry

    old = store.live_version("colors")
    new = republish(store, "colors")
    checks = []
    real = serve.registry.check_adapter
    monkeypatch.setattr(serve.registry, "check_adapter", lambda *a: checks.append(a[0]) or real(*a))
    registry = AdapterRegistry(store, shape)
    registry.refresh()
    live = registry.resolve("colors")
    assert registry.resolve(f"colors@{new}") is live and registry.resolve("colors@live") is live
    previous = registry.resolve(f"colors@{old}")
    assert previous.path.name == old and previous.key == f"colors@{old}".replace(".", "%") != live.key
    assert registry.resolve(f"colors@{old}") is previous
    assert [Path(c).name for c in checks].count(old) == 1  # checked once, then kept
    with pytest.raises(UnknownAdapterError, match=r"no stored version 'nope'"):
        registry.resolve("colors@nope")
    with pytest.raises(UnknownAdapterError, match="has no candidate version"):
        registry.resolve("colors@candidate")


def test_promote_and_rollback_flip_the_link_and_the_entry_and_a_new_registry_keeps_them(store, shape):
    old = store.live_version("colors")
    registry = AdapterRegistry(store, shape)
    registry.refresh()
    handed = []
    registry.set_gate(lambda *job: handed.append(job))
    new = republish(store, "colors")
    assert registry.refresh().replaced == [] and registry.refresh().replaced == []
    assert handed == [("colors", new)]  # handed to the gate once, however many scans see it
    assert registry.resolve("colors").path.name == old  # served until the gate decides
    registry.hold_back("colors", new)  # as the gate does when `new` loses: link back to `old`, `new` the candidate
    registry.finish_gate("colors", new)
    assert (store.live_version("colors"), registry.candidate("colors")) == (old, new)
    restarted = AdapterRegistry(store, shape)
    restarted.refresh()
    assert restarted.resolve("colors").path.name == old and restarted.resolve("colors@candidate").path.name == new
    assert restarted.promote("colors").path.name == new
    assert (store.live_version("colors"), store.pointer("colors", "candidate"), store.rollback_target("colors")) == (new, None, old)
    with pytest.raises(NoVersionError, match="no candidate") as err:
        restarted.promote("colors")
    assert err.value.what == "candidate"
    assert restarted.rollback("colors").path.name == old
    assert restarted.rollback("colors").path.name == new  # a second rollback undoes the first
    restarted.refresh()  # the scan sees the link where the registry put it: nothing changes
    assert restarted.resolve("colors").path.name == new
    with pytest.raises(UnknownAdapterError):
        restarted.rollback("nothing")


def test_resolving_during_flips_always_gets_one_whole_version(store, shape):
    old = store.live_version("colors")
    new = republish(store, "colors")
    registry = AdapterRegistry(store, shape)
    registry.refresh()
    entries = [registry.resolve(f"colors@{v}") for v in (old, new)]
    seen, stop = [], threading.Event()

    def resolve_until_stopped():
        while not stop.is_set():
            seen.append(registry.resolve("colors"))

    reader = threading.Thread(target=resolve_until_stopped)
    reader.start()
    for _ in range(20):
        registry.rollback("colors")
    stop.set()
    reader.join()
    assert seen and all(any(e is entry for entry in entries) for e in seen)  # one version's whole entry each
    assert registry.resolve("colors").path.name == store.live_version("colors")


def test_a_check_a_restart_interrupted_is_taken_up_again_with_the_held_version_live(store, shape):
    old = store.live_version("colors")
    first = AdapterRegistry(store, shape)
    first.refresh()
    first.set_gate(lambda *job: None)  # a gate that never decides: the server stops mid-check
    new = republish(store, "colors")
    first.refresh()
    assert (store.live_version("colors"), store.pointer("colors", "held")) == (new, old)
    restarted, handed = AdapterRegistry(store, shape), []
    restarted.set_gate(lambda *job: handed.append(job))
    restarted.refresh()
    assert restarted.resolve("colors").path.name == old and handed == [("colors", new)]
    restarted.make_live("colors", new)  # the verdict: the held pointer goes, the old version is the rollback target
    assert (store.pointer("colors", "held"), store.rollback_target("colors")) == (None, old)
