"""The PPO trainer service: rollouts in from Kafka, updates, checkpoints,
policy versions out.

Exactly-once training over an at-least-once stream: the consumer resumes from
the offsets stored in the newest checkpoint, offsets are committed to Kafka
only after the checkpoint that covers them is durable, and rollout ids seen
recently are remembered (and checkpointed) to drop duplicates.

Bookkeeping per update is cheap: a version is published after every
``publish_every`` updates by a background thread (``trainer/publish.py``:
written from an in-memory snapshot while training goes on, renamed into place,
then announced), and a checkpoint is written every ``checkpoint_every``
updates or ``checkpoint_every_s`` seconds, and whenever the trainer has
nothing to train on (free time). A crash replays the updates since
the newest checkpoint (their rollouts' offsets were not committed); versions
the crashed run published after it stay on disk and in the followers, so
their rollouts are still trained (counted as sampled at the checkpoint's
step, where the surviving lineage forked from them), and a replayed step is
published under a new label (``<run_name>-<step>.r<n>``), never over theirs.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import json
import logging
import math
import random
import shutil
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from arbiter.hf import weights_sha256
from arbiter.stream import (
    CommitError,
    ConsumedRecord,
    KafkaSettings,
    StreamConsumer,
    StreamError,
    StreamProducer,
    TopicPartition,
    cluster_id,
    ensure_topics,
    list_topics,
    partition_count,
    topics,
)
from trainer import distributed as dist
from trainer import ppo_math as pm
from trainer.batch import Trajectory, collate
from trainer.checkpoint import (
    TrainerState,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    save_distributed_checkpoint,
)
from trainer.config import TrainerConfig
from trainer.convert import InvalidRollout, policy_update, trajectory_from_record
from trainer.metrics import TrainerMetrics
from trainer.policy_model import PolicyWithValue
from trainer.publish import BackgroundPublisher, Snapshot
from trainer.step import UpdateStats, make_kl_controller, make_optimizer, nlpo_action_mask, ppo_update

log = logging.getLogger(__name__)


class ClusterChanged(StreamError):
    """The broker is not the cluster the checkpoint's offsets came from."""


@dataclass(frozen=True)
class IterationRecord:
    """One update, for summaries and plots."""

    step: int
    policy_version: str
    stats: UpdateStats
    gold_score: float | None
    staleness: float
    seconds: float
    rollouts: int
    # Trained rollouts of this update by staleness (policy versions between
    # sampling and training): {lag: count}.
    staleness_counts: dict[int, int] = dataclasses.field(default_factory=dict)
    # When the update's gradient steps ended (time.time(): publish-to-serving
    # is measured from here), and the seconds then spent on bookkeeping
    # (snapshot for the publisher, checkpoint when due).
    trained_at: float = 0.0
    bookkeeping_seconds: float = 0.0


class PPOTrainer:
    def __init__(
        self, config: TrainerConfig, kafka: KafkaSettings, metrics: TrainerMetrics | None = None,
        reset_offsets: bool = False, ranks: dist.Ranks | None = None,
    ):
        """``ranks`` (trainer/distributed.py, process group joined): this
        process is one rank of a ``parallel: ddp|fsdp`` trainer."""
        self.config = config
        self.ranks = ranks
        self.kafka = kafka
        self.metrics = metrics or TrainerMetrics()
        self.output = Path(config.output_dir)
        self.checkpoints = self.output / "checkpoints"
        self.policies = self.output / "policies"
        ppo = config.ppo
        self.model = PolicyWithValue.load(config.model_dir, ppo.lora, config.seed)
        self.shard: dist.DataParallel | None = None
        if ranks is not None and ranks.parallel == "fsdp":
            # Sharded before the optimizer exists, so its state is sharded too.
            self.shard = dist.DataParallel(ranks, dist.wrap(self.model, ranks, ppo.advantage != "gae"))
        self.optimizer = make_optimizer(self.model.trainable_parameters(), ppo.learning_rate, ppo.weight_decay)
        # The same seed on every rank: the ranks draw one shared minibatch permutation.
        self.rng = torch.Generator().manual_seed(config.seed)
        self.kl_controller = make_kl_controller(ppo)
        self.reward_moments = pm.VersionedMoments()
        self.state = TrainerState(
            step=0, policy_version=self.model.base_version, version_steps={self.model.base_version: 0}
        )
        checkpoint = latest_checkpoint(self.checkpoints)
        # NLPO: frozen copies of the policy as published under these labels,
        # the masking policy and the one before it (rollouts sampled under
        # either are trained; older ones are dropped as mask_stale).
        self.masking_policies: dict[str, PolicyWithValue] = {}
        self.mask_version = ""
        if checkpoint is not None:
            self.state = load_checkpoint(checkpoint, self.model, self.optimizer, self.rng, ranks)
            self.kl_controller = pm.kl_controller_from_state_dict(self.state.kl_controller)
            self.reward_moments.load_state_dict(self.state.reward_moments)
            log.info("resumed from %s at step %d (policy %s)", checkpoint, self.state.step, self.state.policy_version)
            if reset_offsets:
                # The stream is new (e.g. a fresh in-memory dev broker): the
                # checkpoint's offsets point into a log that no longer exists.
                log.warning("ignoring the checkpoint's stream offsets: reading the rollouts topic from the group's "
                            "committed offsets on this cluster, or from the start where it has none")
                self.state.offsets = {}
                self.state.cluster_id = ""
            self._adopt_lost_versions()
        if ranks is not None:
            if ranks.parallel == "ddp":
                # Weights are equal on every rank here (DDP checks them at wrapping).
                self.shard = dist.DataParallel(ranks, dist.wrap(self.model, ranks, ppo.advantage != "gae"))
            # A rank reads, and accounts for, only its own partitions; what the
            # checkpoint counted is rank 0's to carry (merged at every checkpoint).
            self.state.offsets = {tp: o for tp, o in self.state.offsets.items() if ranks.owns(tp.partition)}
            if not ranks.is_main:
                self.state.outcomes = {}
        self.seen: OrderedDict[str, None] = OrderedDict.fromkeys(self.state.seen_ids)
        self._checkpointed_step = self.state.step
        # Per version published by this process: rollouts settled then (PolicyUpdate.rollouts_settled).
        self._settled_at: dict[str, dict[int, int]] = {}
        # NLPO, per version published by this process: the mask announced with it.
        self._mask_at: dict[str, dict] = {}
        if ppo.nlpo is not None:
            # The masking policy starts as the policy being served: the initial
            # weights, or on resume the last version published (the weights
            # the checkpoint holds; rollouts under older masks are dropped).
            self._sync_mask(self.state.policy_version)
        self._checkpointed_at = time.monotonic()
        self.pending: list[Trajectory] = []
        # Next offset per partition of everything consumed (trained, dropped or pending).
        self.consumed: dict[TopicPartition, int] = dict(self.state.offsets)
        self.history: list[IterationRecord] = []
        # One JSON line per update: the run's training curve, for people and plots.
        self.history_path = self.output / "history.jsonl"
        self._ptx = self._ptx_batches() if ppo.ptx_coef > 0 else None

    def _adopt_lost_versions(self) -> None:
        """Versions a crashed run published after its newest checkpoint are on
        disk and may have sampled rollouts still in the topic: those rollouts
        are real samples with their own behaviour log-probs, so they are
        trained like any other, their versions counted as of the checkpoint's
        step (where this run's lineage and theirs part)."""
        if not self.policies.is_dir():
            return
        lost = sorted(p.name for p in self.policies.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and p.name not in self.state.version_steps)
        for version in lost:
            self.state.version_steps[version] = self.state.step
        if lost:
            log.warning("%d version(s) published after checkpoint step %d by the run before the restart (%s): "
                        "their rollouts count as sampled at step %d", len(lost), self.state.step,
                        ", ".join(lost[-3:]), self.state.step)

    # -- intake ---------------------------------------------------------------

    def _sync_mask(self, version: str) -> None:
        """NLPO: the masking policy becomes a frozen copy of the policy as
        published under ``version``; the previous one is kept for rollouts
        still in flight, the one before is let go."""
        masking = copy.deepcopy(self.model).requires_grad_(False).eval()
        previous = self.mask_version
        self.masking_policies = {v: m for v, m in self.masking_policies.items() if v == previous}
        self.masking_policies[version] = masking
        self.mask_version = version

    def _mask_fields(self) -> dict:
        """PolicyUpdate's mask fields: the masking policy workers sample under now."""
        nlpo = self.config.ppo.nlpo
        return {} if nlpo is None else {"mask_version": self.mask_version, "mask_top_p": nlpo.top_p}

    def _mask_known(self, trajectory: Trajectory) -> bool:
        nlpo = self.config.ppo.nlpo
        return (nlpo is None or (trajectory.mask_version in self.masking_policies
                                 and math.isclose(trajectory.mask_top_p, nlpo.top_p, rel_tol=1e-6)))

    def _remember(self, rollout_id: str) -> None:
        self.seen[rollout_id] = None
        while len(self.seen) > self.config.dedupe_window:
            self.seen.popitem(last=False)

    def _staleness(self, trajectory: Trajectory) -> pm.Staleness:
        return pm.staleness_verdict(
            self.state.version_steps.get(trajectory.policy_version), self.state.step, self.config.ppo.max_staleness
        )

    def _count(self, outcome: str, count: int = 1) -> None:
        self.metrics.rollouts.labels(outcome).inc(count)
        self.state.outcomes[outcome] = self.state.outcomes.get(outcome, 0) + count

    def _drop(self, trajectory: Trajectory, outcome: str) -> None:
        self._remember(trajectory.rollout_id)
        self._count(outcome)

    def admit(self, record: ConsumedRecord, consumer: StreamConsumer | None = None) -> None:
        """Take one consumed rollout: pending for a batch, or dropped (counted
        by outcome). An invalid one (its ids or length do not fit the model,
        fields missing or inconsistent) is dropped here, before any forward
        pass, so it never fails a batch; ``consumer`` (when given) logs,
        counts and dead-letters it as a rejected record."""
        tp = TopicPartition(record.topic, record.partition)
        self.consumed[tp] = max(self.consumed.get(tp, 0), record.offset + 1)
        try:
            trajectory = trajectory_from_record(
                record, self.config.ppo.reward_source, vocab_size=self.model.vocab_size,
                max_tokens=self.model.max_tokens,
            )
        except InvalidRollout as err:
            self._count("invalid")
            if consumer is not None:
                consumer.reject(record, err.reason, err)
            else:
                log.warning("dropping invalid rollout (%s): %s", err.reason, err)
            return
        pending_ids = {t.rollout_id for t in self.pending}
        if trajectory.rollout_id in self.seen or trajectory.rollout_id in pending_ids:
            self._count("duplicate")
            return
        verdict = self._staleness(trajectory)
        if verdict is pm.Staleness.KEEP and not self._mask_known(trajectory):
            log.warning("dropping rollout %s sampled under mask %r (top_p %s); the trainer masks with %s",
                        trajectory.rollout_id, trajectory.mask_version, trajectory.mask_top_p,
                        sorted(self.masking_policies))
            self._drop(trajectory, "mask_stale")
            return
        if verdict is pm.Staleness.KEEP:
            self.pending.append(trajectory)
            return
        if verdict is pm.Staleness.UNKNOWN_VERSION:
            log.warning("dropping rollout %s from unknown policy version %r", trajectory.rollout_id, trajectory.policy_version)
        self._drop(trajectory, verdict.value)

    def _take_batch(self, units: int | None = None) -> list[Trajectory] | None:
        """The next batch, oldest first. Rollouts that went stale while waiting
        are dropped; critic-free estimators take whole groups only. With
        ``units`` (one rank's share of a global batch): exactly that many
        rollouts, or groups, when ready."""
        ready = self._ready_units()
        unit = 1 if self.config.ppo.advantage == "gae" else self.config.ppo.samples_per_prompt
        wanted = self.config.ppo.batch_size // unit if units is None else units
        if len(ready) < wanted:
            return None
        chosen = [t for group in ready[:wanted] for t in group]
        chosen_ids = {t.rollout_id for t in chosen}
        self.pending = [t for t in self.pending if t.rollout_id not in chosen_ids]
        return chosen

    def _ready_units(self) -> list[list[Trajectory]]:
        """What a batch can take, oldest first: single rollouts, or the
        complete groups of critic-free estimators (``samples_per_prompt``
        each), after dropping what went stale or can never complete."""
        ppo = self.config.ppo
        critic_free = ppo.advantage != "gae"
        fresh = []
        for t in self.pending:
            verdict = self._staleness(t)
            if verdict is not pm.Staleness.KEEP:
                self._drop(t, verdict.value)
            elif not self._mask_known(t):  # its masking policy was let go while it waited
                self._drop(t, "mask_stale")
            elif critic_free and 0 < t.group_size < ppo.samples_per_prompt:
                # The worker produced this group short (a member skipped): it
                # can never complete, so it is dropped now rather than holding
                # its partition's offset and the workers' staleness budget.
                self._drop(t, "incomplete_group")
            else:
                fresh.append(t)
        self.pending = fresh
        if not critic_free:
            return [[t] for t in self.pending]
        groups: OrderedDict[str, list[Trajectory]] = OrderedDict()
        for t in self.pending:
            groups.setdefault(t.group_id, []).append(t)
        complete = [g for g in groups.values() if len(g) >= ppo.samples_per_prompt]
        if len(complete) * ppo.samples_per_prompt < ppo.batch_size:
            # A group missing a member (dropped upstream) would hold its
            # partition's offset forever: give up on the oldest such groups.
            while len(self.pending) > 4 * ppo.batch_size:
                oldest = next(g for g in groups.values() if len(g) < ppo.samples_per_prompt)
                for t in oldest:
                    self._drop(t, "incomplete_group")
                self.pending = [t for t in self.pending if t.group_id != oldest[0].group_id]
                del groups[oldest[0].group_id]
        return [g[: ppo.samples_per_prompt] for g in complete]

    def settled_positions(self) -> dict[int, int]:
        """Per partition of the rollouts topic, the records trained or
        dropped: the position (absolute, so what earlier runs consumed counts
        too) less the rollouts waiting there for a batch. Workers compare it
        with the offsets of their own writes to see how far ahead of training
        they are (PolicyUpdate.rollouts_settled)."""
        settled = {tp.partition: offset for tp, offset in self.consumed.items()}  # one topic: the rollouts
        for t in self.pending:
            settled[t.partition] -= 1
        return settled

    def safe_offsets(self) -> dict[TopicPartition, int]:
        """Per partition, the first offset not yet accounted for: a pending
        rollout's offset if one waits there, else past everything consumed."""
        offsets = dict(self.consumed)
        for t in self.pending:
            tp = TopicPartition(t.topic, t.partition)
            offsets[tp] = min(offsets[tp], t.offset)
        return offsets

    # -- training -------------------------------------------------------------

    def _ptx_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        lines = [line.strip() for line in Path(self.config.ppo.ptx_data).read_text().splitlines() if line.strip()]
        tokenizer = self.model.tokenizer
        order = random.Random(self.config.seed)
        size = self.config.ppo.ptx_batch_size
        for _ in itertools.count():
            order.shuffle(lines)
            for start in range(0, len(lines) - size + 1, size):
                enc = tokenizer(lines[start : start + size], return_tensors="pt", padding=True, truncation=True, max_length=128)
                yield enc["input_ids"], enc["attention_mask"]

    def train_on(self, batch: list[Trajectory], local: int | None = None) -> IterationRecord:
        """One update on ``batch`` (with ranks: the global batch, of which
        ``local`` rollouts are this rank's to count as trained)."""
        started = time.perf_counter()
        # Every rollout of a batch was kept, so its version has a step.
        lags = [self.state.step - self.state.version_steps[t.policy_version] for t in batch]
        staleness = sum(lags) / len(batch)
        collated = collate(batch, self.model.tokenizer.pad_token_id)
        if self.config.ppo.nlpo is not None:
            collated = dataclasses.replace(collated, action_mask=nlpo_action_mask(
                self.masking_policies, collated, [t.mask_version for t in batch], self.config.ppo.nlpo.top_p))
        stats = ppo_update(
            self.model, self.optimizer, collated, self.kl_controller,
            self.reward_moments, self.config.ppo, self.rng, self._ptx, self.shard,
        )
        for t in batch:
            self._remember(t.rollout_id)
        self._count("trained", len(batch) if local is None else local)
        self.state.step += 1
        golds = [t.gold_score for t in batch if t.gold_score is not None]
        gold = sum(golds) / len(golds) if golds else None
        target = getattr(self.kl_controller, "target", None)
        self.metrics.on_update(stats, target, staleness, gold, lags)
        if stats.skipped_steps:
            log.warning("update %d skipped %d non-finite step(s)", self.state.step, stats.skipped_steps)
        return IterationRecord(
            self.state.step, self.state.policy_version, stats, gold, staleness, time.perf_counter() - started,
            len(batch), dict(sorted(Counter(lags).items())),
        )

    def take_global_batch(self) -> tuple[list[Trajectory], int] | None:
        """Ranks: one global batch agreed by all (trainer/distributed.py), in
        rank order, and how many of its rollouts are this rank's; None on
        every rank until the ranks together hold a batch."""
        ppo = self.config.ppo
        unit = 1 if ppo.advantage == "gae" else ppo.samples_per_prompt
        ready = [row[0] for row in dist.gather_ints([len(self._ready_units())])]
        shares = dist.allocate(ready, ppo.batch_size // unit)
        if shares is None:
            return None
        local = self._take_batch(shares[self.ranks.rank])
        return self.global_batch(local), len(local)

    @staticmethod
    def global_batch(local: list[Trajectory]) -> list[Trajectory]:
        """Every rank's ``local`` rollouts, concatenated in rank order, on every rank."""
        return [t for part in dist.gather_objects(local) for t in part]

    # -- persistence and publishing --------------------------------------------

    def version_label(self, step: int) -> str:
        """``<run_name>-<step>``; a step replayed after a crash whose label the
        lost run already used gets ``.r<n>``: a label names one set of weights."""
        label = base = f"{self.config.run_name}-{step}"
        n = 0
        while label in self.state.version_steps or (self.policies / label).exists():
            n += 1
            label = f"{base}.r{n}"
        return label

    def _settled_everywhere(self) -> dict[int, int]:
        """settled_positions of every partition (with ranks, each rank's own merged)."""
        settled = self.settled_positions()
        if self.ranks is None:
            return settled
        return {p: o for part in dist.gather_objects(settled) for p, o in part.items()}

    def _policy_snapshot(self) -> dict[str, torch.Tensor] | None:
        """What a published version holds (None on ranks that do not publish);
        under FSDP every rank takes part in gathering the full weights."""
        if self.ranks is not None and self.ranks.parallel == "fsdp":
            full = dist.full_state_dict(self.model)
            return {k.removeprefix("lm."): v for k, v in full.items() if k.startswith("lm.")} if full else None
        if self.ranks is not None and not self.ranks.is_main:
            return None
        return self.model.policy_snapshot()

    def _register_version(self) -> str:
        version = self.version_label(self.state.step)
        if self.ranks is not None:
            version = dist.from_main(version)  # rank 0 publishes: its view of the directory decides
        self._settled_at[version] = self._settled_everywhere()
        if self.config.ppo.nlpo is not None:
            # Announced with the version: the mask in force when it was
            # registered (a mask synced to it is announced from the next one
            # on, by when replicas following in order have loaded it).
            self._mask_at[version] = self._mask_fields()
        self.state.version_steps[version] = self.state.step
        self.state.policy_version = version
        self.state.published.append(version)
        self.metrics.policy_step.set(self.state.step)
        return version

    def save_policy_version(self) -> Path:
        """Write the current policy as a servable version now (atomic rename;
        with ranks, every rank calls this and rank 0 writes)."""
        snapshot = self._policy_snapshot() if self.ranks is not None else None
        version = self._register_version()
        final = self.policies / version
        if self.ranks is not None and not self.ranks.is_main:
            return final
        tmp = self.policies / f".tmp-{version}"
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_policy(tmp, version, snapshot)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        return final

    def publish(self, publisher: BackgroundPublisher | None) -> str:
        """Register the current policy as the next version and hand a snapshot
        of it to ``publisher`` (written and announced in the background)."""
        snapshot = self._policy_snapshot()
        version = self._register_version()
        if publisher is not None:
            publisher.submit(Snapshot(version, self.state.step, snapshot))
        return version

    def new_publisher(self, producer: StreamProducer) -> BackgroundPublisher:
        self.policies.mkdir(parents=True, exist_ok=True)
        return BackgroundPublisher(
            self.policies, lambda path, snap: self.model.save_policy(path, snap.version, snap.tensors),
            lambda version, weights_uri="", weights_sha256="": self.announce(producer, version, weights_uri,
                                                                            weights_sha256),
            on_saved=lambda version, seconds: self.metrics.publish_write.observe(seconds),
            on_superseded=self.metrics.publish_superseded.inc, weights=self.config.weights,
            keep_versions=self.config.keep_policy_versions,
        )

    def checkpoint_due(self) -> bool:
        """After ``checkpoint_every`` updates or ``checkpoint_every_s``
        seconds, whichever comes first (only with updates to cover)."""
        cfg = self.config
        if self.state.step == self._checkpointed_step:
            return False
        if cfg.checkpoint_every is not None and self.state.step % cfg.checkpoint_every == 0:
            return True
        return cfg.checkpoint_every_s is not None and time.monotonic() - self._checkpointed_at >= cfg.checkpoint_every_s

    def after_update(self, consumer: StreamConsumer | None, publisher: BackgroundPublisher | None) -> str | None:
        """What ``run`` does after each update: publish (in the background)
        and checkpoint when due. Returns the version published, if any."""
        started = time.perf_counter()
        published = self.publish(publisher) if self.state.step % self.config.publish_every == 0 else None
        nlpo = self.config.ppo.nlpo
        if published is not None and nlpo is not None and self.state.step % nlpo.mask_update_every == 0:
            self._sync_mask(published)
        due = self.checkpoint_due()
        if self.ranks is not None:
            due = dist.any_rank(due)  # the time trigger reads each rank's clock
        if due:
            self.checkpoint(consumer)
        self.metrics.bookkeeping.observe(time.perf_counter() - started)
        return published

    def checkpoint(self, consumer: StreamConsumer | None) -> Path:
        if consumer is not None:
            self._check_same_cluster(consumer.cluster_id())
        self.state.offsets = self.safe_offsets()
        self.state.seen_ids = list(self.seen)
        self.state.kl_controller = self.kl_controller.state_dict()
        self.state.reward_moments = self.reward_moments.state_dict()
        if self.ranks is None:
            path = save_checkpoint(
                self.checkpoints, self.model, self.optimizer, self.rng, self.state, keep=self.config.keep_checkpoints
            )
        else:
            path = save_distributed_checkpoint(
                self.checkpoints, self.model, self.optimizer, self.rng, self._merged_state(), self.ranks,
                keep=self.config.keep_checkpoints,
            )
        self._checkpointed_step, self._checkpointed_at = self.state.step, time.monotonic()
        self.metrics.checkpoints.inc()
        if consumer is not None and self.state.offsets:
            # Only now, with the checkpoint durable, may the group move forward.
            try:
                consumer.commit({tp: o for tp, o in self.state.offsets.items() if tp in consumer.assignment()})
            except CommitError as err:
                # The checkpoint, not the group, is what a restart resumes
                # from; the group's offsets only trail (lag, tools) and catch
                # up with the next checkpoint. Meanwhile a reassignment
                # resumes where this consumer is, not at the stale commit.
                log.warning("checkpoint %s is durable but its offsets were not committed to the group "
                            "(the next checkpoint commits them): %s", path.name, err)
                self.metrics.commit_failures.inc()
                consumer.seek(consumer.positions())
        return path

    def _merged_state(self) -> TrainerState:
        """The job's state from every rank's: all partitions' offsets (each
        rank's own), outcomes summed, the dedupe windows joined."""
        parts = dist.gather_objects((self.state.offsets, self.state.outcomes, self.state.seen_ids))
        offsets: dict[TopicPartition, int] = {}
        outcomes: Counter[str] = Counter()
        seen: dict[str, None] = {}
        for part_offsets, part_outcomes, part_seen in parts:
            offsets.update(part_offsets)
            outcomes.update(part_outcomes)
            seen.update(dict.fromkeys(part_seen))
        return dataclasses.replace(
            self.state, offsets=offsets, outcomes=dict(outcomes),
            seen_ids=list(seen)[-self.config.dedupe_window :],
        )

    def _check_same_cluster(self, current: str | None) -> None:
        """Offsets are positions in one cluster's log: refuse to store or use
        them against another (a broker that came back empty, another cluster
        behind the same address)."""
        if not current:
            return
        if not self.state.cluster_id:
            self.state.cluster_id = current
            return
        if current != self.state.cluster_id and (self.state.offsets or self.consumed):
            raise ClusterChanged(
                f"the Kafka cluster at {','.join(self.kafka.bootstrap_servers)} is {current!r}, but the "
                f"checkpointed stream offsets (step {self.state.step}) belong to cluster {self.state.cluster_id!r}: "
                "they are positions in another log, so neither resuming from them nor committing them is safe. "
                "Point kafka.bootstrap_servers at that cluster, or restart with --reset-offsets to read this "
                "one's rollouts topic from the trainer group's committed offsets, or from the start where it has "
                "none (rollout ids in the checkpoint's dedupe window are still not trained again)"
            )
        self.state.cluster_id = current

    def announce(self, producer: StreamProducer, version: str, weights_uri: str = "", digest: str = "") -> None:
        """``digest``: the weights sha256 when the publisher hashed the files
        as it wrote them (otherwise they are hashed here)."""
        path = self.policies / version
        producer.send(
            topics.POLICY_UPDATES,
            policy_update(
                version, str(path.resolve()), self.model.base_version, self.state.version_steps[version],
                digest or weights_sha256(path), self.model.is_lora,
                self._settled_at.get(version), weights_uri=weights_uri,
                **(self._mask_at.get(version) or self._mask_fields()),
            ),
        )
        producer.flush(timeout_s=30)
        self.metrics.publish.inc()
        log.info("published policy %s", version)

    def _resume_publishing(self, publisher: BackgroundPublisher | None) -> None:
        """The crash may have come before the checkpoint's version was written
        or announced; announcing twice is harmless (followers skip loaded
        versions). A version whose files never got written is written now
        when the checkpoint holds its weights (it was taken at its step)."""
        version = self.state.policy_version
        if self.state.step == 0 or version not in self.state.published:
            return
        self._settled_at[version] = self._settled_everywhere()  # the checkpoint's position
        written = (self.policies / version).is_dir()
        if self.ranks is not None:
            written = dist.from_main(written)
        if written:
            if publisher is not None:
                publisher.owe(version)
        elif self.state.version_steps.get(version) == self.state.step:
            snapshot = self._policy_snapshot()
            if publisher is not None:
                publisher.submit(Snapshot(version, self.state.step, snapshot))
        else:
            log.warning("policy %s (step %d) was never written before the restart; the next update publishes",
                        version, self.state.version_steps.get(version, -1))

    def _log_history(self, record: IterationRecord) -> None:
        self.output.mkdir(parents=True, exist_ok=True)
        row = {"time": time.time(), "step": record.step, "policy_version": record.policy_version,
               "gold_score": record.gold_score, "staleness": record.staleness,
               "staleness_counts": {str(k): v for k, v in record.staleness_counts.items()},
               "seconds": record.seconds, "rollouts": record.rollouts, "trained_at": record.trained_at,
               "bookkeeping_seconds": record.bookkeeping_seconds, **dataclasses.asdict(record.stats)}
        with self.history_path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")

    # -- the loop ---------------------------------------------------------------

    def run(
        self,
        stop: threading.Event | None = None,
        on_update: Callable[[IterationRecord], None] | None = None,
        poll_timeout_s: float = 0.5,
    ) -> list[IterationRecord]:
        stop = stop or threading.Event()
        ranks = self.ranks
        # Create what is missing; an existing topic's partition count is the operator's choice.
        self._check_same_cluster(cluster_id(self.kafka))
        if ranks is None or ranks.is_main:
            existing = list_topics(self.kafka)
            missing = {t: topics.DEFAULT_PARTITIONS[t] for t in (topics.ROLLOUTS, topics.POLICY_UPDATES)
                       if self.kafka.topic(t) not in existing}
            if topics.ROLLOUTS in missing and ranks is not None:
                missing[topics.ROLLOUTS] = max(missing[topics.ROLLOUTS], ranks.world)
            if missing:
                ensure_topics(self.kafka, missing)
        if ranks is not None:
            dist.barrier()
            dist.check_partitions(ranks, partition_count(self.kafka, topics.ROLLOUTS), self.kafka.topic(topics.ROLLOUTS))
        # A record that cannot be trained on is skipped and counted, never
        # retried: stopping on it would stop training at every restart.
        # Ranks read fixed partitions (their own), the group only keeps offsets.
        with StreamConsumer(self.kafka, [topics.ROLLOUTS], topics.TRAINER_GROUP, skip_invalid=True,
                            observer=self.metrics.rejected_records,
                            partitions=ranks.owns if ranks is not None else None) as consumer, \
                contextlib.ExitStack() as stack:
            if self.state.offsets:
                consumer.seek(self.state.offsets)
            # Rank 0 alone writes and announces versions.
            publisher = None
            if ranks is None or ranks.is_main:
                publisher = self.new_publisher(stack.enter_context(StreamProducer(self.kafka)))
            try:
                self._resume_publishing(publisher)
                if ranks is None:
                    self._train_from(consumer, publisher, stop, on_update, poll_timeout_s)
                else:
                    self._train_ranks(consumer, publisher, stop, on_update, poll_timeout_s)
                # A clean stop replays nothing: the updates since the last
                # checkpoint get one (a crash replays them instead).
                if self.state.step != self._checkpointed_step:
                    self.checkpoint(consumer)
            finally:
                if publisher is not None:
                    publisher.close()
        return self.history

    def _intake(self, consumer: StreamConsumer, poll_timeout_s: float) -> bool:
        """One poll, admitted; True when it brought nothing and nothing is left to read."""
        polled = consumer.poll(timeout_s=poll_timeout_s)
        for record in polled.records:
            self.admit(record, consumer)
        for rejected in polled.rejected:
            tp = rejected.topic_partition
            self.consumed[tp] = max(self.consumed.get(tp, 0), rejected.offset + 1)
            self._count("invalid")
        lag = sum(consumer.lag().values())
        self.metrics.lag.set(lag)
        return not polled.records and not lag

    def _update(
        self, batch: list[Trajectory], consumer: StreamConsumer, publisher: BackgroundPublisher | None,
        on_update: Callable[[IterationRecord], None] | None, local: int | None = None,
    ) -> None:
        started = time.perf_counter()
        record = self.train_on(batch, local)
        trained_at, trained = time.time(), time.perf_counter()
        self.after_update(consumer, publisher)
        done = time.perf_counter()
        record = dataclasses.replace(record, policy_version=self.state.policy_version, seconds=done - started,
                                     trained_at=trained_at, bookkeeping_seconds=done - trained)
        self.metrics.iteration.observe(record.seconds)
        self.history.append(record)
        if self.ranks is None or self.ranks.is_main:
            self._log_history(record)
        if on_update is not None:
            on_update(record)

    def _more_updates(self) -> bool:
        return self.config.max_updates is None or self.state.step < self.config.max_updates

    def _train_from(
        self, consumer: StreamConsumer, publisher: BackgroundPublisher, stop: threading.Event,
        on_update: Callable[[IterationRecord], None] | None, poll_timeout_s: float,
    ) -> None:
        while not stop.is_set() and self._more_updates():
            if self._intake(consumer, poll_timeout_s) and self.state.step != self._checkpointed_step:
                # Nothing to train on: checkpointing now costs no training time,
                # and a crash while idle then replays nothing.
                self.checkpoint(consumer)
            while self._more_updates() and (batch := self._take_batch()):
                self._update(batch, consumer, publisher, on_update)

    def _train_ranks(
        self, consumer: StreamConsumer, publisher: BackgroundPublisher | None, stop: threading.Event,
        on_update: Callable[[IterationRecord], None] | None, poll_timeout_s: float,
    ) -> None:
        """``_train_from`` for one rank of many: every decision that changes
        what the ranks do next (stop, checkpoint, train) is agreed first, so
        all ranks run the same collectives in the same order."""
        while self._more_updates():
            idle = self._intake(consumer, poll_timeout_s)
            flags = dist.gather_ints([int(stop.is_set()), int(idle)])
            if any(row[0] for row in flags):
                return
            if all(row[1] for row in flags) and self.state.step != self._checkpointed_step:
                self.checkpoint(consumer)
            while self._more_updates() and (taken := self.take_global_batch()) is not None:
                batch, local = taken
                self._update(batch, consumer, publisher, on_update, local)
