import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Two cores are shared by servers, clients and the test process.
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{'policy': Path, 'reward': Path}: tiny HF directories sharing one tokenizer."""
    from arbiter.tiny import make_tiny_models

    return make_tiny_models(tmp_path_factory.mktemp("tiny-models"))


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
