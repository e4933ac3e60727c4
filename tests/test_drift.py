"""Drift statistics against hand-derived values, the monitor's behaviour, and
the service's GetScoreDrift / `arbiter drift report`."""

import math
import subprocess
import sys

import grpc
import numpy as np
import pytest
from helpers import BackgroundServer, expect_error

from arbiter.drift import DriftConfig, ScoreDriftMonitor, bin_proportions, drift_statistics
from arbiter.v1 import reward_pb2, reward_pb2_grpc
from services.reward.server import create_server
from services.reward.settings import RewardSettings


def test_statistics_match_hand_derived_values():
    # reference [0,1,2,3] with 2 quantile bins splits at 1.5: p = [1/2, 1/2];
    # current [0,3,3,3] falls 1 left, 3 right: q = [1/4, 3/4].
    reference, current = [0.0, 1.0, 2.0, 3.0], [0.0, 3.0, 3.0, 3.0]
    p, q = bin_proportions(np.array(reference), np.array(current), bins=2)
    assert p == pytest.approx([0.5, 0.5], abs=1e-3) and q == pytest.approx([0.25, 0.75], abs=1e-3)
    stats = drift_statistics(reference, current, bins=2)
    # PSI = Σ (q−p) ln(q/p) = (−1/4) ln(1/2) + (1/4) ln(3/2) = (1/4) ln 3
    assert stats["psi"] == pytest.approx(math.log(3) / 4, abs=1e-4)
    # ECDFs differ most on [2, 3): 3/4 vs 1/4.
    assert stats["ks_statistic"] == pytest.approx(0.5)
    # ∫|F_ref − F_cur| = 1·(1/2 − 1/4) + 1·(3/4 − 1/4) = 0.75
    assert stats["wasserstein"] == pytest.approx(0.75)
    # m = [3/8, 5/8]; KL(p‖m) = 0.032269, KL(q‖m) = 0.035372 nats; JS = mean / ln 2 bits; distance = √JS
    js = ((0.5 * math.log(0.5 / 0.375) + 0.5 * math.log(0.5 / 0.625))
          + (0.25 * math.log(0.25 / 0.375) + 0.75 * math.log(0.75 / 0.625))) / 2 / math.log(2)
    assert stats["js_distance"] == pytest.approx(math.sqrt(js), abs=1e-3)


def test_identical_samples_have_no_drift():
    values = np.random.default_rng(1).normal(size=500)
    stats = drift_statistics(values, values)
    assert stats == pytest.approx({"psi": 0.0, "ks_statistic": 0.0, "wasserstein": 0.0, "js_distance": 0.0}, abs=1e-9)


def test_monitor_uses_first_served_scores_and_flags_a_shift():
    rng = np.random.default_rng(0)
    monitor = ScoreDriftMonitor(DriftConfig(window_size=200, reference_size=200, min_samples=100))
    monitor.observe(rng.normal(0, 1, 50).tolist())
    assert not monitor.stats().ready  # 50 < min_samples
    monitor.observe(rng.normal(0, 1, 450).tolist())
    steady = monitor.stats()
    assert monitor.reference_source == "first_served"
    assert steady.ready and steady.reference_samples == 200 and steady.window_samples == 200
    assert steady.psi < 0.1 and steady.change_points == 0
    monitor.observe(rng.normal(1.0, 1, 200).tolist())
    shifted = monitor.stats()
    assert shifted.psi > 0.5 and shifted.ks_statistic > 0.25
    assert shifted.window_mean == pytest.approx(1.0, abs=0.2)
    assert shifted.reference_mean == steady.reference_mean  # the reference is frozen
    assert shifted.change_points >= 1


def test_monitor_prefers_a_shipped_calibration_set():
    calibration = np.random.default_rng(2).normal(0, 1, 300).tolist()
    monitor = ScoreDriftMonitor(DriftConfig(window_size=100, reference_size=100, min_samples=50), calibration)
    assert monitor.reference_source == "calibration"
    monitor.observe([float("nan"), *calibration[:100]])  # non-finite scores are not evidence
    stats = monitor.stats()
    assert stats.reference_samples == 300 and stats.window_samples == 100 and stats.ready


def test_config_validation():
    with pytest.raises(ValueError, match="min_samples"):
        DriftConfig(window_size=10, reference_size=10, min_samples=20)
    with pytest.raises(ValueError, match="bins"):
        DriftConfig(bins=1)


def test_service_reports_drift_and_cli_renders_it(tiny_models, tmp_path):
    settings = RewardSettings(
        model_dir=str(tiny_models["reward"]), port=0,
        drift=DriftConfig(window_size=40, reference_size=40, min_samples=20),
    )
    with BackgroundServer(lambda: create_server(settings)) as srv, grpc.insecure_channel(srv.target) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        empty = stub.GetScoreDrift(reward_pb2.GetScoreDriftRequest(), timeout=10)
        assert empty.model_version == "v0" and not empty.statistics.ready
        inputs = [
            reward_pb2.RewardInput(text=reward_pb2.TextPair(prompt=f"Question {i}?", response=" answer" * (1 + i % 5)))
            for i in range(40)
        ]
        served = stub.Score(reward_pb2.ScoreRequest(inputs=inputs[:16]), timeout=10)
        stub.Score(reward_pb2.ScoreRequest(inputs=inputs[16:]), timeout=10)
        drift = stub.GetScoreDrift(reward_pb2.GetScoreDriftRequest(model_version="v0"), timeout=10)
        assert drift.reference_source == "first_served"  # the tiny RM ships 17 < 20 calibration scores
        assert list(drift.reference_scores[:16]) == pytest.approx([r.raw_score for r in served.results], abs=1e-6)
        assert drift.statistics.ready and drift.statistics.psi == pytest.approx(0.0, abs=1e-9)
        expect_error(lambda: stub.GetScoreDrift(reward_pb2.GetScoreDriftRequest(model_version="nope"), timeout=10),
                     grpc.StatusCode.NOT_FOUND)

        png = tmp_path / "drift.png"
        done = subprocess.run(
            [sys.executable, "-m", "cli", "drift", "report", "--target", srv.target, "--png", str(png)],
            capture_output=True, text=True, timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert "PSI" in done.stdout and "stable" in done.stdout and "first_served" in done.stdout
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
