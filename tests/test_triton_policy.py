"""The policy served by Triton (``--backend triton``) against a real Triton
Inference Server (the session's ``triton_server``): a decoupled model running
Arbiter's own continuous-batching engine, fronted by the unchanged
PolicyService. Generations are compared with the in-process service serving
the same exported directory."""

import concurrent.futures
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from helpers import Traffic, TritonServiceCase, expect_error, wait_until
from lm_fixtures import lora_adapter, nan_weights, perturbed

from arbiter.backends.triton_export import ExportError, ExportOptions, export
from arbiter.errors import ModelLoadError
from arbiter.config import ConfigError
from arbiter.hf import weights_sha256
from arbiter.policy.scheduler import DecodingConfig
from arbiter.stream import StreamProducer, ensure_topics, topics
from arbiter.v1 import common_pb2, policy_pb2, policy_pb2_grpc, rollout_pb2
from cli.main import parse_args
from services.policy.server import create_server, settings_from_args
from services.policy.settings import PolicySettings

ROOT = Path(__file__).resolve().parents[1]
MODEL = "policy"


@pytest.fixture(scope="module")
def repo(tiny_models, triton_repo, tmp_path_factory):
    """REPO/policy/1 (the tiny policy, exported through the CLI) and
    REPO/policy/2 (its weights perturbed: a trained next version)."""
    done = subprocess.run(
        [sys.executable, "-m", "cli", "triton", "export", "--model", str(tiny_models["policy"]), "--kind", "policy",
         "--out", str(triton_repo), "--name", MODEL, "--torch-threads", "1"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(triton_repo / MODEL / "1")
    second = perturbed(tiny_models["policy"], tmp_path_factory.mktemp("policy-v1") / "v1", version="v1")
    assert export(second, "policy", triton_repo, ExportOptions(name=MODEL)) == triton_repo / MODEL / "2"
    return triton_repo


CASE = TritonServiceCase(MODEL, PolicySettings, create_server, policy_pb2_grpc.PolicyServiceStub, retry_s=2.0)
triton, control, service, in_process, stub, models_stub, in_process_stub = CASE.fixtures()


def request(*prompts, **sampling):
    sampling.setdefault("max_new_tokens", 8)
    return policy_pb2.GenerateRequest(prompts=[policy_pb2.PromptInput(text=p) for p in prompts],
                                      sampling=policy_pb2.SamplingParams(**sampling))


def samples(response):
    return [(s.prompt_index, s.sample_index, list(s.completion_token_ids), list(s.logprobs), s.text,
             s.finish_reason, s.policy_version) for s in response.samples]


def peak_generations(control, *prompts, max_new_tokens=24, joiners=()):
    """Straight to Triton, concurrently: each request's PEAK_GENERATIONS (the
    most requests in the decoding batch at once while it ran). ``joiners``
    (24 new tokens each) are sent once the first request is decoding (its
    first step, streamed, has come back), and their peaks follow the others'."""
    import asyncio

    from arbiter.backends.signatures import POLICY, GenerationRequest

    def generation(i, ids, new_tokens, stream, n=2):
        return GenerationRequest(prompts=[ids], max_new_tokens=new_tokens, temperature=1.0, top_k=0, top_p=1.0,
                                 n=n, seed=i, stream=stream)

    async def one(request, decoding=None):
        peaks, finished = [], []
        async for out in control.stream_async(1, POLICY.pack(request, 0), ["FINISH", "PEAK_GENERATIONS"],
                                               lambda: len(finished) == request.n):
            peaks.append(int(out["PEAK_GENERATIONS"][0]))
            finished += [code for code in out["FINISH"] if code]
            if decoding is not None:
                decoding.set()
        return peaks[-1]

    async def later(decoding):
        await decoding.wait()
        return await asyncio.gather(*(one(generation(100 + i, ids, 24, False))
                                      for i, ids in enumerate(joiners)))

    async def main():
        decoding = asyncio.Event()
        try:
            # With joiners, the first request has 8 samples and lasts until its
            # longest ends (240 steps here): long enough for them to join it.
            first = one(generation(0, prompts[0], max_new_tokens, bool(joiners), 8 if joiners else 2), decoding)
            *peaks, joined = await asyncio.gather(
                first, *(one(generation(i, ids, max_new_tokens, False)) for i, ids in enumerate(prompts[1:], 1)),
                later(decoding))
            return peaks + list(joined)
        finally:
            await control.aclose_stream_client()

    return asyncio.run(main())


# -- export --------------------------------------------------------------------------


def test_export_writes_a_decoupled_model_carrying_the_engine(repo, tiny_models, tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse((repo / MODEL / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert (config.backend, config.max_batch_size, config.model_transaction_policy.decoupled) == ("python", 0, True)
    assert not config.HasField("dynamic_batching")
    assert [i.name for i in config.input] == ["INPUT_IDS", "PROMPT_LENGTHS", "MAX_NEW_TOKENS", "TEMPERATURE",
                                              "TOP_K", "TOP_P", "N", "SEED", "STOP", "STREAM"]
    assert [(o.name, list(o.dims)) for o in config.output] == [
        ("ROWS", [-1]), ("TOKEN_IDS", [-1]), ("LOGPROBS", [-1]), ("FINISH", [-1]), ("PEAK_GENERATIONS", [1])]
    assert config.input[8].data_type == model_config_pb2.TYPE_STRING
    assert config.output[2].data_type == model_config_pb2.TYPE_FP64
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert (params["arbiter_kind"], params["max_batch_rows"], params["max_batch_tokens"]) == ("policy", "256", "262144")
    assert (params["continuous_batching"], params["prefill_chunk_tokens"]) == ("true", "2048")
    assert (params["prefix_cache_tokens"], params["prefix_cache_block_tokens"]) == ("8192", "16")
    assert params["prefill_group_cost_tokens"] == "128"
    version = repo / MODEL / "1"
    assert (version / "engine" / "arbiter" / "policy" / "scheduler.py").read_text() == (
        ROOT / "arbiter" / "policy" / "scheduler.py").read_text()
    assert not (version / "engine" / "arbiter" / "v1").exists()
    assert "decoupled" in (version / "model.py").read_text()
    # Export options are checked, naming the option.
    with pytest.raises(ConfigError, match="max_batch_rows=0"):
        ExportOptions(decoding=DecodingConfig(max_batch_rows=0))
    with pytest.raises(ConfigError, match="prefill_chunk_tokens=-1.*must be >= 0"):
        DecodingConfig(prefill_chunk_tokens=-1)
    done = subprocess.run(
        [sys.executable, "-m", "cli", "triton", "export", "--model", str(tiny_models["policy"]), "--kind", "policy",
         "--out", str(tmp_path), "--max-batch-tokens", "0"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2 and "max_batch_tokens=0" in done.stderr, done.stderr
    with pytest.raises(ModelLoadError, match="is a reward model .* not a causal language model"):
        export(tiny_models["reward"], "policy", tmp_path)
    with pytest.raises(ExportError, match="LoRA adapter; Triton serves full checkpoints"):
        export(lora_adapter(tiny_models["policy"], tmp_path / "lora"), "policy", tmp_path)


def test_settings_refuse_what_the_export_decides(repo):
    path = str(repo / MODEL / "1")
    with pytest.raises(ConfigError, match="max_batch_rows=8.*arbiter triton export --kind policy --max-batch-rows"):
        settings_from_args(parse_args(["serve", "policy", "--model", path, "--backend", "triton", "--triton-url",
                                       "127.0.0.1:8001", "--triton-model", MODEL, "--max-batch-rows", "8"]))
    with pytest.raises(ConfigError, match="dtype='bfloat16'"):
        settings_from_args(parse_args(["serve", "policy", "--model", path, "--backend", "triton", "--triton-url",
                                       "127.0.0.1:8001", "--triton-model", MODEL, "--dtype", "bfloat16"]))


# -- generation through Triton ---------------------------------------------------------


def test_model_info_reports_the_triton_backend(models_stub):
    info = models_stub.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=10).info
    assert (info.backend, info.version, info.device, info.dtype) == ("triton", "v0", "cpu", "float32")


def test_generations_equal_the_in_process_service(stub, in_process_stub):
    """Same seed, same engine: the same tokens, log-probs, text and finish
    reasons as in-process, for sampled, top-k/top-p, greedy, stop strings
    and chat prompts."""
    chat = policy_pb2.PromptInput(conversation=common_pb2.Conversation(messages=[
        common_pb2.ChatMessage(role="user", content="Tell me something")]))
    cases = [
        request("The quick brown", "Once upon a time", n=3, temperature=1.0, seed=11, max_new_tokens=12),
        request("Hello", temperature=0.7, top_k=20, top_p=0.9, seed=5, n=2, stop=["e", "a"]),
        request("Greedy please", temperature=0.0, max_new_tokens=6),
        policy_pb2.GenerateRequest(prompts=[chat], sampling=policy_pb2.SamplingParams(
            temperature=1.0, seed=3, max_new_tokens=5)),
    ]
    for case in cases:
        through_triton, local = stub.Generate(case, timeout=60), in_process_stub.Generate(case, timeout=60)
        assert samples(through_triton) == samples(local)
        assert through_triton.tokenizer_fingerprint == local.tokenizer_fingerprint
    finishes = {s.finish_reason for s in stub.Generate(cases[1], timeout=60).samples}
    assert policy_pb2.FINISH_REASON_STOP in finishes


def test_generate_stream_equals_the_in_process_stream(stub, in_process_stub):
    case = policy_pb2.GenerateStreamRequest(prompt=policy_pb2.PromptInput(text="Stream this"),
                                            sampling=policy_pb2.SamplingParams(n=2, temperature=1.0, seed=9,
                                                                               max_new_tokens=10, stop=["o"]))

    def events(target):
        return [(m.sample_index, list(m.token_ids), list(m.logprobs), m.text_delta, m.finish_reason,
                 list(m.prompt_token_ids), m.policy_version) for m in target.GenerateStream(case, timeout=60)]

    streamed = events(stub)
    assert streamed == events(in_process_stub)
    assert len(streamed) > 2  # token by token, not one message


def test_concurrent_requests_share_decoding_steps_inside_triton(control, stub):
    """Requests arriving through Triton's execute join the running decoding
    batch inside Triton, and a seeded request gives what it gives alone."""
    assert peak_generations(control, [5, 6, 7]) == [1]
    # Once a long request is decoding (its first step has streamed back),
    # five more are sent: they join its batch, whatever the machine's load
    # (sent at once with it, each could finish before the next arrived).
    long, *joined = peak_generations(control, [5, 6, 7], max_new_tokens=240,
                                     joiners=[[5, 6, 8 + i] for i in range(5)])
    assert long >= 2 and max(joined) >= 2, (long, joined)
    alone = [samples(stub.Generate(request(f"prompt {i}", n=2, temperature=1.0, seed=i, max_new_tokens=24),
                                   timeout=60)) for i in range(4)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda i: samples(stub.Generate(
            request(f"prompt {i % 4}", n=2, temperature=1.0, seed=i % 4, max_new_tokens=24), timeout=60)),
            range(8)))
    for i, got in enumerate(together):
        want = alone[i % 4]
        assert [s[:3] for s in got] == [s[:3] for s in want]
        for g, w in zip(got, want):
            assert g[3] == pytest.approx(w[3], abs=1e-5)


def test_bad_requests_get_the_services_statuses(stub):
    expect_error(lambda: stub.Generate(request("x", n=0, top_p=2.0), timeout=30),
                 grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p")
    expect_error(lambda: stub.Generate(request("x", max_new_tokens=100000), timeout=30),
                 grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_new_tokens")
    expect_error(lambda: stub.Generate(request("x", model_version="nope"), timeout=30)
                 if False else stub.Generate(policy_pb2.GenerateRequest(
                     prompts=[policy_pb2.PromptInput(text="x")], model_version="nope"), timeout=30),
                 grpc.StatusCode.NOT_FOUND, "nope")


def test_a_cancelled_stream_frees_its_rows_in_triton(control, stub):
    """A caller that goes away mid-stream cancels its request in Triton:
    its rows leave the decoding batch there (no generation keeps running)."""
    case = policy_pb2.GenerateStreamRequest(prompt=policy_pb2.PromptInput(text="Long one"),
                                            sampling=policy_pb2.SamplingParams(n=4, temperature=1.0, seed=1,
                                                                               max_new_tokens=240))
    call = stub.GenerateStream(case, timeout=60)
    next(call)
    call.cancel()
    # A request alone in the batch again: the cancelled one has left it.
    wait_until(lambda: peak_generations(control, [5, 6], max_new_tokens=1) == [1], 30,
               "the cancelled generation's rows to leave Triton's batch")


# -- versions through Triton's model control ---------------------------------------------


def test_swap_versions_under_load_with_zero_failed_requests(stub, models_stub, control, repo, in_process_stub):
    """Traffic throughout: version 2 loads beside 1, becomes active, 1 is
    unloaded; no request fails, every sample names one version, and a long
    generation started on v0 finishes on v0."""
    case = request("Swap me", n=2, temperature=1.0, seed=4, max_new_tokens=6)
    long_case = request("A long one", n=2, temperature=1.0, seed=8, max_new_tokens=200)
    mixed = []

    def generate():
        response = stub.Generate(case, timeout=60)
        if {s.policy_version for s in response.samples} != {response.policy_version}:
            mixed.append(response)
        return response.policy_version

    with concurrent.futures.ThreadPoolExecutor(1) as pool, Traffic(generate, clients=2) as traffic:
        traffic.wait_for("v0")
        long_run = pool.submit(stub.Generate, long_case, timeout=120)
        assert CASE.swap_version_2_in(traffic, models_stub, control, repo, label="v1") == "v1"
        finished_long = long_run.result()
    assert traffic.failures == []
    assert mixed == []
    assert finished_long.policy_version == "v0"
    assert {s.policy_version for s in finished_long.samples} == {"v0"}
    assert all(len(s.completion_token_ids) == 200 or s.finish_reason == policy_pb2.FINISH_REASON_EOS
               for s in finished_long.samples)
    # v1 is the perturbed checkpoint: it generates what that checkpoint does in-process.
    assert samples(stub.Generate(case, timeout=60))[0][6] == "v1"


def test_a_version_triton_cannot_load_leaves_the_old_one_serving(stub, models_stub, control, repo, tiny_models,
                                                                  tmp_path):
    serving = models_stub.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=10).info.version
    before = control.ready_versions()
    broken = export(nan_weights(tiny_models["policy"], tmp_path / "nan"), "policy", repo,
                    ExportOptions(name=MODEL), write_config=False)
    expect_error(lambda: models_stub.LoadModelVersion(common_pb2.LoadModelVersionRequest(
        path=str(broken), version="broken", activate=True), timeout=300),
        grpc.StatusCode.FAILED_PRECONDITION, "failed to load in Triton", "non-finite")
    assert control.ready_versions() == before
    response = stub.Generate(request("still here", seed=1), timeout=60)
    assert response.policy_version == serving


def test_over_budget_requests_are_refused_with_the_exported_limit(tiny_models, triton_repo, triton):
    """The decoding budget is the exported model's: a request that can never
    fit it is RESOURCE_EXHAUSTED, naming the limit."""
    from helpers import BackgroundServer

    name = "policy-small"
    small = export(tiny_models["policy"], "policy", triton_repo,
                   ExportOptions(name=name, decoding=DecodingConfig(max_batch_tokens=64)))
    case = TritonServiceCase(name, PolicySettings, create_server, policy_pb2_grpc.PolicyServiceStub)
    try:
        with BackgroundServer(lambda: create_server(case.settings(triton_repo, triton, retry_s=2.0))) as server, \
                grpc.insecure_channel(server.target) as channel:
            small_stub = policy_pb2_grpc.PolicyServiceStub(channel)
            expect_error(lambda: small_stub.Generate(request("x", n=4, max_new_tokens=40), timeout=60),
                         grpc.StatusCode.RESOURCE_EXHAUSTED, "max_batch_tokens")
            assert small_stub.Generate(request("x", max_new_tokens=4), timeout=60).samples
    finally:
        import tritonclient.grpc as grpcclient

        with grpcclient.InferenceServerClient(triton.url) as client:
            client.unload_model(name)
        assert small.is_dir()


# -- following the policy-updates topic ------------------------------------------------


def test_a_following_replica_exports_and_loads_each_published_version(tiny_models, triton_repo, triton,
                                                                      kafka_settings, tmp_path):
    """With the Triton backend, a PolicyUpdate's checkpoint becomes a new
    version of the Triton model, beside the serving one, and is activated.
    (A version Triton cannot serve: test_a_version_triton_cannot_load...)"""
    from helpers import BackgroundServer

    name = "policy-follow"
    export(tiny_models["policy"], "policy", triton_repo, ExportOptions(name=name, torch_threads=1))
    ensure_topics(kafka_settings, {topics.POLICY_UPDATES: 1})
    trained = perturbed(tiny_models["policy"], tmp_path / "step1", version="step1")
    case = TritonServiceCase(name, PolicySettings, create_server, policy_pb2_grpc.PolicyServiceStub)
    settings = case.settings(triton_repo, triton, retry_s=2.0, follow_updates=True, kafka=kafka_settings,
                             replica_id="triton-follower", grace_seconds=1.0)
    try:
        with BackgroundServer(lambda: create_server(settings)) as server, \
                grpc.insecure_channel(server.target) as channel:
            policy = policy_pb2_grpc.PolicyServiceStub(channel)
            with StreamProducer(kafka_settings) as producer:
                msg = rollout_pb2.PolicyUpdate(policy_version="step1", checkpoint_path=str(trained),
                                               training_step=1, weights_sha256=weights_sha256(trained))
                msg.created_at.FromNanoseconds(time.time_ns())
                producer.send(topics.POLICY_UPDATES, msg)
                producer.flush()

            def serving():
                return policy.Generate(request("hi", max_new_tokens=2), timeout=60).policy_version

            wait_until(lambda: serving() == "step1", 120, "the published version to serve from Triton")
            # The update became Triton version 2 of the model, beside version 1.
            assert (triton_repo / name / "2" / "checkpoint" / "config.json").is_file()
            with grpc.insecure_channel(server.target) as ch:
                from arbiter.v1 import common_pb2_grpc

                versions = common_pb2_grpc.ModelServiceStub(ch).ListModelVersions(
                    common_pb2.ListModelVersionsRequest(), timeout=10).versions
            assert {v.version for v in versions} == {"v0", "step1"}
            assert serving() == "step1"
    finally:
        import tritonclient.grpc as grpcclient

        with grpcclient.InferenceServerClient(triton.url) as client:
            client.unload_model(name)


def test_model_error_messages_map_to_statuses():
    """A decoupled model's error response carries no status code: the model
    file names it first (``CODE: message``), Triton's own wording is mapped
    as for the reward and reference backends."""
    from arbiter.backends.triton import map_model_error
    from services.common.errors import status_for

    cases = {
        "RESOURCE_EXHAUSTED: 4 samples x 44 = 176 KV-cache tokens ... (max_batch_tokens)":
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        "UNAVAILABLE: the queue ... is full (max_queued_generations); retry with backoff": grpc.StatusCode.UNAVAILABLE,
        "FAILED_PRECONDITION: this version failed to load in Triton: ModelLoadError: NaN": (
            grpc.StatusCode.FAILED_PRECONDITION),
        "INVALID_ARGUMENT: TOP_P must be in (0, 1], got 2.0": grpc.StatusCode.INTERNAL,
        "INTERNAL: generation failed: RuntimeError: boom": grpc.StatusCode.INTERNAL,
        "Request for unknown model: 'policy' version 9 is not found": grpc.StatusCode.UNAVAILABLE,
    }
    for message, code in cases.items():
        status, details = status_for(map_model_error(message, "127.0.0.1:1", MODEL, 9))
        assert status == code, (message, details)
        assert "'policy'" in details
