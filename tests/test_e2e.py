"""The main job end to end: broker, the three services, a rollout worker and
the PPO trainer as separate processes (``arbiter up``'s stack). A few PPO
iterations raise the mean reward, policy versions advance, and the policy
service ends up serving the trainer's newest version."""

import json

import grpc
import torch
from helpers import wait_until
from transformers import AutoTokenizer, GPT2ForSequenceClassification

from arbiter.hf import write_metadata
from arbiter.v1 import common_pb2, common_pb2_grpc
from services.stack import Stack, StackConfig

UPDATES = 10


def last_token_rule_rm(tiny_models, out):
    """A real HF reward model with a known preference: +1 when the sample ends
    on a token with id < 128, −1 otherwise. Transformer blocks are zeroed so
    the last position's hidden state is just its token embedding; the score
    head reads the sign planted there."""
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_models["reward"]))
    model = GPT2ForSequenceClassification.from_pretrained(str(tiny_models["reward"]))
    with torch.no_grad():
        for block in model.transformer.h:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                proj.weight.zero_()
                proj.bias.zero_()
        model.transformer.wpe.weight.zero_()
        direction = torch.randn(model.config.n_embd, generator=torch.Generator().manual_seed(0))
        direction -= direction.mean()
        sign = torch.where(torch.arange(model.config.vocab_size) < 128, 1.0, -1.0)
        model.transformer.wte.weight.copy_(sign[:, None] * direction[None, :])
        model.transformer.ln_f.weight.fill_(1.0)
        model.transformer.ln_f.bias.zero_()
        normalized = torch.nn.functional.layer_norm(direction, direction.shape, eps=model.config.layer_norm_epsilon)
        model.score.weight.copy_(normalized[None, :] / normalized.dot(normalized))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_metadata(out, name="last-token-rule", version="rule-v1")
    return out


def served_version(target):
    with grpc.insecure_channel(target) as channel:
        stub = common_pb2_grpc.ModelServiceStub(channel)
        return stub.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=10).info.version


def test_ppo_through_the_services_raises_reward(tiny_models, tmp_path):
    rm = last_token_rule_rm(tiny_models, tmp_path / "rule-rm")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("Say:", "Now:", "Hello", "Go on", "Tell me")))
    config = StackConfig(
        policy_model=str(tiny_models["policy"]), reward_model=str(rm), prompts_file=str(prompts),
        workdir=str(tmp_path / "stack"), metrics_ports={k: 0 for k in ("reward", "policy", "reference", "worker", "trainer")},
        worker={"samples_per_prompt": 4, "prompts_per_call": 4, "max_new_tokens": 3},
        trainer={"max_updates": UPDATES, "ppo": {
            "batch_size": 32, "minibatch_size": 8, "epochs": 4, "learning_rate": 1e-2, "max_staleness": 1,
            # Critic-free with groups of 4 (the worker's samples per prompt): the
            # least noisy estimator for a ten-update test.
            "advantage": "rloo", "samples_per_prompt": 4,
            "kl": {"mode": "fixed", "init_coef": 0.01}}},
    )
    history = tmp_path / "stack" / "trainer" / "history.jsonl"
    rows: list[dict] = []

    def all_updates_written(stack: Stack) -> bool:
        stack.check_alive()  # a crashed component fails the test now, not at the timeout
        rows[:] = [json.loads(line) for line in history.read_text().splitlines()] if history.exists() else []
        return len(rows) >= UPDATES

    with Stack(config) as stack:
        wait_until(lambda: all_updates_written(stack), 420, lambda: f"{UPDATES} updates (only {len(rows)})",
                   interval_s=0.5)
        assert len(rows) == UPDATES
        wait_until(lambda: served_version(stack.targets["policy"]) == f"ppo-{UPDATES}", 60,
                   f"the policy service to serve ppo-{UPDATES}", interval_s=0.5)
    assert [r["policy_version"] for r in rows] == [f"ppo-{i}" for i in range(1, UPDATES + 1)]
    assert all(r["staleness"] <= 1 for r in rows)
    rewards = [r["reward_raw"] for r in rows]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.3, rewards
