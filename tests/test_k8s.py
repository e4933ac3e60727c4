"""The cluster manifests (infra/k8s/), checked offline.

Every overlay renders with kubectl's kustomize; every object validates
against the Kubernetes schemas (kubernetes-validate, strict: unknown fields
are errors) or, for Strimzi and Prometheus Operator resources, against the
CRD schemas vendored in infra/k8s/schemas/. What the manifests say about the
code is checked against the code itself, imported here, never restated:
every `arbiter` command line goes through the real CLI parser and settings
classes (with the pod's environment and mounted files), ports and probes
against the settings' defaults and services.stack.METRICS_PORTS, topics,
partitions and consumer groups against arbiter.stream.topics, the
PrometheusRule against infra/prometheus/, and the TLS exec probe runs
against a real mTLS server.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import functools
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from arbiter.stream import topics
from services.stack import METRICS_PORTS
from tests.helpers import BackgroundServer, make_pki

try:
    import jsonschema
    import kubernetes_validate
except ImportError as err:  # pragma: no cover - a missing dependency, said plainly
    raise ImportError(f"tests/test_k8s.py needs kubernetes-validate (requirements.lock): {err}") from err

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "infra" / "k8s"
OVERLAYS = ("dev", "production", "production-triton")
# The oldest Kubernetes the manifests are written for (native sidecars, the
# preStop sleep action).
KUBERNETES_VERSION = "1.32.0"
MODEL_SERVICES = ("reward", "reference", "policy")
# What Strimzi creates for the resources in the render (its naming rules):
# the cluster CA of a Kafka, and a Secret per SCRAM KafkaUser.
STRIMZI_CLUSTER_CA = "{cluster}-cluster-ca-cert"
PLACEHOLDER_TOKEN = "REPLACE-ME"


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sync_rules = _load(K8S / "sync_rules.py", "k8s_sync_rules")
health_probe = _load(K8S / "components" / "tls" / "grpc_health_probe.py", "k8s_grpc_health_probe")


# -- rendering and lookups ------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl (1.32, with kustomize) is needed to render infra/k8s/overlays")
    out = {}
    for overlay in OVERLAYS:
        proc = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, f"kubectl kustomize overlays/{overlay}: {proc.stderr}"
        out[overlay] = [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
    return out


def objects(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in objects(docs, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} in the render"
    return found[0]


def workloads(docs: list[dict]) -> list[dict]:
    return objects(docs, "Deployment") + objects(docs, "StatefulSet")


def workload(docs: list[dict], component: str) -> dict:
    return one(docs, "StatefulSet" if component == "trainer" else "Deployment", f"arbiter-{component}")


def pod_spec(w: dict) -> dict:
    return w["spec"]["template"]["spec"]


def container(w: dict, name: str) -> dict:
    found = [c for c in pod_spec(w)["containers"] if c["name"] == name]
    assert len(found) == 1, f"{w['metadata']['name']}: container {name}"
    return found[0]


def all_containers(w: dict) -> list[dict]:
    return pod_spec(w).get("initContainers", []) + pod_spec(w)["containers"]


def container_port(c: dict, name: str) -> int:
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    assert name in ports, f"container {c['name']} has no port named {name}: {ports}"
    return ports[name]


def matches(selector: dict, labels: dict) -> bool:
    """A label selector (matchLabels and matchExpressions) against labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        value, present = labels.get(expr["key"]), expr["key"] in labels
        ok = {"In": present and value in expr.get("values", []), "NotIn": value not in expr.get("values", []),
              "Exists": present, "DoesNotExist": not present}[expr["operator"]]
        if not ok:
            return False
    return True


def selected_workloads(docs: list[dict], service: dict) -> list[dict]:
    return [w for w in workloads(docs)
            if matches({"matchLabels": service["spec"]["selector"]}, w["spec"]["template"]["metadata"]["labels"])]


def secret_data(secret: dict) -> dict[str, bytes]:
    data = {k: base64.b64decode(v) for k, v in secret.get("data", {}).items()}
    data.update({k: v.encode() for k, v in secret.get("stringData", {}).items()})
    return data


def configmap_env(docs: list[dict], c: dict) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        env.update(one(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for var in c.get("env", []):
        assert "value" in var, f"{c['name']}: env {var['name']} comes from elsewhere; the test reads values only"
        env[var["name"]] = var["value"]
    return env


def kafka_env(docs: list[dict]) -> dict[str, str]:
    return next(c for c in objects(docs, "ConfigMap") if c["metadata"]["name"].startswith("arbiter-kafka"))["data"]


def flag_value(args: list[str], flag: str) -> list[str]:
    return [a.split("=", 1)[1] for a in args if a.startswith(flag + "=")]


# -- schemas ---------------------------------------------------------------------


def _strict(node):
    """A CRD schema as the API server applies it with strict field validation
    (kubectl's default): fields the schema does not declare are errors, unless
    it preserves unknown fields."""
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: _strict(v) for k, v in node.items()}
    if "properties" in node and "additionalProperties" not in node \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        node["additionalProperties"] = False
    return node


@functools.cache
def crd_validator(api_version: str, kind: str) -> jsonschema.Draft202012Validator | None:
    group, _, version = api_version.partition("/")
    path = K8S / "schemas" / f"{group}_{kind}_{version}.json"
    if not path.exists():
        return None
    return jsonschema.Draft202012Validator(_strict(json.loads(path.read_text())))


def schema_errors(doc: dict) -> list[str]:
    """Why ``doc`` is invalid (empty: valid); an object no schema covers is an error too."""
    name = f"{doc['kind']}/{doc['metadata'].get('name')}"
    validator = crd_validator(doc["apiVersion"], doc["kind"])
    if validator is not None:
        return [f"{name}: {'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return [f"{name}: no schema for {doc['apiVersion']} (neither Kubernetes' nor a vendored CRD's)"]
    except kubernetes_validate.ValidationError as err:
        return [f"{name}: {'.'.join(map(str, err.absolute_path))}: {err.message}"]
    return []


def test_every_object_of_every_overlay_validates_against_its_schema(rendered):
    for overlay, docs in rendered.items():
        errors = [e for doc in docs for e in schema_errors(doc)]
        assert not errors, f"overlays/{overlay}:\n" + "\n".join(errors)
        kinds = {d["kind"] for d in docs}
        assert {"Deployment", "StatefulSet", "Service", "ConfigMap", "Secret", "NetworkPolicy", "Kafka",
                "KafkaNodePool", "KafkaTopic", "ServiceMonitor", "PrometheusRule"} <= kinds, overlay
        namespaced = [d for d in docs if d["kind"] not in ("Namespace",)]
        assert len({d["metadata"].get("namespace") for d in namespaced}) == 1, f"{overlay}: one namespace"


def test_the_schema_checks_refuse_unknown_fields_and_bad_values(rendered):
    """The validation above is not vacuous: a misspelt field, a wrong type or
    an out-of-range value is refused, for core objects and CRDs alike."""
    docs = rendered["dev"]
    deployment = copy.deepcopy(workload(docs, "reward"))
    container(deployment, "reward")["readinessProbe"]["grpcc"] = {"port": 1}
    assert any("grpcc" in e for e in schema_errors(deployment))
    deployment = copy.deepcopy(workload(docs, "reward"))
    deployment["spec"]["replicas"] = "two"
    assert schema_errors(deployment)
    topic = copy.deepcopy(objects(docs, "KafkaTopic")[0])
    topic["spec"]["partitionz"] = 3
    assert any("partitionz" in e for e in schema_errors(topic))
    topic = copy.deepcopy(objects(docs, "KafkaTopic")[0])
    topic["spec"]["partitions"] = 0
    assert schema_errors(topic)
    kafka = copy.deepcopy(objects(docs, "Kafka")[0])
    kafka["spec"]["kafka"]["listeners"][0]["type"] = "internel"
    assert schema_errors(kafka)
    rule = copy.deepcopy(objects(docs, "PrometheusRule")[0])
    rule["spec"]["groups"][0]["rules"][0]["exprr"] = "up"
    assert schema_errors(rule)
    unknown = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    assert schema_errors(unknown)


# -- the code's constants -----------------------------------------------------------


def _settings_class(kind: str) -> type:
    module = importlib.import_module(f"services.{kind}.settings")
    return getattr(module, f"{kind.capitalize()}Settings")


def _default(cls: type, name: str):
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def _service_name(kind: str) -> str:
    from cli.commands.serve import KINDS

    return importlib.import_module(KINDS[kind][0]).SPEC.service_name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_model_service_ports_probes_and_services_agree_with_the_code(rendered, overlay):
    from cli.main import parse_args

    docs = rendered[overlay]
    worker_args = parse_args(container(workload(docs, "worker"), "worker")["args"])
    targets = {"policy": worker_args.policy_target, "reward": worker_args.reward_target,
               "reference": worker_args.reference_target}
    for kind in MODEL_SERVICES:
        grpc_port, metrics_port = _default(_settings_class(kind), "port"), METRICS_PORTS[kind]
        w = workload(docs, kind)
        c = container(w, kind)
        args = parse_args(c["args"])
        assert (args.command, args.service) == ("serve", kind)
        assert args.port == container_port(c, "grpc") == grpc_port, kind
        assert args.metrics_port == container_port(c, "metrics") == metrics_port, kind
        assert args.host == args.metrics_host == "0.0.0.0", f"{kind}: must listen on the pod's address"
        tls = args.tls_cert_file is not None
        for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = c[probe_name]
            if not tls:
                # The kubelet's grpc probe: grpc.health.v1 on the service port, plaintext.
                assert probe["grpc"]["port"] == grpc_port, (kind, probe_name)
                assert probe["grpc"].get("service", "") in ("", _service_name(kind))
            else:
                command = probe["exec"]["command"]
                script = next(a for a in command if a.endswith("grpc_health_probe.py"))
                probe_args = health_probe.build_parser().parse_args(command[command.index(script) + 1:])
                assert probe_args.port == grpc_port, (kind, probe_name)
                assert (probe_args.ca_file, probe_args.cert_file, probe_args.key_file) == (
                    args.tls_client_ca_file, args.tls_cert_file, args.tls_key_file), (kind, probe_name)
                assert probe_args.server_name in (f"arbiter-{kind}", f"arbiter-{kind}-pods")
                assert _mounted_file(docs, w, c, script) == (K8S / "components" / "tls" / script.rsplit("/", 1)[1]
                                                             ).read_bytes()
        # The Service any client uses (and Prometheus scrapes), and the
        # headless one the workers' round-robin channels resolve.
        service = one(docs, "Service", f"arbiter-{kind}")
        ports = {p["name"]: p for p in service["spec"]["ports"]}
        assert ports["grpc"]["port"] == grpc_port and ports["grpc"]["targetPort"] == "grpc"
        assert ports["metrics"]["port"] == metrics_port and ports["metrics"]["targetPort"] == "metrics"
        assert selected_workloads(docs, service) == [w]
        headless = one(docs, "Service", f"arbiter-{kind}-pods")
        assert headless["spec"]["clusterIP"] == "None" and selected_workloads(docs, headless) == [w]
        assert targets[kind] == f"dns:///arbiter-{kind}-pods:{grpc_port}"


def _mounted_file(docs: list[dict], w: dict, c: dict, path: str) -> bytes:
    """The bytes a container sees at ``path``, from the ConfigMap or Secret mounted there."""
    for mount in c.get("volumeMounts", []):
        prefix = mount["mountPath"].rstrip("/") + "/"
        if not path.startswith(prefix):
            continue
        volume = next(v for v in pod_spec(w)["volumes"] if v["name"] == mount["name"])
        source = volume.get("configMap") or volume["secret"]
        key = path[len(prefix):]
        key = next((i["key"] for i in source.get("items", []) if i["path"] == key), key)
        if "configMap" in volume:
            return one(docs, "ConfigMap", volume["configMap"]["name"])["data"][key].encode()
        return secret_data(one(docs, "Secret", volume["secret"]["secretName"]))[key]
    raise AssertionError(f"{c['name']}: nothing mounted at {path}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_and_trainer_metrics_and_shared_volumes_agree_with_the_code(rendered, overlay, tmp_path):
    from cli.main import parse_args
    from trainer.config import load_config

    docs = rendered[overlay]
    worker = workload(docs, "worker")
    args = parse_args(container(worker, "worker")["args"])
    assert args.metrics_port == container_port(container(worker, "worker"), "metrics") == METRICS_PORTS["worker"]
    assert args.metrics_host == "0.0.0.0"

    trainer = workload(docs, "trainer")
    headless = one(docs, "Service", trainer["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None" and selected_workloads(docs, headless) == [trainer]
    assert headless["spec"]["publishNotReadyAddresses"] is True  # ranks meet before any is ready
    c = container(trainer, "trainer")
    args = parse_args(c["args"])
    assert (args.command, args.train_command) == ("train", "ppo")
    # One torchrun job across the pods: a node per pod, all meeting at pod 0
    # through the headless Service's rendezvous port, each rank with a
    # partition of the rollouts topic of its own.
    assert args.parallel in ("ddp", "fsdp") and args.nnodes == trainer["spec"]["replicas"] >= 2
    assert trainer["spec"]["podManagementPolicy"] == "Parallel"
    host, port = args.rdzv_endpoint.rsplit(":", 1)
    assert host == f"{trainer['metadata']['name']}-0.{headless['metadata']['name']}"
    (rendezvous,) = [p for p in headless["spec"]["ports"] if p["name"] == "rendezvous"]
    assert int(port) == rendezvous["port"] == container_port(c, rendezvous["targetPort"])
    assert args.nnodes * args.nproc_per_node <= topics.DEFAULT_PARTITIONS[topics.ROLLOUTS]
    config_file = tmp_path / "trainer.yaml"
    config_file.write_bytes(_mounted_file(docs, trainer, c, args.config))
    config = load_config(config_file)
    assert config.metrics_port == container_port(c, "metrics") == METRICS_PORTS["trainer"]
    assert config.metrics_host == "0.0.0.0"
    ports = {p["name"]: p["port"] for p in headless["spec"]["ports"]}
    assert ports["metrics"] == METRICS_PORTS["trainer"]

    # Policy versions are paths in the trainer's output: the policy replicas
    # mount the same claim at the same path, read-only, and may load from it.
    def claim_at(w: dict, c: dict, path: str) -> tuple[str, bool]:
        mount = next(m for m in c["volumeMounts"] if m["mountPath"] == path)
        volume = next(v for v in pod_spec(w)["volumes"] if v["name"] == mount["name"])
        return volume["persistentVolumeClaim"]["claimName"], mount.get("readOnly", False)

    policy = workload(docs, "policy")
    policy_args = parse_args(container(policy, "policy")["args"])
    assert config.output_dir in policy_args.model_roots
    assert policy_args.follow_updates
    trainer_claim, trainer_ro = claim_at(trainer, c, config.output_dir)
    policy_claim, policy_ro = claim_at(policy, container(policy, "policy"), config.output_dir)
    assert trainer_claim == policy_claim and not trainer_ro and policy_ro
    claim = one(docs, "PersistentVolumeClaim", trainer_claim)
    if policy["spec"].get("replicas", 1) > 1:
        assert "ReadWriteMany" in claim["spec"]["accessModes"], "pods on several nodes share it"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rm_loop_follows_every_reward_replica_and_shares_their_registry(rendered, overlay, tmp_path):
    """arbiter rm loop finds the reward replicas through the headless Service
    (every ready pod's address, re-resolved before each decision), drives
    each over gRPC only (the shadow window too, GetShadow), and publishes
    versions into the volume the reward pods load from, at the same path; the
    NetworkPolicies let it reach the reward pods' gRPC port and nothing else."""
    from arbiter.config import from_flags
    from arbiter.rm.config import load_config
    from arbiter.rm.loop import RMLoopSettings
    from cli.main import parse_args
    from services.rm_loop import dns_host_port

    docs = rendered[overlay]
    loop = workload(docs, "rm-loop")
    c = container(loop, "rm-loop")
    assert loop["spec"]["replicas"] == 1 and loop["spec"]["strategy"]["type"] == "Recreate"
    args = parse_args(c["args"])
    assert (args.command, args.rm_command) == ("rm", "loop")
    settings = from_flags(RMLoopSettings, args)
    reward = workload(docs, "reward")
    reward_args = parse_args(container(reward, "reward")["args"])
    (target,) = settings.reward
    host, port = dns_host_port(target)
    headless = one(docs, "Service", host)
    assert headless["spec"]["clusterIP"] == "None" and selected_workloads(docs, headless) == [reward]
    assert port == reward_args.port
    assert not any(a.startswith("--reward-metrics") for a in c["args"]), "GetShadow replaced the /metrics scrape"
    assert settings.metrics_port == container_port(c, "metrics") == METRICS_PORTS["rm-loop"]
    assert settings.metrics_host == "0.0.0.0"

    config_file = tmp_path / "rm-train.yaml"
    config_file.write_bytes(_mounted_file(docs, loop, c, settings.train_config))
    train = load_config(config_file, progress=False)
    assert train.registry in reward_args.model_roots

    def claim_at(w: dict, c: dict, path: str) -> tuple[str, bool]:
        mount = next(m for m in c["volumeMounts"] if m["mountPath"] == path)
        volume = next(v for v in pod_spec(w)["volumes"] if v["name"] == mount["name"])
        return volume["persistentVolumeClaim"]["claimName"], mount.get("readOnly", False)

    loop_claim, loop_ro = claim_at(loop, c, train.registry)
    reward_claim, reward_ro = claim_at(reward, container(reward, "reward"), train.registry)
    assert loop_claim == reward_claim and not loop_ro and reward_ro
    if reward["spec"].get("replicas", 1) > 1:
        assert "ReadWriteMany" in one(docs, "PersistentVolumeClaim", loop_claim)["spec"]["accessModes"], (
            "pods on several nodes share it")

    def labels(component: str) -> dict:
        return workload(docs, component)["spec"]["template"]["metadata"]["labels"]

    reward_container = container(reward, "reward")
    assert _allowed(docs, labels("rm-loop"), {}, labels("reward"), container_port(reward_container, "grpc"),
                    "grpc", True)
    assert not _allowed(docs, labels("rm-loop"), {}, labels("reward"), container_port(reward_container, "metrics"),
                        "metrics", True)
    for kind in ("policy", "reference"):
        kind_port = container_port(container(workload(docs, kind), kind), "grpc")
        assert not _allowed(docs, labels("rm-loop"), {}, labels(kind), kind_port, "grpc", True), kind


# -- every command line through the real CLI and settings ------------------------------


class PodFiles:
    """A pod's mounted volumes laid out under a temporary root: Secrets and
    ConfigMaps of the render as files (only the keys they hold), claims and
    emptyDirs as directories, and Secrets that Strimzi writes for the
    resources in the render as placeholder files."""

    def __init__(self, docs: list[dict], w: dict, c: dict, root: Path, operator_secrets: dict[str, set[str]]):
        self.root = root
        self.mounts: list[str] = []
        for mount in c.get("volumeMounts", []):
            volume = next(v for v in pod_spec(w)["volumes"] if v["name"] == mount["name"])
            where = self.path(mount["mountPath"], check=False)
            where.mkdir(parents=True, exist_ok=True)
            self.mounts.append(mount["mountPath"].rstrip("/") + "/")
            if "secret" in volume or "configMap" in volume:
                files = self._contents(docs, volume, operator_secrets)
                items = (volume.get("secret") or volume.get("configMap")).get("items")
                for item in items or [{"key": k, "path": k} for k in files]:
                    assert item["key"] in files, f"{c['name']}: {mount['name']} has no key {item['key']}"
                    (where / item["path"]).write_bytes(files[item["key"]])

    @staticmethod
    def _contents(docs, volume, operator_secrets) -> dict[str, bytes]:
        if "configMap" in volume:
            return {k: v.encode() for k, v in one(docs, "ConfigMap", volume["configMap"]["name"])["data"].items()}
        name = volume["secret"]["secretName"]
        secrets = [s for s in objects(docs, "Secret") if s["metadata"]["name"] == name]
        if secrets:
            return secret_data(secrets[0])
        assert name in operator_secrets, f"Secret {name} is neither in the render nor written by an operator for it"
        return {key: b"written-by-strimzi-" + key.encode() for key in operator_secrets[name]}

    def path(self, value: str, check: bool = True) -> Path:
        if check:
            assert any(value.startswith(m) for m in self.mounts), f"{value} is not on a mounted volume"
        return self.root / value.lstrip("/")

    def remap(self, value: str) -> str:
        """A path in the pod -> the same file here; other values unchanged."""
        if any(value.startswith(m) or value == m.rstrip("/") for m in self.mounts):
            return str(self.root / value.lstrip("/"))
        return value

    def remap_arg(self, arg: str) -> str:
        flag, eq, value = arg.partition("=")
        return f"{flag}={self.remap(value)}" if eq else self.remap(arg)


def operator_secrets(docs: list[dict]) -> dict[str, set[str]]:
    out = {STRIMZI_CLUSTER_CA.format(cluster=k["metadata"]["name"]): {"ca.crt"} for k in objects(docs, "Kafka")}
    for user in objects(docs, "KafkaUser"):
        if user["spec"]["authentication"]["type"] == "scram-sha-512":
            out[user["metadata"]["name"]] = {"password", "sasl.jaas.config"}
    return out


def _build_settings(args, component: str):
    """The settings object the component's entry point builds from ``args``
    (and the environment), as `arbiter` would at start."""
    if component == "worker":
        from services.worker.main import settings_from_args

        return settings_from_args(args)
    if component == "trainer":
        from trainer.main import kafka_settings
        from trainer.config import load_config

        config = load_config(args.config, max_updates=args.max_updates)
        return config, kafka_settings(config)
    if component == "rm-loop":
        from arbiter.config import from_flags
        from arbiter.rm.config import load_config as load_rm_config
        from arbiter.rm.loop import RMLoopSettings
        from arbiter.stream import KafkaSettings
        from services.common.client import ClientTLS

        settings = from_flags(RMLoopSettings, args)
        train = load_rm_config(settings.train_config, progress=False)
        return settings, train, KafkaSettings.from_env(**train.kafka), from_flags(ClientTLS, args)
    from cli.commands.serve import KINDS

    return importlib.import_module(KINDS[args.service][0]).settings_from_args(args)


def _gpu_limit(c: dict) -> int:
    return int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_arbiter_command_line_builds_valid_settings(rendered, overlay, tmp_path, monkeypatch):
    """Each container's arguments, environment and mounted files, given to the
    real `arbiter` parser and settings: unknown flags, bad values, missing
    files or keys fail here instead of in a crash-looping pod. Placeholder
    tokens must make the services refuse to start (fail closed)."""
    import torch

    from arbiter.config import ConfigError
    from cli.main import parse_args

    docs = rendered[overlay]
    secrets = operator_secrets(docs)
    for component in (*MODEL_SERVICES, "worker", "trainer", "rm-loop"):
        w = workload(docs, component)
        c = container(w, component)
        assert c["command"] == ["arbiter"], component
        files = PodFiles(docs, w, c, tmp_path / overlay / component, secrets)
        for name in list(os.environ):
            if name.startswith("ARBITER_"):
                monkeypatch.delenv(name)
        env = {k: files.remap(v) for k, v in configmap_env(docs, c).items()}
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        argv = [files.remap_arg(a) for a in c["args"]]
        # A GPU is asked for exactly where the weights are put on one; the
        # check of --device=cuda itself needs CUDA, which this machine may lack.
        if "--device=cuda" in argv:
            assert _gpu_limit(c) >= 1, f"{overlay}/{component}: --device=cuda without a GPU"
            if not torch.cuda.is_available():
                argv = ["--device=cpu" if a == "--device=cuda" else a for a in argv]
        else:
            assert _gpu_limit(c) == 0, f"{overlay}/{component}: a GPU its weights do not use"
        args = parse_args(argv)
        token_file = env.get("ARBITER_AUTH_TOKEN_FILE")
        if component in MODEL_SERVICES:
            assert token_file and env.get("ARBITER_ADMIN_TOKEN_FILE"), f"{component}: both tokens are required"
        if token_file and Path(token_file).read_text().startswith(PLACEHOLDER_TOKEN):
            if component in MODEL_SERVICES:
                with pytest.raises(ConfigError) as refused:
                    _build_settings(args, component)
                assert refused.value.field == "auth_token"
            for i, name in enumerate(("ARBITER_AUTH_TOKEN_FILE", "ARBITER_ADMIN_TOKEN_FILE")):
                if name in env:
                    Path(env[name]).write_text(f"test-token-{i}-" + "x" * 20)
        try:
            built = _build_settings(args, component)
        except ConfigError as err:
            pytest.fail(f"{overlay}/{component}: {err}")
        if component in MODEL_SERVICES:
            assert built.auth_token and built.admin_token, component
            sidecars = [i for i in pod_spec(w).get("initContainers", []) if i["name"] == "triton"]
            assert (built.backend.kind == "triton") == bool(sidecars), component
            if sidecars:
                # The service reaches its sidecar on loopback, and --model is
                # version N of --triton-model in the repository Triton serves.
                (triton,) = sidecars
                assert triton["restartPolicy"] == "Always", "a native sidecar, started before the service"
                assert built.backend.triton_url == "127.0.0.1:" + flag_value(triton["args"], "--grpc-port")[0]
                version = Path(flag_value(c["args"], "--model")[-1])
                assert version.parent.name == built.backend.triton_model and version.name.isdigit()
                assert flag_value(triton["args"], "--model-repository") == [str(version.parent.parent)]
        if component == "rm-loop":
            assert built[0].reward and built[1].registry, component
            assert built[2].bootstrap_servers, "rm-loop: no Kafka settings"
        elif component in ("reward", "policy", "worker", "trainer"):
            kafka = built[1] if component == "trainer" else built.kafka
            assert kafka is not None and kafka.bootstrap_servers, f"{component}: no Kafka settings"


# -- Kafka ---------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kafka_topics_listeners_and_users_agree_with_the_code(rendered, overlay):
    docs = rendered[overlay]
    env = kafka_env(docs)
    (kafka,) = objects(docs, "Kafka")
    cluster = kafka["metadata"]["name"]
    prefix = env.get("ARBITER_KAFKA_TOPIC_PREFIX", "")
    expected = {prefix + name: topics.DEFAULT_PARTITIONS[name] for name in topics.ALL_TOPICS}
    expected.update({prefix + topics.DEAD_LETTER_TOPICS[name]: topics.DEAD_LETTER_PARTITIONS
                     for name in topics.ALL_TOPICS})
    declared = objects(docs, "KafkaTopic")
    assert {t["spec"]["topicName"]: t["spec"]["partitions"] for t in declared} == expected
    assert len(declared) == len(expected)
    brokers = sum(p["spec"]["replicas"] for p in objects(docs, "KafkaNodePool")
                  if p["metadata"]["labels"]["strimzi.io/cluster"] == cluster and "broker" in p["spec"]["roles"])
    config = kafka["spec"]["kafka"]["config"]
    assert config["auto.create.topics.enable"] is False, "topics are declared, never auto-created"
    for t in declared:
        assert t["metadata"]["labels"]["strimzi.io/cluster"] == cluster
        # acks=all needs min.insync.replicas live replicas of every partition.
        assert config["min.insync.replicas"] <= t["spec"]["replicas"] <= brokers, t["metadata"]["name"]
    assert config["min.insync.replicas"] <= config["default.replication.factor"] <= brokers
    assert config["offsets.topic.replication.factor"] <= brokers

    # The clients' connection settings name a listener of this cluster and speak its protocol.
    host, port = env["ARBITER_KAFKA_BOOTSTRAP_SERVERS"].rsplit(":", 1)
    assert host == f"{cluster}-kafka-bootstrap"
    (listener,) = [lst for lst in kafka["spec"]["kafka"]["listeners"] if lst["port"] == int(port)]
    protocol = env["ARBITER_KAFKA_SECURITY_PROTOCOL"]
    assert listener["tls"] == protocol.endswith("SSL")
    authentication = listener.get("authentication", {}).get("type")
    assert (authentication == "scram-sha-512") == protocol.startswith("SASL_")
    if authentication == "scram-sha-512":
        assert env["ARBITER_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
    if kafka["spec"]["kafka"].get("authorization", {}).get("type") == "simple":
        user = one(docs, "KafkaUser", env["ARBITER_KAFKA_SASL_USERNAME"])
        assert user["metadata"]["labels"]["strimzi.io/cluster"] == cluster
        allowed: dict[tuple[str, str], set[str]] = {}
        for acl in user["spec"]["authorization"]["acls"]:
            assert acl.get("type", "allow") == "allow" and acl["resource"].get("patternType", "literal") == "literal"
            key = (acl["resource"]["type"], acl["resource"].get("name", ""))
            allowed.setdefault(key, set()).update(acl["operations"])
        for name in expected:
            assert {"Describe", "Read", "Write"} <= allowed.get(("topic", name), set()), name
        for group in (topics.TRAINER_GROUP, topics.ROLLOUT_WORKERS_GROUP, topics.REWARD_TRAINER_GROUP):
            assert "Read" in allowed.get(("group", group), set()), group
        assert "IdempotentWrite" in allowed.get(("cluster", ""), set())


# -- monitoring ---------------------------------------------------------------------


def _prometheus_jobs() -> set[str]:
    config = yaml.safe_load((ROOT / "infra" / "prometheus" / "prometheus.yml").read_text())
    # arbiter-stack is `arbiter up`'s supervisor; in a cluster the kubelet supervises.
    return {job["job_name"] for job in config["scrape_configs"]} - {"arbiter-stack"}


def test_prometheus_rule_carries_the_rules_of_infra_prometheus(rendered):
    committed = yaml.safe_load((K8S / "base" / "prometheusrule.yaml").read_text())
    assert committed == sync_rules.prometheus_rule(), (
        "infra/k8s/base/prometheusrule.yaml differs from infra/prometheus/rules: run python infra/k8s/sync_rules.py")
    for overlay, docs in rendered.items():
        (rule,) = objects(docs, "PrometheusRule")
        assert rule["spec"] == sync_rules.prometheus_rule()["spec"], overlay
    # Every rule file is one Prometheus loads, so none is left out of the cluster's rules.
    prometheus = ROOT / "infra" / "prometheus"
    loaded = yaml.safe_load((prometheus / "prometheus.yml").read_text())["rule_files"]
    on_disk = {str(p.relative_to(prometheus)) for p in (prometheus / "rules").glob("*.yml")}
    assert on_disk == set(loaded), "a rules file infra/prometheus/prometheus.yml does not load"


def test_every_series_the_rules_read_is_declared_by_the_code():
    """A rule over a metric nobody exports never fires: each arbiter_* series
    in an expression is a metric name the code declares (prometheus_client
    adds _total to counters, _bucket/_count/_sum to histograms)."""
    declared = set()
    for package in ("arbiter", "services", "trainer"):
        for path in (ROOT / package).rglob("*.py"):
            declared |= set(re.findall(r"[\"'](arbiter_[a-z0-9_]+)[\"']", path.read_text()))
    suffixes = ("_total", "_bucket", "_count", "_sum")
    for group in sync_rules.rule_groups():
        for rule in group["rules"]:
            for series in set(re.findall(r"\barbiter_[a-z0-9_]+", rule["expr"])):
                bases = {series} | {series.removesuffix(s) for s in suffixes if series.endswith(s)}
                assert bases & declared, f"{rule.get('alert') or rule.get('record')}: {series} is not a declared metric"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_servicemonitor_scrapes_every_component_as_the_jobs_the_rules_expect(rendered, overlay):
    docs = rendered[overlay]
    (monitor,) = objects(docs, "ServiceMonitor")
    scraped = [s for s in objects(docs, "Service") if matches(monitor["spec"]["selector"], s["metadata"]["labels"])]
    # The job label is the Service's name: the job names infra/prometheus uses.
    assert {s["metadata"]["name"] for s in scraped} == _prometheus_jobs()
    (down,) = [r for g in sync_rules.rule_groups() for r in g["rules"] if r.get("alert") == "ArbiterServiceDown"]
    job_regex = re.search(r'job=~"([^"]+)"', down["expr"]).group(1)
    (endpoint,) = monitor["spec"]["endpoints"]
    for service in scraped:
        name = service["metadata"]["name"]
        assert re.fullmatch(job_regex, name), f"{name}: ArbiterServiceDown would not see it"
        component = name.removeprefix("arbiter-")
        port = next(p for p in service["spec"]["ports"] if p["name"] == endpoint["port"])
        (w,) = selected_workloads(docs, service)
        c = container(w, component)
        assert port["port"] == container_port(c, port["targetPort"]) == METRICS_PORTS[component], name


# -- network policies ----------------------------------------------------------------


def _allowed(docs: list[dict], source: dict, source_namespace: dict, target: dict, port: int, port_name: str,
             same_namespace: bool) -> bool:
    """Whether the NetworkPolicies let a pod with labels ``source`` (in a
    namespace with labels ``source_namespace``) reach ``target``'s port."""
    selecting = [p for p in objects(docs, "NetworkPolicy")
                 if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
                 and matches(p["spec"]["podSelector"], target)]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports and not any(p.get("port") in (port, port_name) for p in ports):
                continue
            for peer in rule.get("from", []):
                pods, namespaces = peer.get("podSelector"), peer.get("namespaceSelector")
                if namespaces is None and not same_namespace:
                    continue
                if namespaces is not None and not matches(namespaces, source_namespace):
                    continue
                if pods is None or matches(pods, source):
                    return True
    return False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_allow_the_loop_and_deny_the_rest(rendered, overlay):
    docs = rendered[overlay]

    def labels(component: str) -> dict:
        return workload(docs, component)["spec"]["template"]["metadata"]["labels"]

    monitoring = {"kubernetes.io/metadata.name": "monitoring"}
    for kind in MODEL_SERVICES:
        port = container_port(container(workload(docs, kind), kind), "grpc")
        assert _allowed(docs, labels("worker"), {}, labels(kind), port, "grpc", True), kind
        assert not _allowed(docs, labels("trainer"), {}, labels(kind), port, "grpc", True), kind
        assert not _allowed(docs, {}, {}, labels(kind), port, "grpc", True), kind
        assert not _allowed(docs, labels("worker"), {}, labels(kind), port, "grpc", False), "other namespaces"
    # The trainer's ranks reach each other on any port (rendezvous, then the
    # collectives' own connections), and nothing else reaches them there.
    trainer = labels("trainer")
    assert _allowed(docs, trainer, {}, trainer, 29400, "rendezvous", True)
    assert _allowed(docs, trainer, {}, trainer, 45678, "", True)
    assert not _allowed(docs, labels("worker"), {}, trainer, 29400, "rendezvous", True)
    for component in (*MODEL_SERVICES, "worker", "trainer"):
        port = container_port(container(workload(docs, component), component), "metrics")
        assert _allowed(docs, {}, monitoring, labels(component), port, "metrics", False), component
        assert not _allowed(docs, {}, {"kubernetes.io/metadata.name": "elsewhere"}, labels(component), port,
                            "metrics", False), component
    # The brokers' own policies are Strimzi's, from the listener's peers: Arbiter's pods.
    (kafka,) = objects(docs, "Kafka")
    for listener in kafka["spec"]["kafka"]["listeners"]:
        for component in ("reward", "policy", "worker", "trainer"):
            assert any(matches(peer["podSelector"], labels(component)) for peer in listener["networkPolicyPeers"])


# -- resources and GPUs ----------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_containers_request_resources_run_restricted_and_production_runs_models_on_gpus(rendered, overlay):
    docs = rendered[overlay]
    for w in workloads(docs):
        for c in all_containers(w):
            resources = c.get("resources", {})
            assert {"cpu", "memory"} <= set(resources.get("requests", {})), (w["metadata"]["name"], c["name"])
            assert "memory" in resources.get("limits", {}), (w["metadata"]["name"], c["name"])
    # Pod Security "restricted" (the namespace warns and audits on it).
    for w in workloads(docs):
        pod = pod_spec(w)["securityContext"]
        assert pod["runAsNonRoot"] and pod["seccompProfile"]["type"] == "RuntimeDefault", w["metadata"]["name"]
        for c in all_containers(w):
            security = c["securityContext"]
            assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == ["ALL"], (
                w["metadata"]["name"], c["name"])
    gpus = {kind: sum(_gpu_limit(c) for c in all_containers(workload(docs, kind))) for kind in MODEL_SERVICES}
    if overlay == "dev":
        assert not any(_gpu_limit(c) for w in workloads(docs) for c in all_containers(w))
    else:
        assert gpus == {kind: 1 for kind in MODEL_SERVICES}
        for kind in MODEL_SERVICES:
            tolerations = pod_spec(workload(docs, kind)).get("tolerations", [])
            assert any(t["key"] == "nvidia.com/gpu" for t in tolerations), kind


# -- TLS -------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", ["production", "production-triton"])
def test_production_serves_and_calls_over_mtls_with_one_secret(rendered, overlay):
    from cli.main import parse_args

    docs = rendered[overlay]
    worker = workload(docs, "worker")
    worker_args = parse_args(container(worker, "worker")["args"])
    assert worker_args.tls_ca_file and worker_args.tls_cert_file and worker_args.tls_key_file
    for kind in MODEL_SERVICES:
        w = workload(docs, kind)
        c = container(w, kind)
        args = parse_args(c["args"])
        assert args.tls_cert_file and args.tls_key_file and args.tls_client_ca_file, kind
        # The worker trusts the CA the services require client certificates from.
        assert _mounted_file(docs, w, c, args.tls_client_ca_file) == _mounted_file(
            docs, worker, container(worker, "worker"), worker_args.tls_ca_file)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is needed to make test certificates")
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_the_tls_exec_probe_reports_a_real_mtls_server_health(pki):
    """grpc_health_probe.py, run as the kubelet runs it, against an Arbiter
    server requiring client certificates: SERVING is exit 0; NOT_SERVING, or
    a client certificate from another CA, exit 1."""
    from grpc_health.v1 import health_pb2
    from prometheus_client import CollectorRegistry

    from services.common.server import start_server
    from services.common.settings import ServerSettings

    settings = ServerSettings(port=0, tls_cert_file=str(pki / "server.pem"), tls_key_file=str(pki / "server.key"),
                              tls_client_ca_file=str(pki / "ca.pem"), grace_seconds=0)

    async def create():
        running = await start_server(settings, ("arbiter.v1.RewardService",), lambda server: None,
                                     CollectorRegistry())
        return running, running.port

    def probe(port: int, client: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(K8S / "components" / "tls" / "grpc_health_probe.py"), f"--port={port}",
             f"--ca-file={pki / 'ca.pem'}", f"--cert-file={pki / f'{client}.pem'}",
             f"--key-file={pki / f'{client}.key'}", "--server-name=localhost", "--timeout-s=10"],
            capture_output=True, text=True, timeout=60)

    with BackgroundServer(create) as server:
        ok = probe(server.port, "client")
        assert ok.returncode == 0 and "SERVING" in ok.stdout, ok.stderr
        refused = probe(server.port, "intruder")
        assert refused.returncode == 1 and "UNAVAILABLE" in refused.stderr, refused
        server.run(server.running.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING))
        draining = probe(server.port, "client")
        assert draining.returncode == 1 and "NOT_SERVING" in draining.stdout, draining
