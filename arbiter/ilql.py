"""ILQL value heads beside a policy checkpoint: their module, their file, and
sampling with them (Snell et al. 2022; the training is ``trainer/ilql.py``).

An ILQL version is an ordinary Hugging Face causal-LM directory (any HF
loader still loads the policy) plus ``ilql_heads.safetensors``: Q₁, Q₂,
their target copies Q̂₁, Q̂₂ and V, each an MLP over the LM's last hidden
state (hidden → 2·hidden → out, trlx's head shape), the Q heads
vocabulary-sized as in the paper. The file's metadata names the heads, the
sizes they were built for and the training settings that matter when
sampling.

A loader that would serve the policy while ignoring the heads refuses the
directory (:func:`refuse_heads`): the version's authors meant it to be
sampled with ``logits + β·(min Q̂ − V)``, and quietly sampling π_β instead
would be a different policy under the same label.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from arbiter.errors import ModelLoadError

HEADS_FILE = "ilql_heads.safetensors"
FORMAT = "arbiter-ilql-heads/1"
HEAD_NAMES = ("q1", "q2", "target_q1", "target_q2", "v")
REMEDY = ("sample it on a policy service started with --ilql-beta B (in-process backend); reference and reward "
          "services, Triton backends and the PPO trainer need a checkpoint without " + HEADS_FILE)


def has_heads(model_dir: str | Path) -> bool:
    return (Path(model_dir) / HEADS_FILE).is_file()


def refuse_heads(model_dir: str | Path, who: str, remedy: str = REMEDY) -> None:
    """ModelLoadError (FAILED_PRECONDITION) when ``model_dir`` ships ILQL heads
    that ``who`` cannot use; ``remedy`` says what would serve it."""
    if has_heads(model_dir):
        raise ModelLoadError(
            f"{str(model_dir)!r} ships ILQL heads ({HEADS_FILE}: {', '.join(HEAD_NAMES)}) that {who} cannot use; "
            f"serving its policy without them would sample a different policy under the same version: {remedy}"
        )


def perturbed_logits(logits, target_qs, values, beta: float):
    """logits + β·(min_i Q̂ᵢ(s, ·) − V(s)) (ILQL eq. 4): (..., V), (..., V)
    each, (...,) → (..., V). β = 0 returns the policy's own logits."""
    import torch

    if beta == 0:
        return logits
    advantage = torch.stack(list(target_qs)).amin(dim=0) - values[..., None]
    return logits + beta * advantage.to(logits.dtype)


@functools.cache
def _heads_class():
    import torch
    from torch import nn

    def mlp(hidden: int, out: int) -> nn.Module:
        return nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, out))

    class ILQLHeads(nn.Module):
        """Q₁, Q₂ (B, T, V), their targets, and V (B, T) from hidden states (B, T, H)."""

        def __init__(self, hidden_size: int, vocab_size: int):
            super().__init__()
            self.hidden_size, self.vocab_size = hidden_size, vocab_size
            self.q1, self.q2 = mlp(hidden_size, vocab_size), mlp(hidden_size, vocab_size)
            self.target_q1, self.target_q2 = mlp(hidden_size, vocab_size), mlp(hidden_size, vocab_size)
            self.v = mlp(hidden_size, 1)
            # The targets start equal to their heads and never take gradient.
            self.target_q1.load_state_dict(self.q1.state_dict())
            self.target_q2.load_state_dict(self.q2.state_dict())
            for p in (*self.target_q1.parameters(), *self.target_q2.parameters()):
                p.requires_grad_(False)

        def forward(self, hidden):
            hidden = hidden.to(self.v[0].weight.dtype)
            with torch.no_grad():
                targets = (self.target_q1(hidden), self.target_q2(hidden))
            return (self.q1(hidden), self.q2(hidden)), targets, self.v(hidden).squeeze(-1)

        def sampling_terms(self, hidden):
            """(target Qs, V) only: what decoding needs."""
            hidden = hidden.to(self.v[0].weight.dtype)
            return (self.target_q1(hidden), self.target_q2(hidden)), self.v(hidden).squeeze(-1)

    return ILQLHeads


def ILQLHeads(hidden_size: int, vocab_size: int):  # noqa: N802 - a class, built once torch is imported
    return _heads_class()(hidden_size, vocab_size)


def save_heads(heads, model_dir: str | Path, settings: dict[str, Any]) -> Path:
    """The heads as ``model_dir/ilql_heads.safetensors``; metadata names them,
    their sizes and ``settings`` (strings only: safetensors' metadata)."""
    from safetensors.torch import save_file

    state = {name: tensor.detach().contiguous().cpu() for name, tensor in heads.state_dict().items()}
    metadata = {
        "format": FORMAT, "heads": ",".join(HEAD_NAMES), "hidden_size": str(heads.hidden_size),
        "vocab_size": str(heads.vocab_size), "settings": json.dumps(settings, sort_keys=True),
    }
    path = Path(model_dir) / HEADS_FILE
    save_file(state, str(path), metadata=metadata)
    return path


def load_heads(model_dir: str | Path, hidden_size: int, vocab_size: int):
    """The heads of ``model_dir``, checked against the policy they ride on."""
    from safetensors import safe_open

    path = Path(model_dir) / HEADS_FILE
    try:
        with safe_open(str(path), "pt") as fh:
            metadata = fh.metadata() or {}
            state = {key: fh.get_tensor(key) for key in fh.keys()}
    except Exception as err:
        raise ModelLoadError(f"{str(path)!r}: cannot read the ILQL heads: {err}") from err
    if metadata.get("format") != FORMAT:
        raise ModelLoadError(f"{str(path)!r}: metadata format is {metadata.get('format')!r}, expected {FORMAT!r}")
    for key, want in (("hidden_size", hidden_size), ("vocab_size", vocab_size)):
        if metadata.get(key) != str(want):
            raise ModelLoadError(
                f"{str(path)!r}: the heads were built for {key} {metadata.get(key)}, the policy beside them has {want}"
            )
    heads = ILQLHeads(hidden_size, vocab_size)
    try:
        heads.load_state_dict(state)
    except RuntimeError as err:
        raise ModelLoadError(f"{str(path)!r}: the ILQL heads do not match their metadata: {err}") from err
    return heads.eval()


@functools.cache
def _sampler_class():
    import inspect

    import torch
    from torch import nn

    class ILQLSampler(nn.Module):
        """A causal LM whose logits are ILQL's perturbed ones: a drop-in
        for the model the policy decodes with (same forward arguments, same
        cache), so every path that reads ``.logits`` (the decoding batch,
        teacher-forced log-probs) samples and scores one distribution."""

        def __init__(self, lm, heads, beta: float):
            super().__init__()
            self.lm, self.heads, self.beta = lm, heads, float(beta)
            self.config = lm.config
            accepted = inspect.signature(lm.forward).parameters
            # Transformers renamed past_key_values to cache; pass the LM its own spelling.
            self._cache_arg = "cache" if "cache" in accepted else "past_key_values"
            self._keeps_logits = "logits_to_keep" in accepted

        def get_input_embeddings(self):
            return self.lm.get_input_embeddings()

        def get_output_embeddings(self):
            return self.lm.get_output_embeddings()

        def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, use_cache=None,
                    logits_to_keep=0, past_key_values=None):
            kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=use_cache, output_hidden_states=True)
            if cache is not None or past_key_values is not None:
                kwargs[self._cache_arg] = cache if cache is not None else past_key_values
            if self._keeps_logits and logits_to_keep:
                kwargs["logits_to_keep"] = logits_to_keep
            out = self.lm(**kwargs)
            keep = out.logits.shape[1]
            hidden = out.hidden_states[-1][:, -keep:]  # the positions the logits were kept for
            with torch.no_grad():
                target_qs, values = self.heads.sampling_terms(hidden)
            out.logits = perturbed_logits(out.logits, target_qs, values, self.beta)
            out.hidden_states = None
            return out

    return ILQLSampler


def ILQLSampler(lm, heads, beta: float):  # noqa: N802 - a class, built once torch is imported
    return _sampler_class()(lm, heads, beta)


def unwrap(model):
    """The causal LM itself, under an ``ILQLSampler`` or not."""
    return model.lm if isinstance(model, _sampler_class()) else model


def head_sizes(lm) -> tuple[int, int]:
    """(hidden size, logits width) of a causal LM: what its heads read and write."""
    hidden = getattr(lm.config, "hidden_size", None) or lm.get_input_embeddings().embedding_dim
    out = lm.get_output_embeddings()
    vocab = out.weight.shape[0] if out is not None else lm.config.vocab_size
    return int(hidden), int(vocab)


def with_heads(lm, model_dir: str | Path, beta: float):
    """``lm`` sampling with ``model_dir``'s heads at β, on ``lm``'s device and dtype."""
    heads = load_heads(model_dir, *head_sizes(lm))
    weight = lm.get_input_embeddings().weight
    return ILQLSampler(lm, heads.to(device=weight.device, dtype=weight.dtype), beta).eval()

