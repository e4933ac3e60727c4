"""The reward service end to end: a real gRPC server on port 0, real clients."""

import concurrent.futures
import json
import logging
import math
import subprocess
import sys
import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers import (
    BackgroundServer, expect_error, hold_model_thread, metric_value, metrics_text, sample_value, wait_until,
)
from lm_fixtures import strict_chat_template
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from arbiter.batching import BatchingConfig
from arbiter.config import ConfigError
from arbiter.hf import read_metadata, tokenizer_fingerprint
from arbiter.limits import REQUEST_SLACK_BYTES, SizeLimits
from arbiter.tiny import TinyConfig, make_reward
from arbiter.v1 import common_pb2, common_pb2_grpc, reward_pb2, reward_pb2_grpc
from services.reward.server import create_server
from services.reward.settings import RewardSettings

PROMPTS = [
    ("What is the capital of France?", " Paris is the capital."),
    ("Say something nice.", " You are wonderful and kind!"),
    ("", " A response with no prompt at all, a little longer than the others to vary padding."),
    ("Tell me a joke.", " No."),
]


def text_input(prompt, response, item_id=""):
    return reward_pb2.RewardInput(text=reward_pb2.TextPair(prompt=prompt, response=response), id=item_id)


def chat_input(messages):
    return reward_pb2.RewardInput(
        conversation=common_pb2.Conversation(messages=[common_pb2.ChatMessage(role=r, content=c) for r, c in messages])
    )


class Reference:
    """Unbatched in-process forward of the same checkpoint, through plain transformers."""

    def __init__(self, model_dir):
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()

    def score_ids(self, ids):
        with torch.no_grad():
            return float(self.model(input_ids=torch.tensor([ids])).logits[0, 0])

    def score_text(self, text):
        return self.score_ids(self.tokenizer(text)["input_ids"])

    def score_chat(self, messages):
        rendered = self.tokenizer.apply_chat_template(
            [{"role": r, "content": c} for r, c in messages], tokenize=False
        )
        return self.score_ids(self.tokenizer(rendered, add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="module")
def reference(tiny_models):
    return Reference(tiny_models["reward"])


@pytest.fixture(scope="module")
def server(tiny_models, model_roots):
    settings = RewardSettings(
        model_dir=str(tiny_models["reward"]), port=0, metrics_port=0, max_items_per_request=16,
        batching=BatchingConfig(max_queue_delay_ms=20.0), model_roots=model_roots,
    )
    with BackgroundServer(lambda: create_server(settings)) as srv:
        yield srv


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.target) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return reward_pb2_grpc.RewardServiceStub(channel)


@pytest.fixture(scope="module")
def models_stub(channel):
    return common_pb2_grpc.ModelServiceStub(channel)


def assert_still_serving(stub, reference):
    response = stub.Score(reward_pb2.ScoreRequest(inputs=[text_input(*PROMPTS[0])]), timeout=10)
    assert response.results[0].score == pytest.approx(reference.score_text("".join(PROMPTS[0])), abs=1e-5)


# -- scores -------------------------------------------------------------------


def test_scores_equal_in_process_forward(stub, reference):
    request = reward_pb2.ScoreRequest(inputs=[text_input(p, r, f"id{i}") for i, (p, r) in enumerate(PROMPTS)])
    response = stub.Score(request, timeout=10)
    assert response.model_name == "tiny-reward"
    assert response.model_version == "v0"
    assert not response.normalized
    assert [r.id for r in response.results] == ["id0", "id1", "id2", "id3"]
    for (prompt, reply), result in zip(PROMPTS, response.results):
        expected = reference.score_text(prompt + reply)
        assert result.score == pytest.approx(expected, abs=1e-5)
        assert result.raw_score == result.score
        assert result.num_tokens == len(reference.tokenizer(prompt + reply)["input_ids"])


def test_chat_input_uses_the_models_own_template(stub, reference):
    messages = [("system", "Be brief."), ("user", "Hello there"), ("assistant", "Hi! How can I help?")]
    response = stub.Score(reward_pb2.ScoreRequest(inputs=[chat_input(messages)]), timeout=10)
    assert response.results[0].score == pytest.approx(reference.score_chat(messages), abs=1e-5)


def test_concurrent_small_requests_are_batched_and_exact(server, stub, reference):
    """32 one-item callers at once: each gets its own exact score, and the
    server ran them in fewer, larger forward passes."""

    def batch_count():
        return metric_value(server, "arbiter_batch_size_count", service="reward") or 0.0

    texts = [(f"Prompt number {i}.", " word" * (1 + i % 7)) for i in range(32)]
    before = batch_count()
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        scores = list(
            pool.map(lambda t: stub.Score(reward_pb2.ScoreRequest(inputs=[text_input(*t)]), timeout=30), texts)
        )
    batches = batch_count() - before
    for (prompt, reply), response in zip(texts, scores):
        assert response.results[0].score == pytest.approx(reference.score_text(prompt + reply), abs=1e-5)
    assert batches < 32 / 2, f"{batches} forward passes for 32 concurrent requests: not batched"


def test_normalized_scores_use_the_versions_shipped_stats(stub, tiny_models, reference):
    stats = read_metadata(tiny_models["reward"]).normalization
    request = reward_pb2.ScoreRequest(
        inputs=[text_input(*PROMPTS[1])], options=reward_pb2.ScoreOptions(normalize=True)
    )
    response = stub.Score(request, timeout=10)
    raw = reference.score_text("".join(PROMPTS[1]))
    assert response.normalized
    assert response.results[0].raw_score == pytest.approx(raw, abs=1e-5)
    assert response.results[0].score == pytest.approx((raw - stats.mean) / stats.std, abs=1e-4)


def test_compare_is_bradley_terry_on_raw_scores(stub, reference):
    prompt, a, b = "How are you?", " Great, thanks for asking!", " Bad."
    response = stub.Compare(reward_pb2.CompareRequest(prompt=prompt, response_a=a, response_b=b), timeout=10)
    sa, sb = reference.score_text(prompt + a), reference.score_text(prompt + b)
    assert response.score_a == pytest.approx(sa, abs=1e-5)
    assert response.score_b == pytest.approx(sb, abs=1e-5)
    assert response.probability_a_preferred == pytest.approx(1 / (1 + math.exp(-(sa - sb))), abs=1e-6)
    swapped = stub.Compare(reward_pb2.CompareRequest(prompt=prompt, response_a=b, response_b=a), timeout=10)
    assert swapped.probability_a_preferred == pytest.approx(1 - response.probability_a_preferred, abs=1e-6)


def test_compare_with_conversation_context(stub, reference):
    context = common_pb2.Conversation(messages=[common_pb2.ChatMessage(role="user", content="Hi")])
    response = stub.Compare(
        reward_pb2.CompareRequest(conversation=context, response_a="Hello!", response_b="Go away."), timeout=10
    )
    assert response.score_a == pytest.approx(reference.score_chat([("user", "Hi"), ("assistant", "Hello!")]), abs=1e-5)


def test_score_stream_answers_every_message_and_survives_a_bad_one(stub, reference):
    requests = []
    for i in range(20):
        prompt, reply = PROMPTS[i % len(PROMPTS)]
        requests.append(reward_pb2.ScoreStreamRequest(correlation_id=f"m{i}", inputs=[text_input(prompt, reply)]))
    requests.insert(7, reward_pb2.ScoreStreamRequest(correlation_id="bad", inputs=[text_input("p", "")]))
    responses = {r.correlation_id: r for r in stub.ScoreStream(iter(requests), timeout=30)}
    assert set(responses) == {r.correlation_id for r in requests}
    bad = responses.pop("bad")
    assert bad.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "inputs[0].text.response" in bad.error.message
    for i in range(20):
        prompt, reply = PROMPTS[i % len(PROMPTS)]
        assert responses[f"m{i}"].results[0].score == pytest.approx(reference.score_text(prompt + reply), abs=1e-5)


# -- model info, health, reflection ---------------------------------------------


def test_model_info(models_stub, tiny_models):
    info = models_stub.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=10).info
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_models["reward"]))
    stats = read_metadata(tiny_models["reward"]).normalization
    assert (info.kind, info.name, info.version, info.active) == ("reward", "tiny-reward", "v0", True)
    assert info.tokenizer_fingerprint == tokenizer_fingerprint(tokenizer)
    assert info.max_tokens == TinyConfig().n_positions
    assert info.normalization.mean == pytest.approx(stats.mean)
    assert info.normalization.std == pytest.approx(stats.std)
    assert info.backend == "torch"


def test_health_and_reflection(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "arbiter.v1.RewardService", "arbiter.v1.ModelService"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    [answer] = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for s in answer.list_services_response.service}
    assert {"arbiter.v1.RewardService", "arbiter.v1.ModelService", "grpc.health.v1.Health"} <= names


# -- bad input ----------------------------------------------------------------


def test_empty_batch(stub, reference):
    expect_error(lambda: stub.Score(reward_pb2.ScoreRequest(), timeout=10), grpc.StatusCode.INVALID_ARGUMENT, "inputs", "empty")
    assert_still_serving(stub, reference)


def test_empty_response_text_names_the_item(stub, reference):
    request = reward_pb2.ScoreRequest(inputs=[text_input("a", " fine"), text_input("b", "   ")])
    expect_error(lambda: stub.Score(request, timeout=10), grpc.StatusCode.INVALID_ARGUMENT, "inputs[1].text.response", "empty")
    assert_still_serving(stub, reference)


def test_item_without_input(stub, reference):
    request = reward_pb2.ScoreRequest(inputs=[text_input("a", " ok"), reward_pb2.RewardInput(id="x")])
    expect_error(lambda: stub.Score(request, timeout=10), grpc.StatusCode.INVALID_ARGUMENT, "inputs[1]", "neither text nor conversation")
    assert_still_serving(stub, reference)


def test_conversation_must_end_with_the_assistant(stub, reference):
    request = reward_pb2.ScoreRequest(inputs=[chat_input([("user", "hi")])])
    expect_error(
        lambda: stub.Score(request, timeout=10), grpc.StatusCode.INVALID_ARGUMENT,
        "inputs[0].conversation.messages[0].role", "assistant",
    )
    request = reward_pb2.ScoreRequest(inputs=[chat_input([("user", "hi"), ("assistant", "")])])
    expect_error(
        lambda: stub.Score(request, timeout=10), grpc.StatusCode.INVALID_ARGUMENT,
        "inputs[0].conversation.messages[1].content", "empty",
    )
    assert_still_serving(stub, reference)


def test_too_long_is_rejected_naming_the_item(stub, reference):
    long_reply = " word" * 400
    request = reward_pb2.ScoreRequest(inputs=[text_input(*PROMPTS[0]), text_input("q", long_reply)])
    details = expect_error(
        lambda: stub.Score(request, timeout=10), grpc.StatusCode.INVALID_ARGUMENT, "inputs[1]", "max of 256", "TRUNCATION_LEFT"
    )
    assert "inputs[0]" not in details
    assert_still_serving(stub, reference)


def test_truncation_left_keeps_the_end(stub, reference):
    long_reply = " word" * 400 + " The end."
    request = reward_pb2.ScoreRequest(
        inputs=[text_input("q", long_reply)],
        options=reward_pb2.ScoreOptions(truncation=common_pb2.TRUNCATION_LEFT),
    )
    result = stub.Score(request, timeout=10).results[0]
    ids = reference.tokenizer("q" + long_reply)["input_ids"][-256:]
    assert result.truncated and result.num_tokens == 256
    assert result.score == pytest.approx(reference.score_ids(ids), abs=1e-5)


def test_too_many_items_is_resource_exhausted_with_the_limit(stub, reference):
    request = reward_pb2.ScoreRequest(inputs=[text_input(*PROMPTS[0])] * 17)
    expect_error(lambda: stub.Score(request, timeout=10), grpc.StatusCode.RESOURCE_EXHAUSTED, "17 inputs", "limit of 16")
    assert_still_serving(stub, reference)


def test_unknown_model_version_is_not_found(stub, reference):
    request = reward_pb2.ScoreRequest(
        inputs=[text_input(*PROMPTS[0])], options=reward_pb2.ScoreOptions(model_version="v999")
    )
    expect_error(lambda: stub.Score(request, timeout=10), grpc.StatusCode.NOT_FOUND, "'v999'", "loaded: v0")
    assert_still_serving(stub, reference)


def test_unknown_truncation_value(stub, reference):
    request = reward_pb2.ScoreRequest(inputs=[text_input(*PROMPTS[0])], options=reward_pb2.ScoreOptions(truncation=42))
    expect_error(lambda: stub.Score(request, timeout=10), grpc.StatusCode.INVALID_ARGUMENT, "options.truncation", "TRUNCATION_LEFT")
    assert_still_serving(stub, reference)


# -- bounded work per request ---------------------------------------------------
# Sizes are counted as sent (protobuf framing included), before anything is
# converted. The tiny RM's window is 256 tokens: by default an item may be
# 256 x 32 = 8192 bytes. A RewardInput with an empty prompt and an n-byte
# response (128 <= n < 16378) is n + 6 bytes: TextPair = tag + 2-byte length + n,
# RewardInput = tag + 2-byte length + TextPair.


def test_items_over_the_size_limit_are_refused_before_converting(stub, reference):
    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
    over = reward_pb2.ScoreRequest(inputs=[text_input(*PROMPTS[0]), text_input("", "x" * 8187)])
    expect_error(lambda: stub.Score(over, timeout=10), exhausted,
                 "inputs[1]: is 8193 bytes, over the limit of 8192 per item (max_item_bytes; "
                 "32 per token of the model's 256)")
    # Bytes, not characters: 4093 x "é" (2 bytes each) is an item of exactly 8192 bytes, then too many tokens.
    at_limit = reward_pb2.ScoreRequest(inputs=[text_input("", "é" * 4093)])
    expect_error(lambda: stub.Score(at_limit, timeout=10), grpc.StatusCode.INVALID_ARGUMENT, "inputs[0]: is",
                 "over the model's max of 256")
    past = reward_pb2.ScoreRequest(inputs=[text_input("", "é" * 4094)])
    expect_error(lambda: stub.Score(past, timeout=10), exhausted, "inputs[0]: is 8194 bytes")
    # A conversation's framing counts too. ChatMessage("user", 4000 x "u") = (2 + 4) + (3 + 4000) = 4009,
    # 4012 in the Conversation; ("assistant", 4170 x "a") = (2 + 9) + (3 + 4170) = 4184, 4187 in it;
    # Conversation = 8199; the RewardInput = 3 + 8199 = 8202.
    chat = reward_pb2.ScoreRequest(inputs=[chat_input([("user", "u" * 4000), ("assistant", "a" * 4170)])])
    expect_error(lambda: stub.Score(chat, timeout=10), exhausted, "inputs[0]: is 8202 bytes")
    # Compare's items are its context with each response: 1 + 8192 bytes.
    compare = reward_pb2.CompareRequest(prompt="p", response_a=" fine", response_b="b" * 8192)
    expect_error(lambda: stub.Compare(compare, timeout=10), exhausted, "prompt + response_b: is 8193 bytes")
    stream = [reward_pb2.ScoreStreamRequest(correlation_id="big", inputs=[text_input("", "x" * 8187)]),
              reward_pb2.ScoreStreamRequest(correlation_id="ok", inputs=[text_input(*PROMPTS[0])])]
    answers = {r.correlation_id: r for r in stub.ScoreStream(iter(stream), timeout=30)}
    assert answers["big"].error.code == exhausted.value[0] and "inputs[0]: is 8193 bytes" in answers["big"].error.message
    assert answers["ok"].results[0].score == pytest.approx(reference.score_text("".join(PROMPTS[0])), abs=1e-5)


def test_counts_are_checked_before_items_are_converted(stub):
    # 2.9 million one-character items (20 MB) took 7.5 s and 1.5 GB to convert before their count was
    # checked. Now the count is read as sent: it is refused even ahead of the first item's own error,
    # which converting would meet first.
    request = reward_pb2.ScoreRequest(inputs=[reward_pb2.RewardInput()] + [text_input(*PROMPTS[0])] * 16)
    expect_error(lambda: stub.Score(request, timeout=10), grpc.StatusCode.RESOURCE_EXHAUSTED,
                 "17 inputs in one request, over the limit of 16")


def test_request_and_stream_limits(tiny_models):
    settings = RewardSettings(model_dir=str(tiny_models["reward"]), port=0, stream_max_messages=3,
                              sizes=SizeLimits(max_item_bytes=100, max_request_bytes=250))
    with BackgroundServer(lambda: create_server(settings)) as srv, grpc.insecure_channel(srv.target) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
        # TextPair("q", 93 bytes) = 3 + 95 = 98; the RewardInput 100: at the item limit; 102 in the request.
        item = text_input("q", " " + "w" * 92)
        expect_error(lambda: stub.Score(reward_pb2.ScoreRequest(inputs=[text_input("q", " " + "w" * 93)]), timeout=10),
                     exhausted, "inputs[0]: is 101 bytes, over the limit of 100 per item (max_item_bytes)")
        assert len(stub.Score(reward_pb2.ScoreRequest(inputs=[item, item]), timeout=10).results) == 2
        expect_error(lambda: stub.Score(reward_pb2.ScoreRequest(inputs=[item] * 3), timeout=10), exhausted,
                     "the request is 306 bytes, over the limit of 250 per request (max_request_bytes)")
        # Further past it than the slack gRPC leaves: refused by gRPC, before it is parsed.
        far = reward_pb2.ScoreRequest(inputs=[text_input("q", " " + "w" * (REQUEST_SLACK_BYTES + 250))])
        expect_error(lambda: stub.Score(far, timeout=10), exhausted,
                     f"larger than max ({far.ByteSize()} vs. {250 + REQUEST_SLACK_BYTES})")
        # The fourth message of a stream is one too many: the first three are answered, then the stream ends.
        messages = [reward_pb2.ScoreStreamRequest(correlation_id=f"m{i}", inputs=[item]) for i in range(4)]
        answered = []
        with pytest.raises(grpc.RpcError) as ended:
            for response in stub.ScoreStream(iter(messages), timeout=30):
                answered.append(response.correlation_id)
        assert sorted(answered) == ["m0", "m1", "m2"]
        assert ended.value.code() == exhausted and "more than 3 messages" in ended.value.details()


def test_an_oversized_message_is_refused_by_grpc(server, channel):
    big = reward_pb2.ScoreRequest(inputs=[text_input("", "word " * (12 * 1024 * 1024))]).SerializeToString()
    assert len(big) > 60 * 1024 * 1024
    with grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]) as ch:
        started = time.perf_counter()
        expect_error(lambda: ch.unary_unary("/arbiter.v1.RewardService/Score")(big, timeout=30),
                     grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max",
                     f"vs. {16 * 1024 * 1024 + REQUEST_SLACK_BYTES})")  # max_request_bytes + the slack
        # ~0.1 s is moving 60 MiB over loopback; tokenizing it took 100 s before the limits.
        assert time.perf_counter() - started < 5
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_health_answers_while_a_large_request_tokenizes(tiny_models):
    settings = RewardSettings(model_dir=str(tiny_models["reward"]), port=0)
    with BackgroundServer(lambda: create_server(settings)) as srv, grpc.insecure_channel(srv.target) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        # 256 items of 8000 bytes, cut to their last 256 tokens: ~2 MB to tokenize (seconds on a small core).
        request = reward_pb2.ScoreRequest(inputs=[text_input("", " word" * 1600)] * 256,
                                          options=reward_pb2.ScoreOptions(truncation=common_pb2.TRUNCATION_LEFT))
        pending = stub.Score.future(request, timeout=120)
        slowest = 0.0
        checks = 0
        while not pending.done():
            started = time.perf_counter()
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
            slowest = max(slowest, time.perf_counter() - started)
            checks += 1
        assert len(pending.result().results) == 256 and checks > 0
        # Tokenizing on the event loop stalled every check for the whole request (3 s here).
        assert slowest < 1.0, f"a health check took {slowest:.2f}s while the request was tokenized"


def test_undecodable_bodies_are_invalid_argument_and_log_nothing(server, channel, caplog):
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    garbage = b"\xff\xff\xff\xff"  # a tag whose varint never ends
    count = lambda: sample_value(server.running.registry, "arbiter_requests_total", service="reward",  # noqa: E731
                                 method="Score", code="INVALID_ARGUMENT")
    before = count()
    with caplog.at_level(logging.INFO):
        for method, type_name in [("/arbiter.v1.RewardService/Score", "arbiter.v1.ScoreRequest"),
                                  ("/arbiter.v1.ModelService/LoadModelVersion", "arbiter.v1.LoadModelVersionRequest"),
                                  ("/grpc.health.v1.Health/Check", "grpc.health.v1.HealthCheckRequest")]:
            expect_error(lambda: channel.unary_unary(method)(garbage, timeout=10), invalid,
                         f"request body is not a valid {type_name} message")
        good = reward_pb2.ScoreStreamRequest(correlation_id="good", inputs=[text_input(*PROMPTS[0])]).SerializeToString()
        answered = []
        with pytest.raises(grpc.RpcError) as ended:
            for body in channel.stream_stream("/arbiter.v1.RewardService/ScoreStream")(iter([good, garbage, good]),
                                                                                       timeout=30):
                answered.append(reward_pb2.ScoreStreamResponse.FromString(body).correlation_id)
    # The message before the bad one is answered, none after it; the stream ends instead of hanging.
    assert answered == ["good"]
    assert ended.value.code() == invalid
    assert ended.value.details() == "message 1 of the request stream is not a valid arbiter.v1.ScoreStreamRequest message"
    assert count() == before + 1
    assert not caplog.records, [r.getMessage() for r in caplog.records]


def test_a_chat_template_that_refuses_is_invalid_argument(tmp_path, tiny_models, stub, models_stub, reference):
    strict = strict_chat_template(tiny_models["reward"], tmp_path / "strict", version="strict")
    models_stub.LoadModelVersion(common_pb2.LoadModelVersionRequest(path=str(strict), activate=False), timeout=60)
    try:
        options = reward_pb2.ScoreOptions(model_version="strict")
        ok = reward_pb2.ScoreRequest(inputs=[chat_input([("user", "hi"), ("assistant", "hello")])], options=options)
        assert stub.Score(ok, timeout=10).results[0].num_tokens > 0
        wrong_order = reward_pb2.ScoreRequest(
            inputs=[chat_input([("user", "hi"), ("assistant", "hello")]), chat_input([("assistant", "hi"), ("assistant", "x")])],
            options=options,
        )
        expect_error(lambda: stub.Score(wrong_order, timeout=10), grpc.StatusCode.INVALID_ARGUMENT,
                     "inputs[1].conversation: the model's chat template refuses this conversation: "
                     "Conversation roles must alternate user/assistant")
    finally:
        models_stub.UnloadModelVersion(common_pb2.UnloadModelVersionRequest(version="strict"), timeout=10)
    assert_still_serving(stub, reference)


def test_long_error_details_are_cut_to_fit_a_header(stub):
    request = reward_pb2.ScoreRequest(inputs=[text_input(*PROMPTS[0])],
                                      options=reward_pb2.ScoreOptions(model_version="v" * 100_000))
    # Whole, the details would pass gRPC's 16 KiB header limit (RESOURCE_EXHAUSTED "metadata size exceeds").
    details = expect_error(lambda: stub.Score(request, timeout=10), grpc.StatusCode.NOT_FOUND, "characters cut")
    assert details.startswith("model version 'vvv") and details.endswith("(loaded: v0)")
    assert len(details) < 1100


def test_a_path_the_filesystem_refuses_is_failed_precondition(tiny_models, models_stub):
    # Inside the served model's directory (where a server loads from), one component over NAME_MAX.
    too_long = str(tiny_models["reward"] / ("a" * 256))
    expect_error(lambda: models_stub.LoadModelVersion(common_pb2.LoadModelVersionRequest(path=too_long), timeout=30),
                 grpc.StatusCode.FAILED_PRECONDITION, "path: cannot read the checkpoint: File name too long")


def test_deadline_is_honoured(stub, reference):
    # As many items as the server takes: more than a millisecond of work even
    # for the tiny model, which can answer one item within the deadline.
    request = reward_pb2.ScoreRequest(inputs=[text_input(*PROMPTS[i % len(PROMPTS)]) for i in range(16)])
    expect_error(lambda: stub.Score(request, timeout=0.001), grpc.StatusCode.DEADLINE_EXCEEDED)
    assert_still_serving(stub, reference)


def test_metrics_report_requests_batches_and_scores(server, stub):
    stub.Score(reward_pb2.ScoreRequest(inputs=[text_input(*PROMPTS[0])]), timeout=10)
    with pytest.raises(grpc.RpcError):
        stub.Score(reward_pb2.ScoreRequest(), timeout=10)
    text = metrics_text(server)
    assert 'arbiter_requests_total{code="OK",method="Score",service="reward"}' in text
    assert 'arbiter_requests_total{code="INVALID_ARGUMENT",method="Score",service="reward"}' in text
    assert 'arbiter_request_duration_seconds_bucket{le="0.001",method="Score",service="reward"}' in text
    assert 'arbiter_reward_score_bucket{le="0.0",model_version="v0"}' in text
    assert 'arbiter_batch_size_bucket{le="1.0",service="reward"}' in text
    assert 'arbiter_queue_depth{service="reward"}' in text
    assert 'arbiter_model_active{model_version="v0",service="reward"} 1.0' in text


# -- versions -------------------------------------------------------------------


def test_load_activate_and_unload_versions(tmp_path, tiny_models, stub, models_stub, reference):
    candidate = make_reward(tmp_path / "rm-v1", TinyConfig(seed=7), calibrate=False)
    loaded = models_stub.LoadModelVersion(
        common_pb2.LoadModelVersionRequest(path=str(candidate), version="v1", activate=False), timeout=60
    )
    assert loaded.info.version == "v1" and not loaded.info.active
    request = reward_pb2.ScoreRequest(inputs=[text_input(*PROMPTS[1])])
    assert stub.Score(request, timeout=10).model_version == "v0"
    pinned = reward_pb2.ScoreRequest(inputs=[text_input(*PROMPTS[1])], options=reward_pb2.ScoreOptions(model_version="v1"))
    assert stub.Score(pinned, timeout=10).results[0].score == pytest.approx(
        Reference(candidate).score_text("".join(PROMPTS[1])), abs=1e-5
    )
    # v1 ships no statistics: normalizing with it is refused, not improvised.
    unnormalizable = reward_pb2.ScoreRequest(
        inputs=[text_input(*PROMPTS[1])], options=reward_pb2.ScoreOptions(model_version="v1", normalize=True)
    )
    expect_error(lambda: stub.Score(unnormalizable, timeout=10), grpc.StatusCode.FAILED_PRECONDITION, "normalization")

    swapped = models_stub.ActivateModelVersion(common_pb2.ActivateModelVersionRequest(version="v1"), timeout=10)
    assert swapped.previous_version == "v0" and swapped.info.active
    assert stub.Score(request, timeout=10).model_version == "v1"
    expect_error(
        lambda: models_stub.UnloadModelVersion(common_pb2.UnloadModelVersionRequest(version="v1"), timeout=10),
        grpc.StatusCode.FAILED_PRECONDITION, "active",
    )
    models_stub.ActivateModelVersion(common_pb2.ActivateModelVersionRequest(version="v0"), timeout=10)
    models_stub.UnloadModelVersion(common_pb2.UnloadModelVersionRequest(version="v1"), timeout=10)
    versions = models_stub.ListModelVersions(common_pb2.ListModelVersionsRequest(), timeout=10).versions
    assert [v.version for v in versions] == ["v0"]
    assert_still_serving(stub, reference)


def test_bad_checkpoints_are_refused_and_nothing_changes(tmp_path, tiny_models, stub, models_stub, reference):
    from transformers import GPT2ForSequenceClassification

    two_labels = tmp_path / "two-labels"
    model = GPT2ForSequenceClassification.from_pretrained(str(tiny_models["reward"]), num_labels=2, ignore_mismatched_sizes=True)
    model.save_pretrained(two_labels)
    AutoTokenizer.from_pretrained(str(tiny_models["reward"])).save_pretrained(two_labels)
    cases = [
        (str(tmp_path / "missing"), "does not exist"),
        (str(tmp_path), "no config.json"),
        (str(two_labels), "num_labels=2"),
    ]
    for path, fragment in cases:
        expect_error(
            lambda: models_stub.LoadModelVersion(common_pb2.LoadModelVersionRequest(path=path, activate=True), timeout=60),
            grpc.StatusCode.FAILED_PRECONDITION, fragment,
        )
    nan_dir = tmp_path / "nan"
    nan_model = AutoModelForSequenceClassification.from_pretrained(str(tiny_models["reward"]))
    with torch.no_grad():
        nan_model.score.weight.fill_(float("nan"))
    nan_model.save_pretrained(nan_dir)
    AutoTokenizer.from_pretrained(str(tiny_models["reward"])).save_pretrained(nan_dir)
    expect_error(
        lambda: models_stub.LoadModelVersion(common_pb2.LoadModelVersionRequest(path=str(nan_dir), activate=True), timeout=60),
        grpc.StatusCode.FAILED_PRECONDITION, "non-finite",
    )
    info = models_stub.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=10).info
    assert info.version == "v0"
    assert_still_serving(stub, reference)


# -- lifecycle, auth, other checkpoints -------------------------------------------------


def test_graceful_stop_drains_in_flight_requests(tiny_models):
    settings = RewardSettings(model_dir=str(tiny_models["reward"]), port=0)
    srv = BackgroundServer(lambda: create_server(settings))
    channel = grpc.insecure_channel(srv.target)
    stub = reward_pb2_grpc.RewardServiceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    stub.Score(reward_pb2.ScoreRequest(inputs=[text_input(*PROMPTS[0])]), timeout=10)  # connected
    batcher = srv.engine.models.get().batcher
    # With the model thread held, one request's batch waits on it and a second queues behind.
    release = hold_model_thread(srv)
    running = stub.Score.future(reward_pb2.ScoreRequest(inputs=[text_input(*PROMPTS[1])]), timeout=30)
    wait_until(lambda: batcher.in_flight == 1, what="the first request's batch to wait for the model",
               interval_s=0.005)
    queued = stub.Score.future(reward_pb2.ScoreRequest(inputs=[text_input(*PROMPTS[2])]), timeout=30)
    wait_until(lambda: sample_value(srv.running.registry, "arbiter_queue_depth", service="reward") == 1,
               what="the second request to be queued on the server", interval_s=0.005)

    def stopping() -> bool:
        try:
            return health.Check(health_pb2.HealthCheckRequest(), timeout=5).status != health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return True

    stopper = threading.Thread(target=srv.stop, kwargs={"grace": 10})
    stopper.start()
    wait_until(stopping, what="the stop to begin", interval_s=0.005)
    release()
    stopper.join(30)
    assert running.result().results[0].num_tokens > 0
    assert queued.result().results[0].num_tokens > 0
    with pytest.raises(grpc.RpcError) as after:
        stub.Score(reward_pb2.ScoreRequest(inputs=[text_input(*PROMPTS[0])]), timeout=2)
    assert after.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    channel.close()


def test_aged_connections_are_closed_so_clients_re_resolve(tiny_models):
    """Clients pick up replicas added behind a DNS name only on a new
    connection: the server ends each one after max_connection_age_s (GOAWAY),
    and the client's next call goes out on a fresh one without an error."""
    settings = RewardSettings(model_dir=str(tiny_models["reward"]), port=0, max_connection_age_s=0.5)
    with BackgroundServer(lambda: create_server(settings)) as srv, grpc.insecure_channel(srv.target) as channel:
        states: list[grpc.ChannelConnectivity] = []
        channel.subscribe(states.append, try_to_connect=False)
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        request = reward_pb2.ScoreRequest(inputs=[text_input(*PROMPTS[0])])
        stub.Score(request, timeout=10)
        wait_until(lambda: grpc.ChannelConnectivity.READY in states, what="the first connection")
        first_ready = states.index(grpc.ChannelConnectivity.READY)
        wait_until(lambda: grpc.ChannelConnectivity.IDLE in states[first_ready:], 30,
                   what="the server to close the aged connection")
        assert stub.Score(request, timeout=10).results[0].num_tokens > 0
        with pytest.raises(ConfigError, match="max_connection_age_s"):
            RewardSettings(model_dir=str(tiny_models["reward"]), max_connection_age_s=0)


def test_bearer_token_is_required_when_configured(tiny_models):
    token = "s3cret-token-of-enough-length"
    settings = RewardSettings(model_dir=str(tiny_models["reward"]), port=0, auth_token=token)
    with BackgroundServer(lambda: create_server(settings)) as srv, grpc.insecure_channel(srv.target) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        request = reward_pb2.ScoreRequest(inputs=[text_input(*PROMPTS[0])])
        expect_error(lambda: stub.Score(request, timeout=10), grpc.StatusCode.UNAUTHENTICATED, "Bearer")
        expect_error(
            lambda: stub.Score(request, timeout=10, metadata=(("authorization", "Bearer wrong"),)),
            grpc.StatusCode.UNAUTHENTICATED,
        )
        ok = stub.Score(request, timeout=10, metadata=(("authorization", f"Bearer {token}"),))
        assert ok.results[0].num_tokens > 0
        stream = stub.ScoreStream(iter([reward_pb2.ScoreStreamRequest(inputs=[text_input(*PROMPTS[0])])]), timeout=10)
        expect_error(lambda: list(stream), grpc.StatusCode.UNAUTHENTICATED)
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_any_hf_sequence_classification_checkpoint_loads(tmp_path, tiny_models):
    """Not only GPT-2: a Llama-architecture RM written by save_pretrained."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_models["reward"]))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128, num_labels=1,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(3)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "llama-rm")
    tokenizer.save_pretrained(tmp_path / "llama-rm")
    reference = Reference(tmp_path / "llama-rm")
    settings = RewardSettings(model_dir=str(tmp_path / "llama-rm"), port=0)
    with BackgroundServer(lambda: create_server(settings)) as srv, grpc.insecure_channel(srv.target) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        response = stub.Score(reward_pb2.ScoreRequest(inputs=[text_input(p, r) for p, r in PROMPTS]), timeout=30)
        for (p, r), result in zip(PROMPTS, response.results):
            assert result.score == pytest.approx(reference.score_text(p + r), abs=1e-5)
        assert response.model_version.startswith("sha-")  # no arbiter.json: content-derived version
        info = common_pb2_grpc.ModelServiceStub(channel).GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=10).info
        assert info.max_tokens == 128


def test_settings_errors_name_the_field(tiny_models):
    with pytest.raises(ConfigError, match="port=70000"):
        RewardSettings(model_dir=str(tiny_models["reward"]), port=70000)
    with pytest.raises(ConfigError, match="max_message_bytes=1048576 is invalid: must be > max_request_bytes"):
        RewardSettings(model_dir=str(tiny_models["reward"]), max_message_bytes=1024 * 1024,
                       sizes=SizeLimits(max_request_bytes=2 * 1024 * 1024))
    with pytest.raises(ConfigError, match="max_item_bytes"):
        RewardSettings(model_dir=str(tiny_models["reward"]), sizes=SizeLimits(max_item_bytes=-1))
    with pytest.raises(ConfigError, match="max_queue_size"):
        RewardSettings(model_dir=str(tiny_models["reward"]), batching=BatchingConfig(max_batch_size=64, max_queue_size=8))
    with pytest.raises(ConfigError, match="model_dir"):
        RewardSettings()


# -- CLI -------------------------------------------------------------------------


def test_arbiter_score_cli(server, reference):
    lines = [
        json.dumps({"prompt": PROMPTS[0][0], "response": PROMPTS[0][1], "id": "a"}),
        "",
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}),
    ]
    done = subprocess.run(
        [sys.executable, "-m", "cli", "score", "--target", server.target],
        input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(rows) == 2 and rows[0]["id"] == "a" and rows[0]["model_version"] == "v0"
    assert rows[0]["score"] == pytest.approx(reference.score_text("".join(PROMPTS[0])), abs=1e-5)
    assert rows[1]["score"] == pytest.approx(reference.score_chat([("user", "hi"), ("assistant", "hello")]), abs=1e-5)

    bad = subprocess.run(
        [sys.executable, "-m", "cli", "score", "--target", server.target],
        input='{"prompt": "x", "response": " ok"}\n{not json\n', capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode == 2 and "arbiter score: <stdin>:2: row: not valid JSON" in bad.stderr
    # A line the service refuses is named by its line, not by its place in a
    # request; every line before it is scored, none after. Lines 5 (too long)
    # and 6 (empty) share a request with line 4: the empty one is found first,
    # then the long one when the lines before 6 are sent again (" the" is one
    # token of the tiny tokenizer; its limit is n_positions = 256).
    good = json.dumps({"prompt": "Say something.", "response": " ok"})
    lines = [good, "", good, good, json.dumps({"response": " the" * 300}), json.dumps({"response": ""}), good]
    refused = subprocess.run(
        [sys.executable, "-m", "cli", "score", "--target", server.target, "--batch-size", "3"],
        input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=120,
    )
    assert refused.returncode == 2, refused.stderr
    assert len(refused.stdout.splitlines()) == 3
    assert refused.stderr == (
        "arbiter score: <stdin>:5: is 300 tokens, over the model's max of 256; shorten it or set --truncation left "
        "(keeps the end) or --truncation right; nothing after this line was scored (3 score(s) were written first)\n"
    )


def test_expired_request_frees_its_batch_slot(tiny_models):
    """A request whose deadline passes while queued is cancelled server-side
    and never reaches the model."""
    settings = RewardSettings(model_dir=str(tiny_models["reward"]), port=0, metrics_port=0)
    with BackgroundServer(lambda: create_server(settings)) as srv, grpc.insecure_channel(srv.target) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        batch_sizes = srv.running.metrics.batch_size.labels("reward")
        batcher = srv.engine.models.get().batcher
        release = hold_model_thread(srv)
        held = stub.Score.future(reward_pb2.ScoreRequest(inputs=[text_input(*PROMPTS[0])]), timeout=30)
        wait_until(lambda: batcher.in_flight == 1, what="the first request's batch to wait for the model",
                   interval_s=0.005)
        # Queued behind it, these three expire.
        expect_error(lambda: stub.Score(reward_pb2.ScoreRequest(inputs=[text_input(*PROMPTS[2])] * 3), timeout=0.2),
                     grpc.StatusCode.DEADLINE_EXCEEDED)
        release()
        assert len(held.result().results) == 1
        ok = stub.Score(reward_pb2.ScoreRequest(inputs=[text_input(*PROMPTS[1])]), timeout=10)
        assert len(ok.results) == 1
        # Only the two live single-item requests were run: the expired three were skipped.
        assert batch_sizes._sum.get() == 2.0
        assert batcher.queue_depth == 0
        text = metrics_text(srv)
        assert 'arbiter_requests_total{code="DEADLINE_EXCEEDED",method="Score",service="reward"} 1.0' in text


def test_a_cancel_at_the_deadline_counts_as_the_deadline():
    """The client cancels when its deadline passes, which the server (whose
    copy of the deadline started when the request arrived) may see a little
    before its own deadline: that is DEADLINE_EXCEEDED, a cancel well before
    it (or without a deadline) CANCELLED."""
    from services.common.handlers import _cancel_code

    class Context:
        def __init__(self, remaining):
            self.remaining = remaining

        def time_remaining(self):
            return self.remaining

    assert _cancel_code(Context(-0.5)) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _cancel_code(Context(0.002)) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _cancel_code(Context(3.0)) == grpc.StatusCode.CANCELLED
    assert _cancel_code(Context(None)) == grpc.StatusCode.CANCELLED


def test_tokenizing_straight_through_the_rust_tokenizer_gives_the_wrappers_ids(tiny_models):
    from arbiter.reward.model import RewardModel

    model = RewardModel.load(tiny_models["reward"])
    eos = model.tokenizer.eos_token
    texts = ["Is this helpful? Yes, very.", f"short{eos}", f"  spaces  and {eos} inside{eos}", "ünïcödé ✓"]
    for text in texts:
        for special in (True, False):
            assert model._token_ids(text, special) == model.tokenizer(text, add_special_tokens=special)["input_ids"]
    # Truncation left set on the Rust tokenizer by another caller: the wrapper (which resets it) is used.
    model.tokenizer._tokenizer.enable_truncation(2)
    whole = model._token_ids(texts[0], True)
    assert len(whole) > 2 and whole == model.tokenizer(texts[0])["input_ids"]
