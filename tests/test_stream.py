"""The Kafka streaming layer against a real Kafka-protocol broker (Tansu, in memory).

Topics are per test (``kafka_settings`` prefixes them); group joins take ~3 s
with the 6 s session timeout, so only the group tests pay for them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import kafka.errors
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from helpers import drain

from arbiter.config import ConfigError
from arbiter.errors import InvalidInput
from arbiter.stream import (
    BrokerError,
    CommitError,
    ConsumerObserver,
    KafkaSettings,
    PayloadError,
    ProduceError,
    ProducerObserver,
    ProducerStats,
    SchemaVersionError,
    StreamConsumer,
    StreamProducer,
    TopicError,
    TopicPartition,
    add_kafka_arguments,
    cluster_id,
    codec,
    delete_topics,
    ensure_topics,
    kafka_settings_from_args,
    list_topics,
    merge_offsets,
    next_offsets,
    offsets_from_json,
    offsets_to_json,
    topics,
)
from arbiter.stream.broker import LocalBroker, find_tansu_binary
from arbiter.types import ChatMessage, Prompt
from arbiter.v1 import policy_pb2, rollout_pb2

REPO = Path(__file__).resolve().parents[1]


def make_rollout(index: int, prompt_id: str | None = None, completion_bytes: int = 40) -> rollout_pb2.Rollout:
    rollout = rollout_pb2.Rollout(
        rollout_id=f"r-{index}",
        prompt_id=prompt_id or f"p-{index % 7}",
        sample_index=index,
        prompt_token_ids=[1, 2, 3, index % 100],
        completion_token_ids=[4, 5, 6],
        sampling_logprobs=[-0.5, -1.25, -2.0],
        reference_logprobs=[-0.75, -1.0, -2.5],
        reward=0.125 * index,
        reward_normalized=-0.5,
        reward_normalization_applied=True,
        policy_version="policy-v3",
        reward_model_version="rm-v1",
        reference_model_version="ref-v0",
        finish_reason=policy_pb2.FINISH_REASON_EOS,
        prompt_text="Say something nice.",
        completion_text="x" * completion_bytes,
        worker_id="worker-0",
        created_at=Timestamp(seconds=1_700_000_000 + index, nanos=5),
        tokenizer_fingerprint="sha256:abc",
        group_id=f"g-{index // 4}",
    )
    if index % 2:
        rollout.gold_score = 0.25
    return rollout


def produce(settings: KafkaSettings, rollouts, topic: str = topics.ROLLOUTS):
    with StreamProducer(settings) as producer:
        futures = [producer.send(topic, r) for r in rollouts]
        producer.flush(timeout_s=30)
        return [f.result(timeout=0) for f in futures]


# -- settings and codec (no broker) ------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field", "text"),
    [
        ({"bootstrap_servers": ""}, "bootstrap_servers", "at least one"),
        ({"bootstrap_servers": "localhost"}, "bootstrap_servers", "is not host:port"),
        ({"bootstrap_servers": "h:1,h:70000"}, "bootstrap_servers", "'h:70000'"),
        ({"security_protocol": "TLS"}, "security_protocol", "PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL"),
        ({"security_protocol": "SASL_SSL"}, "sasl_mechanism", "required by security_protocol=SASL_SSL"),
        ({"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_username": "u"},
         "sasl_password", "required with sasl_mechanism=PLAIN"),
        ({"sasl_username": "u"}, "sasl_username", "does not use SASL"),
        ({"ssl_cafile": "/nonexistent/ca.pem"}, "ssl_cafile", "does not use TLS"),
        ({"security_protocol": "SSL", "ssl_cafile": "/nonexistent/ca.pem"}, "ssl_cafile", "must be an existing file"),
        ({"session_timeout_ms": 10}, "session_timeout_ms", "1000..1800000"),
        ({"heartbeat_interval_ms": 6000, "session_timeout_ms": 6000}, "heartbeat_interval_ms", "100..5999"),
        ({"compression_type": "brotli"}, "compression_type", "gzip, snappy, lz4, zstd"),
        ({"topic_prefix": "a b"}, "topic_prefix", "letters, digits"),
        ({"replication_factor": 0}, "replication_factor", "-1 (cluster default)"),
        ({"client_id": ""}, "client_id", "must not be empty"),
        ({"max_record_bytes": 1000}, "max_record_bytes", "max_request_size (1048576)..1 GiB"),
    ],
)
def test_settings_errors_name_the_field(changes, field, text):
    with pytest.raises(ConfigError) as err:
        KafkaSettings(**changes)
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}=")
    assert "is invalid: " in str(err.value)
    assert text in str(err.value)


def test_settings_from_env_and_secrets_stay_hidden(tmp_path):
    password_file = tmp_path / "pw"
    password_file.write_text("s3cret-password\n")
    env = {
        "ARBITER_KAFKA_BOOTSTRAP_SERVERS": "k1:9093, k2:9093",
        "ARBITER_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "ARBITER_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "ARBITER_KAFKA_SASL_USERNAME": "trainer",
        "ARBITER_KAFKA_SASL_PASSWORD_FILE": str(password_file),
        "ARBITER_KAFKA_SESSION_TIMEOUT_MS": "6000",
        "ARBITER_KAFKA_SSL_CHECK_HOSTNAME": "false",
    }
    settings = KafkaSettings.from_env(env, client_id="t1")
    assert settings.bootstrap_servers == ("k1:9093", "k2:9093")
    assert settings.sasl_password == "s3cret-password"
    assert settings.session_timeout_ms == 6000 and settings.ssl_check_hostname is False
    assert settings.client_id == "t1"
    assert "s3cret" not in repr(settings)
    with pytest.raises(
        ConfigError, match=r"^session_timeout_ms='6s' is invalid: ARBITER_KAFKA_SESSION_TIMEOUT_MS must be an integer$"
    ):
        KafkaSettings.from_env({"ARBITER_KAFKA_SESSION_TIMEOUT_MS": "6s"})
    with pytest.raises(ConfigError, match=r"^ssl_check_hostname='maybe' is invalid: ARBITER_KAFKA_SSL_CHECK_HOSTNAME must"):
        KafkaSettings.from_env({"ARBITER_KAFKA_SSL_CHECK_HOSTNAME": "maybe"})
    with pytest.raises(ConfigError, match="^sasl_password='\\*\\*\\*' is invalid: must be unset") as err:
        KafkaSettings(sasl_password="s3cret-password")
    assert "s3cret" not in str(err.value)
    assert KafkaSettings(topic_prefix="dev.").topic(topics.ROLLOUTS) == "dev.rollouts"


def test_settings_from_command_line(monkeypatch):
    import argparse

    monkeypatch.setenv("ARBITER_KAFKA_CLIENT_ID", "from-env")
    monkeypatch.setenv("ARBITER_KAFKA_BOOTSTRAP_SERVERS", "env:9092")
    parser = argparse.ArgumentParser()
    add_kafka_arguments(parser)
    args = parser.parse_args(["--kafka-bootstrap-servers", "a:1,b:2", "--kafka-topic-prefix", "staging."])
    settings = kafka_settings_from_args(args, session_timeout_ms=6000)
    assert settings.bootstrap_servers == ("a:1", "b:2")  # flags win over the environment
    assert (settings.client_id, settings.topic_prefix, settings.session_timeout_ms) == ("from-env", "staging.", 6000)
    # Poison handling: a 4 MiB record-size guard and no dead letters unless asked for.
    assert (settings.max_record_bytes, settings.dead_letter) == (4 * 1024 * 1024, False)
    args = parser.parse_args(["--kafka-dead-letter", "--kafka-max-record-bytes", "2097152"])
    assert (kafka_settings_from_args(args).max_record_bytes, kafka_settings_from_args(args).dead_letter) == (
        2 * 1024 * 1024, True)
    with pytest.raises(ConfigError, match="^bootstrap_servers='nope' is invalid: 'nope' is not host:port"):
        kafka_settings_from_args(parser.parse_args(["--kafka-bootstrap-servers", "nope"]))


def test_codec_round_trip_stamps_version_on_a_copy():
    rollout = make_rollout(3)
    encoded = codec.encode(topics.ROLLOUTS, rollout, producer="w1")
    assert rollout.schema_version == 0  # the caller's message is untouched
    assert encoded.key == b"p-3"
    headers = dict(encoded.headers)
    assert headers == {
        "content-type": b"application/x-protobuf",
        "arbiter-schema-version": b"1.1",
        "arbiter-message-type": b"arbiter.v1.Rollout",
        "arbiter-producer": b"w1",
    }
    decoded, version = codec.decode(topics.ROLLOUTS, encoded.value, headers)
    assert version == "1.1"
    expected = rollout_pb2.Rollout()
    expected.CopyFrom(rollout)
    expected.schema_version = 1
    assert decoded == expected
    # A newer minor only adds fields: still read.
    decoded, version = codec.decode(topics.ROLLOUTS, encoded.value, {**headers, "arbiter-schema-version": b"1.7"})
    assert version == "1.7" and decoded.rollout_id == "r-3"


def test_codec_refuses_ambiguous_payloads():
    rollout = make_rollout(1)
    encoded = codec.encode(topics.ROLLOUTS, rollout)
    headers = dict(encoded.headers)
    with pytest.raises(SchemaVersionError) as err:
        codec.decode(topics.ROLLOUTS, encoded.value, {**headers, "arbiter-schema-version": b"2.0"}, "t[0]@5")
    assert str(err.value) == (
        "t[0]@5: arbiter.v1.Rollout schema version 2.0 is not readable by this build "
        "(reads major 1, writes 1.1): upgrade the consumer"
    )
    v2 = rollout_pb2.Rollout()
    v2.CopyFrom(rollout)
    v2.schema_version = 2
    with pytest.raises(PayloadError, match="payload schema_version 2 contradicts header arbiter-schema-version=1.1"):
        codec.decode(topics.ROLLOUTS, v2.SerializeToString(), headers)
    with pytest.raises(PayloadError, match="'rollouts' carries arbiter.v1.Rollout, record is arbiter.v1.Preference"):
        codec.decode(topics.ROLLOUTS, encoded.value, {**headers, "arbiter-message-type": b"arbiter.v1.Preference"})
    missing = {k: v for k, v in headers.items() if k != "arbiter-schema-version"}
    with pytest.raises(PayloadError, match="missing header 'arbiter-schema-version'"):
        codec.decode(topics.ROLLOUTS, encoded.value, missing)
    with pytest.raises(PayloadError, match="is not MAJOR.MINOR"):
        codec.decode(topics.ROLLOUTS, encoded.value, {**headers, "arbiter-schema-version": b"1"})
    with pytest.raises(PayloadError, match="content type 'application/json'"):
        codec.decode(topics.ROLLOUTS, encoded.value, {**headers, "content-type": b"application/json"})
    with pytest.raises(PayloadError, match="invalid arbiter.v1.Rollout payload"):
        codec.decode(topics.ROLLOUTS, b"\xff\xff\xff", headers)
    with pytest.raises(PayloadError, match="tombstone"):
        codec.decode(topics.ROLLOUTS, None, headers)

    with pytest.raises(InvalidInput, match="^message: topic 'rollouts' carries arbiter.v1.Rollout, got Preference$"):
        codec.encode(topics.ROLLOUTS, rollout_pb2.Preference(preference_id="x"))
    with pytest.raises(InvalidInput, match="^prompt_id: required: it is the record key of topic 'rollouts'$"):
        codec.encode(topics.ROLLOUTS, rollout_pb2.Rollout(rollout_id="r"))
    with pytest.raises(InvalidInput, match="^schema_version: this build writes schema major 1, message has 2$"):
        codec.encode(topics.ROLLOUTS, v2)
    with pytest.raises(ValueError, match="unknown topic 'rollout'"):
        codec.encode("rollout", rollout)


HEADERS_1_0 = {"content-type": b"application/x-protobuf", "arbiter-schema-version": b"1.0"}


def written_by_1_0(message) -> tuple[bytes, dict[str, bytes]]:
    """Value and headers as a schema 1.0 producer wrote them (chats as parallel lists)."""
    type_name = message.DESCRIPTOR.full_name.encode()
    return message.SerializeToString(), {**HEADERS_1_0, "arbiter-message-type": type_name}


def test_records_in_the_1_0_chat_layout_still_decode():
    old_prompt = rollout_pb2.PromptRecord(
        schema_version=1, prompt_id="p1", chat_roles=["system", "user"], chat_contents=["Be brief.", "Hi"]
    )
    decoded, version = codec.decode(topics.PROMPTS, *written_by_1_0(old_prompt), "prompts[2]@9")
    assert version == "1.0"
    assert [(m.role, m.content) for m in decoded.conversation.messages] == [("system", "Be brief."), ("user", "Hi")]
    assert not decoded.chat_roles and not decoded.chat_contents  # consumers see one layout
    chat = (ChatMessage("system", "Be brief."), ChatMessage("user", "Hi"))
    assert codec.prompt_from_record(decoded) == Prompt(messages=chat, id="p1")
    plain, _ = codec.decode(topics.PROMPTS, *written_by_1_0(rollout_pb2.PromptRecord(
        schema_version=1, prompt_id="p2", text="Say hi.")))
    assert codec.prompt_from_record(plain) == Prompt(text="Say hi.", id="p2")

    old_preference = rollout_pb2.Preference(
        schema_version=1, preference_id="f1", chat_roles=["user"], chat_contents=["Hi"], chosen="Hello!",
        rejected="Bye.",
    )
    decoded, _ = codec.decode(topics.PREFERENCES, *written_by_1_0(old_preference))
    assert codec.preference_to_row(decoded) == {
        "prompt": [{"role": "user", "content": "Hi"}], "id": "f1", "chosen": "Hello!", "rejected": "Bye.",
    }

    # Lists of different lengths cannot be paired up: refused, with the record's location.
    broken = rollout_pb2.PromptRecord(schema_version=1, prompt_id="p3", chat_roles=["user", "user"], chat_contents=["Hi"])
    with pytest.raises(PayloadError, match=r"^prompts\[0\]@3: has 2 chat_roles but 1 chat_contents$"):
        codec.decode(topics.PROMPTS, *written_by_1_0(broken), "prompts[0]@3")
    both = rollout_pb2.PromptRecord(schema_version=1, prompt_id="p4", chat_roles=["user"], chat_contents=["Hi"])
    both.conversation.messages.add(role="user", content="Hello")
    with pytest.raises(PayloadError, match="sets both conversation and the 1.0 chat_roles/chat_contents"):
        codec.decode(topics.PROMPTS, *written_by_1_0(both))

    # A message still built in the 1.0 layout is written in the 1.1 one (on a copy).
    encoded = codec.encode(topics.PROMPTS, old_prompt)
    assert dict(encoded.headers)["arbiter-schema-version"] == b"1.1"
    wire = rollout_pb2.PromptRecord.FromString(encoded.value)
    assert not wire.chat_roles and [m.content for m in wire.conversation.messages] == ["Be brief.", "Hi"]
    assert list(old_prompt.chat_roles) == ["system", "user"] and not old_prompt.conversation.messages
    with pytest.raises(InvalidInput, match="^message: has 2 chat_roles but 1 chat_contents$"):
        codec.encode(topics.PROMPTS, broken)


def test_prompt_records_round_trip_through_the_codec():
    text = Prompt(text="Write a haiku about the sea.", id="p-1")
    chat = Prompt(messages=(ChatMessage("system", "Be kind."), ChatMessage("user", "How was the movie?")), id="p-2")
    for prompt in (text, chat):
        encoded = codec.encode(topics.PROMPTS, codec.prompt_to_record(prompt))
        assert encoded.key == prompt.id.encode()
        decoded, _ = codec.decode(topics.PROMPTS, encoded.value, dict(encoded.headers))
        assert codec.prompt_from_record(decoded) == prompt
    assert not codec.prompt_to_record(chat).text and not codec.prompt_to_record(text).conversation.messages


def chat_record(*turns, **fields):
    record = rollout_pb2.PromptRecord(**fields)
    for role, content in turns:
        record.conversation.messages.add(role=role, content=content)
    return record


@pytest.mark.parametrize(("record", "message"), [
    (rollout_pb2.PromptRecord(text="Hi"), "prompt_id is empty"),
    (chat_record(("user", "Hi"), prompt_id="p", text="Hi"), "sets both text and a conversation; use one"),
    (rollout_pb2.PromptRecord(prompt_id="p", text="  "), "has neither text nor a conversation"),
    (rollout_pb2.PromptRecord(prompt_id="p"), "has neither text nor a conversation"),
    (chat_record(("user", "Hi"), ("user", " "), prompt_id="p"), "conversation.messages[1] has an empty role or content"),
    (chat_record(("", "Hi"), prompt_id="p"), "conversation.messages[0] has an empty role or content"),
    (chat_record(("user", "Hi"), ("assistant", "Hello"), prompt_id="p"),
     "the conversation ends with an assistant turn; end with the turn to answer"),
])
def test_unusable_prompt_records_are_refused_saying_where_and_why(record, message):
    with pytest.raises(PayloadError) as err:
        codec.prompt_from_record(record, "prompts[1]@7")
    assert str(err.value) == f"prompts[1]@7: {message}"
    with pytest.raises(PayloadError) as err:
        codec.prompt_from_record(record)
    assert str(err.value) == f"prompt record {record.prompt_id!r}: {message}"


def test_preference_rows_are_the_training_format():
    pair = rollout_pb2.Preference(preference_id="f1", prompt="Q?", chosen=" yes", rejected=" no")
    assert codec.preference_to_row(pair) == {"prompt": "Q?", "id": "f1", "chosen": " yes", "rejected": " no"}
    ranking = rollout_pb2.Preference(preference_id="f2", ranked_responses=["a", "b", "c"])
    ranking.conversation.messages.add(role="user", content="Hi")
    assert codec.preference_to_row(ranking) == {
        "prompt": [{"role": "user", "content": "Hi"}], "id": "f2", "responses": ["a", "b", "c"], "ranking": [0, 1, 2],
    }


def test_offset_helpers():
    a, b = TopicPartition("t", 0), TopicPartition("t", 1)
    assert merge_offsets({a: 5, b: 2}, {a: 3, b: 9}) == {a: 5, b: 9}
    data = json.loads(json.dumps(offsets_to_json({a: 5, b: 9})))
    assert data == {"t": {"0": 5, "1": 9}}
    assert offsets_from_json(data) == {a: 5, b: 9}
    with pytest.raises(ValueError, match=r"offsets\['t'\]\[0\]: must be >= 0, got -1"):
        offsets_from_json({"t": {"0": -1}})


# -- broker ------------------------------------------------------------------------


def test_local_broker_lifecycle(tmp_path, kafka_broker):
    assert find_tansu_binary().is_file()
    assert kafka_broker.running()
    with pytest.raises(BrokerError, match=f"{kafka_broker.bootstrap_servers} is already in use"):
        LocalBroker(kafka_broker.port).start()
    broker = LocalBroker(log_path=tmp_path / "b.log")
    with broker:
        assert broker.running()
        assert f"listening on: tcp://{broker.bootstrap_servers}" in broker.log_text()
        pid = broker.pid
    assert not broker.running()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_cluster_id_names_the_log_durable_keeps_it_memory_does_not(tmp_path):
    durable = LocalBroker(log_path=tmp_path / "durable.log", storage="s3", data_dir=tmp_path / "data")
    with durable:
        first = cluster_id(durable.settings())
        durable.kill()
        durable.restart()
        # Same data, same log: the id survives a crash and a restart.
        assert cluster_id(durable.settings()) == first == durable.cluster_id
    with LocalBroker(log_path=tmp_path / "again.log", storage="s3", data_dir=tmp_path / "data") as again:
        assert cluster_id(again.settings()) == first
    with LocalBroker(log_path=tmp_path / "memory.log") as memory:
        in_memory = cluster_id(memory.settings())
        memory.kill()
        memory.restart()
        # An empty log after a restart is another log.
        assert cluster_id(memory.settings()) not in (in_memory, first)


def test_a_producer_left_fatal_by_its_client_is_replaced_and_delivers(kafka_settings):
    ensure_topics(kafka_settings, {topics.ROLLOUTS: 1})
    with StreamProducer(kafka_settings) as producer:
        producer.send(topics.ROLLOUTS, make_rollout(0)).result(10)
        # What an InitProducerId answered with an unretriable error (a broker
        # whose storage is restarting) leaves behind: every later send fails.
        producer._producer._transaction_manager.transition_to_fatal_error(
            kafka.errors.KafkaError("InitProducerId: UnknownServerError"))
        delivery = producer.send(topics.ROLLOUTS, make_rollout(1)).result(10)
        assert delivery.offset == 1
        producer.flush(10)
        assert producer.stats().rebuilds == 1 and producer.stats().failed == 0


def test_cli_broker_writes_ready_file_and_stops_on_sigterm(tmp_path):
    ready = tmp_path / "ready"
    process = subprocess.Popen(
        [sys.executable, "-m", "cli", "broker", "--port", "0", "--create-topics",
         "--ready-file", str(ready), "--log-file", str(tmp_path / "tansu.log"), "--data-dir", str(tmp_path / "data")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        bootstrap, pid_line = ready.read_text().splitlines()
        tansu_pid = int(pid_line.removeprefix("tansu_pid="))
        settings = KafkaSettings(bootstrap_servers=bootstrap)
        assert ensure_topics(settings, dict(topics.DEFAULT_PARTITIONS)) == {
            "rollouts": 8, "policy-updates": 1, "prompts": 8, "preferences": 4,
        }
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert not ready.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(tansu_pid, 0)


def test_ensure_topics_is_idempotent_and_refuses_too_few_partitions(kafka_settings):
    wanted = {topics.ROLLOUTS: 4, topics.POLICY_UPDATES: 1}
    prefix = kafka_settings.topic_prefix
    assert ensure_topics(kafka_settings, wanted) == {f"{prefix}rollouts": 4, f"{prefix}policy-updates": 1}
    assert ensure_topics(kafka_settings, wanted) == {f"{prefix}rollouts": 4, f"{prefix}policy-updates": 1}
    # More partitions than asked is fine (keys were never spread over fewer).
    assert ensure_topics(kafka_settings, {topics.ROLLOUTS: 2}) == {f"{prefix}rollouts": 4}
    with pytest.raises(TopicError) as err:
        ensure_topics(kafka_settings, {topics.ROLLOUTS: 8})
    assert str(err.value).startswith(f"topic '{prefix}rollouts' exists with 4 partitions but 8 are required")
    with pytest.raises(TopicError, match=r"partitions\['prompts'\]: must be an integer >= 1, got 0"):
        ensure_topics(kafka_settings, {topics.PROMPTS: 0})
    with pytest.raises(TopicError, match=f"topics do not exist: {prefix}prompts"):
        StreamConsumer(kafka_settings, [topics.PROMPTS], group_id=None)
    # The way out of "too few partitions": recreate.
    delete_topics(kafka_settings, [topics.ROLLOUTS, topics.PROMPTS])
    assert f"{prefix}rollouts" not in list_topics(kafka_settings)
    assert ensure_topics(kafka_settings, {topics.ROLLOUTS: 8}) == {f"{prefix}rollouts": 8}


def test_rollout_round_trip_with_headers(kafka_settings):
    ensure_topics(kafka_settings, {topics.ROLLOUTS: 4})
    rollouts = [make_rollout(i) for i in range(12)]
    deliveries = produce(kafka_settings, rollouts)
    wire = kafka_settings.topic(topics.ROLLOUTS)
    assert all(d.topic == wire for d in deliveries)
    with StreamConsumer(kafka_settings, [topics.ROLLOUTS], group_id=None) as consumer:
        records = drain(consumer, len(rollouts))
    assert len(records) == len(rollouts)
    by_id = {r.message.rollout_id: r for r in records}
    for rollout, delivery in zip(rollouts, deliveries):
        record = by_id[rollout.rollout_id]
        expected = rollout_pb2.Rollout()
        expected.CopyFrom(rollout)
        expected.schema_version = codec.SCHEMA_MAJOR
        assert record.message == expected
        assert record.message.HasField("gold_score") == rollout.HasField("gold_score")
        assert (record.topic, record.partition, record.offset) == (delivery.topic, delivery.partition, delivery.offset)
        assert record.key == rollout.prompt_id
        assert record.schema_version == "1.1"
        assert record.headers["content-type"] == b"application/x-protobuf"
        assert record.headers["arbiter-message-type"] == b"arbiter.v1.Rollout"
        assert record.headers["arbiter-producer"] == b"arbiter-test"
        assert record.size_bytes == len(expected.SerializeToString())


def test_unknown_schema_major_is_refused_not_skipped(kafka_settings):
    from kafka import KafkaProducer  # a foreign (newer) producer, bypassing our codec

    ensure_topics(kafka_settings, {topics.ROLLOUTS: 1})
    produce(kafka_settings, [make_rollout(0)])
    future_rollout = make_rollout(1)
    future_rollout.schema_version = 2
    raw = KafkaProducer(bootstrap_servers=list(kafka_settings.bootstrap_servers))
    raw.send(
        kafka_settings.topic(topics.ROLLOUTS), key=b"p-1", value=future_rollout.SerializeToString(),
        headers=[("content-type", b"application/x-protobuf"), ("arbiter-schema-version", b"2.0"),
                 ("arbiter-message-type", b"arbiter.v1.Rollout")],
    ).get(10)
    raw.close()
    produce(kafka_settings, [make_rollout(2)])
    wire = kafka_settings.topic(topics.ROLLOUTS)

    with StreamConsumer(kafka_settings, [topics.ROLLOUTS], group_id=None) as consumer:
        deadline = time.monotonic() + 20
        with pytest.raises(SchemaVersionError) as err:
            while time.monotonic() < deadline:
                consumer.poll(timeout_s=0.5)
        assert str(err.value).startswith(f"{wire}[0]@1: arbiter.v1.Rollout schema version 2.0 is not readable")
        # Rewound, not skipped: the same record refuses again, and nothing was delivered.
        with pytest.raises(SchemaVersionError):
            while time.monotonic() < deadline:
                consumer.poll(timeout_s=0.5)
        assert consumer.stats().records == 0

    # Opting in to skipping: the bad record is reported and counted as consumed.
    rejected_seen = []

    class Observer(ConsumerObserver):
        def on_rejected(self, record):
            rejected_seen.append(record.offset)

    with StreamConsumer(kafka_settings, [topics.ROLLOUTS], group_id=None, skip_invalid=True,
                        observer=Observer()) as consumer:
        records, rejected = [], []
        deadline = time.monotonic() + 20
        while len(records) + len(rejected) < 3 and time.monotonic() < deadline:
            batch = consumer.poll(timeout_s=0.5)
            records += batch.records
            rejected += batch.rejected
        assert [r.message.rollout_id for r in records] == ["r-0", "r-2"]
        assert [(r.offset, type(r.error)) for r in rejected] == [(1, SchemaVersionError)]
        assert rejected_seen == [1]
        assert next_offsets([*records, *rejected]) == {TopicPartition(wire, 0): 3}
        assert consumer.positions() == {TopicPartition(wire, 0): 3}
        assert consumer.stats().rejected == 1


def test_same_prompt_id_lands_in_one_partition_in_order(kafka_settings):
    ensure_topics(kafka_settings, {topics.ROLLOUTS: 8})
    rollouts = [make_rollout(i, prompt_id=f"prompt-{i % 10}") for i in range(60)]
    deliveries = produce(kafka_settings, rollouts)
    partitions: dict[str, set[int]] = defaultdict(set)
    offsets: dict[str, list[int]] = defaultdict(list)
    for rollout, delivery in zip(rollouts, deliveries):
        partitions[rollout.prompt_id].add(delivery.partition)
        offsets[rollout.prompt_id].append(delivery.offset)
    assert all(len(p) == 1 for p in partitions.values()), partitions
    assert all(o == sorted(o) for o in offsets.values())
    assert len({next(iter(p)) for p in partitions.values()}) >= 3  # keys do spread


def test_two_producers_at_once(kafka_settings):
    ensure_topics(kafka_settings, {topics.ROLLOUTS: 4})
    per_worker = 150
    errors = []

    def worker(name: str) -> None:
        try:
            settings = kafka_settings.with_overrides(client_id=name)
            rollouts = []
            for i in range(per_worker):
                rollout = make_rollout(i, prompt_id=f"prompt-{i % 9}")
                rollout.rollout_id = f"{name}-{i}"
                rollout.worker_id = name
                rollouts.append(rollout)
            produce(settings, rollouts)
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(f"worker-{n}",)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    with StreamConsumer(kafka_settings, [topics.ROLLOUTS], group_id=None) as consumer:
        records = drain(consumer, 2 * per_worker)
    ids = Counter(r.message.rollout_id for r in records)
    assert len(ids) == 2 * per_worker and set(ids.values()) == {1}
    assert Counter(r.headers["arbiter-producer"] for r in records) == {b"worker-0": per_worker, b"worker-1": per_worker}
    partition_of: dict[str, set[int]] = defaultdict(set)
    for record in records:
        partition_of[record.key].add(record.partition)
    assert all(len(p) == 1 for p in partition_of.values())
    # Each worker's samples of one prompt keep their order.
    for name in ("worker-0", "worker-1"):
        for prompt in partition_of:
            mine = [r for r in records if r.message.worker_id == name and r.key == prompt]
            assert [r.message.sample_index for r in mine] == sorted(r.message.sample_index for r in mine)


def test_producer_failures_are_counted_and_raised(kafka_settings):
    failures = []

    class Observer(ProducerObserver):
        def on_failed(self, topic, error):
            failures.append((topic, type(error)))

    ensure_topics(kafka_settings, {topics.ROLLOUTS: 1})
    settings = kafka_settings.with_overrides(max_block_ms=300, max_request_size=4096)
    with StreamProducer(settings, observer=Observer()) as producer:
        # Checked with an admin request: the dev broker would auto-create it (4 partitions).
        with pytest.raises(TopicError, match=r"^topic '.*prompts' does not exist \(create it with ensure_topics"):
            producer.send(topics.PROMPTS, rollout_pb2.PromptRecord(prompt_id="p", text="hi"))
        with pytest.raises(ProduceError, match="MessageSizeTooLargeError"):
            producer.send(topics.ROLLOUTS, make_rollout(0, completion_bytes=8000))
        ok = producer.send(topics.ROLLOUTS, make_rollout(1))
        producer.flush(10)  # failures raised by send() are not raised again
        assert ok.result(0).offset == 0
        size = len(codec.encode(topics.ROLLOUTS, make_rollout(1)).value)
        assert producer.stats() == ProducerStats(sent=3, delivered=1, failed=2, delivered_bytes=size)
    assert kafka_settings.topic(topics.PROMPTS) not in list_topics(kafka_settings)
    assert failures == [(kafka_settings.topic(topics.PROMPTS), TopicError),
                        (kafka_settings.topic(topics.ROLLOUTS), ProduceError)]


def test_records_lost_with_the_broker_fail_flush(tmp_path):
    failures = []

    class Observer(ProducerObserver):
        def on_failed(self, topic, error):
            failures.append(topic)

    with LocalBroker(log_path=tmp_path / "doomed.log") as broker:
        settings = broker.settings(request_timeout_ms=1000, delivery_timeout_ms=1500, linger_ms=0)
        ensure_topics(settings, {topics.ROLLOUTS: 1})
        producer = StreamProducer(settings, observer=Observer())
        producer.send(topics.ROLLOUTS, make_rollout(0)).result(10)
        broker.kill()
        futures = [producer.send(topics.ROLLOUTS, make_rollout(i)) for i in range(1, 4)]
        with pytest.raises(ProduceError, match=r"^3 record\(s\) were not acknowledged; first: rollouts: record not ackn"):
            producer.flush(30)
        assert all(isinstance(f.exception(0), ProduceError) for f in futures)
        assert producer.stats().failed == 3 and producer.stats().delivered == 1 and producer.stats().in_flight == 0
        assert failures == ["rollouts"] * 3
        producer.close(timeout_s=1)


# -- consumer groups ---------------------------------------------------------------


class CountingObserver(ConsumerObserver):
    def __init__(self):
        self.commits = []
        self.assigned = []

    def on_commit(self, offsets, latency_s):
        self.commits.append(dict(offsets))

    def on_assigned(self, partitions):
        self.assigned.append(partitions)


def test_manual_commit_then_same_group_resumes_exactly(kafka_settings):
    ensure_topics(kafka_settings, {topics.ROLLOUTS: 3})
    rollouts = [make_rollout(i, prompt_id=f"prompt-{i % 5}") for i in range(40)]
    produce(kafka_settings, rollouts)
    group = topics.TRAINER_GROUP

    observer = CountingObserver()
    with StreamConsumer(kafka_settings, [topics.ROLLOUTS], group, observer=observer) as first:
        assert len(first.wait_for_assignment(20)) == 3
        with pytest.raises(ValueError, match=r"commit: offset of .*rollouts\[0\] must be an integer >= 0, got -1"):
            first.commit({TopicPartition(kafka_settings.topic(topics.ROLLOUTS), 0): -1})
        with pytest.raises(CommitError, match=r"not assigned to this consumer: .*rollouts\[7\]"):
            first.commit({TopicPartition(kafka_settings.topic(topics.ROLLOUTS), 7): 1})
        processed, checkpoint = [], {}
        while len(processed) < 24:
            batch = first.poll(timeout_s=1.0, max_records=8)
            processed += batch.records
            checkpoint = merge_offsets(checkpoint, batch.next_offsets())
        first.commit(checkpoint)
        assert first.committed() == {tp: checkpoint.get(tp) for tp in first.assignment()}
        # Delivered but never committed (the trainer died before checkpointing).
        uncommitted = first.poll(timeout_s=1.0, max_records=8).records
        assert uncommitted
        assert first.stats().commits == 1 and first.stats().commit_failures == 1
    assert observer.commits == [checkpoint] and len(observer.assigned[0]) == 3

    with StreamConsumer(kafka_settings, [topics.ROLLOUTS], group) as second:
        rest = drain(second, len(rollouts) - len(processed))
    done = Counter(r.message.rollout_id for r in processed)
    again = Counter(r.message.rollout_id for r in rest)
    assert not (done & again), "processed twice"
    assert done + again == Counter(r.rollout_id for r in rollouts), "lost or duplicated"
    assert {r.message.rollout_id for r in uncommitted} <= set(again)


def test_seek_to_checkpoint_offsets_wins_over_stale_commit(kafka_settings):
    ensure_topics(kafka_settings, {topics.ROLLOUTS: 2})
    rollouts = [make_rollout(i, prompt_id=f"prompt-{i % 4}") for i in range(30)]
    produce(kafka_settings, rollouts)
    group = "stream-test-seek"

    with StreamConsumer(kafka_settings, [topics.ROLLOUTS], group) as first:
        delivered = []
        while len(delivered) < 30:
            delivered += first.poll(timeout_s=1.0).records
        by_partition = defaultdict(list)
        for record in delivered:
            by_partition[record.topic_partition].append(record)
        # The trainer checkpointed after half of each partition; the commit that
        # should have followed was lost, leaving an older one (after a quarter).
        checkpointed = [r for records in by_partition.values() for r in records[: len(records) // 2]]
        first.commit(next_offsets([r for records in by_partition.values() for r in records[: len(records) // 4 + 1]]))
        saved = json.dumps(offsets_to_json(next_offsets(checkpointed)))

    restored = offsets_from_json(json.loads(saved))
    with StreamConsumer(kafka_settings, [topics.ROLLOUTS], group) as second:
        second.seek(restored)  # before joining: applied when the partitions are assigned
        rest = drain(second, 30 - len(checkpointed))
        assert {r.message.rollout_id for r in rest} == {r.message.rollout_id for r in delivered} - {
            r.message.rollout_id for r in checkpointed
        }
        assert len(rest) == 30 - len(checkpointed)
        assert second.positions() == next_offsets(delivered)
        second.commit(second.positions())
        assert second.committed() == next_offsets(delivered)
        # Seeking an assigned partition replays from there.
        tp = next(iter(by_partition))
        second.seek({tp: 2})
        replay = drain(second, len(by_partition[tp]) - 2)
        assert [r.offset for r in replay] == list(range(2, len(by_partition[tp])))
        assert second.lag()[tp] == 0 and set(second.lag().values()) == {0}


_KILLED_CONSUMER = """
import sys, time
from arbiter.stream import KafkaSettings, StreamConsumer, merge_offsets
settings = KafkaSettings(bootstrap_servers=sys.argv[1], topic_prefix=sys.argv[2], session_timeout_ms=6000)
consumer = StreamConsumer(settings, ["rollouts"], sys.argv[3])
processed, offsets = 0, {}
while processed < 20:
    batch = consumer.poll(timeout_s=1.0, max_records=5)
    processed += len(batch)
    offsets = merge_offsets(offsets, batch.next_offsets())
consumer.commit(offsets)
consumer.poll(timeout_s=1.0, max_records=5)  # delivered, never committed
print("committed", sum(offsets.values()), flush=True)
time.sleep(600)
"""


def test_resume_after_kill_9_loses_nothing_and_repeats_nothing(kafka_settings):
    ensure_topics(kafka_settings, {topics.ROLLOUTS: 2})
    rollouts = [make_rollout(i, prompt_id=f"prompt-{i % 6}") for i in range(50)]
    produce(kafka_settings, rollouts)
    group = "stream-test-kill"
    process = subprocess.Popen(
        [sys.executable, "-c", _KILLED_CONSUMER, kafka_settings.bootstrap_servers[0], kafka_settings.topic_prefix,
         group],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = process.stdout.readline()
        assert line.startswith("committed "), process.stderr.read()
        committed_total = int(line.split()[1])
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    with StreamConsumer(kafka_settings, [topics.ROLLOUTS], group) as restarted:
        # The dead member holds its partitions until its session (6 s) expires.
        rest = drain(restarted, 50 - committed_total, timeout_s=40)
        committed = restarted.committed()
    assert sum(v or 0 for v in committed.values()) == committed_total
    ids = Counter(r.message.rollout_id for r in rest)
    assert set(ids.values()) == {1} and len(ids) == 50 - committed_total
    # Exactly the records at or after each committed offset.
    assert all(r.offset >= (committed[r.topic_partition] or 0) for r in rest)
