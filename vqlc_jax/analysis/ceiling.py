"""The feature-distribution utilization ceiling: the share of codes a tokenizer that follows its codebook's own
features would use, the reference for codebook utilization on splits of finite size.

A codebook is built from R feature rows (k-means centres, a random selection of rows, Gaussian codes). Give every
row to its nearest code: code i owns n_i rows (its cell). T tokens drawn i.i.d. from that feature distribution hit
code i with probability 1 - (1 - n_i / R)^T, so they use, in expectation,

    ceiling(T) = mean_i [1 - (1 - n_i / R)^T]

of the N codes, against uniform(T) = 1 - exp(-T / N) for codes drawn uniformly. Uneven cells (and empty ones:
duplicate codes, Gaussian codes far from every feature) put the ceiling below uniform; at T >> R / min n_i it reaches
the share of non-empty cells. It is an expectation, not a bound: a tokenizer whose tokens spread more evenly than
the features can exceed it; one that maps images onto the codebook as the features lie reaches it, not uniform.
Terms are -expm1(T log1p(-n_i / R)) in float64: accurate to rounding for tiny n_i / R and any T (1e15 included).

`cell_counts(codebook, features)` streams the rows in fixed-size blocks (from memory-mapped shards) through k-means'
blocked nearest-centre search (`codebook.kmeans_search.nearest_centres`: at most row_chunk x chunk_size scores at a
time, never [R, N]), the assignment that defines k-means' cells; ties go to the lowest index, so a duplicate code's
cell is empty. `directory_cell_counts(dir)` does it for a codebook build folder (codebook.npy + features/) and keeps
the result in dir/cell_counts.npy. `split_tokens(config)` gives a trainer config's tokens per training epoch and per
validation pass; `summary` and `coverage_by_cell_size` tabulate the ceiling and, given a tokenizer's per-code
counts, which cells its unused codes own.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

CELL_COUNTS_FILE = "cell_counts.npy"
DEFAULT_ROWS_PER_BLOCK = 16_384
DEFAULT_CELL_EDGES = (0, 1, 2, 5, 10, 20, 50, 100)  # lower edges of the cell-size bins (rows per cell)


def _check_counts(counts: np.ndarray, what: str) -> np.ndarray:
    counts = np.asarray(counts)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(f"{what}: expected per-code counts [N], got shape {counts.shape}")
    counts = counts.astype(np.float64)
    if not np.all(np.isfinite(counts)) or np.any(counts < 0) or counts.sum() <= 0:
        raise ValueError(f"{what}: counts must be finite, non-negative and not all zero")
    return counts


def _check_tokens(tokens: Any) -> np.ndarray:
    tokens = np.asarray(tokens, np.float64)
    if not np.all(np.isfinite(tokens)) or np.any(tokens < 0):
        raise ValueError(f"tokens must be finite and >= 0, got {tokens}")
    return tokens


def hit_probabilities(counts: np.ndarray, tokens: float | Sequence[float] | np.ndarray) -> np.ndarray:
    """1 - (1 - n_i / R)^T per cell, float64 [*tokens.shape, N]: the chance that T draws hit code i."""
    counts = _check_counts(counts, "ceiling")
    t = _check_tokens(tokens)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):  # a cell holding every row: log 0, then 0 * -inf (masked)
        log_miss = np.log1p(-counts / counts.sum())  # log P(a draw misses cell i)
        return -np.expm1(np.where(t > 0, t * log_miss, 0.0))


def ceiling(counts: np.ndarray, tokens: float | Sequence[float] | np.ndarray) -> np.ndarray:
    """mean_i [1 - (1 - n_i / R)^T] for per-cell row counts n_i [N] (R = their sum), float64 shaped like `tokens`."""
    return hit_probabilities(counts, tokens).mean(axis=-1)


def uniform(num_codes: int, tokens: float | Sequence[float] | np.ndarray) -> np.ndarray:
    """1 - exp(-T / N): the expected share of N codes that T uniform i.i.d. draws use, float64 shaped like `tokens`."""
    if num_codes < 1:
        raise ValueError(f"uniform: num_codes must be positive, got {num_codes}")
    return -np.expm1(-_check_tokens(tokens) / num_codes)


def cell_counts(codebook: np.ndarray, features: Any, *, rows_per_block: int = DEFAULT_ROWS_PER_BLOCK,
                chunk_size: int | None = None, row_chunk: int | None = None) -> np.ndarray:
    """Rows of `features` (an array [R, D] or a FeatureSource such as `extract.open_features`'s shards) nearest to
    each code of `codebook` [N, D]: int64 [N]. Reads `rows_per_block` rows at a time (the last block padded, so one
    compilation); `chunk_size` codes x `row_chunk` rows bound the search's scores (nearest_centres' defaults)."""
    import jax.numpy as jnp

    from vqlc_jax.codebook import kmeans_search
    from vqlc_jax.codebook.kmeans_data import as_source

    codebook = np.asarray(codebook, np.float32)
    source = as_source(features)
    if codebook.ndim != 2 or codebook.shape[1] != source.dim:
        raise ValueError(f"cell_counts: codebook {codebook.shape} does not match features of dim {source.dim}")
    if rows_per_block < 1 or source.num_rows < 1:
        raise ValueError(f"cell_counts: rows_per_block={rows_per_block} and the features' {source.num_rows} rows "
                         "must be positive")
    options = {"chunk_size": chunk_size or kmeans_search.DEFAULT_CHUNK_SIZE,
               "row_chunk": row_chunk or kmeans_search.DEFAULT_ROW_CHUNK}
    centres = jnp.asarray(codebook)
    block = min(rows_per_block, source.num_rows)
    counts = np.zeros(len(codebook), np.int64)
    for start in range(0, source.num_rows, block):
        rows = source.read(np.arange(start, min(start + block, source.num_rows)))
        padded = np.zeros((block, source.dim), np.float32)
        padded[: len(rows)] = rows
        labels, _ = kmeans_search.nearest_centres(padded, centres, **options)
        counts += np.bincount(np.asarray(labels)[: len(rows)], minlength=len(codebook))
    return counts


def directory_cell_counts(directory: str | pathlib.Path, **options: Any) -> np.ndarray:
    """`cell_counts` of a codebook build folder's codebook.npy over its features/ shards, kept in (and read back
    from) directory/cell_counts.npy; `options` as `cell_counts`."""
    from vqlc_jax.codebook import extract

    directory = pathlib.Path(directory)
    codebook = np.load(directory / "codebook.npy", mmap_mode="r")
    path = directory / CELL_COUNTS_FILE
    if path.is_file():
        counts = np.load(path)
        if counts.shape == (len(codebook),):
            return counts
    shards, _, _ = extract.open_features(directory / extract.FEATURES_DIR)
    counts = cell_counts(codebook, shards, **options)
    np.save(path, counts)
    return counts


def split_tokens(config: ml_collections.ConfigDict) -> dict[str, int]:
    """Tokens of a trainer config's training epoch (full batches of the train split) and of its validation pass
    (`data.eval_split`, at most `data.eval_max_images` images): {"epoch": ..., "val": ...}."""
    from vqlc_jax import data as data_lib
    from vqlc_jax.data.pipeline import BatchOrder

    d, g = config.data, config.global_batch_size
    per_image = (d.resolution // 2 ** (len(config.model.ddconfig.ch_mult) - 1)) ** 2
    train = BatchOrder.for_split(len(data_lib.make_source(d.name, "train", d.options)), global_batch_size=g, seed=0,
                                 train=True, process_index=0, process_count=1, drop_remainder=None)
    val = len(data_lib.make_source(d.name, d.eval_split, d.options))
    val = min(val, d.eval_max_images) if d.eval_max_images else val
    return {"epoch": train.steps_per_epoch * g * per_image, "val": val * per_image}


def summary(counts: np.ndarray, tokens: Mapping[str, int]) -> dict[str, Any]:
    """The cells (codes N, rows R, non-empty cells) and, per named token count, tokens, ceiling and uniform."""
    counts = np.asarray(counts)
    values = ceiling(counts, list(tokens.values())) if tokens else []
    return {"num_codes": int(counts.size), "rows": int(counts.sum()), "nonempty_cells": int(np.count_nonzero(counts)),
            "splits": {name: {"tokens": int(t), "ceiling": float(c), "uniform": float(uniform(counts.size, t))}
                       for (name, t), c in zip(tokens.items(), values)}}


def coverage_by_cell_size(cells: np.ndarray, used: np.ndarray, tokens: int | None = None,
                          edges: Sequence[int] = DEFAULT_CELL_EDGES) -> list[dict[str, Any]]:
    """Codes grouped by their cell's row count n_i in [edges[k], edges[k + 1]) (the last bin open): per bin, codes,
    their share of the rows, the share the ceiling expects T draws to hit (T: `tokens`, default used.sum()), and the
    share a tokenizer with per-code counts `used` [N] hit."""
    cells = _check_counts(cells, "coverage_by_cell_size: cells")
    used = np.asarray(used)
    if used.shape != cells.shape:
        raise ValueError(f"coverage_by_cell_size: cells {cells.shape} and used {used.shape} differ in shape")
    tokens = float(used.sum()) if tokens is None else float(tokens)
    hit = hit_probabilities(cells, tokens)
    bounds = [*edges, math.inf]
    rows = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        mask = (cells >= lo) & (cells < hi)
        if not mask.any():
            continue
        rows.append({"cell_rows": f"{lo}" if hi == lo + 1 else f"{lo}-{hi - 1}" if hi < math.inf else f">= {lo}",
                     "codes": int(mask.sum()), "row_share": float(cells[mask].sum() / cells.sum()),
                     "expected_hit": float(hit[mask].mean()), "used": float(np.mean(used[mask] > 0))})
    return rows


def report_ceilings(report: Mapping[str, Any], runs: Mapping[str, tuple[str, int | None]]) -> dict[str, float]:
    """The training-epoch ceilings of a sweep report for runs {label: (run folder name, codes N or None)}: from
    `benchmarks/utilization_sweep.py`'s JSON the codebooks whose N a run has, from `analysis sweep`'s sweep.json the
    rows named like a run's folder. {line label: ceiling}; raises ValueError when nothing matches."""
    lines = {}
    if "codebooks" in report:
        sizes = {n for _, n in runs.values()}
        for c in report["codebooks"]:
            if c["num_codes"] in sizes and c.get("ceiling"):
                lines[f"ceiling N={c['num_codes']:,}"] = c["ceiling"]["splits"]["epoch"]["ceiling"]
    elif "rows" in report:
        names = {name for name, _ in runs.values()}
        for row in report["rows"]:
            if row["run"] in names and row.get("ceiling_epoch") is not None:
                lines[f"ceiling {row['run']}"] = row["ceiling_epoch"]
    else:
        raise ValueError("not a sweep report: expected `codebooks` (benchmarks/utilization_sweep.py) or `rows` "
                         "(analysis sweep)")
    if not lines:
        raise ValueError(f"the sweep report has no training-epoch ceiling for the runs {dict(runs)}")
    return lines
