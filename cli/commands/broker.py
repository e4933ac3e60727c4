"""``arbiter broker``: a local Kafka-protocol broker (Tansu; durable by default) for dev and demos."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

HELP = "run a local Kafka-protocol broker (Tansu; durable unless --storage memory) for dev and demos"


def register(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    parser.add_argument("--port", type=int, default=9092, help="listen port (0: a free one)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--log-file", help="broker output (default: a temporary file)")
    parser.add_argument("--ready-file", help="written once the broker answers: HOST:PORT, then tansu_pid=N; removed on exit")
    parser.add_argument("--create-topics", action="store_true", help="create Arbiter's topics (final partition counts)")
    parser.add_argument("--topic-prefix", default="", help="prefix for --create-topics")
    parser.add_argument("--storage", choices=("s3", "memory"), default="s3",
                        help="s3 (default): topics, records and offsets kept in --data-dir through a local "
                             "S3-protocol server, surviving restarts; memory: lost when the broker stops")
    parser.add_argument("--data-dir", default="runs/broker", help="where s3 storage keeps its data")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from arbiter.stream import topics
    from arbiter.stream.broker import serve_broker
    from arbiter.stream.errors import StreamError

    try:
        return serve_broker(
            args.port, host=args.host, log_path=args.log_file, ready_file=args.ready_file,
            topics=dict(topics.DEFAULT_PARTITIONS) if args.create_topics else None, topic_prefix=args.topic_prefix,
            storage=args.storage, data_dir=args.data_dir,
        )
    except StreamError as err:
        print(f"arbiter broker: {err}", file=sys.stderr)
        return 1
