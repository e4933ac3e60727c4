"""Reward-model training: preference data, losses, the training loop, and the
registry of versions the reward service loads (``arbiter train rm``)."""
