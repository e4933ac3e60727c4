"""How far workers may generate ahead of the trainer.

Generation overlaps training: workers keep sampling while the trainer trains,
so a rollout is trained some policy versions after the one that sampled it.
The bound is AReaL's (Fu et al. 2025, "AReaL: a large-scale asynchronous
reinforcement learning system for language reasoning"): with a staleness
bound η and a training batch of B rollouts, generation stops while

    rollouts generated so far  ≥  (i + η + 1) · B,

i the trainer's version index. Counted relative to what the trainer has
consumed it says the same without the whole run's history: a worker may
generate while

    behind + in_flight  <  (η + 1) · B,

* ``behind``: rollout records written but not yet settled (trained or
  dropped) by the trainer as of version i: per partition of the rollouts
  topic, the end of this worker's newest write (an absolute offset, so every
  record before it counts, whoever wrote it) less the trainer's settled
  position there (``PolicyUpdate.rollouts_settled``, published with version
  i), summed. i is the newest version this worker has sampled on or seen its
  policy serve (by ``training_step``, read from the policy-updates topic by
  ``VersionSteps``): the version the policy *serves*, not the trainer's
  newest, so the bound holds while swaps lag;
* ``in_flight``: this worker's samples generated but not yet produced.

Why it bounds the lag: the trainer takes rollouts in order, B per update, so
the records after its settled positions of version i are trained by updates
i+1, i+2, ...; a rollout sampled on version i lands within (η + 1) · B of
them, so it is trained by update i + η + 1 at the latest: with the trainer at
most η steps past i. Dropped records only make later ones train sooner, and
restarts need no history: both sides are positions in the topic.

Several workers share the one budget through the positions (records of
others before a worker's own newest write count against it); none needs to
know of the others. What a worker cannot see are the others' records written
after its own newest write on a partition and their samples in flight: with
W workers the total may run over the bound by about (W − 1) × (a batch in
flight and a batch written), i.e. some rollouts may be a version staler than
η. Until the policy serves a version announced with settled positions
(before the trainer's first update, or a trainer from before
``rollouts_settled``), the trainer group's committed offsets stand in for
them: they trail by at most the trainer's checkpoint cadence, so the worker
is the more careful for it. The trainer drops whatever is too stale for its
own ``ppo.max_staleness`` (counted as rollouts{outcome="stale"}); it never
trains it silently.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass

from arbiter.policy.types import ActionMask
from arbiter.stream import KafkaSettings, StreamConsumer, StreamError, topics
from arbiter.v1 import rollout_pb2

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VersionProgress:
    """What a PolicyUpdate says about the trainer when it published a version."""

    step: int
    # Settled records per partition of the rollouts topic; None from a trainer before rollouts_settled.
    settled: Mapping[int, int] | None


class GenerationBudget:
    """The rule above: room = (η + 1) · B − behind − in_flight, with the
    settled positions of the newest version observed."""

    def __init__(self, max_staleness: int, batch_size: int, settled: Mapping[int, int] | None = None):
        if max_staleness < 1:
            raise ValueError(f"max_staleness must be >= 1, got {max_staleness}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.limit = (max_staleness + 1) * batch_size
        self.step: int | None = None
        # Per partition; a partition absent here is settled up to offset 0.
        self.settled: Mapping[int, int] = dict(settled or {})

    def observe(self, progress: VersionProgress | None) -> bool:
        """A version was sampled on or served (None: its label is on no
        PolicyUpdate, e.g. the initial weights). True if the trainer is now
        known to be further on."""
        if progress is None or (self.step is not None and progress.step <= self.step):
            return False
        self.step = progress.step
        if progress.settled is not None:
            self.settled = dict(progress.settled)
        return True

    def behind(self, end: Mapping[int, int]) -> int:
        """Records written but not settled, as far as this worker's writes
        (the offset after its newest, per partition) show them."""
        return sum(max(0, e - self.settled.get(p, 0)) for p, e in end.items())

    def room(self, end: Mapping[int, int], in_flight: int) -> int:
        """Rollouts that may still be generated."""
        return self.limit - self.behind(end) - in_flight


class VersionSteps:
    """Policy version label → the trainer's progress when it published it
    (training step, settled positions), read from the policy-updates
    topic on a thread of its own (every partition from the start, no group:
    every worker sees every update)."""

    def __init__(self, kafka: KafkaSettings, poll_timeout_s: float = 0.5, retry_s: float = 2.0):
        self.kafka = kafka
        self.poll_timeout_s = poll_timeout_s
        self.retry_s = retry_s
        self._progress: dict[str, VersionProgress] = {}
        # NLPO: (training step, mask) of the newest update announcing one.
        self._mask: tuple[int, ActionMask] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # Set once every update on the topic when it started was read.
        self.caught_up = threading.Event()
        self._thread = threading.Thread(target=self._run, name="policy-version-steps", daemon=True)

    def start(self) -> VersionSteps:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)

    def progress(self, version: str) -> VersionProgress | None:
        with self._lock:
            return self._progress.get(version)

    def mask(self) -> ActionMask | None:
        """The action mask the trainer announced last (NLPO), if any."""
        with self._lock:
            return None if self._mask is None else self._mask[1]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                consumer = StreamConsumer(self.kafka, [topics.POLICY_UPDATES], None, skip_invalid=True)
            except StreamError as err:
                log.warning("policy updates: cannot read version steps (%s); retrying in %.0fs", err, self.retry_s)
                self._stop.wait(self.retry_s)
                continue
            try:
                consumer.seek({tp: 0 for tp in consumer.assignment()})
                while not self._stop.is_set():
                    if not self.caught_up.is_set():
                        lag = consumer.lag()
                        if lag.keys() >= consumer.assignment() and not any(lag.values()):
                            self.caught_up.set()
                    for record in consumer.poll(timeout_s=self.poll_timeout_s).records:
                        update: rollout_pb2.PolicyUpdate = record.message
                        if update.policy_version:
                            settled = dict(update.rollouts_settled) or None
                            with self._lock:
                                self._progress[update.policy_version] = VersionProgress(
                                    int(update.training_step), settled)
                                step = int(update.training_step)
                                if update.mask_version and (self._mask is None or step >= self._mask[0]):
                                    self._mask = (step, ActionMask(update.mask_version, update.mask_top_p))
            except StreamError as err:
                log.warning("policy updates: reading version steps failed (%s); reconnecting in %.0fs", err,
                            self.retry_s)
                self._stop.wait(self.retry_s)
            finally:
                consumer.close()


def wait_caught_up(steps: VersionSteps, timeout_s: float) -> None:
    """Until every update on the policy-updates topic was read. Raises TimeoutError."""
    if not steps.caught_up.wait(timeout_s):
        raise TimeoutError(f"the policy-updates topic was not read to its end within {timeout_s:g}s")
