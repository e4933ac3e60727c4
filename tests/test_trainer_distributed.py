"""The trainer across ranks (``parallel: ddp|fsdp``, trainer/distributed.py):
real gloo process groups on CPU, the real broker for the stream part."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import wait_until

from arbiter.config import ConfigError
from arbiter.net import free_port
from arbiter.stream import KafkaSettings, ensure_topics, topics
from trainer.config import config_from_dict
from trainer.distributed import allocate, ranks_from_env
from trainer.loop import PPOTrainer
from tests.rollout_fixtures import sample_trajectories
from tests.test_trainer_stream import accounted_for, checkpoint_state, produce, to_rollout


def ppo_config(model_dir, output_dir, **extra):
    # Minibatches of 3 over 8 rollouts (3, 3, 2): uneven row splits between
    # two ranks; completions of different lengths: uneven token counts. The
    # running reward normalization and advantage whitening are on, as by default.
    return {
        "model_dir": str(model_dir), "output_dir": str(output_dir), "torch_threads": 1,
        "ppo": {"batch_size": 8, "minibatch_size": 3, "epochs": 2, "learning_rate": 1e-3,
                "kl": {"mode": "fixed", "init_coef": 0.05}},
        **extra,
    }


def uneven_batch(model_dir, seed):
    """8 rollouts of the initial policy whose completions are cut to 3..8 tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    batch = sample_trajectories(lm, AutoTokenizer.from_pretrained(str(model_dir)), 8, seed=seed)
    cut = []
    for i, t in enumerate(batch):
        n = 3 + (i * 5) % 6
        cut.append(type(t)(**{**t.__dict__, "completion_ids": t.completion_ids[:n],
                              "sampling_logprobs": t.sampling_logprobs[:n], "reference_logprobs": t.reference_logprobs[:n]}))
    return cut


def _rank_update(rank, world, port, parallel, model_dir, out):
    """One rank: build the trainer, take this rank's half of the batch, one update."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from trainer import distributed

    config = config_from_dict(ppo_config(model_dir, out / "run", parallel=parallel))
    ranks = ranks_from_env(parallel)
    distributed.init(ranks, 60)
    try:
        trainer = PPOTrainer(config, KafkaSettings(), ranks=ranks)
        batch = uneven_batch(model_dir, seed=7)
        mine = batch[:5] if rank == 0 else batch[5:]  # split unevenly, in order
        record = trainer.train_on(trainer.global_batch(mine), local=len(mine))
        state = distributed.full_state_dict(trainer.model) if parallel == "fsdp" else trainer.model.state_dict()
        if rank == 0:
            torch.save({k: v.detach().cpu() for k, v in state.items()}, out / "params.pt")
            (out / "stats.json").write_text(json.dumps({"kl": record.stats.kl, "steps": record.stats.optimizer_steps,
                                                        "trained": trainer.state.outcomes}))
    finally:
        distributed.shutdown()


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_make_the_one_process_update(tiny_models, tmp_path, parallel):
    torch.multiprocessing.start_processes(
        _rank_update, args=(2, free_port(), parallel, tiny_models["policy"], tmp_path), nprocs=2,
        start_method="fork",
    )
    torch.set_num_threads(1)
    single = PPOTrainer(config_from_dict(ppo_config(tiny_models["policy"], tmp_path / "single")), KafkaSettings())
    record = single.train_on(uneven_batch(tiny_models["policy"], seed=7))
    distributed = torch.load(tmp_path / "params.pt")
    expected = single.model.state_dict()
    assert distributed.keys() == expected.keys()
    worst = max(float((distributed[k] - expected[k].detach()).abs().max()) for k in expected)
    assert worst <= 1e-5
    # The update moved the weights far more than that: the comparison is not vacuous.
    start = PPOTrainer(config_from_dict(ppo_config(tiny_models["policy"], tmp_path / "start")), KafkaSettings())
    moved = max(float((v - expected[k]).abs().max()) for k, v in start.model.state_dict().items())
    assert moved > 1e-4
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["kl"] == pytest.approx(record.stats.kl, abs=1e-6)
    # 3 minibatches x 2 epochs on both; rank 0 counts its own 5 rollouts as trained.
    assert stats["steps"] == record.stats.optimizer_steps == 6
    assert stats["trained"] == {"trained": 5}


def test_global_batch_is_shared_round_robin():
    assert allocate([5, 3], 8) == [5, 3]
    assert allocate([10, 10], 8) == [4, 4]
    assert allocate([10, 1], 8) == [7, 1]
    assert allocate([0, 9], 8) == [0, 8]
    assert allocate([3, 4], 8) is None
