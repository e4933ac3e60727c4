"""The Arbiter RLHF trainer: consumes scored rollouts and runs PPO (or RLOO/GRPO).

``trainer.ppo_math`` holds the objective as small pure tensor functions; the
loop, Kafka I/O and checkpointing build on it and stay out of it.
"""
