"""The rollout worker: prompts -> ``PolicyService.Generate`` -> ``RewardService.Score``
and ``ReferenceService.LogProbs`` -> one ``Rollout`` per sample on the rollouts
topic, keyed by prompt id (acks=all, idempotent producer).

Run several at once: they share nothing but the topics. With the prompts
topic they split its partitions (group ``ROLLOUT_WORKERS_GROUP``); with a file
each reads the whole file (give each a different ``seed``).

Failure handling, by stage:

- transient RPC failures (UNAVAILABLE, DEADLINE_EXCEEDED, ABORTED) left after
  the channel's own retries: the stage is retried with backoff until it works
  or the worker is stopped, so a restarting service delays rollouts but loses
  none (a retried Generate reuses its request, seed included);
- INVALID_ARGUMENT for a batch: its items are retried one by one and the ones
  refused on their own are skipped, logged and counted (``samples_skipped``);
- anything else (a tokenizer mismatch after a swap, auth, a server bug) stops
  the worker with ``WorkerError``: retrying would not fix it;
- samples with an empty completion are skipped and counted (the reward and
  reference services refuse them);
- records the brokers do not acknowledge are re-sent (same rollout_id).

Staleness: with ``max_rollouts_per_version`` the worker stops generating once
that many rollouts came from the serving policy version, and resumes when the
policy serves a newer one (the trainer's next PolicyUpdate), so rollouts are
never more than about one version behind.

Delivery: a prompt-topic offset is committed only after all rollouts of its
batch were acknowledged, so a crash re-processes the batch (at-least-once).
Re-processing samples anew under fresh rollout_ids: for RL that is just more
on-policy data, and the trainer's dedupe by rollout_id only needs to catch
producer re-sends, which reuse the id.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from prometheus_client import CollectorRegistry, start_http_server

from arbiter.stream import (
    CommitError,
    ProduceError,
    ProducerObserver,
    StreamConsumer,
    StreamError,
    StreamProducer,
    codec,
    ensure_topics,
    list_topics,
    topics,
)
from arbiter.v1 import (
    common_pb2,
    common_pb2_grpc,
    policy_pb2,
    policy_pb2_grpc,
    reference_pb2,
    reference_pb2_grpc,
    reward_pb2,
    reward_pb2_grpc,
    rollout_pb2,
)
from services.common.client import call_credentials_metadata, channel_options
from services.common.pairing import TokenizerMismatch, check_tokenizer_pair
from services.worker.gold import make_gold_scorer
from services.worker.metrics import WorkerMetrics
from services.worker.prompts import PromptError, PromptItem, as_prompt_items, load_prompts, prompt_from_record
from services.worker.settings import WorkerSettings

log = logging.getLogger(__name__)

T = TypeVar("T")

TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED})

_MODEL_SERVICE = common_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name
_SERVICES = {
    "policy": (policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name, _MODEL_SERVICE),
    "reward": (reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name, _MODEL_SERVICE),
    "reference": (reference_pb2.DESCRIPTOR.services_by_name["ReferenceService"].full_name, _MODEL_SERVICE),
}
_TRUNCATION = {
    "reject": common_pb2.TRUNCATION_REJECT,
    "left": common_pb2.TRUNCATION_LEFT,
    "right": common_pb2.TRUNCATION_RIGHT,
}
_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class WorkerError(RuntimeError):
    """The worker cannot go on (or start); the message says what to fix."""


class WorkerStopped(Exception):
    """Stop was requested while a stage was waiting to be retried."""


@dataclass
class WorkerStats:
    batches: int = 0
    prompts: int = 0
    rollouts: int = 0
    skipped: int = 0


@dataclass
class _Pending:
    """A generated sample on its way to becoming a Rollout."""

    item: PromptItem
    sample: policy_pb2.Sample
    group_id: str
    tokenizer_fingerprint: str
    reward: tuple[float, float, str] | None = None  # raw, normalized, RM version
    reference: tuple[list[float], str] | None = None  # log-probs, reference version


def _describe_sample(p: _Pending) -> str:
    return f"sample {p.sample.sample_index} of prompt {p.item.prompt_id!r}"


class _CountingObserver(ProducerObserver):
    def __init__(self, metrics: WorkerMetrics):
        self._metrics = metrics

    def on_failed(self, topic: str, error: BaseException) -> None:
        self._metrics.produce_errors.inc()


@dataclass
class _Clients:
    channels: list[grpc.Channel] = field(default_factory=list)
    policy: Any = None
    policy_models: Any = None
    reward: Any = None
    reward_models: Any = None
    reference: Any = None
    reference_models: Any = None

    def close(self) -> None:
        for channel in self.channels:
            channel.close()


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
        self.tokenizer_fingerprint = ""
        self.metrics_port: int | None = None
        self._stopping = threading.Event()
        self._started = False
        self._clients = _Clients()
        self._producer: StreamProducer | None = None
        self._metrics_httpd = None
        self._file_prompts: list[PromptItem] = []
        self._gold: Callable[[str], float] | None = None
        self._normalize = False
        self._generate_calls = 0
        # Rollouts produced per policy version, and the version of the last batch.
        self._per_version: dict[str, int] = {}
        self._last_version: str | None = None
        self._metadata = call_credentials_metadata(settings.auth_token)

    # -- lifecycle ------------------------------------------------------

    def start(self) -> RolloutWorker:
        """Reads the prompts file, connects, and refuses to run against a
        reference whose tokenizer differs from the policy's. Idempotent."""
        if self._started:
            return self
        s = self.settings
        # Before any connection: a bad line is reported at once.
        if s.prompts_file is not None:
            self._file_prompts = load_prompts(s.prompts_file)
        if s.gold:
            self._gold = make_gold_scorer(s.gold)
        try:
            self._connect()
            self._check_topics()
            self._producer = StreamProducer(s.kafka, _CountingObserver(self.metrics))
            if s.metrics_port is not None:
                self._metrics_httpd, _ = start_http_server(s.metrics_port, addr=s.metrics_host, registry=self.registry)
                self.metrics_port = self._metrics_httpd.server_port
        except BaseException:
            self.close()
            raise
        self._started = True
        return self

    def stop(self) -> None:
        """Ask ``run`` to return after the batch in progress (a batch waiting on
        a retry is abandoned: with the prompts topic it is processed again)."""
        self._stopping.set()

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close()
            self._producer = None
        self._clients.close()
        self._clients = _Clients()
        if self._metrics_httpd is not None:
            self._metrics_httpd.shutdown()
            self._metrics_httpd.server_close()
            self._metrics_httpd = None
        self._started = False

    def __enter__(self) -> RolloutWorker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _channel(self, target: str, role: str) -> grpc.Channel:
        s = self.settings
        options = channel_options(_SERVICES[role], s.rpc_timeout_s, _MAX_MESSAGE_BYTES) + [
            # gRPC's default reconnect backoff grows to 120 s: a service back
            # after a restart would sit unused for up to two minutes.
            ("grpc.initial_reconnect_backoff_ms", int(s.retry_initial_backoff_s * 1000)),
            ("grpc.min_reconnect_backoff_ms", int(s.retry_initial_backoff_s * 1000)),
            ("grpc.max_reconnect_backoff_ms", int(s.retry_max_backoff_s * 1000)),
        ]
        if s.tls_ca_file:
            with open(s.tls_ca_file, "rb") as fh:
                creds = grpc.ssl_channel_credentials(root_certificates=fh.read())
            channel = grpc.secure_channel(target, creds, options=options)
        else:
            channel = grpc.insecure_channel(target, options=options)
        self._clients.channels.append(channel)
        return channel

    def _connect(self) -> None:
        s = self.settings
        c = self._clients
        policy = self._channel(s.policy_target, "policy")
        reward = self._channel(s.reward_target, "reward")
        reference = self._channel(s.reference_target, "reference")
        c.policy, c.policy_models = policy_pb2_grpc.PolicyServiceStub(policy), common_pb2_grpc.ModelServiceStub(policy)
        c.reward, c.reward_models = reward_pb2_grpc.RewardServiceStub(reward), common_pb2_grpc.ModelServiceStub(reward)
        c.reference = reference_pb2_grpc.ReferenceServiceStub(reference)
        c.reference_models = common_pb2_grpc.ModelServiceStub(reference)
        deadline = time.monotonic() + s.connect_timeout_s
        infos = {
            role: self._wait_for_info(role, target, stub, deadline)
            for role, target, stub in (
                ("policy", s.policy_target, c.policy_models),
                ("reward", s.reward_target, c.reward_models),
                ("reference", s.reference_target, c.reference_models),
            )
        }
        try:
            self.tokenizer_fingerprint = check_tokenizer_pair(infos["policy"], infos["reference"])
        except TokenizerMismatch as err:
            raise WorkerError(f"refusing to start: {err}") from None
        self._normalize = infos["reward"].HasField("normalization")
        log.info(
            "worker %s: policy %s %s, reward %s %s (%s), reference %s %s; tokenizer %s...",
            s.worker_id, infos["policy"].name, infos["policy"].version, infos["reward"].name,
            infos["reward"].version, "normalized" if self._normalize else "raw scores only",
            infos["reference"].name, infos["reference"].version, self.tokenizer_fingerprint[:12],
        )

    def _wait_for_info(self, role: str, target: str, stub, deadline: float) -> common_pb2.ModelInfo:
        """The service's active ModelInfo, waiting for it to come up (a worker
        may start before the services it calls)."""
        while True:
            remaining = deadline - time.monotonic()
            try:
                info = stub.GetModelInfo(
                    common_pb2.GetModelInfoRequest(), timeout=max(remaining, 0.1), metadata=self._metadata,
                    wait_for_ready=True,
                ).info
                break
            except grpc.RpcError as err:
                self.metrics.errors.labels("connect").inc()
                if err.code() not in TRANSIENT or time.monotonic() >= deadline:
                    raise WorkerError(
                        f"the {role} service at {target} did not answer within {self.settings.connect_timeout_s}s: "
                        f"{err.code().name}: {err.details()}"
                    ) from None
        if info.kind and info.kind != role:
            raise WorkerError(f"the service at {target} serves a {info.kind!r} model, expected the {role} service")
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
        if self.settings.prompts_file is None and not self.settings.prompts_topic:
            raise WorkerError("no prompt source: set prompts_file (--prompts) or prompts_topic (--prompts-topic)")
        self.start()
        try:
            if self.settings.prompts_topic:
                self._run_topic()
            else:
                self._run_file()
        except WorkerStopped as err:
            log.warning("stopped while the %s stage was waiting for a retry; its batch was not produced", err)
        return self.stats

    def run_once(self, prompts: Iterable[PromptItem | str | Mapping[str, Any]]) -> list[rollout_pb2.Rollout]:
        """Rollouts of these prompts (prompts_per_call per Generate call),
        produced and acknowledged before this returns."""
        self.start()
        items = as_prompt_items(prompts)
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
        request = common_pb2.GetModelInfoRequest()
        try:
            while True:
                try:
                    active = self._retrying("generate", lambda: self._clients.policy_models.GetModelInfo(
                        request, timeout=s.rpc_timeout_s, metadata=self._metadata
                    ).info.version)
                except grpc.RpcError as err:
                    raise self._fatal("generate", err) from None
                if active != version:
                    log.info("policy now serves %s (waited %.1fs)", active, time.monotonic() - started)
                    self._last_version = active
                    return
                if self._stopping.wait(s.version_poll_s):
                    raise WorkerStopped("waiting for a new policy version")
        finally:
            self.metrics.waiting_for_policy.set(0)
            self.metrics.policy_wait_seconds.inc(time.monotonic() - started)

    def _run_file(self) -> None:
        s = self.settings
        rng = random.Random(s.seed)
        passes = 0
        while not self._done() and (s.passes == 0 or passes < s.passes):
            order = list(self._file_prompts)
            if s.shuffle:
                rng.shuffle(order)
            position = 0
            while position < len(order) and not self._done():
                self._wait_for_new_policy()
                take = self._batch_limit()
                self._run_batch(order[position:position + take])
                position += take
            passes += 1

    def _run_topic(self) -> None:
        s = self.settings
        try:
            consumer = StreamConsumer(s.kafka, [topics.PROMPTS], topics.ROLLOUT_WORKERS_GROUP, skip_invalid=True)
        except StreamError as err:
            raise WorkerError(f"kafka: cannot consume the prompts topic: {err}") from None
        try:
            while not self._done():
                # Before polling: prompts are not held uncommitted while waiting.
                self._wait_for_new_policy()
                batch = consumer.poll(timeout_s=0.5, max_records=self._batch_limit())
                if not batch.records and not batch.rejected:
                    continue
                items = []
                for _ in batch.rejected:  # the consumer logged each
                    self._skip("invalid_prompt_record")
                for record in batch.records:
                    where = f"{record.topic}[{record.partition}]@{record.offset}"
                    try:
                        items.append(prompt_from_record(record.message, where))
                    except PromptError as err:
                        log.warning("skipping prompt record: %s", err)
                        self._skip("invalid_prompt_record")
                if items:
                    self._run_batch(items)
                # Only now: every rollout of these prompts is acknowledged.
                try:
                    consumer.commit(batch.next_offsets())
                except CommitError as err:
                    self.metrics.errors.labels("commit").inc()
                    log.warning("%s; the partition's next owner processes these prompts again", err)
        finally:
            consumer.close()

    # -- one batch ------------------------------------------------------

    def _run_batch(self, items: Sequence[PromptItem]) -> list[rollout_pb2.Rollout]:
        self._wait_for_new_policy()
        started = time.perf_counter()
        pending = self._generate(items)
        scored = [p for p in self._score(pending) if p.reward is not None] if pending else []
        done = [p for p in self._reference(scored) if p.reference is not None] if scored else []
        rollouts = [self._rollout(p) for p in done]
        if rollouts:
            with self._stage("produce"):
                self._produce(rollouts)
        elapsed = time.perf_counter() - started
        self.metrics.batch_seconds.observe(elapsed)
        self.metrics.prompts.inc(len(items))
        self.stats.batches += 1
        self.stats.prompts += len(items)
        self._observe(rollouts)
        if rollouts:
            log.info(
                "batch of %d prompts: %d rollouts (policy %s, mean reward %.4f) in %.2fs", len(items), len(rollouts),
                rollouts[-1].policy_version, sum(r.reward for r in rollouts) / len(rollouts), elapsed,
            )
        else:
            log.info("batch of %d prompts: no rollouts (all skipped) in %.2fs", len(items), elapsed)
        return rollouts

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

    def _skip(self, reason: str, count: int = 1) -> None:
        self.metrics.skipped.labels(reason).inc(count)
        self.stats.skipped += count

    def _stage(self, stage: str):
        return self.metrics.stage_seconds.labels(stage).time()

    # -- stages ---------------------------------------------------------

    def _retrying(self, stage: str, call: Callable[[], T]) -> T:
        """``call()``, retried with backoff while it fails transiently."""
        s = self.settings
        delay, attempt = s.retry_initial_backoff_s, 1
        while True:
            try:
                return call()
            except grpc.RpcError as err:
                self.metrics.errors.labels(stage).inc()
                if err.code() not in TRANSIENT:
                    raise
                log.warning(
                    "%s failed (attempt %d): %s: %s; retrying in %.1fs",
                    stage, attempt, err.code().name, err.details(), delay,
                )
            if self._stopping.wait(delay):
                raise WorkerStopped(stage)
            delay, attempt = min(delay * 2, s.retry_max_backoff_s), attempt + 1

    def _each_or_skip(
        self, stage: str, items: Sequence[T], prepare: Callable[[Sequence[T]], Callable[[], list]],
        skip_reason: str, describe: Callable[[T], str],
    ) -> list:
        """One result per item. ``prepare(batch)`` builds the request once and
        returns the call that sends it (so a retry resends the same request).
        If the batch is refused as INVALID_ARGUMENT, each item goes alone and
        the ones refused on their own get None (skipped, logged, counted)."""
        try:
            return self._retrying(stage, prepare(items))
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise self._fatal(stage, err) from None
            if len(items) == 1:
                log.warning("%s refused %s: %s; skipping it", stage, describe(items[0]), err.details())
                self._skip(skip_reason)
                return [None]
            log.warning("%s refused a batch of %d (%s); retrying one by one", stage, len(items), err.details())
        results = []
        for item in items:
            try:
                results.extend(self._retrying(stage, prepare([item])))
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    raise self._fatal(stage, err) from None
                log.warning("%s refused %s: %s; skipping it", stage, describe(item), err.details())
                self._skip(skip_reason)
                results.append(None)
        return results

    @staticmethod
    def _fatal(stage: str, err: grpc.RpcError) -> WorkerError:
        return WorkerError(f"{stage} failed and retrying cannot fix it: {err.code().name}: {err.details()}")

    def _sampling(self) -> policy_pb2.SamplingParams:
        s = self.settings
        params = policy_pb2.SamplingParams(
            max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
            n=s.samples_per_prompt, stop=list(s.stop),
        )
        if s.seed is not None:
            params.seed = s.seed + self._generate_calls
        self._generate_calls += 1
        return params

    def _generate(self, items: Sequence[PromptItem]) -> list[_Pending]:
        n = self.settings.samples_per_prompt

        def prepare(batch: Sequence[PromptItem]) -> Callable[[], list[tuple[list[policy_pb2.Sample], str]]]:
            request = policy_pb2.GenerateRequest(
                prompts=[item.policy_input() for item in batch], sampling=self._sampling()
            )

            def send():
                response = self._clients.policy.Generate(
                    request, timeout=self.settings.rpc_timeout_s, metadata=self._metadata
                )
                groups: list[list[policy_pb2.Sample]] = [[] for _ in batch]
                for sample in response.samples:
                    groups[sample.prompt_index].append(sample)
                if any(len(g) != n for g in groups):
                    raise WorkerError(f"the policy answered {[len(g) for g in groups]} samples per prompt, asked {n}")
                return [(g, response.tokenizer_fingerprint) for g in groups]

            return send

        with self._stage("generate"):
            results = self._each_or_skip(
                "generate", list(items), prepare, "prompt_rejected", lambda item: f"prompt {item.prompt_id!r}"
            )
        pending = []
        for item, result in zip(items, results):
            if result is None:
                continue
            samples, fingerprint = result
            if fingerprint and fingerprint != self.tokenizer_fingerprint:
                raise WorkerError(
                    f"the policy's tokenizer changed (fingerprint {fingerprint[:16]}..., paired with "
                    f"{self.tokenizer_fingerprint[:16]}...): restart the worker to re-check the reference pairing"
                )
            # All samples of a prompt in one call form a group (RLOO / GRPO baselines).
            group_id = uuid.uuid4().hex
            for sample in samples:
                if not sample.completion_token_ids or not sample.text.strip():
                    self._skip("empty_completion")
                    continue
                pending.append(_Pending(item, sample, group_id, fingerprint or self.tokenizer_fingerprint))
        return pending

    def _score(self, pending: list[_Pending]) -> list[_Pending]:
        truncation = _TRUNCATION[self.settings.reward_truncation]

        def prepare(batch: Sequence[_Pending]) -> Callable[[], list[tuple[float, float, str]]]:
            inputs = [p.item.reward_input(p.sample.text) for p in batch]

            def send():
                while True:
                    normalize = self._normalize
                    request = reward_pb2.ScoreRequest(
                        inputs=inputs, options=reward_pb2.ScoreOptions(normalize=normalize, truncation=truncation)
                    )
                    try:
                        response = self._clients.reward.Score(
                            request, timeout=self.settings.rpc_timeout_s, metadata=self._metadata
                        )
                        break
                    except grpc.RpcError as err:
                        # The active RM version is now one without shipped statistics.
                        lost = normalize and err.code() == grpc.StatusCode.FAILED_PRECONDITION and self._rm_lost_stats()
                        if not lost:
                            raise
                return [
                    (r.raw_score, r.score if response.normalized else r.raw_score, response.model_version)
                    for r in response.results
                ]

            return send

        with self._stage("score"):
            results = self._each_or_skip("score", pending, prepare, "reward_rejected", _describe_sample)
        for p, result in zip(pending, results):
            p.reward = result
        return pending

    def _rm_lost_stats(self) -> bool:
        info = self._clients.reward_models.GetModelInfo(
            common_pb2.GetModelInfoRequest(), timeout=self.settings.rpc_timeout_s, metadata=self._metadata
        ).info
        if info.HasField("normalization"):
            return False
        log.warning("reward model %s %s ships no normalization statistics: reward_normalized = reward",
                    info.name, info.version)
        self._normalize = False
        return True

    def _reference(self, pending: list[_Pending]) -> list[_Pending]:
        def prepare(batch: Sequence[_Pending]) -> Callable[[], list[tuple[list[float], str]]]:
            request = reference_pb2.LogProbsRequest(
                sequences=[
                    reference_pb2.TokenSequence(
                        prompt_token_ids=p.sample.prompt_token_ids, completion_token_ids=p.sample.completion_token_ids
                    )
                    for p in batch
                ],
                # The reference re-checks it: a swap to another tokenizer fails loudly.
                tokenizer_fingerprint=self.tokenizer_fingerprint,
            )

            def send():
                response = self._clients.reference.LogProbs(
                    request, timeout=self.settings.rpc_timeout_s, metadata=self._metadata
                )
                out = []
                for p, result in zip(batch, response.results):
                    if len(result.logprobs) != len(p.sample.completion_token_ids):
                        raise WorkerError(
                            f"the reference returned {len(result.logprobs)} log-probs for "
                            f"{len(p.sample.completion_token_ids)} completion tokens"
                        )
                    out.append((list(result.logprobs), response.model_version))
                return out

            return send

        with self._stage("reference"):
            results = self._each_or_skip("reference", pending, prepare, "reference_rejected", _describe_sample)
        for p, result in zip(pending, results):
            p.reference = result
        return pending

    def _rollout(self, p: _Pending) -> rollout_pb2.Rollout:
        raw, normalized, rm_version = p.reward
        ref_logprobs, ref_version = p.reference
        sample = p.sample
        rollout = rollout_pb2.Rollout(
            schema_version=codec.SCHEMA_MAJOR,
            rollout_id=uuid.uuid4().hex,
            prompt_id=p.item.prompt_id,
            sample_index=sample.sample_index,
            prompt_token_ids=sample.prompt_token_ids,
            completion_token_ids=sample.completion_token_ids,
            sampling_logprobs=sample.logprobs,
            reference_logprobs=ref_logprobs,
            reward=raw,
            reward_normalized=normalized,
            policy_version=sample.policy_version,
            reward_model_version=rm_version,
            reference_model_version=ref_version,
            finish_reason=sample.finish_reason,
            prompt_text=p.item.display_text(),
            completion_text=sample.text,
            worker_id=self.settings.worker_id,
            tokenizer_fingerprint=p.tokenizer_fingerprint,
            group_id=p.group_id,
        )
        rollout.created_at.GetCurrentTime()
        if self._gold is not None:
            rollout.gold_score = self._gold(sample.text)
        return rollout

    def _produce(self, rollouts: list[rollout_pb2.Rollout]) -> None:
        """Send and wait for acks=all; records not acknowledged are re-sent
        (same rollout_id) until they are, or the worker is stopped."""
        s = self.settings
        pending, delay = list(rollouts), s.retry_initial_backoff_s
        while True:
            sent = []
            try:
                for rollout in pending:
                    sent.append((rollout, self._producer.send(topics.ROLLOUTS, rollout)))
                self._producer.flush()
                return
            except ProduceError as err:
                self.metrics.errors.labels("produce").inc()
                try:
                    self._producer.flush()  # settle what is still in flight before choosing what to re-send
                except ProduceError:
                    pass
                failed = [r for r, f in sent if not f.done() or f.exception() is not None]
                pending = failed + pending[len(sent):]
                log.warning("%d rollout(s) not acknowledged (%s); re-sending in %.1fs", len(pending), err, delay)
            except StreamError as err:
                raise WorkerError(f"kafka: {err}") from None
            if self._stopping.wait(delay):
                raise WorkerStopped("produce")
            delay = min(delay * 2, s.retry_max_backoff_s)
