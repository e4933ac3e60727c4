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

SIGNATURES = {"reward": REWARD, "reference": REFERENCE}
