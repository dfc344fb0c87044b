"""The adapter registry: which adapters in the store can be served on this base, and why not.

Every adapter is checked when it is registered (shapes against the base, the base fingerprint
in its card, safe files), never on its first request. Clients name adapters; only the registry
maps a name to a folder. A replaced adapter gets a new key (name@version), so requests already
running on the old version finish on it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from adapters.card import AdapterCard, read_card
from adapters.compat import AdapterCheckError, BaseShape, check_adapter
from adapters.store import AdapterNameError, AdapterStore

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

    @property
    def key(self) -> str:
        """Unique per version: what the engine loads the weights under.

        peft refuses '.' in adapter names; '%' never occurs in a name or a version, so the
        replacement keeps keys unique.
        """
        return f"{self.name}@{self.path.name}".replace(".", "%")


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


class AdapterRegistry:
    """Scans the store and keeps the servable and rejected adapters; safe to use from several threads."""

    def __init__(self, store: AdapterStore, base: BaseShape):
        self.store, self.base = store, base
        self._entries: dict[str, AdapterEntry] = {}
        self._rejected: dict[str, tuple[Path | None, Rejection]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def refresh(self) -> Changes:
        """Pick up new, replaced and deleted adapters; unchanged folders are not checked again."""
        found = self._scan_names()
        added, replaced, rejected = [], [], []
        with self._lock:
            known, refused = dict(self._entries), dict(self._rejected)
        for name, folder in found.items():
            current = known.get(name)
            if current is not None and current.path == folder:
                continue
            if name in refused and refused[name][0] == folder:
                continue  # the same folder was refused before: not checked again
            entry, rejection = self._register(name, folder)
            with self._lock:
                if entry is not None:
                    self._entries[name] = entry
                    self._rejected.pop(name, None)
                    (replaced if current else added).append(name)
                else:
                    self._entries.pop(name, None)
                    self._rejected[name] = (folder, rejection)
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

    def _scan_names(self) -> dict[str, Path | None]:
        """name -> resolved folder (None where the name itself is refused)."""
        found: dict[str, Path | None] = {}
        for name in self.store.names():
            try:
                found[name] = self.store.path(name).resolve()
            except AdapterNameError:
                found[name] = None
        return found

    def _register(self, name: str, folder: Path | None) -> tuple[AdapterEntry | None, Rejection | None]:
        if folder is None:
            return None, Rejection(name, "invalid name: names are identifiers, not paths, and stay inside the store")
        if not folder.is_dir():
            return None, Rejection(name, f"{folder} is not a folder")
        try:
            adapter = check_adapter(folder, self.base)
            card = read_card(folder) if (folder / "card.json").is_file() else None
        except (AdapterCheckError, ValueError, OSError) as err:
            return None, Rejection(name, str(err))
        return AdapterEntry(name, folder, card, int(adapter.config.get("r", 0))), None

    def resolve(self, name: str) -> AdapterEntry | None:
        """The adapter a request names; None for the base. UnknownAdapterError names the choices."""
        if name == BASE_NAME:
            return None
        with self._lock:
            entry = self._entries.get(name)
            rejection = self._rejected.get(name)
        if entry is None:
            raise UnknownAdapterError(name, self.available(), rejection[1].reason if rejection else None)
        return entry

    def available(self) -> list[str]:
        with self._lock:
            return [BASE_NAME, *sorted(self._entries)]

    def servable(self) -> list[AdapterEntry]:
        with self._lock:
            return [self._entries[n] for n in sorted(self._entries)]

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
