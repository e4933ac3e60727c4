"""``arbiter worker``: flags -> WorkerSettings -> RolloutWorker.run until
SIGTERM/SIGINT (the batches in flight are finished), the passes are done, or
--max-rollouts is reached.

Exit codes: 0 done or stopped; 2 bad flags or prompts file; 1 the worker
could not start or hit a failure retrying cannot fix.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from arbiter.config import add_flags, from_flags
from arbiter.stream.settings import add_kafka_arguments, kafka_settings_from_args
from services.worker.settings import WorkerSettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, WorkerSettings, required=("policy_target", "reward_target", "reference_target"))
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts", metavar="FILE", help='JSON lines: {"id"?, "prompt"} or {"id"?, "messages"}')
    source.add_argument(
        "--prompts-topic", action="store_true", help="consume PromptRecords from the prompts topic (shared by workers)"
    )
    add_kafka_arguments(parser)


def settings_from_args(args: argparse.Namespace) -> WorkerSettings:
    from services.common.settings import auth_token_from_env

    return from_flags(
        WorkerSettings, args, prompts_file=args.prompts, prompts_topic=args.prompts_topic,
        kafka=kafka_settings_from_args(args), auth_token=auth_token_from_env(),
    )


def main(args: argparse.Namespace) -> int:
    from arbiter.config import ConfigError
    from arbiter.jsonl import JsonlError
    from arbiter.stream import topics
    from services.worker.worker import RolloutWorker, WorkerError

    try:
        settings = settings_from_args(args)
    except ConfigError as err:
        print(f"arbiter worker: {err}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    worker = RolloutWorker(settings)
    try:
        worker.start()
        source = settings.prompts_file or f"topic {settings.kafka.topic(topics.PROMPTS)}"
        metrics = f", metrics on {settings.metrics_host}:{worker.metrics_port}" if worker.metrics_port else ""
        print(
            f"rollout worker {settings.worker_id}: prompts from {source} -> topic "
            f"{settings.kafka.topic(topics.ROLLOUTS)}{metrics}",
            flush=True,
        )
        stats = worker.run(stop)
    except JsonlError as err:
        print(f"arbiter worker: {err}", file=sys.stderr)
        return 2
    except WorkerError as err:
        print(f"arbiter worker: {err}", file=sys.stderr)
        return 1
    finally:
        worker.close()
    dropped = f", {stats.dropped} batches dropped uncommitted" if stats.dropped else ""
    print(
        f"rollout worker {settings.worker_id}: {stats.rollouts} rollouts from {stats.prompts} prompts "
        f"in {stats.batches} batches ({stats.skipped} skipped{dropped})",
        flush=True,
    )
    return 0
