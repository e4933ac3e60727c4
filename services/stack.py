"""``arbiter up``: the whole RLHF loop as separate processes, as deployed,
under a supervisor.

Broker (a local Tansu unless ``kafka_bootstrap`` names a real cluster; durable
by default, see ``arbiter.stream.broker``), the reward, reference and policy
services (the policy follows policy-updates and hot-swaps), rollout workers
and the PPO trainer. Each process logs to ``WORKDIR/logs/NAME.log``; Ctrl-C
(or SIGTERM) stops them in reverse order, each given time to drain before it
is killed.

Supervision (``Supervisor``): a component that dies (any exit status, a
signal such as SIGKILL included) is restarted on the same ports with
exponential backoff while the rest keep running; the local broker is watched
and restarted the same way (with ``s3`` storage it comes back with every
topic, record and committed offset). Exit status 0 ends a worker or the
trainer for good: they stop by themselves only when their bounded work
(``max_rollouts``, ``max_updates``) is done. Each component has a restart
budget (``restart_budget`` restarts within ``restart_window_s``); past it the
stack stops with a message naming the component, how it died and its log.
Restarts are log lines and metrics on the stack's own metrics port:
``arbiter_stack_restarts_total{component}``,
``arbiter_stack_component_up{component}``.

Replication: ``replicas: {policy: N, reward: N, reference: N}`` runs N
replicas of a model service (``policy-0``, ``policy-1``, ...; one of a kind
keeps the plain name), each on its own gRPC and metrics port, supervised on
its own; the workers reach each kind through one round-robin target
(``ipv4:127.0.0.1:P0,127.0.0.1:P1``, ``services.common.client``). Every
policy replica follows policy-updates (group-less: each reads every
partition). ``workers: W`` rollout workers share the prompts topic through
the ``arbiter-rollout-workers`` group (``prompt_source: topic``, the default
from 2 workers): the stack keeps that topic fed from ``prompts_file``
(``PromptFeeder``). The rollouts topic is created with
``rollout_partitions`` partitions; it is keyed by prompt id, so an RLOO/GRPO
group (the samples of one prompt) stays in one partition. ``replicas:
{trainer: N}`` runs the trainer as one torchrun job of N ranks (``parallel:
ddp`` unless the trainer section says fsdp; rank r reads the partitions p with
p mod N == r, so N <= ``rollout_partitions``; rank r's metrics on the
trainer's metrics port + r). The stack writes
``WORKDIR/prometheus.yml``, a scrape config of every metrics port it opened
(jobs ``arbiter-KIND`` as in infra/prometheus/prometheus.yml, a ``replica``
label per target), loading infra/prometheus/rules.

Placement (``services.placement``): each component runs on CPU cores and with
torch threads derived from the cores the stack may use (a 2-core laptop
shares both cores among all, one thread each; from 4 cores up the policy,
trainer, reward and reference get disjoint core ranges sized by their share
of the work), overridable per component with ``placement`` in the stack YAML
and checked when the config is loaded. Affinity is set on every thread of a
child right after it is spawned (and re-set on each restart); threads reach
torch through ``OMP_NUM_THREADS`` and ``--torch-threads``.

In a Kubernetes cluster the kubelet takes this role: each service is a
Deployment whose pods have ``restartPolicy: Always`` (the kubelet restarts a
dead container with exponential backoff, 10 s doubling to 5 min and reset
after 10 min of running: CrashLoopBackOff), workers and a bounded trainer run
are Jobs with ``restartPolicy: OnFailure`` (exit 0 ends them, as here), and
the broker is a real Kafka cluster. A ``livenessProbe`` and a
``readinessProbe`` of type ``grpc`` on the service port use the gRPC health
service every server exposes: liveness restarts a server that stopped
answering; readiness keeps a pod out of its Service's endpoints while it
says NOT_SERVING, e.g. a policy replica that has not yet applied the newest
published version (``services.policy.server``). Kubernetes has no restart
budget: it keeps retrying with capped backoff, and an alert on
``kube_pod_container_status_restarts_total`` plays the budget's part.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from arbiter.exits import describe_exit
from arbiter.net import LOOPBACK, free_port
from arbiter.stream import topics
from arbiter.stream.errors import StreamError
from services.common.metrics import stop_metrics_endpoint
from services.placement import (Placement, PlacementError, component_role, pin, resolve_placement,
                                share_placement)

log = logging.getLogger(__name__)

# Default metrics ports: the ones infra/prometheus/prometheus.yml scrapes.
METRICS_PORTS = {"stack": 9100, "reward": 9101, "policy": 9102, "reference": 9103, "worker": 9104, "trainer": 9105,
                 "rm-loop": 9106}
BROKER_STORAGES = ("s3", "memory")
# Model services that may run as several replicas (``replicas`` in the stack YAML).
REPLICATED = ("policy", "reward", "reference")
PROMPT_SOURCES = ("file", "topic")
# The alert and recording rules the generated scrape config loads (when this is a checkout).
RULES_DIR = Path(__file__).resolve().parents[1] / "infra" / "prometheus" / "rules"
SUPERVISE_INTERVAL_S = 0.2


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
    # The local broker's storage: "s3" keeps topics, records and offsets in
    # WORKDIR/broker across broker and stack restarts; "memory" loses them.
    broker_storage: str = "s3"
    topic_prefix: str = ""
    # gRPC ports (0: pick free ones) and metrics ports (None: defaults above; 0: free).
    policy_port: int = 0
    reward_port: int = 0
    reference_port: int = 0
    metrics: bool = True
    metrics_ports: dict[str, int] = field(default_factory=dict)
    workers: int = 1
    # Replicas per model service, e.g. {"policy": 2, "reward": 2} (default 1 each).
    replicas: dict[str, int] = field(default_factory=dict)
    # Partitions of the rollouts topic, fixed at creation (Tansu cannot add
    # partitions; Kafka adding them would move keys): the most trainer ranks
    # that can ever share the work.
    rollout_partitions: int = topics.DEFAULT_PARTITIONS[topics.ROLLOUTS]
    # Where workers get prompts: "file" (each worker loops over prompts_file,
    # shuffled with its own seed) or "topic" (the stack feeds prompts_file to
    # the prompts topic; the workers' group spreads it). null: file for one
    # worker, topic for more.
    prompt_source: str | None = None
    # With prompt_source topic: a new pass of prompts_file is published when
    # fewer than this many prompts wait unconsumed (null: one pass's worth).
    prompt_backlog: int | None = None
    # Torch threads of every torch component (null: each one's share of the
    # cores) and cores/threads per component: see services/placement.py.
    torch_threads: int | None = None
    placement: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    # Extra flags per worker, e.g. {"samples_per_prompt": 4, "max_new_tokens": 24, "gold": "vader"}.
    worker: dict[str, Any] = field(default_factory=dict)
    # Extra flags of the reward service, e.g. {"reward_spec_file": "spec.yaml"}.
    reward: dict[str, Any] = field(default_factory=dict)
    # Extra flags of the reference service, e.g. {"model_process": true}.
    reference: dict[str, Any] = field(default_factory=dict)
    # Trainer config fields (trainer/config.py); model_dir, output_dir and kafka are filled in.
    trainer: dict[str, Any] = field(default_factory=dict)
    # `arbiter rm loop` as a component when set (needs metrics): its settings
    # (arbiter/rm/loop.py RMLoopSettings, e.g. retrain_preferences) and under
    # `train` arbiter train rm's config (model_dir defaults to reward_model,
    # registry to WORKDIR/rm-registry); the reward service may load from the registry.
    rm_loop: dict[str, Any] | None = None
    # Published policy versions through a store instead of the trainer's
    # directory (arbiter/weights): {uri: s3://arbiter-weights/policies, bf16:
    # false, delta: false, ...} fills the trainer's `weights` section and gives
    # each policy replica a download cache. An s3:// URI with no endpoint in
    # the environment (AWS_ENDPOINT_URL) starts a local S3-protocol store
    # (moto, mirrored to WORKDIR/weights-store) with that bucket.
    weights: dict[str, Any] = field(default_factory=dict)
    # Supervision: at most restart_budget restarts of one component within
    # restart_window_s (0: never restart); the delay before a restart doubles
    # from restart_backoff_s up to restart_backoff_max_s, and falls back to
    # restart_backoff_s once the component has run restart_reset_after_s.
    restart_budget: int = 5
    restart_window_s: float = 300.0
    restart_backoff_s: float = 1.0
    restart_backoff_max_s: float = 30.0
    restart_reset_after_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("policy_model", "reward_model", "prompts_file"):
            if not getattr(self, name):
                raise StackError(f"{name} is required")
            if not Path(getattr(self, name)).exists():
                raise StackError(f"{name}={getattr(self, name)!r} does not exist")
        if not is_count(self.workers):
            raise StackError(f"workers={self.workers!r} is invalid: must be an integer >= 1")
        if not isinstance(self.replicas, dict):
            raise StackError(f"replicas={self.replicas!r} is invalid: must be a mapping with keys "
                             f"{', '.join(REPLICATED)}, trainer")
        for kind, count in self.replicas.items():
            if kind not in (*REPLICATED, "trainer"):
                raise StackError(f"replicas.{kind} is invalid: not a replicated component; the keys are "
                                 f"{', '.join(REPLICATED)}, trainer")
            if not is_count(count):
                raise StackError(f"replicas.{kind}={count!r} is invalid: must be an integer >= 1")
        if not is_count(self.rollout_partitions):
            raise StackError(f"rollout_partitions={self.rollout_partitions!r} is invalid: must be an integer >= 1")
        if self.trainer_ranks > self.rollout_partitions:
            # Each rank owns the partitions p with p mod N == rank: a rank without one would idle.
            raise StackError(f"replicas.trainer={self.trainer_ranks} is invalid: at most rollout_partitions "
                             f"({self.rollout_partitions}) ranks, each reads its own partitions")
        if self.trainer_ranks > 1 and self.trainer.get("parallel", "ddp") == "none":
            raise StackError(f"trainer.parallel='none' is invalid with replicas.trainer={self.trainer_ranks}: "
                             "must be ddp or fsdp")
        if self.prompt_source is not None and self.prompt_source not in PROMPT_SOURCES:
            raise StackError(f"prompt_source={self.prompt_source!r} is invalid: must be one of "
                             f"{', '.join(PROMPT_SOURCES)} (or null: file for one worker, topic for more)")
        if self.prompt_backlog is not None and not is_count(self.prompt_backlog):
            raise StackError(f"prompt_backlog={self.prompt_backlog!r} is invalid: must be an integer >= 1 or null")
        if self.broker_storage not in BROKER_STORAGES:
            raise StackError(f"broker_storage={self.broker_storage!r} is invalid: must be one of "
                             f"{', '.join(BROKER_STORAGES)}")
        if self.restart_budget < 0:
            raise StackError(f"restart_budget={self.restart_budget} is invalid: must be >= 0 (0: never restart)")
        for name in ("restart_window_s", "restart_backoff_s", "restart_reset_after_s"):
            if not getattr(self, name) > 0:
                raise StackError(f"{name}={getattr(self, name)} is invalid: must be > 0")
        if self.restart_backoff_max_s < self.restart_backoff_s:
            raise StackError(f"restart_backoff_max_s={self.restart_backoff_max_s} is invalid: must be >= "
                             f"restart_backoff_s ({self.restart_backoff_s})")
        self.plan_placement()
        check_worker_staleness(self)
        self.weights_settings()

    def weights_settings(self):
        """The trainer's publish settings from ``weights`` (None without a URI)."""
        from arbiter.config import ConfigError
        from arbiter.weights import PublishSettings

        if not isinstance(self.weights, dict):
            raise StackError(f"weights={self.weights!r} is invalid: must be a mapping (uri, bf16, delta, ...)")
        if not self.weights:
            return None
        unknown = set(self.weights) - {f.name for f in dataclasses.fields(PublishSettings)}
        if unknown:
            raise StackError(f"weights.{sorted(unknown)[0]} is invalid: not a setting of arbiter.weights."
                             "PublishSettings")
        try:
            settings = PublishSettings(**self.weights)
            settings.validate("weights")
        except ConfigError as err:
            raise StackError(str(err)) from None
        if not settings.uri:
            raise StackError("weights.uri is required when weights is set (s3://BUCKET/PREFIX or file:///DIR)")
        return settings

    @property
    def local_weights_store(self) -> str | None:
        """The bucket of a local store the stack starts for weights (None: none needed)."""
        uri = self.weights.get("uri", "") if isinstance(self.weights, dict) else ""
        if not uri.startswith("s3://") or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3"):
            return None
        return uri[len("s3://"):].split("/", 1)[0]

    def replica_count(self, kind: str) -> int:
        return self.replicas.get(kind, 1)

    @property
    def trainer_ranks(self) -> int:
        """The trainer's ranks (``replicas.trainer``): one torchrun job of that many processes."""
        return self.replicas.get("trainer", 1) if isinstance(self.replicas, dict) else 1

    def replica_names(self, kind: str) -> list[str]:
        """The components of a model service: ``reward`` alone, or ``reward-0``, ``reward-1``, ..."""
        n = self.replica_count(kind)
        return [kind] if n == 1 else [f"{kind}-{i}" for i in range(n)]

    @property
    def prompts_from_topic(self) -> bool:
        return (self.prompt_source or ("file" if self.workers == 1 else "topic")) == "topic"

    def plan_placement(self) -> dict[str, Placement]:
        """Cores and torch threads per component on this machine (raises
        StackError naming the field of a setting that cannot work)."""
        if self.placement is not None and not isinstance(self.placement, dict):
            raise StackError(f"placement={self.placement!r} is invalid: must be a mapping (see services/placement.py)")
        try:
            return resolve_placement(self.placement, self.torch_threads, os.sched_getaffinity(0))
        except PlacementError as err:
            raise StackError(str(err)) from None


def trainer_staleness(config: StackConfig) -> dict[str, Any]:
    """The trainer's staleness bound and batch size (its ppo section, or the
    defaults), under the worker's flag names."""
    from trainer.config import PPOConfig

    ppo, defaults = config.trainer.get("ppo", {}), PPOConfig()
    return {"max_staleness": ppo.get("max_staleness", defaults.max_staleness),
            "trainer_batch_size": ppo.get("batch_size", defaults.batch_size)}


def worker_staleness(config: StackConfig) -> dict[str, Any]:
    """The workers' staleness bound: generation overlaps training up to the
    trainer's own ppo.max_staleness, over its ppo.batch_size (the worker
    section may set its own, or max_staleness: null for no bound)."""
    derived = trainer_staleness(config)
    return {**derived, **{k: config.worker[k] for k in derived if k in config.worker}}


def check_worker_staleness(config: StackConfig) -> None:
    if "max_rollouts_per_version" in config.worker:
        # Refused here, not by each worker after it started and crash-looped.
        raise StackError("worker.max_rollouts_per_version is invalid: was removed (it held generation to one batch "
                         "per policy version); the workers' staleness bound comes from trainer.ppo.max_staleness, "
                         "or set worker.max_staleness")
    trainer, worker = trainer_staleness(config), worker_staleness(config)
    bound, batch = trainer["max_staleness"], trainer["trainer_batch_size"]
    if worker["max_staleness"] is not None and worker["max_staleness"] > bound:
        raise StackError(f"worker.max_staleness={worker['max_staleness']} is invalid: must be <= "
                         f"trainer.ppo.max_staleness ({bound}), or the trainer drops what the workers may generate")
    if worker["trainer_batch_size"] != batch:
        raise StackError(f"worker.trainer_batch_size={worker['trainer_batch_size']} is invalid: must be the "
                         f"trainer's ppo.batch_size ({batch}) (or left out: the stack fills it in)")


def is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def round_robin_target(addresses: list[str]) -> str:
    """One gRPC target over several HOST:PORT addresses (round robin, services/common/client.py)."""
    return addresses[0] if len(addresses) == 1 else "ipv4:" + ",".join(addresses)


def load_stack_config(path: str | Path, **overrides: Any) -> StackConfig:
    data = yaml.safe_load(Path(path).read_text()) or {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return StackConfig(**data)
    except TypeError as err:
        raise StackError(f"{path}: {err}") from err


def stack_env(config: StackConfig, bootstrap: str, threads: int = 1) -> dict[str, str]:
    """The environment of a component process with ``threads`` torch threads."""
    return {
        **os.environ,
        "ARBITER_LOG_LEVEL": os.environ.get("ARBITER_LOG_LEVEL", "INFO"),
        "ARBITER_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "ARBITER_KAFKA_TOPIC_PREFIX": config.topic_prefix,
        # OpenMP and MKL size their pools from these before torch is imported.
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }


def service_args(config: StackConfig, kind: str, model: str | Path, port: int, metrics_port: int | None,
                 threads: int = 1, replica_id: str | None = None) -> list[str]:
    """``arbiter serve KIND`` flags (the policy follows policy-updates)."""
    args = ["serve", kind, "--model", str(model), "--port", str(port), "--torch-threads", str(threads)]
    if kind == "policy" and replica_id:
        args += ["--replica-id", replica_id]
    if metrics_port is not None:
        args += ["--metrics-port", str(metrics_port)]
    if kind == "reward" and config.rm_loop is not None:
        roots = (Path(model).resolve().parent, rm_registry_dir(config))
        args += [arg for root in roots for arg in ("--model-roots", str(root))]
    if kind == "reward":
        args += extra_flags(config.reward)
    if kind == "reference":
        args += extra_flags(config.reference)
    if kind == "policy":
        # Versions the trainer publishes load from its output; --model's
        # directory stays loadable too (the default root).
        roots = (Path(model).resolve().parent, trainer_policies_dir(config))
        if weights_directory(config) is not None:  # a file:// store is read in place, under the same rule
            roots += (weights_directory(config),)
        args += ["--follow-updates", *(arg for root in roots for arg in ("--model-roots", str(root)))]
        if config.weights:
            cache = Path(config.workdir).resolve() / "weights-cache" / (replica_id or kind)
            args += ["--weights-cache-dir", str(cache), "--weights-uri-prefix", config.weights["uri"]]
    return args


def weights_directory(config: StackConfig) -> Path | None:
    """The directory of a ``file://`` weights store (None for s3:// or none)."""
    uri = config.weights.get("uri", "")
    return Path(uri[len("file://"):]).resolve() if uri.startswith("file://") else None


def rm_registry_dir(config: StackConfig) -> Path:
    """Where the stack's RM loop publishes reward-model versions."""
    registry = (config.rm_loop or {}).get("train", {}).get("registry")
    return Path(registry).resolve() if registry else Path(config.workdir).resolve() / "rm-registry"


def trainer_policies_dir(config: StackConfig) -> Path:
    """Where the stack's trainer writes the policy versions it publishes."""
    return Path(config.workdir).resolve() / "trainer" / "policies"


def prune_policy_versions(policies: Path, keep: Collection[str]) -> tuple[int, int]:
    """Remove every version directory under ``policies`` but ``keep`` (names)
    after a run that kept them all to measure some (the demo's KL crossings,
    bench-e2e's curve): at 2 updates/s a 6-minute full demo run leaves ~5 GB.
    Returns (directories removed, bytes freed)."""
    removed = freed = 0
    if not policies.is_dir():
        return removed, freed
    for version in policies.iterdir():
        if version.name in keep or not version.is_dir() or version.name.startswith("."):
            continue
        freed += sum(f.stat().st_size for f in version.rglob("*") if f.is_file())
        shutil.rmtree(version, ignore_errors=True)
        removed += 1
    return removed, freed


def worker_args(config: StackConfig, index: int, targets: dict[str, str], metrics_port: int | None) -> list[str]:
    """``arbiter worker`` flags for worker ``index`` against the services at ``targets``."""
    args = ["worker", "--policy", targets["policy"], "--reward", targets["reward"],
            "--reference", targets["reference"], "--seed", str(config.seed + 1000 * index),
            "--worker-id", f"worker-{index}"]
    if config.prompts_from_topic:
        args.append("--prompts-topic")
    else:
        args += ["--prompts", str(Path(config.prompts_file).resolve()), "--shuffle"]
    if metrics_port is not None:
        args += ["--metrics-port", str(metrics_port)]
    return args + extra_flags({**config.worker, **worker_staleness(config)})


def extra_flags(flags: dict[str, Any]) -> list[str]:
    """{"max_new_tokens": 24, "gold": "vader", "shuffle": true} -> command-line flags."""
    args = []
    for key, value in flags.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value not in (False, None):
            args += [flag, str(value)]
    return args


def cli_argv(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "cli", *args]


class Component:
    """One supervised part of the stack. ``always``: restarted whatever its
    exit status (servers, broker); otherwise exit 0 means its work is done."""

    name: str
    always: bool
    log_path: Path

    def start(self) -> None:
        raise NotImplementedError

    def alive(self) -> bool:
        raise NotImplementedError

    def exit_status(self) -> int | None:
        raise NotImplementedError

    def how_it_died(self) -> str:
        return describe_exit(self.exit_status())

    def stop(self) -> None:
        raise NotImplementedError

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class ManagedProcess(Component):
    """An ``arbiter`` subcommand as a child process. ``restart_argv`` (if
    given) replaces ``argv`` from the first restart on. ``cores``: its CPU
    affinity, set on every start (threads it creates later inherit it)."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str], *, always: bool,
                 restart_argv: list[str] | None = None, cores: tuple[int, ...] | None = None):
        self.name = name
        self.cores = cores
        self.argv = argv
        self.restart_argv = restart_argv or argv
        # Used once, by the next start only (then restart_argv again).
        self.next_argv: list[str] | None = None
        self.log_path = log_path
        self.env = env
        self.always = always
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        if self.proc is not None:
            # What the dead process started may outlive it (a torchrun job's
            # ranks when torchrun itself was killed): the group goes with it,
            # or the restart would meet them on its ports and partitions.
            self._kill_group()
        argv = self.argv if self.proc is None else self.restart_argv
        if self.next_argv is not None:
            argv, self.next_argv = self.next_argv, None
        with self.log_path.open("a") as log_file:
            self.proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)
        # After spawn, not in preexec_fn (unsafe with the supervisor's
        # threads): Popen returns once the child has exec'd, while the new
        # interpreter is still starting and has no other thread yet.
        if self.cores is not None:
            pin(self.proc.pid, self.cores)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exit_status(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def stop(self, timeout_s: float = 30.0) -> None:
        self.terminate()
        self.wait_stopped(timeout_s)

    def terminate(self) -> None:
        """SIGTERM: the component drains and exits (see ``wait_stopped``)."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)

    def wait_stopped(self, timeout_s: float = 30.0) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0fs: killing it", self.name, timeout_s)
            self.proc.kill()
            self.proc.wait()
        self._kill_group()

    def _kill_group(self) -> None:
        """SIGKILL whatever is left in the component's process group (each
        component is a session leader: its pid is the group id)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class BrokerComponent(Component):
    """The local broker (Tansu and, with s3 storage, its object store)."""

    always = True
    name = "broker"

    def __init__(self, broker: Any, on_restart: Any, cores: tuple[int, ...] | None = None):
        self.broker = broker
        self.log_path = broker.log_path
        self._on_restart = on_restart
        self.cores = cores

    def start(self) -> None:
        self.broker.restart()
        pin_broker(self.broker, self.cores)
        self._on_restart()

    def alive(self) -> bool:
        return self.broker.running()

    def exit_status(self) -> int | None:
        return self.broker.exit_status()[1]

    def how_it_died(self) -> str:
        part, code = self.broker.exit_status()
        return f"({part}) {describe_exit(code)}"

    def stop(self) -> None:
        self.broker.stop()


class ObjectStoreComponent(Component):
    """The local S3-protocol store published policy versions go through
    (restarted on the same port; its objects survive on disk)."""

    always = True
    name = "weights-store"

    def __init__(self, store: Any):
        self.store = store
        self.log_path = store.log_path

    def start(self) -> None:
        self.store.start()

    def alive(self) -> bool:
        return self.store.running()

    def exit_status(self) -> int | None:
        return self.store.returncode()

    def stop(self) -> None:
        self.store.stop()


def pin_broker(broker: Any, cores: tuple[int, ...] | None) -> None:
    """Tansu and its object store are started by the broker itself: pinned
    after the fact, every thread (``pin``)."""
    if cores is None:
        return
    for pid in (broker.pid, broker.store.pid if broker.store is not None else None):
        if pid is not None:
            pin(pid, cores)


@dataclass
class _Track:
    started_at: float
    attempt: int = 0  # restarts since the component last ran restart_reset_after_s
    restarts: deque = field(default_factory=deque)  # when each restart in the window was decided
    next_start: float | None = None
    finished: bool = False
    total: int = 0  # restarts since the stack started


class _Background:
    """``_run`` on a daemon thread from ``start`` until ``stop`` (``_stop`` set)."""

    def _start_thread_later(self, name: str) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        raise NotImplementedError

    def start(self):
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


class Supervisor(_Background):
    """Watches components from a thread; restarts the dead ones (see the
    module docstring). ``failure`` is set, and watching stops, when a
    component exceeds its restart budget."""

    def __init__(self, components: list[Component], config: StackConfig, registry: CollectorRegistry):
        self.components = components
        self.config = config
        self.failure: StackError | None = None
        self.restarts = Counter("arbiter_stack_restarts_total",
                                "Restarts of a stack component by the supervisor.", ["component"], registry=registry)
        self.up = Gauge("arbiter_stack_component_up", "1 while the component's process runs, else 0.",
                        ["component"], registry=registry)
        now = time.monotonic()
        self._tracks = {c.name: _Track(started_at=now) for c in components}
        for c in components:
            self.restarts.labels(c.name)
            self.up.labels(c.name).set(1 if c.alive() else 0)
        self._start_thread_later("stack-supervisor")

    def _run(self) -> None:
        while not self._stop.wait(SUPERVISE_INTERVAL_S):
            for component in self.components:
                if self._stop.is_set() or self.failure is not None:
                    return
                try:
                    self._watch(component)
                except Exception:  # a supervisor bug must not end supervision silently
                    log.exception("supervisor: watching %s failed", component.name)

    def _watch(self, component: Component) -> None:
        c, track, now = self.config, self._tracks[component.name], time.monotonic()
        if track.finished:
            return
        if track.next_start is not None:
            if now >= track.next_start:
                self._restart(component, track)
            return
        if component.alive():
            if track.attempt and now - track.started_at >= c.restart_reset_after_s:
                track.attempt = 0
            return
        self.up.labels(component.name).set(0)
        code = component.exit_status()
        if code == 0 and not component.always:
            log.info("%s finished (exit status 0): not restarted", component.name)
            track.finished = True
            return
        while track.restarts and now - track.restarts[0] > c.restart_window_s:
            track.restarts.popleft()
        how = component.how_it_died()
        if len(track.restarts) >= c.restart_budget:
            self.failure = StackError(
                f"{component.name} {how} and was already restarted {len(track.restarts)} times within "
                f"{c.restart_window_s:.0f}s (restart_budget {c.restart_budget}): giving up; stopping the stack. "
                f"Its log ({component.log_path}) ends:\n{component.log_tail()}"
            )
            log.error("%s", self.failure)
            return
        delay = min(c.restart_backoff_s * 2 ** track.attempt, c.restart_backoff_max_s)
        track.restarts.append(now)
        track.attempt += 1
        track.next_start = now + delay
        log.warning("%s %s: restart %d of %d allowed within %.0fs, in %.1fs", component.name, how,
                    len(track.restarts), c.restart_budget, c.restart_window_s, delay)

    def retire(self, name: str) -> None:
        """Stop watching ``name``: it is being stopped on purpose, not to be restarted."""
        track = self._tracks.get(name)
        if track is not None:
            track.finished, track.next_start = True, None

    def _restart(self, component: Component, track: _Track) -> None:
        track.next_start = None
        track.started_at = time.monotonic()
        try:
            component.start()
        except Exception as err:  # counted as a death on the next pass
            log.error("%s: restart failed: %s", component.name, err)
            return
        track.total += 1
        self.restarts.labels(component.name).inc()
        self.up.labels(component.name).set(1)
        log.warning("%s restarted (%d restart(s) since the stack started)", component.name, track.total)


def scrape_job(component: str) -> str:
    """A component's Prometheus job: ``arbiter-KIND`` (``policy-1`` and
    ``worker-0`` -> ``arbiter-policy``, ``arbiter-worker``), the job names of
    infra/prometheus/prometheus.yml and the alert rules."""
    kind, dash, index = component.rpartition("-")
    return f"arbiter-{kind if dash and index.isdigit() else component}"


def scrape_config(metrics_ports: dict[str, int], host: str = LOOPBACK, interval_s: int = 15) -> dict[str, Any]:
    """A Prometheus config scraping every metrics port: one job per kind, one
    target per component labelled ``replica``, infra/prometheus/rules loaded."""
    jobs: dict[str, list[dict[str, Any]]] = {}
    for name, port in metrics_ports.items():
        jobs.setdefault(scrape_job(name), []).append({"targets": [f"{host}:{port}"], "labels": {"replica": name}})
    config: dict[str, Any] = {"global": {"scrape_interval": f"{interval_s}s", "evaluation_interval": f"{interval_s}s"}}
    if RULES_DIR.is_dir():
        config["rule_files"] = [str(path) for path in sorted(RULES_DIR.glob("*.yml"))]
    config["scrape_configs"] = [{"job_name": job, "static_configs": targets} for job, targets in jobs.items()]
    return config


def write_scrape_config(path: Path, metrics_ports: dict[str, int]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("# Written by arbiter up: every metrics port this stack opened.\n"
                   + yaml.safe_dump(scrape_config(metrics_ports), sort_keys=False))
    tmp.replace(path)


class PromptFeeder(_Background):
    """Keeps the prompts topic fed from a prompts file for the workers' group
    (``arbiter-rollout-workers``): whenever fewer than ``backlog`` prompts it
    published wait beyond the group's committed offsets, it publishes another
    pass over the file (shuffled, seeded). The backlog is counted from the
    offsets its own records were acknowledged at, against the group's commits
    (Tansu's ListOffsets is not reliable, and records left from an earlier run
    are the workers' anyway). A broker that is down is retried each tick."""

    def __init__(self, kafka: Any, prompts_file: str, backlog: int | None, *, seed: int = 0,
                 interval_s: float = 0.5):
        from arbiter.prompts import read_prompts

        self.kafka = kafka
        self.prompts = read_prompts(prompts_file)
        self.backlog = backlog or len(self.prompts)
        self.interval_s = interval_s
        self.passes = 0
        self._rng = random.Random(seed)
        # Partition -> next offset after the newest record this feeder published.
        self._published: dict[int, int] = {}
        self._start_thread_later("stack-prompt-feeder")

    def forget(self) -> None:
        """The broker lost its data (memory storage): nothing published is waiting any more."""
        self._published = {}

    def waiting(self) -> int:
        """Prompts this feeder published that the workers' group has not committed."""
        from arbiter.stream.kafka import _admin

        admin = _admin(self.kafka, 10.0)
        try:
            committed = admin.list_group_offsets(topics.ROLLOUT_WORKERS_GROUP).get(topics.ROLLOUT_WORKERS_GROUP, {})
        finally:
            admin.close()
        wire = self.kafka.topic(topics.PROMPTS)
        done = {tp.partition: meta.offset for tp, meta in committed.items() if tp.topic == wire}
        return sum(max(0, end - max(done.get(p, 0), 0)) for p, end in self._published.items())

    def publish_pass(self) -> int:
        from arbiter.stream import StreamProducer, codec

        order = list(self.prompts)
        self._rng.shuffle(order)
        with StreamProducer(self.kafka) as producer:
            sent = [producer.send(topics.PROMPTS, codec.prompt_to_record(p)) for p in order]
            producer.flush()
            for future in sent:
                delivery = future.result()
                self._published[delivery.partition] = max(self._published.get(delivery.partition, 0),
                                                          delivery.offset + 1)
        self.passes += 1
        return len(order)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.waiting() < self.backlog:
                    log.info("prompt feeder: publishing pass %d (%d prompts)", self.passes + 1,
                             self.publish_pass())
            except Exception as err:  # the broker restarting: try again next tick
                log.warning("prompt feeder: %s: %s", type(err).__name__, err)
            self._stop.wait(self.interval_s)


class Stack:
    def __init__(self, config: StackConfig):
        self.config = config
        self.placement = config.plan_placement()
        self.workdir = Path(config.workdir).resolve()
        self.logs = self.workdir / "logs"
        # The local weights store (weights.uri s3:// without an endpoint) and what reaches it.
        self.weights_store = None
        self.weights_env: dict[str, str] = {}
        self.processes: list[ManagedProcess] = []
        self.broker = None
        # Per model service: the workers' target (round robin over its replicas).
        self.targets: dict[str, str] = {}
        # Per replica (and per kind with one replica): its own HOST:PORT.
        self.replica_targets: dict[str, str] = {}
        self.feeder: PromptFeeder | None = None
        self.metrics_ports: dict[str, int] = {}
        self.bootstrap = config.kafka_bootstrap
        self.registry = CollectorRegistry()
        self.supervisor: Supervisor | None = None
        self._metrics_httpd: Any = None
        # Whether the broker's data is new (so a trainer checkpoint's offsets mean nothing).
        self._fresh_broker = False

    # -- lifecycle -----------------------------------------------------------

    def _metrics_port(self, name: str, count: int = 1) -> int:
        c = self.config
        port = c.metrics_ports.get(name, METRICS_PORTS[name])
        return port or free_port(count=count)

    def place(self, name: str) -> Placement:
        """Component ``name``'s cores and torch threads (services/placement.py);
        replicas of a model service share its kind's."""
        role = component_role(name)
        names = self.config.replica_names(role) if role in REPLICATED else [name]
        if name in names and len(names) > 1:
            return share_placement(self.placement[role], names.index(name), len(names))
        return self.placement[role]

    def _spawn(self, name: str, args: list[str], *, always: bool, restart_args: list[str] | None = None) -> ManagedProcess:
        placement = self.place(name)
        process = ManagedProcess(name, cli_argv(args), self.logs / f"{name}.log",
                                 {**stack_env(self.config, self.bootstrap, placement.threads), **self.weights_env},
                                 always=always,
                                 restart_argv=cli_argv(restart_args) if restart_args else None, cores=placement.cores)
        process.start()
        self.processes.append(process)
        return process

    def start(self, wait_s: float = 300.0) -> Stack:
        c = self.config
        self.logs.mkdir(parents=True, exist_ok=True)
        # The policy's --model-roots must exist before its first version does.
        trainer_policies_dir(c).mkdir(parents=True, exist_ok=True)
        if weights_directory(c) is not None:
            weights_directory(c).mkdir(parents=True, exist_ok=True)
        if c.rm_loop is not None:
            rm_registry_dir(c).mkdir(parents=True, exist_ok=True)
        try:
            self._start_broker()
            self._start_weights_store()
            self._ensure_topics()
            services = {
                "reward": (c.reward_model, c.reward_port),
                "reference": (c.reference_model or c.policy_model, c.reference_port),
                "policy": (c.policy_model, c.policy_port),
            }
            for kind, (model, first_port) in services.items():
                for i, name in enumerate(c.replica_names(kind)):
                    port = first_port + i if first_port else free_port()
                    self.replica_targets[name] = f"127.0.0.1:{port}"
                    if c.metrics:
                        # The first replica on the kind's port (the static prometheus.yml's);
                        # the rest anywhere: the generated scrape config lists them all.
                        self.metrics_ports[name] = self._metrics_port(kind) if i == 0 else free_port()
                    self._spawn(name, service_args(c, kind, model, port, self.metrics_ports.get(name),
                                                   self.place(name).threads, replica_id=name), always=True)
                self.targets[kind] = round_robin_target([self.replica_targets[n] for n in c.replica_names(kind)])
            for name in self.replica_targets:
                self._wait_healthy(name, wait_s)
            trainer = ["train", "ppo", "--config", str(self._write_trainer_config())]
            if c.trainer_ranks > 1:
                trainer += ["--nproc-per-node", str(c.trainer_ranks)]
            # New broker data: a resumed checkpoint's offsets refer to topics
            # that died with the previous broker. A restart by the supervisor
            # resumes from the checkpoint.
            self._spawn("trainer", trainer + ["--reset-offsets"] if self._fresh_broker else trainer, always=False,
                        restart_args=trainer)
            if c.prompts_from_topic:
                self.feeder = PromptFeeder(self._kafka_settings(), c.prompts_file, c.prompt_backlog,
                                           seed=c.seed).start()
            for i in range(c.workers):
                if c.metrics:
                    self.metrics_ports[f"worker-{i}"] = self._metrics_port("worker") if i == 0 else free_port()
                self._spawn(f"worker-{i}", worker_args(c, i, self.targets, self.metrics_ports.get(f"worker-{i}")),
                            always=False)
            if c.rm_loop is not None:
                self._spawn("rm-loop", self._rm_loop_args(), always=False)
            self._wait_for_log("trainer", "trainer ready", wait_s)
            self._supervise()
            if c.metrics:
                write_scrape_config(self.scrape_config_path, self.metrics_ports)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_broker(self) -> None:
        if self.bootstrap:
            return
        from arbiter.stream.broker import LocalBroker

        c = self.config
        data_dir = self.workdir / "broker"
        self._fresh_broker = c.broker_storage == "memory" or not (data_dir / "s3").exists()
        self.broker = LocalBroker(log_path=self.logs / "broker.log", storage=c.broker_storage,
                                  data_dir=data_dir if c.broker_storage == "s3" else None).start()
        self.bootstrap = self.broker.bootstrap_servers
        pin_broker(self.broker, self.place("broker").cores)

    def _start_weights_store(self) -> None:
        bucket = self.config.local_weights_store
        if bucket is None:
            return
        from arbiter.stream.objectstore import LocalObjectStore

        self.weights_store = LocalObjectStore(self.workdir / "weights-store", self.logs / "weights-store.log",
                                              buckets=[bucket]).start()
        # The trainer and the policy replicas reach it as any S3 endpoint (arbiter/weights/store.py).
        self.weights_env = self.weights_store.env()

    @property
    def scrape_config_path(self) -> Path:
        return self.workdir / "prometheus.yml"

    def _kafka_settings(self):
        from arbiter.stream import KafkaSettings

        return KafkaSettings(bootstrap_servers=self.bootstrap, topic_prefix=self.config.topic_prefix)

    def _ensure_topics(self) -> None:
        from arbiter.stream import ensure_topics

        # An existing rollouts topic with fewer partitions is refused (TopicError), never grown.
        ensure_topics(self._kafka_settings(),
                      {**topics.DEFAULT_PARTITIONS, topics.ROLLOUTS: self.config.rollout_partitions})

    def _broker_restarted(self) -> None:
        if self.config.broker_storage == "memory":
            log.error("the broker restarted with memory storage: every topic, record and offset is gone "
                      "(broker_storage: s3 keeps them); the trainer stops at its next checkpoint (its offsets "
                      "name the old log) and is restarted reading the new one from the start")
            trainer = self.process("trainer")
            trainer.next_argv = [*trainer.restart_argv, "--reset-offsets"]
            if self.feeder is not None:
                self.feeder.forget()
        # Idempotent with s3 storage; recreates them (empty) with memory storage.
        self._ensure_topics()

    def _supervise(self) -> None:
        components: list[Component] = list(self.processes)
        if self.broker is not None:
            components.insert(0, BrokerComponent(self.broker, self._broker_restarted, self.place("broker").cores))
        if self.weights_store is not None:
            components.insert(0, ObjectStoreComponent(self.weights_store))
        self.supervisor = Supervisor(components, self.config, self.registry)
        if self.config.metrics:
            self._serve_metrics()
        self.supervisor.start()

    def _serve_metrics(self) -> None:
        port = self._metrics_port("stack")
        try:
            self._metrics_httpd, _ = start_http_server(port, addr=LOOPBACK, registry=self.registry)
        except OSError as err:
            if "stack" in self.config.metrics_ports:
                raise StackError(f"metrics_ports.stack={port}: {err}") from err
            # Only the default was taken (another stack, a test): the stack's own metrics move.
            log.warning("stack metrics: default port %d is taken (%s); using a free one", port, err)
            self._metrics_httpd, _ = start_http_server(0, addr=LOOPBACK, registry=self.registry)
        self.metrics_ports["stack"] = self._metrics_httpd.server_port

    def _write_trainer_config(self) -> Path:
        c = self.config
        config = {
            "model_dir": str(Path(c.policy_model).resolve()),
            "output_dir": str(trainer_policies_dir(c).parent),
            "seed": c.seed,
            # The ranks split the trainer's threads (each is a process of its own).
            "torch_threads": max(1, self.place("trainer").threads // c.trainer_ranks),
            **({"metrics_port": self._metrics_port("trainer", c.trainer_ranks)} if c.metrics else {}),
            **({"parallel": "ddp"} if c.trainer_ranks > 1 else {}),
            **c.trainer,
            **({"weights": {**c.trainer.get("weights", {}), **c.weights}} if c.weights else {}),
            # Connection comes from the stack's environment (ARBITER_KAFKA_*).
            "kafka": {"session_timeout_ms": 6000, **c.trainer.get("kafka", {})},
        }
        if c.metrics:
            # Rank r serves its metrics on metrics_port + r (trainer/main.py).
            ranks = c.trainer_ranks
            for rank in range(ranks):
                self.metrics_ports["trainer" if ranks == 1 else f"trainer-{rank}"] = config["metrics_port"] + rank
        path = self.workdir / "trainer.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def _rm_loop_args(self) -> list[str]:
        """``arbiter rm loop`` flags: the stack's reward service, its training config written here."""
        c = self.config
        settings = {k: v for k, v in c.rm_loop.items() if k != "train"}
        train = {"model_dir": str(Path(c.reward_model).resolve()), "registry": str(rm_registry_dir(c)),
                 "torch_threads": self.place("rm-loop").threads, "seed": c.seed, **c.rm_loop.get("train", {}),
                 "kafka": {"session_timeout_ms": 6000, **c.rm_loop.get("train", {}).get("kafka", {})}}
        path = self.workdir / "rm-loop.yaml"
        path.write_text(yaml.safe_dump(train))
        self.metrics_ports["rm-loop"] = self._metrics_port("rm-loop")
        args = ["rm", "loop", "--train-config", str(path), "--metrics-port", str(self.metrics_ports["rm-loop"])]
        # Every reward replica: the loop gates and promotes on each.
        for name in c.replica_names("reward"):
            args += ["--reward", self.replica_targets[name]]
        for key, value in settings.items():
            args += ["--" + key.replace("_", "-"), str(value)]
        return args

    def process(self, name: str) -> ManagedProcess:
        return next(p for p in self.processes if p.name == name)

    def _wait_healthy(self, name: str, wait_s: float) -> None:
        process = self.process(name)
        deadline = time.monotonic() + wait_s
        with grpc.insecure_channel(self.replica_targets[name]) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if not process.alive():
                    raise StackError(f"{name} {process.how_it_died()}:\n{process.log_tail()}")
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.3)
        raise StackError(f"{name} not healthy after {wait_s:.0f}s:\n{process.log_tail()}")

    def _wait_for_log(self, name: str, text: str, wait_s: float) -> None:
        process = self.process(name)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if text in process.log_path.read_text(errors="replace"):
                return
            if not process.alive():
                raise StackError(f"{name} {process.how_it_died()}:\n{process.log_tail()}")
            time.sleep(0.3)
        raise StackError(f"{name} did not report {text!r} within {wait_s:.0f}s:\n{process.log_tail()}")

    def tail(self, name: str, lines: int = 20) -> str:
        return f"--- {name} ---\n" + self.process(name).log_tail(lines)

    def check_alive(self) -> None:
        """Raises StackError once the supervisor has given up on a component
        (restart budget exceeded); deaths within the budget are its business."""
        if self.supervisor is not None and self.supervisor.failure is not None:
            raise self.supervisor.failure

    def stop_training(self) -> None:
        """Stop the workers, then the trainer (each draining, as ``stop``
        does), and leave the services, the broker and the RM loop up: a run
        measured after its budget (the demo's comparisons) must not keep
        training beside the measurement, which only slowed it down."""
        tiers = ([p for p in self.processes if p.name.startswith("worker-")],
                 [p for p in self.processes if p.name == "trainer"])
        if self.supervisor is not None:
            for process in (*tiers[0], *tiers[1]):
                self.supervisor.retire(process.name)
        self._drain(tiers)

    @staticmethod
    def _drain(tiers) -> None:
        """SIGTERM each tier's processes together, and wait for them before the next tier."""
        for tier in tiers:
            for process in tier:
                process.terminate()
            for process in tier:
                process.wait_stopped()

    def stop(self) -> None:
        if self.supervisor is not None:
            self.supervisor.stop()
        if self.feeder is not None:
            self.feeder.stop()
            self.feeder = None
        # Producers first (workers), then the trainer, then the services, then
        # the broker; the members of a tier drain together.
        self._drain(([p for p in self.processes if p.name.startswith("worker-")],
                     [p for p in self.processes if p.name in ("trainer", "rm-loop")],
                     [p for p in self.processes if p.always]))
        if self.broker is not None:
            self.broker.stop()
            self.broker = None
        if self.weights_store is not None:
            self.weights_store.stop()
            self.weights_store = None
        stop_metrics_endpoint(self._metrics_httpd)
        self._metrics_httpd = None

    def describe(self) -> str:
        where = ""
        if self.broker is not None:
            where = (f", local broker, data in {self.broker.data_dir}" if self.broker.store
                     else ", local broker in memory: lost when it stops")
        lines = [f"kafka: {self.bootstrap} (topic prefix {self.config.topic_prefix!r}{where})"]
        lines += [f"{name}: {target}" for name, target in self.targets.items()]
        lines += [f"replica {name}: {target}" for name, target in self.replica_targets.items()
                  if name not in self.targets]
        if self.config.metrics:
            lines.append(f"prometheus scrape config: {self.scrape_config_path}")
        lines += [f"metrics {name}: 127.0.0.1:{port}" for name, port in self.metrics_ports.items()]
        c = self.config
        names = (["broker"] if self.broker is not None else []) + [p.name for p in self.processes]
        lines += [f"placement {name}: {self.place(name).describe()}" for name in names]
        lines.append(f"supervised: restart budget {c.restart_budget} per {c.restart_window_s:.0f}s per component")
        lines.append(f"logs: {self.logs}")
        return "\n".join(lines)

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def up_main(args) -> int:
    overrides = {"workdir": args.workdir, "kafka_bootstrap": args.kafka_bootstrap,
                 "broker_storage": getattr(args, "broker_storage", None)}
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
    except (StackError, StreamError) as err:  # StreamError: the local broker or its topics
        print(f"arbiter up: {err}", file=sys.stderr)
        return 1
    finally:
        print("stopping...", flush=True)
        stack.stop()
    return 0
