"""``arbiter drift report``: a version's served-score distribution against its
reference, as a terminal table and a PNG, for people who would rather look."""

from __future__ import annotations

import sys

import grpc
from rich.console import Console
from rich.table import Table

from arbiter.v1 import reward_pb2

# Conventional PSI reading (credit-scoring practice): < 0.1 stable, 0.1-0.2 watch, > 0.2 shifted.
PSI_WATCH, PSI_SHIFT = 0.1, 0.2


def verdict(psi: float) -> str:
    if psi > PSI_SHIFT:
        return "shifted"
    return "watch" if psi > PSI_WATCH else "stable"


def render_table(response: reward_pb2.GetScoreDriftResponse) -> Table:
    stats = response.statistics
    table = Table(
        title=f"Reward drift, model version {response.model_version!r} (reference: {response.reference_source})",
        title_justify="left",
    )
    table.add_column("")
    table.add_column("reference", justify="right")
    table.add_column("current window", justify="right")
    table.add_row("samples", str(stats.reference_samples), str(stats.window_samples))
    table.add_row("mean", f"{stats.reference_mean:+.4f}", f"{stats.window_mean:+.4f}")
    table.add_row("std", f"{stats.reference_std:.4f}", f"{stats.window_std:.4f}")
    if stats.ready:
        table.add_row("PSI", "", f"{stats.psi:.4f} ({verdict(stats.psi)})")
        table.add_row("KS statistic", "", f"{stats.ks_statistic:.4f}")
        table.add_row("Wasserstein", "", f"{stats.wasserstein:.4f}")
        table.add_row("Jensen-Shannon distance", "", f"{stats.js_distance:.4f}")
    else:
        table.add_row("drift statistics", "", "not enough samples yet")
    table.add_row("Page-Hinkley change alarms", "", str(stats.change_points))
    return table


def write_png(response: reward_pb2.GetScoreDriftResponse, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    reference = np.asarray(response.reference_scores)
    window = np.asarray(response.window_scores)
    both = np.concatenate([reference, window]) if len(reference) + len(window) else np.zeros(1)
    bins = np.linspace(both.min(), both.max() + 1e-9, 40)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.hist(reference, bins=bins, density=True, alpha=0.55, label=f"reference ({response.reference_source}, n={len(reference)})")
    ax.hist(window, bins=bins, density=True, alpha=0.55, label=f"current window (n={len(window)})")
    stats = response.statistics
    summary = f"PSI {stats.psi:.3f}  KS {stats.ks_statistic:.3f}  W1 {stats.wasserstein:.3f}" if stats.ready else "not enough samples"
    ax.set_title(f"Reward scores, version {response.model_version}: {summary}")
    ax.set_xlabel("raw reward score")
    ax.set_ylabel("density")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report_main(args) -> int:
    from services.common.client import client_tls_from_args, rpc_error_text
    from services.common.settings import auth_token_from_env
    from services.reward.client import RewardClient

    tls = client_tls_from_args(args, "arbiter drift report")
    try:
        with RewardClient(args.target, token=auth_token_from_env(), **tls.kwargs()) as client:
            response = client.drift(args.model_version, component=args.component)
    except grpc.RpcError as err:
        print(f"arbiter drift report: {rpc_error_text(err, tls)}", file=sys.stderr)
        return 1
    Console(width=120).print(render_table(response))
    if args.png:
        write_png(response, args.png)
        print(f"wrote {args.png}")
    return 0
