"""``arbiter``: one command line for every component.

Subcommands import their implementation lazily, so ``arbiter --help`` is fast
and a command only pays for the libraries it uses.
"""

from __future__ import annotations

import argparse
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


def _serve(args) -> int:
    from services.common.settings import SettingsError

    if args.service == "reward":
        from services.reward.server import serve, settings_from_args
    else:  # argparse restricts the choices
        raise AssertionError(args.service)
    try:
        settings = settings_from_args(args)
    except SettingsError as err:
        print(f"arbiter serve {args.service}: {err}", file=sys.stderr)
        return 2
    _configure_runtime(settings.torch_threads)
    serve(settings)
    return 0


def _score(args) -> int:
    from services.reward.client import score_main

    return score_main(args)


def _demo(args) -> int:
    from services.demo import main as demo_main

    return demo_main(args.demo_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arbiter", description="Reward models as a service, and RLHF on them.")
    commands = parser.add_subparsers(dest="command", required=True)

    tiny = commands.add_parser("make-tiny-models", help="write tiny policy and reward models (HF directories)")
    tiny.add_argument("out_dir", help="writes OUT_DIR/policy and OUT_DIR/reward")
    tiny.set_defaults(run=_make_tiny_models)

    serve = commands.add_parser("serve", help="run a model service")
    services = serve.add_subparsers(dest="service", required=True)
    from services.reward.server import add_arguments as reward_arguments

    reward_arguments(services.add_parser("reward", help="the reward-model service"))
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

    demo = commands.add_parser("demo", help="the end-to-end demo (what `make demo` runs)")
    demo.add_argument("demo_args", nargs=argparse.REMAINDER)
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "serve":
        _configure_runtime()
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
