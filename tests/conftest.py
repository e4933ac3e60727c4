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
