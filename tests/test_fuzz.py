"""Every RPC of the three model services under generated requests
(hypothesis): arbitrary field values (empty, unicode, oversized and
control-character strings, negative and huge numbers, NaN and infinite
floats, unknown enum values, token ids outside the vocabulary) and arbitrary
bytes as request bodies. Only documented status codes may come back (never
INTERNAL or UNKNOWN), no call may hang (each has a deadline), and every
service still reports SERVING afterwards.

Real servers on port 0 over the tiny models, with small per-request limits so
limit paths are reached cheaply; the chat templates refuse roles that do not
alternate (as Llama-2's and Mistral's do). Generation is derandomized, so CI
sees the same requests every run."""

from __future__ import annotations

import collections
import math
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import BackgroundServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lm_fixtures import strict_chat_template

from arbiter.batching import BatchingConfig
from arbiter.limits import MiB
from arbiter.policy.engine import GenerationLimits
from arbiter.v1 import (
    common_pb2,
    common_pb2_grpc,
    policy_pb2,
    policy_pb2_grpc,
    reference_pb2,
    reference_pb2_grpc,
    reward_pb2,
    reward_pb2_grpc,
)
from services.policy.server import create_server as create_policy_server
from services.policy.settings import PolicySettings
from services.reference.server import create_server as create_reference_server
from services.reference.settings import ReferenceSettings
from services.reward.server import create_server as create_reward_server
from services.reward.settings import RewardSettings

REQUESTS_PER_SERVICE = 1000
DEADLINE_S = 30.0
Code = grpc.StatusCode
OK = Code.OK
# What each RPC documents (README "Errors"); UNKNOWN, INTERNAL, UNAVAILABLE
# and DEADLINE_EXCEEDED (a hang) are never among them.
SCORING = {OK, Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED, Code.NOT_FOUND, Code.FAILED_PRECONDITION}
ALLOWED = {
    "Score": SCORING,
    "Compare": SCORING,
    "ScoreStream": SCORING,
    "SetShadow": {OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND},
    "GetScoreDrift": {OK, Code.NOT_FOUND},
    "GetShadow": {OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND},
    # No Kafka behind this reward service: a valid preference is FAILED_PRECONDITION.
    "SubmitPreference": {Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED, Code.FAILED_PRECONDITION},
    "Generate": {OK, Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED, Code.NOT_FOUND},
    "GenerateStream": {OK, Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED, Code.NOT_FOUND},
    "LogProbs": SCORING,
    "KL": SCORING,
    "GetModelInfo": {OK, Code.NOT_FOUND},
    "ListModelVersions": {OK},
    # PERMISSION_DENIED: a path outside the server's model roots, where servers have them.
    "LoadModelVersion": {Code.INVALID_ARGUMENT, Code.FAILED_PRECONDITION, Code.PERMISSION_DENIED},
    "ActivateModelVersion": {OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND},
    "UnloadModelVersion": {OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.FAILED_PRECONDITION},
    "Check": {OK, Code.NOT_FOUND},
}
STREAMING_REQUESTS = {"ScoreStream"}
STREAMING_RESPONSES = {"ScoreStream", "GenerateStream"}
MODEL_SERVICE = "arbiter.v1.ModelService"
MODEL_METHODS = ["GetModelInfo", "ListModelVersions", "LoadModelVersion", "ActivateModelVersion", "UnloadModelVersion"]
METHODS = {
    "reward": ("arbiter.v1.RewardService",
               ["Score", "Compare", "ScoreStream", "SetShadow", "GetShadow", "GetScoreDrift",
                "SubmitPreference"]),
    "policy": ("arbiter.v1.PolicyService", ["Generate", "GenerateStream"]),
    "reference": ("arbiter.v1.ReferenceService", ["LogProbs", "KL"]),
}


# -- servers --------------------------------------------------------------------


@pytest.fixture(scope="module")
def servers(tiny_models, tmp_path_factory, model_roots):
    root = tmp_path_factory.mktemp("fuzz")
    strict_reward = strict_chat_template(tiny_models["reward"], root / "reward-strict", version="strict")
    strict_policy = strict_chat_template(tiny_models["policy"], root / "policy-strict", version="strict")
    batching = BatchingConfig(max_queue_delay_ms=1.0)
    specs = {
        "reward": (create_reward_server, RewardSettings(
            model_dir=str(tiny_models["reward"]), port=0, max_items_per_request=4, stream_max_in_flight=2,
            batching=batching, model_roots=model_roots)),
        "policy": (create_policy_server, PolicySettings(
            model_dir=str(strict_policy), port=0, model_roots=model_roots, limits=GenerationLimits(
                max_prompts_per_request=3, max_samples_per_prompt=2, max_rows_per_request=4, max_new_tokens=3,
                default_max_new_tokens=2, max_stop_strings=3))),
        "reference": (create_reference_server, ReferenceSettings(
            model_dir=str(tiny_models["policy"]), port=0, max_sequences_per_request=4, batching=batching,
            model_roots=model_roots)),
    }
    running = {}
    try:
        for name, (create, config) in specs.items():
            running[name] = BackgroundServer(lambda create=create, config=config: create(config))
        # A second reward version (its template refuses roles out of order), for shadows and pinned requests.
        with grpc.insecure_channel(running["reward"].target) as channel:
            common_pb2_grpc.ModelServiceStub(channel).LoadModelVersion(
                common_pb2.LoadModelVersionRequest(path=str(strict_reward), activate=False), timeout=60)
        yield running
    finally:
        for server in running.values():
            server.stop()


@pytest.fixture(scope="module")
def channels(servers):
    options = [("grpc.max_send_message_length", 64 * MiB), ("grpc.max_receive_message_length", 64 * MiB)]
    opened = {name: grpc.insecure_channel(server.target, options=options) for name, server in servers.items()}
    yield opened
    for channel in opened.values():
        channel.close()


# -- strategies -----------------------------------------------------------------
# Each RPC draws a plausible request (valid values, so the model paths run:
# batching, shadows, generation, KL) or an arbitrary one.

# Mostly small; sometimes at or just past the per-item limit (8192 bytes for a
# 256-token window), past the request limit (16 MiB) or past gRPC's (20 MiB reward).
HUGE = st.sampled_from([8192, 8193, 70_000, 8193, 70_000, 17 * MiB, 21 * MiB]).map(lambda n: "x" * n)
# Long values are built by .map, so the strategies' reprs stay short.
SPECIAL = st.one_of(
    st.sampled_from(["", " ", "\n", "\x00", "\ufeff", "🙂" * 3, "<|endoftext|>", "<|pad|>",
                     "{{ raise_exception('x') }}", "{% for %}", "user", "assistant", "v0", "strict"]),
    st.just(4097).map(lambda n: "é" * n),  # 8194 bytes: 2 per character
)
TEXT = st.one_of(st.text(max_size=24), SPECIAL, HUGE)
SHORT_TEXT = st.one_of(st.text(max_size=12), SPECIAL)
WORDS = st.text(max_size=30).map(lambda s: s + " ok")  # never blank
VERSION = st.one_of(st.sampled_from(["", "v0", "strict"]), SHORT_TEXT)
INT32 = st.integers(-(2**31), 2**31 - 1)
SMALL_INT = st.one_of(st.integers(-3, 6), INT32)
FLOAT32 = st.one_of(st.floats(width=32), st.sampled_from([0.0, -0.0, 1.0, 0.5, 1e-45, math.nan, math.inf, -math.inf]))
ROLE = st.one_of(st.sampled_from(["user", "assistant", "system", "tool", ""]), SHORT_TEXT)


def alternating(turns: int, last: str) -> common_pb2.Conversation:
    """user/assistant turns ending with ``last``: what the strict templates accept."""
    first = "user" if (turns % 2 == 1) == (last == "user") else "assistant"
    roles = [first if i % 2 == 0 else ({"user": "assistant", "assistant": "user"}[first]) for i in range(turns)]
    return common_pb2.Conversation(messages=[common_pb2.ChatMessage(role=r, content=f"turn {i}: hello")
                                             for i, r in enumerate(roles)])


def conversations(last: str) -> st.SearchStrategy:
    message = st.builds(common_pb2.ChatMessage, role=ROLE, content=st.one_of(SHORT_TEXT, TEXT))
    return st.one_of(st.lists(message, max_size=4).map(lambda m: common_pb2.Conversation(messages=m)),
                     st.integers(1, 4).map(lambda n: alternating(n, last)))


def reward_inputs(valid: bool) -> st.SearchStrategy:
    def text(p, r, i):
        return reward_pb2.RewardInput(text=reward_pb2.TextPair(prompt=p, response=r), id=i)

    def chat(c, i):
        return reward_pb2.RewardInput(conversation=c, id=i)

    if valid:
        return st.one_of(st.builds(text, st.text(max_size=20), WORDS, st.text(max_size=8)),
                         st.builds(chat, st.integers(1, 4).map(lambda n: alternating(n, "assistant")),
                                   st.text(max_size=8)))
    return st.one_of(st.builds(text, SHORT_TEXT, TEXT, SHORT_TEXT),
                     st.builds(chat, conversations("assistant"), SHORT_TEXT),
                     st.builds(reward_pb2.RewardInput, id=SHORT_TEXT))


def score_options(valid: bool) -> st.SearchStrategy:
    if valid:
        return st.builds(reward_pb2.ScoreOptions, model_version=st.sampled_from(["", "v0", "strict"]),
                         truncation=st.integers(0, 3), normalize=st.booleans())
    return st.builds(reward_pb2.ScoreOptions, model_version=VERSION, truncation=st.integers(-2, 5),
                     normalize=st.booleans())


def with_context(message, context):
    """Sets a oneof ``context``: a prompt, a conversation, or neither."""
    kind, value = context
    if kind == "prompt":
        message.prompt = value
    elif kind == "conversation":
        message.conversation.CopyFrom(value)
    return message


def contexts(valid: bool, last: str) -> st.SearchStrategy:
    if valid:
        return st.one_of(st.tuples(st.just("prompt"), WORDS),
                         st.tuples(st.just("conversation"), st.integers(1, 3).map(lambda n: alternating(n, last))))
    return st.one_of(st.tuples(st.just("prompt"), TEXT), st.tuples(st.just("conversation"), conversations(last)),
                     st.just(("none", None)))


def both(build) -> st.SearchStrategy:
    return st.one_of(build(True), build(False))


REWARD_REQUESTS = {
    "Score": both(lambda v: st.builds(
        reward_pb2.ScoreRequest, inputs=st.lists(reward_inputs(v), min_size=v, max_size=5), options=score_options(v))),
    "Compare": both(lambda v: st.builds(
        lambda context, a, b, options: with_context(
            reward_pb2.CompareRequest(response_a=a, response_b=b, options=options), context),
        contexts(v, "user"), WORDS if v else TEXT, WORDS if v else TEXT, score_options(v))),
    "ScoreStream": st.lists(both(lambda v: st.builds(
        reward_pb2.ScoreStreamRequest, correlation_id=SHORT_TEXT,
        inputs=st.lists(reward_inputs(v), min_size=v, max_size=3), options=score_options(v))), max_size=4),
    "SetShadow": both(lambda v: st.builds(
        reward_pb2.SetShadowRequest, model_version=st.sampled_from(["strict", ""]) if v else VERSION,
        sample_fraction=st.floats(0.1, 1.0) if v else st.one_of(st.floats(), st.sampled_from([0.0, math.nan])))),
    "GetScoreDrift": st.builds(reward_pb2.GetScoreDriftRequest, model_version=VERSION),
    "GetShadow": st.builds(reward_pb2.GetShadowRequest, model_version=VERSION),
    "SubmitPreference": both(lambda v: st.builds(
        lambda context, pair, ranked, annotator, versions, pid: with_context(
            reward_pb2.SubmitPreferenceRequest(chosen=pair[0], rejected=pair[1], ranked_responses=ranked,
                                               annotator_id=annotator, policy_versions=versions, preference_id=pid),
            context),
        contexts(v, "user"),
        st.tuples(WORDS, WORDS.map(lambda s: s + " no")) if v else st.tuples(TEXT, TEXT),
        st.just([]) if v else st.lists(TEXT, max_size=4),
        WORDS if v else SHORT_TEXT,
        st.lists(st.sampled_from(["v0", "v1"]), max_size=1) if v else st.lists(SHORT_TEXT, max_size=3),
        st.from_regex(r"[a-z0-9._:@/-]{0,20}", fullmatch=True) if v else SHORT_TEXT)),
}


def prompts(valid: bool) -> st.SearchStrategy:
    if valid:
        return st.one_of(st.builds(lambda t: policy_pb2.PromptInput(text=t), WORDS),
                         st.integers(1, 3).map(lambda n: policy_pb2.PromptInput(conversation=alternating(n, "user"))))
    return st.one_of(st.builds(lambda t, i: policy_pb2.PromptInput(text=t, id=i), TEXT, SHORT_TEXT),
                     st.builds(lambda c, i: policy_pb2.PromptInput(conversation=c, id=i), conversations("user"),
                               SHORT_TEXT),
                     st.builds(policy_pb2.PromptInput, id=SHORT_TEXT))


def sampling(valid: bool) -> st.SearchStrategy:
    def build(max_new_tokens, temperature, top_p, top_k, n, stop, seed):
        params = policy_pb2.SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                           top_k=top_k, n=n, stop=stop)
        if seed is not None:
            params.seed = seed
        return params

    seed = st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1))
    if valid:
        return st.builds(build, st.integers(0, 3), st.one_of(st.just(0.0), st.floats(0.0625, 3.0, width=32)),
                         st.floats(0.0, 1.0, width=32), st.integers(0, 600), st.integers(0, 2),
                         st.lists(st.text(min_size=1, max_size=3), max_size=2), seed)
    return st.builds(build, SMALL_INT, FLOAT32, FLOAT32, SMALL_INT, SMALL_INT, st.lists(TEXT, max_size=4), seed)


POLICY_REQUESTS = {
    "Generate": both(lambda v: st.builds(
        policy_pb2.GenerateRequest, prompts=st.lists(prompts(v), min_size=v, max_size=2 if v else 4),
        sampling=sampling(v), model_version=st.sampled_from(["", "strict"]) if v else VERSION)),
    "GenerateStream": both(lambda v: st.builds(
        policy_pb2.GenerateStreamRequest, prompt=prompts(v), sampling=sampling(v),
        model_version=st.sampled_from(["", "strict"]) if v else VERSION)),
}


VOCAB = st.integers(0, 511)
IDS = st.one_of(st.lists(st.one_of(VOCAB, INT32), max_size=6), st.integers(250, 300).map(lambda n: [7] * n))
FINGERPRINT = st.one_of(st.just(""), SHORT_TEXT, st.just("0" * 64))
LOGPROB = st.one_of(st.floats(-20, 0, width=32), FLOAT32, st.sampled_from([-100.0, -720.0, -1e30]))


def sequences(valid: bool) -> st.SearchStrategy:
    ids = st.lists(VOCAB, min_size=1, max_size=6) if valid else IDS
    return st.builds(reference_pb2.TokenSequence, prompt_token_ids=ids, completion_token_ids=ids)


@st.composite
def kl_inputs(draw, valid: bool):
    sequence = draw(sequences(valid))
    if valid:  # one log-prob per completion token, as Generate returns them
        count = len(sequence.completion_token_ids)
        logprobs = draw(st.lists(st.floats(-30, 0, width=32), min_size=count, max_size=count))
        if draw(st.booleans()):  # one far below any reference log-prob: k3 = e^-d overflows
            logprobs[draw(st.integers(0, count - 1))] = draw(st.sampled_from([-100.0, -720.0, -1e30, -3.4e38]))
    else:
        logprobs = draw(st.lists(LOGPROB, max_size=6))
    return reference_pb2.KLInput(sequence=sequence, policy_logprobs=logprobs)


REFERENCE_REQUESTS = {
    "LogProbs": both(lambda v: st.builds(
        reference_pb2.LogProbsRequest, sequences=st.lists(sequences(v), min_size=v, max_size=5),
        model_version=st.sampled_from(["", "v0"]) if v else VERSION,
        tokenizer_fingerprint=st.just("") if v else FINGERPRINT)),
    "KL": both(lambda v: st.builds(
        reference_pb2.KLRequest, inputs=st.lists(kl_inputs(v), min_size=v, max_size=5),
        estimator=st.integers(0, 3) if v else st.integers(-1, 5),
        model_version=st.sampled_from(["", "v0"]) if v else VERSION,
        tokenizer_fingerprint=st.just("") if v else FINGERPRINT)),
}

PATH = st.one_of(
    SHORT_TEXT, st.sampled_from(["", ".", "/", "/tmp", "/dev/null", "/proc/self", "/nonexistent/x", "/tmp/a\x00b"]),
    st.sampled_from([("/tmp/", "a", 256), ("/", "a/", 3000)]).map(lambda p: p[0] + p[1] * p[2]),  # ENAMETOOLONG
)
MODEL_REQUESTS = {
    "GetModelInfo": st.builds(common_pb2.GetModelInfoRequest, model_version=VERSION),
    "ListModelVersions": st.just(common_pb2.ListModelVersionsRequest()),
    "LoadModelVersion": st.builds(common_pb2.LoadModelVersionRequest, path=PATH, version=VERSION,
                                  activate=st.booleans()),
    "ActivateModelVersion": st.builds(common_pb2.ActivateModelVersionRequest, version=VERSION),
    # Not "strict": the second reward version stays for the shadow and template paths.
    "UnloadModelVersion": st.builds(common_pb2.UnloadModelVersionRequest,
                                    version=st.one_of(st.sampled_from(["", "v0"]), SHORT_TEXT)),
}
SERVICE_REQUESTS = {"reward": REWARD_REQUESTS, "policy": POLICY_REQUESTS, "reference": REFERENCE_REQUESTS}
STUBS = {
    "reward": reward_pb2_grpc.RewardServiceStub,
    "policy": policy_pb2_grpc.PolicyServiceStub,
    "reference": reference_pb2_grpc.ReferenceServiceStub,
}


def calls(service: str) -> st.SearchStrategy:
    """(method, request) for the service and its ModelService, or (full method path, raw bytes)."""
    typed = [st.tuples(st.just(m), s) for m, s in {**SERVICE_REQUESTS[service], **MODEL_REQUESTS}.items()]
    full, methods = METHODS[service]
    paths = [f"/{full}/{m}" for m in methods] + [f"/{MODEL_SERVICE}/{m}" for m in MODEL_METHODS] + [
        "/grpc.health.v1.Health/Check"]
    raw = st.tuples(st.sampled_from(paths), st.binary(max_size=48))
    return st.one_of(*typed, raw)


# -- calling --------------------------------------------------------------------


def call(channel: grpc.Channel, service: str, method: str, request) -> tuple[str, grpc.StatusCode, str]:
    """One RPC with a deadline; its method name, final code and details."""
    try:
        if method.startswith("/"):  # a raw body through a generic call
            name = method.rsplit("/", 1)[1]
            if name in STREAMING_REQUESTS:
                list(channel.stream_stream(method)(iter([request]), timeout=DEADLINE_S))
            elif name in STREAMING_RESPONSES:
                list(channel.unary_stream(method)(request, timeout=DEADLINE_S))
            else:
                channel.unary_unary(method)(request, timeout=DEADLINE_S)
            return name, OK, ""
        stub = common_pb2_grpc.ModelServiceStub(channel) if method in MODEL_REQUESTS else STUBS[service](channel)
        rpc = getattr(stub, method)
        if method in STREAMING_REQUESTS:
            for response in rpc(iter(request), timeout=DEADLINE_S):
                # A bad message is answered in the stream: the same codes apply to it.
                if response.HasField("error"):
                    code = next(c for c in Code if c.value[0] == response.error.code)
                    if code not in ALLOWED[method]:
                        return method, code, response.error.message
        elif method in STREAMING_RESPONSES:
            list(rpc(request, timeout=DEADLINE_S))
        else:
            response = rpc(request, timeout=DEADLINE_S)
            if method == "KL":  # answered means finite (kl=inf came back for k3 at -100)
                values = [v for r in response.results for v in (*r.kl, r.kl_sum)]
                if not all(math.isfinite(v) for v in values):
                    return method, Code.INTERNAL, f"non-finite KL in an OK answer: {values}"
        return method, OK, ""
    except grpc.RpcError as err:
        name = method.rsplit("/", 1)[-1]
        return name, err.code(), err.details() or ""


def fuzz(channel: grpc.Channel, service: str, examples: int) -> collections.Counter:
    seen: collections.Counter = collections.Counter()
    unexpected: list[str] = []
    pool = ThreadPoolExecutor(4, thread_name_prefix=f"fuzz-{service}")

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.large_base_example])
    @given(st.lists(calls(service), min_size=1, max_size=4))
    def run(batch):
        # Concurrently, as clients do: items of different requests share model batches.
        for (sent, _), (method, code, details) in zip(batch, pool.map(lambda c: call(channel, service, *c), batch)):
            seen[method, code.name] += 1
            # Bytes that do not parse are INVALID_ARGUMENT on any method.
            allowed = ALLOWED[method] | ({Code.INVALID_ARGUMENT} if sent.startswith("/") else set())
            if code not in allowed:
                unexpected.append(f"{sent}: {code.name}: {details[:300]}")
        assert not unexpected, unexpected

    try:
        run()
    finally:
        pool.shutdown()
    return seen


@pytest.mark.parametrize("service,examples", [("reward", 450), ("policy", 450), ("reference", 450)])
def test_generated_requests_get_only_documented_codes(servers, channels, service, examples):
    seen = fuzz(channels[service], service, examples)
    assert sum(seen.values()) >= REQUESTS_PER_SERVICE, seen
    # Every RPC of the service was reached, and some requests succeeded.
    full, methods = METHODS[service]
    reached = {method for method, _ in seen}
    assert set(methods) | set(MODEL_METHODS) <= reached, reached
    assert any(code == "OK" for _, code in seen), seen
    health = health_pb2_grpc.HealthStub(channels[service])
    for name in ("", full, MODEL_SERVICE):
        status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING, name
