"""``arbiter.v1.ModelService``: version management, identical on every model
server. It drives any engine with this small interface."""

from __future__ import annotations

import time
from typing import Protocol

from arbiter.errors import InvalidInput
from arbiter.types import ModelInfo
from arbiter.v1 import common_pb2, common_pb2_grpc
from services.common.convert import model_info_to_pb
from services.common.handlers import unary
from services.common.metrics import RpcMetrics


class VersionedEngine(Protocol):
    active_version: str | None

    def info(self, version: str = "") -> ModelInfo: ...

    def list_versions(self) -> list[ModelInfo]: ...

    async def load_version(self, path: str, version: str = "", activate: bool = True) -> ModelInfo: ...

    def activate(self, version: str) -> tuple[ModelInfo, str | None]: ...

    async def unload(self, version: str) -> None: ...


class ModelServicer(common_pb2_grpc.ModelServiceServicer):
    def __init__(self, engine: VersionedEngine, metrics: RpcMetrics):
        self.engine = engine
        self.metrics = metrics

    def _publish_versions(self, removed: list[str] = ()) -> None:
        loaded = [info.version for info in self.engine.list_versions()]
        self.metrics.set_versions(self.engine.active_version, loaded, removed)

    @unary("GetModelInfo")
    async def GetModelInfo(self, request, context):
        return common_pb2.GetModelInfoResponse(info=model_info_to_pb(self.engine.info(request.model_version)))

    @unary("ListModelVersions")
    async def ListModelVersions(self, request, context):
        return common_pb2.ListModelVersionsResponse(
            versions=[model_info_to_pb(info) for info in self.engine.list_versions()]
        )

    @unary("LoadModelVersion")
    async def LoadModelVersion(self, request, context):
        if not request.path:
            raise InvalidInput("path", "is empty; give the checkpoint directory to load")
        started = time.perf_counter()
        info = await self.engine.load_version(request.path, request.version, request.activate)
        self._publish_versions()
        return common_pb2.LoadModelVersionResponse(
            info=model_info_to_pb(info), load_seconds=time.perf_counter() - started
        )

    @unary("ActivateModelVersion")
    async def ActivateModelVersion(self, request, context):
        if not request.version:
            raise InvalidInput("version", "is empty; name the loaded version to activate")
        info, previous = self.engine.activate(request.version)
        self._publish_versions()
        return common_pb2.ActivateModelVersionResponse(info=model_info_to_pb(info), previous_version=previous or "")

    @unary("UnloadModelVersion")
    async def UnloadModelVersion(self, request, context):
        if not request.version:
            raise InvalidInput("version", "is empty; name the loaded version to unload")
        await self.engine.unload(request.version)
        self._publish_versions(removed=[request.version])
        return common_pb2.UnloadModelVersionResponse()
