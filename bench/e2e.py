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
  policy judged is the last version published by then. The trainer
  checkpoints at the example stack's cadence (every 10 updates or 30 s,
  ``infra/stack.example.yaml``), not after every update.
- ``trl-grpo``: TRL's ``GRPOTrainer`` in one process (``bench/trl_grpo.py``,
  ``--trl-threads`` torch threads), in a virtual environment of its own that this
  benchmark creates (``.venv-trl``: torch pinned to the project's version
  first, then TRL 1.16 under a constraints file pinning torch and
  transformers to the project's; never the project's environment).
- ``trl-ppo``: TRL's ``PPOTrainer`` (a separate value model initialised from
  the reward model, per-token KL in the reward, GAE) in one process
  (``bench/trl_ppo.py``, whose docstring maps Arbiter's PPO config onto
  TRL's), in a second environment of its own (``.venv-trl-ppo``: TRL 1.12.0,
  the last release with a PPOTrainer — 1.13 removed it — beside the
  project's torch and transformers, every other package pinned by
  ``bench/trl-ppo.lock``). TRL's PPO samples one completion per prompt (32
  prompts an update), Arbiter's worker a group of 4 per prompt.

Same for all: the demo's pretrained policy and reward model and its training
prompts (``services.demo_models.prepare_models``, cached in the workdir), the
worker's generation length and group size (but TRL's PPO: one per prompt),
temperature 1, a fixed KL coefficient β (Arbiter, by default: β times the
token mean of k3 in the loss, as TRL's GRPO; ``--kl-penalty reward``: a k1
penalty per token on the normalized reward, as TRL's PPO on its raw reward;
the same number, not always the same mechanism, which is why KL is measured
rather than assumed), learning rate,
batch of 32 rollouts in minibatches of 8 for 2 epochs, clip 0.2; for the two
PPOs also the value clip, value-loss coefficient and GAE γ and λ (the
trainer's defaults, which TRL's equal).

Measured for each, by this process, after its run and the same way for all:
rollouts/s and updates/s (rollouts trained; an update = one batch), the gold
gain (the demo's VADER gold scorer, final vs initial policy on the held-out
prompts: ``services.demo.evaluate_gold``), the final KL to the initial policy
(nats per sample: Σ_t log π(y_t) - log π_ref(y_t) over completions sampled from
the final policy on the held-out prompts), words per sample, gold gain per nat
of KL and per wall-second; ratios Arbiter/TRL per repeat: arbiter-grpo /
trl-grpo, arbiter-ppo / trl-ppo and arbiter-ppo / trl-grpo (``RATIOS``). The
table goes to stdout and to WORKDIR/e2e.md (and e2e.json).

Gold per wall-second at matched KL: a contender that drifts further from the
initial policy buys gold with KL, so gold per second is compared where the
contenders are equally far. Each run keeps its policy at ``--snapshots``
evenly spaced times (Arbiter: the version serving then, all are on disk; TRL:
an in-memory copy at the first batch boundary past each time, written after
the clock stops); the KL of each is measured as above. In each repeat the
level is the lowest final KL among the contenders; for each, the time and gold
gain where its KL first reaches the level are interpolated linearly between
the two kept policies around the crossing (KL 0 and gain 0 at time 0), and
gold/wall-s @ matched KL is that gain over that time.

``--repeats N`` runs the contenders interleaved (trl-grpo, trl-ppo,
arbiter-grpo, arbiter-ppo, trl-grpo, ...), so load on the shared machine hits
all of them alike; each cell is the mean ± half the range over the repeats, and each ratio
row the mean ± half-range of the ratios within each repeat. The models are
prepared once per workdir and reused (``--fresh-models`` prepares them anew).
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
CONTENDERS = ("trl-grpo", "trl-ppo", "arbiter-grpo", "arbiter-ppo")
# Ratio rows: (ours, theirs), per repeat.
RATIOS = (("arbiter-grpo", "trl-grpo"), ("arbiter-ppo", "trl-ppo"), ("arbiter-ppo", "trl-grpo"))
TRL_VENV = REPO / ".venv-trl"
TORCH_PIN = "torch==2.13.0"
TRL_SPEC = "trl>=1.16,<1.17"
# TRL's PPOTrainer left with 1.13: 1.12.0 is the last release that has it
# (trl.experimental.ppo), and it runs on the project's torch and transformers.
TRL_PPO_VENV = REPO / ".venv-trl-ppo"
TRL_PPO_SPEC = "trl==1.12.0"
TRL_PPO_LOCK = REPO / "bench" / "trl-ppo.lock"
KL_SAMPLE_SEED = 11
CHECKPOINTS = {"checkpoint_every": 10, "checkpoint_every_s": 30.0}


# -- TRL's environment -----------------------------------------------------------


def trl_constraints() -> str:
    """torch and transformers as the project has them, so both sides run the
    same model code."""
    return f"{TORCH_PIN}\ntransformers=={importlib.metadata.version('transformers')}\n"


def ensure_trl_venv(venv: Path = TRL_VENV, spec: str = TRL_SPEC, lock: Path | None = None) -> Path:
    """Creates (once) one of the benchmark's own environments for TRL (``spec``,
    under ``trl_constraints`` and, if given, the constraints file ``lock``);
    returns its python. It is made again when what it should hold changes."""
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    pins = trl_constraints() + (lock.read_text() if lock else "")
    wanted = pins + spec + "\n"
    if stamp.exists() and stamp.read_text() == wanted and python.exists():
        return python
    console.print(f"creating {venv} for TRL ({spec}; {TORCH_PIN} first, pinned): a minute or two")
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    constraints = venv / "constraints.txt"
    constraints.write_text(pins)
    pip = [str(python), "-m", "pip", "install", "-q"]
    # torch first and pinned: it is the CPU wheel on disk; anything that pulled
    # an unpinned torch would fetch a multi-GB CUDA build.
    subprocess.run([*pip, TORCH_PIN], check=True)
    subprocess.run([*pip, spec, "-c", str(constraints)], check=True)
    stamp.write_text(wanted)
    return python


# -- the models -------------------------------------------------------------------

MODELS_CACHE = "e2e-models.json"


def prepared_models(out: Path, quick: bool, fresh: bool):
    """The demo's models (``services.demo_models.prepare_models``), kept in
    ``out`` with what describes them, so a later run reuses them instead of
    labelling pairs and training the reward model again (minutes on this
    machine, more under load); ``fresh`` prepares them anew."""
    from services.demo_models import DemoModels, prepare_models

    cache = out / MODELS_CACHE
    if not fresh and cache.exists():
        data = json.loads(cache.read_text())
        models = DemoModels(**{**data, **{k: Path(data[k]) for k in ("policy", "reward", "prompts")}})
        if all(p.exists() for p in (models.policy, models.reward, models.prompts)):
            console.print(f"   reusing the models in {out} ({cache.name}; --fresh-models prepares them anew)")
            return models
    models = prepare_models(out, quick=quick, console=console)
    cache.write_text(json.dumps(dataclasses.asdict(models), indent=2, default=str))
    return models


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
    # The policy along the run: (seconds since the clock started, its directory),
    # before the final one, for gold and KL over time.
    curve: list[tuple[float, Path]] = dataclasses.field(default_factory=list)
    repeat: int = 0

    @property
    def rollouts_per_s(self) -> float:
        return self.rollouts / self.seconds if self.seconds else math.nan

    @property
    def updates_per_s(self) -> float:
        return self.updates / self.seconds if self.seconds else math.nan


def training(models, beta: float) -> dict:
    """The training settings every contender shares (the demo's PPO config, β
    fixed; what it leaves out, the trainer's defaults), and the value-function
    ones the PPO contenders share."""
    from trainer.config import PPOConfig

    ppo, default = dict(models.ppo), PPOConfig()
    return {"batch_size": ppo["batch_size"], "minibatch_size": ppo["minibatch_size"], "epochs": ppo["epochs"],
            "learning_rate": ppo["learning_rate"], "clip": ppo.get("clip_coef", default.clip_coef), "beta": beta,
            **{key: ppo.get(key, getattr(default, key)) for key in ("value_clip_coef", "vf_coef", "gamma", "lam")}}


# Where Arbiter's β·KL acts unless --kl-penalty says otherwise (kl_section).
# The loss, as TRL's GRPOTrainer: with β·Σ_t KL_t in the reward, 4 of 8
# Arbiter runs (session 6) collapsed to 2-3 word completions that the RM
# scored higher (raw +6.0-6.7 vs +5.5-6.0) and the gold lower: the RM's taste
# for short texts plus the reward's premium on brevity (fewer tokens, less
# KL to pay). With the KL in the loss, 0 of 6 collapsed.
DEFAULT_KL_PENALTY = "loss"


# The estimator each placement is priced with, as TRL's trainer of that
# placement does: k3 in the loss (GRPOTrainer; GRPO, Shao et al. 2024 eq. 3),
# k1 in every token's reward (PPOTrainer; InstructGPT). Keys: trainer.config.KL_PENALTIES.
KL_ESTIMATOR = {"loss": "k3", "reward": "k1"}


def kl_section(beta: float, penalty: str, target: float | None = None) -> dict:
    """The trainer's ``ppo.kl`` for a contender: β fixed, as TRL's, placed
    by ``penalty`` with its estimator (``KL_ESTIMATOR``); with a ``target``
    (nats/sample) Arbiter's adaptive controller instead (Ziegler et al. 2019),
    starting from β, with the demo's horizon."""
    if penalty not in KL_ESTIMATOR:
        raise ValueError(f"kl_penalty {penalty!r}: one of {', '.join(KL_ESTIMATOR)}")
    section = {"mode": "fixed", "init_coef": beta, "penalty": penalty, "estimator": KL_ESTIMATOR[penalty]}
    if target is not None:
        if not target > 0:
            raise ValueError(f"kl_target {target}: must be > 0 (nats per sample)")
        from services.demo_models import DEMO_KL_HORIZON

        section.update(mode="adaptive", target=target, horizon=DEMO_KL_HORIZON)
    return section


def add_training_flags(parser: argparse.ArgumentParser, learning_rate: float | None = None) -> None:
    """The training flags bench-e2e and bench-learning share: where the KL
    acts and how β moves, trainer ppo overrides, and every contender's
    learning rate (``learning_rate``: its default; None: the demo's)."""
    parser.add_argument("--kl-penalty", choices=tuple(KL_ESTIMATOR), default=DEFAULT_KL_PENALTY,
                        help="where Arbiter's β·KL acts (trainer ppo.kl.penalty): reward (β·k1 in each token's "
                             "reward, as TRL's PPO) or loss (β·mean k3 in the loss, as GRPO and TRL's GRPO); "
                             f"default {DEFAULT_KL_PENALTY}")
    parser.add_argument("--kl-target", type=float, default=None, metavar="NATS",
                        help="Arbiter's RL contenders adapt β from --beta toward this KL per sample (the trainer's "
                             "adaptive controller with the demo's horizon) instead of "
                             "keeping it fixed; TRL's stay fixed (they have no controller). Default: fixed")
    parser.add_argument("--ppo-set", action="append", default=[], metavar="KEY=VALUE", type=ppo_setting,
                        help="a trainer ppo setting for every Arbiter RL contender (repeatable; the value is read "
                             "as YAML), e.g. learning_rate=2e-4; named in the table's title")
    shown = f"{learning_rate:g}" if learning_rate is not None else "the demo's"
    parser.add_argument("--learning-rate", type=float, default=learning_rate,
                        help=f"every contender's learning rate, Arbiter's and TRL's alike (default {shown})")


# bench-e2e's learning rate for every contender: a quarter of the demo's.
# Session 9, single 60 s runs of Arbiter's PPO on one set of models: 5e-4
# ended at KL 16.9 with gold +0.700, 1.25e-4 at 14.5 with +0.787; TRL's
# contenders are run at the same rate.
E2E_LEARNING_RATE = 1.25e-4



def with_learning_rate(models, learning_rate: float | None):
    """``models`` with every contender's learning rate set (None: the demo's)."""
    if learning_rate is None:
        return models
    if not learning_rate > 0:
        raise ValueError(f"learning_rate {learning_rate}: must be > 0")
    return dataclasses.replace(models, ppo={**models.ppo, "learning_rate": learning_rate})


def ppo_setting(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` -> (key, the value read as YAML: false, 1.5, null...)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE (a trainer ppo setting)")
    return key, yaml.safe_load(value)


def training_title(args: argparse.Namespace) -> str:
    """The table title's part for ``add_training_flags``' β and ppo overrides."""
    from services.demo_models import DEMO_KL_HORIZON

    title = (f"β {args.beta:g} fixed" if args.kl_target is None else
             f"β {args.beta:g} (TRL fixed; Arbiter adaptive toward {args.kl_target:g} nats/sample, horizon "
             f"{DEMO_KL_HORIZON})")
    if args.ppo_set:
        title += "; Arbiter's ppo " + ", ".join(f"{key}={value}" for key, value in args.ppo_set)
    return title


def run_arbiter(algo: str, models, workdir: Path, seconds: float, beta: float,
                worker_overrides: dict | None = None, snapshots: int = 0, max_staleness: int | None = None,
                ppo_overrides: dict | None = None, seed: int | None = None, kl_penalty: str = DEFAULT_KL_PENALTY,
                kl_target: float | None = None) -> Run:
    """``ppo_overrides``: trainer ``ppo`` keys on top of the demo's (another
    algorithm: bench/learning.py); ``seed``: the stack's (sampling, prompt
    order, training), its default when None; ``kl_penalty``: where β·KL acts
    (:func:`kl_section`); ``kl_target``: adapt β toward it (nats/sample)."""
    from services.demo import read_history, stack_config
    from services.stack import Stack, prune_policy_versions, trainer_policies_dir

    out = workdir / f"arbiter-{algo}"
    shutil.rmtree(out, ignore_errors=True)
    base = stack_config(models, out, updates=1)
    ppo = {**models.ppo, "kl": kl_section(beta, kl_penalty, kl_target)}
    if max_staleness is not None:
        ppo["max_staleness"] = max_staleness
    if algo == "grpo":
        ppo.update(advantage="grpo", samples_per_prompt=base.worker["samples_per_prompt"])
    ppo.update(ppo_overrides or {})
    # Gold is judged after the run, the same way for every contender: the
    # worker does not spend time on it during the run.
    worker = {**{k: v for k, v in base.worker.items() if k != "gold"}, **(worker_overrides or {})}
    # Checkpoints at the example stack's cadence (infra/stack.example.yaml),
    # not the trainer's default of one per update: a crash replays at most
    # that many updates, exactly once all the same (TRL's run saves none).
    trainer = {**base.trainer, "max_updates": None, "ppo": ppo, "run_name": algo, **CHECKPOINTS}
    config = dataclasses.replace(base, worker=worker, trainer=trainer,
                                 **({"seed": seed} if seed is not None else {}))
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
    policies = trainer_policies_dir(config)
    final = (policies / rows[-1]["policy_version"]) if rows else models.policy
    staleness = sum(r["staleness"] for r in rows) / len(rows) if rows else math.nan
    notes = [f"mean staleness {staleness:.2f} (bound {ppo.get('max_staleness', 'default')})"]
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
    # Every version stays on disk while the run lasts (the demo's stack
    # config): the one serving at each grid time is the curve, and only the
    # curve and the final version stay after it.
    curve = []
    for k in range(1, snapshots):
        at = [r for r in rows if r["time"] - t0 <= seconds * k / snapshots]
        if at:
            curve.append((at[-1]["time"] - t0, policies / at[-1]["policy_version"]))
    prune_policy_versions(policies, {final.name, *(p.name for _, p in curve)})
    return Run(f"arbiter-{algo}", seconds, sum(r["rollouts"] for r in rows), len(rows), final, setup,
               notes="; ".join(notes), curve=curve)


def reward_normalization(reward: Path) -> list[str]:
    """bench/trl_ppo.py's flags that put the RM's scores on the scale
    Arbiter's trainer normalizes them to: the statistics the version ships
    (``arbiter.json`` normalization), a fixed stand-in for the trainer's
    running ones; none when it ships none (TRL then sees raw scores)."""
    meta = reward / "arbiter.json"
    stats = json.loads(meta.read_text()).get("normalization") if meta.exists() else None
    return ["--reward-mean", str(stats["mean"]), "--reward-std", str(stats["std"])] if stats else []


def run_trl(algo: str, models, workdir: Path, seconds: float, beta: float, venv: Path, samples_per_prompt: int,
            threads: int, snapshots: int = 0, seed: int | None = None) -> Run:
    """TRL's GRPO (``bench/trl_grpo.py``, in ``venv``) or PPO
    (``bench/trl_ppo.py``, in ``venv``, pinned by ``TRL_PPO_LOCK``)."""
    name = f"trl-{algo}"
    python = ensure_trl_venv(venv) if algo == "grpo" else ensure_trl_venv(venv, TRL_PPO_SPEC, TRL_PPO_LOCK)
    out = workdir / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    shared = training(models, beta)
    argv = [str(python), "-m", f"bench.trl_{algo}", "--policy", str(models.policy),
            "--reward", str(models.reward), "--prompts", str(models.prompts), "--out", str(out),
            "--seconds", str(seconds), "--beta", str(beta), "--learning-rate", str(shared["learning_rate"]),
            "--max-new-tokens", str(models.max_new_tokens),
            "--batch-size", str(shared["batch_size"]), "--minibatch-size", str(shared["minibatch_size"]),
            "--epochs", str(shared["epochs"]), "--clip", str(shared["clip"]), "--threads", str(threads),
            "--snapshots", str(snapshots)]
    if seed is not None:
        argv += ["--seed", str(seed)]
    if algo == "grpo":
        argv += ["--num-generations", str(samples_per_prompt)]
    else:
        argv += ["--value-clip", str(shared["value_clip_coef"]), "--vf-coef", str(shared["vf_coef"]),
                 "--gamma", str(shared["gamma"]), "--lam", str(shared["lam"])]
        argv += reward_normalization(Path(models.reward))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": "", "TRL_EXPERIMENTAL_SILENCE": "1"}
    started = time.monotonic()
    with (out / "trl.log").open("w") as log:
        code = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                              timeout=seconds + 900).returncode
    if code != 0:
        tail = "\n".join((out / "trl.log").read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"TRL's {algo.upper()} run failed (exit {code}); {out / 'trl.log'} ends:\n{tail}")
    result = json.loads((out / "result.json").read_text())
    setup = time.monotonic() - started - result["seconds"]
    console.print(f"{name}: {result['updates']} updates, {result['optimizer_steps']} optimizer steps in "
                  f"{result['seconds']:.1f}s ({threads} torch threads)")
    return Run(name, result["seconds"], result["rollouts"], result["updates"], Path(result["final_dir"]), setup,
               notes=f"{threads} torch threads, one process",
               curve=[(c["seconds"], Path(c["dir"])) for c in result.get("snapshots", [])])


# -- judging, the same way for every contender -------------------------------------


def load_reward_model(path: Path):
    """(tokenizer, model) of the RM version, as Hugging Face loads it: one score per text."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1).eval()
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model


def reward_scores(rm, texts: list[str], batch: int = 64) -> list[float]:
    """The raw RM score of each text (prompt + completion, as the reward service scores it)."""
    import torch

    tokenizer, model = rm
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), batch):
            enc = tokenizer(texts[start : start + batch], return_tensors="pt", padding=True)
            out += model(**enc).logits[:, 0].float().tolist()
    return out


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


class Judge:
    """Gold, RM reward and KL of a policy directory on the held-out prompts,
    the same way for every contender (cached per directory: the initial
    policy's are sampled once)."""

    def __init__(self, models):
        from services.worker.gold import make_gold_scorer

        self.models = models
        self.gold_scorer = make_gold_scorer(models.gold)
        self.rm = load_reward_model(Path(models.reward))
        self._scores: dict[Path, tuple[float, float]] = {}
        self._kl: dict[Path, dict] = {}

    def scores(self, policy: Path) -> tuple[float, float]:
        """Mean gold and mean raw RM score of the same EVAL_SAMPLES samples per
        held-out prompt (seed 7, as ``services.demo.evaluate_gold`` samples
        them): the RM rising while gold falls is the policy exploiting the RM."""
        from services.demo import EVAL_SAMPLES
        from services.demo_models import sample_completions

        if policy not in self._scores:
            m = self.models
            completions = sample_completions(policy, m.eval_prompts, EVAL_SAMPLES, m.max_new_tokens, seed=7)
            texts = [(prompt, c) for prompt, group in zip(m.eval_prompts, completions) for c in group]
            gold = [self.gold_scorer(c) for _, c in texts]
            rm = reward_scores(self.rm, [prompt + c for prompt, c in texts])
            self._scores[policy] = (sum(gold) / len(gold), sum(rm) / len(rm))
        return self._scores[policy]

    def gold(self, policy: Path) -> float:
        return self.scores(policy)[0]

    def gain(self, policy: Path) -> float:
        return self.gold(policy) - self.gold(Path(self.models.policy))

    def rm_gain(self, policy: Path) -> float:
        return self.scores(policy)[1] - self.scores(Path(self.models.policy))[1]

    def kl(self, policy: Path) -> dict:
        from services.demo import EVAL_SAMPLES

        if policy not in self._kl:
            m = self.models
            self._kl[policy] = sample_kl(Path(m.policy), policy, m.eval_prompts, EVAL_SAMPLES, m.max_new_tokens,
                                         KL_SAMPLE_SEED)
        return self._kl[policy]


def judge(judge_: Judge, run: Run) -> None:
    """The final policy's gold gain, KL and words, and the KL along the run."""
    gain = judge_.gain(run.final_dir)
    kl = judge_.kl(run.final_dir)
    run.eval = {"gold_gain": gain, "rm_gain": judge_.rm_gain(run.final_dir), "kl": kl["kl"], "words": kl["words"],
                "gold_per_nat": gain / kl["kl"] if kl["kl"] > 0 else math.nan,
                "gold_per_s": gain / run.seconds if run.seconds else math.nan,
                "kl_curve": [(at, judge_.kl(d)["kl"]) for at, d in run.curve] + [(run.seconds, kl["kl"])]}


def at_matched_kl(judge_: Judge, run: Run, level: float) -> None:
    """Where ``run`` first reaches KL ``level`` (nats/sample): the time and
    gold gain there, interpolated linearly between the two sampled policies
    that bracket the crossing (KL 0 and gain 0 at time 0), and gold gain per
    wall-second at that point."""
    points = [(0.0, 0.0, None)] + [(at, judge_.kl(d)["kl"], d) for at, d in run.curve] + \
             [(run.seconds, run.eval["kl"], run.final_dir)]
    index = next((i for i, (_, kl, _) in enumerate(points) if i and kl >= level), len(points) - 1)
    (t0, kl0, d0), (t1, kl1, d1) = points[index - 1], points[index]
    f = 1.0 if kl1 <= kl0 else min(max((level - kl0) / (kl1 - kl0), 0.0), 1.0)
    g0 = 0.0 if d0 is None else judge_.gain(d0)
    g1 = judge_.gain(d1)
    at, gain = t0 + f * (t1 - t0), g0 + f * (g1 - g0)
    run.eval.update({"kl_level": level, "seconds_at_level": at, "gold_at_level": gain,
                     "gold_per_s_at_level": gain / at if at > 0 else math.nan})


# -- the table ----------------------------------------------------------------------

COLUMNS = (("rollouts/s", lambda r: r.rollouts_per_s), ("updates/s", lambda r: r.updates_per_s),
           ("gold gain", lambda r: r.eval["gold_gain"]), ("final KL (nats/sample)", lambda r: r.eval["kl"]),
           ("gold/nat KL", lambda r: r.eval["gold_per_nat"]), ("gold/wall-s", lambda r: r.eval["gold_per_s"]),
           ("matched KL", lambda r: r.eval["kl_level"]), ("s to matched KL", lambda r: r.eval["seconds_at_level"]),
           ("gold gain @ matched KL", lambda r: r.eval["gold_at_level"]),
           ("gold/wall-s @ matched KL", lambda r: r.eval["gold_per_s_at_level"]),
           ("RM reward gain (raw)", lambda r: r.eval["rm_gain"]), ("words/sample", lambda r: r.eval["words"]))
# Ratios Arbiter/TRL of these are meaningless (the same level by construction).
NO_RATIO = ("matched KL",)


def fmt(value: float) -> str:
    if not isinstance(value, float):
        return str(value)
    return "nan" if math.isnan(value) else f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def spread(values: list[float]) -> str:
    """mean ± half the range (the runs' min and max), or the one value."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "nan"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return fmt(mean)
    return f"{fmt(mean)} ± {fmt((max(values) - min(values)) / 2)}"


def table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """One row per contender over its repeats; ratio rows are the mean of the
    ratios within each repeat (contenders of one repeat ran back to back)."""
    header = ["", "runs", "rollouts", "updates", "seconds", *(name for name, _ in COLUMNS), "notes"]
    names = [n for n in CONTENDERS if any(r.name == n for r in runs)]
    rows = []
    for name in names:
        mine = [r for r in runs if r.name == name]
        notes = "; ".join(dict.fromkeys(r.notes for r in mine))
        rows.append([name, str(len(mine)), spread([float(r.rollouts) for r in mine]),
                     spread([float(r.updates) for r in mine]), spread([r.seconds for r in mine]),
                     *(spread([get(r) for r in mine]) for _, get in COLUMNS), notes])
    for name, baseline in RATIOS:
        base = {r.repeat: r for r in runs if r.name == baseline}
        pairs = [(r, base[r.repeat]) for r in runs if r.name == name and r.repeat in base]
        if not pairs:
            continue
        ratios = []
        for column, get in COLUMNS:
            values = [get(ours) / get(theirs) if get(theirs) and not math.isnan(get(theirs)) else math.nan
                      for ours, theirs in pairs]
            ratios.append("" if column in NO_RATIO else spread(values))
        rows.append([f"{name} / {baseline}", str(len(pairs)), "", "", "", *ratios, "ratio, per repeat"])
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def method(seconds: float, repeats: int, snapshots: int) -> str:
    """How the table was measured, printed above it."""
    return (
        f"{repeats} interleaved repeat(s) ({', '.join(CONTENDERS)}, {CONTENDERS[0]}, ...); each cell is the mean "
        f"± half the range over the repeats, ratios are the mean ± half-range of the per-repeat ratios. Gold and KL on "
        f"the held-out prompts, the same judge for all. Matched KL: the policy is kept at {snapshots} evenly spaced "
        f"times of the {seconds:g} s budget (the last at the end); in each repeat the level is the lowest final KL "
        f"among the contenders, each contender's gold gain and time where its KL first reaches that level are "
        f"interpolated linearly between the two kept policies around the crossing, and gold/wall-s @ matched KL is "
        f"that gain over that time.")


def report(runs: list[Run], models, args, seconds: float, samples_per_prompt: int, workdir: Path) -> dict:
    """The table (stdout, WORKDIR/e2e.md) and the details (WORKDIR/e2e.json)."""
    header, rows = table(runs)
    shared = training(models, args.beta)
    title = (f"End to end, {seconds:g} s of training each: {models.max_new_tokens} new tokens, group "
             f"{samples_per_prompt}, batch {shared['batch_size']}/{shared['minibatch_size']} x {shared['epochs']} "
             f"epochs, lr {shared['learning_rate']:g}, {training_title(args)}; {len(os.sched_getaffinity(0))} cores")
    how = method(seconds, args.repeats, args.snapshots)
    print_table(title, header, rows)
    console.print(how)
    (workdir / "e2e.md").write_text(f"{title}\n\n{how}\n\n" + markdown(header, rows))
    summary = {"title": title, "method": how, "runs": [
        {**{k: v for k, v in dataclasses.asdict(r).items() if k not in ("final_dir", "curve")},
         "final_dir": str(r.final_dir), "curve": [(at, str(d)) for at, d in r.curve],
         "rollouts_per_s": r.rollouts_per_s, "updates_per_s": r.updates_per_s} for r in runs]}
    (workdir / "e2e.json").write_text(json.dumps(summary, indent=2, default=str))
    console.print(f"table: {workdir / 'e2e.md'}  details: {workdir / 'e2e.json'}")
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="make bench-e2e", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, help="wall-clock training budget of each contender (default 60; "
                                                      "--quick: 10)")
    parser.add_argument("--quick", action="store_true", help="the demo's quick models and a 10 s budget: a smoke run")
    parser.add_argument("--only", choices=CONTENDERS, action="append", help="run only this contender (repeatable)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each contender, interleaved (trl-grpo, trl-ppo, grpo, ppo, trl-grpo, ...); "
                             "default 1")
    parser.add_argument("--snapshots", type=int, default=6,
                        help="policies kept per run for KL over time (matched KL), the final included; default 6")
    parser.add_argument("--fresh-models", action="store_true",
                        help="prepare the models anew even if the workdir has them (pairs labelled, RM trained)")
    parser.add_argument("--beta", type=float, default=0.05, help="KL coefficient of every contender (fixed)")
    parser.add_argument("--workdir", default=str(REPO / "runs" / "bench-e2e"))
    parser.add_argument("--trl-venv", default=str(TRL_VENV), help="TRL GRPO's own environment (created if missing)")
    parser.add_argument("--trl-ppo-venv", default=str(TRL_PPO_VENV),
                        help=f"TRL PPO's own environment ({TRL_PPO_SPEC}; created if missing)")
    # One torch thread by default: on the 2-core machine, under other load, TRL
    # with 1 thread ran 112 optimizer steps in 16 s where 2 threads ran 8 in
    # 19 s (OpenMP threads waiting on each other for a preempted peer).
    parser.add_argument("--trl-threads", type=int, default=1, help="TRL's torch threads (default 1)")
    # The demo's bound (1) by default: on the quiet 2-core machine GRPO ran
    # at 93 rollouts/s with 1 and 84 with 2 (a loaded A/B had pointed the
    # other way); the collapse to short completions happened with both.
    parser.add_argument("--max-staleness", type=int, default=None,
                        help="the Arbiter trainer's ppo.max_staleness (policy versions a rollout may lag; the "
                             "workers follow it); default: the demo's, 1")
    add_training_flags(parser, E2E_LEARNING_RATE)
    parser.add_argument("--arbiter-worker", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the Arbiter stack's worker config (repeatable), e.g. "
                             "max_staleness=2")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: must be >= 1")
    if args.snapshots < 1:
        parser.error(f"--snapshots {args.snapshots}: must be >= 1 (1: the final policy only)")
    worker_overrides = {}
    for item in args.arbiter_worker:
        key, eq, value = item.partition("=")
        if not eq or not key:
            parser.error(f"--arbiter-worker {item!r}: expected KEY=VALUE")
        worker_overrides[key] = yaml.safe_load(value)
    seconds = args.seconds or (10.0 if args.quick else 60.0)
    workdir = Path(args.workdir).resolve()
    models = prepared_models(workdir / ("models-quick" if args.quick else "models"), args.quick, args.fresh_models)
    models = with_learning_rate(models, args.learning_rate)
    console.print(models.description)
    from services.demo import stack_config

    samples_per_prompt = stack_config(models, workdir, 1).worker["samples_per_prompt"]
    judge_ = Judge(models)
    runs: list[Run] = []
    for repeat in range(args.repeats):
        here = workdir / f"r{repeat}" if args.repeats > 1 else workdir
        this_repeat = []
        for name in [n for n in CONTENDERS if n in (args.only or CONTENDERS)]:
            if name.startswith("trl-"):
                algo = name.split("-", 1)[1]
                run = run_trl(algo, models, here, seconds, args.beta,
                              Path(args.trl_venv if algo == "grpo" else args.trl_ppo_venv), samples_per_prompt,
                              args.trl_threads, args.snapshots)
            else:
                run = run_arbiter(name.split("-", 1)[1], models, here, seconds, args.beta, worker_overrides,
                                  args.snapshots, args.max_staleness, ppo_overrides=dict(args.ppo_set),
                                  kl_penalty=args.kl_penalty, kl_target=args.kl_target)
            run.repeat = repeat
            judge(judge_, run)
            this_repeat.append(run)
            console.print(f"{name} (repeat {repeat + 1}/{args.repeats}): {run.rollouts} rollouts, {run.updates} "
                          f"updates in {run.seconds:.1f}s; gold {run.eval['gold_gain']:+.3f}, KL {run.eval['kl']:.2f}")
        level = min(r.eval["kl"] for r in this_repeat)
        for run in this_repeat:
            at_matched_kl(judge_, run, level)
        runs += this_repeat
        if repeat + 1 < args.repeats:  # so far, in case the rest does not finish
            report(runs, models, args, seconds, samples_per_prompt, workdir)
    return report(runs, models, args, seconds, samples_per_prompt, workdir)


if __name__ == "__main__":
    main()
