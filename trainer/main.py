"""``arbiter train ppo --config FILE``."""

from __future__ import annotations

import logging
import signal
import sys
import threading

from prometheus_client import start_http_server

from arbiter.stream import KafkaSettings, StreamError
from arbiter.config import ConfigError
from trainer.config import TrainerConfig, load_config

log = logging.getLogger("arbiter.trainer")


def kafka_settings(config: TrainerConfig) -> KafkaSettings:
    return KafkaSettings.from_env(**config.kafka)


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="trainer YAML (see trainer/config.py for every field)")
    parser.add_argument("--max-updates", type=int, help="stop after this many updates (overrides the config)")
    parser.add_argument("--reset-offsets", action="store_true",
                        help="resume weights and optimizer but not the checkpoint's stream offsets (a new cluster or recreated "
                             "topics): read from the group's committed offsets, or the start where there are none")


def ppo_main(args) -> int:
    try:
        config = load_config(args.config, max_updates=args.max_updates)
        kafka = kafka_settings(config)
    except (ConfigError, ValueError) as err:
        print(f"arbiter train ppo: {err}", file=sys.stderr)
        return 2
    if config.torch_threads:
        import torch

        torch.set_num_threads(config.torch_threads)
    from trainer.loop import PPOTrainer
    from trainer.metrics import TrainerMetrics

    metrics = TrainerMetrics()
    if config.metrics_port is not None:
        httpd, _ = start_http_server(config.metrics_port, addr=config.metrics_host, registry=metrics.registry)
        log.info("metrics on %s:%d", config.metrics_host, httpd.server_port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    trainer = PPOTrainer(config, kafka, metrics, reset_offsets=args.reset_offsets)

    def report(record) -> None:
        s = record.stats
        gold = f" gold={record.gold_score:+.3f}" if record.gold_score is not None else ""
        explained = f" explained_var={s.explained_variance:.3f}" if s.explained_variance is not None else ""
        print(
            f"step {record.step} policy={record.policy_version} reward={s.reward_raw:+.4f}{gold} kl={s.kl:.4f} "
            f"beta={s.kl_coef:.4f} entropy={s.entropy:.3f} clipfrac={s.clip_fraction:.3f}{explained} "
            f"staleness={record.staleness:.2f} {record.seconds:.2f}s",
            flush=True,
        )

    print(f"trainer ready: step {trainer.state.step}, policy {trainer.state.policy_version}", flush=True)
    try:
        trainer.run(stop, on_update=report)
    except StreamError as err:
        print(f"arbiter train ppo: {err}", file=sys.stderr)
        return 1
    return 0
