"""Checkpoints derived from the tiny policy, for version-swap tests: each is
written with the ordinary Hugging Face / peft save paths."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import torch

from arbiter.hf import write_metadata


def _load(src: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)


def _copy_tokenizer(src: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(src)).save_pretrained(out)


def perturbed(src: Path, out: Path, version: str, scale: float = 0.5, seed: int = 1) -> Path:
    """A 'trained' next version: every weight moved by Gaussian noise."""
    model = _load(src)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * (p.std() if p.numel() > 1 else 1.0))
    model.save_pretrained(out)
    _copy_tokenizer(src, out)
    write_metadata(out, name="tiny-policy", version=version)
    return out


def lora_adapter(src: Path, out: Path) -> Path:
    """A LoRA adapter (adapter_config.json + adapter_model.safetensors only),
    with random B so it changes the outputs."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False, fan_in_fan_out=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        get_peft_model(_load(src), config).save_pretrained(out)
    return out


def wrong_shapes(src: Path, out: Path) -> Path:
    """config.json says n_embd=64, the token embedding in the weights has 32 columns."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    weights = out / "model.safetensors"
    state = load_file(weights)
    key = next(k for k in state if k.endswith("wte.weight"))
    state[key] = state[key][:, :32].contiguous()
    save_file(state, weights, metadata={"format": "pt"})
    return out


def nan_weights(src: Path, out: Path) -> Path:
    model = _load(src)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.endswith("mlp.c_fc.weight")).fill_(float("nan"))
    model.save_pretrained(out)
    _copy_tokenizer(src, out)
    return out


def with_eos(src: Path, out: Path, eos_token_id: int) -> Path:
    """Same weights; the config names another end-of-sequence token."""
    import json

    shutil.copytree(src, out)
    config = json.loads((out / "config.json").read_text())
    config["eos_token_id"] = eos_token_id
    (out / "config.json").write_text(json.dumps(config))
    return out


def other_tokenizer_policy(out: Path) -> Path:
    """A tiny policy whose tokenizer (hence fingerprint) differs."""
    from arbiter.tiny import TinyConfig, build_tokenizer, make_policy

    cfg = TinyConfig(vocab_size=384)
    return make_policy(out, cfg, build_tokenizer(cfg.vocab_size, cfg.n_positions))


# Like Llama-2's and Mistral's templates: refuses a conversation whose roles
# do not alternate user/assistant (jinja's raise_exception -> TemplateError).
STRICT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def strict_chat_template(src: Path, out: Path, version: str) -> Path:
    """Any checkpoint (policy or reward) with ``STRICT_CHAT_TEMPLATE``."""
    from transformers import AutoTokenizer

    shutil.copytree(src, out)
    tokenizer = AutoTokenizer.from_pretrained(str(src))
    tokenizer.chat_template = STRICT_CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    write_metadata(out, version=version)
    return out
