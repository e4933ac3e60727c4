"""Samples checked against the same request decoded alone (a batch of its
own, no prefix cache) and against an independent teacher-forced forward:
what every way of sharing the decoding batch must leave unchanged."""

from __future__ import annotations

import pytest

from arbiter.policy.model import Generation, PolicyModel


def decoded_alone(policy: PolicyModel, generation: Generation) -> Generation:
    """The same request (prompts, sampling, seeds, mask) decoded as a batch of its own."""
    params = generation.params
    prompts = [generation.rows[p * params.n].prompt_ids for p in range(len(generation.rows) // params.n)]
    solo = policy.start(prompts, params, mask=generation.mask)
    while not solo.done:
        solo.step()
    return solo


def assert_as_alone(policy: PolicyModel, generation: Generation) -> None:
    """Every sample is what the request gives alone, with the log-probs of
    the distribution it was drawn from (teacher-forced, to 1e-4)."""
    params = generation.params
    for row, alone in zip(generation.rows, decoded_alone(policy, generation).rows, strict=True):
        assert row.finish is not None and len(row.ids) == len(row.logprobs) >= 1
        assert row.ids == alone.ids and row.finish == alone.finish
        assert row.logprobs == pytest.approx(alone.logprobs, abs=1e-5)
        forced = policy.teacher_forced_logprobs(row.prompt_ids, row.ids, params.temperature, params.top_k,
                                                params.top_p, mask=generation.mask)
        assert row.logprobs == pytest.approx(forced, abs=1e-4)
