"""One model in one Triton Inference Server, as an Arbiter service uses it.

- Inference over gRPC (``tritonclient.grpc``, and ``.aio`` on the service's
  event loop), with a per-call timeout, retries while Triton is unreachable,
  and Triton's failures turned into Arbiter's domain errors (so services map
  them to gRPC statuses in the one usual place).
- Versions through Triton's model-control API. Triton loads and unloads whole
  models, so the set of versions Arbiter needs is expressed as a config
  override with ``version_policy: specific``: Triton loads the new versions,
  keeps serving the loaded ones meanwhile and only then drops those left out,
  which is what makes a swap free of failed requests. Versions are
  reference-counted, so two Arbiter versions on one Triton version are safe.
- Self-healing: Triton in explicit model-control mode comes back from a
  restart with nothing (or only ``--load-model``) loaded. A request that finds
  its version missing re-applies the version set once (single-flight) and
  retries, so a restart delays requests instead of failing them for good.

One Arbiter service per Triton model drives its versions; several replicas of
one service keep working (each load keeps versions already loaded) as long as
they are sent the same Load/Activate/Unload sequence, as with in-process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np

from arbiter.errors import (
    ArbiterError,
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    LimitExceeded,
    ModelLoadError,
    Overloaded,
)

log = logging.getLogger(__name__)

CONFIG_FILE = "config.pbtxt"
# The checkpoint inside an exported version directory REPO/NAME/N.
CHECKPOINT_DIR = "checkpoint"
# gRPC backs off reconnecting up to 120 s by default: after a Triton restart
# that would keep Arbiter away for minutes. Message limits as tritonclient's.
CHANNEL_ARGS = [
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
_NP_TO_TRITON = {
    np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32", np.dtype(np.float32): "FP32",
    np.dtype(np.float64): "FP64", np.dtype(np.bool_): "BOOL", np.dtype(np.object_): "BYTES",
}


class ModelNotReady(BackendUnavailable):
    """Triton is up but does not have this version loaded (restarted, or it
    was unloaded behind Arbiter's back)."""


def version_dir_parts(path: str | Path) -> tuple[Path, str, int]:
    """``REPO/NAME/N`` -> (checkpoint dir, NAME, N), or ModelLoadError saying
    what a Triton-backed service needs instead."""
    root = Path(path)
    checkpoint = root / CHECKPOINT_DIR
    if not root.name.isdigit() or not (checkpoint / "config.json").is_file():
        raise ModelLoadError(
            f"{str(root)!r} is not a version directory of an exported Triton repository: with the triton backend, "
            f"give REPO/NAME/N as written by `arbiter triton export` (a numbered directory holding {CHECKPOINT_DIR}/)"
        )
    return checkpoint, root.parent.name, int(root.name)


def checkpoint_dir(path: str | Path) -> Path:
    """The Hugging Face checkpoint behind a path: the path itself, or the
    ``checkpoint/`` of an exported version directory (so the in-process
    backend serves exactly what Triton serves)."""
    root = Path(path)
    if root.name.isdigit() and (root / CHECKPOINT_DIR / "config.json").is_file():
        return root / CHECKPOINT_DIR
    return root


class _Attempts:
    """The one retry policy of an inference call: an unreachable Triton is
    retried with exponential backoff (50 ms doubling to 1 s) until
    ``retry_s`` has passed; anything else fails the call at once."""

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.delay = 0.05
        self.healed = False

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def backoff(self, err: ArbiterError) -> float:
        """Seconds to wait before the next attempt, or raises ``err``."""
        if not isinstance(err, BackendUnavailable) or time.monotonic() + self.delay >= self.deadline:
            raise err
        delay, self.delay = self.delay, min(self.delay * 2, 1.0)
        return delay


class TritonModel:
    def __init__(
        self,
        url: str,
        name: str,
        *,
        timeout_s: float = 30.0,
        retry_s: float = 10.0,
        load_timeout_s: float = 600.0,
    ):
        import tritonclient.grpc as grpcclient

        self.url = url
        self.name = name
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.load_timeout_s = load_timeout_s
        self._client = grpcclient.InferenceServerClient(url, channel_args=CHANNEL_ARGS)
        self._aio = None
        self._aio_loop: asyncio.AbstractEventLoop | None = None
        # Serialises model-control changes; a heal runs on its own thread so a
        # request can stop waiting for it without cancelling it.
        self._control_lock = threading.Lock()
        self._wanted: Counter[int] = Counter()
        self._config_dir: Path | None = None
        self._heal_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"triton-heal-{name}")
        self._heal: Future | None = None
        # Never the control lock: an event loop asks for a heal while a long
        # load may hold that one.
        self._heal_lock = threading.Lock()

    # -- model control --------------------------------------------------

    def acquire(self, version: int, model_dir: Path | None = None) -> None:
        """Make sure ``version`` is loaded in Triton, keeping what is loaded.
        ``model_dir`` (REPO/NAME) gives the config to load with when Triton
        does not have the model loaded at all."""
        with self._control_lock:
            if model_dir is not None:
                self._config_dir = model_dir
            self._wanted[version] += 1
            try:
                self._apply(add={version})
            except BaseException:
                self._wanted[version] -= 1
                if not self._wanted[version]:
                    del self._wanted[version]
                raise

    def release(self, version: int) -> None:
        """Drop one use of ``version``; unload it from Triton after the last."""
        with self._control_lock:
            if not self._wanted[version]:
                return
            self._wanted[version] -= 1
            if self._wanted[version]:
                return
            del self._wanted[version]
            self._apply(remove={version})

    def ready_versions(self) -> set[int]:
        index = self._call(self._client.get_model_repository_index, as_json=True, client_timeout=self.timeout_s)
        return {
            int(m["version"])
            for m in index.get("models", [])
            if m.get("name") == self.name and m.get("state") == "READY" and str(m.get("version", "")).isdigit()
        }

    def _apply(self, add: set[int] = frozenset(), remove: set[int] = frozenset()) -> None:
        ready = self.ready_versions()
        target = (ready | set(self._wanted) | add) - remove
        if target == ready:
            return
        if not target:
            self._call(self._client.unload_model, self.name, client_timeout=self.load_timeout_s)
            return
        config = self._base_config(loaded=bool(ready))
        config["version_policy"] = {"specific": {"versions": sorted(target)}}
        started = time.perf_counter()
        try:
            self._call(
                self._client.load_model, self.name, config=json.dumps(config), client_timeout=self.load_timeout_s
            )
        except BackendError as err:
            # Triton refused the load (the model's initialize raised, bad
            # config): a property of the version, not of the request.
            raise ModelLoadError(f"Triton at {self.url} could not load model {self.name!r} versions "
                                 f"{sorted(target)}: {err}") from err
        log.info("triton %s: model %r versions %s loaded in %.1fs (were %s)",
                 self.url, self.name, sorted(target), time.perf_counter() - started, sorted(ready))

    def _base_config(self, loaded: bool) -> dict:
        """The config to override: what Triton runs now (so unchanged versions
        are kept, not re-initialised), else the repository's config.pbtxt."""
        if loaded:
            return self._call(self._client.get_model_config, self.name, as_json=True,
                              client_timeout=self.timeout_s)["config"]
        if self._config_dir is None or not (self._config_dir / CONFIG_FILE).is_file():
            raise ModelLoadError(
                f"model {self.name!r} is not loaded in Triton at {self.url} and its {CONFIG_FILE} is not readable "
                f"here (looked in {str(self._config_dir)!r})"
            )
        from google.protobuf import json_format, text_format
        from tritonclient.grpc import model_config_pb2

        parsed = text_format.Parse((self._config_dir / CONFIG_FILE).read_text(), model_config_pb2.ModelConfig())
        return json_format.MessageToDict(parsed, preserving_proto_field_name=True)

    def placement(self) -> tuple[str, str, bool]:
        """(device, dtype, compiled) the loaded model runs with, from the
        config Triton runs (``arbiter triton export --device/--dtype/--compile``):
        its instance groups (Triton resolves KIND_AUTO when it loads) and the
        dtype and compile parameters."""
        config = self._call(self._client.get_model_config, self.name, as_json=True,
                            client_timeout=self.timeout_s)["config"]
        groups = config.get("instance_group", [])
        kinds = {group.get("kind", "KIND_AUTO") for group in groups}
        gpus = sorted({int(n) for group in groups for n in group.get("gpus", [])})
        if kinds == {"KIND_CPU"}:
            device = "cpu"
        elif kinds == {"KIND_GPU"}:
            device = ",".join(f"cuda:{n}" for n in gpus) or "cuda"
        else:
            device = "auto"
        parameters = config.get("parameters", {})
        dtype = parameters.get("dtype", {}).get("string_value") or "float32"
        return device, dtype, parameters.get("compile", {}).get("string_value") == "true"

    def check_io(
        self,
        version: int,
        inputs: Mapping[str, tuple[str, Sequence[int]]],
        outputs: Mapping[str, tuple[str, Sequence[int]]],
    ) -> None:
        """Refuse a version whose tensors differ from what Arbiter sends and
        reads (name -> (datatype, shape with -1 for any))."""
        meta = self._call(self._client.get_model_metadata, self.name, str(version), as_json=True,
                          client_timeout=self.timeout_s)
        for kind, expected, declared in (("input", inputs, meta.get("inputs", [])),
                                         ("output", outputs, meta.get("outputs", []))):
            have = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in declared}
            for tensor, (dtype, shape) in expected.items():
                if tensor not in have:
                    raise ModelLoadError(
                        f"Triton model {self.name!r} version {version} has no {kind} {tensor!r} "
                        f"(it has {sorted(have)}): it was not exported for this service; use `arbiter triton export`"
                    )
                got_dtype, got_shape = have[tensor]
                if got_dtype != dtype or len(got_shape) != len(shape) or any(
                    s != -1 and g != s for g, s in zip(got_shape, shape)
                ):
                    raise ModelLoadError(
                        f"Triton model {self.name!r} version {version} {kind} {tensor!r} is {got_dtype} {got_shape}; "
                        f"this service needs {dtype} {list(shape)}"
                    )

    # -- inference ------------------------------------------------------

    def infer(self, version: int, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """Blocking inference (probes, tools, threads)."""
        import tritonclient.grpc as grpcclient

        attempts = _Attempts(time.monotonic() + self.retry_s)
        while True:
            try:
                result = self._client.infer(
                    self.name, _infer_inputs(grpcclient, inputs), model_version=str(version),
                    outputs=[grpcclient.InferRequestedOutput(o) for o in outputs], client_timeout=self.timeout_s,
                )
                return {o: result.as_numpy(o) for o in outputs}
            except Exception as raw:
                err = self._domain_error(raw, version)
            if self._heals(err, version, attempts):
                try:
                    self._start_heal().result(timeout=attempts.remaining())
                    continue
                except TimeoutError:
                    raise self._reloading(version) from err
                except ArbiterError as heal_err:
                    err = self._heal_failed(version, heal_err)
            time.sleep(attempts.backoff(err))

    async def infer_async(
        self, version: int, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
        """Inference on the caller's event loop; same retries and errors as ``infer``."""
        import tritonclient.grpc as grpcclient

        client = self._aio_client()
        attempts = _Attempts(time.monotonic() + self.retry_s)
        while True:
            try:
                result = await client.infer(
                    self.name, _infer_inputs(grpcclient, inputs), model_version=str(version),
                    outputs=[grpcclient.InferRequestedOutput(o) for o in outputs], client_timeout=self.timeout_s,
                )
                return {o: result.as_numpy(o) for o in outputs}
            except asyncio.CancelledError:
                raise
            except Exception as raw:
                err = self._domain_error(raw, version)
            await self._recover(err, version, attempts)

    async def stream_async(
        self, version: int, inputs: Mapping[str, np.ndarray], outputs: Sequence[str], done: Callable[[], bool]
    ) -> AsyncIterator[dict[str, np.ndarray]]:
        """The responses of a decoupled (streaming) model to one request, as
        they come, until ``done()`` says (after the caller handled a
        response) that it was the last: the stream is then closed the way
        Triton expects, by the client ending its side and Triton its own.
        (Cancelling a stream whose request had its final response can leave
        the request counted in flight in Triton 2.51, and its version never
        finishes unloading.) A caller that stops iterating early cancels the
        request in Triton. Until the first response arrives, the same
        retries and heal as ``infer_async``; after it, a failure fails the
        stream (what was delivered cannot be taken back). At most
        ``timeout_s`` between two responses."""
        import grpc
        import tritonclient.grpc as grpcclient

        client = self._aio_client()
        attempts = _Attempts(time.monotonic() + self.retry_s)
        while True:
            finished = asyncio.Event()
            request = {"model_name": self.name, "model_version": str(version),
                       "inputs": _infer_inputs(grpcclient, inputs),
                       "outputs": [grpcclient.InferRequestedOutput(o) for o in outputs]}

            async def requests(request=request, finished=finished):
                yield request
                # The stream stays open until the caller has what it needs.
                await finished.wait()

            responses = client.stream_infer(requests())
            received = False
            try:
                while True:
                    try:
                        result, error = await asyncio.wait_for(responses.__anext__(), self.timeout_s)
                    except TimeoutError:
                        raise BackendTimeout(f"Triton at {self.url} sent nothing for {self.timeout_s:g}s on a stream "
                                             f"of model {self.name!r} version {version}") from None
                    except StopAsyncIteration:
                        raise BackendError(f"Triton at {self.url} closed the stream of model {self.name!r} "
                                           f"version {version} before the last response") from None
                    except grpc.aio.AioRpcError as raw:
                        raise map_triton_error(raw.code().name, raw.details() or "", self.url, self.name,
                                               version) from None
                    if error is not None:
                        raise map_model_error(error.message() or str(error), self.url, self.name, version)
                    received = True
                    yield {o: result.as_numpy(o) for o in outputs}
                    if done():
                        finished.set()
                        await self._stream_end(responses)
                        return
            except ArbiterError as err:
                if received:
                    raise
                failure = err
            finally:
                finished.set()
                responses.cancel()
            await self._recover(failure, version, attempts)

    async def _recover(self, err: ArbiterError, version: int, attempts: _Attempts) -> None:
        """Before the next attempt of an awaited call: a version Triton lost
        is reloaded (once per call), an unreachable Triton waited for with
        backoff; raises when the call should fail instead."""
        if self._heals(err, version, attempts):
            heal = asyncio.shield(asyncio.wrap_future(self._start_heal()))
            try:
                await asyncio.wait_for(heal, attempts.remaining())
                return
            except TimeoutError:
                raise self._reloading(version) from err
            except ArbiterError as heal_err:
                err = self._heal_failed(version, heal_err)
        await asyncio.sleep(attempts.backoff(err))

    async def _stream_end(self, responses) -> None:
        """Until Triton closes a stream whose side we have closed (briefly)."""
        import grpc

        try:
            await asyncio.wait_for(responses.__anext__(), min(self.timeout_s, 5.0))
            log.warning("triton %s: model %r answered past its last response", self.url, self.name)
        except (StopAsyncIteration, TimeoutError, grpc.aio.AioRpcError):
            pass

    def first_response(self, version: int, inputs: Mapping[str, np.ndarray],
                       outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """Blocking: the first response of a decoupled model to one request
        (a probe at load, on the loader thread; no retries)."""
        import queue

        import tritonclient.grpc as grpcclient

        answers: queue.Queue = queue.Queue()
        with grpcclient.InferenceServerClient(self.url, channel_args=CHANNEL_ARGS) as client:
            client.start_stream(callback=lambda result, error: answers.put((result, error)))
            try:
                client.async_stream_infer(self.name, _infer_inputs(grpcclient, inputs), model_version=str(version),
                                          outputs=[grpcclient.InferRequestedOutput(o) for o in outputs])
                try:
                    result, error = answers.get(timeout=self.timeout_s)
                except queue.Empty:
                    raise BackendTimeout(f"Triton at {self.url} did not answer a probe of model {self.name!r} "
                                         f"version {version} in {self.timeout_s:g}s") from None
            finally:
                # Not cancelled: see stream_async.
                client.stop_stream()
        if error is not None:
            raise map_model_error(error.message() or str(error), self.url, self.name, version)
        return {o: result.as_numpy(o) for o in outputs}

    def _heals(self, err: ArbiterError, version: int, attempts: _Attempts) -> bool:
        """A version Triton lost (restart) is reloaded once per call."""
        if isinstance(err, ModelNotReady) and not attempts.healed and version in self._wanted:
            attempts.healed = True
            return True
        return False

    def _aio_client(self):
        import tritonclient.grpc.aio as aioclient

        loop = asyncio.get_running_loop()
        if self._aio is None or self._aio_loop is not loop:
            self._aio = aioclient.InferenceServerClient(self.url, channel_args=CHANNEL_ARGS)
            self._aio_loop = loop
        return self._aio

    def _start_heal(self) -> Future:
        """Re-apply the wanted version set, once, however many requests ask."""
        with self._heal_lock:
            if self._heal is None or self._heal.done():
                self._heal = self._heal_pool.submit(self._heal_now)
            return self._heal

    def _heal_now(self) -> None:
        with self._control_lock:
            log.warning("triton %s: model %r versions %s are not all loaded (Triton restarted?); reloading",
                        self.url, self.name, sorted(self._wanted))
            self._apply()

    def _heal_failed(self, version: int, err: ArbiterError) -> ArbiterError:
        if isinstance(err, ModelLoadError):
            return BackendUnavailable(
                f"model {self.name!r} version {version} is not loaded in Triton at {self.url} and reloading it "
                f"failed: {err}"
            )
        return err

    def _reloading(self, version: int) -> BackendUnavailable:
        return BackendUnavailable(
            f"model {self.name!r} version {version} is being reloaded into Triton at {self.url} "
            "(it was not loaded there: Triton restarted?); retry shortly"
        )

    # -- errors ---------------------------------------------------------

    def _call(self, method, *args, **kwargs):
        try:
            return method(*args, **kwargs)
        except Exception as raw:
            raise self._domain_error(raw, None) from raw

    def _domain_error(self, raw: Exception, version: int | None) -> ArbiterError:
        from tritonclient.utils import InferenceServerException

        if isinstance(raw, ArbiterError):
            return raw
        if not isinstance(raw, InferenceServerException):
            return BackendError(f"Triton client failed talking to {self.url}: {type(raw).__name__}: {raw}")
        return map_triton_error(raw.status() or "", raw.message() or str(raw), self.url, self.name, version)

    # -- lifecycle ------------------------------------------------------

    async def aclose(self) -> None:
        await self.aclose_stream_client()
        self.close()

    async def aclose_stream_client(self) -> None:
        """Close the event loop's client (``infer_async``, ``stream_async``); the blocking one stays."""
        if self._aio is not None and self._aio_loop is asyncio.get_running_loop():
            await self._aio.close()
        self._aio = None

    def close(self) -> None:
        self._heal_pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    def __enter__(self) -> TritonModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def map_triton_error(status: str, message: str, url: str, model: str, version: int | None) -> ArbiterError:
    """Triton's gRPC status + message -> the domain error a caller can act on."""
    code = status.rsplit(".", 1)[-1]
    what = f"model {model!r}" + (f" version {version}" if version is not None else "")
    if code == "NOT_FOUND" or (code == "UNAVAILABLE" and "unknown model" in message):
        return ModelNotReady(f"{what} is not loaded in Triton at {url} ({message})")
    if code == "UNAVAILABLE":
        return BackendUnavailable(f"Triton at {url} is unavailable ({message}); retry with backoff")
    if code == "DEADLINE_EXCEEDED":
        return BackendTimeout(f"Triton at {url} did not answer in time for {what} ({message})")
    if code == "RESOURCE_EXHAUSTED":
        return Overloaded(f"Triton at {url} is overloaded serving {what} ({message}); retry with backoff")
    if code == "INVALID_ARGUMENT":
        return BackendError(
            f"Triton {what} at {url} rejected the tensors Arbiter sent ({message}): the model in Triton does not "
            "match this service; re-export it with `arbiter triton export`"
        )
    return BackendError(f"Triton {what} at {url} failed: {message}")


# The statuses an Arbiter model file names at the start of an error message
# (``CODE: message``): a streamed response carries no status code of its
# own, so a decoupled model says what the service should answer.
_MODEL_CODES = {
    "FAILED_PRECONDITION": ModelLoadError,  # the version cannot serve (its weights did not load)
    "RESOURCE_EXHAUSTED": LimitExceeded,  # can never fit the model's budget
    "UNAVAILABLE": Overloaded,  # its queue is full, or it is being unloaded: retry
}


def map_model_error(message: str, url: str, model: str, version: int | None) -> ArbiterError:
    """An error response of a decoupled model -> the domain error: the
    model file's own ``CODE: message`` prefix, else Triton's wording."""
    code, _, rest = message.partition(": ")
    if code in _MODEL_CODES:
        return _MODEL_CODES[code](f"Triton model {model!r} version {version}: {rest}")
    if code in ("INVALID_ARGUMENT", "INTERNAL"):
        return map_triton_error(code, rest, url, model, version)
    if "unknown model" in message or "is not found" in message or "not ready" in message:
        return map_triton_error("NOT_FOUND", message, url, model, version)
    return map_triton_error("", message, url, model, version)


def _infer_inputs(grpcclient, inputs: Mapping[str, np.ndarray]) -> list:
    converted = []
    for name, array in inputs.items():
        tensor = grpcclient.InferInput(name, list(array.shape), _NP_TO_TRITON[array.dtype])
        tensor.set_data_from_numpy(array)
        converted.append(tensor)
    return converted


# -- the backend of every model kind ------------------------------------------------


class TritonBackend:
    """One version of a model in Triton; the kind's signature packs batches
    into its tensors and unpacks the answers."""

    name = "triton"

    def __init__(self, server: TritonModel, version: int, pad_token_id: int, signature, max_in_flight: int,
                 tokenizer, info):
        self.server = server
        self.version = version
        self.pad_token_id = pad_token_id
        self.signature = signature
        self.max_in_flight = max_in_flight
        self.tokenizer = tokenizer
        self.info = info
        self._outputs = [t.name for t in signature.outputs]
        self._where = f"Triton model {server.name!r} version {version}"

    def forward(self, batch: list) -> list:
        inputs = self.signature.pack(batch, self.pad_token_id)
        return self.signature.unpack(self.server.infer(self.version, inputs, self._outputs), batch, self._where)

    async def forward_async(self, batch: list) -> list:
        inputs = self.signature.pack(batch, self.pad_token_id)
        outputs = await self.server.infer_async(self.version, inputs, self._outputs)
        return self.signature.unpack(outputs, batch, self._where)

    def release(self) -> None:
        self.server.release(self.version)


class TritonBackends:
    """Versions of one Triton model: ``path`` is a version directory REPO/NAME/N
    written by ``arbiter triton export``; its checkpoint/ gives the tokenizer,
    config and arbiter.json here, Triton serves the weights."""

    name = "triton"

    def __init__(self, config, kind):
        self.config = config
        self.kind = kind
        self.server = TritonModel(
            config.triton_url, config.triton_model, timeout_s=config.triton_timeout_s,
            retry_s=config.triton_retry_s, load_timeout_s=config.triton_load_timeout_s,
        )

    def open(self, path: str | Path, *, version: str | None, max_tokens: int | None,
             base_dir: str | Path | None = None) -> TritonBackend:
        from arbiter.backends import pad_token_id
        from arbiter.hf import check_checkpoint_dir, describe, load_tokenizer, read_config

        checkpoint, model_name, number = version_dir_parts(path)
        if model_name != self.config.triton_model:
            raise ModelLoadError(
                f"{str(path)!r} is a version of Triton model {model_name!r}, but this service serves "
                f"{self.config.triton_model!r} (--triton-model)"
            )
        root = check_checkpoint_dir(checkpoint)
        tokenizer = load_tokenizer(root)
        hf_config = read_config(root)
        self.kind.check_config(hf_config, root)
        info = describe(self.kind.name, root, source_path=path, tokenizer=tokenizer, config=hf_config,
                        version=version, max_tokens=max_tokens, backend=self.name)
        signature = self.kind.triton
        self.server.acquire(number, Path(path).parent)
        try:
            self.server.check_io(number, signature.spec(signature.inputs), signature.spec(signature.outputs))
            device, dtype, compiled = self.server.placement()
        except BaseException:
            self.server.release(number)
            raise
        return TritonBackend(self.server, number, pad_token_id(hf_config, tokenizer), signature,
                             self.config.triton_max_in_flight, tokenizer,
                             replace(info, device=device, dtype=dtype,
                                     extra={**info.extra, **({"compiled": "true"} if compiled else {})}))

    async def aclose(self) -> None:
        await self.server.aclose()
