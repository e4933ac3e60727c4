"""The policy as a backend kind, and policy versions served by Triton.

With ``--backend triton`` a policy version is a decoupled model in Triton
(``arbiter triton export --kind policy``, ``triton_models/policy.py``) that
runs this package's own engine, continuous batching included, across every
request Triton receives. The service keeps what it does in-process
(validation, prompt rendering and tokenization, sampling parameters and
seeds, versions); per request it sends token ids and the resolved sampling
parameters and replays the tokens Triton streams back into the request's
own ``Generation`` (``record``), so text, stop strings, finish reasons,
samples and stream events come from the code the in-process service runs,
and a generation through Triton equals one in-process token for token.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from arbiter.backends import BackendConfig, ModelKind
from arbiter.backends.placement import CPU_FLOAT32, Placement
from arbiter.backends.signatures import FINISH_CODES, POLICY as POLICY_TENSORS
from arbiter.backends.signatures import TOKEN_OUTPUTS, GenerationRequest
from arbiter.backends.triton import TritonBackend, TritonBackends, checkpoint_dir
from arbiter.errors import BackendError, ModelLoadError, ShuttingDown
from arbiter.hf import read_config
from arbiter.lm import load_causal_weights, probe_finite, require_plain_causal_lm
from arbiter.policy.model import Generation, PolicyModel
from arbiter.policy.scheduler import Ticket

log = logging.getLogger(__name__)


def load_policy_weights(root, base_dir=None, placement: Placement = CPU_FLOAT32):
    model, tokenizer = load_causal_weights(root, base_dir, placement)
    probe_finite(model, tokenizer)
    return model, tokenizer, model.config


def _not_batched(model, batch):
    raise BackendError("policy generation is scheduled by the policy engine, not run as batches")


POLICY = ModelKind(
    name="policy", load_torch=load_policy_weights, forward_torch=_not_batched, triton=POLICY_TENSORS,
    check_config=require_plain_causal_lm,
)

_FINISH_NAMES = {code: name for name, code in FINISH_CODES.items()}


class TritonPolicyModel(PolicyModel):
    """One policy version loaded in Triton: what the service needs of it
    locally (tokenizer, info, end tokens) and its generations' streams."""

    remote = True

    def __init__(self, backend: TritonBackend, hf_config, decoder: TritonDecoder):
        self.lm = None
        self.model = None
        self.backend = backend
        self.decoder = decoder
        self.tokenizer = backend.tokenizer
        self.info = backend.info
        self.pad_id = backend.pad_token_id
        self.eos_ids = PolicyModel.end_tokens(self.tokenizer, hf_config)
        self.prefix_cache = None  # Triton's engine keeps its own

    def submit(self, generation: Generation) -> Ticket:
        return self.decoder.submit(self, generation)

    def release(self) -> None:
        """Unloaded: Triton unloads the version once its requests in flight
        have had their last response."""
        self.backend.release()

    def teacher_forced_logprobs(self, *args, **kwargs):
        raise BackendError("teacher-forced log-probs need the weights in-process (--backend torch)")


class TritonDecoder:
    """Streams of the generations sent to Triton, on the server's event loop."""

    def __init__(self, config: BackendConfig):
        self.backends = TritonBackends(config, POLICY)
        self._pumps: set[asyncio.Task] = set()
        self._closed = False

    def open(self, path: str | Path, version: str | None, max_tokens: int | None) -> TritonPolicyModel:
        """The version directory REPO/NAME/N, loaded in Triton and checked (blocking)."""
        backend = self.backends.open(path, version=version, max_tokens=max_tokens)
        try:
            model = TritonPolicyModel(backend, read_config(checkpoint_dir(path)), self)
            self._probe(model)
            return model
        except BaseException:
            backend.release()
            raise

    @staticmethod
    def _probe(model: TritonPolicyModel) -> None:
        """One greedy token through Triton: a version whose weights did not
        load there (or give NaN logits) is refused with Triton's reason,
        before it can be activated."""
        backend = model.backend
        probe = GenerationRequest(prompts=[[model.pad_id]], max_new_tokens=1, temperature=0.0, top_k=0, top_p=1.0,
                                  n=1, seed=0)
        where = f"Triton model {backend.server.name!r} version {backend.version}"
        outputs = backend.server.first_response(backend.version, POLICY_TENSORS.pack(probe, model.pad_id),
                                                TOKEN_OUTPUTS)
        tokens = POLICY_TENSORS.unpack(outputs, probe, where)
        if len(tokens.token_ids) != 1:
            raise ModelLoadError(f"{where} answered a one-token probe with {len(tokens.token_ids)} tokens")

    def submit(self, model: TritonPolicyModel, generation: Generation) -> Ticket:
        if self._closed:
            raise ShuttingDown("the server is stopping; retry on another replica")
        ticket = Ticket(generation)
        pump = asyncio.get_running_loop().create_task(self._pump(model, generation, ticket), name="policy-triton")
        self._pumps.add(pump)
        pump.add_done_callback(self._pumps.discard)
        # A caller gone away stops the stream now, not at its next response.
        ticket.on_cancel = pump.cancel
        return ticket

    async def _pump(self, model: TritonPolicyModel, generation: Generation, ticket: Ticket) -> None:
        params = generation.params
        request = GenerationRequest(
            prompts=[row.prompt_ids for row in generation.rows[:: params.n]], max_new_tokens=params.max_new_tokens,
            temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, n=params.n, seed=params.seed,
            stop=params.stop, stream=generation.stream,
        )
        backend = model.backend
        where = f"Triton model {backend.server.name!r} version {backend.version}"
        responses = backend.server.stream_async(backend.version, POLICY_TENSORS.pack(request, model.pad_id),
                                                TOKEN_OUTPUTS, lambda: generation.done)
        try:
            async for outputs in responses:
                self._replay(generation, POLICY_TENSORS.unpack(outputs, request, where), where)
                ticket._deliver()
        except asyncio.CancelledError:
            # The caller went away (closing the stream cancels the request in
            # Triton), or the server stops.
            ticket._end(asyncio.CancelledError() if generation.cancelled
                        else ShuttingDown("the server is stopping; retry on another replica"))
            raise
        except Exception as err:  # noqa: BLE001 - the request's caller gets it, mapped to a status
            ticket._end(err)
        finally:
            await responses.aclose()

    @staticmethod
    def _replay(generation: Generation, tokens, where: str) -> None:
        """Tokens sampled in Triton, recorded as the in-process engine records
        its own; the finish reasons must agree (same tokenizer, same rules)."""
        for row_index, token, logprob, finish in zip(tokens.rows, tokens.token_ids, tokens.logprobs, tokens.finish,
                                                     strict=True):
            row = generation.rows[row_index]
            if row.finish is not None:
                raise BackendError(f"{where} sent a token for sample {row_index} after it finished")
            generation.record(row, token, logprob)
            got = None if row.finish is None else row.finish.value
            if got != _FINISH_NAMES.get(finish):
                raise BackendError(f"{where} finished sample {row_index} as {_FINISH_NAMES.get(finish)!r} at token "
                                   f"{len(row.ids)}; this service finishes it as {got!r} (is its tokenizer the one "
                                   "the version was exported with?)")

    async def aclose(self) -> None:
        """Generations still streaming fail (the server drained its RPCs first)."""
        self._closed = True
        for pump in list(self._pumps):
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        await self.backends.aclose()
