"""Shadow scoring on live traffic: agreement math by hand, then the service."""

import math

import grpc
import numpy as np
import pytest
from helpers import BackgroundServer, expect_error, metric_value, wait_until

from arbiter.shadow import PairedChangeDetector, ShadowMonitor, pairwise_agreement
from arbiter.tiny import TinyConfig, make_reward
from arbiter.v1 import common_pb2, common_pb2_grpc, reward_pb2, reward_pb2_grpc
from services.reward.server import create_server
from services.reward.settings import RewardSettings


def test_pairwise_agreement_by_hand():
    # Pairs (0,1) and (0,2) are ordered alike, (1,2) is flipped: 2/3.
    assert pairwise_agreement(np.array([1.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0])) == pytest.approx(2 / 3)
    # A tie on one side counts half: (0,1) ½, (0,2) 1, (1,2) 1 -> 2.5/3.
    assert pairwise_agreement(np.array([1.0, 1.0, 2.0]), np.array([1.0, 2.0, 3.0])) == pytest.approx(2.5 / 3)
    monitor = ShadowMonitor("a", "b", window=3)
    monitor.observe([0.0, 5.0], [1.0, 9.0])
    monitor.observe([1.0, 2.0], [2.0, 3.0])  # the window keeps the last 3 pairs
    stats = monitor.stats()
    assert stats.samples == 3 and stats.pairwise_agreement == pytest.approx(1.0) and stats.spearman == pytest.approx(1.0)


def first_alarm_by_hand(c: float, delta: float, threshold: float, reference: int) -> int:
    """The paired detector after ``reference`` differences of 0 and then a
    constant difference c: after the n-th shifted item the running mean is
    n·c/(reference + n), so that item's deviation is reference·c/(reference + n),
    and Page-Hinkley's increase (its minimum was the reference's end) is
    Σ_k≤n (reference·c/(reference + k) − δ); the alarm is the first n where it
    exceeds the threshold (river's fading α = 0.9999 changes it by < 1e-2)."""
    total, n = 0.0, 0
    while total <= threshold:
        n += 1
        total += reference * c / (reference + n) - delta
    return n


def test_paired_detector_ignores_a_shift_both_versions_share_and_alarms_when_they_part():
    # Reference: a alternates 1, 3 and b 10, 30, so each standardised is ±1/s
    # with s = sqrt(100/99) (ddof 1), and z_a − z_b = 0 on every item.
    s = math.sqrt(100 / 99)
    reference = [(1.0, 10.0), (3.0, 30.0)] * 50
    shared = PairedChangeDetector(delta=0.05, threshold=25.0, reference=100)
    for a, b in reference:
        shared.observe(a, b)
    assert shared.detecting and shared.change_points == 0
    # Traffic moves both to their high score: z_a = z_b = +1/s, the difference stays 0.
    for _ in range(1000):
        shared.observe(3.0, 30.0)
    assert shared.change_points == 0
    # Only a moves up: z_a − z_b = 1/s − (−1/s) = 2/s on every item.
    parting = PairedChangeDetector(delta=0.05, threshold=25.0, reference=100)
    for a, b in reference:
        parting.observe(a, b)
    expected = first_alarm_by_hand(2 / s, 0.05, 25.0, 100)
    assert 12 <= expected <= 16  # ~ 199·ln(1 + n/100) − 0.05·n crossing 25
    seen = 0
    while parting.change_points == 0:
        parting.observe(3.0, 10.0)
        seen += 1
    assert seen == expected
    # Non-finite scores are skipped, before and after the reference.
    parting.observe(float("nan"), 1.0)
    assert parting.change_points == 1


def test_paired_detector_waits_for_its_reference_and_standardises_a_constant_version_by_its_mean():
    detector = PairedChangeDetector(delta=0.05, threshold=25.0, reference=100)
    for i in range(99):
        detector.observe(5.0, float(i % 2))
    assert not detector.detecting  # 99 of 100 reference pairs
    detector.observe(5.0, 1.0)
    assert detector.detecting and detector.change_points == 0
    # a is constant (std 0): z_a = a − 5. b alternates 0, 1 (mean 0.5). An item
    # a = 6, b = 0.5 gives d = 1 − 0 = 1 by hand.
    assert detector._difference(6.0, 0.5) == pytest.approx(1.0)
    monitor = ShadowMonitor("a", "b", paired_reference=2)
    monitor.observe([1.0, 3.0], [10.0, 30.0])
    stats = monitor.stats()
    assert (stats.paired_detecting, stats.paired_change_points) == (True, 0)


def test_shadow_candidate_is_scored_but_never_answers(tiny_models, tmp_path, model_roots):
    settings = RewardSettings(model_dir=str(tiny_models["reward"]), port=0, metrics_port=0, model_roots=model_roots)
    candidate = make_reward(tmp_path / "candidate", TinyConfig(seed=11), calibrate=False)
    with BackgroundServer(lambda: create_server(settings)) as srv, grpc.insecure_channel(srv.target) as channel:
        reward = reward_pb2_grpc.RewardServiceStub(channel)
        models = common_pb2_grpc.ModelServiceStub(channel)
        for path, version in ((candidate, "cand"), (tiny_models["reward"], "twin")):
            models.LoadModelVersion(common_pb2.LoadModelVersionRequest(path=str(path), version=version), timeout=60)

        def bad(request, code, fragment):
            expect_error(lambda: reward.SetShadow(request, timeout=10), code, fragment)

        bad(reward_pb2.SetShadowRequest(model_version="nope"), grpc.StatusCode.NOT_FOUND, "'nope'")
        bad(reward_pb2.SetShadowRequest(model_version="v0"), grpc.StatusCode.INVALID_ARGUMENT, "active version")
        bad(reward_pb2.SetShadowRequest(model_version="cand", sample_fraction=2), grpc.StatusCode.INVALID_ARGUMENT,
            "sample_fraction")
        expect_error(lambda: reward.GetShadow(reward_pb2.GetShadowRequest(), timeout=10),
                     grpc.StatusCode.INVALID_ARGUMENT, "model_version")
        expect_error(lambda: reward.GetShadow(reward_pb2.GetShadowRequest(model_version="nope"), timeout=10),
                     grpc.StatusCode.NOT_FOUND, "'nope'")
        # Loaded, never shadowed: an empty window, compared with nothing yet.
        window = reward.GetShadow(reward_pb2.GetShadowRequest(model_version="cand"), timeout=10)
        assert (window.active_version, window.shadow_version, window.shadowing, window.samples, window.window) == (
            "v0", "cand", False, 0, 500)
        assert math.isnan(window.pairwise_agreement) and math.isnan(window.spearman)

        inputs = [reward_pb2.RewardInput(text=reward_pb2.TextPair(prompt=f"Q{i}:", response=" yes" * (1 + i % 6)))
                  for i in range(24)]

        def shadow_samples(version):
            return metric_value(srv, "arbiter_reward_shadow_samples", model_version="v0", shadow_version=version)

        # An identical twin agrees perfectly.
        answer = reward.SetShadow(reward_pb2.SetShadowRequest(model_version="twin"), timeout=10)
        assert (answer.active_version, answer.shadow_version, answer.sample_fraction) == ("v0", "twin", 1.0)
        response = reward.Score(reward_pb2.ScoreRequest(inputs=inputs), timeout=10)
        assert response.model_version == "v0"
        wait_until(lambda: (shadow_samples("twin") or 0) >= 24, 10, "the twin to shadow-score all 24 inputs")
        assert metric_value(srv, "arbiter_reward_shadow_pairwise_agreement", model_version="v0", shadow_version="twin") == 1.0

        # A different candidate: its scores feed its own drift/score metrics too.
        reward.SetShadow(reward_pb2.SetShadowRequest(model_version="cand", sample_fraction=1.0), timeout=10)
        active_scores = [r.raw_score for r in reward.Score(reward_pb2.ScoreRequest(inputs=inputs), timeout=10).results]
        wait_until(lambda: (shadow_samples("cand") or 0) >= 24, 10, "the candidate to shadow-score all 24 inputs")
        pinned = reward.Score(reward_pb2.ScoreRequest(inputs=inputs, options=reward_pb2.ScoreOptions(model_version="cand")),
                              timeout=10)
        expected = pairwise_agreement(np.array(active_scores), np.array([r.raw_score for r in pinned.results]))
        observed = metric_value(srv, "arbiter_reward_shadow_pairwise_agreement", model_version="v0", shadow_version="cand")
        assert observed == pytest.approx(expected, abs=1e-9) and observed < 1.0
        # GetShadow reads the same window the metrics export; the twin's window ended when cand's began.
        window = reward.GetShadow(reward_pb2.GetShadowRequest(model_version="cand"), timeout=10)
        assert (window.active_version, window.shadowing, window.sample_fraction) == ("v0", True, 1.0)
        assert window.samples == shadow_samples("cand") >= 24
        assert window.pairwise_agreement == pytest.approx(expected, abs=1e-9)
        assert window.spearman == pytest.approx(metric_value(
            srv, "arbiter_reward_shadow_spearman", model_version="v0", shadow_version="cand"), abs=1e-12)
        assert reward.GetShadow(reward_pb2.GetShadowRequest(model_version="twin"), timeout=10).samples == 0
        # The paired detector needs its 100 reference items first.
        assert (window.paired_detecting, window.paired_change_points) == (False, 0)
        assert metric_value(srv, "arbiter_reward_shadow_paired_change_points_total", model_version="v0",
                            shadow_version="cand") == 0
        assert metric_value(srv, "arbiter_reward_score_count", model_version="cand") >= 24

        # Promoting the candidate ends shadowing.
        models.ActivateModelVersion(common_pb2.ActivateModelVersionRequest(version="cand"), timeout=10)
        assert shadow_samples("cand") is None
        window = reward.GetShadow(reward_pb2.GetShadowRequest(model_version="cand"), timeout=10)
        assert (window.active_version, window.shadowing, window.samples) == ("cand", False, 0)
        assert reward.Score(reward_pb2.ScoreRequest(inputs=inputs[:1]), timeout=10).model_version == "cand"


def test_shadow_live_cli(tiny_models):
    import subprocess
    import sys

    settings = RewardSettings(model_dir=str(tiny_models["reward"]), port=0)
    with BackgroundServer(lambda: create_server(settings)) as srv:
        with grpc.insecure_channel(srv.target) as channel:
            common_pb2_grpc.ModelServiceStub(channel).LoadModelVersion(
                common_pb2.LoadModelVersionRequest(path=str(tiny_models["reward"]), version="twin"), timeout=60)
        on = subprocess.run([sys.executable, "-m", "cli", "rm", "shadow-live", "--target", srv.target,
                             "--candidate", "twin", "--fraction", "0.5"], capture_output=True, text=True, timeout=120)
        assert on.returncode == 0 and "50% of 'v0'" in on.stdout, on.stderr
        assert srv.engine.shadow == ("twin", 0.5)
        off = subprocess.run([sys.executable, "-m", "cli", "rm", "shadow-live", "--target", srv.target],
                             capture_output=True, text=True, timeout=120)
        assert off.returncode == 0 and "shadowing off" in off.stdout and srv.engine.shadow is None
        bad = subprocess.run([sys.executable, "-m", "cli", "rm", "shadow-live", "--target", srv.target,
                              "--candidate", "missing"], capture_output=True, text=True, timeout=120)
        assert bad.returncode == 1 and "NOT_FOUND" in bad.stderr
