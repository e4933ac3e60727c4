"""The package layering, read from the source: the core library (``arbiter/``)
knows nothing of the deployables above it, and only the Kafka codec touches
generated protobuf code (the services convert at their own boundary)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORE = REPO / "arbiter"
GENERATED = CORE / "v1"  # protoc output: the one place generated code may import itself
PB2_ALLOWED = {CORE / "stream" / "codec.py"}
ABOVE_THE_CORE = {"services", "trainer", "cli"}


def core_modules() -> list[Path]:
    return sorted(path for path in CORE.rglob("*.py") if GENERATED not in path.parents)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """``(line, dotted name)`` of every import in ``path``, lazy ones inside functions
    included; ``from M import a`` yields ``M.a`` (``a`` may be a module), relative
    imports are resolved against the file's package."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def where(path: Path, line: int, name: str) -> str:
    return f"{path.relative_to(REPO)}:{line}: {name}"


def test_the_scan_sees_imports():
    # Guards the scan itself: a path or parsing slip would make the tests below pass vacuously.
    names = {name for _, name in imported_modules(CORE / "stream" / "codec.py")}
    assert any(name.startswith("arbiter.v1.") and name.endswith("_pb2") for name in names), names


def test_core_imports_nothing_above_it():
    violations = [
        where(path, line, name)
        for path in core_modules()
        for line, name in imported_modules(path)
        if name.split(".")[0] in ABOVE_THE_CORE
    ]
    assert not violations, "\n".join(violations)


def test_only_the_kafka_codec_imports_generated_protobuf_code():
    # tritonclient ships its own *_pb2 (model_config_pb2): Triton's library, not ours.
    violations = [
        where(path, line, name)
        for path in core_modules()
        if path not in PB2_ALLOWED
        for line, name in imported_modules(path)
        if name.startswith("arbiter.v1.") and "_pb2" in name
    ]
    assert not violations, "\n".join(violations)
