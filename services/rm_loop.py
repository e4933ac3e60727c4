"""``arbiter rm loop``: the reward-model loop (``arbiter.rm.loop``) against
live reward replicas.

Each replica is driven on its own (``GrpcReplica``), over its gRPC port
only: loading, pinned scoring, shadowing and activation go to that
replica's ModelService and RewardService (the admin token for the control
plane); its shadow window is read with ``GetShadow`` and its Page-Hinkley
alarms with ``GetScoreDrift``.

Replicas are named one by one (``--reward H:P``, repeated) or found by DNS
(``--reward dns:///arbiter-reward-pods:50051``: every A record of a
Kubernetes headless Service is a ready replica), resolved
again before each decision of the loop (``ReplicaDiscovery``), so a replica
the Deployment adds joins the next round and one it removes leaves it.

Exit status: 0 stopped by SIGTERM/SIGINT; 2 the settings or training config
are invalid; 1 the broker, the registry or training failed (nothing is
committed that was not published; a restart goes on from there).
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc

from arbiter.rm.data import RankedExample
from arbiter.rm.loop import ReplicaError, RMLoopSettings, ShadowReading
from arbiter.v1 import common_pb2
from services.common.client import ClientTLS, rpc_error_text
from services.reward.client import RewardClient
from services.reward.shadow import score_examples

log = logging.getLogger(__name__)

# Flags of the /metrics scrape GetShadow replaced: accepted (an `arbiter up`
# or manifest not yet updated keeps working) and ignored.
DEPRECATED_FLAGS = ("--reward-metrics", "--reward-metrics-port")


class GrpcReplica:
    """``arbiter.rm.loop.Replica`` over one reward replica's gRPC port."""

    def __init__(self, target: str, *, timeout_s: float = 120.0, token: str | None = None,
                 admin_token: str | None = None, tls: ClientTLS | None = None):
        self.name = target
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
        window = self._call("GetShadow", self.client.get_shadow, candidate)
        # A window against another version (the active one changed meanwhile) says nothing of this pair.
        if not window.samples or window.active_version != active:
            return None
        return ShadowReading(window.samples, window.pairwise_agreement, window.spearman,
                             window.paired_change_points, window.paired_detecting)

    def activate(self, version: str) -> str:
        return self._call("ActivateModelVersion", self.client.activate_version, version).previous_version

    def change_points(self, version: str) -> int:
        return self._call("GetScoreDrift", self.client.drift, version).statistics.change_points

    def close(self) -> None:
        self.client.close()


# -- discovery -------------------------------------------------------------------


def dns_host_port(target: str) -> tuple[str, int] | None:
    """``dns:///NAME:PORT`` (also ``dns://AUTHORITY/NAME:PORT`` and
    ``dns:NAME:PORT``, gRPC's forms) -> (NAME, PORT); None for HOST:PORT."""
    if not target.startswith("dns:"):
        return None
    rest = target.removeprefix("dns:")
    if rest.startswith("//"):
        rest = rest[2:].partition("/")[2]
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        raise ReplicaError(f"{target}: expected dns:///NAME:PORT")
    return host, int(port)


def resolve_ipv4(host: str) -> list[str]:
    """The A records of ``host``, sorted (ReplicaError when there are none)."""
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except OSError as err:
        raise ReplicaError(f"cannot resolve {host}: {err}") from None
    return sorted({info[4][0] for info in infos}, key=socket.inet_aton)


class ReplicaDiscovery:
    """The reward replicas, found again at each call: fixed HOST:PORT entries
    as given, and every address a ``dns:`` entry resolves to. Replicas seen
    before are reused (their channels stay open); gone ones are closed. A
    failed resolution keeps that entry's last addresses (a DNS hiccup must not
    drop every replica mid-watch); with none known yet it raises ReplicaError."""

    def __init__(self, reward: Sequence[str], make: Callable[[str], GrpcReplica], *,
                 resolve: Callable[[str], list[str]] = resolve_ipv4):
        self.reward = list(reward)
        self._make = make
        self._resolve = resolve
        self._known: dict[str, GrpcReplica] = {}
        self._last: dict[str, list[str]] = {}

    def wanted(self) -> list[str]:
        """HOST:PORT of every replica now."""
        out: list[str] = []
        for entry in self.reward:
            dns = dns_host_port(entry)
            if dns is None:
                out.append(entry)
                continue
            host, port = dns
            try:
                addresses = self._resolve(host)
                self._last[entry] = addresses
            except ReplicaError as err:
                if entry not in self._last:
                    raise
                addresses = self._last[entry]
                log.warning("%s; keeping its last addresses %s", err, ", ".join(addresses))
            out += [f"{address}:{port}" for address in addresses]
        return out

    def __call__(self) -> list[GrpcReplica]:
        wanted = self.wanted()
        replicas = []
        for target in wanted:
            replica = self._known.get(target)
            if replica is None:
                replica = self._known[target] = self._make(target)
                log.info("reward replica %s", target)
            replicas.append(replica)
        for target in set(self._known) - set(wanted):
            log.info("reward replica %s is gone", target)
            self._known.pop(target).close()
        return replicas

    def close(self) -> None:
        for replica in self._known.values():
            replica.close()
        self._known.clear()


# -- the command ---------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from arbiter.config import add_flags
    from services.common.client import add_client_tls_flags

    add_flags(parser, RMLoopSettings)
    add_client_tls_flags(parser)
    for name in DEPRECATED_FLAGS:
        parser.add_argument(name, dest=f"deprecated_{name[2:].replace('-', '_')}", action="append",
                            help=argparse.SUPPRESS)


def main(args) -> int:
    from prometheus_client import CollectorRegistry, start_http_server

    from arbiter.config import ConfigError, from_flags
    from arbiter.errors import ArbiterError
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
    for name in DEPRECATED_FLAGS:
        if getattr(args, f"deprecated_{name[2:].replace('-', '_')}", None):
            log.warning("%s is deprecated and ignored: the shadow window is read with RewardService.GetShadow "
                        "on each replica's gRPC port", name)
    token, admin = auth_token_from_env(), admin_token_from_env()
    replicas = ReplicaDiscovery(settings.reward,
                                lambda target: GrpcReplica(target, token=token, admin_token=admin, tls=tls))
    registry = CollectorRegistry()
    httpd = None
    if settings.metrics_port is not None:
        httpd, _ = start_http_server(settings.metrics_port, addr=settings.metrics_host, registry=registry)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    loop = RMLoop(settings, train, kafka, replicas, registry=registry)
    try:
        loop.start()
        log.info("rm loop ready: %d replica(s), retrain after %d preference(s) or %gs", len(loop.replicas),
                 settings.retrain_preferences, settings.retrain_interval_s)
        loop.run(stop)
    except ArbiterError as err:  # StreamError too: the broker; ReplicaError: no replica resolvable
        print(f"arbiter rm loop: {err}", file=sys.stderr)
        return 1
    finally:
        loop.close()
        replicas.close()
        if httpd is not None:
            from services.common.metrics import stop_metrics_endpoint

            stop_metrics_endpoint(httpd)
    return 0
