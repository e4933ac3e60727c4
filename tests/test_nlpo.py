"""NLPO's action mask in the policy service (Ramamurthy et al. 2022): a
masked request draws only inside the masking version's top-p nucleus, its
log-probs are those of the masked distribution (checked against an
independent teacher-forced forward), bad mask fields are refused."""

import asyncio
import dataclasses

import grpc
import pytest
import torch
from helpers import BackgroundServer, expect_error
from lm_fixtures import perturbed

from arbiter.policy.types import ActionMask, SamplingParams
from arbiter.types import Prompt
from arbiter.v1 import policy_pb2
from services.policy.client import PolicyClient, prompt_input
from services.policy.server import create_server
from services.policy.settings import PolicySettings

PROMPTS = ["The quick brown", "Please explain how a reward model"]
# The tiny models are close to uniform over 512 tokens: a 5% nucleus is a few dozen.
MASK_TOP_P = 0.05


@pytest.fixture(scope="module")
def mask_dir(policy_dir, tmp_path_factory):
    return perturbed(policy_dir, tmp_path_factory.mktemp("nlpo") / "mask", version="mask", scale=0.5)


@pytest.fixture(scope="module")
def server(policy_dir, mask_dir, model_roots):
    settings = PolicySettings(model_dir=str(policy_dir), port=0, metrics_port=0, max_loaded_versions=3,
                              model_roots=model_roots)
    with BackgroundServer(lambda: create_server(settings)) as running, PolicyClient(running.target) as client:
        # The masking policy: loaded beside the serving version, not activated.
        client.load_version(str(mask_dir), version="mask", activate=False)
        running.client = client
        yield running


def masked_request(prompts, temperature=1.0, **fields) -> policy_pb2.GenerateRequest:
    fields.setdefault("mask_model_version", "mask")
    fields.setdefault("mask_top_p", MASK_TOP_P)
    return policy_pb2.GenerateRequest(
        prompts=[prompt_input(p) for p in prompts],
        sampling=policy_pb2.SamplingParams(max_new_tokens=16, temperature=temperature, n=3, seed=7),
        **fields,
    )


def teacher_forced_masked(hf_policy, hf_mask, prompt, completion, temperature):
    """Independent of the service: a full forward of each model, the mask's
    nucleus by Hugging Face's TopPLogitsWarper, the policy's tempered
    distribution renormalised over it. Returns the log-probs and the sizes
    of the allowed sets."""
    from transformers.generation.logits_process import TopPLogitsWarper

    ids = torch.tensor([list(prompt) + list(completion)])
    with torch.no_grad():
        logits = hf_policy(ids).logits[0, len(prompt) - 1 : -1].double()
        mask_logits = hf_mask(ids).logits[0, len(prompt) - 1 : -1].double()
    allowed = torch.isfinite(TopPLogitsWarper(MASK_TOP_P)(ids, mask_logits))
    logprobs = torch.log_softmax((logits / temperature).masked_fill(~allowed, float("-inf")), dim=-1)
    return logprobs.gather(-1, torch.tensor(completion)[:, None])[:, 0].tolist(), allowed.sum(-1).tolist()


@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_masked_samples_stay_in_the_nucleus_with_the_masked_logprobs(server, hf_policy, mask_dir, temperature):
    from transformers import AutoModelForCausalLM

    hf_mask = AutoModelForCausalLM.from_pretrained(str(mask_dir), dtype=torch.float32).eval()
    response = server.client.policy.Generate(masked_request(PROMPTS, temperature))
    vocab = hf_policy.config.vocab_size
    assert response.policy_version == "v0" and len(response.samples) == 6
    for sample in response.samples:
        expected, allowed = teacher_forced_masked(hf_policy, hf_mask, sample.prompt_token_ids,
                                                  sample.completion_token_ids, temperature)
        # The mask is a real restriction: a few tokens out of the vocabulary at every step.
        assert max(allowed) < vocab // 8, allowed
        # Every drawn token is inside the nucleus (outside it the log-prob is -inf).
        assert all(lp > float("-inf") for lp in expected)
        assert list(sample.logprobs) == pytest.approx(expected, abs=1e-4)
        # The server's own teacher-forced helper agrees (what a trainer recomputes).
        model = server.engine.model()
        again = model.teacher_forced_logprobs(sample.prompt_token_ids, sample.completion_token_ids, temperature,
                                              mask=server.engine.resolve_mask(ActionMask("mask", MASK_TOP_P)))
        assert list(sample.logprobs) == pytest.approx(again, abs=1e-5)


def test_masked_and_unmasked_requests_decode_together_unchanged(server):
    """An unmasked request gives the same samples whether or not masked ones
    decode at the same time (they share nothing but the scheduler), and a
    masked stream gives what its unary twin gives."""
    params = SamplingParams(max_new_tokens=12, temperature=1.0, n=2, seed=3)
    engine = server.engine
    alone = server.run(engine.generate([Prompt(text=PROMPTS[0])], params))

    async def together():
        return await asyncio.gather(
            engine.generate([Prompt(text=PROMPTS[0])], params),
            engine.generate([Prompt(text=PROMPTS[1])], params, mask=ActionMask("mask", MASK_TOP_P)),
        )

    plain, masked = server.run(together())
    for a, b in zip(alone.samples, plain.samples, strict=True):
        assert a.completion_token_ids == b.completion_token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    stream = list(server.client.generate_stream(PROMPTS[1], params, mask=ActionMask("mask", MASK_TOP_P)))
    for sample in masked.samples:
        tokens = [t for m in stream if m.sample_index == sample.sample_index for t in m.token_ids]
        assert tokens == sample.completion_token_ids


@pytest.mark.parametrize("fields,code,needle", [
    (dict(mask_top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT, "mask_top_p"),
    (dict(mask_top_p=0.0), grpc.StatusCode.INVALID_ARGUMENT, "mask_top_p"),
    (dict(mask_model_version=""), grpc.StatusCode.INVALID_ARGUMENT, "mask_model_version"),
    (dict(mask_model_version="nope"), grpc.StatusCode.NOT_FOUND, "nope"),
])
def test_bad_mask_fields_are_refused(server, fields, code, needle):
    expect_error(lambda: server.client.policy.Generate(masked_request(PROMPTS[:1], **fields)), code, needle)


# -- the trainer -----------------------------------------------------------


def masked_rollouts(policy_dir, mask_version, top_p, seed, n=8):
    """Rollouts sampled in-process by the policy service's own sampler under
    the mask (the initial policy masks itself: the trainer's first mask)."""
    import uuid

    from arbiter.policy.model import PolicyModel, ResolvedMask
    from arbiter.policy.types import ResolvedSampling
    from trainer.batch import Trajectory

    model = PolicyModel.load(policy_dir)
    prompt = model.tokenizer("Say:")["input_ids"]
    generation = model.start([prompt], ResolvedSampling(8, 1.0, 1.0, 0, n, (), seed), mask=ResolvedMask(model, top_p))
    while not generation.done:
        generation.step()
    return [
        Trajectory(rollout_id=uuid.uuid4().hex, prompt_id="p", group_id=f"g{i}", prompt_ids=tuple(prompt),
                   completion_ids=tuple(s.completion_token_ids), sampling_logprobs=tuple(s.logprobs),
                   reference_logprobs=tuple(s.logprobs), reward=float(sum(s.completion_token_ids) % 3),
                   policy_version="v0", mask_version=mask_version, mask_top_p=top_p)
        for i, s in enumerate(generation.samples())
    ]


def test_trainer_masked_update_ratio_is_one_on_fresh_rollouts_and_masks_rotate(policy_dir, tmp_path):
    from arbiter.stream import ConsumedRecord, KafkaSettings
    from tests.rollout_fixtures import to_rollout
    from trainer.batch import collate
    from trainer.config import config_from_dict
    from trainer.loop import PPOTrainer
    from trainer.step import nlpo_action_mask, policy_outputs

    top_p = 0.2
    config = config_from_dict({
        "model_dir": str(policy_dir), "output_dir": str(tmp_path / "run"), "checkpoint_every": 100,
        "ppo": {"batch_size": 8, "minibatch_size": 4, "epochs": 2, "learning_rate": 1e-2,
                "nlpo": {"top_p": top_p, "mask_update_every": 1}},
    })
    trainer = PPOTrainer(config, KafkaSettings())
    assert trainer.mask_version == "v0"
    rollouts = masked_rollouts(policy_dir, "v0", top_p, seed=1)
    batch = collate(rollouts, trainer.model.tokenizer.pad_token_id)
    batch = dataclasses.replace(batch, action_mask=nlpo_action_mask(
        trainer.masking_policies, batch, ["v0"] * len(rollouts), top_p))
    # A real restriction: each real token's action set is a small part of the vocabulary.
    assert int(batch.action_mask[batch.mask].sum(-1).max()) < trainer.model.vocab_size // 2
    with torch.no_grad():
        logprobs, _, _ = policy_outputs(trainer.model, batch, 1.0)
    # The trainer recomputes the masked distribution the sampler drew from: ratio 1.
    assert torch.allclose(logprobs[batch.mask], batch.old_logprobs[batch.mask], atol=1e-4)

    record = trainer.train_on(rollouts)
    assert record.stats.skipped_steps == 0 and record.stats.optimizer_steps == 4
    assert trainer.after_update(None, None) == "ppo-1"
    # Synced: the new mask is the version just published, the old one still accepted.
    assert trainer.mask_version == "ppo-1" and set(trainer.masking_policies) == {"v0", "ppo-1"}
    # ppo-1 is announced with the mask in force when it was registered (v0): replicas
    # following in order have ppo-1 loaded by the time a later update names it.
    announced = []

    class Recorder:  # the producer's two calls announce makes, recorded
        def send(self, topic, message):
            announced.append(message)

        def flush(self, timeout_s):
            pass

    trainer.model.save_policy(trainer.policies / "ppo-1", "ppo-1")
    trainer.announce(Recorder(), "ppo-1")
    assert (announced[0].mask_version, announced[0].mask_top_p) == ("v0", pytest.approx(top_p))
    trainer.train_on(masked_rollouts(policy_dir, "v0", top_p, seed=2))
    trainer.after_update(None, None)
    assert set(trainer.masking_policies) == {"ppo-1", "ppo-2"}
    # A rollout under a mask the trainer let go, or none, or another top-p: dropped and counted.
    late, unmasked, other_p = masked_rollouts(policy_dir, "v0", top_p, seed=3, n=3)
    for i, t in enumerate((late, dataclasses.replace(unmasked, mask_version="", mask_top_p=0.0),
                           dataclasses.replace(other_p, mask_version="ppo-2", mask_top_p=0.5))):
        rollout = to_rollout(t)
        rollout.mask_version, rollout.mask_top_p = t.mask_version, t.mask_top_p
        trainer.admit(ConsumedRecord("rollouts", 0, i, "p", 0, "1.1", rollout))
    assert trainer.state.outcomes.get("mask_stale") == 3 and not trainer.pending


@pytest.mark.parametrize("settings,needle", [
    ({"ppo": {"nlpo": {"top_p": 0.0}}}, r"ppo\.nlpo\.top_p=0\.0 is invalid: must be in \(0, 1\]"),
    ({"ppo": {"nlpo": {"mask_update_every": 0}}}, r"ppo\.nlpo\.mask_update_every=0 is invalid"),
    ({"publish_every": 2, "ppo": {"nlpo": {"mask_update_every": 3}}},
     r"ppo\.nlpo\.mask_update_every=3 is invalid: must be a multiple of publish_every \(2\)"),
    ({"ppo": {"nlpo": {"top_k": 3}}}, "unknown field"),
])
def test_nlpo_settings_are_validated_up_front(settings, needle):
    from arbiter.config import ConfigError
    from trainer.config import config_from_dict

    with pytest.raises(ConfigError, match=needle):
        config_from_dict({"model_dir": "m", **settings})


# -- the worker ------------------------------------------------------------


def test_generate_stage_samples_under_the_announced_mask_or_the_last_one_served(server):
    import threading

    from services.worker.retry import StageRetry, WorkerError
    from services.worker.stages import GenerateStage

    announced = [ActionMask("mask", MASK_TOP_P)]
    skipped = []
    stage = GenerateStage(
        StageRetry(0.1, 0.5, threading.Event, lambda stage: None), skipped.append, server.client,
        SamplingParams(max_new_tokens=6, temperature=1.0, n=2, seed=1),
        tokenizer_fingerprint=server.client.info().tokenizer_fingerprint, mask=lambda: announced[0],
    )
    prompts = [Prompt(text=PROMPTS[0], id="a")]
    assert {g.mask for g in stage(prompts)} == {ActionMask("mask", MASK_TOP_P)}
    # The trainer announced a version this replica has not loaded yet: the last mask served.
    announced[0] = ActionMask("ppo-9", MASK_TOP_P)
    assert {g.mask for g in stage(prompts)} == {ActionMask("mask", MASK_TOP_P)}
    # With no mask served before there is nothing to fall back on: the worker stops, naming it.
    stage._served_mask = None
    with pytest.raises(WorkerError, match="ppo-9"):
        stage(prompts)


def test_worker_writes_the_announced_mask_into_its_rollouts(server, tiny_models, kafka_settings, tmp_path):
    from arbiter.stream import StreamConsumer, StreamProducer, ensure_topics, topics
    from arbiter.v1 import rollout_pb2
    from helpers import drain
    from services.reference.server import create_server as create_reference
    from services.reference.settings import ReferenceSettings
    from services.reward.server import create_server as create_reward
    from services.reward.settings import RewardSettings
    from services.worker.settings import WorkerSettings
    from services.worker.worker import RolloutWorker

    ensure_topics(kafka_settings, {topics.ROLLOUTS: 1, topics.PROMPTS: 1, topics.POLICY_UPDATES: 1})
    with StreamProducer(kafka_settings) as producer:
        producer.send(topics.POLICY_UPDATES, rollout_pb2.PolicyUpdate(
            schema_version=1, policy_version="v0", training_step=1, mask_version="mask", mask_top_p=MASK_TOP_P))
        producer.flush()
    with BackgroundServer(lambda: create_reward(RewardSettings(model_dir=str(tiny_models["reward"]), port=0))) as rm, \
            BackgroundServer(lambda: create_reference(
                ReferenceSettings(model_dir=str(tiny_models["policy"]), port=0))) as ref:
        settings = WorkerSettings(
            policy_target=server.target, reward_target=rm.target, reference_target=ref.target, kafka=kafka_settings,
            samples_per_prompt=2, prompts_per_call=1, max_new_tokens=6, seed=3, connect_timeout_s=30.0,
            nlpo_top_p=MASK_TOP_P,
        )
        with RolloutWorker(settings) as worker:
            rollouts = worker.run_once([Prompt(text=PROMPTS[1], id="p")])
    assert rollouts and {r.mask_version for r in rollouts} == {"mask"}
    # A float on the wire: the trainer compares it with its ppo.nlpo.top_p to a relative 1e-6.
    assert all(r.mask_top_p == pytest.approx(MASK_TOP_P, rel=1e-6) for r in rollouts)
    with StreamConsumer(kafka_settings, [topics.ROLLOUTS], None) as consumer:
        records = drain(consumer, len(rollouts), 30)
    assert {r.message.mask_version for r in records} == {"mask"}


def test_follower_keeps_the_announced_masks_loaded_past_the_version_limit(policy_dir, kafka_settings, tmp_path):
    from arbiter.stream import StreamProducer, ensure_topics, topics
    from arbiter.v1 import rollout_pb2
    from helpers import wait_until

    ensure_topics(kafka_settings, {topics.POLICY_UPDATES: 1})
    paths = {v: perturbed(policy_dir, tmp_path / v, version=v, seed=i) for i, v in enumerate(("ppo-1", "ppo-2", "ppo-3",
                                                                                                  "ppo-4"))}
    settings = PolicySettings(model_dir=str(policy_dir), port=0, follow_updates=True, replica_id="r",
                              kafka=kafka_settings, max_loaded_versions=2, model_roots=(str(tmp_path),))

    def announce(version, mask):
        with StreamProducer(kafka_settings) as producer:
            producer.send(topics.POLICY_UPDATES, rollout_pb2.PolicyUpdate(
                policy_version=version, checkpoint_path=str(paths[version]), training_step=int(version[-1]),
                mask_version=mask, mask_top_p=MASK_TOP_P))
            producer.flush()

    with BackgroundServer(lambda: create_server(settings)) as server, PolicyClient(server.target) as client:
        def loaded():
            return {info.version for info in server.engine.models.list_versions()}

        # Limit 2: without the pin, loading ppo-2 would evict v0, the mask workers sample under.
        announce("ppo-1", "v0")
        announce("ppo-2", "v0")
        wait_until(lambda: client.info().version == "ppo-2", what="ppo-2 to be served")
        assert loaded() == {"v0", "ppo-2"}
        assert client.generate([PROMPTS[0]], max_new_tokens=4, temperature=1.0,
                               mask=ActionMask("v0", MASK_TOP_P)).policy_version == "ppo-2"
        # The mask moves on to ppo-2: v0 is still kept (the mask before), then let go with the next one.
        announce("ppo-3", "ppo-2")
        wait_until(lambda: client.info().version == "ppo-3", what="ppo-3 to be served")
        assert loaded() == {"v0", "ppo-2", "ppo-3"}
        expect_error(lambda: client.unload_version("v0"), grpc.StatusCode.FAILED_PRECONDITION, "NLPO masking policy")
        announce("ppo-4", "ppo-3")
        wait_until(lambda: client.info().version == "ppo-4", what="ppo-4 to be served")
        assert loaded() == {"ppo-2", "ppo-3", "ppo-4"}
