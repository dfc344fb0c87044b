"""The adapter registry: which adapters in the store can be served on this base, and why not.

Every adapter is checked when it is registered (`adapters.compat.check_adapter`: its config,
its tensors, its base, its chat template), never on its first request. A malformed entry of any
shape becomes one rejection with its reason; it never stops a scan. Clients name adapters; only
the registry maps a name to a folder. A replaced adapter gets a new key (name@version), so
requests already running on the old version finish on it.

Besides the store's adapters, the registry holds those loaded at runtime (`add_runtime`, behind
`POST /v1/load_lora_adapter`): checked the same way, kept apart from the store's so that no scan
removes them, and served until `remove_runtime`. Where a name is both, the runtime load is served.

Versions: `name@<version>` (a folder under the store's .versions/<name>), `name@live` and
`name@candidate` resolve too; a version is checked like any entry, once, and kept. With a gate
(`set_gate`, serve/gate.py), a name's link moving to a new version while it is served does not
change what `name` serves: the gate decides, and applies its verdict through `make_live` or
`hold_back`. Every move of a name's pointers (`make_live`, `hold_back`, `rollback`) is one atomic
symlink rename plus the entry's swap, both under the registry's lock, so a request resolves the
old version or the new one, and one already resolved keeps its entry. docs/versions.md
"""

from __future__ import annotations

import itertools
import logging
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from adapters.card import AdapterCard
from adapters.compat import AdapterCheckError, BaseShape, check_adapter
from adapters.store import NAME_PATTERN, RESERVED_NAMES, AdapterNameError, AdapterStore, UnknownVersionError

log = logging.getLogger(__name__)
BASE_NAME = "base"
VERSION_MARK = "@"
"""Between a name and its version in what a request names: 'json@20261126-203000.123456789'."""
LIVE, CANDIDATE = "live", "candidate"
"""The version words: the version `name` serves, and the one the promotion gate held back."""


class UnknownAdapterError(KeyError):
    """A request named an adapter that is not servable."""

    def __init__(self, name: str, available: list[str], reason: str | None = None):
        self.name, self.available, self.reason = name, available, reason
        why = f" (rejected: {reason})" if reason else ""
        super().__init__(f"unknown adapter {name!r}{why}; available: {', '.join(available)}")

    def __str__(self) -> str:
        return self.args[0]


@dataclass(frozen=True)
class AdapterEntry:
    """A servable adapter: one published version of one name."""

    name: str
    path: Path
    """The resolved version folder; it never changes under a running request."""
    card: AdapterCard | None
    rank: int
    version: str = ""
    """What tells this version apart in `key`: '' for the store's, whose version folder's name
    does; a runtime load's own tag ('runtime3'), since any folder's name may repeat."""

    @property
    def key(self) -> str:
        """Unique per version: what the engine loads the weights under.

        peft refuses '.' in adapter names; '%' never occurs in a name or a version, so the
        replacement keeps keys unique.
        """
        return f"{self.name}@{self.version or self.path.name}".replace(".", "%")


@dataclass(frozen=True)
class Rejection:
    name: str
    reason: str


class NoVersionError(LookupError):
    """A pointer move that has nothing to move to. `what` says which: 'candidate' (none held back),
    'previous' (nothing to roll back to), 'version' (no stored version by that name), 'rejected'
    (the version fails the checks against the base)."""

    def __init__(self, name: str, what: str, message: str):
        self.name, self.what = name, what
        super().__init__(message)

    def __str__(self) -> str:
        return self.args[0]


def split_version(spec: str) -> tuple[str, str | None]:
    """('json', '20261126-...') for 'json@20261126-...', ('json', None) for a plain name."""
    name, mark, version = spec.partition(VERSION_MARK)
    return name, (version if mark else None)


@dataclass(frozen=True)
class Changes:
    added: list[str]
    replaced: list[str]
    removed: list[str]
    rejected: list[str]


def name_problem(root: Path, name: str) -> str | None:
    """Why a store entry's name cannot be an adapter, specifically; None when the name is fine.

    The store refuses such names with one general message; a rejection should say what to fix.
    """
    return _spelling_problem(name) or _location_problem(Path(root), name)


def _spelling_problem(name: str) -> str | None:
    fix = "rename the folder"
    if name.startswith("."):
        return f"invalid name: starts with '.' (hidden entries are not adapters); {fix}"
    if "/" in name or "\\" in name:
        return f"invalid name: contains a path separator (names are identifiers, not paths); {fix}"
    if ".." in name:
        return f"invalid name: contains '..' (names are identifiers, not paths); {fix}"
    if len(name) > 64:
        return f"invalid name: {len(name)} characters long, names have at most 64; {fix}"
    if name in RESERVED_NAMES:
        return f"invalid name: {name!r} is reserved (a request for it gets the base model alone); {fix}"
    if not name[:1].isascii() or not name[:1].isalnum():
        return f"invalid name: starts with {name[:1]!r}, names start with a letter or digit; {fix}"
    if not NAME_PATTERN.match(name):
        bad = sorted({c for c in name if not (c.isascii() and (c.isalnum() or c in "._-"))})
        return f"invalid name: contains {bad}; use letters, digits, '.', '_' or '-'; {fix}"
    return None


def _location_problem(root: Path, name: str) -> str | None:
    entry = root / name
    if entry.is_symlink():
        target = entry.readlink()
        resolved = entry.resolve()
        if root.resolve() not in resolved.parents:
            return f"a symlink to {target}, outside the store {root}: publish adapters into the store instead"
        if not resolved.exists():
            return f"a symlink to {target}, which does not exist"
    if entry.is_file():
        return "a file, not a folder: an adapter is a folder holding adapter_config.json and adapter_model.safetensors"
    if not entry.is_dir():
        return f"{entry} is not a folder"
    return None


def _refusal_key(located: Path | Rejection) -> object:
    """What a refusal is remembered by: the name's own rejection, or the folder with its files'
    names, sizes and times, so a folder copied in by hand is checked again once its files change
    (a published version never changes)."""
    if isinstance(located, Rejection):
        return located
    try:
        return located, tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in located.iterdir()))
    except OSError:  # a file vanished or a link dangles: checked again once the folder reads
        return located, None


class AdapterRegistry:
    """Scans the store and keeps the servable and rejected adapters; safe to use from several threads."""

    def __init__(self, store: AdapterStore, base: BaseShape):
        self.store, self.base = store, base
        self._entries: dict[str, AdapterEntry] = {}
        # name -> (what was refused, as `_refusal_key` gives it; why)
        self._rejected: dict[str, tuple[object, Rejection]] = {}
        self._runtime: dict[str, AdapterEntry] = {}
        """Adapters loaded at runtime, by name: never touched by `refresh`."""
        self._runtime_tags = itertools.count(1)
        self._versions: dict[tuple[str, str], AdapterEntry | Rejection] = {}
        """(name, version folder) -> its entry or rejection: each version is checked once."""
        self._candidates: dict[str, str] = {}
        """name -> the version the store's candidate pointer names (read at each refresh)."""
        self._pending: dict[str, Path] = {}
        """name -> the new version its link points to while the gate decides."""
        self._gate: Callable[[str, str], None] | None = None
        self._lock = threading.Lock()
        # Held by a refresh and by every pointer move, so a scan never reads a move half made
        # (the link moved, the entry not yet): without it a promotion could look like a publish.
        self._moves = threading.RLock()
        self._checking = threading.Lock()  # one version's check at a time, so each is checked once
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def refresh(self) -> Changes:
        """Pick up new, replaced and deleted adapters; unchanged folders are not checked again.

        Never raises for one entry: whatever is wrong with it becomes its rejection. With a gate,
        a served name whose link moved to a new stored version keeps its entry: the gate decides.
        """
        with self._moves:
            changes = self._refresh()
            self._read_candidates()
            self._forget_deleted_versions()
        return changes

    def _refresh(self) -> Changes:
        found = self._scan_names()
        added, replaced, rejected = [], [], []
        with self._lock:
            known, refused = dict(self._entries), dict(self._rejected)
        for name, located in found.items():
            current = known.get(name)
            if current is not None and current.path == located:
                continue
            if current is None and (resumed := self._resume_held(name, located)) is not None:
                current = resumed
                added.append(name)
            if self._gated(name, current, located):
                continue
            key = _refusal_key(located)
            if name in refused and refused[name][0] == key:
                continue  # refused before, and nothing it was refused for has changed: not checked again
            outcome = located if isinstance(located, Rejection) else self._register(name, located)
            with self._lock:
                if isinstance(outcome, AdapterEntry):
                    self._entries[name] = outcome
                    self._versions[(name, located.name)] = outcome
                    self._rejected.pop(name, None)
                    (replaced if current else added).append(name)
                    self._record_previous(name, current, outcome)
                else:
                    self._entries.pop(name, None)
                    self._rejected[name] = (key, outcome)
                    rejected.append(name)
        with self._lock:
            removed = [n for n in self._entries if n not in found]
            for name in removed:
                del self._entries[name]
            for name in [n for n in self._rejected if n not in found]:
                del self._rejected[name]
            for name in [n for n in self._pending if n not in self._entries]:
                del self._pending[name]
        if added or replaced or removed or rejected:
            log.info("adapters: +%s ~%s -%s rejected %s", added, replaced, removed, rejected)
        return Changes(added, replaced, removed, rejected)

    def _scan_names(self) -> dict[str, Path | Rejection]:
        """name -> resolved folder, or the rejection of a name that does not lead to one."""
        return {name: self._locate(name) for name in self.store.names()}

    def _locate(self, name: str) -> Path | Rejection:
        try:
            return self._folder(name)
        except (OSError, RuntimeError) as err:  # a symlink loop, an unreadable entry
            return Rejection(name, f"cannot be resolved: {err}")

    def _folder(self, name: str) -> Path | Rejection:
        try:
            folder = self.store.path(name).resolve()
        except AdapterNameError as err:
            return Rejection(name, name_problem(self.store.root, name) or str(err))
        if not folder.is_dir():
            return Rejection(name, name_problem(self.store.root, name) or f"{folder} is not a folder")
        return folder

    def _register(self, name: str, folder: Path) -> AdapterEntry | Rejection:
        """The entry for a folder that passes every check, else its rejection; never raises."""
        try:
            adapter = check_adapter(folder, self.base)
        except (AdapterCheckError, ValueError, OSError) as err:
            return Rejection(name, str(err))
        except Exception as err:  # a defect no check foresaw: this entry is refused, the others still load
            log.exception("adapter %r in %s could not be checked", name, folder)
            return Rejection(name, f"could not be checked: {type(err).__name__}: {err}")
        return AdapterEntry(name, folder, adapter.card, adapter.config["r"])

    # -- runtime loads ----------------------------------------------------------------------
    def add_runtime(self, name: str, folder: Path, replace_runtime: bool = False) -> AdapterEntry | Rejection:
        """Check `folder` as a store entry is checked and serve it as `name` until `remove_runtime`,
        whatever the store's scans find. The caller confines `folder` to where adapters may be read
        (serve/management.py); this checks the adapter in it. The Rejection says why not: the
        checker's reason, or a name served already (replace_runtime: a runtime load may be replaced)."""
        taken = self._name_taken(name, replace_runtime)
        if taken:
            return Rejection(name, taken)
        outcome = self._register(name, folder)
        if isinstance(outcome, Rejection):
            return outcome
        entry = replace(outcome, version=f"runtime{next(self._runtime_tags)}")
        with self._lock:  # checked again: the store may have published the name while the check ran
            taken = self._name_taken_locked(name, replace_runtime)
            if not taken:
                self._runtime[name] = entry
        if taken:
            return Rejection(name, taken)
        log.info("adapters: loaded %r from %s at runtime", name, folder)
        return entry

    def _name_taken(self, name: str, replace_runtime: bool) -> str | None:
        with self._lock:
            return self._name_taken_locked(name, replace_runtime)

    def _name_taken_locked(self, name: str, replace_runtime: bool) -> str | None:
        if name in self._runtime and not replace_runtime:
            return f"{name!r} is loaded already (from {self._runtime[name].path})"
        if name in self._entries and name not in self._runtime:
            return f"{name!r} is served from the adapter store already ({self._entries[name].path})"
        return None

    def remove_runtime(self, name: str) -> AdapterEntry | None:
        """Stop serving a runtime load (its folder stays as it is); None when `name` is none."""
        with self._lock:
            entry = self._runtime.pop(name, None)
        if entry is not None:
            log.info("adapters: unloaded %r (loaded at runtime from %s)", name, entry.path)
        return entry

    def runtime_names(self) -> list[str]:
        with self._lock:
            return sorted(self._runtime)

    # -- versions and the promotion gate ---------------------------------------------------
    def set_gate(self, gate: Callable[[str, str], None] | None) -> None:
        """From now on, when a served name's link moves to a new stored version, call
        `gate(name, version)` (it must return at once) and keep serving the live version until the
        gate applies its verdict (`make_live` or `hold_back`) and calls `finish_gate`. None: a new
        version is served as soon as a refresh sees it."""
        self._gate = gate

    def _gated(self, name: str, current: AdapterEntry | None, located: Path | Rejection) -> bool:
        """Whether the gate takes this change of `name` (its new version is handed over once)."""
        if self._gate is None or current is None or isinstance(located, Rejection):
            return False
        if self._stored_version(name, current) is None or self._stored_version(name, located) is None:
            return False  # a folder dropped in by hand: nothing to keep serving, or nothing to compare
        with self._lock:
            handed = self._pending.get(name) == located
            self._pending[name] = located
        if not handed:
            self.store.set_pointer(name, "held", current.path.name)  # kept from pruning, and known after a restart
            self._gate(name, located.name)
        return True

    def _resume_held(self, name: str, located: Path | Rejection) -> AdapterEntry | None:
        """After a restart in the middle of a check: the version that was held live, served again,
        so that the gate checks the link's version (None: nothing was being checked)."""
        if self._gate is None or isinstance(located, Rejection):
            return None
        held = self.store.pointer(name, "held")
        if held is None or held == located.name:
            return None
        entry = self._version_entry(name, held)
        if not isinstance(entry, AdapterEntry):
            return None
        with self._lock:
            self._entries[name] = entry
        return entry

    def _release_held(self, name: str) -> None:
        """A verdict is in: the held pointer goes, unless a newer version waits for the gate too
        (then it names what is live now). Call under the lock."""
        waiting = self._pending.get(name)
        live = self._entries.get(name)
        still = waiting is not None and live is not None and self.store.live_version(name) == waiting.name
        self.store.set_pointer(name, "held", live.path.name if still and waiting != live.path else None)

    def _stored_version(self, name: str, entry: AdapterEntry | Path) -> str | None:
        """The version folder's name when `entry` is one of the store's versions of `name`."""
        path = entry.path if isinstance(entry, AdapterEntry) else entry
        try:
            folder = self.store.version_folder(name, path.name)
        except AdapterNameError:
            return None
        return path.name if folder is not None and folder.resolve() == path else None

    def finish_gate(self, name: str, version: str) -> None:
        """The gate is done with `version` of `name` (decided or abandoned): a later scan may hand
        the name over again."""
        with self._lock:
            if name in self._pending and self._pending[name].name == version:
                del self._pending[name]

    def _record_previous(self, name: str, old: AdapterEntry | None, new: AdapterEntry) -> None:
        """Remember the version `new` replaced as the one a rollback returns to."""
        old_version = self._stored_version(name, old) if old is not None else None
        if old_version is not None and old_version != new.path.name:
            self.store.set_pointer(name, "previous", old_version)

    def _read_candidates(self) -> None:
        """Take the store's candidate pointers (another server's, or ours before a restart), each
        candidate checked when it is first seen, not on its first request."""
        with self._lock:
            names = list(self._entries)
        found = {}
        for name in names:
            version = self.store.pointer(name, CANDIDATE)
            if version is not None:
                found[name] = version
                self._version_entry(name, version)
        with self._lock:
            self._candidates = found

    def _forget_deleted_versions(self) -> None:
        with self._lock:
            gone = [key for key, entry in self._versions.items()
                    if isinstance(entry, AdapterEntry) and not entry.path.is_dir()]
            for key in gone:
                del self._versions[key]

    def live_entry(self, name: str) -> AdapterEntry | None:
        """What the store's `name` serves now (a runtime load of the name aside); None when nothing."""
        with self._lock:
            return self._entries.get(name)

    def candidate(self, name: str) -> str | None:
        """The version of `name` the gate held back, if any."""
        with self._lock:
            return self._candidates.get(name)

    def checked_version(self, name: str, version: str) -> AdapterEntry | Rejection | None:
        """What checking `version` of `name` gave, if it was checked; None when it was not yet."""
        with self._lock:
            return self._versions.get((name, version))

    def _resolve_version(self, spec: str, name: str, version: str) -> AdapterEntry:
        if version == LIVE:
            entry = self.live_entry(name)
            if entry is None:
                raise UnknownAdapterError(spec, self.available(), f"{name!r} is not served from the store")
            return entry
        if version == CANDIDATE:
            version = self.candidate(name)
            if version is None:
                raise UnknownAdapterError(spec, self.available(), f"{name!r} has no candidate version")
        outcome = self._version_entry(name, version)
        if isinstance(outcome, Rejection):
            raise UnknownAdapterError(spec, self.available(), outcome.reason)
        return outcome

    def _version_entry(self, name: str, version: str) -> AdapterEntry | Rejection:
        """The entry of one stored version, checked the first time it is asked for and kept."""
        live = self.live_entry(name)
        if live is not None and live.path.name == version:
            return live  # the same entry, and the same key, as `name` itself
        known = self.checked_version(name, version)
        if known is not None:
            return known
        with self._checking:
            known = self.checked_version(name, version)
            if known is not None:
                return known
            try:
                folder = self.store.require_version(name, version)
            except (UnknownVersionError, AdapterNameError) as err:
                return Rejection(name, str(err))  # not kept: the version may be published later
            outcome = self._register(name, folder.resolve())
            with self._lock:
                self._versions[(name, version)] = outcome
        return outcome

    def _servable_version(self, name: str, version: str) -> AdapterEntry:
        """NoVersionError says why not: 'version' (none stored by that name) or 'rejected' (its checks)."""
        live = self.live_entry(name)
        if self.store.version_folder(name, version) is None and (live is None or live.path.name != version):
            stored = ", ".join(v.name for v in self.store.versions(name)) or "none"
            raise NoVersionError(name, "version", f"{name!r} has no stored version {version!r} (stored: {stored})")
        outcome = self._version_entry(name, version)
        if isinstance(outcome, Rejection):
            raise NoVersionError(name, "rejected", f"{name}@{version} cannot be served: {outcome.reason}")
        return outcome

    def make_live(self, name: str, version: str) -> AdapterEntry:
        """Serve the stored `version` as `name` from now on: the store's link and the entry move
        together under the lock; the version live before becomes the rollback target, and a
        candidate made live is no longer one. NoVersionError when the version cannot be served."""
        entry = self._servable_version(name, version)
        with self._moves, self._lock:
            old = self._entries.get(name)
            if old is not None and old.path == entry.path:
                return entry  # live already: nothing moves
            try:
                self.store.point(name, version)
            except UnknownVersionError as err:  # pruned since it was checked, or the name is a plain folder
                raise NoVersionError(name, "version", str(err)) from err
            self._entries[name] = entry
            if self._candidates.get(name) == version:
                del self._candidates[name]
                self.store.set_pointer(name, CANDIDATE, None)
            self._record_previous(name, old, entry)
            self._release_held(name)
        log.info("adapters: %r now serves version %s", name, version)
        return entry

    def hold_back(self, name: str, version: str, keep_candidate: bool = True) -> None:
        """The gate's 'no' to `version` of `name`: the store's link goes back to the live version
        (if it still names `version`: a later publish is the gate's next question) and, with
        keep_candidate, `version` is served only as `name@candidate`, recorded in the store."""
        with self._moves, self._lock:
            live = self._entries.get(name)
            live_version = self._stored_version(name, live) if live is not None else None
            if live_version is not None and self.store.live_version(name) == version:
                self.store.point(name, live_version)
            if keep_candidate and self.store.version_folder(name, version) is not None:
                self.store.set_pointer(name, CANDIDATE, version)
                self._candidates[name] = version
            self._release_held(name)

    def promote(self, name: str, version: str | None = None) -> AdapterEntry:
        """Make `version` (None: the candidate) live; NoVersionError when there is none to make live."""
        self._require_served(name)
        if version is None:
            version = self.candidate(name)
            if version is None:
                raise NoVersionError(name, CANDIDATE, f"{name!r} has no candidate version to promote")
        return self.make_live(name, version)

    def rollback(self, name: str) -> AdapterEntry:
        """Make the version live before the current one live again (so a second rollback undoes
        the first); NoVersionError when there is none."""
        self._require_served(name)
        with self._moves:
            target = self.store.rollback_target(name)
            if target is None:
                raise NoVersionError(name, "previous", f"{name!r} has no previous version to roll back to")
            return self.make_live(name, target)

    def _require_served(self, name: str) -> None:
        if self.live_entry(name) is None:
            raise UnknownAdapterError(name, self.available(), self._rejection_reason(name))

    def _rejection_reason(self, name: str) -> str | None:
        with self._lock:
            rejection = self._rejected.get(name)
        return rejection[1].reason if rejection else None

    # -- lookups -------------------------------------------------------------------------
    def resolve(self, name: str) -> AdapterEntry | None:
        """The adapter a request names; None for the base. UnknownAdapterError names the choices.

        'name@<version>' names a stored version, 'name@live' what the store's name serves,
        'name@candidate' the version the promotion gate held back.
        """
        if name == BASE_NAME:
            return None
        adapter, version = split_version(name)
        if version is not None:
            return self._resolve_version(name, adapter, version)
        with self._lock:
            entry = self._runtime.get(name) or self._entries.get(name)
            rejection = self._rejected.get(name)
        if entry is None:
            raise UnknownAdapterError(name, self.available(), rejection[1].reason if rejection else None)
        return entry

    def available(self) -> list[str]:
        with self._lock:
            return [BASE_NAME, *sorted(self._entries.keys() | self._runtime.keys())]

    def servable(self) -> list[AdapterEntry]:
        with self._lock:
            served = {**self._entries, **self._runtime}
        return [served[n] for n in sorted(served)]

    def rejected(self) -> list[Rejection]:
        with self._lock:
            return [r for _, r in sorted(self._rejected.values(), key=lambda pair: pair[1].name)]

    def watch(self, interval_s: float = 0.5) -> None:
        """Refresh in a background thread until `close()`."""
        if self._watcher is not None:
            return

        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.refresh()
                except Exception:  # keep watching: one bad scan must not stop hot reload
                    log.exception("adapter scan failed")

        self._watcher = threading.Thread(target=loop, name="adapter-watch", daemon=True)
        self._watcher.start()

    def close(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
            self._watcher = None
