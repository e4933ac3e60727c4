"""The policy server following the policy-updates topic: each PolicyUpdate the
trainer publishes is verified and hot-swapped in through the same engine path
as ``ModelService.LoadModelVersion`` (in-flight requests finish on the old
weights; a version that fails to load or validate is refused and the serving
version is untouched).

Every replica sees every update: each reads every partition of the topic
without a consumer group (no group join to wait for, no partition another
member could own, and partitions added when the topic is recreated are read
too). A replica starts from its ``--model`` weights, so whenever it starts it
replays the topic from the beginning: within what one poll returns, updates are tried newest first and
the first that is applied (or already loaded) supersedes all older ones, so a
(re)started replica loads only the newest loadable version and ends up where
its long-running peers are, even when the newest update is broken.

An update with ``weights_uri`` (``s3://bucket/prefix/VERSION`` or
``file:///dir/VERSION``, published through :mod:`arbiter.weights`) is
fetched into this replica's ``--weights-cache-dir``: downloaded, every file
checked against the manifest's sha256 (a delta patched onto its parent after
the parent's sha256 is checked), and only then loaded; ``weights_uri`` takes
precedence over ``checkpoint_path``, which older trainers alone set. A
version that cannot be downloaded or verified is refused (counted in
``arbiter_policy_update_refusals_total{reason}``) and the serving version
stays; it is not retried (the trainer's next version is). Only locations
under ``--weights-uri-prefix`` are fetched when that is set.

With the Triton backend (``--backend triton``) each update's checkpoint is
first exported as the next version of the served Triton model (beside the
serving one, under the model's existing config.pbtxt), and that version
directory is loaded: Triton loads it beside the old version, which serves
until the new one is ready. Triton serves full checkpoints: LoRA updates are
refused there (failed, the serving version stays).

kafka-python is blocking: the consumer runs on its own thread and hops onto
the server's event loop only for the load itself.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from arbiter.errors import ArbiterError, ModelLoadError, PermissionDenied
from arbiter.hf import weights_sha256
from arbiter.lm import is_adapter_dir
from arbiter.policy.engine import PolicyEngine
from arbiter.stream import KafkaSettings, RecordBatch, StreamConsumer, StreamError, topics
from arbiter.v1 import rollout_pb2
from arbiter.weights import REASONS, SHA256, WeightsError, download_version, prune_cache, split_uri
from services.common.model_service import check_model_root
from services.policy.metrics import PolicyMetrics

log = logging.getLogger(__name__)

APPLIED, SKIPPED, REFUSED, FAILED = "applied", "skipped", "refused", "failed"
OUTCOMES = (APPLIED, SKIPPED, REFUSED, FAILED)
# Why an update was refused (arbiter_policy_update_refusals_total{reason}):
# arbiter.weights.REASONS for a version fetched from a store, and these.
OUTSIDE_ROOTS, ADAPTER_MISMATCH, INVALID_RECORD = "outside_roots", "adapter_mismatch", "invalid_record"
REFUSAL_REASONS = (*REASONS, OUTSIDE_ROOTS, ADAPTER_MISMATCH, INVALID_RECORD)


class PolicyUpdateFollower:
    def __init__(
        self,
        kafka: KafkaSettings,
        replica_id: str,
        engine: PolicyEngine,
        model_roots: Sequence[Path],
        loop: asyncio.AbstractEventLoop,
        metrics: PolicyMetrics,
        *,
        poll_timeout_s: float = 0.5,
        retry_s: float = 2.0,
        weights_cache_dir: str | Path | None = None,
        weights_uri_prefixes: Sequence[str] = (),
    ):
        self.kafka = kafka
        self.replica_id = replica_id
        # The same rule as LoadModelVersion: an update may name any path, but
        # only checkpoints under these directories are read.
        self.model_roots = tuple(model_roots)
        self.engine = engine
        self.loop = loop
        self.metrics = metrics
        self.poll_timeout_s = poll_timeout_s
        self.retry_s = retry_s
        # Versions fetched from a weights store are materialized here (this
        # replica's own directory, so it is not subject to model_roots).
        self._own_cache = not weights_cache_dir
        self.weights_cache_dir = Path(weights_cache_dir or tempfile.mkdtemp(prefix=f"arbiter-weights-{replica_id}-"))
        self.weights_uri_prefixes = tuple(p.rstrip("/") for p in weights_uri_prefixes)
        self._stop = threading.Event()
        # Readiness: set once every update published before this replica
        # joined has been handled (each assigned partition read to its high
        # watermark); the server reports SERVING only then.
        self.caught_up = threading.Event()
        self._started_at = time.time()
        self._thread = threading.Thread(target=self._run, name="policy-update-follower", daemon=True)
        # NLPO: the masking policies announced last (PolicyUpdate.mask_version), kept loaded.
        self._masks: list[str] = []
        for outcome in OUTCOMES:
            metrics.policy_updates.labels(outcome)
        for reason in REFUSAL_REASONS:
            metrics.policy_update_refusals.labels(reason)

    def start(self) -> None:
        self._thread.start()

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Called on server stop, before the engine closes; a load in progress
        finishes first (it runs on this loop, which stays free meanwhile)."""
        self._stop.set()
        if self._thread.is_alive():
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, timeout_s)
            if self._thread.is_alive():
                log.warning("policy-update follower did not stop within %.0fs", timeout_s)
                return
        if self._own_cache:  # loaded models keep their weights; the files were ours
            shutil.rmtree(self.weights_cache_dir, ignore_errors=True)

    # -- consumer thread ----------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                # An unusable record is skipped and counted (refused), never
                # retried: stopping on it would freeze this replica's version.
                consumer = StreamConsumer(self.kafka, [topics.POLICY_UPDATES], None, skip_invalid=True,
                                          observer=self.metrics.rejected_records)
            except StreamError as err:
                # The broker or topic may come later than the server: keep serving, keep trying.
                log.warning("policy updates: cannot consume (%s); retrying in %.0fs", err, self.retry_s)
                self._stop.wait(self.retry_s)
                continue
            try:
                self._follow(consumer)
            except StreamError as err:
                log.warning("policy updates: consumer failed (%s); reconnecting in %.0fs", err, self.retry_s)
                self._stop.wait(self.retry_s)
            except Exception:  # a bug must not end following silently
                log.exception("policy updates: unexpected error; reconnecting in %.0fs", self.retry_s)
                self._stop.wait(self.retry_s)
            finally:
                consumer.close()

    def _follow(self, consumer: StreamConsumer) -> None:
        # No group: every partition is replayed from the start (see the module
        # docstring); offset 0 past the retention horizon falls back to the
        # earliest retained record. Seeking also makes each partition's
        # position known, so an empty one counts as caught up.
        consumer.seek({tp: 0 for tp in consumer.assignment()})
        log.info("policy updates: following %s as replica %s", self.kafka.topic(topics.POLICY_UPDATES), self.replica_id)
        while not self._stop.is_set():
            self._note_caught_up(consumer)
            batch = consumer.poll(timeout_s=self.poll_timeout_s)
            if batch.records or batch.rejected:
                self._handle(consumer, batch)

    def _handle(self, consumer: StreamConsumer, batch: RecordBatch) -> None:
        for _rejected in batch.rejected:  # the consumer logged the reason
            self._refuse(INVALID_RECORD)
        settled = False
        for record in reversed(batch.records):
            update: rollout_pb2.PolicyUpdate = record.message
            where = f"{record.topic}[{record.partition}]@{record.offset}"
            missing = _missing_fields(update)
            if missing:
                consumer.reject(record, "invalid_record", f"policy update {update.policy_version!r}: {missing}")
                self._refuse(INVALID_RECORD)
                continue
            if settled:
                log.info("policy update %r (%s): superseded by a newer one", update.policy_version, where)
                self._count(SKIPPED)
                continue
            outcome = self.apply(update, where)
            if outcome != REFUSED:  # apply counted the refusal with its reason
                self._count(outcome)
            settled = outcome in (APPLIED, SKIPPED)

    def _count(self, outcome: str) -> None:
        self.metrics.policy_updates.labels(outcome).inc()

    def _refuse(self, reason: str) -> str:
        """Count a refusal (the serving version stays) with why."""
        self._count(REFUSED)
        self.metrics.policy_update_refusals.labels(reason).inc()
        return REFUSED

    def _note_caught_up(self, consumer: StreamConsumer) -> None:
        if self.caught_up.is_set():
            return
        lag = consumer.lag()  # only partitions with a known high watermark
        if lag.keys() >= consumer.assignment() and not any(lag.values()):
            log.info("policy updates: caught up, serving %r", self.engine.models.active_version)
            self.caught_up.set()

    def apply(self, update: rollout_pb2.PolicyUpdate, where: str = "") -> str:
        """Verify and load one update; returns its outcome (never raises; a
        refusal is counted here, with its reason)."""
        version = update.policy_version
        label = f"policy update {version!r} ({where or 'direct'})"
        missing = _missing_fields(update)
        if missing:
            log.error("%s: refused: %s", label, missing)
            return self._refuse(INVALID_RECORD)
        # Before this update's load: its eviction must not take the mask.
        self._on_loop(self._pin_masks(update.mask_version))
        if version in self._on_loop(self._loaded_versions()):
            log.info("%s: version already loaded; skipped", label)
            return SKIPPED
        fetched_from = update.weights_uri  # takes precedence over checkpoint_path (rollout.proto)
        try:
            if fetched_from:
                scheme, local = split_uri(fetched_from)
                if self.weights_uri_prefixes and not any(
                        fetched_from.startswith(p + "/") for p in self.weights_uri_prefixes):
                    raise PermissionDenied(f"weights_uri {fetched_from!r} is outside this replica's "
                                           f"--weights-uri-prefix ({', '.join(self.weights_uri_prefixes)})")
                if scheme == "file":  # a shared directory: the same rule as checkpoint_path
                    check_model_root(local, self.model_roots)
            else:
                check_model_root(update.checkpoint_path, self.model_roots)
        except ArbiterError as err:  # PermissionDenied, or a URI no store serves
            log.error("%s: refused: %s", label, err)
            return self._refuse(OUTSIDE_ROOTS if isinstance(err, PermissionDenied) else INVALID_RECORD)
        expected = update.weights_sha256.lower().removeprefix("sha256:")
        if fetched_from:
            try:
                pending = download_version(fetched_from, self.weights_cache_dir)
            except WeightsError as err:
                log.error("%s: refused, still serving %r: %s", label, self.engine.models.active_version, err)
                return self._refuse(err.reason)
            path = str(pending.path)

            def check() -> None:
                actual = pending.verify().weights_sha256
                if expected and actual != expected:
                    raise WeightsError(SHA256, f"the weights hash to {actual} as {fetched_from} publishes them, "
                                       f"the update says {expected}")
        else:
            path = update.checkpoint_path

            def check() -> None:
                if not expected:
                    return
                try:
                    actual = weights_sha256(path)
                except (ArbiterError, OSError) as err:
                    raise ModelLoadError(f"cannot hash the weights in {path}: {err}") from err
                if actual != expected:
                    raise WeightsError(SHA256, f"weights_sha256 of {path} is {actual}, the update says {expected} "
                                       "(partial copy or tampering?)")
        if Path(path).is_dir() and is_adapter_dir(path) != update.is_adapter:
            log.error(
                "%s: refused: is_adapter=%s but %s %s adapter_config.json", label, update.is_adapter, path,
                "has" if is_adapter_dir(path) else "has no",
            )
            return self._refuse(ADAPTER_MISMATCH)
        started = time.perf_counter()
        refusal: WeightsError | None = None
        try:
            if self.engine.config.backend.remote:
                # Checked first: exporting copies the files into Triton's repository.
                check()
                path = self._export(path, label)
                self._on_loop(self._load(path, version))
            else:
                # The files are hashed here while the loader reads them; the
                # engine hands the model to the kernel only once this check
                # passed (load_checked), so nothing unverified ever serves.
                verdict: concurrent.futures.Future = concurrent.futures.Future()
                loading = asyncio.run_coroutine_threadsafe(
                    self.engine.load_checked(path, version, verdict.result), self.loop)
                try:
                    check()
                    verdict.set_result(None)
                except BaseException as err:
                    verdict.set_exception(err)
                    if isinstance(err, WeightsError):
                        refusal = err
                loading.result()
        except WeightsError as err:
            refusal = err
        except ArbiterError as err:
            if refusal is None:
                log.error("%s: failed, still serving %r: %s", label, self.engine.models.active_version, err)
                return FAILED
        except Exception:
            if refusal is None:
                log.exception("%s: failed, still serving %r", label, self.engine.models.active_version)
                return FAILED
        if refusal is not None:  # whatever the load made of the same bytes
            log.error("%s: refused, still serving %r: %s", label, self.engine.models.active_version, refusal)
            return self._refuse(refusal.reason)
        published = update.created_at.ToNanoseconds() / 1e9 if update.HasField("created_at") else None
        latency = max(0.0, time.time() - published) if published else None
        # Weight-sync latency: only for updates published while this replica
        # was following; replaying older ones after a restart measures the restart.
        if latency is not None and published >= self._started_at:
            self.metrics.policy_update_apply_seconds.observe(latency)
        self.metrics.policy_update_step.set(update.training_step)
        if fetched_from:
            # Loaded models hold their weights; keep the newest files as the next delta's parent.
            prune_cache(self.weights_cache_dir, {version} | self._on_loop(self._loaded_versions()))
        log.info(
            "%s: applied (step %d, parent %r, %s) in %.2fs%s", label, update.training_step, update.parent_version,
            "adapter" if update.is_adapter else "full weights", time.perf_counter() - started,
            f", serving {latency:.2f}s after publication" if latency is not None else "",
        )
        return APPLIED

    def _export(self, path: str, label: str) -> str:
        """With the Triton backend: the checkpoint as a new version of the
        served Triton model (beside the serving one, under its config), whose
        REPO/NAME/N the engine then loads into Triton."""
        from arbiter.backends.triton_export import ExportError, ExportOptions, export

        if is_adapter_dir(path):
            raise ModelLoadError(
                f"{path} is a LoRA adapter; a policy served by Triton takes full checkpoints (publish merged "
                "weights: the trainer without LoRA, or merge_and_unload before publishing)"
            )
        # The service's --model is REPO/NAME/N: new versions go beside it.
        repository = Path(self.engine.config.base_model_dir).resolve().parent.parent
        try:
            target = export(path, "policy", repository, ExportOptions(name=self.engine.config.backend.triton_model),
                            write_config=False)
        except ExportError as err:
            raise ModelLoadError(f"cannot export {path} to Triton: {err}") from err
        log.info("%s: exported as %s", label, target)
        return str(target)

    # -- on the server's loop -----------------------------------------------

    def _on_loop(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def _loaded_versions(self) -> set[str]:
        return {info.version for info in self.engine.models.list_versions()}

    async def _pin_masks(self, mask: str) -> None:
        """NLPO: the masking policy the trainer announces, and the one before
        it (workers sample under it until this replica has the new one), stay
        loaded whatever max_loaded_versions evicts; older ones are let go."""
        if not mask or mask in self._masks:
            return
        released, self._masks = self._masks[:-1], [*self._masks[-1:], mask]
        self.engine.models.unpin(released)
        self.engine.models.pin(self._masks, "an NLPO masking policy (PolicyUpdate.mask_version)")

    async def _load(self, path: str, version: str) -> None:
        # The version label is the update's, whatever the checkpoint's arbiter.json says.
        await self.engine.models.load_version(path, version, activate=True)


def _missing_fields(update: rollout_pb2.PolicyUpdate) -> str | None:
    if not update.policy_version or not (update.weights_uri or update.checkpoint_path):
        return "policy_version and weights_uri or checkpoint_path are required"
    return None
