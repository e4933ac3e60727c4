"""Where the weights run and in what precision (``--device``, ``--dtype``):
settings refused up front naming the field, and the services serving
bfloat16 weights on the CPU (torch runs bf16 there) with answers close to
float32's, within a tolerance derived below from bf16's precision. GPU runs
are the same code with another device: see bench/gpu_check.py."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import BackgroundServer, head_tolerance

from arbiter.backends import BackendConfig
from arbiter.backends.placement import Placement
from arbiter.backends.triton_export import ExportError, ExportOptions, model_config
from arbiter.config import ConfigError
from arbiter.lm import completion_logits, forward_step, load_causal_lm, load_causal_weights
from arbiter.reward.model import RewardModel
from arbiter.types import RewardInput, Truncation
from cli.main import main, parse_args
from lm_fixtures import lora_adapter
from services.policy.client import PolicyClient
from services.policy.server import create_server as create_policy_server
from services.policy.settings import PolicySettings
from services.reference.client import ReferenceClient
from services.reference.server import create_server as create_reference_server
from services.reference.server import settings_from_args as reference_settings_from_args
from services.reference.settings import ReferenceSettings
from services.reward.client import RewardClient
from services.reward.server import create_server as create_reward_server
from services.reward.server import settings_from_args as reward_settings_from_args
from services.reward.settings import RewardSettings

BF16 = BackendConfig(dtype="bfloat16")
PAIRS = [
    ("What is the capital of France?", " Paris is the capital."),
    ("Say something nice.", " You are wonderful and kind!"),
    ("", " A response with no prompt at all, a little longer than the others to vary padding."),
]
SEQUENCES = [([280, 462, 406], [293, 427, 79, 12]), ([5], [6, 7, 8, 9, 10, 11, 12, 13])]

def logprob_tolerance(model, dtype: str) -> float:
    """log p(t) = z_t - logsumexp(z), and logsumexp moves by at most the
    largest logit's move: twice the head's tolerance."""
    return 2 * head_tolerance(model.get_output_embeddings().weight, dtype)


def by_hand(hf_model, prompt, completion) -> list[float]:
    """float32, unpadded: log softmax at the positions predicting each completion token."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt + completion])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [float(logprobs[len(prompt) - 1 + k, token]) for k, token in enumerate(completion)]


def check_close(got, want, tolerance: float) -> None:
    """Finite, within ``tolerance`` of float32, and not float32's very numbers
    (the weights really ran in half precision)."""
    got, want = [float(x) for x in got], [float(x) for x in want]
    assert all(math.isfinite(x) for x in got), got
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= tolerance, (got, want, tolerance)
    assert got != pytest.approx(want, abs=1e-6), "identical to float32: the weights did not run in half precision"


# -- settings ------------------------------------------------------------------------


def test_device_and_dtype_are_checked_up_front_naming_the_field():
    def refused(field: str, *fragments: str, **config) -> None:
        with pytest.raises(ConfigError) as caught:
            BackendConfig(**config)
        assert caught.value.field == field
        for fragment in fragments:
            assert fragment in str(caught.value)

    refused("device", "device='tpu' is invalid: must be cpu, cuda, cuda:N or auto", device="tpu")
    refused("device", "must be cpu, cuda, cuda:N or auto", device="cuda:x")
    refused("dtype", "dtype='float64' is invalid: must be one of float32, bfloat16, float16", dtype="float64")
    # A device number this machine lacks, with or without CUDA.
    count = torch.cuda.device_count()
    refused("device", f"device='cuda:{count}' is invalid", device=f"cuda:{count}")
    # Triton runs what was exported: a service-side dtype would be ignored, so it is refused.
    refused("dtype", "arbiter triton export --dtype", kind="triton", triton_url="127.0.0.1:8001", triton_model="rm",
            dtype="bfloat16")
    assert BackendConfig(device="auto").placement() == Placement("cuda" if torch.cuda.is_available() else "cpu")
    assert BackendConfig(dtype="float16").placement() == Placement("cpu", "float16")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_refused_at_start_up(tiny_models, capsys):
    with pytest.raises(ConfigError, match="device='cuda' is invalid: CUDA is not available"):
        BackendConfig(device="cuda")
    # As users start a service: one line and exit 2, not a traceback at the first request.
    assert main(["serve", "reward", "--model", str(tiny_models["reward"]), "--device", "cuda"]) == 2
    assert capsys.readouterr().err.startswith(
        "arbiter serve reward: device='cuda' is invalid: CUDA is not available")


def test_every_service_takes_the_flags(tiny_models):
    for settings_from_args, kind in ((reward_settings_from_args, "reward"), (reference_settings_from_args, "reference")):
        settings = settings_from_args(parse_args(["serve", kind, "--model", str(tiny_models["policy"]),
                                                  "--device", "auto", "--dtype", "bfloat16"]))
        assert (settings.backend.device, settings.backend.dtype) == ("auto", "bfloat16")
    from services.policy.server import settings_from_args as policy_settings_from_args

    settings = policy_settings_from_args(parse_args(["serve", "policy", "--model", str(tiny_models["policy"]),
                                                     "--dtype", "float16"]))
    assert settings.backend.dtype == "float16"
    with pytest.raises(SystemExit):  # argparse: invalid choice, exit 2
        parse_args(["serve", "reward", "--model", "m", "--dtype", "int8"])


def test_export_places_the_triton_model_as_a_service_would_run():
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    def exported(device: str):
        text = model_config("rm", 1, ExportOptions(device=device, dtype="bfloat16", instances=2))
        config = text_format.Parse(text, model_config_pb2.ModelConfig())
        assert config.parameters["dtype"].string_value == "bfloat16"
        return [(g.count, model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind), list(g.gpus))
                for g in config.instance_group]

    assert exported("cpu") == [(2, "KIND_CPU", [])]
    assert exported("cuda") == [(2, "KIND_GPU", [])]
    assert exported("cuda:1") == [(2, "KIND_GPU", [1])]
    assert exported("gpu") == [(2, "KIND_GPU", [])]  # as exports before cuda:N spelled it
    assert exported("auto") == [(2, "KIND_AUTO", [])]
    # Exporting for a GPU needs none here; a misspelt device or dtype is refused.
    for options, message in (({"device": "cuda:x"}, "--device must be cpu, cuda, cuda:N or auto, got 'cuda:x'"),
                             ({"dtype": "int8"}, "--dtype must be one of float32, bfloat16, float16, got 'int8'")):
        with pytest.raises(ExportError, match=message):
            ExportOptions(**options)


# -- the services in bfloat16 ---------------------------------------------------------


def test_reward_service_serves_bfloat16(tiny_models, model_roots):
    reference = RewardModel.load(tiny_models["reward"])
    want = reference.forward([e.token_ids for e in reference.encode([RewardInput(*p) for p in PAIRS], Truncation.LEFT)])
    tolerance = head_tolerance(reference.backend.model.score.weight, "bfloat16")
    settings = RewardSettings(model_dir=str(tiny_models["reward"]), port=0, backend=BF16, model_roots=model_roots)
    with BackgroundServer(lambda: create_reward_server(settings)) as server, RewardClient(server.target) as client:
        info = client.info()
        assert (info.backend, info.device, info.dtype) == ("torch", "cpu", "bfloat16")
        response = client.score([RewardInput(*p) for p in PAIRS], truncation="left")
        check_close([r.raw_score for r in response.results], want, tolerance)
        # The same items scored together (one padded batch) as alone.
        alone = [client.score([RewardInput(*p)], truncation="left").results[0].raw_score for p in PAIRS]
        assert alone == pytest.approx([r.raw_score for r in response.results], abs=tolerance)


def test_reference_service_serves_bfloat16_and_swaps_in_what_the_trainer_publishes(
    policy_dir, hf_policy, model_roots, tmp_path
):
    from trainer.policy_model import PolicyWithValue

    tolerance = logprob_tolerance(hf_policy, "bfloat16")
    settings = ReferenceSettings(model_dir=str(policy_dir), port=0, backend=BF16, model_roots=model_roots)
    with BackgroundServer(lambda: create_reference_server(settings)) as server, \
            ReferenceClient(server.target) as client:
        assert (client.info().device, client.info().dtype) == ("cpu", "bfloat16")
        response = client.logprobs(SEQUENCES)
        for (prompt, completion), result in zip(SEQUENCES, response.results, strict=True):
            check_close(result.logprobs, by_hand(hf_policy, prompt, completion), tolerance)
        # A version as the PPO trainer publishes it (float32 safetensors) loads as bfloat16.
        trained = PolicyWithValue.load(policy_dir)
        with torch.no_grad():
            trained.lm.transformer.h[0].mlp.c_fc.weight.mul_(1.5)
        published = trained.save_policy(tmp_path / "v1", "v1")
        assert next(trained.lm.parameters()).dtype == torch.float32
        info = client.load_version(str(published)).info
        assert (info.version, info.active, info.dtype) == ("v1", True, "bfloat16")
        response = client.logprobs(SEQUENCES)
        assert response.model_version == "v1"
        for (prompt, completion), result in zip(SEQUENCES, response.results, strict=True):
            check_close(result.logprobs, by_hand(trained.lm, prompt, completion), tolerance)


class _Movable:
    """A model as ``Placement.place`` sees one, movable to a device this machine lacks."""

    def __init__(self):
        self.moved_to = None

    def parameters(self):
        return iter([torch.zeros(1)])

    def to(self, target):
        if isinstance(target, torch.device):
            self.moved_to = target
        return self

    def eval(self):
        return self


@pytest.fixture
def cudnn_attention_restored():
    enabled = torch.backends.cuda.cudnn_sdp_enabled()
    yield
    torch.backends.cuda.enable_cudnn_sdp(enabled)


def test_a_model_placed_on_a_gpu_attends_without_cudnn(cudnn_attention_restored):
    """cuDNN's attention plans per input shape, and served shapes vary
    (arbiter.backends.placement.shape_generic_attention): placing on cuda
    turns it off for the process; placing on the CPU leaves the setting alone."""
    torch.backends.cuda.enable_cudnn_sdp(True)
    cpu = _Movable()
    Placement("cpu", "float32").place(cpu)
    assert torch.backends.cuda.cudnn_sdp_enabled()
    gpu = _Movable()
    Placement("cuda:1", "float32").place(gpu)
    assert gpu.moved_to == torch.device("cuda:1")
    assert not torch.backends.cuda.cudnn_sdp_enabled()


def test_cudnn_attention_is_left_to_torch_when_asked(cudnn_attention_restored):
    """``--cudnn-attention``: placing on a GPU leaves PyTorch's choice alone
    (for a workload of few shapes, or to measure the difference)."""
    torch.backends.cuda.enable_cudnn_sdp(True)
    Placement("cuda:1", "float32", cudnn_attention=True).place(_Movable())
    assert torch.backends.cuda.cudnn_sdp_enabled()
    assert BackendConfig(device="auto", cudnn_attention=True).placement().cudnn_attention


def test_cudnn_attention_is_refused_where_it_cannot_apply(tiny_models, capsys):
    with pytest.raises(ConfigError, match=r"cudnn_attention=True is invalid: applies on a GPU \(--device cuda"):
        BackendConfig(cudnn_attention=True)  # the default device: cpu
    with pytest.raises(ConfigError, match="cudnn_attention=True is invalid: applies to the torch backend"):
        BackendConfig(kind="triton", triton_url="127.0.0.1:8001", triton_model="rm", cudnn_attention=True)
    for kind in ("reward", "reference", "policy"):  # every model service takes the flag, and checks it at start-up
        model = tiny_models["reward" if kind == "reward" else "policy"]
        assert main(["serve", kind, "--model", str(model), "--cudnn-attention"]) == 2
        refusal = capsys.readouterr().err
        assert refusal.startswith(f"arbiter serve {kind}: cudnn_attention=True is invalid: applies on a GPU"), refusal


def test_the_policy_load_path_takes_a_placement(policy_dir, hf_policy, tmp_path):
    """What the policy engine loads through (arbiter.lm): weights in bf16, and
    incremental decoding with a KV cache agreeing with one full forward."""
    bf16 = Placement("cpu", "bfloat16")
    loaded = load_causal_lm(policy_dir, kind="policy", placement=bf16)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert (loaded.info.device, loaded.info.dtype) == ("cpu", "bfloat16")
    tolerance = logprob_tolerance(hf_policy, "bfloat16")
    prompt, completion = SEQUENCES[0]
    [full] = completion_logits(loaded.model, 1, [(prompt, completion)])
    steps = []
    with torch.inference_mode():
        ids = torch.tensor([prompt])
        logits, cache = forward_step(loaded.model, ids, torch.ones_like(ids), torch.arange(len(prompt))[None, :])
        steps.append(logits[0, -1])
        for k, token in enumerate(completion[:-1]):
            position = torch.tensor([[len(prompt) + k]])
            mask = torch.ones((1, len(prompt) + k + 1), dtype=torch.long)
            logits, cache = forward_step(loaded.model, torch.tensor([[token]]), mask, position, cache=cache)
            steps.append(logits[0, -1])
    incremental = torch.log_softmax(torch.stack(steps).double(), -1)
    teacher_forced = torch.log_softmax(full.double(), -1)
    assert float((incremental - teacher_forced).abs().max()) <= tolerance
    check_close(teacher_forced.gather(-1, torch.tensor(completion)[:, None])[:, 0].tolist(),
                by_hand(hf_policy, prompt, completion), tolerance)
    # A LoRA adapter (what the trainer publishes with LoRA) is merged in float32, then cast.
    adapter = lora_adapter(policy_dir, tmp_path / "lora")
    model, _ = load_causal_weights(adapter, policy_dir, bf16)
    merged, _ = load_causal_weights(adapter, policy_dir)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    for name, weight in model.named_parameters():
        assert torch.equal(weight, merged.get_parameter(name).to(torch.bfloat16)), name


def test_policy_service_serves_bfloat16(policy_dir, hf_policy, model_roots):
    tolerance = logprob_tolerance(hf_policy, "bfloat16")
    settings = PolicySettings(model_dir=str(policy_dir), port=0, backend=BF16, model_roots=model_roots)
    with BackgroundServer(lambda: create_policy_server(settings)) as server, PolicyClient(server.target) as client:
        assert client.info().dtype == "bfloat16"
        response = client.generate(["The cat sat on"], max_new_tokens=8, temperature=1.0, seed=7, n=2)
        for sample in response.samples:
            check_close(sample.logprobs, by_hand(hf_policy, list(sample.prompt_token_ids),
                                                 list(sample.completion_token_ids)), tolerance)
