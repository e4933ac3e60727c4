"""TRL's GRPOTrainer, in one process, for ``make bench-e2e`` (bench/e2e.py).

Runs in the benchmark's own virtual environment (``.venv-trl``: TRL 1.16
beside the project's torch and transformers), never the project's, so it
imports nothing from Arbiter (``bench/trl_runner.py``, what both TRL runners
share, is stdlib and torch): everything comes in as flags, and the result is
a JSON file plus the final policy as a Hugging Face directory, which the
benchmark evaluates exactly as it evaluates Arbiter's.

The batch geometry is Arbiter's PPO config mapped onto GRPOConfig: a
generation batch of ``batch_size`` completions (``batch_size /
num_generations`` prompts x ``num_generations``), split into ``batch_size /
minibatch_size`` optimizer steps of ``minibatch_size`` (no gradient
accumulation), ``epochs`` passes over it (``num_iterations``). Training stops
at the first generation-batch boundary past ``--seconds`` (a callback), so
every counted rollout was generated and trained on. Everything else is TRL's
default (its "dapo" loss, group-scaled rewards), except gradient checkpointing
(off, see below).
"""

from __future__ import annotations

import time
from pathlib import Path

from bench.trl_runner import Snapshots, read_prompts, runner_parser, write_result


def main() -> None:
    parser = runner_parser()
    parser.add_argument("--num-generations", type=int, required=True)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from datasets import Dataset
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              TrainerCallback)
    from trl import GRPOConfig, GRPOTrainer

    out = Path(args.out)
    prompts = read_prompts(args.prompts)
    tokenizer = AutoTokenizer.from_pretrained(args.policy)
    policy = AutoModelForCausalLM.from_pretrained(args.policy, dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(args.reward, num_labels=1, dtype=torch.float32)
    steps_per_generation = args.batch_size // args.minibatch_size
    # Optimizer steps per generation batch: its minibatches, each epoch.
    steps_per_batch = steps_per_generation * args.epochs
    config = GRPOConfig(
        output_dir=str(out / "trl"), use_cpu=True, seed=args.seed, report_to=[], save_strategy="no",
        logging_steps=steps_per_batch, disable_tqdm=True,
        learning_rate=args.learning_rate, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
        per_device_train_batch_size=args.minibatch_size, gradient_accumulation_steps=1,
        steps_per_generation=steps_per_generation, num_iterations=args.epochs, num_generations=args.num_generations,
        max_completion_length=args.max_new_tokens, temperature=args.temperature, top_p=1.0, top_k=0,
        beta=args.beta, epsilon=args.clip, disable_dropout=True,
        # TRL's default (True) recomputes activations in the backward pass: it
        # saves memory this model does not need and costs time; Arbiter's
        # trainer keeps activations.
        gradient_checkpointing=False,
        # The clock stops training; max_steps only bounds the sampler's epochs.
        max_steps=10**7,
    )

    class Budget(TrainerCallback):
        started = None

        def on_train_begin(self, _args, state, control, **kwargs):
            Budget.started = time.monotonic()

        def on_step_end(self, _args, state, control, model=None, **kwargs):
            if state.global_step % steps_per_batch:
                return control
            elapsed = time.monotonic() - Budget.started
            snapshots.offer(elapsed, state.global_step // steps_per_batch, model or trainer.model)
            if elapsed >= args.seconds:
                control.should_training_stop = True
            return control

    snapshots = Snapshots(args.snapshots, args.seconds)
    trainer = GRPOTrainer(
        model=policy, reward_funcs=[reward], args=config,
        train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
        processing_class=tokenizer, reward_processing_classes=[tokenizer], callbacks=[Budget()],
    )
    trainer.train()
    elapsed = time.monotonic() - Budget.started
    batches = trainer.state.global_step // steps_per_batch
    logged = [row for row in trainer.state.log_history if "kl" in row]
    write_result(out, trainer.model, tokenizer, snapshots, {
        "seconds": elapsed, "optimizer_steps": trainer.state.global_step, "updates": batches,
        "rollouts": batches * args.batch_size, "threads": args.threads,
        "trl_kl_last": logged[-1]["kl"] if logged else None})


if __name__ == "__main__":
    main()
