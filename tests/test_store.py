"""The adapter store: names are not paths; versions are published whole and the previous one kept."""

from __future__ import annotations

import pytest

from adapters.store import AdapterNameError, AdapterStore, check_name


@pytest.mark.parametrize("name", ["../x", "a/b", "a\\b", "..", ".hidden", "", "a" * 65, "base", "x..y", "/abs"])
def test_path_like_and_reserved_names_are_refused(tmp_path, name):
    with pytest.raises(AdapterNameError):
        AdapterStore(tmp_path).path(name)


def test_a_symlink_escaping_the_store_is_refused(tmp_path):
    (tmp_path / "store").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "store" / "sneaky").symlink_to(tmp_path / "outside")
    with pytest.raises(AdapterNameError, match="outside the store"):
        AdapterStore(tmp_path / "store").path("sneaky")


def test_publish_swaps_whole_versions_and_keeps_the_previous(tmp_path):
    store = AdapterStore(tmp_path, keep_versions=2)
    for text in ("one", "two", "three"):
        with store.write("task-a") as folder:
            (folder / "weights").write_text(text)
    assert (store.path("task-a") / "weights").read_text() == "three"
    assert [(v / "weights").read_text() for v in store.versions("task-a")] == ["two", "three"]
    assert store.names() == ["task-a"]


def test_a_failed_write_leaves_the_current_version(tmp_path):
    store = AdapterStore(tmp_path)
    with store.write("a") as folder:
        (folder / "weights").write_text("good")
    with pytest.raises(RuntimeError):
        with store.write("a") as folder:
            (folder / "weights").write_text("half")
            raise RuntimeError("crash")
    assert (store.path("a") / "weights").read_text() == "good"
    assert not any((tmp_path / ".staging").iterdir())


def test_a_folder_dropped_in_by_hand_becomes_the_previous_version(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "weights").write_text("by hand")
    store = AdapterStore(tmp_path)
    with store.write("a") as folder:
        (folder / "weights").write_text("trained")
    assert (store.path("a") / "weights").read_text() == "trained"
    assert [(v / "weights").read_text() for v in store.versions("a")] == ["by hand", "trained"]


def test_check_name_accepts_plain_names():
    assert check_name("uppercase-v2.1_x") == "uppercase-v2.1_x"
