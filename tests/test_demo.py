"""`make demo`'s job in --quick mode: corpus pretraining, simulated labels, RM
training, the stack, PPO, summary and plot — end to end, as a user runs it."""

import json
import subprocess
import sys


def test_quick_demo_runs_end_to_end(tmp_path):
    workdir = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "-m", "cli", "demo", "--quick", "--workdir", str(workdir)],
        capture_output=True, text=True, timeout=900, env={**__import__("os").environ, "ARBITER_LOG_LEVEL": "WARNING"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["updates"] == 4
    assert summary["served_version"] == summary["final_version"] == "ppo-4"
    assert summary["rm_eval_accuracy"] is not None and "targets_met" in summary
    assert (workdir / "demo.png").read_bytes()[:4] == b"\x89PNG"
    assert (workdir / "models" / "rm-registry" / "sentiment-rm" / "v1" / "arbiter.json").exists()
    for text in ("preference pairs labeled", "Targets", "now serves 'ppo-4'"):
        assert text in done.stdout
