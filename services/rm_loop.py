"""``arbiter rm loop``: the reward-model loop (``arbiter.rm.loop``) against
live reward replicas.

Each replica is driven on its own (``GrpcReplica``): loading, pinned
scoring, shadowing and activation go to that replica's ModelService and
RewardService (the admin token for the control plane); its shadow agreement
is read from its /metrics page, where the reward service exports it
(``arbiter_reward_shadow_*``), and its Page-Hinkley alarms from
``GetScoreDrift``.

Exit status: 0 stopped by SIGTERM/SIGINT; 2 the settings or training config
are invalid; 1 the broker, the registry or training failed (nothing is
committed that was not published; a restart goes on from there).
"""

from __future__ import annotations

import argparse
import logging
import signal
import ssl
import sys
import threading
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families

from arbiter.rm.data import RankedExample
from arbiter.rm.loop import ReplicaError, RMLoopSettings, ShadowReading
from arbiter.v1 import common_pb2
from services.common.client import ClientTLS, rpc_error_text
from services.reward.client import RewardClient
from services.reward.shadow import score_examples

log = logging.getLogger(__name__)

_SHADOW = {"arbiter_reward_shadow_samples": "samples", "arbiter_reward_shadow_pairwise_agreement": "agreement",
           "arbiter_reward_shadow_spearman": "spearman"}


class GrpcReplica:
    """``arbiter.rm.loop.Replica`` over one reward replica's gRPC port and /metrics page."""

    def __init__(self, target: str, metrics_url: str, *, timeout_s: float = 120.0, token: str | None = None,
                 admin_token: str | None = None, tls: ClientTLS | None = None):
        self.name = target
        self.metrics_url = metrics_url
        self.tls = tls or ClientTLS()
        self.client = RewardClient(target, timeout_s=timeout_s, token=token, admin_token=admin_token,
                                   **self.tls.kwargs())

    def _call(self, what: str, fn, *args):
        try:
            return fn(*args)
        except grpc.RpcError as err:
            raise ReplicaError(f"{self.name}: {what}: {rpc_error_text(err, self.tls)}") from None

    def active(self) -> tuple[str, str]:
        info = self._call("GetModelInfo", self.client.info)
        return info.version, info.source_path

    def load(self, path: str) -> str:
        wanted = Path(path).resolve()
        listed = self._call("ListModelVersions", lambda: self.client.models.ListModelVersions(
            common_pb2.ListModelVersionsRequest(), timeout=self.client.timeout_s, metadata=self.client.metadata))
        for info in listed.versions:
            # Loaded before a restart of the loop: the same checkpoint, kept.
            if info.source_path and Path(info.source_path).resolve() == wanted:
                return info.version
        return self._call("LoadModelVersion", self.client.load_version, str(wanted), "", False).info.version

    def scores(self, examples: Sequence[RankedExample], version: str) -> tuple[list[list[float]], str]:
        return self._call("Score", score_examples, self.client, examples, version)

    def set_shadow(self, version: str, fraction: float) -> None:
        self._call("SetShadow", self.client.set_shadow, version, fraction)

    def shadow(self, active: str, candidate: str) -> ShadowReading | None:
        context = None
        if self.metrics_url.startswith("https://"):
            context = ssl.create_default_context(cafile=self.tls.tls_ca_file)
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=10, context=context) as page:
                text = page.read().decode()
        except OSError as err:
            raise ReplicaError(f"{self.name}: cannot read {self.metrics_url}: {err}") from None
        found: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in _SHADOW and sample.labels == {"model_version": active, "shadow_version": candidate}:
                    found[_SHADOW[sample.name]] = sample.value
        if "samples" not in found:
            return None
        return ShadowReading(int(found["samples"]), found.get("agreement", float("nan")),
                             found.get("spearman", float("nan")))

    def activate(self, version: str) -> str:
        return self._call("ActivateModelVersion", self.client.activate_version, version).previous_version

    def change_points(self, version: str) -> int:
        return self._call("GetScoreDrift", self.client.drift, version).statistics.change_points

    def close(self) -> None:
        self.client.close()


# -- the command ---------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from arbiter.config import add_flags
    from services.common.client import add_client_tls_flags

    add_flags(parser, RMLoopSettings)
    add_client_tls_flags(parser)


def main(args) -> int:
    from prometheus_client import CollectorRegistry, start_http_server

    from arbiter.config import ConfigError, from_flags
    from arbiter.errors import ArbiterError
    from arbiter.net import LOOPBACK
    from arbiter.rm.config import load_config
    from arbiter.rm.loop import RMLoop
    from arbiter.stream import KafkaSettings
    from services.common.client import client_tls_from_args
    from services.common.settings import admin_token_from_env, auth_token_from_env

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tls = client_tls_from_args(args, "arbiter rm loop")
    try:
        settings = from_flags(RMLoopSettings, args)
        train = load_config(settings.train_config, progress=False)
        kafka = KafkaSettings.from_env(**train.kafka)
    except (ConfigError, TypeError, ValueError) as err:
        print(f"arbiter rm loop: {err}", file=sys.stderr)
        return 2
    token, admin = auth_token_from_env(), admin_token_from_env()
    replicas = [GrpcReplica(target, url, token=token, admin_token=admin, tls=tls)
                for target, url in zip(settings.reward, settings.reward_metrics)]
    registry = CollectorRegistry()
    httpd = None
    if settings.metrics_port is not None:
        httpd, _ = start_http_server(settings.metrics_port, addr=LOOPBACK, registry=registry)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    loop = RMLoop(settings, train, kafka, replicas, registry=registry)
    try:
        loop.start()
        log.info("rm loop ready: %d replica(s), retrain after %d preference(s) or %gs", len(replicas),
                 settings.retrain_preferences, settings.retrain_interval_s)
        loop.run(stop)
    except ArbiterError as err:  # StreamError too: the broker
        print(f"arbiter rm loop: {err}", file=sys.stderr)
        return 1
    finally:
        loop.close()
        for replica in replicas:
            replica.close()
        if httpd is not None:
            from services.common.metrics import stop_metrics_endpoint

            stop_metrics_endpoint(httpd)
    return 0
