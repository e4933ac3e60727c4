"""A directory registry of reward-model versions.

Layout::

    REGISTRY/NAME/v1/   config.json, model.safetensors, tokenizer files, arbiter.json
    REGISTRY/NAME/v2/   ...

Each version directory is an ordinary Hugging Face checkpoint (safetensors
only) that ``LoadModelVersion`` accepts as is; its ``arbiter.json`` says
``name``, ``version``, ``parent_version``, ``metrics``, the normalization
statistics, calibration scores and ``text_convention`` (how plain text was
built in training: ``arbiter.reward.convention.TextConvention``). A version
``arbiter rm loop`` trained also holds its ``lineage`` in arbiter.json and
``loop.json`` (its gates and status, updated as the loop decides).

Versions are allocated atomically: a version is written completely into a
staging directory next to the versions, then renamed to the next free
``vN``. ``rename(2)`` of a directory onto an existing non-empty one fails, so
two trainers publishing at once get different numbers, and a reader never
sees a half-written version (a crash leaves only a ``.staging-*`` directory).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arbiter.errors import ArbiterError, VersionNotFound
from arbiter.hf import METADATA_FILE, read_metadata

_VERSION_RE = re.compile(r"^v([1-9][0-9]{0,8})$")
_STAGING_PREFIX = ".staging-"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Beside a version's weights: the gates, status and events ``arbiter rm loop``
# recorded for it. The only file of a version written after it is published
# (the weights and arbiter.json never change).
LOOP_RECORD = "loop.json"


class RegistryError(ArbiterError):
    pass


@dataclass(frozen=True)
class RegistryVersion:
    name: str
    version: str
    number: int
    path: Path

    def metadata(self) -> dict[str, Any]:
        meta = read_metadata(self.path)
        out = dict(meta.extra or {})
        out.update(name=meta.name, version=meta.version)
        if meta.normalization is not None:
            out["normalization"] = {
                "mean": meta.normalization.mean, "std": meta.normalization.std,
                "sample_count": meta.normalization.sample_count,
            }
        return out

    def loop_record(self) -> dict[str, Any]:
        """What ``arbiter rm loop`` decided about this version (``LOOP_RECORD``; {} when nothing)."""
        path = self.path / LOOP_RECORD
        return json.loads(path.read_text()) if path.is_file() else {}

    def write_loop_record(self, record: dict[str, Any]) -> None:
        """Replace the loop's record, atomically (a reader sees the old or the new one)."""
        fd, tmp = tempfile.mkstemp(prefix=".loop-", dir=self.path)
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps(record, indent=2, sort_keys=True) + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.path / LOOP_RECORD)


class ModelRegistry:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def _model_dir(self, name: str) -> Path:
        if not _NAME_RE.match(name):
            raise RegistryError(
                f"model name {name!r} is invalid: letters, digits, '.', '_' and '-', starting with a letter or digit"
            )
        return self.root / name

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _NAME_RE.match(p.name))

    def versions(self, name: str) -> list[RegistryVersion]:
        """Published versions of ``name``, oldest first."""
        base = self._model_dir(name)
        if not base.is_dir():
            return []
        found = []
        for child in base.iterdir():
            match = _VERSION_RE.match(child.name)
            if match and child.is_dir():
                found.append(RegistryVersion(name, child.name, int(match.group(1)), child))
        return sorted(found, key=lambda v: v.number)

    def latest(self, name: str) -> RegistryVersion | None:
        versions = self.versions(name)
        return versions[-1] if versions else None

    def get(self, name: str, version: str) -> RegistryVersion:
        for candidate in self.versions(name):
            if candidate.version == version:
                return candidate
        raise VersionNotFound(version, [v.version for v in self.versions(name)])

    @contextmanager
    def staging(self, name: str) -> Iterator[Path]:
        """A fresh directory on the registry's filesystem (so publishing is a
        rename); removed on the way out unless it was published."""
        base = self._model_dir(name)
        base.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=base))
        try:
            yield staged
        finally:
            if staged.exists():
                shutil.rmtree(staged, ignore_errors=True)

    def publish(self, name: str, staged: Path, **metadata: Any) -> RegistryVersion:
        """Move a complete staged checkpoint to the next free version ``vN``;
        ``metadata`` (and name, version) is written to its arbiter.json first."""
        base = self._model_dir(name)
        staged = Path(staged)
        if staged.parent.resolve() != base.resolve():
            raise RegistryError(f"{staged} is not a staging directory of {base} (use ModelRegistry.staging)")
        if not (staged / "config.json").is_file():
            raise RegistryError(f"{staged} holds no config.json: not a checkpoint")
        unsafe = sorted(p.name for p in staged.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
        if unsafe:
            raise RegistryError(f"pickle-based weights are not published (safetensors only): {', '.join(unsafe)}")
        if not any(p.suffix == ".safetensors" for p in staged.iterdir()):
            raise RegistryError(f"{staged} holds no .safetensors weights")
        number = (self.latest(name).number if self.latest(name) else 0) + 1
        # mkdtemp (and some writers) make files private; versions are shared read-only data.
        os.chmod(staged, 0o755)
        for path in staged.rglob("*"):
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        for _ in range(1000):
            version = f"v{number}"
            _write_metadata(staged, {**metadata, "name": name, "version": version})
            try:
                os.rename(staged, base / version)
            except OSError as err:
                if err.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    number += 1  # another publisher took it
                    continue
                raise
            return RegistryVersion(name, version, number, base / version)
        raise RegistryError(f"no free version number under {base} after 1000 attempts")


def _write_metadata(model_dir: Path, fields: dict[str, Any]) -> None:
    """Like ``arbiter.hf.write_metadata``, but keeps None as null: a first
    version says ``"parent_version": null`` rather than nothing."""
    path = model_dir / METADATA_FILE
    current = json.loads(path.read_text()) if path.exists() else {}
    current.update(fields)
    path.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")


def is_registry_version(path: str | os.PathLike) -> bool:
    """Whether ``path`` looks like REGISTRY/NAME/vN with an arbiter.json."""
    path = Path(path)
    return bool(_VERSION_RE.match(path.name)) and (path / METADATA_FILE).is_file()
