"""Unit tests of the dynamic batcher's policy, with a recording model in place
of a real one (the real model path is covered by the service tests), and one
check through the reward service: the cap metric, and an idle model's lone
request run at once."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from helpers import BackgroundServer, metric_value, wait_until_async

from arbiter.batching import EXPLORE_EVERY, OBSERVED_WINDOW, BatchingConfig, BatchSizer, DynamicBatcher, ItemShape
from arbiter.config import ConfigError
from arbiter.errors import Overloaded, ShuttingDown
from arbiter.v1 import common_pb2, common_pb2_grpc, reward_pb2, reward_pb2_grpc
from services.reward.server import create_server
from services.reward.settings import RewardSettings


class Recorder:
    """Records each batch; ``entered`` is set once a batch is inside the model,
    where ``gate`` (open unless a test closes it) holds it."""

    def __init__(self):
        self.batches: list[list[int]] = []
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, items):
        self.entered.set()
        self.gate.wait()
        self.batches.append(list(items))
        return [x * 10 for x in items]


@pytest.fixture
def executor():
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool


def run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_coalesce_into_one_batch(executor):
    """The first runs at once on the idle model; the nine sent with it,
    queued while it runs, share the next batch."""
    model = Recorder()
    model.gate.clear()  # holds the first batch in the model until the nine are queued
    batcher = DynamicBatcher(model, BatchingConfig(max_batch_size=64, max_queue_delay_ms=50.0), executor)

    async def main():
        pending = asyncio.gather(*(batcher.submit([i]) for i in range(10)))
        await wait_until_async(lambda: model.entered.is_set() and batcher.queue_depth == 9,
                               what="the first item in the model and nine queued behind it")
        model.gate.set()
        results = await pending
        await batcher.close()
        return results

    assert run(main()) == [[i * 10] for i in range(10)]
    assert model.batches == [[0], list(range(1, 10))]


def test_batches_never_exceed_max_batch_size_and_keep_order(executor):
    model = Recorder()
    batcher = DynamicBatcher(model, BatchingConfig(max_batch_size=4, max_queue_delay_ms=50.0), executor)

    async def main():
        out = await batcher.submit(list(range(10)))
        await batcher.close()
        return out

    assert run(main()) == [i * 10 for i in range(10)]
    assert [len(b) for b in model.batches] == [4, 4, 2]


def test_cancelled_request_frees_its_slot(executor):
    model = Recorder()
    model.gate.clear()  # hold the first batch inside the model
    batcher = DynamicBatcher(model, BatchingConfig(max_batch_size=8, max_queue_delay_ms=0.0), executor)

    async def main():
        first = asyncio.create_task(batcher.submit([1]))
        await wait_until_async(model.entered.is_set, what="the first batch to enter the model")
        doomed = asyncio.create_task(batcher.submit([2, 3]))
        survivor = asyncio.create_task(batcher.submit([4]))
        await wait_until_async(lambda: batcher.queue_depth == 3, what="both requests to be queued")
        doomed.cancel()
        await wait_until_async(lambda: batcher.queue_depth == 1, what="the cancelled items to leave the queue")
        model.gate.set()
        assert await first == [10]
        assert await survivor == [40]
        with pytest.raises(asyncio.CancelledError):
            await doomed
        await batcher.close()

    run(main())
    assert model.batches == [[1], [4]]


def test_full_queue_is_refused_with_overloaded(executor):
    model = Recorder()
    model.gate.clear()
    batcher = DynamicBatcher(
        model, BatchingConfig(max_batch_size=2, max_queue_delay_ms=0.0, max_queue_size=4), executor
    )

    async def main():
        running = asyncio.create_task(batcher.submit([1, 2]))
        await wait_until_async(model.entered.is_set, what="the first batch to enter the model")
        queued = asyncio.create_task(batcher.submit([3, 4, 5, 6]))
        await wait_until_async(lambda: batcher.queue_depth == 4, what="the queue to fill")
        with pytest.raises(Overloaded, match="queue is full"):
            await batcher.submit([7])
        model.gate.set()
        assert await running == [10, 20]
        assert await queued == [30, 40, 50, 60]
        await batcher.close()

    run(main())


def test_disabled_batching_runs_each_request_alone(executor):
    model = Recorder()
    batcher = DynamicBatcher(model, BatchingConfig(max_batch_size=4, enabled=False), executor)

    async def main():
        await asyncio.gather(*(batcher.submit([i]) for i in range(5)))
        await batcher.submit(list(range(6)))

    run(main())
    assert sorted(model.batches[:5]) == [[i] for i in range(5)]
    assert model.batches[5:] == [[0, 1, 2, 3], [4, 5]]


def test_close_drains_queue_then_refuses(executor):
    model = Recorder()
    model.gate.clear()
    batcher = DynamicBatcher(model, BatchingConfig(max_batch_size=2, max_queue_delay_ms=0.0), executor)

    async def main():
        pending = asyncio.gather(*(batcher.submit([i]) for i in range(6)))
        await wait_until_async(lambda: model.entered.is_set() and batcher.queue_depth == 5,
                               what="the first item in the model (alone: it found the model idle) and five queued")
        # Opens the gate only once close() below is waiting: it starts with all the work outstanding.
        asyncio.get_running_loop().call_soon(model.gate.set)
        await batcher.close()
        assert await pending == [[i * 10] for i in range(6)]
        with pytest.raises(ShuttingDown):
            await batcher.submit([9])

    run(main())
    assert model.batches == [[0], [1, 2], [3, 4], [5]]


def test_model_failure_fails_that_batch_only(executor):
    calls = []

    def flaky(items):
        calls.append(list(items))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return items

    batcher = DynamicBatcher(flaky, BatchingConfig(max_batch_size=8, max_queue_delay_ms=0.0), executor)

    async def main():
        with pytest.raises(RuntimeError, match="boom"):
            await batcher.submit([1])
        assert await batcher.submit([2]) == [2]
        await batcher.close()

    run(main())


async def one_held_one_queued(batcher: DynamicBatcher, model: Recorder) -> tuple[asyncio.Task, asyncio.Task]:
    """Requests for [1] and [2]: the first inside the model (held by its
    closed gate), the second queued behind it."""
    first = asyncio.create_task(batcher.submit([1]))
    await wait_until_async(model.entered.is_set, what="the first batch to enter the model")
    second = asyncio.create_task(batcher.submit([2]))
    await wait_until_async(lambda: batcher.queue_depth == 1, what="the second item to queue")
    return first, second


def test_a_stopped_model_thread_fails_queued_requests_with_shutting_down():
    """The executor is shut down while a batch runs: the request queued
    behind it gets ShuttingDown (retryable), not a wait that never ends."""
    model = Recorder()
    model.gate.clear()
    pool = ThreadPoolExecutor(max_workers=1)
    batcher = DynamicBatcher(model, BatchingConfig(max_batch_size=8), pool)

    async def main():
        first, queued = await one_held_one_queued(batcher, model)
        pool.shutdown(wait=False)
        model.gate.set()
        assert await first == [10]
        with pytest.raises(ShuttingDown):
            await asyncio.wait_for(queued, 30)
        await asyncio.wait_for(batcher.close(), 30)

    run(main())
    pool.shutdown(wait=True)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="max_batch_size"):
        BatchingConfig(max_batch_size=0)
    with pytest.raises(ValueError, match="max_queue_size"):
        BatchingConfig(max_batch_size=8, max_queue_size=4)
    with pytest.raises(ConfigError, match="batch_size_policy='sometimes' is invalid: must be one of auto, fixed"):
        BatchingConfig(batch_size_policy="sometimes")
    with pytest.raises(ConfigError, match="batch_calibration_s=-1.0 is invalid: must be >= 0"):
        BatchingConfig(batch_calibration_s=-1.0)


# -- an idle model runs at once; the delay is for a remote model with a batch in flight ----------


def test_idle_model_runs_a_lone_item_at_once_and_later_arrivals_form_the_next_batch(executor):
    model = Recorder()
    # A queue delay of ten minutes: a lone item served within the test's
    # timeout was not held back by it.
    batcher = DynamicBatcher(model, BatchingConfig(max_batch_size=8, max_queue_delay_ms=600_000.0), executor)

    async def main():
        assert await asyncio.wait_for(batcher.submit([1]), 30) == [10]
        model.entered.clear()
        model.gate.clear()
        first = asyncio.create_task(batcher.submit([2]))
        await wait_until_async(model.entered.is_set, what="the second batch to enter the model")
        later = [asyncio.create_task(batcher.submit([x])) for x in (3, 4, 5)]
        await wait_until_async(lambda: batcher.queue_depth == 3, what="three items to queue behind it")
        model.gate.set()
        assert await asyncio.wait_for(asyncio.gather(first, *later), 30) == [[20], [30], [40], [50]]
        await batcher.close()

    run(main())
    assert model.batches == [[1], [2], [3, 4, 5]]


def test_the_model_thread_starts_the_next_batch_while_the_loop_is_busy(executor):
    """When a pass ends, the model thread forms the next batch from the queue
    itself: here the event loop is blocked outright (as a loop answering the
    callers just served holds the GIL), and the queued item still enters the
    model."""
    model = Recorder()
    model.gate.clear()
    batcher = DynamicBatcher(model, BatchingConfig(max_batch_size=8), executor)

    async def main():
        first, second = await one_held_one_queued(batcher, model)
        model.entered.clear()
        model.gate.set()
        # Blocks the loop thread: nothing on the loop can start the second batch.
        assert model.entered.wait(timeout=30), "the second batch waited for the event loop"
        assert await first == [10] and await second == [20]
        await batcher.close()

    run(main())
    assert model.batches == [[1], [2]]


def test_remote_model_waits_for_a_batch_to_fill_only_while_one_is_in_flight():
    """With nothing in flight a remote batch goes at once; with one in flight
    the next waits (here: up to ten minutes) until it holds max_batch_size."""
    release = asyncio.Event
    batches = []

    async def scenario():
        gate = release()

        async def remote(items):
            batches.append(list(items))
            await gate.wait()
            return [x * 2 for x in items]

        batcher = DynamicBatcher(remote, BatchingConfig(max_batch_size=3, max_queue_delay_ms=600_000.0,
                                                        batch_size_policy="fixed"), None, max_in_flight=2)
        first = asyncio.create_task(batcher.submit([1]))
        await wait_until_async(lambda: batches == [[1]], what="the first item to go out alone")
        rest = [asyncio.create_task(batcher.submit([x])) for x in (2, 3)]
        await wait_until_async(lambda: batcher.queue_depth == 2, what="two items to wait for a third")
        assert batches == [[1]]
        rest.append(asyncio.create_task(batcher.submit([4])))
        await wait_until_async(lambda: len(batches) == 2, what="the full second batch to go out")
        gate.set()
        results = await asyncio.wait_for(asyncio.gather(first, *rest), 30)
        await batcher.close()
        return results

    assert asyncio.run(scenario()) == [[2], [4], [6], [8]]
    assert batches == [[1], [2, 3, 4]]


# -- items of like length share a batch --------------------------------------------------------


def test_batches_group_items_by_length(executor):
    """Items are their own lengths in tokens. After the held first batch,
    the oldest item (100) takes those nearest it in length, none shorter than
    half the longest: 110, then 60 (110/60 < 2), not 200 (200/60 > 2); the
    short ones (all counted as 16 tokens) go together; 200 alone."""
    model = Recorder()
    model.gate.clear()
    shape = ItemShape(tokens=lambda x: x, sample=lambda n: n, max_tokens=256)
    batcher = DynamicBatcher(model, BatchingConfig(max_batch_size=8, batch_size_policy="fixed"), executor,
                             shape=shape)

    async def main():
        held = asyncio.create_task(batcher.submit([5]))
        await wait_until_async(model.entered.is_set, what="the first batch to enter the model")
        queued = [asyncio.create_task(batcher.submit([x])) for x in (100, 20, 110, 16, 60, 200, 8)]
        await wait_until_async(lambda: batcher.queue_depth == 7, what="seven items to queue")
        model.gate.set()
        await asyncio.gather(held, *queued)
        await batcher.close()

    run(main())
    assert model.batches == [[5], [100, 110, 60], [20, 16, 8], [200]]


# -- the batch cap, measured -------------------------------------------------------------------


def sizer_with_16_token_calibration(max_tokens=64):
    """Calibrated at 16 tokens with seconds per batch of 1, 2, 4, 8, 16, 32
    items: per item 1.0, 0.75, 0.625, 0.565, 0.5625, 0.625 ms. The best is 16
    (0.5625); 8 is within 1 % of it (0.565 <= 0.568125), and smaller."""
    sizer = BatchSizer(max_batch_size=32, max_tokens=max_tokens)
    for size, ms in ((1, 1.0), (2, 1.5), (4, 2.5), (8, 4.52), (16, 9.0), (32, 20.0)):
        sizer.record(size, 16, ms / 1000, calibration=True)
    return sizer


def test_cap_is_the_smallest_size_within_1_percent_of_the_best_and_scales_to_unmeasured_lengths():
    sizer = sizer_with_16_token_calibration()
    assert sizer.lengths == [16, 32, 64]
    # 32 and 64 tokens are not measured: the 16-token cap's 128 tokens per batch.
    assert sizer.caps() == {16: 8, 32: 4, 64: 2}
    assert (sizer.cap(1), sizer.cap(17), sizer.cap(64), sizer.cap(1000)) == (8, 4, 2, 2)


def test_served_batches_refine_the_cap():
    sizer = sizer_with_16_token_calibration()
    # Served batches of 8 at 0.6 ms per item: the level of the curve is now
    # 0.6/0.565 of calibration, the shape unchanged: 16 estimates 0.5973, 8
    # stays within 1 % of it (0.6 <= 0.6033). No change.
    assert sizer.record(8, 16, 8 * 0.6 / 1000) == []
    # Served batches of 16 at 0.5 ms per item: 8 (0.6) is now beyond 1 % of
    # 16 (0.5 * 1.01 = 0.505): the cap is 16, and the unmeasured lengths
    # follow (256 tokens per batch).
    assert sizer.record(16, 16, 16 * 0.5 / 1000) == [(16, 16), (32, 8), (64, 4)]
    # 12 items fill no size of the grid (13 to 16 count as 16): no figure.
    assert sizer.record(12, 16, 1.0) == []


def test_padding_in_served_batches_counts_against_their_size():
    """Calibrated at 16 tokens (per item 1.0, 0.75, 0.625, 0.575, 0.5,
    0.625 ms for 1..32 items): 16 is the best, by more than 1 %."""
    sizer = BatchSizer(max_batch_size=32, max_tokens=64)
    for size, ms in ((1, 1.0), (2, 1.5), (4, 2.5), (8, 4.6), (16, 8.0), (32, 20.0)):
        sizer.record(size, 16, ms / 1000, calibration=True)
    assert sizer.caps() == {16: 16, 32: 8, 64: 4}
    # Served batches of 16 padded to 16 tokens hold 128 tokens of items: per
    # token of the items, twice calibration (which had no padding). Alone,
    # that raises every size's estimate alike: no change.
    assert sizer.record(16, 16, 8.0 / 1000, tokens=128) == []
    # Served batches of 8 (nearer lengths, no padding) at their calibrated
    # speed: 4.6/128 = 0.036 us per token beats 16's 8.0/128 = 0.0625: the
    # cap is 8, and the lengths scaled from it follow (128 tokens per batch).
    assert sizer.record(8, 16, 4.6 / 1000, tokens=128) == [(16, 8), (32, 4), (64, 2)]


def test_one_slow_batch_does_not_move_the_cap_for_long():
    """Calibrated at 16 tokens with 16 the best (per item 1.0, 0.75, 0.625,
    0.575, 0.5, 0.625 ms for 1..32 items). Served: 8 at 0.575 ms per item and
    16 at 0.5: the cap is 16. One batch of 16 ten times slower (on a GPU, a
    library's first call at a new shape) makes 16's last batches [0.5, 5.0],
    median 2.75, over 8's 0.575: the cap drops to 8; one more batch at 0.5
    makes them [0.5, 5.0, 0.5], median 0.5, and the cap is 16 again. (A
    running mean weighting the new batch 1/4 would be at 1.34 then, and over
    8's 0.575 x 1.01 for eight more batches of 0.5.) A lasting slowdown
    shows at the median: one batch at 0.7 ms gives [0.5, 5.0, 0.5, 0.7],
    median 0.6, over 8's 0.575 by more than 1 %: the cap is 8; with the
    window full, the spike leaves it and the median stays 0.7."""
    sizer = BatchSizer(max_batch_size=32, max_tokens=16)
    for size, ms in ((1, 1.0), (2, 1.5), (4, 2.5), (8, 4.6), (16, 8.0), (32, 20.0)):
        sizer.record(size, 16, ms / 1000, calibration=True)
    assert sizer.record(8, 16, 8 * 0.575 / 1000) == []
    assert sizer.record(16, 16, 16 * 0.5 / 1000) == []
    assert sizer.caps() == {16: 16}
    assert sizer.record(16, 16, 16 * 5.0 / 1000) == [(16, 8)]
    assert sizer.record(16, 16, 16 * 0.5 / 1000) == [(16, 16)]
    assert sizer.record(16, 16, 16 * 0.7 / 1000) == [(16, 8)]
    assert OBSERVED_WINDOW == 5
    assert sizer.record(16, 16, 16 * 0.7 / 1000) == []  # [0.5, 5.0, 0.5, 0.7, 0.7]: 0.7
    assert sizer.record(16, 16, 16 * 0.7 / 1000) == []  # [5.0, 0.5, 0.7, 0.7, 0.7]: 0.7
    assert sizer.caps() == {16: 8}


def test_saturated_batches_explore_one_size_up_and_one_down():
    sizer = sizer_with_16_token_calibration()
    assert sizer.size_for(16, waiting=100) == 16  # never served: tried at once
    assert sizer.record(16, 16, 9.0 / 1000) == []  # as calibrated: no change
    sizes = [sizer.size_for(16, waiting=100) for _ in range(EXPLORE_EVERY)]
    half = EXPLORE_EVERY // 2
    assert sizes == [8] * (half - 1) + [4] + [8] * (half - 1) + [16]
    assert sizer.size_for(16, waiting=5) == 5  # no more than is waiting, no exploring


def test_a_size_above_the_cap_never_served_is_tried_at_once():
    sizer = sizer_with_16_token_calibration()
    assert sizer.cap(32) == 4  # extrapolated: nothing measured at 32 tokens
    assert sizer.size_for(32, waiting=6) == 4  # 8 would need more waiting
    assert sizer.size_for(32, waiting=100) == 8
    # One figure at 32 tokens (8 items at 0.5 ms each) compares no sizes: no change.
    assert sizer.record(8, 32, 8 * 0.5 / 1000) == []
    # With the cap's own batches (4 at 0.6 ms each), 8 is the better by more
    # than 1 %: the cap; and 64 tokens, unmeasured, now scale from the nearest
    # measured length, 32: 8 x 32 = 256 tokens per batch, 4 items of 64.
    assert sizer.record(4, 32, 4 * 0.6 / 1000) == [(32, 8), (64, 4)]
    assert sizer.size_for(32, waiting=100) == 16  # the next size up, never measured here either


def test_a_larger_size_nothing_measured_is_tried_once_past_a_plateau():
    """Calibration stopped at 8 items (per item 1.0, 0.75, 0.6, 0.6 ms: 4 and
    8 alike, a plateau): the cap is 4, and 16 and 32 have no figure."""
    sizer = BatchSizer(max_batch_size=32, max_tokens=16)
    for size, ms in ((1, 1.0), (2, 1.5), (4, 2.4), (8, 4.8)):
        sizer.record(size, 16, ms / 1000, calibration=True)
    assert sizer.caps() == {16: 4}
    assert sizer.size_for(16, waiting=100) == 8  # the neighbour, never served
    assert sizer.record(8, 16, 4.8 / 1000) == []  # as calibrated: still a plateau
    assert sizer.size_for(16, waiting=12) == 4  # 16 would need 16 waiting
    assert sizer.size_for(16, waiting=100) == 16  # never measured at all: tried at once
    # 0.5 ms per item beats the plateau's 0.6 by more than 1 %: the cap.
    assert sizer.record(16, 16, 16 * 0.5 / 1000) == [(16, 16)]


def test_a_failed_size_is_never_used_at_that_length_or_longer():
    sizer = sizer_with_16_token_calibration(max_tokens=128)
    assert sizer.caps() == {16: 8, 32: 4, 64: 2, 128: 1}
    assert sizer.record_failure(4, 32) == [(32, 2)]  # too big here: the largest size below
    assert sizer.caps() == {16: 8, 32: 2, 64: 2, 128: 1}


def test_fixed_policy_always_uses_max_batch_size():
    sizer = BatchSizer(max_batch_size=24, max_tokens=64, auto=False)
    assert sizer.record(8, 16, 0.001, calibration=True) == []
    assert sizer.caps() == {16: 24, 32: 24, 64: 24}
    assert sizer.size_for(16, waiting=100) == 24


class CostModel:
    """A model whose forward pass advances a fake clock by
    1 ms + 10 us * x + 0.1 us * x^2 for x = batch size * longest item: per
    token that is 1000/x + 10 + 0.1 x us, least at x = 100 tokens. Items are
    their own lengths."""

    def __init__(self):
        self.now = 0.0

    def clock(self):
        return self.now

    def __call__(self, items):
        x = len(items) * max(items)
        self.now += (1000 + 10 * x + 0.1 * x * x) / 1e6
        return items


def test_calibration_measures_each_length_and_picks_its_best_size(executor):
    """Per token, x = 16, 32, ..., 512: 74.1, 44.45, 32.03, 30.61, 39.5,
    63.1 us. At 16 tokens the best is 8 items (x=128; 4 items, 32.03, is
    beyond 1 %); at 32 tokens 4, at 64 tokens 2, at 128 tokens 1."""
    model = CostModel()
    shape = ItemShape(tokens=lambda x: x, sample=lambda n: n, max_tokens=128)
    seen = []

    class Caps:
        def on_batch(self, size, seconds): pass

        def on_queue_depth(self, depth): pass

        def on_batch_cap(self, model_version, tokens, cap):
            seen.append((model_version, tokens, cap))

    batcher = DynamicBatcher(model, BatchingConfig(max_batch_size=32), executor, Caps(), shape=shape,
                             label="v7", clock=model.clock)

    async def main():
        await batcher.calibrate()
        assert seen == []  # nothing reported before the version serves
        batcher.report_caps()

    run(main())
    assert batcher.sizer.caps() == {16: 8, 32: 4, 64: 2, 128: 1}
    assert seen == [("v7", 16, 8), ("v7", 32, 4), ("v7", 64, 2), ("v7", 128, 1)]


def test_a_pass_is_timed_on_the_model_thread_not_while_waiting_for_it(executor):
    """The model thread is busy for 10 s of the batcher's clock before it
    takes the lone item, whose pass then takes 1 ms: the size's figure is
    the pass alone, not the wait (a loaded machine's hand-off delays)."""
    model = CostModel()
    busy = threading.Event()

    def other_work():
        busy.wait()
        model.now += 10.0

    def one_ms_pass(items):
        model.now += 0.001
        return items

    shape = ItemShape(tokens=lambda x: x, sample=lambda n: n, max_tokens=16)
    batcher = DynamicBatcher(one_ms_pass, BatchingConfig(max_batch_size=4), executor, shape=shape,
                             clock=model.clock)
    executor.submit(other_work)

    async def main():
        waiting = asyncio.ensure_future(batcher.submit([16]))
        await asyncio.sleep(0)  # the lone item is handed to the model thread, behind the other work
        busy.set()
        return await waiting

    assert run(main()) == [16]
    assert batcher.sizer._observed[0][0] == pytest.approx(0.001 / 16)


# -- through the reward service ----------------------------------------------------------------


def test_reward_service_exports_each_versions_caps_and_runs_a_lone_request_at_once(tiny_models):
    """A queue delay of ten minutes, and a lone request answered within its
    30 s deadline, in one forward pass of one item: an idle model does not
    wait. Every length bucket of a version has its cap on /metrics (the tiny
    model takes 256 tokens: buckets 16 to 256); a version loaded later
    measures its own, and its series go when it is unloaded."""
    settings = RewardSettings(model_dir=str(tiny_models["reward"]), port=0, metrics_port=0,
                              batching=BatchingConfig(max_queue_delay_ms=600_000.0))
    buckets = ("16", "32", "64", "128", "256")

    def caps(version):
        return [metric_value(srv, "arbiter_batch_size_cap", service="reward", model_version=version, tokens=t)
                for t in buckets]

    with BackgroundServer(lambda: create_server(settings)) as srv, grpc.insecure_channel(srv.target) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        request = reward_pb2.ScoreRequest(
            inputs=[reward_pb2.RewardInput(text=reward_pb2.TextPair(prompt="Hi.", response=" Hello!"))])
        assert len(stub.Score(request, timeout=30).results) == 1
        assert metric_value(srv, "arbiter_batch_size_count", service="reward") == 1
        assert metric_value(srv, "arbiter_batch_size_sum", service="reward") == 1
        assert all(cap in range(1, 33) for cap in caps("v0")), caps("v0")

        models = common_pb2_grpc.ModelServiceStub(channel)
        models.LoadModelVersion(common_pb2.LoadModelVersionRequest(
            path=str(tiny_models["reward"]), version="v1", activate=False), timeout=120)
        assert all(cap in range(1, 33) for cap in caps("v1")), caps("v1")
        models.UnloadModelVersion(common_pb2.UnloadModelVersionRequest(version="v1"), timeout=60)
        assert caps("v1") == [None] * len(buckets)
        assert all(cap in range(1, 33) for cap in caps("v0"))
