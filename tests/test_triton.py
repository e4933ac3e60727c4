"""The Triton backend against a real Triton Inference Server: the tritonserver
bundled in nvidia-pytriton, run from .venv-triton (`make triton-env`), started
once per session (``triton_server`` in conftest.py, shared with
test_triton_reference.py). Scores through Triton are compared with the in-process
backend serving the same exported directory."""

import asyncio
import concurrent.futures
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from arbiter.backends import BackendConfig, open_backends
from arbiter.backends.triton import TritonBackends, TritonModel, map_triton_error
from arbiter.backends.triton_export import ExportError, ExportOptions, export
from arbiter.batching import BatchingConfig, DynamicBatcher
from arbiter.errors import BackendError, BackendTimeout, BackendUnavailable, ModelLoadError, Overloaded
from arbiter.reward.backend import REWARD
from arbiter.reward.model import RewardModel
from arbiter.tiny import TinyConfig, make_reward
from arbiter.types import RewardInput, Truncation
from arbiter.v1 import common_pb2, reward_pb2, reward_pb2_grpc
from helpers import Traffic, expect_error, head_tolerance, TritonServiceCase
from services.common.errors import status_for
from arbiter.config import ConfigError
from cli.main import parse_args
from services.reward.server import create_server, settings_from_args
from services.reward.settings import RewardSettings

ROOT = Path(__file__).resolve().parents[1]
MODEL = "rm"
PROMPTS = [
    ("What is the capital of France?", " Paris is the capital."),
    ("Say something nice.", " You are wonderful and kind!"),
    ("", " A response with no prompt at all, a little longer than the others to vary padding."),
    ("Tell me a joke.", " No."),
]


def text_input(prompt, response):
    return reward_pb2.RewardInput(text=reward_pb2.TextPair(prompt=prompt, response=response))




@pytest.fixture(scope="module")
def repo(tiny_models, triton_repo, tmp_path_factory):
    """REPO/rm/1 (the tiny RM, exported through the CLI) and REPO/rm/2 (another seed)."""
    out = triton_repo
    done = subprocess.run(
        [sys.executable, "-m", "cli", "triton", "export", "--model", str(tiny_models["reward"]),
         "--kind", "reward", "--out", str(out), "--name", MODEL, "--torch-threads", "1"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out / MODEL / "1")
    second = make_reward(tmp_path_factory.mktemp("rm-seed7") / "rm", TinyConfig(seed=7), calibrate=False)
    assert export(second, "reward", out, ExportOptions(name=MODEL, torch_threads=1)) == out / MODEL / "2"
    return out


CASE = TritonServiceCase(MODEL, RewardSettings, create_server, reward_pb2_grpc.RewardServiceStub,
                         max_items_per_request=16, batching=BatchingConfig(max_queue_delay_ms=20.0), retry_s=2.0)
triton_settings = CASE.settings
triton, control, service, in_process, stub, models_stub, in_process_stub = CASE.fixtures()


def in_process_scores(checkpoint, pairs):
    model = RewardModel.load(checkpoint)
    encoded = model.encode([RewardInput(p, r) for p, r in pairs], Truncation.LEFT)
    return [model.forward([e.token_ids])[0] for e in encoded]


# -- export --------------------------------------------------------------------------


def test_export_writes_a_versioned_triton_repository(repo, tiny_models):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    for version in ("1", "2"):
        assert (repo / MODEL / version / "model.py").is_file()
        assert (repo / MODEL / version / "checkpoint" / "config.json").is_file()
        assert (repo / MODEL / version / "checkpoint" / "tokenizer.json").is_file()
    config = text_format.Parse((repo / MODEL / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert (config.name, config.backend, config.max_batch_size) == (MODEL, "python", 64)
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert [(g.count, g.kind) for g in config.instance_group] == [(1, model_config_pb2.ModelInstanceGroup.KIND_CPU)]
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("INPUT_IDS", model_config_pb2.TYPE_INT64, [-1]), ("LENGTHS", model_config_pb2.TYPE_INT64, [1]),
    ]
    assert config.input[0].allow_ragged_batch
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [("SCORES", model_config_pb2.TYPE_FP32, [1])]
    assert config.parameters["pad_token_id"].string_value == "1"
    assert not list((repo / MODEL).glob(".staging-*"))


def test_export_refusals_name_the_problem(repo, tiny_models, tmp_path):
    with pytest.raises(ExportError, match="already exists: versions are immutable"):
        export(tiny_models["reward"], "reward", repo, ExportOptions(name=MODEL, version=1))
    with pytest.raises(ModelLoadError, match="is a reward model .* not a causal language model"):
        export(tiny_models["reward"], "policy", tmp_path)
    with pytest.raises(ExportError, match="--kind must be one of"):
        export(tiny_models["reward"], "critic", tmp_path)
    with pytest.raises(ModelLoadError, match="does not exist"):
        export(tmp_path / "missing", "reward", tmp_path)
    with pytest.raises(ModelLoadError, match="num_labels=2"):
        two = tmp_path / "two-labels"
        shutil.copytree(tiny_models["reward"], two)
        text = (two / "config.json").read_text().replace('"LABEL_0": 0', '"LABEL_0": 0, "LABEL_1": 1')
        (two / "config.json").write_text(text.replace('"0": "LABEL_0"', '"0": "LABEL_0", "1": "LABEL_1"'))
        export(two, "reward", tmp_path)
    with pytest.raises(ExportError, match="--device must be cpu, cuda, cuda:N or auto, got .tpu."):
        ExportOptions(device="tpu")


def test_backend_settings_errors_name_the_field(repo):
    path = str(repo / MODEL / "1")
    with pytest.raises(ConfigError, match="backend='onnx'"):
        BackendConfig(kind="onnx")
    with pytest.raises(ConfigError, match="triton_url=''"):
        BackendConfig(kind="triton", triton_model=MODEL)
    with pytest.raises(ConfigError, match="triton_model=''"):
        BackendConfig(kind="triton", triton_url="127.0.0.1:8001")
    with pytest.raises(ConfigError, match="triton_max_in_flight=0"):
        BackendConfig(triton_max_in_flight=0)
    # The same checks reach the command line's settings, nested under the service's.
    with pytest.raises(ConfigError, match="triton_url=''"):
        settings_from_args(parse_args(["serve", "reward", "--model", path, "--backend", "triton"]))


# -- scoring through Triton --------------------------------------------------------------


def test_scores_equal_the_in_process_backend(stub, in_process_stub):
    chat = reward_pb2.RewardInput(conversation=common_pb2.Conversation(messages=[
        common_pb2.ChatMessage(role="user", content="Hello there"),
        common_pb2.ChatMessage(role="assistant", content="Hi! How can I help?"),
    ]))
    request = reward_pb2.ScoreRequest(inputs=[text_input(p, r) for p, r in PROMPTS] + [chat])
    through_triton = stub.Score(request, timeout=30)
    in_process = in_process_stub.Score(request, timeout=30)
    assert (through_triton.model_name, through_triton.model_version) == ("tiny-reward", "v0")
    for a, b in zip(through_triton.results, in_process.results, strict=True):
        assert a.score == pytest.approx(b.score, abs=1e-5)
        assert a.num_tokens == b.num_tokens
    normalized = reward_pb2.ScoreRequest(
        inputs=[text_input(*PROMPTS[1])], options=reward_pb2.ScoreOptions(normalize=True)
    )
    assert stub.Score(normalized, timeout=30).results[0].score == pytest.approx(
        in_process_stub.Score(normalized, timeout=30).results[0].score, abs=1e-4
    )


def test_model_info_reports_the_triton_backend(models_stub, repo):
    info = models_stub.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=10).info
    assert (info.kind, info.name, info.version, info.backend) == ("reward", "tiny-reward", "v0", "triton")
    assert info.source_path == str(repo / MODEL / "1")
    assert info.max_tokens == TinyConfig().n_positions


def test_concurrent_requests_are_batched_and_exact(service, stub, repo):
    texts = [(f"Prompt number {i}.", " word" * (1 + i % 7)) for i in range(24)]
    expected = in_process_scores(repo / MODEL / "1" / "checkpoint", texts)
    batches = service.running.metrics.batch_size.labels("reward")

    def batch_count():
        return sum(bucket.get() for bucket in batches._buckets)

    before = batch_count()
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        responses = list(
            pool.map(lambda t: stub.Score(reward_pb2.ScoreRequest(inputs=[text_input(*t)]), timeout=30), texts)
        )
    for response, score in zip(responses, expected):
        assert response.results[0].score == pytest.approx(score, abs=1e-5)
    assert batch_count() - before < 24 / 2, "concurrent requests were not batched"


def test_async_batches_overlap_up_to_max_in_flight():
    """Unit test of the batcher's remote mode (a fake remote model)."""

    async def scenario():
        running, peak = 0, 0

        async def remote(items):
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.05)
            running -= 1
            return [x * 2 for x in items]

        batcher = DynamicBatcher(remote, BatchingConfig(max_batch_size=2, max_queue_delay_ms=0), None, max_in_flight=3)
        results = await asyncio.gather(*(batcher.submit([i]) for i in range(12)))
        await batcher.close()
        return results, peak

    results, peak = asyncio.run(scenario())
    assert results == [[2 * i] for i in range(12)]
    assert peak == 3


# -- versions through Triton's model control ---------------------------------------------


def test_swap_versions_with_zero_failed_requests(stub, models_stub, control, repo):
    """Load Triton version 2 beside 1, switch Arbiter's traffic, unload 1,
    while a client scores continuously: no request fails."""
    pair = PROMPTS[1]
    expected = {
        "v0": in_process_scores(repo / MODEL / "1" / "checkpoint", [pair])[0],
        "v1": in_process_scores(repo / MODEL / "2" / "checkpoint", [pair])[0],
    }
    request = reward_pb2.ScoreRequest(inputs=[text_input(*pair)])
    wrong = []

    def score():
        response = stub.Score(request, timeout=30)
        if abs(response.results[0].score - expected[response.model_version]) > 1e-5:
            wrong.append(response)
        return response.model_version

    with Traffic(score) as traffic:
        assert CASE.swap_version_2_in(traffic, models_stub, control, repo, label="v1") == "v1"
    assert traffic.failures == []
    assert wrong == []
    versions = models_stub.ListModelVersions(common_pb2.ListModelVersionsRequest(), timeout=10).versions
    assert [(v.version, v.active, v.source_path) for v in versions] == [("v1", True, str(repo / MODEL / "2"))]


def test_versions_triton_cannot_serve_are_refused_and_nothing_changes(models_stub, stub, control, repo, tiny_models):
    def load(path, version="bad"):
        return lambda: models_stub.LoadModelVersion(
            common_pb2.LoadModelVersionRequest(path=str(path), version=version, activate=True), timeout=300
        )

    before = control.ready_versions()
    expect_error(
        load(tiny_models["reward"]), grpc.StatusCode.FAILED_PRECONDITION, "not a version directory", "REPO/NAME/N"
    )
    other = export(tiny_models["reward"], "reward", repo, ExportOptions(name="other"))
    expect_error(load(other), grpc.StatusCode.FAILED_PRECONDITION, "version of Triton model 'other'", "--triton-model")
    # Weights Triton's model cannot load: Triton's own error, passed on.
    broken = export(tiny_models["reward"], "reward", repo, ExportOptions(name=MODEL, torch_threads=1))
    (broken / "checkpoint" / "model.safetensors").write_bytes(b"not a safetensors file")
    expect_error(load(broken), grpc.StatusCode.FAILED_PRECONDITION, "could not load model 'rm'")
    # Loads in Triton but scores NaN: refused by the probe, and unloaded again.
    nan_dir = export(tiny_models["reward"], "reward", repo, ExportOptions(name=MODEL, torch_threads=1))
    from safetensors.torch import load_file, save_file

    weights = load_file(nan_dir / "checkpoint" / "model.safetensors")
    weights = {k: torch.full_like(v, float("nan")) if k.startswith("score") else v for k, v in weights.items()}
    save_file(weights, nan_dir / "checkpoint" / "model.safetensors", metadata={"format": "pt"})
    expect_error(load(nan_dir), grpc.StatusCode.FAILED_PRECONDITION, "non-finite")
    assert control.ready_versions() == before
    info = models_stub.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=10).info
    assert info.version == "v1"
    assert len(stub.Score(reward_pb2.ScoreRequest(inputs=[text_input(*PROMPTS[0])]), timeout=30).results) == 1


def test_a_triton_model_with_other_tensors_is_refused(triton, repo, tiny_models):
    odd = export(tiny_models["reward"], "reward", repo, ExportOptions(name="odd"))
    config = repo / "odd" / "config.pbtxt"
    config.write_text(config.read_text().replace('name: "SCORES"', 'name: "LOGITS"'))
    backends = TritonBackends(BackendConfig(kind="triton", triton_url=triton.url, triton_model="odd"), REWARD)
    try:
        with pytest.raises(ModelLoadError, match="has no output 'SCORES'"):
            backends.open(odd, version=None, max_tokens=None)
        assert backends.server.ready_versions() == set()
    finally:
        asyncio.run(backends.aclose())


def test_a_bfloat16_export_serves_through_triton(triton, repo, tiny_models):
    """Exported with --dtype bfloat16 (and --device auto: Triton's KIND_AUTO):
    Triton runs the weights in bf16, answers float32 scores close to
    float32's, and the service's ModelInfo says where and how it runs."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    version_dir = export(tiny_models["reward"], "reward", repo,
                         ExportOptions(name="rm-bf16", device="auto", dtype="bfloat16", torch_threads=1))
    config = text_format.Parse((repo / "rm-bf16" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_AUTO]
    assert config.parameters["dtype"].string_value == "bfloat16"
    pairs = [RewardInput(p, r) for p, r in PROMPTS]
    float32 = RewardModel.load(version_dir)
    items = [e.token_ids for e in float32.encode(pairs, Truncation.LEFT)]
    want = float32.forward(items)
    in_process = RewardModel.load(version_dir, backends=open_backends(BackendConfig(dtype="bfloat16"), REWARD))
    backends = TritonBackends(BackendConfig(kind="triton", triton_url=triton.url, triton_model="rm-bf16"), REWARD)
    try:
        served = RewardModel.load(version_dir, backends=backends)
        assert (served.info.backend, served.info.dtype) == ("triton", "bfloat16")
        # Where Triton put it: KIND_AUTO resolved when it loaded (the CPU, on a machine without CUDA).
        assert served.info.device == "cpu" or torch.cuda.is_available()
        got = served.forward(items)
        tolerance = head_tolerance(float32.backend.model.score.weight, "bfloat16")
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= tolerance
        assert got != pytest.approx(want, abs=1e-6), "identical to float32: Triton did not run bf16 weights"
        # The same computation as the in-process backend in bf16 (one padded batch, the same torch).
        assert got == pytest.approx(in_process.forward(items), abs=1e-6)
        served.release()
        assert backends.server.ready_versions() == set()
    finally:
        asyncio.run(backends.aclose())


def test_a_compiled_export_serves_through_triton_as_the_eager_forward(triton, repo, tiny_models):
    """Exported with --compile: Triton's model compiles its forward and warms
    every graph up while the version loads; the scores are the eager
    in-process forward's to float32 rounding, batches of one row and of
    several, one token and many, and ModelInfo says it runs compiled."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    version_dir = export(tiny_models["reward"], "reward", repo,
                         ExportOptions(name="rm-compiled", compile=True, torch_threads=1))
    config = text_format.Parse((repo / "rm-compiled" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.parameters["compile"].string_value == "true"
    eager = RewardModel.load(version_dir)
    items = [e.token_ids for e in eager.encode([RewardInput(p, r) for p, r in PROMPTS], Truncation.LEFT)]
    backends = TritonBackends(BackendConfig(kind="triton", triton_url=triton.url, triton_model="rm-compiled"), REWARD)
    try:
        served = RewardModel.load(version_dir, backends=backends)
        assert served.info.extra.get("compiled") == "true" and served.info.backend == "triton"
        for batch in (items, items[:1], [[7]], [[7], [5, 9, 11]]):
            assert served.forward(batch) == pytest.approx(eager.forward(batch), abs=1e-5)
        served.release()
    finally:
        eager.release()
        asyncio.run(backends.aclose())
    with pytest.raises(ExportError, match="--compile applies to --kind reward and reference"):
        export(tiny_models["policy"], "policy", repo, ExportOptions(name="policy-compiled", compile=True))


# -- errors from Triton -> clear statuses --------------------------------------------------


def test_triton_failures_map_to_clear_statuses(triton, control):
    [version] = control.ready_versions()
    ids = np.array([[5, 6, 7, 1]], dtype=np.int64)
    lengths = np.array([[3]], dtype=np.int64)

    def status(err):
        code, message = status_for(err)
        return code, message

    with TritonModel(triton.url, MODEL, timeout_s=1e-5, retry_s=0) as hurried:
        with pytest.raises(BackendTimeout) as timeout:
            hurried.infer(version, {"INPUT_IDS": ids, "LENGTHS": lengths}, ["SCORES"])
    assert status(timeout.value) == (grpc.StatusCode.DEADLINE_EXCEEDED, str(timeout.value))
    assert "did not answer in time" in str(timeout.value)

    with pytest.raises(BackendError) as mismatch:  # int32 ids: not what the model declares
        control.infer(version, {"INPUT_IDS": ids.astype(np.int32), "LENGTHS": lengths}, ["SCORES"])
    assert status(mismatch.value)[0] == grpc.StatusCode.INTERNAL
    assert "rejected the tensors" in str(mismatch.value) and "arbiter triton export" in str(mismatch.value)

    with pytest.raises(BackendError, match="LENGTHS must be in 1..4"):  # the model's own check
        control.infer(version, {"INPUT_IDS": ids, "LENGTHS": np.array([[9]], dtype=np.int64)}, ["SCORES"])

    started = time.monotonic()
    with TritonModel("127.0.0.1:9", MODEL, retry_s=0.5) as nowhere:
        with pytest.raises(BackendUnavailable) as down:
            nowhere.infer(1, {"INPUT_IDS": ids, "LENGTHS": lengths}, ["SCORES"])
    assert time.monotonic() - started >= 0.25, "UNAVAILABLE was not retried"
    assert status(down.value)[0] == grpc.StatusCode.UNAVAILABLE
    assert "Triton at 127.0.0.1:9 is unavailable" in str(down.value)

    busy = map_triton_error("StatusCode.RESOURCE_EXHAUSTED", "queue full", "h:1", MODEL, 2)
    assert isinstance(busy, Overloaded) and status(busy)[0] == grpc.StatusCode.UNAVAILABLE
    gone = map_triton_error("StatusCode.NOT_FOUND", "Request for unknown model: 'rm' is not found", "h:1", MODEL, 2)
    assert isinstance(gone, BackendUnavailable) and "model 'rm' version 2 is not loaded" in str(gone)


def test_a_triton_restart_is_survived(triton, stub, control):
    """Down: requests fail UNAVAILABLE with a clear message (after retrying).
    Back with nothing loaded: the service reloads its version and serves."""
    request = reward_pb2.ScoreRequest(inputs=[text_input(*PROMPTS[2])])
    before = stub.Score(request, timeout=30).results[0].score
    triton.stop()
    expect_error(lambda: stub.Score(request, timeout=30), grpc.StatusCode.UNAVAILABLE, f"Triton at {triton.url}")
    triton.start(timeout_s=300)
    with TritonModel(triton.url, MODEL) as fresh:  # explicit model control: nothing loaded after a restart
        assert fresh.ready_versions() == set()
    errors = []
    deadline = time.monotonic() + 240
    while True:
        try:
            after = stub.Score(request, timeout=30).results[0].score
            break
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
            errors.append(err.details())
            assert time.monotonic() < deadline, errors[-1]
            time.sleep(0.5)
    assert after == pytest.approx(before, abs=1e-6)
    with TritonModel(triton.url, MODEL) as fresh:
        assert fresh.ready_versions() == {2}
    assert all("reloaded" in e or "unavailable" in e or "not loaded" in e for e in errors), errors
