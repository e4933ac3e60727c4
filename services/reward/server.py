"""The reward server: ``create_server(settings)`` for tests (port 0 works),
``serve(settings)`` for deployment, ``main(argv)`` for the CLI."""

from __future__ import annotations

import argparse
import asyncio
import os
from concurrent.futures import ThreadPoolExecutor

from prometheus_client import CollectorRegistry

from arbiter.reward.engine import RewardEngine
from arbiter.config import ConfigError
from arbiter.stream.settings import add_kafka_arguments, kafka_settings_from_args
from arbiter.v1 import common_pb2, common_pb2_grpc, reward_pb2, reward_pb2_grpc
from services.common.backend import add_backend_arguments, backend_kwargs_from_args
from services.common.model_service import ModelServicer
from services.common.server import (
    RunningServer,
    add_server_arguments,
    serve_model_service,
    server_settings_from_args,
    start_server,
)
from services.reward.feedback import PreferenceFeedback
from services.reward.metrics import RewardMetrics
from services.reward.servicer import RewardServicer
from services.reward.settings import RewardSettings

SERVICE_NAMES = (
    reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name,
    common_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name,
)


async def create_server(settings: RewardSettings) -> tuple[RunningServer, int]:
    registry = CollectorRegistry()
    metrics = RewardMetrics(registry, settings.drift_config())
    # One model thread: torch parallelises inside a forward pass; two threads
    # would only contend for the same cores.
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-model")
    engine = RewardEngine(settings.engine_config(), executor, metrics)
    model = await asyncio.get_running_loop().run_in_executor(
        executor, engine.load_blocking, settings.model_dir, settings.model_version
    )
    engine.add_version(model, activate=True)
    model_servicer = ModelServicer(engine, metrics)
    model_servicer._publish_versions()

    feedback = PreferenceFeedback(settings.kafka)

    def register(server) -> None:
        reward_pb2_grpc.add_RewardServiceServicer_to_server(
            RewardServicer(engine, metrics, settings.stream_max_in_flight, feedback), server
        )
        common_pb2_grpc.add_ModelServiceServicer_to_server(model_servicer, server)

    running = await start_server(settings, SERVICE_NAMES, register, registry)

    async def release() -> None:
        await feedback.close()
        await engine.close()
        executor.shutdown(wait=True)

    running.on_stop(release)
    running.engine = engine
    running.metrics = metrics
    return running, running.port


def serve(settings: RewardSettings) -> None:
    serve_model_service("reward", settings, lambda: create_server(settings))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True,
        help="Hugging Face reward-model directory (num_labels=1); with --backend triton, REPO/NAME/N",
    )
    add_server_arguments(parser, default_port=50051)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-queue-delay-ms", type=float,
                        help="wait for a batch to fill (default: 2 ms in-process, 0 with Triton, which batches itself)")
    parser.add_argument("--max-queue-size", type=int, default=4096)
    parser.add_argument("--max-items-per-request", type=int, default=256)
    parser.add_argument("--no-dynamic-batching", action="store_true", help="run each request as its own batch")
    parser.add_argument("--max-tokens", type=int, help="cap on tokens per item (default: the model's limit)")
    parser.add_argument("--drift-window-size", type=int, default=1000, help="recent scores compared to the reference")
    parser.add_argument("--drift-reference-size", type=int, default=1000, help="first served scores used as reference")
    parser.add_argument("--drift-min-samples", type=int, default=100)
    # For SubmitPreference (the preferences topic); optional.
    add_kafka_arguments(parser)
    add_backend_arguments(parser)


def settings_from_args(args: argparse.Namespace) -> RewardSettings:
    return RewardSettings(
        **server_settings_from_args(args),
        max_batch_size=args.max_batch_size,
        max_queue_delay_ms=args.max_queue_delay_ms,
        max_queue_size=args.max_queue_size,
        max_items_per_request=args.max_items_per_request,
        dynamic_batching=not args.no_dynamic_batching,
        max_tokens=args.max_tokens,
        drift_window_size=args.drift_window_size,
        drift_reference_size=args.drift_reference_size,
        drift_min_samples=args.drift_min_samples,
        kafka=_kafka_from_args(args),
        **backend_kwargs_from_args(args),
    )


def _kafka_from_args(args: argparse.Namespace):
    """KafkaSettings when a broker is named (flag or ARBITER_KAFKA_BOOTSTRAP_SERVERS), else None."""
    if not (args.kafka_bootstrap_servers or os.environ.get("ARBITER_KAFKA_BOOTSTRAP_SERVERS")):
        return None
    try:
        return kafka_settings_from_args(args)
    except ConfigError as err:
        raise err.under("kafka") from None
