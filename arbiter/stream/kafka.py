"""Everything that speaks the Kafka protocol: the only module importing kafka-python.

- ``ensure_topics``: create topics with their final partition count (idempotent).
- ``StreamProducer``: protobuf records keyed by their payload's key field, acks=all.
- ``StreamConsumer``: decoded batches with (topic, partition, offset), manual
  commits of exactly the offsets a caller names, and seeks to offsets stored
  in a checkpoint.

Exactly-once recipe for a trainer (the broker gives at-least-once; the
checkpoint makes it exact):

1. restore the checkpoint, ``consumer.seek(checkpoint_offsets)``;
2. ``batch = consumer.poll()``, train, accumulate ``batch.next_offsets()``;
3. write the checkpoint WITH those offsets durably, then ``consumer.commit(them)``.

After kill -9 between 3's two halves the group's commit is behind the
checkpoint; step 1's seek wins, so nothing is processed twice, and since
commits never run ahead of a checkpoint nothing is lost. Dedupe by
``rollout_id`` as a last line of defence (producer retries are idempotent, but a
worker that crashes before its own bookkeeping may produce a sample twice).

Dev broker gaps this module designs around (Tansu 0.6): no CreatePartitions
(topics are created once, final size); ListOffsets(latest) is wrong, so
consumers start from "earliest" plus committed offsets, never "latest", and
``lag()`` uses fetch high watermarks (correct) instead of end offsets; a
producer's metadata request auto-creates a missing topic even with
allow_auto_create_topics=False, so the producer checks topics with an admin
request first; commit metadata strings are not stored.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Generic, TypeVar

import kafka.errors as kerrors
from google.protobuf.message import Message
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.structs import OffsetAndMetadata
from kafka.structs import TopicPartition as _KafkaTP

from arbiter.stream import codec
from arbiter.stream import topics as names
from arbiter.stream.errors import CommitError, PayloadError, ProduceError, StreamError, TopicError
from arbiter.stream.settings import KafkaSettings
from arbiter.stream.types import (
    ConsumedRecord,
    ConsumerObserver,
    ConsumerStats,
    Delivery,
    Offsets,
    ProducerObserver,
    ProducerStats,
    RecordBatch,
    RejectedRecord,
    TopicPartition,
)

log = logging.getLogger(__name__)

# kafka-python logs every connection and metadata refresh at INFO; an explicit
# level set by the application (before or after this import) still wins.
if logging.getLogger("kafka").level == logging.NOTSET:
    logging.getLogger("kafka").setLevel(logging.WARNING)

M = TypeVar("M", bound=Message)

# kafka-python 3 reports an unreachable bootstrap list as KafkaTimeoutError
# (older releases raised NoBrokersAvailable).
_NO_BROKERS = tuple({kerrors.KafkaTimeoutError, getattr(kerrors, "NoBrokersAvailable", kerrors.KafkaTimeoutError)})


def client_config(settings: KafkaSettings) -> dict[str, Any]:
    """kafka-python options shared by producers, consumers and admin clients."""
    config: dict[str, Any] = {
        "bootstrap_servers": list(settings.bootstrap_servers),
        "client_id": settings.client_id,
        "security_protocol": settings.security_protocol,
        "request_timeout_ms": settings.request_timeout_ms,
    }
    if settings.security_protocol.startswith("SASL_"):
        config.update(
            sasl_mechanism=settings.sasl_mechanism,
            sasl_plain_username=settings.sasl_username,
            sasl_plain_password=settings.sasl_password,
        )
    if settings.security_protocol.endswith("SSL"):
        config.update(
            ssl_cafile=settings.ssl_cafile,
            ssl_certfile=settings.ssl_certfile,
            ssl_keyfile=settings.ssl_keyfile,
            ssl_check_hostname=settings.ssl_check_hostname,
        )
    return config


def _admin(settings: KafkaSettings, timeout_s: float) -> KafkaAdminClient:
    try:
        return KafkaAdminClient(**client_config(settings), bootstrap_timeout_ms=int(timeout_s * 1000))
    except _NO_BROKERS as err:
        raise StreamError(f"no Kafka broker reachable at {','.join(settings.bootstrap_servers)}: {err}") from err


def list_topics(settings: KafkaSettings, timeout_s: float = 10.0) -> set[str]:
    """Wire names of all topics: a metadata round trip (also a readiness probe)."""
    admin = _admin(settings, timeout_s)
    try:
        return set(admin.list_topics())
    finally:
        admin.close()


def cluster_id(settings: KafkaSettings, timeout_s: float = 10.0) -> str:
    """The cluster's id (DescribeCluster): what offsets stored outside Kafka
    (a trainer's checkpoint) must be checked against before they are used,
    since the same topic names on another cluster name another log."""
    admin = _admin(settings, timeout_s)
    try:
        return str(admin.describe_cluster()["cluster_id"])
    except kerrors.KafkaError as err:
        raise StreamError(f"cannot describe the Kafka cluster at {','.join(settings.bootstrap_servers)}: {err}") from err
    finally:
        admin.close()


def group_offsets(settings: KafkaSettings, group_id: str, topic: str, timeout_s: float = 10.0) -> dict[int, int]:
    """A consumer group's committed next offsets on the logical ``topic``, by
    partition (OffsetFetch through the admin client: the group is not joined,
    so its members are not rebalanced). Partitions without a commit are absent."""
    admin = _admin(settings, timeout_s)
    wire = settings.topic(topic)
    try:
        committed = admin.list_group_offsets({group_id: None}).get(group_id, {})
    except kerrors.KafkaError as err:
        raise StreamError(f"committed offsets of group {group_id!r}: {err}") from err
    finally:
        admin.close()
    return {ktp.partition: meta.offset for ktp, meta in committed.items() if ktp.topic == wire and meta.offset >= 0}


def _partition_counts(admin: KafkaAdminClient, names: Sequence[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for topic in admin.describe_topics(list(names)):
        if topic.get("error_code", 0) == 0 and topic.get("partitions"):
            counts[topic["name"]] = len(topic["partitions"])
    return counts


def partition_count(settings: KafkaSettings, topic: str, timeout_s: float = 10.0) -> int:
    """Partitions of the logical ``topic`` (0 when it does not exist)."""
    admin = _admin(settings, timeout_s)
    try:
        return _partition_counts(admin, [settings.topic(topic)]).get(settings.topic(topic), 0)
    finally:
        admin.close()


def ensure_topics(
    settings: KafkaSettings,
    partitions: Mapping[str, int],
    *,
    configs: Mapping[str, Mapping[str, str]] | None = None,
    timeout_s: float = 30.0,
) -> dict[str, int]:
    """Create the logical topics ``{name: partitions}`` (``settings.topic_prefix``
    applied) unless they exist; returns {wire name: partition count}.

    Idempotent. A topic that exists with FEWER partitions than asked is an error,
    not something to fix in place: adding partitions moves keys between
    partitions (and the dev broker cannot do it at all).
    """
    wanted: dict[str, int] = {}
    for name, count in partitions.items():
        if not isinstance(count, int) or count < 1:
            raise TopicError(f"partitions[{name!r}]: must be an integer >= 1, got {count!r}")
        wanted[settings.topic(name)] = count
    if not wanted:
        return {}
    configs = configs or {}
    admin = _admin(settings, timeout_s)
    try:
        existing = _partition_counts(admin, list(wanted))
        missing = {name: count for name, count in wanted.items() if name not in existing}
        if missing:
            request = {
                name: {
                    "num_partitions": count,
                    "replication_factor": settings.replication_factor,
                    "configs": dict(configs.get(settings.logical_topic(name), {})),
                }
                for name, count in missing.items()
            }
            response = admin.create_topics(request, timeout_ms=int(timeout_s * 1000), raise_errors=False)
            for topic in response["topics"]:
                error = kerrors.for_code(topic["error_code"])
                # Another process may have created it between describe and create.
                if error is kerrors.NoError or error is kerrors.TopicAlreadyExistsError:
                    continue
                raise TopicError(
                    f"creating topic {topic['name']!r} failed: {error.__name__}: {topic.get('error_message') or ''}"
                )
            try:
                admin.wait_for_topics(list(missing), timeout_ms=int(timeout_s * 1000))
            except kerrors.KafkaTimeoutError as err:
                raise TopicError(f"topics not ready after {timeout_s}s: {err}") from err
            existing = _partition_counts(admin, list(wanted))
        for name, count in wanted.items():
            actual = existing.get(name)
            if actual is None:
                raise TopicError(f"topic {name!r} is missing after creation")
            if actual < count:
                raise TopicError(
                    f"topic {name!r} exists with {actual} partitions but {count} are required; partitions "
                    f"cannot be added in place (keys would move): delete and recreate it, or use another topic_prefix"
                )
            if actual > count:
                log.info("topic %s has %d partitions (asked for %d); keeping it", name, actual, count)
        return {name: existing[name] for name in wanted}
    finally:
        admin.close()


def delete_topics(settings: KafkaSettings, names: Iterable[str], timeout_s: float = 30.0) -> None:
    """Delete logical topics (prefix applied); missing ones are ignored."""
    wire = [settings.topic(name) for name in names]
    admin = _admin(settings, timeout_s)
    try:
        response = admin.delete_topics(wire, timeout_ms=int(timeout_s * 1000), raise_errors=False)
        for topic in response["topics"]:
            error = kerrors.for_code(topic["error_code"])
            if error not in (kerrors.NoError, kerrors.UnknownTopicOrPartitionError):
                raise TopicError(f"deleting topic {topic['name']!r} failed: {error.__name__}")
    finally:
        admin.close()


# -- producer ----------------------------------------------------------------


class StreamProducer:
    """Thread-safe producer of Arbiter payloads; several processes may produce
    to one topic at once (records are spread over partitions by key).

    ``send`` raises what fails at once (unknown topic, record too large, buffer
    full) and otherwise returns a future per record; ``flush`` waits for all
    and raises ProduceError if any record queued since the previous flush was
    not acknowledged, so a caller that ignores futures cannot lose records
    silently. Counters: ``stats()`` and the observer's callbacks.

    Broker restarts are ridden out: unacknowledged records are retried until
    ``delivery_timeout_ms`` (then reported failed), and a client left in a
    fatal state is replaced before the next send (``stats().rebuilds``).
    """

    def __init__(self, settings: KafkaSettings, observer: ProducerObserver | None = None):
        self.settings = settings
        self._observer = observer or ProducerObserver()
        self._lock = threading.Lock()
        self._stats = ProducerStats()
        self._failures_since_flush: list[BaseException] = []
        self._existing_topics: set[str] = set()
        self._producer = self._new_client()

    def _new_client(self) -> KafkaProducer:
        settings = self.settings
        try:
            return KafkaProducer(
                **client_config(settings),
                acks="all",
                # Retries without duplicates: the broker drops a retried batch it already has.
                enable_idempotence=True,
                linger_ms=settings.linger_ms,
                batch_size=settings.batch_size,
                compression_type=settings.compression_type,
                max_request_size=settings.max_request_size,
                max_block_ms=settings.max_block_ms,
                delivery_timeout_ms=settings.delivery_timeout_ms,
                # Auto-created topics get the broker's default partition count.
                allow_auto_create_topics=False,
            )
        except _NO_BROKERS as err:
            raise StreamError(f"no Kafka broker reachable at {','.join(settings.bootstrap_servers)}: {err}") from err

    def _client_is_fatal(self) -> BaseException | None:
        # An idempotent producer whose InitProducerId failed with an error the
        # client does not retry (a restarting broker answers UnknownServerError)
        # is dead for good: every later send fails with that error. Only a new
        # client (a new producer id) recovers; the records it had not
        # delivered were already reported failed to their callers.
        manager = getattr(self._producer, "_transaction_manager", None)
        if manager is None or not manager.has_fatal_error():
            return None
        return manager.last_error or kerrors.KafkaError("fatal producer state")

    def _rebuild_if_fatal(self) -> None:
        with self._lock:
            error = self._client_is_fatal()
            if error is None:
                return
            dead, self._producer = self._producer, self._new_client()
            self._stats = replace(self._stats, rebuilds=self._stats.rebuilds + 1)
        log.warning("producer %s: the Kafka client hit a fatal error (%s: %s); replaced it with a new one",
                    self.settings.client_id, type(error).__name__, error)
        dead.close(timeout=0)

    def send(self, topic: str, message: Message) -> concurrent.futures.Future[Delivery]:
        """Queue ``message`` for the logical ``topic``; keyed by the payload's key
        field (Rollout: prompt_id). Raises InvalidInput for a message the topic
        does not carry, ProduceError when it cannot even be queued."""
        encoded = codec.encode(topic, message, producer=self.settings.client_id)
        return self._send(self.settings.topic(topic), encoded.key, encoded.value, encoded.headers)

    def _send(
        self, wire: str, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]
    ) -> concurrent.futures.Future[Delivery]:
        """Queue an already encoded record for the ``wire`` topic (also how
        dead-letter copies go out, bytes unchanged)."""
        result: concurrent.futures.Future[Delivery] = concurrent.futures.Future()
        size = len(value or b"")
        started = time.monotonic()
        with self._lock:
            self._stats = replace(self._stats, sent=self._stats.sent + 1)
        if wire not in self._existing_topics:
            self._check_topic(wire)
        self._rebuild_if_fatal()
        try:
            future = self._producer.send(wire, key=key, value=value, headers=headers)
        except kerrors.KafkaTimeoutError as err:
            error = ProduceError(
                f"{wire}: not queued within max_block_ms={self.settings.max_block_ms} "
                f"(does the topic exist? is the buffer full?): {err}"
            )
            self._failed(wire, error, report_at_flush=False)
            raise error from err
        except kerrors.KafkaError as err:
            error = ProduceError(f"{wire}: {type(err).__name__}: {err}")
            self._failed(wire, error, report_at_flush=False)
            raise error from err

        def delivered(metadata) -> None:
            latency = time.monotonic() - started
            with self._lock:
                self._stats = replace(
                    self._stats, delivered=self._stats.delivered + 1,
                    delivered_bytes=self._stats.delivered_bytes + size,
                )
            self._observer.on_delivered(metadata.topic, metadata.partition, size, latency)
            result.set_result(Delivery(metadata.topic, metadata.partition, metadata.offset, metadata.timestamp))

        def failed(exc: BaseException) -> None:
            error = ProduceError(f"{wire}: record not acknowledged: {type(exc).__name__}: {exc}")
            error.__cause__ = exc
            self._failed(wire, error, report_at_flush=True)
            result.set_exception(error)

        future.add_callback(delivered)
        future.add_errback(failed)
        return result

    def _check_topic(self, wire: str) -> None:
        # Tansu creates a missing topic (with its default partition count) when
        # a producer merely asks for its metadata, ignoring
        # allow_auto_create_topics=False; an admin describe does not.
        admin = _admin(self.settings, self.settings.max_block_ms / 1000)
        try:
            exists = wire in _partition_counts(admin, [wire])
        finally:
            admin.close()
        if not exists:
            error = TopicError(
                f"topic {wire!r} does not exist (create it with ensure_topics / arbiter broker --create-topics)"
            )
            self._failed(wire, error, report_at_flush=False)
            raise error
        with self._lock:
            self._existing_topics.add(wire)

    def _failed(self, wire: str, error: BaseException, report_at_flush: bool) -> None:
        with self._lock:
            self._stats = replace(self._stats, failed=self._stats.failed + 1)
            if report_at_flush:
                self._failures_since_flush.append(error)
        self._observer.on_failed(wire, error)

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait until every queued record is acknowledged or failed; raise
        ProduceError if any failed since the previous flush."""
        try:
            self._producer.flush(timeout=timeout_s)
        except kerrors.KafkaTimeoutError as err:
            raise ProduceError(f"records still unacknowledged after {timeout_s}s: {err}") from err
        with self._lock:
            failures, self._failures_since_flush = self._failures_since_flush, []
        if failures:
            raise ProduceError(
                f"{len(failures)} record(s) were not acknowledged; first: {failures[0]}"
            ) from failures[0]

    def stats(self) -> ProducerStats:
        with self._lock:
            return self._stats

    def close(self, timeout_s: float = 10.0) -> None:
        """Deliver what is queued (up to timeout_s), then release connections."""
        self._producer.close(timeout=timeout_s)

    def __enter__(self) -> StreamProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- dead letters -------------------------------------------------------------

# Room left under max_request_size for the headers a dead-letter copy adds.
_DEAD_LETTER_HEADROOM = 16 * 1024
_DEAD_LETTER_ERROR_CHARS = 2000


class _DeadLetters:
    """Copies of rejected records on "<topic>.dead-letter" (topics created here,
    with their declared partition count), acknowledged before the consumer
    moves past the originals: a copy is never lost, but a record rejected
    again after a restart is copied again (the source headers tell them apart)."""

    def __init__(self, settings: KafkaSettings, logical_topics: Iterable[str]):
        self._settings = settings
        self._targets = {t: names.DEAD_LETTER_TOPICS[t] for t in logical_topics}
        ensure_topics(settings, {target: names.DEAD_LETTER_PARTITIONS for target in self._targets.values()})
        self._producer = StreamProducer(settings)

    def copy(self, rejected: Sequence[RejectedRecord]) -> None:
        """Raises StreamError unless every copy is acknowledged."""
        if not rejected:
            return
        for record in rejected:
            value = record.value
            headers = [
                *record.headers,
                (names.HEADER_DEAD_LETTER_REASON, record.reason.encode()),
                (names.HEADER_DEAD_LETTER_ERROR, str(record.error)[:_DEAD_LETTER_ERROR_CHARS].encode()),
                (names.HEADER_SOURCE_TOPIC, record.topic.encode()),
                (names.HEADER_SOURCE_PARTITION, str(record.partition).encode()),
                (names.HEADER_SOURCE_OFFSET, str(record.offset).encode()),
            ]
            if value is not None and len(value) > self._settings.max_request_size - _DEAD_LETTER_HEADROOM:
                # The broker would refuse the copy as it may have the original
                # (e.g. an oversize record): keep the evidence, not the bytes.
                headers.append((names.HEADER_DEAD_LETTER_VALUE_OMITTED, str(len(value)).encode()))
                value = b""
            target = self._settings.topic(self._targets[record.logical_topic])
            self._producer._send(target, record.key, value, headers)
        try:
            self._producer.flush(timeout_s=self._settings.delivery_timeout_ms / 1000)
        except ProduceError as err:
            raise StreamError(
                f"dead-letter copies not acknowledged (the rejected records will be read again): {err}"
            ) from err

    def close(self) -> None:
        self._producer.close()


# -- consumer ----------------------------------------------------------------


def _ours(tp: _KafkaTP) -> TopicPartition:
    return TopicPartition(tp.topic, tp.partition)


def _theirs(tp: TopicPartition) -> _KafkaTP:
    return _KafkaTP(tp[0], tp[1])


class _Listener(ConsumerRebalanceListener):
    def __init__(self, owner: StreamConsumer):
        self._owner = owner

    def on_partitions_revoked(self, revoked):
        self._owner._on_revoked(revoked)

    def on_partitions_assigned(self, assigned):
        self._owner._on_assigned(assigned)


class StreamConsumer(Generic[M]):
    """Decoded records of logical ``topics``; not thread-safe (use one thread).

    With ``group_id`` the partitions are shared by the group's members and
    offsets are committed only by ``commit`` (never automatically). Without
    it, every partition is read (from ``seek`` offsets or the beginning) and
    nothing can be committed: for tools and tests. With ``partitions`` (a
    predicate on partition numbers) and a group, exactly the partitions it
    accepts are read, new ones as they appear, and offsets are committed to
    the group without any rebalancing: the ranks of a distributed trainer.

    A partition with no committed offset starts at the earliest retained
    record (never "latest": the dev broker answers it wrongly, and a trainer
    wants every sample anyway).

    Invalid records ("poison": larger than ``settings.max_record_bytes``,
    missing or unknown headers, unknown schema major, wrong payload type,
    garbage) raise PayloadError/SchemaVersionError from ``poll`` with the
    consumer rewound to the start of that batch, so nothing is skipped
    silently. With ``skip_invalid=True`` (every Arbiter service) they come back
    in ``RecordBatch.rejected`` instead, their offsets count as consumed, and
    each is logged (topic[partition]@offset, reason, error) and counted
    (``stats().rejected_reasons``, ``ConsumerObserver.on_rejected``). A caller
    refuses a record that decoded but that it cannot use with ``reject``: the
    same log line, counters and dead-letter copy.

    With ``settings.dead_letter`` every rejected record is also copied, raw,
    to its topic's dead-letter topic (``arbiter.stream.topics``; created here)
    with the reason and source topic/partition/offset as headers, and the copy
    is acknowledged before ``poll``/``reject`` return: when it cannot be, they
    raise StreamError (``poll`` rewound, as above) rather than lose the record.
    Off by default.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        topics: Sequence[str],
        group_id: str | None,
        *,
        observer: ConsumerObserver | None = None,
        skip_invalid: bool = False,
        partitions: Callable[[int], bool] | None = None,
    ):
        if not topics:
            raise ValueError("topics: at least one logical topic is required")
        for topic in topics:
            codec.payload_spec(topic)
        self.settings = settings
        self.group_id = group_id
        self._observer = observer or ConsumerObserver()
        self._skip_invalid = skip_invalid
        # Static assignment (the ranks of a distributed trainer each own fixed
        # partitions): the group then only stores offsets, it never rebalances.
        self._partition_filter = partitions
        self._logical = {settings.topic(t): t for t in topics}
        self._lock = threading.Lock()
        # Explicit start positions (from seek / a checkpoint). They win over the
        # group's committed offsets at every assignment until a commit of the
        # same partition supersedes them.
        self._resume: dict[TopicPartition, int] = {}
        self._positions: dict[TopicPartition, int] = {}
        # Set while wait_for_assignment joins: new partitions are paused at
        # assignment so joining fetches nothing.
        self._pause_on_assign = False
        self._stats = ConsumerStats()
        heartbeat = settings.heartbeat_interval_ms or max(100, settings.session_timeout_ms // 3)
        try:
            self._consumer = KafkaConsumer(
                **client_config(settings),
                group_id=group_id,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                session_timeout_ms=settings.session_timeout_ms,
                heartbeat_interval_ms=heartbeat,
                max_poll_interval_ms=settings.max_poll_interval_ms,
                max_poll_records=settings.max_poll_records,
                fetch_max_wait_ms=settings.fetch_max_wait_ms,
                allow_auto_create_topics=False,
                # How soon partitions added to a topic (or a topic recreated
                # after a broker restart) are seen.
                metadata_max_age_ms=30_000,
            )
        except _NO_BROKERS as err:
            raise StreamError(f"no Kafka broker reachable at {','.join(settings.bootstrap_servers)}: {err}") from err
        try:
            missing = sorted(set(self._logical) - set(self._consumer.topics()))
            if missing:
                raise TopicError(f"topics do not exist: {', '.join(missing)} (create them with ensure_topics)")
            if group_id is None or partitions is not None:
                self._assign_every_partition()
            else:
                self._consumer.subscribe(list(self._logical), listener=_Listener(self))
            self._dead_letters = _DeadLetters(settings, topics) if settings.dead_letter else None
        except BaseException:
            self._consumer.close(autocommit=False)
            raise

    # -- assignment ----------------------------------------------------------

    def _assign_every_partition(self) -> bool:
        """Without a group: read every partition the metadata knows, a new
        one (a topic recreated with more partitions) from its start. True if
        the assignment grew."""
        current = set(self._consumer.assignment() or ())
        wanted = {_KafkaTP(wire, partition) for wire in self._logical
                  for partition in self._consumer.partitions_for_topic(wire) or ()
                  if self._partition_filter is None or self._partition_filter(partition)}
        if wanted <= current:
            return False
        added = sorted(wanted - current)
        self._consumer.assign(sorted(current | wanted))
        for ktp in added:
            # Without a resume offset, auto_offset_reset="earliest" starts it.
            if _ours(ktp) in self._resume:
                self._consumer.seek(ktp, self._resume[_ours(ktp)])
        self._set_assignment(frozenset(map(_ours, current | wanted)))
        if current:
            log.warning("reading new partitions %s", ", ".join(map(str, map(_ours, added))))
        return True

    # -- rebalance callbacks (client I/O thread) ---------------------------

    def _set_assignment(self, partitions: frozenset[TopicPartition]) -> None:
        with self._lock:
            self._stats = replace(self._stats, assigned=partitions)

    def _on_assigned(self, assigned) -> None:
        ours = frozenset(map(_ours, assigned))
        with self._lock:
            for tp in ours:
                if tp in self._resume:
                    # Before the first fetch: the committed offset is never used.
                    self._consumer.seek(_theirs(tp), self._resume[tp])
                    self._positions[tp] = self._resume[tp]
                else:
                    # Restarts at the committed offset: unknown until delivered.
                    self._positions.pop(tp, None)
            if self._pause_on_assign and assigned:
                self._consumer.pause(*assigned)
            self._stats = replace(self._stats, rebalances=self._stats.rebalances + 1, assigned=ours)
        log.info("assigned %s", ", ".join(map(str, sorted(ours))) or "nothing")
        self._observer.on_assigned(ours)

    def _on_revoked(self, revoked) -> None:
        ours = frozenset(map(_ours, revoked))
        with self._lock:
            self._stats = replace(self._stats, assigned=self._stats.assigned - ours)
        self._observer.on_revoked(ours)

    # -- reading -----------------------------------------------------------

    def assignment(self) -> frozenset[TopicPartition]:
        return frozenset(map(_ours, self._consumer.assignment() or ()))

    def wait_for_assignment(self, timeout_s: float = 30.0) -> frozenset[TopicPartition]:
        """Join the group without consuming anything; raises StreamError if no
        partition is assigned within timeout_s."""
        deadline = time.monotonic() + timeout_s
        self._pause_on_assign = True
        try:
            while not self.assignment():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise StreamError(f"no partitions assigned within {timeout_s}s (group {self.group_id!r})")
                records = self._consumer.poll(timeout_ms=int(min(remaining, 0.2) * 1000))
                if records:  # defensive: a fetch that raced the pause is not lost
                    self._rewind(records)
        finally:
            self._pause_on_assign = False
            paused = self._consumer.paused()
            if paused:
                self._consumer.resume(*paused)
        return self.assignment()

    def poll(self, timeout_s: float = 1.0, max_records: int | None = None) -> RecordBatch[M]:
        """Up to ``max_records`` (default settings.max_poll_records) decoded
        records, waiting at most ``timeout_s`` for the first; empty on timeout."""
        if self.group_id is None or self._partition_filter is not None:
            self._assign_every_partition()  # cached metadata: no request
        raw = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        records: list[ConsumedRecord[M]] = []
        rejected: list[RejectedRecord] = []
        sizes: dict[TopicPartition, tuple[int, int]] = {}
        limit = self.settings.max_record_bytes
        for ktp, batch in raw.items():
            logical = self._logical[ktp.topic]
            for record in batch:
                location = f"{ktp.topic}[{ktp.partition}]@{record.offset}"
                size = len(record.value or b"")
                try:
                    if size > limit:
                        # Before decoding: parsing (and training on) it is the cost to avoid.
                        raise PayloadError(f"{size} bytes, over max_record_bytes={limit}", location, "oversize")
                    headers = dict(record.headers or ())
                    message, version = codec.decode(logical, record.value, headers, location)
                except PayloadError as err:
                    if not self._skip_invalid:
                        self._rewind(raw)
                        raise
                    rejected.append(RejectedRecord(
                        ktp.topic, ktp.partition, record.offset, err, logical,
                        record.key, record.value, tuple(record.headers or ()),
                    ))
                    continue
                key = record.key.decode(errors="replace") if record.key is not None else None
                records.append(
                    ConsumedRecord(
                        ktp.topic, ktp.partition, record.offset, key, record.timestamp,
                        version, message, headers, size, record.value,
                    )
                )
                count, total = sizes.get(_ours(ktp), (0, 0))
                sizes[_ours(ktp)] = (count + 1, total + size)
        if self._dead_letters is not None and rejected:
            try:
                self._dead_letters.copy(rejected)
            except StreamError:
                self._rewind(raw)
                raise
        result: RecordBatch[M] = RecordBatch(records, rejected)
        advanced = result.next_offsets()
        with self._lock:
            self._positions.update(advanced)
            self._stats = replace(
                self._stats,
                records=self._stats.records + len(records),
                record_bytes=self._stats.record_bytes + sum(total for _, total in sizes.values()),
            )
        for tp, (count, total) in sizes.items():
            self._observer.on_records(tp.topic, tp.partition, count, total)
        self._count_rejected(rejected)
        return result

    def reject(self, record: ConsumedRecord[M], reason: str, error: Exception | str) -> RejectedRecord:
        """Skip a record that decoded but that the caller cannot use (e.g. token
        ids outside its model's vocabulary): logged, counted and dead-lettered
        like an undecodable one. ``reason`` is one of REJECT_REASONS. Its
        offset stays the caller's to account for: commit past it as past a
        processed record, so it is never redelivered. Raises StreamError when
        its dead-letter copy is not acknowledged."""
        location = f"{record.topic}[{record.partition}]@{record.offset}"
        text = str(error)
        payload_error = PayloadError(text if location in text else f"{location}: {text}", reason=reason)
        payload_error.location = location
        rejected = RejectedRecord(
            record.topic, record.partition, record.offset, payload_error, self._logical[record.topic],
            record.key.encode() if record.key is not None else None, record.value, tuple(record.headers.items()),
        )
        if self._dead_letters is not None:
            self._dead_letters.copy([rejected])
        self._count_rejected([rejected])
        return rejected

    def _count_rejected(self, rejected: Sequence[RejectedRecord]) -> None:
        if not rejected:
            return
        with self._lock:
            reasons = dict(self._stats.rejected_reasons)
            for record in rejected:
                reasons[record.reason] = reasons.get(record.reason, 0) + 1
            self._stats = replace(self._stats, rejected=self._stats.rejected + len(rejected), rejected_reasons=reasons)
        for record in rejected:
            # The error's text starts with (or names) topic[partition]@offset.
            log.warning("skipped invalid record (%s%s): %s", record.reason,
                        ", copied to dead letters" if self._dead_letters is not None else "", record.error)
            self._observer.on_rejected(record)

    def _rewind(self, raw: Mapping[_KafkaTP, list]) -> None:
        for ktp, batch in raw.items():
            if batch and ktp in (self._consumer.assignment() or ()):
                self._consumer.seek(ktp, batch[0].offset)

    def cluster_id(self) -> str | None:
        """The id of the cluster this consumer's newest metadata came from
        (None before the first metadata response); compared with the id
        stored beside offsets kept outside Kafka, it tells whether the broker
        behind the bootstrap servers is still the same log."""
        return self._consumer._client.cluster.cluster_id

    def positions(self) -> dict[TopicPartition, int]:
        """Next offset this consumer will deliver, per partition it has read or
        sought; what to commit after processing everything delivered so far."""
        with self._lock:
            return dict(self._positions)

    def lag(self) -> dict[TopicPartition, int]:
        """Records behind the newest known offset, per assigned partition read so
        far (high watermarks from fetch responses; no ListOffsets request)."""
        out: dict[TopicPartition, int] = {}
        for ktp in self._consumer.assignment() or ():
            high = self._consumer.highwater(ktp)
            position = self._positions.get(_ours(ktp))
            if high is not None and position is not None:
                out[_ours(ktp)] = max(0, high - position)
        return out

    # -- offsets -----------------------------------------------------------

    def seek(self, offsets: Offsets) -> None:
        """Start each partition at the given next offset: now if assigned, else
        when the group assigns it (e.g. offsets restored from a checkpoint,
        called before the first poll). Wins over the group's committed offsets
        until a ``commit`` of that partition."""
        clean = self._check_offsets(offsets, "seek")
        assigned = self._consumer.assignment() or set()
        with self._lock:
            self._resume.update(clean)
            for tp, offset in clean.items():
                self._positions[tp] = offset
                if _theirs(tp) in assigned:
                    self._consumer.seek(_theirs(tp), offset)

    def commit(self, offsets: Offsets, metadata: str = "") -> None:
        """Commit exactly ``offsets`` ({partition: next offset to read}),
        synchronously. Every partition must be assigned to this consumer now:
        committing a partition another member owns would overwrite its
        progress. Raises CommitError when the group rejects it (e.g. this
        consumer was evicted after exceeding max_poll_interval_ms) and nothing
        was committed; a single trainer whose checkpoint holds these offsets
        should then ``seek(offsets)`` so it resumes after them once reassigned,
        and commit again after the next poll."""
        if self.group_id is None:
            raise CommitError("commit needs a consumer group: this consumer was created with group_id=None")
        clean = self._check_offsets(offsets, "commit")
        if not clean:
            return
        assigned = self.assignment()
        foreign = sorted(tp for tp in clean if tp not in assigned)
        if foreign:
            error = CommitError(
                f"not assigned to this consumer: {', '.join(map(str, foreign))} (assigned: "
                f"{', '.join(map(str, sorted(assigned))) or 'nothing'}); a rebalance may have moved them"
            )
            self._commit_failed(error)
            raise error
        started = time.monotonic()
        try:
            self._consumer.commit(
                {_theirs(tp): OffsetAndMetadata(offset, metadata, -1) for tp, offset in clean.items()}
            )
        except kerrors.KafkaError as err:
            error = CommitError(f"group {self.group_id!r} rejected the commit: {type(err).__name__}: {err}")
            self._commit_failed(error)
            raise error from err
        with self._lock:
            for tp in clean:
                self._resume.pop(tp, None)
            self._stats = replace(self._stats, commits=self._stats.commits + 1)
        self._observer.on_commit(clean, time.monotonic() - started)

    def _commit_failed(self, error: BaseException) -> None:
        with self._lock:
            self._stats = replace(self._stats, commit_failures=self._stats.commit_failures + 1)
        self._observer.on_commit_failed(error)

    def committed(self, partitions: Iterable[TopicPartition] | None = None) -> dict[TopicPartition, int | None]:
        """The group's committed next offsets (None: nothing committed)."""
        if self.group_id is None:
            raise CommitError("committed offsets need a consumer group: this consumer has group_id=None")
        wanted = list(partitions) if partitions is not None else sorted(self.assignment())
        return {TopicPartition(*tp): self._consumer.committed(_theirs(TopicPartition(*tp))) for tp in wanted}

    def _check_offsets(self, offsets: Offsets, what: str) -> dict[TopicPartition, int]:
        clean: dict[TopicPartition, int] = {}
        for tp, offset in offsets.items():
            tp = TopicPartition(*tp)
            if tp.topic not in self._logical:
                raise ValueError(f"{what}: {tp} is not a topic of this consumer ({', '.join(self._logical)})")
            if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
                raise ValueError(f"{what}: offset of {tp} must be an integer >= 0, got {offset!r}")
            clean[tp] = offset
        return clean

    # -- lifecycle ---------------------------------------------------------

    def stats(self) -> ConsumerStats:
        with self._lock:
            return self._stats

    def close(self, timeout_s: float = 10.0) -> None:
        """Leave the group (its partitions move at once, not after a session
        timeout). Commits nothing."""
        if self._dead_letters is not None:
            self._dead_letters.close()
        self._consumer.close(autocommit=False, timeout_ms=int(timeout_s * 1000))

    def __enter__(self) -> StreamConsumer[M]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
