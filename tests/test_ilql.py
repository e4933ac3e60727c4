"""Offline ILQL end to end: `arbiter train ilql` on scored samples, sampling
with the heads it ships (in-process and through the policy service), the
loaders that cannot use the heads refusing them, and bad input stopping the
run with its location."""

from __future__ import annotations

import json
import math

import grpc
import pytest
from helpers import BackgroundServer, expect_error

from arbiter.config import ConfigError
from arbiter.errors import ModelLoadError
from arbiter.ilql import HEADS_FILE
from arbiter.policy.model import PolicyModel
from arbiter.policy.types import ResolvedSampling
from trainer.ilql import ILQLDataError, ilql_main, train
from trainer.ilql_config import ilql_config_from_dict

PROMPT = "Pick:"
# Single-token completions, each as frequent as the others in the data, so
# the policy's own likelihood (π_β) does not favour any; only "x" is rewarded.
CHOICES = ("x", "y", "z", "w")
REWARDED = "x"


def write_rows(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def ilql_settings(policy_dir, out, **data):
    return {
        "model_dir": str(policy_dir), "output_dir": str(out), "epochs": 6, "batch_size": 8, "learning_rate": 1e-3,
        # Fast-moving targets: sampling reads the target heads, and six epochs are few.
        "ilql": {"polyak_alpha": 0.5, "gamma": 1.0}, "data": data,
    }


@pytest.fixture(scope="module")
def trained(policy_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ilql")
    rows = [{"prompt": PROMPT, "completion": c, "reward": 1.0 if c == REWARDED else 0.0} for _ in range(8) for c in CHOICES]
    data = write_rows(root / "data.jsonl", rows)
    reports = []
    out = train(ilql_config_from_dict(ilql_settings(policy_dir, root / "run", jsonl=data)), on_epoch=reports.append)
    return {"policy": out, "reports": reports, "root": root}


def test_training_writes_an_hf_policy_with_heads_and_per_epoch_checkpoints(trained):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = trained["policy"]
    assert [r.epoch for r in trained["reports"]] == [1, 2, 3, 4, 5, 6]
    # 32 rows in batches of 8: four optimizer steps an epoch.
    assert trained["reports"][-1].step == 24 and trained["reports"][-1].samples == 32
    # Any Hugging Face loader still loads the policy; the heads are a separate file naming them.
    AutoModelForCausalLM.from_pretrained(str(out))
    with safe_open(str(out / HEADS_FILE), "pt") as fh:
        assert fh.metadata()["heads"] == "q1,q2,target_q1,target_q2,v"
        assert {key.split(".")[0] for key in fh.keys()} == {"q1", "q2", "target_q1", "target_q2", "v"}
    checkpoints = sorted(p.name for p in (out.parent / "checkpoints").glob("epoch-*"))
    assert checkpoints == ["epoch-0005", "epoch-0006"]  # keep_checkpoints: 2


def choice_ids(tokenizer):
    ids = {c: tokenizer(c, add_special_tokens=False)["input_ids"] for c in CHOICES}
    assert all(len(v) == 1 for v in ids.values()), ids
    return {c: v[0] for c, v in ids.items()}


def sampled_firsts(model: PolicyModel, n: int) -> list[int]:
    """The first token of n seeded samples, decoded by the policy's own decoding batch."""
    generation = model.start([model.tokenizer(PROMPT)["input_ids"]],
                             ResolvedSampling(max_new_tokens=1, temperature=1.0, top_p=1.0, top_k=0, n=n, stop=(),
                                              seed=11))
    while not generation.done:
        generation.step()
    return [s.completion_token_ids[0] for s in generation.samples()]


def test_perturbed_sampling_raises_the_rewarded_tokens_probability(trained):
    plain = PolicyModel.load(trained["policy"], ilql_beta=0.0)
    steered = PolicyModel.load(trained["policy"], ilql_beta=4.0)
    ids = choice_ids(plain.tokenizer)
    prompt = plain.tokenizer(PROMPT)["input_ids"]

    def probs(model):
        return {c: math.exp(model.teacher_forced_logprobs(prompt, [i])[0]) for c, i in ids.items()}

    before, after = probs(plain), probs(steered)
    # The rewarded token gains, and gains against every unrewarded one.
    assert after[REWARDED] > before[REWARDED]
    for c in CHOICES:
        if c != REWARDED:
            assert after[REWARDED] / after[c] > before[REWARDED] / before[c], (before, after)
    # The same through decoding (the KV-cached path), with the same uniforms.
    n = 64
    plain_count = sampled_firsts(plain, n).count(ids[REWARDED])
    steered_count = sampled_firsts(steered, n).count(ids[REWARDED])
    assert steered_count > plain_count, (plain_count, steered_count)


def test_loaders_that_cannot_use_the_heads_refuse_them(trained):
    from arbiter.hf import read_config
    from arbiter.lm import require_plain_causal_lm
    from arbiter.reference.backend import load_reference_weights
    from trainer.policy_model import PolicyWithValue

    out = trained["policy"]
    for call in (lambda: PolicyModel.load(out),  # a policy service without --ilql-beta
                 lambda: load_reference_weights(out),
                 lambda: require_plain_causal_lm(read_config(out), out),  # the Triton backends' check
                 lambda: PolicyWithValue.load(out)):  # the PPO trainer
        with pytest.raises(ModelLoadError, match=f"ships ILQL heads \\({HEADS_FILE}"):
            call()


def test_policy_service_serves_heads_only_when_told_beta(trained, policy_dir, model_roots):
    from services.policy.client import PolicyClient
    from services.policy.server import create_server
    from services.policy.settings import PolicySettings

    out = str(trained["policy"])
    plain = PolicySettings(model_dir=str(policy_dir), port=0, metrics_port=0, model_roots=model_roots)
    with BackgroundServer(lambda: create_server(plain)) as running, PolicyClient(running.target) as client:
        expect_error(lambda: client.load_version(out, version="ilql", activate=True),
                     grpc.StatusCode.FAILED_PRECONDITION, "ships ILQL heads", "--ilql-beta")
        assert client.info().version != "ilql"
    steered = PolicySettings(model_dir=str(policy_dir), port=0, metrics_port=0, model_roots=model_roots,
                             ilql_beta=4.0)
    with BackgroundServer(lambda: create_server(steered)) as running, PolicyClient(running.target) as client:
        # The base (no heads) serves as before; the ILQL version swaps in over it.
        client.load_version(out, version="ilql", activate=True)
        reply = client.generate([PROMPT], max_new_tokens=1, temperature=1.0, n=8, seed=3)
        assert reply.policy_version == "ilql" and len(reply.samples) == 8


@pytest.mark.parametrize("settings, field", [
    ({"ilql": {"tau": 1.0}}, "ilql.tau"),
    ({"ilql": {"polyak_alpha": 0.0}}, "ilql.polyak_alpha"),
    ({"ilql": {"cql_coef": -1.0}}, "ilql.cql_coef"),
    ({"data": {"rollouts": True}}, "data.jsonl"),  # both sources given
    ({"data": {"jsonl": "/nonexistent.jsonl"}}, "data.jsonl"),
    ({"data": {"reward_source": "gold"}}, "data.reward_source"),
    ({"ilql": {"expectile": 0.7}}, "ilql"),  # unknown field
])
def test_bad_settings_name_the_field(trained, policy_dir, settings, field):
    data = write_rows(trained["root"] / "ok.jsonl", [{"prompt": "a", "completion": "b", "reward": 1}])
    base = ilql_settings(policy_dir, trained["root"] / "never", jsonl=data)
    base["ilql"] = {**base["ilql"], **settings.get("ilql", {})}
    base["data"] = {**base["data"], **settings.get("data", {})}
    with pytest.raises(ConfigError) as err:
        ilql_config_from_dict(base)
    assert field in str(err.value)


def test_policy_settings_validate_ilql_beta():
    from services.policy.settings import PolicySettings

    with pytest.raises(ConfigError, match="ilql_beta"):
        PolicySettings(model_dir="m", ilql_beta=-1.0)


def test_a_row_without_its_reward_stops_the_run_naming_file_and_line(policy_dir, tmp_path, capsys):
    import yaml

    rows = [{"prompt": "a", "completion": "b", "reward": 1}, {"prompt": "a", "completion": "c", "reward": 0},
            {"prompt": "a", "completion": "d"}]
    data = write_rows(tmp_path / "rows.jsonl", rows)
    config = tmp_path / "ilql.yaml"
    config.write_text(yaml.safe_dump(ilql_settings(policy_dir, tmp_path / "run", jsonl=data)))

    class Args:
        pass

    args = Args()
    args.config, args.epochs = str(config), 1
    assert ilql_main(args) == 2
    assert f"{data}:3: reward: is missing" in capsys.readouterr().err
    assert not (tmp_path / "run" / "policy").exists()


def test_an_end_token_follows_every_completion_but_a_truncated_one(policy_dir, tmp_path):
    from transformers import AutoTokenizer

    from arbiter.jsonl import JsonlError
    from trainer.ilql import samples_from_jsonl

    tokenizer = AutoTokenizer.from_pretrained(str(policy_dir))
    eos = tokenizer.eos_token_id
    words = tokenizer(" a b", add_special_tokens=False)["input_ids"]
    rows = [{"prompt": "p", "completion": " a b", "reward": 1.0},
            {"prompt": "p", "completion": " a b", "reward": 1.0, "truncated": True},
            {"prompt": "p", "completion": " a b", "reward": 1.0, "truncated": False}]
    samples = samples_from_jsonl(write_rows(tmp_path / "rows.jsonl", rows), tokenizer, append_eos=True, max_tokens=None)
    assert [list(s.completion_ids) for s in samples] == [[*words, eos], words, [*words, eos]]
    bad = write_rows(tmp_path / "bad.jsonl", [{"prompt": "p", "completion": " a", "reward": 0, "truncated": "yes"}])
    with pytest.raises(JsonlError, match=r"bad.jsonl:1: truncated: is \"yes\"; true"):
        samples_from_jsonl(bad, tokenizer, append_eos=True, max_tokens=None)


def test_replay_of_the_rollouts_topic(policy_dir, tmp_path, kafka_settings):
    from transformers import AutoTokenizer

    from arbiter.stream import StreamProducer, ensure_topics, topics
    from arbiter.v1 import rollout_pb2

    tokenizer = AutoTokenizer.from_pretrained(str(policy_dir))
    ids = choice_ids(tokenizer)
    prompt = tokenizer(PROMPT)["input_ids"]

    def rollout(i, choice, completion=None):
        completion = completion or [ids[choice], tokenizer.eos_token_id]
        return rollout_pb2.Rollout(
            rollout_id=f"r{i}", prompt_id="p", prompt_token_ids=prompt, completion_token_ids=completion,
            sampling_logprobs=[0.0] * len(completion), reference_logprobs=[0.0] * len(completion),
            reward=1.0 if choice == REWARDED else 0.0, policy_version="v0",
        )

    good = [rollout(i, c) for i, c in enumerate(CHOICES * 2)]
    ensure_topics(kafka_settings, {topics.ROLLOUTS: 1})
    with StreamProducer(kafka_settings) as producer:
        for message in [*good, good[0]]:  # r0 delivered twice: trained once
            producer.send(topics.ROLLOUTS, message)
        producer.flush(timeout_s=30)
    kafka = {"bootstrap_servers": ",".join(kafka_settings.bootstrap_servers),
             "topic_prefix": kafka_settings.topic_prefix}
    settings = {**ilql_settings(policy_dir, tmp_path / "run", rollouts=True, replay_idle_s=0.5), "epochs": 1,
                "kafka": kafka}
    reports = []
    out = train(ilql_config_from_dict(settings), kafka_settings, on_epoch=reports.append)
    assert reports[0].samples == len(good) and (out / HEADS_FILE).exists()

    # A rollout with a token outside the vocabulary stops the run at its location.
    with StreamProducer(kafka_settings) as producer:
        producer.send(topics.ROLLOUTS, rollout(99, "y", completion=[10_000]))
        producer.flush(timeout_s=30)
    settings["output_dir"] = str(tmp_path / "run2")
    with pytest.raises(ILQLDataError) as err:
        train(ilql_config_from_dict(settings), kafka_settings)
    where = f"{kafka_settings.topic(topics.ROLLOUTS)}[0]@{len(good) + 1}"
    assert where in str(err.value) and "vocabulary" in str(err.value)


def test_a_restarted_run_resumes_after_its_last_checkpoint(policy_dir, tmp_path):
    data = write_rows(tmp_path / "rows.jsonl",
                      [{"prompt": PROMPT, "completion": c, "reward": float(c == REWARDED)} for c in CHOICES])
    settings = {**ilql_settings(policy_dir, tmp_path / "run", jsonl=data), "epochs": 2, "batch_size": 2}
    first, second = [], []
    train(ilql_config_from_dict(settings), on_epoch=first.append)
    # The same run asked for one more epoch: only epoch 3 runs, its steps
    # counting on from the checkpoint's (4 rows in batches of 2: 2 steps an epoch).
    train(ilql_config_from_dict({**settings, "epochs": 3}), on_epoch=second.append)
    assert [(r.epoch, r.step) for r in first] == [(1, 2), (2, 4)]
    assert [(r.epoch, r.step) for r in second] == [(3, 6)]
