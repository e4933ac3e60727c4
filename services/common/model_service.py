"""``arbiter.v1.ModelService``: version management, identical on every model
server: it drives the service's versioned-model kernel (``arbiter.kernel``).
Who may call the changing RPCs is decided by the server's interceptor
(``services.common.server``); what they may load, here."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

from arbiter.errors import InvalidInput, ModelLoadError, PermissionDenied
from arbiter.kernel import ModelKernel
from arbiter.v1 import common_pb2, common_pb2_grpc
from services.common.convert import model_info_to_pb
from services.common.handlers import Servicer, unary
from services.common.metrics import RpcMetrics

# Version labels become metric label values and log fields: short, printable.
_VERSION_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+@/-]{0,127}$")


def check_model_root(path: str, roots: Sequence[Path]) -> None:
    """Refuse a path outside ``roots`` (symlinks resolved, as the loader
    would follow them). The answer is the same whether or not the path
    exists, so a caller learns nothing about the filesystem outside. A path
    with a NUL character (no file has one; realpath raises ValueError on it)
    is outside too: the policy follower takes paths from the topic."""
    resolved = None if "\0" in path else Path(os.path.realpath(path))
    if resolved is None or not any(resolved == root or resolved.is_relative_to(root) for root in roots):
        raise PermissionDenied(
            f"path {path!r} is outside the directories this server loads models from; the server's "
            "--model-roots (default: the directory holding --model) decide them"
        )


class ModelServicer(Servicer, common_pb2_grpc.ModelServiceServicer):
    engine: ModelKernel

    def __init__(self, engine: ModelKernel, metrics: RpcMetrics, model_roots: Sequence[Path]):
        super().__init__(engine, metrics)
        self.model_roots = tuple(model_roots)

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
        if request.version and not _VERSION_LABEL.match(request.version):
            raise InvalidInput("version", "must be 1-128 characters: letters, digits and . _ : + @ / - "
                                          "(starting with a letter or digit)")
        if "\0" in request.path:
            raise InvalidInput("path", "contains a NUL character")
        check_model_root(request.path, self.model_roots)
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
