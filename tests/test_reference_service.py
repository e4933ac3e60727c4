"""The reference service over real gRPC: teacher-forced log-probs, KL against
the policy service's own samples, tokenizer pairing, bad input, versions."""

import math
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import BackgroundServer, expect_error, metric_value, metrics_text
from lm_fixtures import lora_adapter, nan_weights, other_tokenizer_policy, perturbed

from arbiter.batching import BatchingConfig
from arbiter.limits import MiB
from arbiter.v1 import reference_pb2
from services.common.pairing import TokenizerMismatch, check_tokenizer_pair
from services.policy.client import PolicyClient
from services.policy.server import create_server as create_policy_server
from services.policy.settings import PolicySettings
from services.reference.client import ReferenceClient
from services.reference.server import create_server
from services.reference.settings import ReferenceSettings

INVALID = grpc.StatusCode.INVALID_ARGUMENT
PROMPT = [280, 462, 406]
COMPLETION = [293, 427, 79, 12]


@pytest.fixture(scope="module")
def server(policy_dir, model_roots):
    # The reference is the policy's initial weights, as in RLHF.
    settings = ReferenceSettings(model_dir=str(policy_dir), port=0, metrics_port=0, batching=BatchingConfig(max_queue_delay_ms=5.0),
                                 model_roots=model_roots)
    with BackgroundServer(lambda: create_server(settings)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with ReferenceClient(server.target) as c:
        yield c


@pytest.fixture(scope="module")
def policy(policy_dir):
    settings = PolicySettings(model_dir=str(policy_dir), port=0)
    with BackgroundServer(lambda: create_policy_server(settings)) as running, PolicyClient(running.target) as c:
        yield c


def by_hand(hf_policy, prompt, completion):
    """log softmax of an unpadded forward, read at the positions that predict each completion token."""
    with torch.no_grad():
        logits = hf_policy(torch.tensor([prompt + completion])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [float(logprobs[len(prompt) - 1 + k, token]) for k, token in enumerate(completion)]


def test_logprobs_match_an_unpadded_forward(client, hf_policy):
    sequences = [(PROMPT, COMPLETION), ([5], [6, 7, 8, 9, 10, 11, 12, 13]), (PROMPT + COMPLETION, [1])]
    response = client.logprobs(sequences)
    assert response.model_version == "v0"
    assert len(response.results) == 3
    for (prompt, completion), result in zip(sequences, response.results):
        assert list(result.logprobs) == pytest.approx(by_hand(hf_policy, prompt, completion), abs=1e-5)


def test_dynamic_batching_gives_the_same_numbers(server, client):
    sequences = [([3 + i] * (1 + i % 4), list(range(10, 12 + 3 * i))) for i in range(12)]
    alone = [client.logprobs([s]).results[0].logprobs for s in sequences]
    batches_before = batch_count(server)
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda s: client.logprobs([s]).results[0].logprobs, sequences))
    for a, b in zip(alone, together):
        assert list(b) == pytest.approx(list(a), abs=1e-5)
    assert batch_count(server) - batches_before < len(sequences), "concurrent requests should share forward passes"


def batch_count(server):
    return metric_value(server, "arbiter_batch_size_count", service="reference")


def test_kl_is_zero_against_the_policy_it_started_from(client, policy):
    client.pair_with(policy.info())
    response = policy.generate(["The quick brown", "Hello, how can"], max_new_tokens=24, temperature=1.0, n=2, seed=2)
    items = [(s.prompt_token_ids, s.completion_token_ids, s.logprobs) for s in response.samples]
    for estimator in ("k1", "k2", "k3"):
        kl = client.kl(items, estimator=estimator)
        assert kl.model_version == "v0"
        for result, sample in zip(kl.results, response.samples):
            assert len(result.kl) == len(sample.completion_token_ids)
            assert max(abs(v) for v in result.kl) <= 1e-6
            assert abs(result.kl_sum) <= 1e-6 * len(result.kl)
            assert list(result.reference_logprobs) == pytest.approx(list(sample.logprobs), abs=1e-6)


def test_kl_estimators_match_hand_computed_values(client):
    reference = list(client.logprobs([(PROMPT, COMPLETION)]).results[0].logprobs)
    # Policy log-probs chosen around the reference's: r = pi_ref / pi = 2, 1/2, 1, e.
    log_r = [math.log(2), math.log(0.5), 0.0, 1.0]
    policy = [q - lr for q, lr in zip(reference, log_r)]
    assert all(p <= 0 for p in policy)
    expected = {
        "k1": [-math.log(2), math.log(2), 0.0, -1.0],
        "k2": [0.5 * math.log(2) ** 2, 0.5 * math.log(2) ** 2, 0.0, 0.5],
        "k3": [1 - math.log(2), -0.5 + math.log(2), 0.0, math.e - 2],
    }
    for estimator, want in expected.items():
        response = client.kl([(PROMPT, COMPLETION, policy)], estimator=estimator)
        assert response.estimator == getattr(reference_pb2, f"KL_ESTIMATOR_{estimator.upper()}")
        [result] = response.results
        assert list(result.kl) == pytest.approx(want, abs=2e-6)
        assert result.kl_sum == pytest.approx(sum(want), abs=1e-5)
        assert list(result.reference_logprobs) == reference


def test_extreme_policy_logprobs_stay_finite_or_are_refused(client):
    reference = list(client.logprobs([(PROMPT, COMPLETION)]).results[0].logprobs)
    # -720: e^720 overflowed math.expm1 (OverflowError, INTERNAL). k1 = d and
    # k2 = d^2 / 2 with d = -720 - log pi_ref are finite, and what is served.
    policy = [-720.0] * 4
    for estimator, value in (("k1", lambda d: d), ("k2", lambda d: 0.5 * d * d)):
        [result] = client.kl([(PROMPT, COMPLETION, policy)], estimator=estimator).results
        assert list(result.kl) == pytest.approx([value(-720.0 - q) for q in reference], rel=1e-6)
    # k3 = e^-d - 1 + d: at -80 nats under the reference it is e^(80 + log pi_ref) - 1 - (80 + log pi_ref),
    # inside float32 (e^80 = 5.5e34).
    near = [q - 80.0 for q in reference]
    [result] = client.kl([(PROMPT, COMPLETION, near)], estimator="k3").results
    want = [math.exp(q - p) - 1 - (q - p) for q, p in zip(reference, near)]
    assert list(result.kl) == pytest.approx(want, rel=1e-5) and math.isfinite(result.kl_sum)
    # At -100, more than 88.7 nats under every reference log-prob here, e^-d is past float32's 3.4e38
    # (e^88.7; it came back as kl=inf): refused, naming the token.
    assert all(q > -100 + 88.8 for q in reference)
    far = [reference[0] - 1.0, -100.0, -1.0, -1.0]
    expect_error(lambda: client.kl([(PROMPT, COMPLETION, near), (PROMPT, COMPLETION, far)], estimator="k3"), INVALID,
                 "inputs[1].policy_logprobs[1]: is -100.0", "k3 estimate", "beyond the float range")


def test_unspecified_estimator_is_k1(client):
    request = reference_pb2.KLRequest(
        inputs=[reference_pb2.KLInput(
            sequence=reference_pb2.TokenSequence(prompt_token_ids=PROMPT, completion_token_ids=COMPLETION[:1]),
            policy_logprobs=[-1.0],
        )]
    )
    response = client.reference.KL(request)
    assert response.estimator == reference_pb2.KL_ESTIMATOR_K1
    assert response.results[0].kl[0] == pytest.approx(-1.0 - response.results[0].reference_logprobs[0], abs=1e-6)


# -- tokenizer identity -----------------------------------------------------


def test_fingerprints_agree_and_a_mismatched_pair_is_refused(server, client, policy, tmp_path_factory):
    info = client.info()
    assert info.kind == "reference" and info.active and info.vocab_size == 512
    assert info.tokenizer_fingerprint == policy.info().tokenizer_fingerprint
    assert client.pair_with(policy.info()) == info.tokenizer_fingerprint

    other_dir = other_tokenizer_policy(tmp_path_factory.mktemp("other") / "policy")
    settings = PolicySettings(model_dir=str(other_dir), port=0)
    with BackgroundServer(lambda: create_policy_server(settings)) as running, PolicyClient(running.target) as other:
        with ReferenceClient(server.target) as fresh:
            with pytest.raises(TokenizerMismatch, match="use different tokenizers") as err:
                fresh.pair_with(other.info())
            assert "Serve a reference with the policy's tokenizer" in str(err.value)
            assert fresh.tokenizer_fingerprint == ""
        generated = other.generate(["Hello"], max_new_tokens=4, temperature=1.0)
    # Without the client-side check the server still refuses the foreign fingerprint.
    request = reference_pb2.LogProbsRequest(
        sequences=[reference_pb2.TokenSequence(prompt_token_ids=PROMPT, completion_token_ids=COMPLETION)],
        tokenizer_fingerprint=generated.tokenizer_fingerprint,
    )
    expect_error(lambda: client.reference.LogProbs(request), grpc.StatusCode.FAILED_PRECONDITION,
                 "tokenizer_fingerprint", "does not match the reference model's")
    kl_request = reference_pb2.KLRequest(
        inputs=[reference_pb2.KLInput(sequence=request.sequences[0], policy_logprobs=[-1.0] * 4)],
        tokenizer_fingerprint="0" * 64,
    )
    expect_error(lambda: client.reference.KL(kl_request), grpc.StatusCode.FAILED_PRECONDITION, "tokenizer_fingerprint")


def test_pairing_check_needs_fingerprints():
    from arbiter.v1 import common_pb2

    with pytest.raises(TokenizerMismatch, match="policy model 'p' reports no tokenizer fingerprint"):
        check_tokenizer_pair(common_pb2.ModelInfo(name="p"), common_pb2.ModelInfo(name="r", tokenizer_fingerprint="a"))


# -- bad input --------------------------------------------------------------


def seq(prompt, completion):
    return reference_pb2.TokenSequence(prompt_token_ids=prompt, completion_token_ids=completion)


@pytest.mark.parametrize(
    "sequences,field,hint",
    [
        ([], "sequences", "is empty"),
        ([seq(PROMPT, COMPLETION), seq(PROMPT, COMPLETION), seq(PROMPT, [])], "sequences[2].completion_token_ids",
         "is empty"),
        ([seq([], COMPLETION)], "sequences[0].prompt_token_ids", "needs context"),
        ([seq(PROMPT, COMPLETION), seq(PROMPT, [5, 512])], "sequences[1].completion_token_ids[1]",
         "token id 512 is outside the vocabulary [0, 512)"),
        ([seq([-1], COMPLETION)], "sequences[0].prompt_token_ids[0]", "token id -1"),
        ([seq(PROMPT, [7] * 254)], "sequences[0]", "257 tokens (prompt + completion), over the model's max of 256"),
    ],
)
def test_bad_logprobs_input(client, sequences, field, hint):
    details = expect_error(
        lambda: client.reference.LogProbs(reference_pb2.LogProbsRequest(sequences=sequences)), INVALID, hint
    )
    assert details.startswith(field + ":")


def test_bad_kl_input(client):
    def kl(items, **kw):
        return lambda: client.kl(items, **kw)

    ok = (PROMPT, COMPLETION, [-1.0] * 4)
    details = expect_error(kl([ok, (PROMPT, COMPLETION, [-1.0] * 3)]), INVALID, "has 3 values for 4 completion tokens")
    assert details.startswith("inputs[1].policy_logprobs:")
    expect_error(kl([(PROMPT, COMPLETION, [-1.0, float("nan"), -1.0, -1.0])]), INVALID, "inputs[0].policy_logprobs[1]",
                 "finite and <= 0")
    expect_error(kl([(PROMPT, COMPLETION, [-1.0, -1.0, 0.5, -1.0])]), INVALID, "inputs[0].policy_logprobs[2]")
    expect_error(kl([ok, (PROMPT, [], [])]), INVALID, "inputs[1].sequence.completion_token_ids: is empty")
    expect_error(kl([]), INVALID, "inputs: is empty")
    bad_estimator = reference_pb2.KLRequest(inputs=[reference_pb2.KLInput(sequence=seq(PROMPT, [1]),
                                                                          policy_logprobs=[-1.0])], estimator=7)
    expect_error(lambda: client.reference.KL(bad_estimator), INVALID, "estimator: unknown value 7")


def test_limits_and_unknown_versions(client):
    too_many = [(PROMPT, COMPLETION)] * 257
    expect_error(lambda: client.logprobs(too_many), grpc.StatusCode.RESOURCE_EXHAUSTED, "257 sequences", "limit of 256")
    expect_error(lambda: client.logprobs([(PROMPT, COMPLETION)], model_version="nope"), grpc.StatusCode.NOT_FOUND,
                 "'nope' is not loaded")


def test_requests_over_the_request_limit_are_refused_before_they_are_parsed(client):
    # Parsing holds the event loop (health checks included): gRPC refuses a
    # request over max_request_bytes (16 MiB) before it is parsed.
    huge = reference_pb2.LogProbsRequest(sequences=[seq(PROMPT, COMPLETION)], model_version="x" * 16 * MiB)
    expect_error(lambda: client.reference.LogProbs(huge), grpc.StatusCode.RESOURCE_EXHAUSTED,
                 f"larger than max ({huge.ByteSize()} vs. {16 * MiB})")


def test_lengths_are_checked_before_ids_are_copied(client):
    # 20 million ids took 1.6 s of the event loop and 3 GB to copy before their length was checked.
    # Now lengths are read as sent, before the engine sees the request: an over-long sequence is
    # refused even ahead of a wrong fingerprint, which the engine checks first.
    long = reference_pb2.LogProbsRequest(sequences=[seq(PROMPT, COMPLETION), seq([300] * 300, [1])],
                                         tokenizer_fingerprint="0" * 64)
    expect_error(lambda: client.reference.LogProbs(long), INVALID,
                 "sequences[1]: is 301 tokens (prompt + completion), over the model's max of 256")
    # KL: one log-prob per completion token, counted before they are copied.
    kl = reference_pb2.KLRequest(inputs=[reference_pb2.KLInput(sequence=seq(PROMPT, COMPLETION),
                                                               policy_logprobs=[-1.0] * 100_000)],
                                 tokenizer_fingerprint="0" * 64)
    expect_error(lambda: client.reference.KL(kl), INVALID,
                 "inputs[0].policy_logprobs: has 100000 values for 4 completion tokens")


# -- versions and operations ------------------------------------------------


def test_reference_versions_swap_through_model_service(client, policy_dir, tmp_path):
    from arbiter.v1 import common_pb2

    models = client.models
    v1 = perturbed(policy_dir, tmp_path / "v1", version="ref-v1")
    loaded = models.LoadModelVersion(common_pb2.LoadModelVersionRequest(path=str(v1), activate=False))
    assert loaded.info.version == "ref-v1" and not loaded.info.active
    base = client.logprobs([(PROMPT, COMPLETION)])
    other = client.logprobs([(PROMPT, COMPLETION)], model_version="ref-v1")
    assert base.model_version == "v0" and other.model_version == "ref-v1"
    assert list(other.results[0].logprobs) != pytest.approx(list(base.results[0].logprobs), abs=1e-3)

    adapter = lora_adapter(policy_dir, tmp_path / "lora")
    models.LoadModelVersion(common_pb2.LoadModelVersionRequest(path=str(adapter), version="ref-lora", activate=True))
    assert client.info().version == "ref-lora"
    assert client.logprobs([(PROMPT, COMPLETION)]).model_version == "ref-lora"
    previous = models.ActivateModelVersion(common_pb2.ActivateModelVersionRequest(version="v0")).previous_version
    assert previous == "ref-lora"
    for version in ("ref-v1", "ref-lora"):
        models.UnloadModelVersion(common_pb2.UnloadModelVersionRequest(version=version))

    broken = nan_weights(policy_dir, tmp_path / "nan")
    expect_error(lambda: models.LoadModelVersion(common_pb2.LoadModelVersionRequest(path=str(broken), version="x")),
                 grpc.StatusCode.FAILED_PRECONDITION, "non-finite logits")
    expect_error(lambda: models.LoadModelVersion(common_pb2.LoadModelVersionRequest(path=str(tmp_path / "none"))),
                 grpc.StatusCode.FAILED_PRECONDITION, "does not exist")
    assert client.info().version == "v0"
    assert [v.version for v in models.ListModelVersions(common_pb2.ListModelVersionsRequest()).versions] == ["v0"]


def test_health_and_metrics(server, client):
    health = health_pb2_grpc.HealthStub(client.channel)
    status = health.Check(health_pb2.HealthCheckRequest(service="arbiter.v1.ReferenceService")).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    client.logprobs([(PROMPT, COMPLETION)])
    text = metrics_text(server)
    assert 'arbiter_requests_total{code="OK",method="LogProbs",service="reference"}' in text
    assert "arbiter_reference_scored_tokens_total" in text
