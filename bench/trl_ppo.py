"""TRL's PPOTrainer, in one process, for ``make bench-e2e`` (bench/e2e.py).

TRL's PPO ("PPOv2": a separate value model, a sequence-classification reward
model, per-token KL in the reward, GAE) is ``trl.experimental.ppo.PPOTrainer``
up to TRL 1.12.0, the last release that has it (1.13 removed it; 0.x had it
as ``trl.PPOTrainer``). It runs in the benchmark's own virtual environment
(``.venv-trl-ppo``: TRL 1.12.0 beside the project's torch and transformers,
every package pinned by ``bench/trl-ppo.lock``), never the project's, so it
imports nothing from Arbiter (``bench/trl_runner.py``, what both TRL runners
share, is stdlib and torch): everything comes in as flags, and the result is
a JSON file plus the final policy as a Hugging Face directory, which the
benchmark evaluates exactly as it evaluates Arbiter's. The transformers there
is the project's, so the checkpoints load as they are (no conversion).

Arbiter's PPO config (``trainer/config.py`` PPOConfig with the demo's ``ppo``
dict, ``services/demo_models.py``) mapped onto TRL's PPOConfig:

- batch of ``batch_size`` (32) completions per update: TRL's
  ``per_device_train_batch_size`` 32 with no gradient accumulation (TRL's
  batch = per-device batch x accumulation steps, and accumulation would
  merge its minibatches into one optimizer step); one completion per prompt,
  TRL PPO's only mode (Arbiter's worker samples its group of 4 per prompt, 8
  prompts a batch).
- minibatches of ``minibatch_size`` (8): ``num_mini_batches`` = 32 / 8, one
  optimizer step each; ``epochs`` (2): ``num_ppo_epochs``. So 8 optimizer
  steps per update, as Arbiter's trainer takes.
- learning rate (5e-4), constant (Arbiter's has no schedule; TRL's default
  is a linear decay): ``learning_rate``, ``lr_scheduler_type="constant"``.
- clip 0.2: ``cliprange``; value clip 0.2: ``cliprange_value``; value loss
  coefficient 0.1: ``vf_coef``; GAE γ 1.0, λ 0.95: ``gamma``, ``lam`` (all
  equal to both sides' defaults).
- fixed KL β: ``kl_coef`` with the k1 estimator per token inside the reward
  (TRL PPO has no adaptive controller; Arbiter's runs with ``kl.mode:
  fixed``), against a reward on the same scale: Arbiter's trainer normalizes
  the raw RM score (running mean and std, ``normalize_rewards``) before the
  KL penalty; TRL adds the raw score, so ``--reward-mean``/``--reward-std``
  (the statistics the RM version ships in its ``arbiter.json``: a fixed
  stand-in for the trainer's running ones, which follow the policy's scores
  as they rise) are folded into the RM's score head here:
  (score - mean) / std, a linear map of a linear head, exact. Without them
  the score is raw (TRL's ``whiten_rewards`` stays off, its default: it
  would whiten the KL terms too).
- ``max_new_tokens`` (12): ``response_length``; temperature 1.0, top-k 0,
  top-p 1; ``stop_token="eos"``: a completion ends at its first end token
  (TRL truncates after it and scores the truncated text), as Arbiter's do.
- value model: initialised from the reward model (a copy of the RM with its
  scalar head, normalized as above), as TRL's PPO examples do; Arbiter's is a value head on the
  policy's own trunk. The optimizer covers the policy and the value model.
- advantages whitened per batch (TRL always does; Arbiter's
  ``whiten_advantages`` is on). TRL clips no gradient norm (Arbiter: 1.0).
- dropout off in all models (TRL does; Arbiter's trainer runs the policy in
  eval mode), fp32 on the CPU (TRL's PPOConfig defaults to bf16), no
  gradient checkpointing (TRL's default recomputes activations; Arbiter's
  trainer keeps them), no sample generations for logging.

The reward model scores the prompt and completion tokens as TRL passes them
(the policy's and the RM's tokenizers are the same file in the demo), at the
completion's last token: its end token when it has one, which Arbiter's
reward service does not append to the text it scores (the demo RM's
``append_eos`` is off).

Training stops at the first update boundary past ``--seconds``: TRL's PPO
loop ignores ``should_training_stop``, so the budget callback raises
``BudgetSpent`` from ``on_step_end`` (after the update's optimizer steps and
learning-rate step), and every counted rollout was generated and trained on.
"""

from __future__ import annotations

import time
from pathlib import Path

from bench.trl_runner import Snapshots, read_prompts, runner_parser, write_result


class BudgetSpent(Exception):
    """Raised by the budget callback at the update boundary past the budget."""


def normalize_score_head(model, mean: float, std: float) -> None:
    """Replaces the model's scalar head ``score`` (TRL reads the score through
    it) with one that outputs (score - mean) / std."""
    import torch

    head = model.score
    normalized = torch.nn.Linear(head.in_features, 1, bias=True, dtype=head.weight.dtype)
    with torch.no_grad():
        normalized.weight.copy_(head.weight / std)
        bias = head.bias if head.bias is not None else torch.zeros(1, dtype=head.weight.dtype)
        normalized.bias.copy_((bias - mean) / std)
    model.score = normalized


def main() -> None:
    # --beta: TRL's kl_coef (fixed); --batch-size: completions (= prompts) per update.
    parser = runner_parser()
    parser.add_argument("--value-clip", type=float, default=0.2)
    parser.add_argument("--vf-coef", type=float, default=0.1)
    parser.add_argument("--gamma", type=float, default=1.0)
    parser.add_argument("--lam", type=float, default=0.95)
    parser.add_argument("--reward-mean", type=float, help="normalize RM scores: (score - mean) / std")
    parser.add_argument("--reward-std", type=float)
    args = parser.parse_args()
    if (args.reward_mean is None) != (args.reward_std is None) or (args.reward_std is not None
                                                                   and args.reward_std <= 0):
        parser.error("--reward-mean and --reward-std go together, and the std must be > 0")
    if args.batch_size % args.minibatch_size:
        parser.error(f"--batch-size {args.batch_size} must be a multiple of --minibatch-size {args.minibatch_size}")

    import torch

    torch.set_num_threads(args.threads)
    from datasets import Dataset
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              TrainerCallback)
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    out = Path(args.out)
    prompts = read_prompts(args.prompts)
    if len(prompts) < args.batch_size:
        parser.error(f"{len(prompts)} prompts: TRL's PPO needs at least --batch-size {args.batch_size} (one "
                     "completion per prompt, and it drops a ragged last batch)")
    tokenizer = AutoTokenizer.from_pretrained(args.policy)
    # TRL's PPO generates after left-padded queries.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise SystemExit("the policy's tokenizer needs a pad token other than its end token: TRL's PPO finds a "
                         "completion's end by its first pad token")
    policy = AutoModelForCausalLM.from_pretrained(args.policy, dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(args.reward, num_labels=1, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(args.reward, num_labels=1, dtype=torch.float32)
    if args.reward_std is not None:
        for model in (reward, value):
            normalize_score_head(model, args.reward_mean, args.reward_std)
    dataset = Dataset.from_list([{"input_ids": tokenizer(p)["input_ids"]} for p in prompts])
    config = PPOConfig(
        output_dir=str(out / "trl"), use_cpu=True, seed=args.seed, report_to=[], save_strategy="no",
        logging_steps=1, disable_tqdm=True, bf16=False, fp16=False, gradient_checkpointing=False,
        learning_rate=args.learning_rate, lr_scheduler_type="constant", warmup_steps=0,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        num_mini_batches=args.batch_size // args.minibatch_size, num_ppo_epochs=args.epochs,
        local_rollout_forward_batch_size=args.batch_size,
        response_length=args.max_new_tokens, temperature=args.temperature, stop_token="eos",
        kl_coef=args.beta, kl_estimator="k1", cliprange=args.clip, cliprange_value=args.value_clip,
        vf_coef=args.vf_coef, gamma=args.gamma, lam=args.lam, whiten_rewards=False,
        num_sample_generations=0,
        # The clock stops training; this only sizes TRL's (constant) schedule.
        total_episodes=10**9,
    )

    class Budget(TrainerCallback):
        started = None

        def on_train_begin(self, _args, state, control, **kwargs):
            Budget.started = time.monotonic()

        def on_step_end(self, _args, state, control, **kwargs):
            # TRL's PPO counts one global step per update (batch).
            elapsed = time.monotonic() - Budget.started
            snapshots.offer(elapsed, state.global_step, trainer.policy_model)
            if elapsed >= args.seconds:
                Budget.stopped = elapsed
                raise BudgetSpent
            return control

    snapshots = Snapshots(args.snapshots, args.seconds)
    trainer = PPOTrainer(
        args=config, processing_class=tokenizer, model=policy, ref_model=None, reward_model=reward,
        value_model=value, train_dataset=dataset, callbacks=[Budget()],
    )
    try:
        trainer.train()
    except BudgetSpent:
        pass
    else:
        raise SystemExit("TRL's PPO loop ended before the budget")
    elapsed = Budget.stopped
    updates = trainer.state.global_step
    logged = [row for row in trainer.state.log_history if "objective/kl" in row]
    write_result(out, trainer.policy_model, tokenizer, snapshots, {
        "seconds": elapsed, "optimizer_steps": updates * args.epochs * (args.batch_size // args.minibatch_size),
        "updates": updates, "rollouts": updates * args.batch_size, "threads": args.threads,
        "trl_kl_last": logged[-1]["objective/kl"] if logged else None})


if __name__ == "__main__":
    main()
