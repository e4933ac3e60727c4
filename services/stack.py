"""``arbiter up``: the whole RLHF loop as separate processes, as deployed.

Broker (a local Tansu unless ``kafka_bootstrap`` names a real cluster), the
reward, reference and policy services (the policy follows policy-updates and
hot-swaps), rollout workers and the PPO trainer. Each process logs to
``WORKDIR/logs/NAME.log``; Ctrl-C (or SIGTERM) stops them in reverse order,
each given time to drain before it is killed.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

log = logging.getLogger(__name__)

# Default metrics ports: the ones infra/prometheus/prometheus.yml scrapes.
METRICS_PORTS = {"reward": 9101, "policy": 9102, "reference": 9103, "worker": 9104, "trainer": 9105}

from arbiter.net import free_port


class StackError(RuntimeError):
    pass



@dataclass(frozen=True)
class StackConfig:
    policy_model: str = ""
    reward_model: str = ""
    # The frozen reference; default: the initial policy.
    reference_model: str | None = None
    prompts_file: str = ""
    workdir: str = "runs/stack"
    # None: start a local Tansu broker (dev); otherwise the cluster to use.
    kafka_bootstrap: str | None = None
    topic_prefix: str = ""
    # gRPC ports (0: pick free ones) and metrics ports (None: defaults above; 0: free).
    policy_port: int = 0
    reward_port: int = 0
    reference_port: int = 0
    metrics: bool = True
    metrics_ports: dict[str, int] = field(default_factory=dict)
    workers: int = 1
    # Extra flags per worker, e.g. {"samples_per_prompt": 4, "max_new_tokens": 24, "gold": "vader"}.
    worker: dict[str, Any] = field(default_factory=dict)
    # Trainer config fields (trainer/config.py); model_dir, output_dir and kafka are filled in.
    trainer: dict[str, Any] = field(default_factory=dict)
    torch_threads: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("policy_model", "reward_model", "prompts_file"):
            if not getattr(self, name):
                raise StackError(f"{name} is required")
            if not Path(getattr(self, name)).exists():
                raise StackError(f"{name}={getattr(self, name)!r} does not exist")
        if self.workers < 1:
            raise StackError(f"workers={self.workers} is invalid: must be >= 1")


def load_stack_config(path: str | Path, **overrides: Any) -> StackConfig:
    data = yaml.safe_load(Path(path).read_text()) or {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return StackConfig(**data)
    except TypeError as err:
        raise StackError(f"{path}: {err}") from err


class ManagedProcess:
    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str]):
        self.name = name
        self.log_path = log_path
        self._log = log_path.open("a")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0fs: killing it", self.name, timeout_s)
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class Stack:
    def __init__(self, config: StackConfig):
        self.config = config
        self.workdir = Path(config.workdir).resolve()
        self.logs = self.workdir / "logs"
        self.processes: list[ManagedProcess] = []
        self.broker = None
        self.targets: dict[str, str] = {}
        self.metrics_ports: dict[str, int] = {}
        self.bootstrap = config.kafka_bootstrap

    # -- lifecycle -----------------------------------------------------------

    def env(self) -> dict[str, str]:
        c = self.config
        return {
            **os.environ,
            "ARBITER_LOG_LEVEL": os.environ.get("ARBITER_LOG_LEVEL", "INFO"),
            "ARBITER_KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "ARBITER_KAFKA_TOPIC_PREFIX": c.topic_prefix,
            "OMP_NUM_THREADS": str(c.torch_threads),
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }

    def _metrics_port(self, name: str) -> int:
        c = self.config
        port = c.metrics_ports.get(name, METRICS_PORTS[name])
        return port or free_port()

    def _spawn(self, name: str, args: list[str]) -> ManagedProcess:
        process = ManagedProcess(name, [sys.executable, "-m", "cli", *args], self.logs / f"{name}.log", self.env())
        self.processes.append(process)
        return process

    def start(self, wait_s: float = 300.0) -> Stack:
        c = self.config
        self.logs.mkdir(parents=True, exist_ok=True)
        try:
            self._start_broker()
            from arbiter.stream import KafkaSettings, ensure_topics, topics

            ensure_topics(KafkaSettings(bootstrap_servers=self.bootstrap, topic_prefix=c.topic_prefix),
                          dict(topics.DEFAULT_PARTITIONS))
            services = {
                "reward": (c.reward_model, c.reward_port, []),
                "reference": (c.reference_model or c.policy_model, c.reference_port, []),
                "policy": (c.policy_model, c.policy_port, ["--follow-updates"]),
            }
            for name, (model, port, extra) in services.items():
                port = port or free_port()
                self.targets[name] = f"127.0.0.1:{port}"
                args = ["serve", name, "--model", str(model), "--port", str(port), "--torch-threads", str(c.torch_threads)]
                if c.metrics:
                    self.metrics_ports[name] = self._metrics_port(name)
                    args += ["--metrics-port", str(self.metrics_ports[name])]
                self._spawn(name, args + extra)
            for name in services:
                self._wait_healthy(name, wait_s)
            trainer = ["train", "ppo", "--config", str(self._write_trainer_config())]
            if self.broker is not None:
                # A fresh in-memory broker: a resumed checkpoint's offsets refer
                # to topics that died with the previous one.
                trainer.append("--reset-offsets")
            self._spawn("trainer", trainer)
            for i in range(c.workers):
                self._spawn(f"worker-{i}", self._worker_args(i))
            self._wait_for_log("trainer", "trainer ready", wait_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_broker(self) -> None:
        if self.bootstrap:
            return
        from arbiter.stream.broker import LocalBroker

        self.broker = LocalBroker(log_path=self.logs / "broker.log").start()
        self.bootstrap = self.broker.bootstrap_servers

    def _write_trainer_config(self) -> Path:
        c = self.config
        config = {
            "model_dir": str(Path(c.policy_model).resolve()),
            "output_dir": str(self.workdir / "trainer"),
            "seed": c.seed,
            "torch_threads": c.torch_threads,
            **({"metrics_port": self._metrics_port("trainer")} if c.metrics else {}),
            **c.trainer,
            # Connection comes from the stack's environment (ARBITER_KAFKA_*).
            "kafka": {"session_timeout_ms": 6000, **c.trainer.get("kafka", {})},
        }
        if c.metrics:
            self.metrics_ports["trainer"] = config["metrics_port"]
        path = self.workdir / "trainer.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def _worker_args(self, index: int) -> list[str]:
        c = self.config
        args = ["worker", "--policy", self.targets["policy"], "--reward", self.targets["reward"],
                "--reference", self.targets["reference"], "--prompts", str(Path(c.prompts_file).resolve()),
                "--shuffle", "--seed", str(c.seed + 1000 * index), "--worker-id", f"worker-{index}"]
        if c.metrics:
            port = self._metrics_port("worker") if index == 0 else free_port()
            self.metrics_ports[f"worker-{index}"] = port
            args += ["--metrics-port", str(port)]
        for key, value in c.worker.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                args.append(flag)
            elif value not in (False, None):
                args += [flag, str(value)]
        return args

    def _process(self, name: str) -> ManagedProcess:
        return next(p for p in self.processes if p.name == name)

    def _wait_healthy(self, name: str, wait_s: float) -> None:
        process = self._process(name)
        deadline = time.monotonic() + wait_s
        with grpc.insecure_channel(self.targets[name]) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if not process.alive():
                    raise StackError(f"{name} exited ({process.proc.returncode}):\n{process.log_tail()}")
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.3)
        raise StackError(f"{name} not healthy after {wait_s:.0f}s:\n{process.log_tail()}")

    def _wait_for_log(self, name: str, text: str, wait_s: float) -> None:
        process = self._process(name)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if text in process.log_path.read_text(errors="replace"):
                return
            if not process.alive():
                raise StackError(f"{name} exited ({process.proc.returncode}):\n{process.log_tail()}")
            time.sleep(0.3)
        raise StackError(f"{name} did not report {text!r} within {wait_s:.0f}s:\n{process.log_tail()}")

    def tail(self, name: str, lines: int = 20) -> str:
        return f"--- {name} ---\n" + self._process(name).log_tail(lines)

    def check_alive(self) -> None:
        for process in self.processes:
            if not process.alive() and process.proc.returncode != 0:
                raise StackError(f"{process.name} died ({process.proc.returncode}):\n{process.log_tail()}")

    def stop(self) -> None:
        # Producers first (workers), then the trainer, then the services, then the broker.
        for process in reversed(self.processes):
            process.stop()
        if self.broker is not None:
            self.broker.stop()
            self.broker = None

    def describe(self) -> str:
        lines = [f"kafka: {self.bootstrap} (topic prefix {self.config.topic_prefix!r})"]
        lines += [f"{name}: {target}" for name, target in self.targets.items()]
        lines += [f"metrics {name}: 127.0.0.1:{port}" for name, port in self.metrics_ports.items()]
        lines.append(f"logs: {self.logs}")
        return "\n".join(lines)

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def up_main(args) -> int:
    overrides = {"workdir": args.workdir, "kafka_bootstrap": args.kafka_bootstrap}
    try:
        config = load_stack_config(args.config, **overrides)
    except (StackError, OSError, yaml.YAMLError) as err:
        print(f"arbiter up: {err}", file=sys.stderr)
        return 2
    stop = {"now": False}

    def request_stop(*_):
        stop["now"] = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    stack = Stack(config)
    try:
        stack.start()
        print("arbiter is up:\n" + stack.describe(), flush=True)
        while not stop["now"]:
            stack.check_alive()
            time.sleep(0.5)
    except StackError as err:
        print(f"arbiter up: {err}", file=sys.stderr)
        return 1
    finally:
        print("stopping...", flush=True)
        stack.stop()
    return 0
