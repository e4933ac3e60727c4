"""The demo's models, built on this machine in three stages (no downloads):

1. a word-level GPT-2 pretrained on Debian's fortunes quotes (BSD-licensed
   fortune-mod corpus, ``apt-get install fortunes-min fortunes``);
2. preference pairs between its own samples, labeled by a hidden gold scorer
   that simulates human annotators (VADER sentiment, MIT: the more positive
   completion is preferred; near-ties are not labeled);
3. a reward model trained on those pairs (Bradley-Terry) from the pretrained
   backbone, published to a local model registry.

PPO then optimizes the RM (the proxy) while the gold scorer keeps watching,
which makes over-optimization (Gao et al. 2022) visible.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from arbiter.hf import read_metadata

# The demo's KL controller horizon, in samples: β can move up to ±2 % per
# 32-rollout update, enough to act within a minute of training (Ziegler et
# al.'s 10,000, the trainer's default, would barely move it).
DEMO_KL_HORIZON = 320


@dataclass(frozen=True)
class DemoModels:
    policy: Path
    reward: Path
    prompts: Path
    description: str
    max_new_tokens: int = 12
    gold: str | None = "vader"
    ppo: dict[str, Any] = field(default_factory=dict)
    rm_metrics: dict[str, Any] = field(default_factory=dict)
    # Held out from RM data and PPO prompts: where initial and final policy are compared.
    eval_prompts: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class DemoScale:
    pretrain_steps: int
    prompts: int
    samples_per_prompt: int
    rm_epochs: int


    max_pairs: int
    eval_prompts: int


FULL = DemoScale(pretrain_steps=3000, prompts=600, samples_per_prompt=8, rm_epochs=2, max_pairs=8000, eval_prompts=128)
QUICK = DemoScale(pretrain_steps=300, prompts=64, samples_per_prompt=4, rm_epochs=1, max_pairs=300, eval_prompts=16)
PROMPT_WORDS = 3
MIN_GOLD_GAP = 0.1


def make_prompts(quotes: list[str], count: int, seed: int) -> list[str]:
    """Openings of real quotes ("the only thing"): natural places to continue."""
    rng = random.Random(seed)
    openings = sorted({" ".join(q.split()[:PROMPT_WORDS]) for q in quotes if len(q.split()) > PROMPT_WORDS + 2})
    return rng.sample(openings, min(count, len(openings)))


@torch.no_grad()
def sample_completions(model_dir: Path, prompts: list[str], n: int, max_new_tokens: int, seed: int,
                       prompts_per_batch: int = 32, temperature: float = 1.0) -> list[list[str]]:
    """n samples per prompt, many prompts per generate call (left-padded):
    batching is what makes this affordable on two cores."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from arbiter.hf import quiet_transformers

    quiet_transformers()
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    out = []
    for start in range(0, len(prompts), prompts_per_batch):
        chunk = prompts[start : start + prompts_per_batch]
        enc = tokenizer(chunk, return_tensors="pt", padding=True)
        generated = model.generate(
            **enc, do_sample=True, top_k=0, top_p=1.0, temperature=temperature, max_new_tokens=max_new_tokens,
            num_return_sequences=n, pad_token_id=tokenizer.pad_token_id,
        )
        width = enc["input_ids"].shape[1]
        texts = [tokenizer.decode(g[width:], skip_special_tokens=True) for g in generated]
        out += [texts[i * n : (i + 1) * n] for i in range(len(chunk))]
    return out


def label_pairs(prompts: list[str], completions: list[list[str]], gold) -> list[dict]:
    """Every pair of a prompt's samples whose gold scores differ clearly:
    the more positive one is chosen."""
    rows = []
    for prompt, samples in zip(prompts, completions):
        scored = [(gold(prompt + c), c) for c in samples if c.strip()]
        for i in range(len(scored)):
            for j in range(i + 1, len(scored)):
                (si, ci), (sj, cj) = scored[i], scored[j]
                if abs(si - sj) >= MIN_GOLD_GAP and ci != cj:
                    chosen, rejected = (ci, cj) if si > sj else (cj, ci)
                    rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def rm_config(out: Path, quick: bool, seed: int = 0, **overrides: Any):
    """The demo's RM training: Bradley-Terry on the labelled pairs from the
    pretrained backbone (``seed``: the head's initialization and data order;
    ``overrides``: more ``RMTrainConfig`` fields, e.g. an ensemble member's
    ``train_subset``)."""
    from arbiter.rm.config import config_from_dict

    scale = QUICK if quick else FULL
    return config_from_dict({
        "model_dir": str(out / "policy"), "registry": str(out / "rm-registry"), "name": "sentiment-rm",
        "data": [str(out / "preferences.jsonl")], "eval_fraction": 0.15, "epochs": scale.rm_epochs,
        "batch_size": 16, "learning_rate": 1e-3, "progress": False, "seed": seed,
        # Plain text, no end token: on this data (FULL scale, 1,200 held-out
        # pairs) 90.9% held-out accuracy against 86.8% with TRL's appended end
        # token. The version's arbiter.json records it; the service follows.
        "append_eos": False,
        **overrides,
    })


def pretrain_steps_arg(text: str) -> int:
    """argparse type of the ``--pretrain-steps`` flags: an integer >= 1."""
    try:
        steps = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: must be an integer >= 1") from None
    if steps < 1:
        raise argparse.ArgumentTypeError(f"{steps}: must be an integer >= 1")
    return steps


def pretrained_policy(path: Path, steps: int, console, quotes: list[str] | None = None, seed: int = 0) -> Path:
    """The word-level GPT-2 pretrained for ``steps`` with ``seed`` at
    ``path``: reused when one of that many steps and seed is there."""
    from arbiter.hf import write_metadata
    from services.demo_pretrain import PretrainConfig, load_fortunes, pretrain

    meta = read_metadata(path) if (path / "config.json").exists() else None
    done = (meta.extra or {}).get("pretraining", {}) if meta is not None else {}
    if done.get("budget_steps") == steps and done.get("seed", 0) == seed:
        console.print(f"   reusing the pretrained policy in {path}")
        return path
    quotes = quotes if quotes is not None else load_fortunes()
    console.print(f"   pretraining a word-level GPT-2 on {len(quotes)} fortunes quotes for {steps} steps "
                  f"(seed {seed})")
    result = pretrain(quotes, path, PretrainConfig(max_steps=steps, seed=seed),
                      progress=lambda step, loss, t: None)
    write_metadata(path, pretraining={**result, "budget_steps": steps, "seed": seed})
    console.print(f"   pretrained: {result['steps']} steps in {result['seconds']:.0f}s, loss {result['loss']:.2f}, "
                  f"{result['tokens']:,} tokens")
    return path


def prepare_models(out: Path, quick: bool, console, pretrain_steps: int | None = None) -> DemoModels:
    """``pretrain_steps``: the policy's pretraining steps instead of the scale's."""
    from services.demo_pretrain import load_fortunes
    from arbiter.rm.train import train_reward_model
    from services.worker.gold import make_gold_scorer

    scale = QUICK if quick else FULL
    if pretrain_steps is not None:
        scale = dataclasses.replace(scale, pretrain_steps=pretrain_steps)
    out.mkdir(parents=True, exist_ok=True)
    quotes = load_fortunes()
    policy = pretrained_policy(out / "policy", scale.pretrain_steps, console, quotes)

    all_prompts = make_prompts(quotes, scale.prompts + 64 + scale.eval_prompts, seed=0)
    rm_prompts, ppo_prompts = all_prompts[: scale.prompts], all_prompts[scale.prompts : scale.prompts + 64]
    eval_prompts = all_prompts[scale.prompts + 64 :]
    gold = make_gold_scorer("vader")
    completions = sample_completions(policy, rm_prompts, scale.samples_per_prompt, 12, seed=1)
    pairs = label_pairs(rm_prompts, completions, gold)
    if len(pairs) > scale.max_pairs:
        pairs = random.Random(0).sample(pairs, scale.max_pairs)
    data = out / "preferences.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in pairs))
    console.print(f"   {len(pairs)} preference pairs labeled by the simulated annotator (VADER) -> {data}")

    trained = train_reward_model(rm_config(out, quick), console=console)
    accuracy = trained.metrics.get("eval_accuracy")
    console.print(f"   reward model {trained.version.version}: held-out pairwise accuracy {accuracy:.1%}")

    prompts = out / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(ppo_prompts)))
    return DemoModels(
        policy=policy, reward=trained.version.path, prompts=prompts,
        description=(f"policy: word-level GPT-2 pretrained on fortunes; RM {trained.version.version} "
                     f"(held-out accuracy {accuracy:.1%}); gold: VADER compound"),
        rm_metrics=trained.metrics,
        eval_prompts=eval_prompts,
        ppo={"batch_size": 32, "minibatch_size": 8, "epochs": 2, "learning_rate": 5e-4, "max_staleness": 1,
             "kl": {"mode": "adaptive", "init_coef": 0.05, "target": 4.0, "horizon": DEMO_KL_HORIZON}},
    )
