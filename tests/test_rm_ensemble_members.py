"""Ensemble members that differ on purpose, and the measure of whether their
spread says where their mean is wrong (issue #14 item 5)."""

from __future__ import annotations

import math

import pytest
import yaml

from arbiter.reward.composite import load_spec_file
from arbiter.rm.agreement import ensemble_diversity
from bench.ensemble_rm import Member, member_overrides, write_spec
from arbiter.rm.config import config_from_dict

# Three responses, gold 2 > 1 > 0: every pair labelled better-first.
GOLD = [2.0, 1.0, 0.0]
PAIRS = [(0, 1), (0, 2), (1, 2)]


def test_diversity_of_two_members_by_hand():
    a, b = [1.0, 0.0, -1.0], [1.0, 2.0, -1.0]
    d = ensemble_diversity([a, b], PAIRS, GOLD, penalty=1.0)
    # Margins (0,1), (0,2), (1,2): a 1, 2, 1 (all right); b -1, 2, 3.
    assert d.member_accuracy == (1.0, pytest.approx(2 / 3))
    assert d.disagreement == pytest.approx(1 / 3)  # they differ on (0,1) only
    # mean [1, 1, -1] (margins 0, 2, 2: a tie is half), std [0, 1, 0];
    # mean - std = [1, 0, -1]: every pair right.
    assert d.mean_accuracy == pytest.approx(2.5 / 3) and d.penalized_accuracy == 1.0
    # standardized mean [1, 1, -2]/sqrt(2), gold [1, 0, -1]·sqrt(3/2); the std
    # is the indicator of response 1 where mean - gold = 1/sqrt(2) is the
    # largest over-score: Pearson = cos 15° = (sqrt(6) + sqrt(2)) / 4.
    assert d.std_overestimate_corr == pytest.approx((math.sqrt(6) + math.sqrt(2)) / 4, abs=1e-9)
    assert math.isnan(d.wrong_pair_auc)  # the mean orders no pair wrongly (a tie is not wrong)
    assert (d.members, d.pairs, d.penalty) == (2, 3, 1.0)


def test_spread_auc_by_hand():
    a, b = [1.0, 0.0, -1.0], [1.0, 3.0, -1.0]
    d = ensemble_diversity([a, b], PAIRS, GOLD, penalty=0.0)
    # mean [1, 1.5, -1]: (0,1) wrong. Member margins a 1, 2, 1; b -2, 2, 4:
    # spreads (population std) 1.5, 0, 1.5. The wrong pair's 1.5 beats the
    # right pairs' 0 and ties their 1.5: AUC (1 + 0.5) / 2.
    assert d.wrong_pair_auc == pytest.approx(0.75)
    assert d.mean_accuracy == pytest.approx(2 / 3) and d.penalized_accuracy == d.mean_accuracy
    with pytest.raises(ValueError, match=">= 2 members"):
        ensemble_diversity([a], PAIRS, GOLD, 1.0)
    with pytest.raises(ValueError, match="3 scored responses but 2 gold"):
        ensemble_diversity([a, b], PAIRS, GOLD[:2], 1.0)


def test_member_recipes_are_valid_training_configs():
    assert member_overrides("seed", 2, 3) == {"split_seed": 0}
    assert member_overrides("pretrain", 1, 3) == {"split_seed": 0}
    assert member_overrides("bootstrap", 2, 3) == {"split_seed": 0, "train_subset": "bootstrap", "subset_seed": 2}
    assert member_overrides("pretrain+bootstrap", 1, 3)["subset_seed"] == 1
    # Disjoint: one shared partition, shard j of K each.
    shards = [member_overrides("disjoint", j, 3) for j in range(3)]
    assert {s["subset_seed"] for s in shards} == {0} and [s["shard_index"] for s in shards] == [0, 1, 2]
    for scheme in ("seed", "bootstrap", "disjoint", "pretrain", "pretrain+bootstrap"):
        for j in range(3):
            config_from_dict({"model_dir": "m", "seed": j, **member_overrides(scheme, j, 3)})


def test_spec_names_every_member_and_loads_all_but_the_active(tmp_path):
    active = tmp_path / "rm" / "v1"
    members = [Member("v1", active, "RM v1"), Member("ensemble-seed-v1", tmp_path / "e" / "v1", "seed 1")]
    spec = write_spec(tmp_path / "spec.yaml", members, active, penalty=0.5)
    data = yaml.safe_load(spec.read_text())
    assert data["models"] == {"ensemble-seed-v1": str(tmp_path / "e" / "v1")}
    parsed = load_spec_file(spec)
    [term] = parsed.terms
    assert term.source.versions == ("v1", "ensemble-seed-v1") and term.source.uncertainty_penalty == 0.5
