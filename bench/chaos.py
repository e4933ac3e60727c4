"""Chaos: ``arbiter up`` (tiny models, durable local broker) with components
killed by SIGKILL mid-run, the broker and its object store included; the
supervised stack must recover by itself, and every rollout in the topic must
be trained exactly once or counted as dropped.

``make bench-chaos`` kills one component at a time and reports the seconds
until training resumes (the next checkpointed update); ``tests/test_chaos.py``
runs the same driver in CI, killing several components per round.

How "exactly once" is checked, from the durable state alone (the trainer's
newest checkpoint and the rollouts topic as the broker holds it at the end):

- nothing lost: every record a tap read from the topic during the run (across
  every broker kill) is still in the topic at the end;
- nothing skipped: every record below the checkpoint's offsets has its
  rollout id among the checkpoint's settled ids;
- nothing trained twice: updates x batch size == rollouts trained, and the
  settled ids are exactly the trained plus the dropped ones, each id once (a
  rollout trained twice would count twice against one id).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from arbiter.stream import KafkaSettings, StreamConsumer, TopicPartition, topics
from services.stack import Stack, StackConfig
from trainer.checkpoint import latest_checkpoint

# Every part of the stack a kill can hit: Tansu and its object store are
# separate processes of the broker.
VICTIMS = ("object-store", "broker", "reward", "reference", "policy", "worker-0", "trainer")
BATCH = 8
# The trainer's (and so the worker's) staleness bound in policy versions.
MAX_STALENESS = 2
# Updates that must follow each round of kills: the first one after the kill
# could come from rollouts already in the topic, the second needs every
# component working again (the worker generates, the policy swaps in).
STEPS_PER_ROUND = 2
# Outcomes that put a rollout's id among the settled ones (duplicates and
# undecodable records never get one).
SETTLING_DROPS = ("stale", "unknown_version", "incomplete_group")


def stack_config(models: dict[str, Path], root: Path, prompts: int = 48) -> StackConfig:
    prompts_file = root / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": f"Say {i}:"}) + "\n" for i in range(prompts)))
    return StackConfig(
        policy_model=str(models["policy"]), reward_model=str(models["reward"]), prompts_file=str(prompts_file),
        workdir=str(root / "stack"), metrics=False,
        # Fast restarts, and a budget no single kill can exhaust.
        restart_backoff_s=0.2, restart_budget=3,
        # Generation overlaps training (the stack bounds the worker by the
        # trainer's max_staleness); a checkpoint every 3 updates (or when the
        # trainer is idle), so a trainer kill replays the updates since.
        worker={"samples_per_prompt": 2, "prompts_per_call": 4, "max_new_tokens": 4},
        trainer={"checkpoint_every": 3,
                 "ppo": {"batch_size": BATCH, "minibatch_size": 4, "epochs": 1, "max_staleness": MAX_STALENESS,
                         "samples_per_prompt": 2, "objective": "decoupled"}},
    )


@dataclass
class Ledger:
    """What the end state says about every rollout."""

    records: int
    distinct_ids: int
    steps: int
    outcomes: dict[str, int]
    lost: list[tuple[str, int, int]] = field(default_factory=list)
    unsettled_below_checkpoint: list[str] = field(default_factory=list)
    trained_twice: int = 0
    pending_after_checkpoint: int = 0

    def problems(self) -> list[str]:
        found = []
        if self.lost:
            found.append(f"{len(self.lost)} acknowledged record(s) lost, e.g. {self.lost[:3]}")
        if self.unsettled_below_checkpoint:
            found.append(f"{len(self.unsettled_below_checkpoint)} record(s) below the checkpoint's offsets never "
                         f"trained or dropped, e.g. {self.unsettled_below_checkpoint[:3]}")
        if self.trained_twice:
            found.append(f"{self.trained_twice} training(s) beyond one per settled rollout id")
        return found


class ChaosRun:
    """A supervised stack plus a tap on its rollouts topic."""

    def __init__(self, models: dict[str, Path], root: Path):
        self.root = root
        self.config = stack_config(models, root)
        self.stack: Stack | None = None
        self.tap: StreamConsumer | None = None
        self.tapped: dict[tuple[str, int, int], str] = {}

    def __enter__(self) -> ChaosRun:
        self.stack = Stack(self.config).start()
        self.kafka = KafkaSettings(bootstrap_servers=self.stack.bootstrap, topic_prefix=self.config.topic_prefix,
                                   client_id="chaos-tap")
        self.tap = StreamConsumer(self.kafka, [topics.ROLLOUTS], None)
        return self

    def __exit__(self, *exc) -> None:
        if self.tap is not None:
            self.tap.close(timeout_s=2)
        if self.stack is not None:
            self.stack.stop()

    def checkpoint_state(self) -> dict | None:
        path = latest_checkpoint(Path(self.config.workdir).resolve() / "trainer" / "checkpoints")
        return json.loads((path / "state.json").read_text()) if path else None

    def step(self) -> int:
        return (self.checkpoint_state() or {}).get("step", 0)

    def _read_tap(self, timeout_s: float) -> None:
        for record in self.tap.poll(timeout_s=timeout_s).records:
            self.tapped[(record.topic, record.partition, record.offset)] = record.message.rollout_id

    def wait_for_steps(self, steps: int, timeout_s: float) -> float:
        """Seconds until the checkpointed step has advanced by ``steps``;
        reads the tap meanwhile. Raises if the stack gave up or stalled."""
        started, target = time.monotonic(), self.step() + steps
        while time.monotonic() - started < timeout_s:
            self.stack.check_alive()
            if self.step() >= target:
                return time.monotonic() - started
            self._read_tap(0.3)
        raise TimeoutError(f"training did not reach step {target} within {timeout_s:.0f}s (at {self.step()}); "
                           f"logs in {self.stack.logs}")

    def kill(self, victim: str) -> None:
        stack = self.stack
        if victim == "object-store":
            pid = stack.broker.store.pid
        elif victim == "broker":
            pid = stack.broker.pid
        else:
            pid = stack.process(victim).proc.pid
        os.kill(pid, signal.SIGKILL)

    def finish(self, timeout_s: float) -> Ledger:
        """Stop the workers, let the trainer settle what they produced, then
        account for every rollout."""
        for process in self.stack.processes:
            if process.name.startswith("worker-"):
                process.stop()
        records = self.read_topic()
        wanted = len(records)
        highs = self._highs(records)

        def settled_everything_trainable() -> bool:
            state = self.checkpoint_state() or {}
            covered = sum(min(state.get("offsets", {}).get(tp.topic, {}).get(str(tp.partition), 0), high)
                          for tp, high in highs.items())
            # What is left can only be less than a batch waiting for company.
            return wanted - covered < BATCH

        deadline = time.monotonic() + timeout_s
        while not settled_everything_trainable():
            self.stack.check_alive()
            if time.monotonic() > deadline:
                break
            self._read_tap(0.3)
        return self.ledger(records, self.checkpoint_state())

    @staticmethod
    def _highs(records: dict[tuple[str, int, int], str]) -> dict[TopicPartition, int]:
        highs: dict[TopicPartition, int] = {}
        for topic, partition, offset in records:
            tp = TopicPartition(topic, partition)
            highs[tp] = max(highs.get(tp, 0), offset + 1)
        return highs

    def read_topic(self, idle_s: float = 2.0) -> dict[tuple[str, int, int], str]:
        """Every record in the rollouts topic now: read until nothing new
        arrives for ``idle_s``."""
        found: dict[tuple[str, int, int], str] = {}
        with StreamConsumer(self.kafka, [topics.ROLLOUTS], None) as reader:
            quiet_since = time.monotonic()
            while time.monotonic() - quiet_since < idle_s:
                batch = reader.poll(timeout_s=0.3)
                for record in batch.records:
                    found[(record.topic, record.partition, record.offset)] = record.message.rollout_id
                if batch.records:
                    quiet_since = time.monotonic()
        return found

    def ledger(self, records: dict[tuple[str, int, int], str], state: dict) -> Ledger:
        offsets = state["offsets"]
        settled = state["seen_ids"]
        outcomes = state.get("outcomes", {})
        ledger = Ledger(records=len(records), distinct_ids=len(set(records.values())), steps=state["step"],
                        outcomes=outcomes)
        ledger.lost = sorted(key for key in self.tapped if key not in records)
        settled_set = set(settled)
        for (topic, partition, offset), rollout_id in sorted(records.items()):
            if offset < offsets.get(topic, {}).get(str(partition), 0):
                if rollout_id not in settled_set:
                    ledger.unsettled_below_checkpoint.append(rollout_id)
            elif rollout_id not in settled_set:
                ledger.pending_after_checkpoint += 1
        trained = outcomes.get("trained", 0)
        drops = sum(outcomes.get(o, 0) for o in SETTLING_DROPS)
        # Each update trains one batch of distinct rollouts; each settled id
        # was settled (trained or dropped) once, or the sums disagree.
        ledger.trained_twice = max(0, trained + drops - len(settled_set)) + max(0, trained - ledger.steps * BATCH)
        assert len(settled) == len(settled_set), "the checkpoint lists a settled id twice"
        return ledger


def run(models: dict[str, Path], root: Path, rounds: Sequence[Iterable[str]], resume_timeout_s: float = 300,
        report=print) -> tuple[list[tuple[str, float]], Ledger]:
    """Kill each round's victims together, wait for STEPS_PER_ROUND more
    updates after each round; returns (victims, seconds) per round and the ledger."""
    resumed: list[tuple[str, float]] = []
    with ChaosRun(models, root) as chaos:
        chaos.wait_for_steps(1, resume_timeout_s)
        for victims in rounds:
            victims = tuple(victims)
            for victim in victims:
                chaos.kill(victim)
            seconds = chaos.wait_for_steps(STEPS_PER_ROUND, resume_timeout_s)
            resumed.append(("+".join(victims), seconds))
            report(f"killed {'+'.join(victims)}: {STEPS_PER_ROUND} more updates in {seconds:.1f}s")
        ledger = chaos.finish(resume_timeout_s)
    return resumed, ledger


def main(argv: Sequence[str] | None = None) -> int:
    from arbiter.tiny import make_tiny_models

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/bench-chaos")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args(argv)
    root = Path(args.workdir).resolve()
    if root.exists():
        import shutil

        shutil.rmtree(root)
    root.mkdir(parents=True)
    models = make_tiny_models(root / "models")
    resumed, ledger = run(models, root, [(victim,) for victim in VICTIMS])
    print(f"\n| killed (SIGKILL) | seconds until {STEPS_PER_ROUND} more updates |\n|---|---|")
    for victims, seconds in resumed:
        print(f"| {victims} | {seconds:.1f} |")
    print(f"\nrollouts in the topic: {ledger.records} ({ledger.distinct_ids} distinct ids); updates: {ledger.steps}; "
          f"outcomes: {ledger.outcomes}; waiting for a batch: {ledger.pending_after_checkpoint}")
    problems = ledger.problems()
    print("lost: %d, skipped: %d, trained twice: %d" % (
        len(ledger.lost), len(ledger.unsettled_below_checkpoint), ledger.trained_twice))
    if args.json:
        Path(args.json).write_text(json.dumps({"resumed_s": resumed, "ledger": ledger.__dict__}, indent=2))
    for problem in problems:
        print("PROBLEM:", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
