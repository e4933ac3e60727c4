"""Policy versions through object storage (arbiter/weights), against a real
S3-protocol server (the project's own: moto's server mirrored to disk,
arbiter/stream/objectstore.py) and a real policy gRPC server following a real
Kafka-protocol broker: round trips, multipart, sha256 refusals, interrupted
uploads, deltas and their parents, bf16 transport, and the follower's swap."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from helpers import BackgroundServer, sample_value, wait_until

from arbiter.hf import weights_sha256
from arbiter.stream import StreamProducer, ensure_topics, topics
from arbiter.stream.objectstore import LocalObjectStore
from arbiter.weights import (
    PARENT,
    ParentVersion,
    PublishSettings,
    StoreError,
    TransferSettings,
    WeightsError,
    download_version,
    fetch_version,
    open_store,
    publish_version,
)
from services.policy.client import PolicyClient
from services.policy.server import create_server
from services.policy.settings import PolicySettings
from trainer.convert import policy_update
from trainer.policy_model import PolicyWithValue
from trainer.publish import BackgroundPublisher, Snapshot, to_bf16

BUCKET = "weights"
PROMPT = "The quick brown"
MiB = 1 << 20


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """The local object store with a weights bucket; the environment points
    boto3 at it as a deployment would (AWS_* variables, AWS_ENDPOINT_URL)."""
    root = tmp_path_factory.mktemp("s3")
    store = LocalObjectStore(root / "data", root / "store.log", buckets=[BUCKET]).start()
    with pytest.MonkeyPatch.context() as env:
        for name, value in store.env().items():
            env.setenv(name, value)
        env.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        env.delenv("AWS_PROFILE", raising=False)
        yield store
    store.stop()


@pytest.fixture(scope="module")
def policy(tiny_models):
    return PolicyWithValue.load(tiny_models["policy"])


def write_version(policy: PolicyWithValue, root: Path, version: str, tensors: dict[str, torch.Tensor]) -> Path:
    # A copy of the mapping: save_pretrained empties the state dict it is given.
    return policy.save_policy(root / version, version, dict(tensors))


def moved(tensors: dict[str, torch.Tensor], only: str | None = None, seed: int = 1) -> dict[str, torch.Tensor]:
    """A 'trained' next version: tensors (those whose name contains ``only``) moved by noise."""
    gen = torch.Generator().manual_seed(seed)
    new: dict[int, torch.Tensor] = {}  # tied tensors (embeddings and head) stay tied, as in training
    out = {}
    for name, t in tensors.items():
        if t.is_floating_point() and (only is None or only in name) and t.data_ptr() not in new:
            new[t.data_ptr()] = t + torch.randn(t.shape, generator=gen) * 0.1
        out[name] = new.get(t.data_ptr(), t)
    return out


def test_round_trip_multipart_and_refusals(s3, policy, tmp_path):
    store = open_store(f"s3://{BUCKET}/rt", TransferSettings(5 * MiB, 5 * MiB))
    v1 = write_version(policy, tmp_path / "pub", "v1", policy.policy_snapshot())
    # An 11 MiB weights file goes up in 5 MiB parts (S3's multipart ETag: "<md5>-<parts>").
    torch.manual_seed(0)
    from safetensors.torch import save_file
    save_file({"big": torch.randn(11 * MiB // 4)}, str(v1 / "extra.safetensors"))
    published = publish_version(store, "v1", v1)
    assert store.head("v1/extra.safetensors")["ETag"].strip('"').endswith("-3")
    assert published.uri == f"s3://{BUCKET}/rt/v1" and published.bytes_uploaded == published.bytes_total

    fetched = fetch_version(published.uri, tmp_path / "cache")
    for name in ("model.safetensors", "extra.safetensors", "config.json", "tokenizer.json"):
        assert (fetched.path / name).read_bytes() == (v1 / name).read_bytes()
    assert fetched.bytes_downloaded == published.bytes_total
    assert fetch_version(published.uri, tmp_path / "cache").bytes_downloaded == 0  # verified copy reused

    # An object that no longer matches its manifest: refused, nothing materialized.
    store.put_bytes("v1/config.json", b"{}")
    with pytest.raises(WeightsError) as err:
        fetch_version(published.uri, tmp_path / "other-cache")
    assert err.value.reason == "sha256" and "config.json" in str(err.value)
    assert not (tmp_path / "other-cache" / "v1").exists()
    # Downloaded, not yet checked (what the follower loads while it hashes):
    # no cached version until the check passed, and removed when it fails.
    pending = download_version(published.uri, tmp_path / "other-cache")
    assert pending.path == tmp_path / "other-cache" / "v1" and not (pending.path / "manifest.json").exists()
    with pytest.raises(WeightsError) as err:
        pending.verify()
    assert err.value.reason == "sha256" and not pending.path.exists()
    # A manifest that is not one.
    store.put_bytes("v2/manifest.json", b"not json")
    with pytest.raises(WeightsError) as err:
        fetch_version(f"s3://{BUCKET}/rt/v2", tmp_path / "other-cache")
    assert err.value.reason == "manifest"


def test_interrupted_upload_never_becomes_a_version(s3, policy, tmp_path):
    """The store dies after the first file of an upload; after it restarts
    (its objects survive on disk) the half-uploaded version is invisible."""
    store = open_store(f"s3://{BUCKET}/cut")
    v1 = write_version(policy, tmp_path / "pub", "v1", policy.policy_snapshot())
    uploaded = []

    def die_after_first(name):
        uploaded.append(name)
        if len(uploaded) == 1:
            s3.kill()

    try:
        with pytest.raises(StoreError):
            publish_version(store, "v1", v1, progress=die_after_first)
    finally:
        s3.start()
    assert store.exists(f"v1/{uploaded[0]}")  # the first object is stored...
    with pytest.raises(WeightsError) as err:  # ...but without the manifest there is no version
        fetch_version(f"s3://{BUCKET}/cut/v1", tmp_path / "cache")
    assert err.value.reason == "download" and "never completely published" in str(err.value)


def test_delta_carries_only_changed_tensors_and_checks_its_parent(s3, policy, tmp_path):
    store = open_store(f"s3://{BUCKET}/delta")
    base = policy.policy_snapshot()
    v1 = write_version(policy, tmp_path / "pub", "v1", base)
    p1 = publish_version(store, "v1", v1)
    v2 = write_version(policy, tmp_path / "pub", "v2", moved(base, only="h.1."))  # one block of the tiny GPT-2
    p2 = publish_version(store, "v2", v2, parent=ParentVersion("v1", v1, p1.weights_sha256))
    assert p2.delta_of == "v1" and p2.bytes_uploaded < p1.bytes_uploaded / 2
    manifest = json.loads(store.get_bytes("v2/manifest.json"))
    assert manifest["parent"] == {"version": "v1", "weights_sha256": p1.weights_sha256}
    changed = manifest["files"]["model.safetensors"]["delta"]["tensors_changed"]
    # A GPT-2 block's 12 tensors: ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj (weight and bias each).
    assert changed == 12 == sum(1 for n in base if ".h.1." in n)

    # A replica without v1 fetches it first (down the chain), then patches it: byte-identical to v2.
    fetched = fetch_version(p2.uri, tmp_path / "fresh")
    assert (fetched.path / "model.safetensors").read_bytes() == (v2 / "model.safetensors").read_bytes()
    assert fetched.bytes_downloaded == p1.bytes_total + p2.bytes_uploaded

    # A cached parent whose bytes differ from what the delta was made against: refused, not patched.
    tampered = tmp_path / "tampered"
    fetch_version(p1.uri, tampered)
    weights = tampered / "v1" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(WeightsError) as err:
        fetch_version(p2.uri, tampered)
    assert err.value.reason == PARENT and "not the one the delta was made against" in str(err.value)
    assert not (tampered / "v2").exists()
    # A cached parent of the same name but other weights (say, republished): refused before patching.
    manifest_file = tampered / "v1" / "manifest.json"
    manifest_file.write_text(manifest_file.read_text().replace(p1.weights_sha256, "1" * 64))
    with pytest.raises(WeightsError) as err:
        fetch_version(p2.uri, tampered)
    assert err.value.reason == PARENT and "refusing to patch" in str(err.value)

    # A delta against a parent the store never had: refused cleanly.
    ghost = write_version(policy, tmp_path / "pub", "ghost", moved(base, seed=2))
    v3 = write_version(policy, tmp_path / "pub", "v3", moved(moved(base, seed=2), only="h.0.", seed=3))
    p3 = publish_version(store, "v3", v3, parent=ParentVersion("ghost", ghost, "0" * 64))
    with pytest.raises(WeightsError) as err:
        fetch_version(p3.uri, tmp_path / "fresh")
    assert err.value.reason == PARENT and "'ghost'" in str(err.value)


def test_bf16_transport_halves_the_bytes_and_loads_back_in_float32(s3, policy, tmp_path):
    from arbiter.lm import load_causal_weights

    store = open_store(f"s3://{BUCKET}/bf16")
    snapshot = policy.policy_snapshot()
    full = publish_version(store, "f32", write_version(policy, tmp_path / "pub", "f32", snapshot))
    half = publish_version(store, "b16", write_version(policy, tmp_path / "pub", "b16", to_bf16(snapshot)),
                           dtype="bfloat16")
    tensor_bytes = sum(t.numel() * 4 for t in {t.data_ptr(): t for t in snapshot.values()}.values())
    # Every tensor of the tiny policy is float32: its share of the bytes halves.
    assert full.bytes_total - half.bytes_total == pytest.approx(tensor_bytes / 2, rel=0.01)
    loaded, _ = load_causal_weights(fetch_version(half.uri, tmp_path / "cache").path)
    params = dict(loaded.named_parameters())
    for name, param in params.items():
        assert param.dtype == torch.float32
        # Exactly the bf16-rounded trainer weights: rounding to 8 significant bits is ≤ 2^-8 relative.
        rounded = snapshot[name].to(torch.bfloat16).to(torch.float32)
        assert torch.equal(param.detach(), rounded), name
        assert torch.all((rounded - snapshot[name]).abs() <= snapshot[name].abs() * 2**-8)


def follower(policy_dir, kafka, cache: Path, roots) -> BackgroundServer:
    settings = PolicySettings(
        model_dir=str(policy_dir), port=0, metrics_port=0, follow_updates=True, replica_id="s3-replica",
        kafka=kafka, max_loaded_versions=2, grace_seconds=1.0, model_roots=roots, weights_cache_dir=str(cache),
        weights_uri_prefixes=(f"s3://{BUCKET}/run",),
    )
    return BackgroundServer(lambda: create_server(settings))


def counts(server, metric: str, label: str, values) -> dict[str, float]:
    return {v: sample_value(server.running.registry, metric, **{label: v}) for v in values}


def test_trainer_publishes_through_s3_and_the_replica_swaps(s3, policy, tiny_models, kafka_settings, tmp_path):
    """The trainer's background publisher uploads (full, then a delta) and
    announces a weights_uri; a policy replica with no view of the trainer's
    directory (its model roots are elsewhere) downloads, verifies and serves
    each; a corrupted version and a never-finished one are refused, counted,
    and the previous version keeps serving."""
    ensure_topics(kafka_settings, {topics.POLICY_UPDATES: 1})
    out = tmp_path / "trainer-policies"
    out.mkdir()
    sent = []

    def announce(version, weights_uri="", **known):  # what trainer/loop.py announces
        # The publisher's digest, from its one pass over what it wrote, is the files' own.
        assert known["weights_sha256"] == weights_sha256(out / version)
        update = policy_update(version, str(out / version), "v0", len(sent) + 1, known["weights_sha256"],
                               False, weights_uri=weights_uri)
        with StreamProducer(kafka_settings) as producer:
            producer.send(topics.POLICY_UPDATES, update)
            producer.flush()
        sent.append(update)

    settings = PublishSettings(uri=f"s3://{BUCKET}/run", delta=True)
    publisher = BackgroundPublisher(out, lambda path, snap: policy.save_policy(path, snap.version, snap.tensors),
                                    announce, weights=settings)
    base = policy.policy_snapshot()
    (tmp_path / "nothing-here").mkdir()
    roots = (str(tmp_path / "nothing-here"),)
    with follower(tiny_models["policy"], kafka_settings, tmp_path / "cache", roots) as server, \
            PolicyClient(server.target) as client:
        probe = dict(max_new_tokens=6, temperature=1.0, seed=5)
        before = client.generate([PROMPT], **probe).samples[0]
        try:
            publisher.submit(Snapshot("ppo-1", 1, moved(base, seed=1)))
            wait_until(lambda: client.info().version == "ppo-1", what="ppo-1 to be served from s3")
            publisher.submit(Snapshot("ppo-2", 2, moved(moved(base, seed=1), only="h.1.", seed=2)))
            wait_until(lambda: client.info().version == "ppo-2", what="the delta ppo-2 to be served")
            assert publisher.last_published.delta_of == "ppo-1"
        finally:
            publisher.close()
        assert [u.weights_uri for u in sent] == [f"s3://{BUCKET}/run/ppo-1", f"s3://{BUCKET}/run/ppo-2"]
        after = client.generate([PROMPT], **probe).samples[0]
        assert after.policy_version == "ppo-2"
        assert list(after.logprobs) != pytest.approx(list(before.logprobs), abs=1e-3)

        # Corrupted in the store after its manifest was written: refused, ppo-2 keeps serving.
        store = open_store(f"s3://{BUCKET}/run")
        v3 = write_version(policy, tmp_path / "elsewhere", "ppo-3", moved(base, seed=3))
        p3 = publish_version(store, "ppo-3", v3)
        data = bytearray((v3 / "model.safetensors").read_bytes())
        data[-8:] = b"\0" * 8
        store.put_bytes("ppo-3/model.safetensors", bytes(data))
        # Cut short before its manifest: refused too.
        v4 = write_version(policy, tmp_path / "elsewhere", "ppo-4", moved(base, seed=4))
        store.put_file("ppo-4/model.safetensors", v4 / "model.safetensors")
        # Intact, but in a store location this replica does not take versions from.
        publish_version(open_store(f"s3://{BUCKET}/runaway"), "ppo-5", v3)
        with StreamProducer(kafka_settings) as producer:
            for version, sha, uri in (("ppo-3", p3.weights_sha256, f"s3://{BUCKET}/run/ppo-3"),
                                      ("ppo-4", hashlib.sha256(b"").hexdigest(), f"s3://{BUCKET}/run/ppo-4"),
                                      ("ppo-5", p3.weights_sha256, f"s3://{BUCKET}/runaway/ppo-5")):
                producer.send(topics.POLICY_UPDATES, policy_update(
                    version, "/not/on/this/machine", "v0", 9, sha, False, weights_uri=uri))
                producer.flush()
        reasons = ("download", "sha256", "parent", "manifest", "outside_roots")
        wait_until(lambda: sum(counts(server, "arbiter_policy_update_refusals_total", "reason", reasons).values())
                   == 3, what="the three bad versions to be refused")
        assert counts(server, "arbiter_policy_update_refusals_total", "reason", reasons) == {
            "download": 1, "sha256": 1, "parent": 0, "manifest": 0, "outside_roots": 1}
        assert counts(server, "arbiter_policy_updates_total", "outcome", ("applied", "refused")) == {
            "applied": 2, "refused": 3}
        assert client.info().version == "ppo-2"
        assert client.generate([PROMPT], **probe).samples[0].policy_version == "ppo-2"
        # Only the versions still loaded keep their files in the replica's cache.
        assert sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")) == [
            "ppo-1", "ppo-2"]


def test_arbiter_up_publishes_through_a_local_store_it_starts(tiny_models, tmp_path, monkeypatch):
    """``weights: {uri: s3://...}`` in the stack: with no endpoint in the
    environment the stack starts a local store with that bucket (supervised:
    restarted with its objects), the trainer's config gets the settings and
    every policy replica a download cache; bad settings are refused at load."""
    from services.policy.server import add_arguments, settings_from_args
    from services.stack import ObjectStoreComponent, Stack, StackConfig, StackError, service_args, trainer_policies_dir
    from trainer.config import load_config

    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    here = str(tiny_models["policy"])
    for bad, field in (({"uri": "http://host/x"}, "weights.uri"), ({"delta": True, "uri": ""}, "weights.delta"),
                       ({"uri": "s3://b/p", "zstd": True}, "weights.zstd")):
        with pytest.raises(StackError, match=field.replace(".", r"\.")):
            StackConfig(policy_model=here, reward_model=here, prompts_file=here, weights=bad)
    config = StackConfig(policy_model=here, reward_model=here, prompts_file=here, metrics=False,
                         workdir=str(tmp_path / "stack"), weights={"uri": "s3://arbiter-weights/policies", "bf16": True})
    stack = Stack(config)
    stack.logs.mkdir(parents=True)
    trainer_policies_dir(config).mkdir(parents=True)  # as Stack.start does
    try:
        stack._start_weights_store()
        trainer = load_config(stack._write_trainer_config())
        assert (trainer.weights.uri, trainer.weights.bf16) == ("s3://arbiter-weights/policies", True)
        import argparse
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        args = service_args(config, "policy", here, 50099, None, replica_id="policy-1")[2:]
        replica = settings_from_args(parser.parse_args([*args, "--kafka-bootstrap-servers", "k:9092"]))
        assert replica.weights_cache_dir == str(tmp_path / "stack" / "weights-cache" / "policy-1")
        assert replica.weights_uri_prefixes == ("s3://arbiter-weights/policies",)

        for name, value in stack.weights_env.items():  # what every component's environment gets
            monkeypatch.setenv(name, value)
        store = open_store("s3://arbiter-weights/policies")
        store.put_bytes("probe", b"kept")
        component = ObjectStoreComponent(stack.weights_store)
        stack.weights_store.kill()
        assert not component.alive() and component.exit_status() != 0
        component.start()
        assert component.alive() and store.get_bytes("probe") == b"kept"
    finally:
        stack.stop()
    assert stack.weights_store is None
