"""The policy server: ``create_server(settings)`` for tests (port 0 works),
``serve(settings)`` for deployment."""

from __future__ import annotations

import argparse
import asyncio
from concurrent.futures import ThreadPoolExecutor

from prometheus_client import CollectorRegistry

from arbiter.policy.engine import PolicyEngine
from arbiter.stream import topics
from arbiter.config import ConfigError
from arbiter.stream.settings import add_kafka_arguments, kafka_settings_from_args
from arbiter.v1 import common_pb2, common_pb2_grpc, policy_pb2, policy_pb2_grpc
from services.common.model_service import ModelServicer
from services.common.server import (
    RunningServer,
    add_server_arguments,
    serve_model_service,
    server_settings_from_args,
    start_server,
)
from services.policy.metrics import PolicyMetrics
from services.policy.servicer import PolicyServicer
from services.policy.settings import PolicySettings

SERVICE_NAMES = (
    policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name,
    common_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name,
)


async def create_server(settings: PolicySettings) -> tuple[RunningServer, int]:
    registry = CollectorRegistry()
    metrics = PolicyMetrics(registry)
    # One model thread: torch parallelises inside a forward pass. Loading new
    # versions gets its own thread so generation keeps going during a swap.
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="policy-model")
    loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="policy-loader")
    engine = PolicyEngine(settings.engine_config(), executor, loader, metrics)
    model = await asyncio.get_running_loop().run_in_executor(
        loader, engine.load_blocking, settings.model_dir, settings.model_version
    )
    engine.add_version(model, activate=True)
    model_servicer = ModelServicer(engine, metrics)
    model_servicer._publish_versions()

    def register(server) -> None:
        policy_pb2_grpc.add_PolicyServiceServicer_to_server(PolicyServicer(engine, metrics), server)
        common_pb2_grpc.add_ModelServiceServicer_to_server(model_servicer, server)

    running = await start_server(settings, SERVICE_NAMES, register, registry)
    follower = None
    if settings.follow_updates:
        from services.policy.follower import PolicyUpdateFollower

        follower = PolicyUpdateFollower(
            settings.kafka, settings.replica_id, engine, asyncio.get_running_loop(), metrics,
            on_loaded=model_servicer._publish_versions,
        )
        follower.start()
        # Registered first: a load in flight finishes before the engine closes.
        running.on_stop(follower.stop)

    async def release() -> None:
        await engine.close()
        executor.shutdown(wait=True)
        loader.shutdown(wait=True)

    running.on_stop(release)
    running.engine = engine
    running.metrics = metrics
    return running, running.port


def serve(settings: PolicySettings) -> None:
    follow = (
        f", following {settings.kafka.topic(topics.POLICY_UPDATES)} as replica {settings.replica_id!r}"
        if settings.follow_updates else ""
    )
    serve_model_service("policy", settings, lambda: create_server(settings), follow)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Hugging Face causal-LM directory (the initial policy)")
    add_server_arguments(parser, default_port=50052)
    parser.add_argument("--max-prompts-per-request", type=int, default=64)
    parser.add_argument("--max-samples-per-prompt", type=int, default=16, help="limit on sampling.n")
    parser.add_argument("--max-rows-per-request", type=int, default=256, help="limit on prompts x n")
    parser.add_argument("--max-new-tokens", type=int, default=1024, help="limit on sampling.max_new_tokens")
    parser.add_argument("--default-max-new-tokens", type=int, default=64)
    parser.add_argument("--max-concurrent-generations", type=int, default=8)
    parser.add_argument("--max-loaded-versions", type=int, default=2, help="older inactive versions are unloaded")
    parser.add_argument("--max-tokens", type=int, help="cap on prompt + completion tokens (default: the model's)")
    parser.add_argument(
        "--follow-updates", action="store_true",
        help="load and activate each new version published on the policy-updates topic (needs --kafka-*)",
    )
    parser.add_argument(
        "--replica-id", help="this replica's consumer-group suffix, unique per replica (default: HOST-PID)"
    )
    add_kafka_arguments(parser)


def settings_from_args(args: argparse.Namespace) -> PolicySettings:
    kafka = None
    if args.follow_updates:
        try:
            kafka = kafka_settings_from_args(args)
        except ConfigError as err:
            raise err.under("kafka") from None
    return PolicySettings(
        **server_settings_from_args(args),
        max_prompts_per_request=args.max_prompts_per_request,
        max_samples_per_prompt=args.max_samples_per_prompt,
        max_rows_per_request=args.max_rows_per_request,
        max_new_tokens=args.max_new_tokens,
        default_max_new_tokens=args.default_max_new_tokens,
        max_concurrent_generations=args.max_concurrent_generations,
        max_loaded_versions=args.max_loaded_versions,
        max_tokens=args.max_tokens,
        follow_updates=args.follow_updates,
        replica_id=args.replica_id or "",
        kafka=kafka,
    )
