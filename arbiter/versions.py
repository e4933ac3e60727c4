"""Versioned models with atomic activation.

Readers take the active entry once per request and keep that reference to the
end, so a request never mixes two versions; activation swaps one pointer under
a lock, after the new version has been fully loaded and validated.
"""

from __future__ import annotations

import threading
from typing import Generic, TypeVar

from arbiter.errors import FailedPrecondition, VersionNotFound

E = TypeVar("E")


class ModelVersions(Generic[E]):
    def __init__(self) -> None:
        self._entries: dict[str, E] = {}
        self._active: str | None = None
        self._lock = threading.Lock()

    @property
    def active_version(self) -> str | None:
        return self._active

    def get(self, version: str = "") -> E:
        with self._lock:
            key = version or self._active
            if key is None or key not in self._entries:
                raise VersionNotFound(version or "<active>", list(self._entries))
            return self._entries[key]

    def add(self, version: str, entry: E, activate: bool) -> str | None:
        """Registers a loaded entry; returns the previously active version."""
        with self._lock:
            if version in self._entries:
                raise FailedPrecondition(
                    f"model version {version!r} is already loaded; unload it first or pick another version label"
                )
            self._entries[version] = entry
            previous = self._active
            if activate or self._active is None:
                self._active = version
            return previous

    def activate(self, version: str) -> str | None:
        with self._lock:
            if version not in self._entries:
                raise VersionNotFound(version, list(self._entries))
            previous, self._active = self._active, version
            return previous

    def remove(self, version: str) -> E:
        with self._lock:
            if version not in self._entries:
                raise VersionNotFound(version, list(self._entries))
            if version == self._active:
                raise FailedPrecondition(
                    f"model version {version!r} is active; activate another version before unloading it"
                )
            return self._entries.pop(version)

    def versions(self) -> list[str]:
        """Loaded labels, oldest load first."""
        with self._lock:
            return list(self._entries)

    def items(self) -> list[tuple[str, E]]:
        with self._lock:
            return list(self._entries.items())

    def is_active(self, version: str) -> bool:
        return version == self._active
