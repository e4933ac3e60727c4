"""Compiled forward passes (``--compile``, ``arbiter.backends.compiled``):
the eager backend's numbers (the eager forward is checked against hand-derived
values elsewhere), every graph built before a version serves, a later version
of the same architecture reusing them, a compiler failure failing the load
with the serving version untouched, and the option refused where it cannot
apply."""

from __future__ import annotations

import gc
import weakref

import grpc
import pytest
from helpers import Traffic, expect_error
from reward_variants import PAIRS, eager_scores, score, server, stubs  # noqa: F401 (fixtures)
from torch._dynamo.utils import counters
from torch._inductor.cpp_builder import cpp_compiler_search

from arbiter.backends import BackendConfig, open_backends
from arbiter.config import ConfigError
from arbiter.reference.backend import REFERENCE
from arbiter.reference.model import ReferenceModel, TokenSequence
from arbiter.reward.backend import REWARD
from arbiter.reward.ensemble import stack_refusal
from arbiter.reward.model import RewardModel
from arbiter.tiny import TinyConfig, make_reward
from arbiter.types import RewardInput, Truncation
from arbiter.v1 import common_pb2, reward_pb2
from services.policy.settings import PolicySettings

COMPILED = BackendConfig(compile=True)
# The backend of the reward service the fixtures start (reward_variants).
BACKEND = COMPILED
# Fused kernels may sum in another order than eager's: float32 rounding, no more.
ROUNDING = 1e-5


def graphs_built() -> int:
    return counters["stats"]["unique_graphs"]


def test_the_compiled_service_scores_as_the_eager_forward(server, tiny_models, stubs):
    stub, models_stub = stubs
    assert score(stub) == pytest.approx(eager_scores(tiny_models["reward"]), abs=ROUNDING)
    assert score(stub, PAIRS[:1]) == pytest.approx(eager_scores(tiny_models["reward"], PAIRS[:1]), abs=ROUNDING)
    info = models_stub.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=10).info
    assert info.compiled and info.backend == "torch" and not info.model_process


def test_serving_builds_no_graph_the_warm_up_did_not(server, tiny_models):
    """A graph built while serving would stall its batch for seconds: the
    load's warm-up reaches every shape specialization, so batches of any
    size and length (one row, one token, padded or not) only run graphs."""
    compiled = server.engine.models.get("").model
    eager = RewardModel.open(tiny_models["reward"])
    built = graphs_built()
    try:
        for batch in ([[5]], [[5, 6, 7]], [[5, 6, 7], [8]], [[9] * 40] * 7, [[1]] * 3, [[2] * 200, [3] * 17]):
            assert compiled.forward(batch) == pytest.approx(eager.forward(batch), abs=ROUNDING)
    finally:
        eager.release()
    assert graphs_built() == built


def test_a_new_version_of_the_architecture_reuses_the_graphs(tmp_path, server, stubs):
    stub, models_stub = stubs
    candidate = make_reward(tmp_path / "rm-v1", TinyConfig(seed=7), calibrate=False)
    built = graphs_built()
    models_stub.LoadModelVersion(common_pb2.LoadModelVersionRequest(path=str(candidate), version="v1",
                                                                    activate=False), timeout=300)
    # Its own weights (another seed: other scores), the first version's graphs.
    assert score(stub, version="v1") == pytest.approx(eager_scores(candidate), abs=ROUNDING)
    assert score(stub, version="v1") != pytest.approx(score(stub), abs=1e-3)
    assert graphs_built() == built
    members = [server.engine.models.get(version).model for version in ("v0", "v1")]
    assert "runs compiled (--compile)" in stack_refusal(members)
    models_stub.UnloadModelVersion(common_pb2.UnloadModelVersionRequest(version="v1"), timeout=30)


def test_a_released_compiled_version_leaves_nothing_holding_its_weights(tmp_path, server):
    """The graphs outlive every version (the next one reuses them): they must
    not keep a released version's weights alive, or each trainer publish
    would leak a model's worth of memory."""
    backends = open_backends(COMPILED, REWARD)
    weights = []
    for seed in (3, 4):
        model = RewardModel.open(make_reward(tmp_path / f"rm-{seed}", TinyConfig(seed=seed), calibrate=False),
                                 backends)
        model.forward([[5, 6], [7]])
        weights.append(weakref.ref(next(model.backend.model.parameters())))
        model.release()
        del model
        gc.collect()
        assert [ref() for ref in weights] == [None] * len(weights)


def test_a_version_that_fails_to_compile_fails_its_load_and_the_serving_one_stays(tmp_path, server, stubs,
                                                                                  monkeypatch):
    stub, models_stub = stubs
    before = score(stub)
    # A new architecture needs new graphs, and inductor builds them with the
    # C++ compiler it finds on PATH (torch's config is per thread, so PATH is
    # what reaches the service's loading thread); with none, the load fails.
    other = make_reward(tmp_path / "rm-1-layer", TinyConfig(n_layer=1), calibrate=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    cpp_compiler_search.cache_clear()
    try:
        expect_error(
            lambda: models_stub.LoadModelVersion(common_pb2.LoadModelVersionRequest(
                path=str(other), version="v2", activate=True), timeout=300),
            grpc.StatusCode.FAILED_PRECONDITION, "compile: torch.compile could not compile the reward model",
            "No working C++ compiler", "serve it without --compile")
    finally:
        monkeypatch.undo()
        cpp_compiler_search.cache_clear()
    assert score(stub) == before
    info = models_stub.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=10).info
    assert info.version == "v0"


def test_reference_log_probs_compiled_equal_eager(tiny_models):
    path = tiny_models["policy"]
    sequences = [TokenSequence((1, 5, 9), (12, 7)), TokenSequence((3,), (4, 4, 8, 2)), TokenSequence((6,), (2,))]
    eager = ReferenceModel.load(path)
    compiled = ReferenceModel.load(path, backends=open_backends(COMPILED, REFERENCE))
    try:
        built = graphs_built()
        for batch in (sequences, sequences[:1], sequences[2:], [TokenSequence((1,) * 30, (2,) * 20)] * 5):
            got = compiled.logprobs(batch)
            assert got == [pytest.approx(x, abs=ROUNDING) for x in eager.logprobs(batch)]
        assert graphs_built() == built
        assert compiled.info.extra["compiled"] == "true"
    finally:
        eager.release()
        compiled.release()


def test_a_model_process_compiles_its_forward_too(tiny_models):
    in_a_child = RewardModel.open(tiny_models["reward"], open_backends(
        BackendConfig(compile=True, model_process=True), REWARD))
    try:
        encoded = in_a_child.encode([RewardInput(p, r) for p, r in PAIRS], Truncation.LEFT)
        assert in_a_child.forward([e.token_ids for e in encoded]) == pytest.approx(
            eager_scores(tiny_models["reward"]), abs=ROUNDING)
        assert in_a_child.info.extra["compiled"] == "true" and in_a_child.info.extra["model_process"] == "true"
    finally:
        in_a_child.release()


def test_compile_is_refused_where_it_cannot_apply(tiny_models):
    with pytest.raises(ConfigError, match="compile.*applies to the torch backend"):
        BackendConfig(kind="triton", triton_url="127.0.0.1:8001", triton_model="rm", compile=True)
    with pytest.raises(ConfigError, match="compile.*reward and reference services"):
        PolicySettings(model_dir=str(tiny_models["policy"]), backend=COMPILED)


def test_a_new_architecture_compiles_beside_traffic_and_swaps_in_with_no_failed_request(tmp_path, server, stubs):
    """The new version compiles on the loading thread while the serving one
    answers on the model thread (both through dynamo); every request is
    answered, each by one version with that version's score."""
    stub, models_stub = stubs
    other = make_reward(tmp_path / "rm-3-layers", TinyConfig(n_layer=3, seed=5), calibrate=False)
    serving = models_stub.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=10).info.version
    expected = {serving: eager_scores(server.engine.models.get(serving).model.info.source_path, PAIRS[:1])[0],
                "v3": eager_scores(other, PAIRS[:1])[0]}
    wrong = []

    def call() -> str:
        response = stub.Score(reward_pb2.ScoreRequest(
            inputs=[reward_pb2.RewardInput(text=reward_pb2.TextPair(prompt=PAIRS[0][0], response=PAIRS[0][1]))]),
            timeout=60)
        if abs(response.results[0].score - expected[response.model_version]) > ROUNDING:
            wrong.append(response)
        return response.model_version

    built = graphs_built()
    with Traffic(call, clients=2) as traffic:
        traffic.wait_for(serving)
        models_stub.LoadModelVersion(common_pb2.LoadModelVersionRequest(path=str(other), version="v3",
                                                                        activate=True), timeout=300)
        traffic.wait_for("v3")
    assert traffic.failures == [] and wrong == []
    assert graphs_built() > built  # it did compile: a new architecture's graphs
