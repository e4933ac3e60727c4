import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# One intra-op thread in the test process (ARBITER_TEST_TORCH_THREADS to
# change it). Its servers, clients and subprocesses (Triton's model stubs,
# torchrun's ranks) share the two cores with it, and the tiny models' ops are
# too small to split: a second OpenMP thread only waits at every op's barrier
# for a core, which made a tiny forward ~50 ms instead of ~3 ms on a busy
# 2-core machine (the trainer tests sample thousands of them).
TORCH_THREADS = int(os.environ.get("ARBITER_TEST_TORCH_THREADS", "1"))
torch.set_num_threads(TORCH_THREADS)


@pytest.fixture(autouse=True)
def _torch_threads():
    """Each test starts with the session's thread count, whatever the one
    before it set (a command run in-process with --torch-threads, say)."""
    if torch.get_num_threads() != TORCH_THREADS:
        torch.set_num_threads(TORCH_THREADS)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{'policy': Path, 'reward': Path}: tiny HF directories sharing one tokenizer."""
    from arbiter.tiny import make_tiny_models

    return make_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def model_roots(tmp_path_factory):
    """Model roots (``--model-roots``) for servers whose tests load checkpoints
    from their own tmp_path: pytest's base temp directory, which holds them all."""
    return (str(tmp_path_factory.getbasetemp()),)


@pytest.fixture(scope="session")
def policy_dir(tiny_models):
    """The tiny policy's directory: the policy model, and the reference model (RLHF's initial weights)."""
    return tiny_models["policy"]


@pytest.fixture(scope="session")
def hf_policy(policy_dir):
    """The tiny policy as a plain Hugging Face causal LM: the independent
    forward the policy and reference services are checked against."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(policy_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory):
    """A real Kafka-protocol broker (Tansu, in memory) shared by the session.
    Isolate tests with a topic prefix (``kafka_settings``), never by restarting it."""
    from arbiter.stream.broker import LocalBroker

    with LocalBroker(log_path=tmp_path_factory.mktemp("kafka") / "tansu.log") as broker:
        yield broker


@pytest.fixture
def kafka_settings(kafka_broker, request):
    """KafkaSettings for ``kafka_broker`` with topics prefixed per test and a 6 s
    session timeout (Tansu's group join takes ~session_timeout/2)."""
    import re
    import uuid

    prefix = re.sub(r"[^A-Za-z0-9._-]", "-", request.node.name)[:60] + f".{uuid.uuid4().hex[:6]}."
    return kafka_broker.settings(topic_prefix=prefix, session_timeout_ms=6000, client_id="arbiter-test")


# -- Triton (tests/test_triton*.py): one server for the whole session ---------------


@pytest.fixture(scope="session")
def triton_repo(tmp_path_factory):
    """The session's Triton model repository. Each test file exports its own
    models into it under its own names (explicit model control: Triton reads
    a model from disk when it is loaded, so exports after the start work)."""
    return tmp_path_factory.mktemp("triton-repo")


@pytest.fixture(scope="session")
def triton_server(triton_repo, tmp_path_factory):
    """The tritonserver bundled in nvidia-pytriton, run from .venv-triton
    (`make triton-env`), started once on first use and shared by every Triton
    test file. Skipped without .venv-triton unless ARBITER_REQUIRE_TRITON."""
    from pathlib import Path

    venv = Path(__file__).resolve().parents[1] / ".venv-triton"
    if not (venv / "bin" / "python").exists():
        message = f"{venv} is missing: run `make triton-env`"
        if os.environ.get("ARBITER_REQUIRE_TRITON"):
            pytest.fail(message)
        pytest.skip(message)
    from arbiter.backends.triton_local import LocalTriton

    server = LocalTriton(triton_repo, venv=venv, torch_threads=1, log_path=tmp_path_factory.mktemp("triton") / "log")
    server.start(timeout_s=300)
    yield server
    server.stop()


def pytest_sessionfinish(session, exitstatus):
    """A child process a failed test left running must not hold the run open:
    multiprocessing joins its live children when the interpreter exits."""
    import multiprocessing

    for child in multiprocessing.active_children():
        child.kill()
        child.join()
