"""Continuous batching in the policy engine: the decoding batch as rows join
and leave (``arbiter.policy.batch``, on the real tiny policy), and the
scheduler's admission control through a real server (KV budget, bounded
queue, batching off)."""

import asyncio
import threading

import grpc
import pytest
from decoding_checks import assert_as_alone, decoded_alone
from helpers import BackgroundServer, expect_error, sample_value, wait_until

from arbiter.policy.batch import DecodeBatch, _partition
from arbiter.policy.model import Generation, PolicyModel
from arbiter.policy.scheduler import DecodingConfig
from arbiter.policy.types import FinishReason, ResolvedSampling, SamplingParams
from arbiter.types import Prompt
from arbiter.v1 import policy_pb2, policy_pb2_grpc
from services.policy.client import PolicyClient
from services.policy.server import create_server
from services.policy.settings import PolicySettings

# 2, 6 and 29 tokens with the tiny tokenizer.
SHORT, MEDIUM = "hi", "The quick brown"
LONG = "The quick brown fox jumps over the lazy dog while the cat sleeps"


@pytest.fixture(scope="module")
def policy(policy_dir):
    return PolicyModel.load(policy_dir)


def start(policy: PolicyModel, prompts, max_new_tokens=20, temperature=1.0, top_p=1.0, top_k=0, n=1, stop=(),
          seed=0) -> Generation:
    params = ResolvedSampling(max_new_tokens, temperature, top_p, top_k, n, tuple(stop), seed)
    return policy.start(policy.encode([Prompt(text=p) for p in prompts], max_new_tokens), params)


def test_rows_join_and_leave_a_running_batch(policy):
    """Generations with different prompts, lengths and sampling parameters
    join a running batch at step boundaries (forcing its cache to grow in
    rows and columns and to make room before its write column) and leave
    as they finish or are cancelled; every sample is what the same request
    gives alone, with the log-probs of the distribution it was drawn from."""
    batch = DecodeBatch(policy, max_rows=64)
    a = start(policy, [SHORT], max_new_tokens=20, seed=1)
    batch.step([a])
    allocated = [batch.allocated_tokens]
    batch.step()
    # 29 prompt tokens before a write column 4 columns in; 1 + 4 rows in 4 slots.
    b = start(policy, [LONG], max_new_tokens=24, temperature=0.7, top_k=20, n=4, seed=2)
    batch.step([b])
    allocated.append(batch.allocated_tokens)
    # c (greedy) leaves after 3 tokens from slots in the middle; d's rows move into them.
    c = start(policy, [MEDIUM, SHORT], max_new_tokens=3, temperature=0.0)
    d = start(policy, [MEDIUM], max_new_tokens=16, temperature=1.2, top_p=0.8, n=2, seed=4)
    batch.step([c, d])
    assert batch.generations == 4 and len(batch.rows) == 1 + 4 + 2 + 2
    e = start(policy, [LONG], max_new_tokens=20, n=2, seed=5)
    batch.step([e])
    batch.step()
    e.cancel()
    batch.step()
    assert all(row.generation is not e for row in batch.rows)
    while not batch.empty:
        batch.step()
        allocated.append(batch.allocated_tokens)
    assert allocated[1] > allocated[0]
    assert batch.allocated_tokens == 0  # released when the last row left
    assert all(0 < len(row.ids) < 20 and row.finish is None for row in e.rows)

    for generation in (a, b, c, d):
        assert_as_alone(policy, generation)
    assert all(row.logprobs == [0.0] * 3 and row.finish is FinishReason.LENGTH for row in c.rows)  # greedy


def test_rows_with_the_same_prompt_share_one_prefill(policy):
    """A request's n samples, and other requests with the same prompt, are
    one prompt to prefill: 2 samples of LONG, 1 of MEDIUM and 1 more of LONG
    (another request, other sampling) are 4 rows but 2 prompts. Cancelling
    one LONG request keeps the prompt the other still has; cancelling MEDIUM
    leaves 1. Every sample is what its request gives alone (whose n rows
    share its prefill too), with the log-probs of the distribution it was
    drawn from."""
    batch = DecodeBatch(policy, max_rows=64, prefill_chunk_tokens=2)
    x = start(policy, [LONG], max_new_tokens=8, n=2, seed=4)
    y = start(policy, [MEDIUM], max_new_tokens=8, seed=5)
    z = start(policy, [LONG], max_new_tokens=8, temperature=0.6, top_k=30, seed=6)
    batch.step([x, y, z])
    # 2 prompts in a budget of 2 tokens: a column each.
    assert (batch.prefilling_rows, batch.prefilling_prompts) == (4, 2)
    x.cancel()
    batch.step()
    assert (batch.prefilling_rows, batch.prefilling_prompts) == (2, 2)
    y.cancel()
    batch.step()
    assert (batch.prefilling_rows, batch.prefilling_prompts) == (1, 1)
    while not batch.empty:
        batch.step()
    params = z.params
    [row] = z.rows
    [solo] = decoded_alone(policy, z).rows
    assert row.ids == solo.ids and len(row.ids) == 8
    assert row.logprobs == pytest.approx(solo.logprobs, abs=1e-5)
    forced = policy.teacher_forced_logprobs(row.prompt_ids, row.ids, params.temperature, params.top_k, params.top_p)
    assert row.logprobs == pytest.approx(forced, abs=1e-4)
    # Alone (no chunking), a request's n samples share their prompt's
    # prefill, joined and sampled in its first step.
    w = start(policy, [LONG], max_new_tokens=8, n=3, seed=7)
    w.step()
    assert [len(row.ids) for row in w.rows] == [1, 1, 1]
    while not w.done:
        w.step()
    for row in w.rows:
        forced = policy.teacher_forced_logprobs(row.prompt_ids, row.ids, 1.0, 0, 1.0)
        assert row.logprobs == pytest.approx(forced, abs=1e-4)


def test_long_prompts_prefill_in_chunks_while_running_rows_decode(policy):
    """With a budget of 2 prompt tokens a step, the 3 rows of a 29-token
    prompt (one prefill, shared) and a 6-token one take 1 column in the first
    step (2 prompts); once the 6-token prompt's generation is cancelled
    mid-prefill (its row leaves the group, the rest go on) the 29-token
    prompt prefills 2 columns a step (14 more steps) while the running row
    samples a token every step; every sample is what the same request gives
    alone (prefilled in one forward), with the log-probs of the
    distribution it was drawn from."""
    batch = DecodeBatch(policy, max_rows=64, prefill_chunk_tokens=2)
    a = start(policy, [SHORT], max_new_tokens=40, seed=1)
    batch.step([a])  # 1 row x 2 columns: within the budget, prefilled at once
    assert len(a.rows[0].ids) == 1
    b = start(policy, [LONG], max_new_tokens=12, temperature=0.8, n=3, seed=2)
    c = start(policy, [MEDIUM], max_new_tokens=12, seed=3)
    batch.step([b, c])
    c.cancel()
    for expected in range(3, 16):
        assert batch.prefilling_rows == 3 + (1 if expected == 3 else 0)
        assert batch.prefilling_prompts == 1 + (1 if expected == 3 else 0)
        assert batch.step() == [a.rows[0]]  # only the running row samples
        assert len(a.rows[0].ids) == expected and all(not row.ids for row in b.rows)
    assert [len(row.ids) for row in b.rows] == [0, 0, 0]
    stepped = batch.step()  # columns 28-29: the prompt is complete, b's rows join and sample
    assert len(stepped) == 4 and batch.prefilling_rows == 0
    assert all(len(row.ids) == 1 for row in b.rows) and not any(row.ids for row in c.rows)
    assert batch.generations == 2
    while not batch.empty:
        batch.step()
    for generation in (a, b):
        assert_as_alone(policy, generation)


def test_prompts_of_different_lengths_prefill_in_groups_when_padding_costs_more_than_a_forward():
    """Columns left 10, 500, 12, 480, 11 at 128 a forward: one group costs
    128 + 5 x 500 = 2628; the three short ones apart from the two long ones
    128 + 3 x 12 + 128 + 2 x 500 = 1292; each long one alone 1400; so two
    groups, shortest first. At 2000 a forward one group (4500 < 5036); at
    0, one group (costed without forwards)."""
    remaining = [10, 500, 12, 480, 11]
    assert _partition(remaining, 128) == ([[0, 4, 2], [3, 1]], 1292)
    assert _partition(remaining, 2000) == ([[0, 4, 2, 3, 1]], 4500)
    assert _partition(remaining, 0) == ([[0, 4, 2, 3, 1]], 2500)
    assert _partition([7], 128) == ([[0]], 128 + 7)


def test_a_step_of_joiners_prefills_short_and_long_prompts_apart(policy):
    """At 8 columns a forward, SHORT (2 tokens), MEDIUM (6) and LONG (29)
    joining together: one group 8 + 3 x 29 = 95, SHORT and MEDIUM apart from
    LONG 8 + 2 x 6 + 8 + 29 = 57, each alone 61: two groups of widths 6 and
    29 (prefilled a chunk of 4 tokens a step, so both are still there after
    the first). The short group joins first; every sample is what its
    request gives alone."""
    batch = DecodeBatch(policy, max_rows=16, prefill_chunk_tokens=4, prefill_group_cost_tokens=8)
    a = start(policy, [LONG, SHORT], max_new_tokens=10, n=2, seed=11)
    b = start(policy, [MEDIUM], max_new_tokens=10, temperature=0.7, seed=12)
    batch.step([a, b])
    assert [group.width for group in batch._prefilling] == [6, 29]
    assert [group.prompts for group in batch._prefilling] == [2, 1]
    while batch.prefilling_rows == 5:
        batch.step()
    assert sorted(len(row.prompt_ids) for row in batch.rows) == [2, 2, 6] and batch.prefilling_rows == 2
    while not batch.empty:
        batch.step()
    for generation in (a, b):
        assert_as_alone(policy, generation)


def test_a_generation_cancelled_while_prefilling_leaves_nothing_behind(policy):
    batch = DecodeBatch(policy, max_rows=8, prefill_chunk_tokens=4)
    d = start(policy, [LONG], n=2, seed=4)
    batch.step([d])
    assert batch.generations == 1 and batch.prefilling_rows == 2 and not batch.empty
    d.cancel()
    assert batch.step() == [] and batch.empty and batch.allocated_tokens == 0


# -- admission control, through a server ---------------------------------------

# Two rows of 250 new tokens hold the batch (4 rows) while others queue.
BUDGET = DecodingConfig(max_batch_rows=4, max_batch_tokens=600, max_queued_generations=1)


@pytest.fixture(scope="module")
def small_server(policy_dir):
    settings = PolicySettings(model_dir=str(policy_dir), port=0, metrics_port=0, decoding=BUDGET)
    with BackgroundServer(lambda: create_server(settings)) as running:
        yield running


def test_a_request_that_can_never_fit_is_refused_at_once(small_server):
    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
    with PolicyClient(small_server.target) as client:
        expect_error(lambda: client.generate([MEDIUM], n=5), exhausted,
                     "prompts x sampling.n = 5 samples, over the 4 samples the server decodes at once (max_batch_rows)")
        # 3 rows x (6 prompt tokens + 200) = 618 > 600.
        expect_error(lambda: client.generate([MEDIUM], n=3, max_new_tokens=200), exhausted,
                     "3 samples x (longest prompt + sampling.max_new_tokens=200) = 618 KV-cache tokens, over the "
                     "server's budget of 600 (max_batch_tokens)")
        expect_error(lambda: list(client.generate_stream(MEDIUM, n=5)), exhausted, "(max_batch_rows)")
        assert len(client.generate([MEDIUM], n=3, max_new_tokens=190).samples) == 3  # 3 x 196 fits


def test_requests_wait_for_room_then_a_full_queue_refuses(small_server):
    registry = small_server.running.registry
    with PolicyClient(small_server.target) as client, grpc.insecure_channel(small_server.target) as raw:
        # 2 rows x (6 + 250) = 512 tokens: holds the batch until they end.
        holder = client.generate_stream(MEDIUM, max_new_tokens=250, temperature=1.0, n=2, seed=1)
        next(holder)
        queued = {}
        waiter = threading.Thread(target=lambda: queued.update(
            response=client.generate([SHORT], max_new_tokens=2, temperature=1.0, n=3)))
        waiter.start()  # 2 + 3 rows > 4: waits in the queue
        wait_until(lambda: sample_value(registry, "arbiter_queue_depth", service="policy") == 1,
                   what="the second request to be queued")
        # A channel without the client's retry policy: the refusal itself, not a retry of it.
        stub = policy_pb2_grpc.PolicyServiceStub(raw)
        request = policy_pb2.GenerateRequest(prompts=[policy_pb2.PromptInput(text=SHORT)],
                                             sampling=policy_pb2.SamplingParams(max_new_tokens=2))
        expect_error(lambda: stub.Generate(request, timeout=30), grpc.StatusCode.UNAVAILABLE,
                     "the queue of requests waiting for room in the decoding batch is full (1, "
                     "max_queued_generations); retry with backoff")
        assert waiter.is_alive()
        holder.cancel()  # its rows leave: the queued request gets room
        waiter.join(timeout=30)
        assert len(queued["response"].samples) == 3
    wait_until(lambda: sample_value(registry, "arbiter_policy_active_rows") == 0, what="the batch to empty")
    assert sample_value(registry, "arbiter_policy_kv_reserved_tokens") == 0


def test_with_batching_off_requests_never_share_a_step(policy_dir):
    settings = PolicySettings(model_dir=str(policy_dir), port=0, decoding=DecodingConfig(continuous_batching=False))
    with BackgroundServer(lambda: create_server(settings)) as server:
        async def concurrent():
            return await asyncio.gather(*[
                server.engine.generate([Prompt(text=MEDIUM)], SamplingParams(max_new_tokens=20, temperature=1.0, n=2))
                for _ in range(3)
            ])

        results = server.run(concurrent())
        registry = server.running.registry
        # Three requests at once, each decoding alone: every step had one generation.
        steps = sample_value(registry, "arbiter_policy_decode_batch_generations_count")
        assert steps >= 3 and sample_value(registry, "arbiter_policy_decode_batch_generations_sum") == steps
        assert all(len(r.samples) == 2 for r in results)


def test_a_long_prompt_prefills_in_chunks_beside_a_running_stream(policy_dir, policy):
    """Through a server with --prefill-chunk-tokens 1: 4 samples of an
    87-token prompt (one prefill, shared) joining a running stream prefill a
    column a step (the gauge shows their rows; the batch-level test checks
    the stream's row samples meanwhile) and come out as decoded alone."""
    settings = PolicySettings(model_dir=str(policy_dir), port=0, metrics_port=0,
                              decoding=DecodingConfig(prefill_chunk_tokens=1))
    prompt = " ".join([LONG] * 3)
    with BackgroundServer(lambda: create_server(settings)) as server, PolicyClient(server.target) as client:
        registry = server.running.registry
        stream = client.generate_stream(MEDIUM, max_new_tokens=250, temperature=1.0, seed=1)
        next(stream)
        done = {}
        waiter = threading.Thread(target=lambda: done.update(
            response=client.generate([prompt], max_new_tokens=6, temperature=0.0, n=4)))
        waiter.start()
        wait_until(lambda: sample_value(registry, "arbiter_policy_prefilling_rows") == 4,
                   what="the long prompt's 4 rows to be prefilling")
        waiter.join(timeout=60)
        stream.cancel()
        assert sample_value(registry, "arbiter_policy_prefilling_rows") == 0
    solo = start(policy, [prompt], max_new_tokens=6, temperature=0.0)
    while not solo.done:
        solo.step()
    assert [list(s.completion_token_ids) for s in done["response"].samples] == [solo.rows[0].ids] * 4
