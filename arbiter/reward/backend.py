"""Where a reward model's forward pass runs: in this process (torch) or in a
Triton Inference Server. Tokenization, validation, batching and versions stay
in the engine either way; a backend only turns token ids into scores.

Both backends run the same computation: a right-padded batch with an
attention mask, score = the sequence-classification model's own pooled logit,
padding with the model's pad id (HF pools at the last non-pad token, so the
pad id decides which logit is the score).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from arbiter.backends import BackendConfig
from arbiter.backends.triton import TritonModel, checkpoint_dir, version_dir_parts
from arbiter.errors import BackendError, ModelLoadError

# The tensors of an exported reward model (see arbiter/backends/triton_models/reward.py).
TRITON_INPUTS = {"INPUT_IDS": ("INT64", (-1, -1)), "LENGTHS": ("INT64", (-1, 1))}
TRITON_OUTPUTS = {"SCORES": ("FP32", (-1, 1))}


class RewardBackend(Protocol):
    # Reported as ModelInfo.backend.
    name: str

    def forward(self, batch: list[list[int]]) -> list[float]:
        """Scores of token-id sequences (each non-empty), in order. Blocking:
        called on the engine's model thread."""
        ...

    def release(self) -> None:
        """This version is being unloaded: free what it holds (for Triton,
        unload it from the server unless another loaded version shares it)."""
        ...


@runtime_checkable
class RemoteRewardBackend(RewardBackend, Protocol):
    """A backend whose forward runs elsewhere: awaited on the event loop, with
    up to ``max_in_flight`` batches outstanding."""

    max_in_flight: int

    async def forward_async(self, batch: list[list[int]]) -> list[float]: ...


class RewardBackends(Protocol):
    """Opens one backend per loaded version; owned by the engine."""

    name: str

    def checkpoint_dir(self, path: str | Path) -> Path:
        """Where the tokenizer, config and arbiter.json of ``path`` are."""
        ...

    def open(self, path: str | Path, checkpoint: Path, pad_token_id: int) -> RewardBackend: ...

    async def aclose(self) -> None: ...


def pad_batch(batch: list[list[int]], pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ids (B, T) and lengths (B, 1), int64."""
    width = max(len(ids) for ids in batch)
    input_ids = np.full((len(batch), width), pad_token_id, dtype=np.int64)
    for row, ids in enumerate(batch):
        input_ids[row, : len(ids)] = ids
    lengths = np.array([[len(ids)] for ids in batch], dtype=np.int64)
    return input_ids, lengths


def open_reward_backends(config: BackendConfig) -> RewardBackends:
    if config.kind == "triton":
        return TritonRewardBackends(config)
    return TorchRewardBackends()


# -- in-process -----------------------------------------------------------------


class TorchRewardBackend:
    name = "torch"

    def __init__(self, model):
        self.model = model

    @classmethod
    def load(cls, checkpoint: Path, pad_token_id: int) -> TorchRewardBackend:
        import torch
        from transformers import AutoModelForSequenceClassification

        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                str(checkpoint), local_files_only=True, dtype=torch.float32
            )
        except Exception as err:
            raise ModelLoadError(
                f"cannot load a sequence-classification model from {str(checkpoint)!r}: {err}"
            ) from err
        if model.config.pad_token_id is None:
            model.config.pad_token_id = pad_token_id
        model.eval()
        return cls(model)

    def forward(self, batch: list[list[int]]) -> list[float]:
        """With a causal backbone, right padding leaves every real position's
        output identical to an unpadded forward."""
        import torch

        ids, lengths = pad_batch(batch, self.model.config.pad_token_id)
        input_ids = torch.from_numpy(ids)
        attention_mask = (torch.arange(ids.shape[1])[None, :] < torch.from_numpy(lengths)).long()
        with torch.inference_mode():
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits[:, 0].float().tolist()

    def release(self) -> None:
        self.model = None


class TorchRewardBackends:
    name = "torch"

    def checkpoint_dir(self, path: str | Path) -> Path:
        return checkpoint_dir(path)

    def open(self, path: str | Path, checkpoint: Path, pad_token_id: int) -> TorchRewardBackend:
        return TorchRewardBackend.load(checkpoint, pad_token_id)

    async def aclose(self) -> None:
        pass


# -- Triton -----------------------------------------------------------------------


class TritonRewardBackend:
    name = "triton"

    def __init__(self, server: TritonModel, version: int, pad_token_id: int, max_in_flight: int):
        self.server = server
        self.version = version
        self.pad_token_id = pad_token_id
        self.max_in_flight = max_in_flight

    def forward(self, batch: list[list[int]]) -> list[float]:
        return self._scores(self.server.infer(self.version, self._inputs(batch), list(TRITON_OUTPUTS)), len(batch))

    async def forward_async(self, batch: list[list[int]]) -> list[float]:
        outputs = await self.server.infer_async(self.version, self._inputs(batch), list(TRITON_OUTPUTS))
        return self._scores(outputs, len(batch))

    def _inputs(self, batch: list[list[int]]) -> dict[str, np.ndarray]:
        input_ids, lengths = pad_batch(batch, self.pad_token_id)
        return {"INPUT_IDS": input_ids, "LENGTHS": lengths}

    def _scores(self, outputs: dict[str, np.ndarray], rows: int) -> list[float]:
        scores = outputs["SCORES"]
        if scores is None or scores.shape != (rows, 1):
            shape = None if scores is None else list(scores.shape)
            raise BackendError(
                f"Triton model {self.server.name!r} version {self.version} answered SCORES of shape {shape} "
                f"for {rows} sequences; expected [{rows}, 1]"
            )
        return scores[:, 0].astype(np.float32).tolist()

    def release(self) -> None:
        self.server.release(self.version)


class TritonRewardBackends:
    name = "triton"

    def __init__(self, config: BackendConfig):
        self.config = config
        self.server = TritonModel(
            config.triton_url, config.triton_model, timeout_s=config.triton_timeout_s,
            retry_s=config.triton_retry_s, load_timeout_s=config.triton_load_timeout_s,
        )

    def checkpoint_dir(self, path: str | Path) -> Path:
        checkpoint, model_name, _ = version_dir_parts(path)
        if model_name != self.config.triton_model:
            raise ModelLoadError(
                f"{str(path)!r} is a version of Triton model {model_name!r}, but this service serves "
                f"{self.config.triton_model!r} (--triton-model)"
            )
        return checkpoint

    def open(self, path: str | Path, checkpoint: Path, pad_token_id: int) -> TritonRewardBackend:
        _, _, version = version_dir_parts(path)
        self.server.acquire(version, Path(path).parent)
        try:
            self.server.check_io(version, TRITON_INPUTS, TRITON_OUTPUTS)
        except BaseException:
            self.server.release(version)
            raise
        return TritonRewardBackend(self.server, version, pad_token_id, self.config.triton_max_in_flight)

    async def aclose(self) -> None:
        await self.server.aclose()
