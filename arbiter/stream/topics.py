"""Names shared by every Kafka producer and consumer in Arbiter.

Logical topic names; ``KafkaSettings.topic_prefix`` is prepended on the wire so
several environments (or test cases) can share one cluster.
"""

from __future__ import annotations

from types import MappingProxyType

# -- topics ------------------------------------------------------------------

ROLLOUTS = "rollouts"
POLICY_UPDATES = "policy-updates"
PROMPTS = "prompts"
PREFERENCES = "preferences"

ALL_TOPICS = (ROLLOUTS, POLICY_UPDATES, PROMPTS, PREFERENCES)

# Final partition counts: topics are created once with these because the dev
# broker (Tansu) has no CreatePartitions, and adding partitions later would
# move keys to other partitions anyway (breaking per-prompt ordering).
# policy-updates has one partition so every replica sees versions in order.
DEFAULT_PARTITIONS = MappingProxyType({
    ROLLOUTS: 8,
    POLICY_UPDATES: 1,
    PROMPTS: 8,
    PREFERENCES: 4,
})

# Dead letters: a consumer with ``KafkaSettings.dead_letter`` copies each record
# it rejects (raw value and headers, plus why and where from) to the dead-letter
# topic of its topic, for inspection and replay. Created by that consumer with
# one partition (a trickle, read by people), never by auto-creation.
DEAD_LETTER_SUFFIX = ".dead-letter"
ROLLOUTS_DEAD_LETTER = ROLLOUTS + DEAD_LETTER_SUFFIX
POLICY_UPDATES_DEAD_LETTER = POLICY_UPDATES + DEAD_LETTER_SUFFIX
PROMPTS_DEAD_LETTER = PROMPTS + DEAD_LETTER_SUFFIX
PREFERENCES_DEAD_LETTER = PREFERENCES + DEAD_LETTER_SUFFIX
DEAD_LETTER_TOPICS = MappingProxyType({
    ROLLOUTS: ROLLOUTS_DEAD_LETTER,
    POLICY_UPDATES: POLICY_UPDATES_DEAD_LETTER,
    PROMPTS: PROMPTS_DEAD_LETTER,
    PREFERENCES: PREFERENCES_DEAD_LETTER,
})
DEAD_LETTER_PARTITIONS = 1

# -- consumer groups ---------------------------------------------------------

# The PPO trainer: manual commits of the offsets covered by a durable checkpoint.
TRAINER_GROUP = "arbiter-trainer"
# Rollout workers share the prompts topic: each prompt goes to one worker.
ROLLOUT_WORKERS_GROUP = "arbiter-rollout-workers"
# Reward-model training from human preferences.
REWARD_TRAINER_GROUP = "arbiter-reward-trainer"
# Policy replicas read policy-updates without a group: each must see every
# update on every partition (services.policy.follower).

# -- record headers ----------------------------------------------------------

HEADER_CONTENT_TYPE = "content-type"
# "MAJOR.MINOR" of the arbiter.v1 Kafka payload schema.
HEADER_SCHEMA_VERSION = "arbiter-schema-version"
# Full protobuf name of the payload, e.g. "arbiter.v1.Rollout".
HEADER_MESSAGE_TYPE = "arbiter-message-type"
# KafkaSettings.client_id of the producer, for tracing a bad record to its source.
HEADER_PRODUCER = "arbiter-producer"

# Added to a dead-letter copy (its source record's headers come first, unchanged):
# the reject reason (arbiter.stream.errors.REJECT_REASONS), the error message,
# and where the record was: wire topic, partition and offset (decimal).
HEADER_DEAD_LETTER_REASON = "arbiter-dead-letter-reason"
HEADER_DEAD_LETTER_ERROR = "arbiter-dead-letter-error"
HEADER_SOURCE_TOPIC = "arbiter-source-topic"
HEADER_SOURCE_PARTITION = "arbiter-source-partition"
HEADER_SOURCE_OFFSET = "arbiter-source-offset"
# Set instead of copying a value larger than the producer's max_request_size:
# the value's size in bytes (the copy's value is then empty).
HEADER_DEAD_LETTER_VALUE_OMITTED = "arbiter-dead-letter-value-omitted"

CONTENT_TYPE_PROTOBUF = "application/x-protobuf"
