"""``make demo``: the whole RLHF loop on this machine, as separate processes.

1. models: a policy, a reward model and prompts (built locally, no downloads);
2. ``arbiter up``'s stack: broker, reward/reference/policy services, a rollout
   worker and the PPO trainer;
3. a live view of the training curve while the policy service hot-swaps each
   new version;
4. a summary table and a PNG of reward, gold score and KL per iteration.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path

import grpc
from rich.console import Console
from rich.live import Live
from rich.table import Table

from arbiter.v1 import common_pb2, common_pb2_grpc
from services.demo_models import DemoModels, prepare_models
from services.stack import Stack, StackConfig, StackError


# The demo fails loudly instead of waiting forever on a stuck pipeline.
STALL_SECONDS = 300


def read_history(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def progress_table(rows: list[dict], total: int, started: float) -> Table:
    table = Table(title=f"PPO through the services: {len(rows)}/{total} updates, {time.monotonic() - started:.0f}s",
                  title_justify="left")
    for column in ("step", "policy version", "RM reward", "gold", "KL", "β", "entropy", "staleness", "rollouts/s"):
        table.add_column(column, justify="right")
    for i, row in enumerate(rows[-12:]):
        index = len(rows) - len(rows[-12:]) + i
        previous = rows[index - 1] if index > 0 else None
        rate = row["rollouts"] / (row["time"] - previous["time"]) if previous else float("nan")
        gold = f"{row['gold_score']:+.3f}" if row.get("gold_score") is not None else "-"
        table.add_row(
            str(row["step"]), row["policy_version"], f"{row['reward_raw']:+.4f}", gold, f"{row['kl']:.3f}",
            f"{row['kl_coef']:.3f}", f"{row['entropy']:.2f}", staleness_text(row), f"{rate:.1f}",
        )
    return table


def staleness_text(row: dict) -> str:
    """Trained rollouts by staleness, "lag:count" (versions between sampling and training)."""
    counts = row.get("staleness_counts")
    if not counts:
        return f"{row['staleness']:.2f}"
    return " ".join(f"{lag}:{n}" for lag, n in sorted(counts.items(), key=lambda kv: int(kv[0])))


def staleness_totals(rows: list[dict]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for row in rows:
        for lag, n in (row.get("staleness_counts") or {}).items():
            totals[lag] = totals.get(lag, 0) + n
    return dict(sorted(totals.items(), key=lambda kv: int(kv[0])))


def summarize(rows: list[dict], console: Console) -> dict:
    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else float("nan")

    k = max(1, len(rows) // 4)
    first, last = rows[:k], rows[-k:]
    summary = {
        "updates": len(rows),
        "reward_first": mean(r["reward_raw"] for r in first),
        "reward_last": mean(r["reward_raw"] for r in last),
        "gold_first": mean(r.get("gold_score") for r in first),
        "gold_last": mean(r.get("gold_score") for r in last),
        "kl_last": mean(r["kl"] for r in last),
        "kl_max": max(r["kl"] for r in rows),
        "final_version": rows[-1]["policy_version"],
        # Trained rollouts by staleness over the run (versions between sampling and training).
        "staleness_counts": staleness_totals(rows),
    }
    table = Table(title=f"Summary: first vs last {k} update(s)", title_justify="left")
    for column in ("", "first", "last", "change"):
        table.add_column(column, justify="right")
    table.add_row("RM reward (proxy)", f"{summary['reward_first']:+.4f}", f"{summary['reward_last']:+.4f}",
                  f"{summary['reward_last'] - summary['reward_first']:+.4f}")
    if rows[0].get("gold_score") is not None:
        table.add_row("gold score", f"{summary['gold_first']:+.4f}", f"{summary['gold_last']:+.4f}",
                      f"{summary['gold_last'] - summary['gold_first']:+.4f}")
    table.add_row("KL to reference (nats/sample)", f"{mean(r['kl'] for r in first):.4f}", f"{summary['kl_last']:.4f}",
                  f"max {summary['kl_max']:.4f}")
    console.print(table)
    if summary["staleness_counts"]:
        console.print("trained rollouts by staleness (policy versions between sampling and training): "
                      + ", ".join(f"{lag}: {n}" for lag, n in summary["staleness_counts"].items()))
    return summary


# The demo's stated targets: the RM learned the simulated annotators'
# preference, and PPO against it moved the hidden gold score at bounded KL.
RM_ACCURACY_TARGET = 0.85
GOLD_GAIN_TARGET = 0.3
KL_BOUND = 15.0


EVAL_SAMPLES = 4


def evaluate_gold(models: DemoModels, final_dir: Path) -> dict:
    """The target compares policies, not training batches: both policies
    sample the same held-out prompts, and the gold scorer judges."""
    from services.demo_models import sample_completions
    from services.worker.gold import make_gold_scorer

    gold = make_gold_scorer(models.gold)
    out = {}
    for name, model_dir in (("initial", models.policy), ("final", final_dir)):
        completions = sample_completions(model_dir, models.eval_prompts, EVAL_SAMPLES, models.max_new_tokens, seed=7)
        scores = [gold(c) for group in completions for c in group]
        out[f"gold_{name}_policy"] = sum(scores) / len(scores)
    return out


def report_targets(summary: dict, console: Console) -> None:
    accuracy = summary.get("rm_eval_accuracy")
    # Policy against policy on held-out prompts when evaluated; else training batches.
    if "gold_final_policy" in summary:
        gold_gain = summary["gold_final_policy"] - summary["gold_initial_policy"]
    else:
        gold_gain = summary["gold_last"] - summary["gold_first"]
    checks = [
        ("RM held-out pairwise accuracy", f"{accuracy:.1%}" if accuracy is not None else "n/a",
         f">= {RM_ACCURACY_TARGET:.0%}", accuracy is not None and accuracy >= RM_ACCURACY_TARGET),
        ("gold gain, final vs initial policy", f"{gold_gain:+.3f}", f">= +{GOLD_GAIN_TARGET}",
         gold_gain >= GOLD_GAIN_TARGET),
        ("KL at the end (nats/sample)", f"{summary['kl_last']:.2f}", f"<= {KL_BOUND:g}", summary["kl_last"] <= KL_BOUND),
    ]
    table = Table(title="Targets", title_justify="left")
    for column in ("", "measured", "target", ""):
        table.add_column(column)
    for name, value, target, ok in checks:
        table.add_row(name, value, target, "[green]met[/]" if ok else "[red]missed[/]")
    console.print(table)
    summary["targets_met"] = {name: ok for name, _, _, ok in checks}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(9, 5))
    ax.plot(steps, [r["reward_raw"] for r in rows], "o-", label="proxy reward (RM score)", color="tab:blue")
    if rows[0].get("gold_score") is not None:
        ax.plot(steps, [r["gold_score"] for r in rows], "s-", label="gold score (held-out labeler)", color="tab:green")
    ax.set_xlabel("PPO iteration (policy version)")
    ax.set_ylabel("score")
    kl_axis = ax.twinx()
    kl_axis.plot(steps, [r["kl"] for r in rows], "^--", label="KL(π‖π_ref) per sample", color="tab:red")
    kl_axis.set_ylabel("KL (nats)")
    lines = ax.get_legend_handles_labels()
    kl_lines = kl_axis.get_legend_handles_labels()
    ax.legend(lines[0] + kl_lines[0], lines[1] + kl_lines[1], loc="upper left")
    ax.set_title("Arbiter demo: reward, gold score and KL per iteration")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def served_version(target: str) -> str:
    with grpc.insecure_channel(target) as channel:
        return common_pb2_grpc.ModelServiceStub(channel).GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=10).info.version


def stack_config(models: DemoModels, workdir: Path, updates: int) -> StackConfig:
    return StackConfig(
        policy_model=str(models.policy), reward_model=str(models.reward), prompts_file=str(models.prompts),
        workdir=str(workdir / "stack"), metrics_ports={name: 0 for name in ("reward", "policy", "reference", "worker", "trainer")},
        # Generation overlaps training: the stack bounds the workers by the
        # trainer's ppo.max_staleness, trained with the decoupled objective.
        worker={"samples_per_prompt": 4, "prompts_per_call": 8, "max_new_tokens": models.max_new_tokens,
                "temperature": 1.0, **({"gold": models.gold} if models.gold else {})},
        trainer={"max_updates": updates, "run_name": "ppo", "ppo": models.ppo},
    )


def run(workdir: Path, updates: int, quick: bool, console: Console) -> dict:
    console.print(f"[bold]1.[/] Models in {workdir} (built here; nothing downloaded)")
    models = prepare_models(workdir / "models", quick=quick, console=console)
    console.print(f"   {models.description}")
    console.print("[bold]2.[/] Starting the stack: broker, reward/reference/policy services, worker, trainer")
    started = time.monotonic()
    # A demo run is a fresh run: the trainer must not resume the last one's
    # checkpoint against a new reward model (models stay cached).
    shutil.rmtree(workdir / "stack", ignore_errors=True)
    history_path = workdir / "stack" / "trainer" / "history.jsonl"
    with Stack(stack_config(models, workdir, updates)) as stack:
        console.print(f"   up in {time.monotonic() - started:.0f}s: " + ", ".join(f"{k} {v}" for k, v in stack.targets.items()))
        console.print("[bold]3.[/] Training (the policy service swaps in every new version as it is published)")
        started = time.monotonic()
        rows: list[dict] = []
        last_progress = time.monotonic()
        with Live(progress_table(rows, updates, started), console=console, refresh_per_second=2) as live:
            while len(rows) < updates:
                stack.check_alive()
                fresh = read_history(history_path)
                if len(fresh) > len(rows):
                    last_progress = time.monotonic()
                elif time.monotonic() - last_progress > STALL_SECONDS:
                    raise StackError(
                        f"no PPO update for {STALL_SECONDS}s; see the logs in {stack.logs}:\n"
                        f"{stack.tail('trainer')}\n{stack.tail('worker-0')}"
                    )
                rows = fresh
                live.update(progress_table(rows, updates, started))
                time.sleep(0.5)
        final = rows[-1]["policy_version"]
        deadline = time.monotonic() + 60
        while served_version(stack.targets["policy"]) != final and time.monotonic() < deadline:
            time.sleep(0.5)
        serving = served_version(stack.targets["policy"])
    console.print(f"[bold]4.[/] The policy service now serves {serving!r} (trainer's last version {final!r})")
    summary = summarize(rows, console)
    summary["served_version"] = serving
    summary["rm_eval_accuracy"] = models.rm_metrics.get("eval_accuracy")
    if models.gold:
        final_dir = workdir / "stack" / "trainer" / "policies" / final
        console.print(f"[bold]5.[/] Gold score of the initial and the final policy on {len(models.eval_prompts)} "
                      f"held-out prompts x {EVAL_SAMPLES} samples")
        summary.update(evaluate_gold(models, final_dir))
    report_targets(summary, console)
    summary["seconds"] = time.monotonic() - started
    png = workdir / "demo.png"
    plot(rows, png)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(f"   plot: {png}   summary: {workdir / 'summary.json'}")
    return summary


def run_from_args(args: argparse.Namespace) -> int:
    if "ARBITER_LOG_LEVEL" not in os.environ:
        # The live table is the demo's output; component logs go to their files.
        logging.getLogger().setLevel(logging.WARNING)
    # SIGTERM unwinds like Ctrl-C, so the stack's processes are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    console = Console(width=140)
    updates = args.updates or (4 if args.quick else 60)
    try:
        run(Path(args.workdir).resolve(), updates, args.quick, console)
    except StackError as err:
        console.print(f"[red]demo failed:[/] {err}")
        return 1
    return 0

