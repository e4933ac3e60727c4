"""``arbiter.v1.ModelService``: version management, identical on every model
server: it drives the service's versioned-model kernel (``arbiter.kernel``)."""

from __future__ import annotations

import time

from arbiter.errors import InvalidInput, ModelLoadError
from arbiter.kernel import ModelKernel
from arbiter.v1 import common_pb2, common_pb2_grpc
from services.common.convert import model_info_to_pb
from services.common.handlers import Servicer, unary


class ModelServicer(Servicer, common_pb2_grpc.ModelServiceServicer):
    engine: ModelKernel

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
        try:
            info = await self.engine.load_version(request.path, request.version, request.activate)
        except OSError as err:  # e.g. ENAMETOOLONG: a path the filesystem refuses is the caller's to fix
            raise ModelLoadError(f"path: cannot read the checkpoint: {err.strerror or err}") from err
        return common_pb2.LoadModelVersionResponse(
            info=model_info_to_pb(info), load_seconds=time.perf_counter() - started
        )

    @unary("ActivateModelVersion")
    async def ActivateModelVersion(self, request, context):
        if not request.version:
            raise InvalidInput("version", "is empty; name the loaded version to activate")
        info, previous = self.engine.activate(request.version)
        return common_pb2.ActivateModelVersionResponse(info=model_info_to_pb(info), previous_version=previous or "")

    @unary("UnloadModelVersion")
    async def UnloadModelVersion(self, request, context):
        if not request.version:
            raise InvalidInput("version", "is empty; name the loaded version to unload")
        await self.engine.unload(request.version)
        return common_pb2.UnloadModelVersionResponse()
