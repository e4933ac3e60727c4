"""The rollout worker, a pipeline over the typed service clients:

    prompt source (a JSON-lines file or the prompts topic; ``prompts.py``)
      -> generate   PolicyService.Generate            (``stages.py``)
      -> score      RewardService.Score               (``stages.py``)
         reference  ReferenceService.LogProbs, at the same time as score
                    (after it with pipeline_depth 1)
      -> sink       one ``Rollout`` per sample on the rollouts topic, keyed by
                    prompt id (acks=all, idempotent producer; ``sink.py``)

``RolloutWorker`` wires the stages, owns their lifecycle and ``stop``, and
keeps the budgets (``max_rollouts``, and the staleness bound ``max_staleness``).

Pipelining (``pipeline_depth`` batches in flight, ``inflight.py``): the
worker's thread takes prompts and generates one batch after another; each
generated batch is scored, given its reference log-probs and produced on a
thread of its own, so the next Generate runs while the reward and reference
services work on the last batch. Generate calls stay one at a time and in
order (seed + call number stays reproducible). Batches are produced and
settled (counted, committed) in the order they were taken. Depth 1 is the
worker as it was before: one batch, and one call, at a time.

Run several at once: they share nothing but the topics. With the prompts
topic they split its partitions (group ``ROLLOUT_WORKERS_GROUP``); with a file
each reads the whole file (give each a different ``seed``).

Failure handling, by stage:

- transient RPC failures (UNAVAILABLE, DEADLINE_EXCEEDED, ABORTED) left after
  the channel's own retries: the stage is retried with backoff until it works
  or the worker is stopped (``retry.StageRetry``), so a restarting service
  delays rollouts but loses none (a retried Generate reuses its request, seed
  included);
- INVALID_ARGUMENT for a batch: its items are retried one by one and the ones
  refused on their own are skipped, logged and counted (``samples_skipped``);
- anything else (a tokenizer mismatch after a swap, auth, a server bug) stops
  the worker with ``WorkerError``, once the batches taken before the failed
  one are produced: retrying would not fix it;
- samples with an empty completion are skipped and counted (the reward and
  reference services refuse them);
- records the brokers do not acknowledge are re-sent (same rollout_id).

Each stage's failed attempts and time are counted under its own name
(``arbiter_worker_errors_total`` / ``arbiter_worker_stage_seconds`` by ``stage``).

A batch that ends unproduced (a fatal error, or stopped during a retry) is
counted in ``arbiter_worker_batches_dropped_total`` together with the
batches after it, which are then dropped before they produce anything;
``stop`` finishes the batches in flight before ``run`` returns.

Staleness: generation overlaps training. With ``max_staleness`` (η) the
worker generates while the trainer trains, up to AReaL's bound: rollouts
written to the topic but not yet settled by the trainer (as far as the
offsets of this worker's own writes show), plus its samples in flight, stay
below (η + 1) · B (B the trainer's batch size; the trainer's settled
positions come with the PolicyUpdate of the newest version the worker
sampled on). At the bound it waits, polling the policy's version,
until the policy serves a newer one. ``staleness.py`` has the rule, why it
bounds the lag, and how several workers share it. Each rollout records the
version that generated it; the trainer drops (and counts) any that are
still too stale.

Delivery: a prompt-topic offset is committed only after all rollouts of its
batch and of every batch taken before it were acknowledged, so a crash
re-processes the batches in flight (at-least-once), and a batch dropped
after a failure is never produced, so its prompts are not produced twice.
Re-processing samples anew under fresh rollout_ids: for RL that is just more
on-policy data, and the trainer's dedupe by rollout_id only needs to catch
producer re-sends, which reuse the id.

Pairing: at start the worker refuses a reference whose tokenizer differs from
the policy's (``services.common.pairing``).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from http.server import HTTPServer
from typing import Any, Protocol, TypeVar

import grpc
from prometheus_client import CollectorRegistry, start_http_server

from arbiter.policy.types import ActionMask, SamplingParams
from arbiter.prompts import as_prompts, read_prompts
from arbiter.stream import StreamError, ensure_topics, group_offsets, list_topics, topics
from arbiter.types import Prompt
from arbiter.v1 import common_pb2, rollout_pb2
from services.common.client import ModelServiceClient
from services.common.metrics import stop_metrics_endpoint
from services.common.pairing import TokenizerMismatch
from services.policy.client import PolicyClient
from services.reference.client import ReferenceClient
from services.reward.client import RewardClient
from services.worker.gold import make_gold_scorer
from services.worker.inflight import Batch, Dropped, InFlight, NoObserver, StageObserver
from services.worker.metrics import WorkerMetrics
from services.worker.prompts import FilePrompts, PromptSource, TopicPrompts
from services.worker.retry import StageRetry, WorkerError, WorkerStopped, describe, fatal
from services.worker.settings import WorkerSettings
from services.worker.sink import RolloutSink, build_rollout
from services.worker.staleness import GenerationBudget, VersionProgress, VersionSteps, wait_caught_up
from services.worker.stages import GenerateStage, ReferenceLogProbs, ReferenceStage, ScoreStage

log = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")
Client = TypeVar("Client", bound=ModelServiceClient)


class _Stage(Protocol[In, Out]):
    @property
    def name(self) -> str: ...

    def __call__(self, items: Sequence[In], /) -> list[Out]: ...


@dataclass
class WorkerStats:
    batches: int = 0
    prompts: int = 0
    rollouts: int = 0
    skipped: int = 0
    # Batches taken but not produced (see services/worker/inflight.py).
    dropped: int = 0


@dataclass(frozen=True)
class Pipeline:
    """What ``start()`` connected: the clients and the stages over them."""

    policy: PolicyClient
    reward: RewardClient
    reference: ReferenceClient
    generate: GenerateStage
    score: ScoreStage
    logprobs: ReferenceStage
    sink: RolloutSink
    tokenizer_fingerprint: str
    # Where the reference stage runs, beside the score stage of the same batch.
    references: ThreadPoolExecutor

    def close(self) -> None:
        self.references.shutdown(wait=True)
        self.sink.close()
        for client in (self.policy, self.reward, self.reference):
            client.close()


class RolloutWorker:
    """``RolloutWorker(settings).run(stop_event)`` until stopped, out of prompts
    or at ``max_rollouts``; or ``run_once(prompts)`` for one set of prompts.
    ``start()`` (implicit in both) connects and checks the services; use the
    worker as a context manager, or ``close()`` it."""

    def __init__(
        self, settings: WorkerSettings, registry: CollectorRegistry | None = None,
        observer: StageObserver | None = None,
    ):
        self.settings = settings
        self.registry = registry or CollectorRegistry()
        self._observer = observer or NoObserver()
        self.metrics = WorkerMetrics(self.registry)
        self.stats = WorkerStats()
        self.metrics_port: int | None = None
        self._stopping = threading.Event()
        self._retry = StageRetry(
            settings.retry_initial_backoff_s, settings.retry_max_backoff_s, lambda: self._stopping,
            lambda stage: self.metrics.errors.labels(stage).inc(),
        )
        self._pipeline: Pipeline | None = None
        self._metrics_httpd: HTTPServer | None = None
        self._file_prompts: list[Prompt] = []
        self._gold: Callable[[str], float] | None = None
        # With max_staleness: the budget and the version → step map it learns the trainer's progress from.
        self._budget: GenerationBudget | None = None
        self._steps: VersionSteps | None = None
        # NLPO: the mask until the trainer announces one (the policy's serving version at start).
        self._initial_mask: ActionMask | None = None
        # Rollouts that may still be generated, as of the last budget check.
        self._room = 0

    @property
    def pipeline(self) -> Pipeline:
        if self._pipeline is None:
            raise WorkerError("the worker is not started: call start() (or use it as a context manager)")
        return self._pipeline

    @property
    def tokenizer_fingerprint(self) -> str:
        """The tokenizer the policy and the reference were found to share."""
        return self.pipeline.tokenizer_fingerprint

    # -- lifecycle ------------------------------------------------------

    def start(self) -> RolloutWorker:
        """Reads the prompts file, connects, and refuses to run against a
        reference whose tokenizer differs from the policy's. Idempotent."""
        if self._pipeline is not None:
            return self
        s = self.settings
        # Before any connection: a bad line is reported at once.
        if s.prompts_file is not None:
            self._file_prompts = read_prompts(s.prompts_file)
        if s.gold:
            self._gold = make_gold_scorer(s.gold)
        try:
            self._pipeline = self._connect()
            if s.nlpo_top_p is not None:
                self._follow_updates("nlpo_top_p needs the trainer's mask announcements")
            if s.max_staleness is not None:
                self._start_budget()
            if s.metrics_port is not None:
                self._metrics_httpd, _ = start_http_server(s.metrics_port, addr=s.metrics_host, registry=self.registry)
                self.metrics_port = self._metrics_httpd.server_port
        except BaseException:
            self.close()
            raise
        return self

    def _start_budget(self) -> None:
        """Reads the policy-updates topic to its end, then takes the trainer's
        progress from the version the policy serves now."""
        s = self.settings
        self._follow_updates("max_staleness needs the trainer's progress")
        try:
            # Until the trainer announces settled positions: its committed offsets.
            committed = group_offsets(s.kafka, topics.TRAINER_GROUP, topics.ROLLOUTS)
        except (TimeoutError, StreamError) as err:
            raise WorkerError(f"max_staleness needs the trainer's progress: {err}") from None
        self._budget = GenerationBudget(s.max_staleness, s.trainer_batch_size, settled=committed)
        active = self.pipeline.policy.info().version
        self._observe_versions([active])
        log.info("worker %s: staleness bound %d version(s): at most %d rollouts ahead of training (batch %d); "
                 "policy %s at trainer step %s", s.worker_id, s.max_staleness, self._budget.limit,
                 s.trainer_batch_size, active, self._budget.step)

    def _follow_updates(self, why: str) -> None:
        """The policy-updates topic, read to its end and then followed (the
        trainer's progress per version, and NLPO's mask)."""
        if self._steps is not None:
            return
        self._steps = VersionSteps(self.settings.kafka).start()
        try:
            wait_caught_up(self._steps, self.settings.connect_timeout_s)
        except (TimeoutError, StreamError) as err:
            raise WorkerError(f"{why}: {err}") from None

    def _mask(self) -> ActionMask | None:
        """NLPO: the mask the trainer announced last, else the initial one."""
        announced = None if self._steps is None else self._steps.mask()
        return announced or self._initial_mask

    def stop(self) -> None:
        """Ask ``run`` to return once the batches in flight are produced (a
        batch waiting on a retry is abandoned and the batches after it are
        dropped: with the prompts topic they are processed again)."""
        self._stopping.set()

    def close(self) -> None:
        if self._pipeline is not None:
            self._pipeline.close()
            self._pipeline = None
        if self._steps is not None:
            self._steps.close()
            self._steps = None
        stop_metrics_endpoint(self._metrics_httpd)
        self._metrics_httpd = None

    def __enter__(self) -> RolloutWorker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connect(self) -> Pipeline:
        s = self.settings

        def client(client_type: type[Client], target: str) -> Client:
            return client_type(
                target, timeout_s=s.rpc_timeout_s, token=s.auth_token, tls_ca_file=s.tls_ca_file,
                tls_cert_file=s.tls_cert_file, tls_key_file=s.tls_key_file,
                reconnect_backoff_s=(s.retry_initial_backoff_s, s.retry_max_backoff_s),
            )

        policy = client(PolicyClient, s.policy_target)
        reward = client(RewardClient, s.reward_target)
        reference = client(ReferenceClient, s.reference_target)
        try:
            return self._pipeline_over(policy, reward, reference)
        except BaseException:
            for opened in (policy, reward, reference):
                opened.close()
            raise

    def _pipeline_over(self, policy: PolicyClient, reward: RewardClient, reference: ReferenceClient) -> Pipeline:
        """Checks the services (up, of the right kind, policy and reference
        paired) and the topics, then builds the stages over the clients."""
        s = self.settings
        deadline = time.monotonic() + s.connect_timeout_s
        policy_info, reward_info, reference_info = (
            self._wait_for_info(role, client, deadline)
            for role, client in (("policy", policy), ("reward", reward), ("reference", reference))
        )
        try:
            fingerprint = reference.pair_with(policy_info, reference_info)
        except TokenizerMismatch as err:
            raise WorkerError(f"refusing to start: {err}") from None
        normalize = reward_info.HasField("normalization")
        log.info(
            "worker %s: policy %s %s, reward %s %s (%s), reference %s %s; tokenizer %s...",
            s.worker_id, policy_info.name, policy_info.version, reward_info.name, reward_info.version,
            "normalized" if normalize else "raw scores only", reference_info.name, reference_info.version,
            fingerprint[:12],
        )
        self._check_topics()
        sampling = SamplingParams(
            max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
            n=s.samples_per_prompt, stop=s.stop, seed=s.seed,
        )
        if s.nlpo_top_p is not None:
            self._initial_mask = ActionMask(policy_info.version, s.nlpo_top_p)
        return Pipeline(
            policy, reward, reference,
            generate=GenerateStage(self._retry, self._skip, policy, sampling, tokenizer_fingerprint=fingerprint,
                                   mask=self._mask),
            score=ScoreStage(self._retry, reward, s.reward_truncation, normalize=normalize),
            logprobs=ReferenceStage(self._retry, reference),
            sink=RolloutSink(s.kafka, self.metrics, self._retry),
            tokenizer_fingerprint=fingerprint,
            references=ThreadPoolExecutor(max_workers=s.pipeline_depth, thread_name_prefix="rollout-reference"),
        )

    def _wait_for_info(self, role: str, client: ModelServiceClient, deadline: float) -> common_pb2.ModelInfo:
        """The service's active ModelInfo, waiting for it to come up (a worker
        may start before the services it calls)."""
        try:
            info = self._retry.call(
                "connect",
                lambda: client.info(timeout_s=max(deadline - time.monotonic(), 0.1), wait_for_ready=True),
                deadline=deadline,
            )
        except grpc.RpcError as err:
            raise WorkerError(
                f"the {role} service at {client.target} did not answer within {self.settings.connect_timeout_s}s: "
                f"{describe(err)}"
            ) from None
        if info.kind and info.kind != role:
            raise WorkerError(f"the service at {client.target} serves a {info.kind!r} model, expected the {role} service")
        return info

    def _check_topics(self) -> None:
        s = self.settings
        needed = ([topics.ROLLOUTS] + ([topics.PROMPTS] if s.prompts_topic else [])
                  + ([topics.POLICY_UPDATES] if s.max_staleness is not None else []))
        try:
            if s.create_topics:
                ensure_topics(s.kafka, {name: topics.DEFAULT_PARTITIONS[name] for name in needed})
                return
            existing = list_topics(s.kafka)
        except StreamError as err:
            raise WorkerError(f"kafka: {err}") from None
        missing = [s.kafka.topic(name) for name in needed if s.kafka.topic(name) not in existing]
        if missing:
            raise WorkerError(
                f"kafka topic(s) {', '.join(missing)} do not exist: create them (arbiter broker --create-topics, "
                "or your cluster's provisioning) or pass --create-topics"
            )

    # -- running --------------------------------------------------------

    def run(self, stop_event: threading.Event | None = None) -> WorkerStats:
        """Produce rollouts until ``stop_event`` is set (or ``stop()``), the file's
        passes are done, or ``max_rollouts`` is reached; the batches in flight
        are finished first. Raises WorkerError when a failure is not transient
        (once the batches taken before it are finished)."""
        if stop_event is not None:
            self._stopping = stop_event
        s = self.settings
        if s.prompts_file is None and not s.prompts_topic:
            raise WorkerError("no prompt source: set prompts_file (--prompts) or prompts_topic (--prompts-topic)")
        self.start()
        source: PromptSource
        if s.prompts_topic:
            source = TopicPrompts(s.kafka, self._skip, self._retry.failed, self.metrics.rejected_records)
        else:
            source = FilePrompts(self._file_prompts, s.passes, s.shuffle, s.seed)
        run = self._new_run(collect=False)
        try:
            with run.flow:
                try:
                    while not self._done() and not run.failing():
                        if self._make_room(run, s.max_rollouts):
                            continue
                        # Before taking prompts, so none are held uncommitted while waiting.
                        self._wait_for_trainer(run)
                        batch = source.next_batch(self._batch_limit(run))
                        if batch is None:
                            break
                        self._take(run, batch.prompts, batch.acknowledge)
                except WorkerStopped as err:
                    log.warning("stopped while waiting: %s", err)
                finally:
                    self._drain(run)
        finally:
            source.close()
        if run.failure is not None and not isinstance(run.failure, WorkerStopped):
            raise run.failure
        return self.stats

    def run_once(self, prompts: Iterable[Prompt | str | Mapping[str, Any]]) -> list[rollout_pb2.Rollout]:
        """Rollouts of these prompts (prompts_per_call per Generate call,
        pipelined like ``run``), produced and acknowledged before this returns."""
        self.start()
        items = as_prompts(prompts)
        per_call = self.settings.prompts_per_call
        run = self._new_run(collect=True)
        with run.flow:
            try:
                for i in range(0, len(items), per_call):
                    while self._make_room(run, None):
                        pass
                    if run.failing():
                        break
                    self._wait_for_trainer(run)
                    self._take(run, items[i:i + per_call], _nothing_to_commit)
            finally:
                self._drain(run)
        if run.failure is not None:
            raise run.failure
        return run.collected

    def _new_run(self, collect: bool) -> _Run:
        flow: InFlight[_Finished, _Finished] = InFlight(self.settings.pipeline_depth, self._prepare, self._produce)
        return _Run(flow, [] if collect else None)

    def _done(self) -> bool:
        limit = self.settings.max_rollouts
        return self._stopping.is_set() or (limit is not None and self.stats.rollouts >= limit)

    def _make_room(self, run: _Run, max_rollouts: int | None) -> bool:
        """Settles the batches that are done; when ``pipeline_depth`` batches
        are in flight (or those in flight may already reach ``max_rollouts``),
        waits for the oldest first. True if it waited."""
        flow = run.flow
        full = len(flow) >= flow.depth or (
            max_rollouts is not None and self.stats.rollouts + flow.generated() >= max_rollouts
        )
        if not full or not len(flow):
            self._settle(run)
            return False
        started = time.perf_counter()
        self._settle(run, block=True)
        self.metrics.pipeline_wait_seconds.inc(time.perf_counter() - started)
        return True

    def _batch_limit(self, run: _Run) -> int:
        """Prompts for the next call: fewer near max_rollouts or the staleness
        budget (counting what the batches in flight generated), never a split group."""
        s = self.settings
        limit = s.prompts_per_call
        remaining = []
        if s.max_rollouts is not None:
            remaining.append(s.max_rollouts - self.stats.rollouts - run.flow.generated())
        if self._budget is not None:
            remaining.append(self._room)  # as _wait_for_trainer just found it
        for left in remaining:
            limit = min(limit, math.ceil(max(left, 1) / s.samples_per_prompt))
        return max(1, limit)

    def _over_budget(self, run: _Run) -> bool:
        """The staleness budget is spent."""
        if self._budget is None:
            return False
        # A batch in flight counts until settled, even once written (conservative).
        self._room = self._budget.room(self.pipeline.sink.written_to(), run.flow.generated())
        self.metrics.staleness_budget.set(max(self._room, 0))
        return self._room <= 0

    def _observe_versions(self, versions: Iterable[str]) -> None:
        """The trainer's progress, from the versions just sampled on."""
        if self._budget is None or self._steps is None:
            return
        for version in versions:
            progress = self._steps.progress(version)
            if progress is not None and progress.settled is None and progress.step > (self._budget.step or -1):
                # A trainer from before PolicyUpdate.rollouts_settled: its
                # group's committed offsets, or the budget would never refill.
                try:
                    committed = group_offsets(self.settings.kafka, topics.TRAINER_GROUP, topics.ROLLOUTS)
                except StreamError as err:
                    log.warning("staleness budget: the trainer's committed offsets: %s", err)
                else:
                    progress = VersionProgress(progress.step, committed)
            if self._budget.observe(progress):
                self.metrics.trainer_step.set(self._budget.step)

    def _wait_for_trainer(self, run: _Run) -> None:
        """With max_staleness: while the budget is spent (rollouts produced
        plus samples in flight), wait until the policy serves a version of a
        later training step. The batches in flight are settled meanwhile."""
        if not self._over_budget(run):
            return
        s = self.settings
        log.info("%d rollouts ahead of training (bound %d) at trainer step %s: waiting for a newer policy version",
                 self._budget.limit - self._room, self._budget.limit, self._budget.step)
        started = time.monotonic()
        self.metrics.waiting_for_policy.set(1)
        policy = self.pipeline.policy
        try:
            while True:
                self._settle(run)
                # Some samples in flight were skipped, or a batch failed (its
                # rollouts, which the trainer may be waiting for, will not come).
                if not self._over_budget(run) or run.failing():
                    return
                try:
                    active = self._retry.call("wait_for_policy", lambda: policy.info().version)
                except grpc.RpcError as err:
                    raise fatal("wait_for_policy", err) from None
                # A version the policy-updates reader has not seen yet is
                # looked up again on the next poll.
                self._observe_versions([active])
                if not self._over_budget(run):
                    log.info("policy serves %s of trainer step %s (waited %.1fs)", active, self._budget.step,
                             time.monotonic() - started)
                    return
                if self._stopping.wait(s.version_poll_s):
                    raise WorkerStopped("waiting for a new policy version")
        finally:
            self.metrics.waiting_for_policy.set(0)
            self.metrics.policy_wait_seconds.inc(time.monotonic() - started)

    # -- one batch ------------------------------------------------------

    def _take(self, run: _Run, prompts: Sequence[Prompt], acknowledge: Callable[[], None]) -> None:
        """Generates ``prompts`` here, then hands the batch to the pipeline:
        scoring, reference log-probs and produce run beside the next generation."""
        batch = run.flow.new_batch(list(prompts), acknowledge)
        if batch.prompts:
            try:
                batch.generations = self._timed(self.pipeline.generate, batch.prompts, batch.number)
            except (WorkerError, WorkerStopped) as err:
                run.flow.add_failed(batch, err)
                return
        # Its samples count against the budget from now on (flow.generated()).
        self._observe_versions(batch.versions())
        run.flow.submit(batch)
        self.metrics.batches_in_flight.set(len(run.flow))

    def _prepare(self, batch: Batch) -> _Finished:
        """Scores and reference log-probs at once (independent calls), then the
        Rollouts. With pipeline_depth 1, one call after the other as before
        pipelining: the reference only for the samples the reward scored."""
        generations = batch.generations
        if not generations:
            return _Finished([], [])
        p = self.pipeline
        if self.settings.pipeline_depth == 1:
            rewards = self._timed(p.score, generations, batch.number)
            scored = [i for i, reward in enumerate(rewards) if reward is not None]
            references: list[ReferenceLogProbs | None] = [None] * len(generations)
            answers = self._timed(p.logprobs, [generations[i] for i in scored], batch.number)
            for i, answer in zip(scored, answers, strict=True):
                references[i] = answer
        else:
            references_call = p.references.submit(self._timed, p.logprobs, generations, batch.number)
            try:
                rewards = self._timed(p.score, generations, batch.number)
            finally:
                wait([references_call])
            references = references_call.result()
        rollouts, skipped = [], []
        for g, reward, reference in zip(generations, rewards, references, strict=True):
            if reward is None:
                skipped.append(p.score.skip_reason)
            elif reference is None:
                skipped.append(p.logprobs.skip_reason)
            else:
                gold = self._gold(g.sample.text) if self._gold else None
                rollouts.append(build_rollout(g, reward, reference, self.settings.worker_id, gold))
        # A prompt's samples are generated, scored and produced in this one batch, so its group is complete here.
        sizes = Counter(r.group_id for r in rollouts)
        for r in rollouts:
            r.group_size = sizes[r.group_id]
        return _Finished(rollouts, skipped)

    def _produce(self, batch: Batch, finished: _Finished) -> _Finished:
        self._timed(self.pipeline.sink, finished.rollouts, batch.number)
        return finished

    def _settle(self, run: _Run, block: bool = False) -> None:
        """Counts and commits the batches that are done, oldest first (with
        ``block``, waiting for the oldest)."""
        for batch, done in run.flow.finished(block):
            error = done.exception()
            if error is None:
                self._settle_produced(run, batch, done.result())
            else:
                self._settle_dropped(run, batch, error)
        self.metrics.batches_in_flight.set(len(run.flow))

    def _settle_produced(self, run: _Run, batch: Batch, finished: _Finished) -> None:
        for reason in finished.skipped:
            self._skip(reason)
        rollouts = finished.rollouts
        if run.collected is not None:
            run.collected.extend(rollouts)
        self._observe(rollouts)
        if not batch.prompts:
            batch.acknowledge()
            return
        self._observer.stage_started(batch.number, "commit")
        try:
            batch.acknowledge()
        finally:
            self._observer.stage_finished(batch.number, "commit")
        elapsed = time.perf_counter() - batch.started
        self.metrics.batch_seconds.observe(elapsed)
        self.metrics.prompts.inc(len(batch.prompts))
        self.stats.batches += 1
        self.stats.prompts += len(batch.prompts)
        if rollouts:
            log.info(
                "batch %d of %d prompts: %d rollouts (policy %s, mean reward %.4f) in %.2fs", batch.number,
                len(batch.prompts), len(rollouts), rollouts[-1].policy_version,
                sum(r.reward for r in rollouts) / len(rollouts), elapsed,
            )
        else:
            log.info("batch %d of %d prompts: no rollouts (all skipped) in %.2fs", batch.number, len(batch.prompts),
                     elapsed)

    def _settle_dropped(self, run: _Run, batch: Batch, error: BaseException) -> None:
        """Not produced, not committed: the prompts topic hands its prompts out again."""
        self.metrics.batches_dropped.inc()
        self.stats.dropped += 1
        if isinstance(error, Dropped):
            log.warning("batch %d of %d prompts dropped uncommitted: %s", batch.number, len(batch.prompts), error)
            return
        if isinstance(error, WorkerStopped):
            log.warning("stopped while the %s stage was waiting for a retry; batch %d was not produced", error,
                        batch.number)
        else:
            log.error("batch %d of %d prompts failed: %s", batch.number, len(batch.prompts), error)
        if run.failure is None:
            run.failure = error

    def _drain(self, run: _Run) -> None:
        if len(run.flow):
            log.info("finishing %d batch(es) in flight", len(run.flow))
        while len(run.flow):
            self._settle(run, block=True)

    def _timed(self, stage: _Stage[In, Out], items: Sequence[In], batch: int) -> list[Out]:
        """``stage(items)``, its wall time (retries included) counted under its
        name and its start and end told to the observer."""
        if not items:
            return []
        self._observer.stage_started(batch, stage.name)
        try:
            with self.metrics.stage_seconds.labels(stage.name).time():
                return stage(items)
        finally:
            self._observer.stage_finished(batch, stage.name)

    def _observe(self, rollouts: Sequence[rollout_pb2.Rollout]) -> None:
        if not rollouts:
            return
        m = self.metrics
        m.rollouts.inc(len(rollouts))
        self.stats.rollouts += len(rollouts)
        for r in rollouts:
            m.response_length.observe(len(r.completion_token_ids))
        m.reward_mean.set(sum(r.reward for r in rollouts) / len(rollouts))
        gold = [r.gold_score for r in rollouts if r.HasField("gold_score")]
        if gold:
            m.gold_score_mean.set(sum(gold) / len(gold))
        m.on_policy_version(rollouts[-1].policy_version)

    def _skip(self, reason: str) -> None:
        self.metrics.skipped.labels(reason).inc()
        self.stats.skipped += 1


def _nothing_to_commit() -> None:
    pass


@dataclass(frozen=True)
class _Finished:
    """A batch's rollouts, and the reasons of the samples it skipped after generation."""

    rollouts: list[rollout_pb2.Rollout]
    skipped: list[str]


@dataclass
class _Run:
    """One ``run`` or ``run_once``: its batches in flight and how it ended."""

    flow: InFlight[_Finished, _Finished]
    # run_once's rollouts, in the order of its prompts.
    collected: list[rollout_pb2.Rollout] | None
    # The first batch that failed or was abandoned (not one dropped after it).
    failure: BaseException | None = None

    def failing(self) -> bool:
        """A batch failed: take no more."""
        return self.failure is not None or self.flow.failed()
