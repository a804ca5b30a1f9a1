"""What every analysis tool writes: `<name>.json` (the data) and `<name>.md` (a Markdown table) in one folder."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np


def fmt(value: Any, digits: int = 4) -> str:
    """A table cell: floats to `digits` significant digits, None as n/a, anything else via str."""
    if value is None:
        return "n/a"
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.{digits}g}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; cells are formatted with `fmt`."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _plain(value: Any) -> Any:
    """numpy scalars and arrays as Python numbers and lists (json's `default` hook)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, pathlib.PurePath):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_report(output: str | pathlib.Path, name: str, data: dict[str, Any], markdown: str) -> pathlib.Path:
    """Writes `output/name.json` and `output/name.md` (creating `output`); returns the JSON path."""
    output = pathlib.Path(output)
    output.mkdir(parents=True, exist_ok=True)
    path = output / f"{name}.json"
    path.write_text(json.dumps(data, indent=1, default=_plain))
    (output / f"{name}.md").write_text(markdown)
    return path
