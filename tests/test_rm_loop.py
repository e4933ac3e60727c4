"""`arbiter rm loop` against a real broker and real reward replicas.

The gates are tested with planted candidates: reward models whose score
depends only on the last character of the text ('!', '.' or '?'), so every
accuracy and agreement below follows from the orderings chosen here.
Human labels say '!' > '.' > '?'. Each round's held-out preferences are the
three pairs (!, .), (!, ?), (., ?); live traffic is '!' and '?' items only.

    version      '!'  '.'  '?'   order on labels            held-out acc.
    base (A)      2    0    1    ! > ? > .   (., ?) wrong    2/3
    better (C+)   2    1    0    ! > . > ?                   1
    worse (C-)    0    1    2    ? > . > !   all wrong       0
    drifting      as C+, shipping calibration scores of the shadow traffic

On the traffic ('!' and '?'), A, C+ and the drifting one all order ! > ?, and
same-character items tie in both: pairwise agreement 1 and Spearman 1. A
second C+ then passes the gates but fails the post-promotion check on a
replica that falls back to its previous version.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import threading
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
import torch
from helpers import BackgroundServer, sample_value, wait_until
from kafka import KafkaProducer

from arbiter.config import ConfigError
from cli.main import main as cli_main
from arbiter.net import free_port
from arbiter.rm.config import config_from_dict
from arbiter.rm.loop import ReplicaError, RMLoop, RMLoopSettings, ShadowReading, held_out
from arbiter.rm.registry import ModelRegistry
from arbiter.stream import codec, ensure_topics, topics
from arbiter.v1 import common_pb2, reward_pb2, reward_pb2_grpc, rollout_pb2
from services.reward.server import create_server
from services.reward.settings import RewardSettings
from services.rm_loop import GrpcReplica, ReplicaDiscovery, dns_host_port

BASE = {"!": 2.0, ".": 0.0, "?": 1.0}
BETTER = {"!": 2.0, ".": 1.0, "?": 0.0}
WORSE = {"!": 0.0, ".": 1.0, "?": 2.0}
HELD_OUT = [(" good!", " fine."), (" nice!", " what?"), (" fine.", " what?")]


def planted_score(value: float) -> float:
    """The planted model's score of a text whose last character has ``value``:
    the final LayerNorm's first output for the embedding (v, -v, 1, -1, 0, ...)
    of n_embd = 64: v / sqrt((2v² + 2) / 64)."""
    return value / math.sqrt((2 * value * value + 2) / 64)


def plant(out: Path, base: Path, values: dict[str, float], **metadata) -> Path:
    """A reward model scoring ``planted_score(values[last character])``: no
    positional embeddings, every block's output projection zero (the residual
    stream is the last token's embedding), and a score head reading one
    coordinate, so equal last characters give bitwise equal scores."""
    from transformers import AutoTokenizer, GPT2ForSequenceClassification

    from arbiter.hf import write_metadata

    model = GPT2ForSequenceClassification.from_pretrained(str(base), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    with torch.no_grad():
        body = model.transformer
        body.wpe.weight.zero_()
        for block in body.h:
            for projection in (block.attn.c_proj, block.mlp.c_proj):
                projection.weight.zero_()
                projection.bias.zero_()
        body.ln_f.weight.fill_(1.0)
        body.ln_f.bias.zero_()
        body.wte.weight.zero_()
        for token, index in tokenizer.get_vocab().items():
            v = values.get(token[-1:], 0.0)
            body.wte.weight[index, :4] = torch.tensor([v, -v, 1.0, -1.0])
        model.score.weight.zero_()
        model.score.weight[0, 0] = 1.0
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_metadata(out, name="planted", text_convention={"append_eos": False}, **metadata)
    return out


class Planted:
    """Training replaced by publishing prepared checkpoints in order (the
    candidates above), with what the loop hands a trainer: its metadata and files."""

    def __init__(self, candidates: list[tuple[Path, list[float] | None]]):
        self.queue = list(candidates)
        self.calls: list[dict] = []

    def __call__(self, config, topic, *, metadata, files):
        path, calibration = self.queue.pop(0)
        self.calls.append({"model_dir": config.model_dir, "data": config.data,
                           "examples": sorted(e.id for e in topic.examples)})
        registry = ModelRegistry(config.registry)
        with registry.staging(config.name) as staged:
            for item in path.iterdir():
                shutil.copy(item, staged / item.name)
            for name, text in files.items():
                (staged / name).write_text(text)
            version = registry.publish(config.name, staged, **metadata,
                                       parent_version=metadata["lineage"]["parent_version"],
                                       calibration_scores=calibration)
        return SimpleNamespace(version=version)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The servers' and trainer's forwards here are tiny: on the shared cores,
    syncing two intra-op threads costs more than it saves (sampling 16
    completions took 13 s with two, 0.5 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def planted(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    return {name: plant(root / name, tiny_models["reward"], values, version=name)
            for name, values in (("base", BASE), ("better", BETTER), ("worse", WORSE), ("drifting", BETTER))}


@pytest.fixture
def kafka(kafka_settings):
    # One partition: offsets (and so the held-out split) are known.
    ensure_topics(kafka_settings, {topics.PREFERENCES: 1})
    return kafka_settings


def produce(kafka, records: list[tuple]) -> None:
    """(key, value, headers) to partition 0, in order, as a foreign producer would."""
    producer = KafkaProducer(bootstrap_servers=list(kafka.bootstrap_servers), acks="all",
                             max_in_flight_requests_per_connection=1)
    for key, value, headers in records:
        producer.send(kafka.topic(topics.PREFERENCES), key=key, value=value, headers=headers, partition=0)
    producer.flush(timeout=30)
    producer.close()


def preference(pid: str, chosen: str, rejected: str) -> tuple:
    record = codec.encode(topics.PREFERENCES, rollout_pb2.Preference(
        preference_id=pid, prompt="Q:", chosen=chosen, rejected=rejected, annotator_id="t"))
    return record.key, record.value, record.headers


def one_round(first: int) -> list[tuple]:
    """Six preferences: held-out pairs at the odd offsets (holdout_fraction
    0.5), training pairs between them. ``first`` is the first one's offset (odd)."""
    assert held_out(first, 0.5) and not held_out(first + 1, 0.5)
    rows = []
    for i, (chosen, rejected) in enumerate(HELD_OUT):
        rows.append(preference(f"h{first + 2 * i}", chosen, rejected))
        rows.append(preference(f"t{first + 2 * i + 1}", f" yes {i}!", f" no {i}."))
    return rows


def serve(model: Path, model_roots):
    settings = RewardSettings(model_dir=str(model), port=0, metrics_port=0, model_roots=model_roots)
    return BackgroundServer(lambda: create_server(settings))


def replica(server) -> GrpcReplica:
    return GrpcReplica(server.target)


def train_config(tmp_path: Path, base: Path, **extra):
    return config_from_dict({"model_dir": str(base), "registry": str(tmp_path / "registry"), "name": "rm",
                             "epochs": 1, "batch_size": 4, "learning_rate": 1e-3, "progress": False, **extra})


def loop_settings(**overrides) -> RMLoopSettings:
    fields = {"train_config": "unused.yaml", "reward": ("a",),
              "retrain_preferences": 6, "holdout_fraction": 0.5, "min_holdout": 3, "accuracy_tolerance": 0.05,
              "shadow_min_samples": 40, "min_shadow_agreement": 0.9, "min_shadow_spearman": 0.9,
              "check_interval_s": 0.1, "join_timeout_s": 30.0, **overrides}
    return RMLoopSettings(**fields)


def run_round(loop: RMLoop, timeout_s: float = 60.0) -> str:
    outcome: list[str] = []
    wait_until(lambda: outcome.append(loop.step(0.2)) or outcome[-1], timeout_s, "a round of the loop")
    return outcome[-1]


def run_watch(loop: RMLoop, timeout_s: float = 60.0) -> None:
    wait_until(lambda: loop.step(0.2) is None and loop.watch is None, timeout_s, "the watch to end")


class Traffic:
    """Clients scoring ``items`` on each replica, paced, until stopped; the
    items can be changed while it runs."""

    def __init__(self, servers, items: list[str]):
        self.items = items
        self.channels = [grpc.insecure_channel(s.target) for s in servers]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(reward_pb2_grpc.RewardServiceStub(c),))
                         for c in self.channels]

    def _run(self, stub) -> None:
        while not self._stop.wait(0.01):
            request = reward_pb2.ScoreRequest(inputs=[
                reward_pb2.RewardInput(text=reward_pb2.TextPair(prompt="Q:", response=r)) for r in self.items])
            stub.Score(request, timeout=30)

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        for channel in self.channels:
            channel.close()


class Reverting(GrpcReplica):
    """A real replica that, once asked, goes back to its previous version
    right after a promotion, as one restarted onto its --model would."""

    revert_once = False

    def activate(self, version: str) -> str:
        previous = super().activate(version)
        if self.revert_once:
            self.revert_once = False
            super().activate(previous)
        return previous


def test_settings_name_the_field():
    with pytest.raises(ConfigError, match="reward=.* at least one reward replica"):
        loop_settings(reward=())
    with pytest.raises(ConfigError, match="shadow_min_samples.*500"):
        loop_settings(shadow_min_samples=501)
    with pytest.raises(ConfigError, match="holdout_fraction"):
        loop_settings(holdout_fraction=1.0)
    with pytest.raises(ConfigError, match="min_shadow_spearman"):
        loop_settings(min_shadow_spearman=1.5)
    # The shadow defaults: a Spearman floor, agreement reported only (see RMLoopSettings).
    defaults = RMLoopSettings(train_config="x.yaml", reward=("dns:///r:1",))
    assert (defaults.min_shadow_spearman, defaults.min_shadow_agreement) == (0.3, 0.0)
    # Every 1/f-th offset, so a restart holds out the same ones.
    assert [o for o in range(10) if held_out(o, 0.5)] == [1, 3, 5, 7, 9]
    assert [o for o in range(10) if held_out(o, 0.25)] == [3, 7]


class ScriptedShadow:
    """A replica whose shadow window is given: the gate's logic around
    GetShadow (the RPC against a real service: test_shadow.py, and the gates
    test below)."""

    def __init__(self, name: str, reading: ShadowReading):
        self.name, self.reading = name, reading

    def set_shadow(self, version: str, fraction: float) -> None:
        pass

    def shadow(self, active: str, candidate: str) -> ShadowReading:
        return self.reading


def test_shadow_gates_are_a_spearman_floor_and_agreement_only_on_request(tmp_path):
    """A better candidate disagrees with the active version where the active
    one is wrong: agreement 0.55 (the active version near chance on fresh
    samples, the candidate right more often) passes the default gates and is
    recorded; a candidate unrelated to the active one (Spearman 0.05) does
    not; an agreement gate applies only when one is set."""
    from arbiter.rm.registry import RegistryVersion
    from arbiter.stream import KafkaSettings

    def gate(reading: ShadowReading, **settings) -> tuple[str | None, dict]:
        replicas = [ScriptedShadow("r0", reading), ScriptedShadow("r1", ShadowReading(200, 0.9, 0.95))]
        loop = RMLoop(RMLoopSettings(train_config="x.yaml", reward=("r0", "r1"), shadow_min_samples=100, **settings),
                      train_config(tmp_path, tmp_path), KafkaSettings(), replicas)
        version = RegistryVersion("rm", "v2", 2, tmp_path / f"v2-{len(list(tmp_path.iterdir()))}")
        version.path.mkdir()
        record: dict = {"gates": {}, "events": []}
        return loop._shadow(version, record, "v1", "v2"), record

    passed, record = gate(ShadowReading(150, 0.55, 0.45))
    assert passed is None
    assert record["gates"]["shadow"]["agreement"] == [0.55, 0.9]  # reported
    assert record["gates"]["shadow"]["spearman"] == [0.45, 0.95]
    rejected, record = gate(ShadowReading(150, 0.52, 0.05))
    assert rejected == "rejected" and record["failed_gate"] == "shadow_spearman"
    assert "shadow Spearman 0.0500 is below 0.3 (per replica: 0.0500/0.9500)" in record["reason"]
    rejected, record = gate(ShadowReading(150, 0.55, 0.45), min_shadow_agreement=0.8)
    assert rejected == "rejected" and record["failed_gate"] == "shadow_agreement"
    # Too few samples when the (here immediate) shadow timeout passes.
    rejected, record = gate(ShadowReading(99, 0.9, 0.9), shadow_timeout_s=1e-6)
    assert record["failed_gate"] == "shadow_samples" and "r0 shadow-scored 99 of 100" in record["reason"]


class ScriptedAlarms:
    """A replica whose drift readings are given: the new version's own
    Page-Hinkley count, and the paired detector's against the shadowing
    previous version (against real services: the tests below)."""

    def __init__(self, name: str):
        self.name, self.alarms, self.shadowing, self.active = name, {}, [], "v2"
        self.paired: ShadowReading | None = None

    def change_points(self, version: str) -> int:
        return self.alarms.get(version, 0)

    def set_shadow(self, version: str, fraction: float) -> None:
        self.shadowing.append((version, fraction))

    def shadow(self, active: str, candidate: str) -> ShadowReading | None:
        return self.paired

    def activate(self, version: str) -> str:
        previous, self.active = self.active, version
        return previous


def test_the_watch_rolls_back_on_a_paired_alarm_not_on_drift_both_versions_see(tmp_path):
    from arbiter.rm.registry import RegistryVersion
    from arbiter.stream import KafkaSettings

    def watch(own_alarms: int, paired: ShadowReading | None, **settings) -> tuple[dict, ScriptedAlarms]:
        replica = ScriptedAlarms("r0")
        loop = RMLoop(RMLoopSettings(train_config="x.yaml", reward=("r0",), watch_s=0.2, check_interval_s=0.01,
                                     **settings), train_config(tmp_path, tmp_path), KafkaSettings(), [replica])
        loop._wait = lambda seconds: None  # no consumer here: the watch's own decisions only
        version = RegistryVersion("rm", "v2", 2, tmp_path / f"v2-{len(list(tmp_path.iterdir()))}")
        version.path.mkdir()
        version.write_loop_record({"gates": {}, "events": [], "status": "watching"})
        replica.alarms = {"v2": 4}  # counts from before the watch are not the watch's
        loop._start_watch(version, "v1")
        replica.alarms, replica.paired = {"v2": 4 + own_alarms}, paired
        wait_until(lambda: loop._watch_tick() or loop.watch is None, 10, "the watch to end")
        return version.loop_record(), replica

    # The two versions score the same items apart: rolled back, whatever the own count.
    record, replica = watch(0, ShadowReading(180, 0.9, 0.8, paired_change_points=1, paired_detecting=True))
    assert record["status"] == "rolled_back" and replica.active == "v1"
    assert ("paired Page-Hinkley alarm on r0: v2 scores the traffic differently from v1 on the same items "
            "(1 alarm(s) over 180 shadowed items)") in record["reason"]
    assert replica.shadowing == [("v1", 1.0), ("", 1.0)]  # shadowing for the watch only
    # The new version alarms on its own, the paired detector does not: the traffic moved.
    record, replica = watch(2, ShadowReading(180, 0.9, 0.8, paired_change_points=0, paired_detecting=True))
    assert record["status"] == "active" and replica.active == "v2"
    assert record["reason"] == "no drift alarm within 0.2s against v1 on the same items"
    assert any("(4 -> 6) without a paired alarm against v1" in e["event"] and
               "the traffic drifts, not the version" in e["event"] for e in record["events"])
    # Too little traffic for the paired reference: kept, and the verdict says so.
    record, _ = watch(0, ShadowReading(40, 0.9, 0.8))
    assert record["status"] == "active" and "too little traffic on r0" in record["reason"]
    # Not compared: the new version's own alarm rolls back.
    record, replica = watch(2, None, watch_against_previous=False)
    assert record["status"] == "rolled_back" and replica.shadowing == []
    assert "Page-Hinkley change alarm on r0 (4 -> 6 alarms)" in record["reason"]


def test_dns_discovery_finds_the_replicas_at_each_decision(tiny_models, model_roots, caplog):
    """``dns:///localhost:PORT`` resolves (really) to 127.0.0.1: a replica
    reached over gRPC, its shadow window too (GetShadow).
    Then, with a scripted resolver (the logic around the resolution only),
    replicas join and leave between calls, a failed lookup keeps the last
    addresses, and known replicas are reused, gone ones closed."""
    assert dns_host_port("dns:///arbiter-reward-pods:50051") == ("arbiter-reward-pods", 50051)
    assert dns_host_port("dns://8.8.8.8/name:7") == ("name", 7) and dns_host_port("dns:name:7") == ("name", 7)
    assert dns_host_port("127.0.0.1:5") is None
    with serve(tiny_models["reward"], model_roots) as server:
        port = server.port
        discovery = ReplicaDiscovery([f"dns:///localhost:{port}"], GrpcReplica)
        try:
            (found,) = discovery()
            assert found.name == f"127.0.0.1:{port}"
            assert found.active()[0] == "v0"
            assert found.shadow("v0", "v0") is None  # GetShadow answered: no window
            with pytest.raises(ReplicaError, match=f"127.0.0.1:{port}: GetShadow: .*NOT_FOUND.*'candidate'"):
                found.shadow("v0", "candidate")
            assert discovery() == [found]  # the same replica, channel kept
        finally:
            discovery.close()

    answers: list = [["10.0.0.1"], ["10.0.0.1", "10.0.0.2"], ["10.0.0.2"], None]

    def resolve(host: str) -> list[str]:
        assert host == "arbiter-reward-pods"
        answer = answers.pop(0)
        if answer is None:
            raise ReplicaError("cannot resolve arbiter-reward-pods: no such host")
        return answer

    closed: list[str] = []

    class Tracked(GrpcReplica):
        def close(self) -> None:
            closed.append(self.name)
            super().close()

    discovery = ReplicaDiscovery(["dns:///arbiter-reward-pods:50051", "10.0.0.9:50051"], Tracked, resolve=resolve)
    try:
        names = [[r.name for r in discovery()] for _ in range(4)]
        assert names == [["10.0.0.1:50051", "10.0.0.9:50051"],
                         ["10.0.0.1:50051", "10.0.0.2:50051", "10.0.0.9:50051"],
                         ["10.0.0.2:50051", "10.0.0.9:50051"],
                         ["10.0.0.2:50051", "10.0.0.9:50051"]]  # the lookup failed: last addresses kept
        assert closed == ["10.0.0.1:50051"]
    finally:
        discovery.close()


def active_versions(servers) -> list[str]:
    return [replica(s).active()[0] for s in servers]


def test_gates_promote_the_better_candidate_everywhere_keep_the_worse_and_roll_back(
        planted, kafka, tmp_path, model_roots, caplog):
    caplog.set_level(logging.INFO)
    wire = kafka.topic(topics.PREFERENCES)
    # The drifting candidate ships calibration scores of the shadow traffic
    # ('!' and '?' alternating under C+'s values): shadowing matches them,
    # traffic of '!' alone after its promotion is a shift of about +1 std.
    calibration = [planted_score(BETTER["!"]), planted_score(BETTER["?"])] * 50
    trainer = Planted([(planted["worse"], None), (planted["better"], None), (planted["drifting"], calibration),
                       (planted["better"], None)])
    garbage = (b"k", b"\xff not a preference", preference("x", " a!", " b.")[2])
    produce(kafka, [garbage, *one_round(1)])
    config = train_config(tmp_path, planted["base"])
    with serve(planted["base"], model_roots) as one, serve(planted["base"], model_roots) as two, \
            Traffic([one, two], [" good!", " what?", " nice!", " so?"]) as traffic:
        servers = [one, two]
        # Any alarm rolls back here (the previous version not compared): the
        # drift planted below is the traffic's, which the next test keeps.
        settings = loop_settings(watch_s=3.0, watch_against_previous=False)
        reverting = Reverting(two.target)
        loop = RMLoop(settings, config, kafka, [replica(one), reverting], trainer=trainer).start()
        try:
            # Round 1: the worse candidate. Held out: offsets 1, 3, 5 (offset 0 is the garbage).
            assert run_round(loop) == "rejected"
            registry = ModelRegistry(config.registry)
            v1 = registry.get("rm", "v1")
            lineage = v1.metadata()["lineage"]
            assert lineage["preference_offsets"] == {wire: {"0": [0, 7]}}
            assert lineage["parent_version"] == "base"
            assert lineage["preferences"]["read"] == 6 and lineage["preferences"]["train"] == 3
            assert lineage["preferences"]["held_out"] == 3
            assert lineage["preferences"]["skipped_reasons"] == {"undecodable": 1}
            assert lineage["preferences"]["skipped"][0].startswith(f"{wire}[0]@0: ")
            assert any(f"{wire}[0]@0" in r.getMessage() and "undecodable" in r.getMessage() for r in caplog.records)
            assert sample_value(loop.metrics.registry, "arbiter_stream_records_rejected_total",
                                topic="preferences", reason="undecodable") == 1
            assert trainer.calls[0]["examples"] == ["t2", "t4", "t6"]
            # Training continues from the active version: the replicas' base checkpoint.
            assert Path(trainer.calls[0]["model_dir"]).resolve() == planted["base"].resolve()
            record = v1.loop_record()
            assert record["status"] == "rejected" and record["failed_gate"] == "holdout_accuracy"
            accuracy = record["gates"]["holdout_accuracy"]
            assert (accuracy["candidate"], accuracy["active"], accuracy["examples"]) == (0.0, pytest.approx(2 / 3), 3)
            assert "kept loaded but inactive" in record["reason"]
            assert active_versions(servers) == ["base", "base"]
            for server in servers:  # loaded, inactive, on every replica
                listed = replica(server).client.models.ListModelVersions(common_pb2.ListModelVersionsRequest())
                assert {i.version: i.active for i in listed.versions}["v1"] is False
            assert sample_value(loop.metrics.registry, "arbiter_rm_loop_gate_failures_total",
                                gate="holdout_accuracy") == 1

            # Round 2: the better candidate, trained with v1's preferences carried over.
            produce(kafka, one_round(7))
            assert run_round(loop) == "promoted"
            v2 = registry.get("rm", "v2")
            assert v2.metadata()["lineage"]["carried_over"] == ["v1"]
            assert trainer.calls[1]["data"] == (str(v1.path / "preferences.jsonl"),)
            assert v2.metadata()["lineage"]["preference_offsets"] == {wire: {"0": [7, 13]}}
            gates = v2.loop_record()["gates"]
            assert (gates["holdout_accuracy"]["candidate"], gates["holdout_accuracy"]["active"]) == (
                1.0, pytest.approx(2 / 3))
            assert gates["holdout_accuracy"]["examples"] == 6  # the rolling held-out set: both rounds'
            assert all(n >= 40 for n in gates["shadow"]["samples"])
            assert gates["shadow"]["agreement"] == [1.0, 1.0]
            assert gates["shadow"]["spearman"] == [pytest.approx(1.0), pytest.approx(1.0)]
            assert active_versions(servers) == ["v2", "v2"]
            run_watch(loop)
            assert v2.loop_record()["status"] == "active"
            assert sample_value(loop.metrics.registry, "arbiter_rm_loop_active_version") == 2

            # Round 3: the drifting candidate passes the gates, is promoted, then rolled back.
            produce(kafka, one_round(13))
            assert run_round(loop) == "promoted"
            v3 = registry.get("rm", "v3")
            assert v3.metadata()["lineage"]["carried_over"] == []
            assert Path(trainer.calls[2]["model_dir"]).resolve() == v2.path.resolve()
            assert v3.loop_record()["gates"]["holdout_accuracy"]["active"] == 1.0
            assert active_versions(servers) == ["v3", "v3"]
            traffic.items = [" good!", " nice!"]
            run_watch(loop, 30)
            record = v3.loop_record()
            assert record["status"] == "rolled_back" and "Page-Hinkley" in record["reason"]
            assert active_versions(servers) == ["v2", "v2"]
            assert sample_value(loop.metrics.registry, "arbiter_rm_loop_rollbacks_total", cause="drift") == 1
            assert sample_value(loop.metrics.registry, "arbiter_rm_loop_active_version") == 2
            assert sample_value(loop.metrics.registry, "arbiter_rm_loop_candidates_total", outcome="promoted") == 2
            assert sample_value(loop.metrics.registry, "arbiter_rm_loop_candidates_total", outcome="rejected") == 1

            # Round 4: the second replica falls back to its previous version right after
            # the promotion (a restart onto its --model, say): the check rolls both back.
            traffic.items = [" good!", " what?", " nice!", " so?"]
            reverting.revert_once = True
            produce(kafka, one_round(19))
            assert run_round(loop) == "rolled_back"
            record = registry.get("rm", "v4").loop_record()
            assert record["reason"] == (f"rolled back to v2: {two.target} answers with 'v2', not the promoted 'v4'")
            assert registry.get("rm", "v4").metadata()["lineage"]["carried_over"] == ["v3"]
            assert active_versions(servers) == ["v2", "v2"]
            assert sample_value(loop.metrics.registry, "arbiter_rm_loop_rollbacks_total",
                                cause="post_promotion_check") == 1
            # v1 rejected, v2 active, v3 and v4 rolled back: two since the last that stayed active.
            assert sample_value(loop.metrics.registry, "arbiter_rm_loop_candidates_since_active") == 2
        finally:
            loop.close()


@contextlib.contextmanager
def promoted_over_base(candidate: Path, calibration: list[float] | None, watch_s: float, kafka, tmp_path,
                       model_roots):
    """One replica serving the planted base under '!'/'?' traffic, and a loop
    that has just promoted ``candidate`` over it (its watch begun): yields
    (loop, server, traffic, train config)."""
    trainer = Planted([(candidate, calibration)])
    garbage = (b"k", b"\xff not a preference", preference("x", " a!", " b.")[2])
    produce(kafka, [garbage, *one_round(1)])
    config = train_config(tmp_path, planted_base(candidate))
    with serve(planted_base(candidate), model_roots) as one, \
            Traffic([one], [" good!", " what?", " nice!", " so?"]) as traffic:
        loop = RMLoop(loop_settings(watch_s=watch_s), config, kafka, [replica(one)], trainer=trainer).start()
        try:
            assert run_round(loop) == "promoted"
            yield loop, one, traffic, config
        finally:
            loop.close()


def planted_base(candidate: Path) -> Path:
    """The planted base model beside a planted candidate (one fixture directory)."""
    return candidate.parent / "base"


def test_drift_the_shadowing_previous_version_shares_keeps_the_promotion(planted, kafka, tmp_path, model_roots):
    """By default the previous version shadow-scores the traffic during the
    watch. Traffic of '!' alone after the promotion is a shift of +1 std for
    the new version and for the previous one alike (a policy in training
    moves its traffic so): the new version's own detector alarms, the paired
    one does not, and the promotion stands."""
    calibration = [planted_score(BETTER["!"]), planted_score(BETTER["?"])] * 50
    with promoted_over_base(planted["drifting"], calibration, 3.0, kafka, tmp_path, model_roots) as (
            loop, one, traffic, config):
        traffic.items = [" good!", " nice!"]
        run_watch(loop, 30)
        record = ModelRegistry(config.registry).get("rm", "v1").loop_record()
        assert record["status"] == "active", record["reason"]
        assert any("the traffic drifts, not the version" in e["event"] for e in record["events"])
        assert active_versions([one]) == ["v1"]
        assert sample_value(loop.metrics.registry, "arbiter_rm_loop_rollbacks_total", cause="drift") == 0
        # The watch is over: the previous version no longer shadows.
        assert replica(one).client.get_shadow("base").shadowing is False


def test_a_version_scoring_new_traffic_unlike_its_predecessor_is_rolled_back(planted, kafka, tmp_path, model_roots):
    """C+ replaces A. On the '!'/'?' traffic both order alike, each standardised
    to ±1 on it. Traffic of '.' alone then moves them apart: A scores '.' at
    planted 0, (0 − 4.53)/0.53 ≈ −8.5 of its std, and C+ at planted(1),
    (4.0 − 2.53)/2.53 ≈ +0.6 of its own, so the paired difference jumps by
    about 9 and the promotion is rolled back."""
    with promoted_over_base(planted["better"], None, 60.0, kafka, tmp_path, model_roots) as (
            loop, one, traffic, config):
        # The paired reference (100 shadowed items) is taken on the usual traffic first.
        wait_until(lambda: replica(one).client.get_shadow("base").paired_detecting, 30,
                   "the paired detector's reference")
        traffic.items = [" fine."]
        run_watch(loop, 30)
        record = ModelRegistry(config.registry).get("rm", "v1").loop_record()
        assert record["status"] == "rolled_back", record["reason"]
        assert "paired Page-Hinkley alarm" in record["reason"] and "differently from base" in record["reason"]
        assert active_versions([one]) == ["base"]
        assert sample_value(loop.metrics.registry, "arbiter_rm_loop_rollbacks_total", cause="drift") == 1


class Crash(BaseException):
    """The loop's process dying: nothing in the loop catches it."""


def committed(kafka) -> int | None:
    """The group's committed offset of partition 0, asked without joining the group."""
    from kafka import KafkaAdminClient
    from kafka.structs import TopicPartition as KafkaTP

    tp = KafkaTP(kafka.topic(topics.PREFERENCES), 0)
    admin = KafkaAdminClient(bootstrap_servers=list(kafka.bootstrap_servers))
    try:
        offsets = admin.list_group_offsets({topics.REWARD_TRAINER_GROUP: [tp]})[topics.REWARD_TRAINER_GROUP]
    finally:
        admin.close()
    found = offsets.get(tp)
    return None if found is None or found.offset < 0 else found.offset


def ids(path: Path) -> list[str]:
    return sorted(json.loads(line)["id"] for line in path.read_text().splitlines())


def test_a_restart_loses_no_preference_and_trains_none_twice(planted, kafka, tmp_path, model_roots, caplog):
    from arbiter.rm.train import train_reward_model

    def crash_mid_training(config, topic, **kw):
        def step(n, loss):
            raise Crash(f"killed at step {n}")
        return train_reward_model(config, topic, on_step=step, **kw)

    def crash_after_publishing(config, topic, **kw):
        result = train_reward_model(config, topic, **kw)
        raise Crash(f"killed after publishing {result.version.version}")

    wire = kafka.topic(topics.PREFERENCES)
    produce(kafka, [preference(f"p{i}", f" yes {i}!", f" no {i}.") for i in range(6)])
    config = train_config(tmp_path, planted["base"])
    registry = ModelRegistry(config.registry)
    # Gates that end quickly: no traffic, so the shadow gate gives up after 0.5 s.
    settings = loop_settings(min_holdout=1, accuracy_tolerance=1.0, shadow_timeout_s=0.5)
    # The second run retrains on the interval (1.5 s after its start), not the count.
    by_interval = loop_settings(min_holdout=1, accuracy_tolerance=1.0, shadow_timeout_s=0.5,
                                retrain_preferences=100, retrain_interval_s=1.5)
    with serve(planted["base"], model_roots) as server:
        for trainer, run_settings in ((crash_mid_training, settings), (crash_after_publishing, by_interval)):
            loop = RMLoop(run_settings, config, kafka, [replica(server)], trainer=trainer).start()
            try:
                with pytest.raises(Crash):
                    run_round(loop)
            finally:
                loop.close()
            assert committed(kafka) is None
        # Killed mid-training: nothing published. Killed after publishing: v1,
        # covering offsets 0-5 (held out: 1, 3, 5), its offsets not committed.
        [v1] = registry.versions("rm")
        assert v1.metadata()["lineage"]["preference_offsets"] == {wire: {"0": [0, 6]}}
        assert v1.metadata()["lineage"]["trigger"] == "interval"
        assert ids(v1.path / "preferences.jsonl") == ["p0", "p2", "p4"]
        assert ids(v1.path / "holdout.jsonl") == ["p1", "p3", "p5"]

        produce(kafka, [preference(f"p{i}", f" yes {i}!", f" no {i}.") for i in range(6, 12)])
        # The third run is the command itself (its main(), in this process:
        # a second interpreter importing torch cost more than the rest of the
        # test), stopped by SIGTERM once its round is over.
        config_file = tmp_path / "rm.yaml"
        config_file.write_text(json.dumps({
            "model_dir": str(planted["base"]), "registry": config.registry, "name": "rm", "epochs": 1,
            "batch_size": 4, "learning_rate": 1e-3,
            "kafka": {"bootstrap_servers": kafka.bootstrap_servers[0], "topic_prefix": kafka.topic_prefix,
                      "session_timeout_ms": 6000}}))
        metrics_port = free_port()
        # --reward-metrics is what arbiter up passed before GetShadow: accepted and ignored.
        command = ["rm", "loop", "--train-config", str(config_file),
                   "--reward", server.target, "--reward-metrics", "http://127.0.0.1:1/metrics",
                   "--retrain-preferences", "6",
                   "--holdout-fraction", "0.5", "--min-holdout", "1", "--accuracy-tolerance", "1",
                   "--shadow-timeout-s", "0.5", "--check-interval-s", "0.1", "--metrics-port", str(metrics_port)]
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        seen: dict = {}

        def stop_after_the_round() -> None:
            try:
                wait_until(lambda: len(registry.versions("rm")) == 2
                           and registry.versions("rm")[1].loop_record().get("status") == "rejected", 120,
                           "the command's round")
                seen["page"] = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                                      timeout=10).read().decode()
            except BaseException as err:  # reported by the test thread below
                seen["error"] = err
            finally:
                # Only once the command handles SIGTERM (pytest's own handler would end the session).
                wait_until(lambda: signal.getsignal(signal.SIGTERM) is not handlers[signal.SIGTERM], 60,
                           "the command's SIGTERM handler")
                os.kill(os.getpid(), signal.SIGTERM)

        caplog.set_level(logging.INFO)
        stopper = threading.Thread(target=stop_after_the_round, daemon=True)
        stopper.start()
        try:
            assert cli_main(command) == 0
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            stopper.join(timeout=60)
        assert "error" not in seen, seen.get("error")
        assert 'arbiter_rm_loop_candidates_total{outcome="rejected"} 1.0' in seen["page"]
        assert "arbiter_rm_loop_candidates_since_active 2.0" in seen["page"]  # v1 abandoned, v2 rejected
        assert "candidate v2: not promoted, kept loaded but inactive" in caplog.text
        assert "--reward-metrics is deprecated and ignored" in caplog.text
        v1_again, v2 = registry.versions("rm")
        # v1 never finished its gates: abandoned, so its preferences went into v2.
        assert v1_again.loop_record()["status"] == "abandoned"
        lineage = v2.metadata()["lineage"]
        assert lineage["preference_offsets"] == {wire: {"0": [6, 12]}}
        assert lineage["preferences"]["read"] == 6 and lineage["carried_over"] == ["v1"]
        assert ids(v2.path / "preferences.jsonl") == ["p10", "p6", "p8"]
        assert ids(v2.path / "holdout.jsonl") == ["p1", "p11", "p3", "p5", "p7", "p9"]
        # Trained on p0, p2, p4 (carried) and p6, p8, p10: each once; evaluated on the six held out.
        metrics = v2.metadata()["metrics"]
        assert (metrics["train_examples"], metrics["eval_examples"]) == (6, 6)
        assert v2.loop_record()["failed_gate"] == "shadow_samples"
        assert committed(kafka) == 12


def test_stack_component_flags_parse_and_let_the_reward_service_load_from_the_registry(tiny_models, tmp_path):
    import argparse

    from arbiter.config import from_flags
    from arbiter.rm.config import load_config
    from services.rm_loop import add_arguments
    from services.stack import Stack, StackConfig, service_args

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Hi"}\n')
    config = StackConfig(policy_model=str(tiny_models["policy"]), reward_model=str(tiny_models["reward"]),
                         prompts_file=str(prompts), workdir=str(tmp_path / "stack"),
                         rm_loop={"retrain_preferences": 50, "watch_s": 120, "train": {"epochs": 2}})
    registry = tmp_path / "stack" / "rm-registry"
    args = service_args(config, "reward", tiny_models["reward"], 5001, 9101)
    assert args[args.index("--model-roots", args.index("--model-roots") + 1) + 1] == str(registry)
    stack = Stack(config)
    stack.workdir.mkdir(parents=True)
    stack.replica_targets["reward"], stack.metrics_ports["reward"] = "127.0.0.1:5001", 9101
    flags = stack._rm_loop_args()
    assert flags[:2] == ["rm", "loop"]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    settings = from_flags(RMLoopSettings, parser.parse_args(flags[2:]))
    assert settings.reward == ("127.0.0.1:5001",)
    assert (settings.retrain_preferences, settings.watch_s, settings.metrics_port) == (50, 120.0, 9106)
    train = load_config(settings.train_config)
    assert (train.model_dir, train.registry, train.epochs) == (str(tiny_models["reward"].resolve()), str(registry), 2)


# -- the PPO trainer across reward-model swaps (raw scores, per-version moments) --


def test_versioned_moments_by_hand():
    from trainer.ppo_math import VersionedMoments

    moments = VersionedMoments()
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    # A promoted version scoring on another scale: 100x + 50. Each version's
    # own moments make both z-scores: (x - 2.5) / std, std = sqrt(5/3).
    moments.update(x, ["v1"] * 4)
    moments.update(100 * x + 50, ["v2"] * 4)
    z = (x - 2.5) / math.sqrt(5 / 3)
    assert moments.normalize(x, ["v1"] * 4) == pytest.approx(z.tolist(), abs=1e-6)
    assert moments.normalize(100 * x + 50, ["v2"] * 4) == pytest.approx(z.tolist(), abs=1e-6)
    # A batch mixing versions: row by row, each with its own version's moments.
    mixed = moments.normalize(torch.tensor([1.0, 450.0]), ["v1", "v2"])
    assert mixed.tolist() == pytest.approx([z[0].item(), z[3].item()], abs=1e-6)
    # A version's first lone score gives no reward signal.
    moments.update(torch.tensor([7.0]), ["v3"])
    assert moments.normalize(torch.tensor([7.0]), ["v3"]).tolist() == [0.0]
    assert moments.count == 9
    # A checkpoint from before per-version moments: the first version seen adopts its one set.
    legacy = VersionedMoments()
    legacy.load_state_dict({"mean": 2.5, "var": 1.25, "count": 4})
    legacy.update(torch.tensor([2.5]), ["v1"])
    assert legacy.versions["v1"].state_dict() == {"mean": 2.5, "var": 1.0, "count": 5}
    restored = VersionedMoments()
    restored.load_state_dict(moments.state_dict())
    assert restored.state_dict() == moments.state_dict()


def test_ppo_goes_on_across_a_reward_model_promotion_on_the_new_scale(tiny_models, tmp_path):
    from arbiter.stream import KafkaSettings
    from trainer.batch import Trajectory, collate
    from trainer.config import config_from_dict as trainer_config
    from trainer.loop import PPOTrainer
    from trainer.ppo_math import VersionedMoments
    from trainer.step import reward_scores

    from tests.rollout_fixtures import sample_trajectories

    config = trainer_config({"model_dir": str(tiny_models["policy"]), "output_dir": str(tmp_path / "run"), "ppo": {
        "batch_size": 16, "minibatch_size": 8, "epochs": 2, "learning_rate": 1e-2,
        "kl": {"mode": "fixed", "init_coef": 0.01}}})
    trainer = PPOTrainer(config, KafkaSettings())

    def scored(seed: int, version: str, scale: float = 1.0, shift: float = 0.0) -> list[Trajectory]:
        sampled = sample_trajectories(trainer.model.lm, trainer.model.tokenizer, 16, seed=seed)
        return [Trajectory(**{**t.__dict__, "reward": scale * t.reward + shift, "reward_model_version": version})
                for t in sampled]

    # Two updates under rm-v1, then rm-v2 is promoted: the same ordering, 100x the scale, shifted by 1000.
    batches = [scored(1, "rm-v1"), scored(2, "rm-v1"), scored(3, "rm-v2", 100.0, 1000.0)]
    stats = [trainer.train_on(batch).stats for batch in batches]
    # rm-v2's first batch defines its moments: its normalized rewards have mean 0, as rm-v1's first did.
    assert stats[0].reward_normalized == pytest.approx(0.0, abs=1e-5)
    assert stats[2].reward_normalized == pytest.approx(0.0, abs=1e-5)
    assert stats[2].skipped_steps == 0
    assert stats[2].value_loss <= 3 * max(stats[0].value_loss, stats[1].value_loss)

    # One set of moments for every version (what the trainer did before) would
    # have moved rm-v2's rewards by sqrt(n1/n2 * (n-1)/n) standard deviations
    # (n1 = 32 rm-v1 scores, n2 = 16 far away, n = 48), flattening their spread.
    single, cfg = VersionedMoments(), config.ppo
    for batch in batches:
        scores = reward_scores(collate([Trajectory(**{**t.__dict__, "reward_model_version": ""}) for t in batch], 0),
                               single, cfg)
    assert scores.mean().item() == pytest.approx(math.sqrt(32 / 16 * 47 / 48), abs=0.01)
    assert scores.std().item() < 0.2
