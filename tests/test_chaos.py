"""``arbiter up`` under SIGKILL: every component (Tansu and its object store,
reward, reference, policy, worker, trainer) is killed mid-run, a few at a
time; the supervised stack recovers by itself, and the durable state proves
every rollout in the topic was trained exactly once or counted as dropped
(see bench/chaos.py, which ``make bench-chaos`` runs one kill at a time)."""

from __future__ import annotations

import pytest

from bench import chaos


# Two rounds of process start-ups on two cores: minutes, not the default 300 s.
@pytest.mark.timeout(900)
def test_stack_survives_sigkill_of_every_component_and_trains_each_rollout_once(tiny_models, tmp_path):
    # Two rounds of kills that together hit every component once; each round
    # must be followed by more checkpointed updates.
    rounds = [("object-store", "reward", "policy", "worker-0"), ("broker", "reference", "trainer")]
    assert sorted(v for r in rounds for v in r) == sorted(chaos.VICTIMS)
    resumed, ledger = chaos.run(tiny_models, tmp_path, rounds, resume_timeout_s=300)

    assert [victims for victims, _ in resumed] == ["+".join(r) for r in rounds]
    assert ledger.problems() == []
    # Training went on through all of it: one update per batch of rollouts.
    assert ledger.steps >= 1 + chaos.STEPS_PER_ROUND * len(rounds)
    assert ledger.outcomes["trained"] == ledger.steps * chaos.BATCH
    # Workers produce fresh, valid, complete rollouts: none needs dropping
    # except for staleness. Generation runs ahead of training by at most the
    # staleness budget, (η + 1) batches (the worker's rule), so that much at
    # most may wait unsettled when the stack stops.
    assert set(ledger.outcomes) <= {"trained", "duplicate", "stale"}
    assert ledger.pending_after_checkpoint <= (chaos.MAX_STALENESS + 1) * chaos.BATCH
