"""``arbiter train ppo --config FILE``."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import traceback

from prometheus_client import start_http_server

from arbiter.stream import KafkaSettings, StreamError
from arbiter.config import ConfigError, require
from trainer.config import PARALLEL, TrainerConfig, load_config

log = logging.getLogger("arbiter.trainer")


def kafka_settings(config: TrainerConfig) -> KafkaSettings:
    return KafkaSettings.from_env(**config.kafka)


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="trainer YAML (see trainer/config.py for every field)")
    parser.add_argument("--max-updates", type=int, help="stop after this many updates (overrides the config)")
    parser.add_argument("--parallel", choices=PARALLEL,
                        help="ranks under torchrun: ddp (DistributedDataParallel) or fsdp (FSDP2, sharded "
                             "weights and optimizer); none is one process (overrides the config)")
    parser.add_argument("--nproc-per-node", type=int,
                        help="start this many ranks on this machine (through torchrun) with --parallel ddp|fsdp")
    parser.add_argument("--nnodes", type=int, default=1,
                        help="machines in the job, each running this command with the same --rdzv-endpoint "
                             "(a Kubernetes StatefulSet's pods: infra/k8s/base/trainer.yaml); 1: torchrun --standalone")
    parser.add_argument("--rdzv-endpoint",
                        help="HOST:PORT of the c10d rendezvous every node joins (required with --nnodes > 1)")
    parser.add_argument("--reset-offsets", action="store_true",
                        help="resume weights and optimizer but not the checkpoint's stream offsets (a new cluster or recreated "
                             "topics): read from the group's committed offsets, or the start where there are none")


def ppo_main(args) -> int:
    try:
        config = load_config(args.config, max_updates=args.max_updates, parallel=args.parallel)
        kafka = kafka_settings(config)
        from trainer import distributed

        if args.nproc_per_node is not None and "RANK" not in os.environ:
            launch_ranks(args, config)  # does not return
        ranks = distributed.ranks_from_env(config.parallel)
    except (ConfigError, ValueError) as err:
        print(f"arbiter train ppo: {err}", file=sys.stderr)
        return 2
    if ranks is None:
        return _run(config, kafka, args, None)
    from torch.distributed import DistError

    distributed.init(ranks, config.collective_timeout_s)
    code = 1
    try:
        code = _run(config, kafka, args, ranks)
    except (DistError, RuntimeError) as err:
        # Most often a peer died or hung and a collective failed (gloo reports
        # a reset connection as a plain RuntimeError): this rank stops too,
        # torchrun ends the job, and nothing past the newest checkpoint was
        # committed, so a restart resumes exactly once.
        print(f"arbiter train ppo: rank {ranks.rank} of {ranks.world} stopped without a checkpoint: "
              f"{type(err).__name__}: {err}", file=sys.stderr)
    except Exception:
        traceback.print_exc()
    finally:
        distributed.shutdown()
    distributed.exit_rank(code)


def launch_ranks(args, config: TrainerConfig) -> None:
    """Replace this process with torchrun starting ``--nproc-per-node``
    ranks of this same command: signals then reach torchrun, which passes
    them to every rank (SIGTERM: each stops after its update, checkpointed)."""
    require(args.nproc_per_node >= 1, "nproc_per_node", "must be >= 1", args.nproc_per_node)
    require(args.nnodes >= 1, "nnodes", "must be >= 1", args.nnodes)
    require(config.parallel != "none", "parallel", "must be ddp or fsdp with --nproc-per-node", config.parallel)
    if args.nnodes == 1 and not args.rdzv_endpoint:
        rendezvous = ["--standalone", "--nnodes=1"]
    else:
        host, _, port = (args.rdzv_endpoint or "").rpartition(":")
        require(bool(host) and port.isdigit(), "rdzv_endpoint", "must be HOST:PORT with --nnodes > 1",
                args.rdzv_endpoint)
        # Ranks are handed out at rendezvous, not by node: which partitions a
        # rank reads may change across restarts, which the checkpoint (every
        # partition's offset, whichever rank wrote it) allows. One failed
        # node ends the job (no elastic restarts); the pods' restart policy
        # starts a new one from the newest checkpoint.
        rendezvous = [f"--nnodes={args.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={args.rdzv_endpoint}",
                      "--rdzv-id=arbiter-train-ppo", "--max-restarts=0"]
    command = [sys.executable, "-m", "torch.distributed.run", *rendezvous,
               f"--nproc-per-node={args.nproc_per_node}", "-m", "cli", "train", "ppo", "--config", str(args.config),
               f"--parallel={config.parallel}"]
    if args.max_updates is not None:
        command.append(f"--max-updates={args.max_updates}")
    if args.reset_offsets:
        command.append("--reset-offsets")
    sys.stdout.flush()
    os.execv(sys.executable, command)


def _run(config: TrainerConfig, kafka: KafkaSettings, args, ranks) -> int:
    main = ranks is None or ranks.is_main
    if config.torch_threads:
        import torch

        torch.set_num_threads(config.torch_threads)
    from trainer.loop import PPOTrainer
    from trainer.metrics import TrainerMetrics

    metrics = TrainerMetrics()
    if config.metrics_port is not None:
        # One port per rank of a node (0 stays 0: any free port).
        port = config.metrics_port + (ranks.local_rank if ranks is not None and config.metrics_port else 0)
        httpd, _ = start_http_server(port, addr=config.metrics_host, registry=metrics.registry)
        log.info("metrics on %s:%d", config.metrics_host, httpd.server_port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    trainer = PPOTrainer(config, kafka, metrics, reset_offsets=args.reset_offsets, ranks=ranks)

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

    where = f", rank {ranks.rank} of {ranks.world} ({ranks.parallel}, {ranks.backend})" if ranks is not None else ""
    print(f"trainer ready: step {trainer.state.step}, policy {trainer.state.policy_version}{where}", flush=True)
    try:
        trainer.run(stop, on_update=report if main else None)
    except ConfigError as err:
        print(f"arbiter train ppo: {err}", file=sys.stderr)
        return 2
    except StreamError as err:
        print(f"arbiter train ppo: {err}", file=sys.stderr)
        return 1
    return 0
