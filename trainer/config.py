"""``arbiter train ppo --config FILE``: one YAML file, validated up front.

Errors name the field by its path in the file (``ppo.clip_coef``) and what it
accepts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from arbiter.config import config_from_mapping, load_config_file, require, require_choice
from arbiter.kl import ESTIMATOR_NAMES
from arbiter.weights import PublishSettings

REWARD_SOURCES = ("raw", "reward_model")
OBJECTIVES = ("clipped", "decoupled")
ALGORITHMS = ("ppo", "a2c")
KL_PENALTIES = ("reward", "loss")
# none: one process; ddp: DistributedDataParallel; fsdp: FSDP2 fully_shard
# (parameters, gradients and optimizer state sharded across the ranks).
PARALLEL = ("none", "ddp", "fsdp")


@dataclass(frozen=True)
class KLConfig:
    # "adaptive": Ziegler et al. 2019 proportional controller; "fixed": constant λ.
    mode: str = "adaptive"
    init_coef: float = 0.1
    target: float = 6.0
    horizon: int = 10000
    # Per-token estimator inside the reward (arbiter.kl): k1 (InstructGPT's
    # log-ratio), k2 or k3 (Schulman 2020).
    estimator: str = "k1"
    # Where β·KL acts. "reward": −β·KL_t in every token's reward (InstructGPT,
    # Ziegler et al. 2019): a sequence pays Σ_t KL_t, so a shorter completion
    # pays less. "loss": no KL in the rewards; β times the token mean of the
    # estimator between the trained policy and the reference is added to the
    # loss (GRPO, Shao et al. 2024 eq. 3, with k3), a per-token price with no
    # premium on brevity.
    penalty: str = "reward"

    def validate(self, prefix: str) -> None:
        require(self.mode in ("adaptive", "fixed"), f"{prefix}.mode", "one of adaptive, fixed", self.mode)
        require_choice(self.penalty, f"{prefix}.penalty", KL_PENALTIES)
        require(self.init_coef >= 0, f"{prefix}.init_coef", "must be >= 0", self.init_coef)
        require(self.target > 0, f"{prefix}.target", "must be > 0", self.target)
        require(self.horizon >= 1, f"{prefix}.horizon", "must be >= 1", self.horizon)
        require_choice(self.estimator, f"{prefix}.estimator", ESTIMATOR_NAMES)


@dataclass(frozen=True)
class LoRAConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    # None: peft's defaults for the architecture.
    target_modules: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.target_modules is not None:
            object.__setattr__(self, "target_modules", tuple(self.target_modules))

    def validate(self, prefix: str) -> None:
        require(self.r >= 1, f"{prefix}.r", "must be >= 1", self.r)
        require(self.alpha >= 1, f"{prefix}.alpha", "must be >= 1", self.alpha)
        require(0 <= self.dropout < 1, f"{prefix}.dropout", "must be in [0, 1)", self.dropout)


@dataclass(frozen=True)
class NLPOConfig:
    """NLPO (Ramamurthy et al. 2022): PPO over an action space masked to the
    top-p nucleus of a masking policy, a frozen copy of the policy synced
    every ``mask_update_every`` updates (published as a version, which the
    workers sample under: PolicyUpdate.mask_version)."""

    top_p: float = 0.9
    mask_update_every: int = 5

    def validate(self, prefix: str) -> None:
        require(math.isfinite(self.top_p) and 0 < self.top_p <= 1, f"{prefix}.top_p", "must be in (0, 1]",
                self.top_p)
        require(isinstance(self.mask_update_every, int) and self.mask_update_every >= 1,
                f"{prefix}.mask_update_every", "must be an integer >= 1 (updates between syncs of the masking policy)",
                self.mask_update_every)


@dataclass(frozen=True)
class PPOConfig:
    # Rollouts per update.
    batch_size: int = 32
    minibatch_size: int = 8
    epochs: int = 4
    learning_rate: float = 1e-5
    # AdamW's decoupled weight decay (Loshchilov & Hutter 2019): it pulls every
    # weight toward 0, not toward the reference, so it is drift the KL term
    # pays for without any reward. torch's default (0.01) was implicit here.
    weight_decay: float = 0.01
    clip_coef: float = 0.2
    # None disables value clipping.
    value_clip_coef: float | None = 0.2
    vf_coef: float = 0.1
    ent_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    max_grad_norm: float = 1.0
    # gae (value head), rloo or grpo (critic-free, need samples_per_prompt >= 2).
    advantage: str = "gae"
    samples_per_prompt: int = 1
    # Which score of a rollout is the reward. "raw": Rollout.reward, the reward
    # model's raw score, normalized by the trainer's running statistics of its
    # reward-model version (Rollout.reward_model_version; ppo_math.VersionedMoments)
    # when normalize_rewards is set, so a swapped-in RM does not shift the scale
    # and a batch mixing versions normalizes each row with its own version's.
    # "reward_model": Rollout.reward_normalized, the score normalized with the
    # statistics its reward-model version ships, so rewards keep one scale from
    # a new version's first rollout on; normalize_rewards does not apply, and a
    # rollout whose reward model ships no statistics is dropped as invalid.
    reward_source: str = "raw"
    # With reward_source raw: normalize RM scores with running mean and std
    # before the KL penalty (reward normalization).
    normalize_rewards: bool = True
    whiten_advantages: bool = True
    # Sampling temperature of the workers: log-probs are recomputed under it.
    temperature: float = 1.0
    # Rollouts sampled more than this many policy versions ago are dropped
    # (counted as rollouts{outcome="stale"}). Workers with the same bound
    # (their max_staleness) generate ahead of training only this far.
    max_staleness: int = 2
    # The policy-gradient objective (trainer/ppo_math.py): "clipped", PPO's
    # ratio against the sampler's log-probs; "decoupled", decoupled PPO
    # (Hilton et al. 2021; AReaL): the ratio against the policy at the start
    # of the update, times a truncated behaviour importance weight, the
    # objective that stays a trust region on stale (asynchronous) rollouts.
    objective: str = "clipped"
    # "ppo": the minibatch epochs of the objective above. "a2c": synchronous
    # advantage actor-critic (Mnih et al. 2016; Gopher's RL fine-tuning):
    # one pass over each batch (epochs 1), the plain policy gradient
    # −A·log π with no ratio clipping (a stale rollout's tokens importance
    # weighted by min(π_θ/π_behav, behaviour_weight_cap)), the value head as
    # the baseline (advantage gae) with an unclipped value loss
    # (value_clip_coef and clip_coef unused), and an entropy bonus (ent_coef > 0).
    algorithm: str = "ppo"
    # Decoupled only: the behaviour weight π_prox/π_behav is truncated at this
    # (min(w, cap), V-trace's ρ̄); null leaves it untruncated.
    behaviour_weight_cap: float | None = 2.0
    # PPO-ptx: pretraining LM loss mix (Ouyang et al. 2022); 0 disables.
    ptx_coef: float = 0.0
    ptx_data: str | None = None
    ptx_batch_size: int = 4
    kl: KLConfig = field(default_factory=KLConfig)
    lora: LoRAConfig | None = None
    # NLPO's action mask; null: plain PPO (A2C) over the whole vocabulary.
    nlpo: NLPOConfig | None = None

    def validate(self, prefix: str) -> None:
        for name in ("batch_size", "minibatch_size", "epochs", "samples_per_prompt", "ptx_batch_size"):
            require(getattr(self, name) >= 1, f"{prefix}.{name}", "must be >= 1", getattr(self, name))
        require(
            self.minibatch_size <= self.batch_size, f"{prefix}.minibatch_size",
            f"must be <= batch_size ({self.batch_size})", self.minibatch_size,
        )
        require(self.learning_rate > 0, f"{prefix}.learning_rate", "must be > 0", self.learning_rate)
        require(self.weight_decay >= 0, f"{prefix}.weight_decay", "must be >= 0", self.weight_decay)
        require(0 < self.clip_coef < 1, f"{prefix}.clip_coef", "must be in (0, 1)", self.clip_coef)
        if self.value_clip_coef is not None:
            require(self.value_clip_coef > 0, f"{prefix}.value_clip_coef", "must be > 0 or null", self.value_clip_coef)
        require(0 <= self.gamma <= 1, f"{prefix}.gamma", "must be in [0, 1]", self.gamma)
        require(0 <= self.lam <= 1, f"{prefix}.lam", "must be in [0, 1]", self.lam)
        require(self.max_grad_norm > 0, f"{prefix}.max_grad_norm", "must be > 0", self.max_grad_norm)
        require(self.advantage in ("gae", "rloo", "grpo"), f"{prefix}.advantage", "one of gae, rloo, grpo", self.advantage)
        require_choice(self.reward_source, f"{prefix}.reward_source", REWARD_SOURCES)
        if self.advantage != "gae":
            require(
                self.samples_per_prompt >= 2, f"{prefix}.samples_per_prompt",
                f"must be >= 2 for the {self.advantage} estimator (it compares samples of one prompt)",
                self.samples_per_prompt,
            )
            require(
                self.batch_size % self.samples_per_prompt == 0, f"{prefix}.batch_size",
                f"must be a multiple of samples_per_prompt ({self.samples_per_prompt}) for {self.advantage}",
                self.batch_size,
            )
        require(self.temperature > 0, f"{prefix}.temperature", "must be > 0", self.temperature)
        require(
            isinstance(self.max_staleness, int) and self.max_staleness >= 1, f"{prefix}.max_staleness",
            "must be an integer >= 1: generation overlaps training, so a rollout is at least one policy version "
            "old when it is trained (a bound of 0 would drop every rollout sampled while an update ran or a "
            "new version was being swapped in)", self.max_staleness,
        )
        require_choice(self.objective, f"{prefix}.objective", OBJECTIVES)
        require_choice(self.algorithm, f"{prefix}.algorithm", ALGORITHMS)
        if self.algorithm == "a2c":
            require(self.epochs == 1, f"{prefix}.epochs", "must be 1 for algorithm a2c (one pass over each batch)",
                    self.epochs)
            require(self.advantage == "gae", f"{prefix}.advantage",
                    "must be gae for algorithm a2c (the value head is its baseline)", self.advantage)
            require(self.objective == "clipped", f"{prefix}.objective",
                    "must be clipped (the default) for algorithm a2c: it has no trust region to decouple; stale "
                    "tokens are weighted by min(π_θ/π_behav, behaviour_weight_cap)", self.objective)
            require(self.ent_coef > 0, f"{prefix}.ent_coef",
                    "must be > 0 for algorithm a2c (its entropy bonus; Mnih et al. 2016 used 0.01)", self.ent_coef)
        if self.behaviour_weight_cap is not None:
            require(
                self.behaviour_weight_cap >= 1, f"{prefix}.behaviour_weight_cap",
                "must be >= 1 or null (below 1 even on-policy tokens would be down-weighted)",
                self.behaviour_weight_cap,
            )
        require(self.ptx_coef >= 0, f"{prefix}.ptx_coef", "must be >= 0", self.ptx_coef)
        if self.ptx_coef > 0:
            require(
                self.ptx_data is not None and Path(self.ptx_data).is_file(), f"{prefix}.ptx_data",
                "must be an existing text file (one pretraining document per line) when ptx_coef > 0", self.ptx_data,
            )
        self.kl.validate(f"{prefix}.kl")
        if self.lora is not None:
            self.lora.validate(f"{prefix}.lora")
        if self.nlpo is not None:
            self.nlpo.validate(f"{prefix}.nlpo")


@dataclass(frozen=True)
class TrainerConfig:
    # The initial policy: any Hugging Face causal-LM directory.
    model_dir: str = ""
    # Checkpoints and published policy versions go here.
    output_dir: str = "runs/trainer"
    # Prefix of published version labels: "<run_name>-<step>".
    run_name: str = "ppo"
    # Stop after this many updates (None: run until stopped).
    max_updates: int | None = None
    publish_every: int = 1
    # A checkpoint is written after every checkpoint_every updates, or once
    # checkpoint_every_s seconds passed since the last one, whichever comes
    # first (null: that trigger is off; at least one must be on). The stream
    # offsets are committed only with the checkpoint that covers them, so a
    # crash replays the updates since the last checkpoint: their rollouts are
    # trained again, from the checkpoint's weights. Versions published since
    # then keep their labels (a replayed step is published under a new one).
    checkpoint_every: int | None = 1
    checkpoint_every_s: float | None = None
    # Checkpoints kept on disk (the newest ones).
    keep_checkpoints: int = 2
    # Published policy versions kept in output_dir/policies (the newest ones,
    # and a delta's parent); null keeps every one (the demo and bench-e2e do,
    # to measure versions along the run, and prune afterwards). Every update
    # publishes a full set of weights, so an unbounded run fills the disk
    # (a 124 M model: 475 MiB per update; the tiny demo's: 5 GB in 6 minutes).
    keep_policy_versions: int | None = 20
    seed: int = 0
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    torch_threads: int | None = None
    # How many recent rollout ids are remembered for dedupe (and checkpointed).
    dedupe_window: int = 100_000
    # How the ranks torchrun starts share the work (trainer/distributed.py):
    # each reads its own partitions of the rollouts topic, and every update is
    # one global batch of batch_size rollouts drawn from all of them.
    parallel: str = "none"
    # A collective that does not complete within this (a rank died or hangs)
    # fails the job instead of blocking it forever.
    collective_timeout_s: float = 300.0
    ppo: PPOConfig = field(default_factory=PPOConfig)
    # Passed to arbiter.stream.KafkaSettings (bootstrap_servers, topic_prefix, ...);
    # ARBITER_KAFKA_* environment variables fill what is not set here.
    kafka: dict[str, Any] = field(default_factory=dict)
    # Where published versions go and how they travel (arbiter.weights):
    # {uri: s3://bucket/prefix, bf16: false, delta: false}; no uri: replicas
    # read checkpoint_path from a shared filesystem.
    weights: PublishSettings = field(default_factory=PublishSettings)

    def __post_init__(self) -> None:
        require(bool(self.model_dir), "model_dir", "must name the initial policy's Hugging Face directory", self.model_dir)
        require(bool(self.run_name) and "/" not in self.run_name, "run_name", "must be non-empty, without '/'", self.run_name)
        if self.max_updates is not None:
            require(self.max_updates >= 1, "max_updates", "must be >= 1 or null", self.max_updates)
        for name in ("publish_every", "keep_checkpoints", "dedupe_window"):
            require(getattr(self, name) >= 1, name, "must be >= 1", getattr(self, name))
        if self.keep_policy_versions is not None:
            # Two at least: a replica may still be loading the one before the newest.
            require(self.keep_policy_versions >= 2, "keep_policy_versions", "must be >= 2 or null",
                    self.keep_policy_versions)
        require_choice(self.parallel, "parallel", PARALLEL)
        require(
            math.isfinite(self.collective_timeout_s) and self.collective_timeout_s > 0, "collective_timeout_s",
            "must be > 0 seconds", self.collective_timeout_s,
        )
        if self.parallel == "fsdp":
            require(self.ppo.lora is None, "ppo.lora",
                    "must be null with parallel: fsdp (LoRA adapters are small: train them with parallel: ddp)",
                    self.ppo.lora)
            require(self.ppo.ptx_coef == 0, "ppo.ptx_coef",
                    "must be 0 with parallel: fsdp (PPO-ptx's second forward is supported with ddp or none)",
                    self.ppo.ptx_coef)
        if self.checkpoint_every is not None:
            require(self.checkpoint_every >= 1, "checkpoint_every", "must be >= 1 or null", self.checkpoint_every)
        if self.checkpoint_every_s is not None:
            require(
                math.isfinite(self.checkpoint_every_s) and self.checkpoint_every_s > 0, "checkpoint_every_s",
                "must be > 0 seconds or null", self.checkpoint_every_s,
            )
        require(
            self.checkpoint_every is not None or self.checkpoint_every_s is not None, "checkpoint_every",
            "must be set when checkpoint_every_s is null: without a checkpoint no offset is ever committed "
            "and a restart replays the whole stream", self.checkpoint_every,
        )
        self.ppo.validate("ppo")
        self.weights.validate("weights")
        if self.ppo.nlpo is not None:
            # The masking policy is a version the workers' policy service loads: one that was published.
            require(self.ppo.nlpo.mask_update_every % self.publish_every == 0, "ppo.nlpo.mask_update_every",
                    f"must be a multiple of publish_every ({self.publish_every}): the masking policy is a published "
                    "version", self.ppo.nlpo.mask_update_every)
            require(self.parallel == "none", "parallel",
                    "must be none with ppo.nlpo (the masking policy's copy is not sharded)", self.parallel)


def load_config(path: str | Path, **overrides: Any) -> TrainerConfig:
    return load_config_file(TrainerConfig, path, "trainer config", **overrides)


def config_from_dict(data: dict[str, Any]) -> TrainerConfig:
    return config_from_mapping(TrainerConfig, data)
