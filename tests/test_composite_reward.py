"""Composite rewards and ensembles (arbiter.reward.composite, arbiter.reward.ensemble)
through a real reward server on port 0.

The models are known by construction: ``double`` is the tiny RM with its
(bias-free) score head times 2, so it scores exactly twice v0; ``small`` is
an RM of another width (it cannot be stacked with v0). Expected values are
the formulas of ``arbiter.reward.rules`` worked by hand from v0's and small's
own single-version scores."""

import json
import math

import grpc
import pytest
import yaml
from helpers import BackgroundServer, expect_error, metric_value
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from arbiter.config import ConfigError
from arbiter.hf import read_metadata, write_metadata
from arbiter.reward import rules
from arbiter.reward.composite import parse_spec
from arbiter.reward.ensemble import stack_refusal
from arbiter.reward.model import RewardModel
from arbiter.tiny import TinyConfig, build_tokenizer, make_reward
from arbiter.types import ChatMessage, RewardInput
from arbiter.v1 import common_pb2, common_pb2_grpc, reward_pb2, reward_pb2_grpc
from services.reward.client import RewardClient
from services.reward.server import create_server
from services.reward.settings import RewardSettings

OK = reward_pb2.ScoreOptions
# vmap runs CPU attention member by member (torch says so once); the result is exact.
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")
ITEMS = [
    ("Say something.", " Yes yes Yes yes"),  # words: 2 distinct bigrams of 3
    ("What do you think?", " No, I think the weather is sunny today."),
]
K = 2.0


# -- the rule terms, by hand ---------------------------------------------------------


def test_length_penalty_formulas():
    assert rules.length_penalty(6, 4, "both") == -0.5  # -|6-4|/4
    assert rules.length_penalty(2, 4, "both") == -0.5
    assert rules.length_penalty(6, 4, "over") == -0.5
    assert rules.length_penalty(2, 4, "over") == 0.0
    assert rules.length_penalty(2, 4, "under") == -0.5
    assert rules.length_penalty(4, 4, "both") == 0.0
    assert rules.length_penalty(12, 4, "over") == -2.0


def test_repetition_and_ensemble_formulas():
    # "a b a b a": bigrams ab ba ab ba -> M=4, 2 distinct -> 2/4 repeat
    assert rules.repetition_penalty("a b a b a", 2) == -0.5
    # unigrams: 5 words, 2 distinct -> 3/5
    assert rules.repetition_penalty("a b a b a", 1) == pytest.approx(-0.6)
    assert rules.repetition_penalty("one two", 3) == 0.0  # fewer than n words
    assert rules.repetition_penalty("x y z", 2) == 0.0
    # [1, 3]: mean 2, population std 1 (sample std would be sqrt 2)
    assert rules.ensemble_moments([1.0, 3.0]) == (2.0, 1.0)
    assert rules.penalized_mean([1.0, 3.0], 2.0) == 0.0
    mean, std = rules.ensemble_moments([1.0, 2.0, 3.0, 4.0])
    assert (mean, std) == (2.5, pytest.approx(math.sqrt(1.25)))


def test_spec_validation_names_the_field():
    def refused(data, field, fragment):
        with pytest.raises(ConfigError) as info:
            parse_spec(data, "spec")
        assert info.value.field == field, str(info.value)
        assert fragment in str(info.value)

    term = {"name": "a", "weight": 1.0, "model": {}}
    refused({"terms": []}, "spec.terms", "1 to 32 terms")
    refused({"terms": [{**term, "weight": float("nan")}]}, "spec.terms[0].weight", "finite")
    refused({"terms": [{**term, "weight": float("inf")}]}, "spec.terms[0].weight", "finite")
    refused({"terms": [{**term, "weight": True}]}, "spec.terms[0].weight", "finite")
    refused({"terms": [{"name": "a", "weight": 1}]}, "spec.terms[0]", "exactly one source")
    refused({"terms": [{**term, "regex": {"pattern": "x"}}]}, "spec.terms[0]", "exactly one source")
    refused({"terms": [term, term]}, "spec.terms[1].name", "unique")
    refused({"terms": [{**term, "name": "total"}]}, "spec.terms[0].name", "reserved")
    refused({"terms": [{**term, "name": "has space"}]}, "spec.terms[0].name", "metric label")
    refused({"terms": [{**term, "colour": 1}]}, "spec.terms[0]", "unknown field(s) colour")
    refused({"terms": [{"name": "e", "weight": 1, "ensemble": {"versions": ["a", "b"], "uncertainty_penalty": -1}}]},
            "spec.terms[0].ensemble.uncertainty_penalty", ">= 0")
    refused({"terms": [{"name": "e", "weight": 1, "ensemble": {"versions": ["a"]}}]},
            "spec.terms[0].ensemble.versions", "2 to 16")
    refused({"terms": [{"name": "e", "weight": 1, "ensemble": {"versions": ["a", "a"]}}]},
            "spec.terms[0].ensemble.versions[1]", "twice")
    refused({"terms": [{"name": "r", "weight": 1, "regex": {"pattern": "(unclosed"}}]},
            "spec.terms[0].regex.pattern", "does not compile")
    refused({"terms": [{"name": "l", "weight": 1, "length_penalty": {"target_tokens": 0}}]},
            "spec.terms[0].length_penalty.target_tokens", ">= 1")
    refused({"terms": [{"name": "l", "weight": 1, "length_penalty": {"target_tokens": 3, "side": "left"}}]},
            "spec.terms[0].length_penalty.side", "both, over, under")
    refused({"terms": [{"name": "p", "weight": 1, "repetition_penalty": {"n": 0}}]},
            "spec.terms[0].repetition_penalty.n", "1..16")


# -- the service ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry(tiny_models, tmp_path_factory):
    """v0 (the tiny RM), ``double`` (its head times 2, statistics times 2)
    and ``small`` (another width), beside the spec file that names them."""
    root = tmp_path_factory.mktemp("composite")
    v0 = tiny_models["reward"]
    model = AutoModelForSequenceClassification.from_pretrained(str(v0))
    model.score.weight.data *= 2
    model.save_pretrained(root / "double")
    AutoTokenizer.from_pretrained(str(v0)).save_pretrained(root / "double")
    stats = read_metadata(v0).normalization
    write_metadata(root / "double", name="tiny-reward", version="double",
                   normalization={"mean": 2 * stats.mean, "std": 2 * stats.std, "sample_count": stats.sample_count})
    make_reward(root / "small", TinyConfig(n_embd=32, seed=5), build_tokenizer(512, 256), calibrate=False)
    write_metadata(root / "small", version="small")
    spec = {
        "name": "mix",
        "models": {"double": "double", "small": str(root / "small")},
        "terms": [
            {"name": "rm", "weight": 1.0, "model": {}},
            {"name": "ens", "weight": 0.5, "ensemble": {"versions": ["v0", "double"], "uncertainty_penalty": K}},
            {"name": "mixed", "weight": 0.25, "ensemble": {"versions": ["v0", "small"], "uncertainty_penalty": 1}},
            {"name": "brevity", "weight": 0.25, "length_penalty": {"target_tokens": 4, "side": "over"}},
            {"name": "yes", "weight": 2.0, "regex": {"pattern": "^ yes", "ignore_case": True}},
            {"name": "rep", "weight": 1.0, "repetition_penalty": {"n": 2}},
        ],
    }
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    return root


@pytest.fixture(scope="module")
def server(tiny_models, registry, model_roots):
    settings = RewardSettings(model_dir=str(tiny_models["reward"]), port=0, metrics_port=0,
                              reward_spec_file=str(registry / "spec.yaml"), model_roots=model_roots,
                              stack_ensembles="always")  # auto stacks on CUDA only
    with BackgroundServer(lambda: create_server(settings)) as srv:
        yield srv


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield reward_pb2_grpc.RewardServiceStub(channel)


@pytest.fixture(scope="module")
def models_stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield common_pb2_grpc.ModelServiceStub(channel)


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    return AutoTokenizer.from_pretrained(str(tiny_models["reward"]))


def text(prompt, response):
    return reward_pb2.RewardInput(text=reward_pb2.TextPair(prompt=prompt, response=response))


def request(options=None, items=ITEMS):
    return reward_pb2.ScoreRequest(inputs=[text(*item) for item in items], options=options)


def single(stub, version, normalize=False):
    """Each item's own score under one pinned version (no spec)."""
    response = stub.Score(request(OK(model_version=version, normalize=normalize)), timeout=30)
    assert not response.reward_spec and not response.results[0].components
    return [r.score for r in response.results]


def expected_rules(tokenizer, response):
    """The rule terms' values for one response, by the documented formulas."""
    n = len(tokenizer(response, add_special_tokens=False)["input_ids"])
    brevity = -max(0, n - 4) / 4
    yes = 1.0 if response.lower().startswith(" yes") else 0.0
    words = response.split()
    grams = list(zip(words, words[1:]))
    rep = -(len(grams) - len(set(grams))) / len(grams)
    return {"brevity": brevity, "yes": yes, "rep": rep}


def test_configured_spec_total_and_components(stub, tokenizer):
    a, s = single(stub, "v0"), single(stub, "small")
    assert single(stub, "double") == pytest.approx([2 * x for x in a], abs=1e-5)
    response = stub.Score(request(), timeout=30)
    assert response.reward_spec == "mix" and response.model_name == "mix"
    assert response.model_version == "mix@v0,double,small"
    assert not response.normalized
    assert expected_rules(tokenizer, ITEMS[0][1])["rep"] == -1 / 3  # (Yes yes)(yes Yes)(Yes yes): 3 bigrams, 2 distinct
    for i, result in enumerate(response.results):
        # ens over (a, 2a): mean 1.5a, population std |a|/2
        ens = 1.5 * a[i] - K * abs(a[i]) / 2
        mixed = (a[i] + s[i]) / 2 - abs(a[i] - s[i]) / 2
        values = {"rm": a[i], "ens": ens, "mixed": mixed, **expected_rules(tokenizer, ITEMS[i][1])}
        weights = {"rm": 1.0, "ens": 0.5, "mixed": 0.25, "brevity": 0.25, "yes": 2.0, "rep": 1.0}
        got = {c.name: c for c in result.components}
        assert list(got) == list(weights)
        for name, value in values.items():
            assert got[name].value == pytest.approx(value, abs=1e-5), name
            assert got[name].weight == weights[name]
        assert got["ens"].mean == pytest.approx(1.5 * a[i], abs=1e-5)
        assert got["ens"].std == pytest.approx(abs(a[i]) / 2, abs=1e-5)
        assert list(got["ens"].versions) == ["v0", "double"]
        assert list(got["ens"].member_scores) == pytest.approx([a[i], 2 * a[i]], abs=1e-5)
        assert got["mixed"].std == pytest.approx(abs(a[i] - s[i]) / 2, abs=1e-5)
        total = sum(weights[n] * values[n] for n in weights)
        assert result.score == pytest.approx(total, abs=1e-5)
        assert result.raw_score == pytest.approx(total, abs=1e-5)
    assert expected_rules(tokenizer, ITEMS[0][1])["yes"] == 1.0


def test_normalized_terms(stub, tiny_models):
    """double's statistics are v0's times 2, so both normalize to the same z:
    the ensemble's std is 0 and its value is z."""
    stats = read_metadata(tiny_models["reward"]).normalization
    a = single(stub, "v0")
    spec = reward_pb2.RewardSpec(terms=[
        reward_pb2.RewardTerm(name="rm", weight=1.0, model=reward_pb2.ModelTerm(normalize=True)),
        reward_pb2.RewardTerm(name="ens", weight=-2.0, ensemble=reward_pb2.EnsembleTerm(
            versions=["v0", "double"], uncertainty_penalty=3.0, normalize=True)),
    ])
    response = stub.Score(request(OK(reward_spec=spec)), timeout=30)
    assert response.normalized and response.reward_spec == "request"
    for i, result in enumerate(response.results):
        z = (a[i] - stats.mean) / stats.std
        ens = result.components[1]
        assert ens.std == pytest.approx(0.0, abs=1e-5)
        assert ens.value == pytest.approx(z, abs=1e-5)
        assert result.score == pytest.approx(z - 2 * z, abs=1e-5)
        # raw: rm a, ens over (a, 2a) with k=3
        assert result.raw_score == pytest.approx(a[i] - 2 * (1.5 * a[i] - 3 * abs(a[i]) / 2), abs=1e-5)
    # The configured spec decides its terms' normalization: an old caller
    # asking for normalized scores (the rollout worker) gets its total.
    configured = stub.Score(request(), timeout=30)
    asked = stub.Score(request(OK(normalize=True)), timeout=30)
    assert not asked.normalized
    assert [r.score for r in asked.results] == [r.score for r in configured.results]


def test_per_request_spec_overrides_and_pinning_bypasses(server, stub, tokenizer):
    a = single(stub, "v0")  # a pinned version is scored alone, as before
    spec = reward_pb2.RewardSpec(name="mine", terms=[
        reward_pb2.RewardTerm(name="double", weight=0.5, model=reward_pb2.ModelTerm(version="double")),
        reward_pb2.RewardTerm(name="len", weight=3.0, length_penalty=reward_pb2.LengthPenaltyTerm(
            target_tokens=2, side=reward_pb2.LENGTH_PENALTY_SIDE_UNDER)),
        reward_pb2.RewardTerm(name="ens", weight=1.0, ensemble=reward_pb2.EnsembleTerm(
            versions=["double", "v0"], uncertainty_penalty=1.0)),
    ])
    before = metric_value(server, "arbiter_reward_ensemble_passes_total", mode="sequential") or 0
    response = stub.Score(request(OK(reward_spec=spec)), timeout=30)
    assert response.reward_spec == "mine" and response.model_version == "mine@double,v0"
    for i, result in enumerate(response.results):
        n = len(tokenizer(ITEMS[i][1], add_special_tokens=False)["input_ids"])
        under = -max(0, 2 - n) / 2
        ens = 1.5 * a[i] - abs(a[i]) / 2
        assert [c.name for c in result.components] == ["double", "len", "ens"]
        assert result.score == pytest.approx(0.5 * 2 * a[i] + 3.0 * under + ens, abs=1e-5)
    # A request's own ensemble is scored member by member (only configured ones are stacked).
    assert metric_value(server, "arbiter_reward_ensemble_passes_total", mode="sequential") == before + 1


def test_rule_terms_judge_a_conversations_last_turn(server):
    spec = reward_pb2.RewardSpec(terms=[reward_pb2.RewardTerm(
        name="rep", weight=1.0, repetition_penalty=reward_pb2.RepetitionPenaltyTerm(n=1))])
    conversation = RewardInput(messages=(ChatMessage("user", "hi hi hi hi"),
                                         ChatMessage("assistant", "go go stop")))  # 3 unigrams, 2 distinct
    with RewardClient(server.target) as client:
        response = client.score([conversation], reward_spec=spec)
    assert response.results[0].score == pytest.approx(-1 / 3)
    assert response.model_version == "request@"


def test_stream_and_compare_use_the_configured_total(stub):
    total = [r.score for r in stub.Score(request(), timeout=30).results]
    answers = list(stub.ScoreStream(iter([reward_pb2.ScoreStreamRequest(
        correlation_id="c", inputs=[text(*item) for item in ITEMS])]), timeout=30))
    assert answers[0].reward_spec == "mix"
    assert [r.score for r in answers[0].results] == pytest.approx(total, abs=1e-6)
    assert len(answers[0].results[0].components) == 6
    compared = stub.Compare(reward_pb2.CompareRequest(prompt=ITEMS[0][0], response_a=ITEMS[0][1],
                                                      response_b=ITEMS[1][1]), timeout=30)
    first = stub.Score(request(items=[ITEMS[0]]), timeout=30).results[0].raw_score
    second = stub.Score(request(items=[(ITEMS[0][0], ITEMS[1][1])]), timeout=30).results[0].raw_score
    assert compared.probability_a_preferred == pytest.approx(1 / (1 + math.exp(second - first)), abs=1e-6)


def test_bad_specs_get_the_right_status_naming_the_field(stub, models_stub):
    def spec(*terms):
        return request(OK(reward_spec=reward_pb2.RewardSpec(terms=list(terms))))

    ens = reward_pb2.EnsembleTerm
    expect_error(lambda: stub.Score(spec(reward_pb2.RewardTerm(name="e", weight=1, ensemble=ens(
        versions=["v0", "nope"]))), timeout=10), grpc.StatusCode.NOT_FOUND,
        "options.reward_spec.terms[0].ensemble.versions[1]", "'nope' is not loaded")
    expect_error(lambda: stub.Score(spec(reward_pb2.RewardTerm(name="m", weight=1, model=reward_pb2.ModelTerm(
        version="nope"))), timeout=10), grpc.StatusCode.NOT_FOUND, "options.reward_spec.terms[0].model.version")
    expect_error(lambda: stub.Score(spec(reward_pb2.RewardTerm(name="e", weight=1, ensemble=ens(
        versions=["v0", "double"], uncertainty_penalty=-0.5))), timeout=10), grpc.StatusCode.INVALID_ARGUMENT,
        "options.reward_spec.terms[0].ensemble.uncertainty_penalty", ">= 0")
    for bad in (math.nan, math.inf, -math.inf):
        expect_error(lambda: stub.Score(spec(reward_pb2.RewardTerm(name="m", weight=bad, model=reward_pb2.ModelTerm(
        ))), timeout=10), grpc.StatusCode.INVALID_ARGUMENT, "options.reward_spec.terms[0].weight", "finite")
    expect_error(lambda: stub.Score(spec(reward_pb2.RewardTerm(name="r", weight=1, regex=reward_pb2.RegexTerm(
        pattern="(["))), timeout=10), grpc.StatusCode.INVALID_ARGUMENT, "options.reward_spec.terms[0].regex.pattern")
    expect_error(lambda: stub.Score(spec(reward_pb2.RewardTerm(name="x", weight=1)), timeout=10),
                 grpc.StatusCode.INVALID_ARGUMENT, "options.reward_spec.terms[0]", "exactly one source")
    expect_error(lambda: stub.Score(spec(), timeout=10), grpc.StatusCode.INVALID_ARGUMENT,
                 "options.reward_spec.terms", "1 to 32")
    expect_error(lambda: stub.Score(request(OK(model_version="v0", reward_spec=reward_pb2.RewardSpec(terms=[
        reward_pb2.RewardTerm(name="m", weight=1, model=reward_pb2.ModelTerm())]))), timeout=10),
        grpc.StatusCode.INVALID_ARGUMENT, "options.model_version")
    expect_error(lambda: stub.Score(request(OK(normalize=True, reward_spec=reward_pb2.RewardSpec(terms=[
        reward_pb2.RewardTerm(name="m", weight=1, model=reward_pb2.ModelTerm())]))), timeout=10),
        grpc.StatusCode.INVALID_ARGUMENT, "options.normalize", "set normalize on its model and ensemble terms")
    # small ships no statistics: FAILED_PRECONDITION, as for a single version
    expect_error(lambda: stub.Score(spec(reward_pb2.RewardTerm(name="e", weight=1, ensemble=ens(
        versions=["v0", "small"], normalize=True))), timeout=10), grpc.StatusCode.FAILED_PRECONDITION,
        "options.reward_spec.terms[0].ensemble.versions[1]", "no normalization statistics")
    # a pattern that backtracks for ever is stopped, not left holding a thread
    expect_error(lambda: stub.Score(reward_pb2.ScoreRequest(
        inputs=[text("", "a" * 5000 + "!")], options=OK(reward_spec=reward_pb2.RewardSpec(terms=[reward_pb2.RewardTerm(
            name="r", weight=1, regex=reward_pb2.RegexTerm(pattern="(a|aa)+$"))]))), timeout=30),
        grpc.StatusCode.RESOURCE_EXHAUSTED, "inputs[0]", "term 'r'", "simplify the pattern")
    # a version the configured spec uses cannot be unloaded
    expect_error(lambda: models_stub.UnloadModelVersion(common_pb2.UnloadModelVersionRequest(version="double"),
                                                        timeout=10),
                 grpc.StatusCode.FAILED_PRECONDITION, "used by the reward spec 'mix'")
    # the service still serves
    assert len(stub.Score(request(), timeout=30).results) == 2


def test_metrics_and_drift_per_component(server, stub, models_stub):
    def passes(mode):
        return metric_value(server, "arbiter_reward_ensemble_passes_total", mode=mode) or 0

    stacked, sequential = passes("stacked"), passes("sequential")
    scored = stub.Score(request(), timeout=30)
    # ens (v0, double: one architecture) is one stacked pass; mixed (v0, small: other widths) member by member
    assert (passes("stacked"), passes("sequential")) == (stacked + 1, sequential + 1)
    assert metric_value(server, "arbiter_reward_spec_requests_total", spec="configured") >= 1
    for name in ("rm", "ens", "mixed", "brevity", "yes", "rep", "total"):
        assert metric_value(server, "arbiter_reward_component_value_count", component=name) >= 2, name
    drift = stub.GetScoreDrift(reward_pb2.GetScoreDriftRequest(component="total"), timeout=10)
    assert drift.model_version == "component:total"
    assert list(drift.window_scores)[-2:] == pytest.approx([r.score for r in scored.results], abs=1e-5)
    window = metric_value(server, "arbiter_reward_component_window_samples", component="rm")
    assert window == drift.statistics.window_samples >= 2
    expect_error(lambda: stub.GetScoreDrift(reward_pb2.GetScoreDriftRequest(component="brevity"), timeout=10),
                 grpc.StatusCode.INVALID_ARGUMENT, "component", "total, rm, ens, mixed")
    # A promotion starts the model component's series afresh (the version's own monitor sees the swap).
    models_stub.ActivateModelVersion(common_pb2.ActivateModelVersionRequest(version="double"), timeout=10)
    try:
        promoted = stub.Score(request(items=[ITEMS[0]]), timeout=30)
        assert promoted.model_version == "mix@double,v0,small"
        rm = stub.GetScoreDrift(reward_pb2.GetScoreDriftRequest(component="rm"), timeout=10)
        assert list(rm.window_scores) == pytest.approx([promoted.results[0].components[0].value], abs=1e-6)
    finally:
        models_stub.ActivateModelVersion(common_pb2.ActivateModelVersionRequest(version="v0"), timeout=10)


def test_which_ensembles_stack(tiny_models, registry):
    v0, double, small = (RewardModel.load(path) for path in (tiny_models["reward"], registry / "double",
                                                              registry / "small"))
    assert stack_refusal([v0, double], "always") is None
    assert "cuda only" in stack_refusal([v0, double], "auto")  # these tests run on CPU
    assert stack_refusal([v0, double], "never") == "stack_ensembles=never"
    assert "other parameters" in stack_refusal([v0, small], "always")


def test_spec_file_errors_name_the_field(tiny_models, tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(json.dumps({"terms": [{"name": "e", "weight": 1.0, "ensemble": {"versions": ["a", "b"],
                                                                                    "uncertainty_penalty": -2}}]}))
    with pytest.raises(ConfigError) as info:
        RewardSettings(model_dir=str(tiny_models["reward"]), reward_spec_file=str(path))
    assert info.value.field == "reward_spec_file.terms[0].ensemble.uncertainty_penalty"
    path.write_text(yaml.safe_dump({"models": {"a": "a", "b": "b", "c": "c"}, "terms": [
        {"name": "m", "weight": 1.0, "model": {}}]}))
    with pytest.raises(ConfigError) as info:
        RewardSettings(model_dir=str(tiny_models["reward"]), reward_spec_file=str(path))
    assert info.value.field == "max_loaded_versions"


def test_cli_prints_components_and_component_drift(server, stub, capsys, monkeypatch):
    """`arbiter score` writes each item's components beside the total, and
    `arbiter drift report --component` reads a term's drift."""
    import io

    from cli.main import main as cli_main

    expected = stub.Score(request(items=[ITEMS[1]]), timeout=30).results[0]
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps({"prompt": ITEMS[1][0], "response": ITEMS[1][1]}) + "\n"))
    assert cli_main(["score", "--target", server.target]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["model_version"] == "mix@v0,double,small"
    assert row["score"] == pytest.approx(expected.score, abs=1e-6)
    components = {c.name: c for c in expected.components}
    assert list(row["components"]) == list(components)
    for name, got in row["components"].items():
        assert got["value"] == pytest.approx(components[name].value, abs=1e-6)
        assert got["weight"] == components[name].weight
    # ensembles carry their spread and members; single terms do not
    assert row["components"]["ens"]["std"] == pytest.approx(components["ens"].std, abs=1e-6)
    assert list(row["components"]["ens"]["members"]) == ["v0", "double"]
    assert "std" not in row["components"]["rm"]
    assert cli_main(["drift", "report", "--target", server.target, "--component", "total"]) == 0
    assert "component:total" in capsys.readouterr().out
