"""The policy server: ``create_server(settings)`` for tests (port 0 works),
``serve(settings)`` for deployment, ``add_arguments`` / ``settings_from_args``
for the CLI, all from the common model-server factory (``SPEC`` says what is
particular to this service)."""

from __future__ import annotations

import argparse
import asyncio

from arbiter.config import ConfigError
from arbiter.policy.engine import PolicyEngine
from arbiter.stream import topics
from arbiter.stream.settings import add_kafka_arguments, kafka_settings_from_args
from arbiter.v1 import policy_pb2, policy_pb2_grpc
from services.common import model_server
from services.common.model_server import ModelServerSpec
from services.common.readiness import Attached
from services.policy.metrics import PolicyMetrics
from services.policy.servicer import PolicyServicer
from services.policy.settings import PolicySettings


def _register(server, engine: PolicyEngine, metrics: PolicyMetrics, settings: PolicySettings):
    policy_pb2_grpc.add_PolicyServiceServicer_to_server(PolicyServicer(engine, metrics), server)
    if not settings.follow_updates:
        return []
    from services.policy.follower import PolicyUpdateFollower

    follower = PolicyUpdateFollower(settings.kafka, settings.replica_id, engine, settings.allowed_model_roots(),
                                    asyncio.get_running_loop(), metrics,
                                    weights_cache_dir=settings.weights_cache_dir or None,
                                    weights_uri_prefixes=settings.weights_uri_prefixes)
    follower.start()
    # Closed before the engine: a load in flight finishes first. Not ready
    # (health NOT_SERVING) until the follower has caught up with the topic: a
    # (re)started replica would otherwise serve its --model weights while a
    # newer version is published, and the worker's rollouts would be stale.
    topic = settings.kafka.topic(topics.POLICY_UPDATES)
    return [Attached(follower.stop, follower.caught_up.is_set, f"catching up with {topic}")]


def _kafka_from_args(args: argparse.Namespace) -> dict:
    if not args.follow_updates:
        return {"kafka": None}
    try:
        return {"kafka": kafka_settings_from_args(args)}
    except ConfigError as err:
        raise err.under("kafka") from None


def _banner(settings: PolicySettings) -> str:
    if not settings.follow_updates:
        return ""
    return f", following {settings.kafka.topic(topics.POLICY_UPDATES)} as replica {settings.replica_id!r}"


SPEC = ModelServerSpec(
    kind="policy",
    service_name=policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name,
    settings=PolicySettings,
    metrics=lambda registry, settings: PolicyMetrics(registry),
    engine=lambda settings, executor, loader, metrics: PolicyEngine(settings.engine_config(), executor, loader, metrics),
    register=_register,
    extra_settings=_kafka_from_args,
    add_extra_arguments=add_kafka_arguments,
    banner=_banner,
)

create_server, serve, add_arguments, settings_from_args = model_server.entry_points(SPEC)
