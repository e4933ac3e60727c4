"""One PPO (or A2C) update on a batch of rollouts (InstructGPT's objective).

Reads top to bottom like cleanrl's ``ppo.py`` / torchtune's ``rlhf``: rewards,
old values (and proximal log-probs), advantages, minibatch epochs of the
clipped (or decoupled) objective, then the KL coefficient. The math is in :mod:`trainer.ppo_math`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from arbiter.errors import InvalidInput
from trainer import ppo_math as pm
from trainer.batch import PPOBatch, gather_positions
from trainer.config import PPOConfig
from trainer.policy_model import PolicyWithValue

if TYPE_CHECKING:
    from trainer.distributed import DataParallel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UpdateStats:
    reward_raw: float  # mean raw RM score of the batch
    reward_normalized: float  # mean of the scores the update used (after normalization)
    kl: float  # mean per-sequence Σ_t KL_t to the reference (before the update)
    kl_coef: float  # β used for this batch's rewards
    entropy: float
    policy_loss: float
    value_loss: float
    clip_fraction: float
    approx_kl: float
    response_length: float
    optimizer_steps: int
    skipped_steps: int  # minibatch steps dropped for a non-finite loss or gradient
    # How much of the returns' variance the value head explained before the
    # update (cleanrl's explained_variance); None without a value head (rloo, grpo).
    explained_variance: float | None = None
    # Decoupled objective only (None otherwise): mean truncated behaviour
    # weight π_prox/π_behav over real tokens, and the fraction truncated.
    behaviour_weight: float | None = None
    behaviour_weight_truncated: float | None = None


def policy_outputs(
    model: nn.Module, batch: PPOBatch, temperature: float, with_values: bool = True,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Log-probs (B, T) and values (B, T; None unless ``with_values``) of the
    completion tokens, plus the log-softmax over the vocabulary (B, T, V) they
    were read from (for the entropy).
    Logits are divided by the sampling temperature so the ratio compares the
    same distribution the workers sampled from.

    Only what is needed is computed: the LM head runs from the first position
    that predicts a completion token on (the prompt positions before it are
    cut: with short completions the head over the vocabulary is a large share
    of the forward and backward), and the value head only with a critic (GRPO
    and RLOO have none). ``model`` is the policy or its DDP/FSDP wrapper: the
    call goes through the wrapper's forward, which the gradient
    synchronisation hangs on."""
    logits, values = completion_logits(model, batch, with_values)
    if batch.action_mask is None:
        logp = torch.log_softmax(logits / temperature, dim=-1)  # (B, T, V)
    else:
        logp = pm.nlpo_logprobs(logits, batch.action_mask, temperature)
    logprobs = logp.gather(-1, batch.completion_ids.long()[..., None]).squeeze(-1)
    return logprobs, values, logp


def completion_logits(model: nn.Module, batch: PPOBatch, with_values: bool = True) -> tuple[Tensor, Tensor | None]:
    """Logits (B, T, V) at the positions predicting each completion token,
    and values (B, T) there (None unless ``with_values``)."""
    first = int(batch.positions[:, 0].min())  # every row has a completion token
    keep = batch.input_ids.shape[1] - first
    logits, values = model(batch.input_ids, batch.attention_mask, with_values=with_values, logits_to_keep=keep)
    # Padded completion slots hold position 0, which may precede the window:
    # any index in it will do, they are masked.
    shifted = (batch.positions - first).clamp(min=0)
    return gather_positions(logits, shifted), None if values is None else gather_positions(values, shifted)


def nlpo_action_mask(masking_policies: dict[str, nn.Module], batch: PPOBatch, versions: list[str],
                     top_p: float) -> Tensor:
    """(B, T, V) NLPO action sets of ``batch``: each row's from the masking
    policy of its own mask version (``versions``, one per row), computed
    once per update (the masking policy is frozen meanwhile)."""
    allowed = None
    with torch.no_grad():
        for version in sorted(set(versions)):
            rows = torch.tensor([i for i, v in enumerate(versions) if v == version])
            part = batch.select(rows)
            logits, _ = completion_logits(masking_policies[version], part, with_values=False)
            sets = pm.nlpo_action_mask(logits, top_p, part.completion_ids)
            if allowed is None:
                allowed = sets.new_zeros(batch.completion_ids.shape + sets.shape[-1:])
            allowed[rows] = sets
    # Padded slots allow everything: their log-probs stay finite (they are masked out).
    return allowed | ~batch.mask[..., None]


def reward_scores(batch: PPOBatch, reward_moments: pm.VersionedMoments, cfg: PPOConfig) -> Tensor:
    """(B,) the scores the update rewards, per ``cfg.reward_source``; raw
    scores are normalized with the running moments of their own reward-model
    version (``VersionedMoments``: a promoted RM does not shift the scale)."""
    if cfg.reward_source == "reward_model":
        if batch.rm_normalized_scores is None:
            raise InvalidInput("batch", "reward_source is reward_model, but some rollouts have no RM-normalized reward")
        return batch.rm_normalized_scores
    versions = batch.reward_model_versions or ("",) * batch.size
    reward_moments.update(batch.scores, versions)
    if cfg.normalize_rewards:
        return reward_moments.normalize(batch.scores, versions)
    return batch.scores


def ppo_update(
    model: PolicyWithValue,
    optimizer: torch.optim.Optimizer,
    batch: PPOBatch,
    kl_controller: pm.KLController,
    reward_moments: pm.VersionedMoments,
    cfg: PPOConfig,
    generator: torch.Generator,
    ptx_batches: Iterator[tuple[Tensor, Tensor]] | None = None,
    shard: DataParallel | None = None,
) -> UpdateStats:
    """One update on ``batch``. With ``shard`` (trainer/distributed.py) this
    rank holds the same global batch as every other, computes steps 1-2 on
    all of it, and runs only its rows of each minibatch with its loss
    weighted so that the averaged gradient is the whole minibatch's."""
    mask = batch.mask  # (B, T)
    forward = model if shard is None else shard.module
    use_critic = cfg.advantage == "gae"
    with torch.no_grad():
        # 1. Reward: the RM score, normalized so β and the value head keep one
        #    scale as the policy drifts (with running statistics, or with those
        #    each RM version ships: cfg.reward_source), minus β·KL per token
        #    (Ouyang et al. 2022, eq. 2; Ziegler et al. 2019 put r_θ on the last token);
        #    with cfg.kl.penalty "loss" the KL is priced in step 3 instead (GRPO).
        scores = reward_scores(batch, reward_moments, cfg)
        beta = kl_controller.value
        kl_in_loss = cfg.kl.penalty == "loss"
        penalized = pm.kl_penalized_rewards(scores, batch.old_logprobs, batch.ref_logprobs, mask,
                                            0.0 if kl_in_loss else beta, cfg.kl.estimator)
        kl_per_sequence = penalized.kl.sum(dim=1)  # (B,)

        # 2. Advantages: GAE over the value head's estimates (values before the
        #    update are the "old" values of the clipped value loss), or a
        #    critic-free group baseline (RLOO / GRPO) over sequence rewards.
        decoupled = cfg.objective == "decoupled"
        # One forward of the policy as it is before this update: the value
        # head's old values, and for the decoupled objective the proximal
        # log-probs (Hilton et al. 2021) its trust region is centred on.
        proximal_logprobs, old_values, _ = (
            policy_outputs(model, batch, cfg.temperature, with_values=use_critic) if use_critic or decoupled
            else (None, None, None)
        )
        behaviour = (
            pm.behaviour_weights(proximal_logprobs, batch.old_logprobs, mask, cfg.behaviour_weight_cap)
            if decoupled else None
        )
        if use_critic:
            advantages, returns = pm.gae(penalized.rewards, old_values, mask, cfg.gamma, cfg.lam)
            explained_variance = pm.explained_variance(old_values, returns, mask)
        else:
            sequence_rewards = penalized.rewards.sum(dim=1)  # (B,)
            estimator = pm.rloo_advantages if cfg.advantage == "rloo" else pm.grpo_advantages
            advantages = pm.broadcast_sequence_advantages(estimator(sequence_rewards, batch.group_ids), mask)
            returns = explained_variance = None
        if cfg.whiten_advantages:
            advantages = pm.masked_whiten(advantages, mask)

    # 3. Minibatch epochs of the clipped surrogate, clipped value loss, entropy
    #    bonus and optional pretraining mix (PPO-ptx); A2C: one pass of the
    #    unclipped policy gradient and value loss (cfg.algorithm).
    params = model.trainable_parameters()
    totals = {"entropy": 0.0, "policy_loss": 0.0, "value_loss": 0.0, "clip_fraction": 0.0, "approx_kl": 0.0}
    steps = skipped = 0
    # The model stays in eval mode: dropout would make π_θ ≠ π_old on the very
    # first step and turn the ratio into noise.
    for _ in range(cfg.epochs):
        for index in pm.minibatch_indices(batch.size, cfg.minibatch_size, generator=generator):
            weight = 1.0
            if shard is not None:
                index, weight = shard.split(index, mask)
            mb = batch.select(index)
            logprobs, values, logp = policy_outputs(forward, mb, cfg.temperature, with_values=use_critic)
            if cfg.algorithm == "a2c":
                pg = pm.a2c_policy_loss(logprobs, mb.old_logprobs, advantages[index], mb.mask,
                                        cfg.behaviour_weight_cap)
            elif behaviour is not None:
                pg = pm.decoupled_policy_loss(
                    logprobs, proximal_logprobs[index], behaviour.weights[index], advantages[index], mb.mask,
                    cfg.clip_coef,
                )
            else:
                pg = pm.policy_loss(logprobs, mb.old_logprobs, advantages[index], mb.mask, cfg.clip_coef)
            value_clip = None if cfg.algorithm == "a2c" else cfg.value_clip_coef
            vf = pm.value_loss(values, old_values[index], returns[index], mb.mask, value_clip) if use_critic else None
            # Without an entropy bonus the entropy is only logged: no graph for it.
            with torch.set_grad_enabled(cfg.ent_coef > 0 and torch.is_grad_enabled()):
                entropy = pm.entropy_from_logprobs(logp, mb.mask)
            ptx = None
            if cfg.ptx_coef > 0 and ptx_batches is not None:
                ids, attention = next(ptx_batches)
                ptx = pm.ptx_loss(model(ids, attention)[0], ids, attention)
            # Token means of this rank's rows, weighted (1 in one process);
            # PPO-ptx is the same batch on every rank, so never reweighted.
            scaled = (lambda term: term) if shard is None else (lambda term: term * weight)
            kl_term = pm.kl_loss(logprobs, mb.ref_logprobs, mb.mask, cfg.kl.estimator) if kl_in_loss else None
            loss = pm.ppo_total_loss(
                scaled(pg.loss), vf_loss=scaled(vf.loss) if vf else None, vf_coef=cfg.vf_coef if use_critic else 0.0,
                entropy=scaled(entropy), ent_coef=cfg.ent_coef, ptx_loss=ptx,
                ptx_coef=cfg.ptx_coef if ptx is not None else 0.0,
                kl_loss=scaled(kl_term) if kl_term is not None else None, kl_coef=beta if kl_in_loss else 0.0,
            )

            # 4. A non-finite loss or gradient skips this step instead of
            #    poisoning the weights; the run goes on.
            optimizer.zero_grad(set_to_none=True)
            finite = bool(torch.isfinite(loss))
            if shard is not None:
                finite = shard.all_finite(finite)
            if not finite:
                skipped += 1
                log.warning("skipping a PPO step: non-finite loss %s", float(loss.detach()))
                continue
            loss.backward()
            if shard is None:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            else:  # the same norm on every rank, so every rank skips or steps alike
                grad_norm = shard.clip_grad_norm(params, cfg.max_grad_norm)
            if not torch.isfinite(grad_norm):
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
                log.warning("skipping a PPO step: non-finite gradient norm %s", float(grad_norm))
                continue
            optimizer.step()
            steps += 1
            totals["entropy"] += float(entropy.detach())
            totals["policy_loss"] += float(pg.loss.detach())
            totals["value_loss"] += float(vf.loss.detach()) if vf else 0.0
            totals["clip_fraction"] += float(pg.clipfrac)
            totals["approx_kl"] += float(pg.approx_kl)

    # 5. Adapt β toward the KL target with this batch's measured KL (Ziegler et al. 2019).
    mean_kl = float(kl_per_sequence.mean())
    if math.isfinite(mean_kl):
        kl_controller.update(mean_kl, n_steps=batch.size)
    means = {k: (v / steps if steps else math.nan) for k, v in totals.items()}
    return UpdateStats(
        reward_raw=float(batch.scores.mean()),
        reward_normalized=float(scores.mean()),
        kl=mean_kl,
        kl_coef=beta,
        response_length=float(mask.sum(dim=1).float().mean()),
        optimizer_steps=steps,
        skipped_steps=skipped,
        explained_variance=explained_variance,
        behaviour_weight=float(pm.masked_mean(behaviour.weights, mask)) if behaviour is not None else None,
        behaviour_weight_truncated=float(behaviour.truncated_fraction) if behaviour is not None else None,
        **means,
    )


def make_kl_controller(cfg: PPOConfig) -> pm.KLController:
    if cfg.kl.mode == "fixed":
        return pm.FixedKLController(cfg.kl.init_coef)
    return pm.AdaptiveKLController(cfg.kl.init_coef, cfg.kl.target, cfg.kl.horizon)


def make_optimizer(params: list[torch.nn.Parameter], learning_rate: float,
                   weight_decay: float = 0.01) -> torch.optim.Optimizer:
    """AdamW, fused where torch has the kernel for the parameters' device (one
    kernel over all tensors instead of about ten ops per tensor: on the demo's
    model on one CPU thread, 2.3 ms per step instead of 7.5, a tenth of an
    update). The state (and so a checkpoint) is the same either way."""
    fusable = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay, fused=fusable or None)
