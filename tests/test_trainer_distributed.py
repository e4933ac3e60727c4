"""The trainer across ranks (``parallel: ddp|fsdp``, trainer/distributed.py):
real gloo process groups on CPU, the real broker for the stream part."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from helpers import wait_until

from arbiter.config import ConfigError
from arbiter.net import free_port
from arbiter.stream import KafkaSettings, ensure_topics, partition_count, topics
from cli.main import main
from trainer.config import config_from_dict
from trainer.distributed import allocate, check_partitions, ranks_from_env
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


def _rank_update(rank, world, port, parallel, model_dir, out, batch):
    """One rank: build the trainer, take this rank's part of the batch, one update."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from trainer import distributed

    config = config_from_dict(ppo_config(model_dir, out / "run", parallel=parallel))
    ranks = ranks_from_env(parallel)
    distributed.init(ranks, 60)
    try:
        trainer = PPOTrainer(config, KafkaSettings(), ranks=ranks)
        mine = batch[:5] if rank == 0 else batch[5:]  # split unevenly, in order
        record = trainer.train_on(trainer.global_batch(mine), local=len(mine))
        # The published version: under FSDP gathered from every rank's shards; rank 0 writes it.
        trainer.save_policy_version()
        state = distributed.full_state_dict(trainer.model) if parallel == "fsdp" else trainer.model.state_dict()
        if rank == 0:
            torch.save({k: v.detach().cpu() for k, v in state.items()}, out / "params.pt")
            (out / "stats.json").write_text(json.dumps({"kl": record.stats.kl, "steps": record.stats.optimizer_steps,
                                                        "trained": trainer.state.outcomes}))
    finally:
        distributed.shutdown()
    # Ended as `arbiter train` ends a rank: a rank that returned normally ran
    # gloo's C++ destructors at interpreter exit and, now and then, aborted
    # there ("terminate called without an active exception", SIGABRT) after
    # its work was done and written (pytorch/pytorch#179291 traces it to
    # tensors held by gloo work objects, freed once the interpreter is gone).
    distributed.exit_rank(0)


def run_ranks(fn, args, nprocs, timeout_s=180.0):
    """Run ``fn(rank, *args)`` in ``nprocs`` fresh processes; fail (and kill
    them) if they are not all done within ``timeout_s``.

    Spawned, not forked: by now this process has gRPC, Kafka and asyncio
    threads from earlier tests, and a child forked while one of them holds a
    lock can wait on it forever. The deadline and the kill keep a hung rank
    from outliving its test: multiprocessing joins live children at exit, so
    an orphan would hold the whole run open."""
    context = torch.multiprocessing.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                pytest.fail(f"{nprocs} ranks did not finish within {timeout_s:.0f} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join()


@pytest.fixture(scope="module")
def one_process_update(tiny_models, tmp_path_factory):
    """The batch (8 uneven rollouts) and what one process's update makes of
    it: the weights before and after, and the update's record. Both
    parallel modes are held to this same update."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs
    try:
        batch = uneven_batch(tiny_models["policy"], seed=7)
        single = PPOTrainer(config_from_dict(ppo_config(tiny_models["policy"], tmp_path_factory.mktemp("single"))),
                            KafkaSettings())
        before = {k: v.detach().clone() for k, v in single.model.state_dict().items()}
        record = single.train_on(batch)
    finally:
        torch.set_num_threads(threads)
    return batch, before, single.model.state_dict(), record


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_make_the_one_process_update(tiny_models, tmp_path, parallel, one_process_update):
    batch, before, expected, record = one_process_update
    # The ranks get this batch itself, pickled (the same rollouts, ids and all).
    run_ranks(_rank_update, (2, free_port(), parallel, tiny_models["policy"], tmp_path, batch), nprocs=2)
    distributed = torch.load(tmp_path / "params.pt")
    assert distributed.keys() == expected.keys()
    worst = max(float((distributed[k] - expected[k].detach()).abs().max()) for k in expected)
    assert worst <= 1e-5
    # What rank 0 published is those weights, loadable as any Hugging Face policy.
    from transformers import AutoModelForCausalLM

    published = AutoModelForCausalLM.from_pretrained(str(tmp_path / "run" / "policies" / "ppo-1")).state_dict()
    assert max(float((v - expected[f"lm.{k}"]).abs().max()) for k, v in published.items()) <= 1e-5
    # The update moved the weights far more than that: the comparison is not vacuous.
    moved = max(float((v - expected[k]).abs().max()) for k, v in before.items())
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


def torchrun(config_path, port):
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
            "--master-addr", "127.0.0.1", "--master-port", str(port),
            "-m", "cli", "train", "ppo", "--config", str(config_path)]


def rank_pids(launcher_pid):
    """{rank: pid} of the worker processes torchrun started."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read()
            if int(stat.rsplit(")", 1)[1].split()[1]) != launcher_pid:
                continue
            env = dict(item.split("=", 1) for item in open(f"/proc/{entry}/environ").read().split("\0") if "=" in item)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in env:
            out[int(env["RANK"])] = int(entry)
    return out


def test_sigkill_of_one_rank_stops_the_job_and_a_restart_trains_everything_once(tiny_models, tmp_path, kafka_settings):
    # Four partitions over two ranks: each rank reads two (p mod 2).
    ensure_topics(kafka_settings, {topics.ROLLOUTS: 4, topics.POLICY_UPDATES: 1})
    config = ppo_config(tiny_models["policy"], tmp_path / "run", parallel="ddp", run_name="crash",
                        collective_timeout_s=60,
                        kafka={"bootstrap_servers": ",".join(kafka_settings.bootstrap_servers),
                               "topic_prefix": kafka_settings.topic_prefix, "session_timeout_ms": 6000})
    config["ppo"].update(minibatch_size=4, epochs=1, max_staleness=10)
    config_path = tmp_path / "trainer.yaml"
    config_path.write_text(yaml.safe_dump(config))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = AutoModelForCausalLM.from_pretrained(str(tiny_models["policy"])).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_models["policy"]))
    # Prompts p0..p15 (the record key): spread over all four partitions.
    rollouts = [to_rollout(t) for t in sample_trajectories(lm, tokenizer, 32, length=4, seed=10, group_size=2)]
    first, second = rollouts[:16], rollouts[16:]
    produced_ids = {r.rollout_id for r in rollouts}
    env = {**os.environ, "ARBITER_LOG_LEVEL": "WARNING", "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "run"

    produce(kafka_settings, first)
    job = subprocess.Popen(torchrun(config_path, free_port()), env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: (checkpoint_state(run_dir) or {}).get("step", 0) >= 1, 120, "a first checkpoint")
        ranks = rank_pids(job.pid)
        assert sorted(ranks) == [0, 1]
        os.kill(ranks[1], signal.SIGKILL)
        # The surviving rank fails its next collective and torchrun ends the job: no hang.
        output = job.communicate(timeout=90)[0]
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert job.returncode != 0, output
    killed_at = checkpoint_state(run_dir)["step"]
    assert 1 <= killed_at < 4

    produce(kafka_settings, second)
    # 32 rollouts at 8 per update: the job ends by itself after update 4.
    # Started the way a user would on one machine: arbiter starts torchrun.
    restart = [sys.executable, "-m", "cli", "train", "ppo", "--config", str(config_path), "--nproc-per-node", "2",
               "--max-updates", "4"]
    job = subprocess.run(restart, env=env, capture_output=True, text=True, timeout=180)
    output = job.stdout + job.stderr
    assert job.returncode == 0, output
    assert f"trainer ready: step {killed_at}, policy" in output
    assert "rank 1 of 2 (ddp, gloo)" in output
    state = checkpoint_state(run_dir)
    # Every rollout trained exactly once, by both runs together: no update
    # beyond 4, every id in the dedupe window, every partition's offset past it.
    assert state["step"] == 4, output
    assert state["outcomes"] == {"trained": 32}
    assert sorted(state["seen_ids"]) == sorted(produced_ids)
    assert accounted_for(state) == len(produced_ids)
    assert sorted(int(p) for parts in state["offsets"].values() for p in parts) == [0, 1, 2, 3]
    assert state["published"][-1] == "crash-4"
    # Each rank's RNG state is in the checkpoint.
    from trainer.checkpoint import latest_checkpoint

    assert {p.name for p in latest_checkpoint(run_dir / "checkpoints").glob("rng-*.pt")} == {"rng-0.pt", "rng-1.pt"}


def test_bad_parallel_settings_are_refused_naming_the_field(tiny_models, tmp_path, kafka_settings, monkeypatch,
                                                             capsys):
    base = ppo_config(tiny_models["policy"], tmp_path / "run")
    with pytest.raises(ConfigError, match=r"parallel='mpi' is invalid: must be one of none, ddp, fsdp"):
        config_from_dict({**base, "parallel": "mpi"})
    with pytest.raises(ConfigError, match=r"collective_timeout_s=0 is invalid: must be > 0 seconds"):
        config_from_dict({**base, "parallel": "ddp", "collective_timeout_s": 0})
    with pytest.raises(ConfigError, match=r"ppo.lora=.* must be null with parallel: fsdp"):
        config_from_dict({**base, "parallel": "fsdp", "ppo": {**base["ppo"], "lora": {"r": 4}}})
    # Ranks need torchrun's environment; one process must not be one of many.
    with pytest.raises(ConfigError, match=r"parallel='fsdp' is invalid: fsdp needs the environment torchrun sets "
                                          r"\(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT unset\)"):
        ranks_from_env("fsdp", env={})
    with pytest.raises(ConfigError, match=r"parallel='none' is invalid: is none, but this process is one of "
                                          r"WORLD_SIZE=2 ranks"):
        ranks_from_env("none", env={"WORLD_SIZE": "2"})
    assert ranks_from_env("none", env={}) is None
    # More ranks than partitions: a rank would read nothing, refused before any training.
    ensure_topics(kafka_settings, {topics.ROLLOUTS: 1})
    three = ranks_from_env("ddp", env={"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0", "MASTER_ADDR": "h",
                                       "MASTER_PORT": "1"})
    assert [p for p in range(7) if three.owns(p)] == [0, 3, 6]
    with pytest.raises(ConfigError, match=(
            r"ddp with 3 ranks needs the rollouts topic '.*rollouts' to have at least 3 partitions "
            r"\(each rank reads its own\), but it has 1")):
        check_partitions(three, partition_count(kafka_settings, topics.ROLLOUTS), kafka_settings.topic(topics.ROLLOUTS))
    # The command says so and exits 2, before loading anything (its entry
    # point, called here: `python -m cli` exits with what it returns).
    config_path = tmp_path / "trainer.yaml"
    config_path.write_text(yaml.safe_dump(base))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    capsys.readouterr()
    assert main(["train", "ppo", "--config", str(config_path), "--parallel", "fsdp"]) == 2
    assert "arbiter train ppo: parallel='fsdp' is invalid: fsdp needs the environment torchrun sets" in (
        capsys.readouterr().err)
