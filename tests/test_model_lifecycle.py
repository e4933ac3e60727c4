"""``arbiter.v1.ModelService`` behaves the same on every model server: the
reward, reference and policy services in-process, and the reward and
reference services with their forward passes in a real Triton server. One
kernel (``arbiter.kernel``) implements it; these tests hold every kind and
backend to the same lifecycle: load (inactive or active), activate, unload,
refusals that change nothing, eviction past ``max_loaded_versions``, the
``arbiter_model_active`` metric, and swaps under load with zero failed
requests."""

import shutil
from dataclasses import dataclass

import grpc
import pytest

from arbiter.backends import BackendConfig
from arbiter.backends.triton import TritonModel
from arbiter.backends.triton_export import ExportOptions, export
from arbiter.v1 import common_pb2, common_pb2_grpc, policy_pb2, policy_pb2_grpc
from arbiter.v1 import reference_pb2, reference_pb2_grpc, reward_pb2, reward_pb2_grpc
from helpers import BackgroundServer, Traffic, expect_error, metrics_text

CASES = [
    ("reward", "torch"), ("reference", "torch"), ("policy", "torch"), ("reward", "triton"), ("reference", "triton"),
]
IN_PROCESS = [case for case in CASES if case[1] == "torch"]


@dataclass
class Kind:
    name: str
    create_server: object
    settings: type
    # (channel) -> a callable making the kind's main request, returning the version that answered
    caller: object
    source: str  # which tiny model a version of this kind is


def _score(channel):
    stub = reward_pb2_grpc.RewardServiceStub(channel)
    request = reward_pb2.ScoreRequest(inputs=[
        reward_pb2.RewardInput(text=reward_pb2.TextPair(prompt="How was it?", response=" Wonderful!"))])
    return lambda: stub.Score(request, timeout=30).model_version


def _logprobs(channel):
    stub = reference_pb2_grpc.ReferenceServiceStub(channel)
    request = reference_pb2.LogProbsRequest(sequences=[
        reference_pb2.TokenSequence(prompt_token_ids=[5, 6, 7], completion_token_ids=[8, 9])])
    return lambda: stub.LogProbs(request, timeout=30).model_version


def _generate(channel):
    stub = policy_pb2_grpc.PolicyServiceStub(channel)
    request = policy_pb2.GenerateRequest(
        prompts=[policy_pb2.PromptInput(text="Hello")], sampling=policy_pb2.SamplingParams(max_new_tokens=3, seed=1))
    return lambda: stub.Generate(request, timeout=30).policy_version


def _kind(name: str) -> Kind:
    if name == "reward":
        from services.reward.server import create_server
        from services.reward.settings import RewardSettings

        return Kind(name, create_server, RewardSettings, _score, "reward")
    if name == "reference":
        from services.reference.server import create_server
        from services.reference.settings import ReferenceSettings

        return Kind(name, create_server, ReferenceSettings, _logprobs, "policy")
    from services.policy.server import create_server
    from services.policy.settings import PolicySettings

    return Kind(name, create_server, PolicySettings, _generate, "policy")


@dataclass
class Served:
    kind: Kind
    backend: str
    server: BackgroundServer
    models: common_pb2_grpc.ModelServiceStub
    call: object
    # Paths of loadable versions beyond the first (three of them).
    paths: list[str]
    triton: TritonModel | None

    def load(self, path: str, version: str, activate: bool = False):
        return self.models.LoadModelVersion(
            common_pb2.LoadModelVersionRequest(path=path, version=version, activate=activate), timeout=300)

    def versions(self) -> list[tuple[str, bool]]:
        listed = self.models.ListModelVersions(common_pb2.ListModelVersionsRequest(), timeout=10).versions
        return [(v.version, v.active) for v in listed]

    def metric_lines(self) -> list[str]:
        return sorted(line for line in metrics_text(self.server).splitlines()
                      if line.startswith("arbiter_model_active{"))


@pytest.fixture(params=CASES, ids=[f"{k}-{b}" for k, b in CASES])
def served(request, tiny_models, tmp_path, model_roots):
    name, backend = request.param
    kind = _kind(name)
    extra = {}
    triton = None
    if backend == "triton":
        triton_server = request.getfixturevalue("triton_server")
        repo = request.getfixturevalue("triton_repo")
        model = f"life-{name}-{request.node.name.split('[')[0][-20:].strip('_')}"
        shutil.rmtree(repo / model, ignore_errors=True)
        paths = [str(export(tiny_models[kind.source], name, repo, ExportOptions(name=model, torch_threads=1)))
                 for _ in range(4)]
        extra["backend"] = BackendConfig(kind="triton", triton_url=triton_server.url, triton_model=model,
                                         triton_retry_s=2.0)
        triton = TritonModel(triton_server.url, model)
    else:
        paths = [str(tiny_models[kind.source])] * 4
    settings = kind.settings(model_dir=paths[0], model_version="v0", port=0, metrics_port=0, max_loaded_versions=3,
                             model_roots=model_roots, **extra)
    server = BackgroundServer(lambda: kind.create_server(settings))
    channel = grpc.insecure_channel(server.target)
    try:
        yield Served(kind, backend, server, common_pb2_grpc.ModelServiceStub(channel), kind.caller(channel),
                     paths[1:], triton)
    finally:
        channel.close()
        server.stop(grace=5)
        if triton is not None:
            # The service leaves its versions in Triton when it stops (its
            # replicas may still use them); this test's model goes.
            import tritonclient.grpc as grpcclient

            with grpcclient.InferenceServerClient(triton.url) as client:
                client.unload_model(triton.name)
            triton.close()



def test_load_activate_unload(served):
    assert served.versions() == [("v0", True)]
    loaded = served.load(served.paths[0], "v1")
    assert (loaded.info.kind, loaded.info.version, loaded.info.active) == (served.kind.name, "v1", False)
    assert loaded.info.backend == served.backend
    assert served.versions() == [("v0", True), ("v1", False)]
    assert served.call() == "v0", "an inactive version must not serve by default"
    activated = served.models.ActivateModelVersion(common_pb2.ActivateModelVersionRequest(version="v1"), timeout=10)
    assert (activated.info.version, activated.info.active, activated.previous_version) == ("v1", True, "v0")
    assert served.call() == "v1"
    assert served.metric_lines() == [
        f'arbiter_model_active{{model_version="v0",service="{served.kind.name}"}} 0.0',
        f'arbiter_model_active{{model_version="v1",service="{served.kind.name}"}} 1.0',
    ]
    served.models.UnloadModelVersion(common_pb2.UnloadModelVersionRequest(version="v0"), timeout=300)
    assert served.versions() == [("v1", True)]
    assert served.metric_lines() == [f'arbiter_model_active{{model_version="v1",service="{served.kind.name}"}} 1.0']
    if served.triton is not None:
        assert served.triton.ready_versions() == {2}, "Triton version 1 should be unloaded with Arbiter's v0"


def test_refusals_change_nothing(served, tmp_path):
    models = served.models
    expect_error(lambda: served.load(served.paths[0], "v0"), grpc.StatusCode.FAILED_PRECONDITION,
                 "'v0' is already loaded")
    expect_error(lambda: served.load(str(tmp_path / "missing"), "v9"), grpc.StatusCode.FAILED_PRECONDITION,
                 "missing")
    expect_error(lambda: served.load("", "v9"), grpc.StatusCode.INVALID_ARGUMENT, "path")
    expect_error(lambda: models.ActivateModelVersion(common_pb2.ActivateModelVersionRequest(version="nope"),
                                                     timeout=10), grpc.StatusCode.NOT_FOUND, "'nope' is not loaded")
    expect_error(lambda: models.UnloadModelVersion(common_pb2.UnloadModelVersionRequest(version="v0"), timeout=10),
                 grpc.StatusCode.FAILED_PRECONDITION, "'v0' is active")
    expect_error(lambda: models.GetModelInfo(common_pb2.GetModelInfoRequest(model_version="nope"), timeout=10),
                 grpc.StatusCode.NOT_FOUND, "nope")
    assert served.versions() == [("v0", True)]
    assert served.call() == "v0"
    if served.triton is not None:
        assert served.triton.ready_versions() == {1}


def test_loading_past_the_limit_evicts_the_oldest_inactive_version(served):
    """max_loaded_versions=3: a fourth load unloads the oldest inactive
    version (never the active one), exactly as UnloadModelVersion would."""
    for label, path in zip(("v1", "v2"), served.paths):
        served.load(path, label)
    served.models.ActivateModelVersion(common_pb2.ActivateModelVersionRequest(version="v2"), timeout=10)
    served.load(served.paths[2], "v3")
    # v0 (oldest, inactive) goes; v2 stays active; v3 stays, just loaded.
    assert served.versions() == [("v1", False), ("v2", True), ("v3", False)]
    lines = served.metric_lines()
    assert not any('model_version="v0"' in line for line in lines), lines
    if served.triton is not None:
        assert served.triton.ready_versions() == {2, 3, 4}
    assert served.call() == "v2"


# In-process backends only: Triton's swap under load is
# test_triton.py and test_triton_reference.py::test_swap_versions_with_zero_failed_requests,
# the same swap of Triton version 2 in under traffic with more checks (each
# answer is its version's; Triton holds {1, 2}, then {2}). Each change of a
# Triton model's versions re-initialises them (seconds each on 2 cores), so
# that swap runs once per kind, not twice.
@pytest.mark.parametrize("served", IN_PROCESS, ids=[f"{k}-{b}" for k, b in IN_PROCESS], indirect=True)
def test_swap_under_load_fails_no_request(served):
    with Traffic(served.call) as traffic:
        traffic.wait_for("v0")
        served.load(served.paths[0], "v1", activate=True)
        traffic.wait_for("v1")
        served.models.UnloadModelVersion(common_pb2.UnloadModelVersionRequest(version="v0"), timeout=300)
        traffic.wait_for("v1")
    assert traffic.failures == []
    assert set(traffic.seen) == {"v0", "v1"}
