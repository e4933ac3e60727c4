"""Unit tests of the dynamic batcher's policy, with a recording model in place
of a real one (the real model path is covered by the service tests)."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import wait_until_async

from arbiter.batching import BatchingConfig, DynamicBatcher
from arbiter.errors import Overloaded, ShuttingDown


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
    model = Recorder()
    batcher = DynamicBatcher(model, BatchingConfig(max_batch_size=64, max_queue_delay_ms=50.0), executor)

    async def main():
        results = await asyncio.gather(*(batcher.submit([i]) for i in range(10)))
        await batcher.close()
        return results

    assert run(main()) == [[i * 10] for i in range(10)]
    assert model.batches == [list(range(10))]


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
        await wait_until_async(lambda: model.entered.is_set() and batcher.queue_depth == 4,
                               what="two items in the model and four queued")
        # Opens the gate only once close() below is waiting: it starts with all the work outstanding.
        asyncio.get_running_loop().call_soon(model.gate.set)
        await batcher.close()
        assert await pending == [[i * 10] for i in range(6)]
        with pytest.raises(ShuttingDown):
            await batcher.submit([9])

    run(main())
    assert model.batches == [[0, 1], [2, 3], [4, 5]]


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


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="max_batch_size"):
        BatchingConfig(max_batch_size=0)
    with pytest.raises(ValueError, match="max_queue_size"):
        BatchingConfig(max_batch_size=8, max_queue_size=4)
