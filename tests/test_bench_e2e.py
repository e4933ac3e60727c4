"""``make bench-e2e``'s judging and its table, without running the contenders
(a stack start alone takes longer than this file may; TRL is never installed
here): the KL it reports is zero for a policy against itself and positive
against a changed one, and the ratio rows are the quotients of the rows."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
from lm_fixtures import perturbed

from bench.e2e import (TRL_PPO_LOCK, TRL_PPO_SPEC, Judge, Run, at_matched_kl, kl_section, load_reward_model,
                       reward_scores, sample_kl, table, training, trl_constraints)

PROMPTS = ["Hello there", "The weather", "Say:", "One more prompt, longer than the others"]


def test_kl_of_a_policy_against_itself_is_zero_and_against_a_changed_one_positive(tiny_models, tmp_path):
    same = sample_kl(tiny_models["policy"], tiny_models["policy"], PROMPTS, n=2, max_new_tokens=6, seed=0,
                     prompts_per_batch=3)
    assert same["kl"] == 0.0  # the same weights score every token the same, exactly
    assert same["words"] > 0
    changed = perturbed(tiny_models["policy"], tmp_path / "changed", version="v1", scale=0.5)
    assert sample_kl(tiny_models["policy"], changed, PROMPTS, n=2, max_new_tokens=6, seed=0)["kl"] > 0


def test_judge_scores_gold_and_the_rm_on_the_same_samples_and_gains_are_zero_for_the_initial_policy(
        tiny_models, tmp_path):
    from types import SimpleNamespace

    models = SimpleNamespace(policy=tiny_models["policy"], reward=tiny_models["reward"], gold="vader",
                             eval_prompts=PROMPTS, max_new_tokens=6)
    judge = Judge(models)
    assert judge.gain(Path(models.policy)) == 0.0 and judge.rm_gain(Path(models.policy)) == 0.0
    changed = perturbed(tiny_models["policy"], tmp_path / "changed", version="v1", scale=0.5)
    gold, rm = judge.scores(changed)
    assert judge.rm_gain(changed) == rm - judge.scores(Path(models.policy))[1]
    assert -1.0 <= gold <= 1.0  # VADER compound
    # The RM's raw score of a text is its one logit, as Hugging Face computes it.
    import torch
    tokenizer, model = load_reward_model(Path(models.reward))
    with torch.no_grad():
        direct = model(**tokenizer(["Hello there, friend"], return_tensors="pt")).logits[0, 0].item()
    assert reward_scores((tokenizer, model), ["Hello there, friend"]) == pytest.approx([direct], abs=1e-6)


def run(name: str, rollouts: int, updates: int, gain: float, kl: float, repeat: int = 0) -> Run:
    r = Run(name, 10.0, rollouts, updates, Path("."), setup_seconds=0.0, repeat=repeat)
    r.eval = {"gold_gain": gain, "rm_gain": 2 * gain, "kl": kl, "words": 5.0, "gold_per_nat": gain / kl, "gold_per_s": gain / 10.0,
              "kl_level": 2.0, "seconds_at_level": 5.0, "gold_at_level": gain / 2, "gold_per_s_at_level": gain / 10.0}
    return r


def test_ratio_rows_divide_each_arbiter_column_by_trls_within_each_repeat():
    header, rows = table([run("trl-grpo", 100, 3, 0.2, 4.0, repeat=0), run("arbiter-grpo", 300, 9, 0.3, 2.0, repeat=0),
                          run("trl-grpo", 200, 6, 0.2, 4.0, repeat=1), run("arbiter-grpo", 200, 6, 0.3, 2.0, repeat=1)])
    assert header[5:12] == ["rollouts/s", "updates/s", "gold gain", "final KL (nats/sample)", "gold/nat KL",
                            "gold/wall-s", "matched KL"]
    # TRL: 10 and 20 rollouts/s -> 15 ± 5; 0.3 and 0.6 updates/s -> 0.45 ± 0.15; +0.2 gold at 4 nats twice.
    assert rows[0][:2] == ["trl-grpo", "2"]
    assert rows[0][5:11] == ["15.0 ± 5.000", "0.450 ± 0.150", "0.200 ± 0.000", "4.000 ± 0.000", "0.050 ± 0.000",
                             "0.020 ± 0.000"]
    # Arbiter/TRL per repeat: rollouts/s 30/10 = 3 and 20/20 = 1 -> 2 ± 1 (not the ratio of the means, 25/15);
    # gold 1.5 both times; KL 0.5; gold/nat 0.15/0.05 = 3; the matched-KL level has no ratio.
    assert rows[2][0] == "arbiter-grpo / trl-grpo"
    assert rows[2][5:12] == ["2.000 ± 1.000", "2.000 ± 1.000", "1.500 ± 0.000", "0.500 ± 0.000", "3.000 ± 0.000",
                             "1.500 ± 0.000", ""]
    # The RM's gain (twice the gold's here) divides like the gold's.
    assert rows[2][header.index("RM reward gain (raw)")] == "1.500 ± 0.000"


def test_arbiters_ppo_is_divided_by_trls_ppo_and_by_trls_grpo():
    header, rows = table([run("trl-grpo", 100, 3, 0.2, 4.0), run("trl-ppo", 50, 1, 0.1, 1.0),
                          run("arbiter-ppo", 200, 6, 0.3, 2.0)])
    assert [r[0] for r in rows] == ["trl-grpo", "trl-ppo", "arbiter-ppo", "arbiter-ppo / trl-ppo",
                                    "arbiter-ppo / trl-grpo"]
    # rollouts/s 20 / 5 = 4 and 20 / 10 = 2; updates/s 0.6 / 0.1 = 6 and 0.6 / 0.3 = 2; gold 3 and 1.5.
    assert rows[3][5:8] == ["4.000", "6.000", "3.000"]
    assert rows[4][5:8] == ["2.000", "2.000", "1.500"]


class FakeJudge:
    """Gold and KL by directory, as a unit test of the interpolation around them."""

    def __init__(self, kl: dict[str, float], gain: dict[str, float]):
        self._kl, self._gain = kl, gain

    def kl(self, policy: Path) -> dict:
        return {"kl": self._kl[str(policy)]}

    def gain(self, policy: Path) -> float:
        return self._gain[str(policy)]


def test_matched_kl_interpolates_between_the_policies_around_the_first_crossing():
    judge = FakeJudge({"a": 1.0, "b": 5.0, "c": 3.0, "final": 8.0}, {"a": 0.1, "b": 0.3, "c": 0.25, "final": 0.6})
    r = Run("arbiter-grpo", 40.0, 0, 0, Path("final"), setup_seconds=0.0,
            curve=[(10.0, Path("a")), (20.0, Path("b")), (30.0, Path("c"))])
    r.eval = {"kl": 8.0}
    # Level 4: first reached between a (10 s, KL 1, +0.1) and b (20 s, KL 5, +0.3): 3/4 of the way,
    # at 17.5 s with +0.25, i.e. 0.25 / 17.5 = 0.0142857 gold per second (the later dip to 3 does not count).
    at_matched_kl(judge, r, 4.0)
    assert r.eval["seconds_at_level"] == pytest.approx(17.5)
    assert r.eval["gold_at_level"] == pytest.approx(0.25)
    assert r.eval["gold_per_s_at_level"] == pytest.approx(0.25 / 17.5)
    # Below the first kept policy: from (0 s, KL 0, +0): level 0.5 is half way to a, at 5 s with +0.05.
    at_matched_kl(judge, r, 0.5)
    assert (r.eval["seconds_at_level"], r.eval["gold_at_level"]) == pytest.approx((5.0, 0.05))
    # The run with the lowest final KL sets the level: it reaches it at its end.
    at_matched_kl(judge, r, 8.0)
    assert (r.eval["seconds_at_level"], r.eval["gold_at_level"]) == pytest.approx((40.0, 0.6))


def test_kl_section_is_a_trainer_kl_config_placing_the_fixed_beta_where_asked():
    from bench.e2e import KL_ESTIMATOR
    from trainer.config import KL_PENALTIES, KLConfig

    assert set(KL_ESTIMATOR) == set(KL_PENALTIES)  # every placement the trainer has, and no other
    loss, reward = KLConfig(**kl_section(0.05, "loss")), KLConfig(**kl_section(0.05, "reward"))
    for kl in (loss, reward):
        kl.validate("ppo.kl")
        assert (kl.mode, kl.init_coef) == ("fixed", 0.05)
    # TRL's GRPOTrainer: k3 in the loss; TRL's PPOTrainer: k1 in each token's reward.
    assert (loss.penalty, loss.estimator) == ("loss", "k3")
    assert (reward.penalty, reward.estimator) == ("reward", "k1")
    with pytest.raises(ValueError, match="kl_penalty 'both'"):
        kl_section(0.05, "both")


def test_a_learning_rate_reaches_every_contender_through_the_shared_ppo_settings():
    from bench.e2e import with_learning_rate
    from services.demo_models import DemoModels

    models = DemoModels(policy=Path("p"), reward=Path("r"), prompts=Path("q"), description="", rm_metrics={},
                        eval_prompts=[], ppo={"batch_size": 32, "minibatch_size": 8, "epochs": 2,
                                              "learning_rate": 5e-4})
    assert with_learning_rate(models, None) is models
    tuned = with_learning_rate(models, 1.25e-4)
    # TRL's runners read training(); Arbiter's stack reads models.ppo: both see it.
    assert tuned.ppo["learning_rate"] == training(tuned, 0.05)["learning_rate"] == 1.25e-4
    assert models.ppo["learning_rate"] == 5e-4  # the prepared models are not changed
    with pytest.raises(ValueError, match="learning_rate 0"):
        with_learning_rate(models, 0)


def test_the_shared_training_flags_name_what_a_run_changed_in_its_title():
    import argparse

    from bench.e2e import add_training_flags, training_title

    parser = argparse.ArgumentParser()
    parser.add_argument("--beta", type=float, default=0.05)
    add_training_flags(parser, learning_rate=1.25e-4)
    plain = parser.parse_args([])
    assert (plain.learning_rate, training_title(plain)) == (1.25e-4, "β 0.05 fixed")
    changed = parser.parse_args(["--kl-target", "8", "--ppo-set", "weight_decay=0", "--learning-rate", "5e-4"])
    assert changed.learning_rate == 5e-4 and changed.ppo_set == [("weight_decay", 0)]
    assert training_title(changed).endswith("adaptive toward 8 nats/sample, horizon 320); Arbiter's ppo weight_decay=0")


def test_a_kl_target_hands_beta_to_the_adaptive_controller_with_the_demos_horizon():
    from services.demo_models import DEMO_KL_HORIZON
    from trainer.config import KLConfig

    kl = KLConfig(**kl_section(0.05, "loss", target=8.8))
    kl.validate("ppo.kl")
    assert (kl.mode, kl.init_coef, kl.target, kl.horizon) == ("adaptive", 0.05, 8.8, DEMO_KL_HORIZON)
    assert (kl.penalty, kl.estimator) == ("loss", "k3")  # the placement is unchanged
    with pytest.raises(ValueError, match="kl_target 0"):
        kl_section(0.05, "loss", target=0)


def test_trl_runs_on_the_projects_torch_and_transformers():
    assert trl_constraints() == (f"torch==2.13.0\ntransformers=={importlib.metadata.version('transformers')}\n")


def test_trl_ppo_lock_pins_the_trl_it_installs_and_leaves_torch_and_transformers_to_the_project():
    pins = dict(line.split("==") for line in TRL_PPO_LOCK.read_text().splitlines()
                if line.strip() and not line.startswith("#"))
    assert "trl==" + pins["trl"] == TRL_PPO_SPEC
    assert not {"torch", "transformers"} & {name.lower() for name in pins}


def test_trl_ppos_reward_head_scores_what_arbiters_trainer_normalizes_to(tiny_models):
    import torch
    from transformers import AutoModelForSequenceClassification

    from bench.trl_ppo import normalize_score_head

    model = AutoModelForSequenceClassification.from_pretrained(tiny_models["reward"], num_labels=1).eval()
    hidden = torch.randn(3, 5, model.score.in_features)
    with torch.no_grad():
        raw = model.score(hidden)
        normalize_score_head(model, mean=1.5, std=4.0)
        assert torch.allclose(model.score(hidden), (raw - 1.5) / 4.0, atol=1e-6)
