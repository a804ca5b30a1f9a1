"""Codebook usage over training (Figure 3): utilization curves from `metrics.jsonl`, per-code frequency heat maps.

Curves. The trainer appends to `workdir/metrics.jsonl` one line per epoch (`epoch`, 0-based, with `utilization` and
`perplexity` over that epoch's tokens) and one per log window (`step`, `window_utilization`, `window_perplexity`).
`curve(records, metric, per="epoch")` gives x = epoch + 1 (epochs completed) and y = the epoch's value;
`per="window"` gives x = step and y = the window's value (runs shorter than an epoch have only these). A run that
was resumed may repeat an epoch or step: the last line wins.

Heat map. `frequency_grid(counts)` turns per-code counts [N] (`epoch_code_counts.npy`, `eval_code_counts.npy`, or
an evaluation's `code_counts.npy`) into each code's share of all tokens, laid out row-major on a near-square grid
of `cols = ceil(sqrt(N))` columns and `ceil(N / cols)` rows; cells past N are NaN. `sort=False` keeps code-index
order (code i at row i // cols, column i % cols); `sort=True` orders codes by decreasing frequency, so the unused
codes gather at the end. Unused codes have frequency 0, which the log colour scale cannot show: the plot paints
them in a separate colour.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from vqlc_jax.quantizers import perplexity, utilization

METRICS_FILE = "metrics.jsonl"
CURVE_KINDS = ("epoch", "window")


@dataclasses.dataclass(frozen=True)
class Curve:
    """One run's usage curve: x (epochs completed, or steps) and the metric's values."""

    x: np.ndarray
    y: np.ndarray


def metrics_path(run: str | pathlib.Path) -> pathlib.Path:
    """`run` itself if it is a file, else `run/metrics.jsonl`."""
    run = pathlib.Path(run)
    return run if run.is_file() else run / METRICS_FILE


def read_metrics(path: str | pathlib.Path) -> list[dict[str, Any]]:
    """The records of a `metrics.jsonl`; errors name the file and line."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such metrics file (a training workdir holds metrics.jsonl)")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not a JSON line ({err})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def curve(records: Sequence[dict[str, Any]], metric: str = "utilization", per: str = "epoch") -> Curve:
    """`metric` ("utilization" or "perplexity") per epoch or per log window; see the module docstring."""
    if per not in CURVE_KINDS:
        raise ValueError(f"curve: per={per!r}; choices: {', '.join(CURVE_KINDS)}")
    x_key, y_key, offset = ("epoch", metric, 1) if per == "epoch" else ("step", f"window_{metric}", 0)
    points = {int(r[x_key]) + offset: float(r[y_key]) for r in records if x_key in r and y_key in r}
    x = np.array(sorted(points), np.int64)
    return Curve(x, np.array([points[i] for i in x], np.float64))


def load_counts(path: str | pathlib.Path, num_codes: int | None = None) -> np.ndarray:
    """Per-code counts int64 [N] from a `.npy`; errors name the file (wrong rank, negative values, wrong N)."""
    path = pathlib.Path(path)
    counts = np.load(path, allow_pickle=False)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(f"{path}: expected per-code counts [N], got shape {counts.shape}")
    if not np.issubdtype(counts.dtype, np.number) or np.any(counts < 0) or not np.all(np.isfinite(counts)):
        raise ValueError(f"{path}: counts must be finite non-negative numbers (dtype {counts.dtype})")
    if num_codes is not None and counts.size != num_codes:
        raise ValueError(f"{path}: {counts.size} counts, but the codebook has {num_codes} codes")
    return np.asarray(np.round(counts), np.int64)


def usage_summary(counts: np.ndarray) -> dict[str, float]:
    """Codes, used codes, tokens, utilization (share used) and perplexity (exp entropy of the usage)."""
    return {"num_codes": int(counts.size), "used_codes": int(np.count_nonzero(counts)), "tokens": int(counts.sum()),
            "utilization": float(utilization(counts)), "perplexity": float(perplexity(counts))}


def frequency_grid(counts: np.ndarray, *, sort: bool = False) -> np.ndarray:
    """Each code's share of all tokens on a near-square float64 grid, NaN past the last code; see the module doc."""
    counts = np.asarray(counts, np.float64)
    freq = counts / max(counts.sum(), 1.0)
    if sort:
        freq = np.sort(freq)[::-1]
    cols = math.ceil(math.sqrt(freq.size))
    rows = math.ceil(freq.size / cols)
    grid = np.full(rows * cols, np.nan)
    grid[: freq.size] = freq
    return grid.reshape(rows, cols)
