"""Triton Python-backend model for a policy version: generation with
Arbiter's own engine, in decoupled (streaming) mode. ``arbiter triton export
--kind policy`` writes it as ``REPO/NAME/N/model.py`` beside the checkpoint
and a copy of the ``arbiter`` package (``N/engine/``), so Triton runs exactly
the engine the in-process policy service runs: ``PolicyModel`` and the
continuous-batching ``DecodeScheduler`` (``arbiter/policy/scheduler.py``).

In-flight batching across Triton requests: ``execute`` only reads and checks
a request and hands it to the scheduler's event loop (a thread of this
process), then returns, so Triton passes the next requests in at once; they
join the running decoding batch at the next step boundary, and each request's
tokens go back through its response sender as they are sampled. The tensors
are ``arbiter.backends.signatures.POLICY``:

in   INPUT_IDS int64 [P, T] right-padded prompts, PROMPT_LENGTHS int64 [P] (>= 1)
     MAX_NEW_TOKENS, TOP_K, N, SEED int64 [1]; TEMPERATURE, TOP_P fp64 [1]
     STOP bytes [S] (UTF-8 stop strings), STREAM bool [1]
out  ROWS, TOKEN_IDS int64 [E], LOGPROBS fp64 [E], FINISH int64 [E] (0 running,
     1 length, 2 stop, 3 eos): one entry per sampled token, row = prompt x N + sample;
     PEAK_GENERATIONS int64 [1]: the most requests decoding in the batch at once so
     far while this one ran (itself included): in-flight batching, observable.
     STREAM: one response per decoding step; else one response with every token.
     The last response carries Triton's final flag.

Errors travel as the response's error message, whose first word is the
gRPC status the service should answer with (``CODE: message``): a streamed
response carries no status code of its own.
"""

import asyncio
import json
import math
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

ENGINE_DIR = "engine"
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# Non-streamed requests are checked for cancellation this often (streamed
# ones at every step they send).
_CANCEL_POLL_S = 0.05


class _Observer:
    """The scheduler's observer. Not Triton custom metrics: while several
    stubs (versions, models) held the same custom metric family, Triton
    2.51's server process aborted with heap corruption in this project's
    tests as versions were loaded and unloaded, and never without them; the
    engine's sharing is reported per request instead (``PEAK_GENERATIONS``)."""

    def __init__(self):
        # Requests in flight -> the most requests admitted to the batch at once while they ran.
        self.peaks = {}

    def on_batch(self, size, seconds):
        pass

    def on_decode_step(self, generations):
        pass

    def on_budget(self, rows, tokens, generations):
        for key, peak in self.peaks.items():
            if generations > peak:
                self.peaks[key] = generations

    def on_queue_depth(self, depth):
        pass

    def on_prefilling(self, rows):
        pass

    def on_prefix_cache(self, prompt_tokens, cached_tokens, held_tokens):
        pass


class RequestError(ValueError):
    def __init__(self, code, message):
        super().__init__(f"{code}: {message}")


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        if params.get("arbiter_kind") != "policy":
            raise ValueError(f"arbiter_kind {params.get('arbiter_kind')!r}: this model file serves policy versions")
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        # The engine exported with this version: Arbiter is not installed in Triton's environment.
        sys.path.insert(0, os.path.join(version_dir, ENGINE_DIR))
        import torch
        from transformers.utils import logging as hf_logging

        from arbiter.backends.placement import Placement
        from arbiter.backends.signatures import FINISH_CODES
        from arbiter.errors import InvalidInput, LimitExceeded, Overloaded, ShuttingDown
        from arbiter.policy.model import PolicyModel
        from arbiter.policy.scheduler import DecodeScheduler, DecodingConfig
        from arbiter.policy.types import ResolvedSampling

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        threads = int(params.get("torch_threads") or 0)
        if threads > 0:
            torch.set_num_threads(threads)
        if args.get("model_instance_kind") == "GPU":
            device = f"cuda:{int(args['model_instance_device_id'])}"
        else:
            device = "cpu"
        # A version that cannot serve (weights that do not load, NaN logits)
        # still initializes and answers every request with the reason: Triton
        # 2.51 can crash when a decoupled model's load fails while another
        # version of it is streaming, and the service probes each version it
        # loads, so it refuses this one (and unloads it) with that reason.
        self.load_error = None
        try:
            self.policy = PolicyModel.load(os.path.join(version_dir, "checkpoint"),
                                           placement=Placement.resolve(device, params.get("dtype") or "float32"))
        except Exception as err:  # noqa: BLE001 - reported to every request, see above
            self.load_error = f"{type(err).__name__}: {err}"
            return
        self.vocab = min(self.policy.model.get_input_embeddings().num_embeddings,
                         int(self.policy.model.get_output_embeddings().weight.shape[0]))
        self.max_tokens = self.policy.info.max_tokens
        decoding = DecodingConfig(
            continuous_batching=params.get("continuous_batching", "true") == "true",
            max_batch_rows=int(params["max_batch_rows"]),
            max_batch_tokens=int(params["max_batch_tokens"]),
            max_queued_generations=int(params["max_queued_generations"]),
            prefill_chunk_tokens=int(params["prefill_chunk_tokens"]),
            prefill_group_cost_tokens=int(params["prefill_group_cost_tokens"]),
            prefix_cache_tokens=int(params["prefix_cache_tokens"]),
            prefix_cache_block_tokens=int(params["prefix_cache_block_tokens"]),
        )
        self.ResolvedSampling = ResolvedSampling
        self.finish_codes = FINISH_CODES
        # Refusals the scheduler makes, by the status the service answers with.
        self.codes = ((LimitExceeded, "RESOURCE_EXHAUSTED"), (Overloaded, "UNAVAILABLE"),
                      (ShuttingDown, "UNAVAILABLE"), (InvalidInput, "INVALID_ARGUMENT"))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="policy-loop", daemon=True)
        self.thread.start()
        # One model thread: the scheduler's steps, one call at a time.
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="policy-model")
        self.waiting = {}  # non-streamed generations -> their response senders

        self.observer = _Observer()

        async def make():
            return DecodeScheduler(decoding, self.executor, self.observer)

        self.scheduler = asyncio.run_coroutine_threadsafe(make(), self.loop).result()
        self.watcher = asyncio.run_coroutine_threadsafe(self._watch_cancelled(), self.loop)

    # -- requests ------------------------------------------------------------------

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            if self.load_error is not None:
                message = f"FAILED_PRECONDITION: this version failed to load in Triton: {self.load_error}"
                sender.send(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message)),
                            flags=FINAL)
                continue
            try:
                prompts, params, stream = self._read(request)
            except RequestError as err:
                sender.send(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(err))),
                            flags=FINAL)
                continue
            asyncio.run_coroutine_threadsafe(self._serve(prompts, params, stream, sender), self.loop)
        return None

    def _read(self, request):
        def tensor(name):
            found = pb_utils.get_input_tensor_by_name(request, name)
            if found is None:
                raise RequestError("INVALID_ARGUMENT", f"input {name} is missing")
            return found.as_numpy()

        def scalar(name, kind):
            value = tensor(name).reshape(-1)
            if value.shape != (1,):
                raise RequestError("INVALID_ARGUMENT", f"{name} must hold one value, got {value.shape[0]}")
            return kind(value[0])

        ids = tensor("INPUT_IDS")
        lengths = tensor("PROMPT_LENGTHS").reshape(-1)
        if ids.ndim != 2 or ids.shape[0] != lengths.shape[0] or not ids.shape[0]:
            raise RequestError("INVALID_ARGUMENT", f"INPUT_IDS {list(ids.shape)} and PROMPT_LENGTHS "
                                                   f"{list(lengths.shape)} must be [P, T] and [P], P >= 1")
        if lengths.min() < 1 or lengths.max() > ids.shape[1]:
            raise RequestError("INVALID_ARGUMENT", f"PROMPT_LENGTHS must be in 1..{ids.shape[1]}")
        prompts = [ids[i, : lengths[i]].astype(np.int64).tolist() for i in range(ids.shape[0])]
        if min(min(p) for p in prompts) < 0 or max(max(p) for p in prompts) >= self.vocab:
            raise RequestError("INVALID_ARGUMENT", f"INPUT_IDS must be in 0..{self.vocab - 1}")
        max_new = scalar("MAX_NEW_TOKENS", int)
        temperature, top_p = scalar("TEMPERATURE", float), scalar("TOP_P", float)
        top_k, n, seed = scalar("TOP_K", int), scalar("N", int), scalar("SEED", int)
        stream = scalar("STREAM", bool)
        if max_new < 1:
            raise RequestError("INVALID_ARGUMENT", f"MAX_NEW_TOKENS must be >= 1, got {max_new}")
        if self.max_tokens is not None and max(lengths) + max_new > self.max_tokens:
            raise RequestError("INVALID_ARGUMENT", f"a prompt of {max(lengths)} tokens with MAX_NEW_TOKENS={max_new} "
                                                   f"exceeds the model's max of {self.max_tokens} tokens")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise RequestError("INVALID_ARGUMENT", f"TEMPERATURE must be >= 0, got {temperature}")
        if not (math.isfinite(top_p) and 0 < top_p <= 1):
            raise RequestError("INVALID_ARGUMENT", f"TOP_P must be in (0, 1], got {top_p}")
        if top_k < 0 or n < 1:
            raise RequestError("INVALID_ARGUMENT", f"TOP_K must be >= 0 and N >= 1, got {top_k} and {n}")
        try:
            stop = tuple(bytes(s).decode() for s in tensor("STOP").reshape(-1))
        except UnicodeDecodeError as err:
            raise RequestError("INVALID_ARGUMENT", f"STOP must be UTF-8 ({err})") from None
        if any(not s for s in stop):
            raise RequestError("INVALID_ARGUMENT", "STOP strings must not be empty")
        return prompts, self.ResolvedSampling(max_new, temperature, top_p, top_k, n, stop, seed), stream

    async def _serve(self, prompts, params, stream, sender):
        generation = None
        try:
            generation = self.policy.start(prompts, params, stream=stream)
            ticket = self.scheduler.submit(generation)
            self.observer.peaks[id(generation)] = 1
            if stream:
                await self._stream(generation, ticket, sender)
                return
            self.waiting[id(generation)] = (generation, sender)
            try:
                await ticket.wait()
            finally:
                self.waiting.pop(id(generation), None)
            rows, tokens, logprobs, finish = [], [], [], []
            for row in generation.rows:
                count = len(row.ids)
                rows += [row.index] * count
                tokens += row.ids
                logprobs += row.logprobs
                finish += [0] * (count - 1) + [self._finish_code(row.finish)] if count else []
            sender.send(self._response(generation, rows, tokens, logprobs, finish), flags=FINAL)
        except asyncio.CancelledError:
            # The client went away (Triton cancelled the request): nothing to answer.
            sender.send(flags=FINAL)
        except Exception as err:  # noqa: BLE001 - every request gets an answer
            sender.send(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(self._message(err))),
                        flags=FINAL)
        finally:
            if generation is not None:
                self.observer.peaks.pop(id(generation), None)

    async def _stream(self, generation, ticket, sender):
        steps = ticket.steps()
        # Counted from the events sent, not read off the generation: the
        # model thread may already be steps ahead of the events in hand.
        running = len(generation.rows)
        try:
            async for events in steps:
                if sender.is_cancelled():
                    generation.cancel()
                    raise asyncio.CancelledError
                response = self._response(generation, [e.row for e in events], [e.token_id for e in events],
                                     [e.logprob for e in events],
                                     [self._finish_code(e.finish_reason) for e in events])
                running -= sum(e.finish_reason is not None for e in events)
                if not running:
                    sender.send(response, flags=FINAL)
                    return
                sender.send(response)
        finally:
            await steps.aclose()

    async def _watch_cancelled(self):
        while True:
            await asyncio.sleep(_CANCEL_POLL_S)
            for generation, sender in list(self.waiting.values()):
                if sender.is_cancelled():
                    generation.cancel()

    def _response(self, generation, rows, tokens, logprobs, finish):
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("ROWS", np.asarray(rows, dtype=np.int64)),
            pb_utils.Tensor("TOKEN_IDS", np.asarray(tokens, dtype=np.int64)),
            pb_utils.Tensor("LOGPROBS", np.asarray(logprobs, dtype=np.float64)),
            pb_utils.Tensor("FINISH", np.asarray(finish, dtype=np.int64)),
            pb_utils.Tensor("PEAK_GENERATIONS",
                            np.asarray([self.observer.peaks.get(id(generation), 1)], dtype=np.int64)),
        ])

    def _finish_code(self, reason):
        return 0 if reason is None else self.finish_codes[reason.value]

    def _message(self, err):
        for cls, code in self.codes:
            if isinstance(err, cls):
                return f"{code}: {err}"
        return f"INTERNAL: generation failed: {type(err).__name__}: {err}"

    def finalize(self):
        if self.load_error is not None:
            return
        async def close():
            self.watcher.cancel()
            await self.scheduler.close()

        try:
            asyncio.run_coroutine_threadsafe(close(), self.loop).result(timeout=10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.executor.shutdown(wait=False)
            self.policy = None


