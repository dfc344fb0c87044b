"""The adapter registry: which adapters in the store can be served on this base, and why not.

Every adapter is checked when it is registered (`adapters.compat.check_adapter`: its config,
its tensors, its base, its chat template), never on its first request. A malformed entry of any
shape becomes one rejection with its reason; it never stops a scan. Clients name adapters; only
the registry maps a name to a folder. A replaced adapter gets a new key (name@version), so
requests already running on the old version finish on it.

Besides the store's adapters, the registry holds those loaded at runtime (`add_runtime`, behind
`POST /v1/load_lora_adapter`): checked the same way, kept apart from the store's so that no scan
removes them, and served until `remove_runtime`. Where a name is both, the runtime load is served.
"""

from __future__ import annotations

import itertools
import logging
import threading
from dataclasses import dataclass, replace
from pathlib import Path

from adapters.card import AdapterCard
from adapters.compat import AdapterCheckError, BaseShape, check_adapter
from adapters.store import NAME_PATTERN, RESERVED_NAMES, AdapterNameError, AdapterStore

log = logging.getLogger(__name__)
BASE_NAME = "base"


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
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def refresh(self) -> Changes:
        """Pick up new, replaced and deleted adapters; unchanged folders are not checked again.

        Never raises for one entry: whatever is wrong with it becomes its rejection.
        """
        found = self._scan_names()
        added, replaced, rejected = [], [], []
        with self._lock:
            known, refused = dict(self._entries), dict(self._rejected)
        for name, located in found.items():
            current = known.get(name)
            if current is not None and current.path == located:
                continue
            key = _refusal_key(located)
            if name in refused and refused[name][0] == key:
                continue  # refused before, and nothing it was refused for has changed: not checked again
            outcome = located if isinstance(located, Rejection) else self._register(name, located)
            with self._lock:
                if isinstance(outcome, AdapterEntry):
                    self._entries[name] = outcome
                    self._rejected.pop(name, None)
                    (replaced if current else added).append(name)
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

    # -- lookups -------------------------------------------------------------------------
    def resolve(self, name: str) -> AdapterEntry | None:
        """The adapter a request names; None for the base. UnknownAdapterError names the choices."""
        if name == BASE_NAME:
            return None
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
