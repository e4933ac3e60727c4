"""Trainer checkpoints: everything needed to resume exactly.

A checkpoint holds the trainable weights (full policy or LoRA adapter) and the
value head (safetensors), the optimizer, the KL controller, the reward
normalizer, RNG state, the dedupe window and the stream position (the next
offset per partition). It is written to a temporary directory, fsynced, and
renamed into place; ``LATEST`` is then replaced atomically. Offsets are
committed to Kafka only after this returns, so the broker never runs ahead of
a durable checkpoint.

With ranks (``parallel: ddp|fsdp``) one directory holds the whole job: every
partition's next offset and every rank's RNG state (``rng-<rank>.pt``); under
DDP rank 0 writes the (replicated) weights and optimizer as above, under FSDP
every rank writes its shards of both through torch.distributed.checkpoint
(``sharded/``). Rank 0 renames the directory into place only after every rank
has written its part, and the ranks commit their offsets only after that.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_model, save_model

from arbiter.stream import TopicPartition, offsets_from_json, offsets_to_json

if TYPE_CHECKING:
    from trainer.distributed import Ranks

LATEST = "LATEST"
STATE = "state.json"
WEIGHTS = "policy.safetensors"
OPTIMIZER = "optimizer.pt"
RNG = "rng.pt"
SHARDED = "sharded"


def rank_rng(rank: int) -> str:
    return f"rng-{rank}.pt"


@dataclass
class TrainerState:
    step: int
    policy_version: str
    # Published (and initial) version label -> training step, for staleness.
    version_steps: dict[str, int]
    offsets: dict[TopicPartition, int] = field(default_factory=dict)
    # Rollout ids trained or dropped recently, oldest first (bounded window).
    seen_ids: list[str] = field(default_factory=list)
    kl_controller: dict[str, Any] = field(default_factory=dict)
    reward_moments: dict[str, Any] = field(default_factory=dict)
    # Version directories already published (republished after a crash otherwise).
    published: list[str] = field(default_factory=list)
    # Rollouts settled since the run began, by outcome (trained, stale, ...):
    # restored with the checkpoint, so after any crash they still count each
    # rollout once, the ledger an exactly-once check reads.
    outcomes: dict[str, int] = field(default_factory=dict)
    # The Kafka cluster ``offsets`` belong to (arbiter.stream.cluster_id).
    cluster_id: str = ""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["offsets"] = offsets_to_json(self.offsets)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainerState:
        data = dict(data)
        data["offsets"] = offsets_from_json(data.get("offsets", {}))
        data.pop("counters", None)  # unused before outcomes existed
        return cls(**data)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rng_state(rng: torch.Generator) -> dict[str, torch.Tensor]:
    return {"generator": rng.get_state(), "torch": torch.get_rng_state()}


def save_checkpoint(
    root: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rng: torch.Generator,
    state: TrainerState, keep: int = 2,
) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:08d}"
    tmp = root / f".tmp-step-{state.step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / WEIGHTS))
    torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
    torch.save(_rng_state(rng), tmp / RNG)
    return _install(root, tmp, final, state, keep)


def save_distributed_checkpoint(
    root: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rng: torch.Generator,
    state: TrainerState, ranks: Ranks, keep: int = 2,
) -> Path:
    """Every rank calls this with the same ``state`` (merged across ranks);
    ``model`` is the unwrapped module under DDP, the sharded one under FSDP."""
    from trainer import distributed as dist

    root = Path(root)
    final = root / f"step-{state.step:08d}"
    tmp = root / f".tmp-step-{state.step:08d}"
    if ranks.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    torch.save(_rng_state(rng), tmp / rank_rng(ranks.rank))
    if ranks.parallel == "fsdp":
        dist.save_sharded(tmp / SHARDED, model, optimizer)
    elif ranks.is_main:
        save_model(model, str(tmp / WEIGHTS))
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
    dist.barrier()  # every rank's part is written (and, on a shared filesystem, visible)
    if ranks.is_main:
        _install(root, tmp, final, state, keep)
    dist.barrier()  # durable before any rank commits offsets
    return final


def _install(root: Path, tmp: Path, final: Path, state: TrainerState, keep: int) -> Path:
    (tmp / STATE).write_text(json.dumps(state.to_json(), indent=1))
    _fsync_tree(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = root / f".{LATEST}.tmp"
    pointer.write_text(final.name)
    with pointer.open("rb") as fh:
        os.fsync(fh.fileno())
    os.replace(pointer, root / LATEST)
    _fsync_dir(root)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: str | Path) -> Path | None:
    pointer = Path(root) / LATEST
    if not pointer.exists():
        return None
    path = Path(root) / pointer.read_text().strip()
    return path if (path / STATE).exists() else None


def load_checkpoint(
    path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rng: torch.Generator,
    ranks: Ranks | None = None,
) -> TrainerState:
    """Restore ``model``, ``optimizer`` and ``rng`` (this rank's, with
    ``ranks``) and return the state."""
    path = Path(path)
    sharded = (path / SHARDED).is_dir()
    if sharded != (ranks is not None and ranks.parallel == "fsdp"):
        raise RuntimeError(
            f"checkpoint {path} was written {'sharded (parallel: fsdp)' if sharded else 'unsharded (parallel: none or ddp)'}"
            f" and cannot be resumed with parallel: {ranks.parallel if ranks else 'none'}: resume it with the "
            "parallel setting that wrote it"
        )
    if sharded:
        from trainer import distributed as dist

        dist.load_sharded(path / SHARDED, model, optimizer)
    else:
        _load_unsharded(path, model, optimizer)
    # A rank the checkpoint has no RNG state for (the job grew, or it was
    # written by one process) takes rank 0's, or the single process's.
    names = ([rank_rng(ranks.rank)] if ranks is not None else []) + [RNG, rank_rng(0)]
    rng_file = next((path / name for name in names if (path / name).exists()), None)
    if rng_file is not None:
        rng_state = torch.load(rng_file, weights_only=False)
        rng.set_state(rng_state["generator"])
        torch.set_rng_state(rng_state["torch"])
    return TrainerState.from_json(json.loads((path / STATE).read_text()))


def _load_unsharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    missing, unexpected = load_model(model, str(path / WEIGHTS), strict=False)
    # Tied embeddings are stored once; anything else missing is a real mismatch.
    real_missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if real_missing or unexpected:
        raise RuntimeError(
            f"checkpoint {path} does not match the model: missing {real_missing[:5]}, unexpected {unexpected[:5]}"
        )
    optimizer.load_state_dict(torch.load(path / OPTIMIZER, weights_only=False))
