"""Reward-model training: losses against hand-derived values, the data loader's
errors, training on rule-labelled data (from a causal LM and from an earlier
RM), the registry, and the trained version served live by the real reward
service."""

from __future__ import annotations

import json
import math
import threading
import time

import grpc
import numpy as np
import pytest
import torch
from rm_fixtures import rule_rows, write_jsonl

from arbiter.batching import BatchingConfig
from cli.main import main as cli_main
from arbiter.hf import read_metadata
from arbiter.config import ConfigError
from arbiter.rm.config import config_from_dict, load_config
from arbiter.rm.data import DataError, DatasetError, ServiceEncoder, load_jsonl, parse_row
from arbiter.rm.losses import (
    all_pairs_bradley_terry_loss,
    bradley_terry_loss,
    pairwise_accuracy,
    plackett_luce_loss,
)
from arbiter.rm.registry import ModelRegistry, RegistryError
from arbiter.rm.train import split_examples, train_reward_model, train_subset
from arbiter.types import ChatMessage, RewardInput, Truncation
from arbiter.v1 import common_pb2, common_pb2_grpc, reward_pb2, reward_pb2_grpc
from helpers import BackgroundServer
from services.reward.server import create_server
from services.reward.settings import RewardSettings

# -- losses -------------------------------------------------------------------


def test_bradley_terry_matches_hand_values():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0])
    # -log sigmoid(2) = log(1 + e^-2) = 0.126928; -log sigmoid(0) = log 2.
    per = bradley_terry_loss(chosen, rejected, reduction="none")
    assert per.tolist() == pytest.approx([0.126928, 0.693147], abs=1e-6)
    assert float(bradley_terry_loss(chosen, rejected)) == pytest.approx((0.126928 + 0.693147) / 2, abs=1e-6)
    # A margin of 1 on the first pair: log(1 + e^-(2-1)) = 0.313262.
    with_margin = bradley_terry_loss(chosen, rejected, torch.tensor([1.0, 0.0]), reduction="none")
    assert with_margin.tolist() == pytest.approx([0.313262, 0.693147], abs=1e-6)
    # d/dr_c of -log sigmoid(r_c - r_r) = -sigmoid(-(r_c - r_r)) = -0.119203 at a gap of 2.
    c = torch.tensor([2.0], requires_grad=True)
    bradley_terry_loss(c, torch.tensor([0.0]), reduction="sum").backward()
    assert float(c.grad) == pytest.approx(-0.119203, abs=1e-6)
    # Stable far out: no inf/nan for a huge wrong-way gap.
    assert float(bradley_terry_loss(torch.tensor([-1000.0]), torch.tensor([0.0]))) == pytest.approx(1000.0)


def test_plackett_luce_matches_hand_values():
    # Ranking 3 > 1 > 0: [log(e^3 + e^1 + e^0) - 3] + [log(e^1 + e^0) - 1]
    # = log(1 + e^-2 + e^-3) + log(1 + e^-1) = 0.169846 + 0.313262.
    scores = torch.tensor([[3.0, 1.0, 0.0]])
    assert float(plackett_luce_loss(scores)) == pytest.approx(0.169846 + 0.313262, abs=1e-6)
    # Equal scores: every ranking of K has probability 1/K!; K = 3 -> log 6.
    assert float(plackett_luce_loss(torch.zeros(1, 3))) == pytest.approx(math.log(6), abs=1e-6)
    # Variable K: the second row is a pair (its padded 99 is ignored): log(1 + e^-2).
    ragged = torch.tensor([[3.0, 1.0, 0.0], [2.0, 0.0, 99.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    per = plackett_luce_loss(ragged, mask, reduction="none")
    assert per.tolist() == pytest.approx([0.483108, 0.126928], abs=1e-6)


def test_plackett_luce_of_two_is_bradley_terry():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(16, 2, generator=gen) * 3
    pl = plackett_luce_loss(scores, reduction="none")
    bt = bradley_terry_loss(scores[:, 0], scores[:, 1], reduction="none")
    assert torch.allclose(pl, bt, atol=1e-6)


def test_all_pairs_and_accuracy_match_hand_values():
    # Pairs of 3 > 1 > 0: log(1+e^-2), log(1+e^-3), log(1+e^-1), averaged.
    expected = (0.126928 + 0.048587 + 0.313262) / 3
    assert float(all_pairs_bradley_terry_loss(torch.tensor([[3.0, 1.0, 0.0]]))) == pytest.approx(expected, abs=1e-6)
    # A tie counts half: 0.5 + 1 + 0 over 3 pairs.
    assert pairwise_accuracy(torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 2.0]])) == (1.5, 3)
    # A ranking 3 > 0 > 1 (scores best-first by label): 2 of its 3 pairs right.
    assert pairwise_accuracy(torch.tensor([[3.0, 0.0, 1.0]])) == (2.0, 3)
    with pytest.raises(ValueError, match="prefix"):
        plackett_luce_loss(torch.zeros(1, 3), torch.tensor([[True, False, True]]))
    with pytest.raises(ValueError, match="at least 2"):
        plackett_luce_loss(torch.zeros(1, 3), torch.tensor([[True, False, False]]))


# -- data ---------------------------------------------------------------------


def test_every_format_parses_to_the_inputs_the_service_scores():
    plain = parse_row({"prompt": "Q?", "chosen": " yes", "rejected": " no", "margin": 2}, "f:1")
    assert plain.candidates == (RewardInput(prompt="Q?", response=" yes"), RewardInput(prompt="Q?", response=" no"))
    assert plain.margin == 2.0 and plain.fields == ("chosen", "rejected")
    implicit = parse_row({"chosen": "Q? yes", "rejected": "Q? no"}, "f:2")
    assert implicit.candidates[0] == RewardInput(prompt="", response="Q? yes")
    user = [{"role": "user", "content": "Hi"}]
    chat = parse_row({"prompt": user, "chosen": [{"role": "assistant", "content": "Hello!"}], "rejected": "Go."}, "f:3")
    assert chat.candidates[0].messages == (ChatMessage("user", "Hi"), ChatMessage("assistant", "Hello!"))
    assert chat.candidates[1].messages == (ChatMessage("user", "Hi"), ChatMessage("assistant", "Go."))
    whole = parse_row({"chosen": user + [{"role": "assistant", "content": "Hello!"}],
                       "rejected": user + [{"role": "assistant", "content": "Go."}]}, "f:4")
    assert whole.candidates == chat.candidates
    ranked = parse_row({"prompt": "Q?", "responses": [" a", " b", " c"], "ranking": [2, 0, 1]}, "f:5")
    assert [c.response for c in ranked.candidates] == [" c", " a", " b"]
    assert ranked.fields == ("responses[2]", "responses[0]", "responses[1]") and ranked.k == 3


BAD_ROWS = [
    ('{"prompt": "x", "chosen": " a",', "row", "not valid JSON"),
    ('["not", "an", "object"]', "row", "is a JSON list; expected an object"),
    ('{"prompt": "x", "chosen": " a"}', "rejected", "is missing"),
    ('{"prompt": "x", "chosen": "  ", "rejected": " b"}', "chosen", "is empty"),
    ('{"prompt": "x", "chosen": " a", "rejected": " a"}', "rejected", "identical to chosen"),
    ('{"prompt": "x", "chosen": " a", "rejected": " b", "margin": "big"}', "margin", "finite number"),
    ('{"prompt": 3, "chosen": " a", "rejected": " b"}', "prompt", "string or a list of chat messages"),
    ('{"prompt": "x", "chosen": [{"role": "assistant", "content": "a"}], "rejected": " b"}', "chosen",
     "must be a string"),
    ('{"prompt": [{"role": "user", "content": ""}], "chosen": "a", "rejected": "b"}', "prompt[0].content",
     "non-empty string"),
    ('{"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}',
     "chosen", "last message must be the assistant"),
    ('{"prompt": "x", "responses": [" a", " b", " c"], "ranking": [0, 0, 1]}', "ranking", "permutation of 0..2"),
    ('{"prompt": "x", "responses": [" a"], "ranking": [0]}', "responses", "at least 2"),
    ('{"prompt": "x", "responses": [" a", " b"], "ranking": [1, 0], "margin": 1}', "margin", "pairs only"),
    ('{"responses": [" a", " b"], "ranking": [1, 0]}', "prompt", "is missing"),
    ('{"prompt": "x", "responses": [" a", " a"], "ranking": [1, 0]}', "responses[0]", "identical"),
    ('{"prompt": "x", "answer": " a"}', "row", "needs chosen and rejected"),
    ('{"prompt": "x", "chosen": " a", "rejected": " b", "responses": []}', "row", "use one format"),
]


@pytest.mark.parametrize("line, field, message", BAD_ROWS, ids=[f"{f}-{m[:20]}" for _, f, m in BAD_ROWS])
def test_malformed_rows_name_the_line_and_field(tmp_path, line, field, message):
    good = json.dumps({"prompt": "ok", "chosen": " fine", "rejected": " bad"})
    path = write_jsonl_text(tmp_path / "data.jsonl", f"{good}\n\n{line}\n{good}\n")
    with pytest.raises(DatasetError) as info:
        load_jsonl(path)
    [error] = info.value.errors
    assert error.where == f"{path}:3" and error.field == field
    assert message in str(error), str(error)
    assert f"{path}:3: {field}: " in str(info.value)


def write_jsonl_text(path, text):
    path.write_text(text)
    return path


def test_every_bad_row_is_reported_not_dropped(tmp_path):
    good = json.dumps({"prompt": "ok", "chosen": " fine", "rejected": " bad"})
    lines = [good, "{bad", good, '{"chosen": " a"}'] + [good] * 3 + ["[]"] * 25
    path = write_jsonl_text(tmp_path / "d.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(DatasetError) as info:
        load_jsonl(path)
    assert info.value.total == 27
    assert [e.where for e in info.value.errors[:3]] == [f"{path}:2", f"{path}:4", f"{path}:8"]
    assert "27 malformed row(s)" in str(info.value) and "and 7 more" in str(info.value)
    with pytest.raises(DatasetError, match=f"{tmp_path}/missing.jsonl: file: does not exist"):
        load_jsonl(tmp_path / "missing.jsonl")


def test_too_long_rows_are_refused_naming_the_field(tiny_models, tmp_path):
    from arbiter.hf import load_tokenizer

    tokenizer = load_tokenizer(tiny_models["reward"])
    rows = [{"prompt": "x", "chosen": " ok", "rejected": " word" * 50}]
    [example] = load_jsonl(write_jsonl(tmp_path / "long.jsonl", rows))
    with pytest.raises(DataError, match=rf"{tmp_path}/long.jsonl:1: rejected: is \d+ tokens, over the model's max of 20"):
        ServiceEncoder(tokenizer, "rm", 20, Truncation.REJECT).encode(example)
    ids, truncated = ServiceEncoder(tokenizer, "rm", 20, Truncation.LEFT).encode(example)
    assert truncated == 1 and len(ids[1]) == 20


def test_training_text_convention(tiny_models):
    from arbiter.hf import load_tokenizer
    from arbiter.rm.train import TrainingError, training_text_convention

    tokenizer = load_tokenizer(tiny_models["reward"])
    # A fresh head appends the end token (TRL's convention); the config can say otherwise.
    assert training_text_convention(None, tiny_models["policy"], tokenizer, "backbone").append_eos
    assert not training_text_convention(False, tiny_models["policy"], tokenizer, "backbone").append_eos
    # A reward model being continued keeps its own: the tiny RM's arbiter.json
    # declares none and it is no TRL checkpoint, so its text was given as is.
    kept = training_text_convention(None, tiny_models["reward"], tokenizer, "reward_model")
    assert not kept.append_eos and kept.source == "default"
    [example] = [parse_row({"prompt": "Q?", "chosen": " yes", "rejected": " no"}, "f:1")]
    ids, _ = ServiceEncoder(tokenizer, "rm", 64, Truncation.LEFT,
                            training_text_convention(True, "m", tokenizer, "backbone")).encode(example)
    assert ids[0] == tokenizer("Q? yes")["input_ids"] + [tokenizer.eos_token_id]
    tokenizer.eos_token = None
    with pytest.raises(TrainingError, match="has no eos_token; set append_eos: false"):
        training_text_convention(True, "m", tokenizer, "backbone")


def test_config_errors_name_the_field(tmp_path):
    cases = [
        ({}, "model_dir"),
        ({"model_dir": "m", "epochs": 0}, "epochs=0"),
        ({"model_dir": "m", "epochs": "two"}, "epochs='two' is invalid: must be an integer"),
        ({"model_dir": "m", "eval_fraction": 1.0}, "eval_fraction"),
        ({"model_dir": "m", "ranking_loss": "listnet"}, "ranking_loss='listnet' is invalid: one of plackett_luce"),
        ({"model_dir": "m", "name": "a/b"}, "name='a/b'"),
        ({"model_dir": "m", "topic": {"idle_timeout_s": 0}}, "topic.idle_timeout_s=0"),
        ({"model_dir": "m", "topic": {"nope": 1}}, "unknown field(s) topic.nope"),
        ({"model_dir": "m", "data": [3]}, "data=[3]"),
    ]
    for data, fragment in cases:
        with pytest.raises(ConfigError) as info:
            config_from_dict(data)
        assert fragment in str(info.value), (data, str(info.value))
    member_cases = [
        ({"train_subset": "bagging"}, "train_subset='bagging' is invalid: must be one of all, bootstrap, shard"),
        ({"train_subset": "shard", "shard_count": 3, "shard_index": 3}, "shard_index=3 is invalid"),
        ({"train_subset": "shard", "shard_count": 0}, "shard_count=0 is invalid"),
        ({"shard_count": 2}, "shard_count=2 is invalid: only applies to train_subset: shard"),
        ({"train_subset": "bootstrap", "shard_index": 1}, "shard_index=1 is invalid: only applies"),
        ({"split_seed": "x"}, "split_seed='x'"),
        ({"subset_seed": 1.5}, "subset_seed=1.5"),
    ]
    for data, fragment in member_cases:
        with pytest.raises(ConfigError) as info:
            config_from_dict({"model_dir": "m", **data})
        assert fragment in str(info.value), (data, str(info.value))
    with pytest.raises(ConfigError, match=r"data\[0\]=.*must be an existing JSONL file"):
        config_from_dict({"model_dir": "m", "data": str(tmp_path / "none.jsonl")}).check_sources(False)
    with pytest.raises(ConfigError, match="or train with --from-topic"):
        config_from_dict({"model_dir": "m"}).check_sources(False)
    (tmp_path / "c.yaml").write_text("model_dir: m\nlearning_rate: 1e-4\n")  # YAML 1.1 reads 1e-4 as a string
    assert load_config(tmp_path / "c.yaml").learning_rate == pytest.approx(1e-4)


def test_split_is_seeded_and_disjoint():
    examples = [parse_row({"chosen": f"a{i}", "rejected": f"b{i}"}, f"f:{i}") for i in range(20)]
    train, held = split_examples(examples, 0.25, seed=3)
    assert len(held) == 5 and len(train) == 15 and not set(train) & set(held)
    assert split_examples(examples, 0.25, seed=3) == (train, held)
    assert split_examples(examples, 0.25, seed=4)[1] != held


def test_split_by_prompt_holds_out_whole_prompts():
    # 5 prompts × 4 pairs: a quarter of 20 is 5 examples, so two whole prompts
    # (8 examples) are held out: one prompt (4) is short of 5.
    examples = [parse_row({"prompt": f"p{p}", "chosen": f"a{p}{i}", "rejected": f"b{p}{i}"}, f"f:{p}{i}")
                for p in range(5) for i in range(4)]
    train, held = split_examples(examples, 0.25, seed=3, by="prompt")
    held_prompts = {e.candidates[0].prompt for e in held}
    assert len(held) == 8 and len(held_prompts) == 2 and len(train) == 12
    assert not held_prompts & {e.candidates[0].prompt for e in train}
    assert split_examples(examples, 0.25, seed=3, by="prompt") == (train, held)
    # Never every prompt: with a fraction asking for nearly all, one prompt trains.
    train, held = split_examples(examples, 0.99, seed=3, by="prompt")
    assert len(train) == 4 and len(held) == 16
    # One prompt only: split by pair.
    single = [parse_row({"prompt": "p", "chosen": f"a{i}", "rejected": f"b{i}"}, f"f:{i}") for i in range(8)]
    train, held = split_examples(single, 0.25, seed=3, by="prompt")
    assert len(held) == 2 and len(train) == 6


def test_bootstrap_is_a_seeded_draw_with_replacement_of_the_same_size():
    examples = [parse_row({"chosen": f"a{i}", "rejected": f"b{i}"}, f"f:{i}") for i in range(1000)]
    draw = train_subset(examples, "bootstrap", seed=5)
    assert len(draw) == 1000 and all(e in examples for e in draw)
    assert train_subset(examples, "bootstrap", seed=5) == draw
    assert train_subset(examples, "bootstrap", seed=6) != draw
    # P(an example is never drawn) = (1 - 1/n)^n ~ 1/e: ~632 distinct of
    # 1000; the occupancy variance is ~ n (e^-1 - 2 e^-2), sd ~ 10, so
    # 632 +- 60 is 6 sd.
    assert 572 <= len({id(e) for e in draw}) <= 692
    assert train_subset(examples, "all") == examples


def test_shards_partition_the_examples():
    examples = [parse_row({"chosen": f"a{i}", "rejected": f"b{i}"}, f"f:{i}") for i in range(10)]
    shards = [train_subset(examples, "shard", seed=2, shard_index=i, shard_count=3) for i in range(3)]
    # 10 = 4 + 3 + 3: every 3rd of a shuffle, from positions 0, 1, 2.
    assert [len(s) for s in shards] == [4, 3, 3]
    assert sorted(examples.index(e) for s in shards for e in s) == list(range(10))
    assert all(s == sorted(s, key=examples.index) for s in shards)  # file order kept within a shard
    assert train_subset(examples, "shard", seed=2, shard_index=1, shard_count=3) == shards[1]
    assert train_subset(examples, "shard", seed=3, shard_index=1, shard_count=3) != shards[1]


# -- registry -----------------------------------------------------------------


def _fake_checkpoint(path):
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"x")


def test_registry_allocates_versions_atomically(tmp_path, monkeypatch):
    registry = ModelRegistry(tmp_path / "reg")
    for expected in ("v1", "v2"):
        with registry.staging("rm") as staged:
            _fake_checkpoint(staged)
            published = registry.publish("rm", staged, parent_version=None, metrics={"x": 1})
        assert published.version == expected
    assert [v.version for v in registry.versions("rm")] == ["v1", "v2"]
    assert registry.latest("rm").path == tmp_path / "reg" / "rm" / "v2"
    meta = json.loads((tmp_path / "reg" / "rm" / "v2" / "arbiter.json").read_text())
    assert meta == {"name": "rm", "version": "v2", "parent_version": None, "metrics": {"x": 1}}
    # A publisher that saw a stale "latest" (another one took v1, v2 meanwhile)
    # does not overwrite: the rename fails and it takes the next free number.
    monkeypatch.setattr(ModelRegistry, "latest", lambda self, name: None)
    with registry.staging("rm") as staged:
        _fake_checkpoint(staged)
        assert registry.publish("rm", staged).version == "v3"
    monkeypatch.undo()
    assert json.loads((tmp_path / "reg" / "rm" / "v1" / "arbiter.json").read_text())["version"] == "v1"
    # Pickle weights are never published; a failed publish leaves no staging directory.
    with pytest.raises(RegistryError, match="safetensors only"):
        with registry.staging("rm") as staged:
            _fake_checkpoint(staged)
            (staged / "pytorch_model.bin").write_bytes(b"x")
            registry.publish("rm", staged)
    assert sorted(p.name for p in (tmp_path / "reg" / "rm").iterdir()) == ["v1", "v2", "v3"]
    with pytest.raises(RegistryError, match="model name"):
        registry.versions("../escape")


# -- training -------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("rm-train")


@pytest.fixture(scope="module")
def data_files(workdir):
    train = write_jsonl(workdir / "train.jsonl", rule_rows(240, seed=0, rankings_every=4))
    # The normalization reference: plain and chat responses, in a known order.
    user = [{"role": "user", "content": "Say something nice."}]
    reference = write_jsonl(workdir / "reference.jsonl", [
        {"prompt": "Say something.", "chosen": " great sunny weather!!", "rejected": " lazy dog."},
        {"prompt": "Give an answer.", "chosen": " good answer!", "rejected": " short answer."},
        {"prompt": user, "chosen": "You are kind!!", "rejected": "No."},
    ])
    return {"train": train, "reference": reference}


@pytest.fixture(scope="module")
def first_version(tiny_models, workdir, data_files):
    """v1: trained from the tiny causal LM (its backbone gets a fresh scalar head)."""
    config = config_from_dict({
        "model_dir": str(tiny_models["policy"]), "registry": str(workdir / "registry"), "name": "bang-rm",
        "data": [str(data_files["train"])], "reference_data": [str(data_files["reference"])],
        "eval_fraction": 0.25, "epochs": 3, "batch_size": 16, "learning_rate": 1e-3, "progress": False,
        "min_eval_accuracy": 0.85, "eval_split": "pair",  # the counts below are of a split by pair
    })
    return train_reward_model(config)


def test_training_from_a_causal_lm_learns_the_rule(first_version, tiny_models):
    result = first_version
    assert result.version.version == "v1" and result.init == "backbone" and result.parent_version is None
    assert result.metrics["eval_accuracy"] >= 0.85, result.metrics
    assert result.metrics["train_examples"] == 180 and result.metrics["eval_examples"] == 60
    # 15 of the 60 held-out rows are K=3 rankings (3 pairs each), the rest pairs.
    assert result.metrics["eval_pairs"] > 60
    files = sorted(p.name for p in result.version.path.iterdir())
    assert "model.safetensors" in files and not [f for f in files if f.endswith((".bin", ".pt"))]
    from safetensors import safe_open

    with safe_open(str(result.version.path / "model.safetensors"), "pt") as weights:
        keys = set(weights.keys())
    assert "score.weight" in keys and not any(k.startswith("lm_head") for k in keys)


def test_an_ensemble_member_trains_on_its_shard_and_holds_out_v1s_split(first_version, workdir, data_files,
                                                                         tiny_models):
    config = config_from_dict({
        "model_dir": str(tiny_models["policy"]), "registry": str(workdir / "member-registry"), "name": "bang-member",
        "data": [str(data_files["train"])], "eval_fraction": 0.25, "epochs": 1, "batch_size": 16,
        "learning_rate": 1e-3, "progress": False, "seed": 7, "split_seed": 0, "eval_split": "pair",
        "train_subset": "shard", "subset_seed": 0, "shard_index": 2, "shard_count": 3,
    })
    result = train_reward_model(config)
    # v1's 180 training rows in 3 shards of 60; the same 60 held out as v1's
    # (split seed 0, not the member's seed 7): the same held-out pairs.
    assert result.metrics["train_examples"] == result.metrics["train_distinct_examples"] == 60
    assert result.metrics["eval_pairs"] == first_version.metrics["eval_pairs"]
    training = read_metadata(result.version.path).extra["training"]
    assert training["train_subset"] == {"kind": "shard", "seed": 0, "shard_index": 2, "shard_count": 3}
    assert training["seed"] == 7 and training["split_seed"] == 0


def test_version_metadata_ships_normalization_and_calibration(first_version):
    path = first_version.version.path
    raw = json.loads((path / "arbiter.json").read_text())
    assert raw["name"] == "bang-rm" and raw["version"] == "v1" and raw["parent_version"] is None
    assert raw["metrics"]["eval_accuracy"] == first_version.metrics["eval_accuracy"]
    calibration = raw["calibration_scores"]
    # Distinct responses of the reference file: 3 rows x 2.
    assert len(calibration) == 6 == raw["normalization"]["sample_count"]
    assert raw["normalization"]["mean"] == pytest.approx(np.mean(calibration), abs=1e-9)
    assert raw["normalization"]["std"] == pytest.approx(np.std(calibration, ddof=1), abs=1e-9)
    meta = read_metadata(path)  # the reward service's reader accepts it
    assert meta.normalization.sample_count == 6
    # A fresh head trains on TRL's text (the end token after plain text), and says so.
    assert raw["text_convention"] == {"append_eos": True} == first_version.text_convention


def test_continue_from_an_earlier_rm_version_with_the_cli(first_version, workdir, data_files, capsys):
    config = workdir / "continue.yaml"
    config.write_text(
        f"model_dir: {first_version.version.path}\nregistry: {workdir / 'registry'}\nname: bang-rm\n"
        f"data: [{data_files['train']}]\neval_fraction: 0.25\nepochs: 1\nbatch_size: 16\nlearning_rate: 1.0e-4\n"
        f"seed: 1\n"
    )
    assert cli_main(["train", "rm", "--config", str(config), "--no-progress", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["version"] == "v2" and out["init"] == "reward_model" and out["parent_version"] == "v1"
    assert out["metrics"]["eval_accuracy"] >= 0.85
    meta = json.loads((workdir / "registry" / "bang-rm" / "v2" / "arbiter.json").read_text())
    assert meta["parent_version"] == "v1" and meta["training"]["init"] == "reward_model"
    # Continued training keeps the parent's text convention.
    assert meta["text_convention"] == out["text_convention"] == {"append_eos": True}
    assert cli_main(["rm", "list", "--registry", str(workdir / "registry"), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(r["version"], r["parent_version"]) for r in listed] == [("v1", None), ("v2", "v1")]


def test_cli_reports_bad_data_and_config(tmp_path, tiny_models, capsys):
    bad = write_jsonl_text(tmp_path / "bad.jsonl", '{"prompt": "x", "chosen": " a"}\n')
    config = tmp_path / "c.yaml"
    config.write_text(f"model_dir: {tiny_models['policy']}\nregistry: {tmp_path / 'reg'}\ndata: [{bad}]\n")
    assert cli_main(["train", "rm", "--config", str(config), "--no-progress"]) == 2
    assert f"{bad}:1: rejected: is missing" in capsys.readouterr().err
    config.write_text(f"model_dir: {tiny_models['policy']}\nbatch_size: -1\ndata: [{bad}]\n")
    assert cli_main(["train", "rm", "--config", str(config)]) == 2
    assert "batch_size=-1 is invalid" in capsys.readouterr().err
    assert not (tmp_path / "reg").exists()


# -- the trained version in the real reward service -------------------------------


def _text(prompt, response):
    return reward_pb2.RewardInput(text=reward_pb2.TextPair(prompt=prompt, response=response))


def _chat(messages):
    return reward_pb2.RewardInput(conversation=common_pb2.Conversation(
        messages=[common_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages]
    ))


def test_trained_version_swaps_in_live_and_serves_its_own_statistics(first_version, tiny_models, data_files,
                                                                      model_roots):
    settings = RewardSettings(model_dir=str(tiny_models["reward"]), port=0, batching=BatchingConfig(max_queue_delay_ms=1.0),
                              model_roots=model_roots)
    probe = reward_pb2.ScoreRequest(inputs=[_text("Say something.", " great sunny weather!!")],
                                    options=reward_pb2.ScoreOptions(normalize=True))
    seen, failures, stop = [], [], threading.Event()
    with BackgroundServer(lambda: create_server(settings)) as server, grpc.insecure_channel(server.target) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        models = common_pb2_grpc.ModelServiceStub(channel)

        def score_continuously():
            while not stop.is_set():
                try:
                    response = stub.Score(probe, timeout=10)
                    seen.append((response.model_version, response.results[0].score, response.results[0].raw_score))
                except grpc.RpcError as err:
                    failures.append(err)

        thread = threading.Thread(target=score_continuously)
        thread.start()
        try:
            while len(seen) < 5:
                time.sleep(0.01)
            loaded = models.LoadModelVersion(
                common_pb2.LoadModelVersionRequest(path=str(first_version.version.path), activate=True), timeout=60
            )
            deadline = time.monotonic() + 30
            while sum(v == "v1" for v, _, _ in seen) < 5 and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            stop.set()
            thread.join()
        assert not failures, failures[:3]
        versions = [v for v, _, _ in seen]
        first_new = versions.index("v1")
        assert set(versions[:first_new]) == {"v0"} and set(versions[first_new:]) == {"v1"}, "not an atomic swap"
        info = loaded.info
        assert info.version == "v1" and info.name == "bang-rm" and info.active
        stats = first_version.normalization
        assert info.normalization.mean == pytest.approx(stats["mean"]) and info.normalization.std == pytest.approx(stats["std"])
        for version, score, raw in seen[first_new:]:
            assert score == pytest.approx((raw - stats["mean"]) / stats["std"], abs=1e-5)

        # The service scores the reference responses exactly as training
        # measured them (same rendering, chat template and pooling): the shipped
        # calibration scores are the served raw scores.
        rows = [json.loads(line) for line in data_files["reference"].read_text().splitlines()]
        inputs = []
        for row in rows:
            for key in ("chosen", "rejected"):
                if isinstance(row["prompt"], list):
                    inputs.append(_chat(row["prompt"] + [{"role": "assistant", "content": row[key]}]))
                else:
                    inputs.append(_text(row["prompt"], row[key]))
        served = stub.Score(reward_pb2.ScoreRequest(inputs=inputs), timeout=10)
        assert [r.raw_score for r in served.results] == pytest.approx(first_version.calibration_scores, abs=1e-4)
        # The old version stays loaded: rolling back is one activation.
        back = models.ActivateModelVersion(common_pb2.ActivateModelVersionRequest(version="v0"), timeout=10)
        assert back.previous_version == "v1"


def test_shadow_compare_and_promote(first_version, tiny_models, data_files, workdir, capsys, model_roots):
    """`arbiter rm shadow`: the candidate (loaded by path, not activated) and
    the active version score held-out labelled data side by side; promotion
    is gated on the candidate's accuracy."""
    held_out = write_jsonl(workdir / "held-out.jsonl", rule_rows(30, seed=99))
    settings = RewardSettings(model_dir=str(tiny_models["reward"]), port=0, model_roots=model_roots)
    with BackgroundServer(lambda: create_server(settings)) as server:
        common = ["rm", "shadow", "--target", server.target, "--data", str(held_out)]
        out = workdir / "shadow.json"
        code = cli_main([*common, "--candidate-path", str(first_version.version.path), "--promote",
                         "--min-accuracy", "1.01", "--out", str(out)])
        assert code == 3
        report = json.loads(out.read_text())
        assert report["active"] == "v0" and report["candidate"] == "v1" and not report["promoted"]
        assert report["pairs"] == 30 and report["candidate_accuracy"] >= 0.85
        assert -1 <= report["spearman"] <= 1 and 0 <= report["pairwise_agreement"] <= 1
        # Hand check of the agreement against the two versions' own scores.
        from services.reward.client import RewardClient
        from services.reward.shadow import score_examples

        examples = load_jsonl(held_out)
        with RewardClient(server.target) as client:
            a, _ = score_examples(client, examples, "v0")
            c, _ = score_examples(client, examples, "v1")
        same = sum((x[0] > x[1]) == (y[0] > y[1]) for x, y in zip(a, c))
        assert report["pairwise_agreement"] == pytest.approx(same / 30)
        assert server.engine.models.active_version == "v0"
        capsys.readouterr()
        assert cli_main([*common, "--candidate", "v1", "--promote", "--min-accuracy", "0.85"]) == 0
        assert "promoted v1" in capsys.readouterr().out
        assert server.engine.models.active_version == "v1"
