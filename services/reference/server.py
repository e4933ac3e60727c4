"""The reference server: ``create_server(settings)`` for tests (port 0 works),
``serve(settings)`` for deployment, ``add_arguments`` / ``settings_from_args``
for the CLI, all from the common model-server factory (``SPEC`` says what is
particular to this service)."""

from __future__ import annotations

from arbiter.reference.engine import ReferenceEngine
from arbiter.v1 import reference_pb2, reference_pb2_grpc
from services.common import model_server
from services.common.model_server import ModelServerSpec
from services.reference.metrics import ReferenceMetrics
from services.reference.servicer import ReferenceServicer
from services.reference.settings import ReferenceSettings


def _register(server, engine: ReferenceEngine, metrics: ReferenceMetrics, settings: ReferenceSettings):
    reference_pb2_grpc.add_ReferenceServiceServicer_to_server(ReferenceServicer(engine, metrics), server)
    return []


SPEC = ModelServerSpec(
    kind="reference",
    service_name=reference_pb2.DESCRIPTOR.services_by_name["ReferenceService"].full_name,
    settings=ReferenceSettings,
    metrics=lambda registry, settings: ReferenceMetrics(registry),
    engine=lambda settings, executor, loader, metrics: ReferenceEngine(
        settings.engine_config(), executor, loader, metrics),
    register=_register,
)

create_server, serve, add_arguments, settings_from_args = model_server.entry_points(SPEC)
