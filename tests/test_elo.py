"""Elo ratings: the fit against hand-computed values, and `arbiter elo` against
real policy and reward services (and on submitted human preferences)."""

from __future__ import annotations

import json
import math

import grpc
import pytest
from helpers import BackgroundServer
from lm_fixtures import perturbed
from scipy.special import expit

from cli.main import main as cli_main
from arbiter.elo import ELO_PER_LOGIT, Outcome, fit_elo, sequential_elo, tie, win
from arbiter.v1 import common_pb2, common_pb2_grpc, reward_pb2, reward_pb2_grpc
from services.policy.server import create_server as create_policy_server
from services.policy.settings import PolicySettings
from services.reward.server import create_server as create_reward_server
from services.reward.settings import RewardSettings


# A 3:1 record's MLE gap: sigmoid(d) = 3/4 -> d = ln 3 logits = 400 log10(3) = 190.849 Elo.
THREE_TO_ONE = 400 * math.log10(3)


def games(a, b, a_wins, b_wins):
    return [win(a, b)] * a_wins + [win(b, a)] * b_wins


def test_two_players_three_to_one():
    # The MLE gap, split around 1000.
    result = fit_elo(games("A", "B", 3, 1), prior=0, n_bootstrap=0)
    assert result.rating("A").elo == pytest.approx(1000 + THREE_TO_ONE / 2, abs=1e-3)
    assert result.rating("B").elo == pytest.approx(1000 - THREE_TO_ONE / 2, abs=1e-3)
    assert [r.player for r in result.ratings] == ["A", "B"]
    assert result.rating("A").games == 4 and result.rating("A").score == 3 and result.rating("A").win_rate == 0.75
    assert result.head_to_head == {"A": {"B": 3.0}, "B": {"A": 1.0}}


def test_three_players_consistent_odds():
    # A:B 3:1 and B:C 3:1 imply A:C 9:1; with exactly those records the MLE
    # reproduces every pair's rate: gaps of ln 3 logits each.
    outcomes = games("A", "B", 3, 1) + games("B", "C", 3, 1) + games("A", "C", 9, 1)
    result = fit_elo(outcomes, prior=0, n_bootstrap=0)
    a, b, c = (result.rating(p).elo for p in "ABC")
    assert (a - b, b - c, (a + b + c) / 3) == pytest.approx((THREE_TO_ONE, THREE_TO_ONE, 1000.0), abs=1e-3)


def test_ties_count_half_and_order_does_not_matter():
    outcomes = [win("A", "B"), tie("A", "B"), tie("B", "A"), win("B", "A")]
    result = fit_elo(outcomes, prior=0, n_bootstrap=0)
    assert result.rating("A").elo == pytest.approx(1000, abs=1e-6) == result.rating("B").elo
    assert result.rating("A").score == 2.0
    shuffled = fit_elo(list(reversed(games("A", "B", 3, 1))), prior=0, n_bootstrap=0)
    assert shuffled.rating("A").elo == pytest.approx(fit_elo(games("A", "B", 3, 1), prior=0, n_bootstrap=0)
                                                     .rating("A").elo)


def gap_in_logits(result):
    return (result.rating("A").elo - result.rating("B").elo) / ELO_PER_LOGIT


def test_prior_keeps_a_clean_sweep_finite_and_barely_moves_real_data():
    # With the prior lambda/2 (theta_A^2 + theta_B^2) the optimum has theta_A = -theta_B = d/2,
    # and setting the derivative of the penalized NLL
    #   -[w log sigmoid(d) + l log sigmoid(-d)] + lambda d^2 / 4
    # to zero gives  g(d) = w - n sigmoid(d) - lambda d / 2 = 0  (n = w + l),
    # whose left side falls strictly in d: one root, finite even for l = 0.
    lam = 0.01  # fit_elo's default prior

    def stationarity(w, l, d):
        return w - (w + l) * expit(d) - lam * d / 2

    sweep = fit_elo(games("A", "B", 10, 0), n_bootstrap=0)
    d = gap_in_logits(sweep)
    assert math.isfinite(d) and stationarity(10, 0, d) == pytest.approx(0, abs=1e-6)
    # 10 (1 - sigmoid(d)) = 0.005 d, i.e. d e^d ~ 2000: d ~ 5.8 logits, A ~ 1000 + 500.
    assert 1200 < sweep.rating("A").elo < 2000

    # 3:1: without the prior d0 = ln 3. One Newton step on g from d0, with
    # g(d0) = -lambda ln(3) / 2 and g'(d0) = -(n p (1 - p) + lambda / 2) = -(3/4 + lambda / 2),
    # gives d = ln 3 - (lambda ln(3) / 2) / (3/4 + lambda / 2) = ln 3 - 0.0072755
    # (the next term is O(1e-5) logits): A moves in by 0.0072755 / 2 logits = 0.63 Elo.
    real = fit_elo(games("A", "B", 3, 1), n_bootstrap=0)
    d = gap_in_logits(real)
    assert stationarity(3, 1, d) == pytest.approx(0, abs=1e-6)
    newton = math.log(3) - (lam * math.log(3) / 2) / (3 / 4 + lam / 2)
    assert real.rating("A").elo == pytest.approx(1000 + ELO_PER_LOGIT * newton / 2, abs=0.01)
    # Under a point from the prior-free rating.
    assert 0 < 1000 + THREE_TO_ONE / 2 - real.rating("A").elo < 1


def test_bootstrap_interval_matches_the_normal_approximation():
    # 400 games at 3:1: SE of the logit gap = 1/sqrt(n p (1-p)) = 1/sqrt(75);
    # each rating carries half the gap, so the 95% half-width is
    # 1.96 * 173.72 / sqrt(75) / 2 = 19.66 Elo.
    result = fit_elo(games("A", "B", 300, 100), prior=0, n_bootstrap=400, seed=1)
    a = result.rating("A")
    half = (a.ci_high - a.ci_low) / 2
    assert half == pytest.approx(1.96 * ELO_PER_LOGIT / math.sqrt(75) / 2, rel=0.2)
    assert a.ci_low < a.elo < a.ci_high
    again = fit_elo(games("A", "B", 300, 100), prior=0, n_bootstrap=400, seed=1)
    assert (again.rating("A").ci_low, again.rating("A").ci_high) == (a.ci_low, a.ci_high)


def test_sequential_elo_hand_values():
    # 1000/1000, A wins: E = 0.5, A += 32 * 0.5 -> 1016 / 984. Then B wins:
    # E_B = 1 / (1 + 10^(32/400)) = 1 / 2.202264 = 0.454078, B += 32 * 0.545922 = 17.4695.
    ratings = sequential_elo([win("A", "B"), win("B", "A")])
    assert ratings == pytest.approx({"A": 998.5305, "B": 1001.4695}, abs=1e-4)


def test_outcome_validation():
    with pytest.raises(ValueError, match="two different players"):
        Outcome("A", "A")
    with pytest.raises(ValueError, match="score must be in"):
        Outcome("A", "B", 1.5)
    with pytest.raises(ValueError, match="no outcomes"):
        fit_elo([])


# -- the CLI --------------------------------------------------------------------------


def test_elo_from_submitted_preferences(tmp_path, capsys):
    path = tmp_path / "prefs.jsonl"
    rows = [{"winner": "v1", "loser": "v0"}] * 3 + [{"winner": "v0", "loser": "v1"}] + [
        {"winner": "v0", "loser": "v2", "tie": True}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "elo.json"
    assert cli_main(["elo", "--preferences", str(path), "--versions", "v0,v1", "--bootstrap", "50",
                     "--prior", "0", "--out", str(out)]) == 0
    assert "Elo of policy versions" in capsys.readouterr().out
    document = json.loads(out.read_text())
    ratings = {r["player"]: r for r in document["ratings"]}
    assert set(ratings) == {"v0", "v1"} and document["outcomes"] == 4  # v2's game filtered out
    assert ratings["v1"]["elo"] - ratings["v0"]["elo"] == pytest.approx(THREE_TO_ONE, abs=1e-3)
    assert document["judge"]["kind"] == "human_preferences"

    path.write_text('{"winner": "v1", "loser": "v0"}\n{"winner": "v1"}\n')
    assert cli_main(["elo", "--preferences", str(path)]) == 2
    assert f"{path}:2: loser: must be a version name" in capsys.readouterr().err
    assert cli_main(["elo", "--versions", "v0,v1"]) == 2
    assert "--policy-target, --reward-target, --prompts required" in capsys.readouterr().err


def test_elo_prompts_read_the_prompts_format_and_other_datasets_rows(tmp_path):
    from arbiter.types import ChatMessage, Prompt
    from services.elo import read_prompts

    # A preference dataset's rows serve as prompts: their other keys are not elo's business.
    rows = tmp_path / "prefs.jsonl"
    rows.write_text(json.dumps({"prompt": "Q?", "chosen": " a", "rejected": " b"}) + "\n"
                    + json.dumps({"prompt": [{"role": "user", "content": "Hi"}], "chosen": "x", "rejected": "y"}) + "\n")
    assert [(p.text, p.messages) for p in read_prompts(str(rows))] == [("Q?", None), ("", (ChatMessage("user", "Hi"),))]
    text = tmp_path / "prompts.txt"
    text.write_text("The quick brown\n\nThe weather today\n")
    assert read_prompts(str(text)) == [Prompt(text="The quick brown"), Prompt(text="The weather today")]


@pytest.fixture(scope="module")
def services(tiny_models, tmp_path_factory, model_roots):
    policy_settings = PolicySettings(model_dir=str(tiny_models["policy"]), port=0, max_loaded_versions=2,
                                     model_roots=model_roots)
    reward_settings = RewardSettings(model_dir=str(tiny_models["reward"]), port=0)
    candidate = perturbed(tiny_models["policy"], tmp_path_factory.mktemp("elo") / "ppo-1", version="ppo-1")
    with BackgroundServer(lambda: create_policy_server(policy_settings)) as policy, \
            BackgroundServer(lambda: create_reward_server(reward_settings)) as reward:
        with grpc.insecure_channel(policy.target) as channel:
            common_pb2_grpc.ModelServiceStub(channel).LoadModelVersion(
                common_pb2.LoadModelVersionRequest(path=str(candidate), activate=False), timeout=60
            )
        yield policy, reward


def test_elo_judged_by_a_reward_model(services, tmp_path, capsys):
    policy, reward = services
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "The quick brown"}, {"prompt": "Please explain how a reward model"},
        {"messages": [{"role": "user", "content": "Say something nice."}]}, {"prompt": "The weather today"},
    ]))
    out = tmp_path / "elo.json"
    code = cli_main([
        "elo", "--policy-target", policy.target, "--reward-target", reward.target, "--versions", "v0,ppo-1",
        "--prompts", str(prompts), "--samples", "2", "--max-new-tokens", "8", "--bootstrap", "100",
        "--out", str(out),
    ])
    assert code == 0, capsys.readouterr().err
    table = capsys.readouterr().out
    assert "judged by reward model v0" in table and "ppo-1" in table
    document = json.loads(out.read_text())
    assert document["judge"]["model_version"] == "v0" and document["versions"] == ["v0", "ppo-1"]
    played = document["games"]
    assert len(played) == 4 * 2  # prompts x samples x one pair
    # Every game is the reward model's judgement: re-ask Compare for the plain-text ones.
    with grpc.insecure_channel(reward.target) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        for game in played:
            if game["prompt_index"] == 2 or not (game["completion_a"].strip() and game["completion_b"].strip()):
                continue
            text = json.loads(prompts.read_text().splitlines()[game["prompt_index"]])["prompt"]
            compared = stub.Compare(reward_pb2.CompareRequest(
                prompt=text, response_a=game["completion_a"], response_b=game["completion_b"],
                options=reward_pb2.ScoreOptions(truncation=common_pb2.TRUNCATION_LEFT),
            ), timeout=10)
            assert compared.score_a == pytest.approx(game["reward_a"], abs=1e-5)
            expected = 1.0 if compared.probability_a_preferred > 0.5 else 0.0 if compared.probability_a_preferred < 0.5 else 0.5
            assert game["score_a"] == expected
    # The ratings are the fit of exactly these games.
    refit = fit_elo([Outcome(g["a"], g["b"], g["score_a"]) for g in played], ["v0", "ppo-1"], n_bootstrap=0)
    ratings = {r["player"]: r for r in document["ratings"]}
    for player in ("v0", "ppo-1"):
        assert ratings[player]["elo"] == pytest.approx(refit.rating(player).elo, abs=1e-6)
        assert ratings[player]["ci_low"] <= ratings[player]["elo"] <= ratings[player]["ci_high"]
        assert ratings[player]["games"] == 8
    # The versions really differ: not every game is a tie between identical completions.
    assert any(g["completion_a"] != g["completion_b"] for g in played)


def test_elo_cli_errors_name_the_input(services, tmp_path, capsys):
    policy, reward = services
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "ok"}\n{"prompt": 7}\n')
    base = ["elo", "--policy-target", policy.target, "--reward-target", reward.target, "--prompts", str(prompts)]
    assert cli_main([*base, "--versions", "v0,ppo-1"]) == 2
    assert f"{prompts}:2: prompt: must be a non-empty string or a list of chat messages" in capsys.readouterr().err
    prompts.write_text('{"prompt": "ok"}\n')
    assert cli_main([*base, "--versions", "v0"]) == 2
    assert "at least two" in capsys.readouterr().err
    assert cli_main([*base, "--versions", "v0,nope"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
