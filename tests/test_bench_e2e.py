"""``make bench-e2e``'s judging and its table, without running the contenders
(a stack start alone takes longer than this file may; TRL is never installed
here): the KL it reports is zero for a policy against itself and positive
against a changed one, and the ratio rows are the quotients of the rows."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from lm_fixtures import perturbed

from bench.e2e import Run, sample_kl, table, trl_constraints

PROMPTS = ["Hello there", "The weather", "Say:", "One more prompt, longer than the others"]


def test_kl_of_a_policy_against_itself_is_zero_and_against_a_changed_one_positive(tiny_models, tmp_path):
    same = sample_kl(tiny_models["policy"], tiny_models["policy"], PROMPTS, n=2, max_new_tokens=6, seed=0,
                     prompts_per_batch=3)
    assert same["kl"] == 0.0  # the same weights score every token the same, exactly
    assert same["words"] > 0
    changed = perturbed(tiny_models["policy"], tmp_path / "changed", version="v1", scale=0.5)
    assert sample_kl(tiny_models["policy"], changed, PROMPTS, n=2, max_new_tokens=6, seed=0)["kl"] > 0


def run(name: str, rollouts: int, updates: int, gain: float, kl: float) -> Run:
    r = Run(name, 10.0, rollouts, updates, Path("."), setup_seconds=0.0)
    r.eval = {"gold_gain": gain, "kl": kl, "words": 5.0, "gold_per_nat": gain / kl, "gold_per_s": gain / 10.0}
    return r


def test_ratio_rows_divide_each_arbiter_column_by_trls():
    header, rows = table({"trl-grpo": run("trl-grpo", 100, 3, 0.2, 4.0),
                          "arbiter-grpo": run("arbiter-grpo", 300, 9, 0.3, 2.0)})
    assert header[4:11] == ["rollouts/s", "updates/s", "gold gain", "final KL (nats/sample)", "gold/nat KL",
                            "gold/wall-s", "words/sample"]
    # TRL: 10 rollouts/s, 0.3 updates/s, +0.2 gold at 4 nats (0.05/nat), 0.02 gold/s.
    assert rows[0][4:11] == ["10.0", "0.300", "0.200", "4.000", "0.050", "0.020", "5.000"]
    # Arbiter: 30/s, 0.9/s, +0.3 at 2 nats (0.15/nat), 0.03/s -> 3x, 3x, 1.5x, 0.5x, 3x, 1.5x, 1x.
    assert rows[2][0] == "arbiter-grpo / trl-grpo"
    assert rows[2][4:11] == ["3.000", "3.000", "1.500", "0.500", "3.000", "1.500", "1.000"]


def test_trl_runs_on_the_projects_torch_and_transformers():
    assert trl_constraints() == (f"torch==2.13.0\ntransformers=={importlib.metadata.version('transformers')}\n")
