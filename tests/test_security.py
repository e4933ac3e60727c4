"""Rights and version safety on real servers: the scoring token cannot change
what is served, loads stay inside the allowed model roots, mTLS refuses
untrusted clients, versions that would fail requests are refused, a stuck
load blocks neither scoring nor other loads, metrics carry no client-chosen
labels and settings never print their secrets."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import shutil
import ssl
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from arbiter.errors import PermissionDenied
from arbiter.hf import write_metadata
from arbiter.v1 import common_pb2, common_pb2_grpc, reward_pb2, reward_pb2_grpc
from services.common.model_service import check_model_root
from services.common.server import CONTROL_PLANE, AuthInterceptor
from tests.helpers import BackgroundServer, expect_error, make_pki, metric_value, metrics_text, wait_until

SCORING = "scoring-token-0123456789"
ADMIN = "admin-token-0123456789ab"
LOAD_TIMEOUT_S = 5.0
TEXT = reward_pb2.RewardInput(text=reward_pb2.TextPair(prompt="Hello.", response=" Hi there!"))
LOAD = "/arbiter.v1.ModelService/LoadModelVersion"
SCORE = "/arbiter.v1.RewardService/Score"


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


# -- fixtures -------------------------------------------------------------------


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_models):
    """The servers' model root: copies of the tiny models (each server's
    --model lives here, so its default root is this directory)."""
    path = tmp_path_factory.mktemp("models")
    for name in ("reward", "policy"):
        shutil.copytree(tiny_models[name], path / name)
    return path


@pytest.fixture(scope="module")
def outside(tmp_path_factory, tiny_models):
    """A directory outside every root, holding a valid reward checkpoint."""
    path = tmp_path_factory.mktemp("outside")
    shutil.copytree(tiny_models["reward"], path / "reward")
    return path


def candidate(root: Path, name: str, version: str) -> Path:
    """A copy of the served reward model under another version label."""
    path = root / name
    if not path.exists():
        shutil.copytree(root / "reward", path)
        write_metadata(path, version=version)
    return path


@pytest.fixture(scope="module")
def guarded(root):
    """A reward server with both tokens, default roots, a short load timeout and metrics."""
    from services.reward.server import create_server
    from services.reward.settings import RewardSettings

    settings = RewardSettings(model_dir=str(root / "reward"), port=0, metrics_port=0, auth_token=SCORING,
                              admin_token=ADMIN, load_timeout_s=LOAD_TIMEOUT_S)
    with BackgroundServer(lambda: create_server(settings)) as server:
        yield server


@pytest.fixture(scope="module")
def stubs(guarded):
    with grpc.insecure_channel(guarded.target) as channel:
        yield common_pb2_grpc.ModelServiceStub(channel), reward_pb2_grpc.RewardServiceStub(channel)


def load(models, path, token=ADMIN, version="", activate=False, timeout=60):
    request = common_pb2.LoadModelVersionRequest(path=str(path), version=version, activate=activate)
    return lambda: models.LoadModelVersion(request, metadata=bearer(token), timeout=timeout)


def versions(models) -> list[str]:
    listed = models.ListModelVersions(common_pb2.ListModelVersionsRequest(), metadata=bearer(SCORING), timeout=10)
    return [v.version for v in listed.versions]


def score(reward, version: str = "") -> str:
    request = reward_pb2.ScoreRequest(inputs=[TEXT], options=reward_pb2.ScoreOptions(model_version=version))
    return reward.Score(request, metadata=bearer(SCORING), timeout=10).model_version


# -- two tokens ------------------------------------------------------------------


def test_the_scoring_token_cannot_change_what_is_served(stubs, root):
    models, reward = stubs
    path = candidate(root, "cand", "cand")
    scoring_refused = "the scoring token cannot change what is served"
    expect_error(load(models, path, SCORING), grpc.StatusCode.PERMISSION_DENIED, scoring_refused)
    expect_error(lambda: models.ActivateModelVersion(common_pb2.ActivateModelVersionRequest(version="v0"),
                                                     metadata=bearer(SCORING), timeout=10),
                 grpc.StatusCode.PERMISSION_DENIED, scoring_refused)
    expect_error(lambda: models.UnloadModelVersion(common_pb2.UnloadModelVersionRequest(version="v0"),
                                                   metadata=bearer(SCORING), timeout=10),
                 grpc.StatusCode.PERMISSION_DENIED, scoring_refused)
    expect_error(lambda: reward.SetShadow(reward_pb2.SetShadowRequest(model_version="v0"), metadata=bearer(SCORING),
                                          timeout=10),
                 grpc.StatusCode.PERMISSION_DENIED, scoring_refused)
    # No token or a wrong one: not even told what the RPC needs.
    expect_error(lambda: models.LoadModelVersion(common_pb2.LoadModelVersionRequest(path=str(path)), timeout=10),
                 grpc.StatusCode.UNAUTHENTICATED, "missing or wrong admin token")
    expect_error(load(models, path, "not-the-token-at-all"), grpc.StatusCode.UNAUTHENTICATED)
    expect_error(lambda: reward.Score(reward_pb2.ScoreRequest(inputs=[TEXT]), timeout=10),
                 grpc.StatusCode.UNAUTHENTICATED)
    assert versions(models) == ["v0"]

    # The admin token does all of it, and scores too; the scoring token reads model info.
    assert load(models, path)().info.version == "cand"
    reward.SetShadow(reward_pb2.SetShadowRequest(model_version="cand", sample_fraction=1.0), metadata=bearer(ADMIN),
                     timeout=10)
    reward.SetShadow(reward_pb2.SetShadowRequest(), metadata=bearer(ADMIN), timeout=10)
    models.ActivateModelVersion(common_pb2.ActivateModelVersionRequest(version="cand"), metadata=bearer(ADMIN),
                                timeout=10)
    assert reward.Score(reward_pb2.ScoreRequest(inputs=[TEXT]), metadata=bearer(ADMIN), timeout=10).model_version == "cand"
    models.ActivateModelVersion(common_pb2.ActivateModelVersionRequest(version="v0"), metadata=bearer(ADMIN),
                                timeout=10)
    models.UnloadModelVersion(common_pb2.UnloadModelVersionRequest(version="cand"), metadata=bearer(ADMIN), timeout=10)
    assert versions(models) == ["v0"] and score(reward) == "v0"


def test_rights_without_an_admin_token():
    """The interceptor's rules where no real server is needed: no admin
    token means no control plane once any token is set; without tokens the
    control plane is open on loopback only."""
    sent = f"Bearer {SCORING}".encode()
    scoring_only = AuthInterceptor(SCORING, None, loopback_only=True)
    code, message = scoring_only.verdict(LOAD, sent)
    assert code == grpc.StatusCode.PERMISSION_DENIED and "ARBITER_ADMIN_TOKEN" in message
    assert scoring_only.verdict(SCORE, sent) is None
    assert scoring_only.verdict(LOAD, b"")[0] == grpc.StatusCode.UNAUTHENTICATED

    assert AuthInterceptor(None, None, loopback_only=True).verdict(LOAD, b"") is None
    code, message = AuthInterceptor(None, None, loopback_only=False).verdict(LOAD, b"")
    assert code == grpc.StatusCode.PERMISSION_DENIED and "loopback" in message
    assert AuthInterceptor(None, None, loopback_only=False).verdict(SCORE, b"") is None

    admin_only = AuthInterceptor(None, ADMIN, loopback_only=False)
    assert admin_only.verdict(SCORE, b"") is None
    assert admin_only.verdict(LOAD, f"Bearer {ADMIN}".encode()) is None
    assert admin_only.verdict(LOAD, b"Bearer guess")[0] == grpc.StatusCode.UNAUTHENTICATED
    assert CONTROL_PLANE == {
        LOAD, "/arbiter.v1.ModelService/ActivateModelVersion", "/arbiter.v1.ModelService/UnloadModelVersion",
        "/arbiter.v1.RewardService/SetShadow",
    }


def test_settings_never_print_secrets(root):
    from arbiter.config import ConfigError
    from services.reward.settings import RewardSettings

    settings = RewardSettings(model_dir=str(root / "reward"), auth_token=SCORING, admin_token=ADMIN)
    assert SCORING not in repr(settings) and ADMIN not in repr(settings)
    with pytest.raises(ConfigError, match="admin_token") as info:
        RewardSettings(model_dir=str(root / "reward"), auth_token=SCORING, admin_token=SCORING)
    assert SCORING not in str(info.value)


# -- what may be loaded -----------------------------------------------------------


def test_paths_outside_the_model_roots_are_refused_without_saying_what_exists(stubs, root, outside):
    models, _ = stubs
    (root / "escape").symlink_to(outside / "reward")
    refusals = {}
    for path in (outside / "reward", outside / "missing", root / ".." / outside.name / "reward", root / "escape",
                 "/etc", "/no/such/dir"):
        details = expect_error(load(models, path), grpc.StatusCode.PERMISSION_DENIED, "outside the directories")
        refusals[str(path)] = details.replace(repr(str(path)), "PATH")
    # One answer for existing and missing paths alike.
    assert len(set(refusals.values())) == 1, refusals
    # Where paths come from the topic (the policy follower), a NUL is one more path outside, not a ValueError.
    with pytest.raises(PermissionDenied, match="outside the directories"):
        check_model_root(f"{root}/reward\0x", [root])
    # Inside the root, loads work; a missing path there may say so.
    expect_error(load(models, root / "missing"), grpc.StatusCode.FAILED_PRECONDITION, "does not exist")
    assert versions(models) == ["v0"]


def test_versions_that_would_fail_requests_are_refused(stubs, root):
    from transformers import AutoTokenizer

    models, reward = stubs
    # Two more ids than the embedding has rows: any item using them would fail its whole batch.
    big = candidate(root, "bigtok", "bigtok")
    tokenizer = AutoTokenizer.from_pretrained(str(big))
    tokenizer.add_tokens(["<extra-1>", "<extra-2>"])
    tokenizer.save_pretrained(big)
    expect_error(load(models, big), grpc.StatusCode.FAILED_PRECONDITION,
                 "the tokenizer has 514 ids but the model's embedding has 512 rows", "resize_token_embeddings")
    expect_error(load(models, root / "policy"), grpc.StatusCode.FAILED_PRECONDITION,
                 "is a causal language model (GPT2LMHeadModel), not a reward model", "arbiter train rm")
    assert versions(models) == ["v0"] and score(reward) == "v0"


@pytest.fixture(scope="module")
def lm_servers(root):
    """A reference and a policy server on the tiny policy, in development mode (no tokens, loopback)."""
    from services.policy.server import create_server as create_policy
    from services.policy.settings import PolicySettings
    from services.reference.server import create_server as create_reference
    from services.reference.settings import ReferenceSettings

    model = str(root / "policy")
    with BackgroundServer(lambda: create_reference(ReferenceSettings(model_dir=model, port=0))) as reference, \
            BackgroundServer(lambda: create_policy(PolicySettings(model_dir=model, port=0))) as policy:
        yield reference, policy


def test_lm_services_keep_their_tokenizer_and_architecture_and_refuse_reward_models(lm_servers, root):
    from transformers import AutoTokenizer

    from arbiter.tiny import TinyConfig, make_policy
    from tests.lm_fixtures import other_tokenizer_policy

    other_tokenizer = root / "other-tokenizer"
    if not other_tokenizer.exists():
        other_tokenizer_policy(other_tokenizer)
    deeper = root / "deeper"
    if not deeper.exists():
        make_policy(deeper, TinyConfig(n_layer=3), AutoTokenizer.from_pretrained(str(root / "policy")))
    reference, policy = lm_servers
    for server in lm_servers:
        with grpc.insecure_channel(server.target) as channel:
            models = common_pb2_grpc.ModelServiceStub(channel)
            expect_error(load(models, root / "reward"), grpc.StatusCode.FAILED_PRECONDITION,
                         "is a reward model (GPT2ForSequenceClassification, num_labels=1), not a causal language model")
            expect_error(load(models, other_tokenizer), grpc.StatusCode.FAILED_PRECONDITION,
                         "a new version must keep the tokenizer")
            assert versions(models) == ["v0"]
    with grpc.insecure_channel(reference.target) as channel:
        models = common_pb2_grpc.ModelServiceStub(channel)
        expect_error(load(models, deeper), grpc.StatusCode.FAILED_PRECONDITION,
                     "architecture 'gpt2 vocab_size=512 hidden_size=64 num_hidden_layers=3",
                     "must keep the architecture")
        assert versions(models) == ["v0"]


# -- loads are isolated -------------------------------------------------------------


def _load_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "reward-load"]


def test_a_stuck_load_blocks_neither_scoring_nor_other_loads(stubs, root, caplog):
    models, reward = stubs
    stuck = candidate(root, "fifo", "fifo")
    (stuck / "arbiter.json").unlink()
    os.mkfifo(stuck / "arbiter.json")
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(lambda: expect_error(load(models, stuck, version="late"),
                                                   grpc.StatusCode.DEADLINE_EXCEEDED, "did not finish within 5s"))
        # The loader is blocked in open() on the FIFO once it has a reader;
        # holding a write end open keeps it blocked in read() after that.
        holder = wait_until(lambda: _try_open_writer(stuck / "arbiter.json"), 30, "the load to open the FIFO")
        try:
            for _ in range(3):
                assert score(reward) == "v0"
            pending.result(timeout=LOAD_TIMEOUT_S + 30)
            # The stuck load no longer holds the others up.
            assert load(models, candidate(root, "after", "after"))().info.version == "after"
        finally:
            # Let the abandoned load finish: it gets its JSON, and a regular
            # file in the FIFO's place for its later reads.
            os.write(holder, b'{"version": "late"}')
            (stuck / "regular.json").write_text('{"version": "late"}')
            os.replace(stuck / "regular.json", stuck / "arbiter.json")
            os.close(holder)
        wait_until(lambda: not _load_threads(), 60, "the abandoned load to end")
    # What it loaded was released, never served.
    assert versions(models) == ["v0", "after"]
    assert any("finished after it was abandoned; releasing it" in r.getMessage() for r in caplog.records)
    models.UnloadModelVersion(common_pb2.UnloadModelVersionRequest(version="after"), metadata=bearer(ADMIN),
                              timeout=10)


def _try_open_writer(fifo: Path) -> int | None:
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as err:
        if err.errno == errno.ENXIO:
            return None
        raise


# -- metrics ------------------------------------------------------------------------


def test_metrics_carry_no_client_chosen_version_labels(guarded, stubs, outside):
    models, reward = stubs
    chosen = "attacker-chosen"
    request = reward_pb2.ScoreRequest(inputs=[TEXT], options=reward_pb2.ScoreOptions(model_version=chosen))
    expect_error(lambda: reward.Score(request, metadata=bearer(SCORING), timeout=10), grpc.StatusCode.NOT_FOUND)
    expect_error(lambda: reward.GetScoreDrift(reward_pb2.GetScoreDriftRequest(model_version=chosen),
                                              metadata=bearer(SCORING), timeout=10), grpc.StatusCode.NOT_FOUND)
    expect_error(lambda: reward.SetShadow(reward_pb2.SetShadowRequest(model_version=chosen), metadata=bearer(ADMIN),
                                          timeout=10), grpc.StatusCode.NOT_FOUND)
    stream = reward.ScoreStream(iter([reward_pb2.ScoreStreamRequest(correlation_id="1", inputs=[TEXT],
                                                                    options=request.options)]),
                                metadata=bearer(SCORING), timeout=10)
    assert [r.error.code for r in stream] == [grpc.StatusCode.NOT_FOUND.value[0]]
    expect_error(load(models, outside / "reward", version=chosen), grpc.StatusCode.PERMISSION_DENIED)
    expect_error(load(models, "/tmp", version="bad label\n"), grpc.StatusCode.INVALID_ARGUMENT, "version")
    page = metrics_text(guarded)
    assert chosen not in page and 'model_version="v0"' in page


def test_calls_refused_for_their_token_are_counted_under_their_method_and_code(guarded, stubs):
    models, reward = stubs

    def count(method: str, code: str) -> float:
        return metric_value(guarded, "arbiter_requests_total", service="reward", method=method, code=code) or 0.0

    before = {key: count(*key) for key in (("Score", "UNAUTHENTICATED"), ("LoadModelVersion", "PERMISSION_DENIED"),
                                           ("ScoreStream", "UNAUTHENTICATED"))}
    for token in (None, "not-the-token-at-all"):
        metadata = bearer(token) if token else ()
        expect_error(lambda: reward.Score(reward_pb2.ScoreRequest(inputs=[TEXT]), metadata=metadata, timeout=10),
                     grpc.StatusCode.UNAUTHENTICATED)
    expect_error(load(models, "/tmp", SCORING), grpc.StatusCode.PERMISSION_DENIED)
    stream = reward.ScoreStream(iter([reward_pb2.ScoreStreamRequest(inputs=[TEXT])]), timeout=10)
    expect_error(lambda: list(stream), grpc.StatusCode.UNAUTHENTICATED)
    # A method the server does not have is no label, whatever its name.
    with grpc.insecure_channel(guarded.target) as channel:
        expect_error(lambda: channel.unary_unary("/arbiter.v1.RewardService/attacker-chosen")(b"", timeout=10),
                     grpc.StatusCode.UNIMPLEMENTED)

    assert count("Score", "UNAUTHENTICATED") == before["Score", "UNAUTHENTICATED"] + 2
    assert count("LoadModelVersion", "PERMISSION_DENIED") == before["LoadModelVersion", "PERMISSION_DENIED"] + 1
    assert count("ScoreStream", "UNAUTHENTICATED") == before["ScoreStream", "UNAUTHENTICATED"] + 1
    assert "attacker-chosen" not in metrics_text(guarded)


def test_undecodable_bodies_behind_the_token_check_are_refused_or_invalid_and_log_nothing(guarded, caplog):
    # Handlers are guarded as registered, so the auth interceptor hands on a
    # guarded one: a body that does not parse never raises in grpc's deserializer.
    garbage = b"\xff\xff\xff\xff"  # a tag whose varint never ends
    score = "/arbiter.v1.RewardService/Score"
    with grpc.insecure_channel(guarded.target) as channel, caplog.at_level(logging.INFO):
        expect_error(lambda: channel.unary_unary(score)(garbage, timeout=10), grpc.StatusCode.UNAUTHENTICATED,
                     "missing or wrong bearer token")
        expect_error(lambda: channel.unary_unary(score)(garbage, metadata=bearer(SCORING), timeout=10),
                     grpc.StatusCode.INVALID_ARGUMENT, "request body is not a valid arbiter.v1.ScoreRequest message")
    assert not caplog.records, [r.getMessage() for r in caplog.records]


# -- mTLS ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """Two CAs made here: 'ca' (trusted by the server) signs the server's and
    a client's certificate; 'rogue' signs another client's."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def mtls(root, pki):
    """A reward server requiring client certificates signed by 'ca', with a
    scoring token and no admin token, and its metrics over HTTPS with the same rule."""
    from services.reward.server import create_server
    from services.reward.settings import RewardSettings

    tls = dict(tls_cert_file=str(pki / "server.pem"), tls_key_file=str(pki / "server.key"),
               tls_client_ca_file=str(pki / "ca.pem"))
    settings = RewardSettings(model_dir=str(root / "reward"), port=0, metrics_port=0, auth_token=SCORING, **tls,
                              **{f"metrics_{k}": v for k, v in tls.items()})
    with BackgroundServer(lambda: create_server(settings)) as server:
        yield server


def _client(server, pki: Path, name: str | None):
    from services.reward.client import RewardClient

    cert = dict(tls_cert_file=str(pki / f"{name}.pem"), tls_key_file=str(pki / f"{name}.key")) if name else {}
    return RewardClient(server.target, timeout_s=10, token=SCORING, tls_ca_file=str(pki / "ca.pem"), **cert)


def test_mtls_refuses_an_untrusted_client_certificate(mtls, pki):
    with _client(mtls, pki, "client") as client:
        assert client.score([TEXT]).model_version == "v0"
        # Scoring token, no admin token on this server: no control plane at all.
        expect_error(lambda: client.load_version(str(pki)), grpc.StatusCode.PERMISSION_DENIED,
                     "this server has no admin token")
    for name in ("intruder", None):
        with _client(mtls, pki, name) as client:
            expect_error(lambda: client.score([TEXT]), grpc.StatusCode.UNAVAILABLE)

    url = f"https://127.0.0.1:{mtls.running.metrics_port}/metrics"
    trusted = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    trusted.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
    with urllib.request.urlopen(url, context=trusted, timeout=10) as page:
        assert b"arbiter_model_active" in page.read()
    anonymous = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        with urllib.request.urlopen(url, context=anonymous, timeout=10) as page:
            page.read()


def test_arbiter_score_presents_its_client_certificate_to_an_mtls_server(mtls, pki, monkeypatch, capsys):
    from cli.main import main

    monkeypatch.setenv("ARBITER_AUTH_TOKEN", SCORING)
    command = ["score", "--target", mtls.target, "--timeout", "10", "--tls-ca-file", str(pki / "ca.pem")]

    def score(*flags: str) -> tuple[int, str, str]:
        monkeypatch.setattr("sys.stdin", io.StringIO('{"prompt": "Hello.", "response": " Hi there!"}\n'))
        code = main([*command, *flags])
        out = capsys.readouterr()
        return code, out.out, out.err

    code, out, err = score("--tls-cert-file", str(pki / "client.pem"), "--tls-key-file", str(pki / "client.key"))
    assert code == 0, err
    assert json.loads(out)["model_version"] == "v0"

    code, out, err = score()
    assert (code, out) == (1, ""), err
    assert err.startswith("arbiter score: UNAVAILABLE:") and "--tls-cert-file and --tls-key-file" in err, err
    code, out, err = score("--tls-cert-file", str(pki / "intruder.pem"), "--tls-key-file", str(pki / "intruder.key"))
    assert (code, out) == (1, ""), err
    assert err.startswith("arbiter score: UNAVAILABLE:") and "it trusts the CA of --tls-cert-file" in err, err

    with pytest.raises(SystemExit) as exit:
        score("--tls-cert-file", str(pki / "client.pem"))
    assert exit.value.code == 2
    assert "arbiter score: tls_cert_file/tls_key_file=" in capsys.readouterr().err
