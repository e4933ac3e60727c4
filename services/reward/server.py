"""The reward server: ``create_server(settings)`` for tests (port 0 works),
``serve(settings)`` for deployment, ``add_arguments`` / ``settings_from_args``
for the CLI, all from the common model-server factory (``SPEC`` says what is
particular to this service)."""

from __future__ import annotations

import argparse
import os

from arbiter.config import ConfigError
from arbiter.reward.engine import RewardEngine
from arbiter.stream.settings import add_kafka_arguments, kafka_settings_from_args
from arbiter.v1 import reward_pb2, reward_pb2_grpc
from services.common import model_server
from services.common.model_server import ModelServerSpec
from services.reward.feedback import PreferenceFeedback
from services.reward.metrics import RewardMetrics
from services.reward.servicer import RewardServicer
from services.reward.settings import RewardSettings


def _register(server, engine: RewardEngine, metrics: RewardMetrics, settings: RewardSettings):
    feedback = PreferenceFeedback(settings.kafka)
    reward_pb2_grpc.add_RewardServiceServicer_to_server(
        RewardServicer(engine, metrics, settings.stream_max_in_flight, feedback, settings.stream_max_messages), server
    )
    return [feedback.close]


def _kafka_from_args(args: argparse.Namespace) -> dict:
    """For SubmitPreference: KafkaSettings when a broker is named (flag or
    ARBITER_KAFKA_BOOTSTRAP_SERVERS), else none (that RPC is then refused)."""
    if not (args.kafka_bootstrap_servers or os.environ.get("ARBITER_KAFKA_BOOTSTRAP_SERVERS")):
        return {"kafka": None}
    try:
        return {"kafka": kafka_settings_from_args(args)}
    except ConfigError as err:
        raise err.under("kafka") from None


SPEC = ModelServerSpec(
    kind="reward",
    service_name=reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name,
    settings=RewardSettings,
    metrics=lambda registry, settings: RewardMetrics(registry, settings.drift),
    engine=lambda settings, executor, loader, metrics: RewardEngine(settings.engine_config(), executor, loader, metrics),
    register=_register,
    extra_settings=_kafka_from_args,
    add_extra_arguments=add_kafka_arguments,
    prepare=lambda engine, settings: engine.prepare(),
    banner=lambda settings: "" if settings.reward_spec is None else f", reward spec {settings.reward_spec.name!r}",
)

create_server, serve, add_arguments, settings_from_args = model_server.entry_points(SPEC)
