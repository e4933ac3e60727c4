"""The in-process backend: the model is loaded into the service process, on
the configured device and dtype (``arbiter.backends.placement``), and its
forward pass runs on the caller's model thread."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from arbiter.backends import ModelKind
from arbiter.backends.model_process import ModelProcess, ModelProcessBackend
from arbiter.backends.placement import CPU_FLOAT32, Placement, device_and_dtype
from arbiter.backends.triton import checkpoint_dir
from arbiter.hf import check_checkpoint_dir, describe
from arbiter.lm import is_adapter_dir


class InProcessBackend:
    name = "torch"

    def __init__(self, kind: ModelKind, model: Any, tokenizer: Any, info):
        self.kind = kind
        self.model = model
        self.tokenizer = tokenizer
        self.info = info

    def forward(self, batch: list) -> list:
        return self.kind.forward_torch(self.model, batch)

    def batch_clock(self):
        """CPU time of the model thread when the pass runs on that thread
        alone (CPU, one torch thread): it is what a batch size costs there,
        while wall time on a shared machine adds whatever else ran meanwhile
        (other processes, the event loop holding the GIL), enough to bury
        the few per cent between batch sizes. Else (intra-op threads, a
        GPU) wall time."""
        import torch

        if self.info.device == "cpu" and torch.get_num_threads() == 1:
            return time.thread_time
        return time.perf_counter

    def release(self) -> None:
        self.model = None


class InProcessBackends:
    name = "torch"

    def __init__(self, kind: ModelKind, placement: Placement = CPU_FLOAT32, model_process: bool = False,
                 model_process_timeout_s: float = 300.0, compile: bool = False):
        self.kind = kind
        self.placement = placement
        # Weights and forward passes in a child process (arbiter.backends.model_process).
        self.model_process = model_process
        self.model_process_timeout_s = model_process_timeout_s
        # Forward passes compiled before a version serves (arbiter.backends.compiled).
        self.compile = compile

    def open(
        self, path: str | Path, *, version: str | None, max_tokens: int | None, base_dir: str | Path | None = None
    ) -> InProcessBackend | ModelProcessBackend:
        """A checkpoint (or a LoRA adapter, for kinds that take them), or the
        ``checkpoint/`` of an exported version directory, so in-process serves
        exactly what Triton serves."""
        root = check_checkpoint_dir(checkpoint_dir(path))
        base = None if base_dir is None else checkpoint_dir(base_dir)
        extra = {"adapter": "true"} if self.kind.takes_adapters and is_adapter_dir(root) else {}
        if self.compile:
            extra["compiled"] = "true"
        if self.model_process:
            process = ModelProcess(self.kind, root, base, self.placement, self.model_process_timeout_s,
                                   compile=self.compile)
            info = self._describe(root, path, version, max_tokens, process.tokenizer, process.config,
                                  process.device, process.dtype, {**extra, "model_process": "true"})
            return ModelProcessBackend(process, info)
        model, tokenizer, config = self.kind.load_for_serving(root, base, self.placement, self.compile)
        device, dtype = device_and_dtype(model)
        info = self._describe(root, path, version, max_tokens, tokenizer, config, device, dtype, extra)
        return InProcessBackend(self.kind, model, tokenizer, info)

    def _describe(self, root, path, version, max_tokens, tokenizer, config, device, dtype, extra):
        return describe(
            self.kind.name, root, source_path=path, tokenizer=tokenizer, config=config, version=version,
            max_tokens=max_tokens, backend=self.name, extra=extra or None, device=device, dtype=dtype,
        )

    async def aclose(self) -> None:
        pass
