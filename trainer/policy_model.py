"""The policy being trained: a causal LM plus a scalar value head on its last
hidden state (the critic shares the policy's trunk, as in InstructGPT and
TRL's AutoModelForCausalLMWithValueHead), optionally with LoRA adapters."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from arbiter.errors import ModelLoadError
from arbiter.ilql import refuse_heads
from arbiter.hf import (
    check_checkpoint_dir, content_version, load_tokenizer, model_max_tokens, quiet_transformers, read_metadata,
    write_metadata,
)
from trainer.config import LoRAConfig


class PolicyWithValue(nn.Module):
    def __init__(self, lm: nn.Module, tokenizer, base_version: str, lora: bool):
        super().__init__()
        self.lm = lm
        hidden = lm.config.hidden_size
        self.value_head = nn.Linear(hidden, 1)
        # A small head starts with values near 0, so early advantages are the rewards.
        nn.init.normal_(self.value_head.weight, std=1.0 / (hidden + 1))
        nn.init.zeros_(self.value_head.bias)
        self.tokenizer = tokenizer
        self.base_version = base_version
        self.is_lora = lora
        # What a rollout must fit before it reaches a forward pass: ids index
        # embedding rows, prompt + completion take positions.
        self.vocab_size: int = lm.get_input_embeddings().num_embeddings
        try:
            self.max_tokens: int | None = model_max_tokens(lm.config, tokenizer)
        except ModelLoadError:  # a config naming no limit: only the ids are checked
            self.max_tokens = None

    @classmethod
    def load(cls, model_dir: str | Path, lora: LoRAConfig | None = None, seed: int = 0) -> PolicyWithValue:
        from transformers import AutoModelForCausalLM

        quiet_transformers()
        root = check_checkpoint_dir(model_dir)
        refuse_heads(root, "the PPO trainer")
        torch.manual_seed(seed)
        lm = AutoModelForCausalLM.from_pretrained(str(root), local_files_only=True, dtype=torch.float32)
        meta = read_metadata(root)
        if lora is not None:
            from peft import LoraConfig, get_peft_model

            lm = get_peft_model(
                lm,
                LoraConfig(
                    r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                    target_modules=list(lora.target_modules) if lora.target_modules else None,
                    task_type="CAUSAL_LM",
                ),
            )
        policy = cls(lm, load_tokenizer(root), meta.version or content_version(root), lora is not None)
        return policy.eval()

    def forward(self, input_ids: Tensor, attention_mask: Tensor, with_values: bool = True,
                logits_to_keep: int = 0) -> tuple[Tensor, Tensor | None]:
        """logits (B, K, V) and values (B, K) at the last K = ``logits_to_keep``
        positions (0: all L); values None unless ``with_values`` (the hidden
        states are then not kept at all)."""
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=with_values,
                      logits_to_keep=logits_to_keep)
        values = None
        if with_values:
            hidden = out.hidden_states[-1]  # (B, L, H)
            if logits_to_keep:
                hidden = hidden[:, -logits_to_keep:]
            values = self.value_head(hidden).squeeze(-1)
        return out.logits, values

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def policy_snapshot(self) -> dict[str, Tensor]:
        """Copies of what :meth:`save_policy` writes (the LoRA adapter's
        tensors only, with LoRA), for writing while training goes on."""
        from trainer.publish import snapshot_tensors

        return snapshot_tensors(self.lm, only_trainable=self.is_lora)

    def save_policy(self, out_dir: str | Path, version: str, snapshot: dict[str, Tensor] | None = None) -> Path:
        """A servable policy version: full weights, or only the LoRA adapter
        (the policy service applies it to the base it serves). With
        ``snapshot`` (from :meth:`policy_snapshot`) its tensors are written,
        not the live ones, so training may go on meanwhile."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if snapshot is None:
            self.lm.save_pretrained(out, safe_serialization=True)
        else:
            self.lm.save_pretrained(out, safe_serialization=True, state_dict=snapshot)
        self.tokenizer.save_pretrained(out)
        write_metadata(out, name="policy", version=version, base_version=self.base_version)
        return out
