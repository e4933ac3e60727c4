"""Policy versions through a store: what the trainer publishes and what a
policy replica fetches, in one place (``trainer/publish.py`` and
``services/policy/follower.py`` both call this module).

A version ``V`` published under ``BASE`` (``s3://bucket/prefix`` or
``file:///dir``, see :mod:`arbiter.weights.store`) is the checkpoint
directory's files at ``BASE/V/NAME`` and then, last, ``BASE/V/manifest.json``
with every file's sha256 and size. Write then publish: a version whose upload
was cut short has no manifest, so no reader ever sees it (a fetch says it is
not there); the announcement (``PolicyUpdate.weights_uri = BASE/V``) goes out
only after the manifest is stored.

Encodings, chosen by the trainer (``PublishSettings``), read by every replica:

- **full**: the files as written.
- **bf16**: the trainer casts floating-point tensors to bfloat16 before
  writing (half the bytes of float32); a replica loads them into the dtype it
  serves (``--dtype``). The weights served are then bf16-rounded copies of the
  trainer's: the log-probs replicas return and rollouts carry are the rounded
  policy's, which is the distribution the samples were really drawn from, so
  PPO's importance ratio π_θ/π_behaviour (both the clipped and the decoupled
  objective use the rollout's own log-probs as π_behaviour) stays a correct
  off-policy correction; the rounding shows up as a small extra distance from
  on-policy (ratios ≠ 1 at the first minibatch), like one more step of
  staleness, never as a bias (measured: ≤ 9e-3 nats per token on a 13 M
  parameter GPT-2, ``bench/publish_bench.py``; a ratio within 1 ± 0.01, far
  inside the 0.2 clip). The trainer keeps training its float32 weights, so
  rounding never accumulates from one version to the next.
- **delta**: a ``.safetensors`` file whose header (names, dtypes, shapes,
  offsets) equals the same file of the parent version is stored as only the
  byte ranges of the tensors that changed (``NAME.delta``); the manifest names
  the parent and the parent's weights sha256. A replica patches its copy of
  the parent after checking that sha256; one without the parent fetches the
  parent the same way (down the chain to a full version: the trainer writes a
  full one every ``full_every`` versions), and a parent the store no longer
  has, or whose bytes differ, refuses the version cleanly. Every file is
  checked against its sha256 after patching. Only whole tensors are skipped:
  a full-parameter PPO step changes every tensor, so deltas pay off when parts
  of the model are frozen (XOR + zstd against the parent would shrink every
  tensor; not built: zstandard is not in requirements.lock).
"""

from __future__ import annotations

import json
import mmap
import shutil
import struct
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from arbiter.config import require
from arbiter.errors import ArbiterError
from arbiter.hf import combine_weights_sha256, file_sha256, files_sha256
from arbiter.weights.store import MiB, Store, StoreError, TransferSettings, join_uri, open_store, split_uri

__all__ = [
    "FORMAT", "MANIFEST", "REASONS", "Fetched", "ParentVersion", "PublishSettings", "Published", "Store",
    "StoreError", "TransferSettings", "Unverified", "WeightsError", "download_version", "fetch_version", "join_uri",
    "open_store", "prune_cache", "publish_version", "split_uri",
]

# 2: the manifest's weights_sha256 is arbiter.hf.combine_weights_sha256 of
# the files' sha256 (1 hashed the bytes a second time for it).
FORMAT = "arbiter-weights/2"
MANIFEST = "manifest.json"
# Why a replica refused a version (label values of arbiter_policy_update_refusals_total).
DOWNLOAD, MANIFEST_REASON, SHA256, PARENT = "download", "manifest", "sha256", "parent"
REASONS = (DOWNLOAD, MANIFEST_REASON, SHA256, PARENT)
_DELTA_SUFFIX = ".delta"
_MAX_CHAIN = 64


class WeightsError(ArbiterError):
    """A version could not be fetched or verified; ``reason`` is one of REASONS."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class PublishSettings:
    # Where versions go: "s3://bucket/prefix" or "file:///dir". Empty: the
    # trainer only announces its local directory (checkpoint_path), which
    # every replica must then see on a shared filesystem.
    uri: str = ""
    # Floating-point tensors cast to bfloat16 for transport (see the module docstring).
    bf16: bool = False
    # Only the tensors that changed since the previous version.
    delta: bool = False
    # With delta: a full version every this many, bounding a new replica's chain of fetches.
    full_every: int = 8
    multipart_threshold_mb: int = 64
    multipart_chunksize_mb: int = 64

    def validate(self, prefix: str = "weights") -> None:
        if self.uri:
            try:
                split_uri(self.uri)
            except StoreError as err:
                require(False, f"{prefix}.uri", str(err), self.uri)
        require(not self.delta or bool(self.uri), f"{prefix}.delta", "needs weights.uri (deltas are a store "
                "encoding; a shared directory is read in place)", self.delta)
        require(self.full_every >= 1, f"{prefix}.full_every", "must be >= 1", self.full_every)
        # S3's smallest part is 5 MiB (all but the last).
        for name in ("multipart_threshold_mb", "multipart_chunksize_mb"):
            require(getattr(self, name) >= 5, f"{prefix}.{name}", "must be >= 5 (S3's smallest part)",
                    getattr(self, name))

    @property
    def transfer(self) -> TransferSettings:
        return TransferSettings(self.multipart_threshold_mb * MiB, self.multipart_chunksize_mb * MiB)

    @property
    def encoding(self) -> str:
        return "+".join(m for m, on in (("bf16", self.bf16), ("delta", self.delta)) if on) or "full"


@dataclass(frozen=True)
class ParentVersion:
    """The previous version as the publisher wrote it (for deltas)."""

    version: str
    directory: Path
    weights_sha256: str


@dataclass(frozen=True)
class Published:
    version: str
    uri: str
    weights_sha256: str
    bytes_uploaded: int
    bytes_total: int
    delta_of: str | None


@dataclass(frozen=True)
class Fetched:
    version: str
    path: Path
    weights_sha256: str
    bytes_downloaded: int
    manifest: dict


# -- hashing and safetensors layout --------------------------------------------


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith(".") and p.name != MANIFEST)


def _tensor_ranges(path: Path) -> tuple[bytes, list[tuple[int, int]]]:
    """A safetensors file's header bytes and each tensor's absolute byte range."""
    with path.open("rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = fh.read(length)
    start = 8 + length
    meta = json.loads(header)
    ranges = sorted((start + info["data_offsets"][0], start + info["data_offsets"][1])
                    for name, info in meta.items() if name != "__metadata__")
    return header, ranges


def _changed_ranges(new: Path, old: Path) -> list[tuple[int, int]] | None:
    """Byte ranges of the tensors of ``new`` that differ from ``old``; None when
    the two files do not share one layout (then the file is sent whole)."""
    try:
        header, ranges = _tensor_ranges(new)
        old_header, _ = _tensor_ranges(old)
    except (OSError, ValueError, KeyError, struct.error):
        return None
    if header != old_header or new.stat().st_size != old.stat().st_size:
        return None
    with new.open("rb") as a, old.open("rb") as b, \
            mmap.mmap(a.fileno(), 0, access=mmap.ACCESS_READ) as ma, \
            mmap.mmap(b.fileno(), 0, access=mmap.ACCESS_READ) as mb:
        return [(lo, hi) for lo, hi in ranges if ma[lo:hi] != mb[lo:hi]]


def _write_delta(new: Path, ranges: list[tuple[int, int]], out: Path) -> None:
    """``u64 header length, JSON [[begin, end], ...], the ranges' bytes``."""
    header = json.dumps(ranges).encode()
    with new.open("rb") as src, out.open("wb") as dst:
        dst.write(struct.pack("<Q", len(header)) + header)
        for lo, hi in ranges:
            src.seek(lo)
            dst.write(src.read(hi - lo))


def _apply_delta(parent_file: Path, delta: Path, out: Path) -> None:
    shutil.copyfile(parent_file, out)
    with delta.open("rb") as src, out.open("r+b") as dst:
        (length,) = struct.unpack("<Q", src.read(8))
        ranges = json.loads(src.read(length))
        size = out.stat().st_size
        for lo, hi in ranges:
            if not 0 <= lo <= hi <= size:
                raise WeightsError(MANIFEST_REASON, f"{delta.name}: range [{lo}, {hi}) is outside the parent's file")
            dst.seek(lo)
            dst.write(src.read(hi - lo))


# -- publishing ------------------------------------------------------------------


def publish_version(
    store: Store, version: str, directory: Path, *, parent: ParentVersion | None = None, dtype: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> Published:
    """Upload ``directory`` as ``version``: every file (or its delta against
    ``parent``), then the manifest. Raises StoreError; nothing is visible then.

    Each file is hashed once, on threads of their own while the uploads go
    on (sha256 releases the GIL): the hash costs no time of its own unless
    it outlasts the upload (a local store's hard link)."""
    entries: dict[str, dict] = {}
    uploaded = total = 0
    delta_used = False
    scratch = directory.parent / f".delta-{version}"
    paths = _files(directory)
    hasher = ThreadPoolExecutor(1, thread_name_prefix="publish-sha256")
    hashing = hasher.submit(files_sha256, paths)
    try:
        for path in paths:
            entry = {"bytes": path.stat().st_size}
            total += entry["bytes"]
            ranges = None
            if parent is not None and path.name.endswith(".safetensors") and (parent.directory / path.name).is_file():
                ranges = _changed_ranges(path, parent.directory / path.name)
            if ranges is not None and sum(hi - lo for lo, hi in ranges) < entry["bytes"] // 2:
                scratch.mkdir(parents=True, exist_ok=True)
                blob = scratch / (path.name + _DELTA_SUFFIX)
                _write_delta(path, ranges, blob)
                entry["delta"] = {"object": blob.name, "sha256": file_sha256(blob),
                                  "bytes": blob.stat().st_size, "tensors_changed": len(ranges)}
                store.put_file(f"{version}/{blob.name}", blob)
                uploaded += entry["delta"]["bytes"]
                delta_used = True
            else:
                store.put_file(f"{version}/{path.name}", path)
                uploaded += entry["bytes"]
            entries[path.name] = entry
            if progress is not None:
                progress(path.name)
        digests = hashing.result()
        for name, entry in entries.items():
            entry["sha256"] = digests[name]
    finally:
        hasher.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(scratch, ignore_errors=True)
    try:
        weights = combine_weights_sha256({name: e["sha256"] for name, e in entries.items()})
    except ArbiterError as err:
        raise StoreError(f"{directory}: {err}") from err
    manifest = {
        "format": FORMAT, "version": version, "weights_sha256": weights, "dtype": dtype,
        "parent": {"version": parent.version, "weights_sha256": parent.weights_sha256} if delta_used else None,
        "files": entries, "created_at": time.time(),
    }
    # Last: the manifest is what makes the version exist.
    store.put_bytes(f"{version}/{MANIFEST}", json.dumps(manifest, indent=1, sort_keys=True).encode())
    return Published(version, join_uri(store.uri, version), weights, uploaded, total,
                     parent.version if delta_used else None)


# -- fetching --------------------------------------------------------------------


def _read_manifest(store: Store, version: str) -> dict:
    try:
        if not store.exists(f"{version}/{MANIFEST}"):
            raise WeightsError(DOWNLOAD, f"{join_uri(store.uri, version)} has no {MANIFEST}: the version was "
                               "never completely published (an interrupted upload) or was deleted")
        raw = store.get_bytes(f"{version}/{MANIFEST}")
    except StoreError as err:
        raise WeightsError(DOWNLOAD, str(err)) from err
    try:
        manifest = json.loads(raw)
        ok = (manifest.get("format") == FORMAT and manifest.get("version") == version
              and isinstance(manifest.get("files"), dict) and isinstance(manifest.get("weights_sha256"), str))
    except (ValueError, AttributeError):
        ok = False
    if not ok:
        raise WeightsError(MANIFEST_REASON, f"{join_uri(store.uri, version, MANIFEST)} is not a {FORMAT} "
                           f"manifest of version {version!r}")
    return manifest


def _cached(directory: Path, manifest: dict) -> bool:
    try:
        mine = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return mine.get("weights_sha256") == manifest["weights_sha256"] and mine.get("files") == manifest["files"]


def _verify(directory: Path, manifest: dict, where: str, patched: frozenset[str] = frozenset()) -> str:
    """Every file against its sha256, and the weights digest; returns the
    latter. ``patched``: files made from a (verified) delta and the parent's
    copy, so a mismatch there means the local parent's bytes are not the ones
    its manifest vouched for."""
    files = sorted(manifest["files"].items())
    for name, _ in files:
        if not (directory / name).is_file():
            raise WeightsError(DOWNLOAD, f"{where}: {name} is missing")
    actuals = files_sha256([directory / name for name, _ in files])
    for name, entry in files:
        actual = actuals[name]
        if actual != entry.get("sha256"):
            if name in patched:
                raise WeightsError(PARENT, f"{where}: {name} patched onto the parent's copy has sha256 {actual}, "
                                   f"the manifest says {entry.get('sha256')}: the parent here is not the one the "
                                   "delta was made against; refusing to serve other weights")
            raise WeightsError(SHA256, f"{where}: {name} has sha256 {actual}, the manifest says "
                               f"{entry.get('sha256')} (a corrupted or tampered object)")
    try:
        weights = combine_weights_sha256({name: e.get("sha256") for name, e in manifest["files"].items()})
    except ArbiterError as err:
        raise WeightsError(MANIFEST_REASON, f"{where}: {err}") from err
    if weights != manifest["weights_sha256"]:
        raise WeightsError(SHA256, f"{where}: the weights hash to {weights}, the manifest says "
                           f"{manifest['weights_sha256']}")
    return weights


@dataclass
class Unverified:
    """A version on disk and loadable at ``path``, not yet checked against
    its manifest (``download_version``). ``verify()`` hashes every file and
    returns the Fetched, or raises WeightsError (removing a download); no
    version may serve from ``path`` before it returned. Loading can run
    meanwhile: the replica hashes while it reads the weights, instead of
    before (the hash is the longest part of a fetch from a local store)."""

    version: str
    path: Path
    manifest: dict
    where: str
    bytes_downloaded: int = 0
    patched: frozenset[str] = frozenset()
    # ``path`` is this cache's own copy: removed if it fails, marked verified
    # (its manifest written, last) if it passes.
    downloaded: bool = False
    verified: str | None = None  # the weights sha256 once checked (a cached copy already is)

    def verify(self) -> Fetched:
        if self.verified is None:
            try:
                self.verified = _verify(self.path, self.manifest, self.where, self.patched)
            except WeightsError:
                if self.downloaded:
                    shutil.rmtree(self.path, ignore_errors=True)
                raise
            if self.downloaded:
                (self.path / MANIFEST).write_text(json.dumps(self.manifest, sort_keys=True))
        return Fetched(self.version, self.path, self.verified, self.bytes_downloaded, self.manifest)


def fetch_version(version_uri: str, cache_dir: Path, *, _depth: int = 0) -> Fetched:
    """Download, verify and materialize a version as a loadable checkpoint
    directory (``cache_dir/VERSION``; a full version in a ``file://`` store
    is verified and read in place). Raises WeightsError."""
    return download_version(version_uri, cache_dir, _depth=_depth).verify()


def download_version(version_uri: str, cache_dir: Path, *, _depth: int = 0) -> Unverified:
    """``fetch_version`` up to, not including, the final check of every
    file's sha256 (a delta's own bytes and its parent are checked here)."""
    base, _, version = version_uri.rstrip("/").rpartition("/")
    if not version or "/" in version or version.startswith("."):
        raise WeightsError(MANIFEST_REASON, f"weights URI {version_uri!r} does not end in a version name")
    try:
        store = open_store(base)
    except StoreError as err:
        raise WeightsError(DOWNLOAD, str(err)) from err
    manifest = _read_manifest(store, version)
    where = join_uri(store.uri, version)
    files = manifest["files"]
    for name in files:
        if "/" in name or name.startswith(".") or name == MANIFEST:
            raise WeightsError(MANIFEST_REASON, f"{where}: file name {name!r} is not allowed")
    target = Path(cache_dir) / version
    if _cached(target, manifest):
        return Unverified(version, target, manifest, where, verified=manifest["weights_sha256"])
    in_place = store.local_path(version)
    if in_place is not None and not any("delta" in e for e in files.values()):
        return Unverified(version, in_place, manifest, where)

    # Into its place in the cache: it is a cached version only once its
    # manifest is written there, after the check (``Unverified.verify``).
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    downloaded = 0
    patched: set[str] = set()
    try:
        parent_dir = None
        for name, entry in sorted(files.items()):
            try:
                if "delta" in entry:
                    if parent_dir is None:
                        parent_dir, downloaded_parent = _parent(base, manifest, Path(cache_dir), where, _depth)
                        downloaded += downloaded_parent
                    blob = target / f".{name}{_DELTA_SUFFIX}"
                    store.get_file(f"{version}/{entry['delta']['object']}", blob)
                    downloaded += blob.stat().st_size
                    if file_sha256(blob) != entry["delta"].get("sha256"):
                        raise WeightsError(SHA256, f"{where}: the delta of {name} does not match its sha256")
                    if not (parent_dir / name).is_file():
                        raise WeightsError(PARENT, f"{where}: the parent version has no {name} to patch")
                    _apply_delta(parent_dir / name, blob, target / name)
                    patched.add(name)
                    blob.unlink()
                else:
                    store.get_file(f"{version}/{name}", target / name)
                    downloaded += (target / name).stat().st_size
            except StoreError as err:
                raise WeightsError(DOWNLOAD, str(err)) from err
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return Unverified(version, target, manifest, where, downloaded, frozenset(patched), downloaded=True)


def _parent(base: str, manifest: dict, cache_dir: Path, where: str, depth: int) -> tuple[Path, int]:
    """The parent version's directory, fetched (down its own chain) if not
    cached, once its weights sha256 (as verified when it was materialized)
    is the one the delta was made against. Its bytes are not hashed again
    here: every patched file is checked against its own sha256 afterwards,
    which a parent changed since would fail (refused as ``parent``)."""
    parent = manifest.get("parent") or {}
    name, expected = parent.get("version"), parent.get("weights_sha256")
    if not isinstance(name, str) or not isinstance(expected, str):
        raise WeightsError(MANIFEST_REASON, f"{where}: a delta without its parent's version and sha256")
    if depth >= _MAX_CHAIN:
        raise WeightsError(PARENT, f"{where}: more than {_MAX_CHAIN} deltas down to a full version")
    downloaded = 0
    directory = cache_dir / name
    if not (directory / MANIFEST).is_file():
        try:
            fetched = fetch_version(join_uri(base, name), cache_dir, _depth=depth + 1)
        except WeightsError as err:
            raise WeightsError(PARENT, f"{where}: its parent {name!r} cannot be had: {err}") from err
        directory, downloaded = fetched.path, fetched.bytes_downloaded
    try:
        actual = json.loads((directory / MANIFEST).read_text()).get("weights_sha256")
    except (OSError, ValueError, AttributeError):
        actual = None
    if actual != expected:
        raise WeightsError(PARENT, f"{where}: the parent {name!r} here has weights sha256 {actual}, the delta was "
                           f"made against {expected}; refusing to patch other weights")
    return directory, downloaded


def prune_cache(cache_dir: Path, keep: set[str]) -> None:
    """Remove materialized versions not in ``keep`` (a loaded model no longer
    needs its files; the newest are kept as parents of the next deltas)."""
    if not Path(cache_dir).is_dir():
        return
    for path in Path(cache_dir).iterdir():
        if path.is_dir() and path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)
