"""``arbiter rm loop``: the reward model retrained and promoted by itself, from
the preferences people submit (iterated online RLHF).

One round, each decision a log line and a metric (``LoopMetrics``):

1. **Read.** The preferences topic, as the consumer group
   ``arbiter-reward-trainer`` (shared with ``arbiter train rm --from-topic``:
   run one of them per topic prefix). Poison records and preferences the
   training format refuses are skipped, logged with their
   topic[partition]@offset and counted
   (``arbiter_stream_records_rejected_total``), and listed in the lineage.
2. **Trigger.** After ``retrain_preferences`` new preferences, or
   ``retrain_interval_s`` after the last round when at least one arrived.
3. **Split.** Every ``1/holdout_fraction``-th preference of a partition (by
   offset, so a restart holds out the same ones) joins the rolling held-out
   set (the newest ``holdout_size``; it travels from version to version as
   ``holdout.jsonl``); the rest is trained on.
4. **Train** (``arbiter.rm.train.train_reward_model``) continuing from the
   version the reward replicas serve, on the new preferences plus those of
   every later version that never became active (``preferences.jsonl`` of
   each), so a rejected candidate's preferences are not lost. The version is
   published with its lineage (parent, the preference offsets it covers, the
   trigger, what was skipped); only then are the offsets committed. A restart
   seeks past the offsets the newest loop version covers, so a crash between
   the two trains nothing twice, and a crash before publishing loses nothing.
5. **Gates**, stopping at the first that fails (the candidate then stays
   loaded but inactive, and ``loop.json`` says why): loaded on every replica;
   held-out accuracy (scored by the service, pinned to each version) not
   below the active's minus ``accuracy_tolerance``; live shadow on every
   replica (``SetShadow``) until each has scored ``shadow_min_samples``
   items with the candidate; Spearman correlation with the active version on
   every replica at least ``min_shadow_spearman`` (a floor against a broken
   candidate), pairwise agreement recorded (a gate only when
   ``min_shadow_agreement`` is set: see the field for why quality is the
   held-out gate's alone).
6. **Promote** on every replica (``ActivateModelVersion``; one failing
   rolls the others back), then check each replica serves the candidate and
   scores the held-out set as it did pinned. A failing check rolls back.
7. **Watch** for ``watch_s``: a drift alarm on any replica rolls every
   replica back to the previous version. By default
   (``watch_against_previous``) the previous version shadow-scores every item
   meanwhile, and the alarm is the reward service's *paired* Page-Hinkley
   detector (``GetShadow``): on the difference of the two versions'
   standardised scores of the same items. A policy in training moves its own
   traffic, and a detector on the new version's scores alone then alarms on
   every promotion (at full demo scale all 11 of a run were rolled back on
   drift that was the policy's); the paired one alarms only when the new
   version scores the traffic differently from the one it replaced. Where
   the previous version cannot shadow, and with ``watch_against_previous``
   off, the new version's own detector (``GetScoreDrift``) decides.

The replicas are reached through ``Replica`` (``services/rm_loop.py``: each
replica's gRPC port; the shadow window through ``RewardService.GetShadow``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from arbiter.config import flag, require
from arbiter.errors import ArbiterError
from arbiter.rm.agreement import agreement
from arbiter.rm.config import RMTrainConfig
from arbiter.rm.data import RankedExample, parse_row
from arbiter.rm.registry import ModelRegistry, RegistryVersion
from arbiter.rm.topic import TopicBatch
from arbiter.shadow import PAIRED_REFERENCE
from arbiter.shadow import WINDOW as SHADOW_WINDOW
from arbiter.stream import KafkaSettings, StreamConsumer, topics
from arbiter.stream.metrics import RejectedRecordsMetric
from arbiter.stream.types import TopicPartition

log = logging.getLogger(__name__)

# Skipped records named in a version's lineage (all are counted).
MAX_LISTED_SKIPPED = 100
HOLDOUT_FILE = "holdout.jsonl"
PREFERENCES_FILE = "preferences.jsonl"
# A version's loop.json status: final ones, and those whose preferences the
# next candidate trains on again (they never reached an active version).
NOT_ACTIVE = ("rejected", "failed", "rolled_back", "abandoned")
GATES = ("load", "holdout_size", "holdout_accuracy", "shadow_samples", "shadow_agreement", "shadow_spearman",
         "activation", "post_promotion_check")


class ReplicaError(ArbiterError):
    """A reward replica refused or failed a call; the message names the replica."""


@dataclass(frozen=True)
class RMLoopSettings:
    """``arbiter rm loop``'s settings; each field is its flag (``--retrain-preferences``)."""

    # The training config (arbiter train rm's YAML): registry, name,
    # hyperparameters, kafka; model_dir is used only when the active version
    # has no readable path.
    train_config: str = field(default="", metadata=flag(help="arbiter train rm's YAML (registry, name, epochs, ...)"))
    # One entry per replica, in the same order: each is promoted individually.
    # Or dns:///NAME:PORT: every A record of NAME is a replica (a headless
    # Service), re-resolved at each decision (services/rm_loop.py).
    reward: tuple[str, ...] = field(default=(), metadata=flag(
        "--reward", action="append",
        help="HOST:PORT of one reward replica (repeat for each), or dns:///NAME:PORT for every address of NAME"))
    retrain_preferences: int = field(default=200, metadata=flag(help="retrain after this many new preferences"))
    retrain_interval_s: float = field(default=3600.0, metadata=flag(
        help="... or this long after the last round, when at least one preference is new"))
    holdout_fraction: float = field(default=0.2, metadata=flag(
        help="share of preferences held out (every 1/f-th offset of a partition)"))
    holdout_size: int = field(default=500, metadata=flag(help="held-out preferences kept (the newest)"))
    min_holdout: int = field(default=20, metadata=flag(help="no promotion with fewer held-out preferences"))
    accuracy_tolerance: float = field(default=0.02, metadata=flag(
        help="the candidate's held-out accuracy may be this much below the active's"))
    shadow_min_samples: int = field(default=200, metadata=flag(
        help=f"items each replica must shadow-score with the candidate (<= {SHADOW_WINDOW})"))
    shadow_fraction: float = field(default=1.0, metadata=flag(help="share of live requests shadow-scored"))
    shadow_timeout_s: float = field(default=1800.0, metadata=flag(
        help="give up on a candidate whose shadow samples do not arrive within this"))
    # Live shadow catches a broken candidate (wrong checkpoint, tokenizer,
    # collapsed or inverted head) that a small held-out set can miss: one
    # unrelated to the active version on live traffic. It is not a quality
    # gate: where the active version is wrong a better candidate must
    # disagree with it, and agreement >= g bounds the candidate's accuracy on
    # the pairs compared to the active's +- (1 - g), so an agreement gate
    # rejects better candidates exactly when the active one is worst (the
    # demo's policy drifts off the RM's training data; the 0.8 gate there
    # promoted none of 11). Hence a loose Spearman floor, and agreement only
    # as an opt-in bound on how far one promotion may move the reward.
    min_shadow_agreement: float = field(default=0.0, metadata=flag(
        help="pairwise agreement with the active version on live traffic, on every replica (0: reported, not "
             "a gate; a bound on how much one promotion changes rankings, never a measure of quality)"))
    min_shadow_spearman: float = field(default=0.3, metadata=flag(
        help="Spearman correlation with the active version on live traffic, on every replica (a floor against "
             "broken or unrelated candidates; quality is the held-out gate's)"))
    watch_s: float = field(default=600.0, metadata=flag(
        help="after a promotion, roll back on a Page-Hinkley alarm within this long"))
    watch_against_previous: bool = field(default=True, metadata=flag(
        help="during the watch the previous version shadow-scores every item, and only a paired alarm (the two "
             "versions' standardised scores of the same items moving apart) rolls back (false: any alarm on the new "
             "version's own scores does, including drift of the traffic itself)"))
    check_interval_s: float = field(default=1.0, metadata=flag(help="how often shadow and drift are read"))
    join_timeout_s: float = field(default=60.0, metadata=flag(help="wait this long for the consumer group"))
    metrics_host: str = field(default="127.0.0.1", metadata=flag(
        help="address of /metrics (0.0.0.0 in a pod, for Prometheus)"))
    metrics_port: int | None = field(default=None, metadata=flag(help="serve /metrics here"))

    def __post_init__(self) -> None:
        object.__setattr__(self, "reward", tuple(self.reward))
        require(bool(self.train_config), "train_config", "must name arbiter train rm's YAML", self.train_config)
        require(bool(self.reward), "reward", "must list at least one reward replica (HOST:PORT)", self.reward)
        require(self.retrain_preferences >= 1, "retrain_preferences", "must be >= 1", self.retrain_preferences)
        require(self.retrain_interval_s > 0, "retrain_interval_s", "must be > 0", self.retrain_interval_s)
        require(0 < self.holdout_fraction < 1, "holdout_fraction", "must be in (0, 1)", self.holdout_fraction)
        require(self.holdout_size >= 1, "holdout_size", "must be >= 1", self.holdout_size)
        require(1 <= self.min_holdout <= self.holdout_size, "min_holdout",
                f"must be in [1, holdout_size ({self.holdout_size})]", self.min_holdout)
        require(0 <= self.accuracy_tolerance <= 1, "accuracy_tolerance", "must be in [0, 1]", self.accuracy_tolerance)
        require(2 <= self.shadow_min_samples <= SHADOW_WINDOW, "shadow_min_samples",
                f"must be in [2, {SHADOW_WINDOW}] (the reward service's shadow window)", self.shadow_min_samples)
        require(0 < self.shadow_fraction <= 1, "shadow_fraction", "must be in (0, 1]", self.shadow_fraction)
        for name in ("min_shadow_agreement", "min_shadow_spearman"):
            require(-1 <= getattr(self, name) <= 1, name, "must be in [-1, 1]", getattr(self, name))
        for name in ("shadow_timeout_s", "check_interval_s", "join_timeout_s"):
            require(getattr(self, name) > 0, name, "must be > 0", getattr(self, name))
        require(self.watch_s >= 0, "watch_s", "must be >= 0 (0: no watch)", self.watch_s)


# -- the replicas --------------------------------------------------------------


@dataclass(frozen=True)
class ShadowReading:
    samples: int
    agreement: float
    spearman: float
    # The paired drift detector's alarms on this pairing, and whether its
    # reference pairs are in (arbiter.shadow.PairedChangeDetector).
    paired_change_points: int = 0
    paired_detecting: bool = False


class Replica(Protocol):
    """One reward replica, as the loop drives it. Failures raise ReplicaError."""

    name: str

    def active(self) -> tuple[str, str]:
        """(active version, its checkpoint path)."""

    def load(self, path: str) -> str:
        """Load ``path`` inactive (a version already loaded from it is kept); its version."""

    def scores(self, examples: Sequence[RankedExample], version: str) -> tuple[list[list[float]], str]:
        """Raw scores of each example's candidates by ``version`` ("": the active
        one), and the version that answered."""

    def set_shadow(self, version: str, fraction: float) -> None:
        """Shadow-score live traffic with ``version`` ("": stop)."""

    def shadow(self, active: str, candidate: str) -> ShadowReading | None:
        """The replica's shadow window of ``candidate`` against ``active``;
        None before any sample (or when its window compares with another version)."""

    def activate(self, version: str) -> str:
        """Make ``version`` active; the previous active version."""

    def change_points(self, version: str) -> int:
        """Page-Hinkley alarms on ``version``'s served scores since it was loaded."""


# -- metrics -------------------------------------------------------------------


class LoopMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.rejected = RejectedRecordsMetric(registry, [topics.PREFERENCES])
        self.read = Counter("arbiter_rm_loop_preferences_read", "Valid preferences read from the topic.",
                            registry=registry)
        self.pending = Gauge("arbiter_rm_loop_pending_preferences",
                             "Preferences read and not yet in a round.", registry=registry)
        self.retrains = Counter("arbiter_rm_loop_retrains", "Rounds started, by trigger.", ["trigger"],
                                registry=registry)
        self.training_seconds = Histogram("arbiter_rm_loop_training_seconds", "Seconds to train a candidate.",
                                          buckets=(1, 5, 15, 60, 300, 900, 3600), registry=registry)
        self.candidates = Counter("arbiter_rm_loop_candidates", "Candidates by outcome.", ["outcome"],
                                  registry=registry)
        self.gate_failures = Counter("arbiter_rm_loop_gate_failures", "Candidates stopped by each gate.", ["gate"],
                                     registry=registry)
        self.rollbacks = Counter("arbiter_rm_loop_rollbacks", "Promotions rolled back, by cause.", ["cause"],
                                 registry=registry)
        self.holdout_accuracy = Gauge("arbiter_rm_loop_holdout_accuracy",
                                      "Held-out accuracy of the last candidate and of the active version then.",
                                      ["model"], registry=registry)
        self.holdout_examples = Gauge("arbiter_rm_loop_holdout_examples", "Preferences in the rolling held-out set.",
                                      registry=registry)
        self.shadow_agreement = Gauge("arbiter_rm_loop_shadow_agreement",
                                      "Lowest pairwise agreement over the replicas, last shadow.", registry=registry)
        self.shadow_spearman = Gauge("arbiter_rm_loop_shadow_spearman",
                                     "Lowest Spearman correlation over the replicas, last shadow.", registry=registry)
        self.active_version = Gauge("arbiter_rm_loop_active_version",
                                    "Registry number of the active version (0: not a registry version).",
                                    registry=registry)
        self.since_active = Gauge("arbiter_rm_loop_candidates_since_active",
                                  "Candidates rejected, failed or rolled back since the last one that became "
                                  "active (passed its watch).", registry=registry)
        self.last_promotion = Gauge("arbiter_rm_loop_last_promotion_timestamp_seconds",
                                    "Unix time of the last promotion.", registry=registry)
        self.commit_failures = Counter("arbiter_rm_loop_offset_commit_failures",
                                       "Offset commits that failed after a version was published (the lineage "
                                       "still keeps its preferences from being trained again).", registry=registry)
        for outcome in ("promoted", "rejected", "failed"):
            self.candidates.labels(outcome)
        for gate in GATES:
            self.gate_failures.labels(gate)
        for cause in ("drift", "post_promotion_check"):
            self.rollbacks.labels(cause)
        for trigger in ("preferences", "interval"):
            self.retrains.labels(trigger)
        for model in ("candidate", "active"):
            self.holdout_accuracy.labels(model)


# -- the loop ------------------------------------------------------------------


def held_out(offset: int, fraction: float) -> bool:
    """Whether the preference at ``offset`` of its partition is held out:
    every 1/fraction-th offset, so the same ones after a restart."""
    return math.floor((offset + 1) * fraction) > math.floor(offset * fraction)


def _jsonl(rows: Sequence[dict]) -> str:
    return "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)


def _offset(example: RankedExample) -> int:
    return int(example.source.rsplit("@", 1)[1])


@dataclass
class _Watch:
    version: RegistryVersion
    previous: str
    # Replica name -> the new version's own change alarms when the watch
    # began (or when the replica joined it).
    baseline: dict[str, int]
    until: float
    # Replicas where the previous version shadow-scores the traffic: their
    # paired detector decides (the others: the new version's own alarms).
    paired: set[str] = dataclasses.field(default_factory=set)
    # Replicas whose paired detector learnt its reference during the watch.
    detecting: set[str] = dataclasses.field(default_factory=set)


Trainer = Callable[..., Any]


class RMLoop:
    """Not thread-safe: one thread runs ``run`` (or ``step``)."""

    def __init__(
        self, settings: RMLoopSettings, train: RMTrainConfig, kafka: KafkaSettings,
        replicas: Sequence[Replica] | Callable[[], Sequence[Replica]], *,
        trainer: Trainer | None = None, registry: CollectorRegistry | None = None,
    ):
        from arbiter.rm.train import train_reward_model

        self.settings = settings
        self.train_config = train
        self.kafka = kafka
        # A callable discovers the replicas again before each decision (DNS).
        self._discover = replicas if callable(replicas) else None
        self.replicas = [] if callable(replicas) else list(replicas)
        self.trainer = trainer or train_reward_model
        self.metrics = LoopMetrics(registry or CollectorRegistry())
        self.models = ModelRegistry(train.registry)
        self.consumer: StreamConsumer | None = None
        self.batch: TopicBatch | None = None
        self.watch: _Watch | None = None
        self.last_round = time.monotonic()
        self._deferred = False

    # -- start ---------------------------------------------------------------

    def start(self) -> RMLoop:
        # Training runs between polls: the group must not evict the consumer meanwhile.
        settings = self.kafka.with_overrides(
            max_poll_interval_ms=int(self.train_config.topic.max_train_seconds * 1000))
        self.consumer = StreamConsumer(settings, [topics.PREFERENCES], topics.REWARD_TRAINER_GROUP,
                                       observer=self.metrics.rejected, skip_invalid=True)
        try:
            self.consumer.wait_for_assignment(self.settings.join_timeout_s)
            self._refresh()
            self._skip_trained()
            self._recover()
        except BaseException:
            self.close()
            raise
        self.batch = self._new_batch()
        self.last_round = time.monotonic()
        return self

    def _new_batch(self) -> TopicBatch:
        return TopicBatch([], 0, skip_invalid=True, _consumer=self.consumer)

    def _loop_versions(self) -> list[RegistryVersion]:
        return [v for v in self.models.versions(self.train_config.name) if "lineage" in v.metadata()]

    def _skip_trained(self) -> None:
        """Seek past what the newest loop versions trained on when the group's
        commit lags them (a crash between publishing and committing)."""
        trained: dict[TopicPartition, int] = {}
        for version in self._loop_versions():
            for topic, partitions in version.metadata()["lineage"]["preference_offsets"].items():
                for partition, (_, end) in partitions.items():
                    tp = TopicPartition(topic, int(partition))
                    trained[tp] = max(trained.get(tp, 0), end)
        assigned = self.consumer.assignment()
        committed = self.consumer.committed(sorted(assigned))
        ahead = {tp: end for tp, end in trained.items() if tp in assigned and end > (committed.get(tp) or 0)}
        if ahead:
            log.warning("the group's committed offsets lag the registry (a stop between publishing and "
                        "committing): resuming after %s, which the registry's versions were trained on",
                        ", ".join(f"{tp.topic}[{tp.partition}]@{end}" for tp, end in sorted(ahead.items())))
            self.consumer.seek(ahead)
            self.consumer.commit(ahead)

    def _recover(self) -> None:
        """A version the previous run left mid-gates is abandoned (its
        preferences go to the next candidate); one it left under watch is watched again."""
        for replica in self.replicas:
            replica.set_shadow("", 1.0)
        active, _ = self._active()
        self._export_active(active)
        since = 0
        for version in self._loop_versions():
            record = version.loop_record()
            status = record.get("status", "evaluating")
            since = 0 if status == "active" else since + (status in NOT_ACTIVE or status == "evaluating")
            if status == "evaluating":
                self._finish(version, record, "abandoned", "the loop stopped before its gates finished",
                             outcome="failed")
            elif status == "watching" and version.version == active:
                self._start_watch(version, record.get("previous_version", ""))
                log.info("candidate %s: watching again after a restart", version.version)
            elif status == "watching":
                self._finish(version, record, "rolled_back", f"found inactive ({active} serves) when the loop "
                             "restarted during its watch", outcome=None)
        self.metrics.since_active.set(since)

    # -- running -------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.step()

    def step(self, timeout_s: float = 0.5) -> str | None:
        """Poll once; watch a promoted version, or run a round when one is
        due. The round's outcome, or None."""
        self._poll(timeout_s)
        self._refresh()
        if self.watch is not None:
            self._watch_tick()
            return None
        trigger = self._trigger()
        return self.round(trigger) if trigger else None

    def _refresh(self) -> None:
        """The replica set one decision (a round, a watch tick) works with."""
        if self._discover is not None:
            self.replicas = list(self._discover())

    def _poll(self, timeout_s: float) -> None:
        polled = self.consumer.poll(timeout_s=timeout_s)
        if polled.records or polled.rejected:
            self.batch.take(polled)
            self.metrics.read.inc(len(polled.records))
            self.metrics.pending.set(len(self.batch.examples))

    def _trigger(self) -> str | None:
        pending = len(self.batch.examples)
        if pending >= self.settings.retrain_preferences:
            return "preferences"
        if pending and time.monotonic() - self.last_round >= self.settings.retrain_interval_s:
            return "interval"
        return None

    def _wait(self, seconds: float) -> None:
        """Keep reading (so the group keeps this consumer) while waiting."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._poll(min(left, 0.5))

    # -- a round -------------------------------------------------------------

    def _active(self) -> tuple[str, str]:
        actives = [replica.active() for replica in self.replicas]
        if len({version for version, _ in actives}) > 1:
            log.warning("the reward replicas serve different versions: %s; continuing from %s's",
                        ", ".join(f"{r.name}: {v}" for r, (v, _) in zip(self.replicas, actives)),
                        self.replicas[0].name)
        return actives[0]

    def _export_active(self, version: str) -> None:
        number = next((v.number for v in self.models.versions(self.train_config.name) if v.version == version), 0)
        self.metrics.active_version.set(number)

    def round(self, trigger: str) -> str | None:
        batch = self.batch
        batch.settle()
        fraction = self.settings.holdout_fraction
        held = [e for e in batch.examples if held_out(_offset(e), fraction)]
        if len(held) == len(batch.examples):
            if not self._deferred:
                log.info("round deferred: all %d new preference(s) are held out; waiting for one to train on",
                         len(held))
            self._deferred = True
            return None
        self._deferred = False
        self.metrics.retrains.labels(trigger).inc()
        active, active_path = self._active()
        versions = self._loop_versions()
        base = next((v.number for v in versions if v.version == active), 0)
        carried = [v for v in versions if v.number > base and v.loop_record().get("status") in NOT_ACTIVE]
        holdout = (load_jsonl_rows(versions[-1].path / HOLDOUT_FILE) if versions else []) + [batch.row(e) for e in held]
        holdout = holdout[-self.settings.holdout_size:]
        batch.examples = [e for e in batch.examples if not held_out(_offset(e), fraction)]
        log.info("round (%s trigger): %d preference(s) read, %d to train on, %d held out (rolling set %d), "
                 "%d skipped; continuing from %s%s", trigger, batch.records, len(batch.examples), len(held),
                 len(holdout), len(batch.skipped), active,
                 f", with the preferences of {', '.join(v.version for v in carried)}" if carried else "")
        lineage = {
            "parent_version": active, "parent_path": active_path, "trigger": trigger,
            # {topic: {partition: [first offset, next offset]}}: what this version covers.
            "preference_offsets": _offset_ranges(batch),
            "preferences": {"read": batch.records, "train": len(batch.examples), "held_out": len(held),
                            "duplicates": batch.duplicates, "skipped": batch.skipped[:MAX_LISTED_SKIPPED],
                            "skipped_count": len(batch.skipped), "skipped_reasons": dict(batch.skipped_reasons)},
            "carried_over": [v.version for v in carried],
            "holdout_examples": len(holdout),
        }
        files = {PREFERENCES_FILE: _jsonl([batch.row(e) for e in batch.examples]), HOLDOUT_FILE: _jsonl(holdout)}
        with tempfile.TemporaryDirectory(prefix="rm-loop-") as tmp:
            eval_data: tuple[str, ...] = ()
            if holdout:
                (Path(tmp) / HOLDOUT_FILE).write_text(files[HOLDOUT_FILE])
                eval_data = (str(Path(tmp) / HOLDOUT_FILE),)
            config = dataclasses.replace(
                self.train_config, model_dir=active_path or self.train_config.model_dir, resume_latest=False,
                data=tuple(str(v.path / PREFERENCES_FILE) for v in carried), eval_data=eval_data, progress=False,
            )
            started = time.monotonic()
            try:
                result = self.trainer(config, batch, metadata={"lineage": lineage}, files=files)
            except ArbiterError as err:
                # Nothing published, nothing committed: these preferences are read again after a restart.
                log.error("training failed, nothing published: %s", err)
                self.metrics.candidates.labels("failed").inc()
                raise
        self.metrics.training_seconds.observe(time.monotonic() - started)
        version = result.version
        log.info("published candidate %s (parent %s) at %s", version.version, active, version.path)
        self._commit(batch)
        self.batch = self._new_batch()
        self.metrics.pending.set(0)
        self.last_round = time.monotonic()
        return self.evaluate(version, active, [_row_example(row, i) for i, row in enumerate(holdout)])

    def _commit(self, batch: TopicBatch) -> None:
        try:
            batch.commit()
        except ArbiterError as err:
            # The lineage keeps a restart from training these again (_skip_trained).
            self.metrics.commit_failures.inc()
            log.warning("offsets not committed (%s); the registry's lineage keeps them from being trained again", err)

    # -- gates ---------------------------------------------------------------

    def evaluate(self, version: RegistryVersion, active: str, holdout: Sequence[RankedExample]) -> str:
        s = self.settings
        record: dict[str, Any] = {"status": "evaluating", "active_at_start": active, "gates": {}, "events": []}
        self._note(version, record, f"evaluating against {active}")
        candidate = ""
        try:
            labels = {replica.load(str(version.path)) for replica in self.replicas}
        except ReplicaError as err:
            return self._reject(version, record, "load", f"not loaded on every replica: {err}", outcome="failed")
        candidate = labels.pop()
        if labels:
            return self._reject(version, record, "load", "the replicas loaded it under different versions",
                                outcome="failed")
        record["candidate"] = candidate
        if len(holdout) < s.min_holdout:
            return self._reject(version, record, "holdout_size",
                                f"the held-out set has {len(holdout)} preference(s); min_holdout is {s.min_holdout}")
        try:
            active_scores, _ = self.replicas[0].scores(holdout, active)
            candidate_scores, _ = self.replicas[0].scores(holdout, candidate)
        except ReplicaError as err:
            return self._reject(version, record, "holdout_accuracy", f"held-out scoring failed: {err}",
                                outcome="failed")
        offline = agreement(active_scores, candidate_scores)
        self.metrics.holdout_accuracy.labels("candidate").set(offline.candidate_accuracy)
        self.metrics.holdout_accuracy.labels("active").set(offline.active_accuracy)
        self.metrics.holdout_examples.set(len(holdout))
        passed = offline.candidate_accuracy >= offline.active_accuracy - s.accuracy_tolerance
        record["gates"]["holdout_accuracy"] = {
            "passed": passed, "examples": offline.examples, "candidate": offline.candidate_accuracy,
            "active": offline.active_accuracy, "tolerance": s.accuracy_tolerance,
            "agreement": offline.pairwise_agreement}
        if not passed:
            return self._reject(version, record, "holdout_accuracy",
                                f"held-out accuracy {offline.candidate_accuracy:.4f} is below the active "
                                f"{active}'s {offline.active_accuracy:.4f} minus {s.accuracy_tolerance}")
        self._note(version, record, f"held-out accuracy {offline.candidate_accuracy:.4f} vs "
                                    f"{offline.active_accuracy:.4f} ({offline.examples} preferences): passed")
        failed = self._shadow(version, record, active, candidate)
        if failed is not None:
            return failed
        return self._promote(version, record, active, candidate, holdout, offline.candidate_accuracy)

    def _shadow(self, version: RegistryVersion, record: dict, active: str, candidate: str) -> str | None:
        s = self.settings
        readings: list[ShadowReading | None] = [None] * len(self.replicas)
        try:
            for replica in self.replicas:
                replica.set_shadow(candidate, s.shadow_fraction)
            self._note(version, record, f"shadowing {s.shadow_fraction:.0%} of live requests on "
                                        f"{len(self.replicas)} replica(s) until each scored {s.shadow_min_samples}")
            deadline = time.monotonic() + s.shadow_timeout_s
            while True:
                readings = [replica.shadow(active, candidate) for replica in self.replicas]
                if all(r is not None and r.samples >= s.shadow_min_samples for r in readings):
                    break
                if time.monotonic() >= deadline:
                    break
                self._wait(s.check_interval_s)
        except ReplicaError as err:
            return self._reject(version, record, "shadow_samples", f"shadow scoring failed: {err}",
                                outcome="failed")
        finally:
            for replica in self.replicas:
                try:
                    replica.set_shadow("", 1.0)
                except ReplicaError as err:
                    log.warning("could not end shadowing on %s: %s", replica.name, err)
        samples = [r.samples if r else 0 for r in readings]
        agreements = [r.agreement if r else float("nan") for r in readings]
        spearmans = [r.spearman if r else float("nan") for r in readings]
        record["gates"]["shadow"] = {"samples": samples, "agreement": agreements, "spearman": spearmans,
                                     "min_samples": s.shadow_min_samples, "min_agreement": s.min_shadow_agreement,
                                     "min_spearman": s.min_shadow_spearman}
        if min(samples) < s.shadow_min_samples:
            worst = samples.index(min(samples))
            return self._reject(version, record, "shadow_samples",
                                f"{self.replicas[worst].name} shadow-scored {samples[worst]} of "
                                f"{s.shadow_min_samples} items within {s.shadow_timeout_s:g}s")
        lowest_agreement = min(agreements, key=lambda x: -math.inf if math.isnan(x) else x)
        lowest_spearman = min(spearmans, key=lambda x: -math.inf if math.isnan(x) else x)
        self.metrics.shadow_agreement.set(lowest_agreement)
        self.metrics.shadow_spearman.set(lowest_spearman)
        if not lowest_agreement >= s.min_shadow_agreement:
            return self._reject(version, record, "shadow_agreement",
                                f"shadow pairwise agreement {lowest_agreement:.4f} is below "
                                f"{s.min_shadow_agreement} (per replica: {_fmt(agreements)})")
        if not lowest_spearman >= s.min_shadow_spearman:
            return self._reject(version, record, "shadow_spearman",
                                f"shadow Spearman {lowest_spearman:.4f} is below {s.min_shadow_spearman} "
                                f"(per replica: {_fmt(spearmans)})")
        self._note(version, record, f"shadow agreement {_fmt(agreements)}, Spearman {_fmt(spearmans)} on "
                                    f"{_fmt(samples)} items: passed")
        return None

    def _promote(self, version: RegistryVersion, record: dict, active: str, candidate: str,
                 holdout: Sequence[RankedExample], accuracy: float) -> str:
        switched: list[tuple[Replica, str]] = []
        try:
            for replica in self.replicas:
                switched.append((replica, replica.activate(candidate)))
        except ReplicaError as err:
            self._activate_each([(replica, previous) for replica, previous in switched])
            return self._reject(version, record, "activation", f"activation failed ({err}); the replicas that "
                                f"had switched are back on their previous version", outcome="failed")
        previous = switched[0][1] or active
        record.update(status="watching", previous_version=previous, promoted_at=time.time())
        self.metrics.candidates.labels("promoted").inc()
        self.metrics.last_promotion.set(time.time())
        self._export_active(candidate)
        self._note(version, record, f"promoted on {len(self.replicas)} replica(s) (was {previous})")
        problem = self._post_promotion_check(candidate, holdout, accuracy)
        if problem is not None:
            self.metrics.gate_failures.labels("post_promotion_check").inc()
            record["gates"]["post_promotion_check"] = {"passed": False, "problem": problem}
            return self._rollback(version, record, previous, "post_promotion_check", problem)
        record["gates"]["post_promotion_check"] = {"passed": True}
        self._start_watch(version, previous)
        version.write_loop_record(record)
        return "promoted"

    def _post_promotion_check(self, candidate: str, holdout: Sequence[RankedExample], accuracy: float) -> str | None:
        """Every replica answers unpinned requests with the candidate, and
        scores the held-out set as well as it did pinned."""
        for replica in self.replicas:
            try:
                scores, answered = replica.scores(holdout, "")
            except ReplicaError as err:
                return f"{replica.name} failed to score after the promotion: {err}"
            if answered != candidate:
                return f"{replica.name} answers with {answered!r}, not the promoted {candidate!r}"
            served = agreement(scores, scores).candidate_accuracy
            # Batches differ from the pinned ones (other traffic pads them), so
            # near-ties may flip: the promotion's own tolerance applies.
            if served < accuracy - self.settings.accuracy_tolerance:
                return (f"{replica.name} scores the held-out set with accuracy {served:.4f}, below the "
                        f"{accuracy:.4f} measured before promotion (tolerance {self.settings.accuracy_tolerance})")
        return None

    def _start_watch(self, version: RegistryVersion, previous: str) -> None:
        baseline = {replica.name: replica.change_points(version.version) for replica in self.replicas}
        watch = _Watch(version, previous, baseline, time.monotonic() + self.settings.watch_s)
        if self.settings.watch_against_previous and previous and previous != version.version:
            for replica in self.replicas:
                try:
                    # Every item: the paired detector compares the two versions item by item.
                    # A new pairing starts a fresh window (and detector) on the service.
                    replica.set_shadow(previous, 1.0)
                    watch.paired.add(replica.name)
                except ReplicaError as err:
                    log.warning("drift watch of %s: %s does not shadow %s (%s); any alarm of %s there rolls back",
                                version.version, replica.name, previous, err, version.version)
        self.watch = watch

    def _end_watch(self, watch: _Watch) -> None:
        self.watch = None
        for replica in self.replicas:
            if replica.name in watch.paired:
                try:
                    replica.set_shadow("", 1.0)
                except ReplicaError as err:
                    log.warning("could not stop %s shadowing %s: %s", replica.name, watch.previous, err)

    def _watch_tick(self) -> None:
        watch = self.watch
        record = watch.version.loop_record()
        for replica in self.replicas:
            why = self._drift_alarm(watch, replica, record)
            if why is not None:
                self._end_watch(watch)
                self._rollback(watch.version, record, watch.previous, "drift",
                               f"{why} within {self.settings.watch_s:g}s of the promotion")
                return
        if time.monotonic() >= watch.until:
            self._end_watch(watch)
            self._finish(watch.version, record, "active", self._watch_verdict(watch), outcome=None)
            return
        self._wait(self.settings.check_interval_s)

    def _drift_alarm(self, watch: _Watch, replica: Replica, record: dict) -> str | None:
        """Why ``replica`` rolls the watched version back now; None: it does not."""
        name, new = replica.name, watch.version.version
        try:
            now = replica.change_points(new)
        except ReplicaError as err:
            log.warning("drift watch of %s: %s", new, err)
            return None  # unknown this tick: nothing to decide on
        # A replica discovered during the watch is watched from its count now.
        before = watch.baseline.setdefault(name, now)
        if name not in watch.paired:
            return None if now <= before else f"Page-Hinkley change alarm on {name} ({before} -> {now} alarms)"
        try:
            reading = replica.shadow(new, watch.previous)
        except ReplicaError as err:
            log.warning("drift watch of %s: %s's paired detector unknown (%s)", new, name, err)
            return None
        if reading is None:
            return None  # no item shadowed yet since the promotion
        if reading.paired_detecting:
            watch.detecting.add(name)
        if reading.paired_change_points > 0:
            return (f"paired Page-Hinkley alarm on {name}: {new} scores the traffic differently from "
                    f"{watch.previous} on the same items ({reading.paired_change_points} alarm(s) over "
                    f"{reading.samples} shadowed items)")
        if now > before and not record.get("traffic_drift_noted"):
            record["traffic_drift_noted"] = True
            self._note(watch.version, record, f"Page-Hinkley alarms of {new} on {name} ({before} -> {now}) without "
                                              f"a paired alarm against {watch.previous} on the same items: the "
                                              f"traffic drifts, not the version")
        return None

    def _watch_verdict(self, watch: _Watch) -> str:
        verdict = f"no drift alarm within {self.settings.watch_s:g}s"
        if not watch.paired:
            return verdict
        blind = sorted(watch.paired - watch.detecting)
        verdict += f" against {watch.previous} on the same items"
        if blind:
            verdict += (f" (too little traffic on {', '.join(blind)} for the paired detector's reference of "
                        f"{PAIRED_REFERENCE} items)")
        return verdict

    def _rollback(self, version: RegistryVersion, record: dict, previous: str, cause: str, why: str) -> str:
        self._activate_each([(replica, previous) for replica in self.replicas])
        self.metrics.rollbacks.labels(cause).inc()
        self._export_active(previous)
        return self._finish(version, record, "rolled_back", f"rolled back to {previous}: {why}", outcome=None)

    def _activate_each(self, targets: Sequence[tuple[Replica, str]]) -> None:
        for replica, target in targets:
            try:
                replica.activate(target)
            except ReplicaError as err:
                log.error("could not activate %s on %s: %s (fix by hand: ActivateModelVersion)",
                          target, replica.name, err)

    # -- records -------------------------------------------------------------

    def _note(self, version: RegistryVersion, record: dict, event: str) -> None:
        log.info("candidate %s: %s", version.version, event)
        record["events"].append({"at": time.time(), "event": event})
        version.write_loop_record(record)

    def _reject(self, version: RegistryVersion, record: dict, gate: str, why: str, outcome: str = "rejected") -> str:
        self.metrics.gate_failures.labels(gate).inc()
        record["gates"].setdefault(gate, {})["passed"] = False
        record["failed_gate"] = gate
        return self._finish(version, record, "rejected" if outcome == "rejected" else "failed",
                            f"not promoted, kept loaded but inactive: {why}", outcome=outcome)

    def _finish(self, version: RegistryVersion, record: dict, status: str, why: str, outcome: str | None) -> str:
        if outcome is not None:
            self.metrics.candidates.labels(outcome).inc()
        record.setdefault("events", [])
        record.update(status=status, reason=why)
        if status == "active":
            self.metrics.since_active.set(0)
        elif status in NOT_ACTIVE:
            self.metrics.since_active.inc()
        self._note(version, record, why)
        return status

    def close(self) -> None:
        if self.consumer is not None:
            self.consumer.close()
            self.consumer = None


def _offset_ranges(batch: TopicBatch) -> dict[str, dict[str, list[int]]]:
    out: dict[str, dict[str, list[int]]] = {}
    for tp, end in sorted(batch.offsets().items()):
        out.setdefault(tp.topic, {})[str(tp.partition)] = [batch.first_offsets[tp], end]
    return out


def _fmt(values: Sequence[float]) -> str:
    return "/".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in values)


def load_jsonl_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _row_example(row: dict, i: int) -> RankedExample:
    return parse_row(row, f"{HOLDOUT_FILE}:{i + 1}")

