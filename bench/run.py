"""``make bench``: every benchmark, each against its named baseline measured
in the same run. ``--only NAME`` runs one; ``--seconds`` sets time per cell."""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BENCHES = ("reward",)


def main() -> None:
    parser = argparse.ArgumentParser(prog="make bench")
    parser.add_argument("--only", choices=BENCHES, action="append")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--json", help="also write the summary ratios here")
    args = parser.parse_args()
    summary = {}
    for name in args.only or BENCHES:
        if name == "reward":
            from bench import reward_bench

            summary["reward"] = reward_bench.run(seconds=args.seconds)
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=2)


if __name__ == "__main__":
    main()
