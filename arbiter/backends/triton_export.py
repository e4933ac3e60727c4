"""``arbiter triton export``: a checkpoint -> one version of a Triton model.

Writes the layout Triton's model repository expects::

    REPO/NAME/config.pbtxt      python backend, dynamic batching, instance groups
    REPO/NAME/N/model.py        arbiter/backends/triton_models/model.py (every kind)
    REPO/NAME/N/checkpoint/     the Hugging Face checkpoint, copied whole

Versions are immutable: a new export is a new N (the next free number unless
``version`` is given), written to a temporary directory and renamed into
place, so Triton never sees half a version. The Arbiter service reads the
tokenizer, config and arbiter.json from ``checkpoint/``; Triton runs the
weights. The same directory served in-process gives the same scores.

Supported kinds, each a Python backend running transformers (CPU or GPU
instances) with its own tensors: ``reward`` (ids + lengths -> scores),
``reference`` (ids + prompt/completion lengths -> per-token log-probs of the
completion) and ``policy`` (ids + sampling parameters -> streamed tokens,
log-probs and finish reasons). A policy version is a decoupled model that
runs Arbiter's own generation engine (continuous batching across Triton
requests): its model file is ``triton_models/policy.py`` and the version
carries a copy of the ``arbiter`` package (``N/engine/``), since Arbiter is
not installed where Triton runs; the decoding budget (``--max-batch-rows``,
``--max-batch-tokens``, ``--max-queued-generations``, ``--prefill-chunk-tokens``, ``--prefix-cache-tokens``)
is set at export.

``--device`` and ``--dtype`` say how Triton runs the weights, in the words of
a service's own flags (``arbiter.backends.placement``): the device becomes the
instance group (cpu: KIND_CPU; cuda: KIND_GPU; cuda:N: KIND_GPU on GPU N;
auto: KIND_AUTO, a GPU when Triton has one), the dtype a config parameter the
model file loads with. Nothing here needs a GPU: export on any machine.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from arbiter.backends import pad_token_id
from arbiter.backends.placement import DEVICE_FORMS, DTYPES, is_device_name
from arbiter.config import flag
from arbiter.backends.signatures import SIGNATURES, TritonSignature
from arbiter.backends.triton import CHECKPOINT_DIR, CONFIG_FILE
from arbiter.policy.scheduler import DecodingConfig
from arbiter.hf import check_checkpoint_dir, load_tokenizer, read_config, read_metadata, require_causal_lm
from arbiter.lm import is_adapter_dir
from arbiter.reward.backend import check_reward_config

KINDS = ("reward", "reference", "policy")
_MODELS = Path(__file__).parent / "triton_models"
# The model file of each kind, written as N/model.py.
_MODEL_FILES = {"reward": _MODELS / "model.py", "reference": _MODELS / "model.py", "policy": _MODELS / "policy.py"}
# The policy's version carries the engine it runs (the arbiter package, less
# what Triton never imports: generated protobuf code, caches).
ENGINE_DIR = "engine"
_PACKAGE = Path(__file__).resolve().parents[1]


class ExportError(ValueError):
    pass


@dataclass(frozen=True)
class ExportOptions:
    """``arbiter triton export``'s options; each field is its flag."""

    name: str | None = field(default=None, metadata=flag(
        help="model name in the repository (default: arbiter.json name, else the dir name)"))
    version: int | None = field(default=None, metadata=flag(help="version number (default: the next free one)"))
    max_batch_size: int = field(default=64, metadata=flag(help="Triton's max_batch_size (sequences)"))
    max_queue_delay_us: int = field(default=2000, metadata=flag(help="Triton's dynamic-batching delay"))
    instances: int = field(default=1, metadata=flag(help="model instances (instance_group count)"))
    # "gpu" (any GPU, Triton's KIND_GPU) is kept for configs written before the service's device names.
    device: str = field(default="cpu", metadata=flag(
        help=f"where Triton runs the model: {DEVICE_FORMS} (the instance group's kind)"))
    # Bound it: Triton runs one process per instance and they share the cores.
    torch_threads: int = field(default=0, metadata=flag(help="torch threads per CPU instance (0: default)"))
    # float32 matches the in-process default exactly; bfloat16/float16 match a
    # service run with the same --dtype (and halve the weights' memory).
    dtype: str = field(default="float32", metadata=flag(choices=DTYPES, help="weights' dtype in Triton"))
    # --kind reward/reference: the model file compiles its forward with
    # torch.compile and warms every graph up in initialize, before Triton
    # marks the version ready (the service's --compile, inside Triton).
    compile: bool = field(default=False, metadata=flag(
        help="reward, reference: Triton runs the forward compiled by torch.compile, its graphs built while the "
             "version loads"))
    # --kind policy: the KV-cache budget and queue of the engine in Triton
    # (the in-process service's --max-batch-rows etc.; max_batch_size and the
    # queue delay do not apply: the engine batches generations itself).
    decoding: DecodingConfig = DecodingConfig()

    def __post_init__(self) -> None:
        if self.name is not None and (not self.name or "/" in self.name or self.name.startswith(".")):
            raise ExportError(f"--name {self.name!r} is not a valid model directory name")
        if self.version is not None and self.version < 1:
            raise ExportError(f"--version must be >= 1, got {self.version}")
        if self.max_batch_size < 1:
            raise ExportError(f"--max-batch-size must be >= 1, got {self.max_batch_size}")
        if self.max_queue_delay_us < 0:
            raise ExportError(f"--max-queue-delay-us must be >= 0, got {self.max_queue_delay_us}")
        if self.instances < 1:
            raise ExportError(f"--instances must be >= 1, got {self.instances}")
        if not (is_device_name(self.device) or self.device == "gpu"):
            raise ExportError(f"--device must be {DEVICE_FORMS}, got {self.device!r}")
        if self.torch_threads < 0:
            raise ExportError(f"--torch-threads must be >= 0, got {self.torch_threads}")
        if self.dtype not in DTYPES:
            raise ExportError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


def export(model_dir: str | Path, kind: str, repository: str | Path, options: ExportOptions = ExportOptions(),
           *, write_config: bool = True) -> Path:
    """Returns the new version directory REPO/NAME/N. ``write_config=False``
    adds a version under the model's existing config.pbtxt (a policy
    follower: the options stay those the model was exported with)."""
    if kind not in KINDS:
        raise ExportError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if options.compile and kind == "policy":
        raise ExportError("--compile applies to --kind reward and reference (the policy engine's decode steps are "
                          "not compiled)")
    source = check_checkpoint_dir(model_dir)
    pad_id = _pad_token_id(source, kind)
    name = options.name or read_metadata(source).name or source.name
    model_root = Path(repository) / name
    _check_same_kind(model_root, kind)
    model_root.mkdir(parents=True, exist_ok=True)
    existing = sorted(int(p.name) for p in model_root.iterdir() if p.is_dir() and p.name.isdigit())
    version = options.version or (existing[-1] + 1 if existing else 1)
    target = model_root / str(version)
    if target.exists():
        raise ExportError(f"{target} already exists: versions are immutable; export as a new version")
    staging = model_root / f".staging-{version}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        shutil.copy2(_MODEL_FILES[kind], staging / "model.py")
        shutil.copytree(source, staging / CHECKPOINT_DIR, ignore=shutil.ignore_patterns(".*", "__pycache__"))
        if kind == "policy":
            shutil.copytree(_PACKAGE, staging / ENGINE_DIR / _PACKAGE.name,
                            ignore=shutil.ignore_patterns(".*", "__pycache__", "v1", "*.so"))
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    # One config for every version of the model: rewritten with this export's options.
    if write_config or not (model_root / CONFIG_FILE).is_file():
        (model_root / CONFIG_FILE).write_text(model_config(name, pad_id, options, kind))
    return target


def _check_same_kind(model_root: Path, kind: str) -> None:
    """One Triton model has one set of tensors: a version of another kind
    under the same name would rewrite the config its versions run with."""
    config = model_root / CONFIG_FILE
    if not config.is_file():
        return
    # Configs written before kinds were recorded are reward models.
    match = re.search(r'key: "arbiter_kind"\s*value: \{ string_value: "(\w+)" \}', config.read_text())
    existing = match.group(1) if match else "reward"
    if existing != kind:
        raise ExportError(
            f"{model_root} is a {existing} model; a {kind} model needs its own name in the repository (--name)"
        )


def _pad_token_id(checkpoint: Path, kind: str) -> int:
    """The pad id the in-process backend pads with (the config's, else the
    tokenizer's); the service reads the tokenizer from the exported
    checkpoint, so it must be there."""
    if kind in ("reference", "policy") and is_adapter_dir(checkpoint):
        raise ExportError(
            f"{str(checkpoint)!r} is a LoRA adapter; Triton serves full checkpoints: merge it into its base "
            "(peft merge_and_unload + save_pretrained, with the tokenizer) and export that"
        )
    config = read_config(checkpoint)
    if kind == "reward":
        check_reward_config(config, checkpoint)
    elif kind == "policy":
        require_causal_lm(config, checkpoint)
    return pad_token_id(config, load_tokenizer(checkpoint))


def _tensors(signature: TritonSignature) -> str:
    """config.pbtxt's input/output blocks; dims leave out the batch dimension
    (of a batched signature)."""
    def block(kind: str, tensors) -> str:
        entries = []
        for t in tensors:
            dims = t.shape[1:] if signature.batched else t.shape
            type_name = "STRING" if t.datatype == "BYTES" else t.datatype
            lines = [f'    name: "{t.name}"', f"    data_type: TYPE_{type_name}",
                     f"    dims: [ {', '.join(str(d) for d in dims)} ]"]
            if t.ragged:
                lines.append("    allow_ragged_batch: true")
            entries.append("  {\n" + "\n".join(lines) + "\n  }")
        return f"{kind} [\n" + ",\n".join(entries) + "\n]\n"

    return block("input", signature.inputs) + block("output", signature.outputs)


def _instance_group(options: ExportOptions) -> str:
    device, _, index = options.device.partition(":")
    kind = {"cpu": "KIND_CPU", "auto": "KIND_AUTO"}.get(device, "KIND_GPU")
    gpus = f"\n    gpus: [ {int(index)} ]" if index else ""
    return f"instance_group [\n  {{\n    count: {options.instances}\n    kind: {kind}{gpus}\n  }}\n]\n"


def model_config(name: str, pad_token_id: int, options: ExportOptions, model_kind: str = "reward") -> str:
    parameters = {
        "arbiter_kind": model_kind,
        "pad_token_id": str(pad_token_id),
        "torch_threads": str(options.torch_threads),
        # What the model file loads the weights in; the instance group places them.
        "dtype": options.dtype,
        "compile": str(options.compile).lower(),
    }
    signature = SIGNATURES[model_kind]
    if model_kind == "policy":
        decoding = options.decoding
        # Every DecodingConfig field, by name (the model file reads them back).
        parameters.update({name: str(value).lower() if isinstance(value, bool) else str(value)
                           for name, value in asdict(decoding).items()})
    params = "".join(
        f'parameters: {{\n  key: "{key}"\n  value: {{ string_value: "{value}" }}\n}}\n'
        for key, value in parameters.items()
    )
    if signature.decoupled:
        # Each request is a whole generation; the engine batches them itself
        # (in flight, at decoding-step boundaries), not Triton's batcher.
        batching = "max_batch_size: 0\nmodel_transaction_policy {\n  decoupled: true\n}\n"
    else:
        # INPUT_IDS is ragged across requests (each request is padded to its own
        # width); the model re-pads the merged batch, so Triton may batch them.
        batching = (f"max_batch_size: {options.max_batch_size}\ndynamic_batching {{\n"
                    f"  max_queue_delay_microseconds: {options.max_queue_delay_us}\n}}\n")
    return f"""# Written by `arbiter triton export`; Arbiter loads versions with a
# version_policy override, so the policy here only matters for --load-model.
name: "{name}"
backend: "python"
{batching}{_tensors(signature)}{_instance_group(options)}{params}"""
