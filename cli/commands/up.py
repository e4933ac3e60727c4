"""``arbiter up``: the whole loop (broker, services and their replicas, workers, trainer), supervised, until Ctrl-C."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

HELP = "run the whole loop (broker, service replicas, workers, trainer), restarting what dies, until Ctrl-C"


def register(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    parser.add_argument("--config", required=True, help="stack YAML (see services/stack.py StackConfig and "
                        "infra/stack.example.yaml: replicas, workers, rollout_partitions, ...)")
    parser.add_argument("--workdir", help="overrides the config's workdir")
    parser.add_argument("--kafka-bootstrap", help="use this Kafka cluster instead of a local broker")
    parser.add_argument("--broker-storage", choices=("s3", "memory"),
                        help="the local broker's storage (overrides the config's broker_storage; default s3: "
                             "topics, records and offsets kept in WORKDIR/broker; memory: lost when it stops)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from services.stack import up_main

    return up_main(args)
