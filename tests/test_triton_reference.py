"""The reference service with its forward passes in a real Triton Inference
Server (the session's ``triton_server``, shared with test_triton.py): log-probs
and KL equal the in-process backend serving the same exported directory,
version swaps under load fail nothing, Triton's failures are clear statuses."""

import asyncio
import concurrent.futures

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from lm_fixtures import lora_adapter, perturbed

from arbiter.backends import BackendConfig
from arbiter.batching import BatchingConfig
from arbiter.backends.triton_export import ExportError, ExportOptions, export
from cli.main import main, parse_args
from arbiter.errors import BackendError, BackendUnavailable
from arbiter.reference.engine import ReferenceEngine
from arbiter.reference.model import ReferenceModel, TokenSequence
from arbiter.v1 import common_pb2, reference_pb2, reference_pb2_grpc
from helpers import BackgroundServer, Traffic, expect_error, TritonServiceCase, wait_until
from services.common.errors import status_for
from arbiter.config import ConfigError
from services.reference.server import create_server, settings_from_args
from services.reference.settings import ReferenceSettings

MODEL = "ref"
PROMPT = [280, 462, 406]
COMPLETION = [293, 427, 79, 12]
# Varied prompt and completion lengths, so rows pad differently in one batch.
SEQUENCES = [
    (PROMPT, COMPLETION),
    ([5], [6, 7, 8, 9, 10, 11, 12, 13]),
    (PROMPT + COMPLETION, [1]),
    ([3] * 40, list(range(20, 70))),
]


def seq(prompt, completion):
    return reference_pb2.TokenSequence(prompt_token_ids=prompt, completion_token_ids=completion)


def logprobs_request(sequences, **kw):
    return reference_pb2.LogProbsRequest(sequences=[seq(p, c) for p, c in sequences], **kw)




def in_process_logprobs(checkpoint, sequences):
    """float32, as the wire carries them."""
    model = ReferenceModel.load(checkpoint)
    values = model.logprobs([TokenSequence(tuple(p), tuple(c)) for p, c in sequences])
    return [np.asarray(v, dtype=np.float32).tolist() for v in values]


@pytest.fixture(scope="module")
def repo(tiny_models, triton_repo, tmp_path_factory):
    """REPO/ref/1 (the tiny policy, exported through the CLI) and REPO/ref/2 (a perturbed copy)."""
    assert main(["triton", "export", "--model", str(tiny_models["policy"]), "--kind", "reference",
                 "--out", str(triton_repo), "--name", MODEL, "--torch-threads", "1"]) == 0
    assert (triton_repo / MODEL / "1" / "model.py").is_file()
    second = perturbed(tiny_models["policy"], tmp_path_factory.mktemp("ref-v2") / "ref", version="ref-v2")
    assert export(second, "reference", triton_repo, ExportOptions(name=MODEL, torch_threads=1)) == (
        triton_repo / MODEL / "2"
    )
    return triton_repo


CASE = TritonServiceCase(MODEL, ReferenceSettings, create_server, reference_pb2_grpc.ReferenceServiceStub,
                         batching=BatchingConfig(max_queue_delay_ms=5.0), retry_s=2.0)
triton_settings = CASE.settings
triton, control, service, in_process, stub, models_stub, in_process_stub = CASE.fixtures()


# -- export and settings ---------------------------------------------------------------


def test_export_writes_a_reference_model(repo, tiny_models, tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    assert (repo / MODEL / "2" / "checkpoint" / "tokenizer.json").is_file()
    config = text_format.Parse((repo / MODEL / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert (config.name, config.backend, config.max_batch_size) == (MODEL, "python", 64)
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert [(g.count, g.kind) for g in config.instance_group] == [(1, model_config_pb2.ModelInstanceGroup.KIND_CPU)]
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("INPUT_IDS", model_config_pb2.TYPE_INT64, [-1]),
        ("PROMPT_LENGTHS", model_config_pb2.TYPE_INT64, [1]),
        ("COMPLETION_LENGTHS", model_config_pb2.TYPE_INT64, [1]),
    ]
    assert config.input[0].allow_ragged_batch
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("LOGPROBS", model_config_pb2.TYPE_FP32, [-1])
    ]
    assert config.parameters["arbiter_kind"].string_value == "reference"
    assert config.parameters["pad_token_id"].string_value == "1"

    with pytest.raises(ExportError, match=f"{MODEL} is a reference model; a reward model needs its own name"):
        export(tiny_models["reward"], "reward", repo, ExportOptions(name=MODEL))
    with pytest.raises(ExportError, match="is a LoRA adapter; Triton serves full checkpoints"):
        export(lora_adapter(tiny_models["policy"], tmp_path / "lora"), "reference", tmp_path)


def test_cli_flags_select_the_triton_backend(repo):
    path = str(repo / MODEL / "1")
    args = parse_args(
        ["serve", "reference", "--model", path, "--backend", "triton", "--triton-url", "127.0.0.1:8001",
         "--triton-model", MODEL, "--triton-max-in-flight", "3"]
    )
    settings = settings_from_args(args)
    config = settings.engine_config()
    assert (config.backend.kind, config.backend.triton_url, config.backend.triton_model) == (
        "triton", "127.0.0.1:8001", MODEL
    )
    assert config.backend.triton_max_in_flight == 3
    # Triton's dynamic batcher waits; Arbiter does not wait twice.
    assert config.batching.max_queue_delay_s == 0.0
    assert ReferenceSettings(model_dir=path).engine_config().batching.max_queue_delay_s == 0.002
    with pytest.raises(ConfigError, match="triton_url=''"):
        BackendConfig(kind="triton", triton_model=MODEL)
    with pytest.raises(ConfigError, match="triton_model=''"):
        BackendConfig(kind="triton", triton_url="127.0.0.1:8001")
    with pytest.raises(ConfigError, match="backend='onnx'"):
        BackendConfig(kind="onnx")


# -- log-probs and KL through Triton -----------------------------------------------------


def test_logprobs_and_kl_equal_the_in_process_backend(stub, in_process_stub, models_stub, repo):
    through_triton = stub.LogProbs(logprobs_request(SEQUENCES), timeout=30)
    in_process = in_process_stub.LogProbs(logprobs_request(SEQUENCES), timeout=30)
    assert through_triton.model_version == in_process.model_version == "v0"
    assert through_triton.tokenizer_fingerprint == in_process.tokenizer_fingerprint
    for (_, completion), a, b in zip(SEQUENCES, through_triton.results, in_process.results, strict=True):
        assert len(a.logprobs) == len(completion)
        assert list(a.logprobs) == pytest.approx(list(b.logprobs), abs=1e-5)

    # KL: the same policy log-probs against either backend's reference.
    items = [
        reference_pb2.KLInput(
            sequence=seq(p, c), policy_logprobs=[lp - 0.25 * (k % 3) for k, lp in enumerate(r.logprobs)]
        )
        for (p, c), r in zip(SEQUENCES, in_process.results, strict=True)
    ]
    for estimator in (reference_pb2.KL_ESTIMATOR_K1, reference_pb2.KL_ESTIMATOR_K2, reference_pb2.KL_ESTIMATOR_K3):
        request = reference_pb2.KLRequest(inputs=items, estimator=estimator)
        a, b = stub.KL(request, timeout=30), in_process_stub.KL(request, timeout=30)
        assert a.estimator == b.estimator == estimator
        for x, y in zip(a.results, b.results, strict=True):
            assert list(x.kl) == pytest.approx(list(y.kl), abs=1e-5)
            assert x.kl_sum == pytest.approx(y.kl_sum, abs=1e-5)
            assert list(x.reference_logprobs) == pytest.approx(list(y.reference_logprobs), abs=1e-5)

    info = models_stub.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=10).info
    assert (info.kind, info.name, info.version, info.backend) == ("reference", "tiny-policy", "v0", "triton")
    assert (info.vocab_size, info.max_tokens) == (512, 256)
    assert info.tokenizer_fingerprint == through_triton.tokenizer_fingerprint
    assert info.source_path == str(repo / MODEL / "1")


def test_concurrent_requests_are_batched_and_exact(service, stub, repo):
    sequences = [([3 + i] * (1 + i % 4), list(range(10, 12 + 3 * i))) for i in range(12)]
    expected = in_process_logprobs(repo / MODEL / "1" / "checkpoint", sequences)
    batches = service.running.metrics.batch_size.labels("reference")
    before = sum(bucket.get() for bucket in batches._buckets)
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda s: stub.LogProbs(logprobs_request([s]), timeout=30), sequences))
    for response, want in zip(responses, expected, strict=True):
        assert list(response.results[0].logprobs) == pytest.approx(want, abs=1e-5)
    assert sum(bucket.get() for bucket in batches._buckets) - before < len(sequences), "requests were not batched"


def test_bad_input_is_refused_before_triton(stub):
    expect_error(lambda: stub.LogProbs(logprobs_request([(PROMPT, [5, 512])]), timeout=10),
                 grpc.StatusCode.INVALID_ARGUMENT, "sequences[0].completion_token_ids[1]",
                 "outside the vocabulary [0, 512)")
    expect_error(lambda: stub.LogProbs(logprobs_request([(PROMPT, [7] * 254)]), timeout=10),
                 grpc.StatusCode.INVALID_ARGUMENT, "257 tokens (prompt + completion), over the model's max of 256")


# -- versions through Triton's model control ---------------------------------------------


def test_swap_versions_with_zero_failed_requests(stub, models_stub, control, repo):
    """Load Triton version 2 beside 1, switch Arbiter's traffic, unload 1,
    while a client asks for log-probs continuously: no request fails."""
    pair = SEQUENCES[0]
    expected = {
        "v0": in_process_logprobs(repo / MODEL / "1" / "checkpoint", [pair])[0],
        "ref-v2": in_process_logprobs(repo / MODEL / "2" / "checkpoint", [pair])[0],
    }
    assert expected["v0"] != pytest.approx(expected["ref-v2"], abs=1e-3)
    request = logprobs_request([pair])
    wrong = []

    def ask():
        response = stub.LogProbs(request, timeout=30)
        if list(response.results[0].logprobs) != pytest.approx(expected[response.model_version], abs=1e-5):
            wrong.append(response)
        return response.model_version

    with Traffic(ask, clients=2) as traffic:
        # The label comes from the version's arbiter.json.
        assert CASE.swap_version_2_in(traffic, models_stub, control, repo) == "ref-v2"
    assert traffic.failures == []
    assert wrong == []
    versions = models_stub.ListModelVersions(common_pb2.ListModelVersionsRequest(), timeout=10).versions
    assert [(v.version, v.active, v.source_path) for v in versions] == [("ref-v2", True, str(repo / MODEL / "2"))]


def test_versions_triton_cannot_serve_are_refused(models_stub, control, repo, tiny_models):
    def load(path):
        return lambda: models_stub.LoadModelVersion(
            common_pb2.LoadModelVersionRequest(path=str(path), version="bad", activate=True), timeout=300
        )

    before = control.ready_versions()
    expect_error(
        load(tiny_models["policy"]), grpc.StatusCode.FAILED_PRECONDITION, "not a version directory", "REPO/NAME/N"
    )
    other = export(tiny_models["policy"], "reference", repo, ExportOptions(name="other-ref"))
    expect_error(load(other), grpc.StatusCode.FAILED_PRECONDITION, "version of Triton model 'other-ref'",
                 "--triton-model")
    assert control.ready_versions() == before
    assert models_stub.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=10).info.version == "ref-v2"


# -- errors from Triton -> clear statuses --------------------------------------------------


def test_a_version_missing_from_triton_is_unavailable_then_reloaded(repo, triton, control):
    """Unloaded behind Arbiter's back (as after a Triton restart): a request
    that cannot wait for the reload gets UNAVAILABLE saying so; the service
    reloads the version itself and serves again."""
    [version] = control.ready_versions()
    settings = triton_settings(repo, triton, version=version, retry_s=0.0)
    with BackgroundServer(lambda: create_server(settings)) as srv, grpc.insecure_channel(srv.target) as channel:
        impatient = reference_pb2_grpc.ReferenceServiceStub(channel)
        request = logprobs_request([SEQUENCES[1]])
        before = impatient.LogProbs(request, timeout=30).results[0].logprobs
        with grpcclient.InferenceServerClient(triton.url) as client:
            client.unload_model(MODEL)
        wait_until(lambda: control.ready_versions() == set(), 30, "the unload")
        expect_error(lambda: impatient.LogProbs(request, timeout=30), grpc.StatusCode.UNAVAILABLE,
                     f"model '{MODEL}' version {version} is being reloaded into Triton at {triton.url}", "retry")
        wait_until(lambda: control.ready_versions() == {version}, 60, "the reload")
        after = impatient.LogProbs(request, timeout=30).results[0].logprobs
    assert list(after) == list(before)


def test_triton_failures_map_to_clear_statuses(triton, control):
    [version] = control.ready_versions()
    ids = np.array([[5, 6, 7, 8]], dtype=np.int64)

    def inputs(prompt, completion):
        return {"INPUT_IDS": ids, "PROMPT_LENGTHS": np.array([[prompt]], dtype=np.int64),
                "COMPLETION_LENGTHS": np.array([[completion]], dtype=np.int64)}

    [row] = control.infer(version, inputs(1, 3), ["LOGPROBS"])["LOGPROBS"]
    assert row.shape == (3,) and np.all(row < 0)
    with pytest.raises(BackendError) as own_check:  # the model's own checks
        control.infer(version, inputs(0, 3), ["LOGPROBS"])
    assert status_for(own_check.value)[0] == grpc.StatusCode.INTERNAL
    assert "PROMPT_LENGTHS and COMPLETION_LENGTHS must be >= 1" in str(own_check.value)
    with pytest.raises(BackendError, match=r"must be <= 4 \(the width of INPUT_IDS\)"):
        control.infer(version, inputs(2, 3), ["LOGPROBS"])

    # Triton unreachable at load: UNAVAILABLE naming it, nothing loaded.
    unreachable = ReferenceSettings(model_dir="unused", backend=BackendConfig(
        kind="triton", triton_url="127.0.0.1:9", triton_model=MODEL, triton_retry_s=0.2))
    engine = ReferenceEngine(unreachable.engine_config(), None, None, None)
    with pytest.raises(BackendUnavailable) as down:
        engine.models.spec.load(str(triton.repository / MODEL / str(version)), None)
    assert status_for(down.value) == (grpc.StatusCode.UNAVAILABLE, str(down.value))
    assert "Triton at 127.0.0.1:9 is unavailable" in str(down.value)
    asyncio.run(engine.close())
