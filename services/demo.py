"""``make demo``: the reward service on a tiny model, scored through a real
gRPC client. Starts ``arbiter serve reward`` as its own process, as deployed.

(Grows into the full RLHF pipeline as the trainer lands.)
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from services.reward.client import RewardClient, reward_input

EXAMPLES = [
    {"prompt": "How was the movie?", "response": " I loved it, the actors were wonderful!"},
    {"prompt": "How was the movie?", "response": " Terrible. I hated every minute."},
    {"prompt": "What is the capital of France?", "response": " The capital of France is Paris."},
    {"messages": [
        {"role": "user", "content": "Write a haiku about the sea."},
        {"role": "assistant", "content": "Waves fold into foam, the tide keeps its patient time."},
    ]},
]


def start_reward_service(model_dir: Path, metrics_port: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "arbiter.cli", "serve", "reward", "--model", str(model_dir), "--port", "0",
         "--metrics-port", str(metrics_port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    for line in proc.stdout:
        match = re.search(r" on ([\d.]+:\d+)", line)
        if match:
            return proc, match.group(1)
    raise RuntimeError(f"reward service exited with {proc.wait()} before it was ready")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="arbiter demo")
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("--metrics-port", type=int, default=0)
    args = parser.parse_args(argv)
    console = Console(width=160)
    workdir = Path(args.workdir)

    from arbiter.tiny import make_tiny_models

    console.print(f"[bold]1.[/] Building tiny models in {workdir / 'models'} (no downloads)")
    models = make_tiny_models(workdir / "models")
    console.print("[bold]2.[/] Starting [cyan]arbiter serve reward[/] on a free port")
    started = time.perf_counter()
    proc, target = start_reward_service(models["reward"], args.metrics_port)
    try:
        console.print(f"   ready on {target} after {time.perf_counter() - started:.1f}s")
        with RewardClient(target) as client:
            info = client.info()
            console.print(
                f"[bold]3.[/] Model {info.name!r} version {info.version!r}, max {info.max_tokens} tokens, "
                f"tokenizer {info.tokenizer_fingerprint[:12]}…, normalization mean={info.normalization.mean:.4f} "
                f"std={info.normalization.std:.4f}"
            )
            items = [reward_input(row, f"example {i}") for i, row in enumerate(EXAMPLES)]
            response = client.score(items, normalize=True)
            table = Table(title="Scores (one batched Score call over gRPC)", title_justify="left")
            for column in ("input", "raw score", "normalized"):
                table.add_column(column)
            for row, result in zip(EXAMPLES, response.results):
                text = row.get("response") or row["messages"][-1]["content"]
                table.add_row(text.strip(), f"{result.raw_score:+.4f}", f"{result.score:+.3f}")
            console.print(table)
            compare = client.compare(EXAMPLES[0]["prompt"], EXAMPLES[0]["response"], EXAMPLES[1]["response"])
            console.print(
                f"[bold]4.[/] Compare: P(first response preferred) = {compare.probability_a_preferred:.3f} "
                "(Bradley-Terry on raw scores; the tiny model is untrained, so it has no taste yet)"
            )
            try:
                client.score([reward_input({"prompt": "x", "response": ""}, "bad")])
            except Exception as err:  # shown on purpose: what a caller sees for bad input
                console.print(f"[bold]5.[/] Bad input is refused clearly: {err.code().name}: {err.details()}")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    console.print("[bold]6.[/] Reward service stopped gracefully.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
