"""``make demo-triton``: the reward service with its forward passes in a real
Triton Inference Server (the tritonserver bundled in nvidia-pytriton, from
.venv-triton), checked against the in-process backend, then a version swap
through Triton's model control while a client keeps scoring.

Every process is started as deployed: ``arbiter triton export``, tritonserver,
``arbiter serve reward --backend triton`` and ``arbiter serve reward``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from services.reward.client import RewardClient, reward_input

TOLERANCE = 1e-5
EXAMPLES = [
    {"prompt": "How was the movie?", "response": " I loved it, the actors were wonderful!"},
    {"prompt": "How was the movie?", "response": " Terrible. I hated every minute."},
    {"prompt": "What is the capital of France?", "response": " The capital of France is Paris."},
    {"messages": [
        {"role": "user", "content": "Write a haiku about the sea."},
        {"role": "assistant", "content": "Waves fold into foam, the tide keeps its patient time."},
    ]},
]


def start_service(args: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "serve", "reward", "--port", "0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    output = []
    for line in proc.stdout:
        output.append(line)
        match = re.search(r" on ([\d.]+:\d+)", line)
        if match:
            # Keep draining its output so the pipe never fills.
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, match.group(1)
    raise RuntimeError(f"reward service exited with {proc.wait()} before it was ready:\n{''.join(output)}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def export(model: Path, repo: Path, name: str) -> Path:
    done = subprocess.run(
        [sys.executable, "-m", "cli", "triton", "export", "--model", str(model), "--kind", "reward",
         "--out", str(repo), "--name", name, "--torch-threads", "1"],
        capture_output=True, text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr)
    return Path(done.stdout.strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo-triton")
    parser.add_argument("--workdir", default="runs/demo-triton")
    parser.add_argument("--venv", default=".venv-triton")
    args = parser.parse_args(argv)
    console = Console(width=160)
    workdir = Path(args.workdir)
    shutil.rmtree(workdir / "repo", ignore_errors=True)

    from arbiter.backends.triton_local import LocalTriton
    from arbiter.tiny import TinyConfig, make_reward, make_tiny_models

    console.print(f"[bold]1.[/] Building tiny reward models in {workdir / 'models'} and exporting version 1")
    models = make_tiny_models(workdir / "models")
    v1 = export(models["reward"], workdir / "repo", "rm")
    console.print(f"   {v1}  (config.pbtxt: python backend, dynamic batching, 1 CPU instance)")
    started = time.perf_counter()
    triton = LocalTriton(workdir / "repo", venv=args.venv, log_path=workdir / "tritonserver.log")
    console.print("[bold]2.[/] Starting tritonserver (explicit model control, 127.0.0.1 only)")
    triton.start()
    services: list[subprocess.Popen] = []
    failures = 0
    try:
        console.print(f"   ready on {triton.url} after {time.perf_counter() - started:.1f}s; log {triton.log_path}")
        console.print("[bold]3.[/] Starting the reward service twice: --backend triton, and in-process")
        proc, via_triton = start_service(
            ["--model", str(v1), "--backend", "triton", "--triton-url", triton.url, "--triton-model", "rm"]
        )
        services.append(proc)
        proc, in_process = start_service(["--model", str(v1)])
        services.append(proc)
        items = [reward_input(row, f"example {i}") for i, row in enumerate(EXAMPLES)]
        with RewardClient(via_triton) as triton_client, RewardClient(in_process) as local_client:
            info = triton_client.info()
            console.print(f"   model {info.name!r} version {info.version!r}, backend {info.backend!r}")
            a = triton_client.score(items).results
            b = local_client.score(items).results
            table = Table(title="Raw scores: Triton vs in-process", title_justify="left")
            for column in ("input", "via Triton", "in-process", "|difference|"):
                table.add_column(column)
            worst = 0.0
            for row, x, y in zip(EXAMPLES, a, b):
                text = row.get("response") or row["messages"][-1]["content"]
                difference = abs(x.raw_score - y.raw_score)
                worst = max(worst, difference)
                table.add_row(text.strip(), f"{x.raw_score:+.6f}", f"{y.raw_score:+.6f}", f"{difference:.1e}")
            console.print(table)
            if worst > TOLERANCE:
                console.print(f"[red]Scores differ by {worst:.2e} > {TOLERANCE}[/]")
                return 1
            console.print(f"   equal within {TOLERANCE} (largest difference {worst:.1e})")

            console.print("[bold]4.[/] Version swap through Triton's model control while a client keeps scoring")
            candidate = make_reward(workdir / "models" / "reward-v1", TinyConfig(seed=7), calibrate=False)
            v2 = export(candidate, workdir / "repo", "rm")
            served: dict[str, int] = {}
            errors: list[str] = []
            done = threading.Event()

            def keep_scoring() -> None:
                with RewardClient(via_triton) as client:
                    while not done.is_set():
                        try:
                            version = client.score(items[:1]).model_version
                            served[version] = served.get(version, 0) + 1
                        except Exception as err:  # counted and shown: the point of the demo
                            errors.append(str(err))

            scorer = threading.Thread(target=keep_scoring)
            scorer.start()
            try:
                from arbiter.v1 import common_pb2

                loaded = triton_client.models.LoadModelVersion(
                    common_pb2.LoadModelVersionRequest(path=str(v2), version="v1", activate=False), timeout=600
                )
                console.print(f"   loaded {v2} as 'v1' in {loaded.load_seconds:.1f}s (Triton versions 1 and 2 ready)")
                triton_client.models.ActivateModelVersion(
                    common_pb2.ActivateModelVersionRequest(version="v1"), timeout=30
                )
                console.print("   traffic switched to 'v1'")
                time.sleep(1.0)
                triton_client.models.UnloadModelVersion(common_pb2.UnloadModelVersionRequest(version="v0"), timeout=600)
                console.print("   'v0' unloaded (Triton version 1 unloaded)")
                time.sleep(1.0)
            finally:
                done.set()
                scorer.join()
            failures = len(errors)
            console.print(f"   requests served during the swap: {served}; failed: {failures}")
    finally:
        for proc in services:
            stop(proc)
        triton.stop()
    console.print("[bold]5.[/] Services and tritonserver stopped.")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
