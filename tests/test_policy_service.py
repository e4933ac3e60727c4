"""The policy service over real gRPC: generation, the log-probs it returns,
seeds, streaming, bad input, and weight swaps under load."""

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import BackgroundServer, expect_error, metric_value, metrics_text, sample_value, wait_until
from lm_fixtures import (
    lora_adapter,
    nan_weights,
    other_tokenizer_policy,
    perturbed,
    strict_chat_template,
    with_eos,
    wrong_shapes,
)

from arbiter.limits import SizeLimits
from arbiter.policy.engine import GenerationLimits
from arbiter.policy.types import SamplingParams
from arbiter.types import Prompt
from arbiter.v1 import common_pb2, policy_pb2
from services.policy.client import PolicyClient
from services.policy.server import create_server
from services.policy.settings import PolicySettings

PROMPTS = ["The quick brown", "Please explain how a reward model"]


@pytest.fixture(scope="module")
def server(policy_dir, model_roots):
    settings = PolicySettings(model_dir=str(policy_dir), port=0, metrics_port=0, max_loaded_versions=4,
                              model_roots=model_roots)
    with BackgroundServer(lambda: create_server(settings)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with PolicyClient(server.target) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer(policy_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(policy_dir))


def teacher_forced(hf_policy, prompt, completion, temperature, top_k=0, top_p=1.0):
    """Independent of the service: one full forward of prompt + completion,
    then Hugging Face's own warpers for the same sampling processing."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    ids = torch.tensor([list(prompt) + list(completion)])
    with torch.no_grad():
        logits = hf_policy(ids).logits[0, len(prompt) - 1 : -1].double()
    warpers = [TemperatureLogitsWarper(temperature)]
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    scores = LogitsProcessorList(warpers)(ids[:, :1].expand(len(completion), 1), logits)
    logprobs = torch.log_softmax(scores, dim=-1)
    return logprobs.gather(-1, torch.tensor(completion)[:, None])[:, 0].tolist()


# -- generation -------------------------------------------------------------


def test_generate_text_and_chat(client, tokenizer):
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompts = [policy_pb2.PromptInput(text=PROMPTS[0], id="p0"), client_prompt(chat, "p1")]
    response = client.generate(prompts, max_new_tokens=8, temperature=1.0, n=2, seed=1)
    info = client.info()
    assert response.policy_version == info.version == "v0"
    assert response.tokenizer_fingerprint == info.tokenizer_fingerprint and len(info.tokenizer_fingerprint) == 64
    assert info.kind == "policy" and info.active
    assert [(s.prompt_index, s.sample_index, s.prompt_id) for s in response.samples] == [
        (0, 0, "p0"), (0, 1, "p0"), (1, 0, "p1"), (1, 1, "p1"),
    ]
    rendered = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|assistant|>\n")
    expected_prompts = [tokenizer(PROMPTS[0])["input_ids"], tokenizer(rendered, add_special_tokens=False)["input_ids"]]
    for sample in response.samples:
        assert list(sample.prompt_token_ids) == expected_prompts[sample.prompt_index]
        assert len(sample.completion_token_ids) == len(sample.logprobs) == 8
        assert sample.finish_reason == policy_pb2.FINISH_REASON_LENGTH
        assert sample.text == tokenizer.decode(sample.completion_token_ids, skip_special_tokens=True)
        assert sample.policy_version == "v0"
        assert all(lp <= 0 for lp in sample.logprobs)


def client_prompt(messages, prompt_id=""):
    from services.policy.client import prompt_input

    return prompt_input(messages, prompt_id)


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.5, 40, 1.0), (0.8, 0, 0.9), (1.2, 50, 0.8)]
)
def test_logprobs_equal_teacher_forced_forward_of_sampling_distribution(
    client, hf_policy, temperature, top_k, top_p
):
    response = client.generate(
        PROMPTS, max_new_tokens=24, temperature=temperature, top_k=top_k, top_p=top_p, n=2, seed=11
    )
    for sample in response.samples:
        expected = teacher_forced(
            hf_policy, sample.prompt_token_ids, sample.completion_token_ids, temperature, top_k, top_p
        )
        assert list(sample.logprobs) == pytest.approx(expected, abs=1e-4)
        # Every sampled token was inside the processed (top-k / top-p) support.
        assert all(lp > float("-inf") for lp in expected)


def test_server_side_teacher_forced_helper_matches(server, client):
    params = dict(temperature=0.9, top_k=30, top_p=0.95)
    sample = client.generate([PROMPTS[1]], max_new_tokens=16, seed=5, **params).samples[0]
    model = server.engine.model()
    again = model.teacher_forced_logprobs(sample.prompt_token_ids, sample.completion_token_ids, **params)
    assert list(sample.logprobs) == pytest.approx(again, abs=1e-5)


def test_greedy_is_argmax_with_zero_logprobs(client, hf_policy):
    response = client.generate([PROMPTS[0]], max_new_tokens=10, temperature=0.0, n=2)
    first, second = response.samples
    assert list(first.completion_token_ids) == list(second.completion_token_ids)
    assert list(first.logprobs) == [0.0] * 10
    ids = list(first.prompt_token_ids) + list(first.completion_token_ids)
    with torch.no_grad():
        logits = hf_policy(torch.tensor([ids])).logits[0, len(first.prompt_token_ids) - 1 : -1]
    assert logits.argmax(-1).tolist() == list(first.completion_token_ids)


def test_seeded_generation_is_reproducible_under_concurrency(client):
    request = dict(max_new_tokens=20, temperature=1.0, n=3, seed=1234)
    alone = client.generate(PROMPTS, **request)
    assert client.generate(PROMPTS, **request) == alone  # alone, bit for bit
    with ThreadPoolExecutor(4) as pool:
        noise = [pool.submit(client.generate, [PROMPTS[1]], max_new_tokens=30, temperature=1.0, n=4) for _ in range(3)]
        busy = [pool.submit(client.generate, PROMPTS, **request) for _ in range(2)]
        results = [f.result() for f in busy]
        [f.result() for f in noise]
    # Each sample has its own uniform stream, so sharing decoding steps with
    # other requests changes only the float rounding of a differently shaped
    # batch: the same tokens, log-probs equal to float32 rounding.
    for other in results:
        for a, b in zip(alone.samples, other.samples, strict=True):
            assert list(a.completion_token_ids) == list(b.completion_token_ids)
            assert list(b.logprobs) == pytest.approx(list(a.logprobs), abs=1e-5)
    ids = [tuple(s.completion_token_ids) for s in alone.samples]
    assert len(set(ids)) == len(ids), "samples of one request must differ"
    reseeded = client.generate(PROMPTS, **{**request, "seed": 4321})
    assert [tuple(s.completion_token_ids) for s in reseeded.samples] != ids


def test_requests_join_a_running_generation_share_its_steps_and_leave_when_done(server, hf_policy):
    """Requests with different sampling parameters join a generation that is
    already decoding, share its forward passes and return as soon as their
    own rows finish; every token's log-prob is still that of the
    distribution it was drawn from, under its own request's parameters."""
    registry = server.running.registry

    def shared_steps() -> float:  # decoding steps with rows of more than one request
        name = "arbiter_policy_decode_batch_generations"
        return sample_value(registry, f"{name}_count") - sample_value(registry, f"{name}_bucket", le="1.0")

    joiners = [
        (PROMPTS[1:], SamplingParams(max_new_tokens=12, temperature=0.7, top_k=20, n=2, seed=2)),
        (PROMPTS, SamplingParams(max_new_tokens=10, temperature=0.0)),
        (PROMPTS[1:], SamplingParams(max_new_tokens=16, temperature=1.2, top_p=0.8, n=2, seed=3, stop=("e",))),
    ]

    async def scenario():
        engine = server.engine
        # Eight rows of 120 tokens: decoding long after the joiners are done.
        anchor, steps = await engine.generate_stream(
            Prompt(text=PROMPTS[0]), SamplingParams(max_new_tokens=120, temperature=1.0, n=8, seed=1))
        await steps.__anext__()
        results = await asyncio.gather(*[
            engine.generate([Prompt(text=p) for p in prompts], params) for prompts, params in joiners])
        anchor_was_running = not anchor.done
        async for _ in steps:
            pass
        return anchor, results, anchor_was_running

    before = shared_steps()
    anchor, results, anchor_was_running = server.run(scenario())
    assert anchor_was_running and shared_steps() > before
    checks = [(s, SamplingParams(temperature=1.0)) for s in anchor.samples()]
    checks += [(s, params) for (_, params), result in zip(joiners, results, strict=True) for s in result.samples]
    for sample, params in checks:
        assert len(sample.completion_token_ids) == len(sample.logprobs) >= 1
        if params.temperature == 0.0:
            assert sample.logprobs == [0.0] * len(sample.logprobs)
            continue
        expected = teacher_forced(hf_policy, sample.prompt_token_ids, sample.completion_token_ids,
                                  params.temperature, params.top_k, params.top_p or 1.0)
        assert sample.logprobs == pytest.approx(expected, abs=1e-4)
    # The seeded joiner gives the same tokens alone.
    prompts, params = joiners[0]
    alone = server.run(server.engine.generate([Prompt(text=p) for p in prompts], params))
    for shared, solo in zip(results[0].samples, alone.samples, strict=True):
        assert shared.completion_token_ids == solo.completion_token_ids
        assert shared.logprobs == pytest.approx(solo.logprobs, abs=1e-5)


def test_stop_strings_cut_text_and_keep_the_sampled_tokens(client):
    greedy = client.generate([PROMPTS[0]], max_new_tokens=20, temperature=0.0).samples[0]
    stop = greedy.text[6:8]
    cut = greedy.text.index(stop)
    stopped = client.generate([PROMPTS[0]], max_new_tokens=20, temperature=0.0, stop=["zzzz", stop]).samples[0]
    assert stopped.finish_reason == policy_pb2.FINISH_REASON_STOP
    assert stopped.text == greedy.text[:cut]
    n = len(stopped.completion_token_ids)
    assert n < 20 and list(stopped.completion_token_ids) == list(greedy.completion_token_ids)[:n]
    assert len(stopped.logprobs) == n


def test_eos_from_the_model_config_ends_a_sample(server, client, policy_dir, tmp_path):
    greedy = client.generate([PROMPTS[0]], max_new_tokens=5, temperature=0.0).samples[0]
    eos = greedy.completion_token_ids[2]
    path = with_eos(policy_dir, tmp_path / "eos", eos)
    client.load_version(str(path), version="eos-test", activate=False)
    sample = client.generate([PROMPTS[0]], max_new_tokens=5, temperature=0.0, model_version="eos-test").samples[0]
    first_eos = list(greedy.completion_token_ids).index(eos)
    assert sample.finish_reason == policy_pb2.FINISH_REASON_EOS
    assert list(sample.completion_token_ids) == list(greedy.completion_token_ids)[: first_eos + 1]
    assert sample.policy_version == "eos-test"
    assert client.info().version == "v0"


def test_stream_matches_unary(client):
    request = dict(max_new_tokens=15, temperature=1.0, n=2, seed=77, stop=["the"])
    unary = client.generate([PROMPTS[1]], **request)
    per_sample = {}
    for msg in client.generate_stream(PROMPTS[1], **request):
        assert msg.policy_version == "v0"
        got = per_sample.setdefault(msg.sample_index, {"ids": [], "lps": [], "text": "", "msgs": []})
        got["msgs"].append(msg)
        got["ids"] += msg.token_ids
        got["lps"] += msg.logprobs
        got["text"] += msg.text_delta
    assert sorted(per_sample) == [0, 1]
    for sample in unary.samples:
        got = per_sample[sample.sample_index]
        assert got["ids"] == list(sample.completion_token_ids)
        assert got["lps"] == list(sample.logprobs)
        assert got["text"] == sample.text
        assert list(got["msgs"][0].prompt_token_ids) == list(sample.prompt_token_ids)
        assert all(not m.prompt_token_ids for m in got["msgs"][1:])
        assert got["msgs"][-1].finish_reason == sample.finish_reason != policy_pb2.FINISH_REASON_UNSPECIFIED
        assert all(m.finish_reason == policy_pb2.FINISH_REASON_UNSPECIFIED for m in got["msgs"][:-1])


# -- bad input --------------------------------------------------------------

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    "sampling,field,hint",
    [
        (dict(temperature=-0.5), "sampling.temperature", "must be >= 0"),
        (dict(temperature=float("nan")), "sampling.temperature", "must be >= 0"),
        (dict(top_p=1.5), "sampling.top_p", "(0, 1]"),
        (dict(top_p=-0.1), "sampling.top_p", "(0, 1]"),
        (dict(top_k=-1), "sampling.top_k", ">= 0"),
        (dict(n=17), "sampling.n", "allowed 1..16"),
        (dict(n=-1), "sampling.n", "allowed 1..16"),
        (dict(max_new_tokens=5000), "sampling.max_new_tokens", "allowed 1..1024"),
        (dict(max_new_tokens=-3), "sampling.max_new_tokens", "allowed 1..1024"),
        (dict(stop=["ok", ""]), "sampling.stop[1]", "is empty"),
        (dict(stop=[str(i) for i in range(9)]), "sampling.stop", "at most 8"),
    ],
)
def test_bad_sampling_params(client, sampling, field, hint):
    details = expect_error(lambda: client.generate(PROMPTS, **sampling), INVALID, field, hint)
    assert details.startswith(field + ":")
    expect_error(lambda: client.generate_stream(PROMPTS[0], **sampling), INVALID, field)


def test_bad_prompts(client):
    expect_error(lambda: client.generate([]), INVALID, "prompts: is empty")
    neither = policy_pb2.PromptInput(id="x")
    expect_error(lambda: client.generate([PROMPTS[0], neither]), INVALID, "prompts[1]: sets neither")
    expect_error(lambda: client.generate([PROMPTS[0], ""]), INVALID, "prompts[1].text: is empty")
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]
    expect_error(lambda: client.generate([chat]), INVALID, "prompts[0].conversation.messages[1].content: is empty")
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 40
    expect_error(
        lambda: client.generate([PROMPTS[0], long_prompt], max_new_tokens=10), INVALID, "prompts[1]: is", "max of 256"
    )
    # Fits alone, not with that many new tokens.
    expect_error(lambda: client.generate([PROMPTS[0]], max_new_tokens=255), INVALID, "prompts[0]", "max_new_tokens=255")
    expect_error(lambda: client.generate_stream(policy_pb2.PromptInput()), INVALID, "prompt: sets neither")
    expect_error(lambda: client.generate(PROMPTS * 33), grpc.StatusCode.RESOURCE_EXHAUSTED, "66 prompts", "limit of 64")
    expect_error(
        lambda: client.generate(PROMPTS * 10, n=16), grpc.StatusCode.RESOURCE_EXHAUSTED, "320 samples", "limit of 256"
    )
    expect_error(
        lambda: client.generate(PROMPTS, model_version="nope"), grpc.StatusCode.NOT_FOUND, "'nope' is not loaded"
    )


# Sizes are counted as sent (protobuf framing included), before anything is converted. The tiny
# policy's window is 256 tokens: by default a prompt may be 256 x 32 = 8192 bytes. A PromptInput
# with an n-byte text (128 <= n < 16384) is n + 3 bytes: tag, 2-byte length, text.


def test_sizes_are_checked_before_converting(client):
    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
    expect_error(lambda: client.generate([PROMPTS[0], "x" * 8190]), exhausted,
                 "prompts[1]: is 8193 bytes, over the limit of 8192 per item (max_item_bytes; "
                 "32 per token of the model's 256)")
    expect_error(lambda: client.generate_stream("x" * 8190), exhausted, "prompt: is 8193 bytes")
    # ChatMessage("user", 8178 x "u") = (2 + 4) + (3 + 8178) = 8187; Conversation = 3 + 8187;
    # the PromptInput = 3 + 8190 = 8193.
    expect_error(lambda: client.generate([[{"role": "user", "content": "u" * 8178}]]), exhausted,
                 "prompts[0]: is 8193 bytes")
    expect_error(lambda: client.generate(PROMPTS, stop=["ok", "s" * 1025]), exhausted,
                 "sampling.stop[1]: is at least 1025 bytes, over the limit of 1024 per stop string (max_stop_bytes)")


def test_request_limit_template_refusal_and_undecodable_bodies(policy_dir, tmp_path):
    strict = strict_chat_template(policy_dir, tmp_path / "strict", version="strict")
    settings = PolicySettings(model_dir=str(strict), port=0, limits=GenerationLimits(
        max_new_tokens=4, default_max_new_tokens=4, sizes=SizeLimits(max_item_bytes=100, max_request_bytes=250)))
    with BackgroundServer(lambda: create_server(settings)) as srv, PolicyClient(srv.target) as client:
        exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
        prompt = "p" * 98  # a 100-byte PromptInput: tag, length, text
        assert len(client.generate([prompt, prompt]).samples) == 2
        # 3 x (2 + 100) + the empty SamplingParams the client sets (tag, length 0).
        expect_error(lambda: client.generate([prompt] * 3), exhausted,
                     "the request is 308 bytes, over the limit of 250 per request (max_request_bytes)")
        # Stop strings are part of the request: SamplingParams(stop=[60 x "s"]) = 62 bytes, 64 in the request.
        expect_error(lambda: client.generate([prompt] * 2, stop=["s" * 60]), exhausted, "the request is 268 bytes")
        # The template raises (jinja's raise_exception): the caller's mistake, named.
        alternating = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                       {"role": "user", "content": "and?"}]
        assert len(client.generate([alternating]).samples) == 1
        two_users = [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]
        expect_error(lambda: client.generate([alternating, two_users]), INVALID,
                     "prompts[1].conversation: the model's chat template refuses this conversation: "
                     "Conversation roles must alternate")
        expect_error(lambda: client.generate_stream(two_users), INVALID, "prompt.conversation: the model's chat template")
        channel = client.channel
        for method, call, type_name in [("/arbiter.v1.PolicyService/Generate", channel.unary_unary,
                                         "arbiter.v1.GenerateRequest"),
                                        ("/arbiter.v1.PolicyService/GenerateStream", channel.unary_stream,
                                         "arbiter.v1.GenerateStreamRequest")]:
            expect_error(lambda: call(method)(b"\xff\xff\xff\xff", timeout=10), INVALID,
                         f"request body is not a valid {type_name} message")


# -- versions ---------------------------------------------------------------


@pytest.mark.parametrize(
    "make,needle",
    [
        (lambda src, out: wrong_shapes(src, out), "'transformer.wte.weight' is [512, 32] in model.safetensors"),
        (lambda src, out: nan_weights(src, out), "non-finite logits"),
        (lambda src, out: out / "missing", "does not exist"),
        (lambda src, out: other_tokenizer_policy(out), "tokenizer fingerprint"),
    ],
    ids=["wrong-shapes", "nan-weights", "missing-dir", "other-tokenizer"],
)
def test_bad_checkpoint_is_refused_and_old_version_keeps_serving(client, policy_dir, tmp_path, make, needle):
    path = make(policy_dir, tmp_path / "candidate")
    details = expect_error(
        lambda: client.load_version(str(path), version="broken", activate=True),
        grpc.StatusCode.FAILED_PRECONDITION,
        needle,
    )
    assert "Traceback" not in details
    assert client.info().version == "v0"
    versions = [v.version for v in client.models.ListModelVersions(common_pb2.ListModelVersionsRequest()).versions]
    assert "broken" not in versions
    assert client.generate([PROMPTS[0]], max_new_tokens=4, temperature=1.0).policy_version == "v0"


def test_architecture_change_is_refused(client, tmp_path):
    from arbiter.tiny import TinyConfig, make_policy

    path = make_policy(tmp_path / "wide", TinyConfig(n_embd=32))
    expect_error(
        lambda: client.load_version(str(path), version="wide"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "has shape [512, 32]",
    )
    assert client.info().version == "v0"


def test_swap_under_load(policy_dir, tmp_path):
    """Clients generate continuously while a new checkpoint is hot-swapped in:
    no request fails, requests started after the swap get the new version,
    and a request already running finishes on the old weights."""
    v1 = perturbed(policy_dir, tmp_path / "v1", version="v1")
    lora = lora_adapter(policy_dir, tmp_path / "lora")
    settings = PolicySettings(model_dir=str(policy_dir), port=0, max_loaded_versions=2, model_roots=(str(tmp_path),))
    with BackgroundServer(lambda: create_server(settings)) as server, PolicyClient(server.target) as client:
        probe = dict(max_new_tokens=12, temperature=1.0, seed=3)
        before = client.generate([PROMPTS[0]], **probe).samples[0]
        # Pinned to v0 before the swap; consumed after it.
        run, steps = server.run(server.engine.generate_stream(
            Prompt(text=PROMPTS[1]), SamplingParams(max_new_tokens=30, temperature=1.0, seed=9)
        ))
        stream = client.generate_stream(PROMPTS[1], max_new_tokens=30, temperature=1.0, seed=9)
        stream_first = next(stream)

        done, errors, stop = [], [], threading.Event()

        def hammer(worker: int) -> None:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    response = client.generate(PROMPTS, max_new_tokens=12, temperature=1.0, n=2, seed=worker)
                    done.append((started, response))
                except grpc.RpcError as err:  # pragma: no cover - the assertion below reports it
                    errors.append(f"{err.code().name}: {err.details()}")

        workers = [threading.Thread(target=hammer, args=(w,)) for w in range(2)]
        for worker in workers:
            worker.start()
        try:
            wait_until(lambda: len(done) >= 4, what="four responses before the swap")
            swapped = client.load_version(str(v1), activate=True)
            swapped_at = time.monotonic()
            assert swapped.info.version == "v1" and swapped.info.active
            wait_until(lambda: sum(1 for t, _ in done if t > swapped_at) >= 4,
                       what="four responses to requests started after the swap")
        finally:
            stop.set()
            for worker in workers:
                worker.join()

        assert errors == []
        for started, response in done:
            assert {s.policy_version for s in response.samples} == {response.policy_version}
            if started > swapped_at:
                assert response.policy_version == "v1"
        assert {r.policy_version for _, r in done} == {"v0", "v1"}

        # The pinned run and the open stream finish on v0's weights.
        async def drain():
            return [event async for events in steps for event in events]

        events = server.run(drain())
        assert run.policy.info.version == "v0"
        messages = [stream_first, *stream]
        assert {m.policy_version for m in messages} == {"v0"}
        reference = client.generate([PROMPTS[1]], max_new_tokens=30, temperature=1.0, seed=9, model_version="v0")
        expected = list(reference.samples[0].completion_token_ids)
        assert [e.token_id for e in events] == expected
        assert [t for m in messages for t in m.token_ids] == expected

        # The new weights really serve: same seeded request, other log-probs.
        after = client.generate([PROMPTS[0]], **probe).samples[0]
        assert after.policy_version == "v1"
        assert list(after.logprobs) != pytest.approx(list(before.logprobs), abs=1e-3)

        # Every sample was decoded by its own version's weights alone: its
        # log-probs are a teacher-forced forward's under that version.
        def decoded_by_its_version(samples, version):
            model = server.engine.model(version)
            for sample in samples:
                forced = model.teacher_forced_logprobs(sample.prompt_token_ids, sample.completion_token_ids, 1.0)
                assert list(sample.logprobs) == pytest.approx(forced, abs=1e-4), version

        for _, response in done:
            decoded_by_its_version(response.samples, response.policy_version)

        # Both versions decoding at once: rows of an old-version generation
        # (eight rows of 100 tokens, pinned to v0 as an in-flight request is)
        # and of new-version requests share steps, one forward per version.
        async def both_versions():
            engine = server.engine
            old, steps = await engine.generate_stream(
                Prompt(text=PROMPTS[0]), SamplingParams(max_new_tokens=100, temperature=1.0, n=8, seed=4), "v0")
            await steps.__anext__()
            new = await asyncio.gather(*[engine.generate([Prompt(text=p) for p in PROMPTS],
                                                         SamplingParams(max_new_tokens=12, temperature=1.0, n=2))
                                         for _ in range(3)])
            overlapped = not old.done
            async for _ in steps:
                pass
            return old.samples(), new, overlapped

        old, new, overlapped = server.run(both_versions())
        assert overlapped
        decoded_by_its_version(old, "v0")
        for result in new:
            assert result.policy_version == "v1"
            decoded_by_its_version(result.samples, "v1")

        # A LoRA adapter swaps in the same way; the oldest inactive version is unloaded.
        loaded = client.load_version(str(lora), version="lora-1", activate=True)
        assert loaded.info.version == "lora-1"
        sample = client.generate([PROMPTS[0]], **probe).samples[0]
        assert sample.policy_version == "lora-1"
        assert list(sample.logprobs) != pytest.approx(list(after.logprobs), abs=1e-3)
        listed = client.models.ListModelVersions(common_pb2.ListModelVersionsRequest()).versions
        assert sorted(v.version for v in listed) == ["lora-1", "v1"]


# -- operations -------------------------------------------------------------


def test_cancelled_stream_frees_its_generation(server, client):
    def active():
        return metric_value(server, "arbiter_policy_active_generations")

    stream = client.generate_stream(PROMPTS[0], max_new_tokens=240, temperature=1.0, n=8)
    next(stream)
    stream.cancel()
    wait_until(lambda: active() == 0, 10, "the cancelled generation to be released")
    assert client.generate([PROMPTS[0]], max_new_tokens=2, temperature=1.0).samples


def test_graceful_stop_finishes_in_flight_requests(policy_dir):
    settings = PolicySettings(model_dir=str(policy_dir), port=0, grace_seconds=30)
    server = BackgroundServer(lambda: create_server(settings))
    client = PolicyClient(server.target, timeout_s=30)

    def decoding_steps():  # arbiter_batch_size observes one decoding step each
        return sample_value(server.running.registry, "arbiter_batch_size_count", service="policy")

    try:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(client.generate, PROMPTS, max_new_tokens=200, temperature=1.0, n=4, seed=1)
            wait_until(decoding_steps, what="the request's first decoding step", interval_s=0.001)
            steps_before_stop = decoding_steps()
            server.stop()
            response = pending.result()
        # The generation was still running when stop() began, and stop() let it finish.
        assert decoding_steps() > steps_before_stop
        for sample in response.samples:
            ended = len(sample.completion_token_ids) == 200 or sample.finish_reason == policy_pb2.FINISH_REASON_EOS
            assert ended and sample.finish_reason != policy_pb2.FINISH_REASON_UNSPECIFIED
        with pytest.raises(grpc.RpcError) as err:
            PolicyClient(server.target, timeout_s=2).generate([PROMPTS[0]], max_new_tokens=2)
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        client.close()


def test_health_and_metrics(server, client):
    health = health_pb2_grpc.HealthStub(client.channel)
    status = health.Check(health_pb2.HealthCheckRequest(service="arbiter.v1.PolicyService")).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    client.generate([PROMPTS[0]], max_new_tokens=3, temperature=1.0)
    text = metrics_text(server)
    assert 'arbiter_requests_total{code="OK",method="Generate",service="policy"}' in text
    assert 'arbiter_policy_samples_total{finish_reason="length"}' in text
    assert "arbiter_policy_generated_tokens_total" in text
    assert 'arbiter_model_active{model_version="v0",service="policy"} 1.0' in text
