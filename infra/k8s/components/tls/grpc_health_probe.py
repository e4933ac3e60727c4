"""Kubernetes exec probe: gRPC health (grpc.health.v1) of an Arbiter server
whose port requires TLS, and client certificates (mTLS).

The kubelet's own grpc probe speaks plaintext only, so with --tls-cert-file
the pods run this instead, with the Python the arbiter command runs with
(grpcio and grpcio-health-checking are its dependencies):

    python grpc_health_probe.py --port 50051 --ca-file ca.crt \
        --cert-file tls.crt --key-file tls.key --server-name arbiter-reward

Exit 0: SERVING. Exit 1: anything else (NOT_SERVING while loading or catching
up, a refused handshake, no answer within --timeout-s), said in one line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="the server's gRPC port on this pod")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--service", default="", help='health service name ("": the whole server)')
    parser.add_argument("--ca-file", required=True, help="CA that signed the server's certificate")
    parser.add_argument("--cert-file", help="client certificate, for servers that require one")
    parser.add_argument("--key-file", help="key of --cert-file")
    parser.add_argument("--server-name", required=True,
                        help="a name in the server's certificate (the probe dials --host, not that name)")
    parser.add_argument("--timeout-s", type=float, default=4.0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    key = Path(args.key_file).read_bytes() if args.key_file else None
    cert = Path(args.cert_file).read_bytes() if args.cert_file else None
    credentials = grpc.ssl_channel_credentials(Path(args.ca_file).read_bytes(), key, cert)
    options = [("grpc.ssl_target_name_override", args.server_name)]
    with grpc.secure_channel(f"{args.host}:{args.port}", credentials, options=options) as channel:
        try:
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout_s).status
        except grpc.RpcError as err:
            print(f"{args.host}:{args.port}: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    print(f"{args.host}:{args.port} {args.service or '(server)'}: {name}")
    return 0 if status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
