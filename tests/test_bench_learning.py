"""The aggregation of ``make bench-learning`` (bench/learning.py): mean ± sd
over seeds, the fluency formula, Arbiter's best algorithm, item 5's verdict.
Expected numbers are derived by hand in the comments."""

from __future__ import annotations

import math

import pytest

from bench.e2e import ppo_setting
from bench.learning import best_arbiter, cell, fluency, mean_sd, summarize, versus_trl


def test_mean_and_sample_sd_over_seeds():
    # mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5, over n − 1 = 3: sd √(5/3).
    mean, sd, n = mean_sd([1.0, 2.0, 3.0, 4.0, math.nan])
    assert (mean, n) == (2.5, 4)
    assert sd == pytest.approx(math.sqrt(5 / 3))
    one = mean_sd([0.7])
    assert one[0] == 0.7 and math.isnan(one[1]) and one[2] == 1
    none = mean_sd([])
    assert math.isnan(none[0]) and math.isnan(none[1]) and none[2] == 0
    # One seed prints the value alone; more print mean ± sd.
    assert cell(one) == "0.700"
    assert cell((0.2, 0.1, 2)) == "0.200 ± 0.100"


def test_fluency_pools_every_token():
    # (−1 − 2 − 3) / 3 tokens = −2; the mean of per-sample means would be −2.25,
    # and the empty sample adds nothing.
    assert fluency([[-1.0, -2.0], [-3.0], []]) == -2.0
    assert math.isnan(fluency([[], []]))


def test_summary_per_contender_ignores_failed_runs():
    results = [
        {"contender": "arbiter-ppo", "seed": 0, "gold_gain": 0.1, "kl": 1.0, "gold_per_s": 0.1 / 60},
        {"contender": "arbiter-ppo", "seed": 1, "gold_gain": 0.3, "kl": 3.0, "gold_per_s": 0.3 / 60},
        {"contender": "arbiter-ppo", "seed": 2, "notes": "failed: boom"},
        {"contender": "trl-grpo", "seed": 0, "gold_gain": 0.05, "kl": 2.0, "gold_per_s": 0.05 / 60},
    ]
    summary = summarize(results)
    assert list(summary) == ["arbiter-ppo", "trl-grpo"]
    mean, sd, n = summary["arbiter-ppo"]["gold_gain"]
    # mean 0.2; deviations ±0.1: sd √((0.01 + 0.01) / 1) = √0.02.
    assert (mean, n) == (pytest.approx(0.2), 2) and sd == pytest.approx(math.sqrt(0.02))
    assert summary["arbiter-ppo"]["kl"][:2] == (2.0, pytest.approx(math.sqrt(2)))
    assert summary["trl-grpo"]["gold_gain"][2] == 1


def stats(gold_per_s: float, kl: float, gain: float | None = None) -> dict:
    gain = gold_per_s * 60 if gain is None else gain
    return {"gold_per_s": (gold_per_s, math.nan, 1), "kl": (kl, math.nan, 1), "gold_gain": (gain, math.nan, 1)}


def test_best_arbiter_highest_gold_per_second_then_lower_kl():
    summary = {"arbiter-ppo": stats(0.01, 1.0), "arbiter-grpo": stats(0.02, 3.0), "arbiter-rloo": stats(0.02, 2.0),
               "arbiter-ilql": stats(math.nan, 0.5), "trl-grpo": stats(0.05, 1.0)}
    # TRL's higher rate is not Arbiter's; grpo and rloo tie at 0.02: rloo's KL is lower.
    assert best_arbiter(summary) == "arbiter-rloo"
    assert best_arbiter({"trl-grpo": stats(0.05, 1.0), "arbiter-ilql": stats(math.nan, 1.0)}) is None


def test_versus_trl_says_where_the_time_goes_when_behind():
    summary = {"arbiter-grpo": stats(0.002, 1.0, gain=0.12), "trl-grpo": stats(0.003, 2.0, gain=0.18),
               "trl-ppo": stats(0.001, 0.5, gain=0.06)}
    results = [{"contender": "arbiter-grpo", "rollouts_per_s": 10.0, "updates_per_s": 0.3, "setup_seconds": 20.0},
               {"contender": "trl-grpo", "rollouts_per_s": 20.0, "updates_per_s": 0.6, "setup_seconds": 5.0},
               {"contender": "trl-ppo", "rollouts_per_s": 5.0, "updates_per_s": 0.15, "setup_seconds": 6.0}]
    text = versus_trl(summary, results)
    assert "arbiter-grpo (Arbiter best)" in text
    # Compared per wall-second (runs stop at an update boundary past the budget).
    assert "target met against trl-ppo: arbiter-grpo's gold gain per wall-second 0.002 ≥ 0.001" in text
    assert ("target NOT met against trl-grpo: arbiter-grpo's gold gain per wall-second 0.002 < 0.003. Where the "
            "time goes: arbiter-grpo "
            "10.0 rollouts/s, 0.300 updates/s; trl-grpo 20.0 rollouts/s, 0.600 updates/s") in text
    # Slower per second than trl-grpo (0.3 < 0.6 updates/s): nothing says the gap is per update.
    assert "what an update buys" not in text
    # Against TRL's PPO at 0.15 updates/s with a gain of 0.3, Arbiter's 0.3 updates/s are not the gap.
    summary["trl-ppo"] = stats(0.005, 0.5, gain=0.3)
    assert "trl-ppo: arbiter-grpo's gold gain per wall-second 0.002 < 0.005" in versus_trl(summary, results)
    assert "the gap is what an update buys, not time" in versus_trl(summary, results)


PROMPTS = ["Hello there", "The weather", "Say:", "One more prompt, longer than the others"]


def test_ppo_settings_read_their_values_as_yaml_and_refuse_a_bare_word():
    import argparse

    assert ppo_setting("whiten_advantages=false") == ("whiten_advantages", False)
    assert ppo_setting("behaviour_weight_cap=null") == ("behaviour_weight_cap", None)
    assert ppo_setting("clip_coef=0.1") == ("clip_coef", 0.1)
    with pytest.raises(argparse.ArgumentTypeError, match="expected KEY=VALUE"):
        ppo_setting("whiten_advantages")


def test_judge_samples_an_ilql_policy_through_its_heads(tiny_models, tmp_path):
    """The judge's KL is ~0 for the reference itself and for its ILQL copy at
    β 0 (the heads change nothing), and > 0 at β 1 (it samples logits +
    β·(min Q̂ − V), the distribution the policy service would serve)."""
    import shutil
    from types import SimpleNamespace

    import torch
    from transformers import AutoModelForCausalLM

    from arbiter.ilql import ILQLHeads, head_sizes, save_heads
    from bench.learning import LearningJudge

    policy = tiny_models["policy"]
    models = SimpleNamespace(policy=policy, reward=tiny_models["reward"], gold="vader", max_new_tokens=6)
    with_heads = tmp_path / "ilql"
    shutil.copytree(policy, with_heads)
    torch.manual_seed(0)
    save_heads(ILQLHeads(*head_sizes(AutoModelForCausalLM.from_pretrained(str(policy)))), with_heads, {})

    def measure(path, beta):
        return LearningJudge(models, PROMPTS, samples=2, ilql_beta=beta, prompts_per_batch=3).measure(path)

    itself = measure(policy, 1.0)
    # Sampled token by token, scored in one pass: equal up to float rounding.
    assert abs(itself["kl"]) < 1e-4
    assert itself["fluency"] < 0 and itself["words"] > 0 and math.isfinite(itself["rm_reward"])
    assert abs(measure(with_heads, 0.0)["kl"]) < 1e-4
    assert measure(with_heads, 1.0)["kl"] > 0.01
