"""The reference server: ``create_server(settings)`` for tests (port 0 works),
``serve(settings)`` for deployment."""

from __future__ import annotations

import argparse
import asyncio
from concurrent.futures import ThreadPoolExecutor

from prometheus_client import CollectorRegistry

from arbiter.reference.engine import ReferenceEngine
from arbiter.v1 import common_pb2, common_pb2_grpc, reference_pb2, reference_pb2_grpc
from services.common.backend import add_backend_arguments, backend_kwargs_from_args
from services.common.model_service import ModelServicer
from services.common.server import (
    RunningServer,
    add_server_arguments,
    serve_model_service,
    server_settings_from_args,
    start_server,
)
from services.reference.metrics import ReferenceMetrics
from services.reference.servicer import ReferenceServicer
from services.reference.settings import ReferenceSettings

SERVICE_NAMES = (
    reference_pb2.DESCRIPTOR.services_by_name["ReferenceService"].full_name,
    common_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name,
)


async def create_server(settings: ReferenceSettings) -> tuple[RunningServer, int]:
    registry = CollectorRegistry()
    metrics = ReferenceMetrics(registry)
    # One model thread: torch parallelises inside a forward pass.
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reference-model")
    engine = ReferenceEngine(settings.engine_config(), executor, metrics)
    model = await asyncio.get_running_loop().run_in_executor(
        executor, engine.load_blocking, settings.model_dir, settings.model_version
    )
    engine.add_version(model, activate=True)
    model_servicer = ModelServicer(engine, metrics)
    model_servicer._publish_versions()

    def register(server) -> None:
        reference_pb2_grpc.add_ReferenceServiceServicer_to_server(ReferenceServicer(engine, metrics), server)
        common_pb2_grpc.add_ModelServiceServicer_to_server(model_servicer, server)

    running = await start_server(settings, SERVICE_NAMES, register, registry)

    async def release() -> None:
        await engine.close()
        executor.shutdown(wait=True)

    running.on_stop(release)
    running.engine = engine
    running.metrics = metrics
    return running, running.port


def serve(settings: ReferenceSettings) -> None:
    serve_model_service("reference", settings, lambda: create_server(settings))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True,
        help="Hugging Face causal-LM directory (the frozen reference); with --backend triton, REPO/NAME/N",
    )
    add_server_arguments(parser, default_port=50053)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-queue-delay-ms", type=float,
                        help="wait for a batch to fill (default: 2 ms in-process, 0 with Triton, which batches itself)")
    parser.add_argument("--max-queue-size", type=int, default=4096)
    parser.add_argument("--max-sequences-per-request", type=int, default=256)
    parser.add_argument("--no-dynamic-batching", action="store_true", help="run each request as its own batch")
    parser.add_argument("--max-tokens", type=int, help="cap on prompt + completion tokens (default: the model's)")
    add_backend_arguments(parser)


def settings_from_args(args: argparse.Namespace) -> ReferenceSettings:
    return ReferenceSettings(
        **server_settings_from_args(args),
        max_batch_size=args.max_batch_size,
        max_queue_delay_ms=args.max_queue_delay_ms,
        max_queue_size=args.max_queue_size,
        max_sequences_per_request=args.max_sequences_per_request,
        dynamic_batching=not args.no_dynamic_batching,
        max_tokens=args.max_tokens,
        **backend_kwargs_from_args(args),
    )
