"""``arbiter rm shadow``: score labelled data with a candidate and the active
reward-model version side by side on a live service, report their agreement
(``arbiter.rm.agreement``), and optionally promote the candidate.

Promotion is ``ModelService.ActivateModelVersion``: atomic, and the previous
version stays loaded (activate it again to roll back). Scoring pins
``ScoreOptions.model_version``, so live traffic keeps being served by the active
version throughout.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from arbiter.types import Truncation

# Exit status when --promote refused: the gates were not met.
EXIT_NOT_PROMOTED = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from services.common.client import add_client_tls_flags

    parser.add_argument("--target", required=True, help="HOST:PORT of the reward service")
    parser.add_argument("--candidate", default="", help="the candidate version (loaded, or the label for --candidate-path)")
    parser.add_argument("--candidate-path", help="load this checkpoint (e.g. REGISTRY/NAME/vN) as the candidate first, "
                                                 "without activating it")
    parser.add_argument("--active", default="", help="compare against this version (default: the active one)")
    parser.add_argument("--data", "--prompts", dest="data", required=True,
                        help="labelled JSONL (arbiter train rm formats: pairs or rankings)")
    parser.add_argument("--promote", action="store_true", help="activate the candidate if the gates below pass")
    parser.add_argument("--min-agreement", type=float, help="gate: pairwise agreement with the active version")
    parser.add_argument("--min-accuracy", type=float, help="gate: the candidate's accuracy against the labels")
    parser.add_argument("--out", help="write the report as JSON here")
    parser.add_argument("--timeout", type=float, default=60.0)
    add_client_tls_flags(parser)


def score_examples(client, examples: Sequence, version: str, chunk: int = 64) -> tuple[list[list[float]], str]:
    """Raw scores of every example's responses under ``version`` (best first,
    as labelled), and the version that answered."""
    flat = [(i, item) for i, example in enumerate(examples) for item in example.candidates]
    scores: list[list[float]] = [[] for _ in examples]
    answered = version
    for start in range(0, len(flat), chunk):
        part = flat[start : start + chunk]
        response = client.score([item for _, item in part], model_version=version, truncation=Truncation.LEFT)
        answered = response.model_version
        for (i, _), result in zip(part, response.results):
            scores[i].append(result.raw_score)
    return scores, answered


def shadow_compare(client, examples: Sequence, candidate: str, active: str = ""):
    """(Agreement, active version, candidate version) on ``examples``."""
    from arbiter.rm.agreement import agreement

    active_version = active or client.info().version
    if active_version == candidate:
        raise ValueError(f"the candidate {candidate!r} is the version it would be compared with")
    active_scores, active_version = score_examples(client, examples, active_version)
    candidate_scores, candidate = score_examples(client, examples, candidate)
    return agreement(active_scores, candidate_scores), active_version, candidate


def main(args) -> int:
    import grpc
    from rich.console import Console
    from rich.table import Table

    from arbiter.rm.data import DatasetError, load_jsonl
    from services.common.client import client_tls_from_args, rpc_error_text
    from services.common.settings import admin_token_from_env, auth_token_from_env
    from services.reward.client import RewardClient

    tls = client_tls_from_args(args, "arbiter rm shadow")
    try:
        examples = load_jsonl(args.data)
    except DatasetError as err:
        print(f"arbiter rm shadow: {err}", file=sys.stderr)
        return 2
    if not examples:
        print(f"arbiter rm shadow: {args.data}: no examples", file=sys.stderr)
        return 2
    if not args.candidate and not args.candidate_path:
        print("arbiter rm shadow: name the --candidate version (or --candidate-path to load)", file=sys.stderr)
        return 2
    console = Console()
    try:
        # The admin token loads (--candidate-path) and promotes (--promote).
        with RewardClient(args.target, timeout_s=args.timeout, token=auth_token_from_env(),
                          admin_token=admin_token_from_env(), **tls.kwargs()) as client:
            candidate = args.candidate
            if args.candidate_path:
                loaded = client.load_version(str(Path(args.candidate_path).resolve()), candidate, activate=False)
                candidate = loaded.info.version
                console.print(f"loaded candidate {candidate} from {args.candidate_path} ({loaded.load_seconds:.2f}s)")
            result, active, candidate = shadow_compare(client, examples, candidate, args.active)
            table = Table(title=f"shadow: candidate {candidate} vs active {active} on {result.examples} examples")
            table.add_column("metric")
            table.add_column("value", justify="right")
            for name, value in (
                ("response pairs", f"{result.pairs}"),
                ("pairwise agreement", f"{result.pairwise_agreement:.4f}"),
                ("spearman rank correlation", f"{result.spearman:.4f}"),
                (f"accuracy of {active} (active)", f"{result.active_accuracy:.4f}"),
                (f"accuracy of {candidate} (candidate)", f"{result.candidate_accuracy:.4f}"),
            ):
                table.add_row(name, value)
            console.print(table)
            failed = []
            if args.min_agreement is not None and result.pairwise_agreement < args.min_agreement:
                failed.append(f"pairwise agreement {result.pairwise_agreement:.4f} < {args.min_agreement}")
            if args.min_accuracy is not None and result.candidate_accuracy < args.min_accuracy:
                failed.append(f"candidate accuracy {result.candidate_accuracy:.4f} < {args.min_accuracy}")
            promoted, previous = False, None
            if args.promote and not failed:
                swapped = client.activate_version(candidate)
                promoted, previous = True, swapped.previous_version
                console.print(f"promoted {candidate} (was {previous}; still loaded for a rollback)")
            elif args.promote:
                console.print(f"not promoted: {'; '.join(failed)}")
    except grpc.RpcError as err:
        print(f"arbiter rm shadow: {rpc_error_text(err, tls)}", file=sys.stderr)
        return 1
    except ValueError as err:
        print(f"arbiter rm shadow: {err}", file=sys.stderr)
        return 2
    if args.out:
        report = {"active": active, "candidate": candidate, **result.to_json(), "gates_failed": failed,
                  "promoted": promoted, "previous_version": previous}
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return EXIT_NOT_PROMOTED if args.promote and failed else 0


def live_main(args) -> int:
    """``arbiter rm shadow-live``: turn server-side shadow scoring on or off."""
    import grpc

    from services.common.client import client_tls_from_args, rpc_error_text
    from services.common.settings import admin_token_from_env, auth_token_from_env
    from services.reward.client import RewardClient

    tls = client_tls_from_args(args, "arbiter rm shadow-live")
    try:
        with RewardClient(args.target, token=auth_token_from_env(), admin_token=admin_token_from_env(),
                          **tls.kwargs()) as client:
            answer = client.set_shadow(args.candidate, args.fraction)
    except grpc.RpcError as err:
        print(f"arbiter rm shadow-live: {rpc_error_text(err, tls)}", file=sys.stderr)
        return 1
    if answer.shadow_version:
        print(f"shadowing: {answer.sample_fraction:.0%} of {answer.active_version!r}'s requests are also scored by "
              f"{answer.shadow_version!r}; watch arbiter_reward_shadow_pairwise_agreement")
    else:
        print(f"shadowing off; {answer.active_version!r} serves alone")
    return 0
