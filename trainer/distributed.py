"""The trainer across ranks: ``parallel: ddp|fsdp`` under torchrun.

Every rank reads its own partitions of the rollouts topic (partition p goes to
rank p mod N; rollouts are keyed by prompt, so an RLOO/GRPO group never spans
two ranks), admits and drops what it reads as one trainer would, and at each
update the ranks agree on one global batch: they exchange how many ready
units (rollouts, or whole groups for critic-free estimators) each holds, take
them round-robin until ``batch_size`` rollouts are chosen, and gather the
chosen trajectories so that every rank holds the same global batch in rank
order. Everything computed before the gradient steps (rewards and their
normalization, old values, advantages and their whitening, the KL
controller) is then computed on that whole batch and is identical on every
rank by construction; each minibatch of the shared permutation is split by
rows between the ranks (row i to rank i mod N), and each rank's token-mean
loss is weighted by N·(its tokens)/(the minibatch's tokens), so the gradient
DDP averages (or FSDP reduce-scatters) is exactly the one-process gradient of
the whole minibatch. One update with N ranks is the one-process update.

Collectives have a timeout (``collective_timeout_s``): a rank that dies makes
the others fail their next collective (gloo sees the peer's socket close at
once; the timeout bounds the rest), torchrun stops the job, and a restart
resumes from the newest checkpoint exactly once.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from arbiter.config import require

log = logging.getLogger(__name__)

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Ranks:
    """This process's place among the trainer's ranks."""

    rank: int
    world: int
    local_rank: int
    parallel: str  # ddp | fsdp
    device: torch.device

    @property
    def backend(self) -> str:
        return backend_for(self.device)

    def owns(self, partition: int) -> bool:
        return partition % self.world == self.rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def backend_for(device: torch.device) -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"


def ranks_from_env(parallel: str, env: Mapping[str, str] = os.environ, device: str = "cpu") -> Ranks | None:
    """The ranks torchrun describes in the environment, checked against
    ``parallel``; None for ``parallel: none`` in a process of its own."""
    world = env.get("WORLD_SIZE", "1")
    if parallel == "none":
        require(
            world in ("", "1"), "parallel",
            f"is none, but this process is one of WORLD_SIZE={world} ranks: each would train the whole stream "
            "into the same output_dir; set parallel: ddp or fsdp (or --parallel), or start one process", parallel,
        )
        return None
    missing = [name for name in TORCHRUN_ENV if not env.get(name)]
    require(
        not missing, "parallel",
        f"{parallel} needs the environment torchrun sets ({', '.join(missing)} unset): start the trainer with "
        "`torchrun --nproc-per-node N -m cli train ppo ...` (N >= 1), or set parallel: none", parallel,
    )
    return Ranks(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]), parallel, torch.device(device))


def init(ranks: Ranks, timeout_s: float) -> None:
    """Join the process group (rendezvous through torchrun's MASTER_ADDR/PORT)."""
    if dist.is_initialized():
        return
    if ranks.device.type == "cuda":
        torch.cuda.set_device(ranks.local_rank)
    dist.init_process_group(
        ranks.backend, rank=ranks.rank, world_size=ranks.world, timeout=datetime.timedelta(seconds=timeout_s),
    )


def shutdown() -> None:
    """Leave the process group once every rank is done with it. Without the
    barrier a rank could tear down while a peer's last collective is still in
    flight, and gloo's destructor then waits forever for its worker threads
    (seen at exit: ~ProcessGroupGloo joining under ~Reducer)."""
    if not dist.is_initialized():
        return
    try:
        dist.barrier()
    except (RuntimeError, dist.DistError):  # a peer is gone: nothing left to wait for
        pass
    dist.destroy_process_group()


def exit_rank(code: int) -> None:
    """End a rank's process now: flushed, but without running C++ destructors
    at interpreter exit (a process group or DDP reducer finalized after its
    peers left can block there, and torchrun would wait on this rank forever;
    gloo's can also abort the process with SIGABRT, failing a rank whose work
    was done)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def check_partitions(ranks: Ranks, partitions: int, topic: str) -> None:
    """Every rank must own at least one partition of the rollouts topic."""
    require(
        partitions >= ranks.world, "parallel",
        f"{ranks.parallel} with {ranks.world} ranks needs the rollouts topic {topic!r} to have at least "
        f"{ranks.world} partitions (each rank reads its own), but it has {partitions}: run fewer ranks, or "
        "recreate the topic with more partitions (arbiter up: rollout_partitions)", ranks.parallel,
    )


# -- wrapping the model -----------------------------------------------------


def wrap(model: nn.Module, ranks: Ranks, critic_free: bool) -> nn.Module:
    """The module whose forward the gradient steps call: a DDP wrapper around
    ``model``, or, under FSDP, ``model`` itself sharded in place (each layer
    of a ModuleList its own unit, the rest in the root's, so tied embeddings
    stay one parameter)."""
    if ranks.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [ranks.local_rank] if ranks.device.type == "cuda" else None
        # Critic-free estimators never use the value head: DDP must not wait for its gradients.
        return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=critic_free)
    from torch.distributed.fsdp import fully_shard

    for module in list(model.modules()):
        if isinstance(module, nn.ModuleList):
            for layer in module:
                fully_shard(layer)
    # The root reshards after forward too (FSDP2 keeps it unsharded by
    # default): after the no-grad forward that starts every update, the
    # kept unsharded root parameters gave wrong gradients to the root's own
    # parameters (final norm, value head, embeddings) in torch 2.13 on gloo.
    fully_shard(model, reshard_after_forward=True)
    return model


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """FSDP: the unsharded state dict on the CPU of rank 0 (every rank must
    call; the others get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def save_sharded(path: os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Each rank writes its shards of weights and optimizer state (DCP)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(sharded_state(model, optimizer), checkpoint_id=str(path))


def load_sharded(path: os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """DCP reads what this rank's shards need, whatever the world size that wrote it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = sharded_state(model, optimizer)
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


# -- agreeing ---------------------------------------------------------------


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def gather_ints(values: Sequence[int]) -> list[list[int]]:
    """Every rank's ``values`` (same length everywhere), by rank."""
    mine = torch.tensor(list(values), dtype=torch.long, device=_collective_device())
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    return [t.tolist() for t in out]


def any_rank(flag: bool) -> bool:
    return any(row[0] for row in gather_ints([int(flag)]))


def all_ranks(flag: bool) -> bool:
    return all(row[0] for row in gather_ints([int(flag)]))


def gather_objects(obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (decisions that read the filesystem)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    dist.barrier()


def allocate(ready: Sequence[int], wanted: int) -> list[int] | None:
    """Units each rank contributes to one global batch of ``wanted`` units,
    taken round-robin (one from each rank that still has some, in rank
    order) so no rank's partitions wait behind another's; None when all
    ranks together hold fewer than ``wanted``."""
    if sum(ready) < wanted:
        return None
    take = [0] * len(ready)
    left = wanted
    while left:
        for rank, available in enumerate(ready):
            if left and take[rank] < available:
                take[rank] += 1
                left -= 1
    return take


class DataParallel:
    """What :func:`trainer.step.ppo_update` needs to run one rank's share of an update."""

    def __init__(self, ranks: Ranks, module: nn.Module):
        self.ranks = ranks
        # The forward that carries gradients (the DDP wrapper, or the FSDP root).
        self.module = module

    def split(self, index: Tensor, mask: Tensor) -> tuple[Tensor, float]:
        """This rank's rows of a global minibatch ``index`` (rows of the whole
        batch) and the weight of its token-mean loss: N·(its tokens)/(all the
        minibatch's tokens), so the average over ranks is the token mean of
        the whole minibatch. A rank left without rows (a minibatch smaller
        than N) runs one row at weight 0: every rank must run forward and
        backward for the gradient collectives to match."""
        mine = index[self.ranks.rank :: self.ranks.world]
        if len(mine) == 0:
            return index[:1], 0.0
        return mine, self.ranks.world * int(mask[mine].sum()) / int(mask[index].sum())

    def all_finite(self, finite: bool) -> bool:
        """A step is skipped on every rank or none (a rank skipping alone
        would leave the others waiting in the gradient all-reduce)."""
        return all_ranks(finite)

    def clip_grad_norm(self, params: Sequence[nn.Parameter], max_norm: float) -> Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over the whole model. Under DDP
        every rank holds the full (synchronized) gradients, so that is it;
        under FSDP each holds shards: the squared norms of the local shards
        are summed across ranks, one all-reduce for the whole model."""
        if self.ranks.parallel == "ddp":
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        shards = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in params if p.grad is not None]
        squared = torch.zeros((), dtype=torch.float32, device=_collective_device())
        for shard in shards:
            squared += shard.detach().float().pow(2).sum().to(squared.device)
        dist.all_reduce(squared)
        total = squared.sqrt()
        # As clip_grad_norm_ does it: scale by max_norm / (norm + 1e-6), never up.
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for shard in shards:
            shard.mul_(coef.to(shard.device, shard.dtype))
        return total

