"""A reward model trained by TRL, served by Arbiter: scored on exactly the text
TRL's RewardTrainer trained it on.

TRL is not a project dependency, so its preprocessing is reproduced here by
hand from its source (TRL 1.16.0, ``trl/trainer/reward_trainer.py`` and
``trl/data_utils.py``), and the served scores are compared with a plain
transformers forward of that input. The checkpoints carry the files TRL leaves
in its output directory (``training_args.bin``, the model card), which is how
Arbiter tells a TRL checkpoint from any other.
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import sys
import types

import grpc
import pytest
import torch
from helpers import BackgroundServer
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from arbiter.errors import InvalidInput, ModelLoadError
from arbiter.reward.convention import resolve_text_convention, trl_reward_checkpoint
from arbiter.reward.model import RewardModel
from arbiter.types import RewardInput, Truncation
from arbiter.v1 import common_pb2, common_pb2_grpc, reward_pb2, reward_pb2_grpc
from cli.main import main as cli_main
from services.reward.server import create_server
from services.reward.settings import RewardSettings

EOS = "<|endoftext|>"  # arbiter.tiny's end token
# (prompt, response): with and without a prompt (TRL's explicit and implicit
# prompt formats), lengths that make the batch pad, and a response that
# already ends with the end token (TRL does not append it twice).
PAIRS = [
    ("What is the capital of France?", " Paris is the capital."),
    ("Say something nice.", " You are wonderful and kind!"),
    ("", "A response with no prompt at all, a little longer than the others, to vary the padding."),
    ("Tell me a joke.", " No." + EOS),
]
CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, how can I help?"}]


def trl_scores(model_dir, pairs=PAIRS, conversations=()):
    """TRL 1.16's RewardTrainer input for these texts, scored by the model:
    - ``RewardTrainer._prepare_dataset`` (reward_trainer.py L675-694): for
      non-conversational data, ``add_eos`` appends ``processing_class.eos_token``
      to the response unless it already ``endswith`` it; conversational data
      gets nothing appended;
    - ``tokenize_fn`` (L700-725): ``prompt + response``, tokenized by
      ``data_utils._tokenize`` (L432-434: ``processing_class(text=input)``,
      i.e. with the tokenizer's special tokens); a conversation through
      ``apply_chat_template(tokenize=True, return_dict=True)`` (L429-431);
    - ``DataCollatorForPreference.torch_call`` (L205-230): right padding with
      ``pad_token_id`` and an attention mask of the real tokens;
    - ``compute_loss`` (L776-783): the reward is the model's logit
      (``outputs.logits.squeeze(-1)``), pooled by transformers at the last
      non-pad token.
    """
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    sequences = []
    for prompt, response in pairs:
        if not response.endswith(tokenizer.eos_token):
            response = response + tokenizer.eos_token
        sequences.append(tokenizer(text=prompt + response)["input_ids"])
    for messages in conversations:
        sequences.append(list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]))
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), tokenizer.pad_token_id)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1).tolist()


def plain_scores(model_dir, pairs=PAIRS):
    """The same model on prompt + response as given (no end token)."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        return [float(model(**tokenizer(p + r, return_tensors="pt")).logits[0, 0]) for p, r in pairs]


def write_training_args(path, monkeypatch, *, with_eos_field=True, module="trl.trainer.reward_config",
                        name="RewardConfig"):
    """``training_args.bin`` as ``Trainer.save_model`` writes it: ``torch.save``
    of the config dataclass (a zip holding its pickle). The class is defined
    under TRL's module name for the dump only; the reader never unpickles."""
    fields = [("output_dir", str, "trl-rm"), ("learning_rate", float, 1e-4)]
    if with_eos_field:  # RewardConfig has it since TRL 0.24
        fields.append(("eos_token", str | None, None))
    config_class = dataclasses.make_dataclass(name, fields)
    config_class.__module__ = module
    parts = module.split(".")
    for i in range(1, len(parts) + 1):
        monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    setattr(sys.modules[module], name, config_class)
    torch.save(config_class(), path / "training_args.bin")
    for i in range(1, len(parts) + 1):
        monkeypatch.delitem(sys.modules, ".".join(parts[:i]))


MODEL_CARD = """---
library_name: transformers
model_name: trl-rm
tags:
- generated_from_trainer
- reward-trainer
- trl
licence: license
---

# Model Card for trl-rm

### Framework versions

- TRL: {version}
- Transformers: 5.24.0
"""


def bare_copy(tiny_reward, path):
    """The tiny reward model's weights and tokenizer, without arbiter.json."""
    shutil.copytree(tiny_reward, path, ignore=shutil.ignore_patterns("arbiter.json"))
    return path


@pytest.fixture(scope="module")
def checkpoints(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("trl")
    with pytest.MonkeyPatch.context() as monkeypatch:
        trl = bare_copy(tiny_models["reward"], root / "trl-rm")
        write_training_args(trl, monkeypatch)
    unmarked = bare_copy(tiny_models["reward"], root / "weights-only")
    declared = bare_copy(tiny_models["reward"], root / "declared-plain")
    shutil.copy(trl / "training_args.bin", declared / "training_args.bin")
    (declared / "arbiter.json").write_text(json.dumps({"version": "declared", "text_convention": {"append_eos": False}}))
    return {"trl": trl, "unmarked": unmarked, "declared": declared}


def text_input(prompt, response):
    return reward_pb2.RewardInput(text=reward_pb2.TextPair(prompt=prompt, response=response))


def chat_input(messages):
    return reward_pb2.RewardInput(conversation=common_pb2.Conversation(
        messages=[common_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages]))


def test_served_trl_checkpoints_match_trl_scoring(checkpoints, tiny_models):
    """One server, three ways to know the convention: the flag (weights
    without TRL's files), detection (LoadModelVersion of a TRL output
    directory), and arbiter.json, which wins over both."""
    expected = trl_scores(checkpoints["trl"], conversations=[CHAT])
    plain = plain_scores(checkpoints["trl"])
    # The end token matters to this model: a server ignoring it would fail.
    assert max(abs(a - b) for a, b in zip(expected, plain)) > 0.05
    settings = RewardSettings(model_dir=str(checkpoints["unmarked"]), port=0, text_convention="append_eos")
    with BackgroundServer(lambda: create_server(settings)) as server, grpc.insecure_channel(server.target) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        models = common_pb2_grpc.ModelServiceStub(channel)
        request = reward_pb2.ScoreRequest(inputs=[text_input(*pair) for pair in PAIRS] + [chat_input(CHAT)])

        def served(version=""):
            request.options.model_version = version
            return [r.raw_score for r in stub.Score(request, timeout=30).results]

        assert served() == pytest.approx(expected, abs=1e-5)
        trl = models.LoadModelVersion(common_pb2.LoadModelVersionRequest(
            path=str(checkpoints["trl"]), version="trl", activate=False), timeout=60).info
        assert served(trl.version) == pytest.approx(expected, abs=1e-5)
        assert server.engine.models.get("trl").model.text_convention.append_eos
        models.LoadModelVersion(common_pb2.LoadModelVersionRequest(
            path=str(checkpoints["declared"]), activate=False), timeout=60)
        assert served("declared")[: len(PAIRS)] == pytest.approx(plain, abs=1e-5)

        # First contact with `arbiter score --normalize`: a TRL checkpoint
        # ships no statistics, and the error speaks of the flag.
        code, err = run_score(server.target, ["--normalize", "--model-version", "trl"], '{"response": " hi"}\n')
        assert code == 2 and err.startswith("arbiter score: --normalize: model version 'trl' ships no normalization")
        assert "drop --normalize" in err and "options.normalize" not in err
        # A refused line is named by its line and its JSON field.
        code, err = run_score(server.target, [], '{"response": " hi"}\n{"prompt": "x", "response": ""}\n')
        assert code == 2 and err == ("arbiter score: <stdin>:2: response: is empty; there is nothing to score; "
                                     "nothing after this line was scored (1 score(s) were written first)\n")


def run_score(target, flags, stdin):
    """``arbiter score`` in this process: (exit status, stderr)."""
    old_in, old_err = sys.stdin, sys.stderr
    sys.stdin, sys.stderr = io.StringIO(stdin), io.StringIO()
    try:
        code = cli_main(["score", "--target", target, *flags])
        return code, sys.stderr.getvalue()
    finally:
        sys.stdin, sys.stderr = old_in, old_err


def test_truncation_keeps_the_end_token_and_counts_it(checkpoints):
    model = RewardModel.load(checkpoints["trl"], max_tokens=6)
    eos_id = model.tokenizer.eos_token_id
    response = " the quick brown fox jumps over the lazy dog"
    text = model.tokenizer(response)["input_ids"]
    assert len(text) > 6
    item = RewardInput(prompt="", response=response)
    [right] = model.encode([item], Truncation.RIGHT)
    [left] = model.encode([item], Truncation.LEFT)
    # The model reads its score at the end token: truncation cuts the text before it.
    assert right.token_ids == text[:5] + [eos_id] and right.truncated
    assert left.token_ids == text[-5:] + [eos_id] and left.truncated
    # Text of exactly max_tokens is one token too long once the end token is counted.
    exact = model.with_info(max_tokens=len(text))
    with pytest.raises(InvalidInput, match=f"is {len(text) + 1} tokens, over the model's max of {len(text)}"):
        exact.encode([item], Truncation.REJECT)


def test_trl_checkpoints_are_detected_by_their_files(checkpoints, tmp_path, monkeypatch):
    assert trl_reward_checkpoint(checkpoints["trl"]) == (True, "training_args.bin is TRL's RewardConfig")
    assert trl_reward_checkpoint(checkpoints["unmarked"]) is None
    # Before TRL 0.24 RewardConfig had no eos_token field, and no end token was appended.
    old = tmp_path / "old"
    old.mkdir()
    write_training_args(old, monkeypatch, with_eos_field=False)
    assert trl_reward_checkpoint(old) == (False, "training_args.bin is TRL's RewardConfig from before TRL 0.24")
    # Another trainer's arguments, or a file that is no torch archive, say nothing.
    sft = tmp_path / "sft"
    sft.mkdir()
    write_training_args(sft, monkeypatch, module="trl.trainer.sft_config", name="SFTConfig")
    assert trl_reward_checkpoint(sft) is None
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "training_args.bin").write_bytes(b"\x80\x02not a zip")
    assert trl_reward_checkpoint(tmp_path / "junk") is None
    # The model card TRL writes to its output directory, for output_dir/checkpoint-N too, dated.
    out = tmp_path / "out"
    (out / "checkpoint-15").mkdir(parents=True)
    for version, appends in (("1.16.0", True), ("0.23.1", False)):
        (out / "README.md").write_text(MODEL_CARD.format(version=version))
        found = trl_reward_checkpoint(out / "checkpoint-15")
        assert found == (appends, f"{out / 'README.md'} is TRL's RewardTrainer model card (TRL {version})")
    (out / "README.md").write_text(MODEL_CARD.format(version="1.16.0").replace("- reward-trainer\n", ""))
    assert trl_reward_checkpoint(out / "checkpoint-15") is None


def test_arbiter_json_declares_the_convention(checkpoints, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoints["trl"]))
    declared = resolve_text_convention(checkpoints["declared"], tokenizer, "append_eos")
    assert not declared.append_eos and declared.source == "arbiter.json"
    flagged = resolve_text_convention(checkpoints["trl"], tokenizer, "plain")
    assert not flagged.append_eos and flagged.source == "--text-convention plain"
    assert not resolve_text_convention(checkpoints["unmarked"], tokenizer).append_eos
    bad = bare_copy(checkpoints["unmarked"], tmp_path / "bad")
    for value in ({"append_eos": "yes"}, {"append_eos": True, "strip": True}, True):
        (bad / "arbiter.json").write_text(json.dumps({"text_convention": value}))
        with pytest.raises(ModelLoadError, match=r"arbiter.json: text_convention must be \{\"append_eos\": true\}"):
            resolve_text_convention(bad, tokenizer)


def test_serve_reward_on_a_causal_lm_says_what_it_is(tiny_models, capsys):
    code = cli_main(["serve", "reward", "--model", str(tiny_models["policy"]), "--port", "0"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"arbiter serve reward: '{tiny_models['policy']}' is a causal language model "
                          "(GPT2LMHeadModel), not a reward model (sequence classification with one label); "
                          "train one from it with `arbiter train rm`"), err


def test_serve_on_a_busy_port_says_so_before_loading(tiny_models, capsys, tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # A directory that is no checkpoint: the port is checked before any load.
        for flags, flag in ((["--port", str(port)], "--port"), (["--port", "0", "--metrics-port", str(port)],
                                                                "--metrics-port")):
            code = cli_main(["serve", "reward", "--model", str(tmp_path), *flags])
            err = capsys.readouterr().err
            assert code == 1 and err == (f"arbiter serve reward: 127.0.0.1:{port} is already in use (is another "
                                         f"server running there?); choose another port with {flag}\n")
