"""The benchmarks run (``make bench`` would not rot unnoticed): the policy,
reference, prefill and prompts benchmarks at ``--quick`` print their tables and finite ratios.
Nothing here is about speed."""

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def finite_numbers(value) -> list[float]:
    if isinstance(value, dict):
        return [x for v in value.values() for x in finite_numbers(v)]
    return [value] if isinstance(value, float) else []


def test_quick_policy_and_reference_benchmarks_print_tables_with_finite_ratios(tmp_path):
    summary_path = tmp_path / "summary.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--only", "policy", "--only", "reference",
         "--json", str(summary_path)],
        cwd=REPO, capture_output=True, text=True, timeout=150,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for title in ("Policy generation", "Reference log-probs"):
        assert title in result.stdout, result.stdout[-3000:]
    for column in ("vs in-process core (a)", "vs HF generate (b)", "vs in-process same batch (a)"):
        assert column in result.stdout
    summary = json.loads(summary_path.read_text())
    assert set(summary) == {"policy", "reference"}
    policy, reference = summary["policy"], summary["reference"]
    assert set(policy["service_vs_in_process"]) == {"1", "4", "16"}
    assert set(reference["service_vs_in_process_same_batch"]) == {"1", "8", "32"}
    numbers = finite_numbers(summary)
    assert numbers and all(math.isfinite(x) and x > 0 for x in numbers)


def test_quick_prefill_and_prompts_benchmarks_compare_with_their_features_off(tmp_path):
    summary_path = tmp_path / "summary.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--only", "prefill", "--only", "prompts", "--json",
         str(summary_path)],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Chunked prefill" in result.stdout and "off (each join in one forward)" in result.stdout
    prefill = json.loads(summary_path.read_text())["prefill"]
    assert set(prefill["settings"]) == {"0", "2048"}
    assert prefill["tokens_per_s_vs_off"]["0"] == 1.0
    for setting in prefill["settings"].values():
        assert setting["long_requests"] >= 1 and setting["stream_tokens_per_s"] > 0
        assert all(math.isfinite(setting[k]) and setting[k] > 0 for k in ("gap_p99_ms", "tokens_per_s"))
    assert "Prompt prefill" in result.stdout and "before (both off)" in result.stdout
    prompts = json.loads(summary_path.read_text())["prompts"]
    gains, not_computed = prompts["tokens_per_s_vs_before"], prompts["not_computed_share"]
    assert set(gains) == {"one system prompt", "one per request", "mixed lengths"}
    assert all(set(cells) == {"1", "2"} for cells in gains.values())
    assert all(math.isfinite(x) and x > 0 for cells in gains.values() for x in cells.values())
    # The first cell's first request caches the system prompt: the next cell finds it from its first request.
    assert not_computed["one system prompt"]["2"] > 0.5
    # A request's 4 prompts compute their system prompt once, the first of them: the others copy it.
    assert all(share > 0.5 for share in not_computed["one per request"].values())
    assert all(share == 0 for share in not_computed["mixed lengths"].values())
