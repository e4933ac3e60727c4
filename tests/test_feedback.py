"""SubmitPreference over real gRPC onto the real broker's preferences topic,
and `arbiter train rm --from-topic` training on what was submitted."""

from __future__ import annotations

import json
import time

import grpc
import pytest
from rm_fixtures import rule_rows

from cli.main import main as cli_main
from arbiter.limits import MiB, SizeLimits
from arbiter.rm.config import TopicConfig
from arbiter.rm.topic import read_preferences
from arbiter.stream import StreamConsumer, ensure_topics, topics
from arbiter.stream.broker import free_port
from arbiter.stream.settings import KafkaSettings
from arbiter.v1 import common_pb2, reward_pb2, reward_pb2_grpc
from helpers import BackgroundServer, expect_error
from services.reward.server import create_server
from services.reward.settings import RewardSettings


@pytest.fixture
def kafka(kafka_settings):
    ensure_topics(kafka_settings, {topics.PREFERENCES: topics.DEFAULT_PARTITIONS[topics.PREFERENCES]})
    return kafka_settings


def serve(tiny_models, kafka, **overrides):
    settings = RewardSettings(model_dir=str(tiny_models["reward"]), port=0, kafka=kafka, **overrides)
    return BackgroundServer(lambda: create_server(settings))


def read_all(kafka, count, timeout_s=20.0):
    records = []
    with StreamConsumer(kafka, [topics.PREFERENCES], None) as consumer:
        deadline = time.monotonic() + timeout_s
        while len(records) < count and time.monotonic() < deadline:
            records += consumer.poll(timeout_s=0.5).records
    return records


def conversation(*turns):
    return common_pb2.Conversation(messages=[common_pb2.ChatMessage(role=r, content=c) for r, c in turns])


def test_preferences_land_on_the_topic(tiny_models, kafka):
    with serve(tiny_models, kafka) as server, grpc.insecure_channel(server.target) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        pair = stub.SubmitPreference(reward_pb2.SubmitPreferenceRequest(
            prompt="Say hi.", chosen=" Hello!", rejected=" Go away.", annotator_id="alice",
            policy_versions=["v0", "ppo-3"], preference_id="pref-1",
        ), timeout=30)
        ranking = stub.SubmitPreference(reward_pb2.SubmitPreferenceRequest(
            conversation=conversation(("system", "Be kind."), ("user", "Hi")),
            ranked_responses=["Hello, friend!", "Hello.", "What?"], annotator_id="bob", policy_versions=["v0"],
        ), timeout=30)
    assert pair.preference_id == "pref-1" and pair.topic == kafka.topic(topics.PREFERENCES)
    assert len(ranking.preference_id) == 32 and ranking.offset >= 0
    records = {r.message.preference_id: r for r in read_all(kafka, 2)}
    assert set(records) == {"pref-1", ranking.preference_id}
    first = records["pref-1"]
    assert (first.partition, first.offset) == (pair.partition, pair.offset)
    message = first.message
    assert (message.prompt, message.chosen, message.rejected, message.annotator_id) == (
        "Say hi.", " Hello!", " Go away.", "alice")
    assert list(message.policy_versions) == ["v0", "ppo-3"] and message.schema_version == 1
    assert abs(message.created_at.ToSeconds() - time.time()) < 120
    chat = records[ranking.preference_id].message
    assert [(m.role, m.content) for m in chat.conversation.messages] == [("system", "Be kind."), ("user", "Hi")]
    assert not chat.chat_roles and not chat.chat_contents  # the schema 1.0 layout is never written
    assert list(chat.ranked_responses) == ["Hello, friend!", "Hello.", "What?"] and not chat.prompt


BAD_REQUESTS = [
    (dict(chosen=" a", rejected=" b", annotator_id="x"), "context", "prompt"),
    (dict(prompt="   ", chosen=" a", rejected=" b", annotator_id="x"), "prompt", "is empty"),
    (dict(conversation=conversation(), chosen="a", rejected="b", annotator_id="x"), "conversation.messages", "empty"),
    (dict(conversation=conversation(("user", "")), chosen="a", rejected="b", annotator_id="x"),
     "conversation.messages[0].content", "is empty"),
    (dict(prompt="p", rejected=" b", annotator_id="x"), "chosen", "is empty"),
    (dict(prompt="p", chosen=" b", annotator_id="x"), "rejected", "is empty"),
    (dict(prompt="p", chosen=" a", rejected=" a", annotator_id="x"), "rejected", "identical to chosen"),
    (dict(prompt="p", chosen=" a", ranked_responses=["x", "y"], annotator_id="x"), "chosen", "not both"),
    (dict(prompt="p", ranked_responses=["only"], annotator_id="x"), "ranked_responses", "at least 2"),
    (dict(prompt="p", ranked_responses=["x", "y", "x"], annotator_id="x"), "ranked_responses[2]", "repeats"),
    (dict(prompt="p", ranked_responses=["x", " "], annotator_id="x"), "ranked_responses[1]", "is empty"),
    (dict(prompt="p", chosen=" a", rejected=" b"), "annotator_id", "is empty"),
    (dict(prompt="p", chosen=" a", rejected=" b", annotator_id="x", policy_versions=["a", "b", "c"]),
     "policy_versions", "has 3 entries"),
    (dict(prompt="p", chosen=" a", rejected=" b", annotator_id="x", preference_id="has space"),
     "preference_id", "letters, digits"),
]


def test_bad_preferences_are_invalid_argument_naming_the_field(tiny_models, kafka):
    # Items of up to 4 MiB, so a 2 MB response reaches the record-size check.
    with serve(tiny_models, kafka, sizes=SizeLimits(max_item_bytes=4 * MiB)) as server, \
            grpc.insecure_channel(server.target) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        for fields, field, fragment in BAD_REQUESTS:
            expect_error(
                lambda: stub.SubmitPreference(reward_pb2.SubmitPreferenceRequest(**fields), timeout=10),
                grpc.StatusCode.INVALID_ARGUMENT, f"{field}: ", fragment,
            )
        too_many = reward_pb2.SubmitPreferenceRequest(prompt="p", ranked_responses=[f"r{i}" for i in range(17)],
                                                      annotator_id="x")
        expect_error(lambda: stub.SubmitPreference(too_many, timeout=10), grpc.StatusCode.RESOURCE_EXHAUSTED, "16")
        huge = reward_pb2.SubmitPreferenceRequest(prompt="p", chosen="a" * 2_000_000, rejected="b", annotator_id="x")
        expect_error(lambda: stub.SubmitPreference(huge, timeout=10), grpc.StatusCode.RESOURCE_EXHAUSTED,
                     "shorten the responses")
        # prompt + rejected is what RM training tokenizes: one item, over 4 MiB.
        over_item = reward_pb2.SubmitPreferenceRequest(prompt="p" * (2 * MiB), chosen="a", rejected="b" * (2 * MiB + 1),
                                                       annotator_id="x")
        expect_error(lambda: stub.SubmitPreference(over_item, timeout=10), grpc.StatusCode.RESOURCE_EXHAUSTED,
                     f"prompt + rejected: is {4 * MiB + 1} bytes, over the limit of {4 * MiB} per item")
    assert read_all(kafka, 1, timeout_s=2) == []  # nothing invalid was produced


def test_without_kafka_or_topic_or_broker(tiny_models, kafka):
    request = reward_pb2.SubmitPreferenceRequest(prompt="p", chosen=" a", rejected=" b", annotator_id="x")
    unreachable = KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}", request_timeout_ms=2000)
    no_topic = kafka.with_overrides(topic_prefix=kafka.topic_prefix + "missing.")
    cases = [
        (None, grpc.StatusCode.FAILED_PRECONDITION, "no Kafka settings"),
        (no_topic, grpc.StatusCode.FAILED_PRECONDITION, "does not exist"),
        (unreachable, grpc.StatusCode.UNAVAILABLE, "no Kafka broker reachable"),
    ]
    for settings, code, fragment in cases:
        with serve(tiny_models, settings) as server, grpc.insecure_channel(server.target) as channel:
            stub = reward_pb2_grpc.RewardServiceStub(channel)
            started = time.monotonic()
            expect_error(lambda: stub.SubmitPreference(request, timeout=30), code, fragment)
            assert time.monotonic() - started < 10
            # Validation still comes first; scoring is unaffected.
            expect_error(
                lambda: stub.SubmitPreference(reward_pb2.SubmitPreferenceRequest(prompt="p"), timeout=10),
                grpc.StatusCode.INVALID_ARGUMENT, "chosen",
            )
            score = stub.Score(reward_pb2.ScoreRequest(
                inputs=[reward_pb2.RewardInput(text=reward_pb2.TextPair(prompt="p", response=" ok"))]), timeout=10)
            assert score.model_version == "v0"


def test_train_from_the_topic(tiny_models, kafka, tmp_path, capsys):
    rows = rule_rows(40, seed=5, rankings_every=5)
    with serve(tiny_models, kafka) as server, grpc.insecure_channel(server.target) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        for i, row in enumerate(rows):
            if "ranking" in row:
                ranked = [row["responses"][j] for j in row["ranking"]]
                request = reward_pb2.SubmitPreferenceRequest(prompt=row["prompt"], ranked_responses=ranked)
            else:
                request = reward_pb2.SubmitPreferenceRequest(
                    prompt=row["prompt"], chosen=row["chosen"], rejected=row["rejected"])
            request.annotator_id, request.preference_id = f"annotator-{i % 3}", f"p{i}"
            stub.SubmitPreference(request, timeout=30)
        # A client retry after a lost answer: the same preference id again.
        request.preference_id = "p0"
        stub.SubmitPreference(request, timeout=30)

    config = tmp_path / "rm.yaml"
    kafka_yaml = json.dumps({"bootstrap_servers": kafka.bootstrap_servers[0], "topic_prefix": kafka.topic_prefix,
                             "session_timeout_ms": 6000, "client_id": "rm-trainer"})
    config.write_text(
        f"model_dir: {tiny_models['policy']}\nregistry: {tmp_path / 'registry'}\nname: human-rm\n"
        f"eval_fraction: 0.2\nepochs: 1\nbatch_size: 8\nlearning_rate: 1.0e-3\n"
        f"topic: {{idle_timeout_s: 2.0}}\nkafka: {kafka_yaml}\n"
    )
    assert cli_main(["train", "rm", "--config", str(config), "--from-topic", "--no-progress", "--json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert "read 41 preference(s)" in captured.err
    # 41 records, 40 distinct preferences (the retried one is trained on once).
    assert out["version"] == "v1" and out["metrics"]["train_examples"] + out["metrics"]["eval_examples"] == 40
    meta = json.loads((tmp_path / "registry" / "human-rm" / "v1" / "arbiter.json").read_text())
    assert meta["training"]["from_topic"] == {
        "records": 41, "examples": 40, "duplicates": 1, "skipped": 0, "skipped_reasons": {}, "replay": False}

    # The group's offsets were committed after publishing: nothing is new now;
    # a replay still sees everything.
    with read_preferences(kafka, TopicConfig(idle_timeout_s=1.0)) as again:
        assert again.records == 0
    with read_preferences(kafka, TopicConfig(idle_timeout_s=1.0, replay=True)) as replay:
        assert replay.records == 41 and len(replay.examples) == 40 and replay.duplicates == 1
        ranked = next(e for e in replay.examples if e.k == 3)
        assert ranked.source.startswith(kafka.topic(topics.PREFERENCES))


def test_arbiter_rm_submit_sends_a_labelled_file(tiny_models, kafka, tmp_path, capsys):
    rows = [
        {"prompt": "Q?", "chosen": " yes!", "rejected": " no.", "id": "f-1", "policy_versions": ["v0", "v1"]},
        {"prompt": "Q?", "responses": [" b", " a", " c"], "ranking": [1, 0, 2], "annotator_id": "carol"},
        {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello!", "rejected": "Bye."},
    ]
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with serve(tiny_models, kafka) as server:
        assert cli_main(["rm", "submit", "--target", server.target, "--file", str(path), "--annotator", "dave"]) == 0
        answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [a["line"] for a in answers] == [f"{path}:1", f"{path}:2", f"{path}:3"] and answers[0]["preference_id"] == "f-1"
        path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"prompt": "Q?", "chosen": " same", "rejected": " same"}) + "\n")
        assert cli_main(["rm", "submit", "--target", server.target, "--file", str(path)]) == 2
        assert f"{path}:2: rejected: is identical to chosen" in capsys.readouterr().err
        path.write_text(json.dumps({"prompt": "Q?", "chosen": " a", "rejected": " b"}) + "\n")
        assert cli_main(["rm", "submit", "--target", server.target, "--file", str(path)]) == 1
        assert f"{path}:1: INVALID_ARGUMENT: annotator_id: is empty" in capsys.readouterr().err
    by_id = {r.message.preference_id: r.message for r in read_all(kafka, 3)}
    first = by_id["f-1"]
    assert (first.chosen, first.annotator_id, list(first.policy_versions)) == (" yes!", "dave", ["v0", "v1"])
    ranked = next(m for m in by_id.values() if m.ranked_responses)
    assert list(ranked.ranked_responses) == [" a", " b", " c"] and ranked.annotator_id == "carol"
    chat = next(m for m in by_id.values() if m.conversation.messages)
    assert ([m.content for m in chat.conversation.messages], chat.chosen, chat.rejected) == (["Hi"], "Hello!", "Bye.")
