"""Causal language models shared by the policy and the reference services:
loading (a full checkpoint or a LoRA adapter on a base), validation, token-id
checks and the teacher-forced forward pass.

Numerics: weights are float32 unless the service says otherwise
(``--dtype``, ``arbiter.backends.placement``); log-softmax is taken in float64
over up-cast logits, so that two code paths over the same logits (incremental
decoding in the policy, one full forward in the reference) agree to well under
float32's resolution, which is what the wire carries. With bfloat16 or float16
weights the logits themselves carry the half-precision forward's error.

Device: a model sits where its ``Placement`` puts it; the helpers here build
or move their inputs onto the model's device and return log-probs as floats.
"""

from __future__ import annotations

import inspect
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from arbiter.backends.placement import CPU_FLOAT32, Placement, device_and_dtype, model_device
from arbiter.errors import InvalidInput, ModelLoadError
from arbiter.hf import check_checkpoint_dir, describe, load_tokenizer, quiet_transformers, read_config, require_causal_lm
from arbiter.ilql import has_heads, refuse_heads, unwrap, with_heads
from arbiter.types import ModelInfo

ADAPTER_CONFIG = "adapter_config.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
PROBE_TEXT = "Hello, how can I help you today?"


@dataclass
class LoadedLM:
    model: object
    tokenizer: object
    info: ModelInfo
    # name -> shape of every parameter: two versions are interchangeable only
    # when these agree (a hot swap must not change the architecture).
    shapes: dict[str, tuple[int, ...]]


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).exists()


def _has_tokenizer(path: Path) -> bool:
    return any((path / name).exists() for name in _TOKENIZER_FILES)


def _from_pretrained(path: str | Path, dtype):
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    require_causal_lm(read_config(path), path)
    try:
        return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=dtype)
    except Exception as err:  # transformers raises many types (shape mismatch: RuntimeError)
        # Transformers logs the detail of a shape mismatch and raises a bare
        # "see the report above"; say which tensor is wrong instead.
        detail = _shape_mismatch(Path(path)) or str(err)
        raise ModelLoadError(f"cannot load a causal language model from {str(path)!r}: {detail}") from err


def _shape_mismatch(path: Path) -> str | None:
    """Best effort: the first tensor whose shape in the safetensors files
    differs from what config.json implies (read from headers, no weights)."""
    try:
        import torch
        from safetensors import safe_open
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
        for weights in sorted(path.glob("*.safetensors")):
            with safe_open(str(weights), "pt") as fh:
                for key in fh.keys():
                    got = tuple(fh.get_slice(key).get_shape())
                    if key in expected and got != expected[key]:
                        return (
                            f"weights do not match config.json: {key!r} is {list(got)} in {weights.name}, "
                            f"the config needs {list(expected[key])}"
                        )
    except Exception:  # the diagnosis must never hide the original error
        return None
    return None


def _adapter_base(root: Path, base_dir: str | Path | None) -> Path:
    """The base an adapter applies to: the server's own base checkpoint when
    it has one (RLHF adapters are trained against the initial policy), else
    the local directory the adapter names."""
    if base_dir is not None:
        return Path(base_dir)
    try:
        named = json.loads((root / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{str(root / ADAPTER_CONFIG)!r}: not valid JSON ({err})") from err
    if named and Path(named).is_dir():
        return Path(named)
    raise ModelLoadError(
        f"{str(root)!r} is a LoRA adapter but its base model {named!r} is not a local directory; "
        "load it on a server started with that base (--model)"
    )


def load_causal_weights(
    root: Path, base_dir: str | Path | None = None, placement: Placement = CPU_FLOAT32, *,
    ilql_beta: float | None = None,
) -> tuple[object, object]:
    """(model, tokenizer) of a full checkpoint, or of a LoRA adapter
    (``adapter_config.json``) merged into a fresh copy of its base so inference
    costs the same as a full model. A directory without tokenizer files uses
    ``base_dir``'s tokenizer. Blocking; in eval mode, on ``placement``'s
    device and dtype (a checkpoint saved in another dtype is cast as it loads).

    A checkpoint with ILQL heads (``arbiter.ilql``) is refused unless the
    caller samples with them (``ilql_beta``): the model then returns the
    perturbed logits ``logits + β·(min Q̂ − V)``."""
    import torch

    if ilql_beta is None:
        refuse_heads(root, "this service")
    if is_adapter_dir(root):
        base = _adapter_base(root, base_dir)
        # Merged in float32 and cast once: merging into half-precision weights
        # would round the base and then the sum.
        model = _from_pretrained(base, torch.float32)
        try:
            from peft import PeftModel

            with warnings.catch_warnings():
                # peft reads a property transformers has deprecated; not actionable here.
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
                model = PeftModel.from_pretrained(model, str(root), is_trainable=False).merge_and_unload()
        except Exception as err:
            raise ModelLoadError(f"cannot apply the LoRA adapter in {str(root)!r} to {str(base)!r}: {err}") from err
        tokenizer_dir = root if _has_tokenizer(root) else base
    else:
        model = _from_pretrained(root, placement.torch_dtype)
        tokenizer_dir = root if _has_tokenizer(root) or base_dir is None else Path(base_dir)
    # Shared: every version of a policy hot-swapped in carries the same
    # tokenizer files, loaded and fingerprinted once (serving never modifies it).
    tokenizer = load_tokenizer(tokenizer_dir, shared=True)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model = placement.place(model)
    if ilql_beta is not None and has_heads(root):
        model = with_heads(model, root, ilql_beta)
    return model, tokenizer


def load_causal_lm(
    model_dir: str | Path,
    *,
    kind: str,
    version: str | None = None,
    base_dir: str | Path | None = None,
    max_tokens: int | None = None,
    placement: Placement = CPU_FLOAT32,
    ilql_beta: float | None = None,
) -> LoadedLM:
    """``load_causal_weights`` plus the version's ``ModelInfo`` and parameter
    shapes, checked to give finite logits."""
    root = check_checkpoint_dir(model_dir)
    model, tokenizer = load_causal_weights(root, base_dir, placement, ilql_beta=ilql_beta)
    device, dtype = device_and_dtype(model)
    extra = {"adapter": "true"} if is_adapter_dir(root) else {}
    if unwrap(model) is not model:
        extra["ilql_beta"] = str(ilql_beta)
    info = describe(
        kind, root, source_path=root, tokenizer=tokenizer, config=model.config, version=version,
        max_tokens=max_tokens, backend="torch", extra=extra or None, device=device, dtype=dtype,
    )
    # The policy's own parameters: a version with heads may replace one
    # without (and back), as long as the policy keeps its architecture.
    shapes = {name: tuple(p.shape) for name, p in unwrap(model).named_parameters()}
    loaded = LoadedLM(model, tokenizer, info, shapes)
    probe_finite(model, tokenizer)
    return loaded


def probe_finite(model, tokenizer) -> None:
    """Refuse a version whose forward pass fails or gives non-finite logits
    (a diverged training step, NaN weights)."""
    import torch

    ids = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"] or [0]
    try:
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids], dtype=torch.long, device=model_device(model)),
                           **no_cache(model)).logits
    except Exception as err:
        raise ModelLoadError(f"probe forward pass failed: {err}") from err
    bad = int((~torch.isfinite(logits)).sum())
    if bad:
        raise ModelLoadError(
            f"probe forward pass gave {bad} non-finite logits of {logits.numel()}: the weights are broken "
            "(NaN/inf); nothing was swapped"
        )


def _check_same_tokenizer(new: ModelInfo, serving: ModelInfo) -> None:
    if new.tokenizer_fingerprint != serving.tokenizer_fingerprint:
        raise ModelLoadError(
            f"tokenizer fingerprint {new.tokenizer_fingerprint[:12]}... differs from the serving version's "
            f"{serving.tokenizer_fingerprint[:12]}...; a new version must keep the tokenizer (callers send token "
            "ids, which would mean other tokens)"
        )


def check_same_model(new, serving) -> None:
    """A new version of a served causal LM whose callers send token ids (the
    reference, in-process or in Triton): the same tokenizer and the same
    architecture (``arbiter.hf.architecture``), judged from ``info``."""
    _check_same_tokenizer(new.info, serving.info)
    ours, theirs = new.info.extra.get("architecture"), serving.info.extra.get("architecture")
    if ours != theirs:
        raise ModelLoadError(
            f"architecture {ours!r} differs from the serving version {serving.info.version!r}'s {theirs!r}; a new "
            "version must keep the architecture: load another model on a server of its own"
        )


def require_plain_causal_lm(config, root: str | Path) -> None:
    """``require_causal_lm``, for a server that serves the policy alone (a
    Triton backend): a checkpoint with ILQL heads is refused."""
    require_causal_lm(config, root)
    refuse_heads(root, "this service's Triton backend")


def check_compatible(new: LoadedLM, serving: LoadedLM) -> None:
    """A new version must be a drop-in replacement for the serving one."""
    _check_same_tokenizer(new.info, serving.info)
    for name, shape in serving.shapes.items():
        got = new.shapes.get(name)
        if got != shape:
            what = "is missing" if got is None else f"has shape {list(got)}"
            raise ModelLoadError(
                f"parameter {name!r} {what}; the serving version {serving.info.version!r} has {list(shape)}"
            )
    extra = sorted(set(new.shapes) - set(serving.shapes))
    if extra:
        raise ModelLoadError(f"parameters {extra[:3]} are not in the serving version {serving.info.version!r}")


def check_token_ids(ids: Sequence[int], vocab_size: int, field: str) -> None:
    for j, token in enumerate(ids):
        if not 0 <= token < vocab_size:
            raise InvalidInput(f"{field}[{j}]", f"token id {token} is outside the vocabulary [0, {vocab_size})")


def forward_step(model, input_ids, attention_mask, position_ids, cache=None, last_only: bool = False):
    """One forward with a KV cache; returns (logits, cache), logits in the
    model's dtype on its device. Inputs are moved to the model's device (a
    no-op when already there). Transformers renamed ``past_key_values`` to
    ``cache``; both spellings work here."""
    params = _forward_params(model)
    device = model_device(model)
    kwargs = dict(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                  position_ids=position_ids.to(device), use_cache=True)
    if cache is not None:
        kwargs["cache" if "cache" in params else "past_key_values"] = cache
    if last_only and "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1
    out = model(**kwargs)
    new_cache = getattr(out, "cache", None)
    if new_cache is None:
        new_cache = out.past_key_values
    return out.logits, new_cache


_PARAMS_CACHE: dict[type, frozenset[str]] = {}


def _forward_params(model) -> frozenset[str]:
    cls = type(model)
    if cls not in _PARAMS_CACHE:
        _PARAMS_CACHE[cls] = frozenset(inspect.signature(model.forward).parameters)
    return _PARAMS_CACHE[cls]


def no_cache(model) -> dict[str, bool]:
    """``use_cache=False`` for a forward whose signature takes it, else
    nothing: a whole-sequence forward (scoring, teacher forcing, a probe)
    has no next step, and a causal LM otherwise copies every layer's keys
    and values into a cache it returns (3-10 % of a CPU forward, measured;
    three kernel launches a layer on a GPU). Encoder models take no such
    argument."""
    return {"use_cache": False} if "use_cache" in _forward_params(model) else {}


def completion_logits(model, pad_id: int, batch: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list:
    """Teacher-forced forward of prompt + completion, right-padded (a causal
    model's real positions are then unaffected by the padding). Returns, per
    item, the (C, V) logits that predict each completion token, in the
    model's dtype on its device (up-cast them before a softmax)."""
    import torch

    width = max(len(p) + len(c) for p, c in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (prompt, completion) in enumerate(batch):
        ids = [*prompt, *completion]
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    device = model_device(model)
    with torch.inference_mode():
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                       **no_cache(model)).logits
    # Position t predicts token t + 1: completion token k sits at len(prompt) + k.
    return [logits[row, len(p) - 1 : len(p) - 1 + len(c)] for row, (p, c) in enumerate(batch)]


def gather_tokens(logprobs, tokens):
    """(C, V) log-probs (on any device) and C token ids (a sequence, or a
    long tensor already on that device: a batch's ids copied over once)
    -> a (C,) tensor beside them."""
    import torch

    if not isinstance(tokens, torch.Tensor):
        tokens = torch.tensor(list(tokens), dtype=torch.long, device=logprobs.device)
    return logprobs.gather(-1, tokens[:, None])[:, 0]


def token_logprobs(logprobs, tokens: Sequence[int]) -> list[float]:
    """(C, V) log-probs (on any device) and C token ids -> C floats."""
    return gather_tokens(logprobs, tokens).tolist()
