"""NLPO's action mask in the policy service (Ramamurthy et al. 2022): a
masked request draws only inside the masking version's top-p nucleus, its
log-probs are those of the masked distribution (checked against an
independent teacher-forced forward), bad mask fields are refused."""

import asyncio

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
