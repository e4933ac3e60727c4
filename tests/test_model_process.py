"""Forward passes in model processes (``--model-process``,
``arbiter.backends.model_process``): the numbers of the in-process backend,
a version's process started with its load and stopped with its unload, a
killed process failing only its batch, and the option refused where it
cannot apply."""

from __future__ import annotations

import os
import shutil
import signal
import threading

import grpc
import pytest
from helpers import BackgroundServer, expect_error, wait_until
from reward_variants import PAIRS, eager_scores, score, server, stubs  # noqa: F401 (fixtures)

from arbiter.backends import BackendConfig, open_backends
from arbiter.backends.model_process import ModelProcess
from arbiter.config import ConfigError
from arbiter.errors import BackendError, BackendTimeout, ModelLoadError
from arbiter.reference.backend import REFERENCE
from arbiter.reference.model import ReferenceModel, TokenSequence
from arbiter.reward.backend import REWARD
from arbiter.reward.model import RewardModel
from arbiter.tiny import TinyConfig, make_reward
from arbiter.types import RewardInput, Truncation
from arbiter.v1 import common_pb2
from services.policy.settings import PolicySettings

IN_A_CHILD = BackendConfig(model_process=True)
# The backend of the reward service the fixtures start (reward_variants).
BACKEND = IN_A_CHILD


def process_of(server: BackgroundServer, version: str = "") -> ModelProcess:
    return server.engine.models.get(version).model.backend.process


def test_the_service_scores_in_a_model_process_as_in_process(server, tiny_models, stubs):
    stub, models_stub = stubs
    process = process_of(server)
    assert process.pid != os.getpid() and process.alive()
    # Same weights, same forward on the same kind of CPU thread: the same floats.
    assert score(stub) == pytest.approx(eager_scores(tiny_models["reward"]), abs=1e-6)
    info = models_stub.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=10).info
    assert info.model_process and info.backend == "torch"


def test_a_killed_model_process_fails_its_batch_unavailable_and_the_next_batch_restarts_it(server, stubs):
    stub, _ = stubs
    process = process_of(server)
    killed = process.pid
    os.kill(killed, signal.SIGKILL)
    wait_until(lambda: not process.alive(), timeout_s=30, what="the killed model process to exit")
    expect_error(lambda: score(stub), grpc.StatusCode.UNAVAILABLE,
                 "model process", "was killed by signal 9 (SIGKILL) during this batch", "retry")
    assert len(score(stub)) == len(PAIRS)
    assert process.pid not in (None, killed) and process.alive()


def test_a_version_has_its_own_model_process_until_it_is_unloaded(tmp_path, server, stubs):
    stub, models_stub = stubs
    candidate = make_reward(tmp_path / "rm-v1", TinyConfig(seed=7), calibrate=False)
    models_stub.LoadModelVersion(common_pb2.LoadModelVersionRequest(path=str(candidate), version="v1",
                                                                    activate=False), timeout=120)
    process = process_of(server, "v1")
    assert process.alive() and process.pid != process_of(server).pid
    assert score(stub, version="v1") == pytest.approx(eager_scores(candidate), abs=1e-6)
    models_stub.UnloadModelVersion(common_pb2.UnloadModelVersionRequest(version="v1"), timeout=30)
    wait_until(lambda: not process.alive(), timeout_s=30, what="the unloaded version's model process to exit")
    assert len(score(stub)) == len(PAIRS)


def test_a_versions_batches_do_not_wait_for_another_versions_in_its_own_process(tmp_path, server, stubs):
    """Each model-process version relays its batches on a thread of its own,
    so one version's passes (an ensemble member, a shadow) run while another's
    are busy, rather than queueing behind them on the one model thread."""
    stub, models_stub = stubs
    candidate = make_reward(tmp_path / "rm-v2", TinyConfig(seed=11), calibrate=False)
    models_stub.LoadModelVersion(common_pb2.LoadModelVersionRequest(path=str(candidate), version="v2",
                                                                    activate=False), timeout=120)
    serving = server.engine.models.get("v0")
    assert serving.relay is not None and serving.relay is not server.engine.models.get("v2").relay
    entered, gate = threading.Event(), threading.Event()
    held = serving.relay.submit(lambda: (entered.set(), gate.wait(60)))
    try:
        assert entered.wait(30)
        assert score(stub, version="v2") == pytest.approx(eager_scores(candidate), abs=1e-6)
    finally:
        gate.set()
        held.result(timeout=30)
    assert len(score(stub)) == len(PAIRS)
    models_stub.UnloadModelVersion(common_pb2.UnloadModelVersionRequest(version="v2"), timeout=30)


def test_a_checkpoint_the_kind_refuses_is_refused_from_the_model_process(server, tiny_models, stubs):
    stub, models_stub = stubs
    serving = process_of(server)
    # The reward kind's own check runs in the child; its message crosses back whole.
    expect_error(
        lambda: models_stub.LoadModelVersion(common_pb2.LoadModelVersionRequest(path=str(tiny_models["policy"])),
                                             timeout=120),
        grpc.StatusCode.FAILED_PRECONDITION, "is a causal language model (GPT2LMHeadModel), not a reward model",
    )
    versions = models_stub.ListModelVersions(common_pb2.ListModelVersionsRequest(), timeout=10).versions
    assert [v.version for v in versions] == ["v0"]
    assert process_of(server) is serving and serving.alive()
    assert score(stub) == pytest.approx(eager_scores(tiny_models["reward"]), abs=1e-6)


def test_a_failing_forward_pass_is_a_backend_error_and_the_process_serves_on(tiny_models):
    model = RewardModel.open(tiny_models["reward"], open_backends(IN_A_CHILD, REWARD))
    try:
        process = model.backend.process
        with pytest.raises(BackendError, match="the model's forward pass failed: IndexError"):
            model.forward([[model.info.vocab_size + 10]])  # past the embedding table: the model raises
        assert process.alive()
        expected = eager_scores(tiny_models["reward"], PAIRS[:1])
        encoded = model.encode([RewardInput(*PAIRS[0])], Truncation.LEFT)
        assert model.forward([encoded[0].token_ids]) == pytest.approx(expected, abs=1e-6)
    finally:
        model.release()
    wait_until(lambda: not process.alive(), timeout_s=30, what="the released model process to exit")


def test_a_pass_that_hangs_is_killed_with_its_process_and_the_next_batch_gets_a_new_one(tiny_models):
    model = RewardModel.open(tiny_models["reward"], open_backends(
        BackendConfig(model_process=True, model_process_timeout_s=1.0), REWARD))
    try:
        process = model.backend.process
        encoded = model.encode([RewardInput(*PAIRS[0])], Truncation.LEFT)[0].token_ids
        hung = process.pid
        os.kill(hung, signal.SIGSTOP)  # a pass that never returns, as a deadlocked kernel's would
        with pytest.raises(BackendTimeout, match=r"did not finish this batch within 1s \(model_process_timeout_s\); "
                                                 r"it was stopped \(was killed by signal 9 \(SIGKILL\)\)"):
            model.forward([encoded])
        assert model.forward([encoded]) == pytest.approx(eager_scores(tiny_models["reward"], PAIRS[:1]),
                                                         abs=1e-6)
        assert process.pid != hung and process.alive()
    finally:
        model.release()


def test_reference_log_probs_from_a_model_process_equal_in_process(tiny_models):
    path = tiny_models["policy"]
    sequences = [TokenSequence((1, 5, 9), (12, 7)), TokenSequence((3,), (4, 4, 8, 2))]
    in_process = ReferenceModel.load(path)
    in_a_child = ReferenceModel.load(path, backends=open_backends(IN_A_CHILD, REFERENCE))
    try:
        expected = in_process.logprobs(sequences)
        got = in_a_child.logprobs(sequences)
        assert [len(x) for x in got] == [2, 4]
        assert got == [pytest.approx(x, abs=1e-6) for x in expected]
    finally:
        in_process.release()
        in_a_child.release()


def test_model_process_is_refused_where_it_cannot_apply(tiny_models):
    with pytest.raises(ConfigError, match="model_process.*applies to the torch backend"):
        BackendConfig(kind="triton", triton_url="127.0.0.1:8001", triton_model="rm", model_process=True)
    with pytest.raises(ConfigError, match="model_process_timeout_s.*must be > 0"):
        BackendConfig(model_process=True, model_process_timeout_s=0)
    with pytest.raises(ConfigError, match="model_process.*reward and reference services"):
        PolicySettings(model_dir=str(tiny_models["policy"]), backend=IN_A_CHILD)


def test_weights_the_model_process_cannot_load_fail_the_open_with_the_loaders_message(tmp_path, tiny_models):
    broken = tmp_path / "broken-rm"
    shutil.copytree(tiny_models["reward"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match="cannot load a sequence-classification model from"):
        RewardModel.open(broken, open_backends(IN_A_CHILD, REWARD))
