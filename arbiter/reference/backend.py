"""The reference model as a backend kind: teacher-forced log-probabilities of
completion tokens under a causal LM (a full checkpoint, or in-process a LoRA
adapter merged into its base).

Both backends run the same computation (``arbiter.lm.completion_logits`` and
``triton_models/model.py``): one forward of prompt + completion, right-padded
with the model's pad id under an attention mask, log-softmax in float64 of the
(up-cast) logits predicting each completion token, whatever the weights'
dtype. Triton answers in float32, the precision the wire carries anyway.
"""

from __future__ import annotations

from arbiter.backends import ModelKind
from arbiter.backends.placement import CPU_FLOAT32, Placement
from arbiter.backends.signatures import REFERENCE as REFERENCE_TENSORS
from arbiter.backends.signatures import Pair
from arbiter.lm import completion_logits, gather_tokens, load_causal_weights, probe_finite, require_plain_causal_lm


def load_reference_weights(root, base_dir=None, placement: Placement = CPU_FLOAT32):
    model, tokenizer = load_causal_weights(root, base_dir, placement)
    probe_finite(model, tokenizer)
    return model, tokenizer, model.config


def reference_forward(model, batch: list[Pair]) -> list[list[float]]:
    """Per pair, log pi_ref(completion token | prefix) for each completion token."""
    import torch

    with torch.inference_mode():
        logits = completion_logits(model, int(model.config.pad_token_id), batch)
        # Every row's completion ids in one copy to the device: a copy per row
        # from host memory waits for the device to finish what is queued
        # (on a GPU, a stall per row).
        tokens = torch.tensor([t for _, completion in batch for t in completion], dtype=torch.long)
        tokens = tokens.to(logits[0].device)
        values, start = [], 0
        # One row at a time: a float64 copy of every row's (C, V) logits at
        # once would be the batch's biggest allocation by far.
        for item, (_, completion) in zip(logits, batch, strict=True):
            values.append(gather_tokens(torch.log_softmax(item.double(), dim=-1),
                                        tokens[start : start + len(completion)]))
            start += len(completion)
        # One copy off the device for the whole batch, not one per row.
        flat = torch.cat(values).tolist()
    out, start = [], 0
    for _, completion in batch:
        out.append(flat[start : start + len(completion)])
        start += len(completion)
    return out


REFERENCE = ModelKind(
    name="reference", load_torch=load_reference_weights, forward_torch=reference_forward, triton=REFERENCE_TENSORS,
    check_config=require_plain_causal_lm, takes_adapters=True,
    # 1 and 2 pairs, sequences of 2 tokens (the shortest pair) and of 4, one padded: every graph --compile serves with.
    warmup_batches=(
        [([0], [0])], [([0], [0]), ([0], [0])], [([0, 0], [0, 0])], [([0, 0], [0, 0]), ([0], [0, 0])],
    ),
)
