"""``arbiter train rm`` and ``arbiter rm list``: command-line entry points.

Exit status: 0 a version was published; 2 the config or data is invalid
(nothing trained); 1 training or the topic failed (nothing published).
"""

from __future__ import annotations

import argparse
import json
import sys


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML (see arbiter/rm/config.py for every field)")
    parser.add_argument(
        "--from-topic", action="store_true",
        help="also train on the preferences topic (config `kafka` / ARBITER_KAFKA_*; `topic` section)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in CI logs)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")


def train_main(args) -> int:
    from arbiter.errors import ArbiterError
    from arbiter.config import ConfigError
    from arbiter.rm.config import load_config
    from arbiter.rm.data import DatasetError

    try:
        config = load_config(args.config, progress=False if args.no_progress else None)
        config.check_sources(args.from_topic)
    except ConfigError as err:
        print(f"arbiter train rm: {err}", file=sys.stderr)
        return 2

    from rich.console import Console

    from arbiter.rm.train import train_reward_model

    stderr = Console(file=sys.stderr)
    batch = None
    try:
        if args.from_topic:
            from arbiter.rm.topic import read_preferences
            from arbiter.stream import KafkaSettings

            try:
                kafka = KafkaSettings.from_env(**config.kafka)
            except (TypeError, ValueError) as err:
                print(f"arbiter train rm: kafka.{err}", file=sys.stderr)
                return 2
            batch = read_preferences(kafka, config.topic)
            stderr.print(f"read {batch.records} preference(s) from {kafka.topic('preferences')}"
                         + _skipped(batch.skipped_reasons))
            skipped_before = len(batch.skipped)
        result = train_reward_model(config, batch, console=stderr)
        if batch is not None:
            if len(batch.skipped) > skipped_before:
                stderr.print(f"{len(batch.skipped) - skipped_before} more preference(s) from the topic skipped: the "
                             f"model cannot take them" + _skipped(batch.skipped_reasons))
            try:
                batch.commit()
            except ArbiterError as err:
                # The version is published; only the bookkeeping failed, so
                # these preferences are read (and trained on) again next time.
                stderr.print(f"warning: {result.version.version} is published, but the topic offsets were not "
                             f"committed ({err}); the next --from-topic run reads these preferences again")
    except DatasetError as err:
        print(f"arbiter train rm: {err}", file=sys.stderr)
        return 2
    except ArbiterError as err:
        print(f"arbiter train rm: {err}", file=sys.stderr)
        return 1
    finally:
        if batch is not None:
            batch.close()
    if args.json:
        print(json.dumps({
            "name": result.version.name, "version": result.version.version, "path": str(result.version.path),
            "init": result.init, "parent_version": result.parent_version, "metrics": result.metrics,
            "normalization": result.normalization, "text_convention": result.text_convention,
        }, indent=2))
    else:
        from arbiter.rm.train import summary_table

        Console().print(summary_table(result))
    return 0


def _skipped(reasons: dict[str, int]) -> str:
    listed = ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items()))
    return f" (skipped so far: {listed})" if reasons else ""


def add_list_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--registry", required=True, help="the registry directory")
    parser.add_argument("--name", help="one model (default: all)")
    parser.add_argument("--json", action="store_true")


def list_main(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from arbiter.errors import ArbiterError
    from arbiter.rm.registry import ModelRegistry

    registry = ModelRegistry(args.registry)
    rows = []
    try:
        for name in [args.name] if args.name else registry.names():
            for version in registry.versions(name):
                meta = version.metadata()
                metrics = meta.get("metrics") or {}
                rows.append({
                    "name": name, "version": version.version, "path": str(version.path),
                    "parent_version": meta.get("parent_version"), "eval_accuracy": metrics.get("eval_accuracy"),
                    "train_examples": metrics.get("train_examples"), "normalization": meta.get("normalization"),
                    # What arbiter rm loop decided (active, rejected, rolled_back, ...), if it trained it.
                    "loop_status": version.loop_record().get("status"),
                })
    except ArbiterError as err:
        print(f"arbiter rm list: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title=f"reward models in {args.registry}")
    for column in ("name", "version", "parent", "eval acc", "train examples", "loop", "path"):
        table.add_column(column)
    for row in rows:
        accuracy = row["eval_accuracy"]
        table.add_row(
            row["name"], row["version"], row["parent_version"] or "-",
            "-" if accuracy is None else f"{accuracy:.4f}", str(row["train_examples"] or "-"),
            row["loop_status"] or "-", row["path"],
        )
    Console().print(table)
    return 0
