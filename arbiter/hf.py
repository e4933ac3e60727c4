"""Loading Hugging Face checkpoint directories, offline, through the real code
paths (``AutoTokenizer`` / ``AutoModel*.from_pretrained``), plus the metadata
Arbiter keeps next to a checkpoint (``arbiter.json``)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arbiter.errors import ModelLoadError
from arbiter.types import ModelInfo, NormalizationStats

METADATA_FILE = "arbiter.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
# Tokenizers report huge sentinels (e.g. 1e30) when they have no real limit.
_NO_LIMIT = 1_000_000


@dataclass(frozen=True)
class CheckpointMetadata:
    """What ``arbiter.json`` says about a checkpoint; every field optional."""

    name: str | None = None
    version: str | None = None
    normalization: NormalizationStats | None = None
    extra: dict[str, Any] | None = None


def read_metadata(model_dir: str | os.PathLike) -> CheckpointMetadata:
    path = Path(model_dir) / METADATA_FILE
    if not path.exists():
        return CheckpointMetadata()
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{path}: not valid JSON ({err})") from err
    norm = raw.get("normalization")
    stats = None
    if norm is not None:
        try:
            stats = NormalizationStats(
                mean=float(norm["mean"]), std=float(norm["std"]), sample_count=int(norm.get("sample_count", 0))
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ModelLoadError(f"{path}: normalization needs numeric 'mean' and 'std' ({err})") from err
        if not stats.std > 0:
            raise ModelLoadError(f"{path}: normalization std must be > 0, got {stats.std}")
    return CheckpointMetadata(
        name=raw.get("name"),
        version=None if raw.get("version") is None else str(raw["version"]),
        normalization=stats,
        extra={k: v for k, v in raw.items() if k not in {"name", "version", "normalization"}},
    )


def write_metadata(model_dir: str | os.PathLike, **fields: Any) -> None:
    path = Path(model_dir) / METADATA_FILE
    current = json.loads(path.read_text()) if path.exists() else {}
    current.update({k: v for k, v in fields.items() if v is not None})
    path.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")


def content_version(model_dir: str | os.PathLike) -> str:
    """A stable version label for a checkpoint without ``arbiter.json``: a hash
    of its config and a sample of each weights file (cheap even for GB files)."""
    root = Path(model_dir)
    digest = hashlib.sha256()
    config = root / "config.json"
    if config.exists():
        digest.update(config.read_bytes())
    for weights in sorted(p for p in root.iterdir() if p.name.endswith(_WEIGHT_SUFFIXES)):
        size = weights.stat().st_size
        digest.update(f"{weights.name}:{size}".encode())
        with weights.open("rb") as fh:
            digest.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), os.SEEK_END)
                digest.update(fh.read())
    return "sha-" + digest.hexdigest()[:12]


def check_checkpoint_dir(model_dir: str | os.PathLike) -> Path:
    root = Path(model_dir)
    if not root.is_dir():
        raise ModelLoadError(f"model directory {str(root)!r} does not exist or is not a directory")
    if not (root / "config.json").exists() and not (root / "adapter_config.json").exists():
        raise ModelLoadError(
            f"{str(root)!r} is not a Hugging Face checkpoint: no config.json (or adapter_config.json) inside"
        )
    return root


def quiet_transformers() -> None:
    """Progress bars and advisory warnings from transformers are noise in a
    server's log; errors still surface as exceptions."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


# Files a checkpoint directory holds that never decide its tokenizer: each
# version's own label and weights. Everything else is the tokenizer's key.
_NOT_TOKENIZER = (METADATA_FILE, "generation_config.json", "manifest.json")
_SHARED_TOKENIZERS: OrderedDict[str, Any] = OrderedDict()
_SHARED_TOKENIZERS_MAX = 4
_shared_lock = threading.Lock()
# id(tokenizer) -> (a weak reference to it, its fingerprint)
_FINGERPRINTS: dict[int, tuple[weakref.ref, str]] = {}


def _tokenizer_key(root: Path) -> str:
    """sha256 over the names and bytes of every file of ``root`` but its
    weights and per-version metadata (a few MiB: milliseconds)."""
    digest = hashlib.sha256()
    for path in sorted(root.iterdir()):
        if path.is_file() and not path.name.endswith(_WEIGHT_SUFFIXES) and path.name not in _NOT_TOKENIZER \
                and not path.name.startswith("."):
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def load_tokenizer(model_dir: str | os.PathLike, shared: bool = False):
    """The checkpoint's tokenizer. ``shared``: the same object for every
    directory whose tokenizer files are byte-identical (the serving path:
    each version the trainer publishes carries the same tokenizer, and
    loading it and fingerprinting it again cost ~0.4 s per hot swap of a
    50k-token vocabulary); callers must not modify it."""
    if shared:
        try:
            key = _tokenizer_key(Path(model_dir))
        except OSError as err:
            raise ModelLoadError(f"cannot read the tokenizer files in {str(model_dir)!r}: {err}") from err
        with _shared_lock:
            if key in _SHARED_TOKENIZERS:
                _SHARED_TOKENIZERS.move_to_end(key)
                return _SHARED_TOKENIZERS[key]
        tokenizer = _load_tokenizer(model_dir)
        with _shared_lock:
            tokenizer = _SHARED_TOKENIZERS.setdefault(key, tokenizer)
            while len(_SHARED_TOKENIZERS) > _SHARED_TOKENIZERS_MAX:
                _SHARED_TOKENIZERS.popitem(last=False)
        return tokenizer
    return _load_tokenizer(model_dir)


def _load_tokenizer(model_dir: str | os.PathLike):
    from transformers import AutoTokenizer

    quiet_transformers()

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as err:  # transformers raises many types here
        raise ModelLoadError(f"cannot load tokenizer from {str(model_dir)!r}: {err}") from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"tokenizer in {str(model_dir)!r} has neither a pad nor an eos token")
        # Same fallback as TRL's trainers, so scores match what training saw.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over everything that decides token ids: vocabulary, merges,
    normalizer/pre-tokenizer, special tokens and chat template. Padding and
    truncation settings are excluded: they do not change ids. Computed once
    per tokenizer object (a shared one is fingerprinted once for every
    version it serves)."""
    with _shared_lock:
        known = _FINGERPRINTS.get(id(tokenizer))
    if known is not None and known[0]() is tokenizer:
        return known[1]
    if getattr(tokenizer, "is_fast", False):
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        spec.pop("padding", None)
        spec.pop("truncation", None)
    else:
        spec = {"vocab": sorted(tokenizer.get_vocab().items())}
    spec["special_tokens"] = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    spec["chat_template"] = getattr(tokenizer, "chat_template", None)
    blob = json.dumps(spec, sort_keys=True, ensure_ascii=False).encode()
    fingerprint = hashlib.sha256(blob).hexdigest()
    with _shared_lock:
        # Only shared tokenizers, which nobody modifies, keep theirs.
        if any(t is tokenizer for t in _SHARED_TOKENIZERS.values()):
            for stale in [k for k, (ref, _) in _FINGERPRINTS.items() if ref() is None]:
                del _FINGERPRINTS[stale]
            _FINGERPRINTS[id(tokenizer)] = (weakref.ref(tokenizer), fingerprint)
    return fingerprint


def model_max_tokens(config, tokenizer, override: int | None = None) -> int:
    limits = [
        getattr(config, attr)
        for attr in ("max_position_embeddings", "n_positions", "n_ctx")
        if isinstance(getattr(config, attr, None), int)
    ]
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_limit, int) and tok_limit < _NO_LIMIT:
        limits.append(tok_limit)
    if override:
        limits.append(override)
    if not limits:
        raise ModelLoadError("cannot tell the model's max tokens: set max_tokens explicitly")
    return min(limits)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of one file's bytes, in one read. Through one reused 1 MiB
    buffer: it stays in the CPU's cache between the read and the hash
    (measured on a 475 MiB file: 0.32 s of CPU against 0.51 s reading it
    in fresh 8 MiB chunks)."""
    digest = hashlib.sha256()
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    with Path(path).open("rb", buffering=0) as fh:
        while n := fh.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def files_sha256(paths: Sequence[str | os.PathLike]) -> dict[str, str]:
    """``{name: file_sha256}`` of several files, hashed on parallel threads
    (sha256 releases the GIL): a checkpoint in N shards is hashed up to N
    times as fast on a machine with the cores (whence one file's sha256 and
    not one over all the bytes)."""
    paths = [Path(p) for p in paths]
    if len(paths) <= 1:
        return {p.name: file_sha256(p) for p in paths}
    with ThreadPoolExecutor(min(len(paths), os.cpu_count() or 1), thread_name_prefix="sha256") as pool:
        return dict(zip((p.name for p in paths), pool.map(file_sha256, paths), strict=True))


def combine_weights_sha256(files: Mapping[str, str]) -> str:
    """The weights digest from each file's sha256 (``{name: hex}``; only
    ``.safetensors`` files count): sha256 over ``NAME\0SHA256\n`` in name
    order. Derived from the per-file digests a manifest lists, so nothing
    reads the weights twice to get both (each sha256 pass over a 475 MiB
    file is ~0.4 s of one core, more than writing the file)."""
    names = sorted(name for name in files if name.endswith(".safetensors"))
    if not names:
        raise ModelLoadError("no .safetensors weights to digest")
    digest = hashlib.sha256()
    for name in names:
        digest.update(f"{name}\0{files[name]}\n".encode())
    return digest.hexdigest()


def weights_sha256(model_dir: str | os.PathLike) -> str:
    """sha256 over every safetensors file of a checkpoint (names and each
    file's sha256, ``combine_weights_sha256``): what a publisher announces
    and a loader verifies before a swap."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{str(model_dir)!r} holds no .safetensors weights")
    return combine_weights_sha256(files_sha256(files))


def read_config(model_dir: str | os.PathLike):
    """The checkpoint's Hugging Face config (no weights)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as err:  # transformers raises many types here
        raise ModelLoadError(f"cannot read the model config in {str(model_dir)!r}: {err}") from err


# Config fields that decide a model's shapes (transformers maps each family's
# own names onto these, e.g. GPT-2's n_embd onto hidden_size).
_ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                        "num_key_value_heads", "intermediate_size")
_CAUSAL_HEADS = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
_CLASSIFIER_HEAD = "ForSequenceClassification"


def architecture(config) -> str:
    """A readable signature of what makes two checkpoints interchangeable:
    model type and the shape-deciding sizes (``gpt2 vocab_size=512
    hidden_size=64 ...``). Equal for a LoRA adapter merged into its base and
    that base; different when any weight shape would differ."""
    text = config.get_text_config()
    sizes = []
    for name in _ARCHITECTURE_FIELDS:
        try:
            value = getattr(text, name)
        except AttributeError:
            continue
        if value is not None:
            sizes.append(f"{name}={value}")
    return " ".join([str(getattr(config, "model_type", "?")), *sizes])


def _heads(config) -> list[str]:
    return [a for a in (getattr(config, "architectures", None) or []) if isinstance(a, str)]


def require_causal_lm(config, root: str | os.PathLike) -> None:
    """Refuse a reward (sequence-classification) checkpoint where a causal LM
    is needed (the policy, the reference): its language-model head would be
    made up (tied to the embedding), and every log-prob wrong."""
    classifiers = [a for a in _heads(config) if a.endswith(_CLASSIFIER_HEAD)]
    if classifiers:
        raise ModelLoadError(
            f"{str(root)!r} is a reward model ({classifiers[0]}, num_labels={config.num_labels}), not a causal "
            "language model: the policy and the reference need a *ForCausalLM / *LMHeadModel checkpoint; serve "
            "this one with `arbiter serve reward`"
        )


def causal_lm_head(config) -> str | None:
    """The causal-LM class a checkpoint was saved as, if it says so."""
    return next((a for a in _heads(config) if a.endswith(_CAUSAL_HEADS)), None)


def describe(
    kind: str,
    root: Path,
    *,
    source_path: str | os.PathLike,
    tokenizer,
    config,
    version: str | None,
    max_tokens: int | None,
    backend: str,
    extra: dict[str, str] | None = None,
    device: str = "",
    dtype: str = "",
) -> ModelInfo:
    """The one ``ModelInfo`` builder, for every kind and backend. ``root`` holds
    arbiter.json (name, version label, normalization statistics); ``config``
    is the HF config of the weights served. ``vocab_size`` is the model's id
    space (its text config's ``vocab_size``): token ids at or above it index
    no embedding row, whatever the tokenizer's length."""
    meta = read_metadata(root)
    vocab_size = getattr(config.get_text_config(), "vocab_size", None)
    if not isinstance(vocab_size, int):
        raise ModelLoadError(f"{str(root)!r}: config.json names no vocab_size")
    if len(tokenizer) > vocab_size:
        # One request hitting those ids would fail the whole batch it shares.
        raise ModelLoadError(
            f"{str(root)!r}: the tokenizer has {len(tokenizer)} ids but the model's embedding has {vocab_size} rows "
            f"(config vocab_size): ids {vocab_size}..{len(tokenizer) - 1} index no embedding row. Resize the "
            "embeddings to the tokenizer (model.resize_token_embeddings(len(tokenizer))) and save both again"
        )
    return ModelInfo(
        kind=kind,
        name=meta.name or root.name,
        version=version or meta.version or content_version(root),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        max_tokens=model_max_tokens(config, tokenizer, max_tokens),
        vocab_size=vocab_size,
        source_path=str(Path(source_path).resolve()),
        backend=backend,
        normalization=meta.normalization,
        device=device,
        dtype=dtype,
        loaded_at=time.time(),
        extra={"architecture": architecture(config), **(extra or {})},
    )
