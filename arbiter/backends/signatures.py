"""The tensors of each model kind served by Triton, as data: the service's
backend packs and unpacks batches with them, ``check_io`` compares them with
what Triton reports, and ``arbiter triton export`` writes them into
``config.pbtxt``. The model file Triton runs is
``arbiter/backends/triton_models/model.py`` (one file for every kind).

Batches are right-padded with the model's pad id, ragged across requests
(Triton's model re-pads the merged batch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from arbiter.errors import BackendError

# (prompt token ids, completion token ids), both non-empty.
Pair = tuple[Sequence[int], Sequence[int]]


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str  # Triton's: INT64, FP32
    # Per-request shape, batch dimension first; -1: any.
    shape: tuple[int, ...]
    # INPUT_IDS differ in width between requests: Triton may still batch them.
    ragged: bool = False


@dataclass(frozen=True)
class TritonSignature:
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    # (batch, pad id) -> input arrays by name
    pack: Callable[[list, int], dict[str, np.ndarray]]
    # (output arrays by name, batch, where) -> results in batch order
    unpack: Callable[[dict[str, np.ndarray], list, str], list]
    # Shapes lead with Triton's batch dimension (max_batch_size > 0); False:
    # each request is one unit of work whose shapes are written whole
    # (max_batch_size 0), as the policy's generations are.
    batched: bool = True
    # Responses streamed from a decoupled model (many per request).
    decoupled: bool = False

    def spec(self, tensors: tuple[Tensor, ...]) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {t.name: (t.datatype, t.shape) for t in tensors}


def _pack_ids(batch: list[Sequence[int]], pad_token_id: int) -> dict[str, np.ndarray]:
    """Right-padded ids (B, T) and lengths (B, 1), int64."""
    width = max(len(ids) for ids in batch)
    input_ids = np.full((len(batch), width), pad_token_id, dtype=np.int64)
    for row, ids in enumerate(batch):
        input_ids[row, : len(ids)] = ids
    lengths = np.array([[len(ids)] for ids in batch], dtype=np.int64)
    return {"INPUT_IDS": input_ids, "LENGTHS": lengths}


def _unpack_scores(outputs: dict[str, np.ndarray], batch: list, where: str) -> list[float]:
    scores = outputs["SCORES"]
    if scores is None or scores.shape != (len(batch), 1):
        shape = None if scores is None else list(scores.shape)
        raise BackendError(f"{where} answered SCORES of shape {shape} for {len(batch)} sequences; "
                           f"expected [{len(batch)}, 1]")
    return scores[:, 0].astype(np.float32).tolist()


def _pack_pairs(batch: list[Pair], pad_token_id: int) -> dict[str, np.ndarray]:
    """Right-padded prompt + completion ids (B, T), prompt and completion lengths (B, 1), int64."""
    width = max(len(p) + len(c) for p, c in batch)
    input_ids = np.full((len(batch), width), pad_token_id, dtype=np.int64)
    for row, (prompt, completion) in enumerate(batch):
        input_ids[row, : len(prompt)] = prompt
        input_ids[row, len(prompt) : len(prompt) + len(completion)] = completion
    return {
        "INPUT_IDS": input_ids,
        "PROMPT_LENGTHS": np.array([[len(p)] for p, _ in batch], dtype=np.int64),
        "COMPLETION_LENGTHS": np.array([[len(c)] for _, c in batch], dtype=np.int64),
    }


def _unpack_logprobs(outputs: dict[str, np.ndarray], batch: list[Pair], where: str) -> list[list[float]]:
    values = outputs["LOGPROBS"]
    longest = max(len(c) for _, c in batch)
    if values is None or values.ndim != 2 or values.shape[0] != len(batch) or values.shape[1] < longest:
        shape = None if values is None else list(values.shape)
        raise BackendError(f"{where} answered LOGPROBS of shape {shape} for {len(batch)} sequences; "
                           f"expected [{len(batch)}, {longest}]")
    values = values.astype(np.float32, copy=False)
    return [values[row, : len(completion)].tolist() for row, (_, completion) in enumerate(batch)]


_INPUT_IDS = Tensor("INPUT_IDS", "INT64", (-1, -1), ragged=True)

# Token ids -> the sequence-classification model's pooled logit.
REWARD = TritonSignature(
    inputs=(_INPUT_IDS, Tensor("LENGTHS", "INT64", (-1, 1))),
    outputs=(Tensor("SCORES", "FP32", (-1, 1)),),
    pack=_pack_ids,
    unpack=_unpack_scores,
)

# (prompt, completion) ids -> log-probs of the completion tokens; LOGPROBS is as
# wide as each request's longest completion, zero after a row's own length.
REFERENCE = TritonSignature(
    inputs=(_INPUT_IDS, Tensor("PROMPT_LENGTHS", "INT64", (-1, 1)), Tensor("COMPLETION_LENGTHS", "INT64", (-1, 1))),
    outputs=(Tensor("LOGPROBS", "FP32", (-1, -1)),),
    pack=_pack_pairs,
    unpack=_unpack_logprobs,
)


# -- policy: generation in a decoupled (streaming) model ---------------------------------

# Finish reasons on the wire (FINISH): 0 while a sample runs.
FINISH_CODES = {"length": 1, "stop": 2, "eos": 3}


@dataclass(frozen=True)
class GenerationRequest:
    """One Generate request as Triton's policy model takes it: the prompts'
    token ids and the resolved sampling parameters (``stop`` as text: the
    model decodes with the version's own tokenizer, as in-process)."""

    prompts: Sequence[Sequence[int]]
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    n: int
    seed: int
    stop: Sequence[str] = ()
    # One response per decoding step (GenerateStream), else one at the end.
    stream: bool = False


@dataclass(frozen=True)
class TokenBatch:
    """Tokens of one response: parallel lists, one entry per sampled token;
    ``rows`` index the request's samples (prompt x n + sample), in order."""

    rows: list[int]
    token_ids: list[int]
    logprobs: list[float]
    finish: list[int]


def _pack_generation(request: GenerationRequest, pad_token_id: int) -> dict[str, np.ndarray]:
    width = max(len(ids) for ids in request.prompts)
    input_ids = np.full((len(request.prompts), width), pad_token_id, dtype=np.int64)
    for row, ids in enumerate(request.prompts):
        input_ids[row, : len(ids)] = ids
    return {
        "INPUT_IDS": input_ids,
        "PROMPT_LENGTHS": np.array([len(ids) for ids in request.prompts], dtype=np.int64),
        "MAX_NEW_TOKENS": np.array([request.max_new_tokens], dtype=np.int64),
        "TEMPERATURE": np.array([request.temperature], dtype=np.float64),
        "TOP_K": np.array([request.top_k], dtype=np.int64),
        "TOP_P": np.array([request.top_p], dtype=np.float64),
        "N": np.array([request.n], dtype=np.int64),
        "SEED": np.array([request.seed], dtype=np.int64),
        "STOP": np.array([s.encode() for s in request.stop], dtype=np.object_),
        "STREAM": np.array([request.stream], dtype=np.bool_),
    }


# What the service reads of each response (PEAK_GENERATIONS is for monitoring and tests).
TOKEN_OUTPUTS = ("ROWS", "TOKEN_IDS", "LOGPROBS", "FINISH")


def _unpack_tokens(outputs: dict[str, np.ndarray], request: GenerationRequest, where: str) -> TokenBatch:
    arrays = [outputs.get(name) for name in TOKEN_OUTPUTS]
    sizes = {None if a is None else a.shape for a in arrays}
    if None in sizes or len(sizes) != 1 or len(next(iter(sizes))) != 1:
        raise BackendError(f"{where} answered ROWS, TOKEN_IDS, LOGPROBS, FINISH of shapes "
                           f"{[None if a is None else list(a.shape) for a in arrays]}; expected four equal [E]")
    rows, tokens, logprobs, finish = arrays
    count = len(request.prompts) * request.n
    if rows.size and (rows.min() < 0 or rows.max() >= count):
        raise BackendError(f"{where} answered ROWS outside 0..{count - 1}")
    return TokenBatch(rows.tolist(), tokens.tolist(), logprobs.astype(np.float64).tolist(), finish.tolist())


def _scalar(name: str, datatype: str) -> Tensor:
    return Tensor(name, datatype, (1,))


# Token ids + sampling parameters -> sampled tokens with their log-probs under
# the sampling distribution and finish reasons, streamed: each response holds
# the tokens of one decoding step (or, unless STREAM, all of them at once).
POLICY = TritonSignature(
    inputs=(
        Tensor("INPUT_IDS", "INT64", (-1, -1)),  # prompts, right-padded
        Tensor("PROMPT_LENGTHS", "INT64", (-1,)),
        _scalar("MAX_NEW_TOKENS", "INT64"),
        _scalar("TEMPERATURE", "FP64"),  # 0: greedy
        _scalar("TOP_K", "INT64"),  # 0: off
        _scalar("TOP_P", "FP64"),  # 1: off
        _scalar("N", "INT64"),
        _scalar("SEED", "INT64"),
        Tensor("STOP", "BYTES", (-1,)),  # UTF-8 stop strings, possibly none
        _scalar("STREAM", "BOOL"),
    ),
    outputs=(
        Tensor("ROWS", "INT64", (-1,)),
        Tensor("TOKEN_IDS", "INT64", (-1,)),
        Tensor("LOGPROBS", "FP64", (-1,)),  # the float64 the in-process engine returns
        Tensor("FINISH", "INT64", (-1,)),  # FINISH_CODES, 0: running
        # The most requests sharing the decoding batch at once while this one ran.
        Tensor("PEAK_GENERATIONS", "INT64", (1,)),
    ),
    pack=_pack_generation,
    unpack=_unpack_tokens,
    batched=False,
    decoupled=True,
)

SIGNATURES = {"reward": REWARD, "reference": REFERENCE, "policy": POLICY}
