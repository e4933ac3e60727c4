"""The trainer on a real broker: rollouts in, policy versions out, exactly-once
training across a kill -9."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from helpers import wait_until

from arbiter.hf import weights_sha256
from arbiter.stream import StreamConsumer, StreamProducer, cluster_id, ensure_topics, topics
from trainer.checkpoint import latest_checkpoint
from trainer.config import config_from_dict
from trainer.loop import ClusterChanged, PPOTrainer
from tests.rollout_fixtures import sample_trajectories, to_rollout

BATCH = 8


def trainer_config(tiny_models, tmp_path, kafka_settings, **extra):
    return {
        "model_dir": str(tiny_models["policy"]),
        "output_dir": str(tmp_path / "run"),
        "ppo": {"batch_size": BATCH, "minibatch_size": 4, "epochs": 1, "learning_rate": 1e-3,
                "kl": {"mode": "fixed", "init_coef": 0.01}, "max_staleness": 1},
        "kafka": {"bootstrap_servers": ",".join(kafka_settings.bootstrap_servers),
                  "topic_prefix": kafka_settings.topic_prefix, "session_timeout_ms": 6000},
        **extra,
    }


def produce(kafka_settings, rollouts):
    with StreamProducer(kafka_settings) as producer:
        for rollout in rollouts:
            producer.send(topics.ROLLOUTS, rollout)
        producer.flush(timeout_s=30)


def test_trainer_consumes_rollouts_and_publishes_versions(tiny_models, tmp_path, kafka_settings):
    ensure_topics(kafka_settings, {topics.ROLLOUTS: 4, topics.POLICY_UPDATES: 1})
    # Checkpoints by time only, and not within this run: the one checkpoint is the clean stop's.
    config = config_from_dict(trainer_config(tiny_models, tmp_path, kafka_settings, max_updates=2,
                                             checkpoint_every=None, checkpoint_every_s=3600))
    trainer = PPOTrainer(config, kafka_settings)
    lm, tokenizer = trainer.model.lm, trainer.model.tokenizer
    fresh = [to_rollout(t) for t in sample_trajectories(lm, tokenizer, 2 * BATCH, version="v0", seed=1)]
    unknown = to_rollout(sample_trajectories(lm, tokenizer, 1, version="someone-else", seed=2)[0])
    invalid = to_rollout(sample_trajectories(lm, tokenizer, 1, seed=3)[0])
    del invalid.reference_logprobs[:]
    # Duplicates of the first three (a worker retried them): trained once.
    produce(kafka_settings, fresh[:BATCH] + fresh[:3] + [unknown, invalid] + fresh[BATCH:])

    history = trainer.run(stop=None, poll_timeout_s=0.2)
    assert [r.step for r in history] == [1, 2]
    assert [r.policy_version for r in history] == ["ppo-1", "ppo-2"]
    count = {o: trainer.metrics.rollouts.labels(o)._value.get() for o in ("trained", "duplicate", "unknown_version", "invalid")}
    assert count == {"trained": 16, "duplicate": 3, "unknown_version": 1, "invalid": 1}
    # The training curve: one JSON line per update, with the value head's explained variance.
    rows = [json.loads(line) for line in trainer.history_path.read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    assert all(row["explained_variance"] == r.stats.explained_variance <= 1.0 for row, r in zip(rows, history))
    # All 16 sampled by v0 (step 0): the first batch trained at step 0 (lag 0), the second at step 1 (lag 1).
    assert [row["staleness_counts"] for row in rows] == [{"0": BATCH}, {"1": BATCH}]
    bucket = trainer.metrics.registry.get_sample_value
    assert [bucket("arbiter_trainer_trained_staleness_versions_bucket", {"le": le}) for le in ("0.0", "1.0")] == [
        BATCH, 2 * BATCH]
    assert trainer.metrics.checkpoints._value.get() == 1
    assert latest_checkpoint(trainer.checkpoints).name == "step-00000002"

    # Both versions were announced, with the weights' digest, in order.
    with StreamConsumer(kafka_settings, [topics.POLICY_UPDATES], group_id=None) as consumer:
        updates, deadline = [], time.monotonic() + 30
        while len(updates) < 2 and time.monotonic() < deadline:
            updates += [r.message for r in consumer.poll(timeout_s=1.0).records]
    assert [u.policy_version for u in updates] == ["ppo-1", "ppo-2"]
    # What the trainer had settled (trained or dropped) at each version, for the workers' staleness bound:
    # by step 1 its batch of 8 at least, with the second batch's 8 still pending or unread; by step 2
    # every record (16 fresh, 3 duplicates, the unknown version and the invalid one).
    assert 8 <= sum(updates[0].rollouts_settled.values()) <= 21 - 8
    assert sum(updates[1].rollouts_settled.values()) == len(fresh) + 3 + 2
    for update in updates:
        assert update.weights_sha256 == weights_sha256(update.checkpoint_path)
        assert update.training_step == int(update.policy_version.split("-")[1]) and not update.is_adapter
    # The group's committed offsets are exactly the checkpoint's.
    state = json.loads((latest_checkpoint(trainer.checkpoints) / "state.json").read_text())
    committed_total = sum(o for parts in state["offsets"].values() for o in parts.values())
    assert committed_total == len(fresh) + 3 + 2


def test_offsets_from_another_cluster_are_refused_until_reset(tiny_models, tmp_path, kafka_settings):
    ensure_topics(kafka_settings, {topics.ROLLOUTS: 4, topics.POLICY_UPDATES: 1})
    config = config_from_dict(trainer_config(tiny_models, tmp_path, kafka_settings, max_updates=1))
    trainer = PPOTrainer(config, kafka_settings)
    rollouts = [to_rollout(t) for t in sample_trajectories(
        trainer.model.lm, trainer.model.tokenizer, 2 * BATCH, version="v0", seed=4)]
    produce(kafka_settings, rollouts[:BATCH])
    trainer.run(stop=None, poll_timeout_s=0.2)
    path = latest_checkpoint(trainer.checkpoints) / "state.json"
    state = json.loads(path.read_text())
    # The checkpoint says which log its offsets are positions in.
    assert state["cluster_id"] == cluster_id(kafka_settings)
    assert state["outcomes"] == {"trained": BATCH}

    # The same address now answers as another cluster (say, a broker that
    # came back empty): resuming would read, and commit, positions of the old log.
    path.write_text(json.dumps({**state, "cluster_id": "the-old-cluster"}))
    moved = PPOTrainer(config_from_dict(trainer_config(tiny_models, tmp_path, kafka_settings, max_updates=2)),
                       kafka_settings)
    with pytest.raises(ClusterChanged, match=(
            f"is {cluster_id(kafka_settings)!r}, but the checkpointed stream offsets \\(step 1\\) belong to "
            "cluster 'the-old-cluster'.*restart with --reset-offsets")):
        moved.run(stop=None, poll_timeout_s=0.2)

    # The documented way on: this cluster's topic from the group's commits
    # (here the first batch's), or from the start where there are none.
    produce(kafka_settings, rollouts[BATCH:])
    reset = PPOTrainer(config_from_dict(trainer_config(tiny_models, tmp_path, kafka_settings, max_updates=2)),
                       kafka_settings, reset_offsets=True)
    assert [r.step for r in reset.run(stop=None, poll_timeout_s=0.2)] == [2]
    state = json.loads((latest_checkpoint(reset.checkpoints) / "state.json").read_text())
    assert state["cluster_id"] == cluster_id(kafka_settings)
    assert state["outcomes"] == {"trained": 2 * BATCH}


def checkpoint_state(run_dir):
    path = latest_checkpoint(run_dir / "checkpoints")
    return json.loads((path / "state.json").read_text()) if path else None


def accounted_for(state) -> int:
    """Rollouts a checkpoint has consumed and settled (trained or dropped): its
    offsets stop at the first rollout still waiting for a batch."""
    return sum(o for parts in state["offsets"].values() for o in parts.values())


def test_kill_9_and_restart_loses_nothing_and_trains_nothing_twice(tiny_models, tmp_path, kafka_settings):
    ensure_topics(kafka_settings, {topics.ROLLOUTS: 4, topics.POLICY_UPDATES: 1})
    config_path = tmp_path / "trainer.yaml"
    config_path.write_text(yaml.safe_dump(trainer_config(tiny_models, tmp_path, kafka_settings, run_name="crash")
                                          | {"ppo": {**trainer_config(tiny_models, tmp_path, kafka_settings)["ppo"], "max_staleness": 10}}))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = AutoModelForCausalLM.from_pretrained(str(tiny_models["policy"])).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_models["policy"]))
    first = [to_rollout(t) for t in sample_trajectories(lm, tokenizer, 3 * BATCH, seed=10)]
    second = [to_rollout(t) for t in sample_trajectories(lm, tokenizer, 3 * BATCH, seed=11)]
    produced_ids = {r.rollout_id for r in first + second}
    command = [sys.executable, "-m", "cli", "train", "ppo", "--config", str(config_path)]
    env = {**os.environ, "ARBITER_LOG_LEVEL": "WARNING"}
    run_dir = tmp_path / "run"

    produce(kafka_settings, first)
    victim = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: (checkpoint_state(run_dir) or {}).get("step", 0) >= 1, 180, "a first checkpoint")
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    killed_at = checkpoint_state(run_dir)["step"]

    produce(kafka_settings, second)
    survivor = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # Done once a checkpoint has settled every produced rollout: none waits
        # for a batch and none is left to read, so a seventh update could only
        # come from training something twice.
        wait_until(lambda: (s := checkpoint_state(run_dir)) and accounted_for(s) == len(produced_ids), 240,
                 "every rollout settled after restart")
    finally:
        survivor.send_signal(signal.SIGTERM)
        output = survivor.communicate(timeout=60)[0]
    # Read after the process has exited: whatever it did before stopping is in here.
    state = checkpoint_state(run_dir)
    assert survivor.returncode == 0, output
    assert f"trainer ready: step {killed_at}" in output
    # 48 rollouts at 8 per update: exactly 6 updates, every id accounted for once.
    assert state["step"] == 6, output
    assert sorted(state["seen_ids"]) == sorted(produced_ids)
    assert accounted_for(state) == len(produced_ids)
    assert state["published"][-1] == "crash-6"
    assert "explained_var=" in output  # the console line of each update
