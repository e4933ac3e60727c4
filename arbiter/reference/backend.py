"""The reference model as a backend kind: teacher-forced log-probabilities of
completion tokens under a causal LM (a full checkpoint, or in-process a LoRA
adapter merged into its base).

Both backends run the same computation (``arbiter.lm.completion_logits`` and
``triton_models/model.py``): one forward of prompt + completion, right-padded
with the model's pad id under an attention mask, log-softmax in float64 of the
logits predicting each completion token. Triton answers in float32, the
precision the wire carries anyway.
"""

from __future__ import annotations

from arbiter.backends import ModelKind
from arbiter.backends.signatures import REFERENCE as REFERENCE_TENSORS
from arbiter.backends.signatures import Pair
from arbiter.hf import require_causal_lm
from arbiter.lm import completion_logits, load_causal_weights, probe_finite, token_logprobs


def load_reference_weights(root, base_dir=None):
    model, tokenizer = load_causal_weights(root, base_dir)
    probe_finite(model, tokenizer)
    return model, tokenizer, model.config


def reference_forward(model, batch: list[Pair]) -> list[list[float]]:
    """Per pair, log pi_ref(completion token | prefix) for each completion token."""
    import torch

    with torch.inference_mode():
        logits = completion_logits(model, int(model.config.pad_token_id), batch)
        return [
            token_logprobs(torch.log_softmax(item.double(), dim=-1), completion)
            for item, (_, completion) in zip(logits, batch, strict=True)
        ]


REFERENCE = ModelKind(
    name="reference", load_torch=load_reference_weights, forward_torch=reference_forward, triton=REFERENCE_TENSORS,
    check_config=require_causal_lm, takes_adapters=True,
)
