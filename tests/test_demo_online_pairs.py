"""The online demo's fresh gold-labelled pairs come from the budget's last
policy version itself, sampled in-process from its directory (the stack's
trainer goes on publishing while the results are measured, and a policy
service would by then serve, and keep loaded, only later versions)."""

from __future__ import annotations

import json

import services.demo_models
from lm_fixtures import perturbed
from services.demo_online import fresh_pairs


def test_fresh_pairs_sample_every_prompt_from_the_given_version(tiny_models, tmp_path, monkeypatch):
    labelled = {}

    def capture(prompts, grouped, gold):  # what fresh_pairs hands the labeller
        labelled.update(prompts=prompts, grouped=grouped)
        return [{"prompt": prompts[0], "chosen": "a", "rejected": "b"}]

    monkeypatch.setattr(services.demo_models, "label_pairs", capture)
    version = perturbed(tiny_models["policy"], tmp_path / "ppo-7", version="ppo-7", scale=0.5)
    prompts = [f"Prompt number {i} says" for i in range(45)]
    rows, name = fresh_pairs(version, prompts, "vader", samples=12, max_new_tokens=3, seed=0)
    assert name == "ppo-7" and rows == [{"prompt": prompts[0], "chosen": "a", "rejected": "b"}]
    assert labelled["prompts"] == prompts
    # 45 prompts x 12 samples, more than one Generate request may carry: all here.
    assert [len(group) for group in labelled["grouped"]] == [12] * len(prompts)
    # Sampled from that version, not the base policy: the same seed differs.
    base = services.demo_models.sample_completions(tiny_models["policy"], prompts[:4], 12, 3, seed=0)
    assert json.dumps(base) != json.dumps(labelled["grouped"][:4])
