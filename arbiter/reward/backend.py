"""The reward model as a backend kind: any Hugging Face directory that
``AutoModelForSequenceClassification`` loads with one label (what TRL's
RewardTrainer writes). The score of a sequence is that model's own pooled
logit: a right-padded batch under an attention mask, padded with the model's
pad id (HF pools at the last non-pad token, so the pad id decides which logit
is the score). In-process and Triton (``triton_models/model.py``) run the same
computation; tokenization, validation, batching and versions stay in the
service either way.
"""

from __future__ import annotations

from pathlib import Path

from arbiter.backends import ModelKind
from arbiter.backends.placement import CPU_FLOAT32, Placement, model_device
from arbiter.backends.signatures import REWARD as REWARD_TENSORS
from arbiter.errors import ModelLoadError
from arbiter.hf import causal_lm_head, load_tokenizer, read_config
from arbiter.lm import no_cache


def check_reward_config(config, root: Path) -> None:
    """Refuse a checkpoint that is not a reward model, saying what it is. A
    causal LM's config usually names no labels, so transformers reports its
    default num_labels=2: the architecture tells more than that number."""
    causal = causal_lm_head(config)
    if causal is not None:
        raise ModelLoadError(
            f"{str(root)!r} is a causal language model ({causal}), not a reward model (sequence classification "
            "with one label); train one from it with `arbiter train rm`"
        )
    if config.num_labels != 1:
        raise ModelLoadError(
            f"{str(root)!r} has num_labels={config.num_labels}: a reward model is a sequence-classification model "
            "with exactly one label (its score); train one with `arbiter train rm`"
        )


def load_reward_weights(root: Path, base_dir: Path | None = None, placement: Placement = CPU_FLOAT32):
    """(model, tokenizer, config) on ``placement``; RMs are served whole (no adapters)."""
    from transformers import AutoModelForSequenceClassification

    tokenizer = load_tokenizer(root)
    check_reward_config(read_config(root), root)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(root), local_files_only=True,
                                                                   dtype=placement.torch_dtype)
    except Exception as err:
        raise ModelLoadError(f"cannot load a sequence-classification model from {str(root)!r}: {err}") from err
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return placement.place(model), tokenizer, model.config


def reward_forward(model, batch: list[list[int]]) -> list[float]:
    """Scores of token-id sequences, as float32 values whatever the weights'
    dtype. With a causal backbone, right padding leaves every real position's
    output identical to an unpadded forward."""
    import torch

    arrays = REWARD_TENSORS.pack(batch, model.config.pad_token_id)
    device = model_device(model)
    input_ids = torch.from_numpy(arrays["INPUT_IDS"]).to(device)
    lengths = torch.from_numpy(arrays["LENGTHS"]).to(device)
    attention_mask = (torch.arange(input_ids.shape[1], device=device)[None, :] < lengths).long()
    with torch.inference_mode():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, **no_cache(model)).logits
    return logits[:, 0].float().tolist()


REWARD = ModelKind(
    name="reward", load_torch=load_reward_weights, forward_torch=reward_forward, triton=REWARD_TENSORS,
    check_config=check_reward_config,
    # Rows of 1 and 2 items, of 1 token and of 4 (one row padded): every graph --compile serves with.
    warmup_batches=([[0]], [[0], [0]], [[0] * 4], [[0] * 4, [0] * 3]),
)
