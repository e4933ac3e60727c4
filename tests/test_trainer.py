"""The PPO trainer in-process: collation, the update, checkpoints, LoRA,
critic-free estimators and non-finite handling (the stream path is in
test_trainer_stream.py)."""

import math

import pytest
import torch
from helpers import wait_until

from arbiter.config import ConfigError
from arbiter.errors import InvalidInput
from arbiter.hf import read_metadata
from arbiter.stream import ConsumedRecord
from trainer.batch import Trajectory, collate
from trainer.checkpoint import latest_checkpoint
from trainer.config import config_from_dict
from trainer.convert import InvalidRollout, trajectory_from_record
from trainer.loop import PPOTrainer
from trainer.step import policy_outputs
from tests.rollout_fixtures import sample_trajectories, to_rollout


def make_trainer(tiny_models, tmp_path, **ppo):
    settings = {"batch_size": 16, "minibatch_size": 8, "epochs": 4, "learning_rate": 1e-2,
                "kl": {"mode": "fixed", "init_coef": 0.01}, **ppo}
    config = config_from_dict({"model_dir": str(tiny_models["policy"]), "output_dir": str(tmp_path / "run"), "ppo": settings})
    from arbiter.stream import KafkaSettings

    return PPOTrainer(config, KafkaSettings())


def test_collate_aligns_logits_with_completion_tokens():
    a = Trajectory("a", "p", "g", (5, 6, 7), (8, 9), (-0.1, -0.2), (-0.3, -0.4), 1.0, "v0")
    b = Trajectory("b", "p", "g", (5,), (8, 9, 10), (-0.5, -0.6, -0.7), (-0.8, -0.9, -1.0), 2.0, "v0")
    batch = collate([a, b], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 8, 9, 10, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # Token 8 of `a` sits at position 3 and is predicted by the logits at 2.
    assert batch.positions.tolist() == [[2, 3, 0], [0, 1, 2]]
    assert batch.mask.tolist() == [[True, True, False], [True, True, True]]
    assert batch.old_logprobs[0].tolist() == pytest.approx([-0.1, -0.2, 0.0])
    assert batch.scores.tolist() == [1.0, 2.0]


def test_on_policy_ratio_is_one_and_ppo_raises_the_reward(tiny_models, tmp_path):
    trainer = make_trainer(tiny_models, tmp_path)
    lm, tokenizer = trainer.model.lm, trainer.model.tokenizer
    first = sample_trajectories(lm, tokenizer, 16, seed=100)
    with torch.no_grad():
        batch = collate(first, tokenizer.pad_token_id)
        logprobs, _, _ = policy_outputs(trainer.model, batch, 1.0)
    # The trainer recomputes exactly what the sampler saw: the ratio starts at 1.
    assert torch.allclose(logprobs[batch.mask], batch.old_logprobs[batch.mask], atol=1e-5)

    rewards = []
    for i in range(8):
        rollouts = first if i == 0 else sample_trajectories(lm, tokenizer, 16, seed=100 + i)
        record = trainer.train_on(rollouts)
        rewards.append(record.stats.reward_raw)
        assert record.stats.skipped_steps == 0 and record.stats.optimizer_steps == 8
        # The value head's explained variance (cleanrl's diagnostic) is in the stats and the gauge.
        assert record.stats.explained_variance <= 1.0
        assert trainer.metrics.explained_variance._value.get() == record.stats.explained_variance
    assert trainer.state.step == 8
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2 + 0.15, rewards


def test_checkpoint_restores_everything(tiny_models, tmp_path):
    trainer = make_trainer(tiny_models, tmp_path, kl={"mode": "adaptive", "init_coef": 0.05, "target": 1.0, "horizon": 100})
    rollouts = sample_trajectories(trainer.model.lm, trainer.model.tokenizer, 16, seed=1)
    trainer.train_on(rollouts)
    trainer.save_policy_version()
    trainer.consumed = {("t", 0): 40}
    trainer.checkpoint(consumer=None)
    assert latest_checkpoint(trainer.checkpoints).name == "step-00000001"

    resumed = make_trainer(tiny_models, tmp_path, kl={"mode": "adaptive", "init_coef": 0.05, "target": 1.0, "horizon": 100})
    assert resumed.state.step == 1 and resumed.state.policy_version == "ppo-1"
    assert resumed.state.version_steps == {"v0": 0, "ppo-1": 1}
    assert resumed.state.offsets == {("t", 0): 40}
    assert list(resumed.seen) == [t.rollout_id for t in rollouts]
    assert resumed.kl_controller.value == trainer.kl_controller.value != 0.05
    assert resumed.reward_moments.state_dict() == trainer.reward_moments.state_dict()
    for (name, p), q in zip(trainer.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(p, q), name
    for key, value in trainer.optimizer.state_dict()["state"][0].items():
        assert torch.equal(torch.as_tensor(value), torch.as_tensor(resumed.optimizer.state_dict()["state"][0][key]))
    assert torch.equal(trainer.rng.get_state(), resumed.rng.get_state())
    # The published version is a loadable HF checkpoint with its label.
    assert read_metadata(trainer.policies / "ppo-1").version == "ppo-1"


def test_non_finite_loss_is_skipped_counted_and_the_run_goes_on(tiny_models, tmp_path):
    trainer = make_trainer(tiny_models, tmp_path)
    rollouts = sample_trajectories(trainer.model.lm, trainer.model.tokenizer, 16, seed=3)
    bad = rollouts[0]
    # An absurd behaviour log-prob makes the importance ratio overflow.
    rollouts[0] = Trajectory(**{**bad.__dict__, "sampling_logprobs": (-1e30,) + bad.sampling_logprobs[1:]})
    record = trainer.train_on(rollouts)
    assert record.stats.skipped_steps >= 1
    assert trainer.metrics.skipped_steps._value.get() == record.stats.skipped_steps
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    healthy = trainer.train_on(sample_trajectories(trainer.model.lm, trainer.model.tokenizer, 16, seed=4))
    assert healthy.stats.skipped_steps == 0 and math.isfinite(healthy.stats.policy_loss)


@pytest.mark.parametrize("estimator", ["rloo", "grpo"])
def test_critic_free_estimators_train_on_whole_groups(tiny_models, tmp_path, estimator):
    trainer = make_trainer(tiny_models, tmp_path, advantage=estimator, samples_per_prompt=4)
    rollouts = sample_trajectories(trainer.model.lm, trainer.model.tokenizer, 16, seed=5, group_size=4)
    record = trainer.train_on(rollouts)
    assert record.stats.optimizer_steps == 8 and record.stats.value_loss == 0.0
    assert record.stats.explained_variance is None  # no value head
    assert math.isfinite(record.stats.policy_loss)


def test_a2c_makes_one_pass_per_batch_and_raises_the_reward(tiny_models, tmp_path):
    trainer = make_trainer(tiny_models, tmp_path, algorithm="a2c", epochs=1, ent_coef=0.01)
    lm, tokenizer = trainer.model.lm, trainer.model.tokenizer
    rewards = []
    for i in range(8):
        record = trainer.train_on(sample_trajectories(lm, tokenizer, 16, seed=300 + i))
        rewards.append(record.stats.reward_raw)
        # One pass over 16 rollouts in minibatches of 8: two steps, nothing truncated on-policy.
        assert record.stats.optimizer_steps == 2 and record.stats.clip_fraction == 0.0
        assert math.isfinite(record.stats.value_loss) and record.stats.value_loss > 0
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2, rewards


def test_kl_as_a_loss_leaves_the_rewards_alone_and_prices_the_kl_in_the_update(tiny_models, tmp_path):
    small = {"batch_size": 8, "minibatch_size": 8, "epochs": 1, "advantage": "grpo", "samples_per_prompt": 4}
    loss = make_trainer(tiny_models, tmp_path / "loss", kl={"mode": "fixed", "init_coef": 0.5, "penalty": "loss",
                                                            "estimator": "k3"}, **small)
    rollouts = sample_trajectories(loss.model.lm, loss.model.tokenizer, 8, seed=41, group_size=4)
    # The sampler is the reference here, so the first update's KL is 0 either way and
    # both placements take the same first step.
    reward = make_trainer(tiny_models, tmp_path / "reward", kl={"mode": "fixed", "init_coef": 0.5}, **small)
    a, b = loss.train_on(rollouts).stats, reward.train_on(rollouts).stats
    assert a.optimizer_steps == b.optimizer_steps == 1
    assert a.policy_loss == pytest.approx(b.policy_loss, abs=1e-6)
    with pytest.raises(ConfigError, match=r"^ppo\.kl\.penalty='value' is invalid: must be one of reward, loss$"):
        config_from_dict({"model_dir": "m", "ppo": {"kl": {"penalty": "value"}}})


def test_a_group_the_worker_produced_short_is_dropped_at_once(tiny_models, tmp_path):
    """A worker that skipped a member (an empty completion) says so in
    group_size; a critic-free trainer drops that group on sight instead of
    waiting for a member that will never come (it would hold the offset and
    the workers' staleness budget). Records without group_size still wait."""
    trainer = make_trainer(tiny_models, tmp_path, advantage="grpo", samples_per_prompt=4, batch_size=4,
                           minibatch_size=4)
    version = trainer.state.policy_version
    base = Trajectory("r", "p", "g", (5, 6), (8, 9), (-0.5, -0.25), (-0.75, -1.5), 0.75, version)
    groups = {"whole": (4, 4), "short": (3, 3), "unmarked": (3, 0)}  # name: (members, group_size)
    offset = 0
    for name, (members, size) in groups.items():
        for i in range(members):
            t = Trajectory(**{**base.__dict__, "rollout_id": f"{name}-{i}", "group_id": name, "group_size": size})
            trainer.admit(consumed(to_rollout(t), offset))
            offset += 1
    batch = trainer._take_batch()
    assert [t.rollout_id for t in batch] == [f"whole-{i}" for i in range(4)]
    assert trainer.metrics.rollouts.labels("incomplete_group")._value.get() == 3
    assert [t.rollout_id for t in trainer.pending] == [f"unmarked-{i}" for i in range(3)]


def test_lora_trains_adapters_and_publishes_only_them(tiny_models, tmp_path):
    trainer = make_trainer(tiny_models, tmp_path, lora={"r": 4, "alpha": 8})
    base = {k: v.clone() for k, v in trainer.model.lm.get_base_model().state_dict().items() if "lora" not in k}
    trainer.train_on(sample_trajectories(trainer.model.lm, trainer.model.tokenizer, 16, seed=6))
    after = trainer.model.lm.get_base_model().state_dict()
    assert all(torch.equal(base[k], after[k]) for k in base if "base_layer" in k or "wte" in k)
    out = trainer.save_policy_version()
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert not (out / "model.safetensors").exists()


def test_config_errors_name_the_field(tiny_models):
    with pytest.raises(ConfigError, match=r"ppo\.minibatch_size"):
        config_from_dict({"model_dir": "m", "ppo": {"batch_size": 4, "minibatch_size": 8}})
    with pytest.raises(ConfigError, match=r"ppo\.kl\.mode"):
        config_from_dict({"model_dir": "m", "ppo": {"kl": {"mode": "sometimes"}}})
    with pytest.raises(ConfigError, match="unknown field"):
        config_from_dict({"model_dir": "m", "learning_rate": 1})
    with pytest.raises(ConfigError, match=r"^ppo\.epochs='two' is invalid: must be an integer$"):
        config_from_dict({"model_dir": "m", "ppo": {"epochs": "two"}})
    # YAML lists become tuples; YAML 1.1's string "1e-5" is the number meant.
    config = config_from_dict({"model_dir": "m", "ppo": {"learning_rate": "1e-5", "lora": {"target_modules": ["c_attn"]}}})
    assert config.ppo.learning_rate == 1e-5 and config.ppo.lora.target_modules == ("c_attn",)
    with pytest.raises(ConfigError, match=r"^ppo\.kl\.estimator='k4' is invalid: must be one of k1, k2, k3$"):
        config_from_dict({"model_dir": "m", "ppo": {"kl": {"estimator": "k4"}}})
    with pytest.raises(ConfigError, match=r"^ppo\.reward_source='shipped' is invalid: must be one of raw, reward_model$"):
        config_from_dict({"model_dir": "m", "ppo": {"reward_source": "shipped"}})
    with pytest.raises(ConfigError, match=r"^ppo\.weight_decay=-0\.1 is invalid: must be >= 0$"):
        config_from_dict({"model_dir": "m", "ppo": {"weight_decay": -0.1}})


def test_the_optimizer_decays_weights_as_configured():
    from trainer.step import make_optimizer

    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = make_optimizer([weight], learning_rate=0.1, weight_decay=0.5)
    weight.grad = torch.zeros(3)  # no gradient: only the decay moves the weight
    optimizer.step()
    # Decoupled decay (AdamW): w <- w - lr * wd * w = 1 - 0.1 * 0.5.
    assert torch.allclose(weight.detach(), torch.full((3,), 0.95))
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = make_optimizer([weight], learning_rate=0.1, weight_decay=0.0)
    weight.grad = torch.zeros(3)
    optimizer.step()
    assert torch.equal(weight.detach(), torch.ones(3))


def test_staleness_objective_and_checkpoint_cadence_that_cannot_work_are_refused():
    with pytest.raises(ConfigError, match=r"^ppo\.max_staleness=0 is invalid: must be an integer >= 1: generation "
                       r"overlaps training"):
        config_from_dict({"model_dir": "m", "ppo": {"max_staleness": 0}})
    with pytest.raises(ConfigError, match=r"^ppo\.objective='ppo2' is invalid: must be one of clipped, decoupled$"):
        config_from_dict({"model_dir": "m", "ppo": {"objective": "ppo2"}})
    a2c = {"algorithm": "a2c", "epochs": 1, "ent_coef": 0.01}
    with pytest.raises(ConfigError, match=r"^ppo\.algorithm='trpo' is invalid: must be one of ppo, a2c$"):
        config_from_dict({"model_dir": "m", "ppo": {"algorithm": "trpo"}})
    with pytest.raises(ConfigError, match=r"^ppo\.epochs=4 is invalid: must be 1 for algorithm a2c"):
        config_from_dict({"model_dir": "m", "ppo": {**a2c, "epochs": 4}})
    with pytest.raises(ConfigError, match=r"^ppo\.advantage='grpo' is invalid: must be gae for algorithm a2c"):
        config_from_dict({"model_dir": "m", "ppo": {**a2c, "advantage": "grpo", "samples_per_prompt": 4}})
    with pytest.raises(ConfigError, match=r"^ppo\.ent_coef=0\.0 is invalid: must be > 0 for algorithm a2c"):
        config_from_dict({"model_dir": "m", "ppo": {**a2c, "ent_coef": 0.0}})
    with pytest.raises(ConfigError, match=r"^ppo\.objective='decoupled' is invalid: must be clipped"):
        config_from_dict({"model_dir": "m", "ppo": {**a2c, "objective": "decoupled"}})
    with pytest.raises(ConfigError, match=r"^ppo\.behaviour_weight_cap=0\.5 is invalid: must be >= 1 or null"):
        config_from_dict({"model_dir": "m", "ppo": {"behaviour_weight_cap": 0.5}})
    with pytest.raises(ConfigError, match=r"^checkpoint_every=None is invalid: must be set when checkpoint_every_s "
                       r"is null"):
        config_from_dict({"model_dir": "m", "checkpoint_every": None})
    with pytest.raises(ConfigError, match=r"^checkpoint_every_s=0 is invalid: must be > 0 seconds or null$"):
        config_from_dict({"model_dir": "m", "checkpoint_every_s": 0})
    # Publishing more often than checkpointing is fine now (a replayed step gets a new label).
    config = config_from_dict({"model_dir": "m", "checkpoint_every": None, "checkpoint_every_s": 30,
                               "ppo": {"objective": "decoupled", "behaviour_weight_cap": None}})
    assert (config.publish_every, config.checkpoint_every, config.checkpoint_every_s) == (1, None, 30)


def test_decoupled_objective_weighs_stale_rollouts_by_the_truncated_behaviour_ratio(tiny_models, tmp_path):
    small = {"batch_size": 8, "minibatch_size": 8, "epochs": 1}
    trainer = make_trainer(tiny_models, tmp_path, objective="decoupled", behaviour_weight_cap=2.0, **small)
    lm, tokenizer = trainer.model.lm, trainer.model.tokenizer
    # Sampled by the trained policy itself: π_prox = π_behav, every weight 1, nothing truncated.
    fresh = trainer.train_on(sample_trajectories(lm, tokenizer, 8, seed=21)).stats
    assert fresh.behaviour_weight == pytest.approx(1.0, abs=1e-4) and fresh.behaviour_weight_truncated == 0
    assert fresh.optimizer_steps == 1 and math.isfinite(fresh.policy_loss)
    # As if a policy had sampled each token with a quarter of the probability the
    # trained one gives it: π_prox/π_behav = 4 on every token, truncated at 2.
    rollouts = sample_trajectories(lm, tokenizer, 8, seed=22)
    quarter = [Trajectory(**{**t.__dict__, "sampling_logprobs": tuple(lp - math.log(4) for lp in t.sampling_logprobs)})
               for t in rollouts]
    stale = trainer.train_on(quarter).stats
    assert stale.behaviour_weight == pytest.approx(2.0) and stale.behaviour_weight_truncated == 1.0
    # The clipped objective has no behaviour weight.
    assert make_trainer(tiny_models, tmp_path / "c", **small).train_on(rollouts).stats.behaviour_weight is None


def test_a_replayed_step_is_published_under_a_new_label_and_lost_versions_stay_trainable(tiny_models, tmp_path):
    small = {"batch_size": 4, "minibatch_size": 4, "epochs": 1, "max_staleness": 1}
    trainer = make_trainer(tiny_models, tmp_path, **small)
    lm, tokenizer = trainer.model.lm, trainer.model.tokenizer
    trainer.train_on(sample_trajectories(lm, tokenizer, 4, seed=31))
    trainer.save_policy_version()
    trainer.checkpoint(consumer=None)
    # Step 2 is published but the process dies before a checkpoint covers it.
    trainer.train_on(sample_trajectories(lm, tokenizer, 4, seed=32))
    lost = trainer.save_policy_version()
    assert lost.name == "ppo-2"

    resumed = make_trainer(tiny_models, tmp_path, **small)
    assert resumed.state.step == 1
    # ppo-2's rollouts are real samples: counted as of the checkpoint's step (lag 0 now), not unknown.
    assert resumed.state.version_steps["ppo-2"] == 1
    t = sample_trajectories(lm, tokenizer, 1, seed=33, version="ppo-2")[0]
    resumed.admit(consumed(to_rollout(t), 0))
    assert [p.rollout_id for p in resumed.pending] == [t.rollout_id]
    # The replayed step 2 has other weights: it never takes the label ppo-2.
    resumed.train_on(sample_trajectories(lm, tokenizer, 4, seed=34))
    assert resumed.save_policy_version().name == "ppo-2.r1"
    assert read_metadata(lost).version == "ppo-2"  # the lost run's files are untouched
    assert resumed.version_label(3) == "ppo-3"


def test_a_version_is_written_from_its_snapshot_while_training_moves_on(tiny_models, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    trainer = make_trainer(tiny_models, tmp_path)
    before = {k: v.clone() for k, v in trainer.model.lm.state_dict().items()}
    snapshot = trainer.model.policy_snapshot()
    # Tied input and output embeddings stay one tensor in the copy.
    assert snapshot["lm_head.weight"] is snapshot["transformer.wte.weight"]
    with torch.no_grad():  # the next optimizer step, before the writer gets to it
        for p in trainer.model.trainable_parameters():
            p.add_(1.0)
    trainer.model.save_policy(tmp_path / "v", "v", snapshot)
    saved = AutoModelForCausalLM.from_pretrained(str(tmp_path / "v")).state_dict()
    assert all(torch.equal(saved[k], before[k]) for k in before)
    assert "lm_head.weight" not in load_file(str(tmp_path / "v" / "model.safetensors"))  # stored once


def test_background_publisher_writes_only_the_newest_waiting_version_and_retries_announcements(tmp_path):
    """The publisher's own logic, with the save and announce functions as
    recorders (the trainer's real ones are exercised in test_trainer_stream)."""
    import threading

    from arbiter.stream import StreamError
    from trainer.publish import BackgroundPublisher, Snapshot

    release, writing = threading.Event(), threading.Event()
    announced, refusals = [], [1]

    def save(path, snap):
        writing.set()
        release.wait(30)
        path.mkdir()
        (path / "step").write_text(str(snap.step))

    def announce(version):
        if version == "v3" and refusals:
            refusals.pop()
            raise StreamError("broker down")
        announced.append(version)

    superseded = []
    publisher = BackgroundPublisher(tmp_path, save, announce, on_superseded=lambda: superseded.append(1),
                                    retry_s=0.01)
    publisher.submit(Snapshot("v1", 1, {}))
    assert writing.wait(30)
    publisher.submit(Snapshot("v2", 2, {}))  # waits behind v1...
    publisher.submit(Snapshot("v3", 3, {}))  # ...and is superseded by v3 before it is written
    assert len(superseded) == 1 and not (tmp_path / "v1").exists()  # v1 still being written
    release.set()
    # v3's first announcement was refused; it stayed owed and was retried.
    wait_until(lambda: announced == ["v1", "v3"], what="v1 and v3 announced")
    publisher.close()
    assert refusals == [] and sorted(p.name for p in tmp_path.iterdir()) == ["v1", "v3"]  # no temporary dir left


def test_the_publisher_keeps_only_the_newest_policy_versions_when_told(tmp_path):
    import os

    from trainer.config import config_from_dict
    from trainer.publish import BackgroundPublisher, Snapshot

    def save(path, snap):
        path.mkdir()
        (path / "step").write_text(str(snap.step))

    announced = []
    publisher = BackgroundPublisher(tmp_path, save, announced.append, keep_versions=2)
    for step in (1, 2, 3, 4):
        publisher.submit(Snapshot(f"v{step}", step, {}))
        assert publisher.wait_idle(30)
        # Modification times order the versions: a coarse clock must not tie them.
        os.utime(tmp_path / f"v{step}", (step, step))
    publisher.close()
    assert announced == ["v1", "v2", "v3", "v4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v3", "v4"]
    # 20 by default (null: unbounded, as the demo runs); fewer than two is refused naming the field.
    assert config_from_dict({"model_dir": str(tmp_path), "output_dir": str(tmp_path)}).keep_policy_versions == 20
    assert config_from_dict({"model_dir": str(tmp_path), "output_dir": str(tmp_path),
                             "keep_policy_versions": None}).keep_policy_versions is None
    with pytest.raises(ConfigError, match=r"keep_policy_versions=1 is invalid: must be >= 2 or null"):
        config_from_dict({"model_dir": str(tmp_path), "output_dir": str(tmp_path), "keep_policy_versions": 1})

def consumed(rollout, offset=5):
    return ConsumedRecord("rollouts", 0, offset, rollout.prompt_id, 0, "1.1", rollout)


def test_rm_normalized_reward_is_read_only_when_the_rm_version_normalized_it():
    t = Trajectory("r1", "p", "g", (5, 6), (8, 9), (-0.5, -0.25), (-0.75, -1.5), 0.75, "v0", reward_model_version="rm-3")
    rollout = to_rollout(t)
    rollout.reward_model_version = "rm-3"
    rollout.reward_normalized, rollout.reward_normalization_applied = 1.5, True
    assert trajectory_from_record(consumed(rollout), "reward_model").reward_normalized == 1.5
    assert trajectory_from_record(consumed(rollout)).reward_normalized == 1.5
    # An RM version without shipped statistics: the worker copies the raw score, which is not normalized.
    rollout.reward_normalized, rollout.reward_normalization_applied = 0.75, False
    assert trajectory_from_record(consumed(rollout)) == Trajectory(
        **{**t.__dict__, "topic": "rollouts", "partition": 0, "offset": 5}
    )
    with pytest.raises(InvalidRollout, match=r"^rollout r1 at rollouts\[0\]@5: reward_source is reward_model, but "
                       r"reward model version 'rm-3' did not normalize this reward"):
        trajectory_from_record(consumed(rollout), "reward_model")
    rollout.reward_normalized, rollout.reward_normalization_applied = math.nan, True
    with pytest.raises(InvalidRollout, match=r"reward_normalized is nan"):
        trajectory_from_record(consumed(rollout), "reward_model")


def test_stale_and_unknown_versions_are_dropped_on_arrival_and_while_waiting(tiny_models, tmp_path):
    trainer = make_trainer(tiny_models, tmp_path, max_staleness=1)
    trainer.state.version_steps.update({"ppo-1": 1, "ppo-2": 2})
    trainer.state.step = 2
    t = Trajectory("r", "p", "g", (5, 6), (8, 9), (-0.5, -0.25), (-0.75, -1.5), 0.75, "v0")
    for i, version in enumerate(["v0", "ppo-1", "ppo-2", "ppo-9"]):
        trainer.admit(consumed(to_rollout(Trajectory(**{**t.__dict__, "rollout_id": version, "policy_version": version})), i))
    # Step 2, bound 1: v0 (lag 2) is stale, ppo-9 was never published; ppo-1 and ppo-2 wait for a batch.
    assert [p.rollout_id for p in trainer.pending] == ["ppo-1", "ppo-2"]

    def count(outcome):
        return trainer.metrics.rollouts.labels(outcome)._value.get()

    assert (count("stale"), count("unknown_version")) == (1, 1)
    # One update later ppo-1 is 2 versions old: dropped while waiting, before a batch is formed.
    trainer.state.step = 3
    assert trainer._take_batch() is None
    assert [p.rollout_id for p in trainer.pending] == ["ppo-2"] and count("stale") == 2
    assert set(trainer.seen) == {"v0", "ppo-9", "ppo-1"}  # dropped ones are remembered (dedupe)


def test_reward_source_reward_model_trains_on_the_rm_version_statistics(tiny_models, tmp_path):
    trainer = make_trainer(tiny_models, tmp_path, reward_source="reward_model")
    rollouts = sample_trajectories(trainer.model.lm, trainer.model.tokenizer, 16, seed=7)
    # As an RM version shipping mean 0.5 and std 0.25 normalizes: (r − 0.5) / 0.25.
    shipped = [Trajectory(**{**t.__dict__, "reward_normalized": (t.reward - 0.5) / 0.25}) for t in rollouts]
    record = trainer.train_on(shipped)
    raw_mean = sum(t.reward for t in rollouts) / 16
    assert record.stats.reward_raw == pytest.approx(raw_mean, abs=1e-6)
    assert record.stats.reward_normalized == pytest.approx((raw_mean - 0.5) / 0.25, abs=1e-5)
    assert trainer.reward_moments.count == 0  # the running normalizer plays no part
    with pytest.raises(InvalidInput, match="reward_source is reward_model, but some rollouts have no RM-normalized"):
        trainer.train_on(rollouts)
    # From the stream, a rollout the RM did not normalize is dropped as invalid.
    good, bad = map(to_rollout, sample_trajectories(trainer.model.lm, trainer.model.tokenizer, 2, seed=8))
    good.reward_normalized, good.reward_normalization_applied = -1.0, True
    trainer.admit(consumed(good, 0))
    trainer.admit(consumed(bad, 1))
    assert [(t.rollout_id, t.reward_normalized) for t in trainer.pending] == [(good.rollout_id, -1.0)]
    assert trainer.metrics.rollouts.labels("invalid")._value.get() == 1


def test_reset_offsets_keeps_the_model_but_not_the_stream_position(tiny_models, tmp_path):
    """After the topics were recreated (e.g. a fresh in-memory dev broker), a
    resumed trainer keeps weights, optimizer and dedupe window but reads the
    new log from its start."""
    from arbiter.stream import KafkaSettings

    trainer = make_trainer(tiny_models, tmp_path)
    trainer.train_on(sample_trajectories(trainer.model.lm, trainer.model.tokenizer, 16, seed=8))
    trainer.consumed = {("t", 0): 99}
    trainer.checkpoint(consumer=None)
    resumed = PPOTrainer(trainer.config, KafkaSettings(), reset_offsets=True)
    assert resumed.state.step == 1 and resumed.state.offsets == {} and resumed.consumed == {}
    assert len(resumed.seen) == 16
