"""The policy server following the policy-updates topic, against a real
Kafka-protocol broker: verified updates are hot-swapped in, bad ones are
refused or fail without touching the serving version, duplicates are skipped,
and a (re)started replica replays the topic to the newest loadable version."""

from __future__ import annotations

import hashlib
import json
import shutil
import time

import pytest
from helpers import BackgroundServer, metrics_text, sample_value, wait_until
from lm_fixtures import lora_adapter, nan_weights, perturbed

from arbiter.config import ConfigError
from arbiter.errors import ModelLoadError
from arbiter.hf import combine_weights_sha256, load_tokenizer, tokenizer_fingerprint, weights_sha256, write_metadata
from arbiter.stream import StreamProducer, ensure_topics, topics
from arbiter.v1 import rollout_pb2
from services.policy.client import PolicyClient
from services.policy.server import add_arguments, create_server, settings_from_args
from services.policy.settings import PolicySettings

PROMPT = "The quick brown"


@pytest.fixture
def kafka(kafka_settings):
    ensure_topics(kafka_settings, {topics.POLICY_UPDATES: 1})
    return kafka_settings


@pytest.fixture(scope="module")
def checkpoints(tiny_models, tmp_path_factory):
    """Candidate versions of the tiny policy, written the way a trainer writes them."""
    root = tmp_path_factory.mktemp("updates")
    policy = tiny_models["policy"]
    return {
        "v1": perturbed(policy, root / "v1", version="v1"),
        "nan": nan_weights(policy, root / "nan"),
        "lora": lora_adapter(policy, root / "lora"),
    }


def update(version: str, path, *, sha: str | None = None, is_adapter: bool = False, step: int = 1):
    msg = rollout_pb2.PolicyUpdate(
        policy_version=version, checkpoint_path=str(path), is_adapter=is_adapter, training_step=step,
        parent_version="v0", weights_sha256=weights_sha256(path) if sha is None else sha,
    )
    msg.created_at.FromNanoseconds(time.time_ns())
    return msg


def publish(kafka, *updates) -> None:
    with StreamProducer(kafka) as producer:
        for msg in updates:
            producer.send(topics.POLICY_UPDATES, msg)
        producer.flush()


def follower_server(policy_dir, kafka, replica_id: str, model_roots) -> BackgroundServer:
    settings = PolicySettings(
        model_dir=str(policy_dir), port=0, metrics_port=0, follow_updates=True, replica_id=replica_id, kafka=kafka,
        max_loaded_versions=2, grace_seconds=1.0, model_roots=model_roots,
    )
    return BackgroundServer(lambda: create_server(settings))


def outcomes(server) -> dict[str, float]:
    return {
        o: sample_value(server.running.registry, "arbiter_policy_updates_total", outcome=o)
        for o in ("applied", "skipped", "refused", "failed")
    }


def test_follower_applies_verified_updates_and_refuses_bad_ones(tiny_models, kafka, checkpoints, tmp_path):
    # Versions load from where the trainer writes them, nowhere else.
    roots = (str(checkpoints["v1"].parent),)
    with follower_server(tiny_models["policy"], kafka, "replica-a", roots) as server, \
            PolicyClient(server.target) as client:
        probe = dict(max_new_tokens=8, temperature=1.0, seed=5)
        before = client.generate([PROMPT], **probe).samples[0]

        # Weights that do not hash to what the update announces: refused, v0 keeps serving.
        publish(kafka, update("v1", checkpoints["v1"], sha="0" * 64))
        wait_until(lambda: outcomes(server)["refused"] == 1, what="the bad sha to be refused")
        assert client.info().version == "v0"
        # Intact weights outside the replica's --model-roots: refused, like LoadModelVersion.
        elsewhere = shutil.copytree(checkpoints["v1"], tmp_path / "elsewhere")
        publish(kafka, update("v1", elsewhere))
        wait_until(lambda: outcomes(server)["refused"] == 2, what="the path outside the roots to be refused")
        assert client.info().version == "v0"
        # Announced as v1's bytes but cut short: the load (which runs while the
        # files are hashed) fails on them, and the hash decides: refused, not failed.
        cut = shutil.copytree(checkpoints["v1"], checkpoints["v1"].parent / "cut-short")
        weights = cut / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        publish(kafka, update("v1", cut, sha=weights_sha256(checkpoints["v1"])))
        wait_until(lambda: outcomes(server)["refused"] == 3, what="the cut-short file to be refused")
        assert sample_value(server.running.registry, "arbiter_policy_update_refusals_total", reason="sha256") == 2
        assert client.info().version == "v0" and outcomes(server)["failed"] == 0

        publish(kafka, update("v1", checkpoints["v1"], step=7))
        wait_until(lambda: client.info().version == "v1", what="v1 to be activated")
        after = client.generate([PROMPT], **probe).samples[0]
        assert after.policy_version == "v1"
        assert list(after.logprobs) != pytest.approx(list(before.logprobs), abs=1e-3)
        registry = server.running.registry
        assert registry.get_sample_value("arbiter_policy_update_apply_seconds_count") == 1
        assert 0 < registry.get_sample_value("arbiter_policy_update_apply_seconds_sum") < 30
        assert registry.get_sample_value("arbiter_policy_update_training_step") == 7

        # The same version again: skipped. A checkpoint that fails validation: failed, v1 keeps serving.
        publish(kafka, update("v1", checkpoints["v1"]))
        wait_until(lambda: outcomes(server)["skipped"] == 1, what="the duplicate to be skipped")
        publish(kafka, update("v2", checkpoints["nan"]))
        wait_until(lambda: outcomes(server)["failed"] == 1, what="the NaN checkpoint to fail")
        assert client.info().version == "v1"

        # An adapter must be announced as one; then it loads like LoadModelVersion would.
        publish(kafka, update("lora-1", checkpoints["lora"], is_adapter=False))
        wait_until(lambda: outcomes(server)["refused"] == 4, what="the unannounced adapter to be refused")
        publish(kafka, update("lora-1", checkpoints["lora"], is_adapter=True, step=8))
        wait_until(lambda: client.info().version == "lora-1", what="the adapter to be activated")
        assert client.generate([PROMPT], **probe).samples[0].policy_version == "lora-1"
        assert outcomes(server) == {"applied": 2, "skipped": 1, "refused": 4, "failed": 1}

        text = metrics_text(server)
        assert 'arbiter_policy_updates_total{outcome="applied"} 2.0' in text
        assert 'arbiter_model_active{model_version="lora-1",service="policy"} 1.0' in text


def test_restarted_replica_replays_to_the_newest_loadable_version(tiny_models, kafka, checkpoints, model_roots):
    # History: a refused update, v1, then a newer version that fails to load.
    publish(
        kafka,
        update("v1", checkpoints["v1"], sha="f" * 64),
        update("v1", checkpoints["v1"]),
        update("v2", checkpoints["nan"]),
    )
    for _ in range(2):  # the same replica id twice: a restart replays as well
        with follower_server(tiny_models["policy"], kafka, "replica-b", model_roots) as server, \
                PolicyClient(server.target) as client:
            wait_until(lambda: sum(outcomes(server).values()) == 3, what="the history to be handled")
            # Newest first: v2 fails, v1 applies, the refused older record is superseded.
            assert outcomes(server) == {"applied": 1, "skipped": 1, "refused": 0, "failed": 1}
            assert client.info().version == "v1"
            # Replayed history is not weight-sync latency.
            assert server.running.registry.get_sample_value("arbiter_policy_update_apply_seconds_count") == 0


def test_weights_sha256_covers_names_and_bytes(tmp_path, checkpoints):
    import shutil

    digest = weights_sha256(checkpoints["v1"])
    # sha256 over "NAME\0SHA256-OF-THE-FILE\n" per .safetensors file, in name order.
    file_sha = hashlib.sha256((checkpoints["v1"] / "model.safetensors").read_bytes()).hexdigest()
    assert digest == hashlib.sha256(f"model.safetensors\0{file_sha}\n".encode()).hexdigest()
    assert combine_weights_sha256({"b.safetensors": "2", "a.safetensors": "1", "config.json": "3"}) == \
        hashlib.sha256(b"a.safetensors\x001\nb.safetensors\x002\n").hexdigest()
    copy = shutil.copytree(checkpoints["v1"], tmp_path / "copy")
    assert weights_sha256(copy) == digest  # the directory's name does not matter
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert weights_sha256(copy) != digest
    weights.rename(copy / "other.safetensors")
    assert weights_sha256(copy) != weights_sha256(checkpoints["v1"])
    assert len(weights_sha256(checkpoints["lora"])) == 64  # adapter directories too
    with pytest.raises(ModelLoadError, match="holds no .safetensors weights"):
        weights_sha256(tmp_path / "missing")


def test_versions_with_the_same_tokenizer_files_share_one_tokenizer(checkpoints, tmp_path):
    first = load_tokenizer(checkpoints["v1"], shared=True)
    # The trainer's next version (its own weights and arbiter.json), the same tokenizer files: loaded once.
    second = shutil.copytree(checkpoints["v1"], tmp_path / "v2")
    write_metadata(second, version="v2")
    (second / "model.safetensors").write_bytes(b"other weights")
    assert load_tokenizer(second, shared=True) is first
    assert tokenizer_fingerprint(first) == tokenizer_fingerprint(load_tokenizer(second))
    other = shutil.copytree(checkpoints["v1"], tmp_path / "other")
    config = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 77}))
    changed = load_tokenizer(other, shared=True)
    assert changed is not first and changed.model_max_length == 77


def test_settings_and_flags(tiny_models):
    import argparse

    with pytest.raises(ConfigError, match="kafka=None is invalid: follow_updates needs KafkaSettings"):
        PolicySettings(model_dir=str(tiny_models["policy"]), follow_updates=True)
    with pytest.raises(ConfigError, match="replica_id='a b' is invalid"):
        PolicySettings(model_dir=str(tiny_models["policy"]), replica_id="a b")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([
        "--model", str(tiny_models["policy"]), "--follow-updates", "--replica-id", "r7",
        "--kafka-bootstrap-servers", "broker-1:9092,broker-2:9092", "--kafka-topic-prefix", "prod.",
    ])
    settings = settings_from_args(args)
    assert settings.follow_updates and settings.replica_id == "r7"
    assert settings.kafka.bootstrap_servers == ("broker-1:9092", "broker-2:9092")
    assert settings.kafka.topic(topics.POLICY_UPDATES) == "prod.policy-updates"
    plain = settings_from_args(parser.parse_args(["--model", str(tiny_models["policy"])]))
    assert not plain.follow_updates and plain.kafka is None
    with pytest.raises(ConfigError, match="kafka.bootstrap_servers"):
        settings_from_args(parser.parse_args(
            ["--model", str(tiny_models["policy"]), "--follow-updates", "--kafka-bootstrap-servers", "nohost"]
        ))
