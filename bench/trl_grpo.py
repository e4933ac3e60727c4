"""TRL's GRPOTrainer, in one process, for ``make bench-e2e`` (bench/e2e.py).

Runs in the benchmark's own virtual environment (``.venv-trl``: TRL 1.16
beside the project's torch and transformers), never the project's, so it
imports nothing from Arbiter: everything comes in as flags, and the result is
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

import argparse
import json
import os
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--policy", required=True)
    parser.add_argument("--reward", required=True)
    parser.add_argument("--prompts", required=True, help="JSON lines with a 'prompt' field")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seconds", type=float, required=True, help="wall-clock training budget")
    parser.add_argument("--beta", type=float, required=True)
    parser.add_argument("--learning-rate", type=float, required=True)
    parser.add_argument("--num-generations", type=int, required=True)
    parser.add_argument("--max-new-tokens", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--minibatch-size", type=int, required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--clip", type=float, required=True)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--snapshots", type=int, default=0,
                        help="keep the policy at this many evenly spaced times of the budget (the last at the end), "
                             "for gold and KL over time")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from datasets import Dataset
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              TrainerCallback)
    from trl import GRPOConfig, GRPOTrainer

    out = Path(args.out)
    prompts = [json.loads(line)["prompt"] for line in Path(args.prompts).read_text().splitlines() if line.strip()]
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
            # At a batch boundary past each grid time: an in-memory copy (a
            # few MB, about a millisecond), written out after the clock stops.
            if len(snapshots) < args.snapshots - 1 and elapsed >= args.seconds * (len(snapshots) + 1) / args.snapshots:
                weights = {k: v.detach().clone() for k, v in (model or trainer.model).state_dict().items()}
                snapshots.append((elapsed, state.global_step // steps_per_batch, weights))
            if elapsed >= args.seconds:
                control.should_training_stop = True
            return control

    snapshots: list[tuple[float, int, dict]] = []

    trainer = GRPOTrainer(
        model=policy, reward_funcs=[reward], args=config,
        train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
        processing_class=tokenizer, reward_processing_classes=[tokenizer], callbacks=[Budget()],
    )
    trainer.train()
    elapsed = time.monotonic() - Budget.started
    batches = trainer.state.global_step // steps_per_batch
    trainer.model.save_pretrained(out / "final")
    tokenizer.save_pretrained(out / "final")
    logged = [row for row in trainer.state.log_history if "kl" in row]
    curve = []
    for i, (at, updates, weights) in enumerate(snapshots):
        where = out / "snapshots" / str(i)
        trainer.model.save_pretrained(where, state_dict=weights)
        tokenizer.save_pretrained(where)
        curve.append({"seconds": at, "updates": updates, "dir": str(where)})
    result = {
        "seconds": elapsed, "optimizer_steps": trainer.state.global_step, "updates": batches,
        "rollouts": batches * args.batch_size, "final_dir": str(out / "final"), "threads": args.threads,
        "trl_kl_last": logged[-1]["kl"] if logged else None, "pid": os.getpid(), "snapshots": curve,
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
