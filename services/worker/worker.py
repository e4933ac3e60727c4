"""The rollout worker, a pipeline over the typed service clients:

    prompt source (a JSON-lines file or the prompts topic; ``prompts.py``)
      -> generate   PolicyService.Generate            (``stages.py``)
      -> score      RewardService.Score               (``stages.py``)
      -> reference  ReferenceService.LogProbs         (``stages.py``)
      -> sink       one ``Rollout`` per sample on the rollouts topic, keyed by
                    prompt id (acks=all, idempotent producer; ``sink.py``)

``RolloutWorker`` wires the stages, owns their lifecycle and ``stop``, and
keeps the budgets (``max_rollouts``, ``max_rollouts_per_version``).

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
  the worker with ``WorkerError``: retrying would not fix it;
- samples with an empty completion are skipped and counted (the reward and
  reference services refuse them);
- records the brokers do not acknowledge are re-sent (same rollout_id).

Each stage's failed attempts and time are counted under its own name
(``arbiter_worker_errors_total`` / ``arbiter_worker_stage_seconds`` by ``stage``).

Staleness: with ``max_rollouts_per_version`` the worker stops generating once
that many rollouts came from the serving policy version, and resumes when the
policy serves a newer one (the trainer's next PolicyUpdate), so rollouts are
never more than about one version behind.

Delivery: a prompt-topic offset is committed only after all rollouts of its
batch were acknowledged, so a crash re-processes the batch (at-least-once).
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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from http.server import HTTPServer
from typing import Any, Protocol, TypeVar

import grpc
from prometheus_client import CollectorRegistry, start_http_server

from arbiter.policy.types import SamplingParams
from arbiter.prompts import as_prompts, read_prompts
from arbiter.stream import StreamError, ensure_topics, list_topics, topics
from arbiter.types import Prompt
from arbiter.v1 import common_pb2, rollout_pb2
from services.common.client import ModelServiceClient
from services.common.metrics import stop_metrics_endpoint
from services.common.pairing import TokenizerMismatch
from services.policy.client import PolicyClient
from services.reference.client import ReferenceClient
from services.reward.client import RewardClient
from services.worker.gold import make_gold_scorer
from services.worker.metrics import WorkerMetrics
from services.worker.prompts import FilePrompts, PromptSource, TopicPrompts
from services.worker.retry import StageRetry, WorkerError, WorkerStopped, describe, fatal
from services.worker.settings import WorkerSettings
from services.worker.sink import RolloutSink, build_rollout
from services.worker.stages import GenerateStage, ReferenceStage, ScoreStage

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

    def close(self) -> None:
        self.sink.close()
        for client in (self.policy, self.reward, self.reference):
            client.close()


class RolloutWorker:
    """``RolloutWorker(settings).run(stop_event)`` until stopped, out of prompts
    or at ``max_rollouts``; or ``run_once(prompts)`` for one set of prompts.
    ``start()`` (implicit in both) connects and checks the services; use the
    worker as a context manager, or ``close()`` it."""

    def __init__(self, settings: WorkerSettings, registry: CollectorRegistry | None = None):
        self.settings = settings
        self.registry = registry or CollectorRegistry()
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
        # Rollouts produced per policy version, and the version of the last batch.
        self._per_version: dict[str, int] = {}
        self._last_version: str | None = None

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
            if s.metrics_port is not None:
                self._metrics_httpd, _ = start_http_server(s.metrics_port, addr=s.metrics_host, registry=self.registry)
                self.metrics_port = self._metrics_httpd.server_port
        except BaseException:
            self.close()
            raise
        return self

    def stop(self) -> None:
        """Ask ``run`` to return after the batch in progress (a batch waiting on
        a retry is abandoned: with the prompts topic it is processed again)."""
        self._stopping.set()

    def close(self) -> None:
        if self._pipeline is not None:
            self._pipeline.close()
            self._pipeline = None
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
        return Pipeline(
            policy, reward, reference,
            generate=GenerateStage(self._retry, self._skip, policy, sampling, tokenizer_fingerprint=fingerprint),
            score=ScoreStage(self._retry, self._skip, reward, s.reward_truncation, normalize=normalize),
            logprobs=ReferenceStage(self._retry, self._skip, reference),
            sink=RolloutSink(s.kafka, self.metrics, self._retry),
            tokenizer_fingerprint=fingerprint,
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
        needed = [topics.ROLLOUTS] + ([topics.PROMPTS] if s.prompts_topic else [])
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
        passes are done, or ``max_rollouts`` is reached. Raises WorkerError
        when a failure is not transient."""
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
        try:
            while not self._done():
                # Before taking prompts, so none are held uncommitted while waiting.
                self._wait_for_new_policy()
                batch = source.next_batch(self._batch_limit())
                if batch is None:
                    break
                if batch.prompts:
                    self._run_batch(batch.prompts)
                batch.acknowledge()
        except WorkerStopped as err:
            log.warning("stopped while the %s stage was waiting for a retry; its batch was not produced", err)
        finally:
            source.close()
        return self.stats

    def run_once(self, prompts: Iterable[Prompt | str | Mapping[str, Any]]) -> list[rollout_pb2.Rollout]:
        """Rollouts of these prompts (prompts_per_call per Generate call),
        produced and acknowledged before this returns."""
        self.start()
        items = as_prompts(prompts)
        out: list[rollout_pb2.Rollout] = []
        per_call = self.settings.prompts_per_call
        for i in range(0, len(items), per_call):
            out.extend(self._run_batch(items[i:i + per_call]))
        return out

    def _done(self) -> bool:
        limit = self.settings.max_rollouts
        return self._stopping.is_set() or (limit is not None and self.stats.rollouts >= limit)

    def _batch_limit(self) -> int:
        """Prompts for the next call: fewer near max_rollouts or the per-version
        budget, never a split group."""
        s = self.settings
        limit = s.prompts_per_call
        remaining = []
        if s.max_rollouts is not None:
            remaining.append(s.max_rollouts - self.stats.rollouts)
        if s.max_rollouts_per_version is not None and self._last_version is not None:
            remaining.append(s.max_rollouts_per_version - self._per_version.get(self._last_version, 0))
        for left in remaining:
            limit = min(limit, math.ceil(max(left, 1) / s.samples_per_prompt))
        return max(1, limit)

    def _wait_for_new_policy(self) -> None:
        """With max_rollouts_per_version: once the last batch's version has its
        budget, wait until the policy's active version is another one."""
        s = self.settings
        budget, version = s.max_rollouts_per_version, self._last_version
        if budget is None or version is None or self._per_version.get(version, 0) < budget:
            return
        log.info("%d rollouts from policy %s: waiting for a newer version", self._per_version[version], version)
        started = time.monotonic()
        self.metrics.waiting_for_policy.set(1)
        policy = self.pipeline.policy
        try:
            while True:
                try:
                    active = self._retry.call("wait_for_policy", lambda: policy.info().version)
                except grpc.RpcError as err:
                    raise fatal("wait_for_policy", err) from None
                if active != version:
                    log.info("policy now serves %s (waited %.1fs)", active, time.monotonic() - started)
                    self._last_version = active
                    return
                if self._stopping.wait(s.version_poll_s):
                    raise WorkerStopped("waiting for a new policy version")
        finally:
            self.metrics.waiting_for_policy.set(0)
            self.metrics.policy_wait_seconds.inc(time.monotonic() - started)

    # -- one batch ------------------------------------------------------

    def _run_batch(self, prompts: Sequence[Prompt]) -> list[rollout_pb2.Rollout]:
        self._wait_for_new_policy()
        p = self.pipeline
        started = time.perf_counter()
        generations = self._timed(p.generate, prompts)
        rewards = self._timed(p.score, generations)
        scored = [(g, r) for g, r in zip(generations, rewards) if r is not None]
        references = self._timed(p.logprobs, [g for g, _ in scored])
        rollouts = [
            build_rollout(g, r, ref, self.settings.worker_id, self._gold(g.sample.text) if self._gold else None)
            for (g, r), ref in zip(scored, references)
            if ref is not None
        ]
        rollouts = self._timed(p.sink, rollouts)
        elapsed = time.perf_counter() - started
        self.metrics.batch_seconds.observe(elapsed)
        self.metrics.prompts.inc(len(prompts))
        self.stats.batches += 1
        self.stats.prompts += len(prompts)
        self._observe(rollouts)
        if rollouts:
            log.info(
                "batch of %d prompts: %d rollouts (policy %s, mean reward %.4f) in %.2fs", len(prompts), len(rollouts),
                rollouts[-1].policy_version, sum(r.reward for r in rollouts) / len(rollouts), elapsed,
            )
        else:
            log.info("batch of %d prompts: no rollouts (all skipped) in %.2fs", len(prompts), elapsed)
        return rollouts

    def _timed(self, stage: _Stage[In, Out], items: Sequence[In]) -> list[Out]:
        """``stage(items)``, its wall time (retries included) counted under its name."""
        if not items:
            return []
        with self.metrics.stage_seconds.labels(stage.name).time():
            return stage(items)

    def _observe(self, rollouts: Sequence[rollout_pb2.Rollout]) -> None:
        if not rollouts:
            return
        m = self.metrics
        m.rollouts.inc(len(rollouts))
        self.stats.rollouts += len(rollouts)
        for r in rollouts:
            self._per_version[r.policy_version] = self._per_version.get(r.policy_version, 0) + 1
        self._last_version = rollouts[-1].policy_version
        if len(self._per_version) > 16:  # only recent versions matter
            self._per_version = {self._last_version: self._per_version[self._last_version]}
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
