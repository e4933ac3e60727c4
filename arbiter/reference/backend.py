"""Where a reference model's forward pass runs: in this process (torch) or in
a Triton Inference Server. Validation, batching, KL and versions stay in the
engine either way; a backend only turns (prompt, completion) token ids into
the completion tokens' log-probs.

Both backends run the same computation (``arbiter.lm.completion_logits`` and
``arbiter/backends/triton_models/reference.py``): one teacher-forced forward of
prompt + completion, right-padded with the model's pad id under an attention
mask, log-softmax in float64 of the logits predicting each completion token.
Triton answers in float32, the precision the wire carries anyway.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from arbiter.backends import BackendConfig
from arbiter.backends.triton import TritonModel, checkpoint_dir, version_dir_parts
from arbiter.errors import BackendError, ModelLoadError
from arbiter.hf import (
    check_checkpoint_dir,
    content_version,
    load_tokenizer,
    model_max_tokens,
    read_metadata,
    tokenizer_fingerprint,
)
from arbiter.lm import completion_logits, load_causal_lm, token_logprobs
from arbiter.types import ModelInfo

# (prompt token ids, completion token ids), both non-empty.
Pair = tuple[Sequence[int], Sequence[int]]

# The tensors of an exported reference model (see arbiter/backends/triton_models/reference.py).
TRITON_INPUTS = {
    "INPUT_IDS": ("INT64", (-1, -1)),
    "PROMPT_LENGTHS": ("INT64", (-1, 1)),
    "COMPLETION_LENGTHS": ("INT64", (-1, 1)),
}
TRITON_OUTPUTS = {"LOGPROBS": ("FP32", (-1, -1))}


class ReferenceBackend(Protocol):
    # Reported as ModelInfo.backend.
    name: str

    def forward(self, batch: list[Pair]) -> list[list[float]]:
        """Per pair, log pi_ref(completion token | prefix) for each completion
        token, in order. Blocking: called on the engine's model thread."""
        ...

    def release(self) -> None:
        """This version is being unloaded: free what it holds (for Triton,
        unload it from the server unless another loaded version shares it)."""
        ...


@runtime_checkable
class RemoteReferenceBackend(ReferenceBackend, Protocol):
    """A backend whose forward runs elsewhere: awaited on the event loop, with
    up to ``max_in_flight`` batches outstanding."""

    max_in_flight: int

    async def forward_async(self, batch: list[Pair]) -> list[list[float]]: ...


class ReferenceBackends(Protocol):
    """Opens one backend per loaded version; owned by the engine."""

    name: str

    def open(
        self, path: str | Path, *, version: str | None, base_dir: str | Path | None, max_tokens: int | None
    ) -> tuple[ReferenceBackend, object, ModelInfo]:
        """(backend, tokenizer, info) of the version at ``path``."""
        ...

    async def aclose(self) -> None: ...


def pad_pairs(batch: list[Pair], pad_token_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-padded prompt + completion ids (B, T), prompt lengths (B, 1) and
    completion lengths (B, 1), int64."""
    width = max(len(p) + len(c) for p, c in batch)
    input_ids = np.full((len(batch), width), pad_token_id, dtype=np.int64)
    for row, (prompt, completion) in enumerate(batch):
        input_ids[row, : len(prompt)] = prompt
        input_ids[row, len(prompt) : len(prompt) + len(completion)] = completion
    prompts = np.array([[len(p)] for p, _ in batch], dtype=np.int64)
    completions = np.array([[len(c)] for _, c in batch], dtype=np.int64)
    return input_ids, prompts, completions


def open_reference_backends(config: BackendConfig) -> ReferenceBackends:
    if config.kind == "triton":
        return TritonReferenceBackends(config)
    return TorchReferenceBackends()


# -- in-process -----------------------------------------------------------------


class TorchReferenceBackend:
    name = "torch"

    def __init__(self, model):
        self.model = model
        self.pad_id = int(model.config.pad_token_id)

    def forward(self, batch: list[Pair]) -> list[list[float]]:
        import torch

        with torch.inference_mode():
            logits = completion_logits(self.model, self.pad_id, batch)
            return [
                token_logprobs(torch.log_softmax(item.double(), dim=-1), completion)
                for item, (_, completion) in zip(logits, batch, strict=True)
            ]

    def release(self) -> None:
        self.model = None


class TorchReferenceBackends:
    name = "torch"

    def open(
        self, path: str | Path, *, version: str | None, base_dir: str | Path | None, max_tokens: int | None
    ) -> tuple[TorchReferenceBackend, object, ModelInfo]:
        """A checkpoint or LoRA adapter, or the ``checkpoint/`` of an exported
        version directory (so in-process serves exactly what Triton serves)."""
        lm = load_causal_lm(
            checkpoint_dir(path), kind="reference", version=version,
            base_dir=None if base_dir is None else checkpoint_dir(base_dir), max_tokens=max_tokens,
        )
        return TorchReferenceBackend(lm.model), lm.tokenizer, lm.info

    async def aclose(self) -> None:
        pass


# -- Triton -----------------------------------------------------------------------


class TritonReferenceBackend:
    name = "triton"

    def __init__(self, server: TritonModel, version: int, pad_token_id: int, max_in_flight: int):
        self.server = server
        self.version = version
        self.pad_token_id = pad_token_id
        self.max_in_flight = max_in_flight

    def forward(self, batch: list[Pair]) -> list[list[float]]:
        return self._logprobs(self.server.infer(self.version, self._inputs(batch), list(TRITON_OUTPUTS)), batch)

    async def forward_async(self, batch: list[Pair]) -> list[list[float]]:
        outputs = await self.server.infer_async(self.version, self._inputs(batch), list(TRITON_OUTPUTS))
        return self._logprobs(outputs, batch)

    def _inputs(self, batch: list[Pair]) -> dict[str, np.ndarray]:
        input_ids, prompts, completions = pad_pairs(batch, self.pad_token_id)
        return {"INPUT_IDS": input_ids, "PROMPT_LENGTHS": prompts, "COMPLETION_LENGTHS": completions}

    def _logprobs(self, outputs: dict[str, np.ndarray], batch: list[Pair]) -> list[list[float]]:
        values = outputs["LOGPROBS"]
        longest = max(len(c) for _, c in batch)
        if values is None or values.ndim != 2 or values.shape[0] != len(batch) or values.shape[1] < longest:
            shape = None if values is None else list(values.shape)
            raise BackendError(
                f"Triton model {self.server.name!r} version {self.version} answered LOGPROBS of shape {shape} "
                f"for {len(batch)} sequences; expected [{len(batch)}, {longest}]"
            )
        values = values.astype(np.float32, copy=False)
        return [values[row, : len(completion)].tolist() for row, (_, completion) in enumerate(batch)]

    def release(self) -> None:
        self.server.release(self.version)


class TritonReferenceBackends:
    name = "triton"

    def __init__(self, config: BackendConfig):
        self.config = config
        self.server = TritonModel(
            config.triton_url, config.triton_model, timeout_s=config.triton_timeout_s,
            retry_s=config.triton_retry_s, load_timeout_s=config.triton_load_timeout_s,
        )

    def open(
        self, path: str | Path, *, version: str | None, base_dir: str | Path | None, max_tokens: int | None
    ) -> tuple[TritonReferenceBackend, object, ModelInfo]:
        """``path`` is a version directory REPO/NAME/N: its checkpoint/ gives
        the tokenizer and config here, Triton serves the weights. LoRA
        adapters (``base_dir``) are merged at export, not here."""
        checkpoint, model_name, number = version_dir_parts(path)
        if model_name != self.config.triton_model:
            raise ModelLoadError(
                f"{str(path)!r} is a version of Triton model {model_name!r}, but this service serves "
                f"{self.config.triton_model!r} (--triton-model)"
            )
        tokenizer, pad_token_id, info = _describe(check_checkpoint_dir(checkpoint), path, version, max_tokens)
        self.server.acquire(number, Path(path).parent)
        try:
            self.server.check_io(number, TRITON_INPUTS, TRITON_OUTPUTS)
        except BaseException:
            self.server.release(number)
            raise
        backend = TritonReferenceBackend(self.server, number, pad_token_id, self.config.triton_max_in_flight)
        return backend, tokenizer, info

    async def aclose(self) -> None:
        await self.server.aclose()


def _describe(
    root: Path, path: str | Path, version: str | None, max_tokens: int | None
) -> tuple[object, int, ModelInfo]:
    """Tokenizer, pad id and ModelInfo of a checkpoint without its weights,
    equal to what ``load_causal_lm`` reports for the same directory."""
    from transformers import AutoConfig

    meta = read_metadata(root)
    tokenizer = load_tokenizer(root)
    try:
        config = AutoConfig.from_pretrained(str(root), local_files_only=True)
    except Exception as err:
        raise ModelLoadError(f"cannot read the model config in {str(root)!r}: {err}") from err
    vocab_size = getattr(config.get_text_config(), "vocab_size", None)
    if not isinstance(vocab_size, int):
        raise ModelLoadError(f"{str(root)!r}: config.json names no vocab_size")
    pad_token_id = config.pad_token_id if config.pad_token_id is not None else tokenizer.pad_token_id
    info = ModelInfo(
        kind="reference",
        name=meta.name or root.name,
        version=version or meta.version or content_version(root),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        max_tokens=model_max_tokens(config, tokenizer, max_tokens),
        vocab_size=vocab_size,
        source_path=str(Path(path).resolve()),
        backend="triton",
        loaded_at=time.time(),
    )
    return tokenizer, int(pad_token_id), info
