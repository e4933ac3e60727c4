"""The one JSON-lines reader. Every file of rows Arbiter reads (prompts,
preferences, rankings, scoring input, Elo games) goes through here, so every
malformed row is reported the same way: ``FILE:LINE: field: message``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO


class JsonlError(ValueError):
    """One bad row (or an unreadable file: ``line`` 0); ``where`` is FILE:LINE."""

    def __init__(self, where: str, field: str, message: str):
        super().__init__(f"{where}: {field}: {message}")
        self.where = where
        self.field = field
        self.message = message


class JsonlErrors(ValueError):
    """Every bad row of a read that collects them all (a dataset), in order."""

    def __init__(self, errors: list[JsonlError], shown: int = 20):
        lines = [str(e) for e in errors[:shown]]
        if len(errors) > shown:
            lines.append(f"... and {len(errors) - shown} more")
        super().__init__(f"{len(errors)} malformed row(s):\n" + "\n".join(lines))
        self.errors = errors


@dataclass(frozen=True)
class Row:
    where: str  # FILE:LINE
    value: dict[str, Any]


def parse_lines(lines: Iterable[str], name: str, errors: list[JsonlError] | None = None) -> Iterator[Row]:
    """Objects of non-blank lines (1-based line numbers). A line that is not a
    JSON object raises ``JsonlError``, or with ``errors`` is appended there
    and skipped, so a caller can report every bad line at once."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{name}:{number}"
        try:
            value = json.loads(line)
            if not isinstance(value, dict):
                raise JsonlError(where, "row", f"is a JSON {type(value).__name__}; expected an object")
        except json.JSONDecodeError as err:
            problem = JsonlError(where, "row", f"not valid JSON ({err.msg} at column {err.colno})")
        except JsonlError as err:
            problem = err
        else:
            yield Row(where, value)
            continue
        if errors is None:
            raise problem
        errors.append(problem)


def read_jsonl(path: str | Path, errors: list[JsonlError] | None = None) -> Iterator[Row]:
    """``parse_lines`` over a UTF-8 file; an unreadable file is a ``JsonlError``
    naming it (line 0), raised even with ``errors``."""
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as fh:
            yield from parse_lines(fh, str(path), errors)
    except FileNotFoundError:
        raise JsonlError(str(path), "file", "does not exist") from None
    except OSError as err:
        raise JsonlError(str(path), "file", f"cannot be read: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise JsonlError(str(path), "file", f"is not UTF-8 text ({err.reason})") from None


def read_stream(stream: TextIO, name: str = "<stdin>") -> Iterator[Row]:
    """Rows of an open text stream (``arbiter score`` reads stdin)."""
    yield from parse_lines(stream, name)
