"""The ``arbiter`` command line, run as users run it (``python -m cli`` in a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

COMMANDS = ["make-tiny-models", "serve", "score", "broker", "drift", "triton", "train", "rm", "elo", "worker", "up", "demo"]

# Every command and subcommand, with words its help must show: a group's
# subcommands, or a leaf's own flag (so a registration that lost its arguments fails).
HELP_SHOWS = {
    ("make-tiny-models",): ["out_dir"],
    ("serve",): ["reward", "policy", "reference"],
    ("serve", "reward"): ["--model", "--max-batch-size", "--drift-window-size", "--text-convention"],
    ("serve", "policy"): ["--model"],
    ("serve", "reference"): ["--model"],
    ("score",): ["--target", "--normalize", "--truncation"],
    ("broker",): ["--port", "--create-topics", "--ready-file"],
    ("drift",): ["report"],
    ("drift", "report"): ["--target", "--png"],
    ("triton",): ["export", "serve"],
    ("triton", "export"): ["--model", "--kind", "--out", "--dtype"],
    ("triton", "serve"): ["--repository", "--grpc-port"],
    ("train",): ["ppo", "rm"],
    ("train", "ppo"): ["--config", "--max-updates", "--reset-offsets"],
    ("train", "rm"): ["--config", "--no-progress"],
    ("rm",): ["list", "shadow", "shadow-live", "submit", "loop"],
    ("rm", "list"): ["--registry"],
    ("rm", "shadow"): ["--candidate", "--promote"],
    ("rm", "shadow-live"): ["--candidate", "--fraction"],
    ("rm", "submit"): ["--file", "--annotator"],
    ("rm", "loop"): ["--train-config", "--reward", "--retrain-preferences", "--min-shadow-spearman", "--watch-s"],
    ("elo",): ["--versions", "--preferences", "--bootstrap"],
    ("worker",): ["--policy", "--reward", "--reference"],
    ("up",): ["--config", "--kafka-bootstrap"],
    ("demo",): ["--workdir", "--quick"],
}


def arbiter(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200"})


def test_help_lists_every_command():
    done = arbiter("--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: arbiter ")
    listed = [line.split()[0] for line in done.stdout.splitlines() if line.startswith("    ")]
    assert listed == COMMANDS


def test_every_command_has_a_help_entry_here():
    # The table below covers the whole tree: every top-level command has one.
    assert sorted({path[0] for path in HELP_SHOWS}) == sorted(COMMANDS)


@pytest.mark.parametrize("path", list(HELP_SHOWS), ids=" ".join)
def test_help_of_every_command(path):
    done = arbiter(*path, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: arbiter {' '.join(path)} ")
    for word in HELP_SHOWS[path]:
        assert word in done.stdout


@pytest.mark.parametrize("args, message", [
    pytest.param((), "the following arguments are required: command", id="no command"),
    pytest.param(("bogus",), "argument command: invalid choice: 'bogus'", id="bogus"),
    pytest.param(("serve",), "the following arguments are required: service", id="serve"),
    pytest.param(("serve", "bogus"), "argument service: invalid choice: 'bogus'", id="serve bogus"),
    pytest.param(("score",), "the following arguments are required: --target", id="score"),
])
def test_usage_errors_exit_2(args, message):
    done = arbiter(*args)
    assert done.returncode == 2
    assert message in done.stderr


def test_serve_reports_invalid_settings_and_exits_2():
    done = arbiter("serve", "reward", "--model", "unused", "--port", "70000")
    assert done.returncode == 2
    assert done.stderr.startswith("arbiter serve reward: port=70000 is invalid")


# What must stay unimported: the help listing imports no command's
# implementation; `score --help` needs gRPC at most, never torch.
@pytest.mark.parametrize("args, unimported", [
    pytest.param(["--help"], ["torch", "transformers", "grpc", "services", "trainer"], id="--help"),
    pytest.param(["serve", "--help"], ["torch", "transformers", "grpc", "services", "trainer"], id="serve --help"),
    pytest.param(["score", "--help"], ["torch", "transformers"], id="score --help"),
])
def test_help_imports_stay_light(args, unimported):
    program = (
        "import json, sys\n"
        "from cli.main import main\n"
        "try:\n"
        f"    main({args!r})\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0, exit.code\n"
        f"print(json.dumps(sorted(m for m in {unimported!r} if m in sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", program], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == []


@pytest.mark.parametrize("flags, message", [
    pytest.param(["--nnodes", "2"], "rdzv_endpoint=None is invalid: must be HOST:PORT with --nnodes > 1",
                 id="nodes without a rendezvous"),
    pytest.param(["--nnodes", "2", "--rdzv-endpoint", "trainer-0"],
                 "rdzv_endpoint='trainer-0' is invalid: must be HOST:PORT with --nnodes > 1",
                 id="rendezvous without a port"),
    pytest.param(["--nnodes", "0"], "nnodes=0 is invalid: must be >= 1", id="no nodes"),
])
def test_a_multi_node_trainer_launch_is_checked_before_torchrun_starts(tmp_path, flags, message):
    config = tmp_path / "trainer.yaml"
    config.write_text(f"model_dir: {Path(__file__).parent}\noutput_dir: {tmp_path / 'out'}\n")
    done = arbiter("train", "ppo", "--config", str(config), "--parallel", "ddp", "--nproc-per-node", "1", *flags)
    assert done.returncode == 2
    assert done.stderr.strip() == f"arbiter train ppo: {message}"
