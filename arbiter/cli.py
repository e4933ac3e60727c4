"""``arbiter``: one command line for every component.

Subcommands import their implementation lazily, so ``arbiter --help`` is fast
and a command only pays for the libraries it uses.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys


def _configure_runtime(torch_threads: int | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Never reach for a model hub: checkpoints are local directories.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    logging.basicConfig(level=os.environ.get("ARBITER_LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)


def _make_tiny_models(args) -> int:
    from arbiter.tiny import make_tiny_models

    paths = make_tiny_models(args.out_dir)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


# `arbiter serve NAME`: the server module and its help line.
_SERVICES = {
    "reward": ("services.reward.server", "the reward-model service"),
    "policy": ("services.policy.server", "the policy generation service (hot-swappable weights)"),
    "reference": ("services.reference.server", "the frozen reference model: log-probs and KL"),
}


def _serve(args) -> int:
    from arbiter.config import ConfigError

    server = importlib.import_module(_SERVICES[args.service][0])
    try:
        settings = server.settings_from_args(args)
    except ConfigError as err:
        print(f"arbiter serve {args.service}: {err}", file=sys.stderr)
        return 2
    _configure_runtime(settings.torch_threads)
    server.serve(settings)
    return 0


def _score(args) -> int:
    from services.reward.client import score_main

    return score_main(args)


def _drift_report(args) -> int:
    from services.reward.drift_report import report_main

    return report_main(args)


def _triton_export(args) -> int:
    from arbiter.backends.triton_export import ExportError, ExportOptions, export
    from arbiter.errors import ModelLoadError

    try:
        options = ExportOptions(
            name=args.name, version=args.version, max_batch_size=args.max_batch_size,
            max_queue_delay_us=args.max_queue_delay_us, instances=args.instances, device=args.device,
            torch_threads=args.torch_threads, dtype=args.dtype,
        )
        path = export(args.model, args.kind, args.out, options)
    except (ExportError, ModelLoadError) as err:
        print(f"arbiter triton export: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


def _triton_serve(args) -> int:
    from arbiter.backends.triton_local import serve

    return serve(args)


def _train_ppo(args) -> int:
    from trainer.main import ppo_main

    return ppo_main(args)


def _worker(args) -> int:
    from services.worker.main import main as worker_main

    return worker_main(args)


def _up(args) -> int:
    from services.stack import up_main

    return up_main(args)


def _train_rm(args) -> int:
    from arbiter.rm.main import train_main

    return train_main(args)


def _rm_list(args) -> int:
    from arbiter.rm.main import list_main

    return list_main(args)


def _rm_shadow_live(args) -> int:
    from services.reward.shadow import live_main

    return live_main(args)


def _rm_shadow(args) -> int:
    from services.reward.shadow import main as shadow_main

    return shadow_main(args)


def _rm_submit(args) -> int:
    from services.reward.submit import main as submit_main

    return submit_main(args)


def _elo(args) -> int:
    from services.elo import main as elo_main

    return elo_main(args)


def _demo(args) -> int:
    from services.demo import run_from_args

    return run_from_args(args)


def _broker(args) -> int:
    from arbiter.stream import topics
    from arbiter.stream.broker import serve_broker
    from arbiter.stream.errors import StreamError

    try:
        return serve_broker(
            args.port, host=args.host, log_path=args.log_file, ready_file=args.ready_file,
            topics=dict(topics.DEFAULT_PARTITIONS) if args.create_topics else None, topic_prefix=args.topic_prefix,
        )
    except StreamError as err:
        print(f"arbiter broker: {err}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arbiter", description="Reward models as a service, and RLHF on them.")
    commands = parser.add_subparsers(dest="command", required=True)

    tiny = commands.add_parser("make-tiny-models", help="write tiny policy and reward models (HF directories)")
    tiny.add_argument("out_dir", help="writes OUT_DIR/policy and OUT_DIR/reward")
    tiny.set_defaults(run=_make_tiny_models)

    serve = commands.add_parser("serve", help="run a model service")
    services = serve.add_subparsers(dest="service", required=True)
    for name, (module, help_text) in _SERVICES.items():
        importlib.import_module(module).add_arguments(services.add_parser(name, help=help_text))
    serve.set_defaults(run=_serve)

    score = commands.add_parser("score", help="score JSON lines from stdin: {prompt, response} or {messages}")
    score.add_argument("--target", required=True, help="HOST:PORT of a reward service (several: ipv4:H:P,H:P)")
    score.add_argument("--normalize", action="store_true", help="normalized scores (version's shipped stats)")
    score.add_argument("--model-version", default="", help="score with this loaded version (default: active)")
    score.add_argument("--truncation", choices=["reject", "left", "right"], default="reject")
    score.add_argument("--batch-size", type=int, default=32)
    score.add_argument("--timeout", type=float, default=30.0, help="deadline per request, seconds")
    score.add_argument("--tls-ca-file", help="CA bundle for a TLS server")
    score.set_defaults(run=_score)

    broker = commands.add_parser("broker", help="run a local Kafka-protocol broker (Tansu, in memory) for dev and demos")
    broker.add_argument("--port", type=int, default=9092, help="listen port (0: a free one)")
    broker.add_argument("--host", default="127.0.0.1")
    broker.add_argument("--log-file", help="broker output (default: a temporary file)")
    broker.add_argument("--ready-file", help="written once the broker answers: HOST:PORT, then tansu_pid=N; removed on exit")
    broker.add_argument("--create-topics", action="store_true", help="create Arbiter's topics (final partition counts)")
    broker.add_argument("--topic-prefix", default="", help="prefix for --create-topics")
    broker.set_defaults(run=_broker)

    drift = commands.add_parser("drift", help="reward drift tools")
    drift_commands = drift.add_subparsers(dest="drift_command", required=True)
    report = drift_commands.add_parser("report", help="served scores vs reference: table and PNG")
    report.add_argument("--target", required=True, help="HOST:PORT of a reward service")
    report.add_argument("--model-version", default="", help="default: the active version")
    report.add_argument("--png", help="write a histogram of reference vs current scores here")
    report.add_argument("--tls-ca-file")
    report.set_defaults(run=_drift_report)

    triton = commands.add_parser("triton", help="NVIDIA Triton Inference Server: export models, run one locally")
    triton_commands = triton.add_subparsers(dest="triton_command", required=True)
    export = triton_commands.add_parser("export", help="write a checkpoint as a new version REPO/NAME/N of a Triton model")
    export.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    export.add_argument("--kind", required=True, choices=["reward", "reference", "policy"])
    export.add_argument("--out", required=True, help="the Triton model repository (created if missing)")
    export.add_argument("--name", help="model name in the repository (default: arbiter.json name, else the dir name)")
    export.add_argument("--version", type=int, help="version number (default: the next free one)")
    export.add_argument("--max-batch-size", type=int, default=64, help="Triton's max_batch_size (sequences)")
    export.add_argument("--max-queue-delay-us", type=int, default=2000, help="Triton's dynamic-batching delay")
    export.add_argument("--instances", type=int, default=1, help="model instances (instance_group count)")
    export.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="instance kind")
    export.add_argument("--torch-threads", type=int, default=0, help="torch threads per CPU instance (0: default)")
    export.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    export.set_defaults(run=_triton_export)
    from arbiter.backends.triton_local import add_serve_arguments

    local = triton_commands.add_parser("serve", help="run the tritonserver bundled in .venv-triton (dev, demos)")
    add_serve_arguments(local)
    local.set_defaults(run=_triton_serve)

    train = commands.add_parser("train", help="training jobs")
    train_commands = train.add_subparsers(dest="train_command", required=True)
    ppo = train_commands.add_parser("ppo", help="the PPO trainer: rollouts from Kafka, policy versions out")
    ppo.add_argument("--config", required=True, help="trainer YAML (see trainer/config.py for every field)")
    ppo.add_argument("--max-updates", type=int, help="stop after this many updates (overrides the config)")
    ppo.add_argument("--reset-offsets", action="store_true",
                     help="resume weights and optimizer but not stream offsets (the topics were recreated)")
    ppo.set_defaults(run=_train_ppo)
    from arbiter.rm.main import add_list_arguments, add_train_arguments

    train_rm = train_commands.add_parser("rm", help="train a reward model on preferences: a new registry version")
    add_train_arguments(train_rm)
    train_rm.set_defaults(run=_train_rm)

    rm = commands.add_parser("rm", help="reward-model versions: list the registry, shadow-compare and promote")
    rm_commands = rm.add_subparsers(dest="rm_command", required=True)
    rm_list = rm_commands.add_parser("list", help="versions in a registry, with their held-out accuracy")
    add_list_arguments(rm_list)
    rm_list.set_defaults(run=_rm_list)
    from services.reward.shadow import add_arguments as add_shadow_arguments

    shadow = rm_commands.add_parser(
        "shadow", help="score labelled data with a candidate and the active version; report agreement; --promote"
    )
    add_shadow_arguments(shadow)
    shadow.set_defaults(run=_rm_shadow)
    live = rm_commands.add_parser(
        "shadow-live", help="score a fraction of live traffic with a loaded candidate too; agreement goes to metrics"
    )
    live.add_argument("--target", required=True, help="HOST:PORT of the reward service")
    live.add_argument("--candidate", default="", help="loaded version to shadow (omit to turn shadowing off)")
    live.add_argument("--fraction", type=float, default=1.0, help="share of requests also scored by the candidate")
    live.add_argument("--tls-ca-file")
    live.set_defaults(run=_rm_shadow_live)
    from services.reward.submit import add_arguments as add_submit_arguments

    submit = rm_commands.add_parser("submit", help="send labelled JSON lines to SubmitPreference (preferences topic)")
    add_submit_arguments(submit)
    submit.set_defaults(run=_rm_submit)
    from services.elo import add_arguments as add_elo_arguments

    elo = commands.add_parser("elo", help="Elo ratings of policy versions (reward-model or human judged), with CIs")
    add_elo_arguments(elo)
    elo.set_defaults(run=_elo)

    from services.worker.main import add_arguments as add_worker_arguments

    worker = commands.add_parser("worker", help="rollout worker: prompts -> policy, reward, reference -> rollouts topic")
    add_worker_arguments(worker)
    worker.set_defaults(run=_worker)

    up = commands.add_parser("up", help="run the whole loop (broker, services, worker, trainer) until Ctrl-C")
    up.add_argument("--config", required=True, help="stack YAML (see services/stack.py StackConfig)")
    up.add_argument("--workdir", help="overrides the config's workdir")
    up.add_argument("--kafka-bootstrap", help="use this Kafka cluster instead of a local broker")
    up.set_defaults(run=_up)

    demo = commands.add_parser("demo", help="the end-to-end demo (what `make demo` runs)")
    demo.add_argument("--workdir", default="runs/demo")
    demo.add_argument("--updates", type=int, help="PPO updates (default 60, 4 with --quick)")
    demo.add_argument("--quick", action="store_true", help="smaller and shorter, for tests")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "serve":
        _configure_runtime()
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
