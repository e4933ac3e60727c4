"""Tiny models built from a config, for tests, benchmarks and the demo.

Nothing is downloaded: a byte-level BPE tokenizer is trained on a small
embedded corpus, and GPT-2 shaped models are initialised from a seed. The
results are ordinary Hugging Face directories, loaded back through the same
code that loads any checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from arbiter.hf import quiet_transformers, write_metadata

EOS = "<|endoftext|>"
PAD = "<|pad|>"
# Roles are rendered as plain text markers so any byte-level tokenizer copes.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog.
A good answer is short, kind and correct.
I love this movie, it was wonderful and the actors were great.
This is terrible, I hate it and it made me sad.
The weather today is sunny with a gentle breeze.
Please explain how a reward model scores a response.
Reinforcement learning from human feedback fine-tunes a language model.
The policy generates text and the reward model judges it.
What is the capital of France? The capital of France is Paris.
Write a haiku about the sea. Waves fold into foam, the tide keeps its patient time.
Thank you so much, that was very helpful!
I am not sure, but I think the answer is forty two.
Never give up; great things take time.
The cat sat on the mat and looked out of the window.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.
Happy, joyful, excellent, awful, horrible, bad, good, nice, amazing.
user assistant system: hello, how can I help you today?
"""


@dataclass(frozen=True)
class TinyConfig:
    vocab_size: int = 512
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    n_positions: int = 256
    seed: int = 0


def build_tokenizer(vocab_size: int, max_length: int, corpus: list[str] | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(corpus or _CORPUS.splitlines(), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=EOS, eos_token=EOS, pad_token=PAD, model_max_length=max_length
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _gpt2_config(cfg: TinyConfig, tokenizer, **extra):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=len(tokenizer),
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_embd=cfg.n_embd,
        n_positions=cfg.n_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def make_policy(out_dir: str | Path, cfg: TinyConfig = TinyConfig(), tokenizer=None) -> Path:
    import torch
    from transformers import GPT2LMHeadModel

    out = Path(out_dir)
    tokenizer = tokenizer or build_tokenizer(cfg.vocab_size, cfg.n_positions)
    torch.manual_seed(cfg.seed)
    model = GPT2LMHeadModel(_gpt2_config(cfg, tokenizer))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_metadata(out, name="tiny-policy", version="v0")
    return out


def make_reward(out_dir: str | Path, cfg: TinyConfig = TinyConfig(), tokenizer=None, calibrate: bool = True) -> Path:
    """A sequence-classification RM with one label (TRL RewardTrainer's format).
    With ``calibrate``, normalization stats measured on the embedded corpus
    ship in ``arbiter.json`` with the version."""
    import torch
    from transformers import GPT2ForSequenceClassification

    out = Path(out_dir)
    tokenizer = tokenizer or build_tokenizer(cfg.vocab_size, cfg.n_positions)
    torch.manual_seed(cfg.seed + 1)
    model = GPT2ForSequenceClassification(_gpt2_config(cfg, tokenizer, num_labels=1))
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    stats = None
    if calibrate:
        lines = [line for line in _CORPUS.splitlines() if line]
        with torch.no_grad():
            scores = torch.cat(
                [model(**tokenizer(line, return_tensors="pt")).logits[:, 0] for line in lines]
            )
        stats = {"mean": float(scores.mean()), "std": float(scores.std()), "sample_count": len(lines)}
    write_metadata(
        out, name="tiny-reward", version="v0", normalization=stats,
        calibration_scores=None if stats is None else scores.tolist(),
    )
    return out


def make_tiny_models(out_dir: str | Path, cfg: TinyConfig = TinyConfig()) -> dict[str, Path]:
    """Writes ``OUT/policy`` (causal LM) and ``OUT/reward`` (RM), sharing one tokenizer."""
    out = Path(out_dir)
    quiet_transformers()
    tokenizer = build_tokenizer(cfg.vocab_size, cfg.n_positions)
    return {
        "policy": make_policy(out / "policy", cfg, tokenizer),
        "reward": make_reward(out / "reward", cfg, tokenizer),
    }
