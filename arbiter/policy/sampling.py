"""The sampling distribution, written out so the log-probs Generate returns
are exactly those of the distribution each token was drawn from.

PPO's importance ratio pi_new(a) / pi_old(a) needs pi_old to be the
distribution that actually produced the action, i.e. the model's logits after
the same processing: temperature, then top-k, then top-p (the order of
Hugging Face's default logits warpers). A trainer that recomputes pi_new must
apply ``sampling_logprobs`` with the same parameters to its own logits.

Greedy decoding (temperature 0) is the point mass on the argmax, so its
log-prob is 0 for every token.
"""

from __future__ import annotations

import hashlib


def top_p_set(logits, top_p: float):
    """(R, V) logits -> (R, V) bool: the nucleus of softmax(logits), the
    smallest set of most likely tokens whose mass reaches ``top_p``. A token
    stays if the mass of the tokens ranked above it is < top_p, so the most
    likely token always stays. The one definition of a top-p set: the
    sampler's top_p and NLPO's action mask (its masking policy's nucleus,
    in the policy service and in the trainer) both use it."""
    import torch

    sorted_scores, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_scores, dim=-1)
    mass_above = torch.cumsum(probs, dim=-1) - probs
    return torch.zeros_like(mass_above, dtype=torch.bool).scatter_(-1, order, mass_above < top_p)


def sampling_logprobs(logits, temperature: float, top_k: int = 0, top_p: float = 1.0, allowed=None):
    """(R, V) logits -> (R, V) float64 log-probs of the sampling
    distribution; tokens it can never draw are -inf.

    ``allowed`` (R, V) bool, NLPO's action mask (``top_p_set`` of the
    masking policy): tokens outside it are removed after the temperature and
    before top-k / top-p, so the distribution is the policy's renormalised
    over the mask (Ramamurthy et al. 2022) and is never empty (the mask keeps
    at least one token, top-k / top-p keep the most likely one left)."""
    import torch

    scores = logits.double()
    if allowed is not None:
        scores = scores.masked_fill(~allowed.to(scores.device), float("-inf"))
    if temperature == 0.0:
        best = scores.argmax(dim=-1, keepdim=True)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, best, 0.0)
    scores = scores / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        scores = scores.masked_fill(~top_p_set(scores, top_p), float("-inf"))
    return torch.log_softmax(scores, dim=-1)


def row_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """Each sample gets its own generator, seeded from the request's seed and
    its position, so a sample depends on nothing else in the batch."""
    digest = hashlib.sha256(f"{seed}:{prompt_index}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def row_uniforms(seed: int, count: int) -> list[float]:
    """The uniform draws of one sample, one per token it may generate, from
    its own generator: a sample's tokens depend on its own distributions and
    these numbers only, never on the rows it shares a decoding step with."""
    import torch

    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.rand(count, generator=generator, dtype=torch.float64).tolist()


def draw(logprobs, uniforms):
    """One token per row of ``sampling_logprobs`` (R, V), by inverting each
    row's CDF at its uniform (R,): vectorized over rows, so rows of many
    requests are sampled together. A greedy row (a point mass) yields its argmax."""
    import torch

    probs = logprobs.exp()
    cdf = probs.cumsum(dim=-1)
    target = uniforms.to(cdf.device, cdf.dtype)[:, None] * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[-1] - 1)[:, 0]
    # u * total can round up to total: take the last token that can be drawn.
    impossible = probs.gather(-1, tokens[:, None])[:, 0] == 0
    if bool(impossible.any()):
        last = torch.arange(probs.shape[-1], device=probs.device).masked_fill(probs == 0, -1).amax(dim=-1)
        tokens = torch.where(impossible, last, tokens)
    return tokens
