"""The adapter store: one folder per adapter name, replaced atomically, previous version kept.

Layout::

    <store>/<name>                  -> symlink to .versions/<name>/<version>
    <store>/.versions/<name>/<version>/   adapter_config.json, adapter_model.safetensors,
                                          chat_template.jinja, card.json, loss.png
    <store>/.staging/               folders being written; never served
    <store>/.candidates/<name>      -> symlink to ../.versions/<name>/<version>: a version held back
                                       by the promotion gate, served only as name@candidate
    <store>/.previous/<name>        -> symlink to the version that was live before the current one
                                       (what a rollback returns to)
    <store>/.held/<name>            -> symlink to the version a server keeps live while its promotion
                                       gate checks the newer one the name's link points to
    <store>/.notes/<name>.json      the serving side's last gate report for the name

A new version is written in full under .staging, moved under .versions, and only then is the
name's symlink swapped with one rename, so a reader sees the old adapter or the new one,
never half of one, and a reader that opened the old version keeps reading it.

Each staging entry is named after its writer (`<name>@<host>@<pid>.<start time>@<token>`), so a
later write can tell what a killed writer left (kill -9 mid-save) from what a live one is still
writing, and removes only the former. Published files get the modes the writer's umask gives
any new file (0644 and 0755 under the usual 022), whatever the library that wrote them chose.

Retention keeps `keep_versions` versions, and besides the one just published always the newest
version that was good (its card reads as strict JSON and records the task metric), so adapters
that trained to garbage, or were put in by other tools, never push the last good one out.
Nor is the live version, the candidate, or the version a rollback returns to ever pruned.

Every pointer (the name's link, a candidate, a previous version) moves by one atomic rename of a
symlink made beside it, so a reader sees the old target or the new one (docs/versions.md).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import stat
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from adapters.card import CARD_FILE, read_card

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
RESERVED_NAMES = {"base"}
POINTER_FOLDERS = {"candidate": ".candidates", "previous": ".previous", "held": ".held"}
"""The pointers a name may have besides its link: the held-back candidate, the rollback target, and
the version kept live while a newer one is checked."""
NOTES_FOLDER = ".notes"
STALE_STAGING_S = 24 * 3600
"""A staging entry whose writer cannot be checked (another host, an unknown name) is left this long."""


def _version_name() -> str:
    """Sortable by time of publication, to the nanosecond: 20261126-203000.123456789."""
    now = time.time_ns()
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime(now // 10**9)) + f".{now % 10**9:09d}"


class AdapterNameError(ValueError):
    """A name that could be a path or is otherwise not a valid adapter name."""


class UnknownVersionError(LookupError):
    """A version that is not stored for a name (or a name served from a plain folder, which has none)."""

    def __str__(self) -> str:
        return self.args[0]


def default_store_dir() -> Path:
    """`$ADAPTERS_DIR`, else `adapters/store` in this checkout (git-ignored)."""
    env = os.environ.get("ADAPTERS_DIR")
    return Path(env) if env else Path(__file__).resolve().parent / "store"


def check_name(name: str) -> str:
    """The name itself when it is a plain adapter name; AdapterNameError otherwise.

    Names are identifiers, never paths: '/', '\\', '..' and leading dots are refused.
    """
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or ".." in name:
        raise AdapterNameError(
            f"invalid adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (names are not paths)"
        )
    if name in RESERVED_NAMES:
        raise AdapterNameError(f"invalid adapter name {name!r}: reserved for the base model")
    return name


class AdapterStore:
    """Maps adapter names to folders under one root; the only place that does."""

    def __init__(self, root: Path | str | None = None, keep_versions: int = 2, stale_staging_s: float = STALE_STAGING_S):
        self.root = Path(root) if root is not None else default_store_dir()
        self.keep_versions = max(1, keep_versions)
        self.stale_staging_s = stale_staging_s

    def path(self, name: str) -> Path:
        """The folder an adapter name stands for, guaranteed to lie inside the store."""
        check_name(name)
        path = self.root / name
        resolved = path.resolve()
        if self.root.resolve() not in resolved.parents:
            raise AdapterNameError(f"adapter {name!r} resolves outside the store {self.root}")
        return path

    def names(self) -> list[str]:
        """Every entry that looks like an adapter name, sorted; hidden folders are not adapters."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if not p.name.startswith("."))

    def exists(self, name: str) -> bool:
        return self.path(name).is_dir()

    def versions(self, name: str) -> list[Path]:
        """Stored versions of an adapter, oldest first."""
        folder = self.root / ".versions" / check_name(name)
        return sorted(folder.iterdir()) if folder.is_dir() else []

    def version_folder(self, name: str, version: str) -> Path | None:
        """The stored folder of one version of `name`; None when none is called `version`.

        The version is matched against the listing, never joined into a path, so no text leads
        anywhere else.
        """
        return next((v for v in self.versions(name) if v.name == version), None)

    def live_version(self, name: str) -> str | None:
        """The stored version the name's link points to; None for a plain folder or no entry."""
        return self._target_version(self.root / check_name(name), name)

    def pointer(self, name: str, kind: str) -> str | None:
        """The version a pointer of `name` names ('candidate', 'previous' or 'held'); None when it
        has none or it names a version no longer stored."""
        return self._target_version(self._pointer_path(name, kind), name)

    def _pointer_path(self, name: str, kind: str) -> Path:
        if kind not in POINTER_FOLDERS:
            raise ValueError(f"unknown pointer {kind!r}: one of {sorted(POINTER_FOLDERS)}")
        return self.root / POINTER_FOLDERS[kind] / check_name(name)

    def _target_version(self, link: Path, name: str) -> str | None:
        if not link.is_symlink():
            return None
        target = Path(os.path.realpath(link))
        folder = self.version_folder(name, target.name)
        return folder.name if folder is not None and Path(os.path.realpath(folder)) == target else None

    def point(self, name: str, version: str) -> str | None:
        """Make the stored `version` what `name` serves, by one atomic rename of its link; returns
        the version it pointed to before. UnknownVersionError for a version not stored, or a name
        that is a plain folder (it has no versions to point between)."""
        folder = self.require_version(name, version)
        link = self.root / name
        if link.exists() and not link.is_symlink():
            raise UnknownVersionError(f"adapter {name!r} is a plain folder in {self.root}, not a published name")
        old = self.live_version(name)
        self._link(link, folder)
        return old

    def set_pointer(self, name: str, kind: str, version: str | None) -> None:
        """Point one of `name`'s pointers (POINTER_FOLDERS) at a stored version (atomically), or
        remove it (None)."""
        path = self._pointer_path(name, kind)
        if version is None:
            path.unlink(missing_ok=True)
            return
        folder = self.require_version(name, version)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._link(path, folder)

    def require_version(self, name: str, version: str) -> Path:
        """The stored folder of `version`; UnknownVersionError naming the stored ones otherwise."""
        folder = self.version_folder(name, version)
        if folder is None:
            stored = ", ".join(v.name for v in self.versions(name)) or "none"
            raise UnknownVersionError(f"adapter {name!r} has no stored version {version!r} (stored: {stored})")
        return folder

    def rollback_target(self, name: str) -> str | None:
        """The version a rollback returns to: the one recorded as previous, else the newest stored
        version older than the live one that is not the candidate; None when there is none."""
        live = self.live_version(name)
        if live is None:
            return None
        recorded = self.pointer(name, "previous")
        if recorded is not None and recorded != live:
            return recorded
        candidate = self.pointer(name, "candidate")
        older = [v.name for v in self.versions(name) if v.name < live and v.name != candidate]
        return older[-1] if older else None

    def protected_versions(self, name: str) -> set[str]:
        """What pruning never deletes: the live version, the rollback target, and every pointer's."""
        kept = {self.live_version(name), self.rollback_target(name), *(self.pointer(name, k) for k in POINTER_FOLDERS)}
        return {v for v in kept if v is not None}

    def _link(self, link: Path, folder: Path) -> None:
        """Point `link` at `folder` with one rename of a symlink made in .staging (a kill before the
        rename leaves debris where it is cleaned up); the target is relative to the link's folder."""
        tmp = self._staging_entry(link.name, ".link")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.symlink_to(os.path.relpath(folder, link.parent), target_is_directory=True)
        os.replace(tmp, link)  # the one atomic step readers can observe

    def write_note(self, name: str, text: str) -> None:
        """Keep a small text beside `name` (the serving side's last gate report), replaced atomically."""
        folder = self.root / NOTES_FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{check_name(name)}.{uuid.uuid4().hex[:8]}.tmp"
        tmp.write_text(text)
        os.replace(tmp, folder / f"{name}.json")

    def read_note(self, name: str) -> str | None:
        """The text `write_note` kept for `name`; None when there is none."""
        path = self.root / NOTES_FOLDER / f"{check_name(name)}.json"
        return path.read_text() if path.is_file() else None

    @contextmanager
    def write(self, name: str) -> Iterator[Path]:
        """Yield an empty folder to write a new version of `name` into; publish it on success.

        If the body raises, the partial folder is deleted and the current version stays. What
        dead writers left in .staging is removed first.
        """
        self.path(name)
        self.remove_stale_staging()
        staging = self._staging_entry(name)
        staging.mkdir(parents=True)
        folder_mode = stat.S_IMODE(staging.stat().st_mode)  # mkdir's 0o777 & ~umask
        try:
            yield staging
            _set_modes(staging, folder_mode)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self._publish(name, staging)

    def _staging_entry(self, name: str, suffix: str = "") -> Path:
        return self.root / ".staging" / f"{name}@{_writer_id()}@{uuid.uuid4().hex[:8]}{suffix}"

    def remove_stale_staging(self) -> list[Path]:
        """Remove the .staging entries of writers that are dead; returns what was removed.

        A writer on this host is dead when its pid is gone or now belongs to a process started
        at another time (pids are reused). Entries whose writer cannot be checked (another
        host sharing the store, a name this code did not write) go once `stale_staging_s` old.
        A live writer's entry is never removed.
        """
        folder = self.root / ".staging"
        removed = []
        for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
            alive = _staging_writer_alive(entry.name)
            if alive is None:
                alive = time.time() - _newest_mtime(entry) < self.stale_staging_s
            if not alive and _remove_entry(entry):
                removed.append(entry)
        return removed

    def _publish(self, name: str, staging: Path) -> None:
        link = self.root / name
        versions = self.root / ".versions" / name
        versions.mkdir(parents=True, exist_ok=True)
        if link.is_dir() and not link.is_symlink():
            # A folder dropped in by hand: keep it as the previous version.
            os.replace(link, versions / _version_name())
        replaced = self.live_version(name)
        final = versions / _version_name()
        os.replace(staging, final)
        self._link(link, final)
        self._prune(name, keep=final, replaced=replaced)

    def _prune(self, name: str, keep: Path, replaced: str | None = None) -> None:
        """Keep `keep`, the newest keep_versions - 1 others, the newest good one of those others,
        the version `keep` replaced (a promotion gate may keep it live), the candidate and the
        rollback target."""
        old = [v for v in self.versions(name) if v != keep]
        retained = set(old[max(0, len(old) - (self.keep_versions - 1)) :])
        last_good = next((v for v in reversed(old) if is_good_version(v)), None)
        if last_good is not None:
            retained.add(last_good)
        protected = self.protected_versions(name) | {replaced}
        retained.update(v for v in old if v.name in protected)
        for stale in old:
            if stale not in retained:
                shutil.rmtree(stale, ignore_errors=True)

    def delete(self, name: str) -> None:
        """Remove the name and every stored version of it."""
        link = self.path(name)
        if link.is_symlink() or link.is_file():
            link.unlink()
        elif link.is_dir():
            shutil.rmtree(link)
        shutil.rmtree(self.root / ".versions" / name, ignore_errors=True)
        for kind in POINTER_FOLDERS:
            self._pointer_path(name, kind).unlink(missing_ok=True)
        (self.root / NOTES_FOLDER / f"{name}.json").unlink(missing_ok=True)


def is_good_version(folder: Path) -> bool:
    """A version that was good: its card reads as strict JSON (finite numbers only) and records
    a numeric task metric. Weights are not read: a card is what every writer of this store leaves."""
    if not (Path(folder) / CARD_FILE).is_file():
        return False
    try:
        card = read_card(folder)
    except (ValueError, KeyError, TypeError, AttributeError):  # read_card lets a part that is no object through
        return False
    metric = card.metric
    return metric is not None and all(_is_number(x) for x in (metric.base, metric.adapter))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _set_modes(folder: Path, folder_mode: int) -> None:
    """Give everything in a staging folder the modes a new file gets under the writer's umask.

    safetensors' save_file (which peft's save_pretrained calls) writes its file 0600; servers
    often run as another user than training, so a published file must read as any file does:
    0644 (0755 for folders and executables) under umask 022.
    """
    file_mode = folder_mode & 0o666
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        is_executable = path.is_dir() or path.stat().st_mode & 0o111
        os.chmod(path, folder_mode if is_executable else file_mode)


def _writer_id() -> str:
    """This process as a staging writer: host, pid and the pid's start time ('' where unknown)."""
    pid = os.getpid()
    return f"{socket.gethostname()}@{pid}.{_process_start(pid)}"


def _process_start(pid: int) -> str:
    """A process's start time in clock ticks since boot (Linux /proc/<pid>/stat field 22); '' where unknown."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    fields = text.rsplit(")", 1)[-1].split()  # after the command name, which may hold spaces
    return fields[19] if len(fields) > 19 else ""


def _staging_writer_alive(entry: str) -> bool | None:
    """Whether the writer named in a staging entry still runs; None when it cannot be checked."""
    parts = entry.split("@")
    if len(parts) != 4 or parts[1] != socket.gethostname():
        return None
    pid_text, _, start = parts[2].partition(".")
    if not pid_text.isdigit() or int(pid_text) <= 0:
        return None
    pid = int(pid_text)
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, and belongs to another user
    now = _process_start(pid)
    return not start or not now or now == start


def _newest_mtime(entry: Path) -> float:
    """The latest modification under a staging entry (a writer adding files keeps it fresh)."""
    try:
        times = [entry.lstat().st_mtime]
        if entry.is_dir() and not entry.is_symlink():
            times += [p.lstat().st_mtime for p in entry.rglob("*")]
    except FileNotFoundError:  # another writer's cleanup got there first
        return time.time()
    return max(times)


def _remove_entry(entry: Path) -> bool:
    """Delete a staging entry; False (logged) where it cannot be, which never stops a publish."""
    try:
        if entry.is_symlink() or not entry.is_dir():
            entry.unlink(missing_ok=True)
        else:
            shutil.rmtree(entry)
    except FileNotFoundError:
        return True  # another writer's cleanup removed it
    except OSError as err:
        log.warning("could not remove stale staging entry %s: %s", entry, err)
        return False
    return True
