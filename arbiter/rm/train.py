"""Reward-model training: preferences in, a registry version out.

The model is ``AutoModelForSequenceClassification`` with one label, the
format the reward service loads (and TRL's RewardTrainer writes): started
from any Hugging Face directory (a causal LM's backbone gets a fresh scalar
head) or from an earlier reward model. Inputs are rendered and tokenized by the
reward service's own code (``arbiter.rm.data.ServiceEncoder``) and scored the
way its torch backend scores them (right padding, attention mask, the model's
own pooled logit), so held-out accuracy, the normalization statistics and the
calibration scores are what the service will see for the same inputs.
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from arbiter.errors import ArbiterError, ModelLoadError
from arbiter.hf import check_checkpoint_dir, load_tokenizer, model_max_tokens, quiet_transformers, read_metadata
from arbiter.rm.config import RMTrainConfig
from arbiter.rm.data import RankedExample, ServiceEncoder, dedupe, load_jsonl
from arbiter.rm.losses import (
    all_pairs_bradley_terry_loss,
    bradley_terry_loss,
    pairwise_accuracy,
    plackett_luce_loss,
)
from arbiter.reward.convention import TextConvention, resolve_text_convention
from arbiter.rm.registry import ModelRegistry, RegistryVersion
from arbiter.types import Truncation

if TYPE_CHECKING:
    from arbiter.rm.topic import TopicBatch

log = logging.getLogger(__name__)


class TrainingError(ArbiterError):
    """Training ran (or could not start) but produced no version; says why."""


@dataclass(frozen=True)
class TrainResult:
    version: RegistryVersion
    # How training started: "backbone" (fresh scalar head) or "reward_model".
    init: str
    parent_version: str | None
    metrics: dict[str, Any]
    normalization: dict[str, float]
    calibration_scores: list[float] = field(repr=False, default_factory=list)
    # What arbiter.json records as text_convention.
    text_convention: dict[str, Any] = field(default_factory=dict)


# -- model -------------------------------------------------------------------


def init_model(model_dir: str | Path, seed: int = 0):
    """(model, tokenizer, init kind, source metadata) for training from ``model_dir``.

    A directory whose config is a sequence-classification model with one label
    is continued as is; anything else (a causal LM, a bare backbone, a
    classifier with other labels) is loaded as a backbone under a fresh,
    seeded scalar head.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    quiet_transformers()
    root = check_checkpoint_dir(model_dir)
    tokenizer = load_tokenizer(root)
    try:
        config = AutoConfig.from_pretrained(str(root), local_files_only=True)
    except Exception as err:
        raise ModelLoadError(f"cannot read the model config in {str(root)!r}: {err}") from err
    is_reward_model = config.num_labels == 1 and any(
        arch.endswith("ForSequenceClassification") for arch in (config.architectures or [])
    )
    torch.manual_seed(seed)  # the fresh head's initialization
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(root), local_files_only=True, num_labels=1, dtype=torch.float32,
            ignore_mismatched_sizes=not is_reward_model,
        )
    except Exception as err:
        raise ModelLoadError(f"cannot load {str(root)!r} as a sequence-classification model: {err}") from err
    if model.config.pad_token_id is None:
        # Saved with the version: the service pools at the last non-pad token
        # with this id, exactly as training did.
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, ("reward_model" if is_reward_model else "backbone"), read_metadata(root)


def training_text_convention(
    append_eos: bool | None, start_dir: str | Path, tokenizer, init_kind: str
) -> TextConvention:
    """The text convention a run trains (and its version is served) with:
    the config's ``append_eos`` when set; else a reward model being continued
    keeps its own (as the reward service would resolve it); else, for a fresh
    head, TRL's (the end token appended)."""
    if append_eos is not None:
        convention = TextConvention(append_eos, "the training config's append_eos")
    elif init_kind == "reward_model":
        return resolve_text_convention(start_dir, tokenizer)
    else:
        # TRL's convention when the tokenizer has an end token to append.
        convention = TextConvention(tokenizer.eos_token is not None, "the default for a fresh reward head")
    if convention.append_eos and tokenizer.eos_token is None:
        raise TrainingError(
            f"{convention.source} appends the end token, but the tokenizer of {str(start_dir)!r} has no eos_token; "
            "set append_eos: false"
        )
    return convention


def forward_scores(model, batch: Sequence[Sequence[int]], pad_token_id: int) -> torch.Tensor:
    """Scores (N,) of token-id sequences: right-padded with an attention mask,
    the model's pooled logit; the reward service's torch backend computes the same."""
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)  # (N, T)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)  # (N, T)
    for row, ids in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]  # (N,)


def group_scores(flat: torch.Tensor, ks: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat scores (sum K_i,) -> (B, max K) best first, and its mask (B, max K)."""
    width = max(ks)
    scores = flat.new_zeros((len(ks), width))
    mask = torch.zeros((len(ks), width), dtype=torch.bool)
    start = 0
    for row, k in enumerate(ks):
        scores[row, :k] = flat[start : start + k]
        mask[row, :k] = True
        start += k
    return scores, mask


def example_losses(
    scores: torch.Tensor, mask: torch.Tensor, margins: torch.Tensor, ranking_loss: str
) -> torch.Tensor:
    """Per-example loss (B,): pairs (K = 2) are Bradley-Terry with their margin
    (0 when none); rankings (K > 2) use ``ranking_loss``."""
    ks = mask.sum(dim=1)  # (B,)
    losses = scores.new_zeros(scores.shape[0])
    pairs = ks == 2
    if pairs.any():
        losses[pairs] = bradley_terry_loss(scores[pairs, 0], scores[pairs, 1], margins[pairs], reduction="none")
    rankings = ~pairs
    if rankings.any():
        fn = plackett_luce_loss if ranking_loss == "plackett_luce" else all_pairs_bradley_terry_loss
        losses[rankings] = fn(scores[rankings], mask[rankings], reduction="none")
    return losses


def _margins(examples: Sequence[RankedExample]) -> torch.Tensor:
    return torch.tensor([e.margin or 0.0 for e in examples], dtype=torch.float32)


@torch.no_grad()
def evaluate(
    model, examples: Sequence[RankedExample], ids: Sequence[list[list[int]]], pad_token_id: int,
    batch_size: int, ranking_loss: str,
) -> dict[str, float]:
    """Held-out pairwise accuracy (every ordered pair of a ranking counts; ties
    half) and mean loss, in eval mode."""
    was_training = model.training
    model.eval()
    correct, pairs, loss_sum = 0.0, 0, 0.0
    for start in range(0, len(examples), batch_size):
        chunk = list(range(start, min(start + batch_size, len(examples))))
        flat = forward_scores(model, [seq for i in chunk for seq in ids[i]], pad_token_id)
        scores, mask = group_scores(flat, [examples[i].k for i in chunk])
        right, total = pairwise_accuracy(scores, mask)
        correct, pairs = correct + right, pairs + total
        losses = example_losses(scores, mask, _margins([examples[i] for i in chunk]), ranking_loss)
        loss_sum += float(losses.sum())
    model.train(was_training)
    return {"accuracy": correct / pairs if pairs else float("nan"), "loss": loss_sum / max(len(examples), 1),
            "pairs": pairs}


@torch.no_grad()
def score_sequences(model, sequences: Sequence[list[int]], pad_token_id: int, batch_size: int) -> list[float]:
    was_training = model.training
    model.eval()
    out: list[float] = []
    for start in range(0, len(sequences), batch_size):
        out += forward_scores(model, sequences[start : start + batch_size], pad_token_id).tolist()
    model.train(was_training)
    return out


# -- data --------------------------------------------------------------------


def prompt_key(example: RankedExample) -> str:
    """What an example's candidates answer: the prompt, or a conversation's
    turns before the scored one."""
    first = example.candidates[0]
    if first.messages is not None:
        return repr(first.messages[:-1])
    return first.prompt


def split_examples(
    examples: Sequence[RankedExample], fraction: float, seed: int, by: str = "pair"
) -> tuple[list[RankedExample], list[RankedExample]]:
    """(train, held out), both in the examples' order.

    ``by="pair"``: a seeded shuffle of the examples, the first
    round(n * fraction) held out (at least one when fraction > 0, never all).
    ``by="prompt"``: the same over prompts (:func:`prompt_key`): whole
    prompts are held out, in a seeded order, until at least round(n *
    fraction) examples are; never every prompt. Data with a single prompt
    cannot be split by prompt and is split by pair."""
    n = len(examples)
    if fraction <= 0 or n < 2:
        return list(examples), []
    target = min(n - 1, max(1, round(n * fraction)))
    groups: dict[str, list[int]] = {}
    for i, example in enumerate(examples):
        groups.setdefault(prompt_key(example) if by == "prompt" else str(i), []).append(i)
    if len(groups) < 2:
        groups = {str(i): [i] for i in range(n)}
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    held: set[int] = set()
    for key in keys[:-1]:  # the last prompt always trains
        if len(held) >= target:
            break
        held.update(groups[key])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def train_subset(
    examples: Sequence[RankedExample], subset: str, seed: int = 0, shard_index: int = 0, shard_count: int = 1
) -> list[RankedExample]:
    """What a run trains on of ``examples`` (``RMTrainConfig.train_subset``):
    all of them; a bootstrap resample (len(examples) draws with replacement,
    from ``random.Random(seed)``); or shard ``shard_index`` of a partition
    into ``shard_count`` shards (a seeded shuffle, then every
    ``shard_count``-th example from position ``shard_index``: the shards are
    disjoint, cover every example, and differ in size by at most one)."""
    if subset == "all":
        return list(examples)
    rng = random.Random(seed)
    if subset == "bootstrap":
        return [examples[rng.randrange(len(examples))] for _ in examples]
    if subset == "shard":
        order = list(range(len(examples)))
        rng.shuffle(order)
        return [examples[i] for i in sorted(order[shard_index::shard_count])]
    raise ValueError(f"unknown train subset {subset!r}")


def _reference_sequences(
    encoded: Sequence[list[list[int]]], limit: int, seed: int
) -> list[list[int]]:
    """Distinct candidate sequences, a seeded sample of at most ``limit``."""
    unique: dict[tuple[int, ...], None] = {}
    for ids in encoded:
        for seq in ids:
            unique.setdefault(tuple(seq), None)
    sequences = [list(seq) for seq in unique]
    if len(sequences) > limit:
        sequences = random.Random(seed + 1).sample(sequences, limit)
    return sequences


# -- the run -------------------------------------------------------------------


def _progress(enabled: bool, console):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), TextColumn("{task.fields[stats]}"),
        console=console or Console(file=sys.stderr), disable=not enabled,
    )


def train_reward_model(
    config: RMTrainConfig,
    topic: TopicBatch | None = None,
    *,
    console=None,
    on_step: Callable[[int, float], None] | None = None,
    metadata: Mapping[str, Any] | None = None,
    files: Mapping[str, str] | None = None,
) -> TrainResult:
    """Train on ``config.data`` plus the preferences read from the topic, and
    publish the result as the next registry version. A malformed file row
    stops the run (DatasetError); a preference from the topic the model
    cannot take is rejected through ``topic`` (``TopicBatch.usable``) and
    training goes on without it. ``metadata`` (more arbiter.json fields,
    e.g. the RM loop's lineage) and ``files`` ({name: text}, written beside
    the weights) are published with the version, atomically with it."""
    started = time.monotonic()
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    extra_examples = topic.examples if topic is not None else []
    examples = dedupe([*load_jsonl(config.data), *extra_examples] if config.data else list(extra_examples))
    if not examples:
        raise TrainingError("no training examples: the data files and the topic are empty")
    if config.eval_data:
        train_set, eval_set = examples, load_jsonl(config.eval_data)
    else:
        train_set, eval_set = split_examples(examples, config.eval_fraction, config.held_out_seed,
                                             by=config.eval_split)
    if not train_set:
        raise TrainingError("no training examples left after holding out the evaluation set")
    if config.min_eval_accuracy is not None and not eval_set:
        raise TrainingError("min_eval_accuracy needs a held-out set: set eval_data or eval_fraction > 0")

    registry = ModelRegistry(config.registry)
    start_dir: str | Path = config.model_dir
    if config.resume_latest and (latest := registry.latest(config.name)) is not None:
        start_dir = latest.path
    model, tokenizer, init_kind, source = init_model(start_dir, config.seed)
    convention = training_text_convention(config.append_eos, start_dir, tokenizer, init_kind)
    pad_id = model.config.pad_token_id
    max_tokens = model_max_tokens(model.config, tokenizer, config.max_tokens)
    encoder = ServiceEncoder(tokenizer, config.name, max_tokens, Truncation(config.truncation), convention)
    if topic is not None:
        train_set, eval_set = topic.usable(train_set, encoder.encode), topic.usable(eval_set, encoder.encode)
        if not train_set:
            raise TrainingError("no training examples left: the model cannot take any preference read from the "
                                "topic (see the skipped records above)")
        if config.min_eval_accuracy is not None and not eval_set:
            raise TrainingError("no held-out examples left for min_eval_accuracy: the model cannot take them")
    # After the topic's refusals, so that a refused record is reported once
    # however often a resample draws it.
    train_set = train_subset(train_set, config.train_subset, config.subset_seed, config.shard_index,
                             config.shard_count)
    if not train_set:
        raise TrainingError(f"shard {config.shard_index} of {config.shard_count} is empty: fewer training "
                            "examples than shards")
    train_ids, truncated = encoder.encode_all(train_set)
    eval_ids, eval_truncated = encoder.encode_all(eval_set)
    reference_ids = eval_ids or train_ids
    if config.reference_data:
        reference_ids, _ = encoder.encode_all(load_jsonl(config.reference_data))
    reference = _reference_sequences(reference_ids, config.calibration_size, config.seed)
    if len(reference) < 2:
        raise TrainingError(
            f"the normalization reference set has {len(reference)} distinct response(s); at least 2 are needed"
        )

    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    model.train()
    rng = random.Random(config.seed)
    steps_per_epoch = math.ceil(len(train_set) / config.batch_size)
    step, epoch_stats = 0, {}
    with _progress(config.progress, console) as progress:
        task = progress.add_task("training", total=steps_per_epoch * config.epochs, stats="")
        for epoch in range(config.epochs):
            order = list(range(len(train_set)))
            rng.shuffle(order)
            loss_sum, correct, pairs = 0.0, 0.0, 0
            for start in range(0, len(order), config.batch_size):
                chunk = order[start : start + config.batch_size]
                batch = [train_set[i] for i in chunk]
                flat = forward_scores(model, [seq for i in chunk for seq in train_ids[i]], pad_id)
                scores, mask = group_scores(flat, [e.k for e in batch])
                loss = example_losses(scores, mask, _margins(batch), config.ranking_loss).mean()
                if not torch.isfinite(loss.detach()):
                    raise TrainingError(f"non-finite loss at step {step + 1}; lower learning_rate")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                step += 1
                loss_sum += float(loss.detach()) * len(chunk)
                right, total = pairwise_accuracy(scores.detach(), mask)
                correct, pairs = correct + right, pairs + total
                if on_step is not None:
                    on_step(step, float(loss.detach()))
                progress.update(
                    task, advance=1,
                    stats=f"epoch {epoch + 1}/{config.epochs} loss {loss_sum / (start + len(chunk)):.4f} "
                          f"acc {correct / pairs:.3f}",
                )
            epoch_stats = {"train_loss": loss_sum / len(order), "train_accuracy": correct / pairs}
            if eval_set and config.progress and epoch + 1 < config.epochs:
                seen = evaluate(model, eval_set, eval_ids, pad_id, config.eval_batch_size, config.ranking_loss)
                progress.console.log(
                    f"epoch {epoch + 1}: train loss {epoch_stats['train_loss']:.4f} acc "
                    f"{epoch_stats['train_accuracy']:.3f}, held-out acc {seen['accuracy']:.3f} "
                    f"loss {seen['loss']:.4f}"
                )

    model.eval()
    held = (
        evaluate(model, eval_set, eval_ids, pad_id, config.eval_batch_size, config.ranking_loss)
        if eval_set else None
    )
    calibration = score_sequences(model, reference, pad_id, config.eval_batch_size)
    mean = sum(calibration) / len(calibration)
    std = math.sqrt(sum((s - mean) ** 2 for s in calibration) / (len(calibration) - 1))
    if not (math.isfinite(mean) and std > 0):
        raise TrainingError(f"degenerate scores on the reference set (mean {mean}, std {std}); nothing published")
    normalization = {"mean": mean, "std": std, "sample_count": len(calibration)}
    metrics: dict[str, Any] = {
        "train_examples": len(train_set),
        # Fewer than train_examples when a bootstrap resample drew some twice.
        "train_distinct_examples": len({id(e) for e in train_set}),
        "eval_examples": len(eval_set),
        "epochs": config.epochs,
        "steps": step,
        **epoch_stats,
        "eval_accuracy": held["accuracy"] if held else None,
        "eval_loss": held["loss"] if held else None,
        "eval_pairs": held["pairs"] if held else 0,
        "truncated_responses": truncated + eval_truncated,
    }
    if config.min_eval_accuracy is not None and held["accuracy"] < config.min_eval_accuracy:
        raise TrainingError(
            f"held-out accuracy {held['accuracy']:.4f} is below min_eval_accuracy {config.min_eval_accuracy}; "
            "nothing published"
        )
    parent_version = source.version if init_kind == "reward_model" else None
    training = {
        "init": init_kind,
        "start_from": str(Path(start_dir).resolve()),
        "parent_name": source.name if init_kind == "reward_model" else None,
        "ranking_loss": config.ranking_loss,
        "learning_rate": config.learning_rate,
        "batch_size": config.batch_size,
        "seed": config.seed,
        "split_seed": config.held_out_seed,
        "train_subset": {"kind": config.train_subset, "seed": config.subset_seed,
                         **({"shard_index": config.shard_index, "shard_count": config.shard_count}
                            if config.train_subset == "shard" else {})},
        "truncation": config.truncation,
        "data": list(config.data),
        **(topic.note() if topic is not None else {}),
    }
    with registry.staging(config.name) as staged:
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        for name, text in (files or {}).items():
            (staged / name).write_text(text)
        metrics["seconds"] = round(time.monotonic() - started, 3)
        version = registry.publish(
            config.name, staged, **(metadata or {}), parent_version=parent_version, metrics=metrics,
            normalization=normalization, calibration_scores=calibration, training=training,
            text_convention=convention.to_json(),
        )
    log.info("published %s %s at %s", config.name, version.version, version.path)
    return TrainResult(version, init_kind, parent_version, metrics, normalization, calibration, convention.to_json())


def summary_table(result: TrainResult):
    """A rich Table of a run's metrics."""
    from rich.table import Table

    table = Table(title=f"reward model {result.version.name} {result.version.version}")
    table.add_column("metric")
    table.add_column("value", justify="right")

    def fmt(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4f}"
        return str(value)

    rows = [
        ("path", str(result.version.path)),
        ("started from", f"{result.init}" + (f" (parent {result.parent_version})" if result.parent_version else "")),
        *((name, fmt(value)) for name, value in result.metrics.items()),
        ("text convention", "end token appended" if result.text_convention.get("append_eos") else "text as given"),
        ("normalization mean", fmt(result.normalization["mean"])),
        ("normalization std", fmt(result.normalization["std"])),
        ("calibration scores", str(result.normalization["sample_count"])),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table
