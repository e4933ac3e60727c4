"""``arbiter demo --online-rm``: iterated online RLHF in the demo.

While PPO runs, a simulated annotator (``Annotator``) asks the policy service
for pairs of fresh completions of the demo's prompts (whatever version it
serves at that moment), has the hidden gold scorer (VADER) pick the more
positive one, and submits the pair through ``RewardService.SubmitPreference``,
exactly as a labelling tool would. ``arbiter rm loop`` runs as a stack
component on those preferences: it retrains the reward model from the active
version, gates the candidate (held-out accuracy, live shadow against the
active version) and promotes it on the reward service, which the worker then
scores with. Every pair the annotator submitted is written to
``annotations.jsonl`` (with its gold scores and the policy version that
sampled it), so what the loop trained on can be traced back to live samples.

``rm_versions`` reads the loop's decisions from its registry (lineage and
``loop.json``); ``correct_on_pairs`` measures every RM version on
fresh gold-labelled pairs sampled from the final policy.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger(__name__)

ANNOTATOR_ID = "simulated-vader"


@dataclass(frozen=True)
class OnlineRMScale:
    """The loop's production defaults (retrain after 200 preferences or an
    hour, 200 shadow samples, a 10-minute watch) would never fire within a demo."""

    retrain_preferences: int
    retrain_interval_s: float
    shadow_min_samples: int
    watch_s: float
    prompts_per_call: int
    annotate_interval_s: float


# Quick: the worker scores 32 rollouts per policy version, so 32 shadow
# samples cost one PPO update.
QUICK_ONLINE = OnlineRMScale(retrain_preferences=32, retrain_interval_s=20, shadow_min_samples=32, watch_s=5,
                             prompts_per_call=4, annotate_interval_s=1.0)
FULL_ONLINE = OnlineRMScale(retrain_preferences=120, retrain_interval_s=90, shadow_min_samples=96, watch_s=20,
                            prompts_per_call=8, annotate_interval_s=1.0)


def rm_loop_config(scale: OnlineRMScale, rm_name: str) -> dict[str, Any]:
    """The stack's ``rm_loop:`` block for the demo (services/stack.py)."""
    return {
        "retrain_preferences": scale.retrain_preferences, "retrain_interval_s": scale.retrain_interval_s,
        "holdout_fraction": 0.25, "holdout_size": 400, "min_holdout": 16,
        # A held-out set of 16-100 pairs measures accuracy to +-0.05-0.12
        # (one standard error): the production 0.02 would reject on noise.
        "accuracy_tolerance": 0.05,
        # The shadow gates are the loop's defaults (Spearman >= 0.3, agreement
        # reported): the active RM is v1, trained on the initial policy's
        # samples, and once PPO has moved the policy v1 ranks its pairs near
        # chance, so better candidates disagree with it (a 0.8 agreement gate
        # promoted 0 of 11 in a 300 s run; arbiter/rm/loop.py says why).
        "shadow_min_samples": scale.shadow_min_samples, "shadow_timeout_s": 240, "watch_s": scale.watch_s,
        "check_interval_s": 0.5,
        # Continued from the active version on a few dozen pairs (plus those of
        # candidates not promoted): two passes at half the base RM's learning rate.
        "train": {"name": rm_name, "epochs": 2, "batch_size": 16, "learning_rate": 5e-4, "append_eos": False,
                  "progress": False},
    }


def seed_registry(reward_version: Path, registry: Path) -> Path:
    """The run's own registry, starting from the demo's RM version: the loop
    numbers its candidates after it (v2, v3, ...), and a new run (a new broker,
    new offsets) never meets an earlier run's lineage."""
    target = registry / reward_version.parent.name / reward_version.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(reward_version, target)
    return target


@dataclass
class AnnotatorStats:
    submitted: int = 0
    near_ties: int = 0
    rounds: int = 0
    errors: int = 0
    last_error: str = ""
    policy_versions: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {"submitted": self.submitted, "near_ties": self.near_ties, "rounds": self.rounds,
                "errors": self.errors, "last_error": self.last_error,
                "policy_versions": dict(self.policy_versions)}


class Annotator(threading.Thread):
    """Labels pairs of live completions with the gold scorer and submits them."""

    def __init__(self, policy_target: str, reward_target: str, prompts: Sequence[str], gold: str,
                 max_new_tokens: int, log_path: Path, *, prompts_per_call: int, interval_s: float, seed: int = 0):
        super().__init__(name="annotator", daemon=True)
        from services.worker.gold import make_gold_scorer

        self.policy_target, self.reward_target = policy_target, reward_target
        self.prompts = list(prompts)
        self.gold = make_gold_scorer(gold)
        self.max_new_tokens = max_new_tokens
        self.log_path = log_path
        self.prompts_per_call = min(prompts_per_call, len(self.prompts))
        self.interval_s = interval_s
        self.rng = random.Random(seed)
        self.stats = AnnotatorStats()
        self.stopping = threading.Event()

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=60)

    def run(self) -> None:
        from services.policy.client import PolicyClient
        from services.reward.client import RewardClient

        with PolicyClient(self.policy_target, timeout_s=60) as policy, \
                RewardClient(self.reward_target, timeout_s=30) as reward, self.log_path.open("a") as out:
            while not self.stopping.is_set():
                try:
                    self.annotate_once(policy, reward, out)
                except grpc.RpcError as err:
                    # A service restarting under the supervisor: the next round retries.
                    self.stats.errors += 1
                    self.stats.last_error = f"{err.code().name}: {err.details()}"
                    log.warning("annotator: %s", self.stats.last_error)
                self.stopping.wait(self.interval_s)

    def annotate_once(self, policy, reward, out) -> int:
        """One round: a pair of samples per prompt, labelled and submitted; the pairs submitted."""
        from services.demo_models import MIN_GOLD_GAP
        from services.reward.submit import request_from_row

        prompts = self.rng.sample(self.prompts, self.prompts_per_call)
        response = policy.generate(prompts, max_new_tokens=self.max_new_tokens, temperature=1.0, n=2)
        samples: dict[int, list] = {}
        for sample in response.samples:
            samples.setdefault(sample.prompt_index, []).append(sample)
        round_number = self.stats.rounds
        self.stats.rounds += 1
        submitted = 0
        for index, (a, b) in ((i, pair) for i, pair in samples.items() if len(pair) == 2):
            prompt = prompts[index]
            ga, gb = self.gold(prompt + a.text), self.gold(prompt + b.text)
            # As the offline labels (services/demo_models.label_pairs): a
            # near-tie is not a preference a person could state.
            if abs(ga - gb) < MIN_GOLD_GAP or a.text == b.text or not (a.text.strip() and b.text.strip()):
                self.stats.near_ties += 1
                continue
            (chosen, g_chosen), (rejected, g_rejected) = sorted(((a, ga), (b, gb)), key=lambda x: -x[1])
            versions = sorted({chosen.policy_version, rejected.policy_version})
            row = {"id": f"{ANNOTATOR_ID}-{round_number}-{index}", "prompt": prompt, "chosen": chosen.text,
                   "rejected": rejected.text, "annotator_id": ANNOTATOR_ID, "policy_versions": versions}
            reward.submit_preference(request_from_row(row, f"annotator round {round_number}"))
            out.write(json.dumps({**row, "gold_chosen": g_chosen, "gold_rejected": g_rejected}) + "\n")
            out.flush()
            self.stats.submitted += 1
            self.stats.policy_versions.update(versions)
            submitted += 1
        return submitted


def rm_versions(registry: Path, name: str) -> list[dict]:
    """Every version of the run's registry: the seed and the loop's
    candidates, with their lineage and what the loop decided."""
    from arbiter.rm.registry import ModelRegistry

    out = []
    for version in ModelRegistry(registry).versions(name):
        meta = version.metadata()
        lineage = meta.get("lineage")
        record = version.loop_record()
        gates = record.get("gates", {})
        holdout = gates.get("holdout_accuracy", {})
        shadow = gates.get("shadow", {})
        out.append({
            "version": version.version, "path": str(version.path),
            "parent": lineage["parent_version"] if lineage else None,
            "trained_on": lineage["preferences"]["train"] if lineage else None,
            "held_out": lineage["holdout_examples"] if lineage else None,
            "status": record.get("status", "seed" if lineage is None else "evaluating"),
            "failed_gate": record.get("failed_gate"),
            "holdout_accuracy": holdout.get("candidate"), "active_holdout_accuracy": holdout.get("active"),
            "shadow_agreement": min(shadow["agreement"]) if shadow.get("agreement") else None,
            "shadow_spearman": min(shadow["spearman"]) if shadow.get("spearman") else None,
            "reason": record.get("reason", ""),
        })
    return out


def gate_text(row: dict) -> str:
    if row["status"] == "seed":
        return "the demo's RM"
    parts = []
    if row["holdout_accuracy"] is not None:
        parts.append(f"held-out {row['holdout_accuracy']:.0%} vs {row['active_holdout_accuracy']:.0%}")
    if row["shadow_agreement"] is not None:
        parts.append(f"shadow agr {row['shadow_agreement']:.2f} ρ {row['shadow_spearman']:.2f}")
    if row["failed_gate"]:
        parts.append(f"failed: {row['failed_gate']}")
    return ", ".join(parts) or "-"


def fresh_pairs(policy_dir: Path, prompts: Sequence[str], gold: str, samples: int, max_new_tokens: int,
                seed: int) -> tuple[list[dict], str]:
    """Gold-labelled pairs among ``samples`` completions per prompt of the
    policy in ``policy_dir``, sampled here (as ``evaluate_gold`` samples it):
    the budget's last version exactly, whatever the stack serves by then (the
    trainer goes on while the results are measured); (rows, its version)."""
    from services.demo_models import label_pairs, sample_completions
    from services.worker.gold import make_gold_scorer

    grouped = sample_completions(Path(policy_dir), list(prompts), samples, max_new_tokens, seed=seed)
    return label_pairs(list(prompts), grouped, make_gold_scorer(gold)), Path(policy_dir).name


def correct_on_pairs(reward_target: str, versions: Sequence[dict], rows: Sequence[dict]) -> dict[str, list[float]]:
    """Each RM version's verdict on every pair of ``rows`` (1 right, ½ a tie,
    0 wrong; the same pairs for every version, so versions compare pair by
    pair), scored by the reward service pinned to that version (loaded
    inactive when it is not loaded)."""
    from arbiter.rm.data import parse_row
    from services.rm_loop import GrpcReplica

    if not rows:
        return {}
    examples = [parse_row(row, f"pair {i}") for i, row in enumerate(rows)]
    replica = GrpcReplica(reward_target)
    try:
        out = {}
        for row in versions:
            label = replica.load(row["path"])
            scores, _ = replica.scores(examples, label)
            # Labelled best first: chosen, rejected.
            out[row["version"]] = [1.0 if c > r else 0.5 if c == r else 0.0 for c, r in scores]
        return out
    finally:
        replica.close()
