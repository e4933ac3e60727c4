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
instances) with its own tensors: ``reward`` (ids + lengths -> scores) and
``reference`` (ids + prompt/completion lengths -> per-token log-probs of the
completion). ``policy`` (generation) is not exported: see the README.

``--device`` and ``--dtype`` say how Triton runs the weights, in the words of
a service's own flags (``arbiter.backends.placement``): the device becomes the
instance group (cpu: KIND_CPU; cuda: KIND_GPU; cuda:N: KIND_GPU on GPU N;
auto: KIND_AUTO, a GPU when Triton has one), the dtype a config parameter the
model file loads with. Nothing here needs a GPU: export on any machine.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from arbiter.backends import pad_token_id
from arbiter.backends.placement import DEVICE_FORMS, DTYPES, is_device_name
from arbiter.config import flag
from arbiter.backends.signatures import SIGNATURES, TritonSignature
from arbiter.backends.triton import CHECKPOINT_DIR, CONFIG_FILE
from arbiter.hf import check_checkpoint_dir, load_tokenizer, read_config, read_metadata
from arbiter.lm import is_adapter_dir
from arbiter.reward.backend import check_reward_config

KINDS = ("reward", "reference", "policy")
EXPORTABLE = ("reward", "reference")
_MODEL_FILE = Path(__file__).parent / "triton_models" / "model.py"


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


def export(model_dir: str | Path, kind: str, repository: str | Path, options: ExportOptions = ExportOptions()) -> Path:
    """Returns the new version directory REPO/NAME/N."""
    if kind not in KINDS:
        raise ExportError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind not in EXPORTABLE:
        raise ExportError(
            f"--kind {kind} is not exported to Triton yet (only {', '.join(EXPORTABLE)}); serve it in-process "
            "(--backend torch). See the README's Triton section for what is and is not supported."
        )
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
        shutil.copy2(_MODEL_FILE, staging / "model.py")
        shutil.copytree(source, staging / CHECKPOINT_DIR, ignore=shutil.ignore_patterns(".*", "__pycache__"))
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    # One config for every version of the model: rewritten with this export's options.
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
    if kind == "reference" and is_adapter_dir(checkpoint):
        raise ExportError(
            f"{str(checkpoint)!r} is a LoRA adapter; Triton serves full checkpoints: merge it into its base "
            "(peft merge_and_unload + save_pretrained, with the tokenizer) and export that"
        )
    config = read_config(checkpoint)
    if kind == "reward":
        check_reward_config(config, checkpoint)
    return pad_token_id(config, load_tokenizer(checkpoint))


def _tensors(signature: TritonSignature) -> str:
    """config.pbtxt's input/output blocks; dims leave out the batch dimension."""
    def block(kind: str, tensors) -> str:
        entries = []
        for t in tensors:
            lines = [f'    name: "{t.name}"', f"    data_type: TYPE_{t.datatype}",
                     f"    dims: [ {', '.join(str(d) for d in t.shape[1:])} ]"]
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
    }
    params = "".join(
        f'parameters: {{\n  key: "{key}"\n  value: {{ string_value: "{value}" }}\n}}\n'
        for key, value in parameters.items()
    )
    # INPUT_IDS is ragged across requests (each request is padded to its own
    # width); the model re-pads the merged batch, so Triton may batch them.
    return f"""# Written by `arbiter triton export`; Arbiter loads versions with a
# version_policy override, so the policy here only matters for --load-model.
name: "{name}"
backend: "python"
max_batch_size: {options.max_batch_size}
dynamic_batching {{
  max_queue_delay_microseconds: {options.max_queue_delay_us}
}}
{_tensors(SIGNATURES[model_kind])}{_instance_group(options)}{params}"""
