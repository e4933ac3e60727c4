"""K reward-model versions scored in one forward pass.

When the members are interchangeable in shape (in-process, same
architecture, parameter names, shapes, dtypes and device, same tokenizer,
text convention and token limit) their weights are stacked
(``torch.func.stack_module_state``) and one ``torch.vmap`` over
``torch.func.functional_call`` runs all K on the same token ids: one batch
of B items is a [K, B] forward, the K models' matmuls batched together.
Otherwise (Triton, or members that differ) the engine scores the members one
after another through their own batchers; ``stack_refusal`` says why.

``STACK_MODES``: ``auto`` stacks members on CUDA only. On CPU the stacked
pass measured slower at batch 16 (0.4x at K=2, 0.8x at K=4 with the tiny
models, one thread; vmap runs CPU attention member by member) and faster only
for tiny batches (1.5x at K=4, batch 2); on a GPU one pass means fewer,
larger kernels. ``always`` stacks wherever shapes allow, ``never`` does not.

The stacked weights are a copy (K models' parameters once more), kept while
every member stays loaded. Before a stack serves, its scores on a probe are
checked against each member's own forward; a stack that disagrees is not
used.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

from arbiter.backends.inprocess import InProcessBackend
from arbiter.backends.placement import model_device
from arbiter.backends.signatures import REWARD as REWARD_TENSORS
from arbiter.lm import no_cache
from arbiter.reward.model import RewardModel

log = logging.getLogger(__name__)

# vmap runs CPU scaled-dot-product attention member by member (no batching
# rule yet); the rest of the forward is batched, and the result is exact.
warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented the batching rule")

_PROBE = [[5, 6, 7, 8, 9], [10, 11, 12]]
_TOLERANCE = 1e-3


STACK_MODES = ("auto", "always", "never")


def stack_refusal(models: Sequence[RewardModel], mode: str = "always") -> str | None:
    """Why ``models`` do not run as one stacked forward, or None if they do."""
    if mode == "never":
        return "stack_ensembles=never"
    first = models[0]
    for model in models:
        label = model.info.version
        if not isinstance(model.backend, InProcessBackend) or model.backend.model is None:
            where = "in a model process" if model.info.extra.get("model_process") else f"in {model.info.backend}"
            return f"{label!r} does not run in this process (it runs {where})"
        if model.info.extra.get("compiled"):
            return f"{label!r} runs compiled (--compile): members run their own compiled forwards"
        if type(model.backend.model) is not type(first.backend.model):
            return f"{label!r} is a {type(model.backend.model).__name__}, {first.info.version!r} a " \
                   f"{type(first.backend.model).__name__}"
        if model.info.tokenizer_fingerprint != first.info.tokenizer_fingerprint:
            return f"{label!r} has another tokenizer than {first.info.version!r}"
        if model.text_convention != first.text_convention or model.info.max_tokens != first.info.max_tokens:
            return f"{label!r} builds or limits its text differently from {first.info.version!r}"
        if model.backend.model.config.pad_token_id != first.backend.model.config.pad_token_id:
            return f"{label!r} pads with another id than {first.info.version!r}"
        mine, theirs = _shapes(model.backend.model), _shapes(first.backend.model)
        if mine != theirs:
            return f"{label!r} has other parameters (names, shapes, dtypes or devices) than {first.info.version!r}"
    if mode == "auto" and model_device(first.backend.model).type != "cuda":
        return f"stack_ensembles=auto stacks on cuda only; these run on {model_device(first.backend.model)}"
    return None


def _shapes(module) -> list[tuple]:
    return [(name, tuple(t.shape), t.dtype, t.device) for name, t in
            [*module.named_parameters(), *module.named_buffers()]]


class StackedEnsemble:
    """The K members' weights stacked; ``forward`` gives each item's K raw
    scores (member order). Blocking: runs on the model thread."""

    def __init__(self, models: Sequence[RewardModel]):
        import torch
        from torch.func import stack_module_state

        self.versions = tuple(m.info.version for m in models)
        modules = [m.backend.model for m in models]
        params, buffers = stack_module_state(modules)
        # Served, never trained: no autograd state on the copy.
        self.params = {name: t.detach() for name, t in params.items()}
        self.buffers = {name: t.detach() for name, t in buffers.items()}
        # The skeleton functional_call runs with the stacked weights: on the
        # meta device, so it holds no memory of its own.
        with torch.device("meta"):
            self._skeleton = type(modules[0])(modules[0].config)
        self._skeleton.eval()
        self._pad = modules[0].config.pad_token_id
        self._device = model_device(modules[0])
        self._check(models)

    def _check(self, models: Sequence[RewardModel]) -> None:
        stacked = self.forward(_PROBE)
        for j, model in enumerate(models):
            own = model.forward(_PROBE)
            gap = max(abs(a[j] - b) for a, b in zip(stacked, own))
            if not gap <= _TOLERANCE * (1 + max(abs(b) for b in own)):
                raise ValueError(f"the stacked forward disagrees with {model.info.version!r}'s own by {gap:.3g}")

    def forward(self, batch: list[list[int]]) -> list[list[float]]:
        import torch
        from torch.func import functional_call

        arrays = REWARD_TENSORS.pack(batch, self._pad)
        input_ids = torch.from_numpy(arrays["INPUT_IDS"]).to(self._device)
        lengths = torch.from_numpy(arrays["LENGTHS"]).to(self._device)
        attention_mask = (torch.arange(input_ids.shape[1], device=self._device)[None, :] < lengths).long()

        def one(params, buffers):
            return functional_call(self._skeleton, (params, buffers), (),
                                   {"input_ids": input_ids, "attention_mask": attention_mask,
                                    **no_cache(self._skeleton)}).logits[:, 0]

        with torch.inference_mode():
            scores = torch.vmap(one)(self.params, self.buffers)  # [K, B]
        return scores.float().T.tolist()

    def release(self) -> None:
        self.params = self.buffers = None
