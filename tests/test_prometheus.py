"""Prometheus config, rules and dashboard: checked with promtool, and exercised
against a real Prometheus scraping a real reward service."""

import json
import random
import re
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
import yaml
from helpers import BackgroundServer, wait_until
from prometheus_server import LocalPrometheus

from arbiter.drift import DriftConfig
from arbiter.reward.model import RewardModel
from arbiter.types import RewardInput, Truncation
from arbiter.v1 import reward_pb2, reward_pb2_grpc
from services.reward.server import create_server
from services.reward.settings import RewardSettings

INFRA = Path(__file__).resolve().parents[1] / "infra"
PROM = INFRA / "prometheus"
DASHBOARD = INFRA / "grafana" / "arbiter-dashboard.json"
METRIC_NAME = re.compile(r"\b(arbiter(?:_|:)[A-Za-z0-9_:]*)")

def promtool(*args: str, cwd: Path = PROM) -> str:
    assert shutil.which("promtool"), "promtool is missing: `make test` installs Debian's prometheus package"
    done = subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_config_and_rules_pass_promtool():
    assert "SUCCESS" in promtool("check", "config", "prometheus.yml")
    out = promtool("check", "rules", *sorted(str(p.relative_to(PROM)) for p in (PROM / "rules").glob("*.yml")))
    assert "SUCCESS" in out


def test_alert_rules_unit_tests():
    assert "SUCCESS" in promtool("test", "rules", "tests/arbiter-alerts-test.yml")


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_dashboard_is_well_formed():
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            for variable in re.findall(r"\$(\w+)", target["expr"]):
                assert variable in variables, f"{panel['title']}: undefined variable ${variable}"
    titles = " ".join(panel["title"] for panel in dashboard["panels"])
    for topic in ("distribution", "PSI", "latency", "Throughput"):
        assert topic in titles


def recorded_names() -> set[str]:
    names = set()
    for path in (PROM / "rules").glob("*.yml"):
        for group in yaml.safe_load(path.read_text())["groups"]:
            names |= {rule["record"] for rule in group["rules"] if "record" in rule}
    return names


def fast_rules(tmp_path: Path) -> list[str]:
    """The real rule files, with `for:` shortened so a test can see alerts fire."""
    paths = []
    for path in sorted((PROM / "rules").glob("*.yml")):
        rules = yaml.safe_load(path.read_text())
        for group in rules["groups"]:
            for rule in group["rules"]:
                if "for" in rule:
                    rule["for"] = "1s"
        target = tmp_path / path.name
        target.write_text(yaml.safe_dump(rules))
        paths.append(str(target))
    return paths


def split_by_score(model_dir: Path, count: int) -> tuple[list[RewardInput], list[RewardInput]]:
    """Inputs from the low and the high end of the model's score distribution:
    switching from one to the other is a genuine shift in served scores."""
    rng = random.Random(0)
    words = "good bad movie great awful the a was is kind rude help".split()
    candidates = [RewardInput(prompt="Review:", response=" " + " ".join(rng.choices(words, k=rng.randint(2, 12))))
                  for _ in range(3 * count)]
    model = RewardModel.load(model_dir)
    scores = model.forward([e.token_ids for e in model.encode(candidates, Truncation.REJECT)])
    ranked = [item for _, item in sorted(zip(scores, candidates), key=lambda pair: pair[0])]
    low, high = ranked[: 3 * count // 2], ranked[-count:]
    return rng.sample(low, count), high


def exporters_of_other_components():
    """The trainer's, worker's and policy service's declared metrics, each on
    its own /metrics endpoint with one observation, so the dashboard's panels
    for them are checked against what those components really export."""
    from prometheus_client import CollectorRegistry, start_http_server

    from services.policy.metrics import PolicyMetrics
    from services.worker.metrics import WorkerMetrics
    from trainer.metrics import TrainerMetrics
    from trainer.step import UpdateStats

    trainer = TrainerMetrics()
    trainer.on_update(UpdateStats(0.5, 0.1, 0.2, 0.05, 3.0, -0.1, 0.3, 0.1, 0.01, 9.0, 8, 0), 4.0, 0.5, 0.2)
    trainer.iteration.observe(1.5)
    worker_registry, policy_registry = CollectorRegistry(), CollectorRegistry()
    worker = WorkerMetrics(worker_registry)
    worker.rollouts.inc(32)
    worker.skipped.labels("empty_completion").inc()
    worker.produce_errors.inc()
    policy = PolicyMetrics(policy_registry)
    policy.policy_update_apply_seconds.observe(0.8)
    policy.policy_update_step.set(3)
    servers = {}
    for job, registry in (("arbiter-trainer", trainer.registry), ("arbiter-worker", worker_registry),
                          ("arbiter-policy", policy_registry)):
        httpd, _ = start_http_server(0, addr="127.0.0.1", registry=registry)
        servers[job] = httpd
    return servers


def test_drift_alert_fires_in_a_real_prometheus(tiny_models, tmp_path):
    window = 200
    low, high = split_by_score(tiny_models["reward"], window)
    settings = RewardSettings(
        model_dir=str(tiny_models["reward"]), port=0, metrics_port=0,
        drift=DriftConfig(window_size=window, reference_size=window, min_samples=100),
    )
    with BackgroundServer(lambda: create_server(settings)) as srv, grpc.insecure_channel(srv.target) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)

        def serve(items):
            for start in range(0, len(items), 50):
                stub.Score(reward_pb2.ScoreRequest(inputs=[
                    reward_pb2.RewardInput(text=reward_pb2.TextPair(prompt=i.prompt, response=i.response))
                    for i in items[start:start + 50]
                ]), timeout=30)

        # A shadow candidate, so the dashboard's shadow panel has data too.
        from arbiter.v1 import common_pb2, common_pb2_grpc

        common_pb2_grpc.ModelServiceStub(channel).LoadModelVersion(
            common_pb2.LoadModelVersionRequest(path=str(tiny_models["reward"]), version="twin"), timeout=60)
        stub.SetShadow(reward_pb2.SetShadowRequest(model_version="twin"), timeout=10)
        serve(low)  # the reference: the first `window` served scores
        others = exporters_of_other_components()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": fast_rules(tmp_path),
            "scrape_configs": [{
                "job_name": "arbiter-reward",
                "static_configs": [{"targets": [f"127.0.0.1:{srv.running.metrics_port}"]}],
            }] + [{"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{httpd.server_port}"]}]}
                  for job, httpd in others.items()],
        }
        prometheus = LocalPrometheus(tmp_path, yaml.safe_dump(config))
        try:
            wait_until(lambda: prometheus.query('up{job="arbiter-reward"} == 1'), 60, "first scrape")
            psi = wait_until(
                lambda: prometheus.query('arbiter_reward_drift_psi{model_version="v0"}'), 30, "PSI gauge"
            )
            assert float(psi[0]["value"][1]) == pytest.approx(0.0, abs=1e-9)  # window == reference

            def drift_alert(state):
                alerts = prometheus.api("alerts")["alerts"]
                return [a for a in alerts if a["labels"]["alertname"] == "ArbiterRewardDrift" and a["state"] == state
                        and a["labels"]["model_version"] == "v0"]

            assert not drift_alert("pending") and not drift_alert("firing")

            serve(high)  # inject the shifted distribution
            firing = wait_until(lambda: drift_alert("firing"), 60, "ArbiterRewardDrift to fire")
            assert firing[0]["labels"]["model_version"] == "v0"
            assert float(prometheus.query('arbiter_reward_drift_psi{model_version="v0"}')[0]["value"][1]) > 0.2
            assert float(prometheus.query('arbiter_reward_drift_ks_statistic{model_version="v0"}')[0]["value"][1]) > 0.5

            # Every dashboard query is valid PromQL here and names only metrics that exist.
            wait_until(lambda: prometheus.query("arbiter:reward_scores:rate1m"), 30, "recording rules")
            wait_until(lambda: len(prometheus.query('up{job=~"arbiter-.*"} == 1')) == 4, 30, "all scrapes")
            exported = set(prometheus.api("label/__name__/values"))
            known = exported | recorded_names()
            for expr in dashboard_exprs():
                for name in METRIC_NAME.findall(expr):
                    assert name in known, f"dashboard references {name}, which nothing exports"
                prometheus.query(expr.replace("$job", ".*"))
        finally:
            prometheus.stop()
            for httpd in others.values():
                httpd.shutdown()
                httpd.server_close()
