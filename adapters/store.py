"""The adapter store: one folder per adapter name, replaced atomically, previous version kept.

Layout::

    <store>/<name>                  -> symlink to .versions/<name>/<version>
    <store>/.versions/<name>/<version>/   adapter_config.json, adapter_model.safetensors,
                                          chat_template.jinja, card.json, loss.png
    <store>/.staging/               folders being written; never served

A new version is written in full under .staging, moved under .versions, and only then is the
name's symlink swapped with one rename, so a reader sees the old adapter or the new one,
never half of one, and a reader that opened the old version keeps reading it.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
RESERVED_NAMES = {"base"}


def _version_name() -> str:
    """Sortable by time of publication, to the nanosecond: 20261126-203000.123456789."""
    now = time.time_ns()
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime(now // 10**9)) + f".{now % 10**9:09d}"


class AdapterNameError(ValueError):
    """A name that could be a path or is otherwise not a valid adapter name."""


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

    def __init__(self, root: Path | str | None = None, keep_versions: int = 2):
        self.root = Path(root) if root is not None else default_store_dir()
        self.keep_versions = max(1, keep_versions)

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

    @contextmanager
    def write(self, name: str) -> Iterator[Path]:
        """Yield an empty folder to write a new version of `name` into; publish it on success.

        If the body raises, the partial folder is deleted and the current version stays.
        """
        self.path(name)
        staging = self.root / ".staging" / f"{name}-{uuid.uuid4().hex[:8]}"
        staging.mkdir(parents=True)
        try:
            yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self._publish(name, staging)

    def _publish(self, name: str, staging: Path) -> None:
        link = self.root / name
        versions = self.root / ".versions" / name
        versions.mkdir(parents=True, exist_ok=True)
        if link.is_dir() and not link.is_symlink():
            # A folder dropped in by hand: keep it as the previous version.
            os.replace(link, versions / _version_name())
        final = versions / _version_name()
        os.replace(staging, final)
        tmp_link = self.root / f".{name}.{uuid.uuid4().hex[:8]}.link"
        tmp_link.symlink_to(final.relative_to(self.root), target_is_directory=True)
        os.replace(tmp_link, link)  # the one atomic step readers can observe
        self._prune(name, keep=final)

    def _prune(self, name: str, keep: Path) -> None:
        old = [v for v in self.versions(name) if v != keep]
        for stale in old[: max(0, len(old) - (self.keep_versions - 1))]:
            shutil.rmtree(stale, ignore_errors=True)

    def delete(self, name: str) -> None:
        """Remove the name and every stored version of it."""
        link = self.path(name)
        if link.is_symlink() or link.is_file():
            link.unlink()
        elif link.is_dir():
            shutil.rmtree(link)
        shutil.rmtree(self.root / ".versions" / name, ignore_errors=True)
