"""``arbiter up`` supervised, with real processes: killed components come back
on their ports while the rest keep running, restarts are counted and logged,
the restart budget stops the stack; the durable local broker keeps records and
committed offsets through kill -9 (of Tansu and of its object store) and a
restart from its data directory; a following policy replica says SERVING only
once it serves the newest published version; a replicated stack (2 policy
and 2 reward replicas, 2 workers, 2 rollout partitions, a 2-rank trainer) trains, every replica
serves the newest version and is listed in the generated scrape config."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
import threading
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import BackgroundServer, drain, wait_until
from lm_fixtures import perturbed
from prometheus_client import CollectorRegistry

from arbiter.hf import weights_sha256
from arbiter.net import free_port
from arbiter.stream import StreamConsumer, StreamProducer, ensure_topics, topics
from arbiter.stream.broker import LocalBroker
from arbiter.v1 import rollout_pb2
from services.policy.client import PolicyClient
from services.policy.server import create_server
from services.policy.settings import PolicySettings
from services.reference.server import create_server as create_reference_server
from services.reference.settings import ReferenceSettings
from services.placement import Placement, format_cores, plan_placement, resolve_placement, share_placement
from services.stack import (METRICS_PORTS, BrokerComponent, ManagedProcess, Stack, StackConfig, StackError, Supervisor,
                            scrape_config, service_args, worker_args)

SERVING = health_pb2.HealthCheckResponse.SERVING


def health(target: str) -> int | None:
    with grpc.insecure_channel(target) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status
        except grpc.RpcError:
            return None


def restarts(registry: CollectorRegistry, component: str) -> float:
    return registry.get_sample_value("arbiter_stack_restarts_total", {"component": component})


def supervision(**overrides) -> StackConfig:
    """Supervision settings only (the model paths are checked but unused)."""
    here = str(Path(__file__))
    return StackConfig(policy_model=here, reward_model=here, prompts_file=here, **overrides)


# -- arbiter up's supervision of real components --------------------------------


def cpus_allowed(pid: int) -> set[str]:
    """Cpus_allowed_list of every thread of process ``pid`` (torch's, gRPC's...)."""
    out = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        out.add(next(line.split(":", 1)[1].strip() for line in status.splitlines() if line.startswith("Cpus_allowed_list")))
    return out


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def test_killed_components_restart_and_the_budget_stops_the_stack(tiny_models, kafka_settings, tmp_path, caplog):
    """The reward service and a worker run as ``arbiter up`` runs them (spawned
    by the stack: same flags, environment, placement and supervisor); policy
    and reference are in-process servers here, so the test pays for two
    process start-ups, not five. Each child (every thread of it, a restarted
    one too) runs on the cores its placement names, with its torch threads."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("Say:", "Now:", "Hello", "Go on")))
    cores = sorted(os.sched_getaffinity(0))
    reward_core, worker_core = cores[-1], cores[0]
    config = StackConfig(
        policy_model=str(tiny_models["policy"]), reward_model=str(tiny_models["reward"]), prompts_file=str(prompts),
        topic_prefix=kafka_settings.topic_prefix, worker={"samples_per_prompt": 2, "max_new_tokens": 2},
        workdir=str(tmp_path / "stack"),
        placement={"reward": {"cores": [reward_core], "threads": 2}, "worker": {"cores": str(worker_core)}},
        # One restart per component: the second death of one ends the stack.
        restart_budget=1, restart_window_s=300, restart_backoff_s=0.2,
    )
    ensure_topics(kafka_settings, dict(topics.DEFAULT_PARTITIONS))
    stack = Stack(config)
    stack.bootstrap = ",".join(kafka_settings.bootstrap_servers)
    stack.logs.mkdir(parents=True)
    caplog.set_level(logging.INFO, logger="services.stack")
    policy = PolicySettings(model_dir=str(tiny_models["policy"]), port=0, grace_seconds=0.5)
    reference = ReferenceSettings(model_dir=str(tiny_models["policy"]), port=0, grace_seconds=0.5)
    with BackgroundServer(lambda: create_server(policy)) as policy_server, \
            BackgroundServer(lambda: create_reference_server(reference)) as reference_server:
        targets = {"policy": policy_server.target, "reference": reference_server.target,
                   "reward": f"127.0.0.1:{free_port()}"}
        registry = CollectorRegistry()
        components = stack.processes
        supervisor = None
        try:
            reward = stack._spawn("reward", service_args(config, "reward", tiny_models["reward"],
                                                         int(targets["reward"].split(":")[1]), None, 2), always=True)
            wait_until(lambda: health(targets["reward"]) == SERVING, 120, "the reward service")
            worker = stack._spawn("worker-0", worker_args(config, 0, targets, None), always=False)
            # Serving: torch, gRPC and Kafka threads all exist by now.
            assert cpus_allowed(reward.proc.pid) == {str(reward_core)}
            assert environ(reward.proc.pid)["OMP_NUM_THREADS"] == "2"
            assert "--torch-threads 2" in " ".join(reward.argv)
            with StreamConsumer(kafka_settings, [topics.ROLLOUTS], None) as rollouts:
                drain(rollouts, 1, 120, idle_polls=0)  # the worker works
                supervisor = Supervisor(components, config, registry).start()
                first = {"reward": reward.proc.pid, "worker-0": worker.proc.pid}
                os.kill(first["worker-0"], signal.SIGKILL)
                os.kill(first["reward"], signal.SIGKILL)
                wait_until(lambda: restarts(registry, "worker-0") == 1 and restarts(registry, "reward") == 1, 30,
                           "the worker and the reward service to be restarted")
                assert (reward.proc.pid, worker.proc.pid) != (first["reward"], first["worker-0"])
                # Back on the same port, and the restarted worker produces again.
                wait_until(lambda: health(targets["reward"]) == SERVING, 120, "the restarted reward service")
                before = rollouts.stats().records
                drain(rollouts, 1, 120, idle_polls=0)
                assert rollouts.stats().records > before
                assert cpus_allowed(reward.proc.pid) == {str(reward_core)}
                assert cpus_allowed(worker.proc.pid) == {str(worker_core)}
                assert environ(worker.proc.pid)["OMP_NUM_THREADS"] == "1"
            assert supervisor.failure is None
            assert registry.get_sample_value("arbiter_stack_component_up", {"component": "reward"}) == 1

            # A second death of the reward service exceeds its budget: the supervisor gives up.
            os.kill(reward.proc.pid, signal.SIGKILL)
            wait_until(lambda: supervisor.failure, 30, "the supervisor to give up")
            message = str(supervisor.failure)
            assert message.startswith("reward was killed by signal 9 (SIGKILL) and was already restarted 1 times "
                                      "within 300s (restart_budget 1): giving up")
            assert restarts(registry, "reward") == 1
            assert registry.get_sample_value("arbiter_stack_component_up", {"component": "reward"}) == 0
        finally:
            if supervisor is not None:
                supervisor.stop()
            for component in components:
                component.stop()
    messages = [r.getMessage() for r in caplog.records]
    assert "worker-0 was killed by signal 9 (SIGKILL): restart 1 of 1 allowed within 300s, in 0.2s" in messages


def test_stack_check_alive_raises_what_the_supervisor_gave_up_on(tmp_path):
    stack = Stack(supervision(workdir=str(tmp_path), restart_budget=0, metrics_ports={"stack": 0}))
    stack.processes.append(python("raise SystemExit(2)", tmp_path, "trainer", always=False))
    stack._supervise()
    try:
        with pytest.raises(StackError, match="trainer exited with status 2 and was already restarted 0 times"):
            wait_until(lambda: stack.check_alive(), 30, "the stack to give up")
        url = f"http://127.0.0.1:{stack.metrics_ports['stack']}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        assert 'arbiter_stack_restarts_total{component="trainer"} 0.0' in text
        assert 'arbiter_stack_component_up{component="trainer"} 0.0' in text
    finally:
        stack.stop()


# -- the supervisor's rules, on tiny real processes ---------------------------------


def python(code: str, tmp_path: Path, name: str, *, always: bool) -> ManagedProcess:
    process = ManagedProcess(name, [sys.executable, "-c", code], tmp_path / f"{name}.log", dict(os.environ),
                             always=always)
    process.start()
    return process


def test_backoff_doubles_exit_zero_ends_a_job_and_the_budget_names_the_component(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="services.stack")
    crasher = python("print('bad config'); raise SystemExit(3)", tmp_path, "crasher", always=True)
    job = python("pass", tmp_path, "job", always=False)
    registry = CollectorRegistry()
    config = supervision(restart_budget=3, restart_window_s=300, restart_backoff_s=0.1, restart_backoff_max_s=0.3)
    supervisor = Supervisor([crasher, job], config, registry).start()
    try:
        wait_until(lambda: supervisor.failure, 30, "the crasher to exhaust its budget")
    finally:
        supervisor.stop()
    # Three restarts (delays 0.1, 0.2, then capped at 0.3), the fourth death ends it.
    assert restarts(registry, "crasher") == 3
    assert restarts(registry, "job") == 0
    delays = [r.getMessage().rsplit(" in ", 1)[1] for r in caplog.records
              if r.levelno == logging.WARNING and r.getMessage().startswith("crasher exited")]
    assert delays == ["0.1s", "0.2s", "0.3s"]
    message = str(supervisor.failure)
    assert message.startswith("crasher exited with status 3 and was already restarted 3 times within 300s")
    assert "bad config" in message  # the log tail
    assert "job finished (exit status 0): not restarted" in [r.getMessage() for r in caplog.records]


def test_stop_training_stops_workers_and_trainer_for_good_and_leaves_the_services(tmp_path):
    stack = Stack(supervision(workdir=str(tmp_path), restart_backoff_s=0.1, metrics_ports={"stack": 0}))
    forever = "import time\nwhile True: time.sleep(1)"
    for name, always in (("worker-0", False), ("trainer", False), ("reward", True)):
        stack.processes.append(python(forever, tmp_path, name, always=always))
    stack._supervise()
    supervisor = stack.supervisor
    passes = threading.Semaphore(0)
    watch = supervisor._watch

    def counted(component) -> None:
        watch(component)
        if component.name == "reward":
            passes.release()

    supervisor._watch = counted
    try:
        stack.stop_training()
        assert [p.alive() for p in stack.processes] == [False, False, True]
        # SIGTERM ends these sleepers with a failure status, which the
        # supervisor would restart: two full passes later it has not.
        for _ in range(2):
            assert passes.acquire(timeout=10)
        assert [p.alive() for p in stack.processes] == [False, False, True]
        assert restarts(stack.registry, "trainer") == restarts(stack.registry, "worker-0") == 0
        assert stack.registry.get_sample_value("arbiter_stack_component_up", {"component": "reward"}) == 1
        stack.check_alive()
    finally:
        stack.stop()


def test_supervision_settings_are_checked():
    for overrides, fragment in (
        ({"broker_storage": "disk"}, "broker_storage='disk' is invalid: must be one of s3, memory"),
        ({"restart_budget": -1}, "restart_budget=-1 is invalid"),
        ({"restart_backoff_s": 2.0, "restart_backoff_max_s": 1.0}, "restart_backoff_max_s=1.0 is invalid"),
        ({"replicas": {"trainer": 2}, "rollout_partitions": 1},
         "replicas.trainer=2 is invalid: at most rollout_partitions (1) ranks"),
        ({"replicas": {"trainer": 2}, "rollout_partitions": 2, "trainer": {"parallel": "none"}},
         "trainer.parallel='none' is invalid with replicas.trainer=2: must be ddp or fsdp"),
        ({"replicas": {"critic": 2}}, "replicas.critic is invalid: not a replicated component; the keys are policy, "
                                      "reward, reference, trainer"),
        ({"replicas": {"reward": 0}}, "replicas.reward=0 is invalid: must be an integer >= 1"),
        ({"replicas": [2]}, "replicas=[2] is invalid: must be a mapping with keys policy, reward, reference, trainer"),
        ({"workers": 0}, "workers=0 is invalid: must be an integer >= 1"),
        ({"rollout_partitions": 0}, "rollout_partitions=0 is invalid: must be an integer >= 1"),
        ({"prompt_source": "kafka"}, "prompt_source='kafka' is invalid: must be one of file, topic"),
        ({"prompt_backlog": -1}, "prompt_backlog=-1 is invalid"),
    ):
        with pytest.raises(StackError, match=re.escape(fragment)):
            supervision(**overrides)


# -- placement: cores and torch threads per component ------------------------------


def placed(plan: dict[str, Placement]) -> dict[str, tuple[str, int]]:
    """name -> ("first-last" cores, threads), as the expectations below are written."""
    def cores(p):
        return f"{p.cores[0]}-{p.cores[-1]}" if len(p.cores) > 1 else str(p.cores[0])
    return {name: (cores(p), p.threads) for name, p in plan.items()}


def test_two_cores_are_shared_by_every_component_one_torch_thread_each():
    # Fewer cores (2) than torch components (4): no pinning, 1 thread each.
    assert placed(plan_placement([0, 1])) == {name: ("0-1", 1) for name in
                                              ("policy", "trainer", "reward", "reference", "broker", "worker")}


def test_four_cores_give_each_torch_component_a_core_of_its_own():
    # Quotas 4*2/6, 4*2/6, 4/6, 4/6 = 1.33, 1.33, 0.67, 0.67: floors 1,1,0,0 and
    # the 2 cores left go to the largest remainders (reward, reference). Under 8
    # cores the broker and workers float over all of them.
    assert placed(plan_placement(range(4))) == {
        "policy": ("0", 1), "trainer": ("1", 1), "reward": ("2", 1), "reference": ("3", 1),
        "broker": ("0-3", 1), "worker": ("0-3", 1)}


def test_sixteen_cores_split_by_weight_with_two_cores_for_broker_and_workers():
    # 16 // 8 = 2 cores (14, 15) for the light components; 14 for torch:
    # quotas 4.67, 4.67, 2.33, 2.33 -> floors 4,4,2,2 (12), the 2 left to the
    # remainders .67 (policy, trainer) -> 5, 5, 2, 2.
    assert placed(plan_placement(range(16))) == {
        "policy": ("0-4", 5), "trainer": ("5-9", 5), "reward": ("10-11", 2), "reference": ("12-13", 2),
        "broker": ("14-15", 1), "worker": ("14-15", 1)}


def test_replicas_share_their_kind_s_cores_and_threads():
    # 16 cores: the policy has 0-4 with 5 threads. Two replicas: slices of 3
    # and 2 cores (largest remainder, ties to the first), threads 5*3//5, 5*2//5.
    policy = plan_placement(range(16))["policy"]
    assert [share_placement(policy, i, 2) for i in range(2)] == [Placement((0, 1, 2), 3), Placement((3, 4), 2)]
    # Fewer cores than replicas (2 cores, a laptop): all share them, threads
    # divided but never below 1.
    laptop = plan_placement([0, 1])["reward"]
    assert [share_placement(laptop, i, 3) for i in range(3)] == [Placement((0, 1), 1)] * 3
    assert share_placement(Placement((0, 1), 4), 1, 2) == Placement((1,), 2)
    assert share_placement(Placement(None, 4), 0, 2) == Placement(None, 2)


def test_placement_uses_the_cores_the_stack_may_use_not_cpu_ids_from_zero():
    # A stack itself confined to cores 8, 10, 12, 14: one each, in that order.
    plan = plan_placement({14, 8, 12, 10})
    assert [plan[n].cores for n in ("policy", "trainer", "reward", "reference")] == [(8,), (10,), (12,), (14,)]
    assert plan["worker"].cores == (8, 10, 12, 14)


def test_overrides_win_over_torch_threads_which_win_over_the_rule():
    plan = resolve_placement({"policy": {"cores": "0-1,3", "threads": 3}, "worker": {"cores": [2]}}, 2, range(4))
    assert plan["policy"] == Placement((0, 1, 3), 3)
    assert plan["trainer"] == Placement((1,), 2)  # the rule's core, torch_threads' count
    assert plan["worker"] == Placement((2,), 1)  # torch_threads is for torch components only
    off = resolve_placement({"mode": "off", "reward": {"cores": [1]}}, None, range(4))
    assert off["policy"] == Placement(None, 1) and off["reward"] == Placement((1,), 1)


def test_placement_settings_are_checked_up_front_naming_the_field():
    here = str(Path(__file__))
    available = format_cores(sorted(os.sched_getaffinity(0)))
    beyond = max(os.sched_getaffinity(0)) + 1
    for placement, torch_threads, message in (
        ({"gpu": {"threads": 1}}, None, "placement.gpu is invalid: not a component; the keys are mode and policy, "
                                        "trainer, reward, reference, broker, worker"),
        ({"mode": "pinned"}, None, "placement.mode='pinned' is invalid: must be one of auto, off"),
        ({"policy": {"cpus": [0]}}, None, "placement.policy.cpus is invalid: not a setting; one of cores, threads"),
        ({"policy": {"threads": 0}}, None, "placement.policy.threads=0 is invalid: must be an integer >= 1"),
        ({"trainer": {"cores": "3-1"}}, None, "placement.trainer.cores='3-1' is invalid: range 3-1 runs backwards"),
        ({"trainer": {"cores": "all"}}, None, "placement.trainer.cores='all' is invalid: expected CPU ids"),
        ({"reward": {"cores": [beyond]}}, None, f"placement.reward.cores=[{beyond}] is invalid: {beyond} is not among "
                                                f"the cores this stack may use ({available})"),
        ({"reward": 2}, None, "placement.reward=2 is invalid: must be a mapping with keys cores and/or threads"),
        ({}, 0, "torch_threads=0 is invalid: must be an integer >= 1 or null"),
    ):
        with pytest.raises(StackError) as caught:
            StackConfig(policy_model=here, reward_model=here, prompts_file=here, placement=placement,
                        torch_threads=torch_threads)
        assert str(caught.value).startswith(message), str(caught.value)


def test_workers_generate_ahead_of_the_trainer_up_to_its_staleness_bound():
    targets = {"policy": "h:1", "reward": "h:2", "reference": "h:3"}

    def flags(config: StackConfig) -> dict[str, str]:
        args = worker_args(config, 0, targets, None)
        return {name: args[args.index(name) + 1] for name in ("--max-staleness", "--trainer-batch-size")
                if name in args}

    # From the trainer's ppo section, or its defaults (max_staleness 2, batch_size 32).
    assert flags(supervision(trainer={"ppo": {"max_staleness": 3, "batch_size": 16}})) == {
        "--max-staleness": "3", "--trainer-batch-size": "16"}
    assert flags(supervision()) == {"--max-staleness": "2", "--trainer-batch-size": "32"}
    # A worker may hold itself to less, or to no bound at all.
    assert flags(supervision(worker={"max_staleness": 1})) == {"--max-staleness": "1", "--trainer-batch-size": "32"}
    assert flags(supervision(worker={"max_staleness": None})) == {"--trainer-batch-size": "32"}
    with pytest.raises(StackError, match=r"worker\.max_staleness=3 is invalid: must be <= trainer\.ppo\.max_staleness "
                       r"\(2\)"):
        supervision(worker={"max_staleness": 3})
    with pytest.raises(StackError, match=r"worker\.trainer_batch_size=8 is invalid: must be the trainer's "
                       r"ppo\.batch_size \(32\)"):
        supervision(worker={"trainer_batch_size": 8})
    with pytest.raises(StackError, match=r"worker\.max_rollouts_per_version is invalid: was removed"):
        supervision(worker={"max_rollouts_per_version": 32})


# -- the durable local broker ------------------------------------------------------


def prompt(i: int) -> rollout_pb2.PromptRecord:
    return rollout_pb2.PromptRecord(prompt_id=f"p{i}", text=f"prompt {i}")


def ids(records) -> list[str]:
    return [r.message.prompt_id for r in records]


def test_durable_broker_keeps_records_and_offsets_through_kill9_and_restart(tmp_path):
    data = tmp_path / "broker"
    broker = LocalBroker(log_path=tmp_path / "broker.log", storage="s3", data_dir=data).start()
    registry = CollectorRegistry()
    supervisor = None
    try:
        settings = broker.settings(topic_prefix="durable.", session_timeout_ms=2000, client_id="durable-test")
        ensure_topics(settings, {topics.PROMPTS: 4})
        with StreamProducer(settings) as producer:
            for i in range(40):
                producer.send(topics.PROMPTS, prompt(i))
            producer.flush()
        with StreamConsumer(settings, [topics.PROMPTS], "g") as consumer:
            first = drain(consumer, 40, idle_polls=0)
            # Commit part of each partition: up to (and including) its 5th record.
            offsets = {}
            for record in first:
                if record.offset < 5:
                    offsets[record.topic_partition] = max(offsets.get(record.topic_partition, 0), record.offset + 1)
            consumer.commit(offsets)
        expected_rest = sorted(r.message.prompt_id for r in first if r.offset >= offsets[r.topic_partition])

        supervisor = Supervisor([BrokerComponent(broker, lambda: None)],
                                supervision(restart_budget=5, restart_backoff_s=0.1), registry).start()
        os.kill(broker.pid, signal.SIGKILL)
        wait_until(lambda: restarts(registry, "broker") == 1 and broker.running(), 60, "Tansu to be restarted")
        os.kill(broker.store.pid, signal.SIGKILL)
        wait_until(lambda: restarts(registry, "broker") == 2 and broker.running(), 60, "the object store to be restarted")

        with StreamConsumer(settings, [topics.PROMPTS], "g") as consumer:
            rest = drain(consumer, len(expected_rest))
        assert sorted(ids(rest)) == expected_rest
        supervisor.stop()
        broker.stop()

        # A stack restart: a new broker on the same data directory.
        broker = LocalBroker(log_path=tmp_path / "broker2.log", storage="s3", data_dir=data).start()
        settings = broker.settings(topic_prefix="durable.", session_timeout_ms=2000, client_id="durable-test")
        with StreamConsumer(settings, [topics.PROMPTS], "g") as consumer:
            assert consumer.committed(offsets) == offsets
        with StreamConsumer(settings, [topics.PROMPTS], "h") as consumer:
            everything = drain(consumer, 40)
        assert sorted(ids(everything)) == sorted(f"p{i}" for i in range(40))
        assert len({r.partition for r in everything}) == 4
    finally:
        if supervisor is not None:
            supervisor.stop()
        broker.stop()


# -- readiness -------------------------------------------------------------------


def test_following_replica_is_not_serving_until_it_serves_the_newest_version(tiny_models, kafka_settings, tmp_path,
                                                                            model_roots):
    v1 = perturbed(tiny_models["policy"], tmp_path / "v1", version="v1")
    ensure_topics(kafka_settings, {topics.POLICY_UPDATES: 1})
    update = rollout_pb2.PolicyUpdate(policy_version="v1", checkpoint_path=str(v1), training_step=1,
                                      parent_version="v0", weights_sha256=weights_sha256(v1))
    with StreamProducer(kafka_settings) as producer:
        producer.send(topics.POLICY_UPDATES, update)
        producer.flush()
    # A replica (re)started after v1 was published, from the base weights v0.
    settings = PolicySettings(
        model_dir=str(tiny_models["policy"]), port=0, follow_updates=True, replica_id="late", kafka=kafka_settings,
        grace_seconds=1.0, model_roots=model_roots,
    )
    with BackgroundServer(lambda: create_server(settings)) as server, PolicyClient(server.target) as client:
        # Loaded and answering on v0, but not ready until it has read the topic.
        assert client.info().version == "v0"
        assert health(server.target) == health_pb2.HealthCheckResponse.NOT_SERVING
        wait_until(lambda: health(server.target) == SERVING, 60, "the replica to become ready")
        assert client.info().version == "v1"


# -- a replicated stack ------------------------------------------------------------


def served_version(target: str) -> str:
    from arbiter.v1 import common_pb2, common_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = common_pb2_grpc.ModelServiceStub(channel)
        return stub.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=10).info.version


def scores_served(metrics_port: int) -> float:
    """Score RPCs a reward replica answered, from its /metrics page."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as page:
        text = page.read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "arbiter_requests_total" and sample.labels.get("method") == "Score")


def test_replicated_stack_trains_and_every_replica_serves_and_is_scraped(tiny_models, tmp_path):
    import shutil
    import subprocess

    import yaml

    from arbiter.stream import KafkaSettings

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("Say:", "Now:", "Hello", "Go on", "Tell")))
    config = StackConfig(
        policy_model=str(tiny_models["policy"]), reward_model=str(tiny_models["reward"]), prompts_file=str(prompts),
        workdir=str(tmp_path / "stack"), broker_storage="memory", replicas={"policy": 2, "reward": 2, "trainer": 2},
        workers=2,
        rollout_partitions=2, metrics_ports={name: 0 for name in METRICS_PORTS},
        worker={"samples_per_prompt": 2, "prompts_per_call": 2, "max_new_tokens": 2},
        trainer={"max_updates": 2, "ppo": {"batch_size": 8, "minibatch_size": 8, "epochs": 1, "max_staleness": 1}},
    )
    history = tmp_path / "stack" / "trainer" / "history.jsonl"

    def updates(stack: Stack) -> int:
        stack.check_alive()  # a component the supervisor gave up on fails the test now
        return len(history.read_text().splitlines()) if history.exists() else 0

    with Stack(config) as stack:
        assert stack.targets["policy"] == "ipv4:" + ",".join(stack.replica_targets[f"policy-{i}"] for i in range(2))
        assert stack.targets["reward"].startswith("ipv4:") and stack.targets["reference"].count(":") == 1
        wait_until(lambda: updates(stack) >= 2, 240, lambda: f"2 updates (got {updates(stack)})", interval_s=0.5)
        for i in range(2):  # each follows policy-updates on its own
            wait_until(lambda: served_version(stack.replica_targets[f"policy-{i}"]) == "ppo-2", 60,
                       f"policy-{i} to serve ppo-2", interval_s=0.5)
        # The workers' round robin reached both reward replicas.
        assert all(scores_served(stack.metrics_ports[f"reward-{i}"]) > 0 for i in range(2))
        settings = KafkaSettings(bootstrap_servers=stack.bootstrap, topic_prefix=config.topic_prefix)
        with StreamConsumer(settings, [topics.ROLLOUTS], None) as consumer:
            rollouts = drain(consumer, 16, 60, idle_polls=0)
        # Both workers got prompts from the group, and a group's samples share a partition.
        assert {r.message.worker_id for r in rollouts} == {"worker-0", "worker-1"}
        partitions: dict[str, set[int]] = {}
        for r in rollouts:
            partitions.setdefault(r.message.group_id, set()).add(r.partition)
        assert all(len(p) == 1 for p in partitions.values()) and {r.partition for r in rollouts} <= {0, 1}
        assert ensure_topics(settings, {topics.ROLLOUTS: 1}) == {topics.ROLLOUTS: 2}

        written = yaml.safe_load(stack.scrape_config_path.read_text())
        assert written == scrape_config(stack.metrics_ports)
        listed = {(job["job_name"], target["labels"]["replica"], target["targets"][0])
                  for job in written["scrape_configs"] for target in job["static_configs"]}
        expected = {("arbiter-stack", "stack"), ("arbiter-reference", "reference"),
                    *((f"arbiter-{kind}", f"{kind}-{i}") for kind in ("policy", "reward", "worker", "trainer")
                      for i in range(2))}
        assert {(job, replica) for job, replica, _ in listed} == expected
        for job, replica, target in listed:
            assert target == f"127.0.0.1:{stack.metrics_ports[replica]}"
            if replica.startswith("trainer"):
                continue  # done, or stopping: it exits after max_updates
            with urllib.request.urlopen(f"http://{target}/metrics", timeout=5) as page:
                assert page.status == 200, (job, replica)
    # The trainer ran as one job of two ranks, each checkpointing its RNG.
    from trainer.checkpoint import latest_checkpoint
    checkpoint = latest_checkpoint(tmp_path / "stack" / "trainer" / "checkpoints")
    assert {p.name for p in checkpoint.glob("rng-*.pt")} == {"rng-0.pt", "rng-1.pt"}
    static = yaml.safe_load((Path(__file__).resolve().parents[1] / "infra" / "prometheus" / "prometheus.yml")
                            .read_text())
    assert {job for job, _, _ in listed} <= {job["job_name"] for job in static["scrape_configs"]}
    assert shutil.which("promtool"), "promtool is missing: `make test` installs Debian's prometheus package"
    check = subprocess.run(["promtool", "check", "config", str(stack.scrape_config_path)], capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0 and "SUCCESS" in check.stdout + check.stderr, check.stdout + check.stderr


def test_the_rm_loop_gets_every_reward_replica_and_every_metrics_port_a_scrape_job(tiny_models, tmp_path):
    import argparse

    import yaml

    from arbiter.config import from_flags
    from arbiter.rm.loop import RMLoopSettings
    from services.rm_loop import add_arguments

    here = str(Path(__file__))
    config = StackConfig(policy_model=here, reward_model=str(tiny_models["reward"]), prompts_file=here,
                         workdir=str(tmp_path / "stack"), replicas={"reward": 2}, rm_loop={"watch_s": 60})
    assert config.replica_names("reward") == ["reward-0", "reward-1"] and config.replica_names("policy") == ["policy"]
    stack = Stack(config)
    stack.workdir.mkdir(parents=True)
    stack.replica_targets.update({"reward-0": "127.0.0.1:5001", "reward-1": "127.0.0.1:5002"})
    stack.metrics_ports.update({"reward-0": 9101, "reward-1": 9201})
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    settings = from_flags(RMLoopSettings, parser.parse_args(stack._rm_loop_args()[2:]))
    assert settings.reward == ("127.0.0.1:5001", "127.0.0.1:5002")

    jobs = {job["job_name"]: [(t["labels"]["replica"], t["targets"]) for t in job["static_configs"]]
            for job in scrape_config({**stack.metrics_ports, "stack": 9100})["scrape_configs"]}
    assert jobs == {"arbiter-reward": [("reward-0", ["127.0.0.1:9101"]), ("reward-1", ["127.0.0.1:9201"])],
                    "arbiter-rm-loop": [("rm-loop", [f"127.0.0.1:{METRICS_PORTS['rm-loop']}"])],
                    "arbiter-stack": [("stack", ["127.0.0.1:9100"])]}
    static = yaml.safe_load((Path(__file__).resolve().parents[1] / "infra" / "prometheus" / "prometheus.yml")
                            .read_text())
    assert set(jobs) <= {job["job_name"] for job in static["scrape_configs"]}


def test_the_reward_section_passes_flags_the_reward_service_accepts(tmp_path):
    """`reward:` in the stack YAML (e.g. a reward spec for composite rewards)
    reaches `arbiter serve reward` as flags its real parser accepts."""
    from cli.main import parse_args

    spec = tmp_path / "spec.yaml"
    config = supervision(reward={"reward_spec_file": str(spec), "stack_ensembles": "never", "dynamic_batching": False})
    args = service_args(config, "reward", tmp_path / "rm", 50051, None)
    assert args[args.index("--reward-spec-file") + 1] == str(spec)
    assert args[args.index("--stack-ensembles") + 1] == "never"
    assert "--dynamic-batching" not in args  # False: the flag is left out, the default applies
    parsed = parse_args(args)
    assert (parsed.reward_spec_file, parsed.stack_ensembles) == (str(spec), "never")
    assert "--reward-spec-file" not in service_args(config, "reference", tmp_path / "rm", 50053, None)


def test_the_reference_section_passes_flags_the_reference_service_accepts(tmp_path):
    from cli.main import parse_args

    config = supervision(reference={"model_process": True, "compile": True, "max_batch_size": 16})
    args = service_args(config, "reference", tmp_path / "policy", 50053, None)
    assert "--model-process" in args and args[args.index("--max-batch-size") + 1] == "16"
    parsed = parse_args(args)
    assert parsed.model_process and parsed.compile and parsed.max_batch_size == 16
    assert "--model-process" not in service_args(config, "reward", tmp_path / "rm", 50051, None)
