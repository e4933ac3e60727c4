"""``arbiter worker``: flags -> WorkerSettings -> RolloutWorker.run until
SIGTERM/SIGINT (the batch in progress is finished), the passes are done, or
--max-rollouts is reached.

Exit codes: 0 done or stopped; 2 bad flags or prompts file; 1 the worker
could not start or hit a failure retrying cannot fix.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from arbiter.stream.settings import add_kafka_arguments, kafka_settings_from_args
from services.worker.gold import GOLD_SCORERS
from services.worker.settings import TRUNCATIONS, WorkerSettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", required=True, help="HOST:PORT of the policy service")
    parser.add_argument("--reward", required=True, help="HOST:PORT of the reward service")
    parser.add_argument("--reference", required=True, help="HOST:PORT of the reference service")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts", metavar="FILE", help='JSON lines: {"id"?, "prompt"} or {"id"?, "messages"}')
    source.add_argument(
        "--prompts-topic", action="store_true", help="consume PromptRecords from the prompts topic (shared by workers)"
    )
    parser.add_argument("--passes", type=int, default=0, help="passes over --prompts (0: loop forever)")
    parser.add_argument("--shuffle", action="store_true", help="shuffle --prompts every pass (with --seed)")
    parser.add_argument("--max-rollouts", type=int, help="stop after producing this many rollouts")
    parser.add_argument(
        "--max-rollouts-per-version", type=int,
        help="after this many rollouts from one policy version, wait for a newer one (bounds staleness)",
    )
    parser.add_argument("--samples-per-prompt", type=int, default=4, help="samples per prompt (one group)")
    parser.add_argument("--prompts-per-call", type=int, default=8, help="prompts per Generate call")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0: off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1: off")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--seed", type=int, help="seeds the shuffle and generation (seed + call number)")
    parser.add_argument("--reward-truncation", choices=TRUNCATIONS, default="left",
                        help="samples longer than the RM's limit: keep the end (left), the start (right), or fail")
    parser.add_argument("--gold", choices=sorted(GOLD_SCORERS), help="also store a gold score of each completion")
    parser.add_argument("--worker-id", help="default: HOST-PID-random")
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    parser.add_argument("--metrics-host", default="127.0.0.1")
    parser.add_argument("--rpc-timeout", type=float, default=120.0, help="deadline per RPC, seconds")
    parser.add_argument("--connect-timeout", type=float, default=120.0, help="wait this long for the services")
    parser.add_argument("--retry-max-backoff", type=float, default=10.0, help="longest wait between retries, seconds")
    parser.add_argument("--tls-ca-file", help="CA bundle for TLS services")
    parser.add_argument("--create-topics", action="store_true", help="create missing topics (final partition counts)")
    add_kafka_arguments(parser)


def settings_from_args(args: argparse.Namespace) -> WorkerSettings:
    from services.common.settings import auth_token_from_env

    extra = {"worker_id": args.worker_id} if args.worker_id else {}
    return WorkerSettings(
        policy_target=args.policy,
        reward_target=args.reward,
        reference_target=args.reference,
        prompts_file=args.prompts,
        prompts_topic=args.prompts_topic,
        passes=args.passes,
        shuffle=args.shuffle,
        max_rollouts=args.max_rollouts,
        max_rollouts_per_version=args.max_rollouts_per_version,
        samples_per_prompt=args.samples_per_prompt,
        prompts_per_call=args.prompts_per_call,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        stop=tuple(args.stop),
        seed=args.seed,
        reward_truncation=args.reward_truncation,
        gold=args.gold,
        kafka=kafka_settings_from_args(args),
        create_topics=args.create_topics,
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
        rpc_timeout_s=args.rpc_timeout,
        connect_timeout_s=args.connect_timeout,
        retry_max_backoff_s=args.retry_max_backoff,
        tls_ca_file=args.tls_ca_file,
        auth_token=auth_token_from_env(),
        **extra,
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
    print(
        f"rollout worker {settings.worker_id}: {stats.rollouts} rollouts from {stats.prompts} prompts "
        f"in {stats.batches} batches ({stats.skipped} skipped)",
        flush=True,
    )
    return 0
