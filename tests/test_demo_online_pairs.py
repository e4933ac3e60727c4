"""The online demo's fresh gold-labelled pairs against a real policy service:
more held-out prompts than one Generate request may carry (the full demo has
128, the service takes 64) still yield every prompt's samples, all from one
policy version."""

from __future__ import annotations

import pytest
from helpers import BackgroundServer

from arbiter.policy.engine import GenerationLimits
from services.demo_online import fresh_pairs, prompts_per_request
from services.policy.server import create_server as create_policy_server
from services.policy.settings import PolicySettings


@pytest.fixture(scope="module")
def policy(tiny_models, model_roots):
    settings = PolicySettings(model_dir=str(tiny_models["policy"]), port=0, model_roots=model_roots)
    with BackgroundServer(lambda: create_policy_server(settings)) as server:
        yield server


def test_fresh_pairs_split_prompts_over_requests_and_keep_one_policy_version(policy, monkeypatch):
    import services.demo_models

    labelled = {}

    def capture(prompts, grouped, gold):  # what fresh_pairs hands the labeller
        labelled.update(prompts=prompts, grouped=grouped)
        return []

    monkeypatch.setattr(services.demo_models, "label_pairs", capture)
    # 12 samples a prompt (the online benchmark's): 21 prompts a request
    # (256 rows // 12); 45 prompts are three requests, the last a partial one.
    assert prompts_per_request(12) == 21
    count = 45
    prompts = [f"Prompt number {i} says" for i in range(count)]
    rows, version = fresh_pairs(policy.target, prompts, "vader", samples=12, max_new_tokens=3, seed=0)
    assert version and rows == []
    assert labelled["prompts"] == prompts
    # Every prompt, the last request's included, has its own twelve samples.
    assert [len(group) for group in labelled["grouped"]] == [12] * count


def test_prompts_per_request_respects_both_limits():
    limits = GenerationLimits(max_prompts_per_request=64, max_rows_per_request=256)
    assert prompts_per_request(2, limits) == 64  # the prompt limit binds
    assert prompts_per_request(12, limits) == 21  # the row limit binds
    assert prompts_per_request(300, limits) == 1  # never zero: one prompt's samples are the service's to refuse
