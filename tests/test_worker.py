"""The rollout worker against real policy, reward and reference servers and a
real Kafka-protocol broker: every Rollout field checked against direct calls
to the services, prompts from a file and from the prompts topic, a reward
service restarted mid-run, refused tokenizer pairs, bad prompt files, the CLI."""

from __future__ import annotations

import collections
import json
import math
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import grpc
import pytest
from lm_fixtures import other_tokenizer_policy

from arbiter.config import ConfigError
from arbiter.jsonl import JsonlError
from arbiter.prompts import content_id, display_text, read_prompts, reward_input_for
from arbiter.stream import (
    PayloadError,
    ProduceError,
    StreamConsumer,
    StreamProducer,
    TopicPartition,
    codec,
    ensure_topics,
    topics,
)
from arbiter.stream.broker import free_port
from arbiter.types import ChatMessage, Prompt
from arbiter.v1 import common_pb2, policy_pb2, reward_pb2, rollout_pb2
from helpers import BackgroundServer, drain, sample_value, wait_until
from services.policy.client import PolicyClient
from services.policy.server import create_server as create_policy
from services.policy.settings import PolicySettings
from services.reference.client import ReferenceClient
from services.reference.server import create_server as create_reference
from services.reference.settings import ReferenceSettings
from services.reward.client import RewardClient
from services.reward.server import create_server as create_reward
from services.reward.settings import RewardSettings
from services.worker.prompts import publish_prompts
from services.worker.retry import StageRetry, WorkerStopped
from services.worker.settings import WorkerSettings
from services.worker.staleness import GenerationBudget, VersionProgress
from services.worker.worker import RolloutWorker, WorkerError

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    {"id": "fox", "prompt": "The quick brown"},
    {"prompt": "Please explain how a reward model"},
    {"id": "chat-1", "messages": [{"role": "user", "content": "What is the capital of France?"}]},
    {"prompt": "I love this movie"},
]


@pytest.fixture(scope="module")
def servers(tiny_models):
    """{'policy', 'reward', 'reference'}: BackgroundServers on free ports."""
    policy = BackgroundServer(lambda: create_policy(PolicySettings(model_dir=str(tiny_models["policy"]), port=0)))
    reward = BackgroundServer(lambda: create_reward(RewardSettings(model_dir=str(tiny_models["reward"]), port=0)))
    reference = BackgroundServer(
        lambda: create_reference(ReferenceSettings(model_dir=str(tiny_models["policy"]), port=0))
    )
    yield {"policy": policy, "reward": reward, "reference": reference}
    for server in (policy, reward, reference):
        server.stop(grace=0)


@pytest.fixture
def kafka(kafka_settings):
    ensure_topics(kafka_settings, {topics.ROLLOUTS: 4, topics.PROMPTS: 2})
    return kafka_settings


def write_prompts(path: Path, rows) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def worker_settings(servers, kafka, **overrides) -> WorkerSettings:
    values = dict(
        policy_target=servers["policy"].target,
        reward_target=servers["reward"].target,
        reference_target=servers["reference"].target,
        kafka=kafka,
        samples_per_prompt=3,
        prompts_per_call=2,
        max_new_tokens=8,
        seed=7,
        worker_id="test-worker",
        rpc_timeout_s=30.0,
        connect_timeout_s=30.0,
        retry_initial_backoff_s=0.1,
        retry_max_backoff_s=0.5,
    )
    values.update(overrides)
    return WorkerSettings(**values)


def consume_all(kafka, expected: int, timeout_s: float = 30.0):
    with StreamConsumer(kafka, [topics.ROLLOUTS], None) as consumer:
        return drain(consumer, expected, timeout_s)


class WorkerThread:
    """``worker.run()`` on a thread once ``start()``ed; ``finished`` is set when
    it returns or raises. Leaving the ``with`` block stops and closes the worker."""

    def __init__(self, worker: RolloutWorker):
        self.worker = worker
        self.finished = threading.Event()
        self.stats = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        try:
            self.stats = self.worker.run()
        except BaseException as err:  # re-raised by result()
            self.error = err
        finally:
            self.finished.set()

    def start(self) -> WorkerThread:
        self._thread.start()
        return self

    def result(self, timeout_s: float = 60.0):
        """run()'s stats (or what it raised) once it returns."""
        assert self.finished.wait(timeout_s), f"the worker did not finish within {timeout_s}s"
        if self.error is not None:
            raise self.error
        return self.stats

    def __enter__(self) -> WorkerThread:
        return self

    def __exit__(self, *exc) -> None:
        self.worker.stop()
        if self._thread.is_alive():
            self.finished.wait(10)
        self.worker.close()


# -- the rollouts --------------------------------------------------------------


def test_run_once_rollouts_match_direct_service_calls(servers, kafka, tmp_path):
    import vaderSentiment.vaderSentiment as vader

    items = read_prompts(write_prompts(tmp_path / "prompts.jsonl", PROMPTS))
    settings = worker_settings(servers, kafka, gold="vader", metrics_port=0)
    started = time.time()
    with RolloutWorker(settings) as worker:
        rollouts = worker.run_once(items)
        metrics_text = urllib.request.urlopen(f"http://127.0.0.1:{worker.metrics_port}/metrics").read().decode()
        registry = worker.registry
    skipped = sample_value(registry, "arbiter_worker_samples_skipped_total", reason="empty_completion")
    assert len(rollouts) + skipped == len(PROMPTS) * 3 and len(rollouts) >= 9
    # Each rollout says how many members of its group were produced (fewer when one was skipped).
    produced = collections.Counter(r.group_id for r in rollouts)
    assert all(r.group_size == produced[r.group_id] for r in rollouts)

    records = consume_all(kafka, len(rollouts))
    assert len(records) == len(rollouts)
    by_id = {r.message.rollout_id: r for r in records}
    assert set(by_id) == {r.rollout_id for r in rollouts}
    for rollout in rollouts:
        assert by_id[rollout.rollout_id].message == rollout

    with PolicyClient(servers["policy"].target) as policy, ReferenceClient(servers["reference"].target) as ref, \
            RewardClient(servers["reward"].target) as reward:
        policy_info = policy.info()
        ref.pair_with(policy_info)
        direct_ref = ref.logprobs([(r.prompt_token_ids, r.completion_token_ids) for r in rollouts])
        inputs = [reward_input_for(items_by_id(items)[r.prompt_id], r.completion_text) for r in rollouts]
        raw = reward.score(inputs).results
        normalized = reward.score(inputs, normalize=True).results
        # The worker's text pairs are (prompt, completion) exactly as a caller would send them.
        text = next(r for r in rollouts if r.prompt_id == "fox")
        pair = reward_pb2.TextPair(prompt="The quick brown", response=text.completion_text)
        assert reward.score([reward_pb2.RewardInput(text=pair)]).results[0].raw_score == pytest.approx(text.reward)

    analyzer = vader.SentimentIntensityAnalyzer()
    groups = defaultdict(list)
    for i, r in enumerate(rollouts):
        record = by_id[r.rollout_id]
        assert record.key == r.prompt_id
        assert r.schema_version == 1 and len(r.rollout_id) == 32
        assert r.prompt_token_ids and r.completion_token_ids
        assert len(r.completion_token_ids) == len(r.sampling_logprobs) == len(r.reference_logprobs)
        assert all(lp <= 0 and math.isfinite(lp) for lp in r.sampling_logprobs)
        assert list(r.reference_logprobs) == pytest.approx(list(direct_ref.results[i].logprobs), abs=1e-5)
        assert r.reward == pytest.approx(raw[i].raw_score, abs=1e-5)
        assert r.reward_normalized == pytest.approx(normalized[i].score, abs=1e-5)
        assert r.reward_normalized != pytest.approx(r.reward)  # the tiny RM ships statistics
        assert r.reward_normalization_applied  # so the trainer may train on reward_normalized
        assert (r.policy_version, r.reward_model_version, r.reference_model_version) == ("v0", "v0", "v0")
        assert r.tokenizer_fingerprint == policy_info.tokenizer_fingerprint
        assert r.finish_reason in (policy_pb2.FINISH_REASON_LENGTH, policy_pb2.FINISH_REASON_EOS)
        assert r.completion_text.strip() and r.worker_id == "test-worker"
        assert started - 1 <= r.created_at.ToNanoseconds() / 1e9 <= time.time() + 1
        assert r.HasField("gold_score")
        assert r.gold_score == pytest.approx(analyzer.polarity_scores(r.completion_text)["compound"])
        groups[r.prompt_id].append(r)

    assert set(groups) == {"fox", content_id(text=PROMPTS[1]["prompt"]), "chat-1", content_id(text="I love this movie")}
    group_ids = set()
    for prompt_id, members in groups.items():
        # One group per prompt and call; all its samples on the prompt's partition.
        assert len({m.group_id for m in members}) == 1
        group_ids.add(members[0].group_id)
        assert len({by_id[m.rollout_id].partition for m in members}) == 1
        assert sorted(m.sample_index for m in members) == sorted(set(m.sample_index for m in members))
        assert {m.sample_index for m in members} <= {0, 1, 2}
        assert {m.prompt_text for m in members} == {display_text(items_by_id(items)[prompt_id])}
    assert len(group_ids) == len(groups)
    chat = groups["chat-1"][0]
    assert json.loads(chat.prompt_text) == PROMPTS[2]["messages"]

    assert f"arbiter_worker_rollouts_total {float(len(rollouts))}" in metrics_text
    assert 'arbiter_worker_last_policy_version{model_version="v0"} 1.0' in metrics_text
    assert f"arbiter_worker_response_length_tokens_count {float(len(rollouts))}" in metrics_text
    assert "arbiter_worker_gold_score " in metrics_text and "arbiter_worker_reward_mean " in metrics_text
    assert sample_value(registry, "arbiter_worker_batch_seconds_count") == 2
    assert sample_value(registry, "arbiter_worker_errors_total", stage="score") == 0


def items_by_id(items: list[Prompt]) -> dict[str, Prompt]:
    return {item.id: item for item in items}


def test_chat_prompts_are_scored_as_a_conversation_with_the_completion(servers, kafka):
    chat = [{"role": "user", "content": "Write a haiku about the sea."}]
    with RolloutWorker(worker_settings(servers, kafka, samples_per_prompt=2, seed=3)) as worker:
        rollouts = worker.run_once([{"messages": chat}])
    assert rollouts
    with RewardClient(servers["reward"].target) as reward:
        for r in rollouts:
            conversation = [*chat, {"role": "assistant", "content": r.completion_text}]
            from services.reward.client import reward_input

            direct = reward.score([reward_input({"messages": conversation}, "direct")]).results[0]
            assert r.reward == pytest.approx(direct.raw_score, abs=1e-5)


def test_a_prompt_the_policy_refuses_is_skipped_not_fatal(servers, kafka):
    too_long = " ".join(["reinforcement"] * 300)  # over the tiny policy's 256 tokens
    with RolloutWorker(worker_settings(servers, kafka, samples_per_prompt=2)) as worker:
        rollouts = worker.run_once([{"id": "long", "prompt": too_long}, {"id": "ok", "prompt": "The cat sat"}])
        skipped = sample_value(worker.registry, "arbiter_worker_samples_skipped_total", reason="prompt_rejected")
        errors = sample_value(worker.registry, "arbiter_worker_errors_total", stage="generate")
    assert skipped == 1 and errors == 2  # the batch, then the long prompt alone
    assert rollouts and {r.prompt_id for r in rollouts} == {"ok"}


def test_same_seed_same_samples(servers, kafka):
    def run():
        with RolloutWorker(worker_settings(servers, kafka, samples_per_prompt=2, seed=11)) as worker:
            return worker.run_once(["The cat sat on"])

    first, second = run(), run()
    assert [list(r.completion_token_ids) for r in first] == [list(r.completion_token_ids) for r in second]
    assert {r.rollout_id for r in first}.isdisjoint({r.rollout_id for r in second})


# -- refusing to start ----------------------------------------------------------


def test_mismatched_tokenizers_are_refused_at_start(servers, kafka, tmp_path):
    other = other_tokenizer_policy(tmp_path / "other")
    with BackgroundServer(lambda: create_reference(ReferenceSettings(model_dir=str(other), port=0))) as reference:
        worker = RolloutWorker(worker_settings(servers, kafka, reference_target=reference.target))
        with pytest.raises(WorkerError, match="refusing to start: .*use different tokenizers"):
            worker.start()
    # A target that is another kind of service is named as such.
    worker = RolloutWorker(worker_settings(servers, kafka, reference_target=servers["reward"].target))
    with pytest.raises(WorkerError, match=r"serves a 'reward' model, expected the reference service"):
        worker.start()


def test_missing_topic_and_unreachable_service(servers, kafka_settings):
    worker = RolloutWorker(worker_settings(servers, kafka_settings))
    with pytest.raises(WorkerError, match=r"topic\(s\) .*rollouts do not exist"):
        worker.start()
    dead = f"127.0.0.1:{free_port()}"
    worker = RolloutWorker(worker_settings(servers, kafka_settings, policy_target=dead, connect_timeout_s=1.0))
    with pytest.raises(WorkerError, match=f"the policy service at {dead} did not answer within 1.0s"):
        worker.start()


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("{not json", ":2: row: not valid JSON"),
        ("[1, 2]", ":2: row: is a JSON list; expected an object"),
        ('{"text": "hi"}', ":2: row: unknown key(s) 'text'"),
        ('{"prompt": "  "}', ":2: prompt: must be a non-empty string"),
        ('{"prompt": "a", "messages": [{"role": "user", "content": "b"}]}', ":2: row: needs exactly one of"),
        ('{"messages": [{"role": "user"}]}', ":2: messages[0]: must be {'role': str, 'content': str}"),
        ('{"messages": []}', ":2: messages: must be a non-empty list"),
        ('{"prompt": [{"role": "user", "content": " "}]}', ":2: prompt[0]: has an empty role or content"),
        ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}',
         ":2: messages[1]: is an assistant turn"),
        ('{"id": 5, "prompt": "a"}', ":2: id: must be a non-empty string"),
        ('{"id": "%s", "prompt": "a"}' % ("x" * 257), ":2: id: is 257 characters; at most 256"),
    ],
)
def test_malformed_prompt_lines_name_file_line_and_field(tmp_path, line, needle):
    path = write_prompts(tmp_path / "bad.jsonl", [{"id": "a", "prompt": "first"}, line])
    with pytest.raises(JsonlError) as err:
        read_prompts(path)
    assert str(err.value).startswith(f"{path}{needle}")


def test_prompt_file_edge_cases(tmp_path):
    with pytest.raises(JsonlError, match="missing.jsonl: file: does not exist"):
        read_prompts(tmp_path / "missing.jsonl")
    with pytest.raises(JsonlError, match="empty.jsonl: file: holds no prompts"):
        read_prompts(write_prompts(tmp_path / "empty.jsonl", ["", "  "]))
    # Ids without "id" hash the content: stable across files, distinct per content.
    a = read_prompts(write_prompts(tmp_path / "a.jsonl", [{"prompt": "x"}, "", {"messages": PROMPTS[2]["messages"]}]))
    b = read_prompts(write_prompts(tmp_path / "b.jsonl", [{"messages": PROMPTS[2]["messages"]}, {"prompt": "x"}]))
    assert [i.id for i in a] == [i.id for i in reversed(b)]
    assert a[0].id != a[1].id and a[0].id.startswith("p-")
    # TRL's conversational form: "prompt" holding the chat is the same prompt as "messages".
    trl = read_prompts(write_prompts(tmp_path / "trl.jsonl", [{"prompt": PROMPTS[2]["messages"]}]))
    assert trl == [a[1]] and trl[0].messages == (ChatMessage("user", "What is the capital of France?"),)
    # The same prompt twice is fine (same id); one id for two prompts is not.
    assert len(read_prompts(write_prompts(tmp_path / "dup.jsonl", [{"prompt": "x"}, {"prompt": "x"}]))) == 2
    clash = write_prompts(tmp_path / "clash.jsonl", [{"id": "a", "prompt": "first"}, "", {"id": "a", "prompt": "b"}])
    with pytest.raises(JsonlError) as err:
        read_prompts(clash)
    assert str(err.value) == f"{clash}:3: id: 'a' is already used by {clash}:1 for another prompt"
    # A bad file stops the worker before it connects.
    bad = write_prompts(tmp_path / "bad.jsonl", [{"prompt": "x"}, "oops"])
    settings = WorkerSettings(policy_target="127.0.0.1:1", reward_target="127.0.0.1:1",
                              reference_target="127.0.0.1:1", prompts_file=str(bad))
    with pytest.raises(JsonlError, match=f"{bad}:2: row: not valid JSON"):
        RolloutWorker(settings).start()


def test_prompt_records_round_trip_and_bad_ones_name_the_record():
    """The worker reads prompt records through the codec's conversions."""
    chat = Prompt(messages=(ChatMessage("system", "Be brief."), ChatMessage("user", "Hi?")), id="c1")
    text = Prompt(text="The quick brown", id="t1")
    for prompt in (chat, text):
        assert codec.prompt_from_record(codec.prompt_to_record(prompt), "here") == prompt
    where = "prompts[1]@7"

    def conversation(*turns):
        return common_pb2.Conversation(messages=[common_pb2.ChatMessage(role=r, content=c) for r, c in turns])

    bad = [
        (rollout_pb2.PromptRecord(prompt_id="x", text="t", conversation=conversation(("user", "c"))),
         f"{where}: sets both text and a conversation"),
        (rollout_pb2.PromptRecord(prompt_id="x"), f"{where}: has neither text nor a conversation"),
        (rollout_pb2.PromptRecord(text="t"), f"{where}: prompt_id is empty"),
        (rollout_pb2.PromptRecord(prompt_id="x", conversation=conversation(("assistant", "c"))),
         f"{where}: the conversation ends with an assistant turn"),
        (rollout_pb2.PromptRecord(prompt_id="x", conversation=conversation(("user", " "))),
         f"{where}: conversation.messages[0] has an empty role or content"),
    ]
    for record, needle in bad:
        with pytest.raises(PayloadError) as err:
            codec.prompt_from_record(record, where)
        assert str(err.value).startswith(needle)


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"policy_target": ""}, "policy_target=''"),
        ({"temperature": 0.0}, "temperature=0.0 is invalid: must be > 0"),
        ({"samples_per_prompt": 0}, "samples_per_prompt=0"),
        ({"top_p": 1.5}, "top_p=1.5"),
        ({"reward_truncation": "middle"}, "reward_truncation='middle'"),
        ({"gold": "human"}, "gold='human' is invalid: must be one of vader"),
        ({"prompts_file": "p.jsonl", "prompts_topic": True}, "prompts_file/prompts_topic"),
        ({"max_rollouts": 0}, "max_rollouts=0"),
        ({"retry_max_backoff_s": 0.01}, "retry_max_backoff_s=0.01"),
        ({"pipeline_depth": 0}, "pipeline_depth=0 is invalid: must be an integer in 1..16"),
        ({"pipeline_depth": 17}, "pipeline_depth=17"),
        ({"max_rollouts_per_version": 32}, "max_rollouts_per_version=32 is invalid: was removed"),
        ({"max_staleness": 0, "trainer_batch_size": 32}, "max_staleness=0 is invalid: must be an integer >= 1"),
        ({"max_staleness": 1}, "trainer_batch_size=None is invalid: must be the trainer's ppo.batch_size"),
    ],
)
def test_settings_errors_name_the_field(changes, needle):
    values = dict(policy_target="h:1", reward_target="h:2", reference_target="h:3")
    values.update(changes)
    with pytest.raises(ConfigError) as err:
        WorkerSettings(**values)
    assert needle in str(err.value)


# -- running ------------------------------------------------------------------


def test_reward_service_restart_delays_but_loses_nothing(servers, kafka, tiny_models, tmp_path):
    port = free_port()
    reward_settings = RewardSettings(model_dir=str(tiny_models["reward"]), port=port, grace_seconds=1.0)
    reward = BackgroundServer(lambda: create_reward(reward_settings))
    path = write_prompts(tmp_path / "prompts.jsonl", PROMPTS)
    settings = worker_settings(
        servers, kafka, reward_target=f"127.0.0.1:{port}", prompts_file=str(path), samples_per_prompt=2,
        prompts_per_call=1, passes=2,
    )
    worker = RolloutWorker(settings)
    try:
        with WorkerThread(worker) as running:
            # Connected and producing; then the reward service goes away under it.
            first = worker.run_once([PROMPTS[0]])
            reward.stop()
            reward = None
            running.start()
            wait_until(lambda: sample_value(worker.registry, "arbiter_worker_errors_total", stage="score") >= 2,
                     what="Score to fail while the reward service is down")
            assert worker.stats.rollouts == len(first)  # the generated batch is waiting, not dropped
            reward = BackgroundServer(lambda: create_reward(reward_settings))  # same port
            stats = running.result(60)
    finally:
        if reward is not None:
            reward.stop(grace=0)
    assert stats.prompts == 1 + 2 * len(PROMPTS)
    # Every generated sample became a rollout or a counted skip: none was lost in the outage.
    assert stats.prompts * 2 == stats.rollouts + stats.skipped
    records = consume_all(kafka, stats.rollouts)
    assert len(records) == stats.rollouts == len({r.message.rollout_id for r in records})
    # The outage was the score stage's alone: no other stage counted a failure.
    assert all(sample_value(worker.registry, "arbiter_worker_errors_total", stage=stage) == 0
               for stage in ("connect", "generate", "reference", "produce"))


class Rpc(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode):
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "test"


class RecordedWaits:
    """Stands in for the stop event: records each backoff, stops when told to."""

    def __init__(self, stop_after: int | None = None):
        self.waits: list[float] = []
        self.stop_after = stop_after

    def wait(self, seconds: float) -> bool:
        self.waits.append(seconds)
        return self.stop_after is not None and len(self.waits) >= self.stop_after


def failing(*outcomes):
    """A call that raises each exception of ``outcomes`` in turn, then returns "ok"."""
    queue = list(outcomes)

    def attempt():
        if queue:
            raise queue.pop(0)
        return "ok"

    return attempt


def test_stage_retry_backs_off_on_transient_failures_and_counts_them_under_the_stage():
    failed, waits = [], RecordedWaits()
    retry = StageRetry(0.5, 2.0, lambda: waits, failed.append)
    transient = [Rpc(grpc.StatusCode.UNAVAILABLE), Rpc(grpc.StatusCode.DEADLINE_EXCEEDED),
                 Rpc(grpc.StatusCode.ABORTED), Rpc(grpc.StatusCode.UNAVAILABLE)]
    assert retry.call("score", failing(*transient)) == "ok"
    # Backoff doubles from 0.5 s and is capped at 2 s: 0.5, 1, 2, 2.
    assert waits.waits == [0.5, 1.0, 2.0, 2.0] and failed == ["score"] * 4
    # Anything else is raised at once, counted once, never waited on.
    with pytest.raises(Rpc) as err:
        retry.call("generate", failing(Rpc(grpc.StatusCode.INVALID_ARGUMENT)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert failed[4:] == ["generate"] and len(waits.waits) == 4
    # The sink's notion of transient: unacknowledged records.
    assert retry.call("produce", failing(ProduceError("nack")), transient=lambda e: isinstance(e, ProduceError)) == "ok"
    assert failed[5:] == ["produce"]


def test_stage_retry_gives_up_at_the_deadline_and_when_stopped():
    failed = []
    retry = StageRetry(0.5, 2.0, lambda: RecordedWaits(), failed.append)
    with pytest.raises(Rpc):
        retry.call("connect", failing(Rpc(grpc.StatusCode.UNAVAILABLE)), deadline=time.monotonic())
    assert failed == ["connect"]
    stopping = RecordedWaits(stop_after=2)
    retry = StageRetry(0.5, 2.0, lambda: stopping, failed.append)
    with pytest.raises(WorkerStopped, match="reference"):
        retry.call("reference", failing(*[Rpc(grpc.StatusCode.UNAVAILABLE)] * 5))
    assert stopping.waits == [0.5, 1.0] and failed[1:] == ["reference"] * 2


def test_generation_budget_counts_rollouts_ahead_of_what_the_trainer_settled():
    # η = 1, B = 32: at most (1 + 1) x 32 = 64 rollouts written but not settled, samples in flight included.
    # Before any announcement: the trainer group's commits, partition 0 up to 90, none on partition 1.
    budget = GenerationBudget(max_staleness=1, batch_size=32, settled={0: 90})
    assert budget.limit == 64 and budget.room({}, in_flight=0) == 64
    # This worker's newest writes end at 130 on partition 0 and 40 on partition 1 (others' records before count).
    end = {0: 130, 1: 40}
    assert budget.behind(end) == 40 + 40 and budget.room(end, in_flight=10) == 64 - 80 - 10 == -26
    assert not budget.observe(None)  # a label on no PolicyUpdate (the initial weights)
    # Version 3: the trainer settled partition 0 up to 125 and partition 1 up to 45 (others' records too).
    assert budget.observe(VersionProgress(step=3, settled={0: 125, 1: 45}))
    assert budget.behind(end) == 5 + 0 and budget.room(end, 10) == 64 - 5 - 10 == 49
    assert not budget.observe(VersionProgress(step=2, settled={0: 130, 1: 40})) and budget.behind(end) == 5  # older
    # A trainer from before rollouts_settled: the step moves, the positions stay.
    assert budget.observe(VersionProgress(step=5, settled=None)) and budget.step == 5 and budget.behind(end) == 5
    with pytest.raises(ValueError, match="max_staleness must be >= 1"):
        GenerationBudget(max_staleness=0, batch_size=32)


def simulate(eta: int, batch: int, workers: int, swap_delay: int, steps: int = 40) -> list[int]:
    """Workers generating to their budget, one topic partition, a trainer taking
    rollouts in order, B per update, dropping every 7th record (stale,
    invalid...), and policies serving a new version up to ``swap_delay``
    updates late (they catch up while the trainer waits for a batch). The
    lags of the trained rollouts; fails if the trainer starves."""
    budgets = [GenerationBudget(eta, batch) for _ in range(workers)]
    ends: list[dict[int, int]] = [{} for _ in range(workers)]  # after each worker's newest write
    topic: list[tuple[int, bool]] = []  # (step of the sampling version, dropped by the trainer)
    progress = {0: VersionProgress(0, {})}
    position, lags = 0, []
    for step in range(steps):
        for serving in (max(step - swap_delay, 0), step):  # the second: caught up while the trainer waited
            for budget, end in zip(budgets, ends):
                budget.observe(progress[serving])
                while budget.room(end, 0) > 0:
                    topic.append((serving, len(topic) % 7 == 6))
                    end[0] = len(topic)
            if sum(not dropped for _, dropped in topic[position:]) >= batch:
                break
        else:
            pytest.fail(f"the trainer starved at step {step}")
        taken = 0
        while taken < batch:
            sampled, dropped = topic[position]
            position += 1
            if not dropped:
                lags.append(step - sampled)
                taken += 1
        progress[step + 1] = VersionProgress(step + 1, {0: position})
    return lags


@pytest.mark.parametrize(("eta", "batch", "swap_delay"), [(1, 4, 0), (2, 6, 1), (1, 5, 2), (3, 32, 3)])
def test_one_worker_within_its_budget_is_never_trained_more_than_eta_versions_late(eta, batch, swap_delay):
    lags = simulate(eta, batch, workers=1, swap_delay=swap_delay)
    assert 0 <= min(lags) and max(lags) <= eta
    if swap_delay == 0:
        assert max(lags) == eta  # and generation did run that far ahead


def test_several_workers_share_the_budget_and_never_starve_the_trainer():
    # Each sees the others' records only up to its own newest write: the
    # documented overshoot makes some rollouts one version staler than η.
    lags = simulate(eta=1, batch=8, workers=4, swap_delay=0)
    assert 0 <= min(lags) and max(lags) <= 1 + 1


def test_max_staleness_waits_for_the_trainer_then_generates_ahead(servers, kafka, tiny_models, tmp_path):
    from lm_fixtures import perturbed

    ensure_topics(kafka, {topics.POLICY_UPDATES: 1})
    v1 = perturbed(tiny_models["policy"], tmp_path / "v1", version="v1")
    path = write_prompts(tmp_path / "prompts.jsonl", PROMPTS)
    policy_settings = PolicySettings(model_dir=str(tiny_models["policy"]), port=0, model_roots=(str(tmp_path),))
    with BackgroundServer(lambda: create_policy(policy_settings)) as policy:
        # η = 1, B = 2: (1 + 1) x 2 = 4 rollouts ahead of the trainer, which has settled none.
        settings = worker_settings(
            servers, kafka, policy_target=policy.target, prompts_file=str(path), samples_per_prompt=2,
            max_staleness=1, trainer_batch_size=2, max_rollouts=8, version_poll_s=0.05,
        )
        worker = RolloutWorker(settings).start()
        # The waiting worker's version polls (the only policy info calls after start), counted as they return.
        polls = []
        ask = worker.pipeline.policy.info

        def counted_info(*args, **kwargs):
            info = ask(*args, **kwargs)
            polls.append(info.version)
            return info

        worker.pipeline.policy.info = counted_info
        with WorkerThread(worker) as running:
            running.start()
            wait_until(lambda: sample_value(worker.registry, "arbiter_worker_waiting_for_policy") == 1,
                     what="the worker to wait for the trainer")
            # Ten polls, version_poll_s = 0.05 s apart: it has waited >= 9 x 0.05 = 0.45 s by the tenth.
            wait_until(lambda: len(polls) >= 10, what="ten version polls while waiting")
            produced_by_v0 = worker.stats.rollouts
            assert set(polls) == {"v0"}
            assert sample_value(worker.registry, "arbiter_worker_staleness_budget_rollouts") == 0
            # The trainer publishes v1 at step 2 (the policy never served step 1), having settled
            # every rollout written: 4 more may be generated.
            settled = {}
            for record in consume_all(kafka, produced_by_v0):
                settled[record.partition] = max(settled.get(record.partition, 0), record.offset + 1)
            with StreamProducer(kafka) as producer:
                producer.send(topics.POLICY_UPDATES, rollout_pb2.PolicyUpdate(
                    schema_version=1, policy_version="v1", checkpoint_path=str(v1), training_step=2,
                    rollouts_settled=settled))
                producer.flush()
            with PolicyClient(policy.target) as client:
                client.load_version(str(v1), activate=True)
            running.result(30)
    versions = [r.message.policy_version for r in consume_all(kafka, worker.stats.rollouts)]
    # 4 from v0 (5 if a sample was skipped: a group is never split), the rest of the 8 from v1.
    assert 4 <= versions.count("v0") == produced_by_v0 < 6
    assert versions.count("v1") == len(versions) - produced_by_v0 >= 8 - produced_by_v0
    assert sample_value(worker.registry, "arbiter_worker_trainer_step") == 2
    assert sample_value(worker.registry, "arbiter_worker_policy_wait_seconds_total") > 0.3
    # The polls were the wait_for_policy stage's, and none of them failed.
    assert all(sample_value(worker.registry, "arbiter_worker_errors_total", stage=stage) == 0
               for stage in ("wait_for_policy", "generate"))


def test_prompts_topic_commits_after_rollouts_are_acknowledged(servers, kafka):
    publish_prompts(kafka, [PROMPTS[0], PROMPTS[2], "A good answer is", "The weather today"])
    with StreamProducer(kafka) as producer:  # a record without text or chat: skipped, still committed
        producer.send(topics.PROMPTS, rollout_pb2.PromptRecord(prompt_id="empty"))
        producer.flush()
    worker = RolloutWorker(worker_settings(servers, kafka, prompts_topic=True, samples_per_prompt=2))
    with WorkerThread(worker) as running:
        running.start()
        wait_until(lambda: worker.stats.prompts == 4 and worker.stats.skipped >= 1, what="all prompts")
        worker.stop()
        running.result(30)
    assert sample_value(worker.registry, "arbiter_worker_samples_skipped_total", reason="invalid_prompt_record") == 1
    records = consume_all(kafka, worker.stats.rollouts)
    assert {r.message.prompt_id for r in records} <= {"fox", "chat-1", content_id(text="A good answer is"),
                                                      content_id(text="The weather today")}
    assert len(records) == worker.stats.rollouts == 8 - sample_value(
        worker.registry, "arbiter_worker_samples_skipped_total", reason="empty_completion")
    with StreamConsumer(kafka, [topics.PROMPTS], topics.ROLLOUT_WORKERS_GROUP) as group:
        committed = group.committed([TopicPartition(kafka.topic(topics.PROMPTS), p) for p in range(2)])
    assert sum(v or 0 for v in committed.values()) == 5


# -- the command line -----------------------------------------------------------


def run_cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "ARBITER_LOG_LEVEL": "WARNING"}
    return subprocess.run([sys.executable, "-m", "cli", "worker", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def test_cli(servers, kafka, tmp_path):
    path = write_prompts(tmp_path / "prompts.jsonl", PROMPTS[:3])
    common = [
        "--policy", servers["policy"].target, "--reward", servers["reward"].target,
        "--reference", servers["reference"].target, "--kafka-bootstrap-servers", ",".join(kafka.bootstrap_servers),
        "--kafka-topic-prefix", kafka.topic_prefix,
    ]
    done = run_cli(*common, "--prompts", str(path), "--passes", "1", "--samples-per-prompt", "2",
                   "--max-new-tokens", "4", "--seed", "5", "--gold", "vader", "--worker-id", "cli-worker",
                   "--prompts-per-call", "2")
    assert done.returncode == 0, done.stderr
    assert "rollout worker cli-worker: prompts from" in done.stdout
    produced = int(done.stdout.split("cli-worker: ")[-1].split(" rollouts")[0])
    assert "from 3 prompts in 2 batches" in done.stdout
    records = consume_all(kafka, produced)
    assert {r.message.worker_id for r in records} == {"cli-worker"}
    assert all(r.message.HasField("gold_score") for r in records)

    bad = write_prompts(tmp_path / "bad.jsonl", [{"prompt": "x"}, '{"prompt": 3}'])
    failed = run_cli(*common, "--prompts", str(bad))
    assert failed.returncode == 2
    assert f"arbiter worker: {bad}:2: prompt: must be a non-empty string" in failed.stderr
    invalid = run_cli(*common, "--prompts", str(path), "--temperature", "0")
    assert invalid.returncode == 2 and "temperature=0.0 is invalid" in invalid.stderr


# -- pipelining ------------------------------------------------------------------


class StageEvents:
    """The worker's StageObserver for tests: records every (batch, stage,
    "start"/"end") in order, and can hold a stage's start on the worker's own
    thread until a condition on the events holds: a stage that can only go on
    once another has started shows that the two overlap, with no timing."""

    def __init__(self, timeout_s: float = 20.0):
        self.events: list[tuple[int, str, str]] = []
        self.timed_out: list[str] = []
        self.timeout_s = timeout_s
        self._holds: list[tuple[str, int | None, object, object]] = []
        self._changed = threading.Condition()

    def hold(self, stage: str, until, batch: int | None = None, then=None) -> None:
        """Before ``stage`` of ``batch`` (None: of any batch) starts, wait until
        ``until(batch)``; then call ``then()``, still on the worker's thread."""
        self._holds.append((stage, batch, until, then))

    def stage_started(self, batch: int, stage: str) -> None:
        self._record(batch, stage, "start")
        for held_stage, held_batch, until, then in self._holds:
            if held_stage != stage or held_batch not in (None, batch):
                continue
            with self._changed:
                if not self._changed.wait_for(lambda: until(batch), timeout=self.timeout_s):
                    self.timed_out.append(f"{stage} of batch {batch}")
            if then is not None:
                then()

    def stage_finished(self, batch: int, stage: str) -> None:
        self._record(batch, stage, "end")

    def _record(self, batch: int, stage: str, edge: str) -> None:
        with self._changed:
            self.events.append((batch, stage, edge))
            self._changed.notify_all()

    def seen(self, batch: int, stage: str, edge: str) -> bool:
        return (batch, stage, edge) in self.events

    def at(self, batch: int, stage: str, edge: str) -> int:
        return self.events.index((batch, stage, edge))

    def order(self, stage: str, edge: str = "end") -> list[int]:
        return [b for b, s, e in self.events if (s, e) == (stage, edge)]


def test_pipelined_batches_overlap_and_settle_in_order_and_depth_1_runs_one_at_a_time(servers, kafka):
    prompts = ["The cat sat on", "I love this movie", "The weather today"]
    events = StageEvents()
    # Batch 0's Score waits for batch 1's Generate to start: one batch at a time, that would never come.
    events.hold("score", lambda _: events.seen(1, "generate", "start"), batch=0)
    # Every Score waits for its batch's LogProbs to start: the two calls run at once.
    events.hold("score", lambda batch: events.seen(batch, "reference", "start"))
    settings = worker_settings(servers, kafka, samples_per_prompt=2, prompts_per_call=1, seed=5)
    with RolloutWorker(settings, observer=events) as worker:
        pipelined = worker.run_once(prompts)
        registry = worker.registry
    assert events.timed_out == []
    assert events.at(1, "generate", "start") < events.at(0, "score", "end")
    for batch in range(3):
        starts = max(events.at(batch, stage, "start") for stage in ("score", "reference"))
        assert starts < min(events.at(batch, stage, "end") for stage in ("score", "reference"))
    # Produced one batch after the other, committed in the same order.
    assert events.order("produce", "start") == events.order("produce") == events.order("commit") == [0, 1, 2]
    assert events.at(0, "produce", "end") < events.at(1, "produce", "start")
    assert [r.prompt_id for r in pipelined] == sorted((r.prompt_id for r in pipelined), key=[
        content_id(text=p) for p in prompts].index)
    assert sample_value(registry, "arbiter_worker_batches_in_flight") == 0
    assert sample_value(registry, "arbiter_worker_batches_dropped_total") == 0

    sequential_events = StageEvents()
    with RolloutWorker(worker_settings(servers, kafka, samples_per_prompt=2, prompts_per_call=1, seed=5,
                                       pipeline_depth=1), observer=sequential_events) as worker:
        sequential = worker.run_once(prompts)
    # Depth 1: one batch, and one call, at a time.
    stages = ("generate", "score", "reference", "produce", "commit")
    assert sequential_events.events == [(b, s, e) for b in range(3) for s in stages for e in ("start", "end")]
    # Pipelining changes when samples are drawn, not which: Generate calls stay in order, seed + call number.
    assert [list(r.completion_token_ids) for r in sequential] == [list(r.completion_token_ids) for r in pipelined]
    records = consume_all(kafka, len(pipelined) + len(sequential))
    assert sorted(r.message.rollout_id for r in records) == sorted(r.rollout_id for r in pipelined + sequential)


def committed_prompts(kafka) -> int:
    with StreamConsumer(kafka, [topics.PROMPTS], topics.ROLLOUT_WORKERS_GROUP) as group:
        committed = group.committed([TopicPartition(kafka.topic(topics.PROMPTS), p) for p in range(2)])
    return sum(v or 0 for v in committed.values())


def test_a_later_batch_done_first_waits_to_be_produced_and_committed(servers, kafka):
    publish_prompts(kafka, ["The cat sat on", "I love this movie", "The weather today"])
    events = StageEvents()
    # Batch 0's Score waits until the two after it are scored and have their reference log-probs.
    later_done = [(b, stage, "end") for b in (1, 2) for stage in ("score", "reference")]
    events.hold("score", lambda _: all(events.seen(*event) for event in later_done), batch=0)
    settings = worker_settings(servers, kafka, prompts_topic=True, samples_per_prompt=2, prompts_per_call=1,
                               pipeline_depth=3)
    worker = RolloutWorker(settings, observer=events)
    with WorkerThread(worker) as running:
        running.start()
        wait_until(lambda: worker.stats.prompts == 3, what="three prompts")
        worker.stop()
        stats = running.result(30)
    assert events.timed_out == []
    assert events.at(1, "score", "end") < events.at(0, "score", "end")
    # Yet produced and committed in the order taken: nothing commits past the held batch.
    assert events.order("produce", "start") == events.order("commit") == [0, 1, 2]
    assert events.at(0, "produce", "end") < events.at(0, "commit", "start")
    assert stats.dropped == 0
    assert len(consume_all(kafka, stats.rollouts)) == stats.rollouts
    assert committed_prompts(kafka) == 3


def test_a_batch_abandoned_in_flight_drops_the_later_ones_unproduced_and_they_are_redone_once(
    servers, kafka, tiny_models,
):
    prompts = ["The cat sat on", "I love this movie", "The weather today", "A good answer is"]
    publish_prompts(kafka, prompts)
    port = free_port()
    reward_settings = RewardSettings(model_dir=str(tiny_models["reward"]), port=port, grace_seconds=1.0)
    reward = BackgroundServer(lambda: create_reward(reward_settings))
    events = StageEvents()

    def stop_reward():
        nonlocal reward
        reward.stop(grace=0)
        reward = None

    # Batch 1's Score waits until batch 0 is committed and batch 2 scored and referenced; then the reward
    # service goes down under it, and the worker is stopped while it waits to retry.
    events.hold(
        "score", lambda _: events.seen(0, "commit", "end") and all(
            events.seen(2, stage, "end") for stage in ("score", "reference")),
        batch=1, then=stop_reward,
    )
    settings = worker_settings(servers, kafka, reward_target=f"127.0.0.1:{port}", prompts_topic=True,
                               samples_per_prompt=2, prompts_per_call=1, pipeline_depth=3)
    worker = RolloutWorker(settings, observer=events)
    try:
        with WorkerThread(worker) as running:
            running.start()
            wait_until(lambda: sample_value(worker.registry, "arbiter_worker_errors_total", stage="score") >= 1,
                       what="Score to fail once the reward service is down")
            worker.stop()
            stats = running.result(30)
        assert events.timed_out == []
        # Only the first batch was produced; the second was abandoned, the third (scored, waiting to be
        # produced) and any after it dropped before producing anything.
        assert events.order("produce", "start") == [0]
        assert stats.prompts == 1 and stats.dropped >= 2
        assert sample_value(worker.registry, "arbiter_worker_batches_dropped_total") == stats.dropped
        assert committed_prompts(kafka) == 1

        # Another worker of the group, with the reward service back: the other prompts, once each.
        reward = BackgroundServer(lambda: create_reward(reward_settings))
        again = RolloutWorker(settings)
        with WorkerThread(again) as running:
            running.start()
            wait_until(lambda: again.stats.prompts == 3, what="the three uncommitted prompts")
            again.stop()
            redone = running.result(30)
    finally:
        if reward is not None:
            reward.stop(grace=0)
    records = consume_all(kafka, stats.rollouts + redone.rollouts)
    assert len(records) == stats.rollouts + redone.rollouts
    groups = defaultdict(set)
    for record in records:
        groups[record.message.prompt_id].add(record.message.group_id)
    assert set(groups) <= {content_id(text=p) for p in prompts}
    # No prompt was produced twice: one group (one Generate call) per prompt.
    assert all(len(ids) == 1 for ids in groups.values())
    assert redone.dropped == 0 and committed_prompts(kafka) == 4
