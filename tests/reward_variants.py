"""The reward service run with another backend configuration (a model
process, a compiled forward): the service, stubs to it, and the eager
in-process scores its answers are held to, for the tests of each variant.
A test module sets ``BACKEND`` and imports the ``server`` and ``stubs``
fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from helpers import BackgroundServer

from arbiter.reward.model import RewardModel
from arbiter.types import RewardInput, Truncation
from arbiter.v1 import common_pb2_grpc, reward_pb2, reward_pb2_grpc
from services.reward.server import create_server
from services.reward.settings import RewardSettings

PAIRS = [("What is RLHF?", " Reinforcement learning from human feedback."), ("Say hi.", " Hi!"),
         ("2+2?", " 4"), ("Name a colour.", " Blue, like the sky on a clear day.")]


def eager_scores(model_dir, pairs=PAIRS) -> list[float]:
    """The in-process backend's scores (no model process, not compiled)."""
    model = RewardModel.open(model_dir)
    try:
        encoded = model.encode([RewardInput(p, r) for p, r in pairs], Truncation.LEFT)
        return model.forward([e.token_ids for e in encoded])
    finally:
        model.release()


@pytest.fixture(scope="module")
def server(request, tiny_models, model_roots) -> Iterator[BackgroundServer]:
    """The reward service with the test module's ``BACKEND``."""
    settings = RewardSettings(model_dir=str(tiny_models["reward"]), port=0, model_roots=model_roots,
                              backend=request.module.BACKEND)
    with BackgroundServer(lambda: create_server(settings)) as srv:
        yield srv


@pytest.fixture(scope="module")
def stubs(server):
    """(RewardService, ModelService) stubs on one channel to ``server``."""
    with grpc.insecure_channel(server.target) as channel:
        yield reward_pb2_grpc.RewardServiceStub(channel), common_pb2_grpc.ModelServiceStub(channel)


def score(stub, pairs=PAIRS, version: str = "") -> list[float]:
    request = reward_pb2.ScoreRequest(
        inputs=[reward_pb2.RewardInput(text=reward_pb2.TextPair(prompt=p, response=r)) for p, r in pairs],
        options=reward_pb2.ScoreOptions(model_version=version),
    )
    return [result.score for result in stub.Score(request, timeout=30).results]
