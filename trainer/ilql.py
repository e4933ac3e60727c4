"""Offline ILQL (Snell et al. 2022): ``arbiter train ilql --config FILE``.

Trains the policy and its value heads (``arbiter.ilql``: Q₁, Q₂, their Polyak
targets, V) from a fixed set of scored samples, never calling a reward
service: a JSONL file of ``{prompt, completion, reward}`` rows, or a replay of
the rollouts topic from its beginning (rollouts carry the token ids and the
reward). Epochs over the data, AdamW, a target update every
``ilql.target_update_every`` steps, a checkpoint per epoch (a restarted run
resumes after the last one), and at the end ``output_dir/policy``: a Hugging
Face directory of the policy (any HF loader loads it) with the heads in
``ilql_heads.safetensors`` beside it. Serve it with ``arbiter serve policy
--ilql-beta B`` to sample with ``logits + β·(min Q̂ − V)``.

A record without what ILQL needs stops the run, naming it: ``FILE:LINE:
field: message`` for JSONL, ``topic[partition]@offset`` for a rollout.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from arbiter.config import ConfigError
from arbiter.hf import check_checkpoint_dir, load_tokenizer, model_max_tokens, quiet_transformers, write_metadata
from arbiter.ilql import ILQLHeads, has_heads, head_sizes, load_heads, save_heads
from arbiter.jsonl import JsonlError, read_jsonl
from trainer.batch import Trajectory, collate, gather_positions
from trainer.checkpoint import _fsync_tree
from trainer.ilql_config import ILQLConfig, load_ilql_config
from trainer.ilql_math import ILQLLoss, ilql_loss, polyak_update, terminal_rewards

log = logging.getLogger("arbiter.trainer.ilql")

CHECKPOINTS = "checkpoints"
LATEST = "LATEST"
STATE = "state.json"
OPTIMIZER = "optimizer.pt"


class ILQLDataError(ValueError):
    """A record ILQL cannot train on; the message starts with where it is."""


# ----------------------------------------------------------------------------
# Data


def _sample(prompt_ids, completion_ids, reward: float, where: str, topic: str = "", partition: int = 0,
            offset: int = 0) -> Trajectory:
    # collate() wants per-token log-probs; ILQL reads none of them.
    zeros = (0.0,) * len(completion_ids)
    return Trajectory(rollout_id=where, prompt_id="", group_id=where, prompt_ids=tuple(prompt_ids),
                      completion_ids=tuple(completion_ids), sampling_logprobs=zeros, reference_logprobs=zeros,
                      reward=float(reward), policy_version="", topic=topic, partition=partition, offset=offset)


def samples_from_jsonl(path: str | Path, tokenizer, *, append_eos: bool, max_tokens: int | None) -> list[Trajectory]:
    """Every row of ``path`` tokenized; the first unusable row raises
    JsonlError (``FILE:LINE: field: message``). A row may say
    ``"truncated": true`` (the sample was cut at its length limit): no end
    token is appended to it."""
    out = []
    for row in read_jsonl(path):
        texts = {}
        for name in ("prompt", "completion"):
            value = row.value.get(name)
            if not isinstance(value, str) or not value:
                what = "is missing" if name not in row.value else f"is {json.dumps(value)[:40]}"
                raise JsonlError(row.where, name, f"{what}; ILQL needs a non-empty string (rows: prompt, "
                                                  "completion, reward)")
            texts[name] = value
        reward = row.value.get("reward")
        if isinstance(reward, bool) or not isinstance(reward, int | float) or not math.isfinite(reward):
            what = "is missing" if "reward" not in row.value else f"is {json.dumps(reward)[:40]}"
            raise JsonlError(row.where, "reward", f"{what}; ILQL needs a finite number (the sample's score)")
        truncated = row.value.get("truncated", False)
        if not isinstance(truncated, bool):
            raise JsonlError(row.where, "truncated", f"is {json.dumps(truncated)[:40]}; true (the sample hit its "
                                                     "length limit: no end token follows it) or false")
        prompt_ids = tokenizer(texts["prompt"], add_special_tokens=True)["input_ids"]
        completion_ids = tokenizer(texts["completion"], add_special_tokens=False)["input_ids"]
        # A sample cut at its length limit did not end: an end token after it
        # would teach the policy to stop wherever sampling was cut.
        if append_eos and not truncated and tokenizer.eos_token_id is not None:
            completion_ids = [*completion_ids, tokenizer.eos_token_id]
        if not prompt_ids or not completion_ids:
            raise JsonlError(row.where, "prompt" if not prompt_ids else "completion", "tokenizes to zero tokens")
        if max_tokens is not None and len(prompt_ids) + len(completion_ids) > max_tokens:
            raise JsonlError(row.where, "completion", f"prompt + completion are {len(prompt_ids) + len(completion_ids)} "
                                                      f"tokens, over the model's {max_tokens}")
        out.append(_sample(prompt_ids, completion_ids, reward, row.where))
    if not out:
        raise JsonlError(str(path), "file", "has no rows to train on")
    return out


def samples_from_rollouts(kafka, *, reward_source: str, vocab_size: int, max_tokens: int | None,
                          idle_s: float) -> list[Trajectory]:
    """The rollouts topic from its beginning, every partition, without a
    consumer group (nothing is committed: a replay leaves the trainers' offsets
    alone). Duplicates (one rollout delivered twice) count once. A record that
    does not decode, or lacks what ILQL needs, raises with its location."""
    from arbiter.stream import StreamConsumer
    from arbiter.stream.topics import ROLLOUTS
    from trainer.convert import InvalidRollout, trajectory_from_record

    out: dict[str, Trajectory] = {}
    with StreamConsumer(kafka, [ROLLOUTS], group_id=None) as consumer:
        quiet_since = time.monotonic()
        while True:
            # Undecodable records raise PayloadError naming topic[partition]@offset.
            batch = consumer.poll(timeout_s=min(1.0, idle_s))
            for record in batch:
                try:
                    t = trajectory_from_record(record, reward_source, vocab_size=vocab_size, max_tokens=max_tokens)
                except InvalidRollout as err:
                    raise ILQLDataError(f"{err} (data.rollouts: ILQL stops at a record it cannot train on)") from None
                if reward_source == "reward_model":
                    t = _sample(t.prompt_ids, t.completion_ids, t.reward_normalized, t.rollout_id, t.topic,
                                t.partition, t.offset)
                out.setdefault(t.rollout_id, t)
            if batch.records:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= idle_s and not any(consumer.lag().values()):
                break
    if not out:
        raise ILQLDataError(f"topic {kafka.topic(ROLLOUTS)!r} has no rollouts to train on")
    return sorted(out.values(), key=lambda t: (t.topic, t.partition, t.offset))


# ----------------------------------------------------------------------------
# The model


class ILQLModel(torch.nn.Module):
    """The causal LM (π_β) and its heads over the last hidden state."""

    def __init__(self, lm, heads):
        super().__init__()
        self.lm, self.heads = lm, heads

    def forward(self, batch):
        """logits, (Q₁, Q₂), (Q̂₁, Q̂₂) (B, T, V) and V (B, T) at the
        positions that predict each completion token."""
        out = self.lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
        logits = gather_positions(out.logits, batch.positions)
        hidden = gather_positions(out.hidden_states[-1], batch.positions)  # (B, T, H)
        qs, target_qs, values = self.heads(hidden)
        return logits, qs, target_qs, values

    def update_targets(self, alpha: float) -> None:
        h = self.heads
        for online, target in ((h.q1, h.target_q1), (h.q2, h.target_q2)):
            for p, tp in zip(online.parameters(), target.parameters(), strict=True):
                polyak_update(tp.data, p.data, alpha)


def load_model(model_dir: str | Path, seed: int):
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    root = check_checkpoint_dir(model_dir)
    torch.manual_seed(seed)
    lm = AutoModelForCausalLM.from_pretrained(str(root), local_files_only=True, dtype=torch.float32)
    heads = load_heads(root, *head_sizes(lm)) if has_heads(root) else ILQLHeads(*head_sizes(lm))
    tokenizer = load_tokenizer(root)
    if lm.config.pad_token_id is None:
        lm.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return ILQLModel(lm, heads), tokenizer


def batch_loss(model: ILQLModel, trajectories, pad_id: int, config: ILQLConfig) -> ILQLLoss:
    batch = collate(trajectories, pad_id)
    logits, qs, target_qs, values = model(batch)
    rewards = terminal_rewards(batch.scores, batch.mask)
    c = config.ilql
    return ilql_loss(logits.float(), qs, target_qs, values, batch.completion_ids, rewards, batch.mask,
                     gamma=c.gamma, tau=c.tau, cql_coef=c.cql_coef, bc_coef=c.bc_coef, awr_beta=c.awr_beta)


# ----------------------------------------------------------------------------
# Checkpoints and output


def export_policy(model: ILQLModel, tokenizer, out: Path, config: ILQLConfig) -> Path:
    """A Hugging Face directory of the policy plus ``ilql_heads.safetensors``."""
    out.mkdir(parents=True, exist_ok=True)
    model.lm.save_pretrained(out)
    tokenizer.save_pretrained(out)
    save_heads(model.heads, out, {"ilql": asdict(config.ilql), "base": str(config.model_dir)})
    write_metadata(out, version=config.version, ilql={"heads": "ilql_heads.safetensors",
                                                       "sample_with": "logits + beta * (min(target_q1, target_q2) - v)"})
    return out


def save_checkpoint(root: Path, model: ILQLModel, tokenizer, optimizer, config: ILQLConfig, epoch: int,
                    step: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    name = f"epoch-{epoch:04d}"
    tmp, final = root / f".tmp-{name}", root / name
    shutil.rmtree(tmp, ignore_errors=True)
    export_policy(model, tokenizer, tmp, config)
    torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
    (tmp / STATE).write_text(json.dumps({"epoch": epoch, "step": step}))
    _fsync_tree(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    (root / f".{LATEST}").write_text(name)
    (root / f".{LATEST}").replace(root / LATEST)
    kept = sorted(p for p in root.glob("epoch-*") if p.is_dir())
    for old in kept[: -config.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    pointer = root / LATEST
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / STATE).exists() else None


# ----------------------------------------------------------------------------
# The loop


@dataclass(frozen=True)
class EpochReport:
    epoch: int
    step: int
    samples: int
    loss: float
    q: float
    v: float
    cql: float
    bc: float
    seconds: float


def train(config: ILQLConfig, kafka=None, on_epoch=None) -> Path:
    """Runs (or resumes) the whole job; returns output_dir/policy."""
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    output = Path(config.output_dir)
    checkpoints = output / CHECKPOINTS
    resume = latest_checkpoint(checkpoints)
    model, tokenizer = load_model(resume or config.model_dir, config.seed)
    pad_id = int(model.lm.config.pad_token_id)
    try:
        max_tokens = model_max_tokens(model.lm.config, tokenizer)
    except Exception:  # a config naming no limit: only the ids are checked
        max_tokens = None
    if config.data.jsonl is not None:
        data = samples_from_jsonl(config.data.jsonl, tokenizer, append_eos=config.data.append_eos,
                                  max_tokens=max_tokens)
    else:
        data = samples_from_rollouts(kafka, reward_source=config.data.reward_source,
                                     vocab_size=model.lm.get_input_embeddings().num_embeddings,
                                     max_tokens=max_tokens, idle_s=config.data.replay_idle_s)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    epoch, step = 0, 0
    if resume is not None:
        state = json.loads((resume / STATE).read_text())
        epoch, step = int(state["epoch"]), int(state["step"])
        optimizer.load_state_dict(torch.load(resume / OPTIMIZER, weights_only=True))
        log.info("resuming after epoch %d (step %d) from %s", epoch, step, resume)
    model.train()
    while epoch < config.epochs:
        started = time.monotonic()
        # The order of an epoch depends on the seed and the epoch alone, so a
        # resumed run sees what an uninterrupted one would have.
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(config.seed * 1_000_003 + epoch))
        totals = torch.zeros(5, dtype=torch.float64)
        batches = 0
        for first in range(0, len(data), config.batch_size):
            chosen = [data[i] for i in order[first : first + config.batch_size].tolist()]
            losses = batch_loss(model, chosen, pad_id, config)
            optimizer.zero_grad(set_to_none=True)
            losses.loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            optimizer.step()
            step += 1
            if step % config.ilql.target_update_every == 0:
                model.update_targets(config.ilql.polyak_alpha)
            totals += torch.tensor([float(x.detach()) for x in losses], dtype=torch.float64)
            batches += 1
        epoch += 1
        save_checkpoint(checkpoints, model, tokenizer, optimizer, config, epoch, step)
        if on_epoch is not None:
            mean = (totals / batches).tolist()
            on_epoch(EpochReport(epoch, step, len(data), *mean, time.monotonic() - started))
    model.eval()
    return export_policy(model, tokenizer, output / "policy", config)


# ----------------------------------------------------------------------------
# Command line


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="ILQL YAML (see trainer/ilql_config.py for every field)")
    parser.add_argument("--epochs", type=int, help="epochs over the data (overrides the config)")


def ilql_main(args) -> int:
    from arbiter.errors import ArbiterError
    from arbiter.stream import KafkaSettings, StreamError
    from arbiter.stream.errors import PayloadError

    try:
        config = load_ilql_config(args.config, epochs=args.epochs)
        kafka = KafkaSettings.from_env(**config.kafka) if config.data.rollouts else None
    except (ConfigError, ValueError) as err:
        print(f"arbiter train ilql: {err}", file=sys.stderr)
        return 2

    def report(r: EpochReport) -> None:
        print(f"epoch {r.epoch} step {r.step} samples={r.samples} loss={r.loss:.4f} q={r.q:.4f} v={r.v:.4f} "
              f"cql={r.cql:.4f} bc={r.bc:.4f} {r.seconds:.2f}s", flush=True)

    try:
        out = train(config, kafka, on_epoch=report)
    except (JsonlError, ILQLDataError, PayloadError, ConfigError) as err:
        print(f"arbiter train ilql: {err}", file=sys.stderr)
        return 2
    except (StreamError, ArbiterError) as err:  # no broker, a model that does not load
        print(f"arbiter train ilql: {err}", file=sys.stderr)
        return 1
    print(f"ILQL policy written to {out} (heads: {out / 'ilql_heads.safetensors'})", flush=True)
    return 0
