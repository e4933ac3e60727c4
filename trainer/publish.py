"""Publishing policy versions without stopping training.

After an update the trainer takes a snapshot of the policy's trainable
tensors (a copy in memory, milliseconds) and hands it here; this module's one
thread writes it as a servable version (safetensors, tokenizer, arbiter.json)
into a temporary directory, renames it into place atomically, and only then
announces it on the policy-updates topic. Training goes on meanwhile: the
snapshot is a copy, so the next optimizer step cannot tear the files.

With ``weights.uri`` (``s3://bucket/prefix`` or ``file:///dir``) the written
version is then uploaded through :mod:`arbiter.weights` (files, then the
manifest: an upload cut short is never a version) and announced with its URI,
so replicas need no filesystem shared with the trainer. ``weights.bf16``
casts the snapshot's floating-point tensors to bfloat16 before writing;
``weights.delta`` uploads only the tensors that changed since the previous
version this publisher uploaded (a full version every ``full_every``).

Only the newest version matters to followers: a snapshot still waiting when a
newer one arrives is dropped (counted as superseded) and never written, so a
slow disk delays versions instead of queueing them. An announcement the
broker refused stays owed and is retried while the thread is idle, unless a
newer version supersedes it.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from arbiter.hf import combine_weights_sha256, files_sha256
from arbiter.stream import StreamError
from arbiter.weights import MANIFEST, ParentVersion, PublishSettings, StoreError, join_uri, open_store, publish_version

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    """A version's label, training step and tensors (copies, by state-dict key)."""

    version: str
    step: int
    tensors: dict[str, torch.Tensor]


def snapshot_tensors(module: torch.nn.Module, only_trainable: bool) -> dict[str, torch.Tensor]:
    """Copies of ``module``'s state (or of its trainable parameters only, e.g.
    LoRA adapters) in host memory, keyed as in its state dict: an accelerator
    keeps no second copy, and the writer reads them from there anyway.
    Tensors that share storage (tied embeddings) stay shared in the copy, so
    the saved file ties them too."""
    if only_trainable:
        source = {name: p for name, p in module.named_parameters() if p.requires_grad}
    else:
        source = module.state_dict()
    copies: dict[tuple[int, torch.Size, torch.dtype], torch.Tensor] = {}
    out = {}
    for name, tensor in source.items():
        key = (tensor.data_ptr(), tensor.shape, tensor.dtype)
        if key not in copies:
            copies[key] = tensor.detach().to("cpu", copy=True)
        out[name] = copies[key]
    return out


def to_bf16(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating-point tensors as bfloat16 for transport (others as they are);
    tensors that share storage (tied embeddings) still share it."""
    cast: dict[tuple[int, torch.Size, torch.dtype], torch.Tensor] = {}
    out = {}
    for name, tensor in tensors.items():
        if not tensor.is_floating_point() or tensor.dtype == torch.bfloat16:
            out[name] = tensor
            continue
        key = (tensor.data_ptr(), tensor.shape, tensor.dtype)
        if key not in cast:
            cast[key] = tensor.to(torch.bfloat16)
        out[name] = cast[key]
    return out


class BackgroundPublisher:
    """``submit(snapshot)`` returns at once; ``save(dir, snapshot)``, the
    upload (with ``weights.uri``) and then ``announce(version)`` run on the
    publisher's thread. ``announce`` also gets, as keywords, what the
    publisher knows: ``weights_uri`` (with a store) and ``weights_sha256``
    (when the version holds safetensors weights). Each file written is
    hashed once: by the upload (the manifest's digests), or, without a
    store, right after the write. ``close()`` finishes the newest pending
    version (and its announcement) before returning."""

    def __init__(
        self, root: Path, save: Callable[[Path, Snapshot], None], announce: Callable[..., None],
        on_saved: Callable[[str, float], None] | None = None, on_superseded: Callable[[], None] | None = None,
        retry_s: float = 2.0, weights: PublishSettings | None = None, keep_versions: int | None = None,
    ):
        self.root = root
        self.keep_versions = keep_versions
        self.weights = weights or PublishSettings()
        self._store = open_store(self.weights.uri, self.weights.transfer) if self.weights.uri else None
        # The last version uploaded, the next delta's parent, and deltas since a full version.
        self._parent: ParentVersion | None = None
        self._deltas = 0
        self._uploaded: dict[str, str] = {}  # version -> its URI (the newest few)
        self._weights_sha256: dict[str, str] = {}  # version -> its weights digest (the newest only)
        self.last_published = None  # arbiter.weights.Published of the newest upload
        self._save = save
        self._announce = announce
        self._on_saved = on_saved or (lambda version, seconds: None)
        self._on_superseded = on_superseded or (lambda: None)
        self.retry_s = retry_s
        self._cond = threading.Condition()
        self._pending: Snapshot | None = None
        self._owed: str | None = None  # saved, announcement not acknowledged
        self._busy = False
        self._closing = False
        self.failures = 0
        self._thread = threading.Thread(target=self._run, name="policy-publisher", daemon=True)
        self._thread.start()

    def submit(self, snapshot: Snapshot) -> None:
        with self._cond:
            if self._pending is not None:
                log.info("policy %s superseded by %s before it was written", self._pending.version, snapshot.version)
                self._on_superseded()
            self._pending = snapshot
            self._cond.notify_all()

    def owe(self, version: str) -> None:
        """Announce an already saved version (e.g. after a restart)."""
        with self._cond:
            if self._pending is None:
                self._owed = version
                self._cond.notify_all()

    def wait_idle(self, timeout_s: float | None = None) -> bool:
        """Until every submitted version is written and announced (or its
        announcement failed and is owed). True unless it timed out."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while self._pending is not None or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout_s: float = 120.0) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("the policy publisher did not finish within %.0fs", timeout_s)

    # -- the publisher's thread ----------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closing:
                    if self._owed is not None:
                        self._cond.wait(self.retry_s)
                        break
                    self._cond.wait()
                job, self._pending = self._pending, None
                owed = self._owed
                if job is None and owed is None and self._closing:
                    return
                self._busy = True
            try:
                if job is not None:
                    if self._write(job):
                        self._try_announce(job.version)
                elif owed is not None:
                    self._try_announce(owed)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
                    # Closing: a failed announcement is retried by the next
                    # run (the checkpoint's version is re-announced at start).
                    if self._closing and self._pending is None:
                        return

    def _write(self, job: Snapshot) -> bool:
        started = time.perf_counter()
        final = self.root / job.version
        tmp = self.root / f".tmp-{job.version}"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            if self.weights.bf16:
                job = Snapshot(job.version, job.step, to_bf16(job.tensors))
            self._save(tmp, job)
            if self._store is None:
                # The announcement's digest, taken here while the bytes are in
                # the page cache (with a store, the upload hashes each file once,
                # beside the transfer). The files are never rewritten in place
                # (written aside, renamed), so the digest stays theirs.
                weights = sorted(p for p in tmp.glob("*.safetensors") if p.is_file())
                if weights:
                    self._weights_sha256 = {
                        job.version: combine_weights_sha256(files_sha256(weights))}
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        except Exception:  # a full disk must not stop training: the next version tries again
            self.failures += 1
            log.exception("writing policy version %s failed; it is not published", job.version)
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        self._on_saved(job.version, time.perf_counter() - started)
        self._prune(keep=final)
        return True

    def _prune(self, keep: Path) -> None:
        """Only the newest ``keep_versions`` version directories stay (by
        modification time; the one just written and a delta's parent always
        do). What the store holds is not touched."""
        if self.keep_versions is None:
            return
        protected = {keep, self._parent.directory if self._parent is not None else None}
        versions = sorted((p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                          key=lambda p: p.stat().st_mtime, reverse=True)
        for old in versions[self.keep_versions:]:
            if old not in protected:
                shutil.rmtree(old, ignore_errors=True)
                log.info("policy %s removed from %s (keep_policy_versions %d)", old.name, self.root,
                         self.keep_versions)

    def _upload(self, version: str) -> str:
        """The version in the store (once); returns its URI. Raises StoreError."""
        if self._store is None:
            return ""
        if version in self._uploaded:
            return self._uploaded[version]
        if self._store.exists(f"{version}/{MANIFEST}"):  # uploaded before a restart (a label names one set of weights)
            return join_uri(self._store.uri, version)
        started = time.perf_counter()
        directory = self.root / version
        parent = None
        if self.weights.delta and self._deltas + 1 < self.weights.full_every and self._parent is not None \
                and self._parent.directory.is_dir():
            parent = self._parent
        published = publish_version(self._store, version, directory, parent=parent,
                                    dtype="bfloat16" if self.weights.bf16 else None)
        self._weights_sha256 = {version: published.weights_sha256}
        self._deltas = self._deltas + 1 if published.delta_of else 0
        self._parent = ParentVersion(version, directory, published.weights_sha256)
        self._uploaded = {version: published.uri}
        self.last_published = published
        log.info("policy %s uploaded to %s: %.1f of %.1f MiB%s in %.2fs", version, published.uri,
                 published.bytes_uploaded / 2**20, published.bytes_total / 2**20,
                 f" (delta of {published.delta_of})" if published.delta_of else "", time.perf_counter() - started)
        return published.uri

    def _try_announce(self, version: str) -> None:
        try:
            known = {}
            uri = self._upload(version)
            if uri:
                known["weights_uri"] = uri
            if version in self._weights_sha256:
                known["weights_sha256"] = self._weights_sha256[version]
            self._announce(version, **known)
        except (StreamError, StoreError) as err:  # not acknowledged / not stored, or not even reachable
            log.warning("publishing policy %s failed (retried while training goes on): %s", version, err)
            with self._cond:
                if self._pending is None:
                    self._owed = version
            return
        with self._cond:
            self._owed = None  # an older owed announcement is superseded by this one
