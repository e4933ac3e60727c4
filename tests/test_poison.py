"""Poison records on every topic, against a real broker and the real consumers
(the PPO trainer, the policy follower, the worker's prompt source, reward-model
training): each unusable record is skipped, logged and counted under its
reason, the consumer keeps going, and every good record is processed exactly
once (offsets end past the poison, so none is ever read again)."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
from helpers import BackgroundServer, sample_value, wait_until
from kafka import KafkaConsumer, KafkaProducer
from lm_fixtures import perturbed
from prometheus_client import CollectorRegistry

from arbiter.hf import weights_sha256
from arbiter.rm.config import TopicConfig
from arbiter.rm.topic import read_preferences
from arbiter.stream import (
    REJECT_REASONS, KafkaSettings, PayloadError, StreamConsumer, TopicPartition, codec, ensure_topics, topics,
)
from arbiter.v1 import rollout_pb2
from rollout_fixtures import to_rollout
from services.policy.client import PolicyClient
from services.policy.server import create_server
from services.policy.settings import PolicySettings
from services.worker.metrics import WorkerMetrics
from services.worker.prompts import TopicPrompts
from trainer.batch import Trajectory
from trainer.checkpoint import latest_checkpoint
from trainer.config import config_from_dict
from trainer.loop import PPOTrainer

REJECTED = "arbiter_stream_records_rejected_total"
# Small enough that the oversize record is cheap, above every good record.
SMALL = {"max_request_size": 64 * 1024, "max_record_bytes": 64 * 1024}


def headers(type_name: str, version: str = codec.SCHEMA_VERSION) -> list[tuple[str, bytes]]:
    return [(topics.HEADER_CONTENT_TYPE, topics.CONTENT_TYPE_PROTOBUF.encode()),
            (topics.HEADER_SCHEMA_VERSION, version.encode()), (topics.HEADER_MESSAGE_TYPE, type_name.encode())]


def encoded(topic: str, message) -> tuple[bytes, bytes, list]:
    record = codec.encode(topic, message)
    return record.key, record.value, record.headers


def generic_poison(topic: str, good, limit: int) -> list[tuple[str, tuple]]:
    """(reason, (key, value, headers)) of the poison every topic can receive."""
    type_name = codec.payload_spec(topic).type_name
    future = type(good)()
    future.CopyFrom(good)
    future.schema_version = 2
    # Another topic's payload, honestly labelled.
    other = rollout_pb2.PolicyUpdate(policy_version="v9", checkpoint_path="/x", schema_version=1)
    if topic == topics.POLICY_UPDATES:
        other = rollout_pb2.PromptRecord(prompt_id="p", text="hi", schema_version=1)
    _, value, ok = encoded(topic, good)
    return [
        ("undecodable", (b"k", random.Random(7).randbytes(48), ok)),  # random bytes
        ("bad_headers", (b"k", value, [h for h in ok if h[0] != topics.HEADER_CONTENT_TYPE])),
        ("schema_version", (b"k", future.SerializeToString(), headers(type_name, "2.0"))),
        ("wrong_type", (b"k", other.SerializeToString(), headers(other.DESCRIPTOR.full_name))),
        ("oversize", (b"k", b"\0" * (limit + 1), ok)),
        ("undecodable", (b"k", None, ok)),  # a tombstone
    ]


def produce_in_order(kafka: KafkaSettings, topic: str, records: list[tuple]) -> None:
    """Every record to partition 0 in this order, bytes as given (a foreign producer)."""
    producer = KafkaProducer(bootstrap_servers=list(kafka.bootstrap_servers), acks="all",
                             max_request_size=8 * 1024 * 1024, max_in_flight_requests_per_connection=1)
    for key, value, hdrs in records:
        producer.send(kafka.topic(topic), key=key, value=value, headers=hdrs, partition=0)
    producer.flush(timeout=30)
    producer.close()


def interleave(good: list[tuple], poison: list[tuple[str, tuple]]) -> list[tuple]:
    """good[0], poison[0], good[1], poison[1], ..., any poison left, good[-1]:
    a consumer that has processed the last (good) record has read every poison one."""
    out, rest = [], [record for _, record in poison]
    for record in good[:-1]:
        out.append(record)
        if rest:
            out.append(rest.pop(0))
    return out + rest + good[-1:]


def rejected_by_reason(registry: CollectorRegistry, topic: str) -> dict[str, float]:
    counts = {r: sample_value(registry, REJECTED, topic=topic, reason=r) for r in REJECT_REASONS}
    return {r: n for r, n in counts.items() if n}


# -- rollouts: the PPO trainer -------------------------------------------------

BATCH = 4


def test_trainer_skips_every_poison_rollout_and_trains_each_good_one_once(tiny_models, tmp_path, kafka_settings):
    kafka = kafka_settings.with_overrides(dead_letter=True)
    ensure_topics(kafka, {topics.ROLLOUTS: 1, topics.POLICY_UPDATES: 1})
    config = config_from_dict({
        "model_dir": str(tiny_models["policy"]), "output_dir": str(tmp_path / "run"), "max_updates": 2,
        "ppo": {"batch_size": BATCH, "minibatch_size": BATCH, "epochs": 1, "max_staleness": 4,
                "kl": {"mode": "fixed", "init_coef": 0.01}},
        "kafka": {"bootstrap_servers": ",".join(kafka.bootstrap_servers), "topic_prefix": kafka.topic_prefix,
                  "session_timeout_ms": 6000, "dead_letter": True},
    })
    trainer = PPOTrainer(config, KafkaSettings.from_env(**config.kafka))
    model = trainer.model
    assert (model.vocab_size, model.max_tokens) == (512, 256)  # the tiny policy's embedding rows and positions
    # Counting, not learning, is under test: made-up samples (sampling from the model costs seconds).
    rng = random.Random(3)
    samples = [
        Trajectory(f"r{i}", f"p{i}", f"g{i}", (5, 6, 7), tuple(rng.randrange(512) for _ in range(8)), (-3.0,) * 8,
                   (-3.1,) * 8, rng.random(), model.base_version)
        for i in range(2 * BATCH + 4)
    ]
    good = [to_rollout(t) for t in samples[:2 * BATCH]]

    def spoiled(i: int, change) -> rollout_pb2.Rollout:
        rollout = to_rollout(samples[2 * BATCH + i])
        change(rollout)
        return rollout

    limit = kafka.max_record_bytes  # the default: a real 4 MiB guard
    poison = generic_poison(topics.ROLLOUTS, good[0], limit) + [
        # Sampled with a bigger vocabulary: index 512 has no embedding row.
        ("out_of_vocab", encoded(topics.ROLLOUTS, spoiled(0, lambda r: r.completion_token_ids.__setitem__(2, 512)))),
        ("out_of_vocab", encoded(topics.ROLLOUTS, spoiled(1, lambda r: r.prompt_token_ids.__setitem__(0, -1)))),
        ("too_long", encoded(topics.ROLLOUTS, spoiled(2, lambda r: r.prompt_token_ids.extend([5] * 250)))),
        ("invalid_record", encoded(topics.ROLLOUTS, spoiled(3, lambda r: r.sampling_logprobs.append(-1.0)))),
    ]
    assert len(poison) == 10 and len({reason for reason, _ in poison}) == len(REJECT_REASONS)
    records = interleave([encoded(topics.ROLLOUTS, r) for r in good], poison)
    produce_in_order(kafka, topics.ROLLOUTS, records)

    history = trainer.run(poll_timeout_s=0.2)

    assert [r.step for r in history] == [1, 2] and [r.rollouts for r in history] == [BATCH, BATCH]
    outcomes = {o: trainer.metrics.rollouts.labels(o)._value.get() for o in ("trained", "invalid", "duplicate")}
    assert outcomes == {"trained": 2 * BATCH, "invalid": 10, "duplicate": 0}
    assert rejected_by_reason(trainer.metrics.registry, topics.ROLLOUTS) == dict(Counter(r for r, _ in poison))
    state = json.loads((latest_checkpoint(trainer.checkpoints) / "state.json").read_text())
    # Each good rollout trained once; the committed position is past every record, poison included.
    assert sorted(state["seen_ids"]) == sorted(r.rollout_id for r in good)
    assert state["offsets"] == {kafka.topic(topics.ROLLOUTS): {"0": len(records)}}

    # Every rejected record was copied, raw, to the dead-letter topic, saying why and from where.
    copies = read_raw(kafka, topics.ROLLOUTS_DEAD_LETTER, len(poison))
    by_offset = {int(c["arbiter-source-offset"]): c for c in copies}
    poison_offsets = [i for i, record in enumerate(records) if any(record is p for _, p in poison)]
    assert sorted(by_offset) == poison_offsets
    for offset in poison_offsets:
        key, value, hdrs = records[offset]
        copy = by_offset[offset]
        assert copy["arbiter-source-topic"] == kafka.topic(topics.ROLLOUTS)
        assert copy["arbiter-source-partition"] == "0"
        if value is not None and len(value) > limit:
            assert (copy["value"], copy["arbiter-dead-letter-value-omitted"]) == (b"", str(len(value)))
        else:
            assert copy["value"] == value and copy["key"] == key
        assert all(copy[name] == v.decode() for name, v in hdrs)
    assert sorted(c["arbiter-dead-letter-reason"] for c in copies) == sorted(r for r, _ in poison)
    too_long = next(c for c in copies if c["arbiter-dead-letter-reason"] == "too_long")
    assert too_long["arbiter-dead-letter-error"].endswith(
        "253 prompt + 8 completion tokens, over the model's 256")


def read_raw(kafka: KafkaSettings, topic: str, count: int) -> list[dict]:
    """{header: text, "key": bytes, "value": bytes} of ``count`` records of a topic no codec reads."""
    consumer = KafkaConsumer(kafka.topic(topic), bootstrap_servers=list(kafka.bootstrap_servers),
                             auto_offset_reset="earliest", enable_auto_commit=False, consumer_timeout_ms=10_000)
    out = []
    try:
        for record in consumer:
            out.append({**{k: v.decode() for k, v in record.headers}, "key": record.key, "value": record.value})
            if len(out) == count:
                break
    finally:
        consumer.close()
    assert len(out) == count, out
    return out


# -- policy-updates: the policy follower ----------------------------------------


def test_policy_follower_skips_poison_updates_and_applies_the_good_ones(tiny_models, kafka_settings, tmp_path,
                                                                       model_roots):
    kafka = kafka_settings.with_overrides(**SMALL)
    ensure_topics(kafka, {topics.POLICY_UPDATES: 1})
    checkpoint = perturbed(tiny_models["policy"], tmp_path / "v1", version="v1")

    def update(version: str) -> rollout_pb2.PolicyUpdate:
        return rollout_pb2.PolicyUpdate(policy_version=version, checkpoint_path=str(checkpoint), training_step=1,
                                        weights_sha256=weights_sha256(checkpoint))

    poison = generic_poison(topics.POLICY_UPDATES, update("v1"), kafka.max_record_bytes) + [
        ("invalid_record", encoded(topics.POLICY_UPDATES, rollout_pb2.PolicyUpdate(policy_version="v8"))),
    ]
    produce_in_order(kafka, topics.POLICY_UPDATES, [encoded(topics.POLICY_UPDATES, update("v1"))]
                     + [p for _, p in poison] + [encoded(topics.POLICY_UPDATES, update("v2"))])
    settings = PolicySettings(model_dir=str(tiny_models["policy"]), port=0, metrics_port=0, follow_updates=True,
                              replica_id="poisoned", kafka=kafka, max_loaded_versions=2, grace_seconds=1.0,
                              model_roots=model_roots)
    with BackgroundServer(lambda: create_server(settings)) as server, PolicyClient(server.target) as client:
        registry = server.running.registry

        def outcomes() -> dict[str, float]:
            return {o: sample_value(registry, "arbiter_policy_updates_total", outcome=o)
                    for o in ("applied", "skipped", "refused", "failed")}

        wait_until(lambda: sum(outcomes().values()) == len(poison) + 2, what="every update handled")
        # Good ones: each handled once (v1 may be superseded by v2 within one poll); poison: refused.
        assert outcomes()["refused"] == len(poison) and outcomes()["failed"] == 0
        assert outcomes()["applied"] + outcomes()["skipped"] == 2
        assert client.info().version == "v2"
        assert rejected_by_reason(registry, topics.POLICY_UPDATES) == dict(Counter(r for r, _ in poison))
        # Still following after the poison: a later update is applied.
        produce_in_order(kafka, topics.POLICY_UPDATES, [poison[0][1], encoded(topics.POLICY_UPDATES, update("v3"))])
        wait_until(lambda: client.info().version == "v3", what="v3 to be applied after more poison")
        assert rejected_by_reason(registry, topics.POLICY_UPDATES)["undecodable"] == 3


# -- prompts: the worker's topic source -----------------------------------------


def test_worker_prompt_source_skips_poison_and_hands_out_each_prompt_once(kafka_settings):
    kafka = kafka_settings.with_overrides(**SMALL)
    ensure_topics(kafka, {topics.PROMPTS: 1})
    good = [rollout_pb2.PromptRecord(prompt_id=f"p{i}", text=f"Say {i}:") for i in range(8)]
    poison = generic_poison(topics.PROMPTS, good[0], kafka.max_record_bytes) + [
        ("invalid_record", encoded(topics.PROMPTS, rollout_pb2.PromptRecord(prompt_id="empty"))),
    ]
    records = interleave([encoded(topics.PROMPTS, g) for g in good], poison)
    produce_in_order(kafka, topics.PROMPTS, records)
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    source = TopicPrompts(kafka, lambda reason: metrics.skipped.labels(reason).inc(), pytest.fail,
                          metrics.rejected_records)
    handed_out = []
    try:
        def take() -> bool:
            batch = source.next_batch(3)
            handed_out.extend(p.id for p in batch.prompts)
            batch.acknowledge()
            return len(handed_out) >= len(good)

        wait_until(take, 30, "every good prompt")
    finally:
        source.close()
    assert handed_out == [g.prompt_id for g in good]
    assert rejected_by_reason(registry, topics.PROMPTS) == dict(Counter(r for r, _ in poison))
    assert sample_value(registry, "arbiter_worker_samples_skipped_total", reason="invalid_prompt_record") == len(poison)
    with StreamConsumer(kafka, [topics.PROMPTS], topics.ROLLOUT_WORKERS_GROUP) as group:
        assert group.committed([TopicPartition(kafka.topic(topics.PROMPTS), 0)]) == {
            TopicPartition(kafka.topic(topics.PROMPTS), 0): len(records)}


# -- preferences: reward-model training ------------------------------------------


def test_rm_training_skips_poison_preferences_and_reads_each_good_one_once(kafka_settings):
    kafka = kafka_settings.with_overrides(**SMALL)
    ensure_topics(kafka, {topics.PREFERENCES: 1})
    good = [rollout_pb2.Preference(preference_id=f"f{i}", prompt="Q?", chosen=f" yes {i}", rejected=" no")
            for i in range(8)]
    poison = generic_poison(topics.PREFERENCES, good[0], kafka.max_record_bytes) + [
        ("invalid_record", encoded(topics.PREFERENCES, rollout_pb2.Preference(
            preference_id="same", prompt="Q?", chosen=" a", rejected=" a"))),
    ]
    records = interleave([encoded(topics.PREFERENCES, g) for g in good], poison)
    produce_in_order(kafka, topics.PREFERENCES, records)

    with read_preferences(kafka, TopicConfig(idle_timeout_s=1.0)) as batch:
        assert sorted(e.id for e in batch.examples) == sorted(g.preference_id for g in good)
        assert batch.skipped_reasons == dict(Counter(r for r, _ in poison))
        assert len(batch.skipped) == len(poison)
        batch.commit()
    with StreamConsumer(kafka, [topics.PREFERENCES], topics.REWARD_TRAINER_GROUP) as group:
        assert group.committed([TopicPartition(kafka.topic(topics.PREFERENCES), 0)]) == {
            TopicPartition(kafka.topic(topics.PREFERENCES), 0): len(records)}
    # Strict mode, on request: the first poison record stops the run, naming it.
    with pytest.raises(PayloadError, match=rf"{kafka.topic(topics.PREFERENCES)}\[0\]@1"):
        read_preferences(kafka, TopicConfig(idle_timeout_s=1.0, replay=True, skip_invalid=False))


def test_rm_training_skips_a_preference_over_the_window_with_truncation_reject(
        tiny_models, kafka_settings, tmp_path, capsys, caplog):
    """With ``truncation: reject`` a preference longer than the model's window
    is only found when training encodes it: it is rejected like any poison
    record (too_long, logged with its location, counted, dead-lettered,
    committed past) and the run trains on the rest."""
    from cli.main import main as cli_main

    kafka = kafka_settings.with_overrides(dead_letter=True)
    ensure_topics(kafka, {topics.PREFERENCES: 1})
    good = [rollout_pb2.Preference(preference_id=f"f{i}", prompt="Q?", chosen=f" yes {i}", rejected=" no")
            for i in range(10)]
    # Over the tiny model's 256 positions, in a field the decoder accepts.
    long = rollout_pb2.Preference(preference_id="long", prompt="Q?", chosen=" yes" * 400, rejected=" no")
    records = [encoded(topics.PREFERENCES, p) for p in [*good[:4], long, *good[4:]]]
    produce_in_order(kafka, topics.PREFERENCES, records)
    where = f"{kafka.topic(topics.PREFERENCES)}[0]@4"

    def config(name: str, **topic) -> str:
        path = tmp_path / f"{name}.yaml"
        path.write_text(json.dumps({
            "model_dir": str(tiny_models["policy"]), "registry": str(tmp_path / "registry"), "name": name,
            "eval_fraction": 0.0, "epochs": 1, "truncation": "reject", "calibration_size": 8,
            "topic": {"idle_timeout_s": 1.0, **topic},
            "kafka": {"bootstrap_servers": kafka.bootstrap_servers[0], "topic_prefix": kafka.topic_prefix,
                      "session_timeout_ms": 6000, "dead_letter": True},
        }))
        return str(path)

    # Strict mode, on request: the run stops at the record, naming it; nothing is published or committed.
    assert cli_main(["train", "rm", "--config", config("strict", skip_invalid=False), "--from-topic",
                     "--no-progress", "--json"]) == 2
    assert f"{where}: chosen: is " in capsys.readouterr().err

    assert cli_main(["train", "rm", "--config", config("rm"), "--from-topic", "--no-progress", "--json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["metrics"]["train_examples"] == len(good)
    assert "1 more preference(s) from the topic skipped" in captured.err and "1 too_long" in captured.err
    meta = json.loads((tmp_path / "registry" / "rm" / "v1" / "arbiter.json").read_text())
    assert meta["training"]["from_topic"] == {"records": len(good) + 1, "examples": len(good), "duplicates": 0,
                                              "skipped": 1, "skipped_reasons": {"too_long": 1}, "replay": False}
    assert any("skipped invalid record (too_long, copied to dead letters)" in r.getMessage()
               and where in r.getMessage() for r in caplog.records)
    with StreamConsumer(kafka, [topics.PREFERENCES], topics.REWARD_TRAINER_GROUP) as group:
        assert group.committed([TopicPartition(kafka.topic(topics.PREFERENCES), 0)]) == {
            TopicPartition(kafka.topic(topics.PREFERENCES), 0): len(good) + 1}
    [copy] = read_raw(kafka, topics.PREFERENCES_DEAD_LETTER, 1)
    assert copy["value"] == records[4][1] and copy["arbiter-dead-letter-reason"] == "too_long"
    assert copy["arbiter-source-offset"] == "4"
