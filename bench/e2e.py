"""``make bench-e2e``: the demo's RLHF task end to end, Arbiter against TRL,
side by side in one run on this machine.

Contenders, each for the same wall-clock training budget (``--seconds``):

- ``arbiter-grpo`` and ``arbiter-ppo``: ``arbiter up``'s stack (broker,
  reward/reference/policy services, a rollout worker, the trainer; cores and
  threads from ``services.placement``) with the demo's stack config
  (``services.demo.stack_config``), the trainer's advantage estimator GRPO or
  GAE (PPO with a value head). The clock starts when the stack is up and the
  trainer's consumer has joined its group (so the worker may have produced
  what it is allowed to before the first update: one batch on a synchronous
  loop), and counts the updates the trainer logged before it ran out; the
  policy judged is the last version published by then.
- ``trl-grpo``: TRL's ``GRPOTrainer`` in one process (``bench/trl_grpo.py``,
  ``--trl-threads`` torch threads), in a virtual environment of its own that this
  benchmark creates (``.venv-trl``: torch pinned to the project's version
  first, then TRL 1.16 under a constraints file pinning torch and
  transformers to the project's; never the project's environment). TRL 1.16
  has no ``PPOTrainer`` (it left with the 1.x cleanup), so there is no TRL PPO
  column; Arbiter's PPO is compared with TRL's GRPO.

Same for all: the demo's pretrained policy and reward model and its training
prompts (``services.demo_models.prepare_models``, cached in the workdir), the
worker's generation length and group size, temperature 1, a fixed KL
coefficient β (Arbiter: a penalty on the normalized reward, per token; TRL: β
times its per-token k3 term in the loss; the same number, not the same
mechanism, which is why KL is measured rather than assumed), learning rate,
batch of 32 rollouts in minibatches of 8 for 2 epochs, clip 0.2.

Measured for each, by this process, after its run and the same way for all:
rollouts/s and updates/s (rollouts trained; an update = one batch), the gold
gain (the demo's VADER gold scorer, final vs initial policy on the held-out
prompts: ``services.demo.evaluate_gold``), the final KL to the initial policy
(nats per sample: Σ_t log π(y_t) - log π_ref(y_t) over completions sampled from
the final policy on the held-out prompts), words per sample, gold gain per nat
of KL and per wall-second; ratios Arbiter/TRL. The table goes to stdout and
to WORKDIR/e2e.md (and e2e.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from bench.common import console, print_table

REPO = Path(__file__).resolve().parents[1]
CONTENDERS = ("trl-grpo", "arbiter-grpo", "arbiter-ppo")
TRL_VENV = REPO / ".venv-trl"
TORCH_PIN = "torch==2.13.0"
TRL_SPEC = "trl>=1.16,<1.17"
KL_SAMPLE_SEED = 11


# -- TRL's environment -----------------------------------------------------------


def trl_constraints() -> str:
    """torch and transformers as the project has them, so both sides run the
    same model code."""
    return f"{TORCH_PIN}\ntransformers=={importlib.metadata.version('transformers')}\n"


def ensure_trl_venv(venv: Path = TRL_VENV) -> Path:
    """Creates (once) the benchmark's own environment for TRL; returns its python."""
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    wanted = trl_constraints() + TRL_SPEC + "\n"
    if stamp.exists() and stamp.read_text() == wanted and python.exists():
        return python
    console.print(f"creating {venv} for TRL ({TRL_SPEC}; {TORCH_PIN} first, pinned): a minute or two")
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    constraints = venv / "constraints.txt"
    constraints.write_text(trl_constraints())
    pip = [str(python), "-m", "pip", "install", "-q"]
    # torch first and pinned: it is the CPU wheel on disk; anything that pulled
    # an unpinned torch would fetch a multi-GB CUDA build.
    subprocess.run([*pip, TORCH_PIN], check=True)
    subprocess.run([*pip, TRL_SPEC, "-c", str(constraints)], check=True)
    stamp.write_text(wanted)
    return python


# -- the contenders ---------------------------------------------------------------


@dataclasses.dataclass
class Run:
    name: str
    seconds: float  # training wall time counted
    rollouts: int
    updates: int
    final_dir: Path
    setup_seconds: float
    notes: str = ""
    eval: dict = dataclasses.field(default_factory=dict)

    @property
    def rollouts_per_s(self) -> float:
        return self.rollouts / self.seconds if self.seconds else math.nan

    @property
    def updates_per_s(self) -> float:
        return self.updates / self.seconds if self.seconds else math.nan


def training(models, beta: float) -> dict:
    """The training settings every contender shares (the demo's PPO config, β fixed)."""
    ppo = dict(models.ppo)
    return {"batch_size": ppo["batch_size"], "minibatch_size": ppo["minibatch_size"], "epochs": ppo["epochs"],
            "learning_rate": ppo["learning_rate"], "clip": ppo.get("clip_coef", 0.2), "beta": beta}


def run_arbiter(algo: str, models, workdir: Path, seconds: float, beta: float,
                worker_overrides: dict | None = None) -> Run:
    from services.demo import read_history, stack_config
    from services.stack import Stack

    out = workdir / f"arbiter-{algo}"
    shutil.rmtree(out, ignore_errors=True)
    base = stack_config(models, out, updates=1)
    ppo = {**models.ppo, "kl": {"mode": "fixed", "init_coef": beta}}
    if algo == "grpo":
        ppo.update(advantage="grpo", samples_per_prompt=base.worker["samples_per_prompt"])
    # Gold is judged after the run, the same way for every contender: the
    # worker does not spend time on it during the run.
    worker = {**{k: v for k, v in base.worker.items() if k != "gold"}, **(worker_overrides or {})}
    config = dataclasses.replace(base, worker=worker, trainer={**base.trainer, "max_updates": None, "ppo": ppo,
                                                                 "run_name": algo})
    started = time.monotonic()
    with Stack(config) as stack:
        # The clock starts when the trainer's consumer has its partitions:
        # the broker's group join (3.5-10 s with Tansu) is start-up, as TRL's
        # model loading is.
        stack._wait_for_log("trainer", "assigned rollouts", 300)
        t0 = time.time()  # history rows carry time.time()
        setup = time.monotonic() - started
        console.print(f"arbiter-{algo}: up in {setup:.0f}s; " + "; ".join(
            line for line in stack.describe().splitlines() if line.startswith("placement")))
        while time.time() < t0 + seconds:
            stack.check_alive()
            time.sleep(0.25)
        history = Path(config.workdir) / "trainer" / "history.jsonl"
    rows = [r for r in read_history(history) if r["time"] <= t0 + seconds]
    final = (Path(config.workdir) / "trainer" / "policies" / rows[-1]["policy_version"]) if rows else models.policy
    staleness = sum(r["staleness"] for r in rows) / len(rows) if rows else math.nan
    notes = [f"mean staleness {staleness:.2f}"]
    # A loop that stopped updating before the budget ran out is named, not
    # averaged away: its rate is not a steady-state rate.
    idle = t0 + seconds - (rows[-1]["time"] if rows else t0)
    gaps = sorted(b["time"] - a["time"] for a, b in zip(rows, rows[1:]))
    typical = gaps[len(gaps) // 2] if gaps else (rows[0]["time"] - t0 if rows else seconds)
    if worker_overrides:
        notes.append("worker " + ", ".join(f"{k}={v}" for k, v in worker_overrides.items()))
    if not rows:
        notes.append(f"no update at all (stalled; see {out / 'stack' / 'logs'})")
    elif idle > max(5.0, 4 * typical):
        notes.append(f"no update in the last {idle:.0f}s (stalled; see {out / 'stack' / 'logs'})")
    return Run(f"arbiter-{algo}", seconds, sum(r["rollouts"] for r in rows), len(rows), final, setup,
               notes="; ".join(notes))


def run_trl(models, workdir: Path, seconds: float, beta: float, venv: Path, samples_per_prompt: int,
            threads: int) -> Run:
    python = ensure_trl_venv(venv)
    out = workdir / "trl-grpo"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    shared = training(models, beta)
    argv = [str(python), str(REPO / "bench" / "trl_grpo.py"), "--policy", str(models.policy),
            "--reward", str(models.reward), "--prompts", str(models.prompts), "--out", str(out),
            "--seconds", str(seconds), "--beta", str(beta), "--learning-rate", str(shared["learning_rate"]),
            "--num-generations", str(samples_per_prompt), "--max-new-tokens", str(models.max_new_tokens),
            "--batch-size", str(shared["batch_size"]), "--minibatch-size", str(shared["minibatch_size"]),
            "--epochs", str(shared["epochs"]), "--clip", str(shared["clip"]), "--threads", str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": ""}
    started = time.monotonic()
    with (out / "trl.log").open("w") as log:
        code = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=seconds + 900).returncode
    if code != 0:
        tail = "\n".join((out / "trl.log").read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"TRL's GRPO run failed (exit {code}); {out / 'trl.log'} ends:\n{tail}")
    result = json.loads((out / "result.json").read_text())
    setup = time.monotonic() - started - result["seconds"]
    console.print(f"trl-grpo: {result['updates']} updates, {result['optimizer_steps']} optimizer steps in "
                  f"{result['seconds']:.1f}s ({threads} torch threads)")
    return Run("trl-grpo", result["seconds"], result["rollouts"], result["updates"], Path(result["final_dir"]), setup,
               notes=f"{threads} torch threads, one process")


# -- judging, the same way for every contender -------------------------------------


def sample_kl(initial: Path, final: Path, prompts: list[str], n: int, max_new_tokens: int, seed: int,
              prompts_per_batch: int = 32) -> dict:
    """Mean over completions sampled from ``final`` of Σ_t log π_final(y_t) -
    log π_initial(y_t) (nats per sample, the k1 estimate of KL(final ‖
    initial), as the trainer logs it), and mean words per completion."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.ppo_math import token_logprobs

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(final))
    tokenizer.padding_side = "left"
    policy = AutoModelForCausalLM.from_pretrained(str(final)).eval()
    reference = AutoModelForCausalLM.from_pretrained(str(initial)).eval()
    kls, words = [], []
    with torch.no_grad():
        for start in range(0, len(prompts), prompts_per_batch):
            enc = tokenizer(prompts[start : start + prompts_per_batch], return_tensors="pt", padding=True)
            generated = policy.generate(**enc, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                                        max_new_tokens=max_new_tokens, num_return_sequences=n,
                                        pad_token_id=tokenizer.pad_token_id)
            width = enc["input_ids"].shape[1]
            completion = generated[:, width:]
            # Real completion tokens: up to and including the first end token.
            is_eos = (completion == tokenizer.eos_token_id).long()
            mask = ((is_eos.cumsum(dim=1) - is_eos) == 0).long()
            attention = torch.cat([enc["attention_mask"].repeat_interleave(n, dim=0), mask], dim=1)
            positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
            logps = [token_logprobs(model(generated, attention_mask=attention, position_ids=positions).logits
                                    [:, width - 1 : -1], completion) for model in (policy, reference)]
            kls += ((logps[0] - logps[1]) * mask).sum(dim=1).tolist()
            words += [len(tokenizer.decode(c, skip_special_tokens=True).split()) for c in completion]
    return {"kl": sum(kls) / len(kls), "words": sum(words) / len(words)}


def judge(models, run: Run) -> None:
    from services.demo import EVAL_SAMPLES, evaluate_gold

    gold = evaluate_gold(models, run.final_dir)
    kl = sample_kl(models.policy, run.final_dir, models.eval_prompts, EVAL_SAMPLES, models.max_new_tokens,
                   KL_SAMPLE_SEED)
    gain = gold["gold_final_policy"] - gold["gold_initial_policy"]
    run.eval = {**gold, "gold_gain": gain, "kl": kl["kl"], "words": kl["words"],
                "gold_per_nat": gain / kl["kl"] if kl["kl"] > 0 else math.nan,
                "gold_per_s": gain / run.seconds if run.seconds else math.nan}


# -- the table ----------------------------------------------------------------------

COLUMNS = (("rollouts/s", lambda r: r.rollouts_per_s), ("updates/s", lambda r: r.updates_per_s),
           ("gold gain", lambda r: r.eval["gold_gain"]), ("final KL (nats/sample)", lambda r: r.eval["kl"]),
           ("gold/nat KL", lambda r: r.eval["gold_per_nat"]), ("gold/wall-s", lambda r: r.eval["gold_per_s"]),
           ("words/sample", lambda r: r.eval["words"]))


def fmt(value: float) -> str:
    if not isinstance(value, float):
        return str(value)
    return "nan" if math.isnan(value) else f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def table(runs: dict[str, Run]) -> tuple[list[str], list[list[str]]]:
    header = ["", "rollouts", "updates", "seconds", *(name for name, _ in COLUMNS), "notes"]
    rows = [[r.name, str(r.rollouts), str(r.updates), fmt(r.seconds), *(fmt(get(r)) for _, get in COLUMNS), r.notes]
            for r in runs.values()]
    base = runs.get("trl-grpo")
    if base is not None:
        for name in ("arbiter-grpo", "arbiter-ppo"):
            if name in runs:
                ratios = []
                for _, get in COLUMNS:
                    ours, theirs = get(runs[name]), get(base)
                    ratios.append(fmt(ours / theirs) if theirs and not math.isnan(theirs) else "nan")
                rows.append([f"{name} / trl-grpo", "", "", "", *ratios, "ratio"])
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="make bench-e2e", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, help="wall-clock training budget of each contender (default 60; "
                                                      "--quick: 10)")
    parser.add_argument("--quick", action="store_true", help="the demo's quick models and a 10 s budget: a smoke run")
    parser.add_argument("--only", choices=CONTENDERS, action="append", help="run only this contender (repeatable)")
    parser.add_argument("--beta", type=float, default=0.05, help="KL coefficient of every contender (fixed)")
    parser.add_argument("--workdir", default=str(REPO / "runs" / "bench-e2e"))
    parser.add_argument("--trl-venv", default=str(TRL_VENV), help="TRL's own environment (created if missing)")
    # One torch thread by default: on the 2-core machine, under other load, TRL
    # with 1 thread ran 112 optimizer steps in 16 s where 2 threads ran 8 in
    # 19 s (OpenMP threads waiting on each other for a preempted peer).
    parser.add_argument("--trl-threads", type=int, default=1, help="TRL's torch threads (default 1)")
    parser.add_argument("--arbiter-worker", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the Arbiter stack's worker config (repeatable), e.g. "
                             "max_staleness=2")
    args = parser.parse_args(argv)
    worker_overrides = {}
    for item in args.arbiter_worker:
        key, eq, value = item.partition("=")
        if not eq or not key:
            parser.error(f"--arbiter-worker {item!r}: expected KEY=VALUE")
        worker_overrides[key] = yaml.safe_load(value)
    seconds = args.seconds or (10.0 if args.quick else 60.0)
    workdir = Path(args.workdir).resolve()
    from services.demo_models import prepare_models

    models = prepare_models(workdir / ("models-quick" if args.quick else "models"), quick=args.quick, console=console)
    console.print(models.description)
    from services.demo import stack_config

    samples_per_prompt = stack_config(models, workdir, 1).worker["samples_per_prompt"]
    runs: dict[str, Run] = {}
    for name in args.only or CONTENDERS:
        if name == "trl-grpo":
            run = run_trl(models, workdir, seconds, args.beta, Path(args.trl_venv), samples_per_prompt,
                          args.trl_threads)
        else:
            run = run_arbiter(name.split("-", 1)[1], models, workdir, seconds, args.beta, worker_overrides)
        judge(models, run)
        runs[name] = run
        console.print(f"{name}: {run.rollouts} rollouts, {run.updates} updates in {run.seconds:.1f}s; "
                      f"gold {run.eval['gold_gain']:+.3f}, KL {run.eval['kl']:.2f}")
    header, rows = table(runs)
    shared = training(models, args.beta)
    title = (f"End to end, {seconds:g} s of training each: {models.max_new_tokens} new tokens, group "
             f"{samples_per_prompt}, batch {shared['batch_size']}/{shared['minibatch_size']} x {shared['epochs']} "
             f"epochs, lr {shared['learning_rate']:g}, β {args.beta:g} fixed; {len(os.sched_getaffinity(0))} cores")
    print_table(title, header, rows)
    (workdir / "e2e.md").write_text(f"{title}\n\n" + markdown(header, rows))
    summary = {"title": title, "runs": {name: {**{k: v for k, v in dataclasses.asdict(r).items() if k != "final_dir"},
                                               "final_dir": str(r.final_dir), "rollouts_per_s": r.rollouts_per_s,
                                               "updates_per_s": r.updates_per_s} for name, r in runs.items()}}
    (workdir / "e2e.json").write_text(json.dumps(summary, indent=2, default=str))
    console.print(f"table: {workdir / 'e2e.md'}  details: {workdir / 'e2e.json'}")
    return summary


if __name__ == "__main__":
    main()
