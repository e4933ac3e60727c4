"""``make bench-learning``: Arbiter's RL algorithms on the demo task, side by
side with TRL, from the same pretrained policy and reward model, for the same
wall-clock budget, over the same seeds (issue #15, items 4-5).

Contenders (``--only`` picks some; each runs once per seed, interleaved: seed
0's contenders, then seed 1's, ...):

- ``arbiter-{ppo,rloo,grpo,a2c,nlpo}``: ``arbiter up``'s stack, exactly as
  ``make bench-e2e`` runs it (``bench.e2e.run_arbiter``: the demo's stack
  config, β fixed, the clock from the trainer's group join), the trainer's
  ``ppo`` section set per algorithm (``ALGORITHMS``): GAE with a value head;
  RLOO and GRPO baselines over the worker's group of 4; A2C (one epoch, GAE,
  entropy bonus 0.01); NLPO (PPO under the top-p 0.9 nucleus of a masking
  policy synced every 5 updates, the workers sampling with ``nlpo_top_p``).
  The seed is the stack's (``StackConfig.seed``: sampling, prompt order,
  training).
- ``arbiter-ilql``: offline ILQL, its whole pipeline inside the budget: the
  clock starts, the pretrained policy samples the worker's group of 4 per
  training prompt (temperature 1) and the reward model scores them (in this
  process, the same Hugging Face classes the services load), the RM scores
  put on the trainer's scale with the statistics the RM version ships
  (``arbiter.json`` normalization), for the first ``--ilql-data-fraction`` of
  the budget; the JSONL goes to ``trainer.ilql.train`` (what ``arbiter train
  ilql`` runs), which trains epochs until the first epoch boundary past the
  budget (as TRL stops at a batch boundary); the judged policy is the last
  epoch's checkpoint (an HF directory plus ``ilql_heads.safetensors``),
  sampled with the heads at ``--ilql-beta`` (default 1: logits + 1·(min Q̂ −
  V), what ``arbiter serve policy --ilql-beta 1`` samples). Its seconds are
  the wall time it really took (it may pass the budget by up to one epoch).
- ``trl-grpo`` and ``trl-ppo``: TRL's trainers in their own environments
  (``bench.e2e.run_trl``; ``.venv-trl``, ``.venv-trl-ppo``), the seed passed
  to TRL's config.

The judge (``LearningJudge``), the same code for every contender and the
initial policy: ``--eval-samples`` completions per held-out prompt, sampled
from the policy at temperature 1 with one seeded generator (an ILQL policy
through its heads: the distribution it would serve), token by token, and
for each sample: the gold score (the demo's VADER gold scorer on the
completion, as ``services.demo.evaluate_gold``), the RM reward (the raw
score of prompt + completion, the proxy the policy was trained on), the KL
to the reference (Σ_t log π(y_t) − log π_ref(y_t), nats per sample, π the
sampling distribution), and the reference log-likelihood of each completion
token. Gold gain = mean gold − the initial policy's; fluency = the mean
reference log-likelihood per token, pooled over every token of every sample
(higher = more like the pretrained model's text).

Per contender: mean ± sample sd over the seeds of each metric; gold gain per
wall-second (gain / the seconds trained). Arbiter's best algorithm is the
``arbiter-*`` contender with the highest mean gold gain per wall-second (ties:
lower mean KL); item 5's line sets it beside ``trl-grpo`` and ``trl-ppo``:
gold gain per wall-second and final KL, and whether Arbiter's gold gain at
equal wall time is ≥ TRL's, compared per wall-second since every run stops
at the first update boundary past the budget (if not, where the time goes:
updates and rollouts per second, start-up). Outputs: WORKDIR/learning.md (the table),
learning.json (every run), learning.csv, learning.png (the bars with sd).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import time
from pathlib import Path

from bench.common import console, print_table
from bench.e2e import (REPO, TRL_PPO_VENV, TRL_VENV, Run, add_training_flags, fmt, load_reward_model, markdown,
                       prepared_models, reward_scores, run_arbiter, run_trl, training, training_title,
                       with_learning_rate)

CONTENDERS = ("arbiter-ppo", "arbiter-rloo", "arbiter-grpo", "arbiter-a2c", "arbiter-nlpo", "arbiter-ilql",
              "trl-grpo", "trl-ppo")
TRL = ("trl-grpo", "trl-ppo")
NLPO_TOP_P = 0.9


def algorithms(group: int) -> dict[str, tuple[dict, dict]]:
    """Each stack algorithm: (trainer ``ppo`` keys over the demo's, worker keys)."""
    return {
        "ppo": ({}, {}),
        "rloo": ({"advantage": "rloo", "samples_per_prompt": group}, {}),
        "grpo": ({"advantage": "grpo", "samples_per_prompt": group}, {}),
        "a2c": ({"algorithm": "a2c", "epochs": 1, "advantage": "gae", "ent_coef": 0.01}, {}),
        "nlpo": ({"nlpo": {"top_p": NLPO_TOP_P, "mask_update_every": 5}}, {"nlpo_top_p": NLPO_TOP_P}),
    }


# -- the numbers (pure: tests/test_bench_learning.py) -------------------------------

METRICS = ("gold_gain", "rm_reward", "kl", "fluency", "gold_per_s", "updates", "words")


def mean_sd(values: list[float]) -> tuple[float, float, int]:
    """(mean, sample standard deviation (n − 1), n) of the finite values;
    sd is nan below two values, both nan with none."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return math.nan, math.nan, 0
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return mean, math.nan, 1
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)), len(xs)


def fluency(ref_logps: list[list[float]]) -> float:
    """Mean reference log-likelihood per token, pooled over every token of
    every sample (a long sample weighs by its length; an empty one adds nothing)."""
    tokens = [lp for sample in ref_logps for lp in sample]
    return sum(tokens) / len(tokens) if tokens else math.nan


def summarize(results: list[dict]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """Per contender (in first-seen order), each metric as mean_sd over its runs."""
    names = list(dict.fromkeys(r["contender"] for r in results))
    return {name: {m: mean_sd([r.get(m, math.nan) for r in results if r["contender"] == name]) for m in METRICS}
            for name in names}


def best_arbiter(summary: dict[str, dict[str, tuple[float, float, int]]]) -> str | None:
    """The arbiter-* contender with the highest mean gold gain per wall-second
    (ties: the lower mean KL); None when none has a finite one."""
    mine = [(name, s) for name, s in summary.items()
            if name.startswith("arbiter-") and math.isfinite(s["gold_per_s"][0])]
    if not mine:
        return None
    return max(mine, key=lambda item: (item[1]["gold_per_s"][0], -item[1]["kl"][0]))[0]


def cell(stat: tuple[float, float, int]) -> str:
    mean, sd, _ = stat
    if math.isnan(mean):
        return "nan"
    return fmt(mean) if math.isnan(sd) else f"{fmt(mean)} ± {fmt(sd)}"


# -- the judge ----------------------------------------------------------------------


class LearningJudge:
    """Gold, RM reward, KL to the reference and fluency of a policy directory
    on the held-out prompts, one sampling pass, cached per directory."""

    def __init__(self, models, prompts: list[str], samples: int, ilql_beta: float, seed: int = 7,
                 prompts_per_batch: int = 32):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from arbiter.hf import quiet_transformers
        from services.worker.gold import make_gold_scorer

        quiet_transformers()
        self.models, self.prompts, self.samples, self.ilql_beta = models, prompts, samples, ilql_beta
        self.seed, self.prompts_per_batch = seed, prompts_per_batch
        self.gold_scorer = make_gold_scorer(models.gold)
        self.tokenizer = AutoTokenizer.from_pretrained(str(models.policy))
        self.tokenizer.padding_side = "left"
        self.reference = AutoModelForCausalLM.from_pretrained(str(models.policy)).eval()
        self.rm = load_reward_model(Path(models.reward))
        self._cache: dict[str, dict] = {}
        self._torch = torch

    def load(self, policy: Path):
        """The model the policy would be sampled with: its heads at β when it ships them."""
        from transformers import AutoModelForCausalLM

        from arbiter.ilql import has_heads, with_heads

        lm = AutoModelForCausalLM.from_pretrained(str(policy)).eval()
        return with_heads(lm, policy, self.ilql_beta) if has_heads(policy) else lm

    def measure(self, policy: Path) -> dict:
        key = str(Path(policy).resolve())
        if key in self._cache:
            return self._cache[key]
        torch = self._torch
        from trainer.ppo_math import token_logprobs

        model, tok, n = self.load(Path(policy)), self.tokenizer, self.samples
        eos, pad = tok.eos_token_id, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        generator = torch.Generator().manual_seed(self.seed)
        kls, ref_logps, golds, texts, prompts_of = [], [], [], [], []
        with torch.no_grad():
            for start in range(0, len(self.prompts), self.prompts_per_batch):
                chunk = self.prompts[start : start + self.prompts_per_batch]
                enc = tok(chunk, return_tensors="pt", padding=True)
                ids = enc["input_ids"].repeat_interleave(n, dim=0)
                attention = enc["attention_mask"].repeat_interleave(n, dim=0)
                width = ids.shape[1]
                alive = torch.ones(ids.shape[0], dtype=torch.bool)
                logps, masks = [], []
                # Token by token, full forward each step: the same loop for an
                # ILQL sampler (whose logits are the perturbed ones) as for a
                # plain LM; 12 tokens of a small model.
                for _ in range(self.models.max_new_tokens):
                    positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
                    logits = model(input_ids=ids, attention_mask=attention, position_ids=positions,
                                   use_cache=False).logits[:, -1].float()
                    logp = torch.log_softmax(logits, dim=-1)
                    nxt = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)
                    nxt = torch.where(alive, nxt, torch.full_like(nxt, pad))
                    logps.append(logp.gather(1, nxt[:, None]).squeeze(1))
                    masks.append(alive.clone())
                    ids = torch.cat([ids, nxt[:, None]], dim=1)
                    attention = torch.cat([attention, alive[:, None].long()], dim=1)
                    alive = alive & (nxt != eos)
                    if not alive.any():
                        break
                completion, mask = ids[:, width:], torch.stack(masks, dim=1)
                sampled = torch.stack(logps, dim=1)
                positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
                ref = token_logprobs(self.reference(ids, attention_mask=attention, position_ids=positions).logits
                                     [:, width - 1 : -1].float(), completion)
                kls += ((sampled - ref) * mask).sum(dim=1).tolist()
                ref_logps += [r[m].tolist() for r, m in zip(ref, mask)]
                for row, (c, m) in enumerate(zip(completion, mask)):
                    text = tok.decode(c[m], skip_special_tokens=True)
                    texts.append(text)
                    prompts_of.append(chunk[row // n])
                    golds.append(self.gold_scorer(text))
        rewards = reward_scores(self.rm, [p + t for p, t in zip(prompts_of, texts)])
        result = {"gold": sum(golds) / len(golds), "rm_reward": sum(rewards) / len(rewards),
                  "kl": sum(kls) / len(kls), "fluency": fluency(ref_logps),
                  "words": sum(len(t.split()) for t in texts) / len(texts)}
        self._cache[key] = result
        return result


# -- ILQL, its data inside the budget -------------------------------------------------


class _BudgetSpent(Exception):
    pass


def run_ilql(models, workdir: Path, seconds: float, seed: int, group: int, learning_rate: float,
             data_fraction: float, threads: int) -> Run:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.trl_runner import read_prompts
    from trainer.ilql import CHECKPOINTS, latest_checkpoint, train
    from trainer.ilql_config import ilql_config_from_dict

    out = workdir / "arbiter-ilql"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    meta = Path(models.reward) / "arbiter.json"
    stats = json.loads(meta.read_text()).get("normalization") if meta.exists() else None
    mean, std = (stats["mean"], stats["std"]) if stats else (0.0, 1.0)
    prompts = read_prompts(str(models.prompts))
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t0 = time.monotonic()
        torch.manual_seed(seed)
        tokenizer = AutoTokenizer.from_pretrained(str(models.policy))
        tokenizer.padding_side = "left"
        policy = AutoModelForCausalLM.from_pretrained(str(models.policy)).eval()
        rm = load_reward_model(Path(models.reward))
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed)).tolist()
        rows, empty, data_deadline = [], 0, t0 + seconds * data_fraction
        with torch.no_grad():
            for start in range(0, len(order), 8):
                if rows and time.monotonic() >= data_deadline:
                    break
                chunk = [prompts[i] for i in order[start : start + 8]]
                enc = tokenizer(chunk, return_tensors="pt", padding=True)
                generated = policy.generate(**enc, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                                            max_new_tokens=models.max_new_tokens, num_return_sequences=group,
                                            pad_token_id=tokenizer.pad_token_id)
                width = enc["input_ids"].shape[1]
                texts = [tokenizer.decode(g[width:], skip_special_tokens=True) for g in generated]
                # Cut at max_new_tokens without an end token: the trainer must not append one.
                truncated = [tokenizer.eos_token_id not in g[width:].tolist() for g in generated]
                full = [chunk[i // group] + t for i, t in enumerate(texts)]
                scores = reward_scores(rm, full)
                # A completion that is the end token alone has no text a JSONL
                # row can carry (the trainer refuses an empty one): left out, counted.
                rows += [{"prompt": chunk[i // group], "completion": t, "reward": (s - mean) / std,
                          "truncated": cut}
                         for i, (t, s, cut) in enumerate(zip(texts, scores, truncated)) if t]
                empty += sum(1 for t in texts if not t)
        data = out / "data.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        data_seconds = time.monotonic() - t0
        del policy, rm
        config = ilql_config_from_dict({
            "model_dir": str(models.policy), "output_dir": str(out / "ilql"), "version": f"ilql-seed{seed}",
            "epochs": 1_000_000, "batch_size": 8, "learning_rate": learning_rate, "seed": seed,
            "torch_threads": threads, "keep_checkpoints": 1, "data": {"jsonl": str(data)}})
        epochs = []

        def on_epoch(report) -> None:
            epochs.append(report)
            if time.monotonic() >= t0 + seconds:
                raise _BudgetSpent

        try:
            train(config, on_epoch=on_epoch)
        except _BudgetSpent:
            pass
        elapsed = time.monotonic() - t0
    finally:
        torch.set_num_threads(previous_threads)
    final = latest_checkpoint(out / "ilql" / CHECKPOINTS)
    steps = epochs[-1].step if epochs else 0
    return Run("arbiter-ilql", elapsed, len(rows), steps, final, 0.0,
               notes=f"{len(rows)} samples ({empty} empty ones left out) in {data_seconds:.1f}s, then {len(epochs)} epochs ({steps} steps of 8); "
                     f"rollouts = offline samples, updates = optimizer steps")


# -- the run ---------------------------------------------------------------------------


def record(run: Run, seed: int, judged: dict, initial: dict) -> dict:
    gain = judged["gold"] - initial["gold"]
    return {"contender": run.name, "seed": seed, "seconds": run.seconds, "rollouts": run.rollouts,
            "updates": float(run.updates), "setup_seconds": run.setup_seconds, "final_dir": str(run.final_dir),
            "notes": run.notes, "gold_gain": gain, "rm_reward": judged["rm_reward"],
            "rm_gain": judged["rm_reward"] - initial["rm_reward"], "kl": judged["kl"], "fluency": judged["fluency"],
            "words": judged["words"], "gold_per_s": gain / run.seconds if run.seconds else math.nan,
            "rollouts_per_s": run.rollouts / run.seconds if run.seconds else math.nan,
            "updates_per_s": run.updates / run.seconds if run.seconds else math.nan}


COLUMNS = (("gold gain", "gold_gain"), ("RM reward", "rm_reward"), ("KL (nats/sample)", "kl"),
           ("fluency (ref nats/token)", "fluency"), ("gold/wall-s", "gold_per_s"), ("updates", "updates"),
           ("words/sample", "words"))


def table(summary: dict, initial: dict) -> tuple[list[str], list[list[str]]]:
    header = ["", "seeds", *(name for name, _ in COLUMNS)]
    rows = [["initial policy", "", "0", fmt(initial["rm_reward"]), "0", fmt(initial["fluency"]), "", "",
             fmt(initial["words"])]]
    for name, stats in summary.items():
        rows.append([name, str(stats["gold_gain"][2]), *(cell(stats[key]) for _, key in COLUMNS)])
    return header, rows


def versus_trl(summary: dict, results: list[dict]) -> str:
    """Item 5: gold gain per wall-second and final KL, TRL beside Arbiter's best."""
    best = best_arbiter(summary)
    lines = []
    for name in [best, *TRL]:
        if name in summary:
            s = summary[name]
            lines.append(f"- {name}{' (Arbiter best)' if name == best else ''}: gold/wall-s {cell(s['gold_per_s'])}, "
                         f"gold gain {cell(s['gold_gain'])}, final KL {cell(s['kl'])} nats/sample")
    if best is None:
        return "\n".join(lines + ["- no Arbiter contender finished: no comparison"])
    # Per wall-second: each run stops at the first update boundary past the
    # budget, so their seconds differ slightly; the rate is the equal-time measure.
    ours = summary[best]["gold_per_s"][0]
    for name in TRL:
        if name not in summary:
            continue
        theirs = summary[name]["gold_per_s"][0]
        if ours >= theirs:
            lines.append(f"- target met against {name}: {best}'s gold gain per wall-second {fmt(ours)} ≥ "
                         f"{fmt(theirs)}")
            continue
        rate, upd, setup = ({n: mean_sd([r.get(key, math.nan) for r in results if r["contender"] == n])[0]
                             for n in (best, name)} for key in ("rollouts_per_s", "updates_per_s", "setup_seconds"))
        lines.append(f"- target NOT met against {name}: {best}'s gold gain per wall-second {fmt(ours)} < {fmt(theirs)}. "
                     f"Where the time goes: "
                     f"{best} {fmt(rate[best])} rollouts/s, {fmt(upd[best])} updates/s; {name} {fmt(rate[name])} "
                     f"rollouts/s, {fmt(upd[name])} updates/s; start-up before the clock {fmt(setup[best])} s vs "
                     f"{fmt(setup[name])} s (not counted in either)"
                     + ("; Arbiter ran at least as many updates a second: the gap is what an update buys, not "
                        "time" if upd[best] >= upd[name] else ""))
    return "\n".join(lines)


def plot(summary: dict, initial: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = list(summary)
    panels = [(label, key) for label, key in COLUMNS if key in ("gold_gain", "rm_reward", "kl", "fluency")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2))
    for ax, (label, key) in zip(axes, panels):
        means = [summary[n][key][0] for n in names]
        sds = [0.0 if math.isnan(summary[n][key][1]) else summary[n][key][1] for n in names]
        ax.bar(range(len(names)), means, yerr=sds, capsize=3,
               color=["tab:blue" if n.startswith("arbiter-") else "tab:orange" for n in names])
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
        if key in initial:  # where the pretrained policy stands
            ax.axhline(initial[key], color="grey", linestyle="--", linewidth=1)
        ax.set_title(label, fontsize=10)
    fig.suptitle("mean ± sd over seeds (blue: Arbiter, orange: TRL; dashed: the initial policy)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(results: list[dict], initial: dict, title: str, how: str, workdir: Path) -> dict:
    summary = summarize(results)
    header, rows = table(summary, initial)
    print_table(title, header, rows)
    item5 = versus_trl(summary, results)
    console.print(how)
    console.print(item5)
    (workdir / "learning.md").write_text(f"{title}\n\n{how}\n\n{markdown(header, rows)}\n"
                                         f"TRL beside Arbiter's best (gold gain per wall-second, final KL):\n\n{item5}\n")
    (workdir / "learning.json").write_text(json.dumps(
        {"title": title, "method": how, "initial": initial, "runs": results, "best_arbiter": best_arbiter(summary),
         "summary": {n: {m: {"mean": s[0], "sd": s[1], "n": s[2]} for m, s in st.items()}
                     for n, st in summary.items()}}, indent=2, default=str))
    with (workdir / "learning.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["contender", "metric", "mean", "sd", "n"])
        writer.writeheader()
        for name, stats in summary.items():
            for metric, (mean, sd, n) in stats.items():
                writer.writerow({"contender": name, "metric": metric, "mean": mean, "sd": sd, "n": n})
    png = plot(summary, initial, workdir / "learning.png")
    console.print(f"table: {workdir / 'learning.md'}  runs: {workdir / 'learning.json'}  csv: {workdir / 'learning.csv'}"
                  f"  plot: {png or 'none (matplotlib missing)'}")
    return {"summary": summary, "runs": results}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="make bench-learning", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, help="wall-clock budget of each run (default 60; --quick: 15)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per contender (default 3)")
    parser.add_argument("--only", choices=CONTENDERS, action="append", help="run only this contender (repeatable)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 15 s budgets, 32 held-out prompts x 2 samples judged (same models)")
    parser.add_argument("--eval-samples", type=int, help="judged samples per held-out prompt (default 4; --quick 2)")
    parser.add_argument("--beta", type=float, default=0.05, help="KL coefficient of every RL contender (fixed)")
    add_training_flags(parser)
    parser.add_argument("--ilql-beta", type=float, default=1.0,
                        help="ILQL's sampling β: logits + β·(min Q̂ − V) (default 1)")
    parser.add_argument("--ilql-learning-rate", type=float,
                        help="ILQL's learning rate (default: the RL contenders' learning rate)")
    parser.add_argument("--ilql-data-fraction", type=float, default=0.4,
                        help="share of ILQL's budget spent sampling and scoring its offline data (default 0.4)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of TRL and of in-process ILQL (default 1, as bench-e2e's TRL)")
    parser.add_argument("--max-staleness", type=int, default=None, help="the Arbiter trainer's ppo.max_staleness (default: the demo's, 1)")
    parser.add_argument("--fresh-models", action="store_true", help="prepare the models anew")
    parser.add_argument("--models", help="the prepared models' directory (default WORKDIR/models; e.g. "
                                         "runs/bench-e2e/models reuses bench-e2e's, prepared once)")
    parser.add_argument("--workdir", default=str(REPO / "runs" / "bench-learning"))
    parser.add_argument("--trl-venv", default=str(TRL_VENV))
    parser.add_argument("--trl-ppo-venv", default=str(TRL_PPO_VENV))
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: must be >= 1")
    if not 0 < args.ilql_data_fraction < 1:
        parser.error(f"--ilql-data-fraction {args.ilql_data_fraction}: must be in (0, 1)")
    seconds = args.seconds or (15.0 if args.quick else 60.0)
    samples = args.eval_samples or (2 if args.quick else 4)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    # The full models even with --quick: the smoke run exercises what the real one does.
    models = prepared_models(Path(args.models).resolve() if args.models else workdir / "models", False,
                             args.fresh_models)
    models = with_learning_rate(models, args.learning_rate)
    console.print(models.description)
    from services.demo import stack_config

    group = stack_config(models, workdir, 1).worker["samples_per_prompt"]
    shared = training(models, args.beta)
    prompts = models.eval_prompts[:32] if args.quick else models.eval_prompts
    judge = LearningJudge(models, prompts, samples, args.ilql_beta)
    initial = judge.measure(Path(models.policy))
    names = [n for n in CONTENDERS if n in (args.only or CONTENDERS)]
    title = (f"Learning, {seconds:g} s each, seeds 0..{args.seeds - 1}: {models.max_new_tokens} new tokens, group "
             f"{group}, batch {shared['batch_size']}/{shared['minibatch_size']} x {shared['epochs']} epochs, lr "
             f"{shared['learning_rate']:g}, {training_title(args)}; {len(os.sched_getaffinity(0))} cores")
    how = (f"Each cell: mean ± sample sd over the seeds. Judged on {len(prompts)} held-out prompts x {samples} samples "
           f"(one seeded sampler, temperature 1; ILQL through its heads at β {args.ilql_beta:g}): gold gain (VADER "
           f"over the initial policy), RM reward (raw score), KL to the reference (nats/sample), fluency (reference "
           f"log-likelihood per token). Initial policy: gold {initial['gold']:.3f}.")
    stack_algos = algorithms(group)
    results: list[dict] = []
    for seed in range(args.seeds):
        here = workdir / f"seed{seed}"
        for name in names:
            kind, algo = name.split("-", 1)
            try:
                if kind == "trl":
                    run = run_trl(algo, models, here, seconds, args.beta,
                                  Path(args.trl_venv if algo == "grpo" else args.trl_ppo_venv), group, args.threads,
                                  seed=seed)
                elif algo == "ilql":
                    run = run_ilql(models, here, seconds, seed, group, args.ilql_learning_rate or shared["learning_rate"],
                                   args.ilql_data_fraction, args.threads)
                else:
                    ppo, worker = stack_algos[algo]
                    run = run_arbiter(algo, models, here, seconds, args.beta, worker, max_staleness=args.max_staleness,
                                      ppo_overrides={**ppo, **dict(args.ppo_set)}, seed=seed,
                                      kl_penalty=args.kl_penalty, kl_target=args.kl_target)
                row = record(run, seed, judge.measure(run.final_dir), initial)
            except Exception as err:  # one broken contender must not lose the others' runs
                console.print(f"[red]{name} seed {seed} failed: {err}[/red]")
                row = {"contender": name, "seed": seed, "notes": f"failed: {err}"[:500]}
            results.append(row)
            if "gold_gain" in row:
                console.print(f"{name} seed {seed}: {row['updates']:.0f} updates in {row['seconds']:.1f}s; gold "
                              f"{row['gold_gain']:+.3f}, RM {row['rm_reward']:.2f}, KL {row['kl']:.2f}, fluency "
                              f"{row['fluency']:.2f}")
        if seed + 1 < args.seeds:  # so far, in case the rest does not finish
            report(results, initial, title, how, workdir)
    return report(results, initial, title, how, workdir)


if __name__ == "__main__":
    main()
