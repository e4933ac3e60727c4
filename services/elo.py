"""``arbiter elo``: Elo ratings of policy versions, judged by a reward model or by people.

Judged by a reward model: for every prompt and sample, each version generates
a completion (PolicyService.Generate with the version pinned and the same seed
for every version, so they differ only by their weights); the reward model
scores all completions of a prompt in one Score request, and every pair of
versions is one game won by the higher raw score. That is the judgement
RewardService.Compare gives (P(A > B) = sigmoid(r_A - r_B) > 1/2 exactly when
r_A > r_B) with K forward passes per prompt instead of K(K-1). Equal scores
are a tie; an empty completion loses to a non-empty one (two empty: a tie).

Judged by people: ``--preferences FILE``, JSON lines
``{"winner": VERSION, "loser": VERSION}`` (``"tie": true`` for a draw).

Ratings: ``arbiter.elo.fit_elo`` (Bradley-Terry MLE on the Elo scale, bootstrap
confidence intervals), printed as a table and written as JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from arbiter.types import Prompt

if TYPE_CHECKING:
    from arbiter.elo import Outcome
    from services.policy.client import PolicyClient
    from services.reward.client import RewardClient


class EloInputError(ValueError):
    pass


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from services.common.client import add_client_tls_flags

    parser.add_argument("--versions", help="comma-separated policy versions to rate (>= 2); with --preferences, "
                                           "a filter (default: every version in the file)")
    judge = parser.add_argument_group("judged by a reward model")
    judge.add_argument("--policy-target", help="HOST:PORT of the policy service holding the versions")
    judge.add_argument("--reward-target", help="HOST:PORT of the reward service that judges")
    judge.add_argument("--reward-version", default="", help="reward-model version (default: the active one)")
    judge.add_argument("--prompts", help="JSON lines {\"prompt\": str | messages} or {\"messages\": [...]}; "
                                         "or a .txt file, one prompt per line")
    judge.add_argument("--samples", type=int, default=1, help="completions per prompt and version")
    judge.add_argument("--max-new-tokens", type=int, default=32)
    judge.add_argument("--temperature", type=float, default=1.0)
    judge.add_argument("--seed", type=int, default=0, help="generation seed (sample s uses seed + s)")
    judge.add_argument("--timeout", type=float, default=120.0, help="deadline per request, seconds")
    people = parser.add_argument_group("judged by people")
    people.add_argument("--preferences", help="JSON lines {\"winner\": VERSION, \"loser\": VERSION[, \"tie\": true]}")
    fit = parser.add_argument_group("ratings")
    fit.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals (0: none)")
    fit.add_argument("--confidence", type=float, default=0.95)
    fit.add_argument("--prior", type=float, default=0.01, help="Gaussian prior strength on the logit strengths")
    parser.add_argument("--out", help="write the ratings (and every game) as JSON here")
    add_client_tls_flags(judge)


# -- inputs -------------------------------------------------------------------


def read_prompts(path: str) -> list[Prompt]:
    """A .txt file, one prompt per line, or JSON lines in the prompts format
    (``arbiter.prompts``); other keys of a row are ignored, so another
    dataset's rows (e.g. preference pairs) serve as prompts."""
    from arbiter.prompts import read_prompts as read_prompt_rows

    if path.endswith(".txt"):
        return [Prompt(text=line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return read_prompt_rows(path, other_keys=True)


def read_preferences(path: str, versions: Sequence[str] | None) -> list[Outcome]:
    from arbiter.elo import Outcome
    from arbiter.jsonl import JsonlError, read_jsonl

    outcomes = []
    for row in read_jsonl(path):
        winner, loser, is_tie = row.value.get("winner"), row.value.get("loser"), row.value.get("tie", False)
        for name, value in (("winner", winner), ("loser", loser)):
            if not isinstance(value, str) or not value:
                raise JsonlError(row.where, name, "must be a version name")
        if winner == loser:
            raise JsonlError(row.where, "loser", "is the same version as winner")
        if not isinstance(is_tie, bool):
            raise JsonlError(row.where, "tie", "must be true or false")
        if versions and (winner not in versions or loser not in versions):
            continue  # --versions filters the file on purpose
        outcomes.append(Outcome(winner, loser, 0.5 if is_tie else 1.0))
    if not outcomes:
        raise EloInputError(f"{path}: no games" + (" between the given --versions" if versions else ""))
    return outcomes


# -- reward-model judged games ---------------------------------------------------


def generate_completions(
    policy: PolicyClient, prompts: Sequence[Prompt], versions: Sequence[str], args
) -> dict[tuple[int, int, str], str]:
    """{(prompt index, sample, version): completion text}."""
    out: dict[tuple[int, int, str], str] = {}
    chunk = 32
    for version in versions:
        for sample in range(args.samples):
            for start in range(0, len(prompts), chunk):
                response = policy.generate(
                    prompts[start : start + chunk], model_version=version, max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, seed=args.seed + sample, n=1,
                )
                if response.policy_version != version:
                    raise EloInputError(f"asked for policy version {version!r}, got {response.policy_version!r}")
                for s in response.samples:
                    out[(start + s.prompt_index, sample, version)] = s.text
    return out


def judge_games(
    reward: RewardClient, prompts: Sequence[Prompt], versions: Sequence[str],
    completions: dict[tuple[int, int, str], str], args,
) -> tuple[list[Outcome], list[dict[str, Any]], str]:
    """(outcomes, game records, the judging RM version)."""
    from arbiter.elo import Outcome
    from arbiter.prompts import reward_input_for
    from arbiter.types import Truncation

    keys = [(i, s) for i in range(len(prompts)) for s in range(args.samples)]
    # Only non-empty completions can be scored (the service refuses empty ones).
    items = [(i, s, v) for i, s in keys for v in versions if completions[(i, s, v)].strip()]
    scores: dict[tuple[int, int, str], float] = {}
    rm_version = ""
    chunk = 64
    for start in range(0, len(items), chunk):
        part = items[start : start + chunk]
        response = reward.score(
            [reward_input_for(prompts[i], completions[(i, s, v)]) for i, s, v in part],
            model_version=args.reward_version, truncation=Truncation.LEFT,
        )
        rm_version = response.model_version
        for key, result in zip(part, response.results):
            scores[key] = result.raw_score
    outcomes, games = [], []
    for i, s in keys:
        for a, b in itertools.combinations(versions, 2):
            ra, rb = scores.get((i, s, a)), scores.get((i, s, b))
            if ra is None and rb is None:
                result = 0.5
            elif ra is None or rb is None:
                result = 0.0 if ra is None else 1.0
            else:
                result = 1.0 if ra > rb else 0.0 if ra < rb else 0.5
            outcomes.append(Outcome(a, b, result))
            games.append({
                "prompt_index": i, "sample": s, "a": a, "b": b, "score_a": result,
                "reward_a": ra, "reward_b": rb,
                "completion_a": completions[(i, s, a)], "completion_b": completions[(i, s, b)],
            })
    return outcomes, games, rm_version


# -- output ---------------------------------------------------------------------


def ratings_table(result, title: str):
    from rich.table import Table

    table = Table(title=title)
    for column, justify in (("rank", "right"), ("version", "left"), ("elo", "right"),
                            (f"{result.confidence:.0%} CI", "right"), ("games", "right"), ("win rate", "right")):
        table.add_column(column, justify=justify)
    for rank, r in enumerate(result.ratings, start=1):
        table.add_row(
            str(rank), r.player, f"{r.elo:.1f}", f"{r.ci_low:.1f} .. {r.ci_high:.1f}", f"{r.games:g}",
            f"{r.win_rate:.3f}",
        )
    return table


def main(args) -> int:
    import grpc
    from rich.console import Console

    from arbiter.elo import fit_elo
    from services.common.client import client_tls_from_args, rpc_error_text

    tls = client_tls_from_args(args, "arbiter elo")
    versions = [v.strip() for v in (args.versions or "").split(",") if v.strip()]
    if len(set(versions)) != len(versions):
        print("arbiter elo: --versions: lists a version twice", file=sys.stderr)
        return 2
    judge: dict[str, Any]
    games: list[dict] = []
    try:
        if args.preferences:
            if args.policy_target or args.reward_target or args.prompts:
                raise EloInputError("--preferences rates submitted judgements; drop --policy-target, "
                                     "--reward-target and --prompts")
            outcomes = read_preferences(args.preferences, versions or None)
            judge = {"kind": "human_preferences", "file": args.preferences}
            if not versions:
                versions = sorted({o.a for o in outcomes} | {o.b for o in outcomes})
        else:
            missing = [flag for flag, value in (("--policy-target", args.policy_target),
                                                ("--reward-target", args.reward_target),
                                                ("--prompts", args.prompts)) if not value]
            if missing:
                raise EloInputError(f"{', '.join(missing)} required (or rate --preferences FILE)")
            if len(versions) < 2:
                raise EloInputError("--versions: name at least two policy versions, comma-separated")
            if args.samples < 1:
                raise EloInputError("--samples: must be >= 1")
            prompts = read_prompts(args.prompts)
            from services.common.settings import auth_token_from_env
            from services.policy.client import PolicyClient
            from services.reward.client import RewardClient

            token = auth_token_from_env()
            with PolicyClient(args.policy_target, timeout_s=args.timeout, token=token, **tls.kwargs()) as policy, \
                    RewardClient(args.reward_target, timeout_s=args.timeout, token=token, **tls.kwargs()) as reward:
                completions = generate_completions(policy, prompts, versions, args)
                outcomes, games, rm_version = judge_games(reward, prompts, versions, completions, args)
            judge = {"kind": "reward_model", "target": args.reward_target, "model_version": rm_version,
                     "prompts": len(prompts), "samples": args.samples, "seed": args.seed,
                     "temperature": args.temperature, "max_new_tokens": args.max_new_tokens}
        result = fit_elo(outcomes, versions, prior=args.prior, n_bootstrap=args.bootstrap,
                         confidence=args.confidence)
    except (EloInputError, ValueError, OSError) as err:
        print(f"arbiter elo: {err}", file=sys.stderr)
        return 2
    except grpc.RpcError as err:
        print(f"arbiter elo: {rpc_error_text(err, tls)}", file=sys.stderr)
        return 1
    judged_by = (f"reward model {judge['model_version']}" if judge["kind"] == "reward_model"
                 else f"human preferences ({args.preferences})")
    Console().print(ratings_table(result, f"Elo of policy versions, judged by {judged_by}"))
    if args.out:
        document = {"judge": judge, "versions": versions, **result.to_json(), "games": games}
        Path(args.out).write_text(json.dumps(document, indent=2) + "\n")
    return 0
